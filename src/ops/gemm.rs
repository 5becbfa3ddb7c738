//! The CPU GEMM behind the network's linear layers: `y = x @ w^T + b` (optionally GELU) with the
//! weight packed once, when the layer is built, into panels of 16 output channels.
//!
//! The kernel (AVX2 + FMA) keeps a 6 x 16 block of `y` in twelve 256-bit registers and, for each
//! `k`, broadcasts one value from each of six rows of `x` (read in place, row-major: no packing
//! of the activations) against two vectors of the packed weight panel. The weight panels are
//! contiguous, so a `kc x 16` slice (12 KiB) stays in L1 while all row groups of a task use it.
//!
//! Work is split into tasks of (row block x panel range), each writing its own part of `y`, with
//! the bias folded into the accumulators' start value and the GELU applied to each task's block
//! while it is still in cache. Packing once removes the per-call packing of the `gemm` crate that
//! dominated small-batch calls; on CPUs without AVX2/FMA nothing is packed and the callers use
//! the candle path instead.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::Arc;

/// Output channels per packed panel (two AVX vectors).
const NR: usize = 16;
/// Rows of `x` per kernel call.
const MR: usize = 6;
/// Largest row block of one task (36 rows x `KC` values of `x`, 27 KiB, stay in L1 with the
/// panel slice).
const MAX_ROW_BLOCK: usize = 36;
/// Target depth of one pass over `k` (a 16-column panel slice of `KC * 64` bytes, 12 KiB).
const KC: usize = 192;

/// A weight `w` (n, k) (row-major, as stored by `nn.Linear`) and bias, packed for the kernel:
/// `data[(p * k + kk) * 16 + j] = w[16 p + j, kk]`, zero-padded to whole panels.
#[derive(Debug)]
pub(crate) struct PackedWeight {
    n: usize,
    k: usize,
    data: Vec<f32>,
    /// The bias zero-padded to whole panels (zeros without a bias).
    bias: Vec<f32>,
}

impl PackedWeight {
    /// Packs `w` ((n, k) row-major) and `bias` (n); `None` when this CPU has no AVX2/FMA kernel
    /// (or the shapes disagree), in which case the caller keeps its unpacked path.
    pub(crate) fn new(w: &[f32], bias: Option<&[f32]>, n: usize, k: usize) -> Option<Self> {
        if !kernel_available() || n == 0 || k == 0 || w.len() != n * k {
            return None;
        }
        if bias.is_some_and(|b| b.len() != n) {
            return None;
        }
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        for (p, panel) in data.chunks_exact_mut(k * NR).enumerate() {
            for j in 0..NR.min(n - p * NR) {
                let row = &w[(p * NR + j) * k..(p * NR + j + 1) * k];
                for (kk, &v) in row.iter().enumerate() {
                    panel[kk * NR + j] = v;
                }
            }
        }
        let mut padded = vec![0f32; panels * NR];
        if let Some(b) = bias {
            padded[..n].copy_from_slice(b);
        }
        Some(Self {
            n,
            k,
            data,
            bias: padded,
        })
    }

    /// The weight ((n, k) row-major) and the bias (n; zeros when there was none) as CPU tensors:
    /// the inverse of [`PackedWeight::new`], for the differentiable path a tracked input takes.
    pub(crate) fn unpack(&self) -> Result<(Tensor, Tensor)> {
        let (n, k) = (self.n, self.k);
        let mut w = vec![0f32; n * k];
        for (p, panel) in self.data.chunks_exact(k * NR).enumerate() {
            for j in 0..NR.min(n - p * NR) {
                let row = &mut w[(p * NR + j) * k..(p * NR + j + 1) * k];
                for (kk, v) in row.iter_mut().enumerate() {
                    *v = panel[kk * NR + j];
                }
            }
        }
        let dev = candle_core::Device::Cpu;
        Ok((
            Tensor::from_vec(w, (n, k), &dev)?,
            Tensor::from_slice(&self.bias[..n], n, &dev)?,
        ))
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }
}

/// Whether the packed kernel can run on this CPU.
pub(crate) fn kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd::has_avx2_fma()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A raw output pointer shared by tasks that write disjoint blocks.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: only used for disjoint writes from the tasks below.
unsafe impl Send for OutPtr {}
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

