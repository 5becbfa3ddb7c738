//! The f32 forward and backward of the DCNv3/DCNv4 core with AVX-512 intrinsics (the kernels of
//! the AVX-512 policies for f32, f16 and bf16 tensors). Both resolve a pixel's G*P points 16 at a
//! time with one [`Resolver`]; the backward is described at [`backward_range`].
//!
//! The forward reads the image through a [`Bordered`] copy (a one-pixel zero border, each image on a
//! cache line), so that every valid point's 2x2 window lies inside the copy: corners outside
//! the image read the border's zeros, and resolving a point needs no per-corner bounds tests.
//! Same arithmetic as [`super::forward_chunk_finite`], operation for operation (each corner's
//! product goes to that corner's accumulator; an outside corner adds an exact zero): the G*P
//! points of an output pixel are resolved 16 at a time (one zmm lane per point: position,
//! validity as a lane mask, floor corner, bilinear weights times the mask, the window's start)
//! into L1-resident scratch (runs of two to four pixels together where one pixel's points do
//! not fill whole vectors); then each group's channels are accumulated in zmm blocks of 16
//! channels (a masked block for the rest), one accumulator per corner, and the output is stored
//! while its finiteness is tested (`VFPCLASSPS`), so a pixel spoiled by a non-finite value (a
//! zero weight times inf is NaN) is redone exactly with [`super::forward_pixel`] on the original
//! image without another pass. DCNv4 rows are copied into the dense point order by a per-call
//! plan of vector moves ([`DenseRows`]), a block of pixels at a time.

use super::{forward_pixel, Bordered, Dcnv3Geometry, GradRows, Params, PixelCursor, PointLayout};
use std::arch::x86_64::*;
use std::mem::MaybeUninit;

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

/// How one pixel's offsets and masks move from a layout that is not dense (DCNv4's packed rows)
/// into the dense point order (all G*P offset pairs, then all G*P masks): per group run, masked
/// 16-float loads from the row and whole-vector stores in ascending destination order, so that
/// each store's lanes past its run are overwritten by the next store, or land in 16 floats of
/// slack past the pixel's values. A handful of vector moves per pixel, with no per-group slicing
/// or mask arithmetic.
struct DenseRows {
    /// (first element in the offset row, first element in the dense offsets, lanes).
    offs: Vec<(usize, usize, __mmask16)>,
    /// The same for the masks.
    masks: Vec<(usize, usize, __mmask16)>,
}

impl DenseRows {
    fn new(lay: &PointLayout, g: &Dcnv3Geometry) -> Self {
        let np = g.points;
        let moves = |src: usize, dst: usize, len: usize| {
            (0..len.div_ceil(L)).map(move |c| (src + c * L, dst + c * L, first_lanes(len - c * L)))
        };
        Self {
            offs: (0..g.group)
                .flat_map(|grp| moves(lay.off_at(grp), grp * 2 * np, 2 * np))
                .collect(),
            masks: (0..g.group)
                .flat_map(|grp| moves(lay.mask_at(grp), grp * np, np))
                .collect(),
        }
    }

    /// Copies a pixel's offsets (from its offset row `orow`) and masks (from its mask row
    /// `mrow`) into the dense runs at the start of `dxy` and `msk`.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F; the rows are a pixel's rows in the layout the plan was made
    /// for; `dxy` holds at least 2*G*P + 16 and `msk` G*P + 16 floats.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    unsafe fn copy(&self, orow: &[f32], mrow: &[f32], dxy: &mut [f32], msk: &mut [f32]) {
        for (moves, row, dst) in [(&self.offs, orow, dxy), (&self.masks, mrow, msk)] {
            for &(src, at, lanes) in moves {
                debug_assert!(at + L <= dst.len());
                // SAFETY: the lanes read are the run's own elements, inside the row (the layout
                // keeps every group's run within a pixel's row; masked-off lanes are not read);
                // the store's 16 floats lie within `dst` (its slack, as the caller promises).
                unsafe {
                    let v = _mm512_maskz_loadu_ps(lanes, row.as_ptr().add(src));
                    _mm512_storeu_ps(dst.as_mut_ptr().add(at), v);
                }
            }
        }
    }
}

/// The per-call tables and vector constants of point resolution, shared by the forward and the
/// backward: the kernel grid and group channel offsets padded to whole vectors, and the image
/// bounds.
struct Resolver {
    /// G*P rounded up to a multiple of 16: the length of every per-point scratch row.
    stride: usize,
    /// G*P.
    gp_len: usize,
    kx: Vec<f32>,
    ky: Vec<f32>,
    goffg: Vec<i32>,
    one: __m512,
    neg1: __m512,
    wf: __m512,
    hf: __m512,
    sigma: __m512,
    zero_i: __m512i,
    one_i: __m512i,
    wi1: __m512i,
    hi1: __m512i,
    ci_v: __m512i,
    row_v: __m512i,
    lim_v: __m512i,
    even: __m512i,
    odd: __m512i,
}

/// 16 sampling points (one per lane) resolved in the bordered image.
struct Points16 {
    /// Lanes of points that sample something (inside (-1, W) x (-1, H), within the run).
    valid: __mmask16,
    /// Floor corner (0 for invalid lanes), at most (W-1, H-1).
    x0: __m512i,
    y0: __m512i,
    /// Bilinear fractions `x - x0`, `y - y0` (0 for invalid lanes).
    lx: __m512,
    ly: __m512,
    /// The points' masks (0 for invalid lanes).
    m: __m512,
    /// The 2x2 window's first element in the bordered image, clamped into
    /// `[0, image_len - row - c - cg]` (a no-op for valid points).
    start: __m512i,
    /// The first channel of each point's group.
    chan: __m512i,
}

