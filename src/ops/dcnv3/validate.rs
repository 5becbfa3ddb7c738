//! Shape and parameter checks shared by every DCNv3 backend.

use super::Dcnv3Config;
use candle_core::{bail, Result, Shape};

/// Resolved sizes of one DCNv3 call, derived from the config and the input shape.
///
/// Every backend (CPU, CUDA, Metal) receives these numbers; all tensors are channels-last and
/// contiguous: input (n, h_in, w_in, channels), offset (n, h_out, w_out, group*points*2),
/// mask (n, h_out, w_out, group*points), output (n, h_out, w_out, channels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dcnv3Geometry {
    /// Batch size N.
    pub n: usize,
    /// Input height.
    pub h_in: usize,
    /// Input width.
    pub w_in: usize,
    /// Output height (from the kernel/stride/pad/dilation formula).
    pub h_out: usize,
    /// Output width.
    pub w_out: usize,
    /// Number of groups G.
    pub group: usize,
    /// Channels per group Cg.
    pub group_channels: usize,
    /// Total channels C = G*Cg.
    pub channels: usize,
    /// Sampling points per group P (kernel_h*kernel_w, minus one with remove_center).
    pub points: usize,
}

impl Dcnv3Geometry {
    /// Number of output pixels N*h_out*w_out.
    pub fn out_pixels(&self) -> usize {
        self.n * self.h_out * self.w_out
    }
    /// Element count of the input (and of its gradient).
    pub fn input_len(&self) -> usize {
        self.n * self.h_in * self.w_in * self.channels
    }
    /// Element count of the output.
    pub fn output_len(&self) -> usize {
        self.out_pixels() * self.channels
    }
    /// Element count of the offset tensor (and of its gradient).
    pub fn offset_len(&self) -> usize {
        self.out_pixels() * self.group * self.points * 2
    }
    /// Element count of the mask tensor (and of its gradient).
    pub fn mask_len(&self) -> usize {
        self.out_pixels() * self.group * self.points
    }
}

fn fmt_dims(d: &[usize]) -> String {
    let inner: Vec<String> = d.iter().map(|x| x.to_string()).collect();
    format!("({})", inner.join(", "))
}

impl Dcnv3Config {
    /// Checks the configuration alone (non-zero sizes, finite offset_scale, remove_center rules).
    pub fn validate(&self) -> Result<()> {
        let c = self;
        let named = [
            ("kernel_h", c.kernel_h),
            ("kernel_w", c.kernel_w),
            ("stride_h", c.stride_h),
            ("stride_w", c.stride_w),
            ("dilation_h", c.dilation_h),
            ("dilation_w", c.dilation_w),
            ("group", c.group),
            ("group_channels", c.group_channels),
        ];
        for (name, v) in named {
            if v == 0 {
                bail!("dcnv3: {name} must be at least 1, got 0 (config {c:?})");
            }
        }
        // The kernels keep coordinates, channel offsets and point counts in i32: every size and
        // the products derived from them must stay below 2^31 (checked without overflowing).
        let limit = i32::MAX as u128;
        let prod = |xs: &[usize]| xs.iter().fold(1u128, |a, &x| a.saturating_mul(x as u128));
        let (kh, kw) = (c.kernel_h, c.kernel_w);
        let derived = [
            ("pad_h", c.pad_h as u128),
            ("pad_w", c.pad_w as u128),
            ("stride_h", c.stride_h as u128),
            ("stride_w", c.stride_w as u128),
            ("kernel_h*kernel_w", prod(&[kh, kw])),
            ("group*group_channels", prod(&[c.group, c.group_channels])),
            ("group*P*3", prod(&[c.group, kh, kw, 3])),
            (
                "dilation_h*(kernel_h-1)+1",
                prod(&[c.dilation_h, kh - 1]).saturating_add(1),
            ),
            (
                "dilation_w*(kernel_w-1)+1",
                prod(&[c.dilation_w, kw - 1]).saturating_add(1),
            ),
        ];
        for (name, v) in derived {
            if v > limit {
                bail!(
                    "dcnv3: {name} = {v} is too large (at most 2^31-1 = {limit}); check the config \
                     ({c:?})"
                );
            }
        }
        if !c.offset_scale.is_finite() {
            bail!(
                "dcnv3: offset_scale must be a finite number, got {}",
                c.offset_scale
            );
        }
        if c.remove_center
            && (c.kernel_h != c.kernel_w || c.kernel_h.is_multiple_of(2) || c.kernel_h < 3)
        {
            bail!(
                "dcnv3: remove_center needs a square kernel with an odd size of at least 3 (like the \
                 official op), got kernel {}x{} (kernel_h x kernel_w)",
                c.kernel_h,
                c.kernel_w
            );
        }
        Ok(())
    }

