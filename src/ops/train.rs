//! Training kernels: CPU custom ops (f32) with a real backward, so that a training step runs on
//! the crate's kernels instead of Candle's generic tensor-op autograd.
//!
//! * [`linear`]: `x @ w^T + b`; forward on the packed GEMM (weights packed per call), backward
//!   `dX = dY W` on the same kernel (`W^T` packed), `dW = dY^T X` as one GEMM per thread's rows
//!   and `db` the column sums, each computed only when that argument tracks a gradient.
//! * [`mlp`]: `fc2(gelu(fc1(x)))` that stores only its input: the backward recomputes the
//!   hidden activations block by block (the 4C-wide hidden tensor is never held for backward).
//! * [`residual`]: the residual update `x + drop_path(gamma * y)` (per-channel layer scale and a
//!   per-sample stochastic-depth scale, both optional) and its backward.
//!
//! The callers (the layers of [`crate::model`]) use them when every tensor is an f32 CPU tensor
//! under a fast [`crate::KernelPolicy`] and something tracks a gradient; other cases keep their
//! inference kernels or Candle's differentiable ops.

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;
use std::sync::{Arc, OnceLock};

use super::fused::{layer_norm_backward_rows, layer_norm_rows, ln_backward_rows, ln_rows};
use super::{contiguous_slice, written_zeros};
use crate::cpu::gelu::gelu_and_slope;
use crate::cpu::gemm::{gemm_tn_acc, linear_packed, linear_rows, PackedWeight, Rows};
use crate::cpu::{as_out, Isa, KernelPolicy};

/// Whether the training kernels apply to `ts`: f32 CPU tensors under a fast policy.
pub(crate) fn applies(policy: KernelPolicy, ts: &[&Tensor]) -> bool {
    policy.is_fast()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Whether an op over `ts` and an optional `extra` operand (a bias, a layer scale) runs on the
/// training kernels: something tracks a gradient and every operand qualifies for [`applies`].
/// The one test the linear layers, the dense convs and the residual update share.
pub(crate) fn engages(policy: KernelPolicy, ts: &[&Tensor], extra: Option<&Tensor>) -> bool {
    let all: Vec<&Tensor> = ts.iter().copied().chain(extra).collect();
    super::tracks_grad(&all) && applies(policy, &all)
}

/// The f32 values of a contiguous CPU tensor's storage.
fn values<'a>(storage: &'a Storage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    super::cpu_f32_values(storage, layout, "training kernel", what)
}

/// Sums of the columns of a row-major (rows, n) matrix, added into `acc` (n).
fn add_col_sums(g: &[f32], n: usize, acc: &mut [f32]) {
    for row in g.chunks_exact(n) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v;
        }
    }
}

/// Runs `run(acc, block, dx rows of the block)` over the `m.div_ceil(rows)` row blocks in
/// parallel, with one accumulator (made by `new_acc` on first use) per thread of the pool; the
/// blocks get their `rows * width` slice of `dx` when there is one (the input gradient), else
/// `None`. Returns the accumulators made.
///
/// Blocks stay small tasks (rayon balances them over the threads), but the accumulators are the
/// threads' own: rayon's `fold` made one per split (13 of 2 MiB each at the training bench's
/// stage-3 MLP, each zeroed and then summed), where this makes at most one per thread. A block
/// whose thread's accumulator is busy (rayon may run a stolen block inside another on the same
/// thread; `run` does not today) gets a fresh one.
fn fold_row_blocks<A: Send>(
    m: usize,
    rows: usize,
    width: usize,
    dx: Option<&mut [f32]>,
    new_acc: impl Fn() -> A + Sync + Send,
    run: impl Fn(&mut A, usize, Option<&mut [f32]>) + Sync + Send,
) -> Vec<A> {
    use std::sync::{Mutex, PoisonError};
    let slots: Vec<Mutex<Option<A>>> = (0..rayon::current_num_threads().max(1))
        .map(|_| Mutex::new(None))
        .collect();
    let extra = Mutex::new(Vec::new());
    let block = |b: usize, dxb: Option<&mut [f32]>| {
        let slot = rayon::current_thread_index().and_then(|i| slots.get(i));
        match slot.and_then(|s| s.try_lock().ok()) {
            Some(mut acc) => run(acc.get_or_insert_with(&new_acc), b, dxb),
            None => {
                let mut acc = new_acc();
                run(&mut acc, b, dxb);
                extra
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(acc);
            }
        }
    };
    match dx {
        Some(dx) => dx
            .par_chunks_mut(rows * width)
            .enumerate()
            .for_each(|(b, dxb)| block(b, Some(dxb))),
        None => (0..m.div_ceil(rows))
            .into_par_iter()
            .for_each(|b| block(b, None)),
    }
    let mut accs: Vec<A> = slots
        .into_iter()
        .filter_map(|s| s.into_inner().unwrap_or_else(PoisonError::into_inner))
        .collect();
    accs.extend(extra.into_inner().unwrap_or_else(PoisonError::into_inner));
    accs
}

/// `len` written zeros (see [`written_zeros`]) with capacity for `room` more values: a weight
/// gradient that the backward extends with the bias (and norm) gradients into one parameter
/// gradient, without reallocating (copying) it.
fn zeros_with_room(len: usize, room: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len + room);
    v.resize(len, 0f32);
    v
}

/// `dst = a * b` elementwise (equal lengths).
fn mul_into(dst: &mut [f32], a: &[f32], b: &[f32]) {
    for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
        *d = a * b;
    }
}

/// Adds `src` into `dst` elementwise.
fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// [`add_into`] for whole tensors, in parallel runs (an op's `bwd` runs on the calling thread:
/// a serial pass there leaves the pool idle).
fn add_into_par(dst: &mut [f32], src: &[f32]) {
    const RUN: usize = 16 * 1024;
    dst.par_chunks_mut(RUN)
        .zip(src.par_chunks(RUN))
        .for_each(|(d, s)| add_into(d, s));
}

/// `dst += field(p)` for every accumulator `p` of `parts` (each `field` as long as `dst`), in
/// parallel over runs of `dst`: the weight gradients of a backward come as one accumulator per
/// thread (or per task), and summing them on one thread had been a serial pass of each.
fn add_parts<A: Sync>(dst: &mut [f32], parts: &[A], field: impl Fn(&A) -> &[f32] + Sync) {
    const RUN: usize = 16 * 1024;
    if parts.is_empty() {
        return;
    }
    dst.par_chunks_mut(RUN).enumerate().for_each(|(ci, d)| {
        let at = ci * RUN;
        for p in parts {
            add_into(d, &field(p)[at..at + d.len()]);
        }
    });
}

/// Rows `m` of a (..., k) input `x` (all leading dims flattened) after checking its width.
fn rows_of(x: &Layout, k: usize, what: &str) -> Result<usize> {
    match x.dims().last() {
        Some(&kk) if kk == k && k > 0 => Ok(x.shape().elem_count() / k),
        _ => candle_core::bail!("{what}: expected a (..., {k}) input, got {:?}", x.dims()),
    }
}

/// The dims of the output of a (..., k) -> (..., n) layer: `x`'s with the last one `n`.
fn out_shape(x: &Layout, n: usize) -> Shape {
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Shape::from(dims)
}

/// `y (m, n) = x (m, k) @ w^T + b` on the packed GEMM (the weight packed for this call).
fn linear_forward(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &[f32],
    b: Option<&[f32]>,
    n: usize,
) -> Result<Vec<f32>> {
    let k = x.len().checked_div(m).unwrap_or(0);
    let mut y = Vec::with_capacity(m * n);
    if m > 0 {
        let packed = PackedWeight::new(isa, w, b, n, k)
            .ok_or_else(|| candle_core::Error::msg("linear: weight and input sizes disagree"))?;
        linear_packed(
            Rows::F32(x),
            m,
            &packed,
            false,
            &mut y.spare_capacity_mut()[..m * n],
        );
    }
    // SAFETY: `linear_packed` wrote all m * n values (none when m == 0).
    unsafe { y.set_len(m * n) };
    Ok(y)
}

/// `dX (m, k) = dY (m, n) @ W (n, k)`, on the packed GEMM with `W^T` packed.
fn input_grad(isa: Isa, g: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Result<Vec<f32>> {
    let mut dx = Vec::with_capacity(m * k);
    if m > 0 {
        let packed = PackedWeight::new_transposed(isa, w, k, n)
            .ok_or_else(|| candle_core::Error::msg("linear backward: empty weight"))?;
        linear_packed(
            Rows::F32(g),
            m,
            &packed,
            false,
            &mut dx.spare_capacity_mut()[..m * k],
        );
    }
    // SAFETY: `linear_packed` wrote all m * k values (none when m == 0).
    unsafe { dx.set_len(m * k) };
    Ok(dx)
}

/// `(dW (n, k), db (n)) = (dY^T X, column sums of dY)` for dY (m, n) and X (m, k): one GEMM per
/// thread over its share of the rows, then the per-thread partial sums are added.
fn weight_grads(g: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
    let threads = rayon::current_num_threads().max(1);
    let chunk = m.div_ceil(threads).max(1);
    let parts: Vec<(Vec<f32>, Vec<f32>)> = (0..m.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let (r0, r1) = (c * chunk, ((c + 1) * chunk).min(m));
            // Accumulated into: zeros written (see `written_zeros`).
            let mut dw = written_zeros(n * k, 0f32);
            let mut db = written_zeros(n, 0f32);
            let gc = &g[r0 * n..r1 * n];
            gemm_tn_acc(r1 - r0, n, k, gc, &x[r0 * k..r1 * k], &mut dw);
            add_col_sums(gc, n, &mut db);
            (dw, db)
        })
        .collect();
    let mut it = parts.into_iter();
    let (mut dw, mut db) = it
        .next()
        .unwrap_or_else(|| (vec![0f32; n * k], vec![0f32; n]));
    let rest: Vec<_> = it.collect();
    add_parts(&mut dw, &rest, |p| &p.0);
    add_parts(&mut db, &rest, |p| &p.1);
    (dw, db)
}

