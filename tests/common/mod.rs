//! Helpers shared by the integration tests (each test binary includes this module with
//! `mod common;`): where the golden fixtures live and how to read them, tensor-to-`Vec`
//! conversions, the elementwise tolerance check `|ours - ref| <= atol + rtol*|ref|`, the manifest
//! tolerance lookup, the DCNv3 fixture cases (`dcnv3_ops.json`), the tiny_b / tiny_h and flash fixture configs and
//! the finite-difference check of a `Var`.
//!
//! Every test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

pub mod pth;

use candle_core::{DType, Device, Tensor, Var};
use internimage::{Config, Dcnv3Config};
use rand::rngs::StdRng;
use rand::Rng;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The official golden fixtures (`../shared/fixtures` next to the crate root).
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures");

/// [`FIXTURES`] as a path.
pub fn fixtures() -> PathBuf {
    PathBuf::from(FIXTURES)
}

/// Reads and parses a JSON file.
pub fn read_json(path: impl AsRef<Path>) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Loads every tensor of a safetensors file onto the CPU.
pub fn load_safetensors(path: impl AsRef<Path>) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// Loads a safetensors file given relative to [`FIXTURES`] (e.g. `"inputs.safetensors"`).
pub fn fixture_tensors(rel: &str) -> HashMap<String, Tensor> {
    load_safetensors(fixtures().join(rel))
}

/// The fixtures' `manifest.json` (per-tensor tolerances, checkpoint hashes).
pub fn manifest() -> Value {
    read_json(fixtures().join("manifest.json"))
}

/// `(atol, rtol)` of a tolerance object `{"atol": .., "rtol": ..}`.
pub fn atol_rtol(tol: &Value) -> (f64, f64) {
    (tol["atol"].as_f64().unwrap(), tol["rtol"].as_f64().unwrap())
}

/// [`atol_rtol`] rounded to f32 (for checks done in f32 arithmetic).
pub fn atol_rtol_f32(tol: &Value) -> (f32, f32) {
    let (atol, rtol) = atol_rtol(tol);
    (atol as f32, rtol as f32)
}

/// `(atol, rtol)` that the manifest states for tensor `tensor` of network `net`
/// (`models.<net>.tensors.<tensor>`).
pub fn manifest_tol(manifest: &Value, net: &str, tensor: &str) -> (f64, f64) {
    atol_rtol(&manifest["models"][net]["tensors"][tensor])
}

/// `weights/<net>.json` of a fixture network (tiny_b, tiny_h): `hf_config`, `n_params`, ...
pub fn net_meta(net: &str) -> Value {
    read_json(fixtures().join(format!("weights/{net}.json")))
}

/// The [`Config`] of a fixture network's metadata (its `hf_config` entry).
pub fn config_of_meta(meta: &Value) -> Config {
    Config::from_json_str(&meta["hf_config"].to_string()).unwrap()
}

/// The [`Config`] of the fixture network `net` (tiny_b, tiny_h).
pub fn net_config(net: &str) -> Config {
    config_of_meta(&net_meta(net))
}

/// `weights/<net>.<ext>` of a fixture network (`ext`: `pth` or `safetensors`).
pub fn net_weights(net: &str, ext: &str) -> PathBuf {
    fixtures().join(format!("weights/{net}.{ext}"))
}

/// The FlashInternImage fixtures (`flash/`: DCNv4 operator cases, tiny_flash_s / tiny_flash_l).
pub fn flash_dir() -> PathBuf {
    fixtures().join("flash")
}

/// The [`Config`] of a flash fixture network (tiny_flash_s, tiny_flash_l), parsed from the
/// `hf_config` dict of `flash/weights/<net>.json` (as a `config.json` would be).
pub fn flash_config(net: &str) -> Config {
    config_of_meta(&read_json(flash_dir().join(format!("weights/{net}.json"))))
}

/// `flash/weights/<net>.pth` (the official `{'model': state_dict}` layout).
pub fn flash_weights(net: &str) -> PathBuf {
    flash_dir().join(format!("weights/{net}.pth"))
}

