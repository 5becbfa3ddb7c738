//! The DCNv3 and DCNv4 CPU kernels on every instruction set this CPU supports (`Isa::supported()`,
//! portable included), on seeded random problems chosen to reach every kernel variant: group
//! widths that are multiples of 16, of 8 and odd ones (each register block of the channel
//! loops), f32 and f64, images with NaN/inf values (the per-pixel exact
//! fallback), strides, dilations and remove_center. Forward against the scalar f64 reference,
//! backward (through autograd) against the portable f64 gradients, DCNv4 against DCNv3 on the same
//! values. (The official goldens run on every instruction set in `kernel_policy.rs`.)

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use common::{dcnv3_reference, randn, to_f64_vec};
use internimage::ops::dcnv3::{dcnv3_with, Dcnv3Config, Dcnv3Op};
use internimage::ops::dcnv4::{dcnv4_with, offset_mask_channels, Dcnv4Op};
use internimage::{Isa, KernelPolicy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One random problem: config, (N, H, W, C) and the values (f64).
struct Problem {
    cfg: Dcnv3Config,
    dims: (usize, usize, usize, usize),
    hout: usize,
    wout: usize,
    input: Vec<f64>,
    offset: Vec<f64>,
    mask: Vec<f64>,
    grad_out: Vec<f64>,
}

impl Problem {
    fn new(rng: &mut StdRng, cfg: Dcnv3Config, (n, h, w): (usize, usize, usize)) -> Self {
        let c = cfg.group * cfg.group_channels;
        let (hout, wout) = cfg.output_size(h, w).unwrap();
        let np = cfg.points();
        let pts = n * hout * wout * cfg.group * np;
        Self {
            cfg,
            dims: (n, h, w, c),
            hout,
            wout,
            input: randn(rng, n * h * w * c, 1.0),
            // Up to a few pixels: points inside, on the border and outside the image.
            offset: randn(rng, 2 * pts, 2.0),
            mask: (0..pts).map(|_| rng.random_range(-0.5..1.0)).collect(),
            grad_out: randn(rng, n * hout * wout * c, 1.0),
        }
    }

    fn tensors(&self, dt: DType) -> [Tensor; 4] {
        let (n, h, w, c) = self.dims;
        let (ho, wo, gp) = (self.hout, self.wout, self.cfg.group * self.cfg.points());
        let t = |v: &[f64], s: (usize, usize, usize, usize)| {
            Tensor::from_vec(v.to_vec(), s, &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap()
        };
        [
            t(&self.input, (n, h, w, c)),
            t(&self.offset, (n, ho, wo, 2 * gp)),
            t(&self.mask, (n, ho, wo, gp)),
            t(&self.grad_out, (n, ho, wo, c)),
        ]
    }

    /// The offsets and masks packed into DCNv4's (N, H, W, K_pad) offset_mask (padding 1e9, which
    /// must never be read).
    fn offset_mask(&self, dt: DType) -> Tensor {
        let (n, _, _, _) = self.dims;
        let (g, np) = (self.cfg.group, self.cfg.points());
        let k_pad = offset_mask_channels(&self.cfg);
        let pixels = n * self.hout * self.wout;
        let mut om = vec![1e9; pixels * k_pad];
        for pix in 0..pixels {
            for grp in 0..g {
                let row = &mut om[pix * k_pad + grp * 3 * np..pix * k_pad + (grp + 1) * 3 * np];
                let o = (pix * g + grp) * 2 * np;
                row[..2 * np].copy_from_slice(&self.offset[o..o + 2 * np]);
                let m = (pix * g + grp) * np;
                row[2 * np..].copy_from_slice(&self.mask[m..m + np]);
            }
        }
        Tensor::from_vec(om, (n, self.hout, self.wout, k_pad), &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }
}

/// The configurations: InternImage's 3x3 at several group widths, plus strided, dilated,
/// 5x5 and remove_center variants at 16-channel groups.
fn configs() -> Vec<Dcnv3Config> {
    let mut cfgs: Vec<Dcnv3Config> = [(4, 16), (2, 32), (1, 48), (3, 8), (2, 5), (1, 1), (2, 24)]
        .into_iter()
        .map(|(g, cg)| Dcnv3Config::internimage(g, cg, 1.0))
        .collect();
    cfgs.push(Dcnv3Config {
        stride_h: 2,
        stride_w: 2,
        dilation_w: 2,
        pad_w: 2,
        offset_scale: 0.5,
        ..Dcnv3Config::internimage(2, 16, 1.0)
    });
    cfgs.push(Dcnv3Config {
        kernel_h: 5,
        kernel_w: 5,
        pad_h: 2,
        pad_w: 2,
        remove_center: true,
        offset_scale: 2.0,
        ..Dcnv3Config::internimage(1, 16, 1.0)
    });
    cfgs
}

fn policy(isa: Isa) -> KernelPolicy {
    KernelPolicy::with_isa(isa).unwrap()
}

/// The gradients of `sum(out * grad_out)`.
fn backward_of(out: Tensor, grad_out: &Tensor) -> GradStore {
    (out * grad_out)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}

/// Gradients (input, offset, mask) of `sum(dcnv3(..) * grad_out)` through autograd with the
/// kernels of `isa`.
fn dcnv3_grads(t: &[Tensor; 4], cfg: Dcnv3Config, isa: Isa) -> [Vec<f64>; 3] {
    let vars = [&t[0], &t[1], &t[2]].map(|x| Var::from_tensor(x).unwrap());
    let out = vars[0]
        .apply_op3(&vars[1], &vars[2], Dcnv3Op::with_isa(cfg, isa))
        .unwrap();
    let grads = backward_of(out, &t[3]);
    vars.map(|v| to_f64_vec(grads.get(&v).unwrap()))
}

/// Gradients (input, offset_mask) of `sum(dcnv4(input, om) * grad_out)` through autograd with
/// the kernels of `isa` (`t` as from `Problem::tensors`).
fn dcnv4_grads(t: &[Tensor; 4], om: &Tensor, cfg: Dcnv3Config, isa: Isa) -> (Vec<f64>, Vec<f64>) {
    let (vi, vom) = (
        Var::from_tensor(&t[0]).unwrap(),
        Var::from_tensor(om).unwrap(),
    );
    let out = vi.apply_op2(&vom, Dcnv4Op::with_isa(cfg, isa)).unwrap();
    let grads = backward_of(out, &t[3]);
    (
        to_f64_vec(grads.get(&vi).unwrap()),
        to_f64_vec(grads.get(&vom).unwrap()),
    )
}

/// `|got - want| <= atol + rtol*|want|` elementwise; panics naming `what` and the element.
fn assert_close(got: &[f64], want: &[f64], (atol, rtol): (f64, f64), what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (k, (x, y)) in got.iter().zip(want).enumerate() {
        assert!(
            (x - y).abs() <= atol + rtol * y.abs(),
            "{what}[{k}]: got {x}, expected {y}"
        );
    }
}

#[test]
fn dcnv3_forward_and_backward_on_every_isa() {
    let isas = Isa::supported();
    assert!(isas.contains(&Isa::Portable));
    let mut rng = StdRng::seed_from_u64(41);
    for cfg in configs() {
        let pb = Problem::new(&mut rng, cfg, (2, 7, 9));
        let (want, _, _) = dcnv3_reference(&pb.input, pb.dims, &pb.offset, &pb.mask, &cfg);
        let t64 = pb.tensors(DType::F64);
        let g_ref = dcnv3_grads(&t64, cfg, Isa::Portable);
        for &isa in &isas {
            for (dt, tol, gtol) in [
                (DType::F64, (1e-12, 1e-12), (1e-10, 1e-10)),
                // f32: rounding the offsets moves the sampling positions by ~1e-7 px.
                (DType::F32, (1e-5, 1e-5), (1e-3, 1e-3)),
            ] {
                let t = pb.tensors(dt);
                let out = dcnv3_with(&t[0], &t[1], &t[2], &cfg, policy(isa)).unwrap();
                let what = format!("{isa} {dt:?} {cfg:?}");
                assert_close(&to_f64_vec(&out), &want, tol, &format!("{what} out"));
                let g = dcnv3_grads(&t, cfg, isa);
                for (k, name) in ["grad_input", "grad_offset", "grad_mask"]
                    .iter()
                    .enumerate()
                {
                    assert_close(&g[k], &g_ref[k], gtol, &format!("{what} {name}"));
                }
            }
        }
    }
}

/// Inputs with NaN/inf values: where the reference is finite, so is every instruction set's
/// result, and the same; where it is NaN or inf, the same non-finite value (a zero-weight tap on
/// a non-finite value must not spoil a pixel).
#[test]
fn non_finite_inputs_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(43);
    for cfg in configs() {
        let mut pb = Problem::new(&mut rng, cfg, (1, 8, 9));
        let len = pb.input.len();
        for _ in 0..(len / 40).max(1) {
            let k = rng.random_range(0..len);
            pb.input[k] = [f64::INFINITY, f64::NEG_INFINITY, f64::NAN][rng.random_range(0..3)];
        }
        let (want, _, _) = dcnv3_reference(&pb.input, pb.dims, &pb.offset, &pb.mask, &cfg);
        for isa in Isa::supported() {
            for dt in [DType::F32, DType::F64] {
                let t = pb.tensors(dt);
                let out = dcnv3_with(&t[0], &t[1], &t[2], &cfg, policy(isa)).unwrap();
                for (k, (x, y)) in to_f64_vec(&out).iter().zip(&want).enumerate() {
                    let same = if y.is_finite() {
                        (x - y).abs() <= 1e-5 + 1e-5 * y.abs()
                    } else {
                        x.is_nan() == y.is_nan() && (y.is_nan() || x == y)
                    };
                    assert!(same, "{isa} {dt:?} {cfg:?} [{k}]: got {x}, expected {y}");
                }
            }
        }
    }
}

/// DCNv4 runs the DCNv3 kernels on its packed offset_mask: on every instruction set its output
/// and gradients equal DCNv3's on the unpacked values, and its padding columns get a zero
/// gradient.
#[test]
fn dcnv4_matches_dcnv3_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(47);
    for cfg in configs() {
        let pb = Problem::new(&mut rng, cfg, (2, 6, 7));
        let (g, np) = (cfg.group, cfg.points());
        let k_pad = offset_mask_channels(&cfg);
        for isa in Isa::supported() {
            for dt in [DType::F32, DType::F64] {
                let t = pb.tensors(dt);
                let om = pb.offset_mask(dt);
                let what = format!("{isa} {dt:?} {cfg:?}");
                let v3 = dcnv3_with(&t[0], &t[1], &t[2], &cfg, policy(isa)).unwrap();
                let v4 = dcnv4_with(&t[0], &om, &cfg, policy(isa)).unwrap();
                assert_close(
                    &to_f64_vec(&v4),
                    &to_f64_vec(&v3),
                    (1e-6, 1e-6),
                    &format!("{what} out"),
                );
                let g3 = dcnv3_grads(&t, cfg, isa);
                let (gi, gom) = dcnv4_grads(&t, &om, cfg, isa);
                assert_close(&gi, &g3[0], (1e-6, 1e-6), &format!("{what} grad_input"));
                // Unpack the offset_mask gradient into DCNv3's two layouts.
                let (mut go, mut gm) = (Vec::new(), Vec::new());
                for row in gom.chunks_exact(k_pad) {
                    for grp in 0..g {
                        let r = &row[grp * 3 * np..(grp + 1) * 3 * np];
                        go.extend_from_slice(&r[..2 * np]);
                        gm.extend_from_slice(&r[2 * np..]);
                    }
                    assert!(
                        row[g * 3 * np..].iter().all(|&x| x == 0.0),
                        "{what}: padding gradient"
                    );
                }
                assert_close(&go, &g3[1], (1e-6, 1e-6), &format!("{what} grad_offset"));
                assert_close(&gm, &g3[2], (1e-6, 1e-6), &format!("{what} grad_mask"));
            }
        }
    }
}

/// The DCNv4 forward copies its packed rows into the dense point order in blocks of pixels
/// (runs of several pixels, blocks that straddle images, a partial last block, several parallel
/// tasks) and then runs DCNv3's arithmetic: bit for bit DCNv3's output on the unpacked values,
/// f32, every instruction set.
#[test]
fn dcnv4_forward_is_dcnv3_bit_for_bit_across_blocks() {
    let mut rng = StdRng::seed_from_u64(59);
    // G*P = 36 (runs of four pixels), 72 (two), 45 (one); 3 images of 13x11.
    for (g, cg) in [(4, 16), (8, 8), (5, 16)] {
        let cfg = Dcnv3Config::internimage(g, cg, 1.0);
        let pb = Problem::new(&mut rng, cfg, (3, 13, 11));
        for isa in Isa::supported() {
            let t = pb.tensors(DType::F32);
            let v3 = dcnv3_with(&t[0], &t[1], &t[2], &cfg, policy(isa)).unwrap();
            let v4 = dcnv4_with(&t[0], &pb.offset_mask(DType::F32), &cfg, policy(isa)).unwrap();
            let (a, b) = (to_f64_vec(&v3), to_f64_vec(&v4));
            assert_eq!(a.len(), b.len());
            let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            assert_eq!(differ, 0, "{isa} G={g}: {differ} values differ from DCNv3");
        }
    }
}

/// Images at and below the 2x2 the AVX-512 f32 forward needs (its 2x2 windows are moved inside
/// the image; thinner images take the AVX2 kernel), and 2-pixel-wide ones where every point
/// touches a border: every instruction set against the reference, DCNv3 and DCNv4.
#[test]
fn tiny_and_thin_images_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(53);
    for (h, w) in [(1, 1), (1, 6), (5, 1), (2, 2), (2, 9), (7, 2)] {
        for cfg in [
            Dcnv3Config::internimage(4, 16, 1.0),
            Dcnv3Config::internimage(2, 24, 1.0),
        ] {
            let pb = Problem::new(&mut rng, cfg, (2, h, w));
            let (want, _, _) = dcnv3_reference(&pb.input, pb.dims, &pb.offset, &pb.mask, &cfg);
            for isa in Isa::supported() {
                let t = pb.tensors(DType::F32);
                let what = format!("{isa} {h}x{w} {cfg:?}");
                let out = dcnv3_with(&t[0], &t[1], &t[2], &cfg, policy(isa)).unwrap();
                assert_close(
                    &to_f64_vec(&out),
                    &want,
                    (1e-5, 1e-5),
                    &format!("{what} v3"),
                );
                let v4 = dcnv4_with(&t[0], &pb.offset_mask(DType::F32), &cfg, policy(isa));
                assert_close(
                    &to_f64_vec(&v4.unwrap()),
                    &want,
                    (1e-5, 1e-5),
                    &format!("{what} v4"),
                );
            }
        }
    }
}

