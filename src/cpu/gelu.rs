//! The exact (erf) GELU on f32 slices and its derivative.
//!
//! `erf` is evaluated in f32 without library calls: `x * P(x^2)` below 1 and
//! `1 - exp(-x^2) * Q(|x|)` from 1 to 3.92 (beyond, `erf` rounds to +-1), with polynomials fitted
//! so that the result is within about 6e-8 (half an ulp of 1) of the exact `erf`. Both branches
//! are computed and one is selected per lane, so the loop auto-vectorises. With AVX2 or AVX-512
//! the table-driven kernels of [`super::gelu_table`] (piecewise polynomials, no `exp`) run instead.

use super::simd::{dispatch, exp_f32, fmadd};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Beyond this `|x|`, `erf(x)` is +-1 to f32 precision.
const ERF_CLAMP: f32 = 3.92;
/// `erf(x) = x * P(x^2)` for `|x| < 1` (relative error 1.2e-9 in exact arithmetic).
const ERF_SMALL: [f32; 7] = [
    std::f32::consts::FRAC_2_SQRT_PI,
    -0.376_126_26,
    0.112_835_85,
    -0.026_853_812,
    0.005_188_327,
    -8.010_189e-4,
    7.853_847e-5,
];
/// `exp(x^2) * erfc(x) = Q(x - 2.5)` for `1 <= x <= 3.92` (relative error 1.2e-7, i.e. at most
/// 2e-8 absolute on `erf`).
const ERFCX_MID: f32 = 2.5;
const ERFCX: [f32; 11] = [
    0.210_806_36,
    -0.074_347_54,
    0.024_938_155,
    -0.007_999_795,
    0.002_466_052_7,
    -7.381_493e-4,
    2.130_363_4e-4,
    -5.417_245e-5,
    1.423_315_6e-5,
    -6.252_021_5e-6,
    1.710_848_5e-6,
];

/// Elements per rayon task; smaller tensors run on the calling thread.
pub(crate) const PAR_CHUNK: usize = 16 * 1024;

/// `erf(x)` for f32 with an absolute error of about 6e-8 (half an ulp of 1), branch-free so that
/// loops over it vectorise: a polynomial in `x^2` below 1, and `1 - exp(-x^2) * erfcx(x)` with a
/// polynomial `erfcx` above (the rounding errors of that part are scaled down by `erfc(x)`).
#[inline(always)]
pub(crate) fn erf_f32<const FMA: bool>(x: f32) -> f32 {
    let s = x * x;
    erf_branches::<FMA>(x, s, exp_f32::<FMA>(-s.min(ERF_CLAMP * ERF_CLAMP)))
}

/// [`erf_f32`]'s two branches for `s = x^2` and `e = exp(-x^2)` (clamped or not beyond
/// [`ERF_CLAMP`]: `1 - e * erfcx(x)` rounds to 1 there either way).
#[inline(always)]
fn erf_branches<const FMA: bool>(x: f32, s: f32, e: f32) -> f32 {
    let mut p = ERF_SMALL[6];
    for k in (0..6).rev() {
        p = fmadd::<FMA>(p, s, ERF_SMALL[k]);
    }
    let small = x * p;
    let a = x.abs();
    let u = a.min(ERF_CLAMP) - ERFCX_MID;
    let mut q = ERFCX[10];
    for k in (0..10).rev() {
        q = fmadd::<FMA>(q, u, ERFCX[k]);
    }
    let large = fmadd::<FMA>(-e, q, 1.0).copysign(x);
    if a < 1.0 {
        small
    } else {
        large
    }
}

#[inline(always)]
fn gelu_f32<const FMA: bool>(v: f32) -> f32 {
    let h = 0.5 * v;
    fmadd::<FMA>(h, erf_f32::<FMA>(v * std::f32::consts::FRAC_1_SQRT_2), h)
}

/// `dst[i] = gelu(src[i])`, every element of `dst` written when the lengths match.
#[inline(always)]
fn gelu_into_generic<const FMA: bool>(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(gelu_f32::<FMA>(s));
    }
}

#[inline(always)]
fn gelu_inplace_generic<const FMA: bool>(xs: &mut [f32]) {
    for v in xs.iter_mut() {
        *v = gelu_f32::<FMA>(*v);
    }
}

