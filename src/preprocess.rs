//! Image decoding and the official evaluation transform (feature `image`).
//!
//! The InternImage classification evaluation (`build_transform` with `TEST.CROP=True`, and the
//! Hugging Face `CLIPImageProcessor` of the released repos) is:
//!
//! 1. decode, convert to 8-bit RGB (grayscale, RGBA, 16-bit and palette images included; alpha is
//!    dropped, as PIL's `convert("RGB")` does);
//! 2. resize the **shorter side** to `resize_shorter_side` with an antialiased bicubic filter; the
//!    longer side becomes `floor(size * long / short)` (torchvision's arithmetic);
//! 3. centre-crop `crop_size` x `crop_size` (offset `round((len - crop) / 2)`, Python rounding;
//!    zero padding when the image is smaller than the crop, as torchvision does);
//! 4. scale to `[0, 1]` and normalise with the mean/std, giving a `(3, S, S)` f32 tensor.
//!
//! The resize is the `image` crate's `CatmullRom` filter (bicubic a = -0.5, antialiased when
//! downscaling), which matches PIL's `BICUBIC` on the fixture photo to 1 uint8 level at most.
//!
//! ```no_run
//! use candle_core::Device;
//! use internimage::{preprocess, zoo::PreprocessConfig};
//! let cfg = PreprocessConfig::imagenet(224);
//! let x = preprocess::load_image("assets/chelsea.png", &cfg, &Device::Cpu)?; // (3, 224, 224)
//! let batch = preprocess::load_images(&["a.jpg", "b.png"], &cfg, &Device::Cpu)?; // (2, 3, 224, 224)
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::borrow::Cow;
use std::path::Path;

use candle_core::{bail, Device, Result, Tensor};
use image::{DynamicImage, ImageDecoder, RgbImage};

use crate::error::Error;
use crate::zoo::PreprocessConfig;

/// An `UndecodableImage` error.
fn undecodable(message: String) -> candle_core::Error {
    Error::UndecodableImage { message }.into()
}

/// The error of a decoder: over the allocation limit is `ImageTooLarge`, the rest
/// `UndecodableImage`.
fn decode_error(
    e: image::ImageError,
    what: &str,
    dimensions: Option<(u32, u32)>,
    opts: &DecodeOptions,
) -> candle_core::Error {
    let message = format!("cannot decode image {what}: {e}");
    match e {
        image::ImageError::Limits(_) => Error::ImageTooLarge {
            dimensions,
            max_pixels: opts.max_pixels,
            message,
        }
        .into(),
        _ => undecodable(message),
    }
}

/// The largest `resize_shorter_side` / `crop_size` accepted (a bound on the output's memory).
pub const MAX_CROP_SIZE: u32 = 16384;

/// The default [`DecodeOptions::max_pixels`]: PIL's `Image.MAX_IMAGE_PIXELS` (89,478,485, about
/// 9459 x 9459), beyond which PIL warns about a decompression bomb.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// Limits applied when decoding untrusted image bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Largest `width * height` that is decoded; larger images are rejected from their header,
    /// before any pixel memory is allocated. Default [`DEFAULT_MAX_PIXELS`].
    pub max_pixels: u64,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

impl DecodeOptions {
    /// Options with a pixel limit of `max_pixels`.
    pub fn with_max_pixels(max_pixels: u64) -> Self {
        Self { max_pixels }
    }

    /// The `image` crate limits matching these options: the decoder may allocate the output at
    /// up to 16 bytes per pixel (RGBA f32) plus a fixed margin for its own buffers.
    fn limits(&self) -> image::Limits {
        let mut limits = image::Limits::default();
        let bytes = self.max_pixels.saturating_mul(16).saturating_add(64 << 20);
        limits.max_alloc = Some(bytes.max(512 << 20));
        limits
    }
}

/// Decodes from an `ImageReader` whose format is known, checking the pixel limit on the header.
fn decode_reader<R: std::io::BufRead + std::io::Seek>(
    mut reader: image::ImageReader<R>,
    opts: &DecodeOptions,
    what: &str,
) -> Result<DynamicImage> {
    if reader.format().is_none() {
        return Err(undecodable(format!(
            "cannot decode image {what}: not a recognised image format (supported: png, jpeg, \
             gif, bmp, tiff, webp, pnm, ico)"
        )));
    }
    reader.limits(opts.limits());
    let decoder = reader
        .into_decoder()
        .map_err(|e| decode_error(e, what, None, opts))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(undecodable(format!("image {what} has no pixels ({w}x{h})")));
    }
    let pixels = w as u64 * h as u64;
    if pixels > opts.max_pixels {
        return Err(Error::ImageTooLarge {
            dimensions: Some((w, h)),
            max_pixels: opts.max_pixels,
            message: format!(
                "image {what} is {w}x{h} = {pixels} pixels, more than the limit of {} pixels; \
                 downscale it first, or raise the limit with DecodeOptions::max_pixels",
                opts.max_pixels
            ),
        }
        .into());
    }
    DynamicImage::from_decoder(decoder).map_err(|e| decode_error(e, what, Some((w, h)), opts))
}

