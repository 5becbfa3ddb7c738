//! The DCNv4 module of FlashInternImage as a reusable layer (channels-last).
//!
//! Built from the same helpers as [`crate::model::Dcnv3Layer`] (the crate's `Linear`, the
//! channels-last depthwise convolution), so that what holds for those (packing, dtypes,
//! gradients) holds here.

use crate::cpu::KernelPolicy;
use crate::model::dcnv3_layer::DcnSampling;
use crate::model::nn::{linear, project_rec, Linear, Recorder};
use crate::ops::dcnv4::dcnv4_with;
use crate::ops::dcnv4::offset_mask_channels;
use crate::ops::depthwise::DepthwiseConv2dNhwc;
use crate::ops::Dcnv3Config;
use candle_core::{bail, Module, Result, Tensor};
use candle_nn::VarBuilder;

/// Hyper-parameters of a [`Dcnv4Layer`].
#[derive(Debug, Clone, PartialEq)]
pub struct Dcnv4LayerConfig {
    /// Input and output channels.
    pub channels: usize,
    /// Number of groups (`channels` must be divisible by it).
    pub groups: usize,
    /// Scale of the kernel grid and the learned offsets.
    pub offset_scale: f64,
    /// Kernel of the depthwise convolution in front of `offset_mask` (odd); `None`: no
    /// convolution, `offset_mask` reads the input itself.
    pub dw_kernel_size: Option<usize>,
    /// `output_proj` has a bias.
    pub output_bias: bool,
}

impl Dcnv4LayerConfig {
    /// FlashInternImage's setting without the depthwise convolution and the output bias.
    pub fn new(channels: usize, groups: usize, offset_scale: f64) -> Self {
        Self {
            channels,
            groups,
            offset_scale,
            dw_kernel_size: None,
            output_bias: false,
        }
    }
}

/// Loads a Linear `weight` (out, in) with a `bias` (out) only when `bias` is set.
pub(crate) fn linear_opt_bias(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
    policy: KernelPolicy,
) -> Result<Linear> {
    if bias {
        return linear(in_dim, out_dim, vb, policy);
    }
    let weight = vb.get((out_dim, in_dim), "weight")?;
    Linear::with_policy(weight, None, policy)
}

/// DCNv4 layer: `value_proj`, optional depthwise `offset_mask_dw`, the `offset_mask` linear
/// (C -> K_pad, offsets and mask interleaved per group, padded to a multiple of 8), the DCNv4
/// core (3x3, stride 1, pad 1, mask as given) and `output_proj` (bias optional).
///
/// Input and output are channels-last (N, H, W, C); weight names follow the official module.
#[derive(Debug, Clone)]
pub struct Dcnv4Layer {
    value_proj: Linear,
    offset_mask_dw: Option<DepthwiseConv2dNhwc>,
    offset_mask: Linear,
    output_proj: Linear,
    cfg: Dcnv4LayerConfig,
    core: Dcnv3Config,
    policy: KernelPolicy,
}

impl Dcnv4Layer {
    /// Loads the layer's weights from `vb` (a builder already positioned at the module), with
    /// the process's default [`KernelPolicy`].
    pub fn new(cfg: &Dcnv4LayerConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_policy(cfg, vb, KernelPolicy::process_default()?)
    }

    /// Like [`Dcnv4Layer::new`], with the CPU kernels of `policy`.
    pub fn with_policy(
        cfg: &Dcnv4LayerConfig,
        vb: VarBuilder,
        policy: KernelPolicy,
    ) -> Result<Self> {
        let (c, g) = (cfg.channels, cfg.groups);
        if c == 0 || g == 0 || !c.is_multiple_of(g) {
            bail!("Dcnv4Layer: {c} channels cannot be split into {g} groups");
        }
        let core = Dcnv3Config::internimage(g, c / g, cfg.offset_scale);
        let value_proj = linear(c, c, vb.pp("value_proj"), policy)?;
        let offset_mask_dw = match cfg.dw_kernel_size {
            None => None,
            Some(k) if k.is_multiple_of(2) => {
                bail!("Dcnv4Layer: dw_kernel_size must be odd, got {k}")
            }
            Some(k) => {
                let w = vb.get((c, 1, k, k), "offset_mask_dw.weight")?;
                let b = vb.get(c, "offset_mask_dw.bias")?;
                Some(DepthwiseConv2dNhwc::with_policy(
                    &w,
                    Some(&b),
                    (k - 1) / 2,
                    policy,
                )?)
            }
        };
        let offset_mask = linear(c, offset_mask_channels(&core), vb.pp("offset_mask"), policy)?;
        let output_proj = linear_opt_bias(c, c, cfg.output_bias, vb.pp("output_proj"), policy)?;
        Ok(Self {
            value_proj,
            offset_mask_dw,
            offset_mask,
            output_proj,
            cfg: cfg.clone(),
            core,
            policy,
        })
    }

    /// The layer's hyper-parameters.
    pub fn config(&self) -> &Dcnv4LayerConfig {
        &self.cfg
    }

    /// The geometry passed to the core op.
    pub fn core_config(&self) -> &Dcnv3Config {
        &self.core
    }

    fn check_input(&self, xs: &Tensor) -> Result<()> {
        match xs.dims() {
            [_, _, _, c] if *c == self.cfg.channels => Ok(()),
            d => bail!(
                "Dcnv4Layer: expected a channels-last (N, H, W, {}) tensor, got shape {d:?}",
                self.cfg.channels
            ),
        }
    }

    /// The packed offset/mask tensor (N, H, W, K_pad) for input `xs` (NHWC): no LayerNorm, no
    /// GELU, no softmax.
    pub fn offset_mask(&self, xs: &Tensor) -> Result<Tensor> {
        self.check_input(xs)?;
        match &self.offset_mask_dw {
            Some(dw) => self.offset_mask.forward(&dw.forward(xs)?),
            None => self.offset_mask.forward(xs),
        }
    }

    /// The offsets and (unnormalised) mask this layer feeds to the core op, unpacked into the
    /// DCNv3 layout (offset (N, H, W, G*P*2), mask (N, H, W, G*P)).
    pub fn sampling(&self, xs: &Tensor) -> Result<DcnSampling> {
        let om = self.offset_mask(xs)?;
        let (n, h, w, _) = om.dims4()?;
        let (g, p) = (self.core.group, self.core.points());
        let body = om.narrow(3, 0, g * 3 * p)?.reshape((n, h, w, g, 3 * p))?;
        let offset = body.narrow(4, 0, 2 * p)?.reshape((n, h, w, g * 2 * p))?;
        let mask = body.narrow(4, 2 * p, p)?.reshape((n, h, w, g * p))?;
        Ok(DcnSampling {
            offset,
            mask,
            cfg: self.core,
        })
    }

    pub(crate) fn forward_rec(&self, xs: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        let y = self.core_rec(xs, rec)?;
        project_rec(&self.output_proj, &y, rec)
    }

    /// The output projection.
    pub(crate) fn output_proj(&self) -> &Linear {
        &self.output_proj
    }

    /// Everything before the output projection: the core's output.
    pub(crate) fn core_rec(&self, xs: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        let om = self.offset_mask(xs)?;
        let v = self.value_proj.forward(xs)?;
        let y = dcnv4_with(&v, &om, &self.core, self.policy)?;
        if rec.on() {
            rec.put("core.input", &v);
            rec.put("core.offset_mask", &om);
            rec.put("core.out", &y);
        }
        Ok(y)
    }
}

impl Module for Dcnv4Layer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_rec(xs, &mut Recorder::off())
    }
}