// On x86-64 with AVX2+FMA the table-driven kernels of `super::gelu_table` run instead of the
// portable two-branch formula.
dispatch!(pub(crate) fn gelu_into(src: &[f32], dst: &mut [MaybeUninit<f32>]) => gelu_into_generic, avx2: super::gelu_table::gelu_into, avx512: super::gelu_table::gelu_into_512);
dispatch!(pub(crate) fn gelu_inplace(xs: &mut [f32]) => gelu_inplace_generic, avx2: super::gelu_table::gelu_inplace, avx512: super::gelu_table::gelu_inplace_512);

/// Exact GELU of an f32 slice into `dst` (same length; every element written), multi-threaded
/// for large slices.
pub(crate) fn gelu_erf_f32_slice(isa: super::Isa, src: &[f32], dst: &mut [MaybeUninit<f32>]) {
    if src.len() <= PAR_CHUNK {
        gelu_into(isa, src, dst);
    } else {
        dst.par_chunks_mut(PAR_CHUNK)
            .zip(src.par_chunks(PAR_CHUNK))
            .for_each(|(d, s)| gelu_into(isa, s, d));
    }
}

/// The standard normal `(Phi(v), phi(v))` with one `exp`: [`erf_f32`]'s two branches at
/// `v / sqrt(2)`, its `exp(-x^2)` being `exp(-v^2 / 2)`, the density's. (`erf_f32` clamps that
/// exponent at 3.92^2, where `1 - exp(-x^2) * erfcx(x)` already rounds to 1 in f32; unclamped,
/// it rounds to 1 there too.)
#[inline(always)]
fn normal_cdf_pdf<const FMA: bool>(v: f32) -> (f32, f32) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let x = v * std::f32::consts::FRAC_1_SQRT_2;
    let s = x * x;
    let e = exp_f32::<FMA>(-s);
    (0.5 * (1.0 + erf_branches::<FMA>(x, s, e)), INV_SQRT_2PI * e)
}

/// `dx = g * (Phi(x) + x * phi(x))` elementwise over equal-length slices.
#[inline(always)]
fn gelu_grad_generic<const FMA: bool>(x: &[f32], g: &[f32], dx: &mut [MaybeUninit<f32>]) {
    for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let (cdf, pdf) = normal_cdf_pdf::<FMA>(x);
        d.write(g * fmadd::<FMA>(x, pdf, cdf));
    }
}

dispatch!(pub(crate) fn gelu_grad_f32(x: &[f32], g: &[f32], dx: &mut [MaybeUninit<f32>]) => gelu_grad_generic);

/// `h = gelu(x) = x * Phi(x)` and `slope = gelu'(x) = Phi(x) + x * phi(x)` in one pass (one
/// `erf`, one `exp`): what an MLP backward needs of its hidden pre-activations, the value for the
/// second layer's weight gradient and the slope for the first layer's.
#[inline(always)]
fn gelu_and_slope_generic<const FMA: bool>(
    x: &[f32],
    h: &mut [MaybeUninit<f32>],
    slope: &mut [MaybeUninit<f32>],
) {
    for ((h, s), &x) in h.iter_mut().zip(slope.iter_mut()).zip(x) {
        let (cdf, pdf) = normal_cdf_pdf::<FMA>(x);
        h.write(x * cdf);
        s.write(fmadd::<FMA>(x, pdf, cdf));
    }
}