/// An image big enough to be gathered from a cache-line-aligned copy when it does not start on
/// 32 bytes (the forward's `LineAligned`): the same values stored at every start within a line
/// (a view into a larger buffer, 0..15 elements in) give bitwise the same output on every
/// instruction set, DCNv3 and DCNv4, f32 and f64, and that output matches the reference.
#[test]
fn output_does_not_depend_on_where_the_image_starts() {
    let mut rng = StdRng::seed_from_u64(59);
    let cfg = Dcnv3Config::internimage(4, 16, 1.0);
    // 1 x 24 x 24 x 64 = 144 KiB in f32 (288 KiB in f64), above the copy's 64 KiB threshold.
    let pb = Problem::new(&mut rng, cfg, (1, 24, 24));
    let (want, _, _) = dcnv3_reference(&pb.input, pb.dims, &pb.offset, &pb.mask, &cfg);
    let len = pb.input.len();
    for (dt, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
        let t = pb.tensors(dt);
        let om = pb.offset_mask(dt);
        for isa in Isa::supported() {
            let mut first: Option<(Vec<f64>, Vec<f64>)> = None;
            for shift in 0..16 {
                // The image `shift` elements into a buffer that starts wherever the allocator
                // put it.
                let buf = Tensor::cat(
                    &[
                        &Tensor::zeros(shift, dt, &Device::Cpu).unwrap(),
                        &t[0].flatten_all().unwrap(),
                    ],
                    0,
                )
                .unwrap();
                let img = buf
                    .narrow(0, shift, len)
                    .unwrap()
                    .reshape(t[0].shape())
                    .unwrap();
                let v3 = to_f64_vec(&dcnv3_with(&img, &t[1], &t[2], &cfg, policy(isa)).unwrap());
                let v4 = to_f64_vec(&dcnv4_with(&img, &om, &cfg, policy(isa)).unwrap());
                let what = format!("{isa} {dt:?} image {shift} elements in");
                match &first {
                    None => {
                        assert_close(&v3, &want, (tol, tol), &what);
                        first = Some((v3, v4));
                    }
                    Some((f3, f4)) => {
                        assert!(
                            &v3 == f3,
                            "{what}: DCNv3 output differs from the image at 0"
                        );
                        assert!(
                            &v4 == f4,
                            "{what}: DCNv4 output differs from the image at 0"
                        );
                    }
                }
            }
        }
    }
}

