//! Activations.

use candle_core::{Result, Tensor};

/// Exact (erf) GELU, as PyTorch's `nn.GELU()`.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    xs.gelu_erf()
}
