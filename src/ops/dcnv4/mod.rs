//! DCNv4 core operator (FlashInternImage), channels-last.
//!
//! DCNv4 is the DCNv3 core applied to offsets and a mask read from one packed tensor, with the
//! mask used as given (no softmax): `offset_mask` (N, H_out, W_out, K_pad), K_pad =
//! ceil(G*3P / 8) * 8, where columns [g*3P, g*3P + 2P) of group g hold its P offset pairs (x, y)
//! in DCNv3's x-major point order and columns [g*3P + 2P, (g+1)*3P) its P mask values. Columns
//! past G*3P are padding: never read, and their gradient is zero.
//!
//! [`Dcnv4Op`] is a [`candle_core::CustomOp2`] whose CPU kernels are those of DCNv3
//! (`ops::dcnv3::cpu`, parametrised by where each point's offsets and mask live); its `bwd` is
//! the internal `Dcnv4BackwardOp`, so `Tensor::backward` works through [`dcnv4`].

mod validate;

use crate::cpu::{Isa, KernelPolicy};
use crate::ops::dcnv3::cpu::{self, GradRows, PointLayout};
#[cfg(any(feature = "cuda", feature = "metal"))]
use crate::ops::dcnv3::launch::Core;
use crate::ops::dcnv3::{cpu_dispatch, gpu_fwd_methods, CpuKernel, Dcnv3Config, Dcnv3Geometry};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// Checks dtypes and devices of the two tensors and the shapes against `cfg`.
fn check_args(input: &Tensor, offset_mask: &Tensor, cfg: &Dcnv3Config) -> Result<Dcnv3Geometry> {
    let dt = input.dtype();
    if offset_mask.dtype() != dt {
        bail!(
            "dcnv4: offset_mask dtype must equal the input dtype {dt:?}, got {:?}; convert with \
             .to_dtype()",
            offset_mask.dtype()
        );
    }
    if !offset_mask.device().same_device(input.device()) {
        bail!(
            "dcnv4: offset_mask must be on the input's device {:?}, got {:?}; move it with \
             .to_device()",
            input.device().location(),
            offset_mask.device().location()
        );
    }
    if !matches!(
        dt,
        candle_core::DType::F32
            | candle_core::DType::F16
            | candle_core::DType::BF16
            | candle_core::DType::F64
    ) {
        bail!("dcnv4: supported dtypes are f32, f16, bf16 and f64, got {dt:?}");
    }
    validate::geometry(cfg, input.shape(), offset_mask.shape())
}

/// DCNv4 core: input (N,Hin,Win,G*Cg), offset_mask (N,Hout,Wout,K_pad) in the official
/// interleaved, padded layout -> output (N,Hout,Wout,G*Cg) in the input's dtype.
///
/// `cfg` is the DCNv3 configuration (kernel, stride, pad, dilation, group, group_channels,
/// offset_scale, remove_center); K_pad is [`offset_mask_channels`]. The mask is used as given
/// (no softmax). Any strides are accepted; both tensors must share dtype (f32, f16, bf16 with
/// f32 accumulation, or f64) and device. Errors (never panics) on bad shapes, dtypes, devices
/// or configs. Differentiable: gradients flow to the input and to offset_mask (zero in its
/// padding columns). The CPU kernels follow the process's default [`KernelPolicy`] (see
/// [`dcnv4_with`]).
pub fn dcnv4(input: &Tensor, offset_mask: &Tensor, cfg: &Dcnv3Config) -> Result<Tensor> {
    dcnv4_with(input, offset_mask, cfg, KernelPolicy::process_default()?)
}

/// [`dcnv4`] with the CPU kernels of `policy` (the reference policy runs the portable kernel).
pub fn dcnv4_with(
    input: &Tensor,
    offset_mask: &Tensor,
    cfg: &Dcnv3Config,
    policy: KernelPolicy,
) -> Result<Tensor> {
    check_args(input, offset_mask, cfg)?;
    let input = input.contiguous()?;
    let offset_mask = offset_mask.contiguous()?;
    input.apply_op2(&offset_mask, Dcnv4Op::with_isa(*cfg, policy.isa()))
}

