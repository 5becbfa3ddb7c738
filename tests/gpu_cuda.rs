//! CUDA checks (`--features cuda`; each test skips with a message when `Device::new_cuda(0)`
//! fails, so the file also passes on machines without a GPU).
//!
//! * DCNv3 CUDA op vs the fixtures (f32, forward + the 9 gradient cases) and vs the CPU op
//!   (f32/f16/bf16, fixture cases and larger InternImage-like shapes, forward and backward,
//!   a view with an odd start offset);
//! * autograd through the op on the GPU;
//! * bad input: CPU/CUDA mix, f64, mismatched dtypes give errors;
//! * tiny_b / tiny_h logits on the GPU vs the fixtures (f32) and vs the CPU run.
//!
//! The fixtures are read from `$INTERNIMAGE_FIXTURES` when set (used when the test binary is
//! carried to a GPU machine by scripts/gpu_build.sh), else from `../shared/fixtures`.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use common::{assert_close_f32 as assert_close, to_f32_vec as f32s};
use internimage::ops::dcnv3::{dcnv3, dcnv3_backward};
use internimage::{Dcnv3Config, InternImage};

fn fixtures_dir() -> String {
    std::env::var("INTERNIMAGE_FIXTURES").unwrap_or_else(|_| common::FIXTURES.to_string())
}

fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("SKIP: no CUDA device ({e})");
            None
        }
    }
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// Tolerance of a low-precision result against the CPU op in the same dtype: a couple of units
/// in the last place of the largest value (accumulation order and atomics differ).
fn dtype_tol(dtype: DType, scale: f32) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-5 * scale.max(1.0), 1e-5),
        DType::F16 => (4e-3 * scale.max(1e-3), 2e-3),
        _ => (3e-2 * scale.max(1e-3), 1.6e-2),
    }
}

struct Case {
    name: String,
    cfg: Dcnv3Config,
    t: std::collections::HashMap<String, Tensor>,
    has_grads: bool,
}

fn cases() -> (Vec<Case>, (f32, f32), (f32, f32)) {
    let (json, all) = common::dcnv3_fixtures(&fixtures_dir());
    let tol = |k: &str| common::atol_rtol_f32(&json["tolerances"][k]);
    let mut out = Vec::new();
    for c in json["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap().to_string();
        let cfg = common::dcnv3_config(c);
        let mut t = std::collections::HashMap::new();
        for group in ["tensors", "expected"] {
            for (k, v) in c[group].as_object().unwrap() {
                t.insert(k.clone(), all[v.as_str().unwrap()].clone());
            }
        }
        out.push(Case {
            name,
            cfg,
            t,
            has_grads: c["has_grads"].as_bool().unwrap_or(false),
        });
    }
    (out, tol("out"), tol("grads"))
}

#[test]
fn cuda_op_matches_fixtures_f32() {
    let Some(dev) = gpu() else { return };
    let (cases, tol_out, tol_grad) = cases();
    let mut grads = 0;
    for c in &cases {
        let on = |k: &str| c.t[k].to_device(&dev).unwrap();
        let (x, off, m) = (on("input"), on("offset"), on("mask"));
        let y = dcnv3(&x, &off, &m, &c.cfg).unwrap();
        assert!(y.device().is_cuda());
        assert_close(
            &format!("{} out", c.name),
            &f32s(&y),
            &f32s(&c.t["out"]),
            tol_out.0,
            tol_out.1,
        );
        if c.has_grads {
            grads += 1;
            let (gi, go, gm) = dcnv3_backward(&x, &off, &m, &on("grad_weight"), &c.cfg).unwrap();
            for (name, t) in [("grad_input", gi), ("grad_offset", go), ("grad_mask", gm)] {
                assert_close(
                    &format!("{} {name}", c.name),
                    &f32s(&t),
                    &f32s(&c.t[name]),
                    tol_grad.0,
                    tol_grad.1,
                );
            }
        }
    }
    assert_eq!(grads, 9);
}

