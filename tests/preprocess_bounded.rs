//! Bounded preprocessing work and memory for extreme aspect ratios (issue 11): one test in its
//! own binary so that the process's peak RSS (`VmHWM`) measures this work alone.
#![cfg(feature = "image")]

mod common;

use std::time::Instant;

use candle_core::{DType, Device, Module};
use image::{DynamicImage, ImageBuffer, Rgb};
use internimage::{preprocess, zoo::PreprocessConfig, InternImage};

/// Peak resident set size of this process in MiB (`VmHWM` of /proc/self/status; Linux only).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn png_bytes(w: u32, h: u32) -> Vec<u8> {
    let img = ImageBuffer::from_fn(w, h, |x, y| {
        Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 7 * 30) as u8])
    });
    let mut png = Vec::new();
    DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

#[test]
fn extreme_aspect_ratios_are_classified_fast_in_bounded_memory() {
    let device = Device::Cpu;
    let cfg = common::net_config("tiny_b");
    let model = InternImage::from_checkpoint(
        &cfg,
        common::net_weights("tiny_b", "safetensors"),
        DType::F32,
        &device,
    )
    .unwrap();
    let pre = PreprocessConfig::imagenet(224);
    let before = peak_rss_mib();
    for (w, h) in [(40000u32, 1u32), (1, 40000)] {
        let png = png_bytes(w, h);
        let t0 = Instant::now();
        let img = preprocess::decode_image_bytes(&png).unwrap();
        let x = preprocess::preprocess_image(&img, &pre, &device).unwrap();
        let logits = model.forward(&x.unsqueeze(0).unwrap()).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(logits.dims(), &[1, 100]);
        let v = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
        // The crop holds real image content (not zero padding): it varies along the long axis.
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (lo, hi) = xs
            .iter()
            .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        assert!(hi - lo > 1.0, "{w}x{h}: flat crop {lo}..{hi}");
        println!(
            "{w}x{h} ({} byte PNG): decode + preprocess + classify {secs:.3} s",
            png.len()
        );
        assert!(secs < 1.0, "{w}x{h} took {secs:.2} s");
    }
    if let (Some(before), Some(after)) = (before, peak_rss_mib()) {
        println!("peak RSS {before:.1} MiB before, {after:.1} MiB after");
        assert!(after < 300.0, "peak RSS {after:.1} MiB");
    }
}
