//! Gradients through whole FlashInternImage networks (DCNv4 blocks). There are no golden network
//! gradients for flash, so: every parameter of tiny_flash_s / tiny_flash_l (loaded as `Var`s
//! from the official `.pth`) and the input get a finite, non-zero gradient and the `Var`s hold
//! exactly the manifest's parameter count; central finite differences in f64 (an independent
//! reference: only forward passes) agree with autograd on the input and on one parameter of
//! every kind; and the frozen model's input gradient is the trainable model's.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use common::*;
use internimage::{InternImage, TrainOptions, TrainableModel};

fn trainable(net: &str, dtype: DType) -> TrainableModel {
    InternImage::trainable(
        &flash_config(net),
        &[flash_weights(net)],
        &TrainOptions::default(),
        dtype,
        &Device::Cpu,
    )
    .unwrap()
}

/// Input (1, 3, 40, 48) and loss weights W (1, num_classes), seeded (`seed` and `seed + 1`).
fn input_and_weights(net: &str, dtype: DType, seed: u64) -> (Tensor, Tensor) {
    let classes = flash_config(net).num_classes;
    (
        seeded_randn(seed, &[1, 3, 40, 48], 1.0, dtype),
        seeded_randn(seed.wrapping_add(1), &[1, classes], 1.0, dtype),
    )
}

/// `sum(model(x) * w)` as a scalar tensor.
fn loss(model: &InternImage, x: &Tensor, w: &Tensor) -> Tensor {
    (model.forward(x).unwrap() * w).unwrap().sum_all().unwrap()
}

/// Finite and not all zero.
fn finite_nonzero(g: &Tensor) -> Result<(), String> {
    let v = to_f64_vec(g);
    if let Some(bad) = v.iter().find(|a| !a.is_finite()) {
        return Err(format!("non-finite element {bad}"));
    }
    if v.iter().all(|&a| a == 0.0) {
        return Err("all zero".into());
    }
    Ok(())
}

fn check_all_gradients(net: &str) {
    let tm = trainable(net, DType::F32);
    let manifest = read_json(flash_dir().join("manifest.json"));
    let n_params = manifest["models"][net]["params"].as_u64().unwrap() as usize;
    let names = tm.trainable_names();
    let counted: usize = names.iter().map(|n| tm.var(n).unwrap().elem_count()).sum();
    assert_eq!(
        counted, n_params,
        "{net}: the Vars hold the official parameter count"
    );
    let (x, w) = input_and_weights(net, DType::F32, 1);
    let x = Var::from_tensor(&x).unwrap();
    let grads = loss(tm.model(), x.as_tensor(), &w).backward().unwrap();
    let mut failures = Vec::new();
    match grads.get(x.as_tensor()) {
        None => failures.push("input: no gradient".to_string()),
        Some(g) => failures.extend(finite_nonzero(g).err().map(|e| format!("input: {e}"))),
    }
    for name in &names {
        match grads.get(tm.var(name).unwrap().as_tensor()) {
            None => failures.push(format!("{name}: no gradient")),
            Some(g) => failures.extend(finite_nonzero(g).err().map(|e| format!("{name}: {e}"))),
        }
    }
    // Every kind of DCNv4-block parameter is among them (the net really has DCNv4 blocks).
    for kind in [
        "dcn.value_proj.weight",
        "dcn.offset_mask.weight",
        "dcn.offset_mask.bias",
        "dcn.output_proj.weight",
    ] {
        assert!(names.iter().any(|n| n.ends_with(kind)), "{net}: no {kind}");
    }
    assert!(
        failures.is_empty(),
        "{net}: {} of {} gradients wrong:\n{}",
        failures.len(),
        names.len() + 1,
        failures.join("\n")
    );
}

#[test]
fn tiny_flash_s_every_parameter_gets_a_gradient() {
    check_all_gradients("tiny_flash_s");
}

#[test]
fn tiny_flash_l_every_parameter_gets_a_gradient() {
    check_all_gradients("tiny_flash_l");
}

