//! DCNv4 core op against the official goldens (`../shared/fixtures/flash/dcnv4_ops.*`): forward
//! for all 11 cases in f32 and f64 (json tolerances), f16 and bf16 (tolerances derived below),
//! gradients of the 6 cases that carry them through autograd, padding columns that must be
//! ignored, and the equivalence with DCNv3 on the unpacked offsets and mask.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use internimage::ops::dcnv4::{dcnv4_backward, offset_mask_channels};
use internimage::ops::{dcnv3, dcnv4, Dcnv3Config};
use std::collections::HashMap;

use common::Dcnv4Case as Case;

/// The cases (checked against the json's P and K_pad) and tensors.
fn load() -> (Vec<Case>, HashMap<String, Tensor>) {
    let (cases, tensors) = common::dcnv4_fixtures();
    for c in &cases {
        assert_eq!(c.cfg.points(), c.points, "{}: P", c.name);
        assert_eq!(
            offset_mask_channels(&c.cfg),
            c.offset_mask_channels,
            "{}",
            c.name
        );
    }
    (cases, tensors)
}

/// [`common::check_ratio`].
fn check(ours: &Tensor, reference: &Tensor, tol: (f64, f64), what: &str) -> f64 {
    common::check_ratio(ours, reference, tol, what)
}

fn used_columns(c: &Case) -> usize {
    c.cfg.group * c.cfg.points() * 3
}

/// The offset_mask with its padding columns replaced by `v`.
fn with_padding(om: &Tensor, used: usize, v: f32) -> Tensor {
    let k = om.dim(3).unwrap();
    if k == used {
        return om.clone();
    }
    let body = om.narrow(3, 0, used).unwrap();
    let mut shape = om.dims().to_vec();
    shape[3] = k - used;
    let pad = Tensor::full(v, shape, om.device()).unwrap();
    Tensor::cat(&[&body, &pad], 3).unwrap()
}

/// (offset (.., G*P*2), mask (.., G*P)) unpacked from offset_mask for the DCNv3 op.
fn unpack(om: &Tensor, cfg: &Dcnv3Config) -> (Tensor, Tensor) {
    let (g, p) = (cfg.group, cfg.points());
    let (n, h, w, _) = om.dims4().unwrap();
    let body = om
        .narrow(3, 0, g * 3 * p)
        .unwrap()
        .reshape((n, h, w, g, 3 * p))
        .unwrap();
    let off = body
        .narrow(4, 0, 2 * p)
        .unwrap()
        .reshape((n, h, w, g * 2 * p));
    let mask = body.narrow(4, 2 * p, p).unwrap().reshape((n, h, w, g * p));
    (off.unwrap(), mask.unwrap())
}

#[test]
fn forward_f32_all_cases() {
    let (cases, t) = load();
    assert_eq!(cases.len(), 11);
    for c in &cases {
        let get = |k: &str| t[&format!("{}.{k}", c.name)].clone();
        let out = dcnv4(&get("input"), &get("offset_mask"), &c.cfg).unwrap();
        assert_eq!(out.dtype(), DType::F32);
        check(&out, &get("out"), c.tol, &format!("{}.out", c.name));
    }
}

#[test]
fn forward_f64_all_cases() {
    let (cases, t) = load();
    for c in &cases {
        let get = |k: &str| t[&format!("{}.{k}", c.name)].to_dtype(DType::F64).unwrap();
        let out = dcnv4(&get("input"), &get("offset_mask"), &c.cfg).unwrap();
        assert_eq!(out.dtype(), DType::F64);
        check(&out, &get("out"), c.tol, &format!("{}.out (f64)", c.name));
    }
}

/// Equals DCNv3 (same CPU kernels) on the unpacked offsets and the unsoftmaxed mask, bit for
/// bit: the official operator's own test, and a check that the packed layout is read right.
#[test]
fn equals_dcnv3_on_unpacked_arguments() {
    let (cases, t) = load();
    for c in &cases {
        let get = |k: &str| t[&format!("{}.{k}", c.name)].clone();
        let (input, om) = (get("input"), get("offset_mask"));
        let (off, mask) = unpack(&om, &c.cfg);
        let v4 = common::to_f32_vec(&dcnv4(&input, &om, &c.cfg).unwrap());
        let v3 = common::to_f32_vec(&dcnv3(&input, &off, &mask, &c.cfg).unwrap());
        assert_eq!(v4, v3, "{}", c.name);
    }
}

