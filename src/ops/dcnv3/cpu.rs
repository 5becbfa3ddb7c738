//! CPU kernels of the DCNv3 core: forward and backward, generic over the accumulation type
//! (f32 for f16/bf16/f32 tensors, f64 for f64 tensors), parallelised with rayon.
//!
//! Layout: everything channels-last and contiguous (see [`Dcnv3Geometry`]). For each output pixel
//! and group the P sampling points are resolved once into a list of *taps* (element offset of an
//! in-image bilinear corner, weight = mask * bilinear weight); corners outside the image are never
//! read. The taps are then applied to the Cg contiguous channels of the group in register blocks
//! of 16/8/4/1 channels with four independent accumulators, so the FMA chains stay short and the
//! loops vectorise. On x86-64 the kernels are compiled a second time with AVX2+FMA enabled and
//! chosen at run time; AVX-512 policies run that instantiation too (auto-vectorised AVX-512 ones
//! were measured slower, see the dispatchers), except in f32, where the forward and the backward
//! have hand-written AVX-512 kernels (`cpu/avx512.rs`). No buffer proportional to N*H*W*G*P*Cg
//! is ever allocated.
//!
//! The same kernels serve DCNv3 and DCNv4: [`PointLayout`] says where the offsets and the mask
//! of point p of group g of an output pixel are read (and their gradients written): two separate
//! dense tensors for DCNv3, one interleaved, padded `offset_mask` row per pixel for DCNv4.

#[cfg(target_arch = "x86_64")]
mod avx512;

use super::{Dcnv3Config, Dcnv3Geometry};
use crate::cpu::Isa;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::{Add, AddAssign, Mul, Sub};

/// Accumulation type of the kernels (f32 or f64).
pub(crate) trait Acc:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn from_isize(v: isize) -> Self;
    /// Fused multiply-add `self * a + b`.
    fn fma(self, a: Self, b: Self) -> Self;
    fn from_i32(v: i32) -> Self;
    /// Truncating (saturating) conversion to i32.
    fn trunc_i32(self) -> i32;
    /// Neither NaN nor infinite.
    fn is_finite_acc(self) -> bool;
    /// The values as f32 when `Self` is f32 (for the f32-only SIMD kernels, x86-64), else `None`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// [`Acc::as_f32`] for a mutable slice.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
    /// [`Acc::as_f32`] for an output slice not yet written.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn as_f32_uninit(s: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<f32>]>;
}

impl Acc for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn from_isize(v: isize) -> Self {
        v as f32
    }
    #[inline(always)]
    fn fma(self, a: Self, b: Self) -> Self {
        self.mul_add(a, b)
    }
    #[inline(always)]
    fn from_i32(v: i32) -> Self {
        v as f32
    }
    #[inline(always)]
    fn trunc_i32(self) -> i32 {
        self as i32
    }
    #[inline(always)]
    fn is_finite_acc(self) -> bool {
        self.is_finite()
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }
    fn as_f32_uninit(s: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<f32>]> {
        Some(s)
    }
}

impl Acc for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f64(v: f64) -> Self {
        v
    }
    fn from_isize(v: isize) -> Self {
        v as f64
    }
    #[inline(always)]
    fn fma(self, a: Self, b: Self) -> Self {
        self.mul_add(a, b)
    }
    #[inline(always)]
    fn from_i32(v: i32) -> Self {
        v as f64
    }
    #[inline(always)]
    fn trunc_i32(self) -> i32 {
        self as i32
    }
    #[inline(always)]
    fn is_finite_acc(self) -> bool {
        self.is_finite()
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
    fn as_f32_uninit(_: &mut [MaybeUninit<Self>]) -> Option<&mut [MaybeUninit<f32>]> {
        None
    }
}

/// `a * b + c`, fused only where the instantiation has FMA hardware (elsewhere `mul_add` would be
/// a slow library call).
#[inline(always)]
fn fmadd<F: Acc, const FMA: bool>(a: F, b: F, c: F) -> F {
    if FMA {
        a.fma(b, c)
    } else {
        a * b + c
    }
}

/// Where the offsets and masks of each output pixel live, in units of elements.
///
/// For output pixel `pix`, group `g` and point `p`, the offset pair (x, y) is at
/// `pix*off_pixel + g*off_group + 2*p` (+1 for y) of the offset buffer, and the mask at
/// `pix*mask_pixel + mask_first + g*mask_group + p` of the mask buffer, which is the offset
/// buffer itself when `packed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PointLayout {
    /// Elements per output pixel in the offset buffer.
    pub(crate) off_pixel: usize,
    /// Elements per group in the offset buffer.
    pub(crate) off_group: usize,
    /// Elements per output pixel in the mask buffer.
    pub(crate) mask_pixel: usize,
    /// Elements per group in the mask buffer.
    pub(crate) mask_group: usize,
    /// Position of group 0's first mask value in a pixel's row.
    pub(crate) mask_first: usize,
    /// Masks (and their gradients) share the offsets' buffer.
    pub(crate) packed: bool,
}

impl PointLayout {
    /// DCNv3: offset (.., G*P*2) with pairs (x, y), mask (.., G*P), two tensors.
    pub(crate) fn dcnv3(g: &Dcnv3Geometry) -> Self {
        let p = g.points;
        Self {
            off_pixel: g.group * p * 2,
            off_group: 2 * p,
            mask_pixel: g.group * p,
            mask_group: p,
            mask_first: 0,
            packed: false,
        }
    }

    /// DCNv4: one row of `k_pad` columns per pixel; group g holds 2P offsets then P masks at
    /// columns [g*3P, (g+1)*3P); the columns past G*3P are padding, never read or written.
    pub(crate) fn dcnv4(g: &Dcnv3Geometry, k_pad: usize) -> Self {
        let p = g.points;
        Self {
            off_pixel: k_pad,
            off_group: 3 * p,
            mask_pixel: k_pad,
            mask_group: 3 * p,
            mask_first: 2 * p,
            packed: true,
        }
    }

    /// Whether the G*P offset pairs and the G*P masks of a pixel are each one dense run
    /// (DCNv3): then no per-pixel copy is needed.
    fn dense(&self, g: &Dcnv3Geometry) -> bool {
        !self.packed && self.off_group == 2 * g.points && self.mask_group == g.points
    }

    /// Index of group `grp`'s first offset in a pixel's row.
    #[inline(always)]
    fn off_at(&self, grp: usize) -> usize {
        grp * self.off_group
    }

    /// Index of group `grp`'s first mask in a pixel's row (of the mask buffer).
    #[inline(always)]
    fn mask_at(&self, grp: usize) -> usize {
        self.mask_first + grp * self.mask_group
    }
}

/// Per-call constants: kernel grid (already multiplied by offset_scale) and base positions.
struct Params<F> {
    g: Dcnv3Geometry,
    lay: PointLayout,
    smp: Sampler<F>,
    sw: usize,
    sh: usize,
    /// `hx - pad_w`: x of the grid centre for output column 0.
    base_x0: F,
    base_y0: F,
    /// offset_scale * (i*dilation_w - hx) per point (x-major order), repeated for every group
    /// (index g*P + p).
    kxg: Vec<F>,
    kyg: Vec<F>,
    /// First channel of the group of point index g*P + p: g*Cg (as i32, for the fast path).
    goffg: Vec<i32>,
}

