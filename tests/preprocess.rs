//! Preprocessing against the official evaluation transform, pixel-format conversions and errors.
#![cfg(feature = "image")]

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use common::{max_abs_diff, FIXTURES};
use image::{DynamicImage, GrayImage, ImageBuffer, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use internimage::preprocess;
use internimage::zoo::PreprocessConfig;

const STD: [f32; 3] = [0.229, 0.224, 0.225];

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("preprocess_tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Per-element error in uint8 levels: |diff| * std[c] * 255 for a (3,H,W) or (1,3,H,W) tensor.
fn level_errors(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a.len(), b.len());
    let plane = a.len() / 3;
    let (mut max, mut sum) = (0f32, 0f64);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let lv = (x - y).abs() * STD[i / plane] * 255.0;
        max = max.max(lv);
        sum += lv as f64;
    }
    (max, (sum / a.len() as f64) as f32)
}

/// A deterministic 8-bit test picture with structure at several scales.
fn pattern(w: u32, h: u32) -> RgbImage {
    ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([
            ((x * 7 + y * 3) % 256) as u8,
            ((x * x / 5 + y * 11) % 256) as u8,
            (((x / 9) ^ (y / 7)) * 40 % 256) as u8,
        ])
    })
}

#[test]
fn matches_official_transform_of_the_photo() {
    let reference = common::fixture_tensors("expected/preprocess.safetensors");
    let want = &reference["photo"]; // (1, 3, 224, 224)
    assert_eq!(want.dims(), &[1, 3, 224, 224]);
    let cfg = PreprocessConfig::imagenet(224);
    let ours =
        preprocess::load_image(format!("{FIXTURES}/chelsea.png"), &cfg, &Device::Cpu).unwrap();
    assert_eq!(ours.dims(), &[3, 224, 224]);
    assert_eq!(ours.dtype(), candle_core::DType::F32);
    let (max, mean) = level_errors(&ours, want);
    println!("preprocess vs official: max {max:.3} uint8 levels, mean {mean:.4} levels");
    // Tolerance from ../shared/fixtures/README.md: 3 levels max, 0.5 level mean.
    assert!(max <= 3.0, "max error {max} levels > 3");
    assert!(mean <= 0.5, "mean error {mean} levels > 0.5");
    // The shipped sample photo is the same picture.
    let asset = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/chelsea.png");
    let ours2 = preprocess::load_image(asset, &cfg, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&ours, &ours2), 0.0);
}

#[test]
fn decodes_the_photo_exactly() {
    let inputs = common::fixture_tensors("inputs.safetensors");
    let want = inputs["photo_u8"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap(); // HWC
    let img = preprocess::decode_image(format!("{FIXTURES}/chelsea.png")).unwrap();
    assert_eq!((img.width(), img.height()), (451, 300));
    assert_eq!(preprocess::to_rgb8(&img).into_raw(), want);
}

#[test]
fn torchvision_resize_and_crop_arithmetic() {
    assert_eq!(preprocess::resized_size(451, 300, 224), (336, 224));
    assert_eq!(preprocess::resized_size(300, 451, 224), (224, 336));
    assert_eq!(preprocess::resized_size(500, 500, 384), (384, 384));
    assert_eq!(preprocess::resized_size(1000, 3, 224), (74666, 224));
    assert_eq!(preprocess::resized_size(640, 480, 640), (853, 640)); // floor(853.33)

    // No resize when the shorter side already has the size; the crop offset is Python's
    // round((len - crop) / 2), half to even: round(56.5) = 56, round(57.5) = 58.
    let cfg = PreprocessConfig::imagenet(224);
    for (w, want_off) in [(337u32, 56u32), (339, 58), (224, 0), (226, 1)] {
        let img = ImageBuffer::from_fn(w, 224, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, 0]));
        let out = preprocess::resize_and_crop(&DynamicImage::ImageRgb8(img), &cfg).unwrap();
        assert_eq!(out.dimensions(), (224, 224));
        assert_eq!(out.get_pixel(0, 0).0[0] as u32, want_off, "width {w}");
        assert_eq!(
            out.get_pixel(223, 5).0,
            [((223 + want_off) % 256) as u8, 5, 0]
        );
    }
    // Same along y (portrait).
    let img = ImageBuffer::from_fn(224, 339, |x, y| Rgb([(x % 256) as u8, (y % 256) as u8, 0]));
    let out = preprocess::resize_and_crop(&DynamicImage::ImageRgb8(img), &cfg).unwrap();
    assert_eq!(out.get_pixel(3, 0).0, [3, 58, 0]);

    // Crop larger than the resized image: zero padding, (crop - len) // 2 before.
    let cfg = PreprocessConfig {
        resize_shorter_side: 100,
        crop_size: 105,
        ..PreprocessConfig::imagenet(100)
    };
    let img = RgbImage::from_pixel(100, 100, Rgb([200, 100, 50]));
    let out = preprocess::resize_and_crop(&DynamicImage::ImageRgb8(img), &cfg).unwrap();
    assert_eq!(out.dimensions(), (105, 105));
    assert_eq!(out.get_pixel(1, 50).0, [0, 0, 0]);
    assert_eq!(out.get_pixel(2, 50).0, [200, 100, 50]);
    assert_eq!(out.get_pixel(101, 101).0, [200, 100, 50]);
    assert_eq!(out.get_pixel(102, 50).0, [0, 0, 0]);
}

