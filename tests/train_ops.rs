//! The training kernels' backward (`src/ops/train.rs`, the depthwise, im2col and grouped-softmax
//! backward kernels) against Candle's own autograd: the same layer built with the reference
//! [`KernelPolicy`] (Candle tensor ops) gives the reference gradients of every input and
//! parameter. Also `internimage::AdamW` against `candle_nn::AdamW`.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::Optimizer;
use internimage::ops::depthwise::DepthwiseConv2dNhwc;
use internimage::ops::{Conv2dNhwc, Linear};
use internimage::KernelPolicy;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A deterministic pseudo-random tensor (LCG), N(0,1)-ish via the sum of uniforms.
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as f64) / (1u64 << 31) as f64
    };
    let v: Vec<f32> = (0..n)
        .map(|_| ((0..4).map(|_| next()).sum::<f64>() - 2.0) as f32)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&randn(shape, seed)).unwrap()
}

/// Max |a - b| relative to max(1, max |b|).
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let m = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / m.max(1.0)
}

/// Runs `f` with the fast and the reference policy on the same `Var`s; compares the outputs and
/// the gradients of `sum(out * R)` for every var.
fn check(what: &str, vars: &[&Var], out_shape_seed: u64, f: &dyn Fn(KernelPolicy) -> Tensor) {
    let fast = f(KernelPolicy::fast());
    let reference = f(KernelPolicy::reference());
    assert!(
        rel_err(&fast, &reference) < 1e-5,
        "{what}: forward differs by {}",
        rel_err(&fast, &reference)
    );
    let r = randn(fast.dims(), out_shape_seed);
    let gf = (fast * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (reference * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, v) in vars.iter().enumerate() {
        let a = gf
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no fast gradient for var {i}"));
        let b = gr
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no reference gradient for var {i}"));
        let e = rel_err(a, b);
        assert!(e < 2e-5, "{what}: gradient of var {i} differs by {e}");
    }
}

#[test]
fn linear_backward_matches_candle() {
    for (k, n, bias) in [(24, 40, true), (33, 17, false), (64, 64, true)] {
        let x = var(&[2, 5, 7, k], 1);
        let w = var(&[n, k], 2);
        let b = var(&[n], 3);
        let vars: Vec<&Var> = if bias { vec![&x, &w, &b] } else { vec![&x, &w] };
        check(&format!("linear {k}->{n}"), &vars, 4, &|p| {
            let bias = bias.then(|| b.as_tensor().clone());
            Linear::with_policy(w.as_tensor().clone(), bias, p)
                .unwrap()
                .forward(x.as_tensor())
                .unwrap()
        });
        // GELU fused after the linear.
        check(&format!("linear+gelu {k}->{n}"), &vars, 5, &|p| {
            let bias = bias.then(|| b.as_tensor().clone());
            Linear::with_policy(w.as_tensor().clone(), bias, p)
                .unwrap()
                .forward_gelu(x.as_tensor())
                .unwrap()
        });
    }
}

#[test]
fn frozen_linear_input_gradient_matches_candle() {
    // Constant weights (packed under the fast policy), tracked input.
    let x = var(&[3, 4, 4, 16], 6);
    let w = randn(&[24, 16], 7);
    let b = randn(&[24], 8);
    check("frozen linear", &[&x], 9, &|p| {
        Linear::with_policy(w.clone(), Some(b.clone()), p)
            .unwrap()
            .forward(x.as_tensor())
            .unwrap()
    });
}

#[test]
fn mlp_backward_recomputes_and_matches_candle() {
    // Enough rows for several row blocks (and a partial last one).
    for (c, hid, rows_h) in [(16, 64, 37), (24, 96, 9)] {
        let x = var(&[2, rows_h, 5, c], 10);
        let w1 = var(&[hid, c], 11);
        let b1 = var(&[hid], 12);
        let w2 = var(&[c, hid], 13);
        let b2 = var(&[c], 14);
        check(
            &format!("mlp {c}/{hid}"),
            &[&x, &w1, &b1, &w2, &b2],
            15,
            &|p| {
                let fc1 =
                    Linear::with_policy(w1.as_tensor().clone(), Some(b1.as_tensor().clone()), p)
                        .unwrap();
                let fc2 =
                    Linear::with_policy(w2.as_tensor().clone(), Some(b2.as_tensor().clone()), p)
                        .unwrap();
                internimage::ops::mlp(x.as_tensor(), &fc1, &fc2).unwrap()
            },
        );
    }
}

#[test]
fn depthwise_backward_matches_candle() {
    for (k, pad, h, w, c) in [(3, 1, 9, 7, 40), (5, 2, 6, 11, 8), (3, 0, 5, 5, 3)] {
        let x = var(&[2, h, w, c], 20);
        let wt = var(&[c, 1, k, k], 21);
        let b = var(&[c], 22);
        check(
            &format!("depthwise {k}x{k} pad {pad}"),
            &[&x, &wt, &b],
            23,
            &|p| {
                DepthwiseConv2dNhwc::with_policy(wt.as_tensor(), Some(b.as_tensor()), pad, p)
                    .unwrap()
                    .forward(x.as_tensor())
                    .unwrap()
            },
        );
    }
}

#[test]
fn dense_conv_backward_matches_candle() {
    for (cin, cout, h, w, bias) in [(3, 8, 11, 9, true), (8, 16, 8, 8, false)] {
        let x = var(&[2, h, w, cin], 30);
        let wt = var(&[cout, cin, 3, 3], 31);
        let b = var(&[cout], 32);
        let vars: Vec<&Var> = if bias {
            vec![&x, &wt, &b]
        } else {
            vec![&x, &wt]
        };
        check(&format!("conv {cin}->{cout} s2"), &vars, 33, &|p| {
            let bias = bias.then_some(b.as_tensor());
            Conv2dNhwc::with_policy(wt.as_tensor(), bias, 2, 1, p)
                .unwrap()
                .forward(x.as_tensor())
                .unwrap()
        });
    }
}

#[test]
fn grouped_softmax_backward_matches_candle() {
    let x = var(&[2, 5, 6, 4 * 9], 40);
    check("softmax groups", &[&x], 41, &|p| {
        internimage::ops::softmax_groups_with(x.as_tensor(), 9, p).unwrap()
    });
}

#[test]
fn adamw_matches_candle_nn() {
    let shapes: [&[usize]; 3] = [&[70_000], &[13, 7], &[5]];
    let ours: Vec<Var> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| var(s, 50 + i as u64))
        .collect();
    let theirs: Vec<Var> = ours
        .iter()
        .map(|v| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap())
        .collect();
    let params = candle_nn::ParamsAdamW {
        lr: 1e-2,
        weight_decay: 0.05,
        ..Default::default()
    };
    let mut a = internimage::AdamW::new(ours.clone(), params.clone()).unwrap();
    let mut b = candle_nn::AdamW::new(theirs.clone(), params).unwrap();
    for step in 0..4u64 {
        let loss = |vs: &[Var]| {
            let mut total = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
            for (i, v) in vs.iter().enumerate() {
                let r = randn(v.dims(), 60 + step * 7 + i as u64);
                let t = (v.as_tensor().sqr().unwrap() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                total = (total + t).unwrap();
            }
            total
        };
        a.backward_step(&loss(&ours)).unwrap();
        b.backward_step(&loss(&theirs)).unwrap();
    }
    for (x, y) in ours.iter().zip(&theirs) {
        let e = rel_err(x.as_tensor(), y.as_tensor());
        assert!(e < 1e-5, "AdamW differs from candle_nn::AdamW by {e}");
    }
}

/// A small pre-norm network (InternImage-T's arrangement: no layer scale, no post-norm), every
/// parameter a `Var`: logits and the gradient of every parameter and of the input under the
/// fast policy (the fused training ops: the norm + DCNv3 branch up to the core, projection +
/// residual, norm + MLP + residual) equal those under the reference policy (Candle autograd).
#[test]
fn pre_norm_network_gradients_match_the_reference_policy() {
    use internimage::{Config, InternImage};
    let dev = Device::Cpu;
    let cfg = Config {
        channels: 16,
        depths: vec![1, 1, 2, 1],
        groups: vec![1, 2, 4, 8],
        num_classes: 10,
        ..Config::t()
    };
    assert!(cfg.layer_scale.is_none() && !cfg.post_norm && !cfg.res_post_norm);
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let fast = InternImage::new_with_policy(&cfg, vb.clone(), KernelPolicy::fast()).unwrap();
    // Every Var random: weights around 0, 1-D parameters (norms, biases, BN statistics) around 1.
    for (i, v) in varmap.all_vars().iter().enumerate() {
        let t = randn(v.dims(), 100 + i as u64);
        let t = if v.rank() == 1 {
            ((t * 0.1).unwrap() + 1.0).unwrap()
        } else {
            (t * 0.2).unwrap()
        };
        v.set(&t).unwrap();
    }
    let reference = InternImage::new_with_policy(&cfg, vb, KernelPolicy::reference()).unwrap();
    let x = var(&[2, 3, 64, 64], 7);
    let w = randn(&[2, 10], 8);
    let run = |m: &InternImage| {
        let logits = m.forward(x.as_tensor()).unwrap();
        let g = (&logits * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (logits, g)
    };
    let (lf, gf) = run(&fast);
    let (lr, gr) = run(&reference);
    assert!(rel_err(&lf, &lr) < 1e-4, "logits: {}", rel_err(&lf, &lr));
    let vars = varmap.all_vars();
    assert!(vars.len() > 50, "{} Vars", vars.len());
    let mut checked = 0;
    for v in vars.iter().chain([&x]) {
        match (gf.get(v.as_tensor()), gr.get(v.as_tensor())) {
            (Some(a), Some(b)) => {
                let e = rel_err(a, b);
                assert!(e < 1e-4, "gradient of a {:?} Var differs by {e}", v.dims());
                checked += 1;
            }
            (None, None) => {}
            (a, b) => panic!(
                "a {:?} Var has a gradient under one policy only ({} / {})",
                v.dims(),
                a.is_some(),
                b.is_some()
            ),
        }
    }
    assert!(checked > 50, "{checked} gradients compared");
}
