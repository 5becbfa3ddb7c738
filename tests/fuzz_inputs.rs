//! Seeded mutation fuzzing of every input the crate parses: safetensors headers and bodies, the
//! zip and pickle bytes of `.pth` files, `config.json`, sharded index files with hostile paths,
//! and image bytes. The only allowed outcomes are `Ok` or `Err`: a panic fails the test (caught
//! with `catch_unwind` and reported with the seed and case). The default run is bounded to a few
//! seconds; `cargo test --release --test fuzz_inputs -- --ignored` runs the same generator
//! longer (`FUZZ_ITERS` sets the iterations per target).

mod common;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use common::pth::{dict, pth_bytes, s, state_dict, Py};
use internimage::checkpoint::CheckpointBackend;
use internimage::Config;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn tmp_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fuzz_inputs");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Random edits of `bytes`: flips, overwrites with interesting values, insertions, deletions,
/// truncation, duplication of a slice.
fn mutate(rng: &mut StdRng, bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    let edits = rng.random_range(1..=4);
    for _ in 0..edits {
        if v.is_empty() {
            v.push(rng.random());
            continue;
        }
        let i = rng.random_range(0..v.len());
        match rng.random_range(0..7) {
            0 => v[i] ^= 1 << rng.random_range(0..8),
            1 => v[i] = [0u8, 0xff, 0x7f, 0x80, b'{', b'"', b'.', b'('][rng.random_range(0..8)],
            2 => {
                let n = rng.random_range(1..=8).min(v.len() - i);
                for b in &mut v[i..i + n] {
                    *b = 0xff;
                }
            }
            3 => v.insert(i, rng.random()),
            4 => {
                v.remove(i);
            }
            5 => v.truncate(i),
            _ => {
                let n = rng.random_range(1..=16).min(v.len() - i);
                let chunk = v[i..i + n].to_vec();
                let at = rng.random_range(0..v.len());
                v.splice(at..at, chunk);
            }
        }
    }
    v
}

/// Runs `f`, failing the test with `what` if it panics.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("panic on {what}: {msg}")
        }
    }
}

/// Opens a checkpoint and reads every tensor it lists; Ok/Err are both fine.
fn open_and_read_all(path: &Path) {
    if let Ok(b) = CheckpointBackend::open(&[path]) {
        for name in b.names() {
            let _ = b.get_unchecked(&name, DType::F32, &Device::Cpu);
        }
    }
}

fn small_tensors() -> Vec<(String, Tensor)> {
    let dev = Device::Cpu;
    vec![
        (
            "levels.0.blocks.0.gamma1".into(),
            Tensor::arange(0f32, 6.0, &dev).unwrap(),
        ),
        (
            "head.weight".into(),
            Tensor::arange(0f32, 12.0, &dev)
                .unwrap()
                .reshape((3, 4))
                .unwrap(),
        ),
        (
            "conv_head.1.num_batches_tracked".into(),
            Tensor::new(3i64, &dev).unwrap(),
        ),
    ]
}

fn safetensors_bytes() -> Vec<u8> {
    let path = tmp_dir().join("seed.safetensors");
    let map: HashMap<String, Tensor> = small_tensors().into_iter().collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    std::fs::read(&path).unwrap()
}

fn pth_seed() -> Vec<u8> {
    pth_bytes(&dict(vec![
        ("model", state_dict(&small_tensors())),
        ("epoch", Py::Int(3)),
        (
            "config",
            Py::Object {
                module: "yacs.config",
                name: "CfgNode",
                items: vec![(s("A"), Py::Float(1.5))],
                state: Some(Box::new(dict(vec![("x", Py::NumpyF64(2.0))]))),
            },
        ),
    ]))
}

/// The pickle of [`pth_seed`] and its storages, for mutating the pickle alone.
fn pth_parts() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut p = common::pth::Pickler::new();
    p.write(&dict(vec![("model", state_dict(&small_tensors()))]));
    p.finish()
}

fn png_seed(format: image::ImageFormat) -> Vec<u8> {
    let img =
        image::RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 30) as u8, (y * 40) as u8, 9]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), format)
        .unwrap();
    out
}

