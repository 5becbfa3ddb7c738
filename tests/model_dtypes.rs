//! f16, bf16 and f64 forward of tiny_b (and tiny_h) against the f32 official goldens.
//!
//! Tolerances are stated at `TOLS`; the top-1 class must agree with the f32 goldens. Every
//! instruction set the CPU supports is run: on AVX512_BF16 a bf16 model keeps bf16 GEMM weights
//! and f32 activations, its products bf16 x bf16 with f32 accumulation (`VDPBF16PS`); elsewhere
//! it computes in f32. The outputs are bf16 in both cases.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use common::{fixture_tensors as load, max_violation, net_config as config, net_weights};
use internimage::{InternImage, Isa, KernelPolicy};

fn argmax_rows(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .argmax(1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
}

/// Stated tolerances, (dtype, logits atol, stage atol, rtol); PASS iff every element satisfies
/// |ours - ref| <= atol + rtol*|ref|. Measured maxima (tiny_b / tiny_h, CPU, real DCNv3 op):
/// f16 logits 2.0e-4 / 5.3e-3, stages 3.0e-2 / 1.9e-2; bf16 logits 2.0e-3 / 6.2e-2,
/// stages 2.1e-1 / 1.3e-1 (stage values reach +-4.4; f16 spacing there is 2e-3, bf16 3e-2).
const TOLS: [(DType, f64, f64, f64); 2] = [
    (DType::F16, 1e-2, 5e-2, 1e-2),
    (DType::BF16, 1e-1, 3e-1, 5e-2),
];

fn run(net: &str) {
    let cfg = config(net);
    let inputs = load("inputs.safetensors");
    let expected = load(&format!("expected/{net}.safetensors"));
    for (isa, (dtype, atol_logits, atol_stage, rtol)) in Isa::supported()
        .into_iter()
        .flat_map(|isa| TOLS.map(|t| (isa, t)))
    {
        let policy = KernelPolicy::with_isa(isa).unwrap();
        let model = InternImage::from_checkpoint_with_policy(
            &cfg,
            net_weights(net, "safetensors"),
            dtype,
            &Device::Cpu,
            policy,
        )
        .unwrap();
        assert_eq!(model.dtype(), dtype);
        let mut report = Vec::new();
        for input in ["photo", "rand"] {
            let x = inputs[input].to_dtype(dtype).unwrap();
            let logits = model.forward(&x).unwrap();
            assert_eq!(logits.dtype(), dtype);
            let reference = &expected[&format!("logits.{input}")];
            let (worst, max_abs) = max_violation(&logits, reference, atol_logits, rtol);
            report.push(format!(
                "{isa} {dtype:?} logits.{input}: max |diff| {max_abs:.2e}"
            ));
            assert!(
                worst <= 0.0,
                "{net} {isa} {dtype:?} logits.{input}: max |diff| {max_abs:.3e}"
            );
            assert_eq!(
                argmax_rows(&logits),
                argmax_rows(reference),
                "{net} {isa} {dtype:?} top-1 on {input}"
            );
        }
        let feats = model
            .forward_features(&inputs["rand"].to_dtype(dtype).unwrap())
            .unwrap();
        for (i, f) in feats.iter().enumerate() {
            let reference = &expected[&format!("stage{i}.rand")];
            let (worst, max_abs) = max_violation(f, reference, atol_stage, rtol);
            report.push(format!(
                "{isa} {dtype:?} stage{i}.rand: max |diff| {max_abs:.2e}"
            ));
            assert!(
                worst <= 0.0,
                "{net} {isa} {dtype:?} stage{i}: max |diff| {max_abs:.3e}"
            );
        }
        println!("{net}: {}", report.join("; "));
    }
}

#[test]
fn tiny_b_f16_bf16() {
    run("tiny_b");
}

#[test]
fn tiny_h_f16_bf16() {
    run("tiny_h");
}

/// f64 weights and inputs run too (every op has an f64 path: the LayerNorm used to stop at
/// candle-nn's fused kernel, which has none): logits and stages of tiny_b and tiny_h against the
/// f32 goldens within 1e-4 + 1e-4*|ref| (measured maxima: logits 9.8e-8 / 1.1e-6, stages
/// 1.8e-5 / 1.7e-5 for tiny_b / tiny_h; the goldens' own f32 rounding dominates).
#[test]
fn f64_matches_goldens() {
    let inputs = load("inputs.safetensors");
    for net in ["tiny_b", "tiny_h"] {
        let expected = load(&format!("expected/{net}.safetensors"));
        let model = InternImage::from_checkpoint(
            &config(net),
            net_weights(net, "safetensors"),
            DType::F64,
            &Device::Cpu,
        )
        .unwrap();
        let x = inputs["rand"].to_dtype(DType::F64).unwrap();
        let logits = model.forward(&x).unwrap();
        assert_eq!(logits.dtype(), DType::F64);
        let (worst, max_abs) = max_violation(&logits, &expected["logits.rand"], 1e-4, 1e-4);
        eprintln!("{net} f64 logits: max |diff| {max_abs:.2e}");
        assert!(worst <= 0.0, "{net} f64 logits: max |diff| {max_abs:.3e}");
        for (i, f) in model.forward_features(&x).unwrap().iter().enumerate() {
            let reference = &expected[&format!("stage{i}.rand")];
            let (worst, max_abs) = max_violation(f, reference, 1e-4, 1e-4);
            eprintln!("{net} f64 stage{i}: max |diff| {max_abs:.2e}");
            assert!(worst <= 0.0, "{net} f64 stage{i}: max |diff| {max_abs:.3e}");
        }
    }
}