/// The resolved geometry of a DCNv4 call (that of the DCNv3 call on the unpacked arguments),
/// after checking the input and offset_mask shapes against `cfg`.
pub fn geometry(cfg: &Dcnv3Config, input: &Shape, offset_mask: &Shape) -> Result<Dcnv3Geometry> {
    validate::geometry(cfg, input, offset_mask)
}

/// Width K_pad = ceil(group*3*P / 8) * 8 of the `offset_mask` tensor for `cfg`
/// (P = kernel_h*kernel_w, minus one with remove_center).
///
/// Saturating (exact for every config that passes [`Dcnv3Config::validate`], which bounds
/// group*3*P below 2^31).
pub fn offset_mask_channels(cfg: &Dcnv3Config) -> usize {
    let k = cfg.group.saturating_mul(cfg.points()).saturating_mul(3);
    k.div_ceil(8).saturating_mul(8)
}

/// Gradients of `sum(dcnv4(input, offset_mask) * grad_out)` with respect to input and
/// offset_mask, without autograd (same shapes and dtype as the arguments; the padding columns
/// of the offset_mask gradient are zero).
pub fn dcnv4_backward(
    input: &Tensor,
    offset_mask: &Tensor,
    grad_out: &Tensor,
    cfg: &Dcnv3Config,
) -> Result<(Tensor, Tensor)> {
    let isa = KernelPolicy::process_default()?.isa();
    backward_with_isa(input, offset_mask, grad_out, cfg, isa)
}

/// [`dcnv4_backward`] on the kernels of `isa`.
fn backward_with_isa(
    input: &Tensor,
    offset_mask: &Tensor,
    grad_out: &Tensor,
    cfg: &Dcnv3Config,
    isa: Isa,
) -> Result<(Tensor, Tensor)> {
    let g = check_args(input, offset_mask, cfg)?;
    let want = [g.n, g.h_out, g.w_out, g.channels];
    if grad_out.dims() != want {
        bail!(
            "dcnv4_backward: grad_out must have the output shape {want:?}, got {:?}",
            grad_out.dims()
        );
    }
    if grad_out.dtype() != input.dtype() || !grad_out.device().same_device(input.device()) {
        bail!(
            "dcnv4_backward: grad_out must have the input's dtype {:?} and device, got {:?}",
            input.dtype(),
            grad_out.dtype()
        );
    }
    let packed = crate::ops::inference_op3(
        &input.detach().contiguous()?,
        &offset_mask.detach().contiguous()?,
        &grad_out.detach().contiguous()?,
        &Dcnv4BackwardOp::with_isa(*cfg, isa),
    )?;
    let a = g.input_len();
    let b = offset_mask.elem_count();
    Ok((
        packed.narrow(0, 0, a)?.reshape(input.shape())?,
        packed.narrow(0, a, b)?.reshape(offset_mask.shape())?,
    ))
}

/// The DCNv4 forward as a candle custom op over (input, offset_mask).
///
/// Inputs must be contiguous (use [`dcnv4`], which takes care of it). `bwd` is implemented.
#[derive(Debug, Clone, Copy)]
pub struct Dcnv4Op {
    /// The operator's geometry.
    pub cfg: Dcnv3Config,
    /// The instruction set of the CPU kernel (the portable kernel runs when the CPU lacks it).
    pub isa: Isa,
}

impl Dcnv4Op {
    /// Wraps a config; the CPU kernel runs on the widest instruction set of the CPU.
    pub fn new(cfg: Dcnv3Config) -> Self {
        Self::with_isa(cfg, Isa::detect())
    }

