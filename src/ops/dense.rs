//! [`Linear`]: a linear layer whose f32 CPU weights are packed once, when it is built, for the
//! crate's GEMM ([`crate::cpu::gemm`]), and [`mlp`], InternImage's `fc2(gelu(fc1(x)))` on such
//! layers.

use crate::cpu::gemm::{
    block_tail_fits, block_tail_packed, linear_packed, mlp_block_rows, mlp_packed, to_bf16_rows,
    BlockTail, PackedWeight, Rows,
};
use crate::cpu::{Isa, KernelPolicy};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use half::bf16;
use std::sync::Arc;

/// A linear layer `y = x @ weight^T + bias` over the last dimension, like `candle_nn::Linear`.
///
/// Under a fast [`KernelPolicy`], an f32, contiguous CPU weight that tracks no gradient is packed
/// once here into the panel layout of the policy's GEMM kernel and the tensors are dropped (no
/// second copy is kept); the forward then runs the packed GEMM with the bias (and GELU) fused,
/// or, for an input that tracks a gradient, candle's matmul on the unpacked weights (so the input
/// gradient is never lost). A bf16 weight is packed in bf16 when the policy's instruction set is
/// [`crate::Isa::Amx`] (AMX tiles) or [`crate::Isa::Avx512Bf16`] (bf16 products, f32
/// accumulation, bf16 in and out). Otherwise
/// (GPUs, f16, bf16 elsewhere, trainable weights, the reference policy) it keeps the tensors and
/// runs candle's ops; bf16 on the CPU then runs in f32.
#[derive(Debug, Clone)]
pub struct Linear {
    weights: Weights,
    policy: KernelPolicy,
}

#[derive(Debug, Clone)]
enum Weights {
    /// Candle tensors: GPUs, f16/bf16, tracked (trainable) weights, the reference policy.
    Tensors(candle_nn::Linear),
    /// f32 weight and bias packed for the CPU GEMM.
    Packed(Arc<PackedWeight>),
}

impl Linear {
    /// A layer from `weight` (out, in) and an optional `bias` (out), with the process's default
    /// [`KernelPolicy`] (from the environment).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::with_policy(weight, bias, KernelPolicy::process_default()?)
    }

    /// A layer from `weight` (out, in) and an optional `bias` (out) whose CPU kernels follow
    /// `policy`.
    pub fn with_policy(weight: Tensor, bias: Option<Tensor>, policy: KernelPolicy) -> Result<Self> {
        let weights = match pack(&weight, bias.as_ref(), policy)? {
            Some(packed) => Weights::Packed(Arc::new(packed)),
            None => Weights::Tensors(candle_nn::Linear::new(weight, bias)),
        };
        Ok(Self { weights, policy })
    }

    /// The weight and bias tensors, unless they were packed for the CPU GEMM (the training
    /// ops take them as graph tensors).
    pub(crate) fn tensors(&self) -> Option<(&Tensor, Option<&Tensor>)> {
        match &self.weights {
            Weights::Tensors(lin) => Some((lin.weight(), lin.bias())),
            Weights::Packed(_) => None,
        }
    }

    /// Whether the weights were packed for the CPU GEMM.
    pub fn is_packed(&self) -> bool {
        matches!(self.weights, Weights::Packed(_))
    }

    /// `gelu_erf(self.forward(xs))`, with the bias add and the GELU fused where possible.
    pub fn forward_gelu(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_impl(xs, true)
    }

    fn forward_impl(&self, xs: &Tensor, gelu: bool) -> Result<Tensor> {
        let apply = |xs: &Tensor, lin: &candle_nn::Linear| {
            let y = lin.forward(xs)?;
            if gelu {
                super::activation::gelu_erf_with(&y, self.policy)
            } else {
                Ok(y)
            }
        };
        // The training kernel: a linear with a real backward (f32 CPU, fast policy).
        let train = |w: &Tensor, b: Option<&Tensor>| -> Result<Tensor> {
            let y = super::train::linear(xs, w, b, self.policy.isa())?;
            if gelu {
                super::activation::gelu_erf_with(&y, self.policy)
            } else {
                Ok(y)
            }
        };
        match &self.weights {
            // The packed GEMM has no backward: a tracked input (saliency, a frozen backbone under
            // a trainable stem) takes the training kernel (or the tensor path) on the unpacked
            // weights.
            Weights::Packed(p) if xs.track_op() => {
                let (w, b) = p.unpack();
                let dev = candle_core::Device::Cpu;
                let w = Tensor::from_vec(w, (p.n(), p.k()), &dev)?;
                let b = Tensor::from_vec(b, p.n(), &dev)?;
                if super::train::applies(self.policy, &[xs, &w]) {
                    return train(&w, Some(&b));
                }
                let lin = candle_nn::Linear::new(w, Some(b));
                match xs.dtype() {
                    DType::F32 => apply(xs, &lin),
                    dt => apply(&xs.to_dtype(DType::F32)?, &lin)?.to_dtype(dt),
                }
            }
            Weights::Packed(p) => PackedOp::Linear { w: p.clone(), gelu }.apply(xs),
            Weights::Tensors(lin) if trains(lin, xs, self.policy) => {
                train(lin.weight(), lin.bias())
            }
            Weights::Tensors(lin) if bf16_on_cpu(xs) => {
                let w = lin.weight().to_dtype(DType::F32)?;
                let b = lin.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
                let lin = candle_nn::Linear::new(w, b);
                apply(&xs.to_dtype(DType::F32)?, &lin)?.to_dtype(DType::BF16)
            }
            Weights::Tensors(lin) => apply(xs, lin),
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_impl(xs, false)
    }
}

