//! CPU kernels of the DCNv3 core: forward and backward, generic over the accumulation type
//! (f32 for f16/bf16/f32 tensors, f64 for f64 tensors), parallelised with rayon.
//!
//! Layout: everything channels-last and contiguous (see [`Dcnv3Geometry`]). For each output pixel
//! and group the P sampling points are resolved once into a list of *taps* (element offset of an
//! in-image bilinear corner, weight = mask * bilinear weight); corners outside the image are never
//! read. The taps are then applied to the Cg contiguous channels of the group in register blocks
//! of 16/8/4/1 channels with four independent accumulators, so the FMA chains stay short and the
//! loops vectorise. On x86-64 the kernels are compiled a second time with AVX2+FMA enabled and
//! chosen at run time. No buffer proportional to N*H*W*G*P*Cg is ever allocated.

use super::{Dcnv3Config, Dcnv3Geometry};
use rayon::prelude::*;
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
    /// Truncating conversion; only called on finite values within the image bounds.
    fn trunc_isize(self) -> isize;
    /// Fused multiply-add `self * a + b`.
    fn fma(self, a: Self, b: Self) -> Self;
    fn from_i32(v: i32) -> Self;
    /// Truncating (saturating) conversion to i32.
    fn trunc_i32(self) -> i32;
    /// Neither NaN nor infinite.
    fn is_finite_acc(self) -> bool;
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
    fn trunc_isize(self) -> isize {
        self as isize
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
    fn trunc_isize(self) -> isize {
        self as isize
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

/// Per-call constants: kernel grid (already multiplied by offset_scale) and base positions.
struct Params<F> {
    g: Dcnv3Geometry,
    sigma: F,
    sw: usize,
    sh: usize,
    /// `hx - pad_w`: x of the grid centre for output column 0.
    base_x0: F,
    base_y0: F,
    /// offset_scale * (i*dilation_w - hx) per point (x-major order).
    kx: Vec<F>,
    ky: Vec<F>,
    /// `kx`/`ky` repeated for every group (index g*P + p).
    kxg: Vec<F>,
    kyg: Vec<F>,
    /// First channel of the group of point index g*P + p: g*Cg (as i32, for the fast path).
    goffg: Vec<i32>,
    w_in: F,
    h_in: F,
}

impl<F: Acc> Params<F> {
    fn new(cfg: &Dcnv3Config, g: &Dcnv3Geometry) -> Self {
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
        let kxg = (0..g.group).flat_map(|_| kx.iter().copied()).collect();
        let kyg = (0..g.group).flat_map(|_| ky.iter().copied()).collect();
        Self {
            g: *g,
            sigma: F::from_f64(sigma),
            kxg,
            kyg,
            goffg: (0..g.group * g.points)
                .map(|gp| ((gp / g.points) * g.group_channels) as i32)
                .collect(),
            sw: cfg.stride_w,
            sh: cfg.stride_h,
            base_x0: F::from_f64(hx as f64 - cfg.pad_w as f64),
            base_y0: F::from_f64(hy as f64 - cfg.pad_h as f64),
            kx,
            ky,
            w_in: F::from_isize(g.w_in as isize),
            h_in: F::from_isize(g.h_in as isize),
        }
    }

    /// x and y of the grid centre of output pixel (h, w).
    #[inline(always)]
    fn base(&self, h: usize, w: usize) -> (F, F) {
        (
            F::from_isize((w * self.sw) as isize) + self.base_x0,
            F::from_isize((h * self.sh) as isize) + self.base_y0,
        )
    }

    /// Sampling position of point `p` from the pixel base and its offset pair: `Some((x0, y0, lx,
    /// ly))` with the floor corner and fractions, or `None` when the point samples nothing
    /// (outside (-1, H) x (-1, W), or a NaN/inf position).
    #[inline(always)]
    fn locate(&self, bx: F, by: F, p: usize, dx: F, dy: F) -> Option<(isize, isize, F, F)> {
        let x = bx + self.kx[p] + self.sigma * dx;
        let y = by + self.ky[p] + self.sigma * dy;
        let neg1 = F::ZERO - F::ONE;
        // Written so that NaN fails every comparison and is skipped.
        if !(x > neg1 && x < self.w_in && y > neg1 && y < self.h_in) {
            return None;
        }
        // x + 1 > 0, so truncation is the floor; clamp against rounding at the upper edge.
        let x0 = ((x + F::ONE).trunc_isize() - 1).min(self.g.w_in as isize - 1);
        let y0 = ((y + F::ONE).trunc_isize() - 1).min(self.g.h_in as isize - 1);
        Some((x0, y0, x - F::from_isize(x0), y - F::from_isize(y0)))
    }
}

/// Adds `sum_t w[t] * img[o[t] + c0 + k]` to nothing and stores it in `out[k]` for k < B.
#[inline(always)]
fn gather_block<F: Acc, const FMA: bool, const B: usize>(
    img: &[F],
    to: &[usize],
    tw: &[F],
    c0: usize,
    out: &mut [F],
) {
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
    for (k, o) in out.iter_mut().take(B).enumerate() {
        *o = (a[0][k] + a[1][k]) + (a[2][k] + a[3][k]);
    }
}

/// Applies the taps of one (pixel, group) to its `out.len()` = Cg channels.
#[inline(always)]
fn gather<F: Acc, const FMA: bool>(img: &[F], to: &[usize], tw: &[F], out: &mut [F]) {
    let cg = out.len();
    let mut c0 = 0;
    while c0 + 16 <= cg {
        gather_block::<F, FMA, 16>(img, to, tw, c0, &mut out[c0..c0 + 16]);
        c0 += 16;
    }
    if c0 + 8 <= cg {
        gather_block::<F, FMA, 8>(img, to, tw, c0, &mut out[c0..c0 + 8]);
        c0 += 8;
    }
    if c0 + 4 <= cg {
        gather_block::<F, FMA, 4>(img, to, tw, c0, &mut out[c0..c0 + 4]);
        c0 += 4;
    }
    while c0 < cg {
        gather_block::<F, FMA, 1>(img, to, tw, c0, &mut out[c0..c0 + 1]);
        c0 += 1;
    }
}

/// Forward over one chunk of output pixels starting at linear pixel `first`.
///
/// Phase 1 resolves all G*P points of a pixel with branch-free, vectorisable arithmetic (floor by
/// truncation of x + 1 > 0, invalid points get weight 0 and a safe position); phase 2 turns each
/// group's points into in-image taps; phase 3 applies them to the group's channels.
#[inline(always)]
fn forward_chunk<F: Acc, const FMA: bool>(
    prm: &Params<F>,
    input: &[F],
    offset: &[F],
    mask: &[F],
    chunk: &mut [F],
    first: usize,
) {
    let g = &prm.g;
    let c = g.channels;
    let cg = g.group_channels;
    let np = g.points;
    let gp_len = g.group * np;
    let hw_out = g.h_out * g.w_out;
    let img_len = g.h_in * g.w_in * c;
    let (wi, hi) = (g.w_in as i32, g.h_in as i32);
    let neg1 = F::ZERO - F::ONE;
    let mut xi = vec![0i32; gp_len];
    let mut yi = vec![0i32; gp_len];
    let mut lxs = vec![F::ZERO; gp_len];
    let mut lys = vec![F::ZERO; gp_len];
    let mut ms = vec![F::ZERO; gp_len];
    let mut vs = vec![false; gp_len];
    let mut to = vec![0usize; 4 * np];
    let mut tw = vec![F::ZERO; 4 * np];
    for (k, opix) in chunk.chunks_exact_mut(c).enumerate() {
        let pix = first + k;
        let n = pix / hw_out;
        let rem = pix % hw_out;
        let (bx, by) = prm.base(rem / g.w_out, rem % g.w_out);
        let img = &input[n * img_len..(n + 1) * img_len];
        let off_pix = &offset[pix * gp_len * 2..(pix + 1) * gp_len * 2];
        let mask_pix = &mask[pix * gp_len..(pix + 1) * gp_len];
        // Phase 1: positions of all G*P points.
        for gp in 0..gp_len {
            let x = bx + prm.kxg[gp] + prm.sigma * off_pix[2 * gp];
            let y = by + prm.kyg[gp] + prm.sigma * off_pix[2 * gp + 1];
            // NaN fails every comparison: such points are invalid.
            let valid = x > neg1 && x < prm.w_in && y > neg1 && y < prm.h_in;
            let xs = if valid { x } else { F::ZERO };
            let ys = if valid { y } else { F::ZERO };
            // Clamped: just below W, x + 1 can round up to W + 1 (W a power of two).
            let x0 = ((xs + F::ONE).trunc_i32() - 1).min(wi - 1);
            let y0 = ((ys + F::ONE).trunc_i32() - 1).min(hi - 1);
            xi[gp] = x0;
            yi[gp] = y0;
            lxs[gp] = xs - F::from_i32(x0);
            lys[gp] = ys - F::from_i32(y0);
            ms[gp] = if valid { mask_pix[gp] } else { F::ZERO };
            vs[gp] = valid;
        }
        for (grp, out) in opix.chunks_exact_mut(cg).enumerate() {
            // Phase 2: in-image corners of the group's points.
            let goff = (grp * cg) as isize;
            let mut nt = 0;
            let r = grp * np..(grp + 1) * np;
            for (((((&x0, &y0), &lx), &ly), &m), &v) in xi[r.clone()]
                .iter()
                .zip(&yi[r.clone()])
                .zip(&lxs[r.clone()])
                .zip(&lys[r.clone()])
                .zip(&ms[r.clone()])
                .zip(&vs[r])
            {
                let (mhy, mly) = (m * (F::ONE - ly), m * ly);
                let hx = F::ONE - lx;
                let base = (y0 as isize * wi as isize + x0 as isize) * c as isize + goff;
                let (xl, xh) = (x0 >= 0, x0 + 1 < wi);
                let (yl, yh) = (v && y0 >= 0, v && y0 + 1 < hi);
                let cs = c as isize;
                let wcs = wi as isize * cs;
                for (valid, d, wv) in [
                    (yl && xl, 0, mhy * hx),
                    (yl && xh, cs, mhy * lx),
                    (yh && xl, wcs, mly * hx),
                    (yh && xh, wcs + cs, mly * lx),
                ] {
                    // Branch-free append: always write, advance only when the corner is inside.
                    to[nt] = (base + d) as usize;
                    tw[nt] = wv;
                    nt += usize::from(valid);
                }
            }
            // Phase 3.
            gather::<F, FMA>(img, &to[..nt], &tw[..nt], out);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_chunk_avx2<F: Acc>(
    prm: &Params<F>,
    input: &[F],
    offset: &[F],
    mask: &[F],
    chunk: &mut [F],
    first: usize,
) {
    forward_chunk::<F, true>(prm, input, offset, mask, chunk, first)
}

/// Applies four tap lists (one per bilinear corner, P taps each) to `out` (+=), one independent
/// accumulator per corner.
#[inline(always)]
fn gather4_block<F: Acc, const FMA: bool, const B: usize>(
    img: &[F],
    idx: [&[i32]; 4],
    w: [&[F]; 4],
    c0: usize,
    out: &mut [F],
) {
    let mut a = [[F::ZERO; B]; 4];
    let n = idx
        .iter()
        .map(|s| s.len())
        .chain(w.iter().map(|s| s.len()))
        .min()
        .unwrap_or(0);
    for t in 0..n {
        for (k, acc) in a.iter_mut().enumerate() {
            let o = idx[k][t] as usize + c0;
            let wv = w[k][t];
            let v = &img[o..o + B];
            for j in 0..B {
                acc[j] = fmadd::<F, FMA>(wv, v[j], acc[j]);
            }
        }
    }
    for (j, o) in out.iter_mut().take(B).enumerate() {
        *o += (a[0][j] + a[1][j]) + (a[2][j] + a[3][j]);
    }
}

#[inline(always)]
fn gather4<F: Acc, const FMA: bool>(img: &[F], idx: [&[i32]; 4], w: [&[F]; 4], out: &mut [F]) {
    let cg = out.len();
    let mut c0 = 0;
    while c0 + 16 <= cg {
        gather4_block::<F, FMA, 16>(img, idx, w, c0, &mut out[c0..c0 + 16]);
        c0 += 16;
    }
    if c0 + 8 <= cg {
        gather4_block::<F, FMA, 8>(img, idx, w, c0, &mut out[c0..c0 + 8]);
        c0 += 8;
    }
    if c0 + 4 <= cg {
        gather4_block::<F, FMA, 4>(img, idx, w, c0, &mut out[c0..c0 + 4]);
        c0 += 4;
    }
    while c0 < cg {
        gather4_block::<F, FMA, 1>(img, idx, w, c0, &mut out[c0..c0 + 1]);
        c0 += 1;
    }
}

/// Forward over one chunk for an input without NaN/inf values whose image offsets fit in i32.
///
/// All G*P points of a pixel are resolved with branch-free arithmetic that the compiler
/// vectorises: each point yields four corner taps whose addresses are clamped into the image and
/// whose weights are zero for corners outside it (or for points that sample nothing). With a
/// finite input, a zero-weight tap adds exactly zero, so this equals reading only in-image
/// corners (what [`forward_chunk`] does for inputs with non-finite values).
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
    let c = g.channels;
    let cg = g.group_channels;
    let np = g.points;
    let gp_len = g.group * np;
    let hw_out = g.h_out * g.w_out;
    let img_len = g.h_in * g.w_in * c;
    let (wi, hi, ci) = (g.w_in as i32, g.h_in as i32, c as i32);
    let neg1 = F::ZERO - F::ONE;
    let mut idx = vec![0i32; 4 * gp_len];
    let mut wts = vec![F::ZERO; 4 * gp_len];
    for (k, opix) in chunk.chunks_exact_mut(c).enumerate() {
        let pix = first + k;
        let n = pix / hw_out;
        let rem = pix % hw_out;
        let (bx, by) = prm.base(rem / g.w_out, rem % g.w_out);
        let img = &input[n * img_len..(n + 1) * img_len];
        let off_pix = &offset[pix * gp_len * 2..(pix + 1) * gp_len * 2];
        let mask_pix = &mask[pix * gp_len..(pix + 1) * gp_len];
        {
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
            let offs = &off_pix[..2 * nn];
            let masks = &mask_pix[..nn];
            let (sigma, w_in, h_in) = (prm.sigma, prm.w_in, prm.h_in);
            for gp in 0..nn {
                let x = bx + kxg[gp] + sigma * offs[2 * gp];
                let y = by + kyg[gp] + sigma * offs[2 * gp + 1];
                // NaN fails every comparison: such points are invalid.
                let valid = (x > neg1) & (x < w_in) & (y > neg1) & (y < h_in);
                let xs = if valid { x } else { F::ZERO };
                let ys = if valid { y } else { F::ZERO };
                // Clamped: just below W, x + 1 can round up to W + 1 (W a power of two).
                let x0 = ((xs + F::ONE).trunc_i32() - 1).min(wi - 1);
                let y0 = ((ys + F::ONE).trunc_i32() - 1).min(hi - 1);
                let lx = xs - F::from_i32(x0);
                let ly = ys - F::from_i32(y0);
                let m = if valid { masks[gp] } else { F::ZERO };
                let (hx, hy) = (F::ONE - lx, F::ONE - ly);
                let (xl, xh) = (x0 >= 0, x0 + 1 < wi);
                let (yl, yh) = (y0 >= 0, y0 + 1 < hi);
                let (xc0, xc1) = (x0.max(0), (x0 + 1).min(wi - 1));
                let (yc0, yc1) = (y0.max(0), (y0 + 1).min(hi - 1));
                let goff = goffg[gp];
                let (r0, r1) = (yc0 * wi, yc1 * wi);
                i0[gp] = (r0 + xc0) * ci + goff;
                i1[gp] = (r0 + xc1) * ci + goff;
                i2[gp] = (r1 + xc0) * ci + goff;
                i3[gp] = (r1 + xc1) * ci + goff;
                let (mhy, mly) = (m * hy, m * ly);
                w0[gp] = if yl & xl { mhy * hx } else { F::ZERO };
                w1[gp] = if yl & xh { mhy * lx } else { F::ZERO };
                w2[gp] = if yh & xl { mly * hx } else { F::ZERO };
                w3[gp] = if yh & xh { mly * lx } else { F::ZERO };
            }
        }
        for (grp, out) in opix.chunks_exact_mut(cg).enumerate() {
            let r = grp * np..(grp + 1) * np;
            let sl = |k: usize| &idx[k * gp_len + r.start..k * gp_len + r.end];
            let sw = |k: usize| &wts[k * gp_len + r.start..k * gp_len + r.end];
            gather4::<F, FMA>(
                img,
                [sl(0), sl(1), sl(2), sl(3)],
                [sw(0), sw(1), sw(2), sw(3)],
                out,
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_chunk_finite_avx2<F: Acc>(
    prm: &Params<F>,
    input: &[F],
    offset: &[F],
    mask: &[F],
    chunk: &mut [F],
    first: usize,
) {
    forward_chunk_finite::<F, true>(prm, input, offset, mask, chunk, first)
}

fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
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

/// Forward: writes DCNv3(input, offset, mask) into `out` (length `g.output_len()`).
pub(crate) fn forward<F: Acc>(
    cfg: &Dcnv3Config,
    g: &Dcnv3Geometry,
    input: &[F],
    offset: &[F],
    mask: &[F],
    out: &mut [F],
) {
    let prm = Params::<F>::new(cfg, g);
    let chunk_px = pixels_per_task(g.out_pixels(), g.channels);
    let fma = has_fma();
    // The branch-free kernel needs image offsets in i32 and an input without NaN/inf (so that
    // zero-weight taps contribute exactly zero).
    let img_len = g.h_in * g.w_in * g.channels;
    let finite = img_len < i32::MAX as usize
        && input
            .par_chunks(1 << 14)
            .all(|ch| ch.iter().fold(true, |a, v| a & v.is_finite_acc()));
    out.par_chunks_mut(chunk_px * g.channels)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let first = ci * chunk_px;
            #[cfg(target_arch = "x86_64")]
            if fma {
                // SAFETY: the CPU supports AVX2 and FMA (checked by `has_fma`).
                unsafe {
                    if finite {
                        forward_chunk_finite_avx2(&prm, input, offset, mask, chunk, first)
                    } else {
                        forward_chunk_avx2(&prm, input, offset, mask, chunk, first)
                    }
                };
                return;
            }
            let _ = fma;
            if finite {
                forward_chunk_finite::<F, false>(&prm, input, offset, mask, chunk, first);
            } else {
                forward_chunk::<F, false>(&prm, input, offset, mask, chunk, first);
            }
        });
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

/// Backward over the output pixels `px_range` of image `n` (pixel indices within the image).
///
/// `gin` is the gradient buffer of image n's input (accumulated into), `goff`/`gmask` are the
/// offset/mask gradient rows of exactly those pixels (overwritten).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_range<F: Acc, const FMA: bool>(
    prm: &Params<F>,
    n: usize,
    px_range: std::ops::Range<usize>,
    img: &[F],
    offset: &[F],
    mask: &[F],
    grad_out: &[F],
    gin: &mut [F],
    goff: &mut [F],
    gmask: &mut [F],
) {
    let g = &prm.g;
    let c = g.channels;
    let cg = g.group_channels;
    let np = g.points;
    let gp_len = g.group * np;
    let hw_out = g.h_out * g.w_out;
    let (wi, hi) = (g.w_in as isize, g.h_in as isize);
    for (k, ipx) in px_range.enumerate() {
        let pix = n * hw_out + ipx;
        let (bx, by) = prm.base(ipx / g.w_out, ipx % g.w_out);
        let off_pix = &offset[pix * gp_len * 2..(pix + 1) * gp_len * 2];
        let mask_pix = &mask[pix * gp_len..(pix + 1) * gp_len];
        let go_pix = &grad_out[pix * c..(pix + 1) * c];
        let goff_pix = &mut goff[k * gp_len * 2..(k + 1) * gp_len * 2];
        let gmask_pix = &mut gmask[k * gp_len..(k + 1) * gp_len];
        for (grp, go) in go_pix.chunks_exact(cg).enumerate() {
            for p in 0..np {
                let gp = grp * np + p;
                let Some((x0, y0, lx, ly)) =
                    prm.locate(bx, by, p, off_pix[2 * gp], off_pix[2 * gp + 1])
                else {
                    goff_pix[2 * gp] = F::ZERO;
                    goff_pix[2 * gp + 1] = F::ZERO;
                    gmask_pix[gp] = F::ZERO;
                    continue;
                };
                let m = mask_pix[gp];
                let (hx, hy) = (F::ONE - lx, F::ONE - ly);
                let base = (y0 * wi + x0) * c as isize + (grp * cg) as isize;
                let (xl, xh) = (x0 >= 0, x0 + 1 < wi);
                let (yl, yh) = (y0 >= 0, y0 + 1 < hi);
                let corners = [
                    (yl && xl, 0isize, hy * hx),
                    (yl && xh, c as isize, hy * lx),
                    (yh && xl, wi * c as isize, ly * hx),
                    (yh && xh, (wi + 1) * c as isize, ly * lx),
                ];
                // d[k] = <grad_out, corner k> over the group's channels (0 outside the image).
                let mut d = [F::ZERO; 4];
                for (dk, (valid, off, wv)) in d.iter_mut().zip(corners) {
                    if valid {
                        let o = (base + off) as usize;
                        *dk = dot_axpy::<F, FMA>(go, &img[o..o + cg], &mut gin[o..o + cg], m * wv);
                    }
                }
                gmask_pix[gp] = corners[0].2 * d[0]
                    + corners[1].2 * d[1]
                    + corners[2].2 * d[2]
                    + corners[3].2 * d[3];
                let ddx = hy * (d[1] - d[0]) + ly * (d[3] - d[2]);
                let ddy = hx * (d[2] - d[0]) + lx * (d[3] - d[1]);
                let ms = m * prm.sigma;
                goff_pix[2 * gp] = ms * ddx;
                goff_pix[2 * gp + 1] = ms * ddy;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_range_avx2<F: Acc>(
    prm: &Params<F>,
    n: usize,
    px_range: std::ops::Range<usize>,
    img: &[F],
    offset: &[F],
    mask: &[F],
    grad_out: &[F],
    gin: &mut [F],
    goff: &mut [F],
    gmask: &mut [F],
) {
    backward_range::<F, true>(
        prm, n, px_range, img, offset, mask, grad_out, gin, goff, gmask,
    )
}

#[allow(clippy::too_many_arguments)]
fn backward_range_dispatch<F: Acc>(
    prm: &Params<F>,
    n: usize,
    px_range: std::ops::Range<usize>,
    img: &[F],
    offset: &[F],
    mask: &[F],
    grad_out: &[F],
    gin: &mut [F],
    goff: &mut [F],
    gmask: &mut [F],
) {
    #[cfg(target_arch = "x86_64")]
    if has_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked by `has_fma`).
        unsafe {
            backward_range_avx2(
                prm, n, px_range, img, offset, mask, grad_out, gin, goff, gmask,
            )
        };
        return;
    }
    backward_range::<F, false>(
        prm, n, px_range, img, offset, mask, grad_out, gin, goff, gmask,
    )
}

/// Backward: fills `gin` (length `g.input_len()`, zero-initialised), `goff` (`g.offset_len()`)
/// and `gmask` (`g.mask_len()`) with the gradients of `sum(out * grad_out)`.
///
/// Parallel without atomics: images are independent; when there are fewer images than threads,
/// an image's output pixels are split into ranges and each range scatters into a private input
/// gradient buffer (one image in size) that is summed at the end.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<F: Acc>(
    cfg: &Dcnv3Config,
    g: &Dcnv3Geometry,
    input: &[F],
    offset: &[F],
    mask: &[F],
    grad_out: &[F],
    gin: &mut [F],
    goff: &mut [F],
    gmask: &mut [F],
) {
    let prm = Params::<F>::new(cfg, g);
    let img_len = g.h_in * g.w_in * g.channels;
    let hw_out = g.h_out * g.w_out;
    let gp_len = g.group * g.points;
    let threads = rayon::current_num_threads().max(1);
    let splits = if g.n >= threads {
        1
    } else {
        threads.div_ceil(g.n).min(hw_out).max(1)
    };
    gin.par_chunks_mut(img_len)
        .zip(goff.par_chunks_mut(hw_out * gp_len * 2))
        .zip(gmask.par_chunks_mut(hw_out * gp_len))
        .enumerate()
        .for_each(|(n, ((gi, go), gm))| {
            let img = &input[n * img_len..(n + 1) * img_len];
            if splits == 1 {
                backward_range_dispatch(
                    &prm,
                    n,
                    0..hw_out,
                    img,
                    offset,
                    mask,
                    grad_out,
                    gi,
                    go,
                    gm,
                );
                return;
            }
            let per = hw_out.div_ceil(splits);
            let mut extra: Vec<Vec<F>> = (1..hw_out.div_ceil(per))
                .map(|_| vec![F::ZERO; img_len])
                .collect();
            let mut targets: Vec<&mut [F]> = Vec::with_capacity(extra.len() + 1);
            targets.push(&mut *gi);
            targets.extend(extra.iter_mut().map(|v| v.as_mut_slice()));
            targets
                .into_par_iter()
                .zip(go.par_chunks_mut(per * gp_len * 2))
                .zip(gm.par_chunks_mut(per * gp_len))
                .enumerate()
                .for_each(|(s, ((target, go_s), gm_s))| {
                    let start = s * per;
                    let end = (start + per).min(hw_out);
                    backward_range_dispatch(
                        &prm,
                        n,
                        start..end,
                        img,
                        offset,
                        mask,
                        grad_out,
                        target,
                        go_s,
                        gm_s,
                    );
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