#[test]
fn normalisation_values() {
    let img = RgbImage::from_pixel(4, 4, Rgb([0, 128, 255]));
    let cfg = PreprocessConfig::imagenet(4);
    let t =
        preprocess::preprocess_image(&DynamicImage::ImageRgb8(img), &cfg, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[3, 4, 4]);
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = [
        (0.0 - 0.485) / 0.229,
        (128.0 / 255.0 - 0.456) / 0.224,
        (1.0 - 0.406) / 0.225,
    ];
    for c in 0..3 {
        for i in 0..16 {
            assert!((v[c * 16 + i] - want[c]).abs() < 1e-6);
        }
    }
}

#[test]
fn grayscale_rgba_16bit_and_palette_inputs_become_rgb() {
    let cfg = PreprocessConfig::imagenet(32);
    let dev = Device::Cpu;
    let base = pattern(48, 40);
    let from_rgb =
        preprocess::preprocess_image(&DynamicImage::ImageRgb8(base.clone()), &cfg, &dev).unwrap();

    // RGBA with varying alpha: alpha is dropped (PIL convert("RGB")), colours unchanged.
    let rgba: RgbaImage = ImageBuffer::from_fn(48, 40, |x, y| {
        let p = base.get_pixel(x, y).0;
        Rgba([p[0], p[1], p[2], ((x * 5 + y) % 256) as u8])
    });
    let path = tmp("rgba.png");
    rgba.save(&path).unwrap();
    let t = preprocess::load_image(&path, &cfg, &dev).unwrap();
    assert_eq!(max_abs_diff(&t, &from_rgb), 0.0);

    // 16-bit RGB with v * 257 decodes to the same 8-bit values.
    let rgb16: ImageBuffer<Rgb<u16>, Vec<u16>> = ImageBuffer::from_fn(48, 40, |x, y| {
        let p = base.get_pixel(x, y).0;
        Rgb([p[0] as u16 * 257, p[1] as u16 * 257, p[2] as u16 * 257])
    });
    let path = tmp("rgb16.png");
    DynamicImage::ImageRgb16(rgb16).save(&path).unwrap();
    let img = preprocess::decode_image(&path).unwrap();
    assert!(matches!(img, DynamicImage::ImageRgb16(_)));
    let t = preprocess::load_image(&path, &cfg, &dev).unwrap();
    assert_eq!(max_abs_diff(&t, &from_rgb), 0.0);

    // Grayscale (8 and 16 bit): three equal channels, each the gray value normalised per channel.
    let gray: GrayImage = ImageBuffer::from_fn(48, 40, |x, y| Luma([base.get_pixel(x, y).0[1]]));
    let gray_as_rgb: RgbImage = ImageBuffer::from_fn(48, 40, |x, y| {
        let g = gray.get_pixel(x, y).0[0];
        Rgb([g, g, g])
    });
    let want =
        preprocess::preprocess_image(&DynamicImage::ImageRgb8(gray_as_rgb), &cfg, &dev).unwrap();
    let path = tmp("gray.png");
    gray.save(&path).unwrap();
    let t = preprocess::load_image(&path, &cfg, &dev).unwrap();
    assert_eq!(t.dims(), &[3, 32, 32]);
    assert_eq!(max_abs_diff(&t, &want), 0.0);
    let gray16: ImageBuffer<Luma<u16>, Vec<u16>> = ImageBuffer::from_fn(48, 40, |x, y| {
        Luma([gray.get_pixel(x, y).0[0] as u16 * 257])
    });
    let path = tmp("gray16.png");
    DynamicImage::ImageLuma16(gray16).save(&path).unwrap();
    let t = preprocess::load_image(&path, &cfg, &dev).unwrap();
    assert_eq!(max_abs_diff(&t, &want), 0.0);

    // Palette: GIF stores indexed colour; a 4-colour picture round-trips exactly.
    let colours = [[255u8, 0, 0], [0, 255, 0], [0, 0, 255], [250, 250, 10]];
    let pal: RgbImage =
        ImageBuffer::from_fn(48, 40, |x, y| Rgb(colours[((x / 6 + y / 5) % 4) as usize]));
    let want =
        preprocess::preprocess_image(&DynamicImage::ImageRgb8(pal.clone()), &cfg, &dev).unwrap();
    let path = tmp("palette.gif");
    DynamicImage::ImageRgb8(pal).save(&path).unwrap();
    let t = preprocess::load_image(&path, &cfg, &dev).unwrap();
    assert_eq!(max_abs_diff(&t, &want), 0.0);

    // Other containers decode to the same pixels (format sniffed from the bytes, not the name).
    for name in ["b.bmp", "b.tiff", "b.ppm", "b.webp"] {
        let path = tmp(name);
        DynamicImage::ImageRgb8(base.clone()).save(&path).unwrap();
        let renamed = tmp(&format!("{name}.data"));
        std::fs::rename(&path, &renamed).unwrap();
        let t = preprocess::load_image(&renamed, &cfg, &dev).unwrap();
        assert_eq!(max_abs_diff(&t, &from_rgb), 0.0, "{name}");
    }
}

