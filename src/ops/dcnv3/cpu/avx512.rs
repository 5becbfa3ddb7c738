//! The f32 forward of the DCNv3/DCNv4 core with AVX-512 intrinsics (the kernel of the AVX-512
//! policies for f32, f16 and bf16 tensors).
//!
//! It reads the image through a [`Bordered`] copy (a one-pixel zero border, each image on a
//! cache line), so that every valid point's 2x2 window lies inside the copy: corners outside
//! the image read the border's zeros, and resolving a point needs no per-corner bounds tests.
//! Same arithmetic as [`super::forward_chunk_finite`], operation for operation (each corner's
//! product goes to that corner's accumulator; an outside corner adds an exact zero): the G*P
//! points of an output pixel are resolved 16 at a time (one zmm lane per point: position,
//! validity as a lane mask, floor corner, bilinear weights times the mask, the window's start)
//! into L1-resident scratch; then each group's channels are accumulated in zmm blocks of 16
//! channels (a masked block for the rest), one accumulator per corner, and the output is stored
//! while its finiteness is tested (`VFPCLASSPS`), so a pixel spoiled by a non-finite value (a
//! zero weight times inf is NaN) is redone exactly with [`super::forward_pixel`] on the original
//! image without another pass. DCNv4 rows are copied into the dense point order with masked
//! vector moves (a handful per group) instead of per-group `memcpy` calls.

use super::{forward_pixel, Bordered, Params};
use std::arch::x86_64::*;

/// f32 lanes of a zmm register.
const L: usize = 16;

/// Mask of the first `n` lanes (all 16 for `n >= 16`).
#[inline(always)]
fn first_lanes(n: usize) -> __mmask16 {
    if n >= L {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// Copies `src` into the start of `dst` with masked zmm moves.
///
/// # Safety
/// The CPU supports AVX-512 F; `dst.len() >= src.len()`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn copy_lanes(src: &[f32], dst: &mut [f32]) {
    debug_assert!(dst.len() >= src.len());
    let mut i = 0;
    while i < src.len() {
        let m = first_lanes(src.len() - i);
        let v = _mm512_maskz_loadu_ps(m, src.as_ptr().add(i));
        _mm512_mask_storeu_ps(dst.as_mut_ptr().add(i), m, v);
        i += L;
    }
}

/// One block of up to 16 channels of one (pixel, group): for the points `t0..t1`, the 2x2
/// window at `base[t]` (channels-last: `+c` is the next column, `+row` the next row) weighted by
/// `w[k][t]` (rows of `stride` entries, k = (0,0), (0,1), (1,0), (1,1)), channels `c0..`,
/// summed and stored into `out`; returns the lanes that came out NaN or infinite. `MASKED`:
/// only the lanes of `cm` are read and written (the group's last, partial block).
///
/// # Safety
/// The CPU supports AVX-512 F/DQ; every `base[t]` for t in `t0..t1` lies in
/// `[0, img.len() - row - c - cg]` and `c0 + 16 <= cg` (or, `MASKED`, `c0 + popcount(cm) <= cg`
/// with `cm` a prefix mask); `out` points at 16 (`MASKED`: the lanes of `cm`) writable floats;
/// `base` holds `stride` and `wts` `4 * stride` entries, `t1 <= stride`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block<const MASKED: bool>(
    img: *const f32,
    (c, row): (usize, usize),
    base: *const i32,
    wts: *const f32,
    stride: usize,
    (t0, t1): (usize, usize),
    c0: usize,
    cm: __mmask16,
    out: *mut f32,
) -> __mmask16 {
    let mut a = [_mm512_setzero_ps(); 4];
    let steps = [0, c, row, row + c];
    for t in t0..t1 {
        let p = img.add(*base.add(t) as usize + c0);
        for (k, acc) in a.iter_mut().enumerate() {
            let v = if MASKED {
                _mm512_maskz_loadu_ps(cm, p.add(steps[k]))
            } else {
                _mm512_loadu_ps(p.add(steps[k]))
            };
            *acc = _mm512_fmadd_ps(_mm512_set1_ps(*wts.add(k * stride + t)), v, *acc);
        }
    }
    let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    // QNaN | +inf | -inf | SNaN.
    let bad = _mm512_fpclass_ps_mask::<0x99>(s);
    if MASKED {
        _mm512_mask_storeu_ps(out, cm, s);
        bad & cm
    } else {
        _mm512_storeu_ps(out, s);
        bad
    }
}