/// Decodes an image file (any format the enabled `image` codecs read, detected from the content,
/// not the extension) with the default [`DecodeOptions`]. Errors name the file; a 0-pixel image
/// and one over [`DEFAULT_MAX_PIXELS`] are errors.
pub fn decode_image(path: impl AsRef<Path>) -> Result<DynamicImage> {
    decode_image_with(path, &DecodeOptions::default())
}

/// [`decode_image`] with explicit limits.
pub fn decode_image_with(path: impl AsRef<Path>, opts: &DecodeOptions) -> Result<DynamicImage> {
    let path = path.as_ref();
    let reader = image::ImageReader::open(path)
        .map_err(|e| {
            Error::io(
                path,
                format!("cannot open image {}: {e}", path.display()),
                e,
            )
        })?
        .with_guessed_format()
        .map_err(|e| {
            Error::io(
                path,
                format!("cannot read image {}: {e}", path.display()),
                e,
            )
        })?;
    decode_reader(reader, opts, &path.display().to_string())
}

/// Decodes an image from bytes in memory (format detected from the content) with the default
/// [`DecodeOptions`].
pub fn decode_image_bytes(bytes: &[u8]) -> Result<DynamicImage> {
    decode_image_bytes_with(bytes, &DecodeOptions::default())
}

/// [`decode_image_bytes`] with explicit limits.
pub fn decode_image_bytes_with(bytes: &[u8], opts: &DecodeOptions) -> Result<DynamicImage> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| undecodable(format!("cannot read image from memory: {e}")))?;
    decode_reader(reader, opts, "from memory")
}

/// torchvision's `Resize(int)` output size `(width, height)`: the shorter side becomes `size`, the
/// longer side `floor(size * long / short)`.
pub fn resized_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    if width == 0 || height == 0 {
        return (0, 0);
    }
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    // Python: int(size * long / short): exact integer product, correctly rounded division, truncation.
    let new_long = ((size as u64 * long as u64) as f64 / short as f64).floor() as u32;
    if width <= height {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// Python's `round` (half to even) of a non-negative half-integer-or-integer `x2 / 2`.
fn round_half_even_div2(x2: u32) -> u32 {
    let q = x2 / 2;
    if x2 % 2 == 1 && q % 2 == 1 {
        q + 1
    } else {
        q
    }
}

/// torchvision's `CenterCrop(crop)` along one axis of length `len`: returns
/// `(pad_before, offset)` where the image is first zero-padded by `pad_before` (when smaller than
/// the crop) and the crop then starts at `offset` in the (padded) image.
fn crop_axis(len: u32, crop: u32) -> (u32, u32) {
    if crop > len {
        // torchvision pads (crop - len) // 2 before and (crop - len + 1) // 2 after, then crops at 0.
        ((crop - len) / 2, 0)
    } else {
        (0, round_half_even_div2(len - crop))
    }
}

/// Converts any decoded image to 8-bit RGB (alpha dropped; 16-bit and float rescaled).
pub fn to_rgb8(img: &DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb.clone(),
        other => other.to_rgb8(),
    }
}

/// The 8-bit RGB view of an image: borrowed when it already is RGB8, converted otherwise.
fn rgb8_view(img: &DynamicImage) -> Cow<'_, RgbImage> {
    match img {
        DynamicImage::ImageRgb8(rgb) => Cow::Borrowed(rgb),
        other => Cow::Owned(other.to_rgb8()),
    }
}

/// The Catmull-Rom cubic (B = 0, C = 0.5), written exactly as the `image` crate does so that the
/// weights are bit-identical to `image::imageops::resize(.., FilterType::CatmullRom)`.
fn catmull_rom(x: f32) -> f32 {
    let (b, c) = (0.0f32, 0.5f32);
    let a = x.abs();
    let k = if a < 1.0 {
        (12.0 - 9.0 * b - 6.0 * c) * a.powi(3)
            + (-18.0 + 12.0 * b + 6.0 * c) * a.powi(2)
            + (6.0 - 2.0 * b)
    } else if a < 2.0 {
        (-b - 6.0 * c) * a.powi(3)
            + (6.0 * b + 30.0 * c) * a.powi(2)
            + (-12.0 * b - 48.0 * c) * a
            + (8.0 * b + 24.0 * c)
    } else {
        0.0
    };
    k / 6.0
}