/// Image `n`, output row `h` and column `w` of a linear output pixel, stepped one pixel at a time
/// (the AVX-512 forward's runs visit the pixels of a chunk in order), so that its per-pixel
/// loop needs no integer divisions; [`Params::pixel`] places one pixel with it.
struct PixelCursor {
    n: usize,
    h: usize,
    w: usize,
    h_out: usize,
    w_out: usize,
}

impl PixelCursor {
    /// The cursor at linear output pixel `pix`.
    #[inline(always)]
    fn at(g: &Dcnv3Geometry, pix: usize) -> Self {
        let (h_out, w_out) = (g.h_out, g.w_out);
        // (An output without pixels has no chunks; `max(1)` only keeps this total.)
        let (hw, wo) = ((h_out * w_out).max(1), w_out.max(1));
        let rem = pix % hw;
        Self {
            n: pix / hw,
            h: rem / wo,
            w: rem % wo,
            h_out,
            w_out,
        }
    }

    /// Pixels from this one to the end of its image, this one included.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn left_in_image(&self) -> usize {
        (self.h_out - self.h) * self.w_out - self.w
    }

    /// Moves to the next pixel.
    #[inline(always)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn step(&mut self) {
        self.w += 1;
        if self.w == self.w_out {
            self.w = 0;
            self.h += 1;
            if self.h == self.h_out {
                self.h = 0;
                self.n += 1;
            }
        }
    }
}

/// What locating a sampling point needs; `Copy`, so that hot loops keep it in registers.
#[derive(Clone, Copy)]
struct Sampler<F> {
    /// offset_scale.
    sigma: F,
    w_in: F,
    h_in: F,
    /// Input width and height as i32 (the geometry checks keep them below 2^31).
    wi: i32,
    hi: i32,
}

/// A sampling position before it is resolved into corners (from [`Sampler::position`]).
#[derive(Clone, Copy)]
struct Position<F> {
    /// Grid position (pixel base plus scaled kernel grid).
    gx: F,
    gy: F,
    /// offset_scale times the learned offset.
    sx: F,
    sy: F,
    /// `gx + sx`, `gy + sy`.
    x: F,
    y: F,
    /// Inside (-1, W) x (-1, H) (false for NaN/inf).
    valid: bool,
}

/// Where one sampling point falls (from [`Sampler::point`]).
#[derive(Clone, Copy)]
struct Point<F> {
    /// Floor corner, at most (W-1, H-1); (0, 0) for an invalid point.
    x0: i32,
    y0: i32,
    /// `x - x0` and `y - y0`.
    lx: F,
    ly: F,
    /// Inside (-1, W) x (-1, H); false for NaN/inf positions. Invalid points sample nothing.
    valid: bool,
}

/// One output pixel's arguments: grid centre, its image and its rows of offsets and masks (laid
/// out as [`PointLayout`] says).
struct Pixel<'a, F> {
    bx: F,
    by: F,
    img: &'a [F],
    off: &'a [F],
    mask: &'a [F],
}

impl<F: Acc> Params<F> {
    fn new(cfg: &Dcnv3Config, g: &Dcnv3Geometry, lay: PointLayout) -> Self {
        let hx = cfg.dilation_w * (cfg.kernel_w - 1) / 2;
        let hy = cfg.dilation_h * (cfg.kernel_h - 1) / 2;
        let sigma = cfg.offset_scale;
        let mut kx = Vec::with_capacity(g.points);
        let mut ky = Vec::with_capacity(g.points);
        // x-major enumeration: column i (x) outer, row j (y) inner; skip the centre if asked.
        for i in 0..cfg.kernel_w {
            for j in 0..cfg.kernel_h {
                if cfg.remove_center && i == cfg.kernel_w / 2 && j == cfg.kernel_h / 2 {
                    continue;
                }
                kx.push(F::from_f64(
                    sigma * ((i * cfg.dilation_w) as f64 - hx as f64),
                ));
                ky.push(F::from_f64(
                    sigma * ((j * cfg.dilation_h) as f64 - hy as f64),
                ));
            }
        }
        Self {
            g: *g,
            lay,
            smp: Sampler {
                sigma: F::from_f64(sigma),
                w_in: F::from_isize(g.w_in as isize),
                h_in: F::from_isize(g.h_in as isize),
                wi: g.w_in as i32,
                hi: g.h_in as i32,
            },
            kxg: (0..g.group).flat_map(|_| kx.iter().copied()).collect(),
            kyg: (0..g.group).flat_map(|_| ky.iter().copied()).collect(),
            goffg: (0..g.group * g.points)
                .map(|gp| ((gp / g.points) * g.group_channels) as i32)
                .collect(),
            sw: cfg.stride_w,
            sh: cfg.stride_h,
            base_x0: F::from_f64(hx as f64 - cfg.pad_w as f64),
            base_y0: F::from_f64(hy as f64 - cfg.pad_h as f64),
        }
    }

    /// Output pixel `pix` (linear over N*H_out*W_out): its grid centre, its image (one of N) and
    /// its rows of the offset and mask buffers.
    #[inline(always)]
    fn pixel<'a>(
        &self,
        pix: usize,
        input: &'a [F],
        offset: &'a [F],
        mask: &'a [F],
    ) -> Pixel<'a, F> {
        let g = &self.g;
        let at = PixelCursor::at(g, pix);
        let img_len = g.h_in * g.w_in * g.channels;
        let (lo, lm) = (self.lay.off_pixel, self.lay.mask_pixel);
        let (bx, by) = self.centre(at.h, at.w);
        Pixel {
            bx,
            by,
            img: &input[at.n * img_len..(at.n + 1) * img_len],
            off: &offset[pix * lo..(pix + 1) * lo],
            mask: &mask[pix * lm..(pix + 1) * lm],
        }
    }

    /// The kernel grid's centre (x, y) in the input for output row `h`, column `w`.
    #[inline(always)]
    fn centre(&self, h: usize, w: usize) -> (F, F) {
        (
            F::from_isize((w * self.sw) as isize) + self.base_x0,
            F::from_isize((h * self.sh) as isize) + self.base_y0,
        )
    }

    /// Group `grp`'s 2P offsets (pairs x, y) and P masks in a pixel's rows.
    #[inline(always)]
    fn group_args<'a>(&self, px: &Pixel<'a, F>, grp: usize) -> (&'a [F], &'a [F]) {
        let np = self.g.points;
        let (o, m) = (self.lay.off_at(grp), self.lay.mask_at(grp));
        (&px.off[o..o + 2 * np], &px.mask[m..m + np])
    }

    /// A pixel's G*P offset pairs and G*P masks as two dense runs: the rows themselves for
    /// DCNv3, else copied into `dxy`/`msk` (lengths 2*G*P and G*P).
    #[inline(always)]
    fn dense_args<'a>(
        &self,
        px: &Pixel<'a, F>,
        dxy: &'a mut [F],
        msk: &'a mut [F],
    ) -> (&'a [F], &'a [F]) {
        let (gp_len, np) = (self.g.group * self.g.points, self.g.points);
        if self.lay.dense(&self.g) {
            return (&px.off[..2 * gp_len], &px.mask[..gp_len]);
        }
        for grp in 0..self.g.group {
            let (o, m) = self.group_args(px, grp);
            dxy[grp * 2 * np..(grp + 1) * 2 * np].copy_from_slice(o);
            msk[grp * np..(grp + 1) * np].copy_from_slice(m);
        }
        (&dxy[..2 * gp_len], &msk[..gp_len])
    }

    /// Element offsets of the four corners relative to corner (y0, x0), channels-last.
    #[inline(always)]
    fn corner_steps(&self) -> [isize; 4] {
        let c = self.g.channels as isize;
        let row = self.g.w_in as isize * c;
        [0, c, row, row + c]
    }
}