/// Padding columns (garbage in the fixtures) are never read: replacing them by NaN, infinity or
/// huge values leaves the output bit for bit unchanged.
#[test]
fn padding_columns_are_ignored() {
    let (cases, t) = load();
    let mut padded = 0;
    for c in &cases {
        let get = |k: &str| t[&format!("{}.{k}", c.name)].clone();
        let (input, om) = (get("input"), get("offset_mask"));
        let used = used_columns(c);
        if om.dim(3).unwrap() > used {
            padded += 1;
        }
        let base = common::to_f32_vec(&dcnv4(&input, &om, &c.cfg).unwrap());
        for v in [f32::NAN, f32::INFINITY, -3e38, 0.0] {
            let om2 = with_padding(&om, used, v);
            let out = common::to_f32_vec(&dcnv4(&input, &om2, &c.cfg).unwrap());
            assert!(
                out.iter()
                    .zip(&base)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{}: padding value {v} changed the output",
                c.name
            );
        }
    }
    assert!(padded >= 5, "only {padded} cases have padding columns");
}

/// f16/bf16: the f32 inputs are rounded to the half type (unit roundoff u = 2^-11 for f16,
/// 2^-8 for bf16), computed with f32 accumulation and rounded once more. As for DCNv3
/// (tests/dcnv3_fixtures.rs) each output is a sum of P*4 products v*w*m, each factor perturbed
/// relatively by ~u, plus the offset term (|offset| up to ~8 px in far_outside, times the local
/// gradient of v); but the DCNv4 mask is not a softmax, so the sum of |m| over a group's points
/// (S, up to ~P here) multiplies the bound. We use atol = 16u * max|input| * max(1, S) and
/// rtol = 4u, checked against the f64 goldens.
fn half_case(dt: DType, u: f64) {
    let (cases, t) = load();
    let mut worst = 0f64;
    for c in &cases {
        let get = |k: &str| t[&format!("{}.{k}", c.name)].clone();
        let (input, om) = (get("input"), get("offset_mask"));
        let vmax = common::to_f64_vec(&input)
            .iter()
            .fold(0f64, |a, v| a.max(v.abs()));
        let (_, mask) = unpack(&om, &c.cfg);
        let p = c.cfg.points();
        let m = common::to_f64_vec(&mask);
        let s = m
            .chunks(p)
            .map(|ch| ch.iter().map(|v| v.abs()).sum::<f64>())
            .fold(1f64, f64::max);
        let out = dcnv4(
            &input.to_dtype(dt).unwrap(),
            &om.to_dtype(dt).unwrap(),
            &c.cfg,
        )
        .unwrap();
        assert_eq!(out.dtype(), dt);
        let r = check(
            &out,
            &get("out"),
            (16.0 * u * vmax * s, 4.0 * u),
            &format!("{}.out ({dt:?})", c.name),
        );
        worst = worst.max(r);
    }
    eprintln!("{dt:?}: worst tolerance ratio {worst:.3}");
}

#[test]
fn forward_f16_all_cases() {
    half_case(DType::F16, 2f64.powi(-11));
}

#[test]
fn forward_bf16_all_cases() {
    half_case(DType::BF16, 2f64.powi(-8));
}

#[test]
fn gradients_autograd() {
    let (cases, t) = load();
    let mut n = 0;
    for c in cases.iter().filter(|c| c.has_grads) {
        let get = |k: &str| t[&format!("{}.{k}", c.name)].clone();
        let input = Var::from_tensor(&get("input")).unwrap();
        let om = Var::from_tensor(&get("offset_mask")).unwrap();
        let out = dcnv4(input.as_tensor(), om.as_tensor(), &c.cfg).unwrap();
        check(&out, &get("out"), c.tol, &format!("{}.out", c.name));
        let loss = (out * get("grad_weight")).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let gi = grads.get(input.as_tensor()).unwrap();
        let gom = grads.get(om.as_tensor()).unwrap();
        check(
            gi,
            &get("grad_input"),
            c.grad_tol,
            &format!("{}.grad_input", c.name),
        );
        check(
            gom,
            &get("grad_offset_mask"),
            c.grad_tol,
            &format!("{}.grad_offset_mask", c.name),
        );
        // Padding columns: exactly zero.
        let used = used_columns(c);
        let k = gom.dim(3).unwrap();
        if k > used {
            let pad = common::to_f32_vec(&gom.narrow(3, used, k - used).unwrap());
            assert!(pad.iter().all(|&v| v == 0.0), "{}: padding grad", c.name);
        }
        n += 1;
    }
    assert_eq!(n, 6);
}

