//! Fused CPU kernels for the per-pixel normalisations of the network (channels-last):
//! LayerNorm over the last dimension and the per-group softmax of the DCNv3 mask.
//!
//! Both are plain rayon-parallel loops over rows with vectorisable inner loops (instantiated per
//! instruction set, chosen by the [`KernelPolicy`]), and both are differentiable: their `bwd` computes the gradients with
//! candle tensor ops. Other devices and dtypes use the equivalent candle ops (differentiable ones
//! whenever an argument tracks a gradient), so the functions can be called unconditionally.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::contiguous_slice;
use crate::cpu::simd::{dispatch, exp_f32, fmadd};
use crate::cpu::{Isa, KernelPolicy};

/// Values per rayon task.
const PAR_CHUNK: usize = 16 * 1024;

/// Independent accumulator lanes of the row reductions: 16 (one zmm, two ymm) keeps the
/// dependency chain of a 64-wide row at 4 steps.
const LANES: usize = 16;

/// Pairwise sum of the lanes.
#[inline(always)]
fn reduce_lanes(acc: &[f32; LANES]) -> f32 {
    let mut h = [0f32; LANES / 2];
    for i in 0..LANES / 2 {
        h[i] = acc[i] + acc[i + LANES / 2];
    }
    ((h[0] + h[4]) + (h[1] + h[5])) + ((h[2] + h[6]) + (h[3] + h[7]))
}

/// Sum of a slice with [`LANES`] independent lanes (so the loop vectorises).
#[inline(always)]
fn sum_lanes(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mut s = reduce_lanes(&acc);
    for &v in rest {
        s += v;
    }
    s
}

/// Sum of squared deviations from `mean`, [`LANES`] lanes.
#[inline(always)]
fn sq_dev_lanes<const FMA: bool>(xs: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let d = v - mean;
            *a = fmadd::<FMA>(d, d, *a);
        }
    }
    let mut s = reduce_lanes(&acc);
    for &v in rest {
        let d = v - mean;
        s = fmadd::<FMA>(d, d, s);
    }
    s
}

/// LayerNorm of consecutive rows of `w.len()` values (two-pass mean/variance, in f32).
///
/// Writes every element of `dst` when `dst.len() == src.len()`, a multiple of `w.len()`.
#[inline(always)]
fn ln_rows_generic<const FMA: bool>(
    src: &[f32],
    dst: &mut [MaybeUninit<f32>],
    w: &[f32],
    b: &[f32],
    eps: f32,
) {
    let c = w.len();
    let inv_c = 1.0 / c as f32;
    for (x, y) in src.chunks_exact(c).zip(dst.chunks_exact_mut(c)) {
        let mean = sum_lanes(x) * inv_c;
        let var = sq_dev_lanes::<FMA>(x, mean) * inv_c;
        let rstd = 1.0 / (var + eps).sqrt();
        for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
            y.write(fmadd::<FMA>((x - mean) * rstd, w, b));
        }
    }
}

dispatch!(
    /// LayerNorm of whole rows of `w.len()` values of `src` into `dst` (every value written).
    pub(crate) fn ln_rows(src: &[f32], dst: &mut [MaybeUninit<f32>], w: &[f32], b: &[f32], eps: f32) => ln_rows_generic);

/// LayerNorm as a custom op: (xs, weight, bias), all f32 and contiguous.
struct LayerNormOp {
    eps: f32,
    isa: Isa,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "internimage-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_slice::<f32>(s1, l1, "layer_norm", "input")?;
        let w = contiguous_slice::<f32>(s2, l2, "layer_norm", "weight")?;
        let b = contiguous_slice::<f32>(s3, l3, "layer_norm", "bias")?;
        let c = w.len();
        if c == 0 || b.len() != c || x.len() % c != 0 {
            candle_core::bail!(
                "layer_norm: weight ({}) and bias ({}) must match the last dimension of {:?}",
                c,
                b.len(),
                l1.dims()
            )
        }
        let y = layer_norm_rows(self.isa, x, w, b, self.eps);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::ops::backward_on_pool(grad, || {
            let (dx, dw, db) = layer_norm_backward(self.isa, xs, weight, grad, self.eps as f64)?;
            Ok((Some(dx), Some(dw), Some(db)))
        })
    }
}

