//! Activations: a vectorised, multi-threaded exact (erf) GELU for the CPU.
//!
//! `erf` is evaluated in f32 without library calls: `x * P(x^2)` below 1 and
//! `1 - exp(-x^2) * Q(|x|)` from 1 to 3.92 (beyond, `erf` rounds to +-1), with polynomials fitted
//! so that the result is within about 6e-8 (half an ulp of 1) of the exact `erf`. Both branches
//! are computed and one is selected per lane, so the loop auto-vectorises. On x86-64 CPUs with
//! AVX2+FMA the table-driven kernel of `gelu_avx2` (piecewise polynomials, no `exp`) runs instead.
//! On CUDA/Metal the functions call candle's own `gelu_erf` kernels.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::contiguous_slice;
use super::simd::{dispatch_fma, exp_f32, fmadd, reference_ops};

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
const PAR_CHUNK: usize = 16 * 1024;
/// Staging buffer for f16/bf16 conversions.
const HALF_BUF: usize = 512;

/// `erf(x)` for f32 with an absolute error of about 6e-8 (half an ulp of 1), branch-free so that
/// loops over it vectorise: a polynomial in `x^2` below 1, and `1 - exp(-x^2) * erfcx(x)` with a
/// polynomial `erfcx` above (the rounding errors of that part are scaled down by `erfc(x)`).
#[inline(always)]
fn erf_f32<const FMA: bool>(x: f32) -> f32 {
    let s = x * x;
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
    let e = exp_f32::<FMA>(-s.min(ERF_CLAMP * ERF_CLAMP));
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

#[inline(always)]
fn bias_gelu_inplace_generic<const FMA: bool>(xs: &mut [f32], bias: &[f32]) {
    for (v, &b) in xs.iter_mut().zip(bias) {
        *v = gelu_f32::<FMA>(*v + b);
    }
}

// On x86-64 with AVX2+FMA the table-driven kernels of `super::gelu_avx2` run instead of the
// portable two-branch formula.
dispatch_fma!(fn gelu_into(src: &[f32], dst: &mut [MaybeUninit<f32>]) => gelu_into_generic, avx2: super::gelu_avx2::gelu_into);
dispatch_fma!(fn gelu_inplace(xs: &mut [f32]) => gelu_inplace_generic, avx2: super::gelu_avx2::gelu_inplace);
dispatch_fma!(fn bias_gelu_inplace(xs: &mut [f32], bias: &[f32]) => bias_gelu_inplace_generic, avx2: super::gelu_avx2::bias_gelu_inplace);

/// Exact GELU of an f32 slice into `dst` (same length; every element written), multi-threaded
/// for large slices.
pub(crate) fn gelu_erf_f32_slice(src: &[f32], dst: &mut [MaybeUninit<f32>]) {
    if src.len() <= PAR_CHUNK {
        gelu_into(src, dst);
    } else {
        dst.par_chunks_mut(PAR_CHUNK)
            .zip(src.par_chunks(PAR_CHUNK))
            .for_each(|(d, s)| gelu_into(s, d));
    }
}

/// Conversions between a half type and f32 slices.
trait HalfLike: Copy + Send + Sync + Default + 'static {
    fn to_f32s(src: &[Self], dst: &mut [f32]);
    fn from_f32s(src: &[f32], dst: &mut [Self]);
}

impl HalfLike for f16 {
    fn to_f32s(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn from_f32s(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src)
    }
}

impl HalfLike for bf16 {
    fn to_f32s(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn from_f32s(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src)
    }
}

fn gelu_half_chunk<T: HalfLike>(src: &[T], dst: &mut [T]) {
    let mut buf = [0f32; HALF_BUF];
    for (s, d) in src.chunks(HALF_BUF).zip(dst.chunks_mut(HALF_BUF)) {
        let b = &mut buf[..s.len()];
        T::to_f32s(s, b);
        gelu_inplace(b);
        T::from_f32s(b, d);
    }
}

fn gelu_half<T: HalfLike>(src: &[T]) -> Vec<T> {
    let mut dst = vec![T::default(); src.len()];
    if src.len() <= PAR_CHUNK {
        gelu_half_chunk(src, &mut dst);
    } else {
        dst.par_chunks_mut(PAR_CHUNK)
            .zip(src.par_chunks(PAR_CHUNK))
            .for_each(|(d, s)| gelu_half_chunk(s, d));
    }
    dst
}

