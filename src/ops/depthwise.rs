//! Channels-last depthwise convolution (stride 1, zero padding), as used in the DCNv3 offset
//! branch (`dw_conv`, 3x3 or 5x5, groups = channels).
//!
//! On the CPU a dedicated kernel walks the contiguous channel vector of every tap, so the inner
//! loop vectorises (AVX2+FMA chosen at run time on x86-64) and rows run in parallel; f16/bf16
//! inputs accumulate in f32. On other devices the convolution is a sum of `kh * kw` shifted views
//! times per-channel weights (plain tensor ops, which run on the GPU).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;
use std::mem::MaybeUninit;

use super::contiguous_slice;
use super::fused::{ln_backward_rows, ln_rows};
use crate::cpu::gelu::{gelu_grad_f32, gelu_into};
use crate::cpu::simd::{dispatch, fmadd};
use crate::cpu::{as_out, Isa, KernelPolicy};

/// The operator name in the CPU kernel's errors.
const OP: &str = "depthwise conv";

/// A depthwise convolution with its weights laid out once as (kh * kw + 1, C): one row of C
/// per tap, then the bias row (zeros when there is no bias).
#[derive(Debug, Clone)]
pub struct DepthwiseConv2dNhwc {
    packed: Tensor,
    /// The weight (C, 1, kh, kw) and bias as given, kept when they track gradients (trainable):
    /// `packed` is a copy that would not follow their updates, so it is rebuilt per forward.
    trainable: Option<(Tensor, Option<Tensor>)>,
    channels: usize,
    kh: usize,
    kw: usize,
    pad: usize,
    policy: KernelPolicy,
}

impl DepthwiseConv2dNhwc {
    /// From the PyTorch depthwise weight (C, 1, kh, kw), an optional bias (C) and the zero padding
    /// applied on each side of H and W.
    pub fn new(weight: &Tensor, bias: Option<&Tensor>, pad: usize) -> Result<Self> {
        Self::with_policy(weight, bias, pad, KernelPolicy::process_default()?)
    }

    /// Like [`DepthwiseConv2dNhwc::new`], with the CPU kernels of `policy`.
    pub fn with_policy(
        weight: &Tensor,
        bias: Option<&Tensor>,
        pad: usize,
        policy: KernelPolicy,
    ) -> Result<Self> {
        let (c, one, kh, kw) = weight.dims4()?;
        if one != 1 || c == 0 || kh == 0 || kw == 0 {
            candle_core::bail!(
                "depthwise conv: weight must be (C, 1, kh, kw) with C, kh, kw > 0, got {:?}",
                weight.dims()
            );
        }
        if let Some(b) = bias.filter(|b| b.dims() != [c]) {
            candle_core::bail!(
                "depthwise conv: bias must be ({c}) for a ({c}, 1, {kh}, {kw}) weight, got {:?}",
                b.dims()
            );
        }
        let trainable = (weight.track_op() || bias.is_some_and(|b| b.track_op()))
            .then(|| (weight.clone(), bias.cloned()));
        Ok(Self {
            packed: Self::pack(weight, bias)?,
            trainable,
            channels: c,
            kh,
            kw,
            pad,
            policy,
        })
    }

    /// The (kh * kw + 1, C) layout: taps, then the bias row (zeros without a bias).
    fn pack(weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (c, _, kh, kw) = weight.dims4()?;
        let taps = weight.reshape((c, kh * kw))?.t()?;
        let bias_row = match bias {
            Some(b) => b.to_dtype(weight.dtype())?.reshape((1, c))?,
            None => Tensor::zeros((1, c), weight.dtype(), weight.device())?,
        };
        Tensor::cat(&[&taps, &bias_row], 0)?.contiguous()
    }

    /// The packed taps and bias: rebuilt from trainable weights (differentiably), else the copy
    /// made at construction.
    fn taps(&self) -> Result<Tensor> {
        match &self.trainable {
            Some((w, b)) => Self::pack(w, b.as_ref()),
            None => Ok(self.packed.clone()),
        }
    }