/// The environment variable that overrides the seed of the finite-difference tests' random
/// inputs (a decimal `u64`); failures print the seed they ran with.
pub const ENV_FD_SEED: &str = "INTERNIMAGE_FD_SEED";

/// The seed of a finite-difference test's random inputs: [`ENV_FD_SEED`] when it is set, else
/// `default`. Panics on a value that is not a decimal `u64` (a typo must not silently test the
/// default).
pub fn fd_seed(default: u64) -> u64 {
    match std::env::var(ENV_FD_SEED) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{ENV_FD_SEED}={v:?} is not a decimal u64")),
        _ => default,
    }
}

/// A tensor of `shape` with N(0, scale^2) values drawn from `StdRng::seed_from_u64(seed)`, in
/// `dtype` (reproducible, unlike `Tensor::randn`).
pub fn seeded_randn(seed: u64, shape: &[usize], scale: f64, dtype: DType) -> Tensor {
    use rand::SeedableRng;
    let mut rng = StdRng::seed_from_u64(seed);
    let len = shape.iter().product();
    Tensor::from_vec(randn(&mut rng, len, scale), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The one-sided finite differences of a function at a point, step `h`:
/// `forward = (f(h) - f(0)) / h` and `backward = (f(0) - f(-h)) / h`.
///
/// Where the function is smooth both agree with the derivative (their mean is the central
/// difference). Bilinear sampling is only piecewise smooth: at a kink (a sampling point on an
/// integer coordinate, or one that a step of size `h` moves across one) the two slopes disagree
/// and the analytic gradient is the derivative of one side, so [`FiniteDifference::accepts`]
/// then takes either side, never their mean.
#[derive(Debug, Clone, Copy)]
pub struct FiniteDifference {
    /// `(f(h) - f(0)) / h`.
    pub forward: f64,
    /// `(f(0) - f(-h)) / h`.
    pub backward: f64,
}

impl FiniteDifference {
    /// `f(delta)` is the loss with the perturbed element moved by `delta`.
    pub fn of(f: &dyn Fn(f64) -> f64, h: f64) -> Self {
        let (fp, f0, fm) = (f(h), f(0.0), f(-h));
        Self {
            forward: (fp - f0) / h,
            backward: (f0 - fm) / h,
        }
    }

    /// The central difference `(f(h) - f(-h)) / 2h`.
    pub fn central(&self) -> f64 {
        0.5 * (self.forward + self.backward)
    }

    /// Whether `analytic` agrees with this estimate: `|fd - analytic| <= atol + rtol*|analytic|`
    /// for the central difference, or, when the two one-sided slopes disagree with each other by
    /// more than that bound (a kink), for either one-sided slope.
    pub fn accepts(&self, analytic: f64, (atol, rtol): (f64, f64)) -> bool {
        let close = |fd: f64| (fd - analytic).abs() <= atol + rtol * analytic.abs();
        if close(self.central()) {
            return true;
        }
        let (f, b) = (self.forward, self.backward);
        let kink = (f - b).abs() > atol + rtol * f.abs().max(b.abs());
        kink && (close(f) || close(b))
    }

    /// `central c (forward f, backward b)` for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "central {:e} (forward {:e}, backward {:e})",
            self.central(),
            self.forward,
            self.backward
        )
    }
}

/// [`FiniteDifference`] of `loss` with respect to element `idx` of the f64 `var` (perturbed
/// through `Var::set`, restored afterwards).
pub fn var_finite_difference(
    var: &Var,
    idx: usize,
    h: f64,
    loss: &dyn Fn() -> f64,
) -> FiniteDifference {
    let orig = to_f64_vec(var.as_tensor());
    let set = |v: Vec<f64>| {
        var.set(&Tensor::from_vec(v, var.shape(), var.device()).unwrap())
            .unwrap()
    };
    let probe = |delta: f64| {
        let mut v = orig.clone();
        v[idx] += delta;
        set(v);
        loss()
    };
    let fd = FiniteDifference::of(&probe, h);
    set(orig);
    fd
}

