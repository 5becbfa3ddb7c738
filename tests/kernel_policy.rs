//! Every kernel policy this CPU can run, in one process: the DCNv3 and DCNv4 operators against the
//! official goldens (forward and gradients) on each instruction set, the channels-last helpers
//! against candle's reference ops, and FlashInternImage against its goldens. (InternImage itself
//! is checked under every policy in `model_parity.rs`.)

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use internimage::ops::dcnv3::Dcnv3Op;
use internimage::ops::dcnv4::Dcnv4Op;
use internimage::ops::depthwise::DepthwiseConv2dNhwc;
use internimage::ops::{self, Linear};
use internimage::{InternImage, Isa, KernelPolicy};

/// The fast policies of every instruction set this CPU supports (portable included).
fn fast_policies() -> Vec<KernelPolicy> {
    Isa::supported()
        .into_iter()
        .map(|isa| KernelPolicy::with_isa(isa).unwrap())
        .collect()
}

fn assert_within(ours: &Tensor, reference: &Tensor, atol: f64, rtol: f64, what: &str) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
    let (worst, max_abs) = common::max_violation(ours, reference, atol, rtol);
    assert!(
        worst <= 0.0,
        "{what}: max |diff| {max_abs:.3e} exceeds atol {atol:.1e} + rtol {rtol:.1e}*|ref|"
    );
}

#[test]
fn dcnv3_operator_goldens_on_every_isa() {
    let (json, t) = common::dcnv3_fixtures(common::FIXTURES);
    let (atol, rtol) = common::atol_rtol(&json["tolerances"]["out"]);
    let (gatol, grtol) = common::atol_rtol(&json["tolerances"]["grads"]);
    let cases = json["cases"].as_array().unwrap();
    for isa in Isa::supported() {
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let cfg = common::dcnv3_config(case);
            let get = |k: &str| t[&format!("{name}.{k}")].clone();
            let op = Dcnv3Op::with_isa(cfg, isa);
            let out = get("input")
                .apply_op3(&get("offset"), &get("mask"), op)
                .unwrap();
            assert_within(&out, &get("out"), atol, rtol, &format!("{isa} {name}.out"));
            if !case["has_grads"].as_bool().unwrap() {
                continue;
            }
            let (input, offset, mask) = (
                Var::from_tensor(&get("input")).unwrap(),
                Var::from_tensor(&get("offset")).unwrap(),
                Var::from_tensor(&get("mask")).unwrap(),
            );
            let out = input.apply_op3(&offset, &mask, op).unwrap();
            let grads = (out * get("grad_weight")).unwrap().sum_all().unwrap();
            let grads = grads.backward().unwrap();
            for (v, key) in [
                (&input, "grad_input"),
                (&offset, "grad_offset"),
                (&mask, "grad_mask"),
            ] {
                let g = grads.get(v).unwrap();
                assert_within(g, &get(key), gatol, grtol, &format!("{isa} {name}.{key}"));
            }
        }
    }
}

#[test]
fn dcnv4_operator_goldens_on_every_isa() {
    let dir = common::fixtures().join("flash");
    let json = common::read_json(dir.join("dcnv4_ops.json"));
    let t = common::load_safetensors(dir.join("dcnv4_ops.safetensors"));
    let cases = json.as_object().unwrap();
    assert_eq!(cases.len(), 11);
    for isa in Isa::supported() {
        for (name, case) in cases {
            let f = |k: &str| case[k].as_f64().unwrap();
            let (atol, rtol, gatol, grtol) = (f("atol"), f("rtol"), f("grad_atol"), f("grad_rtol"));
            let cfg = common::dcnv3_config(case);
            let get = |k: &str| t[&format!("{name}.{k}")].clone();
            let op = Dcnv4Op::with_isa(cfg, isa);
            let out = get("input").apply_op2(&get("offset_mask"), op).unwrap();
            assert_within(&out, &get("out"), atol, rtol, &format!("{isa} {name}.out"));
            if !case["has_grads"].as_bool().unwrap() {
                continue;
            }
            let input = Var::from_tensor(&get("input")).unwrap();
            let om = Var::from_tensor(&get("offset_mask")).unwrap();
            let out = input.apply_op2(&om, op).unwrap();
            let loss = (out * get("grad_weight")).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            for (v, key) in [(&input, "grad_input"), (&om, "grad_offset_mask")] {
                let g = grads.get(v).unwrap();
                assert_within(g, &get(key), gatol, grtol, &format!("{isa} {name}.{key}"));
            }
        }
    }
}

