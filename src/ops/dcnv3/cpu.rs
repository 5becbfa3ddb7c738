//! CPU kernels of the DCNv3 core: forward and backward, generic over the accumulation type
//! (f32 for f16/bf16/f32 tensors, f64 for f64 tensors), parallelised with rayon.
//!
//! Layout: everything channels-last and contiguous (see [`Dcnv3Geometry`]). For each output pixel
//! and group the P sampling positions and bilinear weights are computed once and then applied to
//! the Cg contiguous channels of the group with a branch-free inner loop (out-of-image corners
//! point at a row of zeros), which the compiler vectorises. No buffer proportional to
//! N*H*W*G*P*Cg is ever allocated.

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
    fn from_usize(v: usize) -> Self;
    fn floor(self) -> Self;
    /// Truncating conversion; only called on finite values within the image bounds.
    fn to_isize(self) -> isize;
}

impl Acc for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    fn from_usize(v: usize) -> Self {
        v as f32
    }
    fn floor(self) -> Self {
        f32::floor(self)
    }
    fn to_isize(self) -> isize {
        self as isize
    }
}

impl Acc for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f64(v: f64) -> Self {
        v
    }
    fn from_usize(v: usize) -> Self {
        v as f64
    }
    fn floor(self) -> Self {
        f64::floor(self)
    }
    fn to_isize(self) -> isize {
        self as isize
    }
}

/// Per-call constants: kernel grid (already multiplied by offset_scale) and base positions.
struct Params<F> {
    g: Dcnv3Geometry,
    sigma: F,
    /// x of the sampling grid origin for output column w: `w*stride_w + hx - pad_w`.
    sw: usize,
    sh: usize,
    base_x0: F,
    base_y0: F,
    kx: Vec<F>,
    ky: Vec<F>,
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
        Self {
            g: *g,
            sigma: F::from_f64(sigma),
            sw: cfg.stride_w,
            sh: cfg.stride_h,
            base_x0: F::from_f64(hx as f64 - cfg.pad_w as f64),
            base_y0: F::from_f64(hy as f64 - cfg.pad_h as f64),
            kx,
            ky,
            w_in: F::from_usize(g.w_in),
            h_in: F::from_usize(g.h_in),
        }
    }
}

/// One sampling point resolved: the four corner element offsets (into the image, at the group's
/// first channel; `None` when the corner lies outside the image) and their bilinear weights.
struct Sample<F> {
    corners: [Option<usize>; 4],
    /// Bilinear weights of (y0,x0), (y0,x0+1), (y0+1,x0), (y0+1,x0+1), without the mask.
    w: [F; 4],
    lx: F,
    ly: F,
}

impl<F: Acc> Params<F> {
    /// Resolves point `p` of pixel (h, w), group `grp`, from its offset pair. Returns `None` when
    /// the point samples nothing (outside (-1, H) x (-1, W), or a NaN/inf position).
    #[inline(always)]
    fn sample(&self, h: usize, w: usize, p: usize, dx: F, dy: F, grp: usize) -> Option<Sample<F>> {
        let x = F::from_usize(w * self.sw) + self.base_x0 + self.kx[p] + self.sigma * dx;
        let y = F::from_usize(h * self.sh) + self.base_y0 + self.ky[p] + self.sigma * dy;
        let neg1 = F::ZERO - F::ONE;
        // Written so that NaN fails every comparison and is skipped.
        if !(x > neg1 && x < self.w_in && y > neg1 && y < self.h_in) {
            return None;
        }
        let x0f = x.floor();
        let y0f = y.floor();
        let lx = x - x0f;
        let ly = y - y0f;
        let (hx, hy) = (F::ONE - lx, F::ONE - ly);
        let x0 = x0f.to_isize();
        let y0 = y0f.to_isize();
        let (wi, hi) = (self.g.w_in as isize, self.g.h_in as isize);
        let c = self.g.channels;
        let off = grp * self.g.group_channels;
        let at = |yy: isize, xx: isize| -> Option<usize> {
            if yy >= 0 && yy < hi && xx >= 0 && xx < wi {
                Some((yy as usize * self.g.w_in + xx as usize) * c + off)
            } else {
                None
            }
        };
        Some(Sample {
            corners: [
                at(y0, x0),
                at(y0, x0 + 1),
                at(y0 + 1, x0),
                at(y0 + 1, x0 + 1),
            ],
            w: [hy * hx, hy * lx, ly * hx, ly * lx],
            lx,
            ly,
        })
    }
}

/// Number of output pixels per parallel task: enough tasks to balance 2..many threads, each big
/// enough to amortise the scheduling.
fn pixels_per_task(total_px: usize, channels: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_balance = total_px.div_ceil(threads * 8).max(1);
    // at least ~2k output scalars per task
    let by_size = 2048usize.div_ceil(channels.max(1));
    by_balance.max(by_size).min(total_px.max(1))
}

