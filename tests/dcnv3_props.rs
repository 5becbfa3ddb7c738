//! DCNv3 core op: randomised comparison with a deliberately simple scalar reference, strided views,
//! batch sizes, NaN/inf offsets, bad input errors and a finite-difference check of the backward.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use common::{
    dcnv3_reference as reference, fd_seed, randn, to_f64_vec as vec_f64, FiniteDifference,
    ENV_FD_SEED,
};
use internimage::ops::dcnv3::{dcnv3, dcnv3_backward, Dcnv3Config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random_cfg(rng: &mut StdRng) -> Dcnv3Config {
    let ks = [1usize, 3, 3, 3, 5];
    let kh = ks[rng.random_range(0..ks.len())];
    let kw = if rng.random_bool(0.25) {
        ks[rng.random_range(0..ks.len())]
    } else {
        kh
    };
    let scales = [0.5, 1.0, 1.0, 2.0, 1.5];
    Dcnv3Config {
        kernel_h: kh,
        kernel_w: kw,
        stride_h: rng.random_range(1..=3),
        stride_w: rng.random_range(1..=3),
        pad_h: rng.random_range(0..=2),
        pad_w: rng.random_range(0..=2),
        dilation_h: rng.random_range(1..=2),
        dilation_w: rng.random_range(1..=2),
        group: rng.random_range(1..=4),
        group_channels: rng.random_range(1..=6),
        offset_scale: scales[rng.random_range(0..scales.len())],
        remove_center: kh == kw && kh >= 3 && rng.random_bool(0.3),
    }
}

struct Problem {
    cfg: Dcnv3Config,
    dims: (usize, usize, usize, usize),
    input: Vec<f64>,
    offset: Vec<f64>,
    mask: Vec<f64>,
    hout: usize,
    wout: usize,
}

impl Problem {
    fn random(rng: &mut StdRng) -> Self {
        loop {
            let cfg = random_cfg(rng);
            let n = [1, 1, 2, 3, 5][rng.random_range(0..5)];
            let (hin, win) = (rng.random_range(1..=10), rng.random_range(1..=10));
            let eh = cfg.dilation_h * (cfg.kernel_h - 1) + 1;
            let ew = cfg.dilation_w * (cfg.kernel_w - 1) + 1;
            if hin + 2 * cfg.pad_h < eh || win + 2 * cfg.pad_w < ew {
                continue;
            }
            return Self::new(rng, cfg, (n, hin, win));
        }
    }

    fn new(rng: &mut StdRng, cfg: Dcnv3Config, (n, hin, win): (usize, usize, usize)) -> Self {
        let ch = cfg.group * cfg.group_channels;
        let hout =
            (hin + 2 * cfg.pad_h - (cfg.dilation_h * (cfg.kernel_h - 1) + 1)) / cfg.stride_h + 1;
        let wout =
            (win + 2 * cfg.pad_w - (cfg.dilation_w * (cfg.kernel_w - 1) + 1)) / cfg.stride_w + 1;
        let np = cfg.kernel_h * cfg.kernel_w - usize::from(cfg.remove_center);
        let input = randn(rng, n * hin * win * ch, 1.0);
        let mut offset = randn(rng, n * hout * wout * cfg.group * np * 2, 1.5);
        // Some offsets far outside the image, some on integer positions.
        for o in offset.iter_mut() {
            let r: f64 = rng.random();
            if r < 0.05 {
                *o *= 40.0;
            } else if r < 0.1 {
                *o = o.round();
            }
        }
        let mask: Vec<f64> = (0..n * hout * wout * cfg.group * np)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Self {
            cfg,
            dims: (n, hin, win, ch),
            input,
            offset,
            mask,
            hout,
            wout,
        }
    }

    fn tensors(&self, dt: DType) -> (Tensor, Tensor, Tensor) {
        let (n, h, w, c) = self.dims;
        let np = self.cfg.points();
        let t = |v: &Vec<f64>, s: (usize, usize, usize, usize)| {
            Tensor::from_vec(v.clone(), s, &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap()
        };
        (
            t(&self.input, (n, h, w, c)),
            t(
                &self.offset,
                (n, self.hout, self.wout, self.cfg.group * np * 2),
            ),
            t(&self.mask, (n, self.hout, self.wout, self.cfg.group * np)),
        )
    }
}

fn assert_close(a: &[f64], b: &[f64], atol: f64, rtol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= atol + rtol * y.abs(),
            "{what}: element {i}: ours {x} reference {y}"
        );
    }
}

