//! DCNv3 core operator (deformable convolution v3 sampling, "dcnv3_core"), channels-last.
//!
//! Semantics are those of the official InternImage operator: for output pixel (h, w), group g and
//! kernel point p = i*kernel_h + j (column i = x outer, row j = y inner, the centre skipped when
//! `remove_center`), the sampling position is
//! `x = w*stride_w - pad_w + hx + offset_scale*(i*dilation_w - hx + offset[..,g,p,0])` (y alike with
//! `offset[..,g,p,1]`), `hx = dilation_w*(kernel_w-1)/2`; the value is bilinear with zeros outside
//! the image, weighted by `mask[..,g,p]` (never renormalised) and summed over p.
//!
//! The op is a [`candle_core::CustomOp3`] ([`Dcnv3Op`]) with a CPU forward for f32/f16/bf16 (f32
//! accumulation) and f64, and a backward implemented by a second op (`Dcnv3BackwardOp`, internal) so that
//! `Tensor::backward` works through [`dcnv3`]. GPU forwards (`cuda_fwd`, `metal_fwd`) plug into the
//! same two ops; the CPU path is the reference they are tested against.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[doc(hidden)]
// Public only for the host-compiled GPU kernel test (`tests/kernel_host.rs`); not an API.
#[doc(hidden)]
pub mod launch;
#[cfg(feature = "metal")]
pub(crate) mod metal;
mod validate;

pub use validate::Dcnv3Geometry;

use crate::cpu::{Isa, KernelPolicy};
use crate::ops::contiguous_slice;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use half::{bf16, f16, slice::HalfFloatSliceExt};

/// The `cuda_fwd` and `metal_fwd` methods of a deformable-sampling custom op (`CustomOp2` or
/// `CustomOp3` with a `cfg: Dcnv3Config` field): both hand their arguments to the one launcher
/// `$launch` (`forward` or `backward` of `ops::dcnv3::cuda` / `ops::dcnv3::metal`), which serves
/// DCNv3 and DCNv4 through `$core` (a [`launch::Core`]). Expands to nothing without the `cuda`
/// and `metal` features.
macro_rules! gpu_fwd_methods {
    ($core:expr, $launch:ident, $($s:ident, $l:ident),+) => {
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            $($s: &candle_core::CudaStorage, $l: &Layout),+
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            crate::ops::dcnv3::cuda::$launch($core, &self.cfg, &[$(($s, $l)),+])
        }

        #[cfg(feature = "metal")]
        fn metal_fwd(
            &self,
            $($s: &candle_core::MetalStorage, $l: &Layout),+
        ) -> Result<(candle_core::MetalStorage, Shape)> {
            crate::ops::dcnv3::metal::$launch($core, &self.cfg, &[$(($s, $l)),+])
        }
    };
}
pub(crate) use gpu_fwd_methods;

/// Geometry of a DCNv3 core call, named like the official operator's arguments.
///
/// Tensors are channels-last: input (N, H_in, W_in, group*group_channels), offset
/// (N, H_out, W_out, group*P*2) with pairs (x, y), mask (N, H_out, W_out, group*P), where
/// P = kernel_h*kernel_w (minus one with `remove_center`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dcnv3Config {
    /// Kernel height (rows, y).
    pub kernel_h: usize,
    /// Kernel width (columns, x).
    pub kernel_w: usize,
    /// Vertical stride (>= 1).
    pub stride_h: usize,
    /// Horizontal stride (>= 1).
    pub stride_w: usize,
    /// Zero padding added above and below.
    pub pad_h: usize,
    /// Zero padding added left and right.
    pub pad_w: usize,
    /// Vertical dilation of the kernel grid (>= 1).
    pub dilation_h: usize,
    /// Horizontal dilation of the kernel grid (>= 1).
    pub dilation_w: usize,
    /// Number of groups G (each with its own offsets and mask).
    pub group: usize,
    /// Channels per group Cg; the input has G*Cg channels.
    pub group_channels: usize,
    /// Scale applied to the regular kernel displacement *and* to the learned offsets.
    pub offset_scale: f64,
    /// Drop the kernel centre (needs a square odd kernel); P becomes kernel_h*kernel_w - 1.
    pub remove_center: bool,
}