fn split(m: usize, panels: usize, k: usize, threads: usize) -> Split {
    let tiny = m * panels * NR * k < 32 * 1024;
    if threads <= 1 || tiny {
        return Split {
            rows: m.clamp(1, MAX_ROW_BLOCK),
            panels,
        };
    }
    // Rows: blocks of whole kernel groups, at most MAX_ROW_BLOCK, about 4 tasks per thread.
    let want = 4 * threads;
    let rows = m
        .div_ceil(want)
        .div_ceil(MR)
        .saturating_mul(MR)
        .clamp(MR, MAX_ROW_BLOCK);
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
    x: &[f32],
    m: usize,
    w: &PackedWeight,
    gelu: bool,
    y: &mut [MaybeUninit<f32>],
) {
    let (n, k) = (w.n, w.k);
    debug_assert!(x.len() >= m * k && y.len() >= m * n);
    if m == 0 {
        return;
    }
    let s = split(m, w.panels(), k, rayon::current_num_threads());
    let row_blocks = m.div_ceil(s.rows);
    let panel_blocks = w.panels().div_ceil(s.panels);
    let out = OutPtr(y.as_mut_ptr().cast::<f32>());
    let task = |t: usize| {
        let (rb, pb) = (t / panel_blocks, t % panel_blocks);
        let r0 = rb * s.rows;
        let r1 = (r0 + s.rows).min(m);
        let p0 = pb * s.panels;
        let p1 = (p0 + s.panels).min(w.panels());
        // SAFETY: task t writes rows r0..r1 x columns of panels p0..p1 only, disjoint from every
        // other task; x holds m * k values and y m * n.
        unsafe { block(x, r0, r1, w, p0, p1, out.get(), n, gelu) };
    };
    let tasks = row_blocks * panel_blocks;
    if tasks == 1 {
        task(0);
    } else {
        (0..tasks).into_par_iter().for_each(task);
    }
}

