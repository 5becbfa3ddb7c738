//! Checkpoints as real training runs write them: optimizer/scheduler state, pickled objects of
//! classes we do not know (yacs `CfgNode`, `argparse.Namespace`, numpy scalars), `model_ema`;
//! and the NaN/Inf check at load. The files are built by `common::pth` (our own pickle writer).

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor};
use common::pth::{dict, pth_bytes, s, state_dict, Py};
use internimage::checkpoint::{self, OpenOptions, PthWeights};
use internimage::InternImage;

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("checkpoint_training");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// tiny_b's weights under their official `.pth` names, sorted.
fn tiny_b_tensors() -> Vec<(String, Tensor)> {
    let st = common::load_safetensors(common::net_weights("tiny_b", "safetensors"));
    let mut v: Vec<(String, Tensor)> = st
        .into_iter()
        .map(|(k, t)| (checkpoint::canonical_name(&k), t))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The same weights with 1.0 added to the classifier bias (to tell EMA from model weights).
fn shifted_head(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(k, t)| {
            if k == "head.bias" {
                (k.clone(), (t + 1.0).unwrap())
            } else {
                (k.clone(), t.clone())
            }
        })
        .collect()
}

/// What the official training code saves (`save_checkpoint` in InternImage's `utils.py`).
fn training_checkpoint(model: &[(String, Tensor)], ema: &[(String, Tensor)]) -> Py {
    let first = model[0].1.clone();
    let cfg_node = |items: Vec<(&str, Py)>| Py::Object {
        module: "yacs.config",
        name: "CfgNode",
        items: items.into_iter().map(|(k, v)| (s(k), v)).collect(),
        state: Some(Box::new(dict(vec![
            ("__immutable__", Py::Bool(true)),
            ("__deprecated_keys__", Py::Reduce("builtins", "set", vec![])),
            ("__renamed_keys__", dict(vec![])),
            ("__new_allowed__", Py::Bool(false)),
        ]))),
    };
    let config = cfg_node(vec![
        (
            "MODEL",
            cfg_node(vec![
                ("TYPE", s("intern_image")),
                ("NUM_CLASSES", Py::Int(100)),
                ("DROP_PATH_RATE", Py::Float(0.1)),
            ]),
        ),
        (
            "TRAIN",
            cfg_node(vec![("EPOCHS", Py::Int(300)), ("BASE_LR", Py::Float(5e-4))]),
        ),
        ("TAG", s("default")),
    ]);
    dict(vec![
        ("model", state_dict(model)),
        (
            "optimizer",
            dict(vec![
                (
                    "state",
                    Py::Dict(vec![(
                        Py::Int(0),
                        dict(vec![
                            (
                                "step",
                                Py::Tensor(Tensor::new(12i64, &Device::Cpu).unwrap()),
                            ),
                            ("exp_avg", Py::Tensor(first.zeros_like().unwrap())),
                            ("exp_avg_sq", Py::Tensor(first.ones_like().unwrap())),
                        ]),
                    )]),
                ),
                (
                    "param_groups",
                    Py::List(vec![dict(vec![
                        ("lr", Py::Float(1e-3)),
                        ("betas", Py::Tuple(vec![Py::Float(0.9), Py::Float(0.999)])),
                        ("weight_decay", Py::Float(0.05)),
                        ("params", Py::List(vec![Py::Int(0), Py::Int(1)])),
                    ])]),
                ),
            ]),
        ),
        (
            "lr_scheduler",
            Py::Object {
                module: "timm.scheduler.cosine_lr",
                name: "CosineLRScheduler",
                items: vec![],
                state: Some(Box::new(dict(vec![
                    ("t_initial", Py::Int(300)),
                    ("base_values", Py::List(vec![Py::Float(5e-4)])),
                ]))),
            },
        ),
        ("max_accuracy", Py::NumpyF64(81.25)),
        ("epoch", Py::Int(299)),
        ("config", config),
        (
            "args",
            Py::Object {
                module: "argparse",
                name: "Namespace",
                items: vec![],
                state: Some(Box::new(dict(vec![
                    ("cfg", s("configs/internimage_t_1k_224.yaml")),
                    ("local_rank", Py::Int(0)),
                    ("seed", Py::Int(1 << 40)),
                ]))),
            },
        ),
        ("model_ema", state_dict(ema)),
        ("amp", Py::None),
    ])
}