/// LayerNorm over whole rows of `x` (`w.len()` values each, `x.len()` a multiple of it; the
/// callers check), by parallel row blocks; weight `w`, bias `b`.
pub(crate) fn layer_norm_rows(isa: Isa, x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let c = w.len().max(1);
    // The output is written into uninitialised capacity (no zero-fill pass).
    let mut y = Vec::with_capacity(x.len());
    let dst = &mut y.spare_capacity_mut()[..x.len()];
    let rows_per_task = (PAR_CHUNK / c).max(1) * c;
    if x.len() <= PAR_CHUNK {
        ln_rows(isa, x, dst, w, b, eps);
    } else {
        dst.par_chunks_mut(rows_per_task)
            .zip(x.par_chunks(rows_per_task))
            .for_each(|(yc, xc)| ln_rows(isa, xc, yc, w, b, eps));
    }
    // SAFETY: `x.len()` is a multiple of `c` and so is every chunk (tasks take whole rows), the
    // chunks of `dst` and `x` pair up one to one with equal lengths, and `ln_rows` writes every
    // element of such a chunk.
    unsafe { y.set_len(x.len()) };
    y
}

/// The backward of [`layer_norm_rows`] for the output gradient `g` (same length as `x`):
/// `dx` (with capacity for `2 * C` more values, the weight and bias gradients a caller may
/// append) and the weight and bias gradients as one `2 * C` vector.
pub(crate) fn layer_norm_backward_rows(
    isa: Isa,
    x: &[f32],
    g: &[f32],
    w: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let (n, c) = (x.len(), w.len().max(1));
    let mut dx = Vec::with_capacity(n + 2 * c);
    let rows_per_task = (PAR_CHUNK / c).max(1) * c;
    let partial: Vec<Vec<f32>> = dx.spare_capacity_mut()[..n]
        .par_chunks_mut(rows_per_task)
        .zip(x.par_chunks(rows_per_task).zip(g.par_chunks(rows_per_task)))
        .map(|(dx, (x, g))| {
            let mut acc = vec![0f32; 2 * c];
            let (dw, db) = acc.split_at_mut(c);
            ln_backward_rows(isa, x, g, w, eps, dx, dw, db);
            acc
        })
        .collect();
    // SAFETY: the chunks hold whole rows (`n` is a multiple of `c`), pair up with the chunks of
    // `x` and `g` with equal lengths, and `ln_backward_rows` writes every `dx` value of its
    // rows: the first `n` values are initialised.
    unsafe { dx.set_len(n) };
    let mut sums = vec![0f32; 2 * c];
    for p in &partial {
        for (s, v) in sums.iter_mut().zip(p) {
            *s += v;
        }
    }
    (dx, sums)
}

/// `(x - mean) * rstd` over the last dimension, with `rstd` = 1 / sqrt(biased var + eps).
fn normalised(xs: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centred = xs.broadcast_sub(&mean)?;
    let rstd = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    Ok((centred.broadcast_mul(&rstd)?, rstd))
}

/// LayerNorm backward of whole rows (`c` values each): writes `dx` for every row and adds the
/// rows' contributions to `dw` (`sum g * xhat`) and `db` (`sum g`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn ln_backward_rows_generic<const FMA: bool>(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    eps: f32,
    dx: &mut [MaybeUninit<f32>],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let c = w.len();
    let inv_c = 1.0 / c as f32;
    for ((x, g), dx) in x
        .chunks_exact(c)
        .zip(g.chunks_exact(c))
        .zip(dx.chunks_exact_mut(c))
    {
        let mean = sum_lanes(x) * inv_c;
        let rstd = 1.0 / (sq_dev_lanes::<FMA>(x, mean) * inv_c + eps).sqrt();
        // sum(g*w) and sum(g*w*xhat) in LANES partial sums (a single running sum would be a
        // serial chain the compiler may not reorder, so it would not vectorise).
        let (mut pa, mut pb) = ([0f32; LANES], [0f32; LANES]);
        let full = c / LANES * LANES;
        let blocks = x[..full]
            .chunks_exact(LANES)
            .zip(g[..full].chunks_exact(LANES))
            .zip(w[..full].chunks_exact(LANES))
            .zip(
                dw[..full]
                    .chunks_exact_mut(LANES)
                    .zip(db[..full].chunks_exact_mut(LANES)),
            );
        for (((x, g), w), (dw, db)) in blocks {
            for l in 0..LANES {
                let xhat = (x[l] - mean) * rstd;
                let gw = g[l] * w[l];
                pa[l] += gw;
                pb[l] = fmadd::<FMA>(gw, xhat, pb[l]);
                dw[l] = fmadd::<FMA>(g[l], xhat, dw[l]);
                db[l] += g[l];
            }
        }
        let (mut a, mut b) = (reduce_lanes(&pa), reduce_lanes(&pb));
        for i in full..c {
            let xhat = (x[i] - mean) * rstd;
            let gw = g[i] * w[i];
            a += gw;
            b = fmadd::<FMA>(gw, xhat, b);
            dw[i] = fmadd::<FMA>(g[i], xhat, dw[i]);
            db[i] += g[i];
        }
        let (a, b) = (a * inv_c, b * inv_c);
        for i in 0..c {
            let xhat = (x[i] - mean) * rstd;
            dx[i].write(rstd * (g[i] * w[i] - a - xhat * b));
        }
    }
}

