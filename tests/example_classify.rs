//! Runs `examples/classify.rs` (built with cargo) on the sample photo with the tiny fixture
//! checkpoint and checks its JSON output against the official logits.
//!
//! The tiny_b head has 100 classes, which is no ImageNet label set: the example then reports class
//! indices (`"name": "class 17"`, empty `wnid`) instead of borrowing unrelated 1k names.
//!
//! Tolerance for the logits: the golden `logits.photo` were computed from the official (PIL)
//! preprocessing of the photo; ours differs from it by at most 1 uint8 level (0.19 level on
//! average), which moves these logits by up to 1.8e-3 (measured). The logits are therefore compared
//! with atol 1e-2 instead of the 1e-4 that applies to the identical input tensor (that parity is
//! tested in the model tests); the top-5 order is checked exactly (it is stable: the smallest gap
//! between consecutive top-5 logits is 5.1e-3).
#![cfg(feature = "image")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{build_example, FIXTURES};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Builds an example (same profile and features as this test) and returns its path.
fn example_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_example("classify"))
}

fn tmp_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("example_classify");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// config.json (Hugging Face schema) of the tiny_b fixture network.
fn tiny_b_config() -> PathBuf {
    let path = tmp_dir().join("tiny_b_config.json");
    let meta = common::net_meta("tiny_b");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&meta["hf_config"]).unwrap(),
    )
    .unwrap();
    path
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(example_binary())
        .current_dir(ROOT)
        .env_remove("RUST_BACKTRACE")
        .args(args)
        .output()
        .unwrap();
    eprintln!(
        "$ classify {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_tiny(weights: &str, extra: &[&str]) -> (Output, Value) {
    let cfg = tiny_b_config();
    let weights = format!("{FIXTURES}/weights/{weights}");
    let mut args = vec![
        "--weights",
        &weights,
        "--config",
        cfg.to_str().unwrap(),
        "--json",
        "--logits",
    ];
    args.extend_from_slice(extra);
    let out = run(&args);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out, json)
}