impl Resolver {
    /// The tables for runs of `pixels` consecutive pixels (their points one after the other,
    /// the per-point tables repeated). Without a bordered copy (the backward), `Points16::start`
    /// is 0.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F; `bordered` is the copy for `prm`'s geometry.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    unsafe fn new(prm: &Params<f32>, bordered: Option<&Bordered>, pixels: usize) -> Self {
        let g = &prm.g;
        let (c, cg) = (g.channels, g.group_channels);
        let one_pixel = g.group * g.points;
        let gp_len = pixels * one_pixel;
        let stride = gp_len.next_multiple_of(L);
        // The per-point tables repeated for each of the `pixels` pixels, then zeros.
        let tiled = |v: &[f32]| {
            let mut p = vec![0f32; stride];
            for run in p[..gp_len].chunks_exact_mut(one_pixel) {
                run.copy_from_slice(&v[..one_pixel]);
            }
            p
        };
        let mut goffg = vec![0i32; stride];
        for run in goffg[..gp_len].chunks_exact_mut(one_pixel) {
            run.copy_from_slice(&prm.goffg[..one_pixel]);
        }
        let smp = prm.smp;
        let row = bordered.map_or(0, |b| b.row);
        // Every window start is clamped into [0, lim] (a no-op for the starts computed in
        // `resolve`, which lie in the copy: a valid point's floor corner is in [-1, W-1] x
        // [-1, H-1], i.e. bordered column and row in [0, W] x [0, H], and its window the next
        // column and row too), which is what lets the forward read its 2x2 windows of cg
        // floats unchecked. `Bordered::for_avx512` checked that a bordered image's length fits
        // in i32.
        let lim = bordered.map_or(0, |b| (b.image_len - row - c - cg) as i32);
        let one_i = _mm512_set1_epi32(1);
        // Lane l of (dx, dy) is element 2l (2l+1) of the pair (a, b) of 16-float loads.
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        Self {
            stride,
            gp_len,
            kx: tiled(&prm.kxg),
            ky: tiled(&prm.kyg),
            goffg,
            one: _mm512_set1_ps(1.0),
            neg1: _mm512_set1_ps(-1.0),
            wf: _mm512_set1_ps(smp.w_in),
            hf: _mm512_set1_ps(smp.h_in),
            sigma: _mm512_set1_ps(smp.sigma),
            zero_i: _mm512_setzero_si512(),
            one_i,
            wi1: _mm512_set1_epi32(smp.wi - 1),
            hi1: _mm512_set1_epi32(smp.hi - 1),
            ci_v: _mm512_set1_epi32(c as i32),
            row_v: _mm512_set1_epi32(row as i32),
            lim_v: _mm512_set1_epi32(lim),
            even,
            odd: _mm512_add_epi32(even, one_i),
        }
    }

    /// Resolves the points `gp..gp + min(16, G*P - gp)` of a pixel with grid centre (bx, by)
    /// from its dense offsets and masks (`Sampler::position`, `Sampler::point_at`, vectorised).
    ///
    /// # Safety
    /// The CPU supports AVX-512 F/DQ; `gp < G*P`, `offs` holds 2*G*P and `masks` G*P values.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    unsafe fn resolve(
        &self,
        bxy: (__m512, __m512),
        offs: &[f32],
        masks: &[f32],
        gp: usize,
    ) -> Points16 {
        // SAFETY: as the caller promises; with 16 points left the loads are whole vectors.
        unsafe {
            if gp + L <= self.gp_len {
                self.resolve_lanes::<true>(bxy, offs, masks, gp)
            } else {
                self.resolve_lanes::<false>(bxy, offs, masks, gp)
            }
        }
    }

    /// [`Self::resolve`]; `FULL`: 16 points are left (`gp + 16 <= G*P`), so the offsets and
    /// masks are read as whole vectors, without computing lane masks (the same values).
    ///
    /// # Safety
    /// As for [`Self::resolve`], and `gp + 16 <= G*P` when `FULL`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    unsafe fn resolve_lanes<const FULL: bool>(
        &self,
        (bx, by): (__m512, __m512),
        offs: &[f32],
        masks: &[f32],
        gp: usize,
    ) -> Points16 {
        let n = if FULL { L } else { (self.gp_len - gp).min(L) };
        let lanes = first_lanes(n);
        debug_assert!(gp + n <= self.gp_len && offs.len() >= 2 * (gp + n) && masks.len() >= gp + n);
        // SAFETY (loads): the masks limit the reads to offs[2gp..2gp+2n] and masks[gp..gp+n],
        // inside the slices (gp + n <= G*P; with `FULL`, n = 16 and the whole-vector loads read
        // exactly those); kx, ky, goffg have `stride` entries, gp + 16 <= stride.
        let (d, mv, kxv, kyv, goff) = unsafe {
            let (a, b) = if FULL {
                (
                    _mm512_loadu_ps(offs.as_ptr().add(2 * gp)),
                    _mm512_loadu_ps(offs.as_ptr().add(2 * gp + L)),
                )
            } else {
                (
                    _mm512_maskz_loadu_ps(first_lanes(2 * n), offs.as_ptr().add(2 * gp)),
                    _mm512_maskz_loadu_ps(
                        first_lanes((2 * n).saturating_sub(L)),
                        offs.as_ptr().add(2 * gp + L.min(2 * n)),
                    ),
                )
            };
            (
                (a, b),
                if FULL {
                    _mm512_loadu_ps(masks.as_ptr().add(gp))
                } else {
                    _mm512_maskz_loadu_ps(lanes, masks.as_ptr().add(gp))
                },
                _mm512_loadu_ps(self.kx.as_ptr().add(gp)),
                _mm512_loadu_ps(self.ky.as_ptr().add(gp)),
                _mm512_loadu_si512(self.goffg.as_ptr().add(gp).cast()),
            )
        };
        // When 2n <= 16, b is all zero and only a's lanes are selected for l < n.
        let dx = _mm512_permutex2var_ps(d.0, self.even, d.1);
        let dy = _mm512_permutex2var_ps(d.0, self.odd, d.1);
        // Sampler::position.
        let gx = _mm512_add_ps(bx, kxv);
        let gy = _mm512_add_ps(by, kyv);
        let sx = _mm512_mul_ps(self.sigma, dx);
        let sy = _mm512_mul_ps(self.sigma, dy);
        let x = _mm512_add_ps(gx, sx);
        let y = _mm512_add_ps(gy, sy);
        // Ordered compares: NaN lanes are invalid.
        let valid = lanes
            & _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, self.neg1)
            & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, self.wf)
            & _mm512_cmp_ps_mask::<_CMP_GT_OQ>(y, self.neg1)
            & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(y, self.hf);
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
            _mm512_sub_epi32(_mm512_cvttps_epi32(_mm512_add_ps(x, self.one)), self.one_i),
            self.wi1,
        );
        let y0 = _mm512_min_epi32(
            _mm512_sub_epi32(_mm512_cvttps_epi32(_mm512_add_ps(y, self.one)), self.one_i),
            self.hi1,
        );
        let lx = _mm512_add_ps(_mm512_sub_ps(gx, _mm512_cvtepi32_ps(x0)), sx);
        let ly = _mm512_add_ps(_mm512_sub_ps(gy, _mm512_cvtepi32_ps(y0)), sy);
        // The window's start in the bordered image: column x0+1, row y0+1.
        let xb = _mm512_add_epi32(x0, self.one_i);
        let yb = _mm512_add_epi32(y0, self.one_i);
        let start = _mm512_add_epi32(
            _mm512_add_epi32(
                _mm512_mullo_epi32(yb, self.row_v),
                _mm512_mullo_epi32(xb, self.ci_v),
            ),
            goff,
        );
        Points16 {
            valid,
            x0,
            y0,
            lx,
            ly,
            m: _mm512_maskz_mov_ps(valid, mv),
            start: _mm512_min_epi32(_mm512_max_epi32(start, self.zero_i), self.lim_v),
            chan: goff,
        }
    }
}