fn logits(model: &InternImage) -> Tensor {
    let inputs = common::fixture_tensors("inputs.safetensors");
    model.forward(&inputs["rand"]).unwrap()
}

#[test]
fn training_checkpoint_loads_model_and_on_request_model_ema() {
    let cfg = common::net_config("tiny_b");
    let dev = Device::Cpu;
    let reference =
        InternImage::from_checkpoint(&cfg, common::net_weights("tiny_b", "pth"), DType::F32, &dev)
            .unwrap();
    let want = logits(&reference);

    let tensors = tiny_b_tensors();
    let path = tmp("ckpt_epoch_299.pth");
    std::fs::write(
        &path,
        pth_bytes(&training_checkpoint(&tensors, &shifted_head(&tensors))),
    )
    .unwrap();

    // Default: `model`, identical to the released-style file.
    let model = InternImage::from_checkpoint(&cfg, &path, DType::F32, &dev).unwrap();
    assert_eq!(common::max_abs_diff(&logits(&model), &want), 0.0);

    // On request: `model_ema` (head bias + 1 => every logit + 1).
    let opts = OpenOptions {
        pth_weights: PthWeights::Ema,
        ..OpenOptions::default()
    };
    let vb = checkpoint::var_builder_with(&[&path], &opts, DType::F32, &dev).unwrap();
    let ema = InternImage::new(&cfg, vb).unwrap();
    let d = common::to_f32_vec(&(logits(&ema) - &want).unwrap());
    assert!(d.iter().all(|v| (v - 1.0).abs() < 1e-5), "{:?}", &d[..4]);

    // An explicit key; a missing one is an error listing the keys.
    let opts = OpenOptions {
        pth_weights: PthWeights::Key("model".into()),
        ..OpenOptions::default()
    };
    assert!(checkpoint::CheckpointBackend::open_with(&[&path], &opts).is_ok());
    let opts = OpenOptions {
        pth_weights: PthWeights::Key("weights".into()),
        ..OpenOptions::default()
    };
    let err = checkpoint::CheckpointBackend::open_with(&[&path], &opts)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"weights\"")
            && err.contains("\"model_ema\"")
            && err.contains("\"optimizer\""),
        "{err}"
    );
    // Optimizer tensors are not mistaken for weights.
    let b = checkpoint::CheckpointBackend::open(&[&path]).unwrap();
    assert_eq!(b.names().len(), tensors.len());
}

#[test]
fn mmdet_style_and_bare_state_dicts_load() {
    let cfg = common::net_config("tiny_b");
    let dev = Device::Cpu;
    let tensors = tiny_b_tensors();
    let want = logits(
        &InternImage::from_checkpoint(&cfg, common::net_weights("tiny_b", "pth"), DType::F32, &dev)
            .unwrap(),
    );
    let prefixed: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| (format!("backbone.{k}"), t.clone()))
        .collect();
    let mmdet = dict(vec![
        (
            "meta",
            dict(vec![
                ("mmdet_version", s("2.28.1")),
                ("CLASSES", Py::Tuple(vec![s("person"), s("car")])),
                ("epoch", Py::Int(12)),
            ]),
        ),
        ("state_dict", state_dict(&prefixed)),
    ]);
    for (name, root) in [("mmdet.pth", mmdet), ("bare.pth", state_dict(&tensors))] {
        let path = tmp(name);
        std::fs::write(&path, pth_bytes(&root)).unwrap();
        let model = InternImage::from_checkpoint(&cfg, &path, DType::F32, &dev).unwrap();
        assert_eq!(common::max_abs_diff(&logits(&model), &want), 0.0, "{name}");
    }
    // No EMA in a file without one: a clear error.
    let path = tmp("bare.pth");
    let opts = OpenOptions {
        pth_weights: PthWeights::Ema,
        ..OpenOptions::default()
    };
    let err = checkpoint::CheckpointBackend::open_with(&[&path], &opts).unwrap_err();
    assert!(err.to_string().contains("model_ema"), "{err}");
}

