//! InternImage block (`InternImageLayer`), stage (`InternImageBlock`) and downsampling.

use crate::cpu::KernelPolicy;
use crate::model::config::Config;
use crate::model::dcnv3_layer::{DcnSampling, Dcnv3Layer, Dcnv3LayerConfig};
use crate::model::dcnv4_layer::{linear_opt_bias, Dcnv4Layer, Dcnv4LayerConfig};
use crate::model::nn::{layer_norm, linear, residual_drop, Conv2d, LayerNorm, Linear, Recorder};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// fc1 -> GELU -> fc2 on channels-last tensors (dropout after each in training mode).
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    fc1: Linear,
    fc2: Linear,
    drop: f32,
}

impl Mlp {
    /// `fc2_bias`: whether fc2 has a bias (always in InternImage; FlashInternImage-L only).
    pub(crate) fn new(
        c: usize,
        hidden: usize,
        fc2_bias: bool,
        drop: f64,
        vb: VarBuilder,
        policy: KernelPolicy,
    ) -> Result<Self> {
        Ok(Self {
            fc1: linear(c, hidden, vb.pp("fc1"), policy)?,
            fc2: linear_opt_bias(hidden, c, fc2_bias, vb.pp("fc2"), policy)?,
            drop: drop as f32,
        })
    }

    fn forward_t(&self, xs: &Tensor, training: bool) -> Result<Tensor> {
        if training && self.drop > 0.0 {
            let h = candle_nn::ops::dropout(&self.fc1.forward_gelu(xs)?, self.drop)?;
            return candle_nn::ops::dropout(&self.fc2.forward(&h)?, self.drop);
        }
        // Fused by cache-sized row blocks where it pays (f32 on the CPU).
        crate::ops::mlp(xs, &self.fc1, &self.fc2)
    }

    /// `xs + drop_path(mlp(norm(xs)), p)` as one training op when the training kernels apply
    /// (no dropout); `Ok(None)` otherwise.
    fn prenorm_residual(
        &self,
        xs: &Tensor,
        norm: &LayerNorm,
        p: f64,
        training: bool,
    ) -> Result<Option<Tensor>> {
        if training && self.drop > 0.0 {
            return Ok(None);
        }
        crate::ops::dense::prenorm_mlp_residual(xs, norm.params(), &self.fc1, &self.fc2, p)
    }
}

/// The deformable module of a block: DCNv3 (InternImage) or DCNv4 (FlashInternImage).
#[derive(Debug, Clone)]
pub(crate) enum Dcn {
    V3(Dcnv3Layer),
    V4(Dcnv4Layer),
}

impl Dcn {
    fn new(cfg: &Config, level: usize, vb: VarBuilder, policy: KernelPolicy) -> Result<Self> {
        let c = cfg.stage_channels(level);
        Ok(if cfg.is_flash() {
            let dcn_cfg = Dcnv4LayerConfig {
                dw_kernel_size: cfg.dw_kernel_size,
                output_bias: cfg.dcn_output_bias,
                ..Dcnv4LayerConfig::new(c, cfg.groups[level], cfg.offset_scale)
            };
            Self::V4(Dcnv4Layer::with_policy(&dcn_cfg, vb, policy)?)
        } else {
            let dcn_cfg = Dcnv3LayerConfig {
                dw_kernel_size: cfg.dw_kernel(),
                center_feature_scale: cfg.center_feature_scale,
                remove_center: cfg.remove_center,
                ..Dcnv3LayerConfig::new(c, cfg.groups[level], cfg.offset_scale)
            };
            Self::V3(Dcnv3Layer::with_policy(&dcn_cfg, vb, policy)?)
        })
    }

    /// Offsets and mask fed to the core op (for DCNv4 unpacked, the mask unnormalised).
    pub(crate) fn sampling(&self, xs: &Tensor) -> Result<DcnSampling> {
        match self {
            Self::V3(l) => l.sampling(xs),
            Self::V4(l) => l.sampling(xs),
        }
    }

    fn forward_rec(&self, xs: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        match self {
            Self::V3(l) => l.forward_rec(xs, rec),
            Self::V4(l) => l.forward_rec(xs, rec),
        }
    }

    /// The core's output, before the output projection.
    fn core_rec(&self, xs: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        match self {
            Self::V3(l) => l.core_rec(xs, rec),
            Self::V4(l) => l.core_rec(xs, rec),
        }
    }

    /// The output projection of the core's output `y`.
    fn project_rec(&self, y: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        crate::model::nn::project_rec(self.output_proj(), y, rec)
    }

    fn output_proj(&self) -> &Linear {
        match self {
            Self::V3(l) => l.output_proj(),
            Self::V4(l) => l.output_proj(),
        }
    }
}

/// The residual arrangement of a block (spec §2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
enum Residual {
    /// `x + s * norm(f(x))`
    PostNorm,
    /// `x + res_post_norm(f(norm(x)))` (only without layer scale)
    ResPostNorm,
    /// `x + s * f(norm(x))`
    PreNorm,
}