impl<F: Acc> Sampler<F> {
    /// Sampling position of the point at grid position (gx, gy) (pixel base plus scaled kernel
    /// grid) moved by the offset (dx, dy): the position (x, y), the scaled offsets
    /// (sigma*dx, sigma*dy), and whether it samples anything: inside (-1, W) x (-1, H), which
    /// NaN/inf positions are not.
    #[inline(always)]
    fn position(&self, gx: F, gy: F, dx: F, dy: F) -> Position<F> {
        let (sx, sy) = (self.sigma * dx, self.sigma * dy);
        let x = gx + sx;
        let y = gy + sy;
        let neg1 = F::ZERO - F::ONE;
        // NaN fails every comparison.
        let valid = (x > neg1) & (x < self.w_in) & (y > neg1) & (y < self.h_in);
        Position {
            gx,
            gy,
            sx,
            sy,
            x,
            y,
            valid,
        }
    }

    /// The [`Point`] of a position inside (-1, W) x (-1, H).
    ///
    /// The fractions are computed as `(gx - x0) + sigma*dx`: the grid position and the corner
    /// are multiples of offset_scale's binary fraction (exact for the usual scales), so the
    /// rounding error of `lx` is that of the offset, not that of the absolute position `x`
    /// (which grows with the image width).
    #[inline(always)]
    fn point_at(&self, p: &Position<F>) -> Point<F> {
        // x + 1 > 0, so truncation is the floor. Clamped because just below a power-of-two W,
        // x + 1 rounds up to W + 1 (x0 = W would read outside the image).
        let x0 = ((p.x + F::ONE).trunc_i32() - 1).min(self.wi - 1);
        let y0 = ((p.y + F::ONE).trunc_i32() - 1).min(self.hi - 1);
        Point {
            x0,
            y0,
            lx: (p.gx - F::from_i32(x0)) + p.sx,
            ly: (p.gy - F::from_i32(y0)) + p.sy,
            valid: p.valid,
        }
    }

    /// [`Sampler::position`] and [`Sampler::point_at`] without branches (loops over points
    /// vectorise): an invalid point is placed at (0, 0) with zero fractions.
    #[inline(always)]
    fn point(&self, gx: F, gy: F, dx: F, dy: F) -> Point<F> {
        let mut p = self.position(gx, gy, dx, dy);
        if !p.valid {
            p = Position {
                gx: F::ZERO,
                gy: F::ZERO,
                sx: F::ZERO,
                sy: F::ZERO,
                x: F::ZERO,
                y: F::ZERO,
                valid: false,
            };
        }
        self.point_at(&p)
    }

    /// The four bilinear corners of `pt` in the order (y0, x0), (y0, x0+1), (y0+1, x0),
    /// (y0+1, x0+1): whether each lies inside the image (none for an invalid point) and `m`
    /// times its bilinear weight.
    #[inline(always)]
    fn corners(&self, pt: &Point<F>, m: F) -> ([bool; 4], [F; 4]) {
        let (lx, ly) = (pt.lx, pt.ly);
        let hx = F::ONE - lx;
        let (mhy, mly) = (m * (F::ONE - ly), m * ly);
        let (xl, xh) = (pt.x0 >= 0, pt.x0 + 1 < self.wi);
        let (yl, yh) = (pt.valid & (pt.y0 >= 0), pt.valid & (pt.y0 + 1 < self.hi));
        (
            [yl & xl, yl & xh, yh & xl, yh & xh],
            [mhy * hx, mhy * lx, mly * hx, mly * lx],
        )
    }
}

/// A kernel over one block of `B` channels starting at channel `c0` (B = 16, 8, 4 or 1).
trait ChannelBlock {
    fn block<const B: usize>(&mut self, c0: usize);
}

/// Covers channels `0..cg` in register blocks: 16 at a time, then at most one block of 8 and one
/// of 4, then single channels.
#[inline(always)]
fn for_channel_blocks(cg: usize, k: &mut impl ChannelBlock) {
    let mut c0 = 0;
    while c0 + 16 <= cg {
        k.block::<16>(c0);
        c0 += 16;
    }
    if c0 + 8 <= cg {
        k.block::<8>(c0);
        c0 += 8;
    }
    if c0 + 4 <= cg {
        k.block::<4>(c0);
        c0 += 4;
    }
    while c0 < cg {
        k.block::<1>(c0);
        c0 += 1;
    }
}

/// The taps (element offset, weight) of one (pixel, group) and its Cg output channels: each
/// block stores `sum_t tw[t] * img[to[t] + c]` for its channels c, with four independent
/// accumulators over the taps.
struct Gather<'a, F, const FMA: bool> {
    img: &'a [F],
    to: &'a [usize],
    tw: &'a [F],
    out: &'a mut [F],
}

impl<F: Acc, const FMA: bool> ChannelBlock for Gather<'_, F, FMA> {
    #[inline(always)]
    fn block<const B: usize>(&mut self, c0: usize) {
        let (img, to, tw) = (self.img, self.to, self.tw);
        let mut a = [[F::ZERO; B]; 4];
        let n = to.len().min(tw.len());
        let mut t = 0;
        while t + 4 <= n {
            for (u, acc) in a.iter_mut().enumerate() {
                let o = to[t + u] + c0;
                let wv = tw[t + u];
                let v = &img[o..o + B];
                for k in 0..B {
                    acc[k] = fmadd::<F, FMA>(wv, v[k], acc[k]);
                }
            }
            t += 4;
        }
        while t < n {
            let o = to[t] + c0;
            let wv = tw[t];
            let v = &img[o..o + B];
            for k in 0..B {
                a[0][k] = fmadd::<F, FMA>(wv, v[k], a[0][k]);
            }
            t += 1;
        }
        for (k, o) in self.out[c0..c0 + B].iter_mut().enumerate() {
            *o = (a[0][k] + a[1][k]) + (a[2][k] + a[3][k]);
        }
    }
}

