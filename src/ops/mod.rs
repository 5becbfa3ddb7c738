//! Operators: DCNv3 and DCNv4 (CPU, CUDA, Metal) and the fast channels-last helpers the network
//! needs, as Candle ops over the generic CPU kernels of [`crate::cpu`].

pub mod activation;
pub mod conv;
pub mod dcnv3;
pub mod dcnv4;
pub(crate) mod dense;
pub mod depthwise;
pub mod fused;
pub(crate) mod train;

pub use activation::{gelu_erf, gelu_erf_with};
pub use conv::Conv2dNhwc;
pub use dcnv3::{dcnv3, Dcnv3Config};
pub use dcnv4::dcnv4;
pub use dense::{linear, linear_gelu, mlp, Linear};
pub use depthwise::depthwise_conv2d_nhwc;
pub use fused::{
    layer_norm_last_dim, layer_norm_last_dim_with, softmax_groups, softmax_groups_with,
};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Tensor};

/// Output (height, width) of a 2-D window op: `(size + 2*pad - extent) / stride + 1` per axis for
/// an input of `size` = (h, w), window `extent` (the dilated kernel), `stride` and `pad`.
///
/// An error when the padded input is smaller than the window, a stride is 0, or a size
/// overflows (a hostile `pad` or kernel): `op` names the operator in the message.
pub(crate) fn window_out_size(
    op: &str,
    size: (usize, usize),
    extent: (usize, usize),
    stride: (usize, usize),
    pad: (usize, usize),
) -> Result<(usize, usize)> {
    let axis = |n: usize, e: usize, s: usize, p: usize| -> Result<usize> {
        let padded = p.checked_mul(2).and_then(|p2| n.checked_add(p2));
        match padded {
            _ if s == 0 => candle_core::bail!("{op}: the stride must be at least 1, got 0"),
            None => candle_core::bail!(
                "{op}: padding {p} is too large (the padded size of an input of {n} overflows)"
            ),
            Some(padded) if padded < e || e == 0 => candle_core::bail!(
                "{op}: a {}x{} kernel window does not fit a {}x{} input padded by {}x{}; use a \
                 larger input or more padding",
                extent.0,
                extent.1,
                size.0,
                size.1,
                pad.0,
                pad.1
            ),
            Some(padded) => Ok((padded - e) / s + 1),
        }
    };
    Ok((
        axis(size.0, extent.0, stride.0, pad.0)?,
        axis(size.1, extent.1, stride.1, pad.1)?,
    ))
}

/// An empty vector with room for the `dims` product of elements: an error naming `op` (instead
/// of an abort) when the product overflows or the allocation fails.
pub(crate) fn try_output_vec<T>(op: &str, dims: &[usize]) -> Result<Vec<T>> {
    let too_big = || {
        candle_core::Error::msg(format!(
            "{op}: an output of shape {dims:?} is larger than this machine can allocate; use a \
             smaller input (or padding)"
        ))
    };
    let len = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(too_big)?;
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| too_big())?;
    Ok(v)
}

/// `len` copies of `zero` written into fresh memory, for a buffer that a kernel accumulates into
/// (reads before it writes). `vec![0.0; len]` maps a large buffer lazily onto the shared zero
/// page, so each page then faults twice: on the first read, and on the first write a
/// copy-on-write fault whose TLB flush interrupts every other CPU running the process (in the
/// DCNv3 backward at N=8 on 2 threads, this doubled the time). Written zeros fault once.
pub(crate) fn written_zeros<T: Copy>(len: usize, zero: T) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    v.resize(len, zero);
    v
}

/// [`written_zeros`] of f32, written by the rayon pool (a large gradient buffer zeroed on the
/// calling thread alone leaves the other cores idle meanwhile).
pub(crate) fn written_zeros_par(len: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const RUN: usize = 64 * 1024;
    if len <= RUN {
        return written_zeros(len, 0f32);
    }
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(RUN)
        .for_each(|c| c.iter_mut().for_each(|z| _ = z.write(0.0)));
    // SAFETY: the chunks cover the first `len` values of the capacity, each written above.
    unsafe { v.set_len(len) };
    v
}

