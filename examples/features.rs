//! Multi-scale backbone features at detection resolution, and a picture of what DCNv3 does.
//!
//! ```text
//! cargo run --release --example features                              # sample photo, InternImage-T
//! cargo run --release --example features -- street.jpg --out feats --pixel 420,310 --level 2 --block 3
//! cargo run --release --example features -- --weights internimage_t_1k_224.pth --size 640 a.jpg
//! cargo run --release --example features -- --weights model.safetensors --config config.json a.jpg
//! ```
//!
//! What it does:
//!
//! 1. Resizes the image like the COCO test pipeline of the official detectors (keep the aspect
//!    ratio, shorter side `--size` (800), longer side at most `--max-size` (1333); bicubic), normalises
//!    with the ImageNet mean/std and zero-pads bottom/right to a multiple of `--multiple` (32).
//! 2. Runs the headless backbone and prints each level's shape, stride and channels.
//! 3. Saves the four maps (NCHW f32, keys `level0`..`level3`) to `OUT/features.safetensors`.
//! 4. Writes `OUT/features.png`: the image with the DCNv3 sampling locations of one output pixel
//!    (`--pixel x,y` in original image pixels, default the centre) of block `--block` of stage
//!    `--level`, a zoom on that pixel, and one visualisation per level (`--vis pca`: the first three
//!    principal components as RGB, `--vis norm`: the per-pixel feature norm colour-mapped).
//!
//! In the zoom, hollow grey squares are the regular 3x3 grid (`offset_scale * (i - 1, j - 1)`
//! around the pixel: where a plain convolution would look), each coloured dot is one learned
//! sampling location `p + offset_scale * (k + offset)` (spec 3.2), coloured by group, its size and
//! opacity the point's softmax weight; thin lines join each grid point to where it moved.
//!
//! Other flags: `--model NAME` (zoo entry for architecture / download, default
//! `internimage_t_1k_224`), `--weights PATH` and `--config PATH` (local files, no network),
//! `--device cpu|cuda|metal`, `--dtype f32|f16|bf16`, `-h/--help`.
//!
//! Sample output (the tiny test network: `--weights ../shared/fixtures/weights/tiny_b.safetensors
//! --config tiny_b_config.json`, the sample photo):
//!
//! ```text
//! image assets/chelsea.png 451x300
//! input 1203x800 (scale 2.667), padded to 1216x800
//! backbone forward in 1.05s (F32, Cpu)
//! level  shape                 stride  channels
//!     0  [1, 12, 200, 304]          4        12
//!     1  [1, 24, 100, 152]          8        24
//!     2  [1, 48, 50, 76]           16        48
//!     3  [1, 96, 25, 38]           32        96
//! DCNv3 sampling of level 2 block 0 at level pixel (x 38, y 25) = image (227.6, 149.7); 12 groups x 9 points, offset_scale 2
//! group 0:   p  grid (x, y)         learned (x, y)      weight
//!            0  (  215.6,   137.7)  (  230.4,   135.5)  0.045
//!            ...
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Result};
use clap::Parser;
use image::imageops::FilterType;
use image::{Rgb, RgbImage};
use internimage::zoo::{self, PreprocessConfig};
use internimage::{checkpoint, preprocess, Config, InternImage};

const DEFAULT_MODEL: &str = "internimage_t_1k_224";
const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/chelsea.png");