impl Dcnv3Config {
    /// InternImage's setting: 3x3 kernel, stride 1, pad 1, dilation 1.
    pub fn internimage(group: usize, group_channels: usize, offset_scale: f64) -> Self {
        Self {
            kernel_h: 3,
            kernel_w: 3,
            stride_h: 1,
            stride_w: 1,
            pad_h: 1,
            pad_w: 1,
            dilation_h: 1,
            dilation_w: 1,
            group,
            group_channels,
            offset_scale,
            remove_center: false,
        }
    }
}

/// Checks dtypes and devices of the three tensors and the shapes against `cfg`.
fn check_args(
    input: &Tensor,
    offset: &Tensor,
    mask: &Tensor,
    cfg: &Dcnv3Config,
) -> Result<Dcnv3Geometry> {
    let dt = input.dtype();
    for (name, t) in [("offset", offset), ("mask", mask)] {
        if t.dtype() != dt {
            bail!(
                "dcnv3: {name} dtype must equal the input dtype {dt:?}, got {:?}; convert with .to_dtype()",
                t.dtype()
            );
        }
        if !t.device().same_device(input.device()) {
            bail!(
                "dcnv3: {name} must be on the input's device {:?}, got {:?}; move it with .to_device()",
                input.device().location(),
                t.device().location()
            );
        }
    }
    if !matches!(dt, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
        bail!("dcnv3: supported dtypes are f32, f16, bf16 and f64, got {dt:?}");
    }
    cfg.geometry(input.shape(), offset.shape(), mask.shape())
}

/// DCNv3 core: input (N,Hin,Win,G*Cg), offset (N,Hout,Wout,G*P*2), mask (N,Hout,Wout,G*P)
/// -> output (N,Hout,Wout,G*Cg), in the input's dtype.
///
/// Any strides are accepted (views are made contiguous first); all three tensors must share dtype
/// (f32, f16, bf16 or f64) and device. Errors (never panics) on mismatched dtypes/devices, wrong
/// ranks or shapes, zero-sized dimensions and invalid configs. Offsets that are NaN or infinite
/// sample nothing. Differentiable: gradients flow to all three inputs. The CPU kernels follow
/// the process's default [`KernelPolicy`] (see [`dcnv3_with`]).
pub fn dcnv3(input: &Tensor, offset: &Tensor, mask: &Tensor, cfg: &Dcnv3Config) -> Result<Tensor> {
    dcnv3_with(input, offset, mask, cfg, KernelPolicy::process_default()?)
}

/// [`dcnv3`] with the CPU kernels of `policy` (the reference policy runs the portable kernel:
/// there is no Candle-op version of the core).
pub fn dcnv3_with(
    input: &Tensor,
    offset: &Tensor,
    mask: &Tensor,
    cfg: &Dcnv3Config,
    policy: KernelPolicy,
) -> Result<Tensor> {
    check_args(input, offset, mask, cfg)?;
    let input = input.contiguous()?;
    let offset = offset.contiguous()?;
    let mask = mask.contiguous()?;
    input.apply_op3(&offset, &mask, Dcnv3Op::with_isa(*cfg, policy.isa()))
}

/// Gradients of `sum(dcnv3(input, offset, mask) * grad_out)` with respect to input, offset and
/// mask, without autograd (same shapes and dtype as the arguments).
pub fn dcnv3_backward(
    input: &Tensor,
    offset: &Tensor,
    mask: &Tensor,
    grad_out: &Tensor,
    cfg: &Dcnv3Config,
) -> Result<(Tensor, Tensor, Tensor)> {
    backward_with_isa(
        input,
        offset,
        mask,
        grad_out,
        cfg,
        KernelPolicy::process_default()?.isa(),
    )
}

