//! Classification heads: the conv head of T/S/B/L/XL and the CLIP-projector head of H/G.

use crate::cpu::KernelPolicy;
use crate::model::nn::{layer_norm, linear, matmul, LayerNorm, Linear, Recorder};
use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Token width of the H/G attention-pooling head.
pub const CLIP_DIM: usize = 1024;
/// Output width of the H/G attention-pooling head (the pooled vector).
pub const CLIP_EMBED_DIM: usize = 768;
const CLIP_HEADS: usize = 16;
const BN_EPS: f64 = 1e-5;

/// The dtype for precision-sensitive steps (BN folding, averages): f32, or f64 for f64 models.
fn accumulation_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `conv_head` (1x1 conv without bias, BatchNorm folded in, GELU), global average pool.
/// Works on the channels-last last stage; returns the pooled (N, 12C) vector.
///
/// The BatchNorm always uses its running statistics (eval mode), also while training: frozen
/// weights are folded into the conv once; trainable ones are folded on every forward, so the
/// gradients reach the conv weight and the BN affine parameters and follow their updates.
#[derive(Debug, Clone)]
pub(crate) struct ConvHead {
    proj: Linear,
    trainable: Option<Box<BnConv>>,
    dtype: DType,
    policy: KernelPolicy,
}

/// The unfolded conv + BatchNorm parameters of a trainable [`ConvHead`] (f32 or f64, the conv weight
/// as (out, in)).
#[derive(Debug, Clone)]
struct BnConv {
    w: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
}

impl BnConv {
    /// The folded (weight (out, in), bias (out)) in `dtype`.
    fn fold(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        let scale = (&self.gamma / (&self.var + BN_EPS)?.sqrt()?)?;
        let w = self
            .w
            .broadcast_mul(&scale.unsqueeze(1)?)?
            .to_dtype(dtype)?;
        let b = (&self.beta - (&self.mean * &scale)?)?.to_dtype(dtype)?;
        Ok((w, b))
    }
}

impl ConvHead {
    pub(crate) fn new(
        c_in: usize,
        c_out: usize,
        vb: VarBuilder,
        policy: KernelPolicy,
    ) -> Result<Self> {
        let dtype = vb.dtype();
        let acc = accumulation_dtype(dtype);
        // Fold in f32 (f64 for f64 models), then cast once.
        let w = vb
            .get_with_hints_dtype((c_out, c_in, 1, 1), "0.weight", Default::default(), acc)?
            .squeeze(3)?
            .squeeze(2)?;
        let bn = vb.pp("1.0");
        let get = |n: &str| bn.get_with_hints_dtype(c_out, n, Default::default(), acc);
        let (gamma, beta, mean, var) = (
            get("weight")?,
            get("bias")?,
            get("running_mean")?,
            get("running_var")?,
        );
        let bn_conv = BnConv {
            w,
            gamma,
            beta,
            mean,
            var,
        };
        let (w, b) = bn_conv.fold(dtype)?;
        let trainable = crate::ops::tracks_grad(&[&bn_conv.w, &bn_conv.gamma, &bn_conv.beta])
            .then(|| Box::new(bn_conv));
        Ok(Self {
            proj: Linear::with_policy(w, Some(b), policy)?,
            trainable,
            dtype,
            policy,
        })
    }
}

impl Module for ConvHead {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = match &self.trainable {
            Some(bn_conv) => {
                let (w, b) = bn_conv.fold(self.dtype)?;
                Linear::with_policy(w, Some(b), self.policy)?.forward_gelu(xs)?
            }
            None => self.proj.forward_gelu(xs)?,
        };
        let (n, h, w, c) = x.dims4()?;
        // Average in f32: an f16 sum over large maps loses precision.
        x.reshape((n, h * w, c))?
            .to_dtype(accumulation_dtype(x.dtype()))?
            .mean(1)?
            .to_dtype(x.dtype())
    }
}

/// The H/G head: `dcnv3_head_x4` (1x1 conv + PixelShuffle(2)) on stage 3 plus `dcnv3_head_x3`
/// (1x1 conv) on stage 2, then attention pooling (`clip_projector`) to 768 dims.
#[derive(Debug, Clone)]
pub(crate) struct ClipHead {
    head_x4: Linear,
    head_x3: Linear,
    norm_q: LayerNorm,
    norm_k: LayerNorm,
    norm_v: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    proj: Linear,
}

