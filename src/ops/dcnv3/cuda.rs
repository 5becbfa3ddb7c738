//! CUDA backend of the DCNv3 and DCNv4 ops (`cuda` feature): launches the kernels of
//! `kernels/dcnv3.cu` (PTX built by `build.rs`) on candle's stream through candle's
//! custom-function cache. DCNv4 runs the same kernel code through its `dcnv4_*` entry points,
//! which take the packed offset_mask once (see [`Core`]).
//!
//! f32, f16 and bf16 (bf16 needs compute capability 8.0+), f32 arithmetic, any batch size.
//! Forward: `lanes` = Cg/vec threads per (pixel, group), each loading `vec` contiguous channels per
//! corner with one 4..16-byte access. Backward: input gradient by f32 atomics (then cast to the
//! dtype), offset/mask gradients reduced over the channels of a group by warp shuffles.

use super::launch::{bwd_lanes, fwd_lanes, pick_vec, Core, Dcnv3Params};
use super::{Dcnv3BackwardOp, Dcnv3Config, Dcnv3Geometry};
use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape};
use half::{bf16, f16};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/dcnv3_ptx.rs"));
}

/// Name of our PTX module in candle's custom-module cache.
const MODULE: &str = "internimage_dcnv3";
/// Threads per block (multiple of the warp size, as the backward's shuffles require).
const BLOCK: u32 = 256;
/// Warp width: the backward's lanes of one item must fit in one warp.
const WARP: usize = 32;

// SAFETY: `Dcnv3Params` is `#[repr(C)]`, made of 4-byte ints and one f32, laid out exactly like
// the C struct `Dcnv3Params` of kernels/dcnv3_common.h that the kernels take by value.
unsafe impl DeviceRepr for Dcnv3Params {}

/// The dtype part of the kernel names.
fn dtype_tag(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!(
            "dcnv3 (CUDA): supported dtypes are f32, f16 and bf16, got {other:?}; \
             convert with .to_dtype(DType::F32) (f64 runs on the CPU only)"
        ),
    })
}

/// Checks that the storages share dtype and device and that the device handles it.
fn check_storages(
    op: &str,
    s: &[(&CudaStorage, &str)],
) -> Result<(CudaDevice, DType, &'static str)> {
    let dtype = s[0].0.dtype();
    let dev = s[0].0.device().clone();
    for (st, name) in &s[1..] {
        if st.dtype() != dtype {
            bail!(
                "{op} (CUDA): {name} has dtype {:?} but {} has {dtype:?}; all arguments must share one dtype",
                st.dtype(),
                s[0].1
            );
        }
        if !st.device().same_device(&dev) {
            bail!(
                "{op} (CUDA): {name} is on another CUDA device than {}; move the tensors to one device",
                s[0].1
            );
        }
    }
    let tag = dtype_tag(dtype)?;
    if dtype == DType::BF16 {
        let cc = dev.cuda_stream().context().compute_capability().w()?;
        if cc.0 < 8 {
            bail!(
                "{op} (CUDA): bf16 needs a GPU of compute capability 8.0 or newer, this one is {}.{}; \
                 use f16 or f32",
                cc.0,
                cc.1
            );
        }
    }
    Ok((dev, dtype, tag))
}

/// `(start, end)` element range of a contiguous layout, or an error naming the argument.
fn range(op: &str, l: &Layout, name: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(r) => Ok(r),
        None => bail!(
            "{op} (CUDA): {name} must be contiguous (shape {:?}, strides {:?}); call .contiguous() \
             first or use internimage::ops::dcnv3()",
            l.dims(),
            l.stride()
        ),
    }
}

/// The elements of a contiguous tensor inside its storage, as a typed device view.
fn view<'a, T: CudaDType>(
    op: &str,
    s: &'a CudaStorage,
    l: &Layout,
    name: &str,
) -> Result<(CudaView<'a, T>, usize)> {
    let (a, b) = range(op, l, name)?;
    let slice: &CudaSlice<T> = s.as_cuda_slice::<T>()?;
    if b > slice.len() {
        bail!(
            "{op} (CUDA): {name} layout [{a}, {b}) exceeds its storage of {} elements",
            slice.len()
        );
    }
    Ok((slice.slice(a..b), a))
}

/// A 1-D launch of `total` threads in blocks of [`BLOCK`].
fn launch_config(op: &str, total: u64) -> Result<LaunchConfig> {
    let blocks = total.div_ceil(BLOCK as u64);
    if blocks > i32::MAX as u64 {
        bail!("{op} (CUDA): {total} threads exceed the grid limit; split the batch");
    }
    Ok(LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    })
}

