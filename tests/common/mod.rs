//! Helpers shared by the integration tests (each test binary includes this module with
//! `mod common;`): where the golden fixtures live and how to read them, tensor-to-`Vec`
//! conversions, the elementwise tolerance check `|ours - ref| <= atol + rtol*|ref|`, the manifest
//! tolerance lookup, the DCNv3 fixture cases (`dcnv3_ops.json`) and the tiny_b / tiny_h configs.
//!
//! Every test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use internimage::{Config, Dcnv3Config};
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

/// The [`Dcnv3Config`] of one entry of `dcnv3_ops.json`'s `cases`.
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
        remove_center: u("remove_center") != 0,
    }
}