/// `fc2(gelu(fc1(x)))` with both weights packed: by row blocks, each block's hidden activations
/// staying in a per-thread buffer (never a full (m, hidden) tensor). Used for large `m`; small
/// `m` is better served by two [`linear_packed`] calls that split the panels too.
pub(crate) fn mlp_packed(
    x: &[f32],
    m: usize,
    fc1: &PackedWeight,
    fc2: &PackedWeight,
    y: &mut [MaybeUninit<f32>],
) {
    let (hid, cout) = (fc1.n, fc2.n);
    debug_assert!(fc2.k == hid && x.len() >= m * fc1.k && y.len() >= m * cout);
    if m == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let rows = mlp_block_rows(hid).min(m.div_ceil(2 * threads).div_ceil(MR) * MR);
    let out = OutPtr(y.as_mut_ptr().cast::<f32>());
    let blocks = m.div_ceil(rows);
    (0..blocks)
        .into_par_iter()
        .for_each_init(Vec::<f32>::new, |h, b| {
            let r0 = b * rows;
            let r1 = (r0 + rows).min(m);
            let mr = r1 - r0;
            h.resize(mr * hid, 0.0);
            let xb = &x[r0 * fc1.k..r1 * fc1.k];
            // SAFETY: h is (mr, hid); the output rows r0..r1 belong to this block only.
            unsafe {
                block(xb, 0, mr, fc1, 0, fc1.panels(), h.as_mut_ptr(), hid, true);
                block(
                    h,
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
}

/// The depth blocks of `k`: about `KC` deep, equal sizes.
fn k_blocks(k: usize) -> impl Iterator<Item = (usize, usize)> {
    let nb = k.div_ceil(KC).max(1);
    let kc = k.div_ceil(nb);
    (0..nb).map(move |b| (b * kc, kc.min(k - b * kc)))
}

/// One task: rows `r0..r1` of `y` (row stride `ldy`) for panels `p0..p1`, full depth, then GELU.
///
/// # Safety
/// `x` holds rows `0..r1` of `w.k` values; `y` is valid for writes of rows `r0..r1` x columns
/// `16 p0 .. min(16 p1, n)` with row stride `ldy`; no other thread touches that block.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    x: &[f32],
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
    for (k0, kc) in k_blocks(k) {
        let first = k0 == 0;
        for p in p0..p1 {
            let panel = w.data.as_ptr().add((p * k + k0) * NR);
            let bias = w.bias.as_ptr().add(p * NR);
            let cols = NR.min(w.n - p * NR);
            let mut r = r0;
            while r < r1 {
                let rows = MR.min(r1 - r);
                let a = x.as_ptr().add(r * k + k0);
                let c = y.add(r * ldy + p * NR);
                let op = Operands {
                    a,
                    lda: k,
                    panel,
                    kc,
                    bias,
                    first,
                };
                tile(op, c, ldy, rows, cols);
                r += rows;
            }
        }
    }
    if gelu {
        let c0 = p0 * NR;
        let c1 = (p1 * NR).min(w.n);
        for r in r0..r1 {
            let row = std::slice::from_raw_parts_mut(y.add(r * ldy + c0), c1 - c0);
            super::activation::gelu_erf_f32_inplace_serial(row);
        }
    }
}

/// The inputs of one kernel call: `kc` values from each row of `a` (row stride `lda`), the
/// matching `kc x 16` slice of a packed panel, the panel's bias, and whether this is the first
/// depth block (start from the bias) or a later one (accumulate onto the output).
#[derive(Clone, Copy)]
// Only the x86-64 kernel reads them; elsewhere nothing is ever packed.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Operands {
    a: *const f32,
    lda: usize,
    panel: *const f32,
    kc: usize,
    bias: *const f32,
    first: bool,
}

/// One `rows x cols` tile (rows <= 6, cols <= 16) at `c` (row stride `ldc`): full panels are
/// written in place, partial ones through a 6 x 16 scratch tile.
///
/// # Safety
/// As for [`block`], for this tile.
#[inline]
unsafe fn tile(op: Operands, c: *mut f32, ldc: usize, rows: usize, cols: usize) {
    if cols == NR {
        kernel_dispatch(op, c, ldc, rows);
        return;
    }
    let mut scratch = [0f32; MR * NR];
    if !op.first {
        for r in 0..rows {
            std::ptr::copy_nonoverlapping(c.add(r * ldc), scratch.as_mut_ptr().add(r * NR), cols);
        }
    }
    kernel_dispatch(op, scratch.as_mut_ptr(), NR, rows);
    for r in 0..rows {
        std::ptr::copy_nonoverlapping(scratch.as_ptr().add(r * NR), c.add(r * ldc), cols);
    }
}

#[inline]
unsafe fn kernel_dispatch(op: Operands, c: *mut f32, ldc: usize, rows: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use avx2::kernel;
        match rows {
            6 => kernel::<6>(op, c, ldc),
            5 => kernel::<5>(op, c, ldc),
            4 => kernel::<4>(op, c, ldc),
            3 => kernel::<3>(op, c, ldc),
            2 => kernel::<2>(op, c, ldc),
            _ => kernel::<1>(op, c, ldc),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // Unreachable: PackedWeight::new returns None without the x86-64 kernel.
        let _ = (op, c, ldc, rows);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `c[0..R, 0..16] (+)= a[0..R, 0..kc] @ panel[0..kc, 0..16]`, starting from the bias (when
    /// `first`) or from `c`.
    ///
    /// # Safety
    /// AVX2 and FMA available; `a` rows `0..R` with stride `lda` hold `kc` values; `panel` holds
    /// `kc * 16`; `bias` 16; `c` rows `0..R` with stride `ldc` hold 16 writable values.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel<const R: usize>(op: super::Operands, c: *mut f32, ldc: usize) {
        let super::Operands {
            a,
            lda,
            panel,
            kc,
            bias,
            first,
        } = op;
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        if first {
            let (b0, b1) = (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8)));
            for r in 0..R {
                lo[r] = b0;
                hi[r] = b1;
            }
        } else {
            for r in 0..R {
                lo[r] = _mm256_loadu_ps(c.add(r * ldc));
                hi[r] = _mm256_loadu_ps(c.add(r * ldc + 8));
            }
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
}

/// A linear layer's weight and bias packed for [`linear_packed`], shareable between clones.
pub(crate) type SharedPackedWeight = Arc<PackedWeight>;

/// Packs a linear layer (`weight` (out, in), optional `bias` (out)) when the fast CPU path applies:
/// f32 contiguous CPU tensors that track no gradient, on a CPU with AVX2/FMA, without
/// `INTERNIMAGE_REFERENCE_OPS`. `Ok(None)` otherwise (broadcast stand-ins, GPUs, f16/bf16, training).
pub(crate) fn pack_linear(
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<SharedPackedWeight>> {
    let eligible = |t: &Tensor| {
        t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op() && t.is_contiguous()
    };
    if !kernel_available()
        || super::simd::reference_ops()
        || weight.rank() != 2
        || !eligible(weight)
        || bias.is_some_and(|b| !eligible(b))
    {
        return Ok(None);
    }
    let (n, k) = weight.dims2()?;
    if let Some(b) = bias.filter(|b| b.elem_count() != n) {
        candle_core::bail!(
            "linear: expected a bias of {n} values for a weight of shape [{n}, {k}], got shape {:?}",
            b.dims()
        )
    }
    // Packed straight from the tensors' storage (no intermediate copy).
    let (w_storage, w_layout) = weight.storage_and_layout();
    let w = cpu_f32(&w_storage, w_layout, "weight")?;
    let packed = match bias {
        Some(b) => {
            let (b_storage, b_layout) = b.storage_and_layout();
            let b = cpu_f32(&b_storage, b_layout, "bias")?;
            PackedWeight::new(w, Some(b), n, k)
        }
        None => PackedWeight::new(w, None, n, k),
    };
    Ok(packed.map(Arc::new))
}

/// The values of an f32 CPU tensor's storage (see [`super::contiguous_slice`]).
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    match storage {
        Storage::Cpu(s) => super::contiguous_slice::<f32>(s, layout, "linear", what),
        _ => candle_core::bail!("linear: the {what} must be on the CPU to be packed"),
    }
}

/// Rows (the product of the leading dims) of a (..., k) input, after checking it is an f32 CPU
/// tensor with `k` features.
fn rows_of(xs: &Tensor, k: usize, what: &str) -> Result<usize> {
    if !xs.device().is_cpu() || xs.dtype() != DType::F32 {
        candle_core::bail!(
            "{what}: this layer holds f32 weights packed for the CPU, but the input is {:?} on {:?}; \
             pass an f32 CPU tensor, or build the model with the input's dtype and device",
            xs.dtype(),
            xs.device().location()
        )
    }
    match xs.dims().split_last() {
        Some((&last, lead)) if last == k => Ok(lead.iter().product()),
        _ => candle_core::bail!(
            "{what}: expected an input (..., {k}), got shape {:?}",
            xs.dims()
        ),
    }
}

/// `xs (..., in) -> (..., out)` through the packed weight, with GELU when `gelu`.
pub(crate) fn forward_packed(xs: &Tensor, w: &SharedPackedWeight, gelu: bool) -> Result<Tensor> {
    PackedOp::Linear { w: w.clone(), gelu }.apply(xs)
}

/// Rows per block of the fused MLP: the block's hidden activations (rows x hidden) stay within
/// about 256 KiB, between one and sixteen kernel row groups.
fn mlp_block_rows(hidden: usize) -> usize {
    (65_536 / hidden.max(1)).clamp(MR, 16 * MR) / MR * MR
}

/// `fc2(gelu(fc1(xs)))` through packed weights: fused by row blocks when there are enough rows
/// for every thread, otherwise two [`forward_packed`] calls (which also split the columns).
pub(crate) fn mlp_forward_packed(
    xs: &Tensor,
    fc1: &SharedPackedWeight,
    fc2: &SharedPackedWeight,
) -> Result<Tensor> {
    if fc2.k != fc1.n {
        candle_core::bail!(
            "mlp: fc1 has {} outputs but fc2 takes {} inputs",
            fc1.n,
            fc2.k
        )
    }
    let m = rows_of(xs, fc1.k, "mlp")?;
    let threads = rayon::current_num_threads().max(1);
    if m < 2 * threads * mlp_block_rows(fc1.n) {
        let h = forward_packed(xs, fc1, true)?;
        return forward_packed(&h, fc2, false);
    }
    PackedOp::Mlp {
        fc1: fc1.clone(),
        fc2: fc2.clone(),
    }
    .apply(xs)
}

/// A packed computation on (m, k) rows, as a candle op (inference only).
enum PackedOp {
    /// `x @ w^T + b`, then GELU when `gelu`.
    Linear { w: SharedPackedWeight, gelu: bool },
    /// `fc2(gelu(fc1(x)))`, fused by row blocks.
    Mlp {
        fc1: SharedPackedWeight,
        fc2: SharedPackedWeight,
    },
}

impl PackedOp {
    fn what(&self) -> &'static str {
        match self {
            Self::Linear { .. } => "linear",
            Self::Mlp { .. } => "mlp",
        }
    }

    /// (input, output) features.
    fn features(&self) -> (usize, usize) {
        match self {
            Self::Linear { w, .. } => (w.k, w.n),
            Self::Mlp { fc1, fc2 } => (fc1.k, fc2.n),
        }
    }

    /// `xs (..., k) -> (..., n)`.
    fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        let (k, n) = self.features();
        let m = rows_of(xs, k, self.what())?;
        let y = super::inference_op1(&xs.contiguous()?.reshape((m, k))?, self)?;
        let mut dims = xs.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        y.reshape(dims)
    }
}

impl CustomOp1 for PackedOp {
    fn name(&self) -> &'static str {
        match self {
            Self::Linear { .. } => "internimage-packed-linear",
            Self::Mlp { .. } => "internimage-packed-mlp",
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_slice::<f32>(storage, layout, self.what(), "input")?;
        let (m, n) = (layout.dims()[0], self.features().1);
        let mut y = Vec::with_capacity(m * n);
        let out = &mut y.spare_capacity_mut()[..m * n];
        match self {
            Self::Linear { w, gelu } => linear_packed(x, m, w, *gelu, out),
            Self::Mlp { fc1, fc2 } => mlp_packed(x, m, fc1, fc2, out),
        }
        // SAFETY: linear_packed and mlp_packed write all m * n values.
        unsafe { y.set_len(m * n) };
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
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
        linear_packed(x, m, w, false, &mut y.spare_capacity_mut()[..m * w.n]);
        // SAFETY: linear_packed writes all m * n values.
        unsafe { y.set_len(m * w.n) };
        y
    }

    #[test]
    fn packed_linear_matches_a_float64_reference() {
        if !kernel_available() {
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 17, 3),
            (49, 72, 64),
            (13, 36, 600),
            (196, 100, 257),
            (300, 33, 70),
        ] {
            let (x, w, b) = (data(m * k, 1), data(n * k, 2), data(n, 3));
            let pw = PackedWeight::new(&w, Some(&b), n, k).unwrap();
            let y = run(&x, m, &pw);
            let r = naive(&x, &w, &b, m, n, k);
            for (i, (a, e)) in y.iter().zip(&r).enumerate() {
                assert!(
                    (a - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "{m}x{n}x{k} at {i}: {a} vs {e}"
                );
            }
        }
    }

    #[test]
    fn packed_mlp_matches_two_linears_with_gelu() {
        if !kernel_available() {
            return;
        }
        let (m, c, hid) = (203, 24, 96);
        let (x, w1, b1, w2, b2) = (
            data(m * c, 4),
            data(hid * c, 5),
            data(hid, 6),
            data(c * hid, 7),
            data(c, 8),
        );
        let p1 = PackedWeight::new(&w1, Some(&b1), hid, c).unwrap();
        let p2 = PackedWeight::new(&w2, Some(&b2), c, hid).unwrap();
        let mut h = naive(&x, &w1, &b1, m, hid, c);
        for v in h.iter_mut() {
            let t = *v as f64;
            *v = (0.5 * t * (1.0 + erf(t / std::f64::consts::SQRT_2))) as f32;
        }
        let r = naive(&h, &w2, &b2, m, c, hid);
        let mut y = Vec::with_capacity(m * c);
        mlp_packed(&x, m, &p1, &p2, &mut y.spare_capacity_mut()[..m * c]);
        // SAFETY: mlp_packed writes all m * c values.
        unsafe { y.set_len(m * c) };
        for (a, e) in y.iter().zip(&r) {
            assert!((a - e).abs() <= 1e-5 * (1.0 + e.abs()), "{a} vs {e}");
        }
    }

    /// erf by its Taylor series / continued fraction is overkill here: Abramowitz-Stegun 7.1.26
    /// in f64 is accurate to 1.5e-7, below the test's tolerance after the fc2 sum.
    fn erf(x: f64) -> f64 {
        let t = 1.0 / (1.0 + 0.3275911 * x.abs());
        let p = t
            * (0.254829592
                + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
        (1.0 - p * (-x * x).exp()).copysign(x)
    }
}
