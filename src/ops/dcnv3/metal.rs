//! Metal backend of the DCNv3 and DCNv4 ops (`metal` feature): the kernels of `kernels/dcnv3.metal`
//! (DCNv4 through its `dcnv4_*` entry points, which take the packed offset_mask once),
//! compiled at run time (once per device) with `kernels/dcnv3_common.h` pasted in place of its
//! `#include`, cached per (device registry id, kernel name) in this crate's own pipeline cache.
//!
//! f32 and f16 always, bf16 where the Metal compiler has `__HAVE_BFLOAT__` (macOS 14+ on Apple
//! GPUs); f32 arithmetic; same work decomposition as the CUDA kernels.

use super::launch::{bwd_lanes, fwd_lanes, pick_vec, Core};
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

fn check(op: &str, s: &[(&MetalStorage, &Layout, &str)]) -> Result<(DType, &'static str)> {
    let dtype = s[0].0.dtype();
    for &(st, l, name) in s {
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

/// `metal_fwd` of [`super::Dcnv3Op`] (`core` V3: input, offset, mask) and of
/// [`crate::ops::dcnv4::Dcnv4Op`] (`core` V4: input, offset_mask).
pub(crate) fn forward(
    core: Core,
    cfg: &Dcnv3Config,
    args: &[(&MetalStorage, &Layout)],
) -> Result<(MetalStorage, Shape)> {
    let op = core.name();
    let (g, named): (Dcnv3Geometry, Vec<(&MetalStorage, &Layout, &str)>) = match (core, args) {
        (Core::V3, [(s1, l1), (s2, l2), (s3, l3)]) => (
            cfg.geometry(l1.shape(), l2.shape(), l3.shape())?,
            vec![
                (*s1, *l1, "input"),
                (*s2, *l2, "offset"),
                (*s3, *l3, "mask"),
            ],
        ),
        (Core::V4, [(s1, l1), (s2, l2)]) => (
            crate::ops::dcnv4::geometry(cfg, l1.shape(), l2.shape())?,
            vec![(*s1, *l1, "input"), (*s2, *l2, "offset_mask")],
        ),
        _ => bail!("{op} (Metal): internal: wrong number of arguments"),
    };
    let (dtype, tag) = check(op, &named)?;
    let (s1, l1) = (named[0].0, named[0].1);
    let shape = Shape::from((g.n, g.h_out, g.w_out, g.channels));
    let device = s1.device();
    let vec = pick_vec(
        dtype.size_in_bytes(),
        g.group_channels,
        &[l1.start_offset()],
    );
    let params = core.params(cfg, &g, fwd_lanes(g.group_channels, vec))?;
    let output = device.new_buffer(g.output_len(), dtype, op)?;
    let total = params.total_threads();
    if total > 0 {
        let pipe = pipeline(device, &format!("{op}_fwd_{tag}_v{vec}"))?;
        let (tg, _) = threadgroup(&pipe);
        let n_groups = groups(op, total, tg)?;
        let guard = device.command_encoder()?;
        let encoder: &ComputeCommandEncoder = guard.as_ref();
        encoder.set_label(op);
        encoder.set_compute_pipeline_state(&pipe);
        let buf = |k: usize| buffer_at(named[k].0, named[k].1.start_offset());
        match core {
            Core::V3 => {
                set_params!(
                    encoder,
                    (
                        std::slice::from_ref(&params),
                        &buf(0),
                        &buf(1),
                        &buf(2),
                        Output::new(&output)
                    )
                );
            }
            Core::V4 => {
                set_params!(
                    encoder,
                    (
                        std::slice::from_ref(&params),
                        &buf(0),
                        &buf(1),
                        Output::new(&output)
                    )
                );
            }
        }
        encoder.dispatch_thread_groups(size1(n_groups), size1(tg));
    }
    let st = MetalStorage::new(output, device.clone(), g.output_len(), dtype);
    Ok((st, shape))
}

/// `metal_fwd` of [`Dcnv3BackwardOp`] (`core` V3: the packed [grad_input, grad_offset,
/// grad_mask]) and of [`crate::ops::dcnv4::Dcnv4BackwardOp`] (`core` V4: [grad_input,
/// grad_offset_mask]); the arguments are input, offset_mask, grad_out.
pub(crate) fn backward(
    core: Core,
    cfg: &Dcnv3Config,
    args: &[(&MetalStorage, &Layout); 3],
) -> Result<(MetalStorage, Shape)> {
    let [(s1, l1), (s2, l2), (s3, l3)] = *args;
    let (op, g, n_off, n_mask) = match core {
        Core::V3 => {
            let g = Dcnv3BackwardOp::new(*cfg).geometry(l1.shape(), l2.shape(), l3.shape())?;
            ("dcnv3 backward", g, g.offset_len(), g.mask_len())
        }
        Core::V4 => {
            let bop = crate::ops::dcnv4::Dcnv4BackwardOp::new(*cfg);
            let g = bop.geometry(l1.shape(), l2.shape(), l3.shape())?;
            ("dcnv4 backward", g, l2.shape().elem_count(), 0)
        }
    };
    let (dtype, tag) = check(
        op,
        &[
            (s1, l1, "input"),
            (s2, l2, "offset_mask"),
            (s3, l3, "grad_out"),
        ],
    )?;
    let n_in = g.input_len();
    let len = n_in + n_off + n_mask;
    let device = s1.device();
    let esize = dtype.size_in_bytes();
    let vec = pick_vec(
        esize,
        g.group_channels,
        &[l1.start_offset(), l3.start_offset()],
    );
    let packed = match core {
        Core::V3 => device.new_buffer(len, dtype, op)?,
        // DCNv4: the padding columns of the offset_mask gradient are never written: zeros.
        Core::V4 => device.allocate_zeros(len * esize)?,
    };
    let total = core.params(cfg, &g, 1)?.total_threads();
    if total > 0 {
        let bwd = pipeline(device, &format!("{}_bwd_{tag}_v{vec}", core.name()))?;
        let cast = pipeline(device, &format!("dcnv3_cast_f32_{tag}"))?;
        let (tg, simd) = threadgroup(&bwd);
        let params = core.params(cfg, &g, bwd_lanes(g.group_channels, vec, simd))?;
        let n_groups = groups(op, params.total_threads(), tg)?;
        let (cast_tg, _) = threadgroup(&cast);
        let cast_groups = groups(op, n_in as u64, cast_tg)?;
        let grad_input = device.allocate_zeros(n_in * DType::F32.size_in_bytes())?;
        let om = l2.start_offset();
        let guard = device.command_encoder()?;
        let encoder: &ComputeCommandEncoder = guard.as_ref();
        encoder.set_label(op);
        encoder.set_compute_pipeline_state(&bwd);
        match core {
            Core::V3 => {
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
            }
            Core::V4 => {
                set_params!(
                    encoder,
                    (
                        std::slice::from_ref(&params),
                        &buffer_at(s1, l1.start_offset()),
                        &buffer_at(s2, om),
                        &buffer_at(s3, l3.start_offset()),
                        Output::new(&grad_input),
                        Output::with_offset(&packed, n_in * esize)
                    )
                );
            }
        }
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
