//! Metal backend of the DCNv3 ops (`metal` feature): the kernels of `kernels/dcnv3.metal`,
//! compiled at run time (once per device) with `kernels/dcnv3_common.h` pasted in place of its
//! `#include`, cached per (device registry id, kernel name) in this crate's own pipeline cache.
//!
//! f32 and f16 always, bf16 where the Metal compiler has `__HAVE_BFLOAT__` (macOS 14+ on Apple
//! GPUs); f32 arithmetic; same work decomposition as the CUDA kernels.

use super::launch::{bwd_lanes, fwd_lanes, pick_vec, Dcnv3Params};
use super::{Dcnv3BackwardOp, Dcnv3Config, Dcnv3Geometry};
use candle_core::backend::BackendStorage;
use candle_core::{bail, DType, Layout, MetalDevice, MetalError, MetalStorage, Result, Shape};
use candle_metal_kernels::metal::{ComputeCommandEncoder, ComputePipeline, Library};
use candle_metal_kernels::set_params;
use candle_metal_kernels::utils::{BufferOffset, Output};
use objc2_metal::{MTLComputePipelineState, MTLSize};
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

const KERNELS: &str = include_str!("../../../kernels/dcnv3.metal");
const COMMON: &str = include_str!("../../../kernels/dcnv3_common.h");
const INCLUDE_LINE: &str = "#include \"dcnv3_common.h\"";

/// Libraries per device registry id and pipelines per (registry id, kernel name).
#[derive(Default)]
struct Cache {
    libraries: HashMap<u64, Library>,
    pipelines: HashMap<(u64, String), ComputePipeline>,
}

fn cache() -> &'static Mutex<Cache> {
    static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(Cache::default()))
}

/// The complete MSL source: dcnv3.metal with the shared header pasted in.
fn source() -> Result<String> {
    if KERNELS.matches(INCLUDE_LINE).count() != 1 {
        bail!(
            "dcnv3 (Metal): kernels/dcnv3.metal must contain the line {INCLUDE_LINE} exactly once"
        );
    }
    Ok(KERNELS.replacen(INCLUDE_LINE, COMMON, 1))
}

/// The compute pipeline of kernel `name` on `device`, compiling the library on first use.
fn pipeline(device: &MetalDevice, name: &str) -> Result<ComputePipeline> {
    let dev = device.metal_device();
    let id = dev.registry_id();
    let mut cache = match cache().lock() {
        Ok(c) => c,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(p) = cache.pipelines.get(&(id, name.to_string())) {
        return Ok(p.clone());
    }
    let lib = match cache.libraries.entry(id) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(v) => v.insert(
            dev.new_library_with_source(&source()?, None)
                .map_err(MetalError::from)?,
        ),
    };
    let func = match lib.get_function(name, None) {
        Ok(f) => f,
        Err(e) if name.contains("bf16") => bail!(
            "dcnv3 (Metal): this device/OS has no bf16 support in Metal (kernel {name} is compiled \
             only with __HAVE_BFLOAT__, macOS 14+ on Apple GPUs): {e}; use f16 or f32"
        ),
        Err(e) => return Err(MetalError::from(e).into()),
    };
    let p = dev
        .new_compute_pipeline_state_with_function(&func)
        .map_err(MetalError::from)?;
    cache.pipelines.insert((id, name.to_string()), p.clone());
    Ok(p)
}

/// Threadgroup size for a pipeline: a multiple of its SIMD width, at most 256.
fn threadgroup(p: &ComputePipeline) -> (usize, usize) {
    let simd = p.as_ref().threadExecutionWidth().max(1);
    let max = p.max_total_threads_per_threadgroup().clamp(simd, 256);
    (max / simd * simd, simd)
}

fn dtype_tag(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!(
            "dcnv3 (Metal): supported dtypes are f32, f16 and bf16, got {other:?}; \
             convert with .to_dtype(DType::F32)"
        ),
    })
}

fn check(op: &str, s: [(&MetalStorage, &Layout, &str); 3]) -> Result<(DType, &'static str)> {
    let dtype = s[0].0.dtype();
    for (st, l, name) in s {
        if st.dtype() != dtype {
            bail!(
                "{op} (Metal): {name} has dtype {:?} but {} has {dtype:?}; all arguments must share one dtype",
                st.dtype(),
                s[0].2
            );
        }
        if !l.is_contiguous() {
            bail!(
                "{op} (Metal): {name} must be contiguous (shape {:?}, strides {:?}); call .contiguous() \
                 first or use internimage::ops::dcnv3()",
                l.dims(),
                l.stride()
            );
        }
    }
    Ok((dtype, dtype_tag(dtype)?))
}

fn buffer_at<'a>(s: &'a MetalStorage, elem_offset: usize) -> BufferOffset<'a> {
    BufferOffset {
        buffer: s.buffer(),
        offset_in_bytes: elem_offset * s.dtype().size_in_bytes(),
    }
}

/// Number of threadgroups for `total` threads, checking the kernels' 32-bit thread index.
fn groups(op: &str, total: u64, tg: usize) -> Result<usize> {
    if total > u32::MAX as u64 {
        bail!("{op} (Metal): {total} threads exceed the 32-bit thread index; split the batch");
    }
    Ok((total as usize).div_ceil(tg))
}

