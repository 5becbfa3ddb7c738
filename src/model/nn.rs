//! Small shared helpers: LayerNorm loading and the debug-activation recorder.

use crate::cpu::KernelPolicy;
use crate::ops::dense::bf16_on_cpu;
pub(crate) use crate::ops::Linear;
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// LayerNorm epsilon used everywhere in InternImage.
pub const LN_EPS: f64 = 1e-6;

/// Affine LayerNorm over the last (channel) dimension, eps 1e-6.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    policy: KernelPolicy,
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        crate::ops::layer_norm_last_dim_with(xs, &self.weight, &self.bias, LN_EPS, self.policy)
    }
}

impl LayerNorm {
    /// The affine weight and bias (C each) and the epsilon.
    pub(crate) fn params(&self) -> (&Tensor, &Tensor, f64) {
        (&self.weight, &self.bias, LN_EPS)
    }
}

/// A deformable layer's output projection of its core's output `y`, recorded as `dcn.out`.
pub(crate) fn project_rec(output_proj: &Linear, y: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
    let out = output_proj.forward(y)?;
    rec.put("dcn.out", &out);
    Ok(out)
}

/// Loads an affine LayerNorm (`weight`, `bias`) with eps 1e-6.
pub(crate) fn layer_norm(size: usize, vb: VarBuilder, policy: KernelPolicy) -> Result<LayerNorm> {
    let weight = vb.get(size, "weight")?;
    let bias = vb.get(size, "bias")?;
    Ok(LayerNorm {
        weight,
        bias,
        policy,
    })
}

/// The per-call state of a forward pass: training mode (stochastic depth, dropout) and, when
/// enabled, the named intermediate activations (parity debugging).
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    items: Option<Vec<(String, Tensor)>>,
    prefix: String,
    training: bool,
}

impl Recorder {
    pub(crate) fn off() -> Self {
        Self::default()
    }

    /// A pass that records nothing, in training mode when `training`.
    pub(crate) fn mode(training: bool) -> Self {
        Self {
            training,
            ..Self::default()
        }
    }

    /// The same mode, recording nothing (for the parts a debug pass does not record).
    pub(crate) fn quiet(&self) -> Self {
        Self::mode(self.training)
    }

    /// Whether this is a training pass.
    pub(crate) fn training(&self) -> bool {
        self.training
    }

    pub(crate) fn enabled() -> Self {
        Self {
            items: Some(Vec::new()),
            ..Self::default()
        }
    }

    pub(crate) fn on(&self) -> bool {
        self.items.is_some()
    }

    pub(crate) fn set_prefix(&mut self, prefix: &str) {
        self.prefix = prefix.to_string();
    }

    pub(crate) fn put(&mut self, name: &str, t: &Tensor) {
        if let Some(items) = &mut self.items {
            items.push((format!("{}{}", self.prefix, name), t.clone()));
        }
    }

    pub(crate) fn into_items(self) -> Vec<(String, Tensor)> {
        self.items.unwrap_or_default()
    }
}

/// `a.matmul(b)`, through f32 for bf16 on the CPU.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if bf16_on_cpu(a) {
        a.to_dtype(DType::F32)?
            .matmul(&b.to_dtype(DType::F32)?)?
            .to_dtype(DType::BF16)
    } else {
        a.matmul(b)
    }
}

/// Loads `weight` (out, in) and `bias` (out).
pub(crate) fn linear(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
    policy: KernelPolicy,
) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Linear::with_policy(weight, Some(bias), policy)
}

/// A 2-D convolution (NCHW) that also runs bf16 on the CPU.
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    pad: usize,
    /// The same convolution laid out for channels-last input (used by `forward_nhwc`).
    nhwc: crate::ops::Conv2dNhwc,
}

impl Conv2d {
    /// Loads `weight` (out, in, k, k) and, when `bias`, `bias` (out); stride 2, padding 1.
    pub(crate) fn load_s2(
        c_in: usize,
        c_out: usize,
        bias: bool,
        vb: VarBuilder,
        policy: KernelPolicy,
    ) -> Result<Self> {
        let weight = vb.get((c_out, c_in, 3, 3), "weight")?;
        let bias = if bias {
            Some(vb.get(c_out, "bias")?)
        } else {
            None
        };
        let nhwc = crate::ops::Conv2dNhwc::with_policy(&weight, bias.as_ref(), 2, 1, policy)?;
        Ok(Self {
            weight,
            bias,
            stride: 2,
            pad: 1,
            nhwc,
        })
    }

    /// Channels-last in and out: (N, H, W, Cin) -> (N, Ho, Wo, Cout), without NCHW round trips
    /// (bf16 on the CPU goes through the f32 NCHW path).
    pub(crate) fn forward_nhwc(&self, xs: &Tensor) -> Result<Tensor> {
        if bf16_on_cpu(xs) {
            self.forward(&xs.permute((0, 3, 1, 2))?)?
                .permute((0, 2, 3, 1))?
                .contiguous()
        } else {
            self.nhwc.forward(xs)
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let conv = crate::ops::conv::conv2d_nchw;
        if bf16_on_cpu(xs) {
            let w = self.weight.to_dtype(DType::F32)?;
            let b = self
                .bias
                .as_ref()
                .map(|b| b.to_dtype(DType::F32))
                .transpose()?;
            conv(
                &xs.to_dtype(DType::F32)?,
                &w,
                b.as_ref(),
                self.stride,
                self.pad,
            )?
            .to_dtype(DType::BF16)
        } else {
            conv(xs, &self.weight, self.bias.as_ref(), self.stride, self.pad)
        }
    }
}

/// Stochastic depth: zeroes whole samples of a residual branch (N, ...) with probability `p` and
/// scales the kept ones by `1 / (1 - p)` (timm's `drop_path`, `scale_by_keep`).
pub(crate) fn drop_path(branch: &Tensor, p: f64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(branch.clone());
    }
    let keep = 1.0 - p;
    let n = branch.dim(0)?;
    let mut shape = vec![1usize; branch.rank()];
    shape[0] = n;
    let mask = Tensor::rand(0f32, 1f32, n, branch.device())?
        .lt(keep as f32)?
        .to_dtype(branch.dtype())?
        .affine(1.0 / keep, 0.0)?
        .reshape(shape)?;
    branch.broadcast_mul(&mask)
}