    /// Output size for an input of `h` x `w` (errors if the kernel does not fit).
    fn out_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (k, p) = ((self.kh, self.kw), (self.pad, self.pad));
        super::window_out_size(OP, (h, w), k, (1, 1), p)
    }

    /// Baseline: candle's grouped `conv2d` (one convolution per channel) on NCHW.
    fn forward_grouped_conv2d(&self, xs: &Tensor) -> Result<Tensor> {
        let c = self.channels;
        let kk = self.kh * self.kw;
        let packed = self.taps()?.to_dtype(xs.dtype())?;
        let weight = packed
            .narrow(0, 0, kk)?
            .t()?
            .reshape((c, 1, self.kh, self.kw))?;
        let bias = packed.get(kk)?.reshape((1, c, 1, 1))?;
        let nchw = xs.permute((0, 3, 1, 2))?.contiguous()?;
        let y = nchw
            .conv2d(&weight, self.pad, 1, 1, c)?
            .broadcast_add(&bias)?;
        y.permute((0, 2, 3, 1))?.contiguous()
    }

    /// Portable path: sum of shifted views times per-channel weights (runs on any device).
    fn forward_tensor_ops(&self, xs: &Tensor) -> Result<Tensor> {
        let (_n, h, w, _c) = xs.dims4()?;
        let (ho, wo) = self.out_size(h, w)?;
        let packed = self.taps()?.to_dtype(xs.dtype())?;
        let pad = self.pad;
        let padded = xs
            .pad_with_zeros(1, pad, pad)?
            .pad_with_zeros(2, pad, pad)?;
        let mut acc = packed
            .get(self.kh * self.kw)?
            .broadcast_as(xs.dims4().map(|(n, _, _, c)| (n, ho, wo, c))?)?;
        for i in 0..self.kh {
            for j in 0..self.kw {
                let win = padded.narrow(1, i, ho)?.narrow(2, j, wo)?;
                acc = (acc + win.broadcast_mul(&packed.get(i * self.kw + j)?)?)?;
            }
        }
        Ok(acc)
    }
}

impl DepthwiseConv2dNhwc {
    /// The taps and bias as one (kh * kw + 1, C) tensor (rebuilt from trainable weights,
    /// differentiably), the kernel size and the padding: for a fused training op. `None` for a
    /// non-square kernel.
    pub(crate) fn train_taps(&self) -> Result<Option<(Tensor, usize, usize)>> {
        if self.kh != self.kw {
            return Ok(None);
        }
        Ok(Some((self.taps()?, self.kh, self.pad)))
    }

    /// `gelu(layer_norm(self(xs)))` (norm = weight, bias, eps over C) as one op when the CPU
    /// kernels apply (f32 on the CPU, fast policy): see [`DwNormGeluOp`]. With a gradient it is
    /// the training op (the backward recomputes what it needs); in inference the same forward
    /// saves the separate LayerNorm and GELU passes over the branch. `Ok(None)` otherwise: the
    /// caller runs the three layers.
    pub(crate) fn forward_norm_gelu(
        &self,
        xs: &Tensor,
        (weight, bias, eps): (&Tensor, &Tensor, f64),
    ) -> Result<Option<Tensor>> {
        let c = self.channels;
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let fits = xs.rank() == 4
            && xs.dim(3)? == c
            && weight.dims() == [c]
            && bias.dims() == [c]
            && [xs, weight, bias].into_iter().all(f32_cpu);
        if !fits || !self.policy.is_fast() {
            return Ok(None);
        }
        let taps = self.taps()?;
        if taps.dtype() != DType::F32 {
            return Ok(None);
        }
        let norm = Tensor::cat(&[weight, bias], 0)?;
        let op = DwNormGeluOp {
            kh: self.kh,
            kw: self.kw,
            pad: self.pad,
            eps: eps as f32,
            isa: self.policy.isa(),
        };
        xs.contiguous()?
            .apply_op3(&taps.contiguous()?, &norm, op)
            .map(Some)
    }
}

impl Module for DepthwiseConv2dNhwc {
    /// `xs` (N, H, W, C) -> (N, H + 2 pad - kh + 1, W + 2 pad - kw + 1, C).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (_n, _h, _w, c) = xs.dims4()?;
        if c != self.channels {
            candle_core::bail!(
                "depthwise conv: input has {c} channels (last dim of NHWC {:?}), the weight has {}",
                xs.dims(),
                self.channels
            );
        }
        let cpu_kernel = xs.device().is_cpu()
            && matches!(xs.dtype(), DType::F32 | DType::F16 | DType::BF16)
            && self.trainable.is_none()
            && !xs.track_op();
        if xs.device().is_cpu() && self.policy.is_reference() {
            return self.forward_grouped_conv2d(xs);
        }
        let trains = self.trainable.is_some() || xs.track_op();
        if trains && xs.device().is_cpu() && xs.dtype() == DType::F32 && self.policy.is_fast() {
            // Training: the CPU kernel with its backward (input and weight gradients), on the
            // taps rebuilt (differentiably) from the trainable weights.
            let taps = self.taps()?;
            if taps.dtype() == DType::F32 {
                let op = DwTrainOp {
                    kh: self.kh,
                    kw: self.kw,
                    pad: self.pad,
                    isa: self.policy.isa(),
                };
                return xs.contiguous()?.apply_op2(&taps.contiguous()?, op);
            }
        }
        if !cpu_kernel {
            return self.forward_tensor_ops(xs);
        }
        let op = DwOp {
            kh: self.kh,
            kw: self.kw,
            pad: self.pad,
            isa: self.policy.isa(),
        };
        let packed = self.packed.to_dtype(DType::F32)?;
        super::inference_op2(&xs.contiguous()?, &packed, &op)
    }
}