fn golden_logits() -> Vec<f32> {
    let t = common::fixture_tensors("expected/tiny_b.safetensors");
    common::to_f32_vec(&t["logits.photo"])
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn check_photo_result(r: &Value) {
    let golden = golden_logits();
    let mut order: Vec<usize> = (0..golden.len()).collect();
    order.sort_by(|&a, &b| golden[b].total_cmp(&golden[a]));
    let preds = r["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 5);
    let idx: Vec<usize> = preds
        .iter()
        .map(|p| p["index"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(
        idx[0], order[0],
        "top-1 differs from the official logits' argmax"
    );
    assert_eq!(idx, order[..5].to_vec());
    assert_eq!(idx, vec![17, 94, 29, 27, 34]);
    assert_eq!(preds[0]["name"], "class 17");
    assert_eq!(preds[0]["wnid"], "");
    let p0 = preds[0]["probability"].as_f64().unwrap();
    assert!((p0 - 0.01253005).abs() < 2e-5, "top-1 probability {p0}");
    let logits = f32s(&r["logits"]);
    assert_eq!(logits.len(), 100);
    let max_diff = logits
        .iter()
        .zip(&golden)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("classify logits vs official: max |diff| = {max_diff:.2e}");
    assert!(max_diff <= 1e-2, "logits differ by {max_diff}");
}

#[test]
fn sample_photo_with_fixture_checkpoint() {
    // No image argument: the sample photo shipped in assets/.
    let (out, json) = run_tiny("tiny_b.safetensors", &[]);
    assert!(out.status.success());
    assert_eq!(json["num_classes"], 100);
    assert_eq!(json["label_set"], Value::Null);
    assert_eq!(json["input_size"], 224);
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    assert!(results[0]["file"]
        .as_str()
        .unwrap()
        .ends_with("assets/chelsea.png"));
    check_photo_result(&results[0]);

    // The .pth checkpoint holds the same weights.
    let (out, json_pth) = run_tiny("tiny_b.pth", &["assets/chelsea.png"]);
    assert!(out.status.success());
    check_photo_result(&json_pth["results"][0]);
}

#[test]
fn text_output() {
    let cfg = tiny_b_config();
    let weights = format!("{FIXTURES}/weights/tiny_b.safetensors");
    let out = run(&[
        "--weights",
        &weights,
        "--config",
        cfg.to_str().unwrap(),
        "--top-k",
        "3",
        "assets/chelsea.png",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_eq!(lines[0], "assets/chelsea.png");
    assert!(lines[1].trim_start().starts_with("1."), "{text}");
    assert!(
        lines[1].contains("1.25%") && lines[1].ends_with("class 17"),
        "{text}"
    );
    assert!(lines[3].ends_with("class 29"), "{text}");
}

#[test]
fn bad_files_directories_and_batches() {
    let dir = tmp_dir().join("images");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        format!("{ROOT}/assets/chelsea.png"),
        dir.join("a_chelsea.png"),
    )
    .unwrap();
    // A second picture: the photo flipped, so it gets different logits.
    let img = image::open(format!("{ROOT}/assets/chelsea.png")).unwrap();
    img.fliph().save(dir.join("b_flipped.jpg")).unwrap();
    std::fs::write(dir.join("c_broken.png"), b"\x89PNG\r\n\x1a\n not really").unwrap();
    std::fs::write(dir.join("notes.txt"), b"not an image").unwrap(); // ignored: not an image name
    let missing = tmp_dir().join("missing.png");
    let empty_dir = tmp_dir().join("empty_dir");
    std::fs::create_dir_all(&empty_dir).unwrap();

    let args = |bs: &'static str| {
        vec![
            dir.display().to_string(),
            missing.display().to_string(),
            empty_dir.display().to_string(),
            format!("{ROOT}/assets/chelsea.png"),
            "--batch-size".to_string(),
            bs.to_string(),
        ]
    };
    let a1 = args("1");
    let a8 = args("8");
    let (out1, json1) = run_tiny(
        "tiny_b.safetensors",
        &a1.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let (out8, json8) = run_tiny(
        "tiny_b.safetensors",
        &a8.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for (out, json) in [(&out1, &json1), (&out8, &json8)] {
        assert_eq!(
            out.status.code(),
            Some(1),
            "a failed file must fail the run"
        );
        let results = json["results"].as_array().unwrap();
        let files: Vec<&str> = results
            .iter()
            .map(|r| r["file"].as_str().unwrap())
            .collect();
        assert_eq!(files.len(), 6, "{files:?}");
        assert!(files[0].ends_with("a_chelsea.png"));
        assert!(files[1].ends_with("b_flipped.jpg"));
        assert!(files[2].ends_with("c_broken.png"));
        assert!(files[3].ends_with("missing.png"));
        assert!(files[4].ends_with("empty_dir"));
        assert!(files[5].ends_with("assets/chelsea.png"));
        check_photo_result(&results[0]);
        check_photo_result(&results[5]);
        assert!(results[1]["predictions"].is_array());
        for (i, name) in [(2, "c_broken.png"), (3, "missing.png")] {
            let err = results[i]["error"].as_str().unwrap();
            assert!(err.contains(name), "{err}");
            assert!(
                !err.contains("candle_core::error"),
                "backtrace in message: {err}"
            );
        }
        assert!(results[4]["error"]
            .as_str()
            .unwrap()
            .contains("no image files"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("error: ") && stderr.contains("c_broken.png"));
    }
    // Batching does not change the answers: batch size 1 and 8 give the same logits.
    for i in [0, 1, 5] {
        let a = f32s(&json1["results"][i]["logits"]);
        let b = f32s(&json8["results"][i]["logits"]);
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-5, "result {i}: batch 1 vs 8 differ by {d}");
    }
    // The flipped photo is a different input.
    let a = f32s(&json8["results"][0]["logits"]);
    let b = f32s(&json8["results"][1]["logits"]);
    assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-4));
}

#[test]
fn help_and_bad_arguments() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("--weights") && help.contains("--top-k") && help.contains("--dtype"));

    let out = run(&["--top-k", "zero"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--top-k"));
    let out = run(&["--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["--device", "tpu"]);
    assert_eq!(out.status.code(), Some(2));

    // A model name the zoo does not know, with --weights but no --config: the error lists names.
    let weights = format!("{FIXTURES}/weights/tiny_b.safetensors");
    let out = run(&["--model", "internimage_q", "--weights", &weights]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("internimage_t_1k_224"), "{err}");
}

/// The features example: level shapes/strides in the saved safetensors, and a PNG is written.
#[test]
fn features_example_writes_maps_and_png() {
    let bin = build_example("features");
    let out_dir = tmp_dir().join("features_out");
    let _ = std::fs::remove_dir_all(&out_dir);
    let cfg = tiny_b_config();
    let weights = format!("{FIXTURES}/weights/tiny_b.safetensors");
    let out = Command::new(&bin)
        .current_dir(ROOT)
        .env_remove("RUST_BACKTRACE")
        .args([
            "--weights",
            &weights,
            "--config",
            cfg.to_str().unwrap(),
            "--size",
            "200",
            "--out",
            out_dir.to_str().unwrap(),
            "--pixel",
            "100,80",
            "--level",
            "1",
            "--block",
            "0",
            "assets/chelsea.png",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    // 451x300 -> shorter side 200: 301x200 (mmcv rounding), padded to 320x224.
    assert!(stdout.contains("input 301x200"), "{stdout}");
    assert!(stdout.contains("padded to 320x224"), "{stdout}");
    let maps = common::load_safetensors(out_dir.join("features.safetensors"));
    let want = [
        [1, 12, 56, 80],
        [1, 24, 28, 40],
        [1, 48, 14, 20],
        [1, 96, 7, 10],
    ];
    for (l, shape) in want.iter().enumerate() {
        let t = &maps[&format!("level{l}")];
        assert_eq!(t.dims(), shape, "level {l}");
        assert_eq!(t.dtype(), candle_core::DType::F32);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
        assert!(v.iter().any(|&x| x != 0.0));
    }
    let png = image::open(out_dir.join("features.png")).unwrap();
    assert!(png.width() > 900 && png.height() > 600);

    // A block that does not exist is an error, not a panic.
    let out = Command::new(&bin)
        .current_dir(ROOT)
        .env_remove("RUST_BACKTRACE")
        .args([
            "--weights",
            &weights,
            "--config",
            cfg.to_str().unwrap(),
            "--size",
            "64",
            "--out",
            out_dir.to_str().unwrap(),
            "--level",
            "0",
            "--block",
            "5",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("block"));
}

#[test]
fn non_finite_logits_are_an_error_for_that_image() {
    // Finite weights whose head overflows f32: every logit becomes Inf/NaN.
    let mut st = common::load_safetensors(format!("{FIXTURES}/weights/tiny_b.safetensors"));
    let w = st["model.head.weight"].clone();
    st.insert(
        "model.head.weight".into(),
        candle_core::Tensor::full(3.0e38f32, w.dims(), w.device()).unwrap(),
    );
    let path = tmp_dir().join("tiny_b_overflowing_head.safetensors");
    candle_core::safetensors::save(&st, &path).unwrap();
    let cfg = tiny_b_config();
    let out = run(&[
        "--weights",
        path.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a non-finite result must fail the run"
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = json["results"][0]["error"].as_str().unwrap();
    assert!(err.contains("non-finite logits"), "{err}");
    assert!(json["results"][0]["predictions"].is_null());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("NaN%"));
}

/// With `RUST_BACKTRACE=1` a failure is still the one-line message, without a backtrace.
#[test]
fn errors_are_one_line_even_with_rust_backtrace() {
    let cfg = tiny_b_config();
    let missing = tmp_dir().join("no-such-weights.safetensors");
    for env in ["1", "full"] {
        let out = Command::new(example_binary())
            .current_dir(ROOT)
            .env("RUST_BACKTRACE", env)
            .args(["--weights", missing.to_str().unwrap()])
            .args(["--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error: cannot open checkpoint") && err.contains("no-such-weights"),
            "{err}"
        );
    }
}
