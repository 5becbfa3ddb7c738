//! The DCNv3 module of InternImage as a reusable layer (channels-last).

use crate::cpu::KernelPolicy;
use crate::model::nn::{layer_norm, linear, project_rec, LayerNorm, Linear, Recorder};
use crate::ops::dcnv3::dcnv3_with;
use crate::ops::depthwise::DepthwiseConv2dNhwc;
use crate::ops::{gelu_erf_with, Dcnv3Config};
use candle_core::{bail, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Hyper-parameters of a [`Dcnv3Layer`].
#[derive(Debug, Clone, PartialEq)]
pub struct Dcnv3LayerConfig {
    /// Input and output channels.
    pub channels: usize,
    /// Number of groups (`channels` must be divisible by it).
    pub groups: usize,
    /// Sampling kernel (odd, square), 3 in InternImage.
    pub kernel_size: usize,
    /// Dilation of the sampling kernel.
    pub dilation: usize,
    /// Zero padding of the core op; `dilation * (kernel_size - 1) / 2` keeps the size.
    pub pad: usize,
    /// Kernel of the depthwise convolution in the offset/mask branch (odd).
    pub dw_kernel_size: usize,
    /// Scale of the kernel grid and the learned offsets.
    pub offset_scale: f64,
    /// Mix the output with the projected input through a per-group sigmoid gate (H/G).
    pub center_feature_scale: bool,
    /// Drop the centre point of the kernel.
    pub remove_center: bool,
}

impl Dcnv3LayerConfig {
    /// InternImage's setting: 3x3 kernel, dilation 1, pad 1, depthwise kernel 3, no extras.
    pub fn new(channels: usize, groups: usize, offset_scale: f64) -> Self {
        Self {
            channels,
            groups,
            kernel_size: 3,
            dilation: 1,
            pad: 1,
            dw_kernel_size: 3,
            offset_scale,
            center_feature_scale: false,
            remove_center: false,
        }
    }

    /// Number of sampling points per group (`k*k`, minus one with `remove_center`).
    pub fn points(&self) -> usize {
        self.kernel_size * self.kernel_size - usize::from(self.remove_center)
    }
}

/// The arguments of one DCNv3 core call: where and how strongly each output pixel samples.
#[derive(Debug, Clone)]
pub struct DcnSampling {
    /// Offsets (N, H, W, G*P*2), last axis `[g][p][(x, y)]`, in units of `cfg.offset_scale` pixels.
    pub offset: Tensor,
    /// Per-group softmax weights (N, H, W, G*P); for a DCNv4 layer the mask as given.
    pub mask: Tensor,
    /// Geometry of the core call.
    pub cfg: Dcnv3Config,
}

/// DCNv3 layer: `input_proj`, depthwise conv + LayerNorm + GELU offset branch, `offset` and
/// `mask` linears, per-group softmax, the core op, optional centre-feature-scale, `output_proj`.
///
/// Input and output are channels-last (N, H, W, C). Weight names follow the official module
/// (`input_proj`, `dw_conv.0`, `dw_conv.1.1`, `offset`, `mask`, `output_proj`,
/// `center_feature_scale_proj_weight/_bias`).
#[derive(Debug, Clone)]
pub struct Dcnv3Layer {
    input_proj: Linear,
    dw_conv: DepthwiseConv2dNhwc,
    dw_norm: LayerNorm,
    offset: Linear,
    mask: Linear,
    output_proj: Linear,
    center_feature_scale: Option<Linear>,
    cfg: Dcnv3LayerConfig,
    core: Dcnv3Config,
    policy: KernelPolicy,
}

impl Dcnv3Layer {
    /// Loads the layer's weights from `vb` (a builder already positioned at the module), with
    /// the process's default [`KernelPolicy`].
    pub fn new(cfg: &Dcnv3LayerConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_policy(cfg, vb, KernelPolicy::process_default()?)
    }

    /// Like [`Dcnv3Layer::new`], with the CPU kernels of `policy`.
    pub fn with_policy(
        cfg: &Dcnv3LayerConfig,
        vb: VarBuilder,
        policy: KernelPolicy,
    ) -> Result<Self> {
        let c = cfg.channels;
        let g = cfg.groups;
        if c == 0 || g == 0 || !c.is_multiple_of(g) {
            bail!("Dcnv3Layer: {c} channels cannot be split into {g} groups");
        }
        if cfg.kernel_size.is_multiple_of(2) {
            bail!(
                "Dcnv3Layer: kernel_size must be odd, got {}",
                cfg.kernel_size
            );
        }
        if cfg.dw_kernel_size.is_multiple_of(2) {
            bail!(
                "Dcnv3Layer: dw_kernel_size must be odd, got {}",
                cfg.dw_kernel_size
            );
        }
        if cfg.dilation == 0 {
            bail!("Dcnv3Layer: dilation must be >= 1");
        }
        let p = cfg.points();
        let k = cfg.dw_kernel_size;
        let input_proj = linear(c, c, vb.pp("input_proj"), policy)?;
        let dw_weight = vb.get((c, 1, k, k), "dw_conv.0.weight")?;
        let dw_bias = vb.get(c, "dw_conv.0.bias")?;
        let dw_conv =
            DepthwiseConv2dNhwc::with_policy(&dw_weight, Some(&dw_bias), (k - 1) / 2, policy)?;
        let dw_norm = layer_norm(c, vb.pp("dw_conv.1.1"), policy)?;
        let offset = linear(c, g * p * 2, vb.pp("offset"), policy)?;
        let mask = linear(c, g * p, vb.pp("mask"), policy)?;
        let output_proj = linear(c, c, vb.pp("output_proj"), policy)?;
        let center_feature_scale = if cfg.center_feature_scale {
            let w = vb.get((g, c), "center_feature_scale_proj_weight")?;
            let b = vb.get(g, "center_feature_scale_proj_bias")?;
            Some(Linear::with_policy(w, Some(b), policy)?)
        } else {
            None
        };
        let core = Dcnv3Config {
            kernel_h: cfg.kernel_size,
            kernel_w: cfg.kernel_size,
            stride_h: 1,
            stride_w: 1,
            pad_h: cfg.pad,
            pad_w: cfg.pad,
            dilation_h: cfg.dilation,
            dilation_w: cfg.dilation,
            group: g,
            group_channels: c / g,
            offset_scale: cfg.offset_scale,
            remove_center: cfg.remove_center,
        };
        Ok(Self {
            input_proj,
            dw_conv,
            dw_norm,
            offset,
            mask,
            output_proj,
            center_feature_scale,
            cfg: cfg.clone(),
            core,
            policy,
        })
    }

    /// The layer's hyper-parameters.
    pub fn config(&self) -> &Dcnv3LayerConfig {
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
                "Dcnv3Layer: expected a channels-last (N, H, W, {}) tensor, got shape {d:?}",
                self.cfg.channels
            ),
        }
    }

    /// Offset/mask features: depthwise conv, LayerNorm, GELU (NHWC).
    fn offset_features(&self, xs: &Tensor) -> Result<Tensor> {
        // f32 on the CPU: the three layers as one op (see `forward_norm_gelu`).
        let norm = self.dw_norm.params();
        if let Some(f) = self.dw_conv.forward_norm_gelu(xs, norm)? {
            return Ok(f);
        }
        let f = self.dw_conv.forward(xs)?;
        let f = self.dw_norm.forward(&f.contiguous()?)?;
        gelu_erf_with(&f, self.policy)
    }

    fn offset_mask(&self, f: &Tensor) -> Result<(Tensor, Tensor)> {
        let offset = self.offset.forward(f)?;
        // Softmax over the P points of each group (per pixel).
        let mask = crate::ops::softmax_groups_with(
            &self.mask.forward(f)?,
            self.cfg.points(),
            self.policy,
        )?;
        Ok((offset, mask))
    }

    /// The offsets and softmax weights this layer feeds to the core op for input `xs` (NHWC).
    pub fn sampling(&self, xs: &Tensor) -> Result<DcnSampling> {
        self.check_input(xs)?;
        let f = self.offset_features(xs)?;
        let (offset, mask) = self.offset_mask(&f)?;
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

    /// `xs + drop_path(output_proj(core_rec(layer_norm(xs))), drop_prob)` (`norm` = the block's
    /// norm weight, bias and epsilon; a pre-norm block's first residual update without layer
    /// scale) as one training op ([`crate::ops::train::dcn_core`]) when something tracks a
    /// gradient, every tensor is f32 on the CPU, the policy is fast and the layer has no centre
    /// feature scale; `Ok(None)` otherwise (the caller runs the layers).
    pub(crate) fn branch_train(
        &self,
        xs: &Tensor,
        (nw, nb, eps): (&Tensor, &Tensor, f64),
        drop_prob: f64,
    ) -> Result<Option<Tensor>> {
        use crate::ops::train;
        if self.center_feature_scale.is_some() || !self.policy.is_fast() {
            return Ok(None);
        }
        let (Some((iw, Some(ib))), Some((ow, Some(ob))), Some((mw, Some(mb))), Some((pw, pb))) = (
            self.input_proj.tensors(),
            self.offset.tensors(),
            self.mask.tensors(),
            self.output_proj.tensors(),
        ) else {
            return Ok(None);
        };
        let Some((taps, kernel, pad)) = self.dw_conv.train_taps()? else {
            return Ok(None);
        };
        // The fused op needs the offset branch to keep the spatial size (it always does in the
        // released configurations); others run the layers.
        if pad * 2 + 1 != kernel {
            return Ok(None);
        }
        let (fw, fb, dw_eps) = self.dw_norm.params();
        let params = [nw, nb, iw, ib, &taps, fw, fb, ow, ob, mw, mb];
        let proj: Vec<&Tensor> = [pw].into_iter().chain(pb).collect();
        let tracks = xs.track_op() || params.iter().chain(&proj).any(|t| t.track_op());
        if !tracks
            || !train::applies(self.policy, &[xs])
            || !train::applies(self.policy, &params)
            || !train::applies(self.policy, &proj)
        {
            return Ok(None);
        }
        self.check_input(xs)?;
        let spec = train::DcnCoreSpec {
            dw_kernel: kernel,
            dw_pad: pad,
            eps: eps as f32,
            dw_eps: dw_eps as f32,
            core: self.core,
        };
        let scale = train::drop_path_scales(xs.dim(0)?, drop_prob)?;
        train::dcn_core(xs, params, (pw, pb), scale, spec, self.policy.isa()).map(Some)
    }

    /// Everything before the output projection: the core's output (with the centre feature
    /// scale applied, where the layer has one).
    pub(crate) fn core_rec(&self, xs: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        self.check_input(xs)?;
        let v = self.input_proj.forward(xs)?;
        let f = self.offset_features(xs)?;
        let (offset, mask) = self.offset_mask(&f)?;
        let y = dcnv3_with(&v, &offset, &mask, &self.core, self.policy)?;
        if rec.on() {
            rec.put("core.input", &v);
            rec.put("core.offset", &offset);
            rec.put("core.mask", &mask);
            rec.put("core.out", &y);
        }
        let y = match &self.center_feature_scale {
            None => y,
            Some(proj) => {
                let (n, h, w, c) = y.dims4()?;
                let g = self.cfg.groups;
                // (N,H,W,G) gate, expanded over each group's channels.
                let s = candle_nn::ops::sigmoid(&proj.forward(&f)?)?
                    .unsqueeze(D::Minus1)?
                    .broadcast_as((n, h, w, g, c / g))?
                    .reshape((n, h, w, c))?;
                // y * (1 - s) + v * s
                (&y + (v - &y)?.mul(&s)?)?
            }
        };
        Ok(y)
    }
}

impl Module for Dcnv3Layer {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_rec(xs, &mut Recorder::off())
    }
}
