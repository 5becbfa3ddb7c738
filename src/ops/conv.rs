//! Dense 2-D convolution on channels-last tensors (the stem and downsampling convolutions).
//!
//! On the CPU the input is unfolded once into an (N*Ho*Wo, kh*kw*Cin) patch matrix (each patch
//! row is a run of contiguous channel vectors, so the copy is cheap), multiplied by the weight
//! laid out once as a (Cout, kh*kw*Cin) [`super::Linear`] (packed for the CPU GEMM, bias fused),
//! and the GEMM output already is the NHWC result: no NCHW round trips. On other devices candle's
//! `conv2d` runs on a permuted view.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_slice;
use crate::cpu::KernelPolicy;

/// A convolution with square stride and zero padding, weights pre-laid for channels-last input.
#[derive(Debug, Clone)]
pub struct Conv2dNhwc {
    /// PyTorch layout (Cout, Cin, kh, kw), for the non-CPU path.
    weight: Tensor,
    /// The patch-matrix product: weight (Cout, kh * kw * Cin), column (i, j, ci) for tap (i, j)
    /// and input channel ci, and the bias; packed for the CPU GEMM where that applies. `None`
    /// for trainable weights (the layout is a copy, which would not follow their updates).
    patches_to_out: Option<super::Linear>,
    bias: Option<Tensor>,
    stride: usize,
    pad: usize,
    policy: KernelPolicy,
}

impl Conv2dNhwc {
    /// From the PyTorch weight (Cout, Cin, kh, kw), an optional bias (Cout), the stride and the
    /// zero padding on each side (groups = 1, dilation = 1).
    pub fn new(weight: &Tensor, bias: Option<&Tensor>, stride: usize, pad: usize) -> Result<Self> {
        Self::with_policy(weight, bias, stride, pad, KernelPolicy::process_default()?)
    }

    /// Like [`Conv2dNhwc::new`], with the CPU kernels of `policy` (the reference policy runs
    /// candle's `conv2d`).
    pub fn with_policy(
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        pad: usize,
        policy: KernelPolicy,
    ) -> Result<Self> {
        let (cout, cin, kh, kw) = weight.dims4()?;
        if cout == 0 || cin == 0 || kh == 0 || kw == 0 || stride == 0 {
            candle_core::bail!(
                "conv2d_nhwc: need a non-empty (Cout, Cin, kh, kw) weight and stride >= 1, got {:?}, stride {stride}",
                weight.dims()
            );
        }
        if let Some(b) = bias {
            if b.dims() != [cout] {
                candle_core::bail!(
                    "conv2d_nhwc: bias must be ({cout}) for a weight {:?}, got {:?}",
                    weight.dims(),
                    b.dims()
                );
            }
        }
        let patches_to_out = if policy.is_reference()
            || super::tracks_grad(&[weight])
            || bias.is_some_and(|b| b.track_op())
        {
            None
        } else {
            let weight_ok = weight
                .permute((0, 2, 3, 1))?
                .reshape((cout, kh * kw * cin))?
                .contiguous()?;
            Some(super::Linear::with_policy(
                weight_ok,
                bias.cloned(),
                policy,
            )?)
        };
        Ok(Self {
            weight: weight.clone(),
            patches_to_out,
            bias: bias.cloned(),
            stride,
            pad,
            policy,
        })
    }

    fn out_size(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (_, _, kh, kw) = self.weight.dims4()?;
        let (s, p) = (self.stride, self.pad);
        super::window_out_size("conv2d_nhwc", (h, w), (kh, kw), (s, s), (p, p))
    }
}

impl Module for Conv2dNhwc {
    /// `xs` (N, H, W, Cin) -> (N, Ho, Wo, Cout), `Ho = (H + 2 pad - kh) / stride + 1`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (n, h, w, c) = xs.dims4()?;
        let (cout, cin, kh, kw) = self.weight.dims4()?;
        if c != cin {
            candle_core::bail!(
                "conv2d_nhwc: input has {c} channels (last dim of NHWC {:?}), the weight expects {cin}",
                xs.dims()
            );
        }
        let (ho, wo) = self.out_size(h, w)?;
        let op = Im2Col {
            kh,
            kw,
            stride: self.stride,
            pad: self.pad,
            ho,
            wo,
        };
        if super::train::engages(self.policy, &[xs, &self.weight], self.bias.as_ref()) {
            // Training: patch extraction (backward: scatter-add) and the training linear (its
            // backward on the GEMM), on the weight laid out as (Cout, kh * kw * Cin).
            let patches = xs.contiguous()?.apply_op1(op)?;
            let w2 = self
                .weight
                .permute((0, 2, 3, 1))?
                .reshape((cout, kh * kw * cin))?;
            let y = super::train::linear(&patches, &w2, self.bias.as_ref(), self.policy.isa())?;
            return y.reshape((n, ho, wo, cout));
        }
        let patches_to_out = match &self.patches_to_out {
            Some(p)
                if xs.device().is_cpu()
                    && xs.dtype() == DType::F32
                    && self.weight.dtype() == DType::F32
                    && !xs.track_op() =>
            {
                p
            }
            _ => {
                let nchw = xs.permute((0, 3, 1, 2))?;
                let y = conv2d_nchw(
                    &nchw,
                    &self.weight,
                    self.bias.as_ref(),
                    self.stride,
                    self.pad,
                )?;
                return y.permute((0, 2, 3, 1))?.contiguous();
            }
        };
        let patches = super::inference_op1(&xs.contiguous()?, &op)?;
        patches_to_out.forward(&patches)?.reshape((n, ho, wo, cout))
    }
}