/// The backward on every instruction set against the portable f64 gradients where the AVX-512
/// kernel's shortcuts matter: images of 1 and 2 pixels per side (every point's window crosses
/// the border, whose zeros it reads and whose input gradient it must not write), and a single
/// image (its output pixels cut into ranges that scatter into private buffers), DCNv3 and DCNv4.
#[test]
fn backward_on_tiny_images_and_split_ranges_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(61);
    let mut cases = Vec::new();
    for (n, h, w) in [
        (2, 1, 1),
        (2, 2, 2),
        (2, 1, 6),
        (2, 7, 2),
        (1, 9, 11),
        (1, 16, 5),
    ] {
        for cfg in [
            Dcnv3Config::internimage(4, 16, 1.0),
            Dcnv3Config::internimage(2, 24, 1.0),
        ] {
            cases.push(Problem::new(&mut rng, cfg, (n, h, w)));
        }
    }
    for pb in &cases {
        let cfg = pb.cfg;
        let g_ref = dcnv3_grads(&pb.tensors(DType::F64), cfg, Isa::Portable);
        for isa in Isa::supported() {
            let t = pb.tensors(DType::F32);
            let what = format!("{isa} {:?} {cfg:?}", pb.dims);
            let g = dcnv3_grads(&t, cfg, isa);
            for (k, name) in ["grad_input", "grad_offset", "grad_mask"]
                .iter()
                .enumerate()
            {
                assert_close(&g[k], &g_ref[k], (1e-3, 1e-3), &format!("{what} {name}"));
            }
            let (gi, _) = dcnv4_grads(&t, &pb.offset_mask(DType::F32), cfg, isa);
            assert_close(
                &gi,
                &g_ref[0],
                (1e-3, 1e-3),
                &format!("{what} v4 grad_input"),
            );
        }
    }
}