/// What the AVX-512 forward sets up once per call and every chunk of the call shares: the
/// bordered image, the point resolvers for one pixel and for runs of pixels, and (DCNv4's
/// packed rows) the plan that copies a pixel's offsets and masks into the dense point order.
///
/// Where a pixel's G*P points do not fill whole vectors, runs of consecutive pixels of one image
/// are resolved together so that they do: at InternImage's stage 1 (G*P = 36) four pixels,
/// 144 points in nine full vectors instead of twelve with a quarter of the lanes idle (measured
/// on the Zen 4 against one pixel at a time, paired in one process: 6-7% faster at the stage-1
/// shape on one and two threads, 5% at batch 8; the same values bit for bit).
pub(super) struct ForwardPlan<'a> {
    bordered: &'a Bordered,
    /// Pixels per run: the fewest whose points fill whole vectors, if at most four; else 1.
    run: usize,
    single: Resolver,
    multi: Option<Resolver>,
    /// Lane -> pixel of the run, for the multi-pixel resolver's points (its stride is exactly
    /// run * G*P: whole vectors).
    lane_pixel: Vec<i32>,
    /// The copy into the dense point order, for layouts that are not dense (DCNv4).
    dense: Option<DenseRows>,
}

impl<'a> ForwardPlan<'a> {
    /// The plan of a forward call on `bordered`, the [`Bordered`] copy of its input.
    ///
    /// # Safety
    /// The CPU supports AVX-512 F/BW/VL/DQ, AVX2 and FMA; `bordered` is the copy for `prm`'s
    /// geometry.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
    pub(super) unsafe fn new(prm: &Params<f32>, bordered: &'a Bordered) -> Self {
        let g = &prm.g;
        let one_px = g.group * g.points;
        let run = (1..=4)
            .find(|r| (r * one_px).is_multiple_of(L))
            .unwrap_or(1);
        // SAFETY: AVX-512 is enabled here; `bordered` is the copy for this geometry.
        let single = unsafe { Resolver::new(prm, Some(bordered), 1) };
        // SAFETY: as above.
        let multi = (run > 1).then(|| unsafe { Resolver::new(prm, Some(bordered), run) });
        let lane_pixel = match &multi {
            Some(m) => (0..m.stride).map(|j| (j / one_px) as i32).collect(),
            None => Vec::new(),
        };
        let dense = (!prm.lay.dense(g)).then(|| DenseRows::new(&prm.lay, g));
        Self {
            bordered,
            run,
            single,
            multi,
            lane_pixel,
            dense,
        }
    }
}