/// Forward: `out` (zero-initialised, length `g.output_len()`) += DCNv3(input, offset, mask).
pub(crate) fn forward<F: Acc>(
    cfg: &Dcnv3Config,
    g: &Dcnv3Geometry,
    input: &[F],
    offset: &[F],
    mask: &[F],
    out: &mut [F],
) {
    let prm = Params::<F>::new(cfg, g);
    let c = g.channels;
    let cg = g.group_channels;
    let np = g.points;
    let hw_out = g.h_out * g.w_out;
    let img_len = g.h_in * g.w_in * c;
    let chunk_px = pixels_per_task(g.out_pixels(), c);
    out.par_chunks_mut(chunk_px * c)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let zeros = vec![F::ZERO; cg];
            for (k, opix) in chunk.chunks_exact_mut(c).enumerate() {
                let pix = ci * chunk_px + k;
                let n = pix / hw_out;
                let rem = pix % hw_out;
                let (h, w) = (rem / g.w_out, rem % g.w_out);
                let img = &input[n * img_len..(n + 1) * img_len];
                let off_pix = &offset[pix * g.group * np * 2..(pix + 1) * g.group * np * 2];
                let mask_pix = &mask[pix * g.group * np..(pix + 1) * g.group * np];
                for (grp, acc) in opix.chunks_exact_mut(cg).enumerate() {
                    for p in 0..np {
                        let gp = grp * np + p;
                        let Some(s) =
                            prm.sample(h, w, p, off_pix[2 * gp], off_pix[2 * gp + 1], grp)
                        else {
                            continue;
                        };
                        let m = mask_pix[gp];
                        let row = |o: Option<usize>| match o {
                            Some(o) => &img[o..o + cg],
                            None => &zeros[..],
                        };
                        let (v0, v1, v2, v3) = (
                            row(s.corners[0]),
                            row(s.corners[1]),
                            row(s.corners[2]),
                            row(s.corners[3]),
                        );
                        let (w0, w1, w2, w3) = (m * s.w[0], m * s.w[1], m * s.w[2], m * s.w[3]);
                        for ((((a, &a0), &a1), &a2), &a3) in
                            acc.iter_mut().zip(v0).zip(v1).zip(v2).zip(v3)
                        {
                            *a += w0 * a0 + w1 * a1 + w2 * a2 + w3 * a3;
                        }
                    }
                }
            }
        });
}

/// Backward over the output pixels `px_range` of image `n` (pixel indices within the image).
///
/// `gin` is the gradient buffer of image n's input (accumulated into), `goff`/`gmask` are the
/// offset/mask gradient rows of exactly those pixels (overwritten).
#[allow(clippy::too_many_arguments)]
fn backward_range<F: Acc>(
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
    zeros: &[F],
) {
    let g = &prm.g;
    let c = g.channels;
    let cg = g.group_channels;
    let np = g.points;
    let gp_len = g.group * np;
    let hw_out = g.h_out * g.w_out;
    for (k, ipx) in px_range.enumerate() {
        let pix = n * hw_out + ipx;
        let (h, w) = (ipx / g.w_out, ipx % g.w_out);
        let off_pix = &offset[pix * gp_len * 2..(pix + 1) * gp_len * 2];
        let mask_pix = &mask[pix * gp_len..(pix + 1) * gp_len];
        let go_pix = &grad_out[pix * c..(pix + 1) * c];
        let goff_pix = &mut goff[k * gp_len * 2..(k + 1) * gp_len * 2];
        let gmask_pix = &mut gmask[k * gp_len..(k + 1) * gp_len];
        for (grp, go) in go_pix.chunks_exact(cg).enumerate() {
            for p in 0..np {
                let gp = grp * np + p;
                let Some(s) = prm.sample(h, w, p, off_pix[2 * gp], off_pix[2 * gp + 1], grp) else {
                    goff_pix[2 * gp] = F::ZERO;
                    goff_pix[2 * gp + 1] = F::ZERO;
                    gmask_pix[gp] = F::ZERO;
                    continue;
                };
                let m = mask_pix[gp];
                let row = |o: Option<usize>| match o {
                    Some(o) => &img[o..o + cg],
                    None => zeros,
                };
                let (v0, v1, v2, v3) = (
                    row(s.corners[0]),
                    row(s.corners[1]),
                    row(s.corners[2]),
                    row(s.corners[3]),
                );
                // d0..d3 = <grad_out, corner value> over the group's channels.
                let (mut d0, mut d1, mut d2, mut d3) = (F::ZERO, F::ZERO, F::ZERO, F::ZERO);
                for ((((&o, &a0), &a1), &a2), &a3) in go.iter().zip(v0).zip(v1).zip(v2).zip(v3) {
                    d0 += o * a0;
                    d1 += o * a1;
                    d2 += o * a2;
                    d3 += o * a3;
                }
                gmask_pix[gp] = s.w[0] * d0 + s.w[1] * d1 + s.w[2] * d2 + s.w[3] * d3;
                let (lx, ly) = (s.lx, s.ly);
                let ddx = (F::ONE - ly) * (d1 - d0) + ly * (d3 - d2);
                let ddy = (F::ONE - lx) * (d2 - d0) + lx * (d3 - d1);
                let ms = m * prm.sigma;
                goff_pix[2 * gp] = ms * ddx;
                goff_pix[2 * gp + 1] = ms * ddy;
                for (corner, &wc) in s.corners.iter().zip(&s.w) {
                    if let Some(o) = *corner {
                        let f = m * wc;
                        for (gi, &o) in gin[o..o + cg].iter_mut().zip(go) {
                            *gi += f * o;
                        }
                    }
                }
            }
        }
    }
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
    let zeros = vec![F::ZERO; g.group_channels];
    gin.par_chunks_mut(img_len)
        .zip(goff.par_chunks_mut(hw_out * gp_len * 2))
        .zip(gmask.par_chunks_mut(hw_out * gp_len))
        .enumerate()
        .for_each(|(n, ((gi, go), gm))| {
            let img = &input[n * img_len..(n + 1) * img_len];
            if splits == 1 {
                backward_range(
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
                    &zeros,
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
                    backward_range(
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
                        &zeros,
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