/// Values per rayon task in the residual kernel.
const RES_CHUNK: usize = 16 * 1024;

/// `out = x + branch` or `out = x + gamma * branch` (gamma per channel, the last dim).
fn residual_f32(x: &[f32], branch: &[f32], gamma: Option<&[f32]>, out: &mut [f32]) {
    use rayon::prelude::*;
    let rows = |x: &[f32], b: &[f32], o: &mut [f32]| match gamma {
        None => {
            for ((o, &x), &b) in o.iter_mut().zip(x).zip(b) {
                *o = x + b;
            }
        }
        Some(g) => {
            let c = g.len();
            for ((o, x), b) in o.chunks_mut(c).zip(x.chunks(c)).zip(b.chunks(c)) {
                for (((o, &x), &b), &g) in o.iter_mut().zip(x).zip(b).zip(g) {
                    *o = x + g * b;
                }
            }
        }
    };
    if out.len() <= RES_CHUNK {
        rows(x, branch, out)
    } else {
        let step = gamma.map_or(RES_CHUNK, |g| (RES_CHUNK / g.len()).max(1) * g.len());
        out.par_chunks_mut(step)
            .zip(x.par_chunks(step).zip(branch.par_chunks(step)))
            .for_each(|(o, (x, b))| rows(x, b, o));
    }
}

fn f32_slice<'a>(s: &'a candle_core::CpuStorage, l: &candle_core::Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("residual: expected contiguous f32 tensors"),
    }
}

/// `x + branch` on the CPU (f32), one rayon pass.
struct ResidualAdd;

impl candle_core::CustomOp2 for ResidualAdd {
    fn name(&self) -> &'static str {
        "internimage-residual-add"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (x, b) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?);
        let mut out = vec![0f32; x.len()];
        residual_f32(x, b, None, &mut out);
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `x + gamma * branch` on the CPU (f32), one rayon pass.
struct ResidualScaleAdd;

impl candle_core::CustomOp3 for ResidualScaleAdd {
    fn name(&self) -> &'static str {
        "internimage-residual-scale-add"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (x, b, g) = (f32_slice(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        if g.is_empty() || x.len() % g.len() != 0 {
            candle_core::bail!(
                "residual: gamma of {} does not divide {} values",
                g.len(),
                x.len()
            )
        }
        let mut out = vec![0f32; x.len()];
        residual_f32(x, b, Some(g), &mut out);
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// The residual update `x + gamma * branch` (`gamma` per channel, optional) of a block.
///
/// On the CPU in f32 this is one rayon pass (candle's own binary ops run large tensors on a
/// second, spinning thread pool that competes with rayon's GEMM threads); elsewhere plain ops.
/// The reference policy runs the plain ops.
pub(crate) fn residual(
    x: &Tensor,
    branch: &Tensor,
    gamma: Option<&Tensor>,
    policy: KernelPolicy,
) -> Result<Tensor> {
    let fast = x.device().is_cpu()
        && policy.is_fast()
        && x.dtype() == DType::F32
        && branch.dtype() == DType::F32
        && x.dims() == branch.dims()
        && !crate::ops::tracks_grad(&[x, branch])
        && gamma.is_none_or(|g| {
            g.dtype() == DType::F32 && !g.track_op() && g.dims() == [x.dims()[x.rank() - 1]]
        });
    if !fast {
        return match gamma {
            Some(g) => x + branch.broadcast_mul(g)?,
            None => x + branch,
        };
    }
    let (x, branch) = (x.contiguous()?, branch.contiguous()?);
    match gamma {
        Some(g) => crate::ops::inference_op3(&x, &branch, &g.contiguous()?, &ResidualScaleAdd),
        None => crate::ops::inference_op2(&x, &branch, &ResidualAdd),
    }
}

/// The residual update of a block with stochastic depth: `x + drop_path(gamma * branch, p)`
/// (`p` = 0 outside training). When something tracks a gradient and the tensors are f32 on the
/// CPU under a fast policy this is one training op with its own backward
/// ([`crate::ops::train::residual`]); otherwise [`drop_path`] then [`residual`].
pub(crate) fn residual_drop(
    x: &Tensor,
    branch: &Tensor,
    gamma: Option<&Tensor>,
    p: f64,
    policy: KernelPolicy,
) -> Result<Tensor> {
    use crate::ops::train;
    if x.dims() == branch.dims() && train::engages(policy, &[x, branch], gamma) {
        let scale = train::drop_path_scales(x.dim(0)?, p)?;
        return train::residual(x, branch, gamma, scale);
    }
    let branch = drop_path(branch, p)?;
    residual(x, &branch, gamma, policy)
}