/// Forward over one chunk of output pixels starting at linear pixel `first`, f32, AVX-512 (see
/// the module documentation and [`ForwardPlan`]); same results as
/// [`super::forward_chunk_finite`]. Every element of `chunk` is written (it may come in
/// unwritten).
///
/// # Safety
/// The CPU supports AVX-512 F/BW/VL/DQ, AVX2 and FMA; `plan` was made for `prm` and the
/// [`Bordered`] copy of `input`; `input`, `offset` and `mask` hold what `prm`'s geometry and
/// layout say, and `chunk` holds whole output pixels starting at `first`, all within the output.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn forward_chunk(
    prm: &Params<f32>,
    plan: &ForwardPlan,
    input: &[f32],
    offset: &[f32],
    mask: &[f32],
    chunk: &mut [MaybeUninit<f32>],
    first: usize,
) {
    let g = &prm.g;
    let (c, cg, np) = (g.channels, g.group_channels, g.points);
    let bordered = plan.bordered;
    let row = bordered.row;
    let npix = chunk.len() / c;
    let one_px = g.group * np;
    let run = plan.run;
    let (single, multi, lane_pixel) = (&plan.single, &plan.multi, &plan.lane_pixel);
    // Scratch rows padded to whole vectors, so that the point loop loads and stores full zmm.
    let most = multi.as_ref().map_or(single.stride, |m| m.stride);
    // This thread's scratch rows, reused (paired at the stage-1 shape, one process: the plan
    // made once per call instead of once per chunk 4% faster in a quiet hour; reused rows
    // instead of fresh ones per chunk another 16-30% while the host was busy, where each
    // allocation risks a wait; bit for bit the same output).
    let mut scratch = SCRATCH.take();
    let ChunkScratch {
        base,
        wts,
        dxy,
        msk,
        to,
        tw,
    } = &mut scratch;
    base.resize(most, 0);
    wts.resize(4 * most, 0.0);
    to.resize(4 * np, 0);
    tw.resize(4 * np, 0.0);
    // DCNv3's two tensors (the one dense layout): a run's offsets and masks are already dense,
    // consecutive rows, read in place. Other layouts (DCNv4's packed rows) are copied into the
    // dense point order by `DenseRows`, a block of pixels at a time before the block's points
    // are resolved (paired at the stage-1 shape against the per-group copies of one pixel at a
    // time: the DCNv4 core 6-9% faster at N=1, 0-14% at N=8; blocks of 1, 2, 8 or 32 runs
    // measured alike).
    let lay = &prm.lay;
    let in_place = plan.dense.is_none();
    debug_assert!(
        !in_place
            || (lay.off_pixel == 2 * one_px && lay.mask_pixel == one_px && lay.mask_first == 0)
    );
    // Pixels per copied block: whole runs, ~14 KiB of dense values at InternImage's stage 1.
    let block_px = if in_place { npix } else { 8 * run };
    let copied = if in_place { 0 } else { block_px };
    dxy.resize(copied * 2 * one_px + L, 0.0);
    msk.resize(copied * one_px + L, 0.0);
    let one = single.one;
    let tail = first_lanes(cg % L);
    // Image, row and column of output pixel `first + k`, stepped along (no divisions per run).
    let mut at = PixelCursor::at(g, first);
    let mut b0 = 0;
    while b0 < npix {
        let b1 = (b0 + block_px).min(npix);
        // The block's dense offsets and masks, and the chunk pixel their first row belongs to.
        let (offs_all, masks_all, row0): (&[f32], &[f32], usize) = match &plan.dense {
            None => (offset, mask, 0),
            Some(plan) => {
                let (lo, lm) = (lay.off_pixel, lay.mask_pixel);
                for i in b0..b1 {
                    let (pix, j) = (first + i, i - b0);
                    let (orow, mrow) = (
                        &offset[pix * lo..(pix + 1) * lo],
                        &mask[pix * lm..(pix + 1) * lm],
                    );
                    let (d, m) = (&mut dxy[j * 2 * one_px..], &mut msk[j * one_px..]);
                    // SAFETY: AVX-512 F is enabled here; the rows are the pixel's, and the
                    // destinations hold the pixel's dense values plus 16 floats (the buffers' slack
                    // after the block's last pixel).
                    unsafe { plan.copy(orow, mrow, d, m) };
                }
                (&dxy[..], &msk[..], first + b0)
            }
        };
        let mut k = b0;
        while k < b1 {
            // The run's pixels all lie in one image (and in this block).
            let n_img = at.n;
            let whole = k + run <= b1 && at.left_in_image() >= run;
            let (res, cnt) = match multi {
                Some(m) if whole => (m, run),
                _ => (single, 1),
            };
            let (mut bx, mut by) = ([0f32; L], [0f32; L]);
            for i in 0..cnt {
                (bx[i], by[i]) = prm.centre(at.h, at.w);
                at.step();
            }
            let p0 = first + k - row0;
            let (offs, masks) = (
                &offs_all[p0 * 2 * one_px..(p0 + cnt) * 2 * one_px],
                &masks_all[p0 * one_px..(p0 + cnt) * one_px],
            );
            // SAFETY: bx and by hold 16 floats.
            let (bxv, byv) =
                unsafe { (_mm512_loadu_ps(bx.as_ptr()), _mm512_loadu_ps(by.as_ptr())) };
            let stride = res.stride;
            let mut gp = 0;
            while gp < res.gp_len {
                let bxy = if cnt == 1 {
                    (_mm512_set1_ps(bx[0]), _mm512_set1_ps(by[0]))
                } else {
                    // SAFETY: lane_pixel holds the multi-pixel resolver's `stride` >= gp + 16
                    // entries.
                    let idx = unsafe { _mm512_loadu_si512(lane_pixel.as_ptr().add(gp).cast()) };
                    (
                        _mm512_permutexvar_ps(idx, bxv),
                        _mm512_permutexvar_ps(idx, byv),
                    )
                };
                // SAFETY: gp < the run's points; the slices are its dense offsets and masks.
                let p = unsafe { res.resolve(bxy, offs, masks, gp) };
                // Sampler::corners. A corner outside the image keeps its weight: it reads the
                // border's zero.
                let hx = _mm512_sub_ps(one, p.lx);
                let mhy = _mm512_mul_ps(p.m, _mm512_sub_ps(one, p.ly));
                let mly = _mm512_mul_ps(p.m, p.ly);
                // (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1).
                let taps = [
                    _mm512_mul_ps(mhy, hx),
                    _mm512_mul_ps(mhy, p.lx),
                    _mm512_mul_ps(mly, hx),
                    _mm512_mul_ps(mly, p.lx),
                ];
                // SAFETY: base holds `stride` entries and wts 4 rows of them; gp + 16 <= stride.
                unsafe {
                    _mm512_storeu_si512(base.as_mut_ptr().add(gp).cast(), p.start);
                    for (q, tq) in taps.iter().enumerate() {
                        _mm512_storeu_ps(wts.as_mut_ptr().add(q * stride + gp), *tq);
                    }
                }
                gp += L;
            }
            let img = bordered.image(n_img).as_ptr();
            let (bp, wp) = (base.as_ptr(), wts.as_ptr());
            for i in 0..cnt {
                let opix = &mut chunk[(k + i) * c..(k + i + 1) * c];
                let op = opix.as_mut_ptr().cast::<f32>();
                let mut bad: __mmask16 = 0;
                if cg == L {
                    // One whole block per group, the group width of every released InternImage
                    // and FlashInternImage: no channel loop and no tail test (paired at the
                    // stage-1 shape, one process: 4-6% faster than the general loop below).
                    for grp in 0..g.group {
                        let t0 = i * one_px + grp * np;
                        // SAFETY: as in the general loop below, with c0 = 0 and cg = 16: the
                        // group's output run is opix[grp*16..(grp+1)*16].
                        unsafe {
                            bad |= block::<false>(
                                img,
                                (c, row),
                                bp,
                                wp,
                                stride,
                                (t0, t0 + np),
                                0,
                                0xffff,
                                op.add(grp * L),
                            );
                        }
                    }
                } else {
                    for grp in 0..g.group {
                        let t0 = i * one_px + grp * np;
                        let t1 = t0 + np;
                        let mut c0 = 0;
                        // SAFETY: the window starts of points t0..t1 were clamped into [0, lim]
                        // = [0, bordered image length - row - c - cg] by `resolve`; c0 + 16 <= cg
                        // in the loop and the tail block reads and writes only the cg - c0 < 16
                        // lanes of `tail`; the group's output run is opix[grp*cg..(grp+1)*cg];
                        // base holds stride >= t1 entries and wts 4 rows of them.
                        unsafe {
                            while c0 + L <= cg {
                                let o = op.add(grp * cg + c0);
                                bad |= block::<false>(
                                    img,
                                    (c, row),
                                    bp,
                                    wp,
                                    stride,
                                    (t0, t1),
                                    c0,
                                    0xffff,
                                    o,
                                );
                                c0 += L;
                            }
                            if c0 < cg {
                                let o = op.add(grp * cg + c0);
                                bad |= block::<true>(
                                    img,
                                    (c, row),
                                    bp,
                                    wp,
                                    stride,
                                    (t0, t1),
                                    c0,
                                    tail,
                                    o,
                                );
                            }
                        }
                    }
                }
                // 0 * inf = NaN: a zero-weight tap on a non-finite input value may have spoiled the
                // pixel; redo it reading only in-image corners.
                if bad != 0 {
                    let px = prm.pixel(first + k + i, input, offset, mask);
                    // SAFETY: the blocks above stored every one of the pixel's C = G*cg
                    // channels (each group's full blocks and its tail lanes), so `opix` is
                    // initialised; `MaybeUninit<f32>` has the layout of `f32`.
                    let opix = unsafe { &mut *(opix as *mut [MaybeUninit<f32>] as *mut [f32]) };
                    forward_pixel::<f32, true>(prm, &px, opix, to, tw);
                }
            }
            k += cnt;
        }
        b0 = b1;
    }
    SCRATCH.set(scratch);
}

