//! Channels-last depthwise convolution.

use candle_core::{Result, Tensor};

/// Depthwise k x k convolution, stride 1, zero padding `pad`, on a channels-last tensor.
///
/// `xs` is (N, H, W, C); `weight` is the PyTorch depthwise weight (C, 1, k, k); `bias` is (C).
/// Returns (N, H + 2*pad - k + 1, W + 2*pad - k + 1, C).
pub fn depthwise_conv2d_nhwc(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    pad: usize,
) -> Result<Tensor> {
    let (_n, h, w, c) = xs.dims4()?;
    let (wc, one, kh, kw) = weight.dims4()?;
    if wc != c || one != 1 {
        candle_core::bail!(
            "depthwise_conv2d_nhwc: weight must be ({c}, 1, k, k) for {c} channels, got {:?}",
            weight.dims()
        );
    }
    let padded = xs.pad_with_zeros(1, pad, pad)?.pad_with_zeros(2, pad, pad)?;
    let (ho, wo) = (h + 2 * pad + 1 - kh, w + 2 * pad + 1 - kw);
    // (k, k, C) so that tap (i, j) is a per-channel vector.
    let taps = weight.squeeze(1)?.permute((1, 2, 0))?.contiguous()?;
    let mut acc: Option<Tensor> = None;
    for i in 0..kh {
        for j in 0..kw {
            let win = padded.narrow(1, i, ho)?.narrow(2, j, wo)?;
            let t = win.broadcast_mul(&taps.get(i)?.get(j)?)?;
            acc = Some(match acc {
                None => t,
                Some(a) => (a + t)?,
            });
        }
    }
    let out = match acc {
        Some(a) => a,
        None => candle_core::bail!("depthwise_conv2d_nhwc: empty kernel {:?}", weight.dims()),
    };
    match bias {
        Some(b) => out.broadcast_add(b),
        None => Ok(out),
    }
}