/// Depthwise k x k convolution, stride 1, zero padding `pad`, on a channels-last tensor.
///
/// `xs` is (N, H, W, C); `weight` is the PyTorch depthwise weight (C, 1, k, k); `bias` is (C).
/// Returns (N, H + 2*pad - k + 1, W + 2*pad - k + 1, C). For repeated calls with the same weight,
/// [`DepthwiseConv2dNhwc`] lays the weight out once.
pub fn depthwise_conv2d_nhwc(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    pad: usize,
) -> Result<Tensor> {
    DepthwiseConv2dNhwc::new(weight, bias, pad)?.forward(xs)
}

/// The CPU kernel: input (N, H, W, C) any of f32/f16/bf16, packed taps+bias (kh*kw+1, C) in f32.
struct DwOp {
    kh: usize,
    kw: usize,
    pad: usize,
    isa: Isa,
}

/// Geometry of one call, shared by all rows.
#[derive(Clone, Copy)]
struct Geom {
    h: usize,
    w: usize,
    c: usize,
    wo: usize,
    kh: usize,
    kw: usize,
    pad: usize,
}

impl Geom {
    /// The geometry of a `kh` x `kw` convolution (stride 1, zero padding `pad`) over an
    /// `h` x `w` x `c` image, and its output height (errors if the kernel does not fit).
    fn of(
        (h, w, c): (usize, usize, usize),
        (kh, kw): (usize, usize),
        pad: usize,
    ) -> Result<(Self, usize)> {
        let (ho, wo) = super::window_out_size(OP, (h, w), (kh, kw), (1, 1), (pad, pad))?;
        Ok((
            Self {
                h,
                w,
                c,
                wo,
                kh,
                kw,
                pad,
            },
            ho,
        ))
    }
}

/// One channel block of one output pixel: `out[cb..cb+B] = bias + sum_taps x * w` (all `B`
/// values written).
#[inline(always)]
fn pixel_block<const B: usize, const FMA: bool>(
    img: &[f32],
    packed: &[f32],
    g: &Geom,
    oh: usize,
    ow: usize,
    cb: usize,
    out: &mut [MaybeUninit<f32>],
) {
    let c = g.c;
    let bias = &packed[g.kh * g.kw * c + cb..][..B];
    let mut acc = [0f32; B];
    acc.copy_from_slice(bias);
    for i in 0..g.kh {
        let ih = oh + i;
        if ih < g.pad || ih - g.pad >= g.h {
            continue;
        }
        let row = (ih - g.pad) * g.w;
        for j in 0..g.kw {
            let iw = ow + j;
            if iw < g.pad || iw - g.pad >= g.w {
                continue;
            }
            let xv = &img[(row + iw - g.pad) * c + cb..][..B];
            let wv = &packed[(i * g.kw + j) * c + cb..][..B];
            for t in 0..B {
                acc[t] = fmadd::<FMA>(xv[t], wv[t], acc[t]);
            }
        }
    }
    for (o, a) in out[cb..cb + B].iter_mut().zip(acc) {
        o.write(a);
    }
}

/// One output row (Wo * C values, all written) of image `img` (H * W * C values).
#[inline(always)]
fn dw_row_generic<const FMA: bool>(
    img: &[f32],
    packed: &[f32],
    g: &Geom,
    oh: usize,
    out: &mut [MaybeUninit<f32>],
) {
    let c = g.c;
    for ow in 0..g.wo {
        let o = &mut out[ow * c..(ow + 1) * c];
        let mut cb = 0;
        while cb + 32 <= c {
            pixel_block::<32, FMA>(img, packed, g, oh, ow, cb, o);
            cb += 32;
        }
        while cb + 8 <= c {
            pixel_block::<8, FMA>(img, packed, g, oh, ow, cb, o);
            cb += 8;
        }
        while cb < c {
            pixel_block::<1, FMA>(img, packed, g, oh, ow, cb, o);
            cb += 1;
        }
    }
}

dispatch!(fn dw_row(img: &[f32], packed: &[f32], g: &Geom, oh: usize, out: &mut [MaybeUninit<f32>]) => dw_row_generic);

/// f32 convolution of `n` images (`x` = N*H*W*C) into `out` (N*Ho*Wo*C), every element written.
fn dw_f32(isa: Isa, x: &[f32], packed: &[f32], g: &Geom, ho: usize, out: &mut [MaybeUninit<f32>]) {
    let img_len = g.h * g.w * g.c;
    let row_len = g.wo * g.c;
    if row_len == 0 || ho == 0 {
        return;
    }
    let run = |(r, o): (usize, &mut [MaybeUninit<f32>])| {
        let (n, oh) = (r / ho, r % ho);
        dw_row(isa, &x[n * img_len..(n + 1) * img_len], packed, g, oh, o);
    };
    if out.len() < 8 * 1024 {
        out.chunks_mut(row_len).enumerate().for_each(run);
    } else {
        out.par_chunks_mut(row_len).enumerate().for_each(run);
    }
}