/// The CPU GELU as a candle custom op (inference only; see [`gelu_erf`]).
struct GeluErfOp;

impl CustomOp1 for GeluErfOp {
    fn name(&self) -> &'static str {
        "internimage-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match storage.dtype() {
            DType::F32 => {
                let src = contiguous_slice::<f32>(storage, layout, "gelu_erf", "input")?;
                // Written into uninitialised capacity (no zero-fill pass).
                let mut dst = Vec::with_capacity(src.len());
                gelu_erf_f32_slice(src, &mut dst.spare_capacity_mut()[..src.len()]);
                // SAFETY: `gelu_erf_f32_slice` wrote every element of a `dst` as long as `src`.
                unsafe { dst.set_len(src.len()) };
                CpuStorage::F32(dst)
            }
            DType::F16 => CpuStorage::F16(gelu_half(contiguous_slice::<f16>(
                storage, layout, "gelu_erf", "input",
            )?)),
            DType::BF16 => CpuStorage::BF16(gelu_half(contiguous_slice::<bf16>(
                storage, layout, "gelu_erf", "input",
            )?)),
            other => {
                candle_core::bail!("gelu_erf: expected an f32, f16 or bf16 tensor, got {other:?}")
            }
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, xs: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gelu_erf_backward(xs, grad)?))
    }
}

/// `dx = g * (Phi(x) + x * phi(x))` elementwise over equal-length slices.
#[inline(always)]
fn gelu_grad_generic<const FMA: bool>(x: &[f32], g: &[f32], dx: &mut [MaybeUninit<f32>]) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    for ((d, &x), &g) in dx.iter_mut().zip(x).zip(g) {
        let cdf = 0.5 * (1.0 + erf_f32::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2));
        let pdf = INV_SQRT_2PI * exp_f32::<FMA>(-0.5 * x * x);
        d.write(g * fmadd::<FMA>(x, pdf, cdf));
    }
}

dispatch_fma!(fn gelu_grad_f32(x: &[f32], g: &[f32], dx: &mut [MaybeUninit<f32>]) => gelu_grad_generic);

/// The GELU backward on the CPU in f32: (x, grad) -> grad * gelu'(x), one rayon pass.
struct GeluGradOp;