/// Forward of one output pixel `px` into `opix` (its C channels), reading only in-image corners
/// (exact for inputs with NaN/inf values): each group's points become a list of taps (element
/// offset of an in-image corner, weight) applied to the group's channels. `to` and `tw` are
/// scratch of at least 4*P entries.
#[inline(always)]
fn forward_pixel<F: Acc, const FMA: bool>(
    prm: &Params<F>,
    px: &Pixel<'_, F>,
    opix: &mut [F],
    to: &mut [usize],
    tw: &mut [F],
) {
    let g = &prm.g;
    let (c, cg, np) = (g.channels, g.group_channels, g.points);
    let smp = prm.smp;
    let steps = prm.corner_steps();
    for (grp, out) in opix.chunks_exact_mut(cg).enumerate() {
        let goff = (grp * cg) as isize;
        let (offs, masks) = prm.group_args(px, grp);
        let mut nt = 0;
        for p in 0..np {
            let gp = grp * np + p;
            let pt = smp.point(
                px.bx + prm.kxg[gp],
                px.by + prm.kyg[gp],
                offs[2 * p],
                offs[2 * p + 1],
            );
            let (inside, wts) = smp.corners(&pt, masks[p]);
            let base = (pt.y0 as isize * g.w_in as isize + pt.x0 as isize) * c as isize + goff;
            for q in 0..4 {
                // Branch-free append: always write, advance only when the corner is inside.
                to[nt] = (base + steps[q]) as usize;
                tw[nt] = wts[q];
                nt += usize::from(inside[q]);
            }
        }
        let mut k = Gather::<F, FMA> {
            img: px.img,
            to: &to[..nt],
            tw: &tw[..nt],
            out,
        };
        for_channel_blocks(cg, &mut k);
    }
}

/// Forward over one chunk of output pixels starting at linear pixel `first` with
/// [`forward_pixel`] (the kernel for images too large for i32 offsets).
#[inline(always)]
fn forward_chunk<F: Acc, const FMA: bool>(
    prm: &Params<F>,
    input: &[F],
    offset: &[F],
    mask: &[F],
    chunk: &mut [F],
    first: usize,
) {
    let (c, np) = (prm.g.channels, prm.g.points);
    let mut to = vec![0usize; 4 * np];
    let mut tw = vec![F::ZERO; 4 * np];
    for (k, opix) in chunk.chunks_exact_mut(c).enumerate() {
        let px = prm.pixel(first + k, input, offset, mask);
        forward_pixel::<F, FMA>(prm, &px, opix, &mut to, &mut tw);
    }
}

/// The four corner tap lists (P taps each) of one (pixel, group) and its Cg output channels:
/// each block stores `sum_k sum_t w[k][t] * img[idx[k][t] + c]` into its channels c, one
/// independent accumulator per corner.
///
/// Built only by [`forward_chunk_finite`], whose indices are clamped into
/// `[0, img.len() - cg]` (cg = `out.len()`): the blocks read the image without bounds checks.
struct Gather4<'a, F, const FMA: bool> {
    img: &'a [F],
    idx: [&'a [i32]; 4],
    w: [&'a [F]; 4],
    out: &'a mut [F],
}

impl<F: Acc, const FMA: bool> ChannelBlock for Gather4<'_, F, FMA> {
    #[inline(always)]
    fn block<const B: usize>(&mut self, c0: usize) {
        let (img, idx, w) = (self.img, self.idx, self.w);
        let mut a = [[F::ZERO; B]; 4];
        let n = idx
            .iter()
            .map(|s| s.len())
            .chain(w.iter().map(|s| s.len()))
            .min()
            .unwrap_or(0);
        debug_assert!(c0 + B <= self.out.len());
        for t in 0..n {
            for (k, acc) in a.iter_mut().enumerate() {
                let o = idx[k][t] as usize + c0;
                let wv = w[k][t];
                debug_assert!(o + B <= img.len());
                // SAFETY: idx[k][t] lies in [0, img.len() - cg] (clamped where it is computed,
                // in forward_chunk_finite, the only constructor) and c0 + B <= cg
                // (for_channel_blocks), so o + B <= img.len().
                let v = unsafe { img.get_unchecked(o..o + B) };
                for j in 0..B {
                    acc[j] = fmadd::<F, FMA>(wv, v[j], acc[j]);
                }
            }
        }
        for (j, o) in self.out[c0..c0 + B].iter_mut().enumerate() {
            *o = (a[0][j] + a[1][j]) + (a[2][j] + a[3][j]);
        }
    }
}

/// Forward over one chunk for an image whose element offsets fit in i32.
///
/// All G*P points of a pixel are resolved with branch-free arithmetic that the compiler
/// vectorises: each point yields four corner taps whose addresses are clamped into the image and
/// whose weights are zero for corners outside it (or for points that sample nothing). A
/// zero-weight tap adds exactly zero unless the value it reads is NaN or infinite; so a pixel
/// whose output comes out non-finite is computed again with [`forward_pixel`], which reads only
/// in-image corners (inputs with NaN/inf cost time only where they make a difference, and no
/// pass over the input is needed to find them).
#[inline(always)]
fn forward_chunk_finite<F: Acc, const FMA: bool>(
    prm: &Params<F>,
    input: &[F],
    offset: &[F],
    mask: &[F],
    chunk: &mut [F],
    first: usize,
) {
    let g = &prm.g;
    let (c, cg, np) = (g.channels, g.group_channels, g.points);
    let gp_len = g.group * np;
    let smp = prm.smp;
    let (wi, hi, ci) = (smp.wi, smp.hi, c as i32);
    // The largest valid start of a group's channel run: every index is clamped into [0, lim]
    // (a no-op for the indices computed below, which already are), which is what lets the
    // gathers read `cg` floats from each index without bounds checks. The caller checked that
    // the image length fits in i32.
    let lim = (g.h_in * g.w_in * c - cg) as i32;
    let mut idx = vec![0i32; 4 * gp_len];
    let mut wts = vec![F::ZERO; 4 * gp_len];
    let (mut dxy, mut msk) = (vec![F::ZERO; 2 * gp_len], vec![F::ZERO; gp_len]);
    let (mut to, mut tw) = (Vec::new(), Vec::new());
    for (k, opix) in chunk.chunks_exact_mut(c).enumerate() {
        let px = prm.pixel(first + k, input, offset, mask);
        {
            let (offs, masks) = prm.dense_args(&px, &mut dxy, &mut msk);
            let nn = gp_len;
            let (i0, rest) = idx.split_at_mut(nn);
            let (i1, rest) = rest.split_at_mut(nn);
            let (i2, i3) = rest.split_at_mut(nn);
            let (w0, rest) = wts.split_at_mut(nn);
            let (w1, rest) = rest.split_at_mut(nn);
            let (w2, w3) = rest.split_at_mut(nn);
            // Exact-length views so that the loop below has no bounds checks and vectorises.
            let (i0, i1, i2, i3) = (&mut i0[..nn], &mut i1[..nn], &mut i2[..nn], &mut i3[..nn]);
            let (w0, w1, w2, w3) = (&mut w0[..nn], &mut w1[..nn], &mut w2[..nn], &mut w3[..nn]);
            let (kxg, kyg, goffg) = (&prm.kxg[..nn], &prm.kyg[..nn], &prm.goffg[..nn]);
            let (offs, masks) = (&offs[..2 * nn], &masks[..nn]);
            let (bx, by) = (px.bx, px.by);
            for gp in 0..nn {
                let pt = smp.point(bx + kxg[gp], by + kyg[gp], offs[2 * gp], offs[2 * gp + 1]);
                let (inside, w) = smp.corners(&pt, masks[gp]);
                let (xc0, xc1) = (pt.x0.max(0), (pt.x0 + 1).min(wi - 1));
                let (yc0, yc1) = (pt.y0.max(0), (pt.y0 + 1).min(hi - 1));
                let goff = goffg[gp];
                let (r0, r1) = (yc0 * wi, yc1 * wi);
                let clamp = |i: i32| i.clamp(0, lim);
                i0[gp] = clamp((r0 + xc0) * ci + goff);
                i1[gp] = clamp((r0 + xc1) * ci + goff);
                i2[gp] = clamp((r1 + xc0) * ci + goff);
                i3[gp] = clamp((r1 + xc1) * ci + goff);
                w0[gp] = if inside[0] { w[0] } else { F::ZERO };
                w1[gp] = if inside[1] { w[1] } else { F::ZERO };
                w2[gp] = if inside[2] { w[2] } else { F::ZERO };
                w3[gp] = if inside[3] { w[3] } else { F::ZERO };
            }
        }
        for (grp, out) in opix.chunks_exact_mut(cg).enumerate() {
            let r = grp * np..(grp + 1) * np;
            let sl = |k: usize| &idx[k * gp_len + r.start..k * gp_len + r.end];
            let sw = |k: usize| &wts[k * gp_len + r.start..k * gp_len + r.end];
            let mut k = Gather4::<F, FMA> {
                img: px.img,
                idx: [sl(0), sl(1), sl(2), sl(3)],
                w: [sw(0), sw(1), sw(2), sw(3)],
                out,
            };
            for_channel_blocks(cg, &mut k);
        }
        // 0 * inf = NaN: a zero-weight tap on a non-finite input value may have spoiled the
        // pixel; redo it reading only in-image corners.
        if !opix.iter().fold(true, |a, v| a & v.is_finite_acc()) {
            to.resize(4 * np, 0);
            tw.resize(4 * np, F::ZERO);
            forward_pixel::<F, FMA>(prm, &px, opix, &mut to, &mut tw);
        }
    }
}