/// f32 convolution of `n` images (`x` = N*H*W*C) into a new N*Ho*Wo*C vector (an error when
/// it cannot be allocated).
fn dw_f32_vec(
    isa: Isa,
    x: &[f32],
    packed: &[f32],
    g: &Geom,
    n: usize,
    ho: usize,
) -> Result<Vec<f32>> {
    // Written into uninitialised capacity (no zero-fill pass).
    let mut out = super::try_output_vec(OP, &[n, ho, g.wo, g.c])?;
    let len = n * ho * g.wo * g.c;
    dw_f32(isa, x, packed, g, ho, &mut out.spare_capacity_mut()[..len]);
    // SAFETY: `dw_f32` writes all N*Ho rows of Wo*C values (or there are none).
    unsafe { out.set_len(len) };
    Ok(out)
}

fn dw_half<T: Copy + Default + Send + Sync>(
    isa: Isa,
    x: &[T],
    packed: &[f32],
    g: &Geom,
    ho: usize,
    to_f32: impl Fn(&[T], &mut [f32]) + Sync,
    from_f32: impl Fn(&[f32], &mut [T]) + Sync,
) -> Result<Vec<T>> {
    let mut xf = vec![0f32; x.len()];
    xf.par_chunks_mut(16 * 1024)
        .zip(x.par_chunks(16 * 1024))
        .for_each(|(d, s)| to_f32(s, d));
    let n = x.len().checked_div(g.h * g.w * g.c).unwrap_or(0);
    let of = dw_f32_vec(isa, &xf, packed, g, n, ho)?;
    drop(xf);
    let mut out = vec![T::default(); of.len()];
    out.par_chunks_mut(16 * 1024)
        .zip(of.par_chunks(16 * 1024))
        .for_each(|(d, s)| from_f32(s, d));
    Ok(out)
}

impl CustomOp2 for DwOp {
    fn name(&self) -> &'static str {
        "internimage-depthwise-conv2d-nhwc"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = l1.shape().dims4()?;
        let (taps1, c2) = l2.shape().dims2()?;
        if c2 != c || taps1 != self.kh * self.kw + 1 {
            candle_core::bail!(
                "depthwise conv: packed weights must be ({}, {c}), got {:?}",
                self.kh * self.kw + 1,
                l2.dims()
            );
        }
        let packed = contiguous_slice::<f32>(s2, l2, OP, "packed weights")?;
        let (g, ho) = Geom::of((h, w, c), (self.kh, self.kw), self.pad)?;
        let out = match s1.dtype() {
            DType::F32 => {
                let x = contiguous_slice::<f32>(s1, l1, OP, "input")?;
                CpuStorage::F32(dw_f32_vec(self.isa, x, packed, &g, n, ho)?)
            }
            DType::F16 => CpuStorage::F16(dw_half(
                self.isa,
                contiguous_slice::<f16>(s1, l1, OP, "input")?,
                packed,
                &g,
                ho,
                |s: &[f16], d: &mut [f32]| s.convert_to_f32_slice(d),
                |s: &[f32], d: &mut [f16]| d.convert_from_f32_slice(s),
            )?),
            DType::BF16 => CpuStorage::BF16(dw_half(
                self.isa,
                contiguous_slice::<bf16>(s1, l1, OP, "input")?,
                packed,
                &g,
                ho,
                |s: &[bf16], d: &mut [f32]| s.convert_to_f32_slice(d),
                |s: &[f32], d: &mut [bf16]| {
                    crate::cpu::simd::to_bf16_bits(self.isa, s, d.reinterpret_cast_mut())
                },
            )?),
            other => candle_core::bail!(
                "depthwise conv: expected an f32, f16 or bf16 input, got {other:?}"
            ),
        };
        Ok((out, Shape::from((n, ho, g.wo, c))))
    }
}

/// The input gradient of one input row `ih` of one image: `out` (W * C values, all written) from
/// the image's output gradient `g` (Ho * Wo * C) and the taps (kh * kw rows of C).
#[inline(always)]
fn dw_input_grad_row_generic<const FMA: bool>(
    g: &[f32],
    taps: &[f32],
    geom: &Geom,
    ho: usize,
    ih: usize,
    out: &mut [f32],
) {
    let (c, wo) = (geom.c, geom.wo);
    out.fill(0.0);
    for i in 0..geom.kh {
        // Output row oh reads input row ih through tap row i when oh + i = ih + pad.
        let Some(oh) = (ih + geom.pad).checked_sub(i).filter(|&oh| oh < ho) else {
            continue;
        };
        for j in 0..geom.kw {
            let wv = &taps[(i * geom.kw + j) * c..][..c];
            for iw in 0..geom.w {
                let Some(ow) = (iw + geom.pad).checked_sub(j).filter(|&ow| ow < wo) else {
                    continue;
                };
                let gv = &g[(oh * wo + ow) * c..][..c];
                let o = &mut out[iw * c..][..c];
                for t in 0..c {
                    o[t] = fmadd::<FMA>(gv[t], wv[t], o[t]);
                }
            }
        }
    }
}

dispatch!(fn dw_input_grad_row(g: &[f32], taps: &[f32], geom: &Geom, ho: usize, ih: usize, out: &mut [f32]) => dw_input_grad_row_generic);

