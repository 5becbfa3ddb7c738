//! The one CPU GEMM of the crate: `y = x @ w^T + b` (optionally GELU) with the weight packed once,
//! when the layer is built, into panels of `NR` output channels for the micro-kernel of one
//! instruction set.
//!
//! | kernel | rows x columns per call | registers | depth per pass |
//! |---|---|---|---|
//! | AMX (bf16 weights, [`super::amx`]) | 32 x 32 | 4 f32 C tiles, `TDPBF16PS` | whole depth |
//! | AVX512_BF16 (bf16 weights) | 8 x 32 | 16 zmm accumulators, `VDPBF16PS` | 256 (128 pairs) |
//! | AVX-512 | 12 x 32 | 24 zmm accumulators | 128 |
//! | AVX2 + FMA | 6 x 16 | 12 ymm accumulators | 192 |
//! | NEON (aarch64) | 6 x 16 | 24 q accumulators, `FMLA` by element | 192 |
//! | portable | 4 x 16 | plain arrays, auto-vectorised | 192 |
//!
//! For each `k` the kernel broadcasts one value from each row of `x` (read in place, row-major:
//! no packing of the activations) against the vectors of the packed weight panel. The panels are
//! contiguous, so a `kc x NR` slice stays in L1 while all row groups of a task use it.
//!
//! bf16 weights (packed only when the caller asks, i.e. for bf16 models on a CPU with
//! AVX512_BF16 or AMX; AMX has its own tile layout, see [`super::amx`]) are stored as bf16 pairs along `k`, and the activations are read as bf16 pairs
//! (bf16 inputs in place; f32 inputs and odd depths converted per row block), products
//! accumulated in f32.
//!
//! Work is split into tasks of (row block x panel range), each writing its own part of `y`, with
//! the bias folded into the accumulators' start value and the GELU applied to each task's block
//! while it is still in cache. Packing once removes the per-call packing that dominates
//! small-batch calls of general GEMM libraries.

use super::simd::fmadd;
use super::Isa;
use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The micro-kernel family a weight is packed for (decides the panel width).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// AMX-BF16: 32 x 32 blocks of tiles ([`super::amx`]).
    Amx,
    /// AVX512_BF16: 8 x 32 on bf16 pairs.
    Avx512Bf16,
    /// AVX-512 F: 12 x 32.
    Avx512,
    /// AVX2 + FMA: 6 x 16.
    Avx2,
    /// NEON (aarch64): 6 x 16.
    #[cfg(target_arch = "aarch64")]
    Neon,
    /// Plain Rust without FMA (the portable path): 4 x 16.
    Portable,
}

impl Family {
    /// The one place that decides which kernel a weight runs on: the policy's instruction set
    /// (capped, never above what the CPU supports) and whether the weight is bf16.
    fn of(isa: Isa, bf16_weights: bool) -> Self {
        match isa {
            Isa::Amx if bf16_weights && isa.is_supported() => Family::Amx,
            Isa::Avx512Bf16 | Isa::Amx if bf16_weights && Isa::Avx512Bf16.is_supported() => {
                Family::Avx512Bf16
            }
            Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx if Isa::Avx512.is_supported() => {
                Family::Avx512
            }
            Isa::Avx2 | Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx if Isa::Avx2.is_supported() => {
                Family::Avx2
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon if isa.is_supported() => Family::Neon,
            _ => Family::Portable,
        }
    }

    /// Output channels per packed panel.
    const fn nr(self) -> usize {
        match self {
            Family::Amx => super::amx::NR,
            Family::Avx512 | Family::Avx512Bf16 => 32,
            _ => 16,
        }
    }

    /// Rows of `x` per kernel call.
    const fn mr(self) -> usize {
        match self {
            // Two 16-row tiles.
            Family::Amx => 32,
            Family::Avx512 => 12,
            Family::Avx512Bf16 => 8,
            Family::Avx2 => 6,
            #[cfg(target_arch = "aarch64")]
            Family::Neon => 6,
            Family::Portable => 4,
        }
    }

    /// Target depth of one pass over `k` (the panel slice, `kc * nr * 4` bytes, and the row
    /// block's `x` stay in L1 together).
    const fn kc(self) -> usize {
        match self {
            Family::Avx512 => 128,
            // Unused: the AMX kernel runs the whole depth per call.
            Family::Avx512Bf16 | Family::Amx => 256,
            _ => 192,
        }
    }

    /// Largest row block of one task.
    const fn max_rows(self) -> usize {
        match self {
            Family::Amx => 64,
            Family::Avx512 => 36,
            Family::Avx512Bf16 => 32,
            Family::Avx2 => 36,
            #[cfg(target_arch = "aarch64")]
            Family::Neon => 36,
            Family::Portable => 32,
        }
    }
}

/// The largest `MR * NR` of any family (the scratch tile of partial panels).
const MAX_TILE: usize = 12 * 32;

/// The packed panels.
#[derive(Debug)]
enum Panels {
    /// `data[(p * k + kk) * NR + j] = w[NR p + j, kk]`.
    F32(Vec<f32>),
    /// bf16 bits, pairs along `k` (zero-padded to an even depth `k2 * 2`):
    /// `data[((p * k2 + kp) * NR + j) * 2 + e] = w[NR p + j, 2 kp + e]`.
    Bf16(Vec<u16>),
    /// bf16 bits in AMX B tiles (see [`super::amx::pack`]).
    Amx(Vec<u16>),
}

/// A weight `w` (n, k) (row-major, as stored by `nn.Linear`) and bias, packed for one kernel,
/// zero-padded to whole panels.
#[derive(Debug)]
pub(crate) struct PackedWeight {
    n: usize,
    k: usize,
    isa: Isa,
    family: Family,
    data: Panels,
    /// The bias zero-padded to whole panels (zeros without a bias).
    bias: Vec<f32>,
}

impl PackedWeight {
    /// Packs `w` ((n, k) row-major) and `bias` (n) for the f32 kernel of `isa`; `None` when the
    /// shapes disagree or are empty.
    pub(crate) fn new(
        isa: Isa,
        w: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        k: usize,
    ) -> Option<Self> {
        Self::pack(isa, false, w, bias, n, k)
    }

    /// Packs `w` in bf16 (the values are rounded to bf16) for the bf16 kernel of `isa` (AMX
    /// for [`Isa::Amx`], else AVX512_BF16); `None` when the policy or the CPU has neither (or
    /// the shapes disagree): the caller keeps its unpacked path.
    pub(crate) fn new_bf16(
        isa: Isa,
        w: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        k: usize,
    ) -> Option<Self> {
        let packed = Self::pack(isa, true, w, bias, n, k)?;
        matches!(packed.family, Family::Avx512Bf16 | Family::Amx).then_some(packed)
    }

    fn pack(
        isa: Isa,
        bf16_weights: bool,
        w: &[f32],
        bias: Option<&[f32]>,
        n: usize,
        k: usize,
    ) -> Option<Self> {
        if n == 0 || k == 0 || w.len() != n * k || bias.is_some_and(|b| b.len() != n) {
            return None;
        }
        let family = Family::of(isa, bf16_weights);
        let nr = family.nr();
        let panels = n.div_ceil(nr);
        let data = if family == Family::Amx {
            Panels::Amx(super::amx::pack(w, n, k))
        } else if family == Family::Avx512Bf16 {
            let k2 = k.div_ceil(2);
            let mut data = vec![0u16; panels * k2 * nr * 2];
            for (p, panel) in data.chunks_exact_mut(k2 * nr * 2).enumerate() {
                for j in 0..nr.min(n - p * nr) {
                    let row = &w[(p * nr + j) * k..(p * nr + j + 1) * k];
                    for (kk, &v) in row.iter().enumerate() {
                        panel[((kk / 2) * nr + j) * 2 + kk % 2] = bf16::from_f32(v).to_bits();
                    }
                }
            }
            Panels::Bf16(data)
        } else {
            // Panels are independent: packed in parallel (the training kernels pack their
            // weights on every call), each zeroed by its own task.
            Panels::F32(packed_panels(panels, k * nr, |p, panel| {
                for j in 0..nr.min(n - p * nr) {
                    let row = &w[(p * nr + j) * k..(p * nr + j + 1) * k];
                    for (kk, &v) in row.iter().enumerate() {
                        panel[kk * nr + j] = v;
                    }
                }
            }))
        };
        let mut padded = vec![0f32; panels * nr];
        if let Some(b) = bias {
            padded[..n].copy_from_slice(b);
        }
        Some(Self {
            n,
            k,
            isa,
            family,
            data,
            bias: padded,
        })
    }