/// The geometry of a backward call after checking its arguments: those of the forward, and
/// `grad_out` with the output's shape, the input's dtype and device.
fn check_backward_args(
    input: &Tensor,
    offset: &Tensor,
    mask: &Tensor,
    grad_out: &Tensor,
    cfg: &Dcnv3Config,
) -> Result<Dcnv3Geometry> {
    let g = check_args(input, offset, mask, cfg)?;
    let want = [g.n, g.h_out, g.w_out, g.channels];
    if grad_out.dims() != want {
        bail!(
            "dcnv3_backward: grad_out must have the output shape {want:?}, got {:?}",
            grad_out.dims()
        );
    }
    if grad_out.dtype() != input.dtype() || !grad_out.device().same_device(input.device()) {
        bail!(
            "dcnv3_backward: grad_out must have the input's dtype {:?} and device, got {:?}",
            input.dtype(),
            grad_out.dtype()
        );
    }
    Ok(g)
}

/// [`dcnv3_backward`] on the kernels of `isa`.
fn backward_with_isa(
    input: &Tensor,
    offset: &Tensor,
    mask: &Tensor,
    grad_out: &Tensor,
    cfg: &Dcnv3Config,
    isa: Isa,
) -> Result<(Tensor, Tensor, Tensor)> {
    let g = check_backward_args(input, offset, mask, grad_out, cfg)?;
    let offset_mask = Tensor::cat(
        &[offset.detach().flatten_all()?, mask.detach().flatten_all()?],
        0,
    )?;
    let packed = crate::ops::inference_op3(
        &input.detach().contiguous()?,
        &offset_mask,
        &grad_out.detach().contiguous()?,
        &Dcnv3BackwardOp::with_isa(*cfg, isa),
    )?;
    let (a, b, c) = (g.input_len(), g.offset_len(), g.mask_len());
    Ok((
        packed.narrow(0, 0, a)?.reshape(input.shape())?,
        packed.narrow(0, a, b)?.reshape(offset.shape())?,
        packed.narrow(0, a + b, c)?.reshape(mask.shape())?,
    ))
}

/// The DCNv3 forward as a candle custom op over (input, offset, mask).
///
/// Inputs must be contiguous (use [`dcnv3`], which takes care of it). `bwd` is implemented.
#[derive(Debug, Clone, Copy)]
pub struct Dcnv3Op {
    /// The operator's geometry.
    pub cfg: Dcnv3Config,
    /// The instruction set of the CPU kernel (the portable kernel runs when the CPU lacks it).
    pub isa: Isa,
}

impl Dcnv3Op {
    /// Wraps a config; the CPU kernel runs on the widest instruction set of the CPU.
    pub fn new(cfg: Dcnv3Config) -> Self {
        Self::with_isa(cfg, Isa::detect())
    }

    /// Wraps a config; the CPU kernel runs on `isa`.
    pub fn with_isa(cfg: Dcnv3Config, isa: Isa) -> Self {
        Self { cfg, isa }
    }
}

/// The DCNv3 backward as a candle custom op over
/// (input (N,Hin,Win,C), offset_mask, grad_out (N,Hout,Wout,C)).
///
/// `offset_mask` is the 1-D concatenation of the flattened offset (N*Hout*Wout*G*P*2 elements) and
/// the flattened mask (N*Hout*Wout*G*P elements). The result is a 1-D tensor in the input's dtype
/// holding grad_input, grad_offset and grad_mask flattened one after the other (lengths
/// [`Dcnv3Geometry::input_len`], [`Dcnv3Geometry::offset_len`], [`Dcnv3Geometry::mask_len`]);
/// grad_offset already includes the factor offset_scale.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dcnv3BackwardOp {
    /// The operator's geometry.
    pub(crate) cfg: Dcnv3Config,
    /// The instruction set of the CPU kernel (the portable kernel runs when the CPU lacks it).
    pub(crate) isa: Isa,
}