/// Adds one output row `oh`'s contributions to the tap and bias gradients `acc`
/// ((kh * kw + 1) rows of C): `sum x * g` per tap, `sum g` for the bias.
#[inline(always)]
fn dw_weight_grad_row_generic<const FMA: bool>(
    img: &[f32],
    grow: &[f32],
    geom: &Geom,
    oh: usize,
    acc: &mut [f32],
) {
    let (c, wo) = (geom.c, geom.wo);
    for i in 0..geom.kh {
        let Some(ih) = (oh + i).checked_sub(geom.pad).filter(|&ih| ih < geom.h) else {
            continue;
        };
        for j in 0..geom.kw {
            let a = &mut acc[(i * geom.kw + j) * c..][..c];
            for ow in 0..wo {
                let Some(iw) = (ow + j).checked_sub(geom.pad).filter(|&iw| iw < geom.w) else {
                    continue;
                };
                let xv = &img[(ih * geom.w + iw) * c..][..c];
                let gv = &grow[ow * c..][..c];
                for t in 0..c {
                    a[t] = fmadd::<FMA>(xv[t], gv[t], a[t]);
                }
            }
        }
    }
    let a = &mut acc[geom.kh * geom.kw * c..][..c];
    for gv in grow.chunks_exact(c) {
        for t in 0..c {
            a[t] += gv[t];
        }
    }
}

dispatch!(fn dw_weight_grad_row(img: &[f32], grow: &[f32], geom: &Geom, oh: usize, acc: &mut [f32]) => dw_weight_grad_row_generic);

/// The depthwise convolution for training: input (N, H, W, C) f32 and taps + bias
/// (kh * kw + 1, C) f32, with a backward for both.
struct DwTrainOp {
    kh: usize,
    kw: usize,
    pad: usize,
    isa: Isa,
}

impl DwTrainOp {
    fn as_inference(&self) -> DwOp {
        DwOp {
            kh: self.kh,
            kw: self.kw,
            pad: self.pad,
            isa: self.isa,
        }
    }
}

impl CustomOp2 for DwTrainOp {
    fn name(&self) -> &'static str {
        "internimage-depthwise-conv2d-nhwc-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.as_inference().cpu_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        taps: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        crate::ops::backward_on_pool(grad, || {
            let (n, h, w, c) = x.dims4()?;
            let (_, ho, wo, _) = grad.dims4()?;
            let geom = Geom {
                h,
                w,
                c,
                wo,
                kh: self.kh,
                kw: self.kw,
                pad: self.pad,
            };
            let (need_x, need_w) = (x.track_op(), taps.track_op());
            let (xt, tt, gt) = (x.contiguous()?, taps.contiguous()?, grad.contiguous()?);
            let cpu = |t: &Tensor| -> Result<()> {
                if t.device().is_cpu() && t.dtype() == DType::F32 {
                    Ok(())
                } else {
                    candle_core::bail!("depthwise conv backward: expected f32 CPU tensors")
                }
            };
            cpu(&xt)?;
            cpu(&tt)?;
            cpu(&gt)?;
            let (gs, gl) = gt.storage_and_layout();
            let gv = super::cpu_f32_values(&gs, gl, OP, "gradient")?;
            let (xs, xl) = xt.storage_and_layout();
            let xv = super::cpu_f32_values(&xs, xl, OP, "input")?;
            let (ts, tl) = tt.storage_and_layout();
            let tv = super::cpu_f32_values(&ts, tl, OP, "taps")?;
            let (dx, dtaps) = dw_backward(self.isa, &geom, (n, ho), (xv, tv, gv), (need_x, need_w));
            let dx = dx
                .map(|v| Tensor::from_vec(v, (n, h, w, c), x.device()))
                .transpose()?;
            let dtaps = dtaps
                .map(|v| Tensor::from_vec(v, (self.kh * self.kw + 1, c), x.device()))
                .transpose()?;
            Ok((dx, dtaps))
        })
    }
}

/// The gradients of a depthwise convolution (`geom`, `n` images of `ho` output rows) of input `x`
/// with `taps` ((kh * kw + 1, C), bias row last) for the output gradient `g`: the input's (when
/// `need_x`) and the taps' (when `need_w`), both f32.
fn dw_backward(
    isa: Isa,
    geom: &Geom,
    (n, ho): (usize, usize),
    (x, taps, g): (&[f32], &[f32], &[f32]),
    (need_x, need_w): (bool, bool),
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let (c, w) = (geom.c, geom.w);
    let (img_in, img_out) = (geom.h * w * c, ho * geom.wo * c);
    let dx = (need_x && img_in > 0).then(|| {
        let mut dx = super::written_zeros_par(n * img_in);
        dx.par_chunks_mut(w * c).enumerate().for_each(|(r, out)| {
            let (b, ih) = (r / geom.h, r % geom.h);
            let gi = &g[b * img_out..(b + 1) * img_out];
            dw_input_grad_row(isa, gi, taps, geom, ho, ih, out);
        });
        dx
    });
    let dtaps = (need_w && img_out > 0).then(|| {
        let len = (geom.kh * geom.kw + 1) * c;
        let parts: Vec<Vec<f32>> = g
            .par_chunks(geom.wo * c)
            .enumerate()
            .fold(
                || vec![0f32; len],
                |mut acc, (r, grow)| {
                    let (b, oh) = (r / ho, r % ho);
                    let img = &x[b * img_in..(b + 1) * img_in];
                    dw_weight_grad_row(isa, img, grow, geom, oh, &mut acc);
                    acc
                },
            )
            .collect();
        let mut total = vec![0f32; len];
        for p in &parts {
            for (t, v) in total.iter_mut().zip(p) {
                *t += v;
            }
        }
        total
    });
    (dx, dtaps)
}