/// Compares the autograd gradient `grad` of the f64 `var` with [`var_finite_difference`] (step
/// `h`, [`FiniteDifference::accepts`] with `(atol, rtol)`) at its largest-magnitude element and
/// its middle element. Returns one line per violation.
pub fn finite_difference_failures(
    name: &str,
    var: &Var,
    grad: &Tensor,
    h: f64,
    tol: (f64, f64),
    loss: &dyn Fn() -> f64,
) -> Vec<String> {
    let g = to_f64_vec(grad);
    let big = (0..g.len())
        .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
        .unwrap();
    let mut failures = Vec::new();
    for idx in [big, g.len() / 2] {
        let fd = var_finite_difference(var, idx, h, loss);
        if !fd.accepts(g[idx], tol) {
            failures.push(format!(
                "{name}[{idx}]: autograd {:e}, finite difference {}",
                g[idx],
                fd.describe()
            ));
        }
    }
    failures
}

/// All elements of `t` (any dtype, any device), row-major, converted to `dtype` (which must
/// be the dtype of `T`).
pub fn to_vec_as<T: candle_core::WithDType>(t: &Tensor, dtype: DType) -> Vec<T> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<T>()
        .unwrap()
}

/// All elements of `t` (any dtype, any device), row-major, as f64.
pub fn to_f64_vec(t: &Tensor) -> Vec<f64> {
    to_vec_as(t, DType::F64)
}

/// All elements of `t` (any dtype, any device), row-major, as f32.
pub fn to_f32_vec(t: &Tensor) -> Vec<f32> {
    to_vec_as(t, DType::F32)
}

/// Largest `|a - b|` over all elements of two f32 tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest excess `|ours - ref| - (atol + rtol*|ref|)` over all elements (computed in f64;
/// `<= 0` means every element passes) and the largest `|ours - ref|`. Panics on a shape
/// mismatch or a non-finite difference.
pub fn max_violation(ours: &Tensor, reference: &Tensor, atol: f64, rtol: f64) -> (f64, f64) {
    assert_eq!(ours.dims(), reference.dims(), "shape mismatch");
    let a = to_f64_vec(ours);
    let b = to_f64_vec(reference);
    let mut worst = f64::NEG_INFINITY;
    let mut max_abs = 0f64;
    for (x, y) in a.iter().zip(b.iter()) {
        let d = (x - y).abs();
        assert!(d.is_finite(), "non-finite value");
        max_abs = max_abs.max(d);
        worst = worst.max(d - (atol + rtol * y.abs()));
    }
    (worst, max_abs)
}

/// Elementwise `|got - want| <= atol + rtol*|want|` in f32 arithmetic (NaN fails): the largest
/// `|got - want|`, or a message naming the first failing element (or a length mismatch).
pub fn check_f32(
    what: &str,
    got: &[f32],
    want: &[f32],
    (atol, rtol): (f32, f32),
) -> Result<f32, String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} elements, expected {}",
            got.len(),
            want.len()
        ));
    }
    let mut worst = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        // NaN fails too.
        if d.is_nan() || d > atol + rtol * w.abs() {
            return Err(format!(
                "{what}: element {i}: got {g}, expected {w} (|diff| {d} > {atol} + {rtol}*|ref|)"
            ));
        }
        worst = worst.max(d);
    }
    Ok(worst)
}

