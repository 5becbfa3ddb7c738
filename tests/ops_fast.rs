//! The fast CPU helpers (GELU, depthwise conv) against candle's reference ops.

use candle_core::{DType, Device, IndexOp, Module, Tensor, Var};
use internimage::ops::depthwise::DepthwiseConv2dNhwc;
use internimage::ops::linear_gelu;
use internimage::ops::{depthwise_conv2d_nhwc, gelu_erf};

/// Max over elements of |a-b| - (atol + rtol*|b|); <= 0 means PASS.
fn excess(a: &Tensor, b: &Tensor, atol: f64, rtol: f64) -> f64 {
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() - (atol + rtol * y.abs()))
        .fold(f64::NEG_INFINITY, f64::max)
}

/// Dense grid over [-lo, lo] plus tails and special values (f32).
fn gelu_inputs() -> Vec<f32> {
    let mut v: Vec<f32> = (0..=400_000)
        .map(|i| -10.0 + 20.0 * i as f32 / 400_000.0)
        .collect();
    for e in -30..=30 {
        let m = 1.7f32.powi(e);
        v.extend([m, -m]);
    }
    v.extend([
        0.0, -0.0, 1e-30, -1e-30, 3.9, 3.92, 3.93, 5.5, -5.5, 20.0, -20.0, 1e4, -1e4, 1e30, -1e30,
    ]);
    v
}

#[test]
fn gelu_f32_matches_f64_reference() {
    let xs = gelu_inputs();
    let n = xs.len();
    let t = Tensor::from_vec(xs.clone(), n, &Device::Cpu).unwrap();
    let ours = gelu_erf(&t).unwrap();
    assert_eq!(ours.dtype(), DType::F32);
    let reference = t.to_dtype(DType::F64).unwrap().gelu_erf().unwrap();
    let ours_v = ours.to_vec1::<f32>().unwrap();
    let ref_v = reference.to_vec1::<f64>().unwrap();
    let mut worst = 0f64;
    for ((&x, &o), &r) in xs.iter().zip(&ours_v).zip(&ref_v) {
        // f32 rounding of the input scale: ~1 ulp of max(1, |x|) plus the erf approximation.
        let err = (o as f64 - r).abs() / (x.abs() as f64).max(1.0);
        worst = worst.max(err);
    }
    assert!(worst < 2.5e-7, "max |gelu error| / max(1,|x|) = {worst:e}");
    // Tight on the range that matters for activations.
    let mid = excess(
        &ours.narrow(0, 0, 400_001).unwrap(),
        &reference.narrow(0, 0, 400_001).unwrap(),
        3e-7,
        2e-7,
    );
    assert!(mid <= 0.0, "gelu outside atol 3e-7 + rtol 2e-7 by {mid:e}");
}

#[test]
fn gelu_non_contiguous_and_half_types() {
    let dev = Device::Cpu;
    let t = Tensor::randn(0f32, 3.0, (4, 37, 64), &dev).unwrap();
    let tt = t.transpose(1, 2).unwrap();
    let reference = tt.to_dtype(DType::F64).unwrap().gelu_erf().unwrap();
    let ours = gelu_erf(&tt).unwrap();
    assert_eq!(ours.dims(), &[4, 64, 37]);
    assert!(excess(&ours, &reference, 3e-7, 3e-7) <= 0.0);

    for (dt, tol) in [(DType::F16, 1e-3), (DType::BF16, 8e-3)] {
        let th = t.to_dtype(dt).unwrap();
        let ours = gelu_erf(&th).unwrap();
        assert_eq!(ours.dtype(), dt);
        // Reference: exact GELU of the rounded input, rounded to the same type.
        let r = th
            .to_dtype(DType::F64)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let e = excess(&ours, &r, tol, tol);
        assert!(e <= 0.0, "{dt:?} gelu off by {e:e}");
    }
}