/// Finite differences in f64 (step 1e-7, f64 keeps the rounding error of a small step near
/// 1e-9*|loss|; central, or at a bilinear kink either one-sided slope, see
/// `FiniteDifference::accepts`; seeded inputs, `INTERNIMAGE_FD_SEED`) against autograd, |fd - autograd| <= 1e-6 + 1e-5*|autograd| (measured: at most
/// 5e-8 absolute, 6e-6 relative), at the largest and
/// the middle element of: the input, and one parameter of every kind of tiny_flash_s (stem,
/// DCNv4 value_proj / offset_mask_dw / offset_mask / output_proj, LayerNorm, MLP fc1 / fc2,
/// layer scale, downsampling, conv head, classifier). The layer scales (1e-5 in the checkpoint) are first set to
/// 0.5 through `Var::set` so that the blocks' branches weigh in the loss; the perturbations go
/// through `Var::set` too, which also checks that every layer reads its `Var` when it runs.
#[test]
fn tiny_flash_s_finite_differences_f64() {
    let net = "tiny_flash_s";
    let tm = trainable(net, DType::F64);
    let names = tm.trainable_names();
    for name in names.iter().filter(|n| n.contains(".gamma")) {
        let v = tm.var(name).unwrap();
        v.set(&Tensor::full(0.5f64, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    // INTERNIMAGE_FD_SEED overrides the seed of the input and W; a failure prints it.
    let seed = fd_seed(1);
    let (x, w) = input_and_weights(net, DType::F64, seed);
    let x = Var::from_tensor(&x).unwrap();
    let loss_of = || -> f64 {
        loss(tm.model(), x.as_tensor(), &w)
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = loss(tm.model(), x.as_tensor(), &w).backward().unwrap();
    // The first parameter (in name order) whose name contains each pattern.
    let patterns = [
        "patch_embed.conv1.weight",
        "dcn.value_proj.weight",
        "dcn.value_proj.bias",
        "dcn.offset_mask_dw.weight",
        "dcn.offset_mask.weight",
        "dcn.offset_mask.bias",
        "dcn.output_proj.weight",
        "norm1.0.weight",
        "norm2.0.bias",
        "mlp.fc1.weight",
        "mlp.fc2.weight",
        "gamma1",
        "downsample.conv.weight",
        "conv_head.0.weight",
        "head.weight",
    ];
    let (h, tol) = (1e-7, (1e-6, 1e-5));
    let mut failures = Vec::new();
    let g = grads.get(x.as_tensor()).expect("no input gradient");
    failures.extend(finite_difference_failures("input", &x, g, h, tol, &loss_of));
    for pat in patterns {
        let Some(name) = names.iter().find(|n| n.contains(pat)) else {
            failures.push(format!("no parameter matches {pat}"));
            continue;
        };
        let var = tm.var(name).unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        failures.extend(finite_difference_failures(name, &var, g, h, tol, &loss_of));
    }
    assert!(
        failures.is_empty(),
        "{}\n(seed {seed}; set {ENV_FD_SEED} to rerun with another)",
        failures.join("\n")
    );
}

/// Frozen weights (plain `from_checkpoint`, packed GEMMs where the CPU has them): the input
/// gradient equals the trainable model's, within f32 summation-order differences
/// (|frozen - trainable| <= 1e-6 + 1e-4*|trainable|; measured: identical on this machine).
#[test]
fn frozen_input_gradient_equals_trainable() {
    for net in ["tiny_flash_s", "tiny_flash_l"] {
        let (x, w) = input_and_weights(net, DType::F32, 1);
        let input_grad = |model: &InternImage| {
            let x = Var::from_tensor(&x).unwrap();
            let grads = loss(model, x.as_tensor(), &w).backward().unwrap();
            grads.get(x.as_tensor()).expect("no input gradient").clone()
        };
        let tm = trainable(net, DType::F32);
        let frozen = InternImage::from_checkpoint(
            &flash_config(net),
            flash_weights(net),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let (a, b) = (input_grad(&frozen), input_grad(tm.model()));
        let (worst, max_abs) = max_violation(&a, &b, 1e-6, 1e-4);
        let scale = to_f64_vec(&b).iter().fold(0f64, |m, v| m.max(v.abs()));
        println!("{net}: max |frozen - trainable| {max_abs:e} (max |grad| {scale:e})");
        assert!(
            worst <= 0.0,
            "{net}: frozen input gradient differs by {max_abs:e}"
        );
    }
}