/// A CPU f32 tensor from a vector.
fn tensor(v: Vec<f32>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// Several parameters of a fused op as one (rows, width) tensor (a custom op takes at most three
/// arguments): its values are the parts' values in order, then zeros to a whole last row. The
/// 2-D `weights` (each (r, width)) enter as they are and the 1-D `tail` tensors flat. Every
/// graph node costs the backward a zero-filled gradient and an add of its size on the calling
/// thread: a flattened weight (a reshape node, then a concatenation of flat parts) paid that
/// twice per weight value on top of its own; a lone weight with no tail is passed as it is.
fn stack_params(weights: &[&Tensor], tail: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = weights.first() else {
        candle_core::bail!("internal: stacked parameters without a weight")
    };
    let width = first.dim(candle_core::D::Minus1)?;
    if width == 0
        || weights
            .iter()
            .any(|w| w.rank() != 2 || w.dim(1).ok() != Some(width))
    {
        candle_core::bail!(
            "internal: stacked weights of shapes {:?} do not share a width",
            weights.iter().map(|w| w.dims()).collect::<Vec<_>>()
        )
    }
    if tail.is_empty() && weights.len() == 1 {
        return first.contiguous();
    }
    let mut rows: Vec<Tensor> = weights.iter().map(|&w| w.clone()).collect();
    let tail_len: usize = tail.iter().map(|t| t.elem_count()).sum();
    if tail_len > 0 {
        let mut flat = tail
            .iter()
            .map(|t| t.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        let pad = stacked_len(tail_len, width) - tail_len;
        if pad > 0 {
            flat.push(Tensor::zeros(pad, DType::F32, first.device())?);
        }
        rows.push(Tensor::cat(&flat, 0)?.reshape(((tail_len + pad) / width, width))?);
    }
    Tensor::cat(&rows, 0)
}

/// The number of values of [`stack_params`] over parts of `len` values in rows of `width`.
fn stacked_len(len: usize, width: usize) -> usize {
    len.div_ceil(width.max(1)) * width.max(1)
}

/// The parts of lengths `lens` of stacked parameter values `p` ([`stack_params`] in rows of
/// `width`); `None` when `p` has another size.
fn split_stacked<const N: usize>(p: &[f32], lens: [usize; N], width: usize) -> Option<[&[f32]; N]> {
    if p.len() != stacked_len(lens.iter().sum(), width) {
        return None;
    }
    let mut out: [&[f32]; N] = [&[]; N];
    let mut rest = p;
    for (o, &len) in out.iter_mut().zip(&lens) {
        let (a, b) = rest.split_at(len);
        *o = a;
        rest = b;
    }
    Some(out)
}

/// The gradient of stacked parameters of `shape`: `first` (with room to spare, ideally), then
/// the `rest`, then zeros for the padding.
fn stacked_grad(mut first: Vec<f32>, rest: &[&[f32]], shape: &Shape) -> Result<Tensor> {
    for part in rest {
        first.extend_from_slice(part);
    }
    if first.len() > shape.elem_count() {
        candle_core::bail!(
            "internal: {} parameter gradients for {:?}",
            first.len(),
            shape
        )
    }
    first.resize(shape.elem_count(), 0.0);
    tensor(first, shape.clone())
}

/// The backward of `x @ w^T + b`: the gradients of the arguments that track one.
fn linear_backward(
    isa: Isa,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (n, k) = w.dims2()?;
    let m = x.elem_count() / k.max(1);
    let need_b = b.is_some_and(|b| b.track_op());
    let (need_x, need_w) = (x.track_op(), w.track_op());
    let (x, w, g) = (x.contiguous()?, w.contiguous()?, grad.contiguous()?);
    let (gs, gl) = g.storage_and_layout();
    let gv = values(&gs, gl, "gradient")?;
    let dx = if need_x {
        let (ws, wl) = w.storage_and_layout();
        let wv = values(&ws, wl, "weight")?;
        Some(tensor(
            input_grad(isa, gv, m, wv, n, k)?,
            x.shape().clone(),
        )?)
    } else {
        None
    };
    let (dw, db) = if need_w || need_b {
        let (xs, xl) = x.storage_and_layout();
        let xv = values(&xs, xl, "input")?;
        let (dw, db) = weight_grads(gv, xv, m, n, k);
        (
            need_w.then(|| tensor(dw, (n, k))).transpose()?,
            need_b.then(|| tensor(db, n)).transpose()?,
        )
    } else {
        (None, None)
    };
    Ok((dx, dw, db))
}

/// `x (m, k) @ w (n, k)^T + b (n)`.
struct LinearBiasOp {
    isa: Isa,
}

impl CustomOp3 for LinearBiasOp {
    fn name(&self) -> &'static str {
        "internimage-train-linear"
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
        let (n, k) = l2.shape().dims2()?;
        let m = rows_of(l1, k, "linear")?;
        let x = contiguous_slice::<f32>(s1, l1, "linear", "input")?;
        let w = contiguous_slice::<f32>(s2, l2, "linear", "weight")?;
        let b = contiguous_slice::<f32>(s3, l3, "linear", "bias")?;
        if b.len() != n {
            candle_core::bail!("linear: bias of {} values for {n} outputs", b.len())
        }
        let y = linear_forward(self.isa, x, m, w, Some(b), n)?;
        Ok((CpuStorage::F32(y), out_shape(l1, n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::ops::backward_on_pool(grad, || linear_backward(self.isa, x, w, Some(b), grad))
    }
}

/// `x (m, k) @ w (n, k)^T`.
struct LinearOp {
    isa: Isa,
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "internimage-train-linear-nobias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k) = l2.shape().dims2()?;
        let m = rows_of(l1, k, "linear")?;
        let x = contiguous_slice::<f32>(s1, l1, "linear", "input")?;
        let w = contiguous_slice::<f32>(s2, l2, "linear", "weight")?;
        let y = linear_forward(self.isa, x, m, w, None, n)?;
        Ok((CpuStorage::F32(y), out_shape(l1, n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        crate::ops::backward_on_pool(grad, || {
            let (dx, dw, _) = linear_backward(self.isa, x, w, None, grad)?;
            Ok((dx, dw))
        })
    }
}

/// `xs (..., k) @ weight (n, k)^T + bias (n)`, differentiable (real backward on the CPU
/// kernels). All tensors must be f32 CPU tensors (see [`applies`]).
pub(crate) fn linear(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    isa: Isa,
) -> Result<Tensor> {
    let k = weight.dims2()?.1;
    if xs.dim(candle_core::D::Minus1)? != k {
        candle_core::bail!(
            "linear: expected an input (..., {k}), got shape {:?}",
            xs.dims()
        )
    }
    // The ops take the (..., k) input as it is and return (..., n): no reshape nodes in the
    // graph (each would cost the backward a zero-filled gradient and an add of the activations).
    let (x, w) = (xs.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearBiasOp { isa }),
        None => x.apply_op2(&w, LinearOp { isa }),
    }
}

/// `fc2(gelu(fc1(x)))` over (m, cin) rows; the parameters come as `w1` (hid, cin) and
/// `p2 = [w2 (cout, hid), b1 (hid), b2 (cout) when `bias2`]` stacked in rows of `hid`
/// ([`stack_params`]; a custom op has at most three arguments).
struct MlpOp {
    isa: Isa,
    cin: usize,
    hid: usize,
    cout: usize,
    bias2: bool,
}

impl MlpOp {
    /// Rows of the input and the parameters `[w1, w2, b1, b2]` (b2 empty without a bias), after
    /// checking their sizes.
    fn check<'a>(
        &self,
        l1: &Layout,
        w1: &'a [f32],
        p2: &'a [f32],
    ) -> Result<(usize, [&'a [f32]; 4])> {
        let (cin, hid, cout) = (self.cin, self.hid, self.cout);
        let m = rows_of(l1, cin, "mlp")?;
        let b2 = if self.bias2 { cout } else { 0 };
        match split_stacked(p2, [cout * hid, hid, b2], hid) {
            Some([w2, b1, b2]) if w1.len() == hid * cin => Ok((m, [w1, w2, b1, b2])),
            _ => candle_core::bail!(
                "mlp: parameter sizes {}, {} do not match the layer",
                w1.len(),
                p2.len()
            ),
        }
    }
}

/// Per-thread state of the MLP backward: weight-gradient partial sums and row-block buffers.
struct MlpAcc {
    dw1: Vec<f32>,
    db1: Vec<f32>,
    dw2: Vec<f32>,
    db2: Vec<f32>,
    z: Vec<f32>,
    h: Vec<f32>,
    dh: Vec<f32>,
    slope: Vec<f32>,
}

impl CustomOp3 for MlpOp {
    fn name(&self) -> &'static str {
        "internimage-train-mlp"
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
        let x = contiguous_slice::<f32>(s1, l1, "mlp", "input")?;
        let w1 = contiguous_slice::<f32>(s2, l2, "mlp", "fc1 weight")?;
        let p2 = contiguous_slice::<f32>(s3, l3, "mlp", "fc2 weight and biases")?;
        let (m, [w1, w2, b1, b2]) = self.check(l1, w1, p2)?;
        let (cin, hid, cout) = (self.cin, self.hid, self.cout);
        let fc1 = PackedWeight::new(self.isa, w1, Some(b1), hid, cin);
        let fc2 = PackedWeight::new(self.isa, w2, self.bias2.then_some(b2), cout, hid);
        let (Some(fc1), Some(fc2)) = (fc1, fc2) else {
            candle_core::bail!("mlp: empty layer")
        };
        let mut y = Vec::with_capacity(m * cout);
        crate::cpu::gemm::mlp_packed(
            Rows::F32(x),
            m,
            &fc1,
            &fc2,
            &mut y.spare_capacity_mut()[..m * cout],
        );
        // SAFETY: `mlp_packed` writes all m * cout values.
        unsafe { y.set_len(m * cout) };
        Ok((CpuStorage::F32(y), out_shape(l1, cout)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p1: &Tensor,
        p2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::ops::backward_on_pool(grad, || {
            let (cin, hid, cout, isa) = (self.cin, self.hid, self.cout, self.isa);
            let (need_x, need_1, need_2) = (x.track_op(), p1.track_op(), p2.track_op());
            let (x, p1t, p2t, g) = (
                x.contiguous()?,
                p1.contiguous()?,
                p2.contiguous()?,
                grad.contiguous()?,
            );
            let (xs, xl) = x.storage_and_layout();
            let (s1, l1) = p1t.storage_and_layout();
            let (s2, l2) = p2t.storage_and_layout();
            let (gs, gl) = g.storage_and_layout();
            let xv = values(&xs, xl, "input")?;
            let pv1 = values(&s1, l1, "fc1 weight")?;
            let pv2 = values(&s2, l2, "fc2 weight and biases")?;
            let gv = values(&gs, gl, "gradient")?;
            let (m, [w1, w2, b1, _]) = self.check(xl, pv1, pv2)?;
            let err = || candle_core::Error::msg("mlp backward: empty layer");
            // Recomputes z = x W1^T + b1; dh = dY W2 (W2^T packed); dx = dz W1 (W1^T packed).
            let fc1 = PackedWeight::new(isa, w1, Some(b1), hid, cin).ok_or_else(err)?;
            let fc2t = PackedWeight::new_transposed(isa, w2, hid, cout).ok_or_else(err)?;
            let fc1t = PackedWeight::new_transposed(isa, w1, cin, hid).ok_or_else(err)?;
            // Row blocks: about 128 KiB of hidden activations, at least 64 rows (GEMM depth).
            let rows = (32_768 / hid.max(1)).clamp(64, 512);
            // Every block writes its rows (zeroed first: the blocks get initialised slices).
            let mut dx = super::written_zeros_par(if need_x { m * cin } else { 0 });
            let new_acc = || MlpAcc {
                dw1: written_zeros(hid * cin, 0f32),
                db1: written_zeros(hid, 0f32),
                dw2: zeros_with_room(cout * hid, 2 * hid + cout),
                db2: written_zeros(cout, 0f32),
                z: Vec::new(),
                h: Vec::new(),
                dh: Vec::new(),
                slope: Vec::new(),
            };
            let run = |acc: &mut MlpAcc, b: usize, dxb: Option<&mut [f32]>| {
                let (r0, r1) = (b * rows, ((b + 1) * rows).min(m));
                let rb = r1 - r0;
                let xb = &xv[r0 * cin..r1 * cin];
                let gb = &gv[r0 * cout..r1 * cout];
                acc.z.resize(rb * hid, 0.0);
                acc.h.resize(rb * hid, 0.0);
                acc.dh.resize(rb * hid, 0.0);
                acc.slope.resize(rb * hid, 0.0);
                linear_rows(xb, &fc1, false, &mut acc.z);
                gelu_and_slope(isa, &acc.z, as_out(&mut acc.h), as_out(&mut acc.slope));
                gemm_tn_acc(rb, cout, hid, gb, &acc.h, &mut acc.dw2);
                add_col_sums(gb, cout, &mut acc.db2);
                linear_rows(gb, &fc2t, false, &mut acc.dh);
                // dz = dh * gelu'(z), into h (no longer needed).
                mul_into(&mut acc.h, &acc.dh, &acc.slope);
                gemm_tn_acc(rb, hid, cin, &acc.h, xb, &mut acc.dw1);
                add_col_sums(&acc.h, hid, &mut acc.db1);
                if let Some(dxb) = dxb {
                    linear_rows(&acc.h, &fc1t, false, dxb);
                }
            };
            let mut accs =
                fold_row_blocks(m, rows, cin, need_x.then_some(&mut dx[..]), new_acc, run)
                    .into_iter();
            let mut total = accs.next().unwrap_or_else(&new_acc);
            let rest: Vec<_> = accs.collect();
            add_parts(&mut total.dw1, &rest, |a| &a.dw1);
            add_parts(&mut total.db1, &rest, |a| &a.db1);
            add_parts(&mut total.dw2, &rest, |a| &a.dw2);
            add_parts(&mut total.db2, &rest, |a| &a.db2);
            let dx = need_x.then(|| tensor(dx, xl.shape().clone())).transpose()?;
            let dw1 = need_1
                .then(|| tensor(total.dw1, l1.shape().clone()))
                .transpose()?;
            let db2: &[f32] = if self.bias2 { &total.db2 } else { &[] };
            let dp2 = need_2
                .then(|| stacked_grad(total.dw2, &[&total.db1, db2], l2.shape()))
                .transpose()?;
            Ok((dx, dw1, dp2))
        })
    }
}

/// InternImage's MLP `fc2(gelu(fc1(xs)))` on (..., cin) input, differentiable, storing only
/// `xs` for the backward (which recomputes the hidden activations). f32 CPU tensors only.
pub(crate) fn mlp(
    xs: &Tensor,
    (w1, b1): (&Tensor, &Tensor),
    (w2, b2): (&Tensor, Option<&Tensor>),
    isa: Isa,
) -> Result<Tensor> {
    let (hid, cin) = w1.dims2()?;
    let (cout, hid2) = w2.dims2()?;
    if hid2 != hid || b1.dims() != [hid] || b2.is_some_and(|b| b.dims() != [cout]) {
        candle_core::bail!(
            "mlp: fc1 {:?} / {:?} and fc2 {:?} do not chain",
            w1.dims(),
            b1.dims(),
            w2.dims()
        )
    }
    if xs.dim(candle_core::D::Minus1)? != cin {
        candle_core::bail!(
            "mlp: expected an input (..., {cin}), got shape {:?}",
            xs.dims()
        )
    }
    let p2 = stack_params(
        &[w2],
        &[Some(b1), b2].into_iter().flatten().collect::<Vec<_>>(),
    )?;
    let op = MlpOp {
        isa,
        cin,
        hid,
        cout,
        bias2: b2.is_some(),
    };
    // (..., cin) in, (..., cout) out: no reshape nodes (see `linear`).
    xs.contiguous()?.apply_op3(&w1.contiguous()?, &p2, op)
}

/// The MLP branch of a pre-norm block with its residual update, as one op:
/// `x + s[sample] * fc2(gelu(fc1(layer_norm(x))))` over (..., c) rows (`s` the optional
/// stochastic-depth scale per sample of the leading dim). The parameters come as `w1` (hid, c)
/// and `p2 = [w2 (c, hid), b1 (hid), ln weight (c), ln bias (c), b2 (c) when bias2]` stacked in
/// rows of `hid` ([`stack_params`]). The backward recomputes the normalised rows block by
/// block, and the hidden activations too unless the forward kept them (see
/// [`KEEP_HIDDEN_BYTES`]); the graph holds one node where LayerNorm, MLP and residual took three
/// (each costing the backward a zero-filled gradient and an add of the activations).
struct PreNormMlpOp {
    isa: Isa,
    c: usize,
    hid: usize,
    bias2: bool,
    eps: f32,
    scale: Option<Arc<Vec<f32>>>,
    /// The largest hidden tensor (bytes) the forward keeps ([`KEEP_HIDDEN_BYTES`]).
    keep_bytes: usize,
    /// The forward's hidden pre-activations `fc1(ln(x))` (m, hid), when small enough to keep.
    hidden: OnceLock<Vec<f32>>,
}

/// The largest hidden-activation tensor (bytes) a training MLP op keeps for its backward; larger
/// ones are recomputed there. Every InternImage block has about the same MLP FLOPs (C doubles
/// where H*W quarters), while its hidden tensor shrinks 2x per stage: keeping the small ones
/// buys most of the recompute's FLOPs for little memory. At InternImage-T, 224, batch 8, every
/// stage keeps them (25.7, 12.8, 6.4 and 3.2 MB per block, 283 MB in all; stage 1's took the
/// peak RSS from 1560 to 1565 MiB, the transients of the stem's backward being larger); from
/// batch 11 on, stage 1 recomputes.
const KEEP_HIDDEN_BYTES: usize = 32 << 20;

/// The hidden pre-activations of an MLP backward: kept by the forward, or recomputed per row
/// block with the packed fc1.
enum Hidden<'a> {
    Kept(&'a [f32]),
    Recompute(PackedWeight),
}

/// Per-thread state of the pre-norm MLP backward: parameter-gradient partial sums and row-block
/// buffers.
struct PreNormAcc {
    dw1: Vec<f32>,
    db1: Vec<f32>,
    dlnw: Vec<f32>,
    dlnb: Vec<f32>,
    dw2: Vec<f32>,
    db2: Vec<f32>,
    xn: Vec<f32>,
    z: Vec<f32>,
    h: Vec<f32>,
    dh: Vec<f32>,
    slope: Vec<f32>,
    gm: Vec<f32>,
    dxn: Vec<f32>,
    dx: Vec<f32>,
}

impl PreNormMlpOp {
    /// Rows of the input and rows per sample, and the parameters `[w1, w2, b1, ln weight, ln
    /// bias, b2]` (b2 empty without a bias), after checking their sizes.
    fn check<'a>(
        &self,
        l1: &Layout,
        w1: &'a [f32],
        p2: &'a [f32],
    ) -> Result<(usize, usize, [&'a [f32]; 6])> {
        let (c, hid) = (self.c, self.hid);
        let m = rows_of(l1, c, "prenorm mlp")?;
        let b2 = if self.bias2 { c } else { 0 };
        let Some([w2, b1, lnw, lnb, b2]) =
            split_stacked(p2, [c * hid, hid, c, c, b2], hid).filter(|_| w1.len() == hid * c)
        else {
            candle_core::bail!(
                "prenorm mlp: parameter sizes {}, {} do not match the layer",
                w1.len(),
                p2.len()
            )
        };
        let samples = self.scale.as_ref().map_or(1, |s| s.len()).max(1);
        if !m.is_multiple_of(samples) {
            candle_core::bail!("prenorm mlp: {m} rows for {samples} sample scales")
        }
        Ok((m, (m / samples).max(1), [w1, w2, b1, lnw, lnb, b2]))
    }

    /// The stochastic-depth scale of row `r`.
    fn row_scale(&self, r: usize, per_sample: usize) -> f32 {
        self.scale.as_ref().map_or(1.0, |s| s[r / per_sample])
    }
}

impl CustomOp3 for PreNormMlpOp {
    fn name(&self) -> &'static str {
        "internimage-train-prenorm-mlp-residual"
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
        let what = "prenorm mlp";
        let x = contiguous_slice::<f32>(s1, l1, what, "input")?;
        let w1 = contiguous_slice::<f32>(s2, l2, what, "fc1 weight")?;
        let p2 = contiguous_slice::<f32>(s3, l3, what, "fc2 weight, biases and norm")?;
        let (m, _, [w1, w2, b1, lnw, lnb, b2]) = self.check(l1, w1, p2)?;
        let (c, hid) = (self.c, self.hid);
        let fc1 = PackedWeight::new(self.isa, w1, Some(b1), hid, c);
        let fc2 = PackedWeight::new(self.isa, w2, self.bias2.then_some(b2), c, hid);
        let (Some(fc1), Some(fc2)) = (fc1, fc2) else {
            candle_core::bail!("{what}: empty layer")
        };
        // The normalised rows (transient), then the MLP into the output, then the residual.
        let xn = layer_norm_rows(self.isa, x, lnw, lnb, self.eps);
        let mut y = Vec::with_capacity(m * c);
        let out = &mut y.spare_capacity_mut()[..m * c];
        if m * hid * std::mem::size_of::<f32>() <= self.keep_bytes {
            let mut z = Vec::with_capacity(m * hid);
            crate::cpu::gemm::mlp_packed_keep(Rows::F32(&xn), m, &fc1, &fc2, &mut z, out);
            // `cpu_fwd` runs once per op value; a second run would compute the same values.
            let _ = self.hidden.set(z);
        } else {
            crate::cpu::gemm::mlp_packed(Rows::F32(&xn), m, &fc1, &fc2, out);
        }
        // SAFETY: `mlp_packed` and `mlp_packed_keep` write all m * c values.
        unsafe { y.set_len(m * c) };
        drop(xn);
        add_residual(&mut y, x, c, per_sample(&self.scale));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p1: &Tensor,
        p2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::ops::backward_on_pool(grad, || {
            let (c, hid, isa) = (self.c, self.hid, self.isa);
            let (need_x, need_1, need_2) = (x.track_op(), p1.track_op(), p2.track_op());
            let (x, p1t, p2t, g) = (
                x.contiguous()?,
                p1.contiguous()?,
                p2.contiguous()?,
                grad.contiguous()?,
            );
            let (xs, xl) = x.storage_and_layout();
            let (s1, l1) = p1t.storage_and_layout();
            let (s2, l2) = p2t.storage_and_layout();
            let (gs, gl) = g.storage_and_layout();
            let xv = values(&xs, xl, "input")?;
            let pv1 = values(&s1, l1, "fc1 weight")?;
            let pv2 = values(&s2, l2, "fc2 weight, biases and norm")?;
            let gv = values(&gs, gl, "gradient")?;
            let (m, per_sample, [w1, w2, b1, lnw, lnb, _]) = self.check(xl, pv1, pv2)?;
            if gv.len() != m * c {
                candle_core::bail!("prenorm mlp backward: gradient of {} values", gv.len())
            }
            let err = || candle_core::Error::msg("prenorm mlp backward: empty layer");
            // The kept hidden pre-activations, else fc1 to recompute them.
            let hidden = match self.hidden.get().filter(|z| z.len() == m * hid) {
                Some(z) => Hidden::Kept(z),
                None => {
                    Hidden::Recompute(PackedWeight::new(isa, w1, Some(b1), hid, c).ok_or_else(err)?)
                }
            };
            let fc2t = PackedWeight::new_transposed(isa, w2, hid, c).ok_or_else(err)?;
            let fc1t = PackedWeight::new_transposed(isa, w1, c, hid).ok_or_else(err)?;
            let rows = (32_768 / hid.max(1)).clamp(64, 512);
            // Every block writes its rows (zeroed first: the blocks get initialised slices).
            let mut dx = super::written_zeros_par(if need_x { m * c } else { 0 });
            let new_acc = || PreNormAcc {
                dw1: written_zeros(hid * c, 0f32),
                db1: written_zeros(hid, 0f32),
                dlnw: written_zeros(c, 0f32),
                dlnb: written_zeros(c, 0f32),
                dw2: zeros_with_room(c * hid, 2 * hid + 3 * c),
                db2: written_zeros(c, 0f32),
                xn: Vec::new(),
                z: Vec::new(),
                h: Vec::new(),
                dh: Vec::new(),
                slope: Vec::new(),
                gm: Vec::new(),
                dxn: Vec::new(),
                dx: Vec::new(),
            };
            let run = |acc: &mut PreNormAcc, b: usize, dxb: Option<&mut [f32]>| {
                let (r0, r1) = (b * rows, ((b + 1) * rows).min(m));
                let rb = r1 - r0;
                let xb = &xv[r0 * c..r1 * c];
                let gb = &gv[r0 * c..r1 * c];
                acc.xn.resize(rb * c, 0.0);
                acc.h.resize(rb * hid, 0.0);
                acc.dh.resize(rb * hid, 0.0);
                acc.slope.resize(rb * hid, 0.0);
                acc.gm.resize(rb * c, 0.0);
                acc.dxn.resize(rb * c, 0.0);
                ln_rows(isa, xb, as_out(&mut acc.xn), lnw, lnb, self.eps);
                let z = match &hidden {
                    Hidden::Kept(z) => &z[r0 * hid..r1 * hid],
                    Hidden::Recompute(fc1) => {
                        acc.z.resize(rb * hid, 0.0);
                        linear_rows(&acc.xn, fc1, false, &mut acc.z);
                        &acc.z[..]
                    }
                };
                gelu_and_slope(isa, z, as_out(&mut acc.h), as_out(&mut acc.slope));
                // The gradient of the MLP output: the block's, scaled per sample.
                for (i, (d, s)) in acc
                    .gm
                    .chunks_exact_mut(c)
                    .zip(gb.chunks_exact(c))
                    .enumerate()
                {
                    let sc = self.row_scale(r0 + i, per_sample);
                    for (d, &s) in d.iter_mut().zip(s) {
                        *d = sc * s;
                    }
                }
                gemm_tn_acc(rb, c, hid, &acc.gm, &acc.h, &mut acc.dw2);
                add_col_sums(&acc.gm, c, &mut acc.db2);
                linear_rows(&acc.gm, &fc2t, false, &mut acc.dh);
                // dz = dh * gelu'(z), into h (no longer needed).
                mul_into(&mut acc.h, &acc.dh, &acc.slope);
                gemm_tn_acc(rb, hid, c, &acc.h, &acc.xn, &mut acc.dw1);
                add_col_sums(&acc.h, hid, &mut acc.db1);
                linear_rows(&acc.h, &fc1t, false, &mut acc.dxn);
                // LayerNorm backward (statistics recomputed from x), then the residual path.
                let dxb = match dxb {
                    Some(d) => d,
                    None => {
                        acc.dx.resize(rb * c, 0.0);
                        &mut acc.dx[..]
                    }
                };
                ln_backward_rows(
                    isa,
                    xb,
                    &acc.dxn,
                    lnw,
                    self.eps,
                    as_out(dxb),
                    &mut acc.dlnw,
                    &mut acc.dlnb,
                );
                add_into(dxb, gb);
            };
            let mut accs = fold_row_blocks(m, rows, c, need_x.then_some(&mut dx[..]), new_acc, run)
                .into_iter();
            let mut total = accs.next().unwrap_or_else(&new_acc);
            let rest: Vec<_> = accs.collect();
            add_parts(&mut total.dw1, &rest, |a| &a.dw1);
            add_parts(&mut total.db1, &rest, |a| &a.db1);
            add_parts(&mut total.dlnw, &rest, |a| &a.dlnw);
            add_parts(&mut total.dlnb, &rest, |a| &a.dlnb);
            add_parts(&mut total.dw2, &rest, |a| &a.dw2);
            add_parts(&mut total.db2, &rest, |a| &a.db2);
            let dx = need_x.then(|| tensor(dx, xl.shape().clone())).transpose()?;
            let dw1 = need_1
                .then(|| tensor(total.dw1, l1.shape().clone()))
                .transpose()?;
            let db2: &[f32] = if self.bias2 { &total.db2 } else { &[] };
            let tail = [&total.db1[..], &total.dlnw, &total.dlnb, db2];
            let dp2 = need_2
                .then(|| stacked_grad(total.dw2, &tail, l2.shape()))
                .transpose()?;
            Ok((dx, dw1, dp2))
        })
    }
}

/// The MLP branch of a pre-norm block and its residual update, `x + s * fc2(gelu(fc1(ln(x))))`
/// (`s` the optional per-sample stochastic-depth scale), as one differentiable op (see
/// [`PreNormMlpOp`]). f32 CPU tensors only (see [`applies`]); `ln = (weight, bias, eps)`.
pub(crate) fn prenorm_mlp_residual(
    xs: &Tensor,
    ln: (&Tensor, &Tensor, f64),
    (w1, b1): (&Tensor, &Tensor),
    (w2, b2): (&Tensor, Option<&Tensor>),
    sample_scale: Option<Vec<f32>>,
    isa: Isa,
) -> Result<Tensor> {
    prenorm_mlp_residual_keeping(
        xs,
        ln,
        (w1, b1),
        (w2, b2),
        sample_scale,
        isa,
        KEEP_HIDDEN_BYTES,
    )
}

/// [`prenorm_mlp_residual`] keeping hidden tensors of at most `keep_bytes` for the backward.
fn prenorm_mlp_residual_keeping(
    xs: &Tensor,
    ln: (&Tensor, &Tensor, f64),
    (w1, b1): (&Tensor, &Tensor),
    (w2, b2): (&Tensor, Option<&Tensor>),
    sample_scale: Option<Vec<f32>>,
    isa: Isa,
    keep_bytes: usize,
) -> Result<Tensor> {
    let (hid, c) = w1.dims2()?;
    let (cout, hid2) = w2.dims2()?;
    let (lnw, lnb, eps) = ln;
    if hid2 != hid
        || cout != c
        || b1.dims() != [hid]
        || b2.is_some_and(|b| b.dims() != [c])
        || lnw.dims() != [c]
        || lnb.dims() != [c]
    {
        candle_core::bail!(
            "prenorm mlp: norm {:?}, fc1 {:?} and fc2 {:?} do not chain",
            lnw.dims(),
            w1.dims(),
            w2.dims()
        )
    }
    if xs.dim(candle_core::D::Minus1)? != c {
        candle_core::bail!(
            "prenorm mlp: expected an input (..., {c}), got shape {:?}",
            xs.dims()
        )
    }
    if let Some(s) = &sample_scale {
        if xs.rank() == 0 || s.len() != xs.dim(0)? {
            candle_core::bail!("prenorm mlp: {} sample scales for {:?}", s.len(), xs.dims())
        }
    }
    let tail: Vec<&Tensor> = [Some(b1), Some(lnw), Some(lnb), b2]
        .into_iter()
        .flatten()
        .collect();
    let p2 = stack_params(&[w2], &tail)?;
    let op = PreNormMlpOp {
        isa,
        c,
        hid,
        bias2: b2.is_some(),
        eps: eps as f32,
        scale: sample_scale.map(Arc::new),
        keep_bytes,
        hidden: OnceLock::new(),
    };
    xs.contiguous()?.apply_op3(&w1.contiguous()?, &p2, op)
}

/// A fused op's per-sample residual scale (stochastic depth in training), as a slice.
fn per_sample(scale: &Option<Arc<Vec<f32>>>) -> Option<&[f32]> {
    scale.as_deref().map(Vec::as_slice)
}

/// `out = x + s[sample] * out` over rows of `c` (`scale` the optional per-sample stochastic-depth
/// scale: one per equal share of the rows), in parallel: a residual update onto a branch output.
fn add_residual(out: &mut [f32], x: &[f32], c: usize, scale: Option<&[f32]>) {
    let rows = out.len() / c.max(1);
    let per = (rows / scale.map_or(1, |s| s.len()).max(1)).max(1) * c;
    let task = (16 * 1024 / c.max(1)).max(1) * c;
    out.par_chunks_mut(task)
        .zip(x.par_chunks(task))
        .enumerate()
        .for_each(|(t, (o, x))| {
            for (i, (o, x)) in o.chunks_mut(c).zip(x.chunks(c)).enumerate() {
                let s = scale.map_or(1.0, |s| s[(t * task + i * c) / per]);
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = x + s * *o;
                }
            }
        });
}

/// `g` scaled per sample (`scale`: one per equal share of `g`), or `g` itself without scales:
/// the gradient a residual update passes to its branch.
fn scaled_per_sample<'a>(g: &'a [f32], scale: Option<&[f32]>) -> std::borrow::Cow<'a, [f32]> {
    let Some(s) = scale else {
        return std::borrow::Cow::Borrowed(g);
    };
    if s.is_empty() || !g.len().is_multiple_of(s.len()) {
        // Not whole samples (the ops check their sizes first; kept total): the nearest share.
        let n = g.len().max(1);
        let v = g
            .iter()
            .enumerate()
            .map(|(i, &g)| g * s.get(i * s.len() / n).map_or(1.0, |&s| s));
        return std::borrow::Cow::Owned(v.collect());
    }
    let per = (g.len() / s.len()).max(1);
    let mut v = Vec::with_capacity(g.len());
    v.spare_capacity_mut()[..g.len()]
        .par_chunks_mut(per)
        .zip(g.par_chunks(per))
        .zip(s.par_iter())
        .for_each(|((d, g), &s)| {
            for (d, &g) in d.iter_mut().zip(g) {
                d.write(s * g);
            }
        });
    // SAFETY: s.len() divides g.len() (checked above), so the chunks of the first g.len() values
    // pair one to one with g's and with the scales, and every value was written.
    unsafe { v.set_len(g.len()) };
    std::borrow::Cow::Owned(v)
}

/// A projection and its residual update as one op: `x + s[sample] * (y @ w^T + b)` over (..., c)
/// rows (`s` the optional stochastic-depth scale per sample of the leading dim), with
/// `p = [w (c, k), b (c) when bias]` stacked in rows of `k` ([`stack_params`]). The projection's output is never a graph tensor: the
/// backward needs only `y` and `w`, where a projection then a residual op kept it alive until the
/// backward and cost it a zero-filled gradient and an add.
struct ProjectResidualOp {
    isa: Isa,
    c: usize,
    k: usize,
    bias: bool,
    scale: Option<Arc<Vec<f32>>>,
}

impl ProjectResidualOp {
    /// Rows and the parameters `[w, b]` (b empty without a bias), after checking the operands'
    /// sizes.
    fn check<'a>(&self, x: &Layout, y: &Layout, p: &'a [f32]) -> Result<(usize, [&'a [f32]; 2])> {
        let m = rows_of(x, self.c, "projection residual")?;
        let b = if self.bias { self.c } else { 0 };
        let wb = split_stacked(p, [self.c * self.k, b], self.k);
        let (Some(wb), true) = (wb, rows_of(y, self.k, "projection residual")? == m) else {
            candle_core::bail!(
                "projection residual: input {:?}, branch {:?} and {} parameters do not fit",
                x.dims(),
                y.dims(),
                p.len()
            )
        };
        let samples = self.scale.as_ref().map_or(1, |s| s.len());
        if samples == 0 || !m.is_multiple_of(samples) {
            candle_core::bail!("projection residual: {m} rows for {samples} sample scales")
        }
        Ok((m, wb))
    }
}

impl CustomOp3 for ProjectResidualOp {
    fn name(&self) -> &'static str {
        "internimage-train-projection-residual"
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
        let what = "projection residual";
        let x = contiguous_slice::<f32>(s1, l1, what, "input")?;
        let y = contiguous_slice::<f32>(s2, l2, what, "branch")?;
        let p = contiguous_slice::<f32>(s3, l3, what, "parameters")?;
        let (m, [w, b]) = self.check(l1, l2, p)?;
        let mut out = linear_forward(self.isa, y, m, w, self.bias.then_some(b), self.c)?;
        add_residual(&mut out, x, self.c, per_sample(&self.scale));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::ops::backward_on_pool(grad, || {
            let (need_x, need_y, need_p) = (x.track_op(), y.track_op(), p.track_op());
            let (c, k) = (self.c, self.k);
            let (yt, pt, g) = (y.contiguous()?, p.contiguous()?, grad.contiguous()?);
            let (ys, yl) = yt.storage_and_layout();
            let (ps, pl) = pt.storage_and_layout();
            let (gs, gl) = g.storage_and_layout();
            let yv = values(&ys, yl, "branch")?;
            let pv = values(&ps, pl, "parameters")?;
            let gv = values(&gs, gl, "gradient")?;
            let (m, [w, _]) = self.check(x.layout(), yl, pv)?;
            if gv.len() != m * c {
                candle_core::bail!(
                    "projection residual backward: gradient of {} values",
                    gv.len()
                )
            }
            // The projection's gradient: the block's, scaled per sample.
            let gp = scaled_per_sample(gv, per_sample(&self.scale));
            let gp = &gp[..];
            let dy = need_y
                .then(|| tensor(input_grad(self.isa, gp, m, w, c, k)?, yl.shape().clone()))
                .transpose()?;
            let dp = need_p
                .then(|| {
                    let (dw, db) = weight_grads(gp, yv, m, c, k);
                    stacked_grad(dw, &[if self.bias { &db } else { &[] }], pl.shape())
                })
                .transpose()?;
            Ok((need_x.then(|| grad.clone()), dy, dp))
        })
    }
}

/// `x + s * (y @ w^T + b)` (`s` the optional per-sample stochastic-depth scale) as one
/// differentiable op (see [`ProjectResidualOp`]). f32 CPU tensors only (see [`applies`]).
pub(crate) fn project_residual(
    x: &Tensor,
    y: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    sample_scale: Option<Vec<f32>>,
    isa: Isa,
) -> Result<Tensor> {
    let (c, k) = w.dims2()?;
    let mut branch_dims = x.dims().to_vec();
    if let Some(last) = branch_dims.last_mut() {
        *last = k;
    }
    if x.dim(candle_core::D::Minus1)? != c || y.dims() != branch_dims.as_slice() {
        candle_core::bail!(
            "projection residual: input {:?} and branch {:?} do not fit a ({c}, {k}) weight",
            x.dims(),
            y.dims()
        )
    }
    if b.is_some_and(|b| b.dims() != [c]) {
        candle_core::bail!(
            "projection residual: bias {:?} for {c} outputs",
            b.map(|b| b.dims())
        )
    }
    if let Some(s) = &sample_scale {
        if x.rank() == 0 || s.len() != x.dim(0)? {
            candle_core::bail!(
                "projection residual: {} sample scales for {:?}",
                s.len(),
                x.dims()
            )
        }
    }
    let p = stack_params(&[w], b.as_slice())?;
    let op = ProjectResidualOp {
        isa,
        c,
        k,
        bias: b.is_some(),
        scale: sample_scale.map(Arc::new),
    };
    x.contiguous()?.apply_op3(&y.contiguous()?, &p, op)
}

/// The shapes of a DCNv3 layer's core branch for [`dcn_core`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct DcnCoreSpec {
    /// The depthwise conv's kernel size and zero padding.
    pub(crate) dw_kernel: usize,
    pub(crate) dw_pad: usize,
    /// The block's norm (before the layer) and the offset branch's norm epsilons.
    pub(crate) eps: f32,
    pub(crate) dw_eps: f32,
    /// The core op's geometry.
    pub(crate) core: crate::ops::dcnv3::Dcnv3Config,
}