/// CUDA vs CPU op in one dtype, forward and backward, on the given tensors (CPU, f32).
fn compare_with_cpu(
    tag: &str,
    dev: &Device,
    cfg: &Dcnv3Config,
    x: &Tensor,
    off: &Tensor,
    m: &Tensor,
) {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let (xc, oc, mc) = (cast(x), cast(off), cast(m));
        let want = dcnv3(&xc, &oc, &mc, cfg).unwrap();
        let got = dcnv3(
            &xc.to_device(dev).unwrap(),
            &oc.to_device(dev).unwrap(),
            &mc.to_device(dev).unwrap(),
            cfg,
        )
        .unwrap();
        assert_eq!(got.dtype(), dtype);
        let w = f32s(&want);
        let (atol, rtol) = dtype_tol(dtype, max_abs(&w));
        assert_close(&format!("{tag} {dtype:?} fwd"), &f32s(&got), &w, atol, rtol);

        let go = cast(&Tensor::randn(0f32, 1.0, want.shape(), &Device::Cpu).unwrap());
        let cpu = dcnv3_backward(&xc, &oc, &mc, &go, cfg).unwrap();
        let gpu = dcnv3_backward(
            &xc.to_device(dev).unwrap(),
            &oc.to_device(dev).unwrap(),
            &mc.to_device(dev).unwrap(),
            &go.to_device(dev).unwrap(),
            cfg,
        )
        .unwrap();
        for (name, a, b) in [
            ("grad_input", &gpu.0, &cpu.0),
            ("grad_offset", &gpu.1, &cpu.1),
            ("grad_mask", &gpu.2, &cpu.2),
        ] {
            let w = f32s(b);
            let (atol, rtol) = dtype_tol(dtype, max_abs(&w));
            // f32 gradients: atomics change the summation order only.
            let (atol, rtol) = if dtype == DType::F32 {
                (1e-4 * max_abs(&w).max(1.0), 1e-4)
            } else {
                (atol, rtol)
            };
            assert_close(&format!("{tag} {dtype:?} {name}"), &f32s(a), &w, atol, rtol);
        }
    }
}

#[test]
fn cuda_op_matches_cpu_op_all_dtypes() {
    let Some(dev) = gpu() else { return };
    let (cases, _, _) = cases();
    for c in &cases {
        compare_with_cpu(
            &c.name,
            &dev,
            &c.cfg,
            &c.t["input"],
            &c.t["offset"],
            &c.t["mask"],
        );
    }
}

/// InternImage-T-like shapes (Cg = 16 and 32, batch 3 so that items do not fill warps evenly),
/// random data, plus a view whose start offset forces the scalar (vec 1) path.
#[test]
fn cuda_op_matches_cpu_op_larger_shapes() {
    let Some(dev) = gpu() else { return };
    for (n, h, w, g, cg, scale) in [
        (3, 21, 19, 4, 16, 1.0),
        (2, 14, 15, 5, 32, 2.0),
        (1, 9, 7, 3, 24, 1.0),
    ] {
        let cfg = Dcnv3Config::internimage(g, cg, scale);
        let p = cfg.points();
        let x = Tensor::randn(0f32, 1.0, (n, h, w, g * cg), &Device::Cpu).unwrap();
        let off = Tensor::randn(0f32, 1.5, (n, h, w, g * p * 2), &Device::Cpu).unwrap();
        let m = candle_nn::ops::softmax_last_dim(
            &Tensor::randn(0f32, 1.0, (n, h, w, g, p), &Device::Cpu).unwrap(),
        )
        .unwrap()
        .reshape((n, h, w, g * p))
        .unwrap();
        compare_with_cpu(
            &format!("random {n}x{h}x{w} G{g} Cg{cg}"),
            &dev,
            &cfg,
            &x,
            &off,
            &m,
        );
        // Odd start offset: a narrowed view of a larger storage.
        let big = Tensor::randn(0f32, 1.0, (n * h * w * g * cg + 1,), &Device::Cpu).unwrap();
        let xv = big
            .narrow(0, 1, n * h * w * g * cg)
            .unwrap()
            .reshape((n, h, w, g * cg))
            .unwrap();
        let want = dcnv3(&xv, &off, &m, &cfg).unwrap();
        let bigd = big.to_device(&dev).unwrap();
        let xd = bigd
            .narrow(0, 1, n * h * w * g * cg)
            .unwrap()
            .reshape((n, h, w, g * cg))
            .unwrap();
        let got = dcnv3(
            &xd,
            &off.to_device(&dev).unwrap(),
            &m.to_device(&dev).unwrap(),
            &cfg,
        )
        .unwrap();
        assert_close("odd start offset", &f32s(&got), &f32s(&want), 1e-5, 1e-5);
    }
}