#[test]
fn gelu_keeps_gradients() {
    let v = Var::new(&[-1.5f32, -0.2, 0.0, 0.7, 2.0], &Device::Cpu).unwrap();
    let y = gelu_erf(v.as_tensor()).unwrap().sum_all().unwrap();
    let grads = y.backward().unwrap();
    let g = grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
    // d/dx gelu(x) = Phi(x) + x phi(x).
    let xs = [-1.5f64, -0.2, 0.0, 0.7, 2.0];
    for (x, gv) in xs.iter().zip(&g) {
        let phi = (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let cdf = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x / 2f64.sqrt()));
        let want = cdf + x * phi;
        assert!(
            (*gv as f64 - want).abs() < 1e-5,
            "grad at {x}: {gv} vs {want}"
        );
    }
}

#[test]
fn linear_tall_odd_shapes() {
    let dev = Device::Cpu;
    for (m, k, n) in [
        (1000usize, 70usize, 33usize),
        (49, 512, 96),
        (3, 5, 7),
        (300, 1, 9),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.2, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, n, &dev).unwrap();
        for bias in [Some(b.clone()), None] {
            let lin = candle_nn::Linear::new(w.clone(), bias);
            // f64 reference through candle's own Linear.
            let lin64 = candle_nn::Linear::new(
                w.to_dtype(DType::F64).unwrap(),
                lin.bias().map(|b| b.to_dtype(DType::F64).unwrap()),
            );
            let r = lin64.forward(&x.to_dtype(DType::F64).unwrap()).unwrap();
            let ours = internimage::ops::linear(&x, &lin).unwrap();
            let e = excess(&ours, &r, 1e-5, 1e-5);
            assert!(e <= 0.0, "linear ({m}, {k}, {n}) off by {e:e}");
            let g = linear_gelu(&x, &lin).unwrap();
            let e = excess(&g, &r.gelu_erf().unwrap(), 1e-5, 1e-5);
            assert!(e <= 0.0, "linear_gelu ({m}, {k}, {n}) off by {e:e}");
        }
    }
}

#[test]
fn linear_gelu_matches_unfused() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 7, 9, 48), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.3, (96, 48), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.5, 96, &dev).unwrap();
    for bias in [Some(b.clone()), None] {
        let lin = candle_nn::Linear::new(w.clone(), bias);
        let ours = linear_gelu(&x, &lin).unwrap();
        assert_eq!(ours.dims(), &[2, 7, 9, 96]);
        // Reference in f64 (a second f32 GEMM would differ by its own summation order): the
        // f32 result of a 48-term dot product of these magnitudes is within ~1e-5 of it.
        let f64_lin = candle_nn::Linear::new(
            w.to_dtype(DType::F64).unwrap(),
            lin.bias().map(|b| b.to_dtype(DType::F64).unwrap()),
        );
        let pre = f64_lin.forward(&x.to_dtype(DType::F64).unwrap()).unwrap();
        let reference = pre.gelu_erf().unwrap();
        let e = excess(&ours, &reference, 1e-5, 1e-5);
        assert!(e <= 0.0, "linear_gelu off by {e:e}");
        let plain = internimage::ops::linear(&x, &lin).unwrap();
        assert_eq!(plain.dims(), &[2, 7, 9, 96]);
        let e = excess(&plain, &pre, 1e-5, 1e-5);
        assert!(e <= 0.0, "linear off by {e:e}");
    }
}

/// Reference: candle's grouped conv2d on NCHW.
fn reference_dw(x: &Tensor, w: &Tensor, b: &Tensor, pad: usize) -> Tensor {
    let c = x.dim(3).unwrap();
    let nchw = x.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap();
    let y = nchw.conv2d(w, pad, 1, 1, c).unwrap();
    let y = y.broadcast_add(&b.reshape((1, c, 1, 1)).unwrap()).unwrap();
    y.permute((0, 2, 3, 1)).unwrap()
}