fn forward_typed<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    tag: &str,
    core: Core,
    cfg: &Dcnv3Config,
    g: &Dcnv3Geometry,
    args: &[(&CudaStorage, &Layout)],
) -> Result<CudaSlice<T>> {
    let op = core.name();
    let names: &[&str] = match core {
        Core::V3 => &["input", "offset", "mask"],
        Core::V4 => &["input", "offset_mask"],
    };
    if args.len() != names.len() {
        bail!(
            "{op} (CUDA): internal: {} arguments, expected {}",
            args.len(),
            names.len()
        );
    }
    let mut views = Vec::with_capacity(args.len());
    let mut in_start = 0;
    for (k, ((s, l), name)) in args.iter().zip(names).enumerate() {
        let (v, start) = view::<T>(op, s, l, name)?;
        if k == 0 {
            in_start = start;
        }
        views.push(v);
    }
    let vec = pick_vec(std::mem::size_of::<T>(), g.group_channels, &[in_start]);
    let params = core.params(cfg, g, fwd_lanes(g.group_channels, vec))?;
    // SAFETY: every output element is written by the kernel (each item's lanes cover all of
    // its group's channels), and nothing reads it before the launch completes on this stream.
    let mut out = unsafe { dev.alloc::<T>(g.output_len())? };
    let total = params.total_threads();
    if total == 0 {
        return Ok(out);
    }
    let func =
        dev.get_or_load_custom_func(&format!("{op}_fwd_{tag}_v{vec}"), MODULE, ptx::DCNV3)?;
    let mut b = func.builder();
    b.arg(&params);
    for v in &views {
        b.arg(v);
    }
    b.arg(&mut out);
    // SAFETY: argument types and order match `dcnv3_fwd_*` (input, offset, mask, output) or
    // `dcnv4_fwd_*` (input, offset_mask, output) in kernels/dcnv3.cu; the views hold exactly
    // the element counts the parameters describe (checked by the geometry).
    unsafe { b.launch(launch_config(op, total)?) }.w()?;
    Ok(out)
}

/// `cuda_fwd` of [`super::Dcnv3Op`] (`core` V3: input, offset, mask) and of
/// [`crate::ops::dcnv4::Dcnv4Op`] (`core` V4: input, offset_mask).
pub(crate) fn forward(
    core: Core,
    cfg: &Dcnv3Config,
    args: &[(&CudaStorage, &Layout)],
) -> Result<(CudaStorage, Shape)> {
    let (g, named) = match (core, args) {
        (Core::V3, [(s1, l1), (s2, l2), (s3, l3)]) => (
            cfg.geometry(l1.shape(), l2.shape(), l3.shape())?,
            vec![(*s1, "input"), (*s2, "offset"), (*s3, "mask")],
        ),
        (Core::V4, [(s1, l1), (s2, l2)]) => (
            crate::ops::dcnv4::geometry(cfg, l1.shape(), l2.shape())?,
            vec![(*s1, "input"), (*s2, "offset_mask")],
        ),
        _ => bail!(
            "{} (CUDA): internal: wrong number of arguments",
            core.name()
        ),
    };
    let (dev, dtype, tag) = check_storages(core.name(), &named)?;
    let shape = Shape::from((g.n, g.h_out, g.w_out, g.channels));
    let st = match dtype {
        DType::F32 => {
            CudaStorage::wrap_cuda_slice(forward_typed::<f32>(&dev, tag, core, cfg, &g, args)?, dev)
        }
        DType::F16 => {
            CudaStorage::wrap_cuda_slice(forward_typed::<f16>(&dev, tag, core, cfg, &g, args)?, dev)
        }
        DType::BF16 => CudaStorage::wrap_cuda_slice(
            forward_typed::<bf16>(&dev, tag, core, cfg, &g, args)?,
            dev,
        ),
        other => bail!("{} (CUDA): unsupported dtype {other:?}", core.name()),
    };
    Ok((st, shape))
}