/// What the forward of [`DcnCoreOp`] keeps for its backward.
struct DcnCoreSaved {
    v: Vec<f32>,
    f: Vec<f32>,
    offset: Vec<f32>,
    mask: Vec<f32>,
    /// The core's output (the output projection's input).
    y: Vec<f32>,
}

/// A pre-norm block's DCNv3 branch and its residual update, as one training op:
/// `x + s[sample] * output_proj(core(input_proj(n), offset(f), softmax(mask(f))))` with
/// `n = layer_norm(x)` and `f = gelu(layer_norm(dw_conv(n)))` (`s` the optional stochastic-depth
/// scale per sample), over an (N, H, W, C) input, the input projection's weight (C, C) and the
/// other parameters stacked in rows of C (see [`DcnCoreOp::parts`]). The forward keeps the core's
/// operands, its output and `f` (the tensors the backward needs that cost a GEMM to recompute);
/// the normalised input is recomputed. The graph holds this one node where ten ops stood (each
/// costing the backward a zero-filled gradient and an add on the calling thread, and keeping its
/// input alive).
struct DcnCoreOp {
    isa: Isa,
    spec: DcnCoreSpec,
    /// Whether the output projection has a bias.
    out_bias: bool,
    /// Per-sample stochastic-depth scales of the residual update, one per leading index.
    scale: Option<Arc<Vec<f32>>>,
    saved: OnceLock<DcnCoreSaved>,
}