/// features: InternImage backbone features at detection resolution + DCNv3 sampling picture
#[derive(Debug, Parser)]
#[command(
    name = "features",
    override_usage = "cargo run --release --example features -- [OPTIONS] [IMAGE]",
    after_help = "With no IMAGE the sample photo assets/chelsea.png is used.\n\n\
Writes OUT/features.safetensors (level0..level3, NCHW f32) and OUT/features.png."
)]
struct Cli {
    /// zoo model for the architecture / download
    #[arg(long, value_name = "NAME", default_value = DEFAULT_MODEL)]
    model: String,
    /// local checkpoint (.pth, .safetensors, index json); no network
    #[arg(long, value_name = "PATH")]
    weights: Option<PathBuf>,
    /// Hugging Face config.json for --weights
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// shorter side after resizing
    #[arg(long, value_name = "S", default_value_t = 800, value_parser = positive::<u32>)]
    size: u32,
    /// cap on the longer side
    #[arg(long, value_name = "M", default_value_t = 1333, value_parser = positive::<u32>)]
    max_size: u32,
    /// zero-pad height and width to a multiple of N
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = positive::<usize>)]
    multiple: usize,
    /// output folder
    #[arg(long, value_name = "DIR", default_value = "features_out")]
    out: PathBuf,
    /// pixel (original image coordinates) whose sampling is drawn (default centre)
    #[arg(long, value_name = "X,Y", value_parser = parse_pixel)]
    pixel: Option<(f32, f32)>,
    /// stage of the drawn DCNv3 block, 0..3
    #[arg(long, value_name = "L", default_value_t = 2, value_parser = clap::value_parser!(u8).range(0..=3))]
    level: u8,
    /// block within the stage
    #[arg(long, value_name = "B", default_value_t = 0)]
    block: usize,
    /// level visualisation: 3 principal components as RGB, or feature norm
    #[arg(long, value_name = "pca|norm", default_value = "pca", value_parser = ["pca", "norm"])]
    vis: String,
    /// device to run on
    #[arg(long, value_name = "DEV", default_value = "cpu", value_parser = ["cpu", "cuda", "metal"])]
    device: String,
    /// f32 | f16 | bf16
    #[arg(long, value_name = "T", default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
    /// the image (default: the sample photo)
    #[arg(value_name = "IMAGE")]
    image: Option<PathBuf>,
}

/// A positive number (`--size`, `--max-size`, `--multiple`).
fn positive<T: std::str::FromStr + PartialOrd + Default>(
    v: &str,
) -> std::result::Result<T, String> {
    v.parse()
        .ok()
        .filter(|x: &T| *x > T::default())
        .ok_or(format!("expects a positive integer, got {v:?}"))
}

/// `--pixel X,Y`.
fn parse_pixel(v: &str) -> std::result::Result<(f32, f32), String> {
    let bad = || format!("expects X,Y (two numbers), got {v:?}");
    let (x, y) = v.split_once(',').ok_or_else(bad)?;
    let x: f32 = x.trim().parse().map_err(|_| bad())?;
    let y: f32 = y.trim().parse().map_err(|_| bad())?;
    Ok((x, y))
}

/// `--dtype`: f32 | f16 | bf16.
fn parse_dtype(v: &str) -> std::result::Result<DType, String> {
    match v {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(format!("expects f32, f16 or bf16, got {v:?}")),
    }
}

#[derive(Debug)]
struct Args {
    model: String,
    weights: Option<PathBuf>,
    config: Option<PathBuf>,
    size: u32,
    max_size: u32,
    multiple: usize,
    out: PathBuf,
    pixel: Option<(f32, f32)>,
    level: usize,
    block: usize,
    vis_pca: bool,
    device: String,
    dtype: DType,
    image: PathBuf,
}

impl From<Cli> for Args {
    fn from(c: Cli) -> Self {
        Args {
            model: c.model,
            weights: c.weights,
            config: c.config,
            size: c.size,
            max_size: c.max_size,
            multiple: c.multiple,
            out: c.out,
            pixel: c.pixel,
            level: usize::from(c.level),
            block: c.block,
            vis_pca: c.vis == "pca",
            device: c.device,
            dtype: c.dtype,
            image: c.image.unwrap_or_else(|| PathBuf::from(SAMPLE)),
        }
    }
}

fn load_backbone(a: &Args, dev: &Device) -> Result<InternImage> {
    match &a.weights {
        Some(w) => {
            let cfg = match &a.config {
                Some(p) => Config::from_file(p)?,
                None => zoo::get(&a.model)?.config(),
            };
            let vb = checkpoint::var_builder(&[w], a.dtype, dev)?;
            InternImage::backbone(&cfg, &[0, 1, 2, 3], vb)
        }
        None => from_hub(&a.model, a.dtype, dev),
    }
}

#[cfg(feature = "hub")]
fn from_hub(name: &str, dtype: DType, dev: &Device) -> Result<InternImage> {
    InternImage::from_pretrained(name, dtype, dev)
}