/// One InternImage block: DCNv3 (or DCNv4) branch and MLP branch with their norms.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    norm1: LayerNorm,
    dcn: Dcn,
    norm2: LayerNorm,
    mlp: Mlp,
    gamma1: Option<Tensor>,
    gamma2: Option<Tensor>,
    res_post_norm: Option<(LayerNorm, LayerNorm)>,
    residual: Residual,
    /// Stochastic-depth probability in training mode.
    drop_path: f64,
    policy: KernelPolicy,
}

impl Block {
    /// Block `index` (global, over all stages) of stage `level`.
    pub(crate) fn new(
        cfg: &Config,
        level: usize,
        index: usize,
        vb: VarBuilder,
        policy: KernelPolicy,
    ) -> Result<Self> {
        let c = cfg.stage_channels(level);
        let norm1 = layer_norm(c, vb.pp("norm1.0"), policy)?;
        let dcn = Dcn::new(cfg, level, vb.pp("dcn"), policy)?;
        let norm2 = layer_norm(c, vb.pp("norm2.0"), policy)?;
        // InternImage's fc2 always has a bias; FlashInternImage's only with mlp_fc2_bias.
        let fc2_bias = !cfg.is_flash() || cfg.mlp_fc2_bias;
        let mlp = Mlp::new(
            c,
            cfg.mlp_hidden(level),
            fc2_bias,
            cfg.drop_rate,
            vb.pp("mlp"),
            policy,
        )?;
        let (gamma1, gamma2) = if cfg.layer_scale.is_some() {
            (Some(vb.get(c, "gamma1")?), Some(vb.get(c, "gamma2")?))
        } else {
            (None, None)
        };
        // The official module creates these whenever res_post_norm is set, even when layer
        // scale makes them unused; load them so the weight set matches the checkpoint.
        let res_post_norm = if cfg.res_post_norm {
            Some((
                layer_norm(c, vb.pp("res_post_norm1.0"), policy)?,
                layer_norm(c, vb.pp("res_post_norm2.0"), policy)?,
            ))
        } else {
            None
        };
        let residual = if cfg.post_norm {
            Residual::PostNorm
        } else if cfg.res_post_norm && cfg.layer_scale.is_none() {
            Residual::ResPostNorm
        } else {
            Residual::PreNorm
        };
        Ok(Self {
            norm1,
            dcn,
            norm2,
            mlp,
            gamma1,
            gamma2,
            res_post_norm,
            residual,
            drop_path: cfg.drop_path_prob(index),
            policy,
        })
    }

    pub(crate) fn dcn(&self) -> &Dcn {
        &self.dcn
    }

    /// The tensor the block's DCNv3 layer receives for block input `xs`.
    pub(crate) fn dcn_input(&self, xs: &Tensor) -> Result<Tensor> {
        match self.residual {
            Residual::PostNorm => Ok(xs.clone()),
            Residual::ResPostNorm | Residual::PreNorm => self.norm1.forward(xs),
        }
    }

    pub(crate) fn forward_rec(&self, xs: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        let (g1, g2) = (self.gamma1.as_ref(), self.gamma2.as_ref());
        let training = rec.training();
        // Stochastic depth on each residual branch (identity outside training), fused with the
        // residual update.
        let p = if training { self.drop_path } else { 0.0 };
        let res = |x: &Tensor, branch: &Tensor, gamma: Option<&Tensor>| {
            residual_drop(x, branch, gamma, p, self.policy)
        };
        let mlp = |x: &Tensor| self.mlp.forward_t(x, training);
        let x = match self.residual {
            Residual::PostNorm => {
                let d = self.norm1.forward(&self.dcn.forward_rec(xs, rec)?)?;
                let x = res(xs, &d, g1)?;
                let m = self.norm2.forward(&mlp(&x)?)?;
                res(&x, &m, g2)?
            }
            Residual::ResPostNorm => {
                let (rpn1, rpn2) = match &self.res_post_norm {
                    Some(r) => r,
                    None => candle_core::bail!("internal: res_post_norm block without its norms"),
                };
                let d = rpn1.forward(&self.dcn.forward_rec(&self.norm1.forward(xs)?, rec)?)?;
                let x = res(xs, &d, None)?;
                let m = rpn2.forward(&mlp(&self.norm2.forward(&x)?)?)?;
                res(&x, &m, None)?
            }
            Residual::PreNorm => {
                // Training: the norm, the deformable layer, its output projection and the
                // residual update as one op (nothing recorded, no layer scale) where it applies.
                let fused = match (&self.dcn, g1) {
                    (Dcn::V3(l), None) if !rec.on() => {
                        l.branch_train(xs, self.norm1.params(), p)?
                    }
                    _ => None,
                };
                let x = match fused {
                    Some(x) => x,
                    None => {
                        let y = self.dcn.core_rec(&self.norm1.forward(xs)?, rec)?;
                        // Inference: the projection, both residual updates, the norm and the MLP
                        // in one pass by row blocks where the fused kernel applies (same values).
                        if !(training || rec.on()) {
                            let (mlp, dcn) = (&self.mlp, self.dcn.output_proj());
                            let norm = self.norm2.params();
                            let (fc1, fc2) = (&mlp.fc1, &mlp.fc2);
                            let tail =
                                crate::ops::dense::block_tail(xs, &y, dcn, g1, norm, fc1, fc2, g2)?;
                            if let Some(out) = tail {
                                rec.put("out", &out);
                                return Ok(out);
                            }
                        }
                        // Training: the output projection and the residual update as one op
                        // (no layer scale, nothing recorded) where it applies.
                        let fused = match g1 {
                            None if !rec.on() => crate::ops::dense::project_residual(
                                xs,
                                &y,
                                self.dcn.output_proj(),
                                p,
                            )?,
                            _ => None,
                        };
                        match fused {
                            Some(x) => x,
                            None => res(xs, &self.dcn.project_rec(&y, rec)?, g1)?,
                        }
                    }
                };
                // Training: norm, MLP and residual as one op (one graph node) where it applies.
                let fused = match g2 {
                    None => self.mlp.prenorm_residual(&x, &self.norm2, p, training)?,
                    Some(_) => None,
                };
                match fused {
                    Some(out) => out,
                    None => {
                        let m = mlp(&self.norm2.forward(&x)?)?;
                        res(&x, &m, g2)?
                    }
                }
            }
        };
        rec.put("out", &x);
        Ok(x)
    }
}