/// Whether a layer with tensor weights `lin` runs the training kernel for input `xs`: something
/// tracks a gradient and every tensor is f32 on the CPU under a fast policy.
fn trains(lin: &candle_nn::Linear, xs: &Tensor, policy: KernelPolicy) -> bool {
    super::train::engages(policy, &[xs, lin.weight()], lin.bias())
}

/// Candle's CPU matmul has no bf16 kernel: on the CPU, bf16 products are computed in f32.
pub(crate) fn bf16_on_cpu(t: &Tensor) -> bool {
    t.dtype() == DType::BF16 && t.device().is_cpu()
}

/// `fc2(gelu_erf(fc1(xs)))`, InternImage's MLP, on (..., C) channels-last input.
///
/// With packed layers and enough rows to keep every thread busy, the rows are processed in
/// blocks whose hidden activations stay in cache (the (..., 4C) hidden tensor is never
/// written to memory); with few rows, two packed GEMMs that also split the columns. Anything
/// else runs `fc1.forward_gelu` then `fc2.forward`.
pub fn mlp(xs: &Tensor, fc1: &Linear, fc2: &Linear) -> Result<Tensor> {
    match (&fc1.weights, &fc2.weights) {
        (Weights::Packed(a), Weights::Packed(b)) if !xs.track_op() => mlp_forward_packed(xs, a, b),
        // Training: one op whose backward recomputes the hidden activations (not stored).
        (Weights::Tensors(a), Weights::Tensors(b))
            if trains(a, xs, fc1.policy) && trains(b, xs, fc1.policy) =>
        {
            match a.bias() {
                Some(b1) => super::train::mlp(
                    xs,
                    (a.weight(), b1),
                    (b.weight(), b.bias()),
                    fc1.policy.isa(),
                ),
                None => fc2.forward(&fc1.forward_gelu(xs)?),
            }
        }
        _ => fc2.forward(&fc1.forward_gelu(xs)?),
    }
}

