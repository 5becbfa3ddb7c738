//! Operators: DCNv3 and DCNv4 (CPU, CUDA, Metal) and the fast channels-last helpers the network needs.

pub mod activation;
pub mod conv;
pub mod dcnv3;
pub mod dcnv4;
pub(crate) mod dense;
pub mod depthwise;
pub mod fused;
#[cfg(target_arch = "x86_64")]
mod gelu_avx2;
pub(crate) mod gemm;
mod linear;
pub(crate) mod simd;

pub use activation::{gelu_erf, linear, linear_gelu};
pub use conv::Conv2dNhwc;
pub use dcnv3::{dcnv3, Dcnv3Config};
pub use dcnv4::dcnv4;
pub use dense::{mlp, Linear};
pub use depthwise::depthwise_conv2d_nhwc;
pub use fused::{layer_norm_last_dim, softmax_groups};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result};

/// The values of a CPU tensor as one contiguous slice of `T`, for the custom ops' CPU kernels.
///
/// `op` and `what` name the operator and the argument in the error, which says what to do when
/// the dtype is not `T` or the layout is strided.
pub(crate) fn contiguous_slice<'a, T: candle_core::WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [T]> {
    let values = storage.as_slice::<T>().map_err(|_| {
        candle_core::Error::msg(format!(
            "{op}: the CPU kernel takes the {what} as {:?}, got {:?}; convert it with .to_dtype()",
            T::DTYPE,
            storage.dtype()
        ))
    })?;
    match layout.contiguous_offsets() {
        Some((a, b)) if b <= values.len() => Ok(&values[a..b]),
        Some((a, b)) => candle_core::bail!(
            "{op}: the {what} spans [{a}, {b}) but its storage holds {} values",
            values.len()
        ),
        None => candle_core::bail!(
            "{op}: the {what} must be contiguous (shape {:?}, strides {:?}); call .contiguous() first",
            layout.dims(),
            layout.stride()
        ),
    }
}