/// The scratch rows of a forward chunk: the resolved points' window starts and weights,
/// (DCNv4) the block's offsets and masks in the dense point order, and the corner offsets and
/// weights of [`forward_pixel`] for the pixels redone exactly. Every value a chunk reads it
/// wrote first, so the rows are reused as they are, across chunks and calls.
#[derive(Default)]
struct ChunkScratch {
    base: Vec<i32>,
    wts: Vec<f32>,
    dxy: Vec<f32>,
    msk: Vec<f32>,
    to: Vec<usize>,
    tw: Vec<f32>,
}

thread_local! {
    /// Each thread's [`ChunkScratch`], taken by a chunk for its run and put back after (a
    /// chunk that finds it taken starts an empty one).
    static SCRATCH: std::cell::Cell<ChunkScratch> = std::cell::Cell::new(ChunkScratch::default());
}

/// `[sum(a), sum(b), sum(c), sum(d)]` of four 16-float vectors.
///
/// # Safety
/// The CPU supports AVX-512 F/DQ.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn sum4(v: [__m512; 4]) -> __m128 {
    let mut h = [_mm256_setzero_ps(); 4];
    for (h, v) in h.iter_mut().zip(v) {
        *h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
    }
    let ab = _mm256_hadd_ps(h[0], h[1]);
    let cd = _mm256_hadd_ps(h[2], h[3]);
    // [a0123 b0123 c0123 d0123 | a4567 b4567 c4567 d4567]
    let s = _mm256_hadd_ps(ab, cd);
    _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s))
}