    /// Packs `w^T` for the f32 kernel of `isa`, given `w` ((k, n) row-major: the packed weight
    /// maps `k` inputs to `n` outputs), without bias: the same panels as
    /// `PackedWeight::new(isa, &transpose(w, k, n), None, n, k)`, copied as contiguous runs of
    /// `w`'s rows (no transposed copy). `None` when the shapes disagree or are empty.
    pub(crate) fn new_transposed(isa: Isa, w: &[f32], n: usize, k: usize) -> Option<Self> {
        if n == 0 || k == 0 || w.len() != n * k {
            return None;
        }
        let family = Family::of(isa, false);
        if matches!(family, Family::Amx | Family::Avx512Bf16) {
            // Not reachable for f32 weights (`Family::of(_, false)`); kept total.
            return Self::pack(isa, false, &transpose(w, k, n), None, n, k);
        }
        let nr = family.nr();
        let panels = n.div_ceil(nr);
        let data = packed_panels(panels, k * nr, |p, panel| {
            let (c0, width) = (p * nr, nr.min(n - p * nr));
            for (kk, dst) in panel.chunks_exact_mut(nr).enumerate() {
                dst[..width].copy_from_slice(&w[kk * n + c0..kk * n + c0 + width]);
            }
        });
        Some(Self {
            n,
            k,
            isa,
            family,
            data: Panels::F32(data),
            bias: vec![0f32; panels * nr],
        })
    }

    /// Output features.
    pub(crate) fn n(&self) -> usize {
        self.n
    }

    /// Input features.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// The instruction set the weight was packed for.
    pub(crate) fn isa(&self) -> Isa {
        self.isa
    }

    /// Whether the weight is stored in bf16.
    pub(crate) fn is_bf16(&self) -> bool {
        matches!(self.data, Panels::Bf16(_) | Panels::Amx(_))
    }

