//! CPU linear layer: `y = x @ w^T (+ bias) (then GELU)` with the rows of `x` split across the
//! rayon threads, each block one single-threaded call of the `gemm` crate (the kernels candle
//! uses) followed at once by the bias/GELU epilogue while the block is still in cache.
//!
//! InternImage's GEMMs are tall and narrow (3136 x 64 x 64 at stage 1, 49 x 512 x 2048 at
//! stage 4); candle's matmul hands them to gemm's own threading, which scales poorly on such
//! shapes, and the bias add is then a separate pass.

use super::gemm::OutPtr;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// What happens to each output row after the GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Epilogue {
    None,
    Gelu,
}

/// The op: inputs x (M, K) and w (N, K), optionally bias (N); all f32, contiguous.
pub(crate) struct LinearOp {
    pub(crate) epilogue: Epilogue,
}

/// Block size along a dimension of `len`: about two blocks per thread (load balance), at least
/// `min`, a multiple of 8; `len` itself (one block) for small problems or one thread.
fn block_len(len: usize, work: usize, min: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    if threads == 1 || work < 64 * 64 * 64 {
        return len.max(1);
    }
    let r = len.div_ceil(2 * threads).max(min);
    r.div_ceil(8) * 8
}

/// `dst (mr x nc, row stride ld) = src (mr x k) @ w[c0.., :]^T`, single-threaded.
///
/// # Safety
/// `dst` must be valid for writes of rows `0..mr` x columns `0..nc` with row stride `ld`;
/// `src` holds `mr * k` values and `w` holds at least `nc * k` values.
unsafe fn gemm_block(
    dst: *mut f32,
    ld: usize,
    src: &[f32],
    w: &[f32],
    mr: usize,
    nc: usize,
    k: usize,
) {
    gemm::gemm(
        mr,
        nc,
        k,
        dst,
        1,
        ld as isize,
        false,
        src.as_ptr(),
        1,
        k as isize,
        w.as_ptr(),
        k as isize,
        1,
        0f32,
        1f32,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

fn epilogue_rows(dst: &mut [f32], bias: Option<&[f32]>, epi: Epilogue) {
    match (bias, epi) {
        (Some(b), Epilogue::None) => super::activation::bias_rows(dst, b, false),
        (Some(b), Epilogue::Gelu) => super::activation::bias_rows(dst, b, true),
        (None, Epilogue::Gelu) => super::activation::gelu_erf_f32_inplace_serial(dst),
        (None, Epilogue::None) => {}
    }
}

fn linear_f32(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
    epi: Epilogue,
) -> Vec<f32> {
    if m == 0 || n == 0 || k == 0 {
        let mut y = vec![0f32; m * n];
        if n > 0 {
            epilogue_rows(&mut y, bias, epi);
        }
        return y;
    }
    // The output is written only by the GEMMs (which overwrite: read_dst = false, alpha = 0), so
    // it is never zero-filled first.
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let spare = &mut y.spare_capacity_mut()[..m * n];
    if m >= n {
        // Tall: blocks of rows, each a complete (rows x n) GEMM plus its epilogue.
        let rows = block_len(m, m * n * k, 32);
        let run = |(blk, dst): (usize, &mut [MaybeUninit<f32>])| {
            let r0 = blk * rows;
            let mr = dst.len() / n;
            let p = dst.as_mut_ptr().cast::<f32>();
            // SAFETY: dst is exactly (mr, n) row-major; the source rows r0..r0+mr exist.
            unsafe { gemm_block(p, n, &x[r0 * k..(r0 + mr) * k], w, mr, n, k) };
            // SAFETY: the GEMM has written all mr * n values of this block.
            let dst = unsafe { std::slice::from_raw_parts_mut(p, mr * n) };
            epilogue_rows(dst, bias, epi);
        };
        if rows >= m {
            run((0, spare));
        } else {
            spare.par_chunks_mut(rows * n).enumerate().for_each(run);
        }
    } else {
        // Wide: blocks of output columns (each packs only its slice of the weight).
        let cols = block_len(n, m * n * k, 64);
        let nblk = n.div_ceil(cols);
        let out = OutPtr(spare.as_mut_ptr().cast::<f32>());
        let run = |blk: usize| {
            let c0 = blk * cols;
            let nc = cols.min(n - c0);
            // SAFETY: block `blk` writes only columns c0..c0+nc of the (m, n) output, disjoint
            // from every other block; the weight rows c0..c0+nc exist.
            unsafe { gemm_block(out.get().add(c0), n, x, &w[c0 * k..(c0 + nc) * k], m, nc, k) };
            for r in 0..m {
                // SAFETY: row r, columns c0..c0+nc: written above and owned by this block.
                let seg = unsafe { std::slice::from_raw_parts_mut(out.get().add(r * n + c0), nc) };
                epilogue_rows(seg, bias.map(|b| &b[c0..c0 + nc]), epi);
            }
        };
        if nblk == 1 {
            run(0);
        } else {
            (0..nblk).into_par_iter().for_each(run);
        }
    }
    // SAFETY: the blocks together have written all m * n values.
    unsafe { y.set_len(m * n) };
    y
}

fn check(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
    let (m, k) = l1.shape().dims2()?;
    let (n, k2) = l2.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("linear: input has {k} features but the weight is ({n}, {k2})")
    }
    Ok((m, k, n))
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("linear: the {what} must be contiguous")
    };
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        other => candle_core::bail!(
            "linear: the CPU kernel needs f32, the {what} is {:?}",
            other.dtype()
        ),
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "internimage-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, n) = check(l1, l2)?;
        let x = f32_slice(s1, l1, "input")?;
        let w = f32_slice(s2, l2, "weight")?;
        let y = linear_f32(x, w, None, m, k, n, self.epilogue);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "internimage-linear-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k, n) = check(l1, l2)?;
        let x = f32_slice(s1, l1, "input")?;
        let w = f32_slice(s2, l2, "weight")?;
        let b = f32_slice(s3, l3, "bias")?;
        if b.len() != n {
            candle_core::bail!("linear: bias has {} values for {n} outputs", b.len())
        }
        let y = linear_f32(x, w, Some(b), m, k, n, self.epilogue);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// The fused MLP: inputs x (M, C), w1 (H, C), w2 (Cout, H); biases held by the op.
struct MlpOp {
    b1: Option<Vec<f32>>,
    b2: Option<Vec<f32>>,
}

/// `y = fc2(gelu(fc1(x)))` by blocks of rows small enough that the hidden block stays in the
/// core's cache; the (M, H) hidden activations are never materialised.
#[allow(clippy::too_many_arguments)]
fn mlp_f32(
    x: &[f32],
    w1: &[f32],
    b1: Option<&[f32]>,
    w2: &[f32],
    b2: Option<&[f32]>,
    m: usize,
    c: usize,
    hid: usize,
    cout: usize,
) -> Vec<f32> {
    if m == 0 || cout == 0 || c == 0 || hid == 0 {
        // Degenerate shapes: the unfused formula on zero-filled buffers.
        let mut h = vec![0f32; m * hid];
        if hid > 0 {
            epilogue_rows(&mut h, b1, Epilogue::Gelu);
        }
        let mut y = linear_f32(&h, w2, b2, m, hid, cout, Epilogue::None);
        if y.is_empty() {
            y = vec![0f32; m * cout];
        }
        return y;
    }
    let mut y: Vec<f32> = Vec::with_capacity(m * cout);
    let threads = rayon::current_num_threads().max(1);
    // ~512 KiB of hidden activations per block, and at least two blocks per thread.
    let by_cache = (131_072 / hid.max(1)).max(16);
    let by_threads = m.div_ceil(2 * threads).max(8);
    let rows = by_cache.min(by_threads).div_ceil(8) * 8;
    y.spare_capacity_mut()[..m * cout]
        .par_chunks_mut(rows * cout)
        .enumerate()
        .for_each_init(Vec::new, |h: &mut Vec<f32>, (blk, dst)| {
            let r0 = blk * rows;
            let mr = dst.len() / cout;
            let p = dst.as_mut_ptr().cast::<f32>();
            h.clear();
            h.resize(mr * hid, 0.0);
            {
                // SAFETY: h is (mr, hid) row-major, the source rows r0..r0+mr exist, w1 is (hid, c).
                unsafe {
                    gemm_block(
                        h.as_mut_ptr(),
                        hid,
                        &x[r0 * c..(r0 + mr) * c],
                        w1,
                        mr,
                        hid,
                        c,
                    )
                };
            }
            epilogue_rows(h, b1, Epilogue::Gelu);
            // SAFETY: dst is (mr, cout) row-major, h is (mr, hid), w2 is (cout, hid).
            unsafe { gemm_block(p, cout, h, w2, mr, cout, hid) };
            // SAFETY: the GEMM (c, hid > 0) has written all mr * cout values of this block.
            let dst = unsafe { std::slice::from_raw_parts_mut(p, mr * cout) };
            epilogue_rows(dst, b2, Epilogue::None);
        });
    // SAFETY: the blocks together have written all m * cout values.
    unsafe { y.set_len(m * cout) };
    y
}

impl CustomOp3 for MlpOp {
    fn name(&self) -> &'static str {
        "internimage-mlp"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, c, hid) = check(l1, l2)?;
        let (cout, hid2) = l3.shape().dims2()?;
        if hid2 != hid {
            candle_core::bail!("mlp: fc1 has {hid} outputs but fc2 expects {hid2} inputs")
        }
        let x = f32_slice(s1, l1, "input")?;
        let w1 = f32_slice(s2, l2, "fc1 weight")?;
        let w2 = f32_slice(s3, l3, "fc2 weight")?;
        if self.b1.as_ref().is_some_and(|b| b.len() != hid)
            || self.b2.as_ref().is_some_and(|b| b.len() != cout)
        {
            candle_core::bail!("mlp: bias lengths do not match the weights ({hid}, {cout})")
        }
        let y = mlp_f32(
            x,
            w1,
            self.b1.as_deref(),
            w2,
            self.b2.as_deref(),
            m,
            c,
            hid,
            cout,
        );
        Ok((CpuStorage::F32(y), Shape::from((m, cout))))
    }
}