/// One block of up to 16 channels of one point's backward: for each corner k inside the image
/// (`inside[k]`, its block at `u + steps[k]`), the dot product of `go` with the image's block is
/// added to `d[k]`, and `f[k] * go` to the input gradient's block. `MASKED`: only the lanes of
/// `cm`.
///
/// # Safety
/// The CPU supports AVX-512 F/VL/DQ; for every corner with `inside[k]`, `u + steps[k] + 16`
/// (`MASKED`: the lanes of `cm`) is within the image and its gradient (distinct buffers of one
/// length), and `go` points at 16 (the lanes of `cm`) readable floats.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_backward<const MASKED: bool>(
    (img, gin): (*const f32, *mut f32),
    (u, steps): (isize, [isize; 4]),
    inside: [bool; 4],
    go: *const f32,
    f: [__m512; 4],
    cm: __mmask16,
    d: &mut [__m512; 4],
) {
    let gov = if MASKED {
        _mm512_maskz_loadu_ps(cm, go)
    } else {
        _mm512_loadu_ps(go)
    };
    // The input gradient is updated in 256-bit halves: consecutive points share corners, and a
    // 512-bit load of what a 512-bit store has just written waits for the store to complete
    // (measured on Zen 4), while 256-bit halves are forwarded.
    let (go_lo, go_hi) = (
        _mm512_castps512_ps256(gov),
        _mm512_extractf32x8_ps::<1>(gov),
    );
    let (m_lo, m_hi) = (cm as __mmask8, (cm >> 8) as __mmask8);
    for k in 0..4 {
        if !inside[k] {
            continue;
        }
        let o = u + steps[k];
        let v = if MASKED {
            _mm512_maskz_loadu_ps(cm, img.offset(o))
        } else {
            _mm512_loadu_ps(img.offset(o))
        };
        d[k] = _mm512_fmadd_ps(gov, v, d[k]);
        let f8 = _mm512_castps512_ps256(f[k]);
        let (p_lo, p_hi) = (gin.offset(o), gin.offset(o + 8));
        if MASKED {
            let lo = _mm256_fmadd_ps(f8, go_lo, _mm256_maskz_loadu_ps(m_lo, p_lo));
            _mm256_mask_storeu_ps(p_lo, m_lo, lo);
            let hi = _mm256_fmadd_ps(f8, go_hi, _mm256_maskz_loadu_ps(m_hi, p_hi));
            _mm256_mask_storeu_ps(p_hi, m_hi, hi);
        } else {
            _mm256_storeu_ps(p_lo, _mm256_fmadd_ps(f8, go_lo, _mm256_loadu_ps(p_lo)));
            _mm256_storeu_ps(p_hi, _mm256_fmadd_ps(f8, go_hi, _mm256_loadu_ps(p_hi)));
        }
    }
}