    /// Sampling points per group: kernel_h*kernel_w, minus one when remove_center.
    pub fn points(&self) -> usize {
        // Saturating: exact for every config that passes `validate`.
        (self.kernel_h.saturating_mul(self.kernel_w))
            .saturating_sub(usize::from(self.remove_center))
    }

    /// Output (height, width) for an input of (h_in, w_in):
    /// `(h_in + 2*pad - (dilation*(kernel-1)+1)) / stride + 1`; an error when the padded input
    /// is smaller than the dilated kernel.
    pub fn output_size(&self, h_in: usize, w_in: usize) -> Result<(usize, usize)> {
        self.validate()?;
        // `validate` bounds the kernel extents and pads below 2^31: only the input can overflow.
        let ext_h = self.dilation_h * (self.kernel_h - 1) + 1;
        let ext_w = self.dilation_w * (self.kernel_w - 1) + 1;
        let (Some(ph), Some(pw)) = (
            h_in.checked_add(2 * self.pad_h),
            w_in.checked_add(2 * self.pad_w),
        ) else {
            bail!("dcnv3: an input of {h_in}x{w_in} is too large");
        };
        if ph < ext_h || pw < ext_w {
            bail!(
                "dcnv3: the padded input ({ph}x{pw} = ({h_in}+2*{})x({w_in}+2*{})) is smaller than the \
                 dilated kernel ({ext_h}x{ext_w}); use a larger input or padding",
                self.pad_h,
                self.pad_w
            );
        }
        Ok((
            (ph - ext_h) / self.stride_h + 1,
            (pw - ext_w) / self.stride_w + 1,
        ))
    }

    /// Validates the three shapes against the config and returns the resolved geometry.
    ///
    /// Errors name the expected and the given shape.
    pub fn geometry(&self, input: &Shape, offset: &Shape, mask: &Shape) -> Result<Dcnv3Geometry> {
        self.validate()?;
        let names = [("input", input), ("offset", offset), ("mask", mask)];
        for (name, s) in names {
            if s.rank() != 4 {
                bail!(
                    "dcnv3: {name} must be a rank-4 channels-last tensor {}, got rank {} with shape {}",
                    match name {
                        "input" => "(N, H_in, W_in, group*group_channels)",
                        "offset" => "(N, H_out, W_out, group*P*2)",
                        _ => "(N, H_out, W_out, group*P)",
                    },
                    s.rank(),
                    fmt_dims(s.dims())
                );
            }
            if s.dims().contains(&0) {
                bail!(
                    "dcnv3: {name} has a zero-sized dimension: {}; every dimension must be at least 1",
                    fmt_dims(s.dims())
                );
            }
        }
        let d = input.dims();
        let (n, h_in, w_in, ch) = (d[0], d[1], d[2], d[3]);
        let channels = self.group * self.group_channels;
        if ch != channels {
            bail!(
                "dcnv3: input channels must be group*group_channels = {}*{} = {channels}, got {ch} \
                 (input shape {})",
                self.group,
                self.group_channels,
                fmt_dims(d)
            );
        }
        // The CPU kernels keep pixel coordinates in i32.
        if h_in > i32::MAX as usize || w_in > i32::MAX as usize {
            bail!(
                "dcnv3: input height and width must be below 2^31, got {h_in}x{w_in} (input shape {})",
                fmt_dims(d)
            );
        }
        let (h_out, w_out) = self.output_size(h_in, w_in)?;
        let p = self.points();
        let exp_off = [n, h_out, w_out, self.group * p * 2];
        let exp_mask = [n, h_out, w_out, self.group * p];
        let desc = format!(
            "input {} with kernel {}x{}, stride {}x{}, pad {}x{}, dilation {}x{}, group {}, P {p}{}",
            fmt_dims(d),
            self.kernel_h,
            self.kernel_w,
            self.stride_h,
            self.stride_w,
            self.pad_h,
            self.pad_w,
            self.dilation_h,
            self.dilation_w,
            self.group,
            if self.remove_center {
                " (remove_center)"
            } else {
                ""
            }
        );
        if offset.dims() != exp_off {
            bail!(
                "dcnv3: offset must have shape (N, H_out, W_out, group*P*2) = {} for {desc}, got {}",
                fmt_dims(&exp_off),
                fmt_dims(offset.dims())
            );
        }
        if mask.dims() != exp_mask {
            bail!(
                "dcnv3: mask must have shape (N, H_out, W_out, group*P) = {} for {desc}, got {}",
                fmt_dims(&exp_mask),
                fmt_dims(mask.dims())
            );
        }
        Ok(Dcnv3Geometry {
            n,
            h_in,
            w_in,
            h_out,
            w_out,
            group: self.group,
            group_channels: self.group_channels,
            channels,
            points: p,
        })
    }
}