/// The filter taps of one output sample along one axis: the first source index and the
/// normalised weights of `src[first..first + weights.len()]`.
struct Taps {
    first: usize,
    weights: Vec<f32>,
}

/// The taps of output samples `outs` when an axis of `src_len` samples is resampled to `new_len`
/// (`image` 0.25's `vertical_sample`/`horizontal_sample` arithmetic, operation for operation).
fn axis_taps(src_len: u32, new_len: u32, outs: std::ops::Range<u32>) -> Vec<Taps> {
    let ratio = src_len as f32 / new_len as f32;
    let sratio = if ratio < 1.0 { 1.0 } else { ratio };
    let src_support = 2.0 * sratio; // CatmullRom support
    outs.map(|out| {
        let input = (out as f32 + 0.5) * ratio;
        let left = ((input - src_support).floor() as i64).clamp(0, src_len as i64 - 1);
        let right = ((input + src_support).ceil() as i64).clamp(left + 1, src_len as i64);
        let input = input - 0.5;
        let mut weights: Vec<f32> = (left..right)
            .map(|i| catmull_rom((i as f32 - input) / sratio))
            .collect();
        let mut sum = 0.0f32;
        for &w in &weights {
            sum += w;
        }
        for w in weights.iter_mut() {
            *w /= sum;
        }
        Taps {
            first: left as usize,
            weights,
        }
    })
    .collect()
}

/// The range of output indices `0..crop` that land inside an axis of `len` samples, as a range
/// of source (resized) indices, with the crop index of its first element.
fn crop_window(len: u32, crop: u32) -> (u32, std::ops::Range<u32>) {
    let (pad, off) = crop_axis(len, crop);
    // Crop index c reads resized index c + off - pad; valid when inside 0..len.
    let first_c = pad; // off > 0 only when pad == 0
    let start = off;
    let end = (off as u64 + (crop - first_c) as u64).min(len as u64) as u32;
    (first_c, start..end)
}

/// Resize (shorter side, bicubic) and centre crop of an RGB image: steps 1-3 of the transform,
/// as an 8-bit image (`crop_size` x `crop_size`).
///
/// The result equals `image::imageops::resize(.., FilterType::CatmullRom)` to the full resized
/// size followed by the crop, bit for bit, but only the output pixels inside the crop are
/// computed (the window is mapped back to source coordinates), so work and memory are
/// `O(source + crop)` whatever the aspect ratio: a 40000 x 1 image no longer materialises a
/// 8.96-million-pixel-wide intermediate.
pub fn resize_and_crop(img: &DynamicImage, cfg: &PreprocessConfig) -> Result<RgbImage> {
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 {
        return Err(undecodable(format!(
            "cannot preprocess an image with no pixels ({w}x{h})"
        )));
    }
    if cfg.resize_shorter_side == 0 || cfg.crop_size == 0 {
        return Err(Error::bad_config(format!(
            "invalid preprocessing config: resize_shorter_side {} and crop_size {} must be positive",
            cfg.resize_shorter_side, cfg.crop_size
        ))
        .into());
    }
    if cfg.crop_size > MAX_CROP_SIZE || cfg.resize_shorter_side > MAX_CROP_SIZE {
        return Err(Error::bad_config(format!(
            "invalid preprocessing config: resize_shorter_side {} and crop_size {} must be at most \
             {MAX_CROP_SIZE}",
            cfg.resize_shorter_side, cfg.crop_size
        ))
        .into());
    }
    let (nw, nh) = resized_size(w, h, cfg.resize_shorter_side);
    if nw == 0 || nh == 0 {
        bail!(
            "resizing a {w}x{h} image to shorter side {} gives an empty image",
            cfg.resize_shorter_side
        )
    }
    let rgb = rgb8_view(img);
    let src = rgb.as_raw();
    let s = cfg.crop_size;
    let (cx0, xs) = crop_window(nw, s);
    let (cy0, ys) = crop_window(nh, s);
    let mut out = RgbImage::new(s, s); // zero (black) where the crop exceeds the image
    let (out_w, stride) = (s as usize * 3, w as usize * 3);
    let buf: &mut [u8] = &mut out;
    if (nw, nh) == (w, h) {
        // No resize (the `image` crate copies in this case too): a plain crop.
        let n = (xs.end - xs.start) as usize * 3;
        for (k, sy) in ys.enumerate() {
            let o = (cy0 as usize + k) * out_w + cx0 as usize * 3;
            let i = sy as usize * stride + xs.start as usize * 3;
            buf[o..o + n].copy_from_slice(&src[i..i + n]);
        }
        return Ok(out);
    }
    let x_taps = axis_taps(w, nw, xs);
    let y_taps = axis_taps(h, nh, ys);
    // Source columns the horizontal pass reads.
    let col0 = x_taps.iter().map(|t| t.first).min().unwrap_or(0);
    let col1 = x_taps
        .iter()
        .map(|t| t.first + t.weights.len())
        .max()
        .unwrap_or(0);
    let ncols = col1 - col0;
    // Vertical pass over the needed columns of the needed rows (f32, like the `image` crate's
    // Rgba32F intermediate; the alpha lane it carries is independent and dropped here).
    let mut row = vec![0f32; ncols * 3];
    for (k, ty) in y_taps.iter().enumerate() {
        for (j, v) in row.chunks_exact_mut(3).enumerate() {
            let x = col0 + j;
            let mut t = [0f32; 3];
            for (i, &wgt) in ty.weights.iter().enumerate() {
                let p = (ty.first + i) * stride + x * 3;
                for c in 0..3 {
                    t[c] += src[p + c] as f32 * wgt;
                }
            }
            v.copy_from_slice(&t);
        }
        // Horizontal pass of this output row.
        let o_row = (cy0 as usize + k) * out_w;
        for (m, tx) in x_taps.iter().enumerate() {
            let mut t = [0f32; 3];
            for (i, &wgt) in tx.weights.iter().enumerate() {
                let p = (tx.first - col0 + i) * 3;
                for c in 0..3 {
                    t[c] += row[p + c] * wgt;
                }
            }
            let o = o_row + (cx0 as usize + m) * 3;
            for c in 0..3 {
                // The `image` crate's clamp to [0, 255] then round half away from zero.
                buf[o + c] = t[c].clamp(0.0, 255.0).round() as u8;
            }
        }
    }
    Ok(out)
}