/// [`check_f32`] that panics on failure; returns the largest `|got - want|`.
pub fn assert_close_f32(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> f32 {
    check_f32(what, got, want, (atol, rtol)).unwrap_or_else(|e| panic!("{e}"))
}

/// The DCNv3 operator fixtures in `dir`: `dcnv3_ops.json` (cases, tolerances) and the tensors
/// of `dcnv3_ops.safetensors` (on the CPU).
pub fn dcnv3_fixtures(dir: &str) -> (Value, HashMap<String, Tensor>) {
    let json = read_json(format!("{dir}/dcnv3_ops.json"));
    let tensors = load_safetensors(format!("{dir}/dcnv3_ops.safetensors"));
    (json, tensors)
}

/// The [`Dcnv3Config`] of one entry of `dcnv3_ops.json`'s `cases` (or of `flash/dcnv4_ops.json`).
pub fn dcnv3_config(case: &Value) -> Dcnv3Config {
    let u = |k: &str| case[k].as_u64().unwrap() as usize;
    Dcnv3Config {
        kernel_h: u("kernel_h"),
        kernel_w: u("kernel_w"),
        stride_h: u("stride_h"),
        stride_w: u("stride_w"),
        pad_h: u("pad_h"),
        pad_w: u("pad_w"),
        dilation_h: u("dilation_h"),
        dilation_w: u("dilation_w"),
        group: u("group"),
        group_channels: u("group_channels"),
        offset_scale: case["offset_scale"].as_f64().unwrap(),
        // 0/1 in dcnv3_ops.json, a bool in flash/dcnv4_ops.json.
        remove_center: case["remove_center"]
            .as_bool()
            .unwrap_or_else(|| u("remove_center") != 0),
    }
}

/// One case of `flash/dcnv4_ops.json`: its tensors are `<name>.input`, `<name>.offset_mask`,
/// `<name>.out` and, when `has_grads`, `<name>.grad_weight`, `<name>.grad_input`,
/// `<name>.grad_offset_mask`.
pub struct Dcnv4Case {
    pub name: String,
    pub cfg: Dcnv3Config,
    /// The json's `P` (points per group).
    pub points: usize,
    /// The json's `offset_mask_channels` (K_pad).
    pub offset_mask_channels: usize,
    pub has_grads: bool,
    /// (atol, rtol) of the output and of the gradients.
    pub tol: (f64, f64),
    pub grad_tol: (f64, f64),
}

/// The DCNv4 operator fixtures (`flash/dcnv4_ops.*`): the 11 cases sorted by name and all
/// tensors (on the CPU).
pub fn dcnv4_fixtures() -> (Vec<Dcnv4Case>, HashMap<String, Tensor>) {
    let json = read_json(flash_dir().join("dcnv4_ops.json"));
    let tensors = load_safetensors(flash_dir().join("dcnv4_ops.safetensors"));
    let mut cases: Vec<Dcnv4Case> = json
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, c)| {
            let u = |k: &str| c[k].as_u64().unwrap() as usize;
            let f = |k: &str| c[k].as_f64().unwrap();
            Dcnv4Case {
                name: name.clone(),
                cfg: dcnv3_config(c),
                points: u("P"),
                offset_mask_channels: u("offset_mask_channels"),
                has_grads: c["has_grads"].as_bool().unwrap(),
                tol: (f("atol"), f("rtol")),
                grad_tol: (f("grad_atol"), f("grad_rtol")),
            }
        })
        .collect();
    cases.sort_by(|a, b| a.name.cmp(&b.name));
    (cases, tensors)
}

/// Worst ratio `|ours - ref| / (atol + rtol*|ref|)` over all elements (<= 1 means within
/// tolerance); panics, naming `what` and the worst element, when it exceeds 1 or is not finite.
pub fn check_ratio(ours: &Tensor, reference: &Tensor, (atol, rtol): (f64, f64), what: &str) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
    let a = to_f64_vec(ours);
    let b = to_f64_vec(reference);
    let mut worst = (0.0f64, 0usize);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let r = (x - y).abs() / (atol + rtol * y.abs());
        assert!(r.is_finite(), "{what}: non-finite at {i}: ours {x} ref {y}");
        if r > worst.0 {
            worst = (r, i);
        }
    }
    assert!(
        worst.0 <= 1.0,
        "{what}: element {} ours {} ref {} exceeds atol {atol} + rtol {rtol} (ratio {:.3})",
        worst.1,
        a[worst.1],
        b[worst.1],
        worst.0
    );
    worst.0
}