#[test]
fn random_against_scalar_reference() {
    let mut rng = StdRng::seed_from_u64(7);
    for it in 0..300 {
        let pb = Problem::random(&mut rng);
        let (expect, _, _) = reference(&pb.input, pb.dims, &pb.offset, &pb.mask, &pb.cfg);
        let what = format!("iteration {it} cfg {:?} dims {:?}", pb.cfg, pb.dims);
        // f64: same formula, only summation order differs.
        let (i, o, m) = pb.tensors(DType::F64);
        let out = dcnv3(&i, &o, &m, &pb.cfg).unwrap();
        assert_eq!(
            out.dims(),
            [pb.dims.0, pb.hout, pb.wout, pb.dims.3],
            "{what}"
        );
        assert_close(&vec_f64(&out), &expect, 1e-12, 1e-12, &what);
        // f32: inputs rounded to f32 (the reference sees the unrounded values): positions move by
        // ~|offset|*2^-24 (offsets up to ~300 px here), values by 2^-24 relative.
        let (i, o, m) = pb.tensors(DType::F32);
        let out = dcnv3(&i, &o, &m, &pb.cfg).unwrap();
        assert_close(&vec_f64(&out), &expect, 1e-4, 1e-4, &what);
    }
}

#[test]
fn strided_views_match_contiguous_exactly() {
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..20 {
        let pb = Problem::random(&mut rng);
        let (i, o, m) = pb.tensors(DType::F32);
        let base = dcnv3(&i, &o, &m, &pb.cfg).unwrap();
        let base_v = vec_f64(&base);
        // Permuted views: store NCHW, view as NHWC.
        let nchw_view = |t: &Tensor| {
            t.permute((0, 3, 1, 2))
                .unwrap()
                .contiguous()
                .unwrap()
                .permute((0, 2, 3, 1))
                .unwrap()
        };
        let (ip, op, mp) = (nchw_view(&i), nchw_view(&o), nchw_view(&m));
        assert!(!ip.is_contiguous() || pb.dims.3 == 1 || pb.dims.1 * pb.dims.2 == 1);
        assert_eq!(vec_f64(&dcnv3(&ip, &op, &mp, &pb.cfg).unwrap()), base_v);
        // Narrowed views with a non-zero start offset (contiguous or not).
        let pad = |t: &Tensor, d: usize| {
            Tensor::cat(&[&t.zeros_like().unwrap(), t, &t.zeros_like().unwrap()], d).unwrap()
        };
        let (n, _, _, c) = pb.dims;
        let in_b = pad(&i, 0).narrow(0, n, n).unwrap();
        let in_c = pad(&i, 3).narrow(3, c, c).unwrap();
        let off_c = pad(&o, 3)
            .narrow(3, o.dim(3).unwrap(), o.dim(3).unwrap())
            .unwrap();
        let mask_b = pad(&m, 0).narrow(0, n, n).unwrap();
        assert_eq!(
            vec_f64(&dcnv3(&in_b, &off_c, &mask_b, &pb.cfg).unwrap()),
            base_v
        );
        assert_eq!(vec_f64(&dcnv3(&in_c, &o, &m, &pb.cfg).unwrap()), base_v);
    }
}

#[test]
fn batches_are_independent() {
    // N = 3 and 5: each image equals the op on that image alone (the official CUDA op needs N
    // divisible by its im2col step; ours takes any N).
    let mut rng = StdRng::seed_from_u64(3);
    for n in [3usize, 5] {
        let cfg = Dcnv3Config::internimage(2, 3, 1.0);
        let pb = Problem::new(&mut rng, cfg, (n, 6, 7));
        let (i, o, m) = pb.tensors(DType::F32);
        let all = dcnv3(&i, &o, &m, &cfg).unwrap();
        for b in 0..n {
            let one = |t: &Tensor| t.narrow(0, b, 1).unwrap();
            let single = dcnv3(&one(&i), &one(&o), &one(&m), &cfg).unwrap();
            assert_eq!(vec_f64(&single), vec_f64(&all.i(b..b + 1).unwrap()));
        }
        let (expect, _, _) = reference(&pb.input, pb.dims, &pb.offset, &pb.mask, &cfg);
        assert_close(&vec_f64(&all), &expect, 1e-4, 1e-4, "batch");
    }
}