    /// The weight ((n, k) row-major) and the bias (n; zeros when there was none): the inverse
    /// of [`PackedWeight::new`] (of [`PackedWeight::new_bf16`] up to its rounding).
    pub(crate) fn unpack(&self) -> (Vec<f32>, Vec<f32>) {
        let (n, k, nr) = (self.n, self.k, self.family.nr());
        let mut w = vec![0f32; n * k];
        match &self.data {
            Panels::Amx(data) => w = super::amx::unpack(data, n, k),
            Panels::F32(data) => {
                for (p, panel) in data.chunks_exact(k * nr).enumerate() {
                    for j in 0..nr.min(n - p * nr) {
                        let row = &mut w[(p * nr + j) * k..(p * nr + j + 1) * k];
                        for (kk, v) in row.iter_mut().enumerate() {
                            *v = panel[kk * nr + j];
                        }
                    }
                }
            }
            Panels::Bf16(data) => {
                let k2 = k.div_ceil(2);
                for (p, panel) in data.chunks_exact(k2 * nr * 2).enumerate() {
                    for j in 0..nr.min(n - p * nr) {
                        let row = &mut w[(p * nr + j) * k..(p * nr + j + 1) * k];
                        for (kk, v) in row.iter_mut().enumerate() {
                            *v = bf16::from_bits(panel[((kk / 2) * nr + j) * 2 + kk % 2]).to_f32();
                        }
                    }
                }
            }
        }
        (w, self.bias[..n].to_vec())
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(self.family.nr())
    }
}

/// `panels` f32 panels of `len` values each, filled in parallel: every task zeroes its panel
/// (the padding columns stay zero) and then `fill(p, panel)` writes panel p's values. (Zeroing
/// the whole buffer first was a serial pass on the calling thread, per training step and
/// weight.)
fn packed_panels(panels: usize, len: usize, fill: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let total = panels * len;
    let mut data = Vec::<f32>::with_capacity(total);
    if len > 0 {
        data.spare_capacity_mut()[..total]
            .par_chunks_exact_mut(len)
            .enumerate()
            .for_each(|(p, panel)| fill(p, super::filled(panel, 0.0)));
    }
    // SAFETY: the chunks cover the first `total` elements (or `total` is 0) and each task
    // initialised its chunk; the capacity is at least `total`.
    unsafe { data.set_len(total) };
    data
}

/// A raw output pointer shared by tasks that write disjoint blocks.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: only used for disjoint writes from parallel tasks (each documents its block).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the whole `Send + Sync` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// How `m` rows and `panels` panels are cut into tasks for `threads` threads.
#[derive(Debug, Clone, Copy)]
struct Split {
    rows: usize,
    panels: usize,
}

/// Weights above this many bytes get tall row blocks ([`split`]).
const BIG_WEIGHT_BYTES: usize = 512 * 1024;
/// The tallest row block [`split`] cuts for a big weight.
const BIG_WEIGHT_ROWS: usize = 120;

fn split(f: Family, m: usize, panels: usize, k: usize, threads: usize) -> Split {
    let (mr, max_rows) = (f.mr(), f.max_rows());
    let tiny = m * panels * f.nr() * k < 32 * 1024;
    if threads <= 1 || tiny {
        return Split {
            rows: m.clamp(1, max_rows),
            panels,
        };
    }
    // Rows: blocks of whole kernel groups, at most max_rows, about 4 tasks per thread.
    let want = 4 * threads;
    let mut rows = m
        .div_ceil(want)
        .div_ceil(mr)
        .saturating_mul(mr)
        .clamp(mr, max_rows);
    // A weight larger than a core's L2 share is read again by every row block: cut fewer,
    // taller row blocks (at most one per thread, up to BIG_WEIGHT_ROWS rows) and split the
    // panels instead.
    if panels * f.nr() * k * 4 > BIG_WEIGHT_BYTES {
        let tall = if m <= BIG_WEIGHT_ROWS / 2 {
            m
        } else {
            m.div_ceil(threads).min(BIG_WEIGHT_ROWS)
        };
        rows = rows.max(tall.div_ceil(mr).saturating_mul(mr));
    }
    let row_blocks = m.div_ceil(rows);
    // Few row blocks (small batches, late stages): cut the panels too.
    let panel_blocks = want.div_ceil(row_blocks).min(panels).max(1);
    Split {
        rows,
        panels: panels.div_ceil(panel_blocks),
    }
}

/// `y (m, n) = x (m, k) @ w^T + bias`, then GELU when `gelu`, into `y` (all `m * n` values are
/// written), multi-threaded with rayon.
pub(crate) fn linear_packed(
    x: Rows,
    m: usize,
    w: &PackedWeight,
    gelu: bool,
    y: &mut [MaybeUninit<f32>],
) {
    let (n, k) = (w.n, w.k);
    assert!(
        x.len() >= m * k && y.len() >= m * n,
        "linear_packed: operand sizes"
    );
    if m == 0 {
        return;
    }
    let s = split(w.family, m, w.panels(), k, rayon::current_num_threads());
    let row_blocks = m.div_ceil(s.rows);
    let panel_blocks = w.panels().div_ceil(s.panels);
    // AVX512_BF16 weights on f32 rows: each task converts its rows to bf16 (`block`, with
    // `to_bf16_bits`); when the panels are split across tasks, convert every row once up front
    // with the same function instead of once per panel block. (AMX converts its A tiles with
    // `VCVTNE2PS2BF16`, which flushes denormals: left as it is, so its values do not depend on
    // the split.)
    let converted: Vec<bf16>;
    let x = match x {
        Rows::F32(xf) if matches!(w.data, Panels::Bf16(_)) && panel_blocks > 1 => {
            converted = to_bf16_rows(w.isa, &xf[..m * k]);
            Rows::Bf16(&converted)
        }
        x => x,
    };
    let out = OutPtr(y.as_mut_ptr().cast::<f32>());
    let task = |t: usize| {
        let (rb, pb) = (t / panel_blocks, t % panel_blocks);
        let r0 = rb * s.rows;
        let r1 = (r0 + s.rows).min(m);
        let p0 = pb * s.panels;
        let p1 = (p0 + s.panels).min(w.panels());
        // SAFETY: task t writes rows r0..r1 x columns of panels p0..p1 only, disjoint from every
        // other task; x holds m * k values and y m * n (asserted above).
        unsafe { block(x, r0, r1, w, p0, p1, out.get(), n, gelu) };
    };
    let tasks = row_blocks * panel_blocks;
    if tasks == 1 {
        task(0);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// `x` rounded to bf16 (as `half` rounds), converted in parallel.
pub(crate) fn to_bf16_rows(isa: Isa, x: &[f32]) -> Vec<bf16> {
    const RUN: usize = 16 * 1024;
    let mut out = vec![bf16::ZERO; x.len()];
    if x.len() <= RUN {
        super::simd::to_bf16_bits(isa, x, out.reinterpret_cast_mut());
    } else {
        out.par_chunks_mut(RUN)
            .zip(x.par_chunks(RUN))
            .for_each(|(d, s)| super::simd::to_bf16_bits(isa, s, d.reinterpret_cast_mut()));
    }
    out
}

/// Rows per block of the fused MLP: the block's hidden activations (rows x hidden) stay within
/// about 256 KiB, between one and sixteen kernel row groups.
pub(crate) fn mlp_block_rows(fc1: &PackedWeight) -> usize {
    let mr = fc1.family.mr();
    (65_536 / fc1.n.max(1)).clamp(mr, 16 * mr) / mr * mr
}

/// `fc2(gelu(fc1(x)))` with both weights packed: by row blocks, each block's hidden activations
/// staying in a per-thread buffer (never a full (m, hidden) tensor). Used for large `m`; small
/// `m` is better served by two [`linear_packed`] calls that split the panels too.
pub(crate) fn mlp_packed(
    x: Rows,
    m: usize,
    fc1: &PackedWeight,
    fc2: &PackedWeight,
    y: &mut [MaybeUninit<f32>],
) {
    mlp_packed_impl(x, m, fc1, fc2, None, y)
}

/// [`mlp_packed`] that also keeps the hidden pre-activations: `z` becomes `fc1(x)` (m, hidden),
/// GELU applied per row block from it (for a training op's backward, which needs `z`).
pub(crate) fn mlp_packed_keep(
    x: Rows,
    m: usize,
    fc1: &PackedWeight,
    fc2: &PackedWeight,
    z: &mut Vec<f32>,
    y: &mut [MaybeUninit<f32>],
) {
    mlp_packed_impl(x, m, fc1, fc2, Some(z), y)
}

fn mlp_packed_impl(
    x: Rows,
    m: usize,
    fc1: &PackedWeight,
    fc2: &PackedWeight,
    keep: Option<&mut Vec<f32>>,
    y: &mut [MaybeUninit<f32>],
) {
    let (hid, cout) = (fc1.n, fc2.n);
    assert!(
        fc2.k == hid && x.len() >= m * fc1.k && y.len() >= m * cout,
        "mlp_packed: operand sizes"
    );
    let mut keep = keep;
    if let Some(z) = keep.as_mut() {
        z.clear();
        z.reserve(m * hid);
    }
    if m == 0 {
        return;
    }
    let zp = keep.as_mut().map(|z| OutPtr(z.as_mut_ptr()));
    let threads = rayon::current_num_threads().max(1);
    let mr = fc1.family.mr();
    let rows = mlp_block_rows(fc1).min(m.div_ceil(2 * threads).div_ceil(mr) * mr);
    let out = OutPtr(y.as_mut_ptr().cast::<f32>());
    let blocks = m.div_ceil(rows);
    (0..blocks)
        .into_par_iter()
        .for_each_init(Vec::<f32>::new, |h, b| {
            let r0 = b * rows;
            let r1 = (r0 + rows).min(m);
            let mr = r1 - r0;
            h.resize(mr * hid, 0.0);
            // SAFETY: h is (mr, hid); the output rows r0..r1 (and, when keeping, z's rows
            // r0..r1 inside its reserved m * hid values) belong to this block only, and y holds
            // m * cout values (asserted above).
            unsafe {
                let xb = x.slice(r0 * fc1.k..r1 * fc1.k);
                match &zp {
                    None => block(xb, 0, mr, fc1, 0, fc1.panels(), h.as_mut_ptr(), hid, true),
                    Some(zp) => {
                        let zb = zp.get().add(r0 * hid);
                        block(xb, 0, mr, fc1, 0, fc1.panels(), zb, hid, false);
                        // `block` wrote all mr * hid values of zb.
                        let zb = std::slice::from_raw_parts(zb, mr * hid);
                        super::gelu::gelu_into(fc1.isa, zb, super::as_out(h));
                    }
                }
                block(
                    Rows::F32(h),
                    0,
                    mr,
                    fc2,
                    0,
                    fc2.panels(),
                    out.get().add(r0 * cout),
                    cout,
                    false,
                );
            }
        });
    if let Some(z) = keep {
        // SAFETY: the blocks cover rows 0..m, each writing its rows' hid values of z.
        unsafe { z.set_len(m * hid) };
    }
}

/// A row normalisation: whole rows of `src` into `dst` (every value written).
pub(crate) type RowNorm<'a> = dyn Fn(&[f32], &mut [MaybeUninit<f32>]) + Sync + 'a;

/// The tail of a pre-norm block after its deformable core, for [`block_tail_packed`]:
/// `x2 = x + gamma1 * out_proj(y)`, then `x2 + gamma2 * fc2(gelu(fc1(norm(x2))))`.
pub(crate) struct BlockTail<'a> {
    /// The DCN output projection (c -> c).
    pub(crate) out_proj: &'a PackedWeight,
    /// Layer scale of the DCN branch (c), if any.
    pub(crate) gamma1: Option<&'a [f32]>,
    /// The MLP's LayerNorm: normalises whole rows of `src` (c values each) into `dst`.
    pub(crate) norm: &'a RowNorm<'a>,
    /// MLP fc1 (c -> hidden, GELU after it) and fc2 (hidden -> c).
    pub(crate) fc1: &'a PackedWeight,
    pub(crate) fc2: &'a PackedWeight,
    /// Layer scale of the MLP branch (c), if any.
    pub(crate) gamma2: Option<&'a [f32]>,
}

/// `x + gamma * branch` per row of `c` values, in place into `x` (the residual update of a
/// block; the same arithmetic as the unfused residual op).
fn residual_rows(x: &mut [f32], branch: &[f32], gamma: Option<&[f32]>) {
    match gamma {
        None => {
            for (x, &b) in x.iter_mut().zip(branch) {
                *x += b;
            }
        }
        Some(g) => {
            for (x, b) in x.chunks_mut(g.len()).zip(branch.chunks(g.len())) {
                for ((x, &b), &g) in x.iter_mut().zip(b).zip(g) {
                    *x += g * b;
                }
            }
        }
    }
}

/// Whether [`block_tail_packed`] has enough rows to give every thread two row blocks of at least
/// two kernel row groups (otherwise separate packed ops, which also split the columns, use the
/// threads better).
pub(crate) fn block_tail_fits(m: usize, fc1: &PackedWeight) -> bool {
    m >= 2 * rayon::current_num_threads().max(1) * 2 * fc1.family.mr()
}

/// Rows per block of [`block_tail_packed`]: at most [`mlp_block_rows`], in a number of blocks
/// that is a multiple of the thread count (at least two per thread); whole kernel row groups
/// when there are many blocks, equal blocks when there are few.
fn block_tail_rows(m: usize, fc1: &PackedWeight) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let blocks = m
        .div_ceil(mlp_block_rows(fc1))
        .max(2 * threads)
        .next_multiple_of(threads);
    let rows = m.div_ceil(blocks).max(1);
    if blocks >= 4 * threads {
        rows.next_multiple_of(fc1.family.mr())
    } else {
        rows
    }
}

/// The inference tail of a pre-norm block ([`BlockTail`]) on `m` rows of `c` = `out_proj.n`
/// features (`x` the block input, `y` the deformable core's output), fused by row blocks: each
/// block's projections, norm and hidden activations stay in per-thread buffers. Every value is
/// computed by the same kernels in the same order as the unfused ops (bitwise equal).
pub(crate) fn block_tail_packed(
    x: &[f32],
    y: &[f32],
    m: usize,
    t: &BlockTail,
    out: &mut [MaybeUninit<f32>],
) {
    let (c, hid) = (t.out_proj.n, t.fc1.n);
    assert!(
        t.out_proj.k == c
            && t.fc1.k == c
            && t.fc2.k == hid
            && t.fc2.n == c
            && x.len() >= m * c
            && y.len() >= m * c
            && out.len() >= m * c
            && t.gamma1.is_none_or(|g| g.len() == c)
            && t.gamma2.is_none_or(|g| g.len() == c),
        "block_tail_packed: operand sizes"
    );
    if m == 0 {
        return;
    }
    let rows = block_tail_rows(m, t.fc1);
    let dst = OutPtr(out.as_mut_ptr().cast::<f32>());
    (0..m.div_ceil(rows)).into_par_iter().for_each_init(
        || {
            (
                Vec::<f32>::new(),
                Vec::<MaybeUninit<f32>>::new(),
                Vec::<f32>::new(),
            )
        },
        |(branch, normed, hidden), b| {
            let r0 = b * rows;
            let r1 = (r0 + rows).min(m);
            let n = r1 - r0;
            branch.resize(n * c, 0.0);
            normed.resize(n * c, MaybeUninit::uninit());
            hidden.resize(n * hid, 0.0);
            // SAFETY: rows r0..r1 of `out` belong to this block only (disjoint blocks) and `out`
            // holds m * c values (asserted above); this block writes every one of its values
            // (the copy of x below) before reading any.
            let x2 = unsafe { std::slice::from_raw_parts_mut(dst.get().add(r0 * c), n * c) };
            x2.copy_from_slice(&x[r0 * c..r1 * c]);
            // SAFETY: `branch` is (n, c), `hidden` (n, hid); the weights' shapes were asserted
            // above; y holds rows 0..m of c values.
            unsafe {
                let yb = Rows::F32(&y[r0 * c..r1 * c]);
                block(
                    yb,
                    0,
                    n,
                    t.out_proj,
                    0,
                    t.out_proj.panels(),
                    branch.as_mut_ptr(),
                    c,
                    false,
                );
            }
            residual_rows(x2, branch, t.gamma1);
            (t.norm)(x2, normed);
            // SAFETY: `norm` wrote all n * c values of `normed` (its contract).
            let normed: &[f32] =
                unsafe { std::slice::from_raw_parts(normed.as_ptr().cast::<f32>(), n * c) };
            // SAFETY: as above: `hidden` is (n, hid) and `branch` (n, c).
            unsafe {
                let fc1 = t.fc1;
                block(
                    Rows::F32(normed),
                    0,
                    n,
                    fc1,
                    0,
                    fc1.panels(),
                    hidden.as_mut_ptr(),
                    hid,
                    true,
                );
                let fc2 = t.fc2;
                block(
                    Rows::F32(hidden),
                    0,
                    n,
                    fc2,
                    0,
                    fc2.panels(),
                    branch.as_mut_ptr(),
                    c,
                    false,
                );
            }
            residual_rows(x2, branch, t.gamma2);
        },
    );
}

/// The depth blocks of `k`: about `kc` deep, equal sizes.
fn k_blocks(k: usize, kc: usize) -> impl Iterator<Item = (usize, usize)> {
    let nb = k.div_ceil(kc).max(1);
    let kc = k.div_ceil(nb);
    (0..nb).map(move |b| (b * kc, kc.min(k - b * kc)))
}

/// The rows of `x` (row-major, `k` values each): f32, or bf16 (for bf16 weights; an f32
/// weight given bf16 rows converts them per block).
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bf16 values.
    Bf16(&'a [bf16]),
}

impl Rows<'_> {
    fn len(&self) -> usize {
        match self {
            Rows::F32(x) => x.len(),
            Rows::Bf16(x) => x.len(),
        }
    }

