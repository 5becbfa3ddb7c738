//! The exact (erf) GELU as a differentiable Candle op: the vectorised, multi-threaded kernels of
//! the crate's CPU kernel layer (`cpu::gelu`) on the CPU, candle's own `gelu_erf` on CUDA/Metal.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use super::contiguous_slice;
use crate::cpu::gelu::{gelu_erf_f32_slice, gelu_grad_f32, gelu_inplace, PAR_CHUNK};
use crate::cpu::{Isa, KernelPolicy};

/// Staging buffer for f16/bf16 conversions.
const HALF_BUF: usize = 512;

/// Conversions between a half type and f32 slices.
trait HalfLike: Copy + Send + Sync + Default + 'static {
    fn to_f32s(src: &[Self], dst: &mut [f32]);
    /// Rounds `src` into `dst` (the kernels of `isa` where they have a conversion).
    fn from_f32s(isa: Isa, src: &[f32], dst: &mut [Self]);
}

impl HalfLike for f16 {
    fn to_f32s(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn from_f32s(_: Isa, src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src)
    }
}

impl HalfLike for bf16 {
    fn to_f32s(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
    fn from_f32s(isa: Isa, src: &[f32], dst: &mut [Self]) {
        // The crate's one f32 -> bf16 rounding (bit for bit `half`'s), vectorised.
        crate::cpu::simd::to_bf16_bits(isa, src, dst.reinterpret_cast_mut())
    }
}

fn gelu_half_chunk<T: HalfLike>(isa: Isa, src: &[T], dst: &mut [T]) {
    let mut buf = [0f32; HALF_BUF];
    for (s, d) in src.chunks(HALF_BUF).zip(dst.chunks_mut(HALF_BUF)) {
        let b = &mut buf[..s.len()];
        T::to_f32s(s, b);
        gelu_inplace(isa, b);
        T::from_f32s(isa, b, d);
    }
}

fn gelu_half<T: HalfLike>(isa: Isa, src: &[T]) -> Vec<T> {
    let mut dst = vec![T::default(); src.len()];
    if src.len() <= PAR_CHUNK {
        gelu_half_chunk(isa, src, &mut dst);
    } else {
        dst.par_chunks_mut(PAR_CHUNK)
            .zip(src.par_chunks(PAR_CHUNK))
            .for_each(|(d, s)| gelu_half_chunk(isa, s, d));
    }
    dst
}

/// The CPU GELU as a candle custom op (inference only; see [`gelu_erf`]).
struct GeluErfOp {
    isa: Isa,
}

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
                gelu_erf_f32_slice(self.isa, src, &mut dst.spare_capacity_mut()[..src.len()]);
                // SAFETY: `gelu_erf_f32_slice` wrote every element of a `dst` as long as `src`.
                unsafe { dst.set_len(src.len()) };
                CpuStorage::F32(dst)
            }
            DType::F16 => CpuStorage::F16(gelu_half(
                self.isa,
                contiguous_slice::<f16>(storage, layout, "gelu_erf", "input")?,
            )),
            DType::BF16 => CpuStorage::BF16(gelu_half(
                self.isa,
                contiguous_slice::<bf16>(storage, layout, "gelu_erf", "input")?,
            )),
            other => {
                candle_core::bail!("gelu_erf: expected an f32, f16 or bf16 tensor, got {other:?}")
            }
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, xs: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gelu_erf_backward(self.isa, xs, grad)?))
    }
}

/// The GELU backward on the CPU in f32: (x, grad) -> grad * gelu'(x), one rayon pass.
struct GeluGradOp {
    isa: Isa,
}

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
            .for_each(|(d, (x, g))| gelu_grad_f32(self.isa, x, g, d));
        // SAFETY: the chunks of `dst`, `x` and `g` pair up with equal lengths and
        // `gelu_grad_f32` writes every element of its chunk of `dst`.
        unsafe { dx.set_len(x.len()) };
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `grad * gelu'(x)` with `gelu'(x) = Phi(x) + x * phi(x)` (the exact GELU's derivative), in the
/// input's dtype: one fused pass on the CPU in f32, tensor ops elsewhere.
fn gelu_erf_backward(isa: Isa, xs: &Tensor, grad: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && grad.dtype() == DType::F32 {
        let (x, g) = (xs.detach().contiguous()?, grad.detach().contiguous()?);
        return super::inference_op2(&x, &g, &GeluGradOp { isa });
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
/// (the exact derivative). Other dtypes and other devices use candle's `gelu_erf`, as does the
/// reference [`KernelPolicy`]. Uses the process's default policy (see [`gelu_erf_with`]).
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    gelu_erf_with(xs, KernelPolicy::process_default()?)
}

/// [`gelu_erf`] with the CPU kernels of `policy`.
pub fn gelu_erf_with(xs: &Tensor, policy: KernelPolicy) -> Result<Tensor> {
    if !xs.device().is_cpu()
        || policy.is_reference()
        || !matches!(xs.dtype(), DType::F32 | DType::F16 | DType::BF16)
    {
        return xs.gelu_erf();
    }
    xs.contiguous()?.apply_op1(GeluErfOp { isa: policy.isa() })
}
