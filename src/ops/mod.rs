//! Operators: DCNv3 (CPU, CUDA, Metal) and the fast channels-last helpers the network needs.

pub mod activation;
pub mod conv;
pub mod dcnv3;
pub mod depthwise;
pub mod fused;
mod linear;
pub(crate) mod simd;

pub use activation::{gelu_erf, linear, linear_gelu};
pub use conv::Conv2dNhwc;
pub use dcnv3::{dcnv3, Dcnv3Config};
pub use depthwise::depthwise_conv2d_nhwc;
pub use fused::{layer_norm_last_dim, softmax_groups};
pub use linear::mlp;