    fn slice(&self, range: std::ops::Range<usize>) -> Self {
        match self {
            Rows::F32(x) => Rows::F32(&x[range]),
            Rows::Bf16(x) => Rows::Bf16(&x[range]),
        }
    }
}

/// One task: rows `r0..r1` of `y` (row stride `ldy`) for panels `p0..p1`, full depth, then GELU.
///
/// # Safety
/// `x` holds rows `0..r1` of `w.k` values; `y` is valid for writes of rows `r0..r1` x columns
/// `NR p0 .. min(NR p1, n)` with row stride `ldy`; no other thread touches that block.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    x: Rows,
    r0: usize,
    r1: usize,
    w: &PackedWeight,
    p0: usize,
    p1: usize,
    y: *mut f32,
    ldy: usize,
    gelu: bool,
) {
    let k = w.k;
    let y0 = y.add(r0 * ldy);
    match (&w.data, x) {
        (Panels::Amx(data), x) => {
            // AMX panels are only packed when `Isa::Amx` is supported (`Family::of`).
            #[cfg(target_arch = "x86_64")]
            super::amx::block(x, r0, r1, k, w.n, data, &w.bias, p0, p1, y0, ldy);
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (data, x);
                unreachable!("AMX panels on a CPU without AMX");
            }
        }
        (Panels::F32(data), Rows::F32(x)) => {
            block_f32(&x[r0 * k..r1 * k], r1 - r0, w, data, p0, p1, y0, ldy);
        }
        (Panels::F32(data), Rows::Bf16(x)) => {
            let xs: Vec<f32> = x[r0 * k..r1 * k].iter().map(|v| v.to_f32()).collect();
            block_f32(&xs, r1 - r0, w, data, p0, p1, y0, ldy);
        }
        // Even depth: bf16 rows are already pairs along k.
        (Panels::Bf16(data), Rows::Bf16(x)) if k.is_multiple_of(2) => {
            let rows = &x[r0 * k..r1 * k];
            // SAFETY: bf16 is a transparent u16 (same size and alignment).
            let xs = std::slice::from_raw_parts(rows.as_ptr().cast::<u16>(), rows.len());
            block_bf16(xs, k, r1 - r0, w, data, p0, p1, y0, ldy);
        }
        (Panels::Bf16(data), x) => BF16_ROWS.with_borrow_mut(|buf| {
            // The rows as bf16 pairs along k, in this thread's buffer (it grows to the largest
            // row block this thread converts: at most `BIG_WEIGHT_ROWS` rows in `linear_packed`,
            // `16 * MR` in the fused MLP and block tail); every value is written (the conversion,
            // and the zero padding of an odd depth).
            let k2 = k.div_ceil(2);
            let len = (r1 - r0) * k2 * 2;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            for (r, dst) in buf[..len].chunks_exact_mut(k2 * 2).enumerate() {
                let row = (r0 + r) * k..(r0 + r + 1) * k;
                let (dst, pad) = dst.split_at_mut(k);
                match x {
                    Rows::F32(x) => super::simd::to_bf16_bits(w.isa, &x[row], dst),
                    Rows::Bf16(x) => {
                        for (d, s) in dst.iter_mut().zip(&x[row]) {
                            *d = s.to_bits();
                        }
                    }
                }
                pad.fill(0);
            }
            block_bf16(&buf[..len], k2 * 2, r1 - r0, w, data, p0, p1, y0, ldy);
        }),
    }
    gelu_block(gelu, w, r0, r1, p0, p1, y, ldy);
}