    /// Wraps a config; the CPU kernel runs on `isa`.
    pub fn with_isa(cfg: Dcnv3Config, isa: Isa) -> Self {
        Self { cfg, isa }
    }
}

/// The DCNv4 backward as a candle custom op over
/// (input (N,Hin,Win,C), offset_mask (N,Hout,Wout,K_pad), grad_out (N,Hout,Wout,C)).
///
/// The result is a 1-D tensor in the input's dtype holding grad_input and grad_offset_mask
/// flattened one after the other (the latter with zero padding columns; offsets' gradients
/// include the factor offset_scale).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dcnv4BackwardOp {
    /// The operator's geometry.
    pub(crate) cfg: Dcnv3Config,
    /// The instruction set of the CPU kernel (the portable kernel runs when the CPU lacks it).
    pub(crate) isa: Isa,
}

impl Dcnv4BackwardOp {
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
        let g = validate::geometry(&self.cfg, input, offset_mask)?;
        let want = [g.n, g.h_out, g.w_out, g.channels];
        if grad_out.dims() != want {
            bail!(
                "dcnv4 backward: grad_out must have shape {want:?}, got {:?}",
                grad_out.dims()
            );
        }
        Ok(g)
    }
}

impl CpuKernel<2> for Dcnv4Op {
    const OP: &'static str = "dcnv4";
    const ARGS: [&'static str; 2] = ["input", "offset_mask"];
    fn run<F: cpu::Acc>(&self, g: &Dcnv3Geometry, [input, om]: [&[F]; 2]) -> Vec<F> {
        let lay = PointLayout::dcnv4(g, offset_mask_channels(&self.cfg));
        cpu::forward(self.isa, &self.cfg, g, lay, input, om, om)
    }
}

impl CpuKernel<3> for Dcnv4BackwardOp {
    const OP: &'static str = "dcnv4 backward";
    const ARGS: [&'static str; 3] = ["input", "offset_mask", "grad_out"];
    fn run<F: cpu::Acc>(&self, g: &Dcnv3Geometry, [input, om, grad_out]: [&[F]; 3]) -> Vec<F> {
        let la = g.input_len();
        // Zeros (written, not calloc'd: the input gradient is accumulated into); the padding
        // columns keep a zero gradient.
        let mut packed = crate::ops::written_zeros(la + om.len(), F::ZERO);
        let (gin, gom) = packed.split_at_mut(la);
        let lay = PointLayout::dcnv4(g, offset_mask_channels(&self.cfg));
        let rows = GradRows {
            off: gom,
            mask: None,
        };
        cpu::backward(
            self.isa, &self.cfg, g, lay, input, om, om, grad_out, gin, rows,
        );
        packed
    }
}

impl CustomOp2 for Dcnv4Op {
    fn name(&self) -> &'static str {
        "dcnv4"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = validate::geometry(&self.cfg, l1.shape(), l2.shape())?;
        let shape = Shape::from((g.n, g.h_out, g.w_out, g.channels));
        let st = cpu_dispatch(self, &g, [(s1, l1), (s2, l2)])?;
        Ok((st, shape))
    }

    gpu_fwd_methods!(Core::V4, forward, s1, l1, s2, l2);

    fn bwd(
        &self,
        input: &Tensor,
        offset_mask: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gi, gom) = backward_with_isa(input, offset_mask, grad_res, &self.cfg, self.isa)?;
        Ok((Some(gi), Some(gom)))
    }
}

impl CustomOp3 for Dcnv4BackwardOp {
    fn name(&self) -> &'static str {
        "dcnv4-backward"
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
        let len = g.input_len() + l2.shape().elem_count();
        let st = cpu_dispatch(self, &g, [(s1, l1), (s2, l2), (s3, l3)])?;
        Ok((st, Shape::from(len)))
    }

    gpu_fwd_methods!(Core::V4, backward, s1, l1, s2, l2, s3, l3);
}
