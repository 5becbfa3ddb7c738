//! Bad checkpoints and bad inputs give errors that say what is wrong (never a panic); format
//! detection, sharded safetensors and unused tensors.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use common::{load_safetensors as load_st, net_config as config, net_weights as weights};
use internimage::{checkpoint, Config, InternImage};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A fresh scratch directory for this test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("internimage-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn err_of<T: std::fmt::Debug>(r: candle_core::Result<T>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

fn load(cfg: &Config, path: &Path) -> candle_core::Result<InternImage> {
    InternImage::from_checkpoint(cfg, path, DType::F32, &Device::Cpu)
}

#[test]
fn missing_tensor_names_tensor_and_file() {
    let dir = scratch("missing");
    let mut ts = load_st(weights("tiny_b", "safetensors"));
    ts.remove("model.levels.0.blocks.0.layer_scale1").unwrap();
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&ts, &path).unwrap();
    let e = err_of(load(&config("tiny_b"), &path));
    assert!(e.contains("levels.0.blocks.0.gamma1"), "{e}");
    assert!(e.contains("model.levels.0.blocks.0.layer_scale1"), "{e}");
    assert!(e.contains(&path.display().to_string()), "{e}");

    // A config that does not match the checkpoint (H-style blocks on tiny_b weights).
    let mut cfg = config("tiny_b");
    cfg.center_feature_scale = true;
    let e = err_of(load(&cfg, &weights("tiny_b", "pth")));
    assert!(
        e.contains("center_feature_scale_proj_weight") && e.contains("tiny_b.pth"),
        "{e}"
    );
}