#[cfg(not(feature = "hub"))]
fn from_hub(name: &str, _: DType, _: &Device) -> Result<InternImage> {
    candle_core::bail!(
        "this build has no `hub` feature, so {name} cannot be downloaded: pass --weights PATH \
         (and --config) or rebuild with --features hub"
    )
}

// ---------------------------------------------------------------------------------------------
// Drawing helpers (plain `image` buffers).

fn blend(img: &mut RgbImage, x: i64, y: i64, c: [u8; 3], alpha: f32) {
    if x < 0 || y < 0 || x >= img.width() as i64 || y >= img.height() as i64 || alpha <= 0.0 {
        return;
    }
    let a = alpha.min(1.0);
    let p = img.get_pixel_mut(x as u32, y as u32);
    for (dst, src) in p.0.iter_mut().zip(c) {
        *dst = (*dst as f32 * (1.0 - a) + src as f32 * a).round() as u8;
    }
}

/// Anti-aliased filled disc.
fn disc(img: &mut RgbImage, cx: f32, cy: f32, r: f32, c: [u8; 3], alpha: f32) {
    let (x0, x1) = ((cx - r - 1.0).floor() as i64, (cx + r + 1.0).ceil() as i64);
    let (y0, y1) = ((cy - r - 1.0).floor() as i64, (cy + r + 1.0).ceil() as i64);
    for y in y0..=y1 {
        for x in x0..=x1 {
            let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
            blend(img, x, y, c, alpha * (r - d + 0.5).clamp(0.0, 1.0));
        }
    }
}

/// Anti-aliased ring of radius `r` and width `w`.
fn ring(img: &mut RgbImage, cx: f32, cy: f32, r: f32, w: f32, c: [u8; 3], alpha: f32) {
    let (x0, x1) = (
        (cx - r - w - 1.0).floor() as i64,
        (cx + r + w + 1.0).ceil() as i64,
    );
    let (y0, y1) = (
        (cy - r - w - 1.0).floor() as i64,
        (cy + r + w + 1.0).ceil() as i64,
    );
    for y in y0..=y1 {
        for x in x0..=x1 {
            let d = ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt();
            let cov = (w / 2.0 - (d - r).abs() + 0.5).clamp(0.0, 1.0);
            blend(img, x, y, c, alpha * cov);
        }
    }
}

fn line(img: &mut RgbImage, (x0, y0): (f32, f32), (x1, y1): (f32, f32), c: [u8; 3], alpha: f32) {
    let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as usize).max(1);
    for s in 0..=n {
        let t = s as f32 / n as f32;
        let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
        blend(img, x.round() as i64, y.round() as i64, c, alpha);
    }
}

fn rect_outline(img: &mut RgbImage, x0: f32, y0: f32, x1: f32, y1: f32, c: [u8; 3], alpha: f32) {
    line(img, (x0, y0), (x1, y0), c, alpha);
    line(img, (x1, y0), (x1, y1), c, alpha);
    line(img, (x1, y1), (x0, y1), c, alpha);
    line(img, (x0, y1), (x0, y0), c, alpha);
}

/// 5x7 bitmap glyphs (rows top to bottom, bit 4 = leftmost column) for labels.
fn glyph(ch: char) -> [u8; 7] {
    match ch.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '/' => [0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        _ => [0; 7],
    }
}

/// Draws `text` with its top-left corner at (x, y), each font pixel `scale` x `scale`.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
    for (k, ch) in s.chars().enumerate() {
        let g = glyph(ch);
        let ox = x + k as i64 * 6 * scale;
        for (row, bits) in g.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            blend(
                                img,
                                ox + col * scale + dx,
                                y + row as i64 * scale + dy,
                                c,
                                1.0,
                            );
                        }
                    }
                }
            }
        }
    }
}