#[test]
fn cuda_autograd_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let cfg = Dcnv3Config::internimage(2, 8, 1.0);
    let (n, h, w) = (2, 6, 5);
    let x = Tensor::randn(0f32, 1.0, (n, h, w, 16), &Device::Cpu).unwrap();
    let off = Tensor::randn(0f32, 1.0, (n, h, w, 2 * 9 * 2), &Device::Cpu).unwrap();
    let m = Tensor::rand(0f32, 1.0, (n, h, w, 2 * 9), &Device::Cpu).unwrap();
    let run = |d: &Device| {
        let (xv, ov, mv) = (
            Var::from_tensor(&x.to_device(d).unwrap()).unwrap(),
            Var::from_tensor(&off.to_device(d).unwrap()).unwrap(),
            Var::from_tensor(&m.to_device(d).unwrap()).unwrap(),
        );
        let y = dcnv3(xv.as_tensor(), ov.as_tensor(), mv.as_tensor(), &cfg).unwrap();
        let loss = y.sqr().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        [&xv, &ov, &mv].map(|v| f32s(g.get(v.as_tensor()).unwrap()))
    };
    let cpu = run(&Device::Cpu);
    let gpu = run(&dev);
    for (k, (a, b)) in gpu.iter().zip(&cpu).enumerate() {
        assert_close(
            &format!("autograd grad {k}"),
            a,
            b,
            1e-4 * max_abs(b).max(1.0),
            1e-4,
        );
    }
}

#[test]
fn cuda_bad_input_is_an_error() {
    let Some(dev) = gpu() else { return };
    let cfg = Dcnv3Config::internimage(1, 4, 1.0);
    let x = Tensor::zeros((1, 3, 3, 4), DType::F32, &dev).unwrap();
    let off = Tensor::zeros((1, 3, 3, 18), DType::F32, &dev).unwrap();
    let m = Tensor::zeros((1, 3, 3, 9), DType::F32, &dev).unwrap();
    assert!(dcnv3(&x, &off, &m, &cfg).is_ok());
    // CUDA input with a CPU offset.
    let off_cpu = off.to_device(&Device::Cpu).unwrap();
    assert!(dcnv3(&x, &off_cpu, &m, &cfg).is_err());
    // f64 is CPU-only.
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    assert!(dcnv3(&f64s(&x), &f64s(&off), &f64s(&m), &cfg).is_err());
    // Mixed dtypes.
    assert!(dcnv3(&x.to_dtype(DType::F16).unwrap(), &off, &m, &cfg).is_err());
    // Integer tensors.
    let u = |t: &Tensor| t.to_dtype(DType::U32).unwrap();
    assert!(dcnv3(&u(&x), &u(&off), &u(&m), &cfg).is_err());
}

fn check_net(net: &str) {
    let Some(dev) = gpu() else { return };
    let dir = fixtures_dir();
    let cfg = common::config_of_meta(&common::read_json(format!("{dir}/weights/{net}.json")));
    let manifest = common::read_json(format!("{dir}/manifest.json"));
    let inputs = common::load_safetensors(format!("{dir}/inputs.safetensors"));
    let expected = common::load_safetensors(format!("{dir}/expected/{net}.safetensors"));
    let weights = format!("{dir}/weights/{net}.safetensors");
    let cpu_model = InternImage::from_checkpoint(&cfg, &weights, DType::F32, &Device::Cpu).unwrap();
    for input in ["rand", "photo"] {
        let (atol, rtol) =
            common::atol_rtol_f32(&manifest["models"][net]["tensors"][format!("logits.{input}")]);
        let x = &inputs[input];
        let golden = f32s(&expected[&format!("logits.{input}")]);
        let cpu = f32s(&cpu_model.forward(x).unwrap());
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let model = InternImage::from_checkpoint(&cfg, &weights, dtype, &dev).unwrap();
            let y = model.forward(&x.to_device(&dev).unwrap()).unwrap();
            assert!(y.device().is_cuda());
            let got = f32s(&y);
            if dtype == DType::F32 {
                assert_close(
                    &format!("{net} {input} f32 vs golden"),
                    &got,
                    &golden,
                    atol,
                    rtol,
                );
                assert_close(&format!("{net} {input} f32 vs cpu"), &got, &cpu, atol, rtol);
            } else {
                // Low precision end to end: agree with the f32 logits to a few percent of their range.
                let scale = max_abs(&golden);
                let t = if dtype == DType::F16 { 0.03 } else { 0.15 };
                assert_close(
                    &format!("{net} {input} {dtype:?} vs golden"),
                    &got,
                    &golden,
                    t * scale,
                    0.0,
                );
            }
        }
    }
}

#[test]
fn cuda_tiny_b_logits() {
    check_net("tiny_b");
}

#[test]
fn cuda_tiny_h_logits() {
    check_net("tiny_h");
}