/// Backward over the output pixels `pixels` (all of one image), f32, AVX-512: adds the input
/// gradient into `gin` (that image's gradient, or a private buffer of its size) and writes the
/// offset and mask gradients of those pixels into `rows` (laid out as `prm`'s
/// [`super::PointLayout`] says; padding columns are left alone). Same arithmetic as
/// [`super::backward_range`] up to the order of the sums over channels: the points are resolved
/// 16 at a time into scratch (window start, corner weights times the mask, fractions, which
/// corners lie inside the image); each inside corner's block is read and its input gradient
/// updated in one pass over the channels; the offset and mask gradients are then formed 16
/// points at a time. (No bordered copy: unlike the forward, this kernel tests each corner
/// anyway, for the scatter, and a copy per call made the allocator map and unmap pages.)
///
/// # Safety
/// The CPU supports AVX-512 F/BW/VL/DQ, AVX2 and FMA; every image's H*W*C is below 2^31;
/// `gin` holds one image's H*W*C floats; `input`, `offset`, `mask` and `grad_out` hold what
/// `prm`'s geometry and layout say; `pixels` lies in one image's output pixels and `rows` holds
/// exactly their rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn backward_range(
    prm: &Params<f32>,
    input: &[f32],
    offset: &[f32],
    mask: &[f32],
    grad_out: &[f32],
    pixels: std::ops::Range<usize>,
    gin: &mut [f32],
    rows: GradRows<'_, f32>,
) {
    let g = &prm.g;
    let lay = prm.lay;
    let (c, cg, np) = (g.channels, g.group_channels, g.points);
    let w_row = g.w_in * c;
    let steps = [0, c, w_row, w_row + c].map(|v| v as isize);
    // SAFETY: AVX-512 is enabled here.
    let res = unsafe { Resolver::new(prm, None, 1) };
    let stride = res.stride;
    let blocks = stride / L;
    // Per point: the window's first element (meaningful for its inside corners only), the four
    // corner weights times the mask, fractions, mask.
    let mut ubase = vec![0i32; stride];
    let mut taps = vec![0f32; 4 * stride];
    let (mut lxs, mut lys, mut ms) = (vec![0f32; stride], vec![0f32; stride], vec![0f32; stride]);
    // Per 16 points: the valid lanes and the lanes whose corner k lies inside the image.
    let mut lanes = vec![[0 as __mmask16; 5]; blocks];
    // Per point: the four dot products (point-major), then the three gradients.
    let mut dots = vec![0f32; 4 * stride];
    let (mut gdxy, mut gmsk) = (vec![0f32; 2 * stride], vec![0f32; stride]);
    // DCNv4: a pixel's offsets and masks copied into the dense point order (DCNv3's), with
    // the slack `DenseRows::copy` writes into.
    let plan = (!prm.lay.dense(g)).then(|| DenseRows::new(&prm.lay, g));
    let (mut dxy, mut msk) = (vec![0f32; 2 * stride + L], vec![0f32; stride + L]);
    let GradRows {
        off: goff,
        mask: mut gmask,
    } = rows;
    let one = res.one;
    let sigma = res.sigma;
    let (zero_i, wi1, hi1, ci_v) = (res.zero_i, res.wi1, res.hi1, res.ci_v);
    let wrow_v = _mm512_set1_epi32(w_row as i32);
    // Lanes 0-7: corner 0 (2) of points 0-7; lanes 8-15: corner 1 (3), from 4 floats a point.
    let pick01 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    let pick23 = _mm512_add_epi32(pick01, _mm512_set1_epi32(2));
    let lo_halves = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    let hi_halves = _mm512_add_epi32(lo_halves, _mm512_set1_epi32(8));
    // Interleave (x, y) pairs: lanes 0-15 of [gx | gy] as x0 y0 x1 y1 ...
    let zip_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let zip_hi = _mm512_add_epi32(zip_lo, _mm512_set1_epi32(8));
    let tail = first_lanes(cg % L);

    for (k, pix) in pixels.enumerate() {
        let px = prm.pixel(pix, input, offset, mask);
        let img = px.img.as_ptr();
        let bxy = (_mm512_set1_ps(px.bx), _mm512_set1_ps(px.by));
        let (offs, masks): (&[f32], &[f32]) = match &plan {
            None => prm.dense_args(&px, &mut dxy, &mut msk),
            Some(plan) => {
                // SAFETY: AVX-512 F is enabled here; the rows are the pixel's, and the buffers
                // hold its dense values plus 16 floats.
                unsafe { plan.copy(px.off, px.mask, &mut dxy, &mut msk) };
                (&dxy[..2 * res.gp_len], &msk[..res.gp_len])
            }
        };
        for (blk, lane) in lanes.iter_mut().enumerate() {
            let gp = blk * L;
            // SAFETY: gp < G*P; the slices are the pixel's dense offsets and masks.
            let p = unsafe { res.resolve(bxy, offs, masks, gp) };
            // Sampler::corners with mask 1 (the bilinear weights), times the mask for the input
            // gradient.
            let (hx, hy) = (_mm512_sub_ps(one, p.lx), _mm512_sub_ps(one, p.ly));
            let wb = [
                _mm512_mul_ps(hy, hx),
                _mm512_mul_ps(hy, p.lx),
                _mm512_mul_ps(p.ly, hx),
                _mm512_mul_ps(p.ly, p.lx),
            ];
            let (xl, xh) = (
                _mm512_cmpge_epi32_mask(p.x0, zero_i),
                _mm512_cmplt_epi32_mask(p.x0, wi1),
            );
            let (yl, yh) = (
                p.valid & _mm512_cmpge_epi32_mask(p.y0, zero_i),
                p.valid & _mm512_cmplt_epi32_mask(p.y0, hi1),
            );
            *lane = [p.valid, yl & xl, yl & xh, yh & xl, yh & xh];
            // The window's first element (i32: the caller checked H*W*C < 2^31).
            let ustart = _mm512_add_epi32(
                _mm512_add_epi32(
                    _mm512_mullo_epi32(p.y0, wrow_v),
                    _mm512_mullo_epi32(p.x0, ci_v),
                ),
                p.chan,
            );
            // SAFETY: every scratch row holds `stride` entries and gp + 16 <= stride.
            unsafe {
                _mm512_storeu_si512(ubase.as_mut_ptr().add(gp).cast(), ustart);
                for (q, w) in wb.iter().enumerate() {
                    let tq = _mm512_mul_ps(p.m, *w);
                    _mm512_storeu_ps(taps.as_mut_ptr().add(q * stride + gp), tq);
                }
                _mm512_storeu_ps(lxs.as_mut_ptr().add(gp), p.lx);
                _mm512_storeu_ps(lys.as_mut_ptr().add(gp), p.ly);
                _mm512_storeu_ps(ms.as_mut_ptr().add(gp), p.m);
            }
        }
        let gi = gin.as_mut_ptr();
        for grp in 0..g.group {
            // SAFETY: the pixel's grad_out row is grad_out[pix*c..(pix+1)*c] (the caller's
            // contract), and the group's channels are [grp*cg, (grp+1)*cg).
            let go = unsafe { grad_out.as_ptr().add(pix * c + grp * cg) };
            for t in grp * np..(grp + 1) * np {
                let lane = &lanes[t / L];
                let bit = 1 << (t % L);
                let inside = [1, 2, 3, 4].map(|q| lane[q] & bit != 0);
                // SAFETY: t < G*P <= stride; every scratch row holds `stride` entries; an inside
                // corner is a pixel of the image and its group's channels [chan, chan + cg)
                // with c0 + 16 <= cg (or the `tail` lanes of the last block), so its blocks lie
                // in the image and in its gradient (the same length); `dots` holds 4 * stride
                // floats.
                unsafe {
                    let u = *ubase.get_unchecked(t) as isize;
                    let mut f = [_mm512_setzero_ps(); 4];
                    for (q, fq) in f.iter_mut().enumerate() {
                        *fq = _mm512_set1_ps(*taps.get_unchecked(q * stride + t));
                    }
                    let mut d = [_mm512_setzero_ps(); 4];
                    let mut c0 = 0;
                    while c0 + L <= cg {
                        let ptrs = (img.add(c0), gi.add(c0));
                        block_backward::<false>(
                            ptrs,
                            (u, steps),
                            inside,
                            go.add(c0),
                            f,
                            0xffff,
                            &mut d,
                        );
                        c0 += L;
                    }
                    if c0 < cg {
                        let ptrs = (img.add(c0), gi.add(c0));
                        block_backward::<true>(
                            ptrs,
                            (u, steps),
                            inside,
                            go.add(c0),
                            f,
                            tail,
                            &mut d,
                        );
                    }
                    _mm_storeu_ps(dots.as_mut_ptr().add(4 * t), sum4(d));
                }
            }
        }
        for (blk, lane) in lanes.iter().enumerate() {
            let gp = blk * L;
            // SAFETY: dots holds 4 * stride floats (64 from 4 * gp), the other rows `stride`
            // (16 from gp), gdxy 2 * stride (32 from 2 * gp).
            unsafe {
                let dp = dots.as_ptr().add(4 * gp);
                let (a, b) = (_mm512_loadu_ps(dp), _mm512_loadu_ps(dp.add(16)));
                let (cc, dd) = (_mm512_loadu_ps(dp.add(32)), _mm512_loadu_ps(dp.add(48)));
                let (ab01, ab23) = (
                    _mm512_permutex2var_ps(a, pick01, b),
                    _mm512_permutex2var_ps(a, pick23, b),
                );
                let (cd01, cd23) = (
                    _mm512_permutex2var_ps(cc, pick01, dd),
                    _mm512_permutex2var_ps(cc, pick23, dd),
                );
                // d[k] of the 16 points (zero for a corner outside the image: never formed).
                let d = [
                    _mm512_permutex2var_ps(ab01, lo_halves, cd01),
                    _mm512_permutex2var_ps(ab01, hi_halves, cd01),
                    _mm512_permutex2var_ps(ab23, lo_halves, cd23),
                    _mm512_permutex2var_ps(ab23, hi_halves, cd23),
                ];
                let lx = _mm512_loadu_ps(lxs.as_ptr().add(gp));
                let ly = _mm512_loadu_ps(lys.as_ptr().add(gp));
                let m = _mm512_loadu_ps(ms.as_ptr().add(gp));
                let (hx, hy) = (_mm512_sub_ps(one, lx), _mm512_sub_ps(one, ly));
                let wb = [
                    _mm512_mul_ps(hy, hx),
                    _mm512_mul_ps(hy, lx),
                    _mm512_mul_ps(ly, hx),
                    _mm512_mul_ps(ly, lx),
                ];
                let gm = _mm512_add_ps(
                    _mm512_add_ps(
                        _mm512_add_ps(_mm512_mul_ps(wb[0], d[0]), _mm512_mul_ps(wb[1], d[1])),
                        _mm512_mul_ps(wb[2], d[2]),
                    ),
                    _mm512_mul_ps(wb[3], d[3]),
                );
                let ddx = _mm512_add_ps(
                    _mm512_mul_ps(hy, _mm512_sub_ps(d[1], d[0])),
                    _mm512_mul_ps(ly, _mm512_sub_ps(d[3], d[2])),
                );
                let ddy = _mm512_add_ps(
                    _mm512_mul_ps(hx, _mm512_sub_ps(d[2], d[0])),
                    _mm512_mul_ps(lx, _mm512_sub_ps(d[3], d[1])),
                );
                let msig = _mm512_mul_ps(m, sigma);
                let valid = lane[0];
                let gx = _mm512_maskz_mul_ps(valid, msig, ddx);
                let gy = _mm512_maskz_mul_ps(valid, msig, ddy);
                let gp2 = gdxy.as_mut_ptr().add(2 * gp);
                _mm512_storeu_ps(gp2, _mm512_permutex2var_ps(gx, zip_lo, gy));
                _mm512_storeu_ps(gp2.add(16), _mm512_permutex2var_ps(gx, zip_hi, gy));
                _mm512_storeu_ps(gmsk.as_mut_ptr().add(gp), _mm512_maskz_mov_ps(valid, gm));
            }
        }
        let goff_pix = &mut goff[k * lay.off_pixel..(k + 1) * lay.off_pixel];
        let mut gmask_pix = gmask
            .as_deref_mut()
            .map(|m| &mut m[k * lay.mask_pixel..(k + 1) * lay.mask_pixel]);
        for grp in 0..g.group {
            let (oi, mi) = (lay.off_at(grp), lay.mask_at(grp));
            let (src_o, src_m) = (
                &gdxy[grp * 2 * np..(grp + 1) * 2 * np],
                &gmsk[grp * np..(grp + 1) * np],
            );
            // SAFETY: AVX-512 F is enabled here; the destinations are the group's runs of the
            // pixel's rows, as long as the sources (the layout's columns lie in the rows).
            unsafe {
                copy_lanes(src_o, &mut goff_pix[oi..oi + 2 * np]);
                match gmask_pix.as_deref_mut() {
                    Some(gm) => copy_lanes(src_m, &mut gm[mi..mi + np]),
                    None => copy_lanes(src_m, &mut goff_pix[mi..mi + np]),
                }
            }
        }
    }
}