/// The offset branch's `gelu(layer_norm(dw_conv(x)))` as one op (training and inference): input
/// (N, H, W, C) f32, taps + bias (kh * kw + 1, C) and the norm's weight and bias as one (2 * C)
/// tensor. Only the input is kept: the backward recomputes the convolution's output and the
/// normalised values (cheap, element-wise work), where three ops kept both tensors and cost the
/// backward a zero-filled gradient and an add of each.
struct DwNormGeluOp {
    kh: usize,
    kw: usize,
    pad: usize,
    eps: f32,
    isa: Isa,
}

impl DwNormGeluOp {
    /// The geometry and the output rows, after checking the operands' shapes.
    fn geometry(&self, x: &Layout, taps: &Layout, norm: &Layout) -> Result<(Geom, usize, usize)> {
        let (n, h, w, c) = x.shape().dims4()?;
        if taps.dims() != [self.kh * self.kw + 1, c] || norm.dims() != [2 * c] {
            candle_core::bail!(
                "depthwise conv + norm: taps {:?} and norm {:?} do not fit {c} channels",
                taps.dims(),
                norm.dims()
            );
        }
        let (geom, ho) = Geom::of((h, w, c), (self.kh, self.kw), self.pad)?;
        Ok((geom, n, ho))
    }
}

/// Rows per task of the element-wise passes of [`DwNormGeluOp`]: about 16K values.
fn rows_per_task(c: usize) -> usize {
    (16 * 1024 / c.max(1)).max(1)
}

/// `gelu(layer_norm(dw_conv(x)))` of `n` images (`geom`, `ho` output rows) with `taps`
/// ((kh * kw + 1, C), bias row last) and the norm's `(weight, bias)`: the forward of
/// [`DwNormGeluOp`].
#[allow(clippy::too_many_arguments)]
fn norm_gelu_forward(
    isa: Isa,
    geom: &Geom,
    n: usize,
    ho: usize,
    x: &[f32],
    taps: &[f32],
    (lnw, lnb): (&[f32], &[f32]),
    eps: f32,
) -> Result<Vec<f32>> {
    let mut y = dw_f32_vec(isa, x, taps, geom, n, ho)?;
    let task = rows_per_task(geom.c) * geom.c;
    y.par_chunks_mut(task).for_each_init(Vec::new, |t, y| {
        t.resize(y.len(), 0f32);
        ln_rows(isa, y, as_out(t), lnw, lnb, eps);
        gelu_into(isa, t, as_out(y));
    });
    Ok(y)
}

/// The backward of [`norm_gelu_forward`] for the output gradient `g`: the input's gradient
/// (when `need_x`), the taps' (when `need_w`) and the norm's weight and bias gradients (2 * C).
/// Recomputes the convolution's output and the normalised values.
#[allow(clippy::type_complexity)]
fn norm_gelu_backward(
    isa: Isa,
    geom: &Geom,
    (n, ho): (usize, usize),
    (x, taps, (lnw, lnb), g): (&[f32], &[f32], (&[f32], &[f32]), &[f32]),
    eps: f32,
    (need_x, need_w): (bool, bool),
) -> Result<(Option<Vec<f32>>, Option<Vec<f32>>, Vec<f32>)> {
    let c = geom.c;
    // The convolution's output again, then per row block: the normalised rows, the GELU's
    // gradient into them, the LayerNorm's backward (per-task weight and bias sums).
    let f = dw_f32_vec(isa, x, taps, geom, n, ho)?;
    if g.len() != f.len() {
        candle_core::bail!("{OP}: gradient of {} values for {}", g.len(), f.len())
    }
    let mut df = super::try_output_vec::<f32>(OP, &[n, ho, geom.wo, c])?;
    let task = rows_per_task(c) * c;
    let sums: Vec<Vec<f32>> = df.spare_capacity_mut()[..f.len()]
        .par_chunks_mut(task)
        .zip(f.par_chunks(task).zip(g.par_chunks(task)))
        .fold(
            || (vec![0f32; 2 * c], Vec::new(), Vec::new()),
            |(mut acc, mut z, mut dz), (df, (f, g))| {
                z.resize(f.len(), 0f32);
                dz.resize(f.len(), 0f32);
                ln_rows(isa, f, as_out(&mut z), lnw, lnb, eps);
                gelu_grad_f32(isa, &z, g, as_out(&mut dz));
                let (dw, db) = acc.split_at_mut(c);
                ln_backward_rows(isa, f, &dz, lnw, eps, df, dw, db);
                (acc, z, dz)
            },
        )
        .map(|(acc, _, _)| acc)
        .collect();
    // SAFETY: the chunks of df's first f.len() values pair one to one with f's, and
    // `ln_backward_rows` writes every value of its chunk.
    unsafe { df.set_len(f.len()) };
    drop(f);
    let (dx, dtaps) = dw_backward(isa, geom, (n, ho), (x, taps, &df), (need_x, need_w));
    let mut dnorm = vec![0f32; 2 * c];
    for p in &sums {
        for (t, v) in dnorm.iter_mut().zip(p) {
            *t += v;
        }
    }
    Ok((dx, dtaps, dnorm))
}