dispatch!(pub(crate) fn ln_backward_rows(x: &[f32], g: &[f32], w: &[f32], eps: f32, dx: &mut [MaybeUninit<f32>], dw: &mut [f32], db: &mut [f32]) => ln_backward_rows_generic);

/// The LayerNorm backward on the CPU in f32: (x, weight, grad) -> one 1-D tensor holding dx
/// (x's length), then dw and db (C each).
struct LayerNormBackwardOp {
    eps: f32,
    isa: Isa,
}

impl CustomOp3 for LayerNormBackwardOp {
    fn name(&self) -> &'static str {
        "internimage-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "layer_norm backward";
        let x = contiguous_slice::<f32>(s1, l1, what, "input")?;
        let w = contiguous_slice::<f32>(s2, l2, what, "weight")?;
        let g = contiguous_slice::<f32>(s3, l3, what, "gradient")?;
        let c = w.len();
        if c == 0 || x.len() % c != 0 || g.len() != x.len() {
            candle_core::bail!(
                "{what}: input of {} values, weight of {c}, gradient of {}",
                x.len(),
                g.len()
            )
        }
        let n = x.len();
        let (mut out, sums) = layer_norm_backward_rows(self.isa, x, g, w, self.eps);
        out.extend_from_slice(&sums);
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * c)))
    }
}

/// Gradients of `sum(layer_norm(x, w, b) * grad)` with respect to x, w and b (one fused pass on
/// the CPU in f32, tensor ops elsewhere; the statistics are recomputed from `xs`).
fn layer_norm_backward(
    isa: Isa,
    xs: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (xs, grad) = (xs.detach(), grad.detach());
    let c = weight.elem_count();
    if xs.device().is_cpu() && [xs.dtype(), weight.dtype(), grad.dtype()] == [DType::F32; 3] {
        let packed = super::inference_op3(
            &xs.contiguous()?,
            &weight.detach().contiguous()?,
            &grad.contiguous()?,
            &LayerNormBackwardOp {
                eps: eps as f32,
                isa,
            },
        )?;
        let n = xs.elem_count();
        return Ok((
            packed.narrow(0, 0, n)?.reshape(xs.shape())?,
            packed.narrow(0, n, c)?,
            packed.narrow(0, n + c, c)?,
        ));
    }
    let (xhat, rstd) = normalised(&xs, eps)?;
    let gw = grad.broadcast_mul(&weight.detach())?;
    let mean_gw = gw.mean_keepdim(D::Minus1)?;
    let mean_gw_xhat = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = gw
        .broadcast_sub(&mean_gw)?
        .sub(&xhat.broadcast_mul(&mean_gw_xhat)?)?
        .broadcast_mul(&rstd)?;
    let rows = xs.elem_count() / c.max(1);
    let dw = (&grad * &xhat)?.reshape((rows, c))?.sum(0)?;
    let db = grad.reshape((rows, c))?.sum(0)?;
    Ok((dx, dw, db))
}