// The gradient contract of the fast ops: every custom op of this crate either implements `bwd`
// (applied with `apply_op*`) or is inference-only and applied through `inference_op1/2/3` below,
// which refuse a tensor that tracks a gradient. Callers step aside to a differentiable path
// (candle tensor ops) before they get there, so the refusal is an internal error that a test would
// catch; `tests/gradients.rs` also checks that no `apply_op*_no_bwd` call exists elsewhere.

/// Whether any of `ts` is part of an autograd graph (a `Var`, or computed from one): the fast
/// inference-only kernels must then step aside.
pub(crate) fn tracks_grad(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

fn refuse_tracked(name: &str, ts: &[&Tensor]) -> Result<()> {
    if tracks_grad(ts) {
        candle_core::bail!(
            "internal error: the inference-only kernel `{name}` was given a tensor that tracks \
             gradients (its gradient would be lost); please report this"
        )
    }
    Ok(())
}

/// `x.apply_op1_no_bwd(op)` for an inference-only op, refusing tracked tensors.
pub(crate) fn inference_op1(x: &Tensor, op: &impl CustomOp1) -> Result<Tensor> {
    refuse_tracked(op.name(), &[x])?;
    x.apply_op1_no_bwd(op)
}

/// `a.apply_op2_no_bwd(b, op)` for an inference-only op, refusing tracked tensors.
pub(crate) fn inference_op2(a: &Tensor, b: &Tensor, op: &impl CustomOp2) -> Result<Tensor> {
    refuse_tracked(op.name(), &[a, b])?;
    a.apply_op2_no_bwd(b, op)
}

/// `a.apply_op3_no_bwd(b, c, op)` for an inference-only op, refusing tracked tensors.
pub(crate) fn inference_op3(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    op: &impl CustomOp3,
) -> Result<Tensor> {
    refuse_tracked(op.name(), &[a, b, c])?;
    a.apply_op3_no_bwd(b, c, op)
}

/// The f32 values of a tensor's storage as one contiguous slice (see [`contiguous_slice`]), for
/// the CPU-only kernels that read a tensor through `storage_and_layout`; an error naming `op`
/// and `what` for storage that is not on the CPU.
pub(crate) fn cpu_f32_values<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(s) => contiguous_slice::<f32>(s, layout, op, what),
        _ => {
            candle_core::bail!("{op}: the {what} must be on the CPU (this kernel has no GPU path)")
        }
    }
}

/// The values of a CPU tensor as one contiguous slice of `T`, for the custom ops' CPU kernels.
///
/// `op` and `what` name the operator and the argument in the error, which says what to do when
/// the dtype is not `T` or the layout is strided.
pub(crate) fn contiguous_slice<'a, T: candle_core::WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [T]> {
    let values = storage.as_slice::<T>().map_err(|_| {
        candle_core::Error::msg(format!(
            "{op}: the CPU kernel takes the {what} as {:?}, got {:?}; convert it with .to_dtype()",
            T::DTYPE,
            storage.dtype()
        ))
    })?;
    match layout.contiguous_offsets() {
        Some((a, b)) if b <= values.len() => Ok(&values[a..b]),
        Some((a, b)) => candle_core::bail!(
            "{op}: the {what} spans [{a}, {b}) but its storage holds {} values",
            values.len()
        ),
        None => candle_core::bail!(
            "{op}: the {what} must be contiguous (shape {:?}, strides {:?}); call .contiguous() first",
            layout.dims(),
            layout.stride()
        ),
    }
}

/// Runs an operator's backward `f` on a worker of the rayon pool when its gradient is on the
/// CPU (see [`crate::cpu::on_pool`]): Candle calls `bwd` from the thread that runs
/// `Tensor::backward`, outside the pool, where each of the backward's parallel loops (GEMMs,
/// reductions, zero-fills) would be handed to the pool on its own.
pub(crate) fn backward_on_pool<R: Send>(grad: &Tensor, f: impl FnOnce() -> R + Send) -> R {
    if grad.device().is_cpu() {
        crate::cpu::on_pool(f)
    } else {
        f()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn written_zeros_are_zeros_of_the_asked_length() {
        // Below and above the parallel threshold, and a partial last run.
        for len in [0usize, 5, 64 * 1024, 3 * 64 * 1024 + 17] {
            let v = super::written_zeros_par(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x == 0.0), "len {len}");
            assert_eq!(super::written_zeros(len, 0f32), v);
        }
    }
}