impl DcnCoreOp {
    /// Lengths of the stacked parameter parts, in order: the offset weight, the mask weight, the
    /// depthwise taps and bias ((k * k + 1) * C), the output projection's weight (the rows), then
    /// the norm weight and bias, the input projection's bias, the offset branch's norm weight and
    /// bias, the offset bias, the mask bias and the output projection's bias (0 without; the
    /// tail).
    fn parts(&self, c: usize) -> [usize; 12] {
        let (g, p) = (self.spec.core.group, self.spec.core.points());
        let k = self.spec.dw_kernel;
        [
            2 * g * p * c,
            g * p * c,
            (k * k + 1) * c,
            c * c,
            c,
            c,
            c,
            c,
            c,
            2 * g * p,
            g * p,
            if self.out_bias { c } else { 0 },
        ]
    }

    /// The input projection's weight `iw` and the stacked parts of `p` ([`Self::parts`]) for a
    /// batch of `n` with `c` channels, after checking their sizes (and the scales' count).
    fn split<'a>(
        &self,
        iw: &'a [f32],
        p: &'a [f32],
        (n, c): (usize, usize),
    ) -> Result<(&'a [f32], [&'a [f32]; 12])> {
        match split_stacked(p, self.parts(c), c) {
            Some(parts)
                if iw.len() == c * c
                    && c == self.spec.core.group * self.spec.core.group_channels
                    && self.scale.as_ref().is_none_or(|s| s.len() == n) =>
            {
                Ok((iw, parts))
            }
            _ => candle_core::bail!(
                "dcn core: {} and {} parameters ({} sample scales) do not fit {n} samples of {c} \
                 channels",
                iw.len(),
                p.len(),
                self.scale.as_ref().map_or(0, |s| s.len())
            ),
        }
    }

    /// The core's geometry for an (N, H, W, C) input.
    fn geometry(
        &self,
        dims: (usize, usize, usize, usize),
    ) -> Result<crate::ops::dcnv3::Dcnv3Geometry> {
        let (n, h, w, c) = dims;
        let gp = self.spec.core.group * self.spec.core.points();
        self.spec.core.geometry(
            &Shape::from((n, h, w, c)),
            &Shape::from((n, h, w, 2 * gp)),
            &Shape::from((n, h, w, gp)),
        )
    }
}