thread_local! {
    /// The bf16 copy of the f32 rows a task of a bf16 GEMM reads ([`block`]), kept per thread so
    /// that each task does not allocate and zero a new one.
    static BF16_ROWS: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// GELU in place over the block [`block`] wrote, when `gelu`.
///
/// # Safety
/// As for [`block`]: `y` is valid for rows `r0..r1` x the columns of panels `p0..p1`.
#[allow(clippy::too_many_arguments)]
unsafe fn gelu_block(
    gelu: bool,
    w: &PackedWeight,
    r0: usize,
    r1: usize,
    p0: usize,
    p1: usize,
    y: *mut f32,
    ldy: usize,
) {
    if gelu {
        let nr = w.family.nr();
        let c0 = p0 * nr;
        let c1 = (p1 * nr).min(w.n);
        for r in r0..r1 {
            let row = std::slice::from_raw_parts_mut(y.add(r * ldy + c0), c1 - c0);
            super::gelu::gelu_inplace(w.isa, row);
        }
    }
}

/// [`block`] on f32 panels: `x` holds `rows` rows of `w.k` values; `y` points at the first row.
///
/// # Safety
/// As for [`block`].
#[allow(clippy::too_many_arguments)]
unsafe fn block_f32(
    x: &[f32],
    rows: usize,
    w: &PackedWeight,
    data: &[f32],
    p0: usize,
    p1: usize,
    y: *mut f32,
    ldy: usize,
) {
    let (k, f) = (w.k, w.family);
    let (nr, mr) = (f.nr(), f.mr());
    // Rows a multiple of 4 KiB apart (k = 1024, 2048, ...: the hidden layer of InternImage's
    // later MLPs) all map to the same L1 set, so a kernel group of more rows than the L1 has
    // ways evicts its own rows: each depth pass then copies the block's rows into a contiguous
    // per-thread buffer first.
    let contiguous = k.is_multiple_of(ALIASING_STRIDE) && mr.min(rows) > L1_WAYS;
    A_ROWS.with_borrow_mut(|buf| {
        for (k0, kc) in k_blocks(k, f.kc()) {
            let first = k0 == 0;
            let (a, lda) = if contiguous {
                if buf.len() < rows * kc {
                    buf.resize(rows * kc, 0.0);
                }
                for (r, dst) in buf[..rows * kc].chunks_exact_mut(kc).enumerate() {
                    dst.copy_from_slice(&x[r * k + k0..r * k + k0 + kc]);
                }
                (buf.as_ptr(), kc)
            } else {
                (x.as_ptr().add(k0), k)
            };
            for (p, r, rs, cols) in tiles(f, w.n, (p0, p1), rows) {
                let op = Operands {
                    a: a.add(r * lda),
                    lda,
                    panel: data.as_ptr().add((p * k + k0) * nr),
                    kc,
                    bias: w.bias.as_ptr().add(p * nr),
                    first,
                };
                tile(f, op, y.add(r * ldy + p * nr), ldy, rs, cols);
            }
        }
    })
}

/// The kernel tiles of one depth pass over a task's block, panels outer (a panel's depth slice
/// stays in L1 while the row groups pass over it): `(panel, first row, rows, columns)` for
/// panels `p0..p1` of a weight with `n` outputs and `rows` rows in groups of the kernel's `MR`.
fn tiles(
    f: Family,
    n: usize,
    (p0, p1): (usize, usize),
    rows: usize,
) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let (nr, mr) = (f.nr(), f.mr());
    (p0..p1).flat_map(move |p| {
        (0..rows)
            .step_by(mr)
            .map(move |r| (p, r, mr.min(rows - r), nr.min(n - p * nr)))
    })
}

/// Row strides (in f32 values) at multiples of which [`block_f32`] copies a block's rows into a
/// contiguous buffer: 4 KiB, the span of the L1 sets on x86 (64 sets of 64 bytes). Measured on
/// the Zen 4 (`ops::Linear`, 2 threads): 196 x 1024 -> 256 at 127-149 GFLOP/s against 172-184
/// for a depth of 1008 or 1040; 49 x 2048 -> 512 at 128-139 against 188 for 2064; depth 512 (2
/// KiB) no different from 528. With the copy, paired in one process: 1.08x, 1.30x and 1.11x
/// (25088 x 1024 -> 256) the GFLOP/s, bit for bit the same; the AVX2 kernel's 6 rows fit the
/// ways and were 4-6% slower with it.
const ALIASING_STRIDE: usize = 1024;

/// Ways of the L1 data cache (8 on AMD's Zen cores, measured here on Zen 4; Intel's 48 KiB L1
/// has 12, where the copy is merely unneeded): a kernel group of at most this many rows keeps
/// them all in one set.
const L1_WAYS: usize = 8;

thread_local! {
    /// The contiguous copy of the rows a task of an f32 GEMM reads in one depth pass
    /// ([`block_f32`], for row strides of [`ALIASING_STRIDE`]).
    static A_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// [`block`] on bf16 panels: `x` holds `rows` rows of `lda` (even) bf16 values, pairs along
/// `k`; `y` points at the first row.
///
/// # Safety
/// As for [`block`]; `lda >= 2 * ceil(w.k / 2)`.
#[allow(clippy::too_many_arguments)]
unsafe fn block_bf16(
    x: &[u16],
    lda: usize,
    rows: usize,
    w: &PackedWeight,
    data: &[u16],
    p0: usize,
    p1: usize,
    y: *mut f32,
    ldy: usize,
) {
    let f = w.family;
    let nr = f.nr();
    let k2 = w.k.div_ceil(2);
    for (kp0, kcp) in k_blocks(k2, f.kc() / 2) {
        let first = kp0 == 0;
        for (p, r, rs, cols) in tiles(f, w.n, (p0, p1), rows) {
            let op = Operands {
                a: x.as_ptr().add(r * lda + 2 * kp0),
                lda,
                panel: data.as_ptr().add((p * k2 + kp0) * nr * 2),
                kc: kcp,
                bias: w.bias.as_ptr().add(p * nr),
                first,
            };
            tile_bf16(op, y.add(r * ldy + p * nr), ldy, rs, cols);
        }
    }
}

/// The inputs of one kernel call: `kc` values (bf16: pairs) from each row of `a` (row stride
/// `lda` elements), the matching `kc x NR` slice of a packed panel, the panel's bias, and
/// whether this is the first depth block (start from the bias) or a later one (accumulate onto
/// the output).
#[derive(Clone, Copy)]
struct Operands<T> {
    a: *const T,
    lda: usize,
    panel: *const T,
    kc: usize,
    bias: *const f32,
    first: bool,
}

/// One `rows x cols` tile (rows <= MR, cols <= NR) at `c` (row stride `ldc`): full panels are
/// written in place, partial ones through a scratch tile.
///
/// # Safety
/// As for [`block`], for this tile.
#[inline]
unsafe fn tile(f: Family, op: Operands<f32>, c: *mut f32, ldc: usize, rows: usize, cols: usize) {
    let nr = f.nr();
    if cols == nr {
        kernel(f, op, c, ldc, rows);
        return;
    }
    let mut scratch = [0f32; MAX_TILE];
    if !op.first {
        for r in 0..rows {
            std::ptr::copy_nonoverlapping(c.add(r * ldc), scratch.as_mut_ptr().add(r * nr), cols);
        }
    }
    kernel(f, op, scratch.as_mut_ptr(), nr, rows);
    for r in 0..rows {
        std::ptr::copy_nonoverlapping(scratch.as_ptr().add(r * nr), c.add(r * ldc), cols);
    }
}

/// [`tile`] for bf16 panels (the AVX512_BF16 kernel).
///
/// # Safety
/// As for [`block_bf16`], for this tile; the CPU supports AVX512_BF16 (bf16 panels are only
/// packed then).
#[inline]
unsafe fn tile_bf16(op: Operands<u16>, c: *mut f32, ldc: usize, rows: usize, cols: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! by_rows {
            ($c:expr, $ldc:expr) => {
                match rows {
                    8 => avx512bf16::<8>(op, $c, $ldc),
                    7 => avx512bf16::<7>(op, $c, $ldc),
                    6 => avx512bf16::<6>(op, $c, $ldc),
                    5 => avx512bf16::<5>(op, $c, $ldc),
                    4 => avx512bf16::<4>(op, $c, $ldc),
                    3 => avx512bf16::<3>(op, $c, $ldc),
                    2 => avx512bf16::<2>(op, $c, $ldc),
                    _ => avx512bf16::<1>(op, $c, $ldc),
                }
            };
        }
        const NR: usize = 32;
        if cols == NR {
            by_rows!(c, ldc);
            return;
        }
        let mut scratch = [0f32; MAX_TILE];
        if !op.first {
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(
                    c.add(r * ldc),
                    scratch.as_mut_ptr().add(r * NR),
                    cols,
                );
            }
        }
        by_rows!(scratch.as_mut_ptr(), NR);
        for r in 0..rows {
            std::ptr::copy_nonoverlapping(scratch.as_ptr().add(r * NR), c.add(r * ldc), cols);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // bf16 panels are only packed on x86-64 CPUs with AVX512_BF16.
        let _ = (op, c, ldc, rows, cols);
    }
}