dispatch!(pub(crate) fn gelu_and_slope(x: &[f32], h: &mut [MaybeUninit<f32>], slope: &mut [MaybeUninit<f32>]) => gelu_and_slope_generic);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_matches_f64_reference() {
        let mut worst = 0f64;
        let n = 200_000;
        for i in 0..=n {
            let x = -6.0 + 12.0 * i as f64 / n as f64;
            let xf = x as f32;
            let exact = candle_core::cpu::erf::erf_f64(xf as f64);
            for got in [erf_f32::<false>(xf), erf_f32::<true>(xf)] {
                worst = worst.max((got as f64 - exact).abs());
            }
        }
        assert!(worst < 1.5e-7, "max |erf error| = {worst:e}");
    }

    #[test]
    fn gelu_value_and_slope_match_f64_on_every_isa() {
        // Past the erf clamp (|x| > 3.92 * sqrt 2) too.
        let n = 20_011;
        let xs: Vec<f32> = (0..n).map(|i| -12.0 + 24.0 * i as f32 / n as f32).collect();
        let g: Vec<f32> = (0..n)
            .map(|i| 1.0 - 2.0 * ((i * 7) % 13) as f32 / 13.0)
            .collect();
        let cdf =
            |x: f64| 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(x / std::f64::consts::SQRT_2));
        let pdf = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        for isa in crate::cpu::Isa::supported() {
            let mut h = vec![MaybeUninit::uninit(); n];
            let mut sl = vec![MaybeUninit::uninit(); n];
            let mut dx = vec![MaybeUninit::uninit(); n];
            gelu_and_slope(isa, &xs, &mut h, &mut sl);
            gelu_grad_f32(isa, &xs, &g, &mut dx);
            for i in 0..n {
                let x = xs[i] as f64;
                // SAFETY: the kernels wrote every element.
                let (h, sl, dx) =
                    unsafe { (h[i].assume_init(), sl[i].assume_init(), dx[i].assume_init()) };
                let tol = 2.5e-7 * x.abs().max(1.0);
                let (want_h, want_s) = (x * cdf(x), cdf(x) + x * pdf(x));
                assert!(
                    (h as f64 - want_h).abs() <= tol,
                    "{isa} gelu({x}) = {h}, want {want_h}"
                );
                assert!(
                    (sl as f64 - want_s).abs() <= tol,
                    "{isa} gelu'({x}) = {sl}, want {want_s}"
                );
                let want_dx = g[i] as f64 * want_s;
                assert!(
                    (dx as f64 - want_dx).abs() <= tol,
                    "{isa} g gelu'({x}) = {dx}, want {want_dx}"
                );
            }
        }
    }

    #[test]
    fn gelu_kernels_match_f64_on_every_isa() {
        let n = 20_011; // not a multiple of any vector width
        let xs: Vec<f32> = (0..n).map(|i| -9.0 + 18.0 * i as f32 / n as f32).collect();
        let exact = |x: f32| {
            let x = x as f64;
            0.5 * x * (1.0 + candle_core::cpu::erf::erf_f64(x / std::f64::consts::SQRT_2))
        };
        for isa in crate::cpu::Isa::supported() {
            let mut into = vec![MaybeUninit::uninit(); n];
            gelu_erf_f32_slice(isa, &xs, &mut into);
            let mut inplace = xs.clone();
            gelu_inplace(isa, &mut inplace);
            for i in 0..n {
                // SAFETY: gelu_erf_f32_slice wrote every element.
                let a = unsafe { into[i].assume_init() };
                let tol = 2.5e-7 * (xs[i].abs() as f64).max(1.0);
                let e = exact(xs[i]);
                assert!(
                    (a as f64 - e).abs() <= tol,
                    "{isa} gelu({}) = {a}, want {e}",
                    xs[i]
                );
                assert_eq!(a.to_bits(), inplace[i].to_bits(), "{isa}: in place differs");
            }
        }
    }

    #[test]
    fn table_kernels_agree_bitwise_at_every_tail_length() {
        use crate::cpu::Isa;
        if !(Isa::Avx512.is_supported() && Isa::Avx2.is_supported()) {
            return;
        }
        for n in 0..=40 {
            let xs: Vec<f32> = (0..n).map(|i| -4.5 + 0.23 * i as f32).collect();
            let (mut a, mut b) = (xs.clone(), xs.clone());
            gelu_inplace(Isa::Avx2, &mut a);
            gelu_inplace(Isa::Avx512, &mut b);
            let mut into = vec![MaybeUninit::uninit(); n];
            gelu_into(Isa::Avx512, &xs, &mut into);
            for i in 0..n {
                // SAFETY: gelu_into wrote every element (equal lengths).
                let c = unsafe { into[i].assume_init() };
                assert_eq!(a[i].to_bits(), b[i].to_bits(), "n {n}, element {i}");
                assert_eq!(a[i].to_bits(), c.to_bits(), "n {n}, element {i} (into)");
            }
        }
    }
}
