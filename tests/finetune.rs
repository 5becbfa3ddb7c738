//! Transfer learning end to end: a training step changes what the model computes, the saved
//! checkpoint (official key layout + config.json) reloads to the same logits, and the `finetune`
//! example learns a small synthetic image folder (loss down, validation accuracy above chance)
//! and writes a run that `classify --labels` reads.
#![cfg(feature = "image")]

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use common::*;
use internimage::{Config, InternImage, TrainOptions, Trainable};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn step_save_reload_reset_classifier() {
    let dev = Device::Cpu;
    let cfg = net_config("tiny_b");
    let options = TrainOptions {
        trainable: Trainable::LastLevels(2),
        num_classes: Some(5),
        drop_path_rate: Some(0.1),
    };
    let mut tm = InternImage::trainable(
        &cfg,
        &[net_weights("tiny_b", "safetensors")],
        &options,
        DType::F32,
        &dev,
    )
    .unwrap();
    assert_eq!(tm.model().config().num_classes, 5);
    let x = Tensor::randn(0f32, 1.0, (4, 3, 64, 64), &dev).unwrap();
    let before = tm.model().forward(&x).unwrap();
    assert_eq!(before.dims(), &[4, 5]);
    let mut opt = AdamW::new(
        tm.vars(),
        ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    let targets = Tensor::new(&[0u32, 1, 2, 3], &dev).unwrap();
    let loss =
        candle_nn::loss::cross_entropy(&tm.model().forward_t(&x, true).unwrap(), &targets).unwrap();
    opt.backward_step(&loss).unwrap();
    let after = tm.model().forward(&x).unwrap();
    assert!(
        max_abs_diff(&before, &after) > 1e-4,
        "an optimiser step must change the logits"
    );

    let dir = tmp("finetune_roundtrip");
    let (weights, config) = tm.save(&dir).unwrap();
    let cfg2 = Config::from_file(&config).unwrap();
    assert_eq!(&cfg2, tm.model().config());
    let reloaded = InternImage::from_checkpoint(&cfg2, &weights, DType::F32, &dev).unwrap();
    let d = max_abs_diff(&after, &reloaded.forward(&x).unwrap());
    assert!(d < 1e-5, "reloaded checkpoint differs by {d}");
    // Saved in the official layout: plain module names, `gamma1` not `layer_scale1`.
    let saved = load_safetensors(&weights);
    assert!(saved.contains_key("levels.0.blocks.0.gamma1"));
    assert!(saved.contains_key("conv_head.1.0.running_var"));
    assert_eq!(saved["head.weight"].dims(), &[5, cfg.pooled_dim()]);

    let backbone_before = tm.model().forward_features(&x).unwrap();
    tm.reset_classifier(3).unwrap();
    assert_eq!(tm.model().forward(&x).unwrap().dims(), &[4, 3]);
    let backbone = tm.model().forward_features(&x).unwrap();
    assert_eq!(
        max_abs_diff(&backbone[3], &backbone_before[3]),
        0.0,
        "reset_classifier keeps the backbone"
    );
}

/// Three classes that differ visibly: mostly red, green or blue noise images.
fn synthetic_folder(root: &Path, per_class: usize) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (c, name) in ["blue", "green", "red"].iter().enumerate() {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let channel = 2 - c; // blue -> 2, green -> 1, red -> 0
        for i in 0..per_class {
            let img = image::RgbImage::from_fn(40, 40, |_, _| {
                let mut px = [0u8; 3];
                for (k, v) in px.iter_mut().enumerate() {
                    *v = if k == channel {
                        rng.random_range(150..=255)
                    } else {
                        rng.random_range(0..=90)
                    };
                }
                image::Rgb(px)
            });
            img.save(dir.join(format!("{i}.png"))).unwrap();
        }
    }
}

/// The stdout of a successful `finetune` run and the training loss of each epoch it printed.
fn epoch_losses(run: &std::process::Output) -> (String, Vec<f64>) {
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "finetune failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let losses = stdout
        .lines()
        .filter_map(|l| l.split("train loss ").nth(1))
        .map(|r| r.split(',').next().unwrap().parse().unwrap())
        .collect();
    (stdout, losses)
}

#[test]
fn finetune_example_learns_a_folder() {
    let root = tmp("finetune_example");
    let data = root.join("data");
    synthetic_folder(&data, 10);
    let config = root.join("tiny_b_config.json");
    std::fs::write(&config, net_meta("tiny_b")["hf_config"].to_string()).unwrap();
    let out = root.join("run");
    let bin = build_example("finetune");
    // The settings both runs share.
    let common = [
        ["--batch-size", "6"],
        ["--lr", "2e-3"],
        ["--size", "32"],
        ["--warmup-epochs", "0.5"],
        ["--val-fraction", "0.3"],
        ["--drop-path", "0.0"],
    ]
    .concat();
    let run = Command::new(&bin)
        .args(["--data", data.to_str().unwrap()])
        .args(["--weights", net_weights("tiny_b", "pth").to_str().unwrap()])
        .args(["--config", config.to_str().unwrap()])
        .args(["--output", out.to_str().unwrap()])
        .args(["--epochs", "4"])
        .args(&common)
        .output()
        .unwrap();
    let (stdout, losses) = epoch_losses(&run);
    assert_eq!(losses.len(), 4, "one line per epoch:\n{stdout}");
    assert!(losses[3] < losses[0], "training loss must fall: {losses:?}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("state.json")).unwrap()).unwrap();
    let acc = state["val_accuracy"].as_f64().unwrap();
    assert!(
        acc > 0.5,
        "validation accuracy {acc} must be above chance (1/3)"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("labels.txt")).unwrap(),
        "blue\ngreen\nred\n"
    );

    // classify reads the run back and names the classes from labels.txt.
    let classify = build_example("classify");
    let res = Command::new(&classify)
        .args(["--weights", out.join("model.safetensors").to_str().unwrap()])
        .args(["--config", out.join("config.json").to_str().unwrap()])
        .args(["--labels", out.join("labels.txt").to_str().unwrap()])
        .args(["--size", "32", "--top-k", "1"])
        .arg(data.join("red/0.png"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "classify failed:\n{text}\n{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(
        text.contains("red"),
        "classify should name the fine-tuned class:\n{text}"
    );

    // --resume continues the run in its own folder: one more epoch (5 of 5), from the saved
    // weights (its loss starts near the last one, far below the first), saved back there.
    let run = Command::new(&bin)
        .args(["--data", data.to_str().unwrap()])
        .args(["--resume", out.to_str().unwrap()])
        .args(["--epochs", "5"])
        .args(&common)
        .output()
        .unwrap();
    let (stdout, resumed) = epoch_losses(&run);
    assert_eq!(resumed.len(), 1, "only epoch 5 runs:\n{stdout}");
    assert!(
        stdout.contains("epoch 5:") && resumed[0] < losses[0],
        "the resumed epoch starts from the trained weights: {resumed:?} vs {losses:?}\n{stdout}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("state.json")).unwrap()).unwrap();
    assert_eq!(
        state["epochs_done"].as_u64(),
        Some(5),
        "saved into the resumed folder"
    );
}