/// Calls the micro-kernel of `f` for `rows` (1..=MR) rows.
///
/// # Safety
/// As for [`block`], for this `rows x NR` tile; `f` is a family the CPU supports (guaranteed by
/// [`Family::of`], which checks the CPU).
#[inline]
unsafe fn kernel(f: Family, op: Operands<f32>, c: *mut f32, ldc: usize, rows: usize) {
    macro_rules! by_rows {
        ($k:ident, $($r:literal)+) => {
            match rows {
                $($r => $k::<$r>(op, c, ldc),)+
                _ => unreachable!("kernel rows out of range"),
            }
        };
    }
    match f {
        #[cfg(target_arch = "x86_64")]
        Family::Avx512 | Family::Avx512Bf16 => by_rows!(avx512, 12 11 10 9 8 7 6 5 4 3 2 1),
        #[cfg(target_arch = "x86_64")]
        Family::Avx2 => by_rows!(avx2, 6 5 4 3 2 1),
        #[cfg(target_arch = "aarch64")]
        Family::Neon => by_rows!(neon, 6 5 4 3 2 1),
        _ => by_rows!(portable, 4 3 2 1),
    }
}

/// `c[0..R, 0..16] (+)= a[0..R, 0..kc] @ panel[0..kc, 0..16]` in plain Rust without FMA (the
/// portable path), starting from the bias (when `first`) or from `c`.
///
/// # Safety
/// `a` rows `0..R` with stride `lda` hold `kc` values; `panel` holds `kc * 16`; `bias` 16; `c`
/// rows `0..R` with stride `ldc` hold 16 writable values.
unsafe fn portable<const R: usize>(op: Operands<f32>, c: *mut f32, ldc: usize) {
    const NR: usize = 16;
    let mut acc = [[0f32; NR]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        let src = if op.first { op.bias } else { c.add(r * ldc) };
        row.copy_from_slice(std::slice::from_raw_parts(src, NR));
    }
    let panel = std::slice::from_raw_parts(op.panel, op.kc * NR);
    for (kk, b) in panel.chunks_exact(NR).enumerate() {
        for (r, row) in acc.iter_mut().enumerate() {
            let a = *op.a.add(r * op.lda + kk);
            for (v, &bj) in row.iter_mut().zip(b) {
                *v = fmadd::<false>(a, bj, *v);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        std::ptr::copy_nonoverlapping(row.as_ptr(), c.add(r * ldc), NR);
    }
}

/// `c[0..R, 0..16] (+)= a[0..R, 0..kc] @ panel[0..kc, 0..16]` with NEON (aarch64), starting from
/// the bias (when `first`) or from `c`: 4 q registers of accumulators per row (24 for R = 6),
/// the panel's 16 values in 4 more, each `a` value multiplied in by element (`FMLA v.4s,
/// v.4s, v.s[0]`), so the 32 vector registers hold the whole tile.
///
/// # Safety
/// NEON available (baseline on aarch64); operands as for [`portable`].
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn neon<const R: usize>(op: Operands<f32>, c: *mut f32, ldc: usize) {
    use std::arch::aarch64::*;
    let Operands {
        a,
        lda,
        panel,
        kc,
        bias,
        first,
    } = op;
    let mut acc = [[vdupq_n_f32(0.0); 4]; R];
    for (r, row) in acc.iter_mut().enumerate() {
        let src = if first { bias } else { c.add(r * ldc) };
        for (j, v) in row.iter_mut().enumerate() {
            *v = vld1q_f32(src.add(4 * j));
        }
    }
    let mut b = panel;
    for kk in 0..kc {
        let bv = [
            vld1q_f32(b),
            vld1q_f32(b.add(4)),
            vld1q_f32(b.add(8)),
            vld1q_f32(b.add(12)),
        ];
        for (r, row) in acc.iter_mut().enumerate() {
            let av = *a.add(r * lda + kk);
            for (v, &bj) in row.iter_mut().zip(&bv) {
                *v = vfmaq_n_f32(*v, bj, av);
            }
        }
        b = b.add(16);
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, &v) in row.iter().enumerate() {
            vst1q_f32(c.add(r * ldc + 4 * j), v);
        }
    }
}

/// `c[0..R, 0..16] (+)= a[0..R, 0..kc] @ panel[0..kc, 0..16]` with AVX2 + FMA, starting from the
/// bias (when `first`) or from `c`.
///
/// # Safety
/// AVX2 and FMA available; operands as for [`portable`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<const R: usize>(op: Operands<f32>, c: *mut f32, ldc: usize) {
    use std::arch::x86_64::*;
    let Operands {
        a,
        lda,
        panel,
        kc,
        bias,
        first,
    } = op;
    let mut lo = [_mm256_setzero_ps(); R];
    let mut hi = [_mm256_setzero_ps(); R];
    for r in 0..R {
        let src = if first { bias } else { c.add(r * ldc) };
        lo[r] = _mm256_loadu_ps(src);
        hi[r] = _mm256_loadu_ps(src.add(8));
    }
    let mut b = panel;
    for kk in 0..kc {
        let b0 = _mm256_loadu_ps(b);
        let b1 = _mm256_loadu_ps(b.add(8));
        for r in 0..R {
            let av = _mm256_broadcast_ss(&*a.add(r * lda + kk));
            lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
            hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
        }
        b = b.add(16);
    }
    for r in 0..R {
        _mm256_storeu_ps(c.add(r * ldc), lo[r]);
        _mm256_storeu_ps(c.add(r * ldc + 8), hi[r]);
    }
}

/// `c[0..R, 0..32] (+)= a[0..R, 0..2 kc] @ panel[0..2 kc, 0..32]` on bf16 pairs with
/// AVX512_BF16 (`VDPBF16PS`, f32 accumulation), starting from the bias (when `first`) or from `c`.
///
/// # Safety
/// AVX-512 F and AVX512_BF16 available; `a` rows `0..R` with stride `lda` hold `2 kc` bf16
/// values; `panel` holds `kc * 64`; `bias` 32; `c` rows `0..R` with stride `ldc` hold 32
/// writable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl,avx2,fma")]
unsafe fn avx512bf16<const R: usize>(op: Operands<u16>, c: *mut f32, ldc: usize) {
    use std::arch::x86_64::*;
    let Operands {
        a,
        lda,
        panel,
        kc,
        bias,
        first,
    } = op;
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    for r in 0..R {
        let src = if first { bias } else { c.add(r * ldc) };
        lo[r] = _mm512_loadu_ps(src);
        hi[r] = _mm512_loadu_ps(src.add(16));
    }
    let mut b = panel;
    for kp in 0..kc {
        // SAFETY (transmutes): __m512i and __m512bh are both 512-bit vectors of plain bits.
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(32).cast()));
        for r in 0..R {
            let pair = a.add(r * lda + 2 * kp).cast::<i32>().read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            lo[r] = _mm512_dpbf16_ps(lo[r], av, b0);
            hi[r] = _mm512_dpbf16_ps(hi[r], av, b1);
        }
        b = b.add(64);
    }
    for r in 0..R {
        _mm512_storeu_ps(c.add(r * ldc), lo[r]);
        _mm512_storeu_ps(c.add(r * ldc + 16), hi[r]);
    }
}