/// The channels-last helpers on each instruction set against candle's own ops (the reference
/// policy) on the same random values, at InternImage-T-like shapes with odd sizes.
#[test]
fn channels_last_helpers_agree_with_candle_on_every_isa() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 13, 11, 72), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.1, (200, 72), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.1, 200, &dev).unwrap();
    let lnw = Tensor::randn(1f32, 0.1, 72, &dev).unwrap();
    let lnb = Tensor::randn(0f32, 0.1, 72, &dev).unwrap();
    let dw = Tensor::randn(0f32, 0.2, (72, 1, 3, 3), &dev).unwrap();
    let dwb = Tensor::randn(0f32, 0.1, 72, &dev).unwrap();
    let reference = KernelPolicy::reference();
    let run = |p: KernelPolicy| -> Vec<Tensor> {
        let lin = Linear::with_policy(w.clone(), Some(b.clone()), p).unwrap();
        let w2 = w.t().unwrap().contiguous().unwrap();
        let fc2 = Linear::with_policy(w2, None, p).unwrap();
        let conv = DepthwiseConv2dNhwc::with_policy(&dw, Some(&dwb), 1, p).unwrap();
        vec![
            lin.forward(&x).unwrap(),
            lin.forward_gelu(&x).unwrap(),
            ops::mlp(&x, &lin, &fc2).unwrap(),
            ops::gelu_erf_with(&(&x * 3.0).unwrap(), p).unwrap(),
            ops::layer_norm_last_dim_with(&x, &lnw, &lnb, 1e-6, p).unwrap(),
            ops::softmax_groups_with(&x, 9, p).unwrap(),
            conv.forward(&x).unwrap(),
        ]
    };
    let want = run(reference);
    let names = [
        "linear",
        "linear+gelu",
        "mlp",
        "gelu",
        "layer norm",
        "softmax",
        "dw conv",
    ];
    for p in fast_policies() {
        assert!(!p.is_reference());
        for ((got, want), name) in run(p).iter().zip(&want).zip(names) {
            assert_within(got, want, 2e-5, 2e-5, &format!("{p} {name}"));
        }
    }
}

/// A fast policy never drops a gradient: the same values through `Var`s give the same
/// gradients on every instruction set as under the reference policy.
#[test]
fn gradients_are_the_same_under_every_policy() {
    let dev = Device::Cpu;
    let x0 = Tensor::randn(0f32, 1.0, (1, 9, 7, 36), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.1, (48, 36), &dev).unwrap();
    let lnw = Tensor::randn(1f32, 0.1, 36, &dev).unwrap();
    let lnb = Tensor::randn(0f32, 0.1, 36, &dev).unwrap();
    let grads_under = |p: KernelPolicy| -> Vec<Tensor> {
        let x = Var::from_tensor(&x0).unwrap();
        let lin = Linear::with_policy(w.clone(), None, p).unwrap();
        let h = ops::layer_norm_last_dim_with(&x, &lnw, &lnb, 1e-6, p).unwrap();
        let h = lin.forward_gelu(&h).unwrap();
        let s = ops::softmax_groups_with(&h, 12, p).unwrap();
        let loss = (s * &h).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        vec![g.get(&x).unwrap().clone()]
    };
    let want = grads_under(KernelPolicy::reference());
    for p in fast_policies() {
        let got = grads_under(p);
        assert_within(
            &got[0],
            &want[0],
            1e-5,
            1e-4,
            &format!("{p} input gradient"),
        );
    }
}

#[test]
fn flash_internimage_goldens_under_every_policy() {
    let dir = common::fixtures().join("flash");
    let manifest = common::read_json(dir.join("manifest.json"));
    let inputs = common::fixture_tensors("inputs.safetensors");
    let mut policies = fast_policies();
    policies.push(KernelPolicy::reference());
    for net in ["tiny_flash_s", "tiny_flash_l"] {
        let meta = common::read_json(dir.join(format!("weights/{net}.json")));
        let cfg = common::config_of_meta(&meta);
        let path = dir.join(format!("weights/{net}.pth"));
        let expected = common::load_safetensors(dir.join(format!("expected/{net}.safetensors")));
        for &p in &policies {
            let model =
                InternImage::from_checkpoint_with_policy(&cfg, &path, DType::F32, &Device::Cpu, p)
                    .unwrap();
            let x = &inputs["rand"];
            let logits = model.forward(x).unwrap();
            let (atol, rtol) = common::manifest_tol(&manifest, net, "logits.rand");
            assert_within(
                &logits,
                &expected["logits.rand"],
                atol,
                rtol,
                &format!("{p} {net}"),
            );
            for (i, s) in model.forward_features(x).unwrap().iter().enumerate() {
                let name = format!("stage{i}.rand");
                let (atol, rtol) = common::manifest_tol(&manifest, net, &name);
                assert_within(
                    s,
                    &expected[&name],
                    atol,
                    rtol,
                    &format!("{p} {net} {name}"),
                );
            }
        }
    }
}