impl CustomOp3 for DcnCoreOp {
    fn name(&self) -> &'static str {
        "internimage-train-dcn-core"
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
        use crate::ops::dcnv3::cpu;
        let what = "dcn core";
        let dims = l1.shape().dims4()?;
        let (n, h, w, c) = dims;
        let x = contiguous_slice::<f32>(s1, l1, what, "input")?;
        let iw = contiguous_slice::<f32>(s2, l2, what, "input projection weight")?;
        let p = contiguous_slice::<f32>(s3, l3, what, "parameters")?;
        let (iw, [ow, mw, taps, pw, nw, nb, ib, fw, fb, ob, mb, pb]) = self.split(iw, p, (n, c))?;
        let (isa, m) = (self.isa, n * h * w);
        let gp = self.spec.core.group * self.spec.core.points();
        let geo = self.geometry(dims)?;
        if (geo.h_out, geo.w_out) != (h, w) || self.spec.dw_pad * 2 + 1 != self.spec.dw_kernel {
            candle_core::bail!(
                "dcn core: the core ({}x{} from {h}x{w}) and the depthwise conv (kernel {}, pad {}) \
                 must keep the spatial size",
                geo.h_out,
                geo.w_out,
                self.spec.dw_kernel,
                self.spec.dw_pad
            )
        }
        let xn = layer_norm_rows(isa, x, nw, nb, self.spec.eps);
        let v = linear_forward(isa, &xn, m, iw, Some(ib), c)?;
        let k = (self.spec.dw_kernel, self.spec.dw_kernel, self.spec.dw_pad);
        let f = super::depthwise::dw_norm_gelu_forward(
            isa,
            dims,
            k,
            &xn,
            taps,
            (fw, fb),
            self.spec.dw_eps,
        )?;
        drop(xn);
        let offset = linear_forward(isa, &f, m, ow, Some(ob), 2 * gp)?;
        let mask = super::fused::softmax_groups_rows(
            isa,
            &linear_forward(isa, &f, m, mw, Some(mb), gp)?,
            self.spec.core.points(),
        );
        let lay = cpu::PointLayout::dcnv3(&geo);
        let y = cpu::forward(isa, &self.spec.core, &geo, lay, &v, &offset, &mask);
        // The output projection and the residual update.
        let mut out = linear_forward(isa, &y, m, pw, self.out_bias.then_some(pb), c)?;
        add_residual(&mut out, x, c, per_sample(&self.scale));
        // `cpu_fwd` runs once per op value; a second run would keep the same values.
        let _ = self.saved.set(DcnCoreSaved {
            v,
            f,
            offset,
            mask,
            y,
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        iw: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::ops::backward_on_pool(grad, || {
            use crate::ops::dcnv3::cpu;
            let Some(sv) = self.saved.get() else {
                candle_core::bail!("dcn core backward: internal error, the forward kept nothing")
            };
            let dims = x.dims4()?;
            let (n, h, w, c) = dims;
            let (isa, m) = (self.isa, n * h * w);
            let gp = self.spec.core.group * self.spec.core.points();
            let geo = self.geometry(dims)?;
            let (xt, iwt, pt, g) = (
                x.contiguous()?,
                iw.contiguous()?,
                p.contiguous()?,
                grad.contiguous()?,
            );
            let (xs, xl) = xt.storage_and_layout();
            let (iws, iwl) = iwt.storage_and_layout();
            let (ps, pl) = pt.storage_and_layout();
            let (gs, gl) = g.storage_and_layout();
            let xv = values(&xs, xl, "input")?;
            let iwv = values(&iws, iwl, "input projection weight")?;
            let pv = values(&ps, pl, "parameters")?;
            let gv = values(&gs, gl, "gradient")?;
            let (iwv, [ow, mw, taps, pw, nw, nb, _ib, fw, fb, _ob, _mb, _pb]) =
                self.split(iwv, pv, (n, c))?;
            if gv.len() != geo.output_len() || sv.y.len() != m * c {
                candle_core::bail!("dcn core backward: gradient of {} values", gv.len())
            }
            // The output projection (its gradient the block's, scaled per sample).
            let gproj = scaled_per_sample(gv, per_sample(&self.scale));
            let dy = input_grad(isa, &gproj, m, pw, c, c)?;
            let (dpw, dpb) = weight_grads(&gproj, &sv.y, m, c, c);
            drop(gproj);
            // The core.
            let mut dv = super::written_zeros_par(geo.input_len());
            let mut doff = super::written_zeros_par(geo.offset_len());
            let mut dmask = super::written_zeros_par(geo.mask_len());
            let rows = cpu::GradRows {
                off: &mut doff,
                mask: Some(&mut dmask),
            };
            let lay = cpu::PointLayout::dcnv3(&geo);
            cpu::backward(
                isa,
                &self.spec.core,
                &geo,
                lay,
                &sv.v,
                &sv.offset,
                &sv.mask,
                &dy,
                &mut dv,
                rows,
            );
            drop(dy);
            // The softmax, the offset and mask projections.
            let dlogits = super::fused::softmax_groups_backward_rows(
                &sv.mask,
                &dmask,
                self.spec.core.points(),
            );
            drop(dmask);
            let mut df = input_grad(isa, &doff, m, ow, 2 * gp, c)?;
            add_into_par(&mut df, &input_grad(isa, &dlogits, m, mw, gp, c)?);
            let (dow, dob) = weight_grads(&doff, &sv.f, m, 2 * gp, c);
            let (dmw, dmb) = weight_grads(&dlogits, &sv.f, m, gp, c);
            drop((doff, dlogits));
            // The offset branch's features and the input projection, from the normalised input.
            let xn = layer_norm_rows(isa, xv, nw, nb, self.spec.eps);
            let k = (self.spec.dw_kernel, self.spec.dw_kernel, self.spec.dw_pad);
            let (mut dxn, dtaps, dfn) = super::depthwise::dw_norm_gelu_backward(
                isa,
                dims,
                k,
                (&xn, taps, (fw, fb), &df),
                self.spec.dw_eps,
            )?;
            drop(df);
            add_into_par(&mut dxn, &input_grad(isa, &dv, m, iwv, c, c)?);
            let (diw, dib) = weight_grads(&dv, &xn, m, c, c);
            drop((dv, xn));
            // The block's norm, then the residual path.
            let (mut dx, mut dnw) = layer_norm_backward_rows(isa, xv, &dxn, nw, self.spec.eps);
            let dnb = dnw.split_off(c);
            add_into_par(&mut dx, gv);
            let dx = x
                .track_op()
                .then(|| tensor(dx, xl.shape().clone()))
                .transpose()?;
            let diw = iw
                .track_op()
                .then(|| tensor(diw, iwl.shape().clone()))
                .transpose()?;
            let dp = p
                .track_op()
                .then(|| {
                    let dpb: &[f32] = if self.out_bias { &dpb } else { &[] };
                    let rest = [
                        &dmw[..],
                        &dtaps,
                        &dpw,
                        &dnw,
                        &dnb,
                        &dib,
                        &dfn,
                        &dob,
                        &dmb,
                        dpb,
                    ];
                    stacked_grad(dow, &rest, pl.shape())
                })
                .transpose()?;
            Ok((dx, diw, dp))
        })
    }
}

/// The DCNv3 branch of a pre-norm block and its residual update (see [`DcnCoreOp`]): `x` (N,
/// H, W, C), the parameters `[norm weight, norm bias, input_proj weight, input_proj bias,
/// depthwise taps, offset-branch norm weight, its bias, offset weight, offset bias, mask weight,
/// mask bias]` (the weights 2-D, the taps (k * k + 1, C) with the bias row last), the output
/// projection (weight, optional bias) and the optional per-sample stochastic-depth scales. f32
/// CPU tensors only.
pub(crate) fn dcn_core(
    x: &Tensor,
    params: [&Tensor; 11],
    (pw, pb): (&Tensor, Option<&Tensor>),
    sample_scale: Option<Vec<f32>>,
    spec: DcnCoreSpec,
    isa: Isa,
) -> Result<Tensor> {
    let [nw, nb, iw, ib, taps, fw, fb, ow, ob, mw, mb] = params;
    let tail: Vec<&Tensor> = [nw, nb, ib, fw, fb, ob, mb].into_iter().chain(pb).collect();
    let p = stack_params(&[ow, mw, taps, pw], &tail)?;
    let op = DcnCoreOp {
        isa,
        spec,
        out_bias: pb.is_some(),
        scale: sample_scale.map(Arc::new),
        saved: OnceLock::new(),
    };
    x.contiguous()?.apply_op3(&iw.contiguous()?, &p, op)
}

/// `x + s[sample] * gamma[channel] * y` (either scale optional), and its backward.
struct ResidualOp {
    /// Per-sample scale (stochastic depth: 0 or 1 / keep), one per leading index.
    scale: Option<Arc<Vec<f32>>>,
}

impl ResidualOp {
    /// `out = x + s * gamma * y` over whole samples.
    fn forward(&self, x: &[f32], y: &[f32], gamma: Option<&[f32]>) -> Result<Vec<f32>> {
        let n = self.scale.as_ref().map_or(1, |s| s.len()).max(1);
        let c = gamma.map_or(1, |g| g.len()).max(1);
        if x.len() != y.len() || !x.len().is_multiple_of(n) || !(x.len() / n).is_multiple_of(c) {
            candle_core::bail!("residual: operand sizes {} and {}", x.len(), y.len())
        }
        let per = x.len() / n;
        let mut out = vec![0f32; x.len()];
        let chunk = (16 * 1024 / c).max(1) * c;
        out.par_chunks_mut(per)
            .zip(x.par_chunks(per).zip(y.par_chunks(per)))
            .enumerate()
            .for_each(|(i, (o, (x, y)))| {
                let s = self.scale.as_ref().map_or(1.0, |s| s[i]);
                o.par_chunks_mut(chunk)
                    .zip(x.par_chunks(chunk).zip(y.par_chunks(chunk)))
                    .for_each(|(o, (x, y))| match gamma {
                        None => {
                            for ((o, &x), &y) in o.iter_mut().zip(x).zip(y) {
                                *o = x + s * y;
                            }
                        }
                        Some(g) => {
                            for ((o, x), y) in o.chunks_mut(c).zip(x.chunks(c)).zip(y.chunks(c)) {
                                for (((o, &x), &y), &g) in o.iter_mut().zip(x).zip(y).zip(g) {
                                    *o = x + s * g * y;
                                }
                            }
                        }
                    });
            });
        Ok(out)
    }

