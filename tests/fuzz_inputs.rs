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

// Hostile checkpoints found by audit: each must give a quick error naming the problem (never an
// abort on a huge allocation, a hang, or a misleading "missing tensor").

/// Raw protocol-2 pickle opcodes, for hostile files the `Py` writer cannot express (tensor views
/// and storages of our choosing, memo reuse).
struct Raw(Vec<u8>);

impl Raw {
    fn new() -> Self {
        Raw(vec![0x80, 2])
    }
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn str(&mut self, v: &str) -> &mut Self {
        self.op(b"X")
            .op(&(v.len() as u32).to_le_bytes())
            .op(v.as_bytes())
    }
    fn int(&mut self, v: i64) -> &mut Self {
        self.op(&[0x8a, 8]).op(&v.to_le_bytes())
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(b"c")
            .op(module.as_bytes())
            .op(b"\n")
            .op(name.as_bytes())
            .op(b"\n")
    }
    /// LONG_BINPUT / LONG_BINGET.
    fn put(&mut self, k: u32) -> &mut Self {
        self.op(b"r").op(&k.to_le_bytes())
    }
    fn get(&mut self, k: u32) -> &mut Self {
        self.op(b"j").op(&k.to_le_bytes())
    }
    fn ints(&mut self, v: &[i64]) -> &mut Self {
        self.op(b"(");
        for &x in v {
            self.int(x);
        }
        self.op(b"t")
    }
    /// `_rebuild_tensor_v2` of storage `key` (`numel` elements of `torch.<storage>`), its shape
    /// and strides written by `dims`.
    fn tensor_with(
        &mut self,
        storage: &str,
        key: &str,
        numel: i64,
        dims: impl FnOnce(&mut Raw),
    ) -> &mut Self {
        self.global("torch._utils", "_rebuild_tensor_v2").op(b"((");
        self.str("storage")
            .global("torch", storage)
            .str(key)
            .str("cpu");
        self.int(numel).op(b"tQ").int(0);
        dims(self);
        self.op(&[0x89])
            .global("collections", "OrderedDict")
            .op(b")RtR")
    }
    fn tensor(
        &mut self,
        storage: &str,
        key: &str,
        numel: i64,
        shape: &[i64],
        strides: &[i64],
    ) -> &mut Self {
        self.tensor_with(storage, key, numel, |r| {
            r.ints(shape).ints(strides);
        })
    }
    /// Ends the pickle (STOP).
    fn finish(&mut self) -> Vec<u8> {
        self.op(b".");
        std::mem::take(&mut self.0)
    }
}

/// Writes a `.pth` of pickle `pkl` and storage records `storages` as `name`.
fn raw_pth(name: &str, pkl: Vec<u8>, storages: &[(&str, Vec<u8>)]) -> PathBuf {
    let mut records = vec![("archive/data.pkl".to_string(), pkl)];
    records.extend(
        storages
            .iter()
            .map(|(k, b)| (format!("archive/data/{k}"), b.clone())),
    );
    let path = tmp_dir().join(name);
    std::fs::write(&path, common::pth::zip_records(&records)).unwrap();
    path
}

/// The message and typed error of `r`, which must be an error that came within `secs` seconds
/// of `t0`.
fn quick_err<T>(
    what: &str,
    t0: std::time::Instant,
    secs: f64,
    r: candle_core::Result<T>,
) -> (String, candle_core::Error) {
    let elapsed = t0.elapsed().as_secs_f64();
    let Err(err) = r else {
        panic!("{what}: accepted")
    };
    let text = internimage::error::user_message(&err);
    assert!(elapsed < secs, "{what}: error after {elapsed:.1} s: {text}");
    (text, err)
}

fn is_invalid(err: &candle_core::Error) -> bool {
    matches!(
        internimage::Error::find(err),
        Some(internimage::Error::InvalidCheckpoint { .. })
    )
}

fn is_unsupported(err: &candle_core::Error) -> bool {
    matches!(
        internimage::Error::find(err),
        Some(internimage::Error::UnsupportedCheckpoint { .. })
    )
}