fn backward_typed<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    tag: &str,
    core: Core,
    cfg: &Dcnv3Config,
    g: &Dcnv3Geometry,
    args: [(&CudaStorage, &Layout); 3],
) -> Result<CudaSlice<T>> {
    let op = match core {
        Core::V3 => "dcnv3 backward",
        Core::V4 => "dcnv4 backward",
    };
    let (input, in_start) = view::<T>(op, args[0].0, args[0].1, "input")?;
    let (offset_mask, _) = view::<T>(op, args[1].0, args[1].1, "offset_mask")?;
    let (grad_out, go_start) = view::<T>(op, args[2].0, args[2].1, "grad_out")?;
    let n_in = g.input_len();
    // Length of the offset/mask gradient: the two DCNv3 tensors, or DCNv4's packed one.
    let (n_off, n_mask) = match core {
        Core::V3 => (g.offset_len(), g.mask_len()),
        Core::V4 => (offset_mask.len(), 0),
    };
    if core == Core::V3 && offset_mask.len() != n_off + n_mask {
        bail!(
            "{op} (CUDA): offset_mask must hold {n_off} + {n_mask} elements, got {}",
            offset_mask.len()
        );
    }
    let vec = pick_vec(
        std::mem::size_of::<T>(),
        g.group_channels,
        &[in_start, go_start],
    );
    let params = core.params(cfg, g, bwd_lanes(g.group_channels, vec, WARP))?;
    let mut grad_input = dev.alloc_zeros::<f32>(n_in)?;
    let len = n_in + n_off + n_mask;
    let mut packed = match core {
        // SAFETY: the backward kernel writes every grad_offset/grad_mask element and the cast
        // kernel every grad_input element before anything reads the buffer.
        Core::V3 => unsafe { dev.alloc::<T>(len)? },
        // DCNv4: the padding columns of the offset_mask gradient are never written: zeros.
        Core::V4 => dev.alloc_zeros::<T>(len)?,
    };
    let total = params.total_threads();
    if total == 0 {
        return Ok(packed);
    }
    {
        let (mut gin_t, mut rest) = packed.split_at_mut(n_in);
        let func = dev.get_or_load_custom_func(
            &format!("{}_bwd_{tag}_v{vec}", core.name()),
            MODULE,
            ptx::DCNV3,
        )?;
        match core {
            Core::V3 => {
                let offset = offset_mask.slice(0..n_off);
                let mask = offset_mask.slice(n_off..n_off + n_mask);
                let (mut grad_offset, mut grad_mask) = rest.split_at_mut(n_off);
                let mut b = func.builder();
                b.arg(&params);
                b.arg(&input);
                b.arg(&offset);
                b.arg(&mask);
                b.arg(&grad_out);
                b.arg(&mut grad_input);
                b.arg(&mut grad_offset);
                b.arg(&mut grad_mask);
                // SAFETY: argument types and order match `dcnv3_bwd_*` in kernels/dcnv3.cu;
                // lanes is a power of two <= 32 and the block a multiple of the warp, as the
                // shuffles require.
                unsafe { b.launch(launch_config(op, total)?) }.w()?;
            }
            Core::V4 => {
                let mut b = func.builder();
                b.arg(&params);
                b.arg(&input);
                b.arg(&offset_mask);
                b.arg(&grad_out);
                b.arg(&mut grad_input);
                b.arg(&mut rest);
                // SAFETY: argument types and order match `dcnv4_bwd_*` in kernels/dcnv3.cu
                // (input, offset_mask, grad_out, grad_input, grad_offset_mask); lanes as above.
                unsafe { b.launch(launch_config(op, total)?) }.w()?;
            }
        }

        let cast =
            dev.get_or_load_custom_func(&format!("dcnv3_cast_f32_{tag}"), MODULE, ptx::DCNV3)?;
        let n = n_in as i64;
        let mut b = cast.builder();
        b.arg(&grad_input);
        b.arg(&mut gin_t);
        b.arg(&n);
        // SAFETY: matches `dcnv3_cast_f32_*(const float*, T*, long long)`; both hold n_in elements.
        unsafe { b.launch(launch_config(op, n_in as u64)?) }.w()?;
    }
    Ok(packed)
}

/// `cuda_fwd` of [`Dcnv3BackwardOp`] (`core` V3: the packed [grad_input, grad_offset,
/// grad_mask]) and of [`crate::ops::dcnv4::Dcnv4BackwardOp`] (`core` V4: [grad_input,
/// grad_offset_mask]); the arguments are input, offset_mask, grad_out.
pub(crate) fn backward(
    core: Core,
    cfg: &Dcnv3Config,
    args: &[(&CudaStorage, &Layout); 3],
) -> Result<(CudaStorage, Shape)> {
    let [(s1, l1), (s2, l2), (s3, l3)] = *args;
    let (op, g, len) = match core {
        Core::V3 => {
            let g = Dcnv3BackwardOp::new(*cfg).geometry(l1.shape(), l2.shape(), l3.shape())?;
            (
                "dcnv3 backward",
                g,
                g.input_len() + g.offset_len() + g.mask_len(),
            )
        }
        Core::V4 => {
            let bop = crate::ops::dcnv4::Dcnv4BackwardOp::new(*cfg);
            let g = bop.geometry(l1.shape(), l2.shape(), l3.shape())?;
            ("dcnv4 backward", g, g.input_len() + l2.shape().elem_count())
        }
    };
    let (dev, dtype, tag) =
        check_storages(op, &[(s1, "input"), (s2, "offset_mask"), (s3, "grad_out")])?;
    let shape = Shape::from(len);
    let st = match dtype {
        DType::F32 => CudaStorage::wrap_cuda_slice(
            backward_typed::<f32>(&dev, tag, core, cfg, &g, args)?,
            dev,
        ),
        DType::F16 => CudaStorage::wrap_cuda_slice(
            backward_typed::<f16>(&dev, tag, core, cfg, &g, args)?,
            dev,
        ),
        DType::BF16 => CudaStorage::wrap_cuda_slice(
            backward_typed::<bf16>(&dev, tag, core, cfg, &g, args)?,
            dev,
        ),
        other => bail!("{op} (CUDA): unsupported dtype {other:?}"),
    };
    Ok((st, shape))
}