    /// (dy, dgamma) for the gradient `g` of the output.
    fn backward(
        &self,
        g: &Tensor,
        y: &Tensor,
        gamma: Option<&Tensor>,
        need_y: bool,
        need_gamma: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if gamma.is_none() && self.scale.is_none() {
            return Ok((need_y.then(|| g.clone()), None));
        }
        let g = g.contiguous()?;
        let (gs, gl) = g.storage_and_layout();
        let gv = values(&gs, gl, "gradient")?;
        let gamma_t = gamma.map(|t| t.contiguous()).transpose()?;
        let guard = gamma_t.as_ref().map(|t| t.storage_and_layout());
        let gam = match &guard {
            Some((s, l)) => Some(values(s, l, "gamma")?),
            None => None,
        };
        let n = self.scale.as_ref().map_or(1, |s| s.len()).max(1);
        let c = gam.map_or(1, |g| g.len()).max(1);
        let per = gv.len() / n;
        let scale = |i: usize| self.scale.as_ref().map_or(1.0, |s| s[i]);
        let dy = if need_y {
            let mut dy = vec![0f32; gv.len()];
            dy.par_chunks_mut(per)
                .zip(gv.par_chunks(per))
                .enumerate()
                .for_each(|(i, (d, g))| {
                    let s = scale(i);
                    match gam {
                        None => d.iter_mut().zip(g).for_each(|(d, &g)| *d = s * g),
                        Some(gm) => {
                            for (d, g) in d.chunks_mut(c).zip(g.chunks(c)) {
                                for ((d, &g), &w) in d.iter_mut().zip(g).zip(gm) {
                                    *d = s * w * g;
                                }
                            }
                        }
                    }
                });
            Some(tensor(dy, g.shape().clone())?)
        } else {
            None
        };
        let dgamma = match gam {
            Some(_) if need_gamma => {
                let y = y.contiguous()?;
                let (ys, yl) = y.storage_and_layout();
                let yv = values(&ys, yl, "branch")?;
                let parts: Vec<Vec<f32>> = gv
                    .par_chunks(per)
                    .zip(yv.par_chunks(per))
                    .enumerate()
                    .map(|(i, (g, y))| {
                        let s = scale(i);
                        let mut acc = vec![0f32; c];
                        for (g, y) in g.chunks(c).zip(y.chunks(c)) {
                            for ((a, &g), &y) in acc.iter_mut().zip(g).zip(y) {
                                *a += g * y;
                            }
                        }
                        acc.iter_mut().for_each(|a| *a *= s);
                        acc
                    })
                    .collect();
                let mut total = vec![0f32; c];
                for p in &parts {
                    add_into(&mut total, p);
                }
                Some(tensor(total, c)?)
            }
            _ => None,
        };
        Ok((dy, dgamma))
    }
}

impl CustomOp2 for ResidualOp {
    fn name(&self) -> &'static str {
        "internimage-train-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_slice::<f32>(s1, l1, "residual", "input")?;
        let y = contiguous_slice::<f32>(s2, l2, "residual", "branch")?;
        Ok((
            CpuStorage::F32(self.forward(x, y, None)?),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        crate::ops::backward_on_pool(grad, || {
            let (dy, _) = self.backward(grad, y, None, y.track_op(), false)?;
            Ok((x.track_op().then(|| grad.clone()), dy))
        })
    }
}

impl CustomOp3 for ResidualOp {
    fn name(&self) -> &'static str {
        "internimage-train-residual-scale"
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
        let x = contiguous_slice::<f32>(s1, l1, "residual", "input")?;
        let y = contiguous_slice::<f32>(s2, l2, "residual", "branch")?;
        let g = contiguous_slice::<f32>(s3, l3, "residual", "gamma")?;
        Ok((
            CpuStorage::F32(self.forward(x, y, Some(g))?),
            l1.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        gamma: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        crate::ops::backward_on_pool(grad, || {
            let (dy, dg) = self.backward(grad, y, Some(gamma), y.track_op(), gamma.track_op())?;
            Ok((x.track_op().then(|| grad.clone()), dy, dg))
        })
    }
}

/// The residual update `x + drop_path(gamma * y)`: `gamma` (C) per channel (the last dim) and
/// `sample_scale` (one value per sample of the leading dim: 0 for a dropped sample, 1 / keep
/// otherwise), both optional; differentiable with respect to `x`, `y` and `gamma`. f32 CPU
/// tensors of equal shapes only.
pub(crate) fn residual(
    x: &Tensor,
    y: &Tensor,
    gamma: Option<&Tensor>,
    sample_scale: Option<Vec<f32>>,
) -> Result<Tensor> {
    if x.dims() != y.dims() {
        candle_core::bail!("residual: shapes {:?} and {:?} differ", x.dims(), y.dims())
    }
    if let Some(s) = &sample_scale {
        if x.rank() == 0 || s.len() != x.dim(0)? {
            candle_core::bail!("residual: {} sample scales for {:?}", s.len(), x.dims())
        }
    }
    let op = ResidualOp {
        scale: sample_scale.map(Arc::new),
    };
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    match gamma {
        Some(g) => {
            let c = x.dim(candle_core::D::Minus1)?;
            if g.dims() != [c] {
                candle_core::bail!("residual: gamma {:?} for {c} channels", g.dims())
            }
            x.apply_op3(&y, &g.contiguous()?, op)
        }
        None => x.apply_op2(&y, op),
    }
}

/// The per-sample stochastic-depth scales of a batch of `n`: each sample is dropped (0) with
/// probability `p`, else scaled by `1 / (1 - p)` (timm's `drop_path` with `scale_by_keep`);
/// `None` (identity) unless `p > 0`. Draws from candle's CPU generator like `Tensor::rand`.
pub(crate) fn drop_path_scales(n: usize, p: f64) -> Result<Option<Vec<f32>>> {
    // NaN is no drop rate either.
    let drops = p > 0.0;
    if !drops {
        return Ok(None);
    }
    let keep = 1.0 - p;
    let u = Tensor::rand(0f32, 1f32, n, &Device::Cpu)?.to_vec1::<f32>()?;
    Ok(Some(
        u.into_iter()
            .map(|u| {
                if u < keep as f32 {
                    (1.0 / keep) as f32
                } else {
                    0.0
                }
            })
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .unwrap_or(f32::INFINITY)
    }

    /// Relative max difference, for values of any magnitude.
    fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let scale = b
            .abs()
            .and_then(|t| t.flatten_all()?.max(0)?.to_scalar::<f32>())
            .unwrap_or(1.0)
            .max(1e-6);
        max_diff(a, b) / scale
    }

    #[test]
    fn row_blocks_fold_into_one_accumulator_per_thread() {
        // 1000 rows in blocks of 7 (a partial last one), with and without an input gradient.
        let (m, rows, width) = (1000usize, 7usize, 3usize);
        let blocks = m.div_ceil(rows);
        for with_dx in [true, false] {
            let mut dx = vec![0f32; m * width];
            let accs = fold_row_blocks(
                m,
                rows,
                width,
                with_dx.then_some(&mut dx[..]),
                || (0usize, 0usize),
                |acc: &mut (usize, usize), b, dxb| {
                    acc.0 += 1;
                    acc.1 += b;
                    if let Some(d) = dxb {
                        d.fill(b as f32);
                    }
                },
            );
            assert!(accs.len() <= rayon::current_num_threads(), "{}", accs.len());
            assert_eq!(accs.iter().map(|a| a.0).sum::<usize>(), blocks);
            assert_eq!(
                accs.iter().map(|a| a.1).sum::<usize>(),
                blocks * (blocks - 1) / 2
            );
            if with_dx {
                for (r, row) in dx.chunks_exact(width).enumerate() {
                    assert!(row.iter().all(|&v| v == (r / rows) as f32), "row {r}");
                }
            }
        }
    }

    #[test]
    fn prenorm_mlp_residual_matches_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        let isa = crate::KernelPolicy::process_default()?.isa();
        let v = |shape: &[usize], s: f32| -> Result<Var> {
            Var::from_tensor(&(Tensor::randn(0f32, 1., shape, &dev)? * s as f64)?)
        };
        // Several row blocks of the backward (rows = 32768 / hid) and a partial last one.
        let (c, hid) = (24, 96);
        let x = v(&[3, 13, 11, c], 1.0)?;
        let w1 = v(&[hid, c], 0.2)?;
        let b1 = v(&[hid], 0.1)?;
        let w2 = v(&[c, hid], 0.1)?;
        let b2 = v(&[c], 0.1)?;
        let lw = Var::from_tensor(&(Tensor::randn(0f32, 0.1, c, &dev)? + 1.0)?)?;
        let lb = v(&[c], 0.1)?;
        let r = Tensor::randn(0f32, 1., (3, 13, 11, c), &dev)?;
        // Hidden activations kept by the forward (usize::MAX) and recomputed by the backward (0).
        for (bias2, scale, keep) in [
            (true, Some(vec![1.25f32, 0.0, 1.25]), usize::MAX),
            (true, Some(vec![1.25f32, 0.0, 1.25]), 0),
            (false, None, usize::MAX),
            (false, None, 0),
            (true, None, 0),
        ] {
            let b2o = bias2.then(|| b2.as_tensor());
            let ours = prenorm_mlp_residual_keeping(
                x.as_tensor(),
                (lw.as_tensor(), lb.as_tensor(), 1e-6),
                (w1.as_tensor(), b1.as_tensor()),
                (w2.as_tensor(), b2o),
                scale.clone(),
                isa,
                keep,
            )?;
            // Reference: candle tensor ops throughout.
            let xt = x.as_tensor();
            let mean = xt.mean_keepdim(candle_core::D::Minus1)?;
            let xc = xt.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
            let xn = xc
                .broadcast_div(&(var + 1e-6)?.sqrt()?)?
                .broadcast_mul(lw.as_tensor())?
                .broadcast_add(lb.as_tensor())?;
            let h = xn
                .broadcast_matmul(&w1.as_tensor().t()?)?
                .broadcast_add(b1.as_tensor())?
                .gelu_erf()?;
            let mut y = h.broadcast_matmul(&w2.as_tensor().t()?)?;
            if let Some(b) = b2o {
                y = y.broadcast_add(b)?;
            }
            if let Some(s) = &scale {
                y = y.broadcast_mul(&Tensor::from_vec(s.clone(), (3, 1, 1, 1), &dev)?)?;
            }
            let want = (xt + y)?;
            assert!(rel_diff(&ours, &want) < 1e-5, "forward differs");
            let ga = (ours * &r)?.sum_all()?.backward()?;
            let gb = (want * &r)?.sum_all()?.backward()?;
            let mut vars = vec![("x", &x), ("w1", &w1), ("b1", &b1), ("ln w", &lw)];
            vars.extend([("ln b", &lb), ("w2", &w2)]);
            if bias2 {
                vars.push(("b2", &b2));
            }
            for (name, v) in vars {
                match (ga.get(v.as_tensor()), gb.get(v.as_tensor())) {
                    (Some(a), Some(b)) => {
                        let d = rel_diff(a, b);
                        assert!(
                            d < 1e-4,
                            "{name} gradient differs by {d} (bias2 {bias2}, keep {keep})"
                        )
                    }
                    _ => panic!("missing gradient of {name}"),
                }
            }
        }
        Ok(())
    }