/// Forward over one chunk with [`forward_chunk_finite`] (image offsets fit in i32) or
/// [`forward_chunk`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_chunk_any<F: Acc, const FMA: bool>(
    fits_i32: bool,
    prm: &Params<F>,
    input: &[F],
    offset: &[F],
    mask: &[F],
    chunk: &mut [F],
    first: usize,
) {
    if fits_i32 {
        forward_chunk_finite::<F, FMA>(prm, input, offset, mask, chunk, first)
    } else {
        forward_chunk::<F, FMA>(prm, input, offset, mask, chunk, first)
    }
}

/// [`forward_chunk_any`] compiled with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_chunk_avx2<F: Acc>(
    fits_i32: bool,
    prm: &Params<F>,
    input: &[F],
    offset: &[F],
    mask: &[F],
    chunk: &mut [F],
    first: usize,
) {
    forward_chunk_any::<F, true>(fits_i32, prm, input, offset, mask, chunk, first)
}

/// [`forward_chunk_any`] for the instruction set `isa` (portable when the CPU lacks it), or the
/// AVX-512 kernel of `avx512.rs` when `forward` made its [`avx512::ForwardPlan`].
#[allow(clippy::too_many_arguments)]
fn forward_chunk_dispatch<F: Acc>(
    isa: Isa,
    fits_i32: bool,
    plan: Option<&Avx512Forward>,
    prm: &Params<F>,
    input: &[F],
    offset: &[F],
    mask: &[F],
    chunk: &mut [MaybeUninit<F>],
    first: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(plan) = plan {
            let p32 = (prm as &dyn std::any::Any).downcast_ref::<Params<f32>>();
            if let (Some(p32), Some(i), Some(o), Some(m), Some(ch)) = (
                p32,
                F::as_f32(input),
                F::as_f32(offset),
                F::as_f32(mask),
                F::as_f32_uninit(chunk),
            ) {
                // SAFETY: `forward` made the plan (on a CPU with AVX-512 F/BW/VL/DQ, AVX2 and
                // FMA: `Bordered::for_avx512` checked) for these parameters and the bordered copy
                // of this input; the buffers and the chunk are those `forward` was given and
                // cut, as the kernel requires (it writes every element of the chunk).
                unsafe { avx512::forward_chunk(p32, plan, i, o, m, ch, first) };
                return;
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = plan;
    let chunk = crate::cpu::filled(chunk, F::ZERO);
    #[cfg(target_arch = "x86_64")]
    if isa >= Isa::Avx2 && Isa::Avx2.is_supported() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { forward_chunk_avx2(fits_i32, prm, input, offset, mask, chunk, first) };
        return;
    }
    if isa == Isa::Neon {
        forward_chunk_any::<F, true>(fits_i32, prm, input, offset, mask, chunk, first)
    } else {
        forward_chunk_any::<F, false>(fits_i32, prm, input, offset, mask, chunk, first)
    }
}

/// The per-call plan of the AVX-512 forward (x86-64); nothing elsewhere.
#[cfg(target_arch = "x86_64")]
type Avx512Forward<'a> = avx512::ForwardPlan<'a>;
#[cfg(not(target_arch = "x86_64"))]
type Avx512Forward<'a> = std::marker::PhantomData<&'a Bordered>;

/// Whether an image's element offsets (H*W*C) fit in i32, as the vectorised kernels' index
/// arithmetic needs.
fn image_fits_i32(g: &Dcnv3Geometry) -> bool {
    g.h_in * g.w_in * g.channels < i32::MAX as usize
}

/// Whether the policy `isa` runs the AVX-512 kernels of `avx512.rs` (an AVX-512 family, on a
/// CPU that has AVX-512 F/BW/VL/DQ).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn avx512_kernels(isa: Isa) -> bool {
    matches!(isa, Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx) && Isa::Avx512.is_supported()
}