/// Candle's `conv2d` (NCHW, groups 1, dilation 1) plus an optional bias (Cout), differentiable.
///
/// For inputs or weights that track gradients the input is padded explicitly and cut to exactly
/// the rows and columns the windows cover: candle's conv2d backward sizes the input gradient from
/// the height alone (a wrong output padding when only the width has a remainder, e.g. 65 -> 33).
pub(crate) fn conv2d_nchw(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let y = if super::tracks_grad(&[xs, weight]) {
        let (_, _, h, w) = xs.dims4()?;
        let (_, _, kh, kw) = weight.dims4()?;
        let (ho, wo) =
            super::window_out_size("conv2d", (h, w), (kh, kw), (stride, stride), (pad, pad))?;
        xs.pad_with_zeros(2, pad, pad)?
            .pad_with_zeros(3, pad, pad)?
            .narrow(2, 0, (ho - 1) * stride + kh)?
            .narrow(3, 0, (wo - 1) * stride + kw)?
            .conv2d(weight, 0, stride, 1, 1)?
    } else {
        xs.conv2d(weight, pad, stride, 1, 1)?
    };
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(y),
    }
}

/// (N, H, W, C) -> (N*Ho*Wo, kh*kw*C) patch rows (zeros outside the image).
struct Im2Col {
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "internimage-im2col-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = l.shape().dims4()?;
        let x = contiguous_slice::<f32>(s, l, "conv2d_nhwc (im2col)", "input")?;
        let Self {
            kh,
            kw,
            stride,
            pad,
            ho,
            wo,
        } = *self;
        let row_len = kh * kw * c;
        let len = n * ho * wo * row_len;
        // Written once: each task writes every element of its rows (a tap's C values from the
        // image, or zeros where the tap falls outside it), with no zero-fill of the whole
        // buffer on the calling thread first (paired on the Zen 4, InternImage-T's five 3x3
        // stride-2 convolutions: 5-22% faster at batch 1, 0-16% at batch 8).
        let mut out = Vec::<f32>::with_capacity(len);
        // One task per output row (n, oh): Wo patch rows.
        out.spare_capacity_mut()[..len]
            .par_chunks_mut((wo * row_len).max(1))
            .enumerate()
            .for_each(|(r, dst)| {
                let (b, oh) = (r / ho, r % ho);
                let img = &x[b * h * w * c..(b + 1) * h * w * c];
                for (ow, patch) in dst.chunks_exact_mut(row_len.max(1)).enumerate() {
                    for (t, tap) in patch.chunks_exact_mut(c.max(1)).enumerate() {
                        let (i, j) = (t / kw, t % kw);
                        let ih = (oh * stride + i) as isize - pad as isize;
                        let iw = (ow * stride + j) as isize - pad as isize;
                        if ih < 0 || ih as usize >= h || iw < 0 || iw as usize >= w {
                            crate::cpu::filled(tap, 0.0);
                        } else {
                            crate::cpu::copied(
                                tap,
                                &img[(ih as usize * w + iw as usize) * c..][..c],
                            );
                        }
                    }
                }
            });
        // SAFETY: the chunks cover the first `len` elements (Ho rows of Wo patches of kh*kw
        // taps of C values each, per image), every one written above; the capacity is `len`.
        unsafe { out.set_len(len) };
        Ok((CpuStorage::F32(out), Shape::from((n * ho * wo, row_len))))
    }

    /// Scatter-adds the patch gradients back onto the input pixels they were copied from.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, h, w, c) = arg.dims4()?;
        let Self {
            kh,
            kw,
            stride,
            pad,
            ho,
            wo,
        } = *self;
        let row_len = kh * kw * c;
        let g = grad.contiguous()?;
        if !g.device().is_cpu()
            || g.dtype() != DType::F32
            || g.elem_count() != n * ho * wo * row_len
        {
            candle_core::bail!("conv2d_nhwc (im2col) backward: expected an f32 CPU gradient")
        }
        let (gs, gl) = g.storage_and_layout();
        let gv = super::cpu_f32_values(&gs, gl, "conv2d_nhwc (im2col) backward", "gradient")?;
        let mut dx = super::written_zeros_par(n * h * w * c);
        let img_len = h * w * c;
        if img_len > 0 {
            dx.par_chunks_mut(img_len).enumerate().for_each(|(b, img)| {
                for oh in 0..ho {
                    for ow in 0..wo {
                        let patch = &gv[((b * ho + oh) * wo + ow) * row_len..][..row_len];
                        for i in 0..kh {
                            let Some(ih) = (oh * stride + i).checked_sub(pad).filter(|&v| v < h)
                            else {
                                continue;
                            };
                            for j in 0..kw {
                                let Some(iw) =
                                    (ow * stride + j).checked_sub(pad).filter(|&v| v < w)
                                else {
                                    continue;
                                };
                                let dst = &mut img[(ih * w + iw) * c..][..c];
                                let src = &patch[(i * kw + j) * c..][..c];
                                for (d, s) in dst.iter_mut().zip(src) {
                                    *d += s;
                                }
                            }
                        }
                    }
                }
            });
        }
        Ok(Some(Tensor::from_vec(dx, (n, h, w, c), arg.device())?))
    }
}