fn conv1x1_as_linear(
    c_in: usize,
    c_out: usize,
    vb: VarBuilder,
    policy: KernelPolicy,
) -> Result<Linear> {
    // Squeezing the 1x1 kernel dims is a layout change only (no copy).
    let w = vb
        .get((c_out, c_in, 1, 1), "weight")?
        .squeeze(3)?
        .squeeze(2)?;
    let b = vb.get(c_out, "bias")?;
    Linear::with_policy(w, Some(b), policy)
}

impl ClipHead {
    pub(crate) fn new(c2: usize, c3: usize, vb: VarBuilder, policy: KernelPolicy) -> Result<Self> {
        let cp = vb.pp("clip_projector");
        let attn = cp.pp("cross_dcn");
        let qkv = |n: &str| -> Result<Linear> {
            let w = attn.get((CLIP_DIM, CLIP_DIM), &format!("{n}.weight"))?;
            let b = attn.get(CLIP_DIM, &format!("{n}_bias"))?;
            Linear::with_policy(w, Some(b), policy)
        };
        Ok(Self {
            head_x4: conv1x1_as_linear(c3, 4 * CLIP_DIM, vb.pp("dcnv3_head_x4.0"), policy)?,
            head_x3: conv1x1_as_linear(c2, CLIP_DIM, vb.pp("dcnv3_head_x3"), policy)?,
            norm_q: layer_norm(CLIP_DIM, cp.pp("norm1_q.0"), policy)?,
            norm_k: layer_norm(CLIP_DIM, cp.pp("norm1_k.0"), policy)?,
            norm_v: layer_norm(CLIP_DIM, cp.pp("norm1_v.0"), policy)?,
            q: qkv("q")?,
            k: qkv("k")?,
            v: qkv("v")?,
            proj: linear(CLIP_DIM, CLIP_EMBED_DIM, attn.pp("proj"), policy)?,
        })
    }

    /// `x3`: stage 2 (N, 2h, 2w, 4C), `x4`: stage 3 (N, h, w, 8C), channels-last.
    pub(crate) fn forward(&self, x3: &Tensor, x4: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        let (n, h, w, _) = x4.dims4()?;
        let (_, h3, w3, _) = x3.dims4()?;
        if h3 != 2 * h || w3 != 2 * w {
            bail!(
                "InternImage CLIP-projector head: the stride-16 map is {h3}x{w3} and the stride-32 map {h}x{w}; \
                 it needs exactly twice the size, i.e. an input height and width that are multiples of 32"
            );
        }
        // 1x1 conv to 4096 then PixelShuffle(2): out[c, 2h+a, 2w+b] = in[4c + 2a + b, h, w].
        let y4 = self
            .head_x4
            .forward(x4)?
            .reshape((n, h, w, CLIP_DIM, 2, 2))?
            .permute((0, 1, 4, 2, 5, 3))?
            .reshape((n, 2 * h, 2 * w, CLIP_DIM))?;
        let y3 = self.head_x3.forward(x3)?;
        let tokens = (y4 + y3)?.reshape((n, 4 * h * w, CLIP_DIM))?;
        let l = 4 * h * w;
        let hd = CLIP_DIM / CLIP_HEADS;
        let q0 = tokens
            .to_dtype(accumulation_dtype(tokens.dtype()))?
            .mean_keepdim(1)?
            .to_dtype(tokens.dtype())?;
        let q = self.q.forward(&self.norm_q.forward(&q0)?)?;
        let k = self.k.forward(&self.norm_k.forward(&tokens)?)?;
        let v = self.v.forward(&self.norm_v.forward(&tokens)?)?;
        let q = (q.reshape((n, 1, CLIP_HEADS, hd))?.transpose(1, 2)? * (hd as f64).powf(-0.5))?
            .contiguous()?;
        let k = k
            .reshape((n, l, CLIP_HEADS, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let v = v
            .reshape((n, l, CLIP_HEADS, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let attn = matmul(&q, &k.transpose(2, 3)?)?.contiguous()?; // (N, heads, 1, L)
        let attn = if attn.track_op() {
            // candle-nn's fused softmax_last_dim has no backward.
            candle_nn::ops::softmax(&attn, candle_core::D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&attn)?
        };
        let out = matmul(&attn, &v)?; // (N, heads, 1, hd)
        let out = out.transpose(1, 2)?.reshape((n, CLIP_DIM))?;
        let out = self.proj.forward(&out)?;
        rec.put("clip_projector", &out);
        Ok(out)
    }
}