impl Dcnv3BackwardOp {
    /// Wraps a config; the CPU kernel runs on the widest instruction set of the CPU.
    // Used by the CUDA and Metal launchers only.
    #[cfg_attr(not(any(feature = "cuda", feature = "metal")), allow(dead_code))]
    pub(crate) fn new(cfg: Dcnv3Config) -> Self {
        Self::with_isa(cfg, Isa::detect())
    }

    /// Wraps a config; the CPU kernel runs on `isa`.
    pub(crate) fn with_isa(cfg: Dcnv3Config, isa: Isa) -> Self {
        Self { cfg, isa }
    }

    /// Geometry of a backward call from the shapes of its three arguments.
    pub(crate) fn geometry(
        &self,
        input: &Shape,
        offset_mask: &Shape,
        grad_out: &Shape,
    ) -> Result<Dcnv3Geometry> {
        let d = input.dims();
        if d.len() != 4 {
            bail!("dcnv3 backward: input must be rank 4, got {d:?}");
        }
        let (h_out, w_out) = self.cfg.output_size(d[1], d[2])?;
        let p = self.cfg.points();
        let off = Shape::from((d[0], h_out, w_out, self.cfg.group * p * 2));
        let mask = Shape::from((d[0], h_out, w_out, self.cfg.group * p));
        let g = self.cfg.geometry(input, &off, &mask)?;
        if offset_mask.dims() != [g.offset_len() + g.mask_len()] {
            bail!(
                "dcnv3 backward: offset_mask must be 1-D with {} + {} elements, got shape {:?}",
                g.offset_len(),
                g.mask_len(),
                offset_mask.dims()
            );
        }
        let want = [g.n, g.h_out, g.w_out, g.channels];
        if grad_out.dims() != want {
            bail!(
                "dcnv3 backward: grad_out must have shape {want:?}, got {:?}",
                grad_out.dims()
            );
        }
        Ok(g)
    }
}