/// Largest fc1 weight (values) for which the row-blocked fused MLP wins: with bigger weights the
/// per-block packing of both weights costs more than the hidden tensor's memory traffic.
const MLP_FUSED_MAX_WEIGHT: usize = 128 * 512;

/// `fc2(gelu_erf(fc1(xs)))`, InternImage's MLP, on (..., C) channels-last input.
///
/// On the CPU (f32, enough rows to keep every thread busy, fc1 weight up to 128 x 512) the rows
/// are processed in blocks whose hidden activations stay in cache: the (..., 4C) hidden tensor is
/// never written to memory, and each block's two GEMMs and epilogues run back to back on one
/// thread. Otherwise it is
/// [`crate::ops::linear_gelu`] followed by [`crate::ops::linear`] (same numbers).
pub(crate) fn mlp(
    xs: &candle_core::Tensor,
    fc1: &candle_nn::Linear,
    fc2: &candle_nn::Linear,
) -> Result<candle_core::Tensor> {
    use candle_core::{DType, D};
    let rows: usize = xs.dims().iter().rev().skip(1).product();
    let threads = rayon::current_num_threads().max(1);
    let f32_cpu = |t: &candle_core::Tensor| t.dtype() == DType::F32 && !t.track_op();
    let fused = xs.device().is_cpu()
        && !super::simd::reference_ops()
        && rows >= 64 * threads
        && fc1.weight().elem_count() <= MLP_FUSED_MAX_WEIGHT
        && f32_cpu(xs)
        && f32_cpu(fc1.weight())
        && f32_cpu(fc2.weight())
        && fc1.bias().is_none_or(f32_cpu)
        && fc2.bias().is_none_or(f32_cpu);
    if !fused {
        let h = super::activation::linear_gelu(xs, fc1)?;
        return super::activation::linear(&h, fc2);
    }
    let c = xs.dim(D::Minus1)?;
    let (hid, c1) = fc1.weight().dims2()?;
    let (cout, hid2) = fc2.weight().dims2()?;
    if c1 != c || hid2 != hid {
        candle_core::bail!(
            "mlp: input has {c} features, fc1 is ({hid}, {c1}), fc2 is ({cout}, {hid2}); they must chain"
        )
    }
    let op = MlpOp {
        b1: fc1.bias().map(|b| b.to_vec1::<f32>()).transpose()?,
        b2: fc2.bias().map(|b| b.to_vec1::<f32>()).transpose()?,
    };
    let x2 = xs.contiguous()?.reshape((rows, c))?;
    let y = super::inference_op3(
        &x2,
        &fc1.weight().contiguous()?,
        &fc2.weight().contiguous()?,
        &op,
    )?;
    let mut dims = xs.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = cout;
    }
    y.reshape(dims)
}