#[test]
fn batches_stack_single_images() {
    let cfg = PreprocessConfig::imagenet(64);
    let photo = format!("{FIXTURES}/chelsea.png");
    let other = tmp("batch_other.png");
    pattern(90, 70).save(&other).unwrap();
    let batch = preprocess::load_images(
        &[photo.clone(), other.display().to_string()],
        &cfg,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(batch.dims(), &[2, 3, 64, 64]);
    let a = preprocess::load_image(&photo, &cfg, &Device::Cpu).unwrap();
    let b = preprocess::load_image(&other, &cfg, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&batch.get(0).unwrap(), &a), 0.0);
    assert_eq!(max_abs_diff(&batch.get(1).unwrap(), &b), 0.0);
    let imgs = vec![
        preprocess::decode_image(&photo).unwrap(),
        preprocess::decode_image(&other).unwrap(),
    ];
    let batch2 = preprocess::preprocess_batch(&imgs, &cfg, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&batch, &batch2), 0.0);
    assert!(preprocess::preprocess_batch(&[], &cfg, &Device::Cpu).is_err());
    let none: [&str; 0] = [];
    assert!(preprocess::load_images(&none, &cfg, &Device::Cpu).is_err());
}

#[test]
fn bad_files_are_errors_naming_the_file() {
    let cfg = PreprocessConfig::imagenet(224);
    let dev = Device::Cpu;
    let empty = tmp("empty_file.png");
    std::fs::write(&empty, b"").unwrap();
    let garbage = tmp("garbage.jpg");
    std::fs::write(&garbage, b"this is not an image at all, just some text").unwrap();
    let truncated = tmp("truncated.png");
    let bytes = std::fs::read(format!("{FIXTURES}/chelsea.png")).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let missing = tmp("does_not_exist.png");
    let zero_px = tmp("zero_pixels.pgm");
    std::fs::write(&zero_px, b"P5\n0 0\n255\n").unwrap();
    for path in [&empty, &garbage, &truncated, &missing, &zero_px] {
        let err = preprocess::load_image(path, &cfg, &dev)
            .unwrap_err()
            .to_string();
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(
            err.contains(name),
            "error for {name} does not name it: {err}"
        );
        let err = preprocess::load_images(
            &[
                format!("{FIXTURES}/chelsea.png"),
                path.display().to_string(),
            ],
            &cfg,
            &dev,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(name), "{err}");
    }
    // A 0-pixel image in memory.
    let err = preprocess::preprocess_image(&DynamicImage::new_rgb8(0, 0), &cfg, &dev).unwrap_err();
    assert!(err.to_string().contains("no pixels"), "{err}");
    assert!(preprocess::decode_image_bytes(b"nope").is_err());
    // Degenerate configs.
    let bad = PreprocessConfig {
        crop_size: 0,
        ..cfg.clone()
    };
    assert!(preprocess::preprocess_image(&DynamicImage::new_rgb8(8, 8), &bad, &dev).is_err());
}