/// Plain nested-loop DCNv3 straight from the formula (f64), for checking the real kernels:
/// returns the output (N, H_out, W_out, C) flattened, H_out and W_out. Points with a non-finite
/// position or outside (-1, H) x (-1, W) sample nothing.
pub fn dcnv3_reference(
    input: &[f64],
    (n, hin, win, ch): (usize, usize, usize, usize),
    offset: &[f64],
    mask: &[f64],
    cfg: &Dcnv3Config,
) -> (Vec<f64>, usize, usize) {
    let hout = (hin + 2 * cfg.pad_h - (cfg.dilation_h * (cfg.kernel_h - 1) + 1)) / cfg.stride_h + 1;
    let wout = (win + 2 * cfg.pad_w - (cfg.dilation_w * (cfg.kernel_w - 1) + 1)) / cfg.stride_w + 1;
    let (g, cg) = (cfg.group, cfg.group_channels);
    assert_eq!(ch, g * cg);
    let mut pts = vec![];
    for i in 0..cfg.kernel_w {
        for j in 0..cfg.kernel_h {
            if !(cfg.remove_center && i == cfg.kernel_w / 2 && j == cfg.kernel_h / 2) {
                pts.push((i as f64, j as f64));
            }
        }
    }
    let np = pts.len();
    let hx = (cfg.dilation_w * (cfg.kernel_w - 1) / 2) as f64;
    let hy = (cfg.dilation_h * (cfg.kernel_h - 1) / 2) as f64;
    let s = cfg.offset_scale;
    let v = |b: usize, y: i64, x: i64, c: usize| -> f64 {
        if y < 0 || x < 0 || y >= hin as i64 || x >= win as i64 {
            0.0
        } else {
            input[((b * hin + y as usize) * win + x as usize) * ch + c]
        }
    };
    let mut out = vec![0.0; n * hout * wout * ch];
    for b in 0..n {
        for h in 0..hout {
            for w in 0..wout {
                let pix = (b * hout + h) * wout + w;
                for gi in 0..g {
                    for (p, &(i, j)) in pts.iter().enumerate() {
                        let k = (pix * g + gi) * np + p;
                        let x = (w * cfg.stride_w) as f64 - cfg.pad_w as f64
                            + hx
                            + s * (i * cfg.dilation_w as f64 - hx + offset[2 * k]);
                        let y = (h * cfg.stride_h) as f64 - cfg.pad_h as f64
                            + hy
                            + s * (j * cfg.dilation_h as f64 - hy + offset[2 * k + 1]);
                        if !x.is_finite() || !y.is_finite() {
                            continue;
                        }
                        if x <= -1.0 || y <= -1.0 || x >= win as f64 || y >= hin as f64 {
                            continue;
                        }
                        let (x0, y0) = (x.floor(), y.floor());
                        let (lx, ly) = (x - x0, y - y0);
                        let (x0, y0) = (x0 as i64, y0 as i64);
                        for c in 0..cg {
                            let cc = gi * cg + c;
                            let val = (1.0 - ly) * (1.0 - lx) * v(b, y0, x0, cc)
                                + (1.0 - ly) * lx * v(b, y0, x0 + 1, cc)
                                + ly * (1.0 - lx) * v(b, y0 + 1, x0, cc)
                                + ly * lx * v(b, y0 + 1, x0 + 1, cc);
                            out[pix * ch + cc] += mask[k] * val;
                        }
                    }
                }
            }
        }
    }
    (out, hout, wout)
}

/// `len` normal samples with standard deviation `scale` (Box-Muller).
pub fn randn(rng: &mut StdRng, len: usize, scale: f64) -> Vec<f64> {
    (0..len)
        .map(|_| {
            // Box-Muller
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            scale * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

/// Builds example `name` with the features of this test build (`cargo build --example`, release
/// when the tests are) and returns its executable.
pub fn build_example(name: &str) -> PathBuf {
    let mut features = vec![];
    for (on, feature) in [
        (cfg!(feature = "hub"), "hub"),
        (cfg!(feature = "image"), "image"),
        (cfg!(feature = "cuda"), "cuda"),
        (cfg!(feature = "metal"), "metal"),
    ] {
        if on {
            features.push(feature);
        }
    }
    let mut cmd = std::process::Command::new(env!("CARGO"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "--example",
        name,
        "--message-format=json",
        "--no-default-features",
        "--features",
        &features.join(","),
    ]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd.output().expect("cannot run cargo");
    assert!(
        out.status.success(),
        "cargo build --example {name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The compiler-artifact message of the example names its executable.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == name)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo did not report the {name} executable"))
}