impl candle_core::CustomOp2 for GeluGradOp {
    fn name(&self) -> &'static str {
        "internimage-gelu-erf-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_slice::<f32>(s1, l1, "gelu_erf backward", "input")?;
        let g = contiguous_slice::<f32>(s2, l2, "gelu_erf backward", "gradient")?;
        if x.len() != g.len() {
            candle_core::bail!(
                "gelu_erf backward: {} inputs but {} gradients",
                x.len(),
                g.len()
            )
        }
        let mut dx = Vec::with_capacity(x.len());
        let dst = &mut dx.spare_capacity_mut()[..x.len()];
        dst.par_chunks_mut(PAR_CHUNK)
            .zip(x.par_chunks(PAR_CHUNK).zip(g.par_chunks(PAR_CHUNK)))
            .for_each(|(d, (x, g))| gelu_grad_f32(x, g, d));
        // SAFETY: the chunks of `dst`, `x` and `g` pair up with equal lengths and
        // `gelu_grad_f32` writes every element of its chunk of `dst`.
        unsafe { dx.set_len(x.len()) };
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `grad * gelu'(x)` with `gelu'(x) = Phi(x) + x * phi(x)` (the exact GELU's derivative), in the
/// input's dtype: one fused pass on the CPU in f32, tensor ops elsewhere.
fn gelu_erf_backward(xs: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && grad.dtype() == DType::F32 {
        let (x, g) = (xs.detach().contiguous()?, grad.detach().contiguous()?);
        return super::inference_op2(&x, &g, &GeluGradOp);
    }
    let x = xs.detach();
    let cdf = ((&x * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
    let inv_sqrt_2pi = 0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;
    let pdf = ((x.sqr()? * -0.5)?.exp()? * inv_sqrt_2pi)?;
    grad.detach() * (cdf? + (x * pdf)?)?
}

/// Exact (erf) GELU, as PyTorch's `nn.GELU()`: `0.5 * x * (1 + erf(x / sqrt(2)))`.
///
/// On the CPU, f32/f16/bf16 tensors use a vectorised multi-threaded kernel (f16/bf16 computed in
/// f32; absolute error vs the exact function about 1e-7 * max(1, |x|) in f32), differentiable
/// (the exact derivative). Other dtypes and other devices use candle's `gelu_erf`.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if !xs.device().is_cpu()
        || reference_ops()
        || !matches!(xs.dtype(), DType::F32 | DType::F16 | DType::BF16)
    {
        return xs.gelu_erf();
    }
    xs.contiguous()?.apply_op1(GeluErfOp)
}

#[inline(always)]
fn bias_add_inplace_generic<const FMA: bool>(xs: &mut [f32], bias: &[f32]) {
    for (v, &b) in xs.iter_mut().zip(bias) {
        *v += b;
    }
}

dispatch_fma!(fn bias_add_inplace(xs: &mut [f32], bias: &[f32]) => bias_add_inplace_generic);

/// `row = row + bias` or `row = gelu(row + bias)` for every row of `dst` (rows of
/// `bias.len()` values), on the calling thread.
pub(crate) fn bias_rows(dst: &mut [f32], bias: &[f32], gelu: bool) {
    for r in dst.chunks_exact_mut(bias.len()) {
        if gelu {
            bias_gelu_inplace(r, bias)
        } else {
            bias_add_inplace(r, bias)
        }
    }
}

/// Exact GELU of an f32 slice in place, on the calling thread.
pub(crate) fn gelu_erf_f32_inplace_serial(xs: &mut [f32]) {
    gelu_inplace(xs)
}

/// `gelu_erf(linear(xs))`, PyTorch's `fc1` + `nn.GELU()` of an MLP, with the bias add and the
/// GELU fused into one in-place pass over the GEMM output on the CPU (f32).
///
/// `xs` is (..., in) and `linear` holds an (out, in) weight and optional (out) bias; the result is
/// (..., out). Falls back to `linear.forward` + [`gelu_erf`] for other devices/dtypes or when
/// gradients are tracked.
pub fn linear_gelu(xs: &Tensor, linear: &candle_nn::Linear) -> Result<Tensor> {
    linear_impl(xs, linear, true)
}

/// `linear(xs)` = `xs @ weight^T + bias` like `candle_nn::Linear::forward`, but on the CPU (f32)
/// the bias is added in place on the GEMM output by a rayon loop, instead of a separate
/// broadcast-add tensor (which allocates again and, in candle 0.11, runs on a second, spinning
/// thread pool that competes with rayon for the cores on small machines).
///
/// Falls back to `linear.forward` for other devices/dtypes or when gradients are tracked.
pub fn linear(xs: &Tensor, linear: &candle_nn::Linear) -> Result<Tensor> {
    linear_impl(xs, linear, false)
}

fn linear_impl(xs: &Tensor, linear: &candle_nn::Linear, gelu: bool) -> Result<Tensor> {
    use candle_nn::Module;
    let w = linear.weight();
    let fused = xs.device().is_cpu()
        && !reference_ops()
        && xs.dtype() == DType::F32
        && w.dtype() == DType::F32
        && !super::tracks_grad(&[xs, w])
        && linear
            .bias()
            .is_none_or(|b| !b.track_op() && b.dtype() == DType::F32);
    if !fused {
        let y = linear.forward(xs)?;
        return if gelu { gelu_erf(&y) } else { Ok(y) };
    }
    let dims = xs.dims();
    let Some((&k, lead)) = dims.split_last() else {
        candle_core::bail!("linear: expected an input of rank >= 1, got a scalar")
    };
    let (out_f, in_f) = w.dims2()?;
    if k != in_f {
        candle_core::bail!("linear: input has {k} features but the weight is ({out_f}, {in_f})")
    }
    let m: usize = lead.iter().product();
    let x2 = xs.contiguous()?.reshape((m, k))?;
    let w = w.contiguous()?;
    let op = super::linear::LinearOp {
        epilogue: if gelu {
            super::linear::Epilogue::Gelu
        } else {
            super::linear::Epilogue::None
        },
    };
    let y = match linear.bias() {
        Some(b) => super::inference_op3(&x2, &w, &b.contiguous()?, &op)?,
        None => super::inference_op2(&x2, &w, &op)?,
    };
    let mut out_dims = lead.to_vec();
    out_dims.push(out_f);
    y.reshape(out_dims)
}

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
}