/// LayerNorm with candle tensor ops (differentiable through candle's autograd), computed in f32
/// for f16/bf16 inputs.
fn layer_norm_tensor_ops(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let up = |t: &Tensor| match dtype {
        DType::F16 | DType::BF16 => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    };
    let (xhat, _) = normalised(&up(xs)?, eps)?;
    xhat.broadcast_mul(&up(weight)?)?
        .broadcast_add(&up(bias)?)?
        .to_dtype(dtype)
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`
/// (biased variance, as PyTorch's `nn.LayerNorm`).
///
/// `weight` and `bias` are (C) for an input (..., C). On the CPU in f32 this is a two-pass
/// vectorised kernel; otherwise (and under the reference [`KernelPolicy`]) candle-nn's
/// `layer_norm` (fused where candle has one). Uses the process's default policy (see
/// [`layer_norm_last_dim_with`]).
pub fn layer_norm_last_dim(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    layer_norm_last_dim_with(xs, weight, bias, eps, KernelPolicy::process_default()?)
}

/// [`layer_norm_last_dim`] with the CPU kernels of `policy`.
pub fn layer_norm_last_dim_with(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    policy: KernelPolicy,
) -> Result<Tensor> {
    let c = xs.dim(D::Minus1)?;
    if weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!(
            "layer_norm: weight {:?} and bias {:?} must both be ({c}) for an input {:?}",
            weight.dims(),
            bias.dims(),
            xs.dims()
        );
    }
    let fast = xs.device().is_cpu()
        && policy.is_fast()
        && xs.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.dtype() == DType::F32;
    if fast {
        return xs.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            LayerNormOp {
                eps: eps as f32,
                isa: policy.isa(),
            },
        );
    }
    if super::tracks_grad(&[xs, weight, bias]) || xs.dtype() == DType::F64 {
        // candle-nn's fused layer_norm has no backward, and no f64 CPU kernel.
        return layer_norm_tensor_ops(xs, weight, bias, eps);
    }
    let ln = candle_nn::LayerNorm::new(weight.clone(), bias.clone(), eps);
    candle_core::Module::forward(&ln, &xs.contiguous()?)
}

/// Softmax over consecutive groups of `p` values (`p > 0`).
///
/// Writes every element of `dst` when `dst.len() == src.len()`, a multiple of `p`.
#[inline(always)]
fn softmax_groups_generic<const FMA: bool>(src: &[f32], dst: &mut [MaybeUninit<f32>], p: usize) {
    // Subtract each group's max, exponentiate everything in one vectorised pass, normalise.
    let n = src.len().min(dst.len()) / p * p;
    let dst = &mut dst[..n];
    for (x, y) in src[..n].chunks_exact(p).zip(dst.chunks_exact_mut(p)) {
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for (yi, &xi) in y.iter_mut().zip(x) {
            yi.write(xi - m);
        }
    }
    // SAFETY: the loop above wrote every element of `dst` (`n` values, whole groups of `p`),
    // and `MaybeUninit<f32>` has the layout of `f32`.
    let dst = unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) };
    for v in dst.iter_mut() {
        *v = exp_f32::<FMA>(*v);
    }
    for y in dst.chunks_exact_mut(p) {
        let inv = 1.0 / y.iter().sum::<f32>();
        for v in y.iter_mut() {
            *v *= inv;
        }
    }
}

dispatch!(fn softmax_groups_f32(src: &[f32], dst: &mut [MaybeUninit<f32>], p: usize) => softmax_groups_generic);

struct SoftmaxGroupsOp {
    p: usize,
    isa: Isa,
}

impl CustomOp1 for SoftmaxGroupsOp {
    fn name(&self) -> &'static str {
        "internimage-softmax-groups"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_slice::<f32>(s, l, "softmax_groups", "input")?;
        let p = self.p;
        if p == 0 || x.len() % p != 0 {
            candle_core::bail!(
                "softmax_groups: {} values of {:?} are not whole groups of {p}",
                x.len(),
                l.dims()
            )
        }
        let y = softmax_groups_rows(self.isa, x, p);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _xs: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // d x = y * (g - sum_group(g * y)).
        let (y, g) = (res.detach(), grad.detach());
        if y.device().is_cpu() && y.dtype() == DType::F32 && g.dtype() == DType::F32 {
            let op = SoftmaxGroupsBackwardOp { p: self.p };
            return Ok(Some(super::inference_op2(
                &y.contiguous()?,
                &g.contiguous()?,
                &op,
            )?));
        }
        let n = y.elem_count() / self.p;
        let yg = y.reshape((n, self.p))?;
        let gg = g.reshape((n, self.p))?;
        let dot = (&yg * &gg)?.sum_keepdim(1)?;
        Ok(Some((yg * gg.broadcast_sub(&dot)?)?.reshape(res.shape())?))
    }
}

/// Softmax over each group of `p` consecutive values of `x` (`x.len()` a multiple of `p > 0`).
pub(crate) fn softmax_groups_rows(isa: Isa, x: &[f32], p: usize) -> Vec<f32> {
    // The output is written into uninitialised capacity (no zero-fill pass).
    let mut y = Vec::with_capacity(x.len());
    let dst = &mut y.spare_capacity_mut()[..x.len()];
    let per_task = (PAR_CHUNK / p).max(1) * p;
    if x.len() <= PAR_CHUNK {
        softmax_groups_f32(isa, x, dst, p);
    } else {
        dst.par_chunks_mut(per_task)
            .zip(x.par_chunks(per_task))
            .for_each(|(yc, xc)| softmax_groups_f32(isa, xc, yc, p));
    }
    // SAFETY: `x.len()` is a multiple of `p` (the callers check) and so is every chunk, the
    // chunks of `dst` and `x` pair up one to one with equal lengths, and `softmax_groups_f32`
    // writes every element of such a chunk.
    unsafe { y.set_len(x.len()) };
    y
}

/// The grouped softmax's input gradient `y * (g - sum_group(g * y))` for its output `y` and
/// output gradient `g` (equal lengths, multiples of `p > 0`).
pub(crate) fn softmax_groups_backward_rows(y: &[f32], g: &[f32], p: usize) -> Vec<f32> {
    let mut dx = super::written_zeros_par(y.len());
    let per_task = (PAR_CHUNK / p).max(1) * p;
    dx.par_chunks_mut(per_task)
        .zip(y.par_chunks(per_task).zip(g.par_chunks(per_task)))
        .for_each(|(d, (y, g))| {
            for ((d, y), g) in d
                .chunks_exact_mut(p)
                .zip(y.chunks_exact(p))
                .zip(g.chunks_exact(p))
            {
                let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
                for ((d, &y), &g) in d.iter_mut().zip(y).zip(g) {
                    *d = y * (g - dot);
                }
            }
        });
    dx
}

/// The grouped softmax backward on the CPU in f32, one pass: (y, g) -> y * (g - sum_group(g * y)).
struct SoftmaxGroupsBackwardOp {
    p: usize,
}

impl candle_core::CustomOp2 for SoftmaxGroupsBackwardOp {
    fn name(&self) -> &'static str {
        "internimage-softmax-groups-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let what = "softmax_groups backward";
        let y = contiguous_slice::<f32>(s1, l1, what, "output")?;
        let g = contiguous_slice::<f32>(s2, l2, what, "gradient")?;
        let p = self.p;
        if p == 0 || y.len() % p != 0 || g.len() != y.len() {
            candle_core::bail!(
                "{what}: {} outputs, {} gradients, groups of {p}",
                y.len(),
                g.len()
            )
        }
        let dx = softmax_groups_backward_rows(y, g, p);
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Softmax over groups of `group_size` consecutive values of the last dimension: an input
/// (..., G * P) is treated as (..., G, P) and normalised over P (the DCNv3 mask). Same shape out.
///
/// On the CPU in f32 this is one pass with a vectorised `exp` (about 1 ulp); otherwise a reshape
/// and candle-nn's `softmax_last_dim` (also under the reference [`KernelPolicy`]). Uses the
/// process's default policy (see [`softmax_groups_with`]).
pub fn softmax_groups(xs: &Tensor, group_size: usize) -> Result<Tensor> {
    softmax_groups_with(xs, group_size, KernelPolicy::process_default()?)
}

/// [`softmax_groups`] with the CPU kernels of `policy`.
pub fn softmax_groups_with(xs: &Tensor, group_size: usize, policy: KernelPolicy) -> Result<Tensor> {
    let last = xs.dim(D::Minus1)?;
    if group_size == 0 || last % group_size != 0 {
        candle_core::bail!(
            "softmax_groups: the last dimension ({last}) of {:?} is not a multiple of the group size {group_size}",
            xs.dims()
        );
    }
    let fast = xs.device().is_cpu() && policy.is_fast() && xs.dtype() == DType::F32;
    if !fast {
        let mut dims = xs.dims().to_vec();
        dims.pop();
        let mut grouped = dims.clone();
        grouped.extend([last / group_size, group_size]);
        let s = if xs.track_op() {
            candle_nn::ops::softmax(&xs.reshape(grouped)?, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&xs.contiguous()?.reshape(grouped)?)?
        };
        return s.reshape(xs.shape());
    }
    xs.contiguous()?.apply_op1(SoftmaxGroupsOp {
        p: group_size,
        isa: policy.isa(),
    })
}