/// [`norm_gelu_forward`] for an (N, H, W, C) input `dims` and a `kh` x `kw` kernel with zero
/// padding `pad`: the offset branch's features of a fused training op. Returns the output and
/// its height.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dw_norm_gelu_forward(
    isa: Isa,
    (n, h, w, c): (usize, usize, usize, usize),
    (kh, kw, pad): (usize, usize, usize),
    x: &[f32],
    taps: &[f32],
    norm: (&[f32], &[f32]),
    eps: f32,
) -> Result<Vec<f32>> {
    let (geom, ho) = Geom::of((h, w, c), (kh, kw), pad)?;
    norm_gelu_forward(isa, &geom, n, ho, x, taps, norm, eps)
}

/// [`norm_gelu_backward`] for the shapes of [`dw_norm_gelu_forward`]: (input gradient, taps
/// gradient, norm weight and bias gradients).
#[allow(clippy::type_complexity)]
pub(crate) fn dw_norm_gelu_backward(
    isa: Isa,
    (n, h, w, c): (usize, usize, usize, usize),
    (kh, kw, pad): (usize, usize, usize),
    args: (&[f32], &[f32], (&[f32], &[f32]), &[f32]),
    eps: f32,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (geom, ho) = Geom::of((h, w, c), (kh, kw), pad)?;
    let (dx, dtaps, dnorm) = norm_gelu_backward(isa, &geom, (n, ho), args, eps, (true, true))?;
    // Empty images (nothing computed): zero gradients of the right lengths.
    let dx = dx.unwrap_or_else(|| vec![0f32; n * h * w * c]);
    let dtaps = dtaps.unwrap_or_else(|| vec![0f32; (kh * kw + 1) * c]);
    Ok((dx, dtaps, dnorm))
}