/// Gradients with NaN/inf in the image and in grad_out: on every instruction set each gradient
/// element is finite exactly where the portable kernel's is (and then close to it), and
/// otherwise the same non-finite value (NaN, or the same infinity). A corner outside the image
/// contributes nothing, even where grad_out is not finite.
#[test]
fn non_finite_gradients_on_every_isa() {
    let mut rng = StdRng::seed_from_u64(67);
    for cfg in configs() {
        let mut pb = Problem::new(&mut rng, cfg, (1, 8, 9));
        for v in [&mut pb.input, &mut pb.grad_out] {
            let len = v.len();
            for _ in 0..(len / 60).max(1) {
                let k = rng.random_range(0..len);
                v[k] = [f64::INFINITY, f64::NEG_INFINITY, f64::NAN][rng.random_range(0..3)];
            }
        }
        let t = pb.tensors(DType::F32);
        let want = dcnv3_grads(&t, cfg, Isa::Portable);
        for isa in Isa::supported() {
            let got = dcnv3_grads(&t, cfg, isa);
            for (k, name) in ["grad_input", "grad_offset", "grad_mask"]
                .iter()
                .enumerate()
            {
                for (i, (x, y)) in got[k].iter().zip(&want[k]).enumerate() {
                    let same = if y.is_finite() {
                        (x - y).abs() <= 1e-3 + 1e-3 * y.abs()
                    } else {
                        x.is_nan() == y.is_nan() && (y.is_nan() || x == y)
                    };
                    assert!(same, "{isa} {cfg:?} {name}[{i}]: got {x}, expected {y}");
                }
            }
        }
    }
}