/// The f32 images with a one-pixel zero border (`(H+2) x (W+2) x C` each), every image starting
/// on a cache line: what the AVX-512 forward reads (`avx512.rs`). With the border every valid
/// sampling point's 2x2 window lies inside the copy (corners outside the image read zeros), which
/// removes the per-corner bounds work from the kernel's point resolution; and a group's 16
/// channels are one cache line when C is a multiple of 16 (an image read in place starts 16
/// bytes past a line, so every load straddled two: see [`LineAligned`]). Measured at the stage-1
/// shape (56x56x64, G=4) on a Zen 4, one thread: see `docs/performance.md`, "The DCNv3
/// operator". (Never made off x86-64: `for_avx512` needs an AVX-512 CPU.)
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct Bordered {
    buf: Vec<f32>,
    /// Index of image 0's first element in `buf` (on a 64-byte line).
    start: usize,
    /// Floats per bordered row: (W+2) * C.
    pub(crate) row: usize,
    /// Floats per bordered image: (H+2) * row, a multiple of 16.
    pub(crate) image_len: usize,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Bordered {
    /// The copy for the AVX-512 forward of `g` when the policy `isa` runs it (an AVX-512 family
    /// on a CPU that has AVX-512) and a bordered image's length fits in i32; `None` otherwise.
    fn for_avx512<F: Acc>(isa: Isa, g: &Dcnv3Geometry, input: &[F]) -> Option<Self> {
        if !avx512_kernels(isa) {
            return None;
        }
        let input = F::as_f32(input)?;
        let c = g.channels;
        let row = (g.w_in + 2) * c;
        let image_len = ((g.h_in + 2) * row).next_multiple_of(16);
        if image_len >= i32::MAX as usize {
            return None;
        }
        // Every element written exactly once (no zero-fill pass before the copy): the border
        // and each image's slack as zeros, the interior rows from the input.
        let len = g.n * image_len + 16;
        let mut buf = Vec::<f32>::with_capacity(len);
        let start = buf.as_ptr().align_offset(64).min(16);
        let (w_row, img_in) = (g.w_in * c, g.h_in * g.w_in * c);
        let spare = &mut buf.spare_capacity_mut()[..len];
        let (head, rest) = spare.split_at_mut(start);
        let (body, tail) = rest.split_at_mut(g.n * image_len);
        crate::cpu::filled(head, 0.0);
        crate::cpu::filled(tail, 0.0);
        let zero = |d: &mut [MaybeUninit<f32>]| _ = crate::cpu::filled(d, 0.0);
        // Two tasks of whole rows per thread and image (one task per row cost ~1% of the
        // stage-1 forward in rayon's splitting, paired in one process).
        let rows_per_task = (g.h_in + 2).div_ceil(2 * rayon::current_num_threads().max(1));
        body.par_chunks_mut(image_len)
            .zip(input.par_chunks(img_in))
            .for_each(|(dst, src)| {
                let (rows, slack) = dst.split_at_mut((g.h_in + 2) * row);
                zero(slack);
                rows.par_chunks_mut(row)
                    .enumerate()
                    .with_min_len(rows_per_task)
                    .for_each(|(y, d)| {
                        if y == 0 || y == g.h_in + 1 {
                            return zero(d);
                        }
                        let (left, rest) = d.split_at_mut(c);
                        let (mid, right) = rest.split_at_mut(w_row);
                        zero(left);
                        zero(right);
                        crate::cpu::copied(mid, &src[(y - 1) * w_row..y * w_row]);
                    });
            });
        // SAFETY: all `len` elements were written just above: `head` and `tail`, and in `body`
        // every image's slack and each of its (H+2) rows of (W+2)*C elements (border rows whole,
        // interior rows as C + W*C + C); the capacity is `len`.
        unsafe { buf.set_len(len) };
        Some(Self {
            buf,
            start,
            row,
            image_len,
        })
    }

    /// Bordered image `n`.
    pub(crate) fn image(&self, n: usize) -> &[f32] {
        let at = self.start + n * self.image_len;
        &self.buf[at..at + self.image_len]
    }
}

/// Number of output pixels per parallel task: enough tasks to balance 2..many threads, each big
/// enough to amortise the scheduling.
fn pixels_per_task(total_px: usize, channels: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_balance = total_px.div_ceil(threads * 8).max(1);
    // at least ~4k output scalars per task
    let by_size = 4096usize.div_ceil(channels.max(1));
    by_balance.max(by_size).min(total_px.max(1))
}

/// A copy of the image that starts on a cache line.
///
/// The gather's vector loads read runs of one pixel's channels (a group's 16 floats are one
/// 64-byte line when the image starts on a line). Candle's large buffers start 16 bytes past a
/// line (malloc's mmap chunks), so such loads straddle two lines: measured on a Zen 4 at the
/// stage-1 shape (56x56x64), one thread: 0.62 ms from an image at 16 bytes past a line, 0.52 ms
/// at a line, 0.535 ms at 32 bytes past one (a 64-byte load there splits into two 32-byte
/// halves, each inside a line, as 256-bit loads do), 0.55 ms with this copy; two threads: 0.315
/// -> 0.307 ms. So only images that do not start on 32 bytes are copied. The copy (parallel,
/// one pass) holds the same values: results are unchanged.
struct LineAligned<F> {
    buf: Vec<F>,
    start: usize,
}

impl<F: Acc> LineAligned<F> {
    /// Cache line size the copy is aligned to.
    const LINE: usize = 64;
    /// Images starting on this many bytes are read in place.
    const HALF_LINE: usize = 32;
    /// Smaller images are not copied (the copy would not pay for itself).
    const MIN_BYTES: usize = 64 << 10;

    /// The aligned copy, for the x86 vector kernels (AVX2 and up; NEON's 16-byte loads never
    /// straddle a line) when `input` is large and does not start on 32 bytes; `None` otherwise.
    fn copy_if_useful(isa: Isa, input: &[F]) -> Option<Self> {
        let wide = matches!(isa, Isa::Avx2 | Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx);
        let unaligned = input.as_ptr().align_offset(Self::HALF_LINE) != 0;
        if !wide || std::mem::size_of_val(input) < Self::MIN_BYTES || !unaligned {
            return None;
        }
        let pad = Self::LINE / std::mem::size_of::<F>();
        let mut buf = Vec::<F>::with_capacity(input.len() + pad);
        let start = buf.as_ptr().align_offset(Self::LINE);
        if start >= pad {
            return None;
        }
        let spare = &mut buf.spare_capacity_mut()[..start + input.len()];
        let (head, body) = spare.split_at_mut(start);
        crate::cpu::filled(head, F::ZERO);
        const RUN: usize = 16 << 10;
        body.par_chunks_mut(RUN)
            .zip(input.par_chunks(RUN))
            .for_each(|(dst, src)| _ = crate::cpu::copied(dst, src));
        // SAFETY: the first `start + input.len()` elements were written just above (the
        // zeros of `head`, then every element of `body`: the chunks of `body` and `input` pair
        // up one to one, equal lengths), and the capacity is at least that.
        unsafe { buf.set_len(start + input.len()) };
        Some(Self { buf, start })
    }

    fn as_slice(&self) -> &[F] {
        &self.buf[self.start..]
    }
}

/// The AVX-512 forward's per-call plan on `bordered` (made by [`Bordered::for_avx512`] for
/// `prm`'s geometry), when `F` is f32 (the only type that copy is made for).
fn avx512_plan<'a, F: Acc>(prm: &Params<F>, bordered: &'a Bordered) -> Option<Avx512Forward<'a>> {
    #[cfg(target_arch = "x86_64")]
    {
        let p32 = (prm as &dyn std::any::Any).downcast_ref::<Params<f32>>()?;
        // SAFETY: `Bordered::for_avx512` makes a copy only on a CPU with AVX-512 F/BW/VL/DQ,
        // AVX2 and FMA, and it made `bordered` for this geometry.
        Some(unsafe { avx512::ForwardPlan::new(p32, bordered) })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (prm, bordered);
        None
    }
}