fn hue(h: f32) -> [u8; 3] {
    // HSV with s = 0.85, v = 1.
    let h6 = (h.rem_euclid(1.0)) * 6.0;
    let f = h6 - h6.floor();
    let (p, q, t) = (0.15, 1.0 - 0.85 * f, 1.0 - 0.85 * (1.0 - f));
    let (r, g, b) = match h6.floor() as i32 {
        0 => (1.0, t, p),
        1 => (q, 1.0, p),
        2 => (p, 1.0, t),
        3 => (p, q, 1.0),
        4 => (t, p, 1.0),
        _ => (1.0, p, q),
    };
    [(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8]
}

/// A viridis-like colour map on [0, 1].
fn colormap(v: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] = [
        [68.0, 1.0, 84.0],
        [59.0, 82.0, 139.0],
        [33.0, 145.0, 140.0],
        [94.0, 201.0, 98.0],
        [253.0, 231.0, 37.0],
    ];
    let t = v.clamp(0.0, 1.0) * 4.0;
    let i = (t.floor() as usize).min(3);
    let f = t - i as f32;
    let mut c = [0u8; 3];
    for k in 0..3 {
        c[k] = (STOPS[i][k] * (1.0 - f) + STOPS[i + 1][k] * f).round() as u8;
    }
    c
}

/// Bilinear sample of an RGB image at (x, y) (pixel centres at integers); grey outside.
fn sample(img: &RgbImage, x: f32, y: f32) -> [u8; 3] {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let mut acc = [0f32; 3];
    for (dy, wy) in [(0, 1.0 - fy), (1, fy)] {
        for (dx, wx) in [(0, 1.0 - fx), (1, fx)] {
            let (xi, yi) = (x0 as i64 + dx, y0 as i64 + dy);
            let p = if xi >= 0 && yi >= 0 && xi < w && yi < h {
                img.get_pixel(xi as u32, yi as u32).0
            } else {
                [40, 40, 40]
            };
            for k in 0..3 {
                acc[k] += p[k] as f32 * wx * wy;
            }
        }
    }
    [acc[0] as u8, acc[1] as u8, acc[2] as u8]
}

// ---------------------------------------------------------------------------------------------
// Feature visualisation.

/// Values of `v` at quantiles `lo` and `hi`.
fn quantiles(v: &[f32], lo: f32, hi: f32) -> (f32, f32) {
    let mut s: Vec<f32> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return (0.0, 1.0);
    }
    s.sort_by(f32::total_cmp);
    let at = |q: f32| s[((s.len() - 1) as f32 * q).round() as usize];
    (at(lo), at(hi))
}

/// Per-pixel RGB of a (C, H, W) feature map: the first three principal components over the
/// pixels (power iteration with deflation), or the feature norm colour-mapped.
fn visualise(feat: &[f32], c: usize, h: usize, w: usize, pca: bool) -> RgbImage {
    let n = h * w;
    let mut img = RgbImage::new(w as u32, h as u32);
    if !pca {
        let norms: Vec<f32> = (0..n)
            .map(|i| (0..c).map(|k| feat[k * n + i].powi(2)).sum::<f32>().sqrt())
            .collect();
        let (lo, hi) = quantiles(&norms, 0.01, 0.99);
        for (i, p) in img.pixels_mut().enumerate() {
            *p = Rgb(colormap((norms[i] - lo) / (hi - lo).max(1e-12)));
        }
        return img;
    }
    // Centre the channels.
    let mean: Vec<f64> = (0..c)
        .map(|k| {
            feat[k * n..(k + 1) * n]
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>()
                / n as f64
        })
        .collect();
    let x = |k: usize, i: usize| feat[k * n + i] as f64 - mean[k];
    let mut comps: Vec<Vec<f64>> = Vec::new();
    let mut scores: Vec<Vec<f32>> = Vec::new();
    for comp in 0..3.min(c) {
        // Deterministic start vector.
        let mut v: Vec<f64> = (0..c)
            .map(|k| ((k * 7 + comp * 3 + 1) % 11) as f64 - 5.0)
            .collect();
        for _ in 0..40 {
            // u = X v (pixels), v' = X^T u, orthogonal to earlier components.
            let u: Vec<f64> = (0..n)
                .map(|i| (0..c).map(|k| x(k, i) * v[k]).sum())
                .collect();
            let mut nv: Vec<f64> = (0..c)
                .map(|k| (0..n).map(|i| x(k, i) * u[i]).sum())
                .collect();
            for prev in &comps {
                let d: f64 = nv.iter().zip(prev).map(|(a, b)| a * b).sum();
                nv.iter_mut().zip(prev).for_each(|(a, b)| *a -= d * b);
            }
            let norm = nv.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm < 1e-30 {
                break;
            }
            v = nv.into_iter().map(|a| a / norm).collect();
        }
        let s: Vec<f32> = (0..n)
            .map(|i| (0..c).map(|k| x(k, i) * v[k]).sum::<f64>() as f32)
            .collect();
        comps.push(v);
        scores.push(s);
    }
    let ranges: Vec<(f32, f32)> = scores.iter().map(|s| quantiles(s, 0.01, 0.99)).collect();
    for (i, p) in img.pixels_mut().enumerate() {
        let mut rgb = [0u8; 3];
        for (k, ch) in rgb.iter_mut().enumerate() {
            if let (Some(s), Some((lo, hi))) = (scores.get(k), ranges.get(k)) {
                *ch = (((s[i] - lo) / (hi - lo).max(1e-12)).clamp(0.0, 1.0) * 255.0) as u8;
            }
        }
        *p = Rgb(rgb);
    }
    img
}