#[test]
fn depthwise_matches_grouped_conv2d() {
    let dev = Device::Cpu;
    // (n, h, w, c, k, pad): odd sizes, channel counts that exercise the 32/8/1 blocks, k 3 and 5.
    let cases = [
        (2, 9, 11, 64, 3, 1),
        (2, 7, 5, 45, 3, 1),
        (2, 13, 6, 80, 5, 2),
        (1, 4, 4, 3, 5, 2),
        (2, 8, 9, 40, 3, 0),
        (1, 3, 4, 17, 5, 1),
        (2, 1, 1, 33, 3, 1),
    ];
    for &(n, h, w, c, k, pad) in &cases {
        let x = Tensor::randn(0f32, 1.0, (n, h, w, c), &dev).unwrap();
        let wt = Tensor::randn(0f32, 0.5, (c, 1, k, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
        let ours = depthwise_conv2d_nhwc(&x, &wt, Some(&b), pad).unwrap();
        let reference = reference_dw(&x, &wt, &b, pad);
        assert_eq!(
            ours.dims(),
            reference.dims(),
            "case {:?}",
            (n, h, w, c, k, pad)
        );
        let e = excess(&ours, &reference, 1e-5, 1e-5);
        assert!(e <= 0.0, "case {:?}: off by {e:e}", (n, h, w, c, k, pad));

        // Without bias, and through the pre-packed module.
        let nob = DepthwiseConv2dNhwc::new(&wt, None, pad)
            .unwrap()
            .forward(&x)
            .unwrap();
        let zero = Tensor::zeros(c, DType::F32, &dev).unwrap();
        let e = excess(&nob, &reference_dw(&x, &wt, &zero, pad), 1e-5, 1e-5);
        assert!(
            e <= 0.0,
            "case {:?} (no bias): off by {e:e}",
            (n, h, w, c, k, pad)
        );
    }
}

#[test]
fn depthwise_strided_input_and_half_types() {
    let dev = Device::Cpu;
    let (n, h, w, c) = (2, 10, 7, 72);
    let nchw = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
    let x = nchw.permute((0, 2, 3, 1)).unwrap(); // non-contiguous NHWC view
    let wt = Tensor::randn(0f32, 0.5, (c, 1, 3, 3), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
    let reference = reference_dw(&x, &wt, &b, 1);
    let ours = depthwise_conv2d_nhwc(&x, &wt, Some(&b), 1).unwrap();
    assert!(excess(&ours, &reference, 1e-5, 1e-5) <= 0.0);

    for (dt, tol) in [(DType::F16, 1e-2), (DType::BF16, 6e-2)] {
        let ours = depthwise_conv2d_nhwc(
            &x.to_dtype(dt).unwrap(),
            &wt.to_dtype(dt).unwrap(),
            Some(&b.to_dtype(dt).unwrap()),
            1,
        )
        .unwrap();
        assert_eq!(ours.dtype(), dt);
        let e = excess(&ours, &reference, tol, tol);
        assert!(e <= 0.0, "{dt:?}: off by {e:e}");
    }

    // A slice of a larger tensor (contiguous with a start offset).
    let big = Tensor::randn(0f32, 1.0, (3, h, w, c), &dev).unwrap();
    let part = big.i(1..3).unwrap();
    let e = excess(
        &depthwise_conv2d_nhwc(&part, &wt, Some(&b), 1).unwrap(),
        &reference_dw(&part, &wt, &b, 1),
        1e-5,
        1e-5,
    );
    assert!(e <= 0.0);
}

#[test]
fn depthwise_rejects_bad_shapes() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 4, 4, 8), DType::F32, &dev).unwrap();
    let wt = Tensor::zeros((6, 1, 3, 3), DType::F32, &dev).unwrap();
    assert!(depthwise_conv2d_nhwc(&x, &wt, None, 1).is_err());
    let wt = Tensor::zeros((8, 2, 3, 3), DType::F32, &dev).unwrap();
    assert!(depthwise_conv2d_nhwc(&x, &wt, None, 1).is_err());
    let wt = Tensor::zeros((8, 1, 7, 7), DType::F32, &dev).unwrap();
    assert!(depthwise_conv2d_nhwc(&x, &wt, None, 1).is_err());
    let b = Tensor::zeros(5, DType::F32, &dev).unwrap();
    let wt = Tensor::zeros((8, 1, 3, 3), DType::F32, &dev).unwrap();
    assert!(depthwise_conv2d_nhwc(&x, &wt, Some(&b), 1).is_err());
}