/// Forward: the core (input, offset, mask), `g.output_len()` values, the offsets and masks read
/// as `lay` says (for DCNv4, `offset` and `mask` are the same buffer).
///
/// Each parallel task zeroes its own chunk of the output just before the kernels write it (the
/// lines are then in that core's cache), instead of one serial zero-fill of the whole output on
/// the calling thread (2% of the stage-1 forward); the AVX-512 kernel, which stores every element
/// of its chunk, gets the chunk unwritten (paired on a Zen 4: 2.3% faster at the stage-1 shape,
/// 7.7% at N=8, 1% at stage 3).
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<F: Acc>(
    isa: Isa,
    cfg: &Dcnv3Config,
    g: &Dcnv3Geometry,
    lay: PointLayout,
    input: &[F],
    offset: &[F],
    mask: &[F],
) -> Vec<F> {
    let prm = Params::<F>::new(cfg, g, lay);
    let chunk_px = pixels_per_task(g.out_pixels(), g.channels);
    // The branch-free kernel needs image offsets in i32.
    let fits_i32 = image_fits_i32(g);
    // f32 on AVX-512 policies: the hand-written kernel of `avx512.rs` on a bordered copy. (f64
    // runs the AVX2 build: an auto-vectorised AVX-512 instantiation of the generic kernel was
    // measured slower than the AVX2 one, 0.571 against 0.521 ms at the stage-1 shape in f32.)
    let bordered = Bordered::for_avx512(isa, g, input);
    let staged = match bordered {
        Some(_) => None,
        None => LineAligned::copy_if_useful(isa, input),
    };
    let input = staged.as_ref().map_or(input, LineAligned::as_slice);
    let plan = bordered.as_ref().and_then(|b| avx512_plan(&prm, b));
    let plan = plan.as_ref();
    let len = g.output_len();
    let mut out = Vec::<F>::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut((chunk_px * g.channels).max(1))
        .enumerate()
        .for_each(|(ci, chunk)| {
            let first = ci * chunk_px;
            forward_chunk_dispatch(isa, fits_i32, plan, &prm, input, offset, mask, chunk, first);
        });
    // SAFETY: the chunks cover the first `len` elements and each task initialised its chunk;
    // the capacity is at least `len`.
    unsafe { out.set_len(len) };
    out
}

/// `sum_c go[c]*v[c]`, and `g[c] += f*go[c]` in the same pass (all slices of equal length).
#[inline(always)]
fn dot_axpy<F: Acc, const FMA: bool>(go: &[F], v: &[F], g: &mut [F], f: F) -> F {
    let n = go.len().min(v.len()).min(g.len());
    let mut acc = [F::ZERO; 8];
    let mut c = 0;
    while c + 8 <= n {
        let (go8, v8, g8) = (&go[c..c + 8], &v[c..c + 8], &mut g[c..c + 8]);
        for k in 0..8 {
            acc[k] = fmadd::<F, FMA>(go8[k], v8[k], acc[k]);
            g8[k] = fmadd::<F, FMA>(f, go8[k], g8[k]);
        }
        c += 8;
    }
    let mut s = F::ZERO;
    while c < n {
        s = fmadd::<F, FMA>(go[c], v[c], s);
        g[c] = fmadd::<F, FMA>(f, go[c], g[c]);
        c += 1;
    }
    s + ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// The offset and mask gradient rows of a run of output pixels, laid out as the
/// [`PointLayout`] says: `mask` is `None` when the masks share the offsets' rows (DCNv4).
pub(crate) struct GradRows<'a, F> {
    /// Offset-gradient rows (`off_pixel` elements per pixel); all of them when packed.
    pub(crate) off: &'a mut [F],
    /// Mask-gradient rows (`mask_pixel` elements per pixel), unless packed.
    pub(crate) mask: Option<&'a mut [F]>,
}

impl<'a, F: Acc> GradRows<'a, F> {
    /// The same rows as f32 slices, when `F` is f32.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn as_f32(&mut self) -> Option<GradRows<'_, f32>> {
        let off = F::as_f32_mut(&mut *self.off)?;
        let mask = match self.mask.as_deref_mut() {
            Some(m) => Some(F::as_f32_mut(m)?),
            None => None,
        };
        Some(GradRows { off, mask })
    }
}

impl<'a, F> GradRows<'a, F> {
    /// Cuts the rows into runs of `per` pixels (the last one possibly shorter).
    fn split(self, lay: &PointLayout, per: usize) -> Vec<GradRows<'a, F>> {
        let offs = self.off.chunks_mut(per * lay.off_pixel);
        match self.mask {
            Some(m) => offs
                .zip(m.chunks_mut(per * lay.mask_pixel))
                .map(|(off, mask)| GradRows {
                    off,
                    mask: Some(mask),
                })
                .collect(),
            None => offs.map(|off| GradRows { off, mask: None }).collect(),
        }
    }
}