fn size1(n: usize) -> MTLSize {
    MTLSize {
        width: n,
        height: 1,
        depth: 1,
    }
}

/// `metal_fwd` of [`super::Dcnv3Op`].
pub(super) fn forward(
    cfg: &Dcnv3Config,
    s1: &MetalStorage,
    l1: &Layout,
    s2: &MetalStorage,
    l2: &Layout,
    s3: &MetalStorage,
    l3: &Layout,
) -> Result<(MetalStorage, Shape)> {
    const OP: &str = "dcnv3";
    let (dtype, tag) = check(
        OP,
        [(s1, l1, "input"), (s2, l2, "offset"), (s3, l3, "mask")],
    )?;
    let g: Dcnv3Geometry = cfg.geometry(l1.shape(), l2.shape(), l3.shape())?;
    let shape = Shape::from((g.n, g.h_out, g.w_out, g.channels));
    let device = s1.device();
    let vec = pick_vec(
        dtype.size_in_bytes(),
        g.group_channels,
        &[l1.start_offset()],
    );
    let params = Dcnv3Params::new(cfg, &g, fwd_lanes(g.group_channels, vec))?;
    let output = device.new_buffer(g.output_len(), dtype, "dcnv3")?;
    let total = params.total_threads();
    if total > 0 {
        let pipe = pipeline(device, &format!("dcnv3_fwd_{tag}_v{vec}"))?;
        let (tg, _) = threadgroup(&pipe);
        let n_groups = groups(OP, total, tg)?;
        let guard = device.command_encoder()?;
        let encoder: &ComputeCommandEncoder = guard.as_ref();
        encoder.set_label("dcnv3");
        encoder.set_compute_pipeline_state(&pipe);
        set_params!(
            encoder,
            (
                std::slice::from_ref(&params),
                &buffer_at(s1, l1.start_offset()),
                &buffer_at(s2, l2.start_offset()),
                &buffer_at(s3, l3.start_offset()),
                Output::new(&output)
            )
        );
        encoder.dispatch_thread_groups(size1(n_groups), size1(tg));
    }
    let st = MetalStorage::new(output, device.clone(), g.output_len(), dtype);
    Ok((st, shape))
}

/// `metal_fwd` of [`Dcnv3BackwardOp`]: the packed [grad_input, grad_offset, grad_mask].
pub(super) fn backward(
    op: &Dcnv3BackwardOp,
    s1: &MetalStorage,
    l1: &Layout,
    s2: &MetalStorage,
    l2: &Layout,
    s3: &MetalStorage,
    l3: &Layout,
) -> Result<(MetalStorage, Shape)> {
    const OP: &str = "dcnv3 backward";
    let (dtype, tag) = check(
        OP,
        [
            (s1, l1, "input"),
            (s2, l2, "offset_mask"),
            (s3, l3, "grad_out"),
        ],
    )?;
    let g = op.geometry(l1.shape(), l2.shape(), l3.shape())?;
    let (n_in, n_off, n_mask) = (g.input_len(), g.offset_len(), g.mask_len());
    let len = n_in + n_off + n_mask;
    let device = s1.device();
    let esize = dtype.size_in_bytes();
    let vec = pick_vec(
        esize,
        g.group_channels,
        &[l1.start_offset(), l3.start_offset()],
    );
    let packed = device.new_buffer(len, dtype, "dcnv3-backward")?;
    let total = Dcnv3Params::new(&op.cfg, &g, 1)?.total_threads();
    if total > 0 {
        let bwd = pipeline(device, &format!("dcnv3_bwd_{tag}_v{vec}"))?;
        let cast = pipeline(device, &format!("dcnv3_cast_f32_{tag}"))?;
        let (tg, simd) = threadgroup(&bwd);
        let params = Dcnv3Params::new(&op.cfg, &g, bwd_lanes(g.group_channels, vec, simd))?;
        let n_groups = groups(OP, params.total_threads(), tg)?;
        let (cast_tg, _) = threadgroup(&cast);
        let cast_groups = groups(OP, n_in as u64, cast_tg)?;
        let grad_input = device.allocate_zeros(n_in * DType::F32.size_in_bytes())?;
        let om = l2.start_offset();
        let guard = device.command_encoder()?;
        let encoder: &ComputeCommandEncoder = guard.as_ref();
        encoder.set_label("dcnv3-backward");
        encoder.set_compute_pipeline_state(&bwd);
        set_params!(
            encoder,
            (
                std::slice::from_ref(&params),
                &buffer_at(s1, l1.start_offset()),
                &buffer_at(s2, om),
                &buffer_at(s2, om + n_off),
                &buffer_at(s3, l3.start_offset()),
                Output::new(&grad_input),
                Output::with_offset(&packed, n_in * esize),
                Output::with_offset(&packed, (n_in + n_off) * esize)
            )
        );
        encoder.dispatch_thread_groups(size1(n_groups), size1(tg));
        encoder.set_compute_pipeline_state(&cast);
        set_params!(
            encoder,
            (
                &BufferOffset::zero_offset(&grad_input),
                Output::new(&packed),
                n_in as u32
            )
        );
        encoder.dispatch_thread_groups(size1(cast_groups), size1(cast_tg));
    }
    let st = MetalStorage::new(packed, device.clone(), len, dtype);
    Ok((st, Shape::from(len)))
}