/// Forward over one chunk of output pixels starting at linear pixel `first`, f32, AVX-512 (see
/// the module documentation); same results as [`super::forward_chunk_finite`].
///
/// # Safety
/// The CPU supports AVX-512 F/BW/VL/DQ, AVX2 and FMA; `bordered` is the [`Bordered`] copy of
/// `input` for `prm`'s geometry; `input`, `offset` and `mask` hold what `prm`'s geometry and
/// layout say, and `chunk` holds whole output pixels starting at `first`, all within the output.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn forward_chunk(
    prm: &Params<f32>,
    bordered: &Bordered,
    input: &[f32],
    offset: &[f32],
    mask: &[f32],
    chunk: &mut [f32],
    first: usize,
) {
    let g = &prm.g;
    let (c, cg, np) = (g.channels, g.group_channels, g.points);
    let gp_len = g.group * np;
    let hw_out = g.h_out * g.w_out;
    // Scratch rows padded to whole vectors, so that the point loop loads and stores full zmm.
    let stride = gp_len.next_multiple_of(L);
    let smp = prm.smp;
    let (wi, hi, ci) = (smp.wi, smp.hi, c as i32);
    // Every window start is clamped into [0, lim] (a no-op for the starts computed below, which
    // lie in the copy: a valid point's floor corner is in [-1, W-1] x [-1, H-1], i.e. bordered
    // column and row in [0, W] x [0, H], and its window the next column and row too), which is
    // what lets the blocks read their 2x2 windows of cg floats unchecked.
    // `Bordered::for_avx512` checked that a bordered image's length fits in i32.
    let row = bordered.row;
    let lim = (bordered.image_len - row - c - cg) as i32;
    let pad = |v: &[f32]| {
        let mut p = vec![0f32; stride];
        p[..gp_len].copy_from_slice(&v[..gp_len]);
        p
    };
    let (kx, ky) = (pad(&prm.kxg), pad(&prm.kyg));
    let mut goffg = vec![0i32; stride];
    goffg[..gp_len].copy_from_slice(&prm.goffg[..gp_len]);
    let mut base = vec![0i32; stride];
    let mut wts = vec![0f32; 4 * stride];
    // DCNv4: a pixel's offsets and masks copied into the dense point order (DCNv3's).
    let (mut dxy, mut msk) = (vec![0f32; 2 * stride], vec![0f32; stride]);
    let dense = prm.lay.dense(g);
    let (mut to, mut tw) = (vec![0usize; 4 * np], vec![0f32; 4 * np]);

    let one = _mm512_set1_ps(1.0);
    let neg1 = _mm512_set1_ps(-1.0);
    let (wf, hf) = (_mm512_set1_ps(smp.w_in), _mm512_set1_ps(smp.h_in));
    let sigma = _mm512_set1_ps(smp.sigma);
    let zero_i = _mm512_setzero_si512();
    let one_i = _mm512_set1_epi32(1);
    let (wi1, hi1) = (_mm512_set1_epi32(wi - 1), _mm512_set1_epi32(hi - 1));
    let (ci_v, row_v) = (_mm512_set1_epi32(ci), _mm512_set1_epi32(row as i32));
    let lim_v = _mm512_set1_epi32(lim);
    // Lane l of (dx, dy) is element 2l (2l+1) of the pair (a, b) of 16-float loads.
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_add_epi32(even, one_i);

    for (k, opix) in chunk.chunks_exact_mut(c).enumerate() {
        let px = prm.pixel(first + k, input, offset, mask);
        let img = bordered.image((first + k) / hw_out);
        let (offs, masks): (&[f32], &[f32]) = if dense {
            (&px.off[..2 * gp_len], &px.mask[..gp_len])
        } else {
            for grp in 0..g.group {
                let (o, m) = prm.group_args(&px, grp);
                // SAFETY: AVX-512 F is enabled here; the destinations are the group's runs of
                // dxy (2*G*P) and msk (G*P), as long as the sources.
                unsafe {
                    copy_lanes(o, &mut dxy[grp * 2 * np..(grp + 1) * 2 * np]);
                    copy_lanes(m, &mut msk[grp * np..(grp + 1) * np]);
                }
            }
            (&dxy[..2 * gp_len], &msk[..gp_len])
        };
        let (bx, by) = (_mm512_set1_ps(px.bx), _mm512_set1_ps(px.by));
        let mut gp = 0;
        while gp < gp_len {
            let n = (gp_len - gp).min(L);
            let lanes = first_lanes(n);
            // SAFETY (loads): the masks limit the reads to offs[2gp..2gp+2n] and
            // masks[gp..gp+n], inside the slices (gp + n <= G*P); kx, ky, goffg have `stride`
            // entries, gp + 16 <= stride.
            let (d, mv, kxv, kyv, goff) = unsafe {
                let a = _mm512_maskz_loadu_ps(first_lanes(2 * n), offs.as_ptr().add(2 * gp));
                let b = _mm512_maskz_loadu_ps(
                    first_lanes((2 * n).saturating_sub(L)),
                    offs.as_ptr().add(2 * gp + L.min(2 * n)),
                );
                (
                    (a, b),
                    _mm512_maskz_loadu_ps(lanes, masks.as_ptr().add(gp)),
                    _mm512_loadu_ps(kx.as_ptr().add(gp)),
                    _mm512_loadu_ps(ky.as_ptr().add(gp)),
                    _mm512_loadu_si512(goffg.as_ptr().add(gp).cast()),
                )
            };
            // When 2n <= 16, b is all zero and only a's lanes are selected for l < n.
            let dx = _mm512_permutex2var_ps(d.0, even, d.1);
            let dy = _mm512_permutex2var_ps(d.0, odd, d.1);
            // Sampler::position.
            let gx = _mm512_add_ps(bx, kxv);
            let gy = _mm512_add_ps(by, kyv);
            let sx = _mm512_mul_ps(sigma, dx);
            let sy = _mm512_mul_ps(sigma, dy);
            let x = _mm512_add_ps(gx, sx);
            let y = _mm512_add_ps(gy, sy);
            // Ordered compares: NaN lanes are invalid.
            let valid = lanes
                & _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, neg1)
                & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, wf)
                & _mm512_cmp_ps_mask::<_CMP_GT_OQ>(y, neg1)
                & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(y, hf);
            // Sampler::point: invalid points at (0, 0) with zero fractions.
            let (gx, gy) = (
                _mm512_maskz_mov_ps(valid, gx),
                _mm512_maskz_mov_ps(valid, gy),
            );
            let (sx, sy) = (
                _mm512_maskz_mov_ps(valid, sx),
                _mm512_maskz_mov_ps(valid, sy),
            );
            let (x, y) = (_mm512_maskz_mov_ps(valid, x), _mm512_maskz_mov_ps(valid, y));
            // Sampler::point_at: x + 1 > 0, so truncation is the floor; clamped to W-1 / H-1.
            let x0 = _mm512_min_epi32(
                _mm512_sub_epi32(_mm512_cvttps_epi32(_mm512_add_ps(x, one)), one_i),
                wi1,
            );
            let y0 = _mm512_min_epi32(
                _mm512_sub_epi32(_mm512_cvttps_epi32(_mm512_add_ps(y, one)), one_i),
                hi1,
            );
            let lx = _mm512_add_ps(_mm512_sub_ps(gx, _mm512_cvtepi32_ps(x0)), sx);
            let ly = _mm512_add_ps(_mm512_sub_ps(gy, _mm512_cvtepi32_ps(y0)), sy);
            // Sampler::corners, with the mask zeroed on invalid lanes. A corner outside the
            // image keeps its weight: it reads the border's zero.
            let mv = _mm512_maskz_mov_ps(valid, mv);
            let hx = _mm512_sub_ps(one, lx);
            let mhy = _mm512_mul_ps(mv, _mm512_sub_ps(one, ly));
            let mly = _mm512_mul_ps(mv, ly);
            // (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1).
            let taps = [
                _mm512_mul_ps(mhy, hx),
                _mm512_mul_ps(mhy, lx),
                _mm512_mul_ps(mly, hx),
                _mm512_mul_ps(mly, lx),
            ];
            // The window's start in the bordered image: column x0+1, row y0+1.
            let xb = _mm512_add_epi32(x0, one_i);
            let yb = _mm512_add_epi32(y0, one_i);
            let start = _mm512_add_epi32(
                _mm512_add_epi32(_mm512_mullo_epi32(yb, row_v), _mm512_mullo_epi32(xb, ci_v)),
                goff,
            );
            let start = _mm512_min_epi32(_mm512_max_epi32(start, zero_i), lim_v);
            // SAFETY: base holds `stride` entries and wts 4 rows of them; gp + 16 <= stride.
            unsafe {
                _mm512_storeu_si512(base.as_mut_ptr().add(gp).cast(), start);
                for (q, tq) in taps.iter().enumerate() {
                    _mm512_storeu_ps(wts.as_mut_ptr().add(q * stride + gp), *tq);
                }
            }
            gp += L;
        }
        let (img, bp, wp) = (img.as_ptr(), base.as_ptr(), wts.as_ptr());
        let op = opix.as_mut_ptr();
        let tail = first_lanes(cg % L);
        let mut bad: __mmask16 = 0;
        for grp in 0..g.group {
            let (t0, t1) = (grp * np, (grp + 1) * np);
            let mut c0 = 0;
            // SAFETY: the window starts of points t0..t1 were clamped into
            // [0, lim] = [0, bordered image length - row - c - cg] above; c0 + 16 <= cg in the loop and the
            // tail block reads and writes only the cg - c0 < 16 lanes of `tail`; the group's
            // output run is opix[grp*cg..(grp+1)*cg]; base holds stride >= t1 entries and wts 4
            // rows of them.
            unsafe {
                while c0 + L <= cg {
                    let o = op.add(grp * cg + c0);
                    bad |= block::<false>(img, (c, row), bp, wp, stride, (t0, t1), c0, 0xffff, o);
                    c0 += L;
                }
                if c0 < cg {
                    let o = op.add(grp * cg + c0);
                    bad |= block::<true>(img, (c, row), bp, wp, stride, (t0, t1), c0, tail, o);
                }
            }
        }
        // 0 * inf = NaN: a zero-weight tap on a non-finite input value may have spoiled the
        // pixel; redo it reading only in-image corners.
        if bad != 0 {
            forward_pixel::<f32, true>(prm, &px, opix, &mut to, &mut tw);
        }
    }
}