/// A view with more elements than its 1-element storage (stride 0, as saved from an `expand`):
/// an error naming the tensor and the fix, not a 4 TiB allocation (or, at 2^62 elements, a size
/// that wraps to 0 and an endless copy).
#[test]
fn pth_view_repeating_storage_elements_is_an_error() {
    let mut r = Raw::new();
    r.op(b"}(").str("stride0");
    r.tensor("FloatStorage", "0", 1, &[1 << 40], &[0]);
    r.str("wraps")
        .tensor("FloatStorage", "0", 1, &[1 << 62], &[0]);
    r.str("ok").tensor("FloatStorage", "0", 1, &[1], &[1]);
    let pkl = r.op(b"u").finish();
    let path = raw_pth("stride0.pth", pkl, &[("0", 1f32.to_le_bytes().to_vec())]);
    let b = CheckpointBackend::open(&[&path]).unwrap();
    for name in ["stride0", "wraps"] {
        let t0 = std::time::Instant::now();
        let (text, err) = quick_err(
            name,
            t0,
            2.0,
            b.get_unchecked(name, DType::F32, &Device::Cpu),
        );
        assert!(is_invalid(&err), "{text}");
        for want in [
            &format!("`{name}`"),
            "repeats storage elements",
            "expand",
            ".contiguous()",
        ] {
            assert!(text.contains(want), "{name}: no {want:?} in: {text}");
        }
    }
    let ok = b.get_unchecked("ok", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(ok.to_vec1::<f32>().unwrap(), [1.0]);
}

/// STACK_GLOBAL of a memoised 1 MB string, 20,000 times: rejected at the first use (a global's
/// name is short), not 40 GB of copies.
#[test]
fn pth_stack_global_of_a_long_memoised_string_is_rejected() {
    let mut r = Raw::new();
    r.str(&"m".repeat(1 << 20)).put(0);
    for _ in 0..20_000 {
        r.get(0).get(0).op(&[0x93]).op(b"0");
    }
    let pkl = r.op(b"}").finish();
    let path = raw_pth("long_global.pth", pkl, &[]);
    let t0 = std::time::Instant::now();
    let (text, err) = quick_err("long global", t0, 2.0, CheckpointBackend::open(&[&path]));
    assert!(is_invalid(&err), "{text}");
    assert!(
        text.contains("global") && text.contains("1048576 bytes") && text.contains("1024"),
        "{text}"
    );
}

/// One memoised tensor whose shape and strides are a memoised tuple of 1,000,000 ints, under
/// 2000 names: refused for its rank without copying the tuple per entry (11.7 GB before).
#[test]
fn pth_tensor_of_huge_rank_is_refused_quickly() {
    let huge = |with_readable: bool| {
        let mut r = Raw::new();
        r.op(b"(").op(&b"K\x01".repeat(1_000_000)).op(b"t").put(1);
        r.tensor_with("FloatStorage", "0", 1, |r| {
            r.get(1).get(1);
        });
        r.put(2).op(b"0").op(b"}(");
        for i in 0..2000 {
            r.str(&format!("t{i}")).get(2);
        }
        if with_readable {
            r.str("ok").tensor("FloatStorage", "0", 1, &[1], &[1]);
        }
        r.op(b"u").finish()
    };
    let storage = [("0", 1f32.to_le_bytes().to_vec())];

    // Only such tensors: the open error names one and the limit.
    let path = raw_pth("huge_rank.pth", huge(false), &storage);
    let t0 = std::time::Instant::now();
    let (text, err) = quick_err("huge rank", t0, 5.0, CheckpointBackend::open(&[&path]));
    assert!(is_unsupported(&err), "{text}");
    for want in ["`t0`", "1000000 dimensions", "at most 16", "and 1997 more"] {
        assert!(text.contains(want), "no {want:?} in: {text}");
    }

    // Beside a readable tensor: the file opens, asking for one names it and the limit.
    let path = raw_pth("huge_rank_mixed.pth", huge(true), &storage);
    let t0 = std::time::Instant::now();
    let b = CheckpointBackend::open(&[&path]).unwrap();
    assert!(t0.elapsed().as_secs_f64() < 5.0);
    assert_eq!(b.names(), ["ok"]);
    assert!(b.contains_tensor("t5"));
    let (text, err) = quick_err(
        "huge rank get",
        t0,
        5.0,
        b.get_unchecked("t5", DType::F32, &Device::Cpu),
    );
    assert!(is_unsupported(&err), "{text}");
    assert!(
        text.contains("`t5`") && text.contains("1000000 dimensions"),
        "{text}"
    );
}

/// Tensors of an unsupported storage dtype or layout, or with malformed arguments: asking for
/// one names it and the reason (not "missing tensor ... does the Config match"), and a file of
/// only such tensors says so (not "holds no tensors").
#[test]
fn pth_unreadable_tensors_are_named_with_the_reason() {
    let complex = "levels.0.blocks.0.gamma1";
    let mut r = Raw::new();
    r.op(b"}(").str("head.weight");
    r.tensor("FloatStorage", "0", 12, &[3, 4], &[4, 1]);
    r.str(complex)
        .tensor("ComplexFloatStorage", "1", 6, &[6], &[1]);
    r.str("negative")
        .tensor("FloatStorage", "0", 12, &[-3], &[1]);
    r.str("quantized")
        .global("torch._utils", "_rebuild_qtensor")
        .op(b"(K\x00tR");
    let pkl = r.op(b"u").finish();
    let storages = [("0", vec![0u8; 48]), ("1", vec![0u8; 48])];
    let path = raw_pth("unreadable.pth", pkl, &storages);
    let b = CheckpointBackend::open(&[&path]).unwrap();
    assert_eq!(b.names(), ["head.weight"]);
    let get = |name: &str| {
        let t0 = std::time::Instant::now();
        assert!(b.contains_tensor(name), "{name}");
        // As `VarBuilder` asks: with the shape the model expects.
        let r = b.get(
            candle_core::Shape::from(vec![6]),
            name,
            candle_nn::Init::Const(0.),
            DType::F32,
            &Device::Cpu,
        );
        quick_err(name, t0, 2.0, r)
    };
    let (text, err) = get(complex);
    assert!(is_unsupported(&err), "{text}");
    assert!(
        text.contains(&format!("`{complex}`")) && text.contains("ComplexFloatStorage"),
        "{text}"
    );
    let (text, err) = get("negative");
    assert!(is_invalid(&err), "{text}");
    assert!(text.contains("`negative`") && text.contains("-3"), "{text}");
    let (text, err) = get("quantized");
    assert!(is_unsupported(&err), "{text}");
    assert!(
        text.contains("`quantized`") && text.contains("_rebuild_qtensor"),
        "{text}"
    );

    // Only an unsupported tensor: the open error names it, with the reason.
    let mut r = Raw::new();
    r.op(b"}(").str(complex);
    r.tensor("ComplexFloatStorage", "1", 6, &[6], &[1]);
    let path = raw_pth("only_complex.pth", r.op(b"u").finish(), &storages);
    let err = CheckpointBackend::open(&[&path]).unwrap_err();
    let text = internimage::error::user_message(&err);
    assert!(is_unsupported(&err), "{text}");
    assert!(
        text.contains(&format!("`{complex}`")) && text.contains("ComplexFloatStorage"),
        "{text}"
    );
}

/// A memoised 1 MB tensor name under 100,000 entries: refused, not 100 GB of copying and
/// hashing.
#[test]
fn pth_overlong_tensor_names_are_rejected_quickly() {
    let mut r = Raw::new();
    r.str(&"n".repeat(1 << 20)).put(0);
    r.tensor("FloatStorage", "0", 1, &[1], &[1]).put(1).op(b"0");
    r.op(b"}(");
    for _ in 0..100_000 {
        r.get(0).get(1);
    }
    let pkl = r.op(b"u").finish();
    let path = raw_pth("long_name.pth", pkl, &[("0", vec![0u8; 4])]);
    let t0 = std::time::Instant::now();
    let (text, err) = quick_err("long name", t0, 5.0, CheckpointBackend::open(&[&path]));
    assert!(is_invalid(&err), "{text}");
    assert!(text.contains("tensor name of 1048576 bytes"), "{text}");
}

/// One tensor under 100,000 names, its storage key a memoised 1 MB string, or its archive folder
/// a 60 KB name: neither is copied per entry (100 GB / 6 GB before). The key is refused (torch
/// keys are short numbers); the folder is legal and the file loads.
#[test]
fn pth_long_storage_key_or_archive_folder_is_not_copied_per_tensor() {
    let many = |key_len: usize| {
        let mut r = Raw::new();
        r.str(&"k".repeat(key_len)).put(0);
        // The tensor, its storage key the memoised string.
        r.global("torch._utils", "_rebuild_tensor_v2").op(b"((");
        r.str("storage")
            .global("torch", "FloatStorage")
            .get(0)
            .str("cpu");
        r.int(1).op(b"tQ").int(0).ints(&[1]).ints(&[1]);
        r.op(&[0x89])
            .global("collections", "OrderedDict")
            .op(b")RtR");
        r.put(1).op(b"0").op(b"}(");
        for i in 0..100_000 {
            r.str(&format!("{i:x}")).get(1);
        }
        r.op(b"u").finish()
    };

    let path = raw_pth("long_key.pth", many(1 << 20), &[]);
    let t0 = std::time::Instant::now();
    let (text, err) = quick_err("long key", t0, 5.0, CheckpointBackend::open(&[&path]));
    assert!(is_invalid(&err), "{text}");
    assert!(
        text.contains("storage key is not a plain record name"),
        "{text}"
    );

    let folder = "f".repeat(60_000);
    let records = [
        (format!("{folder}/data.pkl"), many(1)),
        (format!("{folder}/data/k"), 2f32.to_le_bytes().to_vec()),
    ];
    let path = tmp_dir().join("long_folder.pth");
    std::fs::write(&path, common::pth::zip_records(&records)).unwrap();
    let t0 = std::time::Instant::now();
    let b = CheckpointBackend::open(&[&path]).unwrap();
    let t = b.get_unchecked("1f", DType::F32, &Device::Cpu).unwrap();
    assert!(t0.elapsed().as_secs_f64() < 5.0);
    assert_eq!(t.to_vec1::<f32>().unwrap(), [2.0]);
}

/// More tensors under one state dict than any weight checkpoint has (each costs an entry and
/// its shape): refused.
#[test]
fn pth_too_many_tensors_are_rejected() {
    let mut r = Raw::new();
    r.tensor("FloatStorage", "0", 1, &[1], &[1]).put(0).op(b"0");
    r.op(b"}(");
    for i in 0..(1 << 18) + 1 {
        r.str(&format!("{i:x}")).get(0);
    }
    let pkl = r.op(b"u").finish();
    let path = raw_pth("many.pth", pkl, &[("0", vec![0u8; 4])]);
    let t0 = std::time::Instant::now();
    let (text, err) = quick_err("many tensors", t0, 10.0, CheckpointBackend::open(&[&path]));
    assert!(is_invalid(&err), "{text}");
    assert!(text.contains("more than 262144 tensors"), "{text}");
}

/// A safetensors tensor of a dtype that cannot be converted (F8_E8M0): the error names the
/// tensor and the file.
#[test]
fn safetensors_unconvertible_dtype_names_the_tensor() {
    let header = br#"{"scales":{"dtype":"F8_E8M0","shape":[2],"data_offsets":[0,2]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.extend([127u8, 128]);
    let path = tmp_dir().join("f8e8m0.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let b = CheckpointBackend::open(&[&path]).unwrap();
    let t0 = std::time::Instant::now();
    let (text, err) = quick_err(
        "F8_E8M0",
        t0,
        2.0,
        b.get_unchecked("scales", DType::F32, &Device::Cpu),
    );
    assert!(is_unsupported(&err), "{text}");
    for want in ["`scales`", "f8e8m0.safetensors", "F8E8M0"] {
        assert!(text.contains(want), "no {want:?} in: {text}");
    }
}

/// A FIFO (given directly or as a shard of an index), a directory: an error saying it is not a
/// regular file, not a `File::open` that blocks forever.
#[cfg(unix)]
#[test]
fn non_regular_files_are_an_error_not_a_hang() {
    let dir = tmp_dir().join("special");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("weights.safetensors");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let index = dir.join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"metadata": {}, "weight_map": {"a": "weights.safetensors"}}"#,
    )
    .unwrap();
    for (path, want) in [
        (fifo.clone(), "FIFO"),
        (index, "FIFO"),
        (dir.clone(), "directory"),
    ] {
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let r = CheckpointBackend::open(&[&p]).map(|_| ());
            let _ = tx.send(r.map_err(|e| internimage::error::user_message(&e)));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("opening {} hangs", path.display()));
        let text = r.expect_err("accepted");
        assert!(
            text.contains(want) && text.contains("not a regular file"),
            "{}: {text}",
            path.display()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A safetensors index larger than any real one (64 MiB; real ones are under 1 MB) is refused
/// after reading at most its limit, and a shard name with a drive letter or backslash is refused
/// by the one validation the Hub layer shares.
#[test]
fn oversized_or_hostile_index_is_refused() {
    let dir = tmp_dir().join("big_index");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors.index.json");
    // A JSON start, then sparse zeros up to 65 MiB (no disk used).
    std::fs::write(&path, br#"{"weight_map": {"#).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(65 << 20).unwrap();
    drop(f);
    let err = CheckpointBackend::open(&[&path]).unwrap_err().to_string();
    assert!(err.contains("larger than 64 MiB"), "{err}");
    for name in [
        "C:\\\\w.safetensors",
        "a\\\\b.safetensors",
        "/abs.safetensors",
    ] {
        std::fs::write(&path, format!(r#"{{"weight_map": {{"x": "{name}"}}}}"#)).unwrap();
        let err = internimage::checkpoint::shards_from_index(&path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a plain relative path"), "{name}: {err}");
    }
}