#[test]
fn gradients_f64_and_garbage_padding() {
    // The f64 backward (no autograd) against the same goldens, with NaN in the padding columns:
    // the gradients must not notice.
    let (cases, t) = load();
    for c in cases.iter().filter(|c| c.has_grads) {
        let get = |k: &str| t[&format!("{}.{k}", c.name)].clone();
        let om = with_padding(&get("offset_mask"), used_columns(c), f32::NAN);
        let f64_ = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
        let (gi, gom) = dcnv4_backward(
            &f64_(&get("input")),
            &f64_(&om),
            &f64_(&get("grad_weight")),
            &c.cfg,
        )
        .unwrap();
        check(
            &gi,
            &get("grad_input"),
            c.grad_tol,
            &format!("{}.gi f64", c.name),
        );
        check(
            &gom,
            &get("grad_offset_mask"),
            c.grad_tol,
            &format!("{}.gom f64", c.name),
        );
    }
}

/// Fraction of elements within |ours-ref| <= atol + rtol*|ref|.
fn fraction_within(ours: &Tensor, reference: &Tensor, (atol, rtol): (f64, f64)) -> f64 {
    let a = common::to_f64_vec(ours);
    let b = common::to_f64_vec(reference);
    let ok = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| (*x - *y).abs() <= atol + rtol * y.abs())
        .count();
    ok as f64 / a.len() as f64
}

#[test]
fn half_gradients_close() {
    // f16/bf16 backward (f32 accumulation) on every gradient case. Tolerance: 64u times the
    // largest magnitude of the golden gradient plus 8u relative (each gradient sums P*4*Cg
    // products of rounded factors). The input and mask gradients are continuous in the
    // arguments and must all be within it; the offset gradient jumps where a sampling position
    // crosses a pixel row or column (the bilinear derivative is discontinuous there), and
    // rounding the offsets to the half type moves a few points across one, so for it we require
    // 97% of the elements within the tolerance.
    let (cases, t) = load();
    for c in cases.iter().filter(|c| c.has_grads) {
        let get = |k: &str| t[&format!("{}.{k}", c.name)].clone();
        for (dt, u) in [(DType::F16, 2f64.powi(-11)), (DType::BF16, 2f64.powi(-8))] {
            let h = |x: &Tensor| x.to_dtype(dt).unwrap();
            let (gi, gom) = dcnv4_backward(
                &h(&get("input")),
                &h(&get("offset_mask")),
                &h(&get("grad_weight")),
                &c.cfg,
            )
            .unwrap();
            assert_eq!((gi.dtype(), gom.dtype()), (dt, dt));
            let tol = |r: &Tensor| {
                let gmax = common::to_f64_vec(r)
                    .iter()
                    .fold(0f64, |a, v| a.max(v.abs()));
                (64.0 * u * gmax, 8.0 * u)
            };
            let ri = get("grad_input");
            check(&gi, &ri, tol(&ri), &format!("{} grad_input {dt:?}", c.name));
            let (go, gm) = unpack(&gom, &c.cfg);
            let (ro, rm) = unpack(&get("grad_offset_mask"), &c.cfg);
            check(&gm, &rm, tol(&rm), &format!("{} grad mask {dt:?}", c.name));
            let frac = fraction_within(&go, &ro, tol(&ro));
            assert!(
                frac >= 0.97,
                "{} grad offset {dt:?}: only {frac:.3} within",
                c.name
            );
        }
    }
}

#[test]
fn errors_name_the_expected_shape() {
    let cfg = Dcnv3Config::internimage(2, 16, 1.0);
    let dev = Device::Cpu;
    let input = Tensor::zeros((1, 5, 5, 32), DType::F32, &dev).unwrap();
    // K = G*3P = 54 is not the padded 56.
    let om = Tensor::zeros((1, 5, 5, 54), DType::F32, &dev).unwrap();
    let e = dcnv4(&input, &om, &cfg).unwrap_err().to_string();
    assert!(e.contains("K_pad") && e.contains("56"), "{e}");
    let om = Tensor::zeros((1, 5, 5, 56), DType::F16, &dev).unwrap();
    let e = dcnv4(&input, &om, &cfg).unwrap_err().to_string();
    assert!(e.contains("dtype"), "{e}");
    let bad = Tensor::zeros((1, 5, 5, 30), DType::F32, &dev).unwrap();
    let om = Tensor::zeros((1, 5, 5, 56), DType::F32, &dev).unwrap();
    let e = dcnv4(&bad, &om, &cfg).unwrap_err().to_string();
    assert!(e.starts_with("dcnv4:") && e.contains("channels"), "{e}");
}
