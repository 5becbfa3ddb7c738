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

use std::path::Path;

use candle_core::{bail, Device, Result, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};

use crate::zoo::PreprocessConfig;

/// The message of an error without the backtrace candle attaches when `RUST_BACKTRACE` is set.
fn plain(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => plain(inner),
        other => other.to_string(),
    }
}

/// Decodes an image file (any format the enabled `image` codecs read, detected from the content,
/// not the extension). Errors name the file; a 0-pixel image is an error.
pub fn decode_image(path: impl AsRef<Path>) -> Result<DynamicImage> {
    let path = path.as_ref();
    let reader = image::ImageReader::open(path)
        .map_err(|e| candle_core::Error::msg(format!("cannot open image {}: {e}", path.display())))?
        .with_guessed_format()
        .map_err(|e| {
            candle_core::Error::msg(format!("cannot read image {}: {e}", path.display()))
        })?;
    if reader.format().is_none() {
        bail!(
            "cannot decode image {}: not a recognised image format (supported: png, jpeg, gif, bmp, \
             tiff, webp, pnm, ico)",
            path.display()
        )
    }
    let img = reader.decode().map_err(|e| {
        candle_core::Error::msg(format!("cannot decode image {}: {e}", path.display()))
    })?;
    if img.width() == 0 || img.height() == 0 {
        bail!(
            "image {} has no pixels ({}x{})",
            path.display(),
            img.width(),
            img.height()
        )
    }
    Ok(img)
}

/// Decodes an image from bytes in memory (format detected from the content).
pub fn decode_image_bytes(bytes: &[u8]) -> Result<DynamicImage> {
    let img = image::load_from_memory(bytes)
        .map_err(|e| candle_core::Error::msg(format!("cannot decode image from memory: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        bail!("image has no pixels ({}x{})", img.width(), img.height())
    }
    Ok(img)
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

/// Resize (shorter side, bicubic) and centre crop of an RGB image: steps 1-3 of the transform,
/// as an 8-bit image (`crop_size` x `crop_size`).
pub fn resize_and_crop(img: &DynamicImage, cfg: &PreprocessConfig) -> Result<RgbImage> {
    let (w, h) = (img.width(), img.height());
    if w == 0 || h == 0 {
        bail!("cannot preprocess an image with no pixels ({w}x{h})")
    }
    if cfg.resize_shorter_side == 0 || cfg.crop_size == 0 {
        bail!(
            "invalid preprocessing config: resize_shorter_side {} and crop_size {} must be positive",
            cfg.resize_shorter_side,
            cfg.crop_size
        )
    }
    let rgb = to_rgb8(img);
    let (nw, nh) = resized_size(w, h, cfg.resize_shorter_side);
    if nw == 0 || nh == 0 {
        bail!(
            "resizing a {w}x{h} image to shorter side {} gives an empty image",
            cfg.resize_shorter_side
        )
    }
    let resized = if (nw, nh) == (w, h) {
        rgb
    } else {
        image::imageops::resize(&rgb, nw, nh, FilterType::CatmullRom)
    };
    let s = cfg.crop_size;
    let (pad_x, off_x) = crop_axis(nw, s);
    let (pad_y, off_y) = crop_axis(nh, s);
    let mut out = RgbImage::new(s, s); // zero (black) where the crop exceeds the image
    for y in 0..s {
        // Row y of the crop reads row (y + off_y - pad_y) of the resized image.
        let sy = y as i64 + off_y as i64 - pad_y as i64;
        if sy < 0 || sy >= nh as i64 {
            continue;
        }
        for x in 0..s {
            let sx = x as i64 + off_x as i64 - pad_x as i64;
            if sx < 0 || sx >= nw as i64 {
                continue;
            }
            out.put_pixel(x, y, *resized.get_pixel(sx as u32, sy as u32));
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
        bail!("invalid normalisation std {std:?}: every channel must be finite and non-zero")
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
    let path = path.as_ref();
    let img = decode_image(path)?;
    preprocess_image(&img, cfg, device)
        .map_err(|e| candle_core::Error::msg(format!("image {}: {}", path.display(), plain(&e))))
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