fn fuzz(iters: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tmp_dir().join(format!("run_{seed}"));
    std::fs::create_dir_all(&dir).unwrap();

    // safetensors: header and body.
    let st = safetensors_bytes();
    let header_len = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    for i in 0..iters {
        let mut bytes = st.clone();
        if rng.random_bool(0.5) {
            // Mutate inside the JSON header only (keeps the length prefix consistent).
            let header = mutate(&mut rng, &st[8..8 + header_len]);
            bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(&header);
            bytes.extend(&st[8 + header_len..]);
        } else {
            bytes = mutate(&mut rng, &bytes);
        }
        let path = dir.join("m.safetensors");
        std::fs::write(&path, &bytes).unwrap();
        no_panic(&format!("safetensors case {i} (seed {seed})"), || {
            open_and_read_all(&path)
        });
    }

    // .pth: the zip bytes, and the pickle inside a valid zip.
    let pth = pth_seed();
    let (pkl, storages) = pth_parts();
    for i in 0..iters {
        let bytes = if rng.random_bool(0.5) {
            mutate(&mut rng, &pth)
        } else {
            let mut records = vec![("archive/data.pkl".to_string(), mutate(&mut rng, &pkl))];
            records.extend(
                storages
                    .iter()
                    .map(|(k, b)| (format!("archive/data/{k}"), b.clone())),
            );
            common::pth::zip_records(&records)
        };
        let path = dir.join("m.pth");
        std::fs::write(&path, &bytes).unwrap();
        no_panic(&format!("pth case {i} (seed {seed})"), || {
            open_and_read_all(&path)
        });
    }

    // config.json variants.
    let hf = serde_json::to_string(&common::net_meta("tiny_b")["hf_config"]).unwrap();
    let hostile_values = [
        "0",
        "-1",
        "1e308",
        "null",
        "\"x\"",
        "[]",
        "{}",
        "4294967297",
        "[0,0,0,0]",
        "[1]",
        "[1,2,3,4,5]",
        "true",
        "-0.0",
        "18446744073709551615",
    ];
    for i in 0..iters {
        let text = if rng.random_bool(0.5) {
            String::from_utf8_lossy(&mutate(&mut rng, hf.as_bytes())).into_owned()
        } else {
            // Replace one value with a hostile one.
            let mut v: serde_json::Value = serde_json::from_str(&hf).unwrap();
            let obj = v.as_object_mut().unwrap();
            let keys: Vec<String> = obj.keys().cloned().collect();
            let k = &keys[rng.random_range(0..keys.len())];
            let hv = hostile_values[rng.random_range(0..hostile_values.len())];
            obj.insert(k.clone(), serde_json::from_str(hv).unwrap());
            v.to_string()
        };
        no_panic(&format!("config case {i} (seed {seed}): {text}"), || {
            if let Ok(cfg) = Config::from_json_str(&text) {
                let _ = (cfg.stage_channels(3), cfg.dw_kernel());
            }
        });
    }

    // Sharded index files with hostile paths.
    let shard = dir.join("shard.safetensors");
    std::fs::write(&shard, &st).unwrap();
    let names = [
        "shard.safetensors",
        "../shard.safetensors",
        "../../../../etc/passwd",
        "/etc/passwd",
        "/dev/zero",
        "",
        ".",
        "..",
        "sub/../shard.safetensors",
        "C:\\\\Windows\\\\win.ini",
        "shard.safetensors\u{0}",
        "index.json",
    ];
    for i in 0..iters {
        let mut map = serde_json::Map::new();
        for j in 0..rng.random_range(0..4) {
            let name = names[rng.random_range(0..names.len())];
            map.insert(format!("t{j}"), serde_json::Value::String(name.into()));
        }
        let mut text = serde_json::json!({"metadata": {}, "weight_map": map}).to_string();
        if rng.random_bool(0.3) {
            text = String::from_utf8_lossy(&mutate(&mut rng, text.as_bytes())).into_owned();
        }
        let path = dir.join("index.json");
        std::fs::write(&path, &text).unwrap();
        no_panic(&format!("index case {i} (seed {seed}): {text}"), || {
            let r = CheckpointBackend::open(&[&path]);
            if text.contains("/etc/passwd") || text.contains("/dev/zero") {
                assert!(r.is_err(), "hostile index accepted: {text}");
            }
            open_and_read_all(&path)
        });
    }

    // Image bytes.
    let cfg = internimage::zoo::PreprocessConfig::imagenet(16);
    let seeds: Vec<Vec<u8>> = [
        image::ImageFormat::Png,
        image::ImageFormat::Jpeg,
        image::ImageFormat::Gif,
        image::ImageFormat::Bmp,
        image::ImageFormat::Tiff,
        image::ImageFormat::Pnm,
    ]
    .into_iter()
    .map(png_seed)
    .collect();
    for i in 0..iters {
        let seed_img = &seeds[i % seeds.len()];
        let bytes = mutate(&mut rng, seed_img);
        no_panic(&format!("image case {i} (seed {seed})"), || {
            if let Ok(img) = internimage::preprocess::decode_image_bytes(&bytes) {
                let _ = internimage::preprocess::preprocess_image(&img, &cfg, &Device::Cpu);
            }
        });
    }
}

#[test]
fn mutated_inputs_give_ok_or_err_never_a_panic() {
    let t0 = std::time::Instant::now();
    fuzz(1000, 0x11);
    println!(
        "fuzz: 1000 cases per target in {:.2} s",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "long fuzz run for local use: cargo test --release --test fuzz_inputs -- --ignored"]
fn mutated_inputs_long_run() {
    let iters: usize = std::env::var("FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    for seed in 0..8u64 {
        fuzz(iters / 8, 1000 + seed);
    }
}
