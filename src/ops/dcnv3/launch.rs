//! Launch parameters of the DCNv3 GPU kernels (`kernels/dcnv3.cu`, `kernels/dcnv3.metal`), shared
//! by the CUDA and Metal launchers and by the host build of the kernels that the tests run
//! (`tests/kernel_host.rs`). Not a stable API.
//!
//! Work decomposition (see `kernels/dcnv3_common.h`): one *item* per (n, h_out, w_out, group),
//! `lanes` threads per item, each thread handling `vec` contiguous channels per memory access.

use super::{Dcnv3Config, Dcnv3Geometry};
use candle_core::{bail, Result};

/// The kernels' parameter block, field for field the C struct `Dcnv3Params` of
/// `kernels/dcnv3_common.h` (24 four-byte fields, 96 bytes). The last five fields are the point
/// layout: where the offsets and masks of each output pixel and group are read (DCNv3's two
/// tensors, or DCNv4's one packed `offset_mask`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dcnv3Params {
    /// Batch size N.
    pub batch: i32,
    /// Input height.
    pub h_in: i32,
    /// Input width.
    pub w_in: i32,
    /// Output height.
    pub h_out: i32,
    /// Output width.
    pub w_out: i32,
    /// Groups G.
    pub group: i32,
    /// Channels per group Cg.
    pub group_channels: i32,
    /// Points per group P.
    pub points: i32,
    /// Kernel height.
    pub kernel_h: i32,
    /// Kernel width.
    pub kernel_w: i32,
    /// Vertical stride.
    pub stride_h: i32,
    /// Horizontal stride.
    pub stride_w: i32,
    /// Vertical padding.
    pub pad_h: i32,
    /// Horizontal padding.
    pub pad_w: i32,
    /// Vertical dilation.
    pub dilation_h: i32,
    /// Horizontal dilation.
    pub dilation_w: i32,
    /// 1 when the kernel centre is dropped.
    pub remove_center: i32,
    /// Threads per item.
    pub lanes: i32,
    /// Offset scale (multiplies the kernel grid and the offsets).
    pub offset_scale: f32,
    /// Elements per output pixel of the offset buffer.
    pub off_pixel: i32,
    /// Elements per group of the offset buffer.
    pub off_group: i32,
    /// Elements per output pixel of the mask buffer.
    pub mask_pixel: i32,
    /// Elements per group of the mask buffer.
    pub mask_group: i32,
    /// Position of group 0's first mask in a pixel's row.
    pub mask_first: i32,
}

/// Which operator a launch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Core {
    /// DCNv3: separate offset and mask tensors (`dcnv3_*` entry points).
    V3,
    /// DCNv4: one packed, padded offset_mask tensor (`dcnv4_*` entry points).
    V4,
}

impl Core {
    /// The operator's name (and kernel-name prefix): `dcnv3` or `dcnv4`.
    pub fn name(self) -> &'static str {
        match self {
            Core::V3 => "dcnv3",
            Core::V4 => "dcnv4",
        }
    }

    /// Parameters with this operator's point layout.
    pub fn params(self, cfg: &Dcnv3Config, g: &Dcnv3Geometry, lanes: usize) -> Result<Dcnv3Params> {
        match self {
            Core::V3 => Dcnv3Params::new(cfg, g, lanes),
            Core::V4 => Dcnv3Params::new_dcnv4(cfg, g, lanes),
        }
    }
}

/// Size in bytes of [`Dcnv3Params`] (and of the C struct).
pub const PARAMS_BYTES: usize = 96;

const _: () = assert!(std::mem::size_of::<Dcnv3Params>() == PARAMS_BYTES);

fn to_i32(name: &str, v: usize) -> Result<i32> {
    match i32::try_from(v) {
        Ok(x) => Ok(x),
        Err(_) => bail!("dcnv3 (GPU): {name} = {v} does not fit the kernels' 32-bit parameters"),
    }
}

impl Dcnv3Params {
    /// Parameters of one launch with `lanes` threads per item; errors when a size does not fit
    /// in 32 bits or `lanes` is zero.
    pub fn new(cfg: &Dcnv3Config, g: &Dcnv3Geometry, lanes: usize) -> Result<Self> {
        if lanes == 0 {
            bail!("dcnv3 (GPU): lanes must be at least 1");
        }
        // The kernels index element offsets in 64 bits, but per-image pixel offsets, channel
        // counts and coordinates are 32-bit ints.
        let image = g.h_in.max(g.h_out) * g.w_in.max(g.w_out) * g.channels;
        to_i32("one image's element count", image)?;
        Ok(Self {
            batch: to_i32("batch", g.n)?,
            h_in: to_i32("h_in", g.h_in)?,
            w_in: to_i32("w_in", g.w_in)?,
            h_out: to_i32("h_out", g.h_out)?,
            w_out: to_i32("w_out", g.w_out)?,
            group: to_i32("group", g.group)?,
            group_channels: to_i32("group_channels", g.group_channels)?,
            points: to_i32("points", g.points)?,
            kernel_h: to_i32("kernel_h", cfg.kernel_h)?,
            kernel_w: to_i32("kernel_w", cfg.kernel_w)?,
            stride_h: to_i32("stride_h", cfg.stride_h)?,
            stride_w: to_i32("stride_w", cfg.stride_w)?,
            pad_h: to_i32("pad_h", cfg.pad_h)?,
            pad_w: to_i32("pad_w", cfg.pad_w)?,
            dilation_h: to_i32("dilation_h", cfg.dilation_h)?,
            dilation_w: to_i32("dilation_w", cfg.dilation_w)?,
            remove_center: i32::from(cfg.remove_center),
            lanes: to_i32("lanes", lanes)?,
            offset_scale: cfg.offset_scale as f32,
            off_pixel: to_i32("offsets per pixel", g.group * g.points * 2)?,
            off_group: to_i32("offsets per group", g.points * 2)?,
            mask_pixel: to_i32("masks per pixel", g.group * g.points)?,
            mask_group: to_i32("masks per group", g.points)?,
            mask_first: 0,
        })
    }