#[test]
fn non_finite_offsets_sample_nothing() {
    let mut rng = StdRng::seed_from_u64(5);
    let cfg = Dcnv3Config::internimage(2, 4, 1.0);
    let mut pb = Problem::new(&mut rng, cfg, (2, 5, 6));
    let bad = [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1e30,
        -1e30,
        f64::MAX,
        f64::MIN_POSITIVE,
    ];
    for (k, o) in pb.offset.iter_mut().enumerate() {
        if k % 3 == 0 {
            *o = bad[(k / 3) % bad.len()];
        }
    }
    let (expect, _, _) = reference(&pb.input, pb.dims, &pb.offset, &pb.mask, &cfg);
    for dt in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let (i, o, m) = pb.tensors(dt);
        let out = dcnv3(&i, &o, &m, &cfg).unwrap();
        let v = vec_f64(&out);
        assert!(v.iter().all(|x| x.is_finite()), "{dt:?}: non-finite output");
        if dt == DType::F32 || dt == DType::F64 {
            assert_close(&v, &expect, 1e-5, 1e-5, "non-finite offsets");
        }
        let go = out.ones_like().unwrap();
        let (gi, gof, gm) = dcnv3_backward(&i, &o, &m, &go, &cfg).unwrap();
        for (name, g) in [("input", gi), ("offset", gof), ("mask", gm)] {
            assert!(
                vec_f64(&g).iter().all(|x| x.is_finite()),
                "{dt:?}: non-finite grad {name}"
            );
        }
    }
    // A point that samples nothing has zero offset and mask gradients.
    let (i, o, m) = pb.tensors(DType::F64);
    let out = dcnv3(&i, &o, &m, &cfg).unwrap();
    let (_, gof, gm) = dcnv3_backward(&i, &o, &m, &out.ones_like().unwrap(), &cfg).unwrap();
    let (gof, gm) = (vec_f64(&gof), vec_f64(&gm));
    for (k, &x) in pb.offset.iter().enumerate() {
        if !x.is_finite() {
            assert_eq!(gm[k / 2], 0.0);
            assert_eq!(gof[k], 0.0);
        }
    }
}