/// `c[0..R, 0..32] (+)= a[0..R, 0..kc] @ panel[0..kc, 0..32]` with AVX-512 F, starting from the
/// bias (when `first`) or from `c`.
///
/// # Safety
/// AVX-512 F available; `a` rows `0..R` with stride `lda` hold `kc` values; `panel` holds
/// `kc * 32`; `bias` 32; `c` rows `0..R` with stride `ldc` hold 32 writable values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn avx512<const R: usize>(op: Operands<f32>, c: *mut f32, ldc: usize) {
    use std::arch::x86_64::*;
    let Operands {
        a,
        lda,
        panel,
        kc,
        bias,
        first,
    } = op;
    let mut lo = [_mm512_setzero_ps(); R];
    let mut hi = [_mm512_setzero_ps(); R];
    for r in 0..R {
        let src = if first { bias } else { c.add(r * ldc) };
        lo[r] = _mm512_loadu_ps(src);
        hi[r] = _mm512_loadu_ps(src.add(16));
    }
    let mut b = panel;
    for kk in 0..kc {
        let b0 = _mm512_loadu_ps(b);
        let b1 = _mm512_loadu_ps(b.add(16));
        for r in 0..R {
            let av = _mm512_set1_ps(*a.add(r * lda + kk));
            lo[r] = _mm512_fmadd_ps(av, b0, lo[r]);
            hi[r] = _mm512_fmadd_ps(av, b1, hi[r]);
        }
        b = b.add(32);
    }
    for r in 0..R {
        _mm512_storeu_ps(c.add(r * ldc), lo[r]);
        _mm512_storeu_ps(c.add(r * ldc + 16), hi[r]);
    }
}

/// `y (rows, n) = x (rows, k) @ w^T + bias` (then GELU when `gelu`) for f32 rows on the calling
/// thread: one row block of the training kernels (which run their own row-block parallelism).
/// `rows = x.len() / k`; all `rows * n` values of `y` are written.
pub(crate) fn linear_rows(x: &[f32], w: &PackedWeight, gelu: bool, y: &mut [f32]) {
    let rows = x.len() / w.k.max(1);
    assert!(
        y.len() >= rows * w.n && x.len() == rows * w.k,
        "linear_rows: operand sizes"
    );
    if rows == 0 {
        return;
    }
    // SAFETY: x holds rows * k values and y rows * n (asserted above); one caller writes all of y.
    unsafe {
        block(
            Rows::F32(x),
            0,
            rows,
            w,
            0,
            w.panels(),
            y.as_mut_ptr(),
            w.n,
            gelu,
        )
    };
}