impl CustomOp3 for DwNormGeluOp {
    fn name(&self) -> &'static str {
        "internimage-depthwise-norm-gelu"
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
        let (geom, n, ho) = self.geometry(l1, l2, l3)?;
        let x = contiguous_slice::<f32>(s1, l1, OP, "input")?;
        let taps = contiguous_slice::<f32>(s2, l2, OP, "packed weights")?;
        let norm = contiguous_slice::<f32>(s3, l3, OP, "norm")?.split_at(geom.c);
        let y = norm_gelu_forward(self.isa, &geom, n, ho, x, taps, norm, self.eps)?;
        Ok((CpuStorage::F32(y), Shape::from((n, ho, geom.wo, geom.c))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        taps: &Tensor,
        norm: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::ops::backward_on_pool(grad, || {
            let (need_x, need_w, need_n) = (x.track_op(), taps.track_op(), norm.track_op());
            let (xt, tt, nt, gt) = (
                x.contiguous()?,
                taps.contiguous()?,
                norm.contiguous()?,
                grad.contiguous()?,
            );
            let (xs, xl) = xt.storage_and_layout();
            let (ts, tl) = tt.storage_and_layout();
            let (ns, nl) = nt.storage_and_layout();
            let (gs, gl) = gt.storage_and_layout();
            let (geom, n, ho) = self.geometry(xl, tl, nl)?;
            let xv = super::cpu_f32_values(&xs, xl, OP, "input")?;
            let tv = super::cpu_f32_values(&ts, tl, OP, "taps")?;
            let (lnw, lnb) = super::cpu_f32_values(&ns, nl, OP, "norm")?.split_at(geom.c);
            let gv = super::cpu_f32_values(&gs, gl, OP, "gradient")?;
            let (dx, dtaps, dn) = norm_gelu_backward(
                self.isa,
                &geom,
                (n, ho),
                (xv, tv, (lnw, lnb), gv),
                self.eps,
                (need_x, need_w),
            )?;
            let dev = x.device();
            let dx = dx
                .map(|v| Tensor::from_vec(v, xl.shape().clone(), dev))
                .transpose()?;
            let dtaps = dtaps
                .map(|v| Tensor::from_vec(v, tl.shape().clone(), dev))
                .transpose()?;
            let dnorm = need_n
                .then(|| Tensor::from_vec(dn, 2 * geom.c, dev))
                .transpose()?;
            Ok((dx, dtaps, dnorm))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let s = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        d.to_scalar::<f32>().unwrap() / s.max(1e-12)
    }

    /// The fused training op against the three layers on the reference policy (candle ops):
    /// values and every gradient, on every ISA the CPU has, 3x3 and 5x5 taps.
    #[test]
    fn norm_gelu_training_op_matches_the_three_layers() -> Result<()> {
        let dev = Device::Cpu;
        let c = 24;
        for (k, pad) in [(3usize, 1usize), (5, 2)] {
            let v = |shape: &[usize], s: f64, mean: f64| -> Result<Var> {
                Var::from_tensor(&((Tensor::randn(0f32, 1., shape, &dev)? * s)? + mean)?)
            };
            let x = v(&[2, 7, 9, c], 1.0, 0.0)?;
            let w = v(&[c, 1, k, k], 0.3, 0.0)?;
            let b = v(&[c], 0.1, 0.0)?;
            let lw = v(&[c], 0.1, 1.0)?;
            let lb = v(&[c], 0.1, 0.0)?;
            let r = Tensor::randn(0f32, 1., (2, 7, 9, c), &dev)?;
            let reference = KernelPolicy::reference();
            let dw = DepthwiseConv2dNhwc::with_policy(
                w.as_tensor(),
                Some(b.as_tensor()),
                pad,
                reference,
            )?;
            let f = dw.forward(x.as_tensor())?;
            let f = crate::ops::fused::layer_norm_last_dim_with(
                &f,
                lw.as_tensor(),
                lb.as_tensor(),
                1e-6,
                reference,
            )?;
            let want = crate::ops::activation::gelu_erf_with(&f, reference)?;
            let gb = (&want * &r)?.sum_all()?.backward()?;
            for isa in Isa::supported() {
                let policy = KernelPolicy::with_isa(isa)?;
                let dw = DepthwiseConv2dNhwc::with_policy(
                    w.as_tensor(),
                    Some(b.as_tensor()),
                    pad,
                    policy,
                )?;
                let norm = (lw.as_tensor(), lb.as_tensor(), 1e-6);
                let ours = dw
                    .forward_norm_gelu(x.as_tensor(), norm)?
                    .expect("the training op applies to f32 CPU Vars");
                assert!(
                    rel_diff(&ours, &want) < 1e-5,
                    "{isa} {k}x{k}: forward differs"
                );
                let ga = (&ours * &r)?.sum_all()?.backward()?;
                for (name, t) in [
                    ("x", &x),
                    ("weight", &w),
                    ("bias", &b),
                    ("ln w", &lw),
                    ("ln b", &lb),
                ] {
                    let (a, e) = (ga.get(t.as_tensor()), gb.get(t.as_tensor()));
                    let (Some(a), Some(e)) = (a, e) else {
                        panic!("{isa} {k}x{k}: missing gradient of {name}")
                    };
                    let d = rel_diff(a, e);
                    assert!(d < 1e-4, "{isa} {k}x{k}: {name} gradient differs by {d}");
                }
            }
        }
        // Nothing tracks a gradient (inference): the same op, bitwise equal to the three fast
        // inference layers; the reference policy runs the layers (None).
        let w = Tensor::randn(0f32, 0.3, (c, 1, 3, 3), &dev)?;
        let b = Tensor::randn(0f32, 0.1, c, &dev)?;
        let lw = (Tensor::randn(0f32, 0.1, c, &dev)? + 1.0)?;
        let lb = Tensor::randn(0f32, 0.1, c, &dev)?;
        let x = Tensor::randn(0f32, 1., (2, 6, 5, c), &dev)?;
        for isa in Isa::supported() {
            let policy = KernelPolicy::with_isa(isa)?;
            let dw = DepthwiseConv2dNhwc::with_policy(&w, Some(&b), 1, policy)?;
            let fused = dw
                .forward_norm_gelu(&x, (&lw, &lb, 1e-6))?
                .expect("the fused op applies to f32 CPU tensors");
            let f = dw.forward(&x)?;
            let f = crate::ops::fused::layer_norm_last_dim_with(&f, &lw, &lb, 1e-6, policy)?;
            let layers = crate::ops::activation::gelu_erf_with(&f, policy)?;
            let (a, e) = (
                fused.flatten_all()?.to_vec1::<f32>()?,
                layers.flatten_all()?.to_vec1::<f32>()?,
            );
            assert!(
                a.iter().zip(&e).all(|(a, e)| a.to_bits() == e.to_bits()),
                "{isa}: the fused inference forward differs from the three layers"
            );
        }
        let dw = DepthwiseConv2dNhwc::with_policy(&w, Some(&b), 1, KernelPolicy::reference())?;
        assert!(dw.forward_norm_gelu(&x, (&lw, &lb, 1e-6))?.is_none());
        Ok(())
    }
}