/// Autograd against finite differences of the scalar reference (step 1e-6, tolerance
/// 1e-6 + 1e-6*|autograd|) for every element of the three inputs, on seeded random problems
/// (`INTERNIMAGE_FD_SEED` overrides the seed; a failure prints it). About 5% of the offsets are
/// integers, which put sampling points on the bilinear kinks: there the analytic gradient must
/// match one of the one-sided slopes (`FiniteDifference::accepts`).
#[test]
fn finite_differences_f64() {
    let seed = fd_seed(13);
    let mut rng = StdRng::seed_from_u64(seed);
    let cfgs = [
        Dcnv3Config::internimage(2, 3, 1.0),
        Dcnv3Config {
            stride_h: 2,
            dilation_w: 2,
            pad_w: 2,
            offset_scale: 2.0,
            remove_center: true,
            ..Dcnv3Config::internimage(1, 2, 1.0)
        },
        Dcnv3Config {
            kernel_h: 5,
            kernel_w: 5,
            pad_h: 2,
            pad_w: 2,
            ..Dcnv3Config::internimage(3, 1, 0.5)
        },
    ];
    for cfg in cfgs {
        let pb = Problem::new(&mut rng, cfg, (2, 4, 5));
        let (i, o, m) = pb.tensors(DType::F64);
        let gw = Tensor::from_vec(
            randn(&mut rng, pb.dims.0 * pb.hout * pb.wout * pb.dims.3, 1.0),
            (pb.dims.0, pb.hout, pb.wout, pb.dims.3),
            &Device::Cpu,
        )
        .unwrap();
        let gw_v = vec_f64(&gw);
        let loss = |inp: &[f64], off: &[f64], msk: &[f64]| -> f64 {
            let (out, _, _) = reference(inp, pb.dims, off, msk, &cfg);
            out.iter().zip(&gw_v).map(|(a, b)| a * b).sum()
        };
        // Autograd path.
        let (vi, vo, vm) = (
            Var::from_tensor(&i).unwrap(),
            Var::from_tensor(&o).unwrap(),
            Var::from_tensor(&m).unwrap(),
        );
        let out = dcnv3(vi.as_tensor(), vo.as_tensor(), vm.as_tensor(), &cfg).unwrap();
        let grads = (out * &gw).unwrap().sum_all().unwrap().backward().unwrap();
        let gi = vec_f64(grads.get(vi.as_tensor()).unwrap());
        let go = vec_f64(grads.get(vo.as_tensor()).unwrap());
        let gm = vec_f64(grads.get(vm.as_tensor()).unwrap());
        let eps = 1e-6;
        // Loss with element k of input `which` (0 input, 1 offset, 2 mask) moved by delta.
        let moved = |which: usize, k: usize, delta: f64| -> f64 {
            let (mut a, mut b, mut c) = (pb.input.clone(), pb.offset.clone(), pb.mask.clone());
            [&mut a, &mut b, &mut c][which][k] += delta;
            loss(&a, &b, &c)
        };
        for (which, g) in [(0usize, &gi), (1, &go), (2, &gm)] {
            for (k, &gk) in g.iter().enumerate() {
                let fd = FiniteDifference::of(&|d| moved(which, k, d), eps);
                assert!(
                    fd.accepts(gk, (1e-6, 1e-6)),
                    "cfg {cfg:?}: d/d{} [{k}]: autograd {gk}, finite difference {} \
                     (seed {seed}; set {ENV_FD_SEED} to rerun with another)",
                    ["input", "offset", "mask"][which],
                    fd.describe(),
                );
            }
        }
    }
}

#[test]
fn f32_gradients_match_f64() {
    let mut rng = StdRng::seed_from_u64(17);
    for _ in 0..30 {
        let pb = Problem::random(&mut rng);
        let (i, o, m) = pb.tensors(DType::F64);
        let go = Tensor::from_vec(
            randn(&mut rng, pb.dims.0 * pb.hout * pb.wout * pb.dims.3, 1.0),
            (pb.dims.0, pb.hout, pb.wout, pb.dims.3),
            &Device::Cpu,
        )
        .unwrap();
        let g64 = dcnv3_backward(&i, &o, &m, &go, &pb.cfg).unwrap();
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let g32 = dcnv3_backward(&f(&i), &f(&o), &f(&m), &f(&go), &pb.cfg).unwrap();
        // Inputs are already f32-representable? No: they are f64 draws, so f32 rounding moves the
        // sample positions by up to |offset| * 6e-8 (offsets reach ~300 px): 1e-3 absolute slack.
        for (a, b, name) in [
            (&g32.0, &g64.0, "input"),
            (&g32.1, &g64.1, "offset"),
            (&g32.2, &g64.2, "mask"),
        ] {
            let (a, b) = (vec_f64(a), vec_f64(b));
            for (k, (x, y)) in a.iter().zip(&b).enumerate() {
                // offsets rounded to integers sit on bilinear kinks where f32 rounding may pick the
                // other side; skip their offset gradients.
                if name == "offset" && pb.offset[k] == pb.offset[k].round() {
                    continue;
                }
                assert!(
                    (x - y).abs() <= 1e-3 + 1e-3 * y.abs(),
                    "{name}[{k}]: f32 {x} f64 {y} ({:?})",
                    pb.cfg
                );
            }
        }
    }
}

