//! DCNv3 core op on network-sized and odd shapes (1x128x128x64 as in InternImage-T stage 1 at 512,
//! batches at 64x64, 1x97x131x48) with hostile offsets: sampling points just below the image's
//! right/bottom edge (where `x + 1` rounds up to `W + 1` when W is a power of two), far outside
//! it (±1e3, ±1e30), NaN and ±inf, and masks of any sign and size. The forward is compared with
//! the scalar f64 reference of `tests/common`; the backward is checked on its exact linearity
//! identities. None of it may panic.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{dcnv3_reference, randn, to_f64_vec};
use internimage::ops::dcnv3::{dcnv3, dcnv3_backward, Dcnv3Config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One problem: config, input dims (N, H, W, C) and f64 values (rounded to the test dtype before
/// both the op and the reference see them).
struct Case {
    cfg: Dcnv3Config,
    dims: (usize, usize, usize, usize),
    input: Vec<f64>,
    offset: Vec<f64>,
    mask: Vec<f64>,
}

impl Case {
    fn out_hw(&self) -> (usize, usize) {
        let (_, h, w, _) = self.dims;
        self.cfg.output_size(h, w).unwrap()
    }

    fn points(&self) -> usize {
        self.cfg.points()
    }

    /// Random input, offsets ~N(0, 2) and masks in [-1, 2).
    fn random(rng: &mut StdRng, cfg: Dcnv3Config, (n, h, w): (usize, usize, usize)) -> Self {
        let c = cfg.group * cfg.group_channels;
        let (ho, wo) = cfg.output_size(h, w).unwrap();
        let gp = cfg.group * cfg.points();
        let input = randn(rng, n * h * w * c, 1.0);
        let offset = randn(rng, n * ho * wo * gp * 2, 2.0);
        let mask = (0..n * ho * wo * gp)
            .map(|_| rng.random_range(-1.0..2.0))
            .collect();
        Self {
            cfg,
            dims: (n, h, w, c),
            input,
            offset,
            mask,
        }
    }

    /// Index of offset pair / mask entry (n, h, w, group, point).
    fn k(&self, (n, h, w): (usize, usize, usize), g: usize, p: usize) -> usize {
        let (ho, wo) = self.out_hw();
        ((((n * ho) + h) * wo + w) * self.cfg.group + g) * self.points() + p
    }

    /// Replaces a fraction of the offsets by far-away and non-finite values.
    fn hostile_offsets(&mut self, rng: &mut StdRng, fraction: f64) {
        let bad = [
            1e3,
            -1e3,
            1e30,
            -1e30,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            3e38,
            -3e38,
            f64::MAX,
        ];
        for o in self.offset.iter_mut() {
            if rng.random_bool(fraction) {
                *o = bad[rng.random_range(0..bad.len())];
            }
        }
    }

    /// For every output pixel of the last rows and columns (and a sprinkling of others), moves a
    /// few points to positions just below W (x) and/or H (y): `below(W)` is the largest value of
    /// the dtype under W. With W a power of two, `x + 1` rounds to `W + 1` there.
    fn edge_offsets(&mut self, rng: &mut StdRng, below: impl Fn(f64) -> f64) {
        let (n, h_in, w_in, _) = self.dims;
        let (ho, wo) = self.out_hw();
        let cfg = self.cfg;
        let hx = (cfg.dilation_w * (cfg.kernel_w - 1) / 2) as f64;
        let hy = (cfg.dilation_h * (cfg.kernel_h - 1) / 2) as f64;
        let s = cfg.offset_scale;
        let (kx, ky) = point_grid(&cfg);
        for b in 0..n {
            for h in 0..ho {
                for w in 0..wo {
                    let border = h + 3 >= ho || w + 3 >= wo || rng.random_bool(0.02);
                    if !border {
                        continue;
                    }
                    for g in 0..cfg.group {
                        let p = rng.random_range(0..self.points());
                        let k = self.k((b, h, w), g, p);
                        // x = w*sw - pw + hx + s*(kx - hx + dx) = target, solved for dx; with
                        // s = 1 and integer grid values this is exact in both f32 and f64.
                        let bx = (w * cfg.stride_w) as f64 - cfg.pad_w as f64 + hx;
                        let by = (h * cfg.stride_h) as f64 - cfg.pad_h as f64 + hy;
                        let (tx, ty) = (below(w_in as f64), below(h_in as f64));
                        let dx = (tx - bx) / s - (kx[p] - hx);
                        let dy = (ty - by) / s - (ky[p] - hy);
                        match rng.random_range(0..3) {
                            0 => self.offset[2 * k] = dx,
                            1 => self.offset[2 * k + 1] = dy,
                            _ => {
                                self.offset[2 * k] = dx;
                                self.offset[2 * k + 1] = dy;
                            }
                        }
                    }
                }
            }
        }
    }

    fn tensors(&self, dt: DType) -> (Tensor, Tensor, Tensor) {
        let (n, h, w, c) = self.dims;
        let (ho, wo) = self.out_hw();
        let gp = self.cfg.group * self.points();
        let dev = Device::Cpu;
        let t = |v: &[f64], shape: (usize, usize, usize, usize)| {
            Tensor::from_slice(v, shape, &dev)
                .unwrap()
                .to_dtype(dt)
                .unwrap()
        };
        (
            t(&self.input, (n, h, w, c)),
            t(&self.offset, (n, ho, wo, gp * 2)),
            t(&self.mask, (n, ho, wo, gp)),
        )
    }
}

/// Kernel grid (i*dilation_w, j*dilation_h) per point, in the op's x-major order.
fn point_grid(cfg: &Dcnv3Config) -> (Vec<f64>, Vec<f64>) {
    let (mut kx, mut ky) = (vec![], vec![]);
    for i in 0..cfg.kernel_w {
        for j in 0..cfg.kernel_h {
            if !(cfg.remove_center && i == cfg.kernel_w / 2 && j == cfg.kernel_h / 2) {
                kx.push((i * cfg.dilation_w) as f64);
                ky.push((j * cfg.dilation_h) as f64);
            }
        }
    }
    (kx, ky)
}

fn below_f32(v: f64) -> f64 {
    let f = v as f32;
    f32::from_bits(f.to_bits() - 1) as f64
}

fn below_f64(v: f64) -> f64 {
    f64::from_bits(v.to_bits() - 1)
}

/// Runs the forward in `dt` and compares every output with the f64 reference computed from the
/// same (dtype-rounded) values: |ours - ref| <= atol*max(1, sum_p |mask|) + rtol*|ref|, and the same NaN/inf where the
/// reference is not finite. Returns the op's output and the largest difference.
fn check_forward(case: &Case, dt: DType, atol: f64, rtol: f64, what: &str) -> (Tensor, f64) {
    let (inp, off, msk) = case.tensors(dt);
    let out = dcnv3(&inp, &off, &msk, &case.cfg).unwrap();
    let (ho, wo) = case.out_hw();
    assert_eq!(out.dims(), [case.dims.0, ho, wo, case.dims.3], "{what}");
    // The reference sees exactly the values the op sees.
    let (ri, ro, rm) = (to_f64_vec(&inp), to_f64_vec(&off), to_f64_vec(&msk));
    let (expect, _, _) = dcnv3_reference(&ri, case.dims, &ro, &rm, &case.cfg);
    let got = to_f64_vec(&out);
    // f32 positions are off by up to an ulp of the coordinate, which moves each point's value by
    // about that much times its mask: atol is per unit of sum_p |mask| of the pixel's group.
    let (cg, np) = (case.cfg.group_channels, case.points());
    let mass = |i: usize| -> f64 {
        let gi = i / case.dims.3 * case.cfg.group + i % case.dims.3 / cg;
        rm[gi * np..(gi + 1) * np]
            .iter()
            .filter(|m| m.is_finite())
            .map(|m| m.abs())
            .sum::<f64>()
            .max(1.0)
    };
    let mut worst = 0f64;
    for (i, (&x, &y)) in got.iter().zip(&expect).enumerate() {
        if !y.is_finite() {
            assert!(
                x == y || (x.is_nan() && y.is_nan()),
                "{what}: element {i}: ours {x}, reference {y}"
            );
            continue;
        }
        let d = (x - y).abs();
        assert!(
            d <= atol * mass(i) + rtol * y.abs(),
            "{what}: element {i} (pixel {}, channel {}): ours {x} reference {y}",
            i / case.dims.3,
            i % case.dims.3
        );
        worst = worst.max(d);
    }
    (out, worst)
}

/// Backward on the same values: all gradients finite; and since the output is linear in the
/// input and in the mask, sum(grad_input*input) = sum(grad_mask*mask) = sum(out*grad_out).
fn check_backward(case: &Case, out: &Tensor, dt: DType, rel: f64, what: &str) {
    let (inp, off, msk) = case.tensors(dt);
    let mut rng = StdRng::seed_from_u64(99);
    let gout_v = randn(&mut rng, out.elem_count(), 1.0);
    let gout = Tensor::from_slice(&gout_v, out.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap();
    let (gi, go, gm) = dcnv3_backward(&inp, &off, &msk, &gout, &case.cfg).unwrap();
    assert_eq!(gi.dims(), inp.dims());
    assert_eq!(go.dims(), off.dims());
    assert_eq!(gm.dims(), msk.dims());
    let dot = |a: &Tensor, b: &Tensor| -> (f64, f64) {
        let (a, b) = (to_f64_vec(a), to_f64_vec(b));
        let s = a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>();
        let m = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum::<f64>();
        (s, m)
    };
    for (name, g) in [
        ("grad_input", &gi),
        ("grad_offset", &go),
        ("grad_mask", &gm),
    ] {
        let v = to_f64_vec(g);
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            panic!("{what}: {name} element {i} is {}", v[i]);
        }
    }
    // Offsets that sample nothing (non-finite or far away) get zero gradients.
    let ov = to_f64_vec(&off);
    let gov = to_f64_vec(&go);
    for (i, (&o, &g)) in ov.iter().zip(&gov).enumerate() {
        if !o.is_finite() || o.abs() >= 1e3 {
            assert_eq!(g, 0.0, "{what}: grad_offset {i} for offset {o}");
        }
    }
    let (want, scale) = dot(out, &gout);
    for (name, (got, _)) in [
        ("grad_input . input", dot(&gi, &inp)),
        ("grad_mask . mask", dot(&gm, &msk)),
    ] {
        assert!(
            (got - want).abs() <= rel * scale.max(1.0),
            "{what}: {name} = {got}, expected sum(out*grad_out) = {want} (scale {scale})"
        );
    }
}

/// The shape of the reported panic: 1x128x128x64, InternImage-T stage 1 at 512 (G=4, Cg=16), f32,
/// with points exactly one f32 ulp below the right/bottom image edge.
#[test]
fn stage1_512_points_just_below_the_edge_f32() {
    let mut rng = StdRng::seed_from_u64(1);
    let cfg = Dcnv3Config::internimage(4, 16, 1.0);
    let mut case = Case::random(&mut rng, cfg, (1, 128, 128));
    case.edge_offsets(&mut rng, below_f32);
    let (out, worst) = check_forward(&case, DType::F32, 1e-4, 1e-4, "f32 edge");
    check_backward(&case, &out, DType::F32, 1e-4, "f32 edge");
    eprintln!("f32 1x128x128x64 edge: max |diff| {worst:.3e}");
}

/// The same in f64 (the largest f64 below the edge), plus a NaN and an inf in the input so
/// that the kernel for inputs with non-finite values runs too (f32).
#[test]
fn stage1_512_points_just_below_the_edge_f64_and_non_finite_input() {
    let mut rng = StdRng::seed_from_u64(2);
    let cfg = Dcnv3Config::internimage(4, 16, 1.0);
    let mut case = Case::random(&mut rng, cfg, (1, 128, 128));
    case.edge_offsets(&mut rng, below_f64);
    let (out, worst) = check_forward(&case, DType::F64, 1e-10, 1e-10, "f64 edge");
    check_backward(&case, &out, DType::F64, 1e-10, "f64 edge");
    eprintln!("f64 1x128x128x64 edge: max |diff| {worst:.3e}");

    let mut case = Case::random(&mut rng, cfg, (1, 128, 128));
    case.edge_offsets(&mut rng, below_f32);
    // One NaN and one inf input value, away from the borders: outputs reading them are NaN
    // (also through zero bilinear weights) in the op and in the reference alike.
    let c = case.dims.3;
    case.input[(40 * 128 + 50) * c + 3] = f64::NAN;
    case.input[(90 * 128 + 7) * c + 40] = f64::INFINITY;
    check_forward(&case, DType::F32, 1e-4, 1e-4, "f32 edge, non-finite input");
}

/// Batches of 2 and 3 at 64x64 (power-of-two sizes, so edge rounding applies to every image),
/// with edge offsets and 5% hostile offsets, in f32, f16 and bf16.
#[test]
fn batches_at_64x64_with_hostile_offsets() {
    let mut rng = StdRng::seed_from_u64(3);
    for (n, g, cg, dt) in [
        (2, 4, 16, DType::F32),
        (3, 2, 24, DType::F32),
        (3, 4, 16, DType::F16),
        (2, 4, 8, DType::BF16),
    ] {
        let cfg = Dcnv3Config::internimage(g, cg, 1.0);
        let mut case = Case::random(&mut rng, cfg, (n, 64, 64));
        case.edge_offsets(&mut rng, below_f32);
        case.hostile_offsets(&mut rng, 0.05);
        let what = format!("{n}x64x64x{} {dt:?}", g * cg);
        // Inputs are rounded to the dtype before the reference sees them; only the output
        // rounding (and the f32 accumulation) differs.
        let (atol, rtol) = match dt {
            DType::F32 => (1e-4, 1e-4),
            DType::F16 => (1e-2, 2e-3),
            _ => (5e-2, 1e-2),
        };
        let (out, worst) = check_forward(&case, dt, atol, rtol, &what);
        if dt == DType::F32 {
            check_backward(&case, &out, dt, 1e-4, &what);
        }
        eprintln!("{what}: max |diff| {worst:.3e}");
    }
}

/// Odd sizes (1x97x131x48, G=3) and other geometries (stride 2, dilation 2, 5x5 with
/// remove_center, offset_scale 2) with hostile offsets and large masks.
#[test]
fn odd_shapes_and_geometries_with_hostile_offsets() {
    let mut rng = StdRng::seed_from_u64(4);
    let base = Dcnv3Config::internimage(3, 16, 1.0);
    let geoms = [
        (base, (1, 97, 131)),
        (
            Dcnv3Config {
                stride_h: 2,
                stride_w: 2,
                offset_scale: 2.0,
                ..base
            },
            (2, 64, 33),
        ),
        (
            Dcnv3Config {
                dilation_h: 2,
                dilation_w: 2,
                pad_h: 2,
                pad_w: 2,
                ..Dcnv3Config::internimage(2, 5, 0.5)
            },
            (1, 32, 47),
        ),
        (
            Dcnv3Config {
                kernel_h: 5,
                kernel_w: 5,
                pad_h: 2,
                pad_w: 2,
                remove_center: true,
                ..Dcnv3Config::internimage(1, 3, 1.0)
            },
            (3, 16, 16),
        ),
    ];
    for (cfg, nhw) in geoms {
        let mut case = Case::random(&mut rng, cfg, nhw);
        if cfg.offset_scale == 1.0 {
            case.edge_offsets(&mut rng, below_f32);
        }
        case.hostile_offsets(&mut rng, 0.1);
        for m in case.mask.iter_mut() {
            if rng.random_bool(0.05) {
                *m *= 1e3;
            }
        }
        let what = format!("{:?} {cfg:?}", case.dims);
        let (out, worst) = check_forward(&case, DType::F32, 1e-3, 1e-4, &what);
        check_backward(&case, &out, DType::F32, 1e-4, &what);
        let (out64, worst64) = check_forward(&case, DType::F64, 1e-9, 1e-9, &what);
        check_backward(&case, &out64, DType::F64, 1e-10, &what);
        eprintln!("{what}: max |diff| f32 {worst:.3e}, f64 {worst64:.3e}");
    }
}