#[test]
fn non_finite_weights_are_an_error_naming_the_tensor() {
    let cfg = common::net_config("tiny_b");
    let dev = Device::Cpu;
    let target = "levels.1.blocks.0.dcn.offset.weight";
    for (what, bad) in [("NaN", f32::NAN), ("Inf", f32::NEG_INFINITY)] {
        let tensors: Vec<(String, Tensor)> = tiny_b_tensors()
            .into_iter()
            .map(|(k, t)| {
                if k == target {
                    let mut v = common::to_f32_vec(&t);
                    v[5] = bad;
                    (k, Tensor::from_vec(v, t.dims(), &dev).unwrap())
                } else {
                    (k, t)
                }
            })
            .collect();
        // .pth
        let path = tmp(&format!("bad_{what}.pth"));
        std::fs::write(
            &path,
            pth_bytes(&dict(vec![("model", state_dict(&tensors))])),
        )
        .unwrap();
        let err = InternImage::from_checkpoint(&cfg, &path, DType::F32, &dev)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(target) && err.contains(what) && err.contains("index 5"),
            "{err}"
        );
        // .safetensors (checked on the mapped bytes, before loading)
        let st_path = tmp(&format!("bad_{what}.safetensors"));
        let map: std::collections::HashMap<String, Tensor> = tensors.iter().cloned().collect();
        candle_core::safetensors::save(&map, &st_path).unwrap();
        let err = InternImage::from_checkpoint(&cfg, &st_path, DType::F32, &dev)
            .unwrap_err()
            .to_string();
        assert!(err.contains(target) && err.contains(what), "{err}");
        // The check can be turned off.
        let opts = OpenOptions {
            check_finite: false,
            ..OpenOptions::default()
        };
        let vb = checkpoint::var_builder_with(&[&path], &opts, DType::F32, &dev).unwrap();
        assert!(InternImage::new(&cfg, vb).is_ok());
    }
}

/// A `.pth` without the asked-for entry: `internimage::Error::MissingTensor` naming the key.
#[test]
fn typed_error_missing_pth_entry() {
    let path = tmp("typed_bare.pth");
    std::fs::write(&path, pth_bytes(&state_dict(&tiny_b_tensors()))).unwrap();
    for (which, key) in [
        (PthWeights::Ema, "model_ema"),
        (PthWeights::Key("weights".into()), "weights"),
    ] {
        let opts = OpenOptions {
            pth_weights: which,
            ..OpenOptions::default()
        };
        let err = checkpoint::CheckpointBackend::open_with(&[&path], &opts).unwrap_err();
        assert!(
            matches!(
                internimage::Error::find(&err),
                Some(internimage::Error::MissingTensor { name, .. }) if name == key
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains(key), "{err}");
    }
}

/// NaN/Inf weights: `internimage::Error::NonFinite` naming the tensor, in both formats.
#[test]
fn typed_error_non_finite() {
    let cfg = common::net_config("tiny_b");
    let dev = Device::Cpu;
    let target = "levels.0.blocks.0.mlp.fc1.bias";
    let tensors: Vec<(String, Tensor)> = tiny_b_tensors()
        .into_iter()
        .map(|(k, t)| {
            if k == target {
                let mut v = common::to_f32_vec(&t);
                v[0] = f32::NAN;
                (k, Tensor::from_vec(v, t.dims(), &dev).unwrap())
            } else {
                (k, t)
            }
        })
        .collect();
    let pth = tmp("typed_nan.pth");
    std::fs::write(
        &pth,
        pth_bytes(&dict(vec![("model", state_dict(&tensors))])),
    )
    .unwrap();
    let st = tmp("typed_nan.safetensors");
    let map: std::collections::HashMap<String, Tensor> = tensors.iter().cloned().collect();
    candle_core::safetensors::save(&map, &st).unwrap();
    for path in [pth, st] {
        let err = InternImage::from_checkpoint(&cfg, &path, DType::F32, &dev).unwrap_err();
        assert!(
            matches!(
                internimage::Error::find(&err),
                Some(internimage::Error::NonFinite { name, .. }) if name == target
            ),
            "{}: {err:?}",
            path.display()
        );
    }
}
