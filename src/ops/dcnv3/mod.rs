//! DCNv3 core operator (placeholder API; implementation in progress).

use candle_core::{Result, Tensor};

/// Geometry of a DCNv3 core call, named like the official operator's arguments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dcnv3Config {
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub pad_h: usize,
    pub pad_w: usize,
    pub dilation_h: usize,
    pub dilation_w: usize,
    pub group: usize,
    pub group_channels: usize,
    pub offset_scale: f64,
    pub remove_center: bool,
}

impl Dcnv3Config {
    /// InternImage's setting: 3x3 kernel, stride 1, pad 1, dilation 1.
    pub fn internimage(group: usize, group_channels: usize, offset_scale: f64) -> Self {
        Self {
            kernel_h: 3,
            kernel_w: 3,
            stride_h: 1,
            stride_w: 1,
            pad_h: 1,
            pad_w: 1,
            dilation_h: 1,
            dilation_w: 1,
            group,
            group_channels,
            offset_scale,
            remove_center: false,
        }
    }
}

/// DCNv3 core: input (N,Hin,Win,G*Cg), offset (N,Hout,Wout,G*P*2), mask (N,Hout,Wout,G*P).
pub fn dcnv3(input: &Tensor, offset: &Tensor, mask: &Tensor, cfg: &Dcnv3Config) -> Result<Tensor> {
    let _ = (input, offset, mask, cfg);
    candle_core::bail!("dcnv3: not implemented yet")
}