/// A CPU kernel over `A` contiguous same-dtype slices, generic over the accumulation type
/// (shared with the DCNv4 ops).
pub(crate) trait CpuKernel<const A: usize>: Sync {
    /// Operator name for errors.
    const OP: &'static str;
    /// Argument names for errors.
    const ARGS: [&'static str; A];
    /// The result (flattened) from the arguments' values.
    fn run<F: cpu::Acc>(&self, g: &Dcnv3Geometry, args: [&[F]; A]) -> Vec<F>;
}

impl CpuKernel<3> for Dcnv3Op {
    const OP: &'static str = "dcnv3";
    const ARGS: [&'static str; 3] = ["input", "offset", "mask"];
    fn run<F: cpu::Acc>(&self, g: &Dcnv3Geometry, [input, offset, mask]: [&[F]; 3]) -> Vec<F> {
        let lay = cpu::PointLayout::dcnv3(g);
        cpu::forward(self.isa, &self.cfg, g, lay, input, offset, mask)
    }
}

impl CpuKernel<3> for Dcnv3BackwardOp {
    const OP: &'static str = "dcnv3 backward";
    const ARGS: [&'static str; 3] = ["input", "offset_mask", "grad_out"];
    fn run<F: cpu::Acc>(
        &self,
        g: &Dcnv3Geometry,
        [input, offset_mask, grad_out]: [&[F]; 3],
    ) -> Vec<F> {
        let (la, lb) = (g.input_len(), g.offset_len());
        // The input gradient is accumulated into: zeros written, not calloc'd.
        let mut packed = crate::ops::written_zeros(la + lb + g.mask_len(), F::ZERO);
        let (gin, rest) = packed.split_at_mut(la);
        let (goff, gmask) = rest.split_at_mut(lb);
        let (offset, mask) = offset_mask.split_at(lb);
        let rows = cpu::GradRows {
            off: goff,
            mask: Some(gmask),
        };
        let lay = cpu::PointLayout::dcnv3(g);
        cpu::backward(
            self.isa, &self.cfg, g, lay, input, offset, mask, grad_out, gin, rows,
        );
        packed
    }
}

/// The arguments' values as contiguous slices of `T`.
fn slices<'a, K: CpuKernel<A>, T: WithDType, const A: usize>(
    args: [(&'a CpuStorage, &Layout); A],
) -> Result<[&'a [T]; A]> {
    let mut out: [&'a [T]; A] = [&[]; A];
    for (i, (s, l)) in args.into_iter().enumerate() {
        out[i] = contiguous_slice::<T>(s, l, K::OP, K::ARGS[i])?;
    }
    Ok(out)
}

/// Runs `k` natively in `T` (f32 or f64).
fn run_native<K: CpuKernel<A>, T: cpu::Acc + WithDType, const A: usize>(
    k: &K,
    g: &Dcnv3Geometry,
    args: [(&CpuStorage, &Layout); A],
) -> Result<CpuStorage> {
    let vals = slices::<K, T, A>(args)?;
    Ok(T::to_cpu_storage_owned(k.run(g, vals)))
}

/// Runs `k` in f32 on the values of a half type (f16 or bf16), rounding the result back once.
fn run_half<K: CpuKernel<A>, T: WithDType, const A: usize>(
    k: &K,
    g: &Dcnv3Geometry,
    args: [(&CpuStorage, &Layout); A],
) -> Result<CpuStorage>
where
    [T]: HalfFloatSliceExt,
{
    let vals = slices::<K, T, A>(args)?;
    let wide: [Vec<f32>; A] = vals.map(|v| v.to_f32_vec());
    let out = k.run::<f32>(g, std::array::from_fn(|i| wide[i].as_slice()));
    let mut res = vec![T::from_f64(0.0); out.len()];
    res.convert_from_f32_slice(&out);
    Ok(T::to_cpu_storage_owned(res))
}

/// The CPU forward of a kernel: dispatch on the dtype of the first argument (the others must
/// match; f32 and f64 natively, f16 and bf16 through f32).
pub(crate) fn cpu_dispatch<K: CpuKernel<A>, const A: usize>(
    k: &K,
    g: &Dcnv3Geometry,
    args: [(&CpuStorage, &Layout); A],
) -> Result<CpuStorage> {
    // The kernel's parallel loops (image copy, pixel chunks) fork and join inside the pool.
    crate::cpu::on_pool(|| cpu_dispatch_here(k, g, args))
}

/// [`cpu_dispatch`] on the current thread.
fn cpu_dispatch_here<K: CpuKernel<A>, const A: usize>(
    k: &K,
    g: &Dcnv3Geometry,
    args: [(&CpuStorage, &Layout); A],
) -> Result<CpuStorage> {
    match args[0].0.dtype() {
        DType::F32 => run_native::<K, f32, A>(k, g, args),
        DType::F64 => run_native::<K, f64, A>(k, g, args),
        DType::F16 => run_half::<K, f16, A>(k, g, args),
        DType::BF16 => run_half::<K, bf16, A>(k, g, args),
        dt => bail!(
            "{}: supported dtypes are f32, f16, bf16 and f64, got {dt:?} (the {}); convert with \
             .to_dtype()",
            K::OP,
            K::ARGS[0]
        ),
    }
}

impl CustomOp3 for Dcnv3Op {
    fn name(&self) -> &'static str {
        "dcnv3"
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
        let g = self.cfg.geometry(l1.shape(), l2.shape(), l3.shape())?;
        let shape = Shape::from((g.n, g.h_out, g.w_out, g.channels));
        let st = cpu_dispatch(self, &g, [(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((st, shape))
    }

    gpu_fwd_methods!(launch::Core::V3, forward, s1, l1, s2, l2, s3, l3);

    fn bwd(
        &self,
        input: &Tensor,
        offset: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if let Some(grads) = backward_cpu_f32(input, offset, mask, grad_res, &self.cfg, self.isa)? {
            return Ok(grads);
        }
        let (gi, go, gm) = backward_with_isa(input, offset, mask, grad_res, &self.cfg, self.isa)?;
        Ok((Some(gi), Some(go), Some(gm)))
    }
}

/// The backward of f32 CPU tensors straight into three gradient buffers (zeroed by the pool),
/// for [`Dcnv3Op::bwd`]: [`backward_with_isa`]'s packed route copies the offsets and masks into
/// one tensor and zeroes one packed result on the calling thread, serial work of a training
/// step. `None` for other dtypes and devices.
#[allow(clippy::type_complexity)]
fn backward_cpu_f32(
    input: &Tensor,
    offset: &Tensor,
    mask: &Tensor,
    grad_out: &Tensor,
    cfg: &Dcnv3Config,
    isa: Isa,
) -> Result<Option<(Option<Tensor>, Option<Tensor>, Option<Tensor>)>> {
    let ts = [input, offset, mask, grad_out];
    if !ts
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
    {
        return Ok(None);
    }
    let g = check_backward_args(input, offset, mask, grad_out, cfg)?;
    // Three zero-fills and the kernel's loops fork and join inside the pool.
    crate::cpu::on_pool(|| backward_cpu_f32_here(ts, &g, cfg, isa)).map(Some)
}

/// [`backward_cpu_f32`] after its checks, on the current thread.
#[allow(clippy::type_complexity)]
fn backward_cpu_f32_here(
    ts: [&Tensor; 4],
    g: &Dcnv3Geometry,
    cfg: &Dcnv3Config,
    isa: Isa,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let [input, offset, mask, _] = ts;
    let [i, o, m, go] = ts.map(|t| t.contiguous());
    let (i, o, m, go) = (i?, o?, m?, go?);
    let (mut gin, mut goff, mut gmask) = (
        crate::ops::written_zeros_par(g.input_len()),
        crate::ops::written_zeros_par(g.offset_len()),
        crate::ops::written_zeros_par(g.mask_len()),
    );
    {
        const OP: &str = "dcnv3 backward";
        let (is, il) = i.storage_and_layout();
        let (os, ol) = o.storage_and_layout();
        let (ms, ml) = m.storage_and_layout();
        let (gs, gl) = go.storage_and_layout();
        let iv = crate::ops::cpu_f32_values(&is, il, OP, "input")?;
        let ov = crate::ops::cpu_f32_values(&os, ol, OP, "offset")?;
        let mv = crate::ops::cpu_f32_values(&ms, ml, OP, "mask")?;
        let gv = crate::ops::cpu_f32_values(&gs, gl, OP, "grad_out")?;
        let rows = cpu::GradRows {
            off: &mut goff,
            mask: Some(&mut gmask),
        };
        let lay = cpu::PointLayout::dcnv3(g);
        cpu::backward(isa, cfg, g, lay, iv, ov, mv, gv, &mut gin, rows);
    }
    let dev = input.device();
    Ok((
        Some(Tensor::from_vec(gin, input.shape(), dev)?),
        Some(Tensor::from_vec(goff, offset.shape(), dev)?),
        Some(Tensor::from_vec(gmask, mask.shape(), dev)?),
    ))
}

impl CustomOp3 for Dcnv3BackwardOp {
    fn name(&self) -> &'static str {
        "dcnv3-backward"
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
        let g = self.geometry(l1.shape(), l2.shape(), l3.shape())?;
        let len = g.input_len() + g.offset_len() + g.mask_len();
        let st = cpu_dispatch(self, &g, [(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((st, Shape::from(len)))
    }

    gpu_fwd_methods!(launch::Core::V3, backward, s1, l1, s2, l2, s3, l3);
}