/// The reference: `image`'s full resize to the torchvision size, then the centre crop (the
/// implementation before the crop window was mapped to source coordinates).
fn reference_resize_and_crop(img: &RgbImage, cfg: &PreprocessConfig) -> RgbImage {
    let (w, h) = img.dimensions();
    let (nw, nh) = preprocess::resized_size(w, h, cfg.resize_shorter_side);
    let resized = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(img, nw, nh, image::imageops::FilterType::CatmullRom)
    };
    let s = cfg.crop_size;
    let axis = |len: u32| -> (i64, i64) {
        if s > len {
            (((s - len) / 2) as i64, 0)
        } else {
            let d = len - s;
            let (q, r) = (d / 2, d % 2);
            (0, if r == 1 && q % 2 == 1 { q + 1 } else { q } as i64)
        }
    };
    let ((px, ox), (py, oy)) = (axis(nw), axis(nh));
    ImageBuffer::from_fn(s, s, |x, y| {
        let (sx, sy) = (x as i64 + ox - px, y as i64 + oy - py);
        if sx < 0 || sy < 0 || sx >= nw as i64 || sy >= nh as i64 {
            Rgb([0, 0, 0])
        } else {
            *resized.get_pixel(sx as u32, sy as u32)
        }
    })
}

#[test]
fn windowed_resize_is_bit_identical_to_full_resize_then_crop() {
    let photo =
        preprocess::to_rgb8(&preprocess::decode_image(format!("{FIXTURES}/chelsea.png")).unwrap());
    let mut cases: Vec<(RgbImage, PreprocessConfig)> =
        vec![(photo, PreprocessConfig::imagenet(224))];
    let sizes = [
        (451, 300, 224, 224),
        (300, 451, 224, 224),
        (17, 9, 224, 224),   // upscale
        (1000, 3, 224, 224), // extreme aspect, upscale one axis and downscale the other
        (3, 700, 64, 48),    // crop smaller than the resize
        (640, 480, 384, 384),
        (97, 101, 40, 45), // crop larger than one axis: padding
        (1, 1, 8, 8),
        (2, 300, 16, 16),
        (225, 224, 224, 224), // shorter side already at size, other axis not
        (224, 224, 224, 224), // no resize at all
        (513, 257, 100, 100),
    ];
    for (w, h, size, crop) in sizes {
        let cfg = PreprocessConfig {
            resize_shorter_side: size,
            crop_size: crop,
            ..PreprocessConfig::imagenet(size)
        };
        cases.push((pattern(w, h), cfg));
    }
    for (img, cfg) in &cases {
        let want = reference_resize_and_crop(img, cfg);
        let got = preprocess::resize_and_crop(&DynamicImage::ImageRgb8(img.clone()), cfg).unwrap();
        assert_eq!(got.dimensions(), want.dimensions());
        let diff = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            diff,
            0,
            "{}x{} -> {} crop {}: {diff} bytes differ",
            img.width(),
            img.height(),
            cfg.resize_shorter_side,
            cfg.crop_size
        );
    }
}

#[test]
fn decode_pixel_limit_is_enforced_from_the_header() {
    let mut png = Vec::new();
    DynamicImage::ImageRgb8(pattern(300, 200))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    // 60000 pixels: under the default, over a limit of 59999.
    assert!(preprocess::decode_image_bytes(&png).is_ok());
    let opts = preprocess::DecodeOptions::with_max_pixels(59_999);
    let err = preprocess::decode_image_bytes_with(&png, &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("300x200") && err.contains("59999") && err.contains("max_pixels"),
        "{err}"
    );
    let path = tmp("limit.png");
    std::fs::write(&path, &png).unwrap();
    let err =
        preprocess::load_image_with(&path, &PreprocessConfig::imagenet(224), &opts, &Device::Cpu)
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("limit.png") && err.contains("60000 pixels"),
        "{err}"
    );
    assert!(preprocess::decode_image_with(
        &path,
        &preprocess::DecodeOptions::with_max_pixels(60_000)
    )
    .is_ok());
    // A PPM header claiming 100000 x 100000 pixels (10^10, 30 GB) with no pixel data: rejected
    // from the header, before anything is allocated.
    let err = preprocess::decode_image_bytes(b"P6\n100000 100000\n255\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("10000000000 pixels"), "{err}");
    // Absurd configs are errors, not allocations.
    let huge = PreprocessConfig::imagenet(1 << 20);
    let err = preprocess::resize_and_crop(&DynamicImage::new_rgb8(4, 4), &huge).unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
}

