//! [`Linear`]: a linear layer whose f32 CPU weights are packed once, when it is built, for the
//! crate's GEMM ([`super::gemm`]), and [`mlp`], InternImage's `fc2(gelu(fc1(x)))` on such layers.

use super::gemm::{forward_packed, mlp_forward_packed, pack_linear, SharedPackedWeight};
use candle_core::{DType, Module, Result, Tensor};

/// A linear layer `y = x @ weight^T + bias` over the last dimension, like `candle_nn::Linear`.
///
/// When the weight is an f32, contiguous CPU tensor that tracks no gradient and the CPU has
/// AVX2/FMA, it is packed once here into the kernel's panel layout and the tensors are dropped
/// (no second copy is kept); the forward then runs the packed GEMM with the bias (and GELU)
/// fused, or, for an input that tracks a gradient, candle's matmul on the unpacked weights (so
/// the input gradient is never lost). Otherwise (GPUs, f16/bf16, trainable weights, other CPUs) it keeps the tensors and runs
/// [`super::linear`]; bf16 on the CPU runs in f32.
#[derive(Debug, Clone)]
pub struct Linear {
    weights: Weights,
}

#[derive(Debug, Clone)]
enum Weights {
    /// Candle tensors: GPUs, f16/bf16, tracked (trainable) weights, CPUs without AVX2/FMA.
    Tensors(candle_nn::Linear),
    /// f32 weight and bias packed for the CPU GEMM.
    Packed(SharedPackedWeight),
}

impl Linear {
    /// A layer from `weight` (out, in) and an optional `bias` (out).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weights = match pack_linear(&weight, bias.as_ref())? {
            Some(packed) => Weights::Packed(packed),
            None => Weights::Tensors(candle_nn::Linear::new(weight, bias)),
        };
        Ok(Self { weights })
    }

    /// Whether the weights were packed for the CPU GEMM.
    pub fn is_packed(&self) -> bool {
        matches!(self.weights, Weights::Packed(_))
    }

    /// `gelu_erf(self.forward(xs))`, with the bias add and the GELU fused where possible.
    pub fn forward_gelu(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_impl(xs, true)
    }

    fn forward_impl(&self, xs: &Tensor, gelu: bool) -> Result<Tensor> {
        let apply = |xs: &Tensor, lin: &candle_nn::Linear| {
            if gelu {
                super::linear_gelu(xs, lin)
            } else {
                super::linear(xs, lin)
            }
        };
        match &self.weights {
            // The packed GEMM has no backward: a tracked input (saliency, a frozen backbone under
            // a trainable stem) takes the tensor path on the unpacked weights.
            Weights::Packed(p) if xs.track_op() => {
                let (w, b) = p.unpack()?;
                apply(xs, &candle_nn::Linear::new(w, Some(b)))
            }
            Weights::Packed(p) => forward_packed(xs, p, gelu),
            Weights::Tensors(lin) if bf16_on_cpu(xs) => {
                let w = lin.weight().to_dtype(DType::F32)?;
                let b = lin.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
                let lin = candle_nn::Linear::new(w, b);
                apply(&xs.to_dtype(DType::F32)?, &lin)?.to_dtype(DType::BF16)
            }
            Weights::Tensors(lin) => apply(xs, lin),
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_impl(xs, false)
    }
}

/// Candle's CPU matmul has no bf16 kernel: on the CPU, bf16 products are computed in f32.
pub(crate) fn bf16_on_cpu(t: &Tensor) -> bool {
    t.dtype() == DType::BF16 && t.device().is_cpu()
}

/// `fc2(gelu_erf(fc1(xs)))`, InternImage's MLP, on (..., C) channels-last input.
///
/// With packed layers and enough rows to keep every thread busy, the rows are processed in
/// blocks whose hidden activations stay in cache (the (..., 4C) hidden tensor is never
/// written to memory); with few rows, two packed GEMMs that also split the columns. Unpacked f32
/// layers use the row-blocked MLP on candle's tensors; anything else `fc1.forward_gelu` then
/// `fc2.forward`.
pub fn mlp(xs: &Tensor, fc1: &Linear, fc2: &Linear) -> Result<Tensor> {
    let bf16_cpu = bf16_on_cpu(xs);
    match (&fc1.weights, &fc2.weights) {
        (Weights::Packed(a), Weights::Packed(b)) if !xs.track_op() => mlp_forward_packed(xs, a, b),
        (Weights::Tensors(a), Weights::Tensors(b)) if !bf16_cpu => super::linear::mlp(xs, a, b),
        _ => fc2.forward(&fc1.forward_gelu(xs)?),
    }
}