/// The inference tail of a pre-norm block after its deformable core `y`, fused by row blocks
/// on the CPU: `x2 = x + gamma1 * out_proj(y)`, then `x2 + gamma2 * fc2(gelu(fc1(norm(x2))))`
/// with `norm` = (weight, bias, eps) a LayerNorm over the channels. Bitwise equal to the
/// unfused ops; `Ok(None)` (the caller runs those) unless all three layers are packed f32, the
/// tensors are f32 CPU tensors that track no gradient and there are enough rows to fill every
/// thread with whole row blocks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block_tail(
    x: &Tensor,
    y: &Tensor,
    out_proj: &Linear,
    gamma1: Option<&Tensor>,
    norm: (&Tensor, &Tensor, f64),
    fc1: &Linear,
    fc2: &Linear,
    gamma2: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (Weights::Packed(wo), Weights::Packed(w1), Weights::Packed(w2)) =
        (&out_proj.weights, &fc1.weights, &fc2.weights)
    else {
        return Ok(None);
    };
    let c = wo.n();
    let small = [Some(norm.0), Some(norm.1), gamma1, gamma2];
    let applies = (wo.k(), w1.k(), w2.k(), w2.n()) == (c, c, w1.n(), c)
        && x.device().is_cpu()
        && y.device().is_cpu()
        && (x.dtype(), y.dtype()) == (DType::F32, DType::F32)
        && x.dims() == y.dims()
        && x.dims().last() == Some(&c)
        && !super::tracks_grad(&[x, y])
        && small.iter().flatten().all(|t| {
            t.dtype() == DType::F32 && t.device().is_cpu() && t.dims() == [c] && !t.track_op()
        });
    if !applies || !block_tail_fits(x.elem_count() / c.max(1), w1) {
        return Ok(None);
    }
    let values = |t: &Tensor| t.to_vec1::<f32>();
    let op = BlockTailOp {
        out_proj: wo.clone(),
        gamma1: gamma1.map(values).transpose()?,
        norm_weight: values(norm.0)?,
        norm_bias: values(norm.1)?,
        eps: norm.2 as f32,
        fc1: w1.clone(),
        fc2: w2.clone(),
        gamma2: gamma2.map(values).transpose()?,
        isa: fc1.policy.isa(),
    };
    super::inference_op2(&x.contiguous()?, &y.contiguous()?, &op).map(Some)
}

/// [`block_tail`] as a candle op on (x, y).
struct BlockTailOp {
    out_proj: Arc<PackedWeight>,
    gamma1: Option<Vec<f32>>,
    norm_weight: Vec<f32>,
    norm_bias: Vec<f32>,
    eps: f32,
    fc1: Arc<PackedWeight>,
    fc2: Arc<PackedWeight>,
    gamma2: Option<Vec<f32>>,
    isa: crate::cpu::Isa,
}