// ---------------------------------------------------------------------------------------------

/// One sampling point of the drawn DCNv3 block, in original image coordinates.
struct Point {
    group: usize,
    /// Regular grid position (zero offset).
    grid: (f32, f32),
    /// Learned position.
    loc: (f32, f32),
    /// Softmax weight.
    weight: f32,
}

fn run(a: Args) -> Result<()> {
    let dev = match a.device.as_str() {
        "cuda" => Device::new_cuda(0)?,
        "metal" => Device::new_metal(0)?,
        _ => Device::Cpu,
    };
    let t0 = Instant::now();
    let model = load_backbone(&a, &dev)?;
    eprintln!("loaded the backbone in {:.2}s", t0.elapsed().as_secs_f64());

    // 1. Detection-style resize, normalise, pad.
    let orig = preprocess::to_rgb8(&preprocess::decode_image(&a.image)?);
    let (w0, h0) = orig.dimensions();
    let short = w0.min(h0) as f64;
    let long = w0.max(h0) as f64;
    let scale = (a.size as f64 / short).min(a.max_size as f64 / long);
    let (w, h) = (
        ((w0 as f64 * scale + 0.5) as u32).max(1),
        ((h0 as f64 * scale + 0.5) as u32).max(1),
    );
    let resized = image::imageops::resize(&orig, w, h, FilterType::CatmullRom);
    let norm = PreprocessConfig::imagenet(a.size);
    let x = preprocess::rgb_to_tensor(&resized, norm.mean, norm.std, &Device::Cpu)?;
    let m = a.multiple;
    let (hp, wp) = ((h as usize).div_ceil(m) * m, (w as usize).div_ceil(m) * m);
    let x = x
        .pad_with_zeros(1, 0, hp - h as usize)?
        .pad_with_zeros(2, 0, wp - w as usize)?
        .unsqueeze(0)?
        .to_device(&dev)?;
    println!("image {} {w0}x{h0}", a.image.display());
    println!("input {w}x{h} (scale {scale:.3}), padded to {wp}x{hp}");

    // 2. Features.
    let t1 = Instant::now();
    let feats = model.forward_features(&x)?;
    println!(
        "backbone forward in {:.2}s ({:?}, {:?})",
        t1.elapsed().as_secs_f64(),
        a.dtype,
        dev.location()
    );
    println!("level  shape                 stride  channels");
    let mut maps = HashMap::new();
    let mut valid = Vec::new(); // (level, C, valid H, valid W, data)
    for (l, f) in feats.iter().enumerate() {
        let (_, c, fh, fw) = f.dims4()?;
        let stride = 4usize << l;
        println!(
            "{l:>5}  {:<20}  {:>6}  {:>8}",
            format!("{:?}", f.dims()),
            stride,
            c
        );
        let f32map = f.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        // The part of the map that sees the image, not the padding.
        let vh = (h as usize).div_ceil(stride).min(fh);
        let vw = (w as usize).div_ceil(stride).min(fw);
        let crop = f32map.i((0, .., ..vh, ..vw))?.contiguous()?;
        valid.push((l, c, vh, vw, crop.flatten_all()?.to_vec1::<f32>()?));
        maps.insert(format!("level{l}"), f32map);
    }
    std::fs::create_dir_all(&a.out)
        .map_err(|e| candle_core::Error::msg(format!("cannot create {}: {e}", a.out.display())))?;
    let st_path = a.out.join("features.safetensors");
    candle_core::safetensors::save(&maps, &st_path)?;
    println!("saved {}", st_path.display());

    // 3. DCNv3 sampling of one pixel.
    let samp = model.dcn_sampling(&x, a.level, a.block)?;
    let stride = (4usize << a.level) as f32;
    let (_, lh, lw, _) = samp.offset.dims4()?;
    let (px, py) = a.pixel.unwrap_or((w0 as f32 / 2.0, h0 as f32 / 2.0));
    let sx = w as f32 / w0 as f32;
    let sy = h as f32 / h0 as f32;
    // Original pixel -> input pixel -> level pixel (level pixel j is centred on input pixel
    // stride * j: every stride-2 conv has kernel 3 and padding 1).
    let to_level = |v: f32, s: f32, n: usize| -> usize {
        (((v + 0.5) * s - 0.5) / stride)
            .round()
            .clamp(0.0, (n - 1) as f32) as usize
    };
    let (col, row) = (to_level(px, sx, lw), to_level(py, sy, lh));
    let to_orig = |lx: f32, ly: f32| -> (f32, f32) {
        (
            (stride * lx + 0.5) / sx - 0.5,
            (stride * ly + 0.5) / sy - 0.5,
        )
    };
    let dc = samp.cfg;
    let off = samp
        .offset
        .to_dtype(DType::F32)?
        .i((0, row, col))?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    let mask = samp
        .mask
        .to_dtype(DType::F32)?
        .i((0, row, col))?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    let groups = dc.group;
    let p_per_group = mask.len() / groups.max(1);
    let sigma = dc.offset_scale as f32;
    let hx = (dc.dilation_w * (dc.kernel_w - 1) / 2) as f32;
    let hy = (dc.dilation_h * (dc.kernel_h - 1) / 2) as f32;
    let mut points = Vec::new();
    for g in 0..groups {
        let mut p = 0;
        // x-major point order: p = i * kernel_h + j (column i, row j), centre skipped if removed.
        for i in 0..dc.kernel_w {
            for j in 0..dc.kernel_h {
                if dc.remove_center && i == dc.kernel_w / 2 && j == dc.kernel_h / 2 {
                    continue;
                }
                let kx = (i * dc.dilation_w) as f32 - hx;
                let ky = (j * dc.dilation_h) as f32 - hy;
                let o = (g * p_per_group + p) * 2;
                let base_x = (col * dc.stride_w) as f32 - dc.pad_w as f32 + hx;
                let base_y = (row * dc.stride_h) as f32 - dc.pad_h as f32 + hy;
                let lx = base_x + sigma * (kx + off[o]);
                let ly = base_y + sigma * (ky + off[o + 1]);
                points.push(Point {
                    group: g,
                    grid: to_orig(base_x + sigma * kx, base_y + sigma * ky),
                    loc: to_orig(lx, ly),
                    weight: mask[g * p_per_group + p],
                });
                p += 1;
            }
        }
    }
    let centre = to_orig(col as f32, row as f32);
    println!(
        "DCNv3 sampling of level {} block {} at level pixel (x {col}, y {row}) = image ({:.1}, {:.1}); \
         {groups} groups x {p_per_group} points, offset_scale {sigma}",
        a.level, a.block, centre.0, centre.1
    );
    println!("group 0:   p  grid (x, y)         learned (x, y)      weight");
    for (p, pt) in points.iter().filter(|pt| pt.group == 0).enumerate() {
        println!(
            "         {p:>3}  ({:>7.1}, {:>7.1})  ({:>7.1}, {:>7.1})  {:.3}",
            pt.grid.0, pt.grid.1, pt.loc.0, pt.loc.1, pt.weight
        );
    }
    let mean_shift = points
        .iter()
        .map(|p| ((p.loc.0 - p.grid.0).powi(2) + (p.loc.1 - p.grid.1).powi(2)).sqrt())
        .sum::<f32>()
        / points.len().max(1) as f32;
    println!("mean displacement from the regular grid: {mean_shift:.1} image pixels (all groups)");

    // 4. The picture.
    let png = draw(&a, &orig, &points, centre, &valid, stride / sx, (w, h))?;
    let png_path = a.out.join("features.png");
    png.save(&png_path).map_err(|e| {
        candle_core::Error::msg(format!("cannot write {}: {e}", png_path.display()))
    })?;
    println!(
        "saved {} ({}x{})",
        png_path.display(),
        png.width(),
        png.height()
    );
    Ok(())
}