/// Scales an RGB image to `[0, 1]` and normalises it: `(x / 255 - mean) / std` per channel, in
/// f32 like torchvision, as a `(3, H, W)` f32 tensor on `device`.
pub fn rgb_to_tensor(
    img: &RgbImage,
    mean: [f32; 3],
    std: [f32; 3],
    device: &Device,
) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
        return Err(Error::bad_config(format!(
            "invalid normalisation std {std:?}: every channel must be finite and non-zero"
        ))
        .into());
    }
    let plane = w * h;
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + i] = (px.0[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    Tensor::from_vec(data, (3, h, w), device)
}

/// The full evaluation transform of a decoded image: a `(3, S, S)` f32 tensor, `S = crop_size`.
pub fn preprocess_image(
    img: &DynamicImage,
    cfg: &PreprocessConfig,
    device: &Device,
) -> Result<Tensor> {
    let cropped = resize_and_crop(img, cfg)?;
    rgb_to_tensor(&cropped, cfg.mean, cfg.std, device)
}

/// Decodes and preprocesses one image file: a `(3, S, S)` f32 tensor. Errors name the file.
pub fn load_image(
    path: impl AsRef<Path>,
    cfg: &PreprocessConfig,
    device: &Device,
) -> Result<Tensor> {
    load_image_with(path, cfg, &DecodeOptions::default(), device)
}

/// [`load_image`] with explicit decode limits.
pub fn load_image_with(
    path: impl AsRef<Path>,
    cfg: &PreprocessConfig,
    opts: &DecodeOptions,
    device: &Device,
) -> Result<Tensor> {
    let path = path.as_ref();
    let img = decode_image_with(path, opts)?;
    preprocess_image(&img, cfg, device)
        .map_err(|e| crate::error::rewrite(e, |m| format!("image {}: {m}", path.display())))
}

/// Preprocesses decoded images into one `(N, 3, S, S)` f32 batch. Fails on an empty slice.
pub fn preprocess_batch(
    imgs: &[DynamicImage],
    cfg: &PreprocessConfig,
    device: &Device,
) -> Result<Tensor> {
    if imgs.is_empty() {
        bail!("preprocess_batch: no images given")
    }
    let xs = imgs
        .iter()
        .map(|img| preprocess_image(img, cfg, &Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&xs, 0)?.to_device(device)
}

/// Decodes and preprocesses image files into one `(N, 3, S, S)` f32 batch. The first file that
/// cannot be read fails the call (its name is in the error); to keep going past bad files, call
/// [`load_image`] per file and [`Tensor::stack`] the successes.
pub fn load_images<P: AsRef<Path>>(
    paths: &[P],
    cfg: &PreprocessConfig,
    device: &Device,
) -> Result<Tensor> {
    if paths.is_empty() {
        bail!("load_images: no image paths given")
    }
    let xs = paths
        .iter()
        .map(|p| load_image(p, cfg, &Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&xs, 0)?.to_device(device)
}