impl CustomOp2 for BlockTailOp {
    fn name(&self) -> &'static str {
        "internimage-block-tail"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_slice::<f32>(s1, l1, "block_tail", "input")?;
        let y = super::contiguous_slice::<f32>(s2, l2, "block_tail", "core output")?;
        let c = self.out_proj.n();
        if x.len() != y.len() || c == 0 || x.len() % c != 0 {
            candle_core::bail!(
                "block_tail: input {:?} and core output {:?} must be equal (..., {c}) shapes",
                l1.dims(),
                l2.dims()
            )
        }
        let m = x.len() / c;
        let (w, b, eps, isa) = (&self.norm_weight, &self.norm_bias, self.eps, self.isa);
        let norm = |src: &[f32], dst: &mut [std::mem::MaybeUninit<f32>]| {
            super::fused::ln_rows(isa, src, dst, w, b, eps)
        };
        let tail = BlockTail {
            out_proj: &self.out_proj,
            gamma1: self.gamma1.as_deref(),
            norm: &norm,
            fc1: &self.fc1,
            fc2: &self.fc2,
            gamma2: self.gamma2.as_deref(),
        };
        let mut out = Vec::with_capacity(x.len());
        block_tail_packed(x, y, m, &tail, &mut out.spare_capacity_mut()[..x.len()]);
        // SAFETY: block_tail_packed writes all m * c values.
        unsafe { out.set_len(x.len()) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// The MLP branch of a pre-norm block with its residual update,
/// `xs + drop_path(fc2(gelu(fc1(layer_norm(xs)))), p)`, as one training op
/// ([`super::train::prenorm_mlp_residual`]) when the training kernels apply to every tensor
/// (something tracks a gradient; f32 CPU tensors under a fast policy; fc1 with a bias);
/// `Ok(None)` otherwise (the caller keeps its separate LayerNorm, MLP and residual). The
/// stochastic-depth scales are drawn only when the op runs.
pub(crate) fn prenorm_mlp_residual(
    xs: &Tensor,
    (ln_w, ln_b, eps): (&Tensor, &Tensor, f64),
    fc1: &Linear,
    fc2: &Linear,
    p: f64,
) -> Result<Option<Tensor>> {
    let (Weights::Tensors(a), Weights::Tensors(b)) = (&fc1.weights, &fc2.weights) else {
        return Ok(None);
    };
    let policy = fc1.policy;
    let Some(b1) = a.bias() else {
        return Ok(None);
    };
    if !(trains(a, xs, policy)
        && trains(b, xs, policy)
        && super::train::applies(policy, &[ln_w, ln_b]))
    {
        return Ok(None);
    }
    let scale = super::train::drop_path_scales(xs.dim(0)?, p)?;
    super::train::prenorm_mlp_residual(
        xs,
        (ln_w, ln_b, eps),
        (a.weight(), b1),
        (b.weight(), b.bias()),
        scale,
        policy.isa(),
    )
    .map(Some)
}

/// `xs + drop_path(proj(y), p)` as one training op ([`super::train::project_residual`]) when
/// `proj` runs the training kernels for `y` (something tracks a gradient, f32 on the CPU under a
/// fast policy); `Ok(None)` otherwise.
pub(crate) fn project_residual(
    xs: &Tensor,
    y: &Tensor,
    proj: &Linear,
    p: f64,
) -> Result<Option<Tensor>> {
    let Weights::Tensors(lin) = &proj.weights else {
        return Ok(None);
    };
    let policy = proj.policy;
    if !(trains(lin, y, policy) && super::train::applies(policy, &[xs])) {
        return Ok(None);
    }
    let scale = super::train::drop_path_scales(xs.dim(0)?, p)?;
    super::train::project_residual(xs, y, lin.weight(), lin.bias(), scale, policy.isa()).map(Some)
}

/// `linear(xs)` = `xs @ weight^T + bias` like `candle_nn::Linear::forward`, through this crate's
/// GEMM where the process's default [`KernelPolicy`] allows (the weight is packed on each call:
/// build an [`Linear`] once to pack it once).
pub fn linear(xs: &Tensor, linear: &candle_nn::Linear) -> Result<Tensor> {
    Linear::new(linear.weight().clone(), linear.bias().cloned())?.forward(xs)
}

/// `gelu_erf(linear(xs))`, PyTorch's `fc1` + `nn.GELU()` of an MLP, with the bias add and the
/// GELU fused into the GEMM where the process's default [`KernelPolicy`] allows (see [`linear`]).
pub fn linear_gelu(xs: &Tensor, linear: &candle_nn::Linear) -> Result<Tensor> {
    Linear::new(linear.weight().clone(), linear.bias().cloned())?.forward_gelu(xs)
}

/// Packs a linear layer (`weight` (out, in), optional `bias` (out)) when the fast CPU path
/// applies: f32 contiguous CPU tensors that track no gradient under a fast policy. `Ok(None)`
/// otherwise (broadcast stand-ins, GPUs, f16/bf16, training, the reference policy).
fn pack(
    weight: &Tensor,
    bias: Option<&Tensor>,
    policy: KernelPolicy,
) -> Result<Option<PackedWeight>> {
    let dtype = weight.dtype();
    let eligible = |t: &Tensor| {
        t.device().is_cpu() && t.dtype() == dtype && !t.track_op() && t.is_contiguous()
    };
    let bf16_kernel =
        (dtype == DType::BF16 || policy.bf16_gemm_weights()) && policy.has_bf16_gemm();
    if !policy.is_fast()
        || !(dtype == DType::F32 || bf16_kernel)
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
    if bf16_kernel {
        let w = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = bias
            .map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .transpose()?;
        return Ok(PackedWeight::new_bf16(policy.isa(), &w, b.as_deref(), n, k));
    }
    // Packed straight from the tensors' storage (no intermediate copy).
    let (w_storage, w_layout) = weight.storage_and_layout();
    let w = super::cpu_f32_values(&w_storage, w_layout, "linear", "weight")?;
    Ok(match bias {
        Some(b) => {
            let (b_storage, b_layout) = b.storage_and_layout();
            let b = super::cpu_f32_values(&b_storage, b_layout, "linear", "bias")?;
            PackedWeight::new(policy.isa(), w, Some(b), n, k)
        }
        None => PackedWeight::new(policy.isa(), w, None, n, k),
    })
}

/// Rows (the product of the leading dims) of a (..., k) input, after checking it is a CPU
/// tensor with `k` features in f32, or in bf16 for bf16 weights.
fn rows_of(xs: &Tensor, k: usize, bf16_weights: bool, what: &str) -> Result<usize> {
    let (accepted, name) = if bf16_weights {
        (
            xs.dtype() == DType::F32 || xs.dtype() == DType::BF16,
            "bf16",
        )
    } else {
        (xs.dtype() == DType::F32, "f32")
    };
    if !xs.device().is_cpu() || !accepted {
        candle_core::bail!(
            "{what}: this layer holds {name} weights packed for the CPU, but the input is {:?} on {:?}; \
             pass an {name} CPU tensor, or build the model with the input's dtype and device",
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

/// `fc2(gelu(fc1(xs)))` through packed weights: fused by row blocks when there are enough rows
/// for every thread, otherwise two packed linears (which also split the columns).
fn mlp_forward_packed(
    xs: &Tensor,
    fc1: &Arc<PackedWeight>,
    fc2: &Arc<PackedWeight>,
) -> Result<Tensor> {
    if fc2.k() != fc1.n() {
        candle_core::bail!(
            "mlp: fc1 has {} outputs but fc2 takes {} inputs",
            fc1.n(),
            fc2.k()
        )
    }
    let m = rows_of(xs, fc1.k(), fc1.is_bf16(), "mlp")?;
    let threads = rayon::current_num_threads().max(1);
    if m < 2 * threads * mlp_block_rows(fc1) {
        let h = PackedOp::Linear {
            w: fc1.clone(),
            gelu: true,
        }
        .apply(xs)?;
        return PackedOp::Linear {
            w: fc2.clone(),
            gelu: false,
        }
        .apply(&h);
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
    Linear { w: Arc<PackedWeight>, gelu: bool },
    /// `fc2(gelu(fc1(x)))`, fused by row blocks.
    Mlp {
        fc1: Arc<PackedWeight>,
        fc2: Arc<PackedWeight>,
    },
}

impl PackedOp {
    fn what(&self) -> &'static str {
        match self {
            Self::Linear { .. } => "linear",
            Self::Mlp { .. } => "mlp",
        }
    }

    /// Whether the (first) weight is stored in bf16 (the op then takes f32 or bf16 rows).
    fn is_bf16(&self) -> bool {
        match self {
            Self::Linear { w, .. } => w.is_bf16(),
            Self::Mlp { fc1, .. } => fc1.is_bf16(),
        }
    }

    /// The instruction set the (first) weight was packed for.
    fn isa(&self) -> Isa {
        match self {
            Self::Linear { w, .. } => w.isa(),
            Self::Mlp { fc1, .. } => fc1.isa(),
        }
    }

    /// (input, output) features.
    fn features(&self) -> (usize, usize) {
        match self {
            Self::Linear { w, .. } => (w.k(), w.n()),
            Self::Mlp { fc1, fc2 } => (fc1.k(), fc2.n()),
        }
    }

    /// `xs (..., k) -> (..., n)`.
    fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        let (k, n) = self.features();
        let m = rows_of(xs, k, self.is_bf16(), self.what())?;
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
        let what = self.what();
        // bf16 weights take f32 or bf16 rows (checked by `rows_of`); the output has the
        // input's dtype.
        let bf16_rows = matches!(storage, CpuStorage::BF16(_));
        let x = if bf16_rows {
            Rows::Bf16(super::contiguous_slice::<bf16>(
                storage, layout, what, "input",
            )?)
        } else {
            Rows::F32(super::contiguous_slice::<f32>(
                storage, layout, what, "input",
            )?)
        };
        let (k, n) = self.features();
        let m = layout.dims()[0];
        let len = match x {
            Rows::F32(x) => x.len(),
            Rows::Bf16(x) => x.len(),
        };
        if len != m * k {
            candle_core::bail!("{what}: expected {m} x {k} inputs, got {len}")
        }
        let mut y = Vec::with_capacity(m * n);
        let out = &mut y.spare_capacity_mut()[..m * n];
        match self {
            Self::Linear { w, gelu } => linear_packed(x, m, w, *gelu, out),
            Self::Mlp { fc1, fc2 } => mlp_packed(x, m, fc1, fc2, out),
        }
        // SAFETY: linear_packed and mlp_packed write all m * n values.
        unsafe { y.set_len(m * n) };
        let shape = Shape::from((m, n));
        if !bf16_rows {
            return Ok((CpuStorage::F32(y), shape));
        }
        Ok((CpuStorage::BF16(to_bf16_rows(self.isa(), &y)), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Isa;

    fn randn(shape: &[usize], scale: f64, seed: u64) -> Tensor {
        // Deterministic values (a small LCG), so that failures reproduce.
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((s >> 40) as f64 / (1u64 << 24) as f64 - 0.5) * 2.0 * scale) as f32
            })
            .collect();
        Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
    }

    /// The fused block tail engages for enough rows and equals, bit for bit, the unfused ops it
    /// replaces (projection, residual, LayerNorm, MLP, residual), with and without layer scale,
    /// on every instruction set of this CPU, with f32 weights and (AVX512_BF16, AMX) bf16 GEMM
    /// weights.
    #[test]
    fn block_tail_equals_the_unfused_ops_bitwise() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let (c, hid) = (48, 192);
            let policies = Isa::supported().into_iter().flat_map(|isa| {
                let policy = KernelPolicy::with_isa(isa).unwrap();
                // bf16 GEMM weights (AVX512_BF16, AMX) where the CPU has a bf16 GEMM.
                let bf16 = policy.with_bf16_gemm_weights();
                std::iter::once(policy).chain(bf16.bf16_gemm_weights().then_some(bf16))
            });
            for policy in policies {
                let isa = format!(
                    "{}{}",
                    policy.isa(),
                    if policy.bf16_gemm_weights() {
                        " bf16 weights"
                    } else {
                        ""
                    }
                );
                let lin = |o: usize, i: usize, seed: u64| {
                    let w = randn(&[o, i], 0.2, seed);
                    let b = randn(&[o], 0.1, seed + 1);
                    Linear::with_policy(w, Some(b), policy).unwrap()
                };
                let (proj, fc1, fc2) = (lin(c, c, 1), lin(hid, c, 3), lin(c, hid, 5));
                for l in [&proj, &fc1, &fc2] {
                    match &l.weights {
                        Weights::Packed(p) => assert_eq!(p.is_bf16(), policy.bf16_gemm_weights()),
                        Weights::Tensors(_) => panic!("{isa}: not packed"),
                    }
                }
                let rows = 2
                    * 2
                    * match &fc1.weights {
                        Weights::Packed(p) => mlp_block_rows(p),
                        Weights::Tensors(_) => panic!("{isa}: fc1 not packed"),
                    }
                    + 7;
                let x = randn(&[1, rows, 1, c], 1.0, 7);
                let y = randn(&[1, rows, 1, c], 1.0, 8);
                let (nw, nb) = (
                    randn(&[c], 0.5, 9).affine(1.0, 1.0).unwrap(),
                    randn(&[c], 0.2, 10),
                );
                let g = randn(&[c], 0.5, 11);
                for gamma in [None, Some(&g)] {
                    let fused =
                        block_tail(&x, &y, &proj, gamma, (&nw, &nb, 1e-6), &fc1, &fc2, gamma)
                            .unwrap()
                            .unwrap_or_else(|| panic!("{isa}: the fused tail did not engage"));
                    let res = |a: &Tensor, b: &Tensor| match gamma {
                        Some(g) => a + b.broadcast_mul(g).unwrap(),
                        None => a + b,
                    };
                    let x2 = res(&x, &proj.forward(&y).unwrap()).unwrap();
                    let n =
                        crate::ops::layer_norm_last_dim_with(&x2, &nw, &nb, 1e-6, policy).unwrap();
                    let want = res(&x2, &mlp(&n, &fc1, &fc2).unwrap()).unwrap();
                    let (a, b) = (
                        fused.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    );
                    assert_eq!(fused.dims(), want.dims());
                    let bad = a
                        .iter()
                        .zip(&b)
                        .position(|(p, q)| p.to_bits() != q.to_bits());
                    assert!(
                        bad.is_none(),
                        "{isa} gamma {}: differs at {bad:?}",
                        gamma.is_some()
                    );
                }
                // Too few rows for whole row blocks on every thread: not taken.
                let xs = x.narrow(1, 0, 8).unwrap();
                let ys = y.narrow(1, 0, 8).unwrap();
                let small = block_tail(&xs, &ys, &proj, None, (&nw, &nb, 1e-6), &fc1, &fc2, None);
                assert!(
                    small.unwrap().is_none(),
                    "{isa}: 8 rows should not take the fused tail"
                );
            }
        });
    }
}