/// Bytes that are not an image (or a truncated one, or 0 pixels): `internimage::Error::UndecodableImage`.
#[test]
fn typed_error_undecodable_image() {
    let cfg = PreprocessConfig::imagenet(224);
    let bytes = std::fs::read(format!("{FIXTURES}/chelsea.png")).unwrap();
    let truncated = tmp("typed_truncated.png");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let errors = [
        preprocess::decode_image_bytes(b"this is not an image").unwrap_err(),
        preprocess::decode_image_bytes(b"P5\n0 0\n255\n").unwrap_err(),
        preprocess::load_image(&truncated, &cfg, &Device::Cpu).unwrap_err(),
    ];
    for err in errors {
        assert!(
            matches!(
                internimage::Error::find(&err),
                Some(internimage::Error::UndecodableImage { .. })
            ),
            "{err:?}"
        );
    }
}

/// Over the pixel limit: `internimage::Error::ImageTooLarge` with the header's size and the limit.
#[test]
fn typed_error_image_too_large() {
    let mut png = Vec::new();
    DynamicImage::ImageRgb8(pattern(300, 200))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let opts = preprocess::DecodeOptions::with_max_pixels(59_999);
    let err = preprocess::decode_image_bytes_with(&png, &opts).unwrap_err();
    assert!(
        matches!(
            internimage::Error::find(&err),
            Some(internimage::Error::ImageTooLarge {
                dimensions: Some((300, 200)),
                max_pixels: 59_999,
                ..
            })
        ),
        "{err:?}"
    );
    // The 10^10-pixel PPM header, with the default limit.
    let err = preprocess::decode_image_bytes(b"P6\n100000 100000\n255\n").unwrap_err();
    assert!(
        matches!(
            internimage::Error::find(&err),
            Some(internimage::Error::ImageTooLarge {
                dimensions: Some((100_000, 100_000)),
                max_pixels: preprocess::DEFAULT_MAX_PIXELS,
                ..
            })
        ),
        "{err:?}"
    );
}

/// Bad preprocessing settings: `internimage::Error::BadConfig`, also through `load_image`, whose
/// message adds the file name.
#[test]
fn typed_error_bad_preprocessing_config() {
    let bad = PreprocessConfig {
        crop_size: 0,
        ..PreprocessConfig::imagenet(224)
    };
    let err = preprocess::preprocess_image(&DynamicImage::new_rgb8(8, 8), &bad, &Device::Cpu)
        .unwrap_err();
    assert!(
        matches!(
            internimage::Error::find(&err),
            Some(internimage::Error::BadConfig { .. })
        ),
        "{err:?}"
    );
    let err =
        preprocess::load_image(format!("{FIXTURES}/chelsea.png"), &bad, &Device::Cpu).unwrap_err();
    assert!(
        matches!(
            internimage::Error::find(&err),
            Some(internimage::Error::BadConfig { message }) if message.contains("chelsea.png")
        ),
        "{err:?}"
    );
}

/// A file that cannot be opened: `internimage::Error::Io` with its path and the OS error.
#[test]
fn typed_error_io_missing_image() {
    let missing = tmp("typed_does_not_exist.png");
    let err = preprocess::load_image(&missing, &PreprocessConfig::imagenet(224), &Device::Cpu)
        .unwrap_err();
    match internimage::Error::find(&err) {
        Some(internimage::Error::Io { path, source, .. }) => {
            assert_eq!(path, &missing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}: {err:?}"),
    }
    // The message is the one line a user sees.
    assert_eq!(
        err.to_string(),
        internimage::error::user_message(&err),
        "no backtrace in Display"
    );
    assert!(err.to_string().starts_with("cannot open image"), "{err}");
}