/// Conv 3x3 stride 2 (no bias) + LayerNorm, channels-last in and out.
#[derive(Debug, Clone)]
pub(crate) struct Downsample {
    conv: Conv2d,
    norm: LayerNorm,
}

impl Downsample {
    pub(crate) fn new(c: usize, vb: VarBuilder, policy: KernelPolicy) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load_s2(c, 2 * c, false, vb.pp("conv"), policy)?,
            norm: layer_norm(2 * c, vb.pp("norm.1"), policy)?,
        })
    }
}

impl Module for Downsample {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.conv.forward_nhwc(xs)?)
    }
}

/// One stage: blocks, stage-2 post norms, the stage-end norm and the downsampling.
#[derive(Debug, Clone)]
pub(crate) struct Level {
    pub(crate) blocks: Vec<Block>,
    post_norms: Vec<(usize, LayerNorm)>,
    norm: Option<LayerNorm>,
    downsample: Option<Downsample>,
}

impl Level {
    pub(crate) fn new(
        cfg: &Config,
        i: usize,
        vb: VarBuilder,
        policy: KernelPolicy,
    ) -> Result<Self> {
        let c = cfg.stage_channels(i);
        let first: usize = cfg.depths[..i].iter().sum();
        let blocks = (0..cfg.depths[i])
            .map(|j| Block::new(cfg, i, first + j, vb.pp(format!("blocks.{j}")), policy))
            .collect::<Result<Vec<_>>>()?;
        let mut post_norms = Vec::new();
        if cfg.level2_post_norm && i == 2 {
            if let Some(ids) = &cfg.level2_post_norm_block_ids {
                for (k, &b) in ids.iter().enumerate() {
                    post_norms.push((
                        b,
                        layer_norm(c, vb.pp(format!("post_norms.{k}.0")), policy)?,
                    ));
                }
            }
        }
        let norm = if cfg.has_level_norm() {
            Some(layer_norm(c, vb.pp("norm.0"), policy)?)
        } else {
            None
        };
        let downsample = if i < 3 {
            Some(Downsample::new(c, vb.pp("downsample"), policy)?)
        } else {
            None
        };
        Ok(Self {
            blocks,
            post_norms,
            norm,
            downsample,
        })
    }

    /// Applies the post-norm of block `b`, if any (the first listed one, as the official code).
    pub(crate) fn post_norm(&self, b: usize, xs: Tensor) -> Result<Tensor> {
        match self.post_norms.iter().find(|(id, _)| *id == b) {
            Some((_, ln)) => ln.forward(&xs),
            None => Ok(xs),
        }
    }

    /// Stage output before downsampling (after the stage-end norm where present), NHWC.
    pub(crate) fn forward_stage(
        &self,
        xs: &Tensor,
        rec: &mut Recorder,
        record_first_block: bool,
    ) -> Result<Tensor> {
        let mut x = xs.clone();
        for (b, block) in self.blocks.iter().enumerate() {
            x = if b == 0 && record_first_block {
                block.forward_rec(&x, rec)?
            } else {
                block.forward_rec(&x, &mut rec.quiet())?
            };
            x = self.post_norm(b, x)?;
        }
        match &self.norm {
            Some(n) => n.forward(&x),
            None => Ok(x),
        }
    }

    /// Downsampling of the stage output (identity for the last stage).
    pub(crate) fn downsample(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.downsample {
            Some(d) => d.forward(xs),
            None => Ok(xs.clone()),
        }
    }
}