    /// Parameters of a DCNv4 launch: [`Dcnv3Params::new`] with the packed layout of
    /// `offset_mask` (N, H_out, W_out, K_pad), passed as both the offset and the mask buffer.
    pub fn new_dcnv4(cfg: &Dcnv3Config, g: &Dcnv3Geometry, lanes: usize) -> Result<Self> {
        let k_pad = crate::ops::dcnv4::offset_mask_channels(cfg);
        Ok(Self {
            off_pixel: to_i32("offset_mask channels", k_pad)?,
            off_group: to_i32("offset_mask columns per group", 3 * g.points)?,
            mask_pixel: to_i32("offset_mask channels", k_pad)?,
            mask_group: to_i32("offset_mask columns per group", 3 * g.points)?,
            mask_first: to_i32("offsets per group", 2 * g.points)?,
            ..Self::new(cfg, g, lanes)?
        })
    }

    /// Number of threads of a launch: items * lanes.
    pub fn total_threads(&self) -> u64 {
        [self.batch, self.h_out, self.w_out, self.group, self.lanes]
            .iter()
            .map(|&v| v.max(0) as u64)
            .product()
    }

    /// The little-endian bytes of the C struct (what the host build reads).
    pub fn to_le_bytes(&self) -> [u8; PARAMS_BYTES] {
        let ints = [
            self.batch,
            self.h_in,
            self.w_in,
            self.h_out,
            self.w_out,
            self.group,
            self.group_channels,
            self.points,
            self.kernel_h,
            self.kernel_w,
            self.stride_h,
            self.stride_w,
            self.pad_h,
            self.pad_w,
            self.dilation_h,
            self.dilation_w,
            self.remove_center,
            self.lanes,
        ];
        let layout = [
            self.off_pixel,
            self.off_group,
            self.mask_pixel,
            self.mask_group,
            self.mask_first,
        ];
        let mut out = [0u8; PARAMS_BYTES];
        for (k, v) in ints.iter().enumerate() {
            out[4 * k..4 * k + 4].copy_from_slice(&v.to_le_bytes());
        }
        out[72..76].copy_from_slice(&self.offset_scale.to_le_bytes());
        for (k, v) in layout.iter().enumerate() {
            out[76 + 4 * k..80 + 4 * k].copy_from_slice(&v.to_le_bytes());
        }
        out
    }
}

/// Vector widths (channels per access) compiled into the kernels for an element size in
/// bytes: at most 16 bytes per access.
pub fn vec_widths(elem_bytes: usize) -> &'static [usize] {
    match elem_bytes {
        2 => &[8, 4, 2, 1],
        4 => &[4, 2, 1],
        _ => &[1],
    }
}

/// The widest vector width usable for `group_channels` channels per group when the channel
/// data of the tensors starts at the given element offsets (each must be a multiple of it).
pub fn pick_vec(elem_bytes: usize, group_channels: usize, start_offsets: &[usize]) -> usize {
    vec_widths(elem_bytes)
        .iter()
        .copied()
        .find(|&v| {
            group_channels.is_multiple_of(v) && start_offsets.iter().all(|o| o.is_multiple_of(v))
        })
        .unwrap_or(1)
}

/// Forward lanes: one thread per `vec` channels of a group (each thread then does one chunk).
pub fn fwd_lanes(group_channels: usize, vec: usize) -> usize {
    group_channels.div_ceil(vec.max(1)).max(1)
}

/// Backward lanes: the largest power of two <= min(`max_lanes`, chunks per group), so that
/// the lanes of one item sit in one warp/SIMD-group for the shuffle reduction. `max_lanes`
/// is the warp width (32 on CUDA, the pipeline's execution width on Metal), a power of two.
pub fn bwd_lanes(group_channels: usize, vec: usize, max_lanes: usize) -> usize {
    let chunks = group_channels.div_ceil(vec.max(1)).max(1);
    let cap = chunks.min(max_lanes.max(1));
    let mut lanes = 1;
    while lanes * 2 <= cap {
        lanes *= 2;
    }
    lanes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_and_vec() {
        assert_eq!(pick_vec(4, 16, &[0, 0]), 4);
        assert_eq!(pick_vec(4, 16, &[2, 0]), 2);
        assert_eq!(pick_vec(2, 16, &[0]), 8);
        assert_eq!(pick_vec(2, 12, &[0]), 4);
        assert_eq!(pick_vec(4, 3, &[0]), 1);
        assert_eq!(fwd_lanes(16, 4), 4);
        assert_eq!(fwd_lanes(3, 1), 3);
        assert_eq!(bwd_lanes(16, 4, 32), 4);
        assert_eq!(bwd_lanes(3, 1, 32), 2);
        assert_eq!(bwd_lanes(512, 1, 32), 32);
        assert_eq!(bwd_lanes(24, 8, 32), 2);
        assert_eq!(bwd_lanes(64, 1, 16), 16);
    }
}