#[test]
fn layer_norm_matches_f64_reference() {
    use internimage::ops::layer_norm_last_dim;
    let dev = Device::Cpu;
    for (shape, c) in [
        ((2usize, 5usize, 7usize), 64usize),
        ((1, 3, 4), 45),
        ((1, 1, 2), 3),
    ] {
        let x = (Tensor::randn(0f32, 2.0, (shape.0, shape.1, shape.2, c), &dev).unwrap() + 3.0)
            .unwrap();
        let w = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, c, &dev).unwrap();
        let ours = layer_norm_last_dim(&x, &w, &b, 1e-6).unwrap();
        let x64 = x.to_dtype(DType::F64).unwrap();
        let mean = x64.mean_keepdim(3).unwrap();
        let xc = x64.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(3).unwrap();
        let reference = xc
            .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w.to_dtype(DType::F64).unwrap())
            .unwrap()
            .broadcast_add(&b.to_dtype(DType::F64).unwrap())
            .unwrap();
        let e = excess(&ours, &reference, 2e-5, 2e-5);
        assert!(e <= 0.0, "layer norm C={c} off by {e:e}");
        // Non-contiguous input gives the same result.
        let xt = x.transpose(1, 2).unwrap();
        let ot = layer_norm_last_dim(&xt, &w, &b, 1e-6).unwrap();
        let rt = reference.transpose(1, 2).unwrap();
        assert!(excess(&ot, &rt, 2e-5, 2e-5) <= 0.0);
    }
    let x = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    let w = Tensor::ones(7, DType::F32, &dev).unwrap();
    assert!(layer_norm_last_dim(&x, &w, &w, 1e-6).is_err());
}

#[test]
fn softmax_groups_matches_candle() {
    use internimage::ops::softmax_groups;
    let dev = Device::Cpu;
    for (g, p) in [(4usize, 9usize), (3, 8), (5, 1), (2, 20)] {
        let x = (Tensor::randn(0f32, 4.0, (2, 6, 5, g * p), &dev).unwrap() + 10.0).unwrap();
        let ours = softmax_groups(&x, p).unwrap();
        let reference = candle_nn::ops::softmax(
            &x.to_dtype(DType::F64)
                .unwrap()
                .reshape((2, 6, 5, g, p))
                .unwrap(),
            4,
        )
        .unwrap()
        .reshape((2, 6, 5, g * p))
        .unwrap();
        let e = excess(&ours, &reference, 1e-7, 2e-6);
        assert!(e <= 0.0, "softmax groups ({g}, {p}) off by {e:e}");
    }
    // Extreme logits: no overflow, rows still sum to one.
    let x = Tensor::new(&[[1000f32, -1000.0, 0.0], [-80.0, -90.0, -100.0]], &dev).unwrap();
    let s = softmax_groups(&x, 3).unwrap().to_vec2::<f32>().unwrap();
    assert!((s[0][0] - 1.0).abs() < 1e-6 && s[0][1] < 1e-30);
    assert!((s[1].iter().sum::<f32>() - 1.0).abs() < 1e-6 && (s[1][0] - 0.999_954_6).abs() < 1e-6);
    assert!(softmax_groups(&x, 2).is_err());
}