#[test]
fn bad_input_is_an_error() {
    let dev = Device::Cpu;
    let cfg = Dcnv3Config::internimage(2, 4, 1.0);
    let i = Tensor::zeros((1, 5, 6, 8), DType::F32, &dev).unwrap();
    let o = Tensor::zeros((1, 5, 6, 36), DType::F32, &dev).unwrap();
    let m = Tensor::zeros((1, 5, 6, 18), DType::F32, &dev).unwrap();
    assert!(dcnv3(&i, &o, &m, &cfg).is_ok());
    let err = |r: candle_core::Result<Tensor>| -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    };
    let z = |s: &[usize], dt: DType| Tensor::zeros(s, dt, &dev).unwrap();
    // dtype mismatch
    let e = err(dcnv3(&i, &o.to_dtype(DType::F16).unwrap(), &m, &cfg));
    assert!(
        e.contains("dtype") && e.contains("F16") && e.contains("F32"),
        "{e}"
    );
    let e = err(dcnv3(&i, &o, &m.to_dtype(DType::F64).unwrap(), &cfg));
    assert!(e.contains("mask") && e.contains("F64"), "{e}");
    // unsupported dtype
    let e = err(dcnv3(
        &z(&[1, 5, 6, 8], DType::U8),
        &z(&[1, 5, 6, 36], DType::U8),
        &z(&[1, 5, 6, 18], DType::U8),
        &cfg,
    ));
    assert!(e.contains("U8"), "{e}");
    // wrong rank
    let e = err(dcnv3(&z(&[5, 6, 8], DType::F32), &o, &m, &cfg));
    assert!(e.contains("rank") && e.contains("input"), "{e}");
    let e = err(dcnv3(&i, &z(&[1, 30, 36], DType::F32), &m, &cfg));
    assert!(e.contains("rank") && e.contains("offset"), "{e}");
    // last dims
    let e = err(dcnv3(&i, &z(&[1, 5, 6, 32], DType::F32), &m, &cfg));
    assert!(
        e.contains("offset") && e.contains("36") && e.contains("32"),
        "{e}"
    );
    let e = err(dcnv3(&i, &o, &z(&[1, 5, 6, 9], DType::F32), &cfg));
    assert!(
        e.contains("mask") && e.contains("18") && e.contains("9"),
        "{e}"
    );
    // spatial mismatch (offset for stride 1 given with a stride-2 config)
    let s2 = Dcnv3Config {
        stride_h: 2,
        stride_w: 2,
        ..cfg
    };
    let e = err(dcnv3(&i, &o, &m, &s2));
    assert!(
        e.contains("(1, 3, 3, 36)") && e.contains("(1, 5, 6, 36)"),
        "{e}"
    );
    let e = err(dcnv3(&i, &z(&[1, 5, 5, 36], DType::F32), &m, &cfg));
    assert!(
        e.contains("(1, 5, 6, 36)") && e.contains("(1, 5, 5, 36)"),
        "{e}"
    );
    // batch mismatch
    let e = err(dcnv3(&i, &z(&[2, 5, 6, 36], DType::F32), &m, &cfg));
    assert!(e.contains("offset"), "{e}");
    // channels
    let e = err(dcnv3(&z(&[1, 5, 6, 9], DType::F32), &o, &m, &cfg));
    assert!(
        e.contains("channels") && e.contains("8") && e.contains("9"),
        "{e}"
    );
    // zero-sized dims
    let e = err(dcnv3(
        &z(&[0, 5, 6, 8], DType::F32),
        &z(&[0, 5, 6, 36], DType::F32),
        &z(&[0, 5, 6, 18], DType::F32),
        &cfg,
    ));
    assert!(e.contains("zero"), "{e}");
    // remove_center with an even or non-square kernel
    for (kh, kw) in [(4, 4), (3, 5), (1, 1)] {
        let c = Dcnv3Config {
            kernel_h: kh,
            kernel_w: kw,
            remove_center: true,
            ..cfg
        };
        let e = err(dcnv3(&i, &o, &m, &c));
        assert!(
            e.contains("remove_center") && e.contains(&format!("{kh}x{kw}")),
            "{e}"
        );
    }
    // zero stride / dilation / kernel / group / group_channels
    for (name, c) in [
        ("stride_h", Dcnv3Config { stride_h: 0, ..cfg }),
        ("stride_w", Dcnv3Config { stride_w: 0, ..cfg }),
        (
            "dilation_h",
            Dcnv3Config {
                dilation_h: 0,
                ..cfg
            },
        ),
        (
            "dilation_w",
            Dcnv3Config {
                dilation_w: 0,
                ..cfg
            },
        ),
        ("kernel_h", Dcnv3Config { kernel_h: 0, ..cfg }),
        ("group", Dcnv3Config { group: 0, ..cfg }),
        (
            "group_channels",
            Dcnv3Config {
                group_channels: 0,
                ..cfg
            },
        ),
    ] {
        let e = err(dcnv3(&i, &o, &m, &c));
        assert!(e.contains(name), "{name}: {e}");
    }
    let e = err(dcnv3(
        &i,
        &o,
        &m,
        &Dcnv3Config {
            offset_scale: f64::NAN,
            ..cfg
        },
    ));
    assert!(e.contains("offset_scale"), "{e}");
    // kernel larger than the padded input
    let big = Dcnv3Config {
        kernel_h: 9,
        kernel_w: 9,
        pad_h: 0,
        pad_w: 0,
        ..cfg
    };
    let e = err(dcnv3(&i, &o, &m, &big));
    assert!(e.contains("smaller than the dilated kernel"), "{e}");
    // backward: grad_out shape
    let r = dcnv3_backward(&i, &o, &m, &z(&[1, 5, 6, 7], DType::F32), &cfg);
    assert!(r.is_err());
    // the raw op refuses non-contiguous arguments instead of misreading them
    let ip = i
        .permute((0, 2, 1, 3))
        .unwrap()
        .contiguous()
        .unwrap()
        .permute((0, 2, 1, 3))
        .unwrap();
    let r = ip.apply_op3_no_bwd(&o, &m, &internimage::ops::dcnv3::Dcnv3Op::new(cfg));
    assert!(r.unwrap_err().to_string().contains("contiguous"));
    // ... and mixed dtypes, naming the argument
    let o16 = o.to_dtype(DType::F16).unwrap();
    let r = i.apply_op3_no_bwd(&o16, &m, &internimage::ops::dcnv3::Dcnv3Op::new(cfg));
    let e = r.unwrap_err().to_string();
    assert!(e.contains("offset") && e.contains("to_dtype"), "{e}");
    // ... and dtypes without a kernel
    let iu = i.to_dtype(DType::U8).unwrap();
    let (ou, mu) = (
        o.to_dtype(DType::U8).unwrap(),
        m.to_dtype(DType::U8).unwrap(),
    );
    let r = iu.apply_op3_no_bwd(&ou, &mu, &internimage::ops::dcnv3::Dcnv3Op::new(cfg));
    let e = r.unwrap_err().to_string();
    assert!(e.contains("supported dtypes"), "{e}");
}