#[test]
fn shape_mismatch_names_both_shapes() {
    let dir = scratch("shape");
    let mut ts = load_st(weights("tiny_b", "safetensors"));
    ts.insert(
        "model.head.weight".into(),
        Tensor::zeros((50, 144), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = dir.join("w.safetensors");
    candle_core::safetensors::save(&ts, &path).unwrap();
    let e = err_of(load(&config("tiny_b"), &path));
    assert!(
        e.contains("head.weight") && e.contains("[100, 144]") && e.contains("[50, 144]"),
        "{e}"
    );
    assert!(e.contains(&path.display().to_string()), "{e}");

    let cfg = config("tiny_b").with_num_classes(10);
    let e = err_of(load(&cfg, &weights("tiny_b", "pth")));
    assert!(
        e.contains("[10, 144]") && e.contains("[100, 144]") && e.contains("tiny_b.pth"),
        "{e}"
    );
}

#[test]
fn garbage_and_truncated_files_error() {
    let dir = scratch("garbage");
    let cfg = config("tiny_b");
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty.pth".into(), vec![]),
        (
            "text.safetensors".into(),
            b"hello world, not weights".to_vec(),
        ),
        (
            "random.bin".into(),
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
        (
            "legacy.pth".into(),
            vec![0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20],
        ),
        ("huge_header.safetensors".into(), {
            let mut v = (1u64 << 40).to_le_bytes().to_vec();
            v.extend_from_slice(b"{\"a\":1}");
            v
        }),
    ];
    for ext in ["pth", "safetensors"] {
        let bytes = std::fs::read(weights("tiny_b", ext)).unwrap();
        for frac in [2, 10, 100] {
            cases.push((
                format!("trunc{frac}.{ext}"),
                bytes[..bytes.len() * (frac - 1) / frac].to_vec(),
            ));
        }
        cases.push((format!("head_only.{ext}"), bytes[..64].to_vec()));
    }
    for (name, bytes) in cases {
        let path = dir.join(&name);
        std::fs::write(&path, &bytes).unwrap();
        let res = std::panic::catch_unwind(|| load(&cfg, &path).map(|_| ()));
        match res {
            Ok(Ok(())) => panic!("{name}: loading succeeded"),
            Ok(Err(e)) => assert!(!e.to_string().is_empty(), "{name}"),
            Err(_) => panic!("{name}: panicked"),
        }
    }
    let e = err_of(load(&cfg, &dir.join("does-not-exist.pth")));
    assert!(e.contains("does-not-exist.pth"), "{e}");
    let e = err_of(checkpoint::detect_format(dir.join("legacy.pth")));
    assert!(e.contains("legacy"), "{e}");
}

#[test]
fn format_detected_from_content_not_extension() {
    let dir = scratch("ext");
    let a = dir.join("weights.bin");
    std::fs::copy(weights("tiny_b", "pth"), &a).unwrap();
    let b = dir.join("weights.pth");
    std::fs::copy(weights("tiny_b", "safetensors"), &b).unwrap();
    assert_eq!(
        checkpoint::detect_format(&a).unwrap(),
        checkpoint::Format::Pth
    );
    assert_eq!(
        checkpoint::detect_format(&b).unwrap(),
        checkpoint::Format::Safetensors
    );
    load(&config("tiny_b"), &a).unwrap();
    load(&config("tiny_b"), &b).unwrap();
}

#[test]
fn names_are_normalised() {
    assert_eq!(
        checkpoint::canonical_name("model.levels.1.blocks.0.layer_scale2"),
        "levels.1.blocks.0.gamma2"
    );
    assert_eq!(
        checkpoint::canonical_name("backbone.patch_embed.conv1.weight"),
        "patch_embed.conv1.weight"
    );
    assert_eq!(checkpoint::canonical_name("module.head.bias"), "head.bias");
    assert_eq!(
        checkpoint::canonical_name("levels.0.blocks.0.gamma1"),
        "levels.0.blocks.0.gamma1"
    );
    let vb = checkpoint::CheckpointBackend::open(&[weights("tiny_b", "safetensors")]).unwrap();
    let pth = checkpoint::CheckpointBackend::open(&[weights("tiny_b", "pth")]).unwrap();
    // Same canonical names from both layouts (157 keys incl. num_batches_tracked).
    assert_eq!(vb.names(), pth.names());
    assert_eq!(vb.names().len(), 157);
}

/// Shards + index json load like the single file; the backbone ignores head tensors.
#[test]
fn sharded_safetensors_and_unused_tensors() {
    let dir = scratch("shards");
    let cfg = config("tiny_h");
    let ts = load_st(weights("tiny_h", "safetensors"));
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (k, v) in ts {
        let file = if k.contains("levels.2") || k.contains("clip") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        map.insert(k.clone(), serde_json::Value::String(file.into()));
        if file.starts_with("model-00001") {
            a.insert(k, v);
        } else {
            b.insert(k, v);
        }
    }
    let (pa, pb) = (
        dir.join("model-00001-of-00002.safetensors"),
        dir.join("model-00002-of-00002.safetensors"),
    );
    candle_core::safetensors::save(&a, &pa).unwrap();
    candle_core::safetensors::save(&b, &pb).unwrap();
    let index = dir.join("model.safetensors.index.json");
    let json = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(&index, json.to_string()).unwrap();
    assert_eq!(
        checkpoint::detect_format(&index).unwrap(),
        checkpoint::Format::SafetensorsIndex
    );

    let x = Tensor::randn(0f32, 1., (1, 3, 64, 96), &Device::Cpu).unwrap();
    let single = load(&cfg, &weights("tiny_h", "safetensors")).unwrap();
    let want = single.forward(&x).unwrap();
    let from_index = load(&cfg, &index).unwrap();
    let from_list = InternImage::from_checkpoint_files(
        &cfg,
        &[pa.clone(), pb.clone()],
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for m in [from_index, from_list] {
        let got = m.forward(&x).unwrap();
        let d = common::max_abs_diff(&got, &want);
        assert_eq!(d, 0.0);
    }
    // Missing shard: the error names the tensor and both files.
    let e = err_of(InternImage::from_checkpoint_files(
        &cfg,
        std::slice::from_ref(&pa),
        DType::F32,
        &Device::Cpu,
    ));
    assert!(
        e.contains("levels.2.") && e.contains("model-00001-of-00002.safetensors"),
        "{e}"
    );

    // A checkpoint without any head tensors still loads as a backbone.
    let trunk: HashMap<String, Tensor> = a
        .into_iter()
        .chain(b)
        .filter(|(k, _)| k.contains("levels") || k.contains("patch_embed"))
        .collect();
    let p = dir.join("trunk.safetensors");
    candle_core::safetensors::save(&trunk, &p).unwrap();
    let vb = checkpoint::var_builder(&[&p], DType::F32, &Device::Cpu).unwrap();
    let bb = InternImage::backbone(&cfg, &[0, 1, 2, 3], vb).unwrap();
    let f = bb.forward_features(&x).unwrap();
    let f_ref = single.forward_features(&x).unwrap();
    for (a, b) in f.iter().zip(f_ref.iter()) {
        assert_eq!(a.dims(), b.dims());
        let d = common::max_abs_diff(a, b);
        assert_eq!(d, 0.0);
    }
    let e = err_of(load(&cfg, &p));
    assert!(e.contains("missing tensor"), "{e}");
}

#[test]
fn bad_inputs_error() {
    let b = load(&config("tiny_b"), &weights("tiny_b", "safetensors")).unwrap();
    let dev = Device::Cpu;
    for shape in [
        vec![3, 64, 64],
        vec![1, 4, 64, 64],
        vec![1, 1, 64, 64],
        vec![2, 3, 64, 64, 1],
        vec![0, 3, 64, 64],
    ] {
        let x = Tensor::zeros(shape.as_slice(), DType::F32, &dev).unwrap();
        let e = err_of(b.forward(&x));
        assert!(e.contains("(N, 3, H, W)"), "{e}");
        assert!(b.forward_features(&x).is_err());
    }
    // Any size works for the conv head and for the backbone; H/G head needs multiples of 32.
    let x = Tensor::randn(0f32, 1., (1, 3, 45, 37), &dev).unwrap();
    assert_eq!(b.forward(&x).unwrap().dims(), &[1, 100]);
    let h = load(&config("tiny_h"), &weights("tiny_h", "pth")).unwrap();
    let e = err_of(h.forward(&x));
    assert!(e.contains("multiples of 32") && e.contains("45x37"), "{e}");
    let f = h.forward_features(&x).unwrap();
    assert_eq!(f[3].dims(), &[1, 128, 2, 2]);
    let x = Tensor::randn(0f32, 1., (3, 3, 64, 32), &dev).unwrap();
    assert_eq!(h.forward(&x).unwrap().dims(), &[3, 100]);
    // u8 or f64 input is cast to the weights' dtype.
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert_eq!(h.forward(&x64).unwrap().dtype(), DType::F32);
    // dcn_sampling arguments are checked.
    assert!(h.dcn_sampling(&x, 4, 0).is_err());
    assert!(h.dcn_sampling(&x, 2, 4).is_err());
    // Bad out_indices.
    let vb = checkpoint::var_builder(&[weights("tiny_b", "pth")], DType::F32, &dev).unwrap();
    assert!(InternImage::backbone(&config("tiny_b"), &[4], vb.clone()).is_err());
    assert!(InternImage::backbone(&config("tiny_b"), &[], vb).is_err());
}

/// `matches!` on the typed error inside a `candle_core::Error`.
macro_rules! assert_typed {
    ($err:expr, $pat:pat $(if $guard:expr)?) => {{
        let err = &$err;
        assert!(
            matches!(internimage::Error::find(err), Some($pat) $(if $guard)?),
            "{err:?}"
        );
    }};
}

#[test]
fn typed_error_missing_tensor() {
    let dir = scratch("typed_missing");
    let mut ts = load_st(weights("tiny_b", "safetensors"));
    ts.remove("model.levels.0.blocks.0.layer_scale1").unwrap();
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&ts, &path).unwrap();
    let err = load(&config("tiny_b"), &path).unwrap_err();
    assert_typed!(
        err,
        internimage::Error::MissingTensor { name, .. } if name == "levels.0.blocks.0.gamma1"
    );
}

#[test]
fn typed_error_shape_mismatch() {
    let cfg = config("tiny_b").with_num_classes(10);
    let err = load(&cfg, &weights("tiny_b", "pth")).unwrap_err();
    assert_typed!(
        err,
        internimage::Error::ShapeMismatch { name, expected, found, .. }
            if name == "head.weight" && expected == &[10, 144] && found == &[100, 144]
    );
}

#[test]
fn typed_error_truncated_checkpoint() {
    let dir = scratch("typed_truncated");
    let cfg = config("tiny_b");
    for ext in ["pth", "safetensors"] {
        let bytes = std::fs::read(weights("tiny_b", ext)).unwrap();
        for (tag, len) in [("half", bytes.len() / 2), ("head", 64)] {
            let path = dir.join(format!("{tag}.{ext}"));
            std::fs::write(&path, &bytes[..len]).unwrap();
            let err = load(&cfg, &path).unwrap_err();
            assert_typed!(
                err,
                internimage::Error::TruncatedCheckpoint { path: p, .. } if p == &path
            );
        }
    }
}

#[test]
fn typed_error_unsupported_checkpoint() {
    let dir = scratch("typed_unsupported");
    let cfg = config("tiny_b");
    for (name, bytes) in [
        (
            "legacy.pth",
            vec![0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20],
        ),
        ("text.bin", b"hello world, not weights".to_vec()),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = load(&cfg, &path).unwrap_err();
        assert_typed!(err, internimage::Error::UnsupportedCheckpoint { .. });
    }
}

#[test]
fn typed_error_invalid_checkpoint() {
    let dir = scratch("typed_invalid");
    // A shard index naming a file outside its directory, and one that is not JSON.
    let hostile = dir.join("model.safetensors.index.json");
    std::fs::write(
        &hostile,
        r#"{"weight_map": {"head.weight": "../../etc/passwd"}}"#,
    )
    .unwrap();
    let err = load(&config("tiny_b"), &hostile).unwrap_err();
    assert_typed!(err, internimage::Error::InvalidCheckpoint { path, .. } if path == &hostile);
    let broken = dir.join("broken.index.json");
    std::fs::write(&broken, "{ not json").unwrap();
    let err = load(&config("tiny_b"), &broken).unwrap_err();
    assert_typed!(err, internimage::Error::InvalidCheckpoint { .. });
}

#[test]
fn typed_error_io_missing_checkpoint() {
    let path = scratch("typed_io").join("does-not-exist.safetensors");
    let err = load(&config("tiny_b"), &path).unwrap_err();
    assert_typed!(
        err,
        internimage::Error::Io { path: p, source, .. }
            if p == &path && source.kind() == std::io::ErrorKind::NotFound
    );
    // `?` into candle's error kept it an `Io` error of the same kind, with the message alone.
    assert!(matches!(&err, candle_core::Error::Io(e) if e.kind() == std::io::ErrorKind::NotFound));
    assert!(!err.to_string().contains('\n'), "{err}");
}

#[test]
fn typed_error_bad_config() {
    let dir = scratch("typed_config");
    let err = Config::from_json_str("{ not json").unwrap_err();
    assert_typed!(err, internimage::Error::BadConfig { .. });
    let zero = serde_json::to_string(&Config {
        channels: 0,
        ..Config::t()
    })
    .unwrap();
    let path = dir.join("config.json");
    std::fs::write(&path, zero).unwrap();
    let err = Config::from_file(&path).unwrap_err();
    assert_typed!(
        err,
        internimage::Error::BadConfig { message } if message.contains("channels must be > 0")
            && message.contains("config.json")
    );
    let err = Config::preset("q").unwrap_err();
    assert_typed!(err, internimage::Error::BadConfig { .. });
}

#[test]
fn typed_error_unknown_model() {
    let err = internimage::zoo::get("internimage_z").unwrap_err();
    assert_typed!(err, internimage::Error::UnknownModel { name, .. } if name == "internimage_z");
    // Context added by the caller does not hide it.
    let err = err.context("loading the classifier");
    assert_typed!(err, internimage::Error::UnknownModel { .. });
    let shown = internimage::error::user_message(&err);
    assert!(
        shown.starts_with("loading the classifier: unknown InternImage model"),
        "{shown}"
    );
}

/// Sizes far beyond every released model (corrupt or hostile config.json files) are config
/// errors that name the field, before anything is allocated; depths that would overflow their
/// sum too.
#[test]
fn absurd_config_sizes_are_rejected() {
    let huge = [
        (
            "channels",
            Config {
                channels: 3 << 40,
                ..Config::t()
            },
        ),
        (
            "depths",
            Config {
                depths: vec![1 << 63, 1 << 63, 1, 1],
                ..Config::t()
            },
        ),
        (
            "num_classes",
            Config {
                num_classes: usize::MAX,
                ..Config::t()
            },
        ),
        (
            "dw_kernel_size",
            Config {
                dw_kernel_size: Some(usize::MAX),
                ..Config::t()
            },
        ),
        (
            "mlp_ratio",
            Config {
                mlp_ratio: 1e308,
                ..Config::t()
            },
        ),
        (
            "cls_scale",
            Config {
                cls_scale: 1e308,
                ..Config::t()
            },
        ),
    ];
    for (name, cfg) in huge {
        let err = cfg.validate().unwrap_err();
        assert_typed!(
            err,
            internimage::Error::BadConfig { message } if message.contains(name)
                && message.contains("beyond")
        );
        // The same through config.json and the builder (no weights needed to fail).
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(Config::from_json_str(&json).is_err(), "{name}");
        let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
        assert!(InternImage::new(&cfg, vb).is_err(), "{name}");
    }
    // The largest released sizes stay valid.
    Config::g().validate().unwrap();
    Config::h().validate().unwrap();
    Config::flash_l().validate().unwrap();
}