#[test]
fn conv2d_nhwc_matches_candle_conv2d() {
    use internimage::ops::Conv2dNhwc;
    let dev = Device::Cpu;
    // (n, h, w, cin, cout, k, stride, pad): the stem/downsample 3x3 s2 p1 and odd sizes.
    for &(n, h, w, cin, cout, k, stride, pad) in &[
        (
            2usize, 15usize, 12usize, 3usize, 8usize, 3usize, 2usize, 1usize,
        ),
        (1, 14, 14, 16, 32, 3, 2, 1),
        (2, 7, 9, 5, 6, 3, 1, 1),
        (1, 8, 8, 4, 4, 1, 1, 0),
        (1, 3, 3, 2, 3, 3, 2, 0),
    ] {
        let x = Tensor::randn(0f32, 1.0, (n, h, w, cin), &dev).unwrap();
        let wt = Tensor::randn(0f32, 0.3, (cout, cin, k, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, cout, &dev).unwrap();
        for bias in [Some(&b), None] {
            let conv = Conv2dNhwc::new(&wt, bias, stride, pad).unwrap();
            let ours = conv.forward(&x).unwrap();
            let mut r = x
                .permute((0, 3, 1, 2))
                .unwrap()
                .conv2d(&wt, pad, stride, 1, 1)
                .unwrap();
            if let Some(b) = bias {
                r = r
                    .broadcast_add(&b.reshape((1, cout, 1, 1)).unwrap())
                    .unwrap();
            }
            let r = r.permute((0, 2, 3, 1)).unwrap();
            assert_eq!(ours.dims(), r.dims());
            let e = excess(&ours, &r, 1e-5, 1e-5);
            assert!(
                e <= 0.0,
                "conv case {:?} off by {e:e}",
                (n, h, w, cin, cout, k, stride, pad)
            );
        }
    }
    let x = Tensor::zeros((1, 4, 4, 3), DType::F32, &dev).unwrap();
    let wt = Tensor::zeros((8, 4, 3, 3), DType::F32, &dev).unwrap();
    assert!(Conv2dNhwc::new(&wt, None, 2, 1)
        .unwrap()
        .forward(&x)
        .is_err());
}

#[test]
fn mlp_matches_two_linears() {
    let dev = Device::Cpu;
    for (lead, c, hid) in [
        ((2usize, 17usize, 19usize), 24usize, 96usize),
        ((1, 56, 56), 16, 64),
        ((1, 3, 5), 8, 32),
    ] {
        let x = Tensor::randn(0f32, 1.0, (lead.0, lead.1, lead.2, c), &dev).unwrap();
        let fc1 = candle_nn::Linear::new(
            Tensor::randn(0f32, 0.3, (hid, c), &dev).unwrap(),
            Some(Tensor::randn(0f32, 0.3, hid, &dev).unwrap()),
        );
        let fc2 = candle_nn::Linear::new(
            Tensor::randn(0f32, 0.3, (c, hid), &dev).unwrap(),
            Some(Tensor::randn(0f32, 0.3, c, &dev).unwrap()),
        );
        // Packed (contiguous f32 weights, on AVX2 CPUs) and unpacked (a transposed view is not
        // packed) layers must give the same numbers.
        let layer = |l: &candle_nn::Linear, packed: bool| {
            let w = if packed {
                l.weight().clone()
            } else {
                l.weight().t().unwrap().contiguous().unwrap().t().unwrap()
            };
            internimage::ops::Linear::new(w, l.bias().cloned()).unwrap()
        };
        let unpacked = (layer(&fc1, false), layer(&fc2, false));
        assert!(!unpacked.0.is_packed() && !unpacked.1.is_packed());
        let packed = (layer(&fc1, true), layer(&fc2, true));
        let ours = internimage::ops::mlp(&x, &packed.0, &packed.1).unwrap();
        let ours_unpacked = internimage::ops::mlp(&x, &unpacked.0, &unpacked.1).unwrap();
        let f64lin = |l: &candle_nn::Linear| {
            candle_nn::Linear::new(
                l.weight().to_dtype(DType::F64).unwrap(),
                l.bias().map(|b| b.to_dtype(DType::F64).unwrap()),
            )
        };
        let h = f64lin(&fc1)
            .forward(&x.to_dtype(DType::F64).unwrap())
            .unwrap()
            .gelu_erf()
            .unwrap();
        let r = f64lin(&fc2).forward(&h).unwrap();
        assert_eq!(ours.dims(), r.dims());
        for (what, ours) in [("packed", &ours), ("unpacked", &ours_unpacked)] {
            let e = excess(ours, &r, 1e-5, 1e-5);
            assert!(e <= 0.0, "{what} mlp {:?} off by {e:e}", (lead, c, hid));
        }
        if packed.0.is_packed() {
            // Packed layers take f32 CPU input only, and say so.
            let e = packed
                .0
                .forward(&x.to_dtype(DType::F16).unwrap())
                .unwrap_err();
            assert!(e.to_string().contains("f32"), "{e}");
        }
        // Each layer alone, with and without GELU.
        for (what, l) in [("packed", &packed.0), ("unpacked", &unpacked.0)] {
            let y = l.forward(&x).unwrap();
            let r1 = f64lin(&fc1)
                .forward(&x.to_dtype(DType::F64).unwrap())
                .unwrap();
            assert!(excess(&y, &r1, 1e-5, 1e-5) <= 0.0, "{what} linear");
            let g = l.forward_gelu(&x).unwrap();
            assert!(excess(&g, &h, 1e-5, 1e-5) <= 0.0, "{what} linear + gelu");
        }
    }
}