/// Sizes whose products overflow (a group of 2^63+1 wraps group*group_channels back to the real
/// channel count; a pad near usize::MAX wraps the padded size) are config errors for DCNv3 and
/// DCNv4 alike, never an overflow panic or a huge allocation; so are the same pads in the
/// depthwise convolution, and an output too large to allocate.
#[test]
fn overflowing_sizes_are_errors() {
    use internimage::ops::dcnv4::dcnv4;
    use internimage::ops::depthwise_conv2d_nhwc;
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (1, 4, 4, 2), &dev).unwrap();
    let base = Dcnv3Config::internimage(1, 2, 1.0);
    let wrap = Dcnv3Config {
        kernel_h: 2,
        kernel_w: 1,
        pad_h: 0,
        pad_w: 0,
        group: (1usize << 63) + 1,
        ..base
    };
    let cases = [
        ("group*group_channels", wrap),
        (
            "pad_h",
            Dcnv3Config {
                pad_h: usize::MAX,
                ..base
            },
        ),
        (
            "pad_w",
            Dcnv3Config {
                pad_w: 1 << 63,
                ..base
            },
        ),
        (
            "dilation_h*(kernel_h-1)+1",
            Dcnv3Config {
                dilation_h: usize::MAX,
                ..base
            },
        ),
        (
            "kernel_h*kernel_w",
            Dcnv3Config {
                kernel_h: 1 << 40,
                kernel_w: 1 << 40,
                ..base
            },
        ),
        (
            "group*P*3",
            Dcnv3Config {
                group: 1 << 29,
                group_channels: 1,
                ..base
            },
        ),
    ];
    for (name, cfg) in cases {
        // Shapes that the wrapped arithmetic would have accepted.
        let o = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev).unwrap();
        let m = Tensor::ones((1, 3, 4, 2), DType::F32, &dev).unwrap();
        let e = dcnv3(&x, &o, &m, &cfg).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("too large"), "{name}: {e}");
        let om = Tensor::zeros((1, 3, 4, 8), DType::F32, &dev).unwrap();
        let e = dcnv4(&x, &om, &cfg).unwrap_err().to_string();
        assert!(e.starts_with("dcnv4:") && e.contains(name), "{name}: {e}");
    }
    let w = Tensor::randn(0f32, 1., (2, 1, 3, 3), &dev).unwrap();
    for pad in [usize::MAX, (1usize << 63) + 1] {
        let e = depthwise_conv2d_nhwc(&x, &w, None, pad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("depthwise conv") && e.contains("too large"),
            "pad {pad}: {e}"
        );
    }
    // Paddings that fit the arithmetic but not the memory (the first: (1, 200001, 200001, 2)
    // floats; the second: an element count that overflows).
    for pad in [100_000, 1 << 62] {
        let e = depthwise_conv2d_nhwc(&x, &w, None, pad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("larger than this machine can allocate"),
            "pad {pad}: {e}"
        );
    }
}