const BG: [u8; 3] = [24, 24, 28];
const FG: [u8; 3] = [235, 235, 235];
const PANEL: u32 = 480;
const GAP: u32 = 12;
const TITLE: u32 = 26;

fn draw(
    a: &Args,
    orig: &RgbImage,
    points: &[Point],
    centre: (f32, f32),
    valid: &[(usize, usize, usize, usize, Vec<f32>)],
    stride_orig: f32,
    (input_w, input_h): (u32, u32),
) -> Result<RgbImage> {
    let (w0, h0) = orig.dimensions();
    let ds = PANEL as f32 / h0 as f32; // display scale of the full image
    let disp_w = ((w0 as f32 * ds).round() as u32).max(1);
    let top_w = disp_w + GAP + PANEL;
    let total_w = top_w + 2 * GAP;
    let lvl_w = (top_w - 3 * GAP) / 4;
    let (_, _, vh0, vw0, _) = &valid[0];
    let lvl_h = ((lvl_w as f32 * *vh0 as f32 / *vw0 as f32).round() as u32).max(1);
    let total_h = GAP + TITLE + PANEL + GAP + TITLE + lvl_h + GAP + 18;
    let mut canvas = RgbImage::from_pixel(total_w, total_h, Rgb(BG));
    let top = GAP + TITLE;

    // Left: the whole image with the sampling points.
    let shown = image::imageops::resize(orig, disp_w, PANEL, FilterType::Triangle);
    image::imageops::overlay(&mut canvas, &shown, GAP as i64, top as i64);
    let groups = points.iter().map(|p| p.group).max().map_or(1, |g| g + 1);
    let colour = |g: usize| hue(g as f32 / groups as f32);
    let to_left = |(x, y): (f32, f32)| {
        (
            GAP as f32 + (x + 0.5) * ds - 0.5,
            top as f32 + (y + 0.5) * ds - 0.5,
        )
    };
    // Zoom window: covers every point with a margin.
    let reach = points
        .iter()
        .flat_map(|p| [p.loc, p.grid])
        .map(|(x, y)| (x - centre.0).abs().max((y - centre.1).abs()))
        .fold(stride_orig, f32::max);
    let half = (reach * 1.2 + stride_orig * 0.5).max(4.0);
    let zx0 = centre.0 - half;
    let zy0 = centre.1 - half;
    let zs = PANEL as f32 / (2.0 * half); // zoom scale
    let (l0, l1) = (
        to_left((zx0, zy0)),
        to_left((zx0 + 2.0 * half, zy0 + 2.0 * half)),
    );
    rect_outline(&mut canvas, l0.0, l0.1, l1.0, l1.1, FG, 0.9);
    for p in points {
        let (x, y) = to_left(p.loc);
        disc(
            &mut canvas,
            x,
            y,
            1.0 + 3.0 * p.weight.sqrt(),
            colour(p.group),
            0.85,
        );
    }
    let c = to_left(centre);
    ring(&mut canvas, c.0, c.1, 4.0, 1.5, [255, 255, 255], 1.0);
    text(
        &mut canvas,
        GAP as i64,
        (GAP + 6) as i64,
        &format!(
            "IMAGE {w0}X{h0} AT {input_w}X{input_h}  PIXEL ({:.0},{:.0})",
            centre.0, centre.1
        ),
        2,
        FG,
    );

    // Right: zoom around the pixel.
    let zx = GAP + disp_w + GAP;
    for v in 0..PANEL {
        for u in 0..PANEL {
            let x = zx0 + (u as f32 + 0.5) / zs - 0.5;
            let y = zy0 + (v as f32 + 0.5) / zs - 0.5;
            canvas.put_pixel(zx + u, top + v, Rgb(sample(orig, x, y)));
        }
    }
    // Darken the photo a little so the dots stand out.
    for v in 0..PANEL {
        for u in 0..PANEL {
            blend(
                &mut canvas,
                (zx + u) as i64,
                (top + v) as i64,
                [0, 0, 0],
                0.35,
            );
        }
    }
    let to_zoom = |(x, y): (f32, f32)| {
        (
            zx as f32 + (x - zx0 + 0.5) * zs - 0.5,
            top as f32 + (y - zy0 + 0.5) * zs - 0.5,
        )
    };
    let max_w = points.iter().map(|p| p.weight).fold(1e-6f32, f32::max);
    for p in points {
        let (g, l) = (to_zoom(p.grid), to_zoom(p.loc));
        line(&mut canvas, g, l, colour(p.group), 0.35);
    }
    let mut seen_grid: Vec<(f32, f32)> = Vec::new();
    for p in points {
        if seen_grid
            .iter()
            .any(|q| (q.0 - p.grid.0).abs() < 1e-3 && (q.1 - p.grid.1).abs() < 1e-3)
        {
            continue;
        }
        seen_grid.push(p.grid);
        let (x, y) = to_zoom(p.grid);
        rect_outline(
            &mut canvas,
            x - 6.0,
            y - 6.0,
            x + 6.0,
            y + 6.0,
            [200, 200, 200],
            0.9,
        );
    }
    for p in points {
        let (x, y) = to_zoom(p.loc);
        let r = 2.0 + 9.0 * p.weight.sqrt();
        disc(
            &mut canvas,
            x,
            y,
            r,
            colour(p.group),
            0.35 + 0.6 * p.weight / max_w,
        );
        ring(&mut canvas, x, y, r, 1.0, [0, 0, 0], 0.5);
    }
    let c = to_zoom(centre);
    ring(&mut canvas, c.0, c.1, 7.0, 2.0, [255, 255, 255], 1.0);
    // Scale bar: one level stride.
    let bar = stride_orig * zs;
    let by = (top + PANEL - 14) as f32;
    line(
        &mut canvas,
        (zx as f32 + 10.0, by),
        (zx as f32 + 10.0 + bar, by),
        FG,
        1.0,
    );
    text(
        &mut canvas,
        (zx as f32 + 16.0 + bar) as i64,
        by as i64 - 6,
        &format!("STRIDE {}", 4usize << a.level),
        2,
        FG,
    );
    text(
        &mut canvas,
        zx as i64,
        (GAP + 6) as i64,
        &format!(
            "DCNV3 LEVEL {} BLOCK {}: {} GROUPS",
            a.level, a.block, groups
        ),
        2,
        FG,
    );

    // Bottom: one panel per level.
    let by0 = top + PANEL + GAP + TITLE;
    for (k, (l, c, vh, vw, data)) in valid.iter().enumerate() {
        let vis = visualise(data, *c, *vh, *vw, a.vis_pca);
        let up = image::imageops::resize(&vis, lvl_w, lvl_h, FilterType::Nearest);
        let x = GAP + k as u32 * (lvl_w + GAP);
        image::imageops::overlay(&mut canvas, &up, x as i64, by0 as i64);
        text(
            &mut canvas,
            x as i64,
            (by0 - TITLE + 6) as i64,
            &format!("L{l} /{} C{c} {vw}X{vh}", 4usize << l),
            2,
            FG,
        );
    }
    text(
        &mut canvas,
        GAP as i64,
        (total_h - 14) as i64,
        if a.vis_pca {
            "SQUARES: REGULAR GRID  DOTS: LEARNED SAMPLES (COLOUR = GROUP, SIZE = WEIGHT)  LEVELS: PCA 1-3 AS RGB"
        } else {
            "SQUARES: REGULAR GRID  DOTS: LEARNED SAMPLES (COLOUR = GROUP, SIZE = WEIGHT)  LEVELS: FEATURE NORM"
        },
        1,
        FG,
    );
    Ok(canvas)
}

fn main() -> ExitCode {
    // Bad arguments: clap prints the error and exits with status 2; --help exits with 0.
    let args = Args::from(Cli::parse());
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", internimage::error::user_message(&e));
            ExitCode::from(1)
        }
    }
}
