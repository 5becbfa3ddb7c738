//! Shape checks of the DCNv4 operator (on top of DCNv3's, which it shares).

use super::offset_mask_channels;
use crate::ops::dcnv3::{Dcnv3Config, Dcnv3Geometry};
use candle_core::{bail, Result, Shape};

/// Validates the input and offset_mask shapes against `cfg` and returns the resolved geometry
/// (the DCNv3 geometry of the same call). Errors name the expected and the given shape.
pub(crate) fn geometry(
    cfg: &Dcnv3Config,
    input: &Shape,
    offset_mask: &Shape,
) -> Result<Dcnv3Geometry> {
    let to_v4 = |e: candle_core::Error| {
        candle_core::Error::msg(e.to_string().replacen("dcnv3:", "dcnv4:", 1))
    };
    cfg.validate().map_err(to_v4)?;
    let d = input.dims();
    if d.len() != 4 {
        bail!(
            "dcnv4: input must be a rank-4 channels-last tensor (N, H_in, W_in, group*group_channels), \
             got shape {d:?}"
        );
    }
    let (h_out, w_out) = cfg.output_size(d[1], d[2]).map_err(to_v4)?;
    let p = cfg.points();
    let k_pad = offset_mask_channels(cfg);
    let want = [d[0], h_out, w_out, k_pad];
    if offset_mask.dims() != want {
        bail!(
            "dcnv4: offset_mask must have shape (N, H_out, W_out, K_pad) = {want:?} with K_pad = \
             ceil(group*3*P/8)*8 = ceil({}*3*{p}/8)*8 for input {d:?} (kernel {}x{}, stride {}x{}, \
             pad {}x{}, dilation {}x{}), got {:?}",
            cfg.group,
            cfg.kernel_h,
            cfg.kernel_w,
            cfg.stride_h,
            cfg.stride_w,
            cfg.pad_h,
            cfg.pad_w,
            cfg.dilation_h,
            cfg.dilation_w,
            offset_mask.dims()
        );
    }
    let off = Shape::from((d[0], h_out, w_out, cfg.group * p * 2));
    let mask = Shape::from((d[0], h_out, w_out, cfg.group * p));
    cfg.geometry(input, &off, &mask).map_err(to_v4)
}