/// Backward over the output pixels `pixels` (linear over N*H_out*W_out, all of one image n).
///
/// `gin` is the gradient buffer of image n's input (accumulated into), `rows` the offset/mask
/// gradient rows of exactly those pixels (the used columns overwritten, padding left alone).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_range<F: Acc, const FMA: bool>(
    prm: &Params<F>,
    pixels: std::ops::Range<usize>,
    input: &[F],
    offset: &[F],
    mask: &[F],
    grad_out: &[F],
    gin: &mut [F],
    rows: GradRows<'_, F>,
) {
    let g = &prm.g;
    let lay = prm.lay;
    let (c, cg, np) = (g.channels, g.group_channels, g.points);
    let smp = prm.smp;
    let steps = prm.corner_steps();
    let GradRows {
        off: goff,
        mask: mut gmask,
    } = rows;
    for (k, pix) in pixels.enumerate() {
        let px = prm.pixel(pix, input, offset, mask);
        let go_pix = &grad_out[pix * c..(pix + 1) * c];
        let goff_pix = &mut goff[k * lay.off_pixel..(k + 1) * lay.off_pixel];
        let mut gmask_pix = gmask
            .as_deref_mut()
            .map(|m| &mut m[k * lay.mask_pixel..(k + 1) * lay.mask_pixel]);
        for (grp, go) in go_pix.chunks_exact(cg).enumerate() {
            let (offs, masks) = prm.group_args(&px, grp);
            let (oi, mi) = (lay.off_at(grp), lay.mask_at(grp));
            for p in 0..np {
                let gp = grp * np + p;
                let pos = smp.position(
                    px.bx + prm.kxg[gp],
                    px.by + prm.kyg[gp],
                    offs[2 * p],
                    offs[2 * p + 1],
                );
                // (d offset x, d offset y, d mask) of this point.
                let grads = if pos.valid {
                    // A branch here rather than the selects of `point`: the corner loads need
                    // not wait for the bounds test.
                    let pt = smp.point_at(&pos);
                    let m = masks[p];
                    // Plain bilinear weights (mask 1); the mask scales the input gradient.
                    let (inside, wb) = smp.corners(&pt, F::ONE);
                    let base = (pt.y0 as isize * g.w_in as isize + pt.x0 as isize) * c as isize
                        + (grp * cg) as isize;
                    // d[q] = <grad_out, corner q> over the group's channels (0 outside the image).
                    let mut d = [F::ZERO; 4];
                    for (((dq, &ins), &step), &w) in d.iter_mut().zip(&inside).zip(&steps).zip(&wb)
                    {
                        if ins {
                            let o = (base + step) as usize;
                            let (v, gi) = (&px.img[o..o + cg], &mut gin[o..o + cg]);
                            *dq = dot_axpy::<F, FMA>(go, v, gi, m * w);
                        }
                    }
                    let gm = wb[0] * d[0] + wb[1] * d[1] + wb[2] * d[2] + wb[3] * d[3];
                    let (lx, ly) = (pt.lx, pt.ly);
                    let (hx, hy) = (F::ONE - lx, F::ONE - ly);
                    let ddx = hy * (d[1] - d[0]) + ly * (d[3] - d[2]);
                    let ddy = hx * (d[2] - d[0]) + lx * (d[3] - d[1]);
                    let ms = m * smp.sigma;
                    (ms * ddx, ms * ddy, gm)
                } else {
                    (F::ZERO, F::ZERO, F::ZERO)
                };
                goff_pix[oi + 2 * p] = grads.0;
                goff_pix[oi + 2 * p + 1] = grads.1;
                match gmask_pix.as_deref_mut() {
                    Some(gm) => gm[mi + p] = grads.2,
                    None => goff_pix[mi + p] = grads.2,
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_range_avx2<F: Acc>(
    prm: &Params<F>,
    pixels: std::ops::Range<usize>,
    input: &[F],
    offset: &[F],
    mask: &[F],
    grad_out: &[F],
    gin: &mut [F],
    rows: GradRows<'_, F>,
) {
    backward_range::<F, true>(prm, pixels, input, offset, mask, grad_out, gin, rows)
}

/// [`backward_range`] for the instruction set `isa` (portable when the CPU lacks it).
#[allow(clippy::too_many_arguments)]
fn backward_range_dispatch<F: Acc>(
    isa: Isa,
    prm: &Params<F>,
    pixels: std::ops::Range<usize>,
    input: &[F],
    offset: &[F],
    mask: &[F],
    grad_out: &[F],
    gin: &mut [F],
    rows: GradRows<'_, F>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        // AVX-512 policies reach this generic kernel only for f64 (f32 has the hand-written
        // `avx512::backward_range`) and run its AVX2 build: an auto-vectorised AVX-512
        // instantiation was measured slower (stage-1 shape, f32, 1 thread: 4.09 ms against 3.42
        // ms on the Intel Xeon of the README).
        if isa >= Isa::Avx2 && Isa::Avx2.is_supported() {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { backward_range_avx2(prm, pixels, input, offset, mask, grad_out, gin, rows) };
            return;
        }
    }
    if isa == Isa::Neon {
        backward_range::<F, true>(prm, pixels, input, offset, mask, grad_out, gin, rows)
    } else {
        backward_range::<F, false>(prm, pixels, input, offset, mask, grad_out, gin, rows)
    }
}

/// Backward: fills `gin` (length `g.input_len()`, zero-initialised) and the offset/mask
/// gradient rows `rows` (laid out as `lay` says, for all output pixels) with the gradients of
/// `sum(out * grad_out)`; padding columns of the rows are left as they are.
///
/// Parallel without atomics: images are independent; when there are fewer images than threads,
/// an image's output pixels are split into ranges and each range scatters into a private input
/// gradient buffer (one image in size) that is summed at the end.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<F: Acc>(
    isa: Isa,
    cfg: &Dcnv3Config,
    g: &Dcnv3Geometry,
    lay: PointLayout,
    input: &[F],
    offset: &[F],
    mask: &[F],
    grad_out: &[F],
    gin: &mut [F],
    rows: GradRows<'_, F>,
) {
    let prm = Params::<F>::new(cfg, g, lay);
    #[cfg(target_arch = "x86_64")]
    {
        // f32 on AVX-512 policies: the hand-written kernel of `avx512.rs` (i32 image offsets).
        let mut rows = rows;
        if avx512_kernels(isa) && image_fits_i32(g) {
            let p32 = (&prm as &dyn std::any::Any).downcast_ref::<Params<f32>>();
            if let (Some(p32), Some(i), Some(o), Some(m), Some(go), Some(gi), Some(r)) = (
                p32,
                F::as_f32(input),
                F::as_f32(offset),
                F::as_f32(mask),
                F::as_f32(grad_out),
                F::as_f32_mut(&mut *gin),
                rows.as_f32(),
            ) {
                let run = |pixels, gin: &mut [f32], rows: GradRows<'_, f32>| {
                    // SAFETY: the CPU supports AVX-512 F/BW/VL/DQ, AVX2 and FMA
                    // (`avx512_kernels`); an image's H*W*C is below 2^31 (checked above); `gin`
                    // is one image's gradient (or a buffer of its size); the buffers are those
                    // `backward` was given, and `rows` holds exactly the rows of `pixels`, all
                    // in one image.
                    unsafe { avx512::backward_range(p32, i, o, m, go, pixels, gin, rows) }
                };
                return backward_images(&p32.g, p32.lay, gi, r, run);
            }
        }
        backward_generic(isa, &prm, input, offset, mask, grad_out, gin, rows)
    }
    #[cfg(not(target_arch = "x86_64"))]
    backward_generic(isa, &prm, input, offset, mask, grad_out, gin, rows)
}

/// How many pixel ranges each image's backward is cut into: one when there are at least as many
/// images as threads, else enough to keep every thread busy (each range scatters into a private
/// input-gradient buffer).
fn backward_splits(g: &Dcnv3Geometry) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let hw_out = g.h_out * g.w_out;
    if g.n >= threads {
        1
    } else {
        threads.div_ceil(g.n).min(hw_out).max(1)
    }
}

/// [`backward`] with the generic kernels ([`backward_range`]).
#[allow(clippy::too_many_arguments)]
fn backward_generic<F: Acc>(
    isa: Isa,
    prm: &Params<F>,
    input: &[F],
    offset: &[F],
    mask: &[F],
    grad_out: &[F],
    gin: &mut [F],
    rows: GradRows<'_, F>,
) {
    let run = |pixels, gin: &mut [F], rows: GradRows<'_, F>| {
        backward_range_dispatch(isa, prm, pixels, input, offset, mask, grad_out, gin, rows)
    };
    backward_images(&prm.g, prm.lay, gin, rows, run)
}

/// Runs `range(pixels, gin, rows)` over every image's output pixels: each image in one call
/// (images in parallel) or, when there are fewer images than threads, cut into ranges whose
/// input gradients go to private buffers (one image in size) summed at the end.
fn backward_images<F: Acc>(
    g: &Dcnv3Geometry,
    lay: PointLayout,
    gin: &mut [F],
    rows: GradRows<'_, F>,
    range: impl Fn(std::ops::Range<usize>, &mut [F], GradRows<'_, F>) + Sync,
) {
    let img_len = g.h_in * g.w_in * g.channels;
    let hw_out = g.h_out * g.w_out;
    let splits = backward_splits(g);
    gin.par_chunks_mut(img_len)
        .zip(rows.split(&lay, hw_out))
        .enumerate()
        .for_each(|(n, (gi, rows))| {
            let first = n * hw_out;
            if splits == 1 {
                range(first..first + hw_out, gi, rows);
                return;
            }
            let per = hw_out.div_ceil(splits);
            let mut extra: Vec<Vec<F>> = (1..hw_out.div_ceil(per))
                .map(|_| crate::ops::written_zeros(img_len, F::ZERO))
                .collect();
            let mut targets: Vec<&mut [F]> = Vec::with_capacity(extra.len() + 1);
            targets.push(&mut *gi);
            targets.extend(extra.iter_mut().map(|v| v.as_mut_slice()));
            targets
                .into_par_iter()
                .zip(rows.split(&lay, per))
                .enumerate()
                .for_each(|(s, (target, rows_s))| {
                    let start = s * per;
                    let end = (start + per).min(hw_out);
                    range(first + start..first + end, target, rows_s);
                });
            // Sum the private buffers into the image's gradient (the first range wrote there).
            gi.par_chunks_mut(4096).enumerate().for_each(|(bi, dst)| {
                for buf in &extra {
                    let src = &buf[bi * 4096..bi * 4096 + dst.len()];
                    for (d, &s) in dst.iter_mut().zip(src) {
                        *d += s;
                    }
                }
            });
        });
}