#[test]
fn non_finite_input_values_match_reference() {
    // Inputs with inf/NaN take the kernel that reads only in-image corners; the result must
    // match the reference element for element, non-finite entries included (NaN where any
    // in-image corner read is NaN or inf times a zero weight, like the official op).
    let mut rng = StdRng::seed_from_u64(23);
    for _ in 0..40 {
        let mut pb = Problem::random(&mut rng);
        let len = pb.input.len();
        for _ in 0..(len / 50).max(1) {
            let k = rng.random_range(0..len);
            pb.input[k] = [f64::INFINITY, f64::NEG_INFINITY, f64::NAN][rng.random_range(0..3)];
        }
        let (expect, _, _) = reference(&pb.input, pb.dims, &pb.offset, &pb.mask, &pb.cfg);
        for dt in [DType::F64, DType::F32] {
            let (i, o, m) = pb.tensors(dt);
            let got = vec_f64(&dcnv3(&i, &o, &m, &pb.cfg).unwrap());
            for (k, (x, y)) in got.iter().zip(&expect).enumerate() {
                let same = if y.is_finite() {
                    (x - y).abs() <= 1e-4 + 1e-4 * y.abs()
                } else {
                    x.is_nan() == y.is_nan() && (y.is_nan() || x == y)
                };
                assert!(
                    same,
                    "{dt:?} element {k}: ours {x} reference {y} ({:?})",
                    pb.cfg
                );
            }
        }
    }
}

#[test]
fn thread_count_does_not_change_results() {
    // Forward: every output element is computed by one task in a fixed order, so any pool size
    // gives bit-identical results. Backward: with fewer images than threads an image's input
    // gradient is summed from per-range buffers, so only the summation order changes.
    let mut rng = StdRng::seed_from_u64(29);
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let four = rayon::ThreadPoolBuilder::new()
        .num_threads(4)
        .build()
        .unwrap();
    for n in [1usize, 3, 6] {
        let cfg = Dcnv3Config::internimage(3, 5, 1.0);
        let pb = Problem::new(&mut rng, cfg, (n, 9, 11));
        let (i, o, m) = pb.tensors(DType::F32);
        let go = i.ones_like().unwrap().affine(0.5, -0.25).unwrap();
        let run = |pool: &rayon::ThreadPool| {
            pool.install(|| {
                let out = dcnv3(&i, &o, &m, &cfg).unwrap();
                let g = dcnv3_backward(&i, &o, &m, &go, &cfg).unwrap();
                (vec_f64(&out), vec_f64(&g.0), vec_f64(&g.1), vec_f64(&g.2))
            })
        };
        let (a, b) = (run(&one), run(&four));
        assert_eq!(a.0, b.0, "forward differs between 1 and 4 threads (n={n})");
        assert_close(&b.1, &a.1, 1e-5, 1e-5, "grad_input 4 vs 1 threads");
        assert_eq!(a.2, b.2, "grad_offset differs (n={n})");
        assert_eq!(a.3, b.3, "grad_mask differs (n={n})");
    }
}