/// `acc (n, k) += a^T b` for row-major `a` (m, n) and `b` (m, k), on the calling thread: the
/// weight gradient `dY^T X` of a linear layer over a block of `m` rows (the `gemm` crate's
/// kernels, which handle the transposed operand through strides).
pub(crate) fn gemm_tn_acc(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], acc: &mut [f32]) {
    assert!(
        a.len() >= m * n && b.len() >= m * k && acc.len() >= n * k,
        "gemm_tn_acc: operand sizes"
    );
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // SAFETY: the strides describe a^T (n x m: element (i, r) at a[r * n + i]), b (m x k: (r, j)
    // at b[r * k + j]) and acc (n x k: (i, j) at acc[i * k + j]), all inside the slices (sizes
    // asserted above); acc does not alias a or b (a `&mut` borrow).
    unsafe {
        gemm::gemm(
            n,
            k,
            m,
            acc.as_mut_ptr(),
            1,
            k as isize,
            true,
            a.as_ptr(),
            n as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `w^T` of a row-major (n, k) matrix, as a row-major (k, n) matrix.
pub(crate) fn transpose(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut t = vec![0f32; n * k];
    for (i, row) in w.chunks_exact(k).enumerate().take(n) {
        for (j, &v) in row.iter().enumerate() {
            t[j * n + i] = v;
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = b[j] as f64;
                for kk in 0..k {
                    s += x[i * k + kk] as f64 * w[j * k + kk] as f64;
                }
                y[i * n + j] = s as f32;
            }
        }
        y
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    fn run(x: &[f32], m: usize, w: &PackedWeight) -> Vec<f32> {
        let mut y = Vec::with_capacity(m * w.n);
        linear_packed(
            Rows::F32(x),
            m,
            w,
            false,
            &mut y.spare_capacity_mut()[..m * w.n],
        );
        // SAFETY: linear_packed writes all m * n values.
        unsafe { y.set_len(m * w.n) };
        y
    }

    #[test]
    fn packed_linear_matches_a_float64_reference_on_every_isa() {
        for isa in Isa::supported() {
            for &(m, n, k) in &[
                (1, 1, 1),
                (7, 17, 3),
                (49, 72, 64),
                (13, 36, 600),
                (196, 100, 257),
                (300, 33, 70),
                (9, 40, 130),
                // Depths a multiple of 4 KiB: the AVX-512 kernel reads contiguous copies of
                // the rows (`ALIASING_STRIDE`), whole and partial row groups.
                (30, 40, 1024),
                (14, 33, 2048),
            ] {
                let (x, w, b) = (data(m * k, 1), data(n * k, 2), data(n, 3));
                let pw = PackedWeight::new(isa, &w, Some(&b), n, k).unwrap();
                let y = run(&x, m, &pw);
                let r = naive(&x, &w, &b, m, n, k);
                for (i, (a, e)) in y.iter().zip(&r).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{isa} {m}x{n}x{k} at {i}: {a} vs {e}"
                    );
                }
                let (wu, bu) = pw.unpack();
                assert_eq!((wu, bu), (w, b), "{isa}: unpack is the inverse of pack");
            }
        }
    }

    #[test]
    fn transposed_packing_matches_packing_the_transpose() {
        for isa in Isa::supported() {
            for &(n, k) in &[(1, 1), (17, 3), (72, 64), (33, 70), (100, 257)] {
                // w is (k, n): the packed weight maps k inputs to n outputs.
                let w = data(n * k, 4);
                let a = PackedWeight::new_transposed(isa, &w, n, k).unwrap();
                let b = PackedWeight::new(isa, &transpose(&w, k, n), None, n, k).unwrap();
                assert_eq!(a.unpack(), b.unpack(), "{isa} {n}x{k}");
                assert_eq!((a.n(), a.k()), (b.n(), b.k()));
            }
        }
    }

    #[test]
    fn packed_mlp_matches_two_linears_with_gelu_on_every_isa() {
        let (m, c, hid) = (203, 24, 96);
        let (x, w1, b1, w2, b2) = (
            data(m * c, 4),
            data(hid * c, 5),
            data(hid, 6),
            data(c * hid, 7),
            data(c, 8),
        );
        let mut h = naive(&x, &w1, &b1, m, hid, c);
        for v in h.iter_mut() {
            let t = *v as f64;
            *v = (0.5 * t * (1.0 + erf(t / std::f64::consts::SQRT_2))) as f32;
        }
        let r = naive(&h, &w2, &b2, m, c, hid);
        for isa in Isa::supported() {
            let p1 = PackedWeight::new(isa, &w1, Some(&b1), hid, c).unwrap();
            let p2 = PackedWeight::new(isa, &w2, Some(&b2), c, hid).unwrap();
            let mut y = Vec::with_capacity(m * c);
            mlp_packed(
                Rows::F32(&x),
                m,
                &p1,
                &p2,
                &mut y.spare_capacity_mut()[..m * c],
            );
            // SAFETY: mlp_packed writes all m * c values.
            unsafe { y.set_len(m * c) };
            for (a, e) in y.iter().zip(&r) {
                assert!((a - e).abs() <= 1e-5 * (1.0 + e.abs()), "{isa}: {a} vs {e}");
            }
            // Keeping the hidden pre-activations changes nothing in y, and z is fc1(x).
            let (mut z, mut yk) = (Vec::new(), Vec::with_capacity(m * c));
            let out = &mut yk.spare_capacity_mut()[..m * c];
            mlp_packed_keep(Rows::F32(&x), m, &p1, &p2, &mut z, out);
            // SAFETY: mlp_packed_keep writes all m * c values.
            unsafe { yk.set_len(m * c) };
            assert_eq!(yk, y, "{isa}: y with the hidden activations kept");
            let z_ref = naive(&x, &w1, &b1, m, hid, c);
            assert_eq!(z.len(), m * hid);
            for (a, e) in z.iter().zip(&z_ref) {
                assert!(
                    (a - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "{isa} z: {a} vs {e}"
                );
            }
        }
    }

    /// The bf16 kernel (where the CPU has it) against an f64 reference on the bf16-rounded
    /// operands: bf16 and f32 rows, even and odd depths, partial panels, several depth blocks,
    /// the fused MLP; and the unpacked weight is the bf16 rounding of the original.
    #[test]
    fn bf16_kernel_matches_a_float64_reference_of_the_rounded_operands() {
        if !Isa::Avx512Bf16.is_supported() {
            return;
        }
        let round =
            |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect() };
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 17, 3),
            (49, 72, 64),
            (13, 36, 600),
            (300, 33, 71),
            // Few rows, several panels, odd depth: the panels split across tasks, so f32 rows
            // are converted to bf16 once up front (`linear_packed`).
            (20, 70, 33),
        ] {
            let (x, w, b) = (data(m * k, 11), data(n * k, 12), data(n, 13));
            let pw = PackedWeight::new_bf16(Isa::Avx512Bf16, &w, Some(&b), n, k).unwrap();
            assert!(pw.is_bf16());
            assert_eq!(pw.unpack().0, round(&w));
            let want = naive(&round(&x), &round(&w), &b, m, n, k);
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            for rows in [Rows::F32(&x), Rows::Bf16(&xb)] {
                let mut y = Vec::with_capacity(m * n);
                linear_packed(rows, m, &pw, false, &mut y.spare_capacity_mut()[..m * n]);
                // SAFETY: linear_packed writes all m * n values.
                unsafe { y.set_len(m * n) };
                for (i, (a, e)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (a - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{m}x{n}x{k} at {i}: {a} vs {e}"
                    );
                }
            }
        }
        assert!(PackedWeight::new_bf16(Isa::Avx512, &[1.0], None, 1, 1).is_none());
    }

    /// On aarch64 the fast policy packs for the NEON kernel (6 x 16) and the portable policy
    /// for the plain one (4 x 16).
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_weights_pack_for_the_neon_kernel() {
        let w = data(40 * 24, 9);
        let neon = PackedWeight::new(Isa::Neon, &w, None, 40, 24).unwrap();
        assert_eq!(
            (neon.family, neon.family.mr(), neon.family.nr()),
            (Family::Neon, 6, 16)
        );
        let portable = PackedWeight::new(Isa::Portable, &w, None, 40, 24).unwrap();
        assert_eq!(portable.family, Family::Portable);
        assert_eq!(neon.unpack(), portable.unpack());
        // The same rows through both kernels: equal up to FMA rounding.
        let (m, x) = (29, data(29 * 24, 10));
        for (a, b) in run(&x, m, &neon).iter().zip(run(&x, m, &portable)) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    /// The AMX kernel (where the CPU and the OS have it) against an f64 reference on the
    /// bf16-rounded operands: partial row tiles and panels, depths that are not multiples of 32
    /// (odd ones too), bias, GELU, f32 and bf16 rows, single and multi-task splits; the fused MLP
    /// gives exactly the two linears; a policy capped at AVX512_BF16 never packs for AMX.
    /// Skipped, with a note, on machines without AMX.
    #[test]
    fn amx_kernel_matches_a_float64_reference_of_the_rounded_operands() {
        if !Isa::Amx.is_supported() {
            println!("note: no usable AMX here (CPU or OS); the AMX GEMM test is skipped");
            return;
        }
        let round =
            |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect() };
        let gelu = |v: f32| {
            let t = v as f64;
            (0.5 * t * (1.0 + erf(t / std::f64::consts::SQRT_2))) as f32
        };
        for &(m, n, k) in &[
            (1, 1, 1),
            (15, 16, 32),
            (16, 32, 33),
            (17, 33, 31),
            (31, 17, 64),
            (32, 64, 2),
            (33, 64, 3),
            (49, 72, 600),
            (64, 40, 130),
            (300, 33, 71),
            (203, 256, 64),
            (97, 64, 256),
        ] {
            let (x, w, b) = (data(m * k, 21), data(n * k, 22), data(n, 23));
            let pw = PackedWeight::new_bf16(Isa::Amx, &w, Some(&b), n, k).unwrap();
            assert_eq!(pw.family, Family::Amx);
            assert!(pw.is_bf16());
            assert_eq!(pw.unpack(), (round(&w), b.clone()));
            let capped = PackedWeight::new_bf16(Isa::Avx512Bf16, &w, Some(&b), n, k).unwrap();
            assert_eq!(capped.family, Family::Avx512Bf16);
            let want = naive(&round(&x), &round(&w), &b, m, n, k);
            let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            for with_gelu in [false, true] {
                for rows in [Rows::F32(&x), Rows::Bf16(&xb)] {
                    let mut y = Vec::with_capacity(m * n);
                    linear_packed(
                        rows,
                        m,
                        &pw,
                        with_gelu,
                        &mut y.spare_capacity_mut()[..m * n],
                    );
                    // SAFETY: linear_packed writes all m * n values.
                    unsafe { y.set_len(m * n) };
                    for (i, (a, e)) in y.iter().zip(&want).enumerate() {
                        let e = if with_gelu { gelu(*e) } else { *e };
                        assert!(
                            (a - e).abs() <= 1e-5 * (1.0 + e.abs()),
                            "{m}x{n}x{k} gelu {with_gelu} at {i}: {a} vs {e}"
                        );
                    }
                }
            }
        }
        let (m, c, hid) = (531, 24, 96);
        let (x, w1, b1, w2, b2) = (
            data(m * c, 24),
            data(hid * c, 25),
            data(hid, 26),
            data(c * hid, 27),
            data(c, 28),
        );
        let p1 = PackedWeight::new_bf16(Isa::Amx, &w1, Some(&b1), hid, c).unwrap();
        let p2 = PackedWeight::new_bf16(Isa::Amx, &w2, Some(&b2), c, hid).unwrap();
        let mut h = Vec::with_capacity(m * hid);
        linear_packed(
            Rows::F32(&x),
            m,
            &p1,
            true,
            &mut h.spare_capacity_mut()[..m * hid],
        );
        // SAFETY: linear_packed writes all m * hid values.
        unsafe { h.set_len(m * hid) };
        let mut two = Vec::with_capacity(m * c);
        linear_packed(
            Rows::F32(&h),
            m,
            &p2,
            false,
            &mut two.spare_capacity_mut()[..m * c],
        );
        // SAFETY: as above.
        unsafe { two.set_len(m * c) };
        let mut fused = Vec::with_capacity(m * c);
        mlp_packed(
            Rows::F32(&x),
            m,
            &p1,
            &p2,
            &mut fused.spare_capacity_mut()[..m * c],
        );
        // SAFETY: mlp_packed writes all m * c values.
        unsafe { fused.set_len(m * c) };
        assert_eq!(fused, two, "fused AMX MLP vs two AMX linears");
    }

    /// Abramowitz-Stegun 7.1.26 in f64, accurate to 1.5e-7: below the test's tolerance after
    /// the fc2 sum.
    fn erf(x: f64) -> f64 {
        let t = 1.0 / (1.0 + 0.3275911 * x.abs());
        let p = t
            * (0.254829592
                + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
        (1.0 - p * (-x * x).exp()).copysign(x)
    }
}