    /// The fused DCN branch's stochastic depth against its unscaled run (which the pre-norm
    /// network test in tests/train_ops.rs checks against the unfused layers): with per-sample
    /// scales `s`, `out = x + s * branch`, so for a loss `sum(out * r)` every parameter gradient
    /// equals the unscaled op's under `sum(out * s r)`, and the input's differs by `r - s r`.
    #[test]
    fn dcn_branch_drop_path_scales_the_branch_per_sample() -> Result<()> {
        let dev = Device::Cpu;
        let isa = crate::KernelPolicy::process_default()?.isa();
        let (n, h, w, g, gc) = (3, 5, 6, 2, 8);
        let (c, points) = (g * gc, 9);
        let v = |shape: &[usize], scale: f64, shift: f64| -> Result<Var> {
            let t = ((Tensor::randn(0f32, 1., shape, &dev)? * scale)? + shift)?;
            Var::from_tensor(&t)
        };
        let x = v(&[n, h, w, c], 1.0, 0.0)?;
        let (nw, nb) = (v(&[c], 0.1, 1.0)?, v(&[c], 0.1, 0.0)?);
        let (iw, ib) = (v(&[c, c], 0.2, 0.0)?, v(&[c], 0.1, 0.0)?);
        let taps = v(&[3 * 3 + 1, c], 0.2, 0.0)?;
        let (fw, fb) = (v(&[c], 0.1, 1.0)?, v(&[c], 0.1, 0.0)?);
        let (ow, ob) = (
            v(&[2 * g * points, c], 0.1, 0.0)?,
            v(&[2 * g * points], 0.5, 0.0)?,
        );
        let (mw, mb) = (v(&[g * points, c], 0.2, 0.0)?, v(&[g * points], 0.1, 0.0)?);
        let (pw, pb) = (v(&[c, c], 0.2, 0.0)?, v(&[c], 0.1, 0.0)?);
        let spec = DcnCoreSpec {
            dw_kernel: 3,
            dw_pad: 1,
            eps: 1e-6,
            dw_eps: 1e-6,
            core: crate::ops::dcnv3::Dcnv3Config::internimage(g, gc, 1.0),
        };
        let vars = [
            &x, &nw, &nb, &iw, &ib, &taps, &fw, &fb, &ow, &ob, &mw, &mb, &pw, &pb,
        ];
        let r = Tensor::randn(0f32, 1., (n, h, w, c), &dev)?;
        let scale = vec![1.25f32, 0.0, 1.25];
        let s = Tensor::from_vec(scale.clone(), (n, 1, 1, 1), &dev)?;
        for bias in [true, false] {
            let run = |scale: Option<Vec<f32>>,
                       r: &Tensor|
             -> Result<(Tensor, candle_core::backprop::GradStore)> {
                let params = [&nw, &nb, &iw, &ib, &taps, &fw, &fb, &ow, &ob, &mw, &mb]
                    .map(|v| v.as_tensor());
                let proj = (pw.as_tensor(), bias.then(|| pb.as_tensor()));
                let out = dcn_core(x.as_tensor(), params, proj, scale, spec, isa)?;
                let grads = (&out * r)?.sum_all()?.backward()?;
                Ok((out, grads))
            };
            let (scaled, gs) = run(Some(scale.clone()), &r)?;
            let (plain, gp) = run(None, &r.broadcast_mul(&s)?)?;
            // Forward: the branch scaled per sample.
            let want = (x.as_tensor() + (&plain - x.as_tensor())?.broadcast_mul(&s)?)?;
            assert!(rel_diff(&scaled, &want) < 1e-5, "forward (bias {bias})");
            let skip = (&r - r.broadcast_mul(&s)?)?;
            for (i, v) in vars.iter().enumerate() {
                let (Some(a), Some(e)) = (gs.get(v.as_tensor()), gp.get(v.as_tensor())) else {
                    assert!(!bias && i == vars.len() - 1, "missing gradient of var {i}");
                    continue;
                };
                let e = if i == 0 { (e + &skip)? } else { e.clone() };
                let d = rel_diff(a, &e);
                assert!(d < 1e-5, "gradient of var {i} differs by {d} (bias {bias})");
            }
        }
        Ok(())
    }

