//! Small shared helpers: LayerNorm loading and the debug-activation recorder.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

/// LayerNorm epsilon used everywhere in InternImage.
pub const LN_EPS: f64 = 1e-6;

/// Loads an affine LayerNorm (`weight`, `bias`) with eps 1e-6.
pub(crate) fn layer_norm(size: usize, vb: VarBuilder) -> Result<LayerNorm> {
    let weight = vb.get(size, "weight")?;
    let bias = vb.get(size, "bias")?;
    Ok(LayerNorm::new(weight, bias, LN_EPS))
}

/// Collects named intermediate activations when enabled (parity debugging).
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    items: Option<Vec<(String, Tensor)>>,
    prefix: String,
}

impl Recorder {
    pub(crate) fn off() -> Self {
        Self::default()
    }

    pub(crate) fn enabled() -> Self {
        Self {
            items: Some(Vec::new()),
            prefix: String::new(),
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

/// Candle's CPU matmul has no bf16 kernel: on the CPU, bf16 products are computed in f32.
fn f32_compute(t: &Tensor) -> bool {
    t.dtype() == DType::BF16 && t.device().is_cpu()
}

/// `a.matmul(b)`, through f32 for bf16 on the CPU.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if f32_compute(a) {
        a.to_dtype(DType::F32)?
            .matmul(&b.to_dtype(DType::F32)?)?
            .to_dtype(DType::BF16)
    } else {
        a.matmul(b)
    }
}

/// A Linear layer (weight (out, in), optional bias) that also runs bf16 on the CPU.
#[derive(Debug, Clone)]
pub(crate) struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    pub(crate) fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            inner: candle_nn::Linear::new(weight, bias),
        }
    }
}

/// Loads `weight` (out, in) and `bias` (out).
pub(crate) fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Ok(Linear::new(weight, Some(bias)))
}

impl Linear {
    /// `gelu_erf(self.forward(xs))`, with the bias add and GELU fused on the CPU when possible.
    pub(crate) fn forward_gelu(&self, xs: &Tensor) -> Result<Tensor> {
        if f32_compute(xs) {
            crate::ops::gelu_erf(&self.forward(xs)?)
        } else {
            crate::ops::linear_gelu(xs, &self.inner)
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if f32_compute(xs) {
            let w = self.inner.weight().to_dtype(DType::F32)?;
            let b = match self.inner.bias() {
                Some(b) => Some(b.to_dtype(DType::F32)?),
                None => None,
            };
            linear_forward(&xs.to_dtype(DType::F32)?, &w, b.as_ref())?.to_dtype(DType::BF16)
        } else {
            linear_forward(xs, self.inner.weight(), self.inner.bias())
        }
    }
}

/// `xs @ w^T + b` as one GEMM over all leading dims; on the CPU the bias is added in place
/// into the fresh GEMM output (no second tensor, no extra pass over memory).
fn linear_forward(xs: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = xs.dims();
    let Some((&k, lead)) = dims.split_last() else {
        candle_core::bail!("linear: expected an input of rank >= 1, got a scalar")
    };
    if lead.len() < 2 || !xs.is_contiguous() {
        // Small or strided inputs: candle's Linear handles every layout.
        return candle_nn::Linear::new(w.clone(), b.cloned()).forward(xs);
    }
    let m: usize = lead.iter().product();
    let y = xs.reshape((m, k))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b)
            if y.device().is_cpu()
                && !y.track_op()
                && !b.track_op()
                && b.dtype() == y.dtype()
                && b.is_contiguous() =>
        {
            // `y` is a fresh GEMM output: nothing else refers to its storage.
            y.inplace_op2(b, &BiasAddInplace)?;
            y
        }
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = lead.to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

/// `rows += bias` over the rows of a contiguous CPU tensor.
struct BiasAddInplace;

fn add_bias_rows<T: Copy + std::ops::AddAssign + Send + Sync>(xs: &mut [T], bias: &[T]) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let n = bias.len();
    let add = |rows: &mut [T]| {
        for r in rows.chunks_mut(n) {
            for (x, &b) in r.iter_mut().zip(bias) {
                *x += b;
            }
        }
    };
    if xs.len() <= CHUNK {
        add(xs)
    } else {
        xs.par_chunks_mut((CHUNK / n).max(1) * n).for_each(add)
    }
}

impl candle_core::InplaceOp2 for BiasAddInplace {
    fn name(&self) -> &'static str {
        "internimage-bias-add-inplace"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<()> {
        use candle_core::CpuStorage as S;
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("bias add: both tensors must be contiguous")
        };
        let n = b1 - b0;
        if n == 0 || (a1 - a0) % n != 0 {
            candle_core::bail!("bias add: {} values are not rows of {n}", a1 - a0)
        }
        match (s1, s2) {
            (S::F32(x), S::F32(b)) => add_bias_rows(&mut x[a0..a1], &b[b0..b1]),
            (S::F16(x), S::F16(b)) => add_bias_rows(&mut x[a0..a1], &b[b0..b1]),
            (S::BF16(x), S::BF16(b)) => add_bias_rows(&mut x[a0..a1], &b[b0..b1]),
            (S::F64(x), S::F64(b)) => add_bias_rows(&mut x[a0..a1], &b[b0..b1]),
            _ => candle_core::bail!("bias add: unsupported dtype combination"),
        }
        Ok(())
    }
}

/// A 2-D convolution (NCHW) that also runs bf16 on the CPU.
#[derive(Debug, Clone)]
pub(crate) struct Conv2d {
    inner: candle_nn::Conv2d,
}

impl Conv2d {
    /// Loads `weight` (out, in, k, k) and, when `bias`, `bias` (out); stride 2, padding 1.
    pub(crate) fn load_s2(c_in: usize, c_out: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let weight = vb.get((c_out, c_in, 3, 3), "weight")?;
        let bias = if bias {
            Some(vb.get(c_out, "bias")?)
        } else {
            None
        };
        Ok(Self {
            inner: candle_nn::Conv2d::new(weight, bias, cfg),
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if f32_compute(xs) {
            let w = self.inner.weight().to_dtype(DType::F32)?;
            let b = match self.inner.bias() {
                Some(b) => Some(b.to_dtype(DType::F32)?),
                None => None,
            };
            candle_nn::Conv2d::new(w, b, *self.inner.config())
                .forward(&xs.to_dtype(DType::F32)?)?
                .to_dtype(DType::BF16)
        } else {
            self.inner.forward(xs)
        }
    }
}