    #[test]
    fn projection_residual_matches_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        let isa = crate::KernelPolicy::process_default()?.isa();
        let (c, k) = (6, 10);
        let v = |shape: &[usize]| -> Result<Var> {
            Var::from_tensor(&Tensor::randn(0f32, 1., shape, &dev)?)
        };
        let (x, y, w, b) = (v(&[3, 4, 5, c])?, v(&[3, 4, 5, k])?, v(&[c, k])?, v(&[c])?);
        let r = Tensor::randn(0f32, 1., (3, 4, 5, c), &dev)?;
        for (bias, scale) in [
            (true, Some(vec![0.0, 1.25, 1.25])),
            (false, Some(vec![1.25, 0.0, 1.25])),
            (true, None),
            (false, None),
        ] {
            let bo = bias.then(|| b.as_tensor());
            let ours = project_residual(
                x.as_tensor(),
                y.as_tensor(),
                w.as_tensor(),
                bo,
                scale.clone(),
                isa,
            )?;
            let mut branch = y.as_tensor().broadcast_matmul(&w.as_tensor().t()?)?;
            if let Some(b) = bo {
                branch = branch.broadcast_add(b)?;
            }
            if let Some(s) = &scale {
                branch = branch.broadcast_mul(&Tensor::from_vec(s.clone(), (3, 1, 1, 1), &dev)?)?;
            }
            let want = (x.as_tensor() + branch)?;
            assert!(rel_diff(&ours, &want) < 1e-5, "forward differs");
            let ga = (ours * &r)?.sum_all()?.backward()?;
            let gb = (want * &r)?.sum_all()?.backward()?;
            let mut vars = vec![("x", &x), ("y", &y), ("w", &w)];
            if bias {
                vars.push(("b", &b));
            }
            for (name, v) in vars {
                match (ga.get(v.as_tensor()), gb.get(v.as_tensor())) {
                    (Some(a), Some(e)) => {
                        let d = rel_diff(a, e);
                        assert!(d < 1e-5, "{name} gradient differs by {d} (bias {bias})")
                    }
                    _ => panic!("missing gradient of {name}"),
                }
            }
        }
        Ok(())
    }

    #[test]
    fn residual_backward_matches_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 4, 5, 6), &dev)?)?;
        let y = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 4, 5, 6), &dev)?)?;
        let g = Var::from_tensor(&Tensor::randn(0f32, 1., 6, &dev)?)?;
        let r = Tensor::randn(0f32, 1., (3, 4, 5, 6), &dev)?;
        for (gamma, scale) in [
            (true, Some(vec![0.0, 1.25, 1.25])),
            (false, Some(vec![1.25, 0.0, 1.25])),
            (true, None),
            (false, None),
        ] {
            let gm = gamma.then(|| g.as_tensor());
            let ours = residual(x.as_tensor(), y.as_tensor(), gm, scale.clone())?;
            let mut branch = y.as_tensor().clone();
            if let Some(gm) = gm {
                branch = branch.broadcast_mul(gm)?;
            }
            if let Some(s) = &scale {
                branch = branch.broadcast_mul(&Tensor::from_vec(s.clone(), (3, 1, 1, 1), &dev)?)?;
            }
            let want = (x.as_tensor() + branch)?;
            assert!(max_diff(&ours, &want) < 1e-6);
            let ga = (ours * &r)?.sum_all()?.backward()?;
            let gb = (want * &r)?.sum_all()?.backward()?;
            let mut vars = vec![&x, &y];
            if gamma {
                vars.push(&g);
            }
            for v in vars {
                let (a, b) = (ga.get(v.as_tensor()), gb.get(v.as_tensor()));
                match (a, b) {
                    (Some(a), Some(b)) => assert!(max_diff(a, b) < 1e-5, "gradient differs"),
                    _ => panic!("missing gradient"),
                }
            }
        }
        Ok(())
    }
}
