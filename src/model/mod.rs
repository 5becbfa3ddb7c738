//! The InternImage network (CVPR 2023) and FlashInternImage (DCNv4 blocks, CVPR 2024) as Candle
//! modules.
//!
//! Weight names follow the official PyTorch state dict (`patch_embed.*`, `levels.{i}.blocks.{j}.*`,
//! `conv_head.*`, `clip_projector.*`, `head.*`); [`crate::checkpoint`] maps the Hugging Face
//! safetensors layout (`model.` prefix, `layer_scale1/2`) onto these names.
//! Internally every stage works on channels-last (N, H, W, C) tensors.

mod block;
mod config;
mod dcnv3_layer;
mod dcnv4_layer;
pub(crate) mod head;
mod nn;
mod stem;
mod trainable;

pub use config::{Config, CoreOp};
pub use dcnv3_layer::{DcnSampling, Dcnv3Layer, Dcnv3LayerConfig};
pub use dcnv4_layer::{Dcnv4Layer, Dcnv4LayerConfig};
pub use trainable::{TrainOptions, Trainable, TrainableModel};

use crate::cpu::KernelPolicy;
use block::Level;
use candle_core::{bail, DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use head::{ClipHead, ConvHead};
use nn::{layer_norm, linear, LayerNorm, Linear, Recorder};
use std::path::{Path, PathBuf};
use stem::Stem;

#[derive(Debug, Clone)]
enum Head {
    /// T/S/B/L/XL: conv head (BN folded), pool, Linear.
    Conv { conv_head: ConvHead, fc: Linear },
    /// H/G: CLIP projector, fc_norm, Linear.
    Clip {
        clip: Box<ClipHead>,
        fc_norm: LayerNorm,
        fc: Linear,
    },
}

/// An InternImage network: classifier (`InternImage::new`) or headless multi-scale backbone
/// (`InternImage::backbone`).
#[derive(Debug, Clone)]
pub struct InternImage {
    cfg: Config,
    stem: Stem,
    levels: Vec<Level>,
    head: Option<Head>,
    out_indices: Vec<usize>,
    dtype: DType,
    /// The dtype of the activations inside: `dtype`, except for a bf16 network on a CPU with
    /// AVX512_BF16 or AMX (fast kernels), which keeps bf16 GEMM weights but f32 activations (see
    /// [`InternImage::build`]).
    compute_dtype: DType,
    device: Device,
    /// Some parameters are `Var`s (set by [`TrainableModel`]): batches are not split across
    /// threads (the differentiable paths run on candle's own parallel ops).
    pub(crate) has_vars: bool,
    /// The CPU kernels every module was built with.
    policy: KernelPolicy,
}

impl InternImage {
    /// Builds the network described by `cfg`, reading weights (official names) from `vb`.
    /// `cfg.num_classes == 0` builds no head at all (like the Hugging Face `AutoModel`).
    ///
    /// The CPU kernels follow the process's default [`KernelPolicy`] (from the environment:
    /// `INTERNIMAGE_REFERENCE_OPS`, `INTERNIMAGE_ISA`); see [`InternImage::new_with_policy`].
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Self::new_with_policy(cfg, vb, KernelPolicy::process_default()?)
    }

    /// Like [`InternImage::new`], with the CPU kernels of `policy` (captured now: every module
    /// keeps the kernels it was built with).
    pub fn new_with_policy(cfg: &Config, vb: VarBuilder, policy: KernelPolicy) -> Result<Self> {
        Self::build(cfg, &[0, 1, 2, 3], cfg.num_classes > 0, vb, policy, true)
    }

    /// [`InternImage::new`] whose activations always have the dtype of `vb` (the trainable model:
    /// its `Var`s keep the dtype the caller asked for).
    pub(crate) fn new_exact_dtype(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let policy = KernelPolicy::process_default()?;
        Self::build(cfg, &[0, 1, 2, 3], cfg.num_classes > 0, vb, policy, false)
    }

    /// Builds the headless backbone (detection/segmentation use): `forward_features` returns the
    /// stage outputs listed in `out_indices` (each in 0..4, returned in ascending order).
    /// Head weights in the checkpoint are ignored.
    pub fn backbone(cfg: &Config, out_indices: &[usize], vb: VarBuilder) -> Result<Self> {
        Self::backbone_with_policy(cfg, out_indices, vb, KernelPolicy::process_default()?)
    }

    /// Like [`InternImage::backbone`], with the CPU kernels of `policy`.
    pub fn backbone_with_policy(
        cfg: &Config,
        out_indices: &[usize],
        vb: VarBuilder,
        policy: KernelPolicy,
    ) -> Result<Self> {
        Self::build(cfg, out_indices, false, vb, policy, true)
    }

    /// Loads an official `.pth`, a Hugging Face `.safetensors` or a `model.safetensors.index.json`
    /// (format detected from the file content) and builds the network.
    pub fn from_checkpoint(
        cfg: &Config,
        path: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::from_checkpoint_with_policy(
            cfg,
            path,
            dtype,
            device,
            KernelPolicy::process_default()?,
        )
    }

    /// Like [`InternImage::from_checkpoint`], with the CPU kernels of `policy`.
    pub fn from_checkpoint_with_policy(
        cfg: &Config,
        path: impl AsRef<Path>,
        dtype: DType,
        device: &Device,
        policy: KernelPolicy,
    ) -> Result<Self> {
        let vb = crate::checkpoint::var_builder(&[path.as_ref().to_path_buf()], dtype, device)?;
        Self::new_with_policy(cfg, vb, policy)
    }

    /// Like [`InternImage::from_checkpoint`] for several files (e.g. safetensors shards).
    pub fn from_checkpoint_files(
        cfg: &Config,
        paths: &[PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let vb = crate::checkpoint::var_builder(paths, dtype, device)?;
        Self::new(cfg, vb)
    }

    /// Builds the network. A bf16 network (`vb.dtype()` bf16) on the CPU with the fast kernels on
    /// AVX512_BF16 or AMX (when `mixed_bf16`) is built as bf16 GEMM weights and f32 everything
    /// else: its matrix products are bf16 x bf16 accumulated in f32 (`TDPBF16PS` on AMX tiles,
    /// `VDPBF16PS` on AVX512_BF16), as in a bf16 network, while the activations, norms,
    /// depthwise conv and DCNv3 core stay in f32 (more accurate than bf16 activations, and
    /// Candle's bf16 elementwise ops on the CPU convert every value to f32 and back, which made
    /// an all-bf16 network slower than f32). Inputs are taken in any float dtype and outputs are
    /// bf16, as for any bf16 network.
    fn build(
        cfg: &Config,
        out_indices: &[usize],
        with_head: bool,
        vb: VarBuilder,
        policy: KernelPolicy,
        mixed_bf16: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let dtype = vb.dtype();
        let mixed = mixed_bf16
            && dtype == DType::BF16
            && vb.device().is_cpu()
            && policy.with_bf16_gemm_weights().bf16_gemm_weights();
        let (vb, policy, compute_dtype) = if mixed {
            (
                vb.set_dtype(DType::F32),
                policy.with_bf16_gemm_weights(),
                DType::F32,
            )
        } else {
            (vb, policy, dtype)
        };
        if out_indices.is_empty() {
            bail!("InternImage backbone: out_indices is empty; pick stages from 0..4");
        }
        if let Some(bad) = out_indices.iter().find(|&&i| i > 3) {
            bail!("InternImage backbone: out_indices contains {bad}, stages are 0..=3");
        }
        let mut out_indices = out_indices.to_vec();
        out_indices.sort_unstable();
        out_indices.dedup();
        let stem = Stem::new(3, cfg.channels, vb.pp("patch_embed"), policy)?;
        let levels = (0..4)
            .map(|i| Level::new(cfg, i, vb.pp(format!("levels.{i}")), policy))
            .collect::<Result<Vec<_>>>()?;
        let head = if with_head {
            let pooled = cfg.pooled_dim();
            let fc = linear(pooled, cfg.num_classes, vb.pp("head"), policy)?;
            Some(if cfg.use_clip_projector {
                Head::Clip {
                    clip: Box::new(ClipHead::new(
                        cfg.stage_channels(2),
                        cfg.stage_channels(3),
                        vb.clone(),
                        policy,
                    )?),
                    fc_norm: layer_norm(pooled, vb.pp("fc_norm.0"), policy)?,
                    fc,
                }
            } else {
                Head::Conv {
                    conv_head: ConvHead::new(
                        cfg.stage_channels(3),
                        pooled,
                        vb.pp("conv_head"),
                        policy,
                    )?,
                    fc,
                }
            })
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            stem,
            levels,
            head,
            out_indices,
            dtype,
            compute_dtype,
            device: vb.device().clone(),
            has_vars: false,
            policy,
        })
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The CPU kernels the modules were built with.
    pub fn kernel_policy(&self) -> KernelPolicy {
        self.policy
    }

    /// The dtype of the weights (inputs are converted to it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the network has a classification head.
    pub fn has_head(&self) -> bool {
        self.head.is_some()
    }

    /// The stages `forward_features` returns (ascending).
    pub fn out_indices(&self) -> &[usize] {
        &self.out_indices
    }

    /// Stage widths of the `forward_features` outputs, in order.
    pub fn out_channels(&self) -> Vec<usize> {
        self.out_indices
            .iter()
            .map(|&i| self.cfg.stage_channels(i))
            .collect()
    }

    /// Validates an (N, 3, H, W) image batch and casts it to the weights' dtype.
    fn prepare_input(&self, xs: &Tensor) -> Result<Tensor> {
        match xs.dims() {
            [n, 3, h, w] if *n > 0 && *h > 0 && *w > 0 => {}
            d => bail!(
                "InternImage: expected an image batch of shape (N, 3, H, W) with N, H, W > 0, got {d:?}"
            ),
        }
        if !xs.device().same_device(&self.device) {
            bail!(
                "InternImage: input is on {:?} but the weights are on {:?}; move it with .to_device()",
                xs.device(),
                self.device
            );
        }
        if xs.dtype() == self.compute_dtype {
            Ok(xs.clone())
        } else {
            xs.to_dtype(self.compute_dtype)
        }
    }

    fn check_clip_size(&self, xs: &Tensor) -> Result<()> {
        let (_, _, h, w) = xs.dims4()?;
        // Stem: two stride-2 convs; downsample: stride-2 convs (k3, p1): size -> ceil(size / 2).
        let stage2 = |s: usize| (0..4).fold(s, |s, _| s.div_ceil(2));
        if stage2(h) % 2 != 0 || stage2(w) % 2 != 0 {
            bail!(
                "InternImage with the CLIP-projector head (H/G) needs an input height and width that are \
                 multiples of 32 (the stride-16 map must have an even size); got {h}x{w}. \
                 Resize or pad the image, or use forward_features, which accepts any size."
            );
        }
        Ok(())
    }

    /// Runs the stem and stages `0..=last`, returning the channels-last stage outputs.
    fn stages(&self, xs: &Tensor, last: usize, rec: &mut Recorder) -> Result<Vec<Tensor>> {
        let mut x = self.stem.forward(xs)?;
        rec.put("patch_embed", &x);
        let mut outs = Vec::with_capacity(last + 1);
        for (i, level) in self.levels.iter().enumerate().take(last + 1) {
            if i == 0 && rec.on() {
                rec.set_prefix("l0b0.");
            }
            let s = if i == 0 {
                level.forward_stage(&x, rec, true)?
            } else {
                level.forward_stage(&x, &mut rec.quiet(), false)?
            };
            rec.set_prefix("");
            x = level.downsample(&s)?;
            rec.put(&format!("level{i}.out"), &x);
            outs.push(s);
        }
        Ok(outs)
    }

    fn pooled_rec(&self, xs: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        let xs = self.prepare_input(xs)?;
        let pooled = match &self.head {
            None => bail!(
                "InternImage: this network was built without a head (num_classes = 0 or backbone()); \
                 use forward_features"
            ),
            Some(Head::Conv { conv_head, .. }) => {
                let s = self.stages(&xs, 3, rec)?;
                conv_head.forward(&s[3])?
            }
            Some(Head::Clip { clip, fc_norm, .. }) => {
                self.check_clip_size(&xs)?;
                let s = self.stages(&xs, 3, rec)?;
                fc_norm.forward(&clip.forward(&s[2], &s[3], rec)?)?
            }
        };
        rec.put("head_in", &pooled);
        Ok(pooled)
    }

    /// The pre-head vector (N, 12C) for T..XL or (N, 768) for H/G: the Hugging Face
    /// `pooler_output`. Errors when the network has no head.
    pub fn forward_pooled(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_pooled_t(xs, false)
    }

    /// [`InternImage::forward_pooled`] in training mode when `train`: stochastic depth
    /// (`Config::drop_path_rate`) and dropout (`Config::drop_rate`) are active. The BatchNorm of
    /// the conv head keeps using its running statistics (eval mode) in both modes.
    pub fn forward_pooled_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.pooled_compute(xs, train)?.to_dtype(self.dtype)
    }

    /// [`InternImage::forward_pooled_t`] in the compute dtype.
    fn pooled_compute(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let xs = self.prepare_input(xs)?;
        let mut out = self.per_batch_chunk(&xs, |x| {
            Ok(vec![self.pooled_rec(x, &mut Recorder::mode(train))?])
        })?;
        out.pop()
            .ok_or_else(|| candle_core::Error::msg("InternImage: no pooled output"))
    }

    /// Runs `f` on the batch `xs` and returns its outputs. On the CPU, a batch of at least two
    /// images is cut into one chunk per rayon thread and the chunks run concurrently (each
    /// operator's own parallel loops then mostly stay on their chunk's thread), the outputs being
    /// concatenated along the batch dimension: per-operator synchronisation disappears, which is
    /// what makes a batch faster per image than single images on a few cores.
    fn per_batch_chunk<F>(&self, xs: &Tensor, f: F) -> Result<Vec<Tensor>>
    where
        F: Fn(&Tensor) -> Result<Vec<Tensor>> + Sync,
    {
        let threads = rayon::current_num_threads();
        let n = match xs.dims() {
            [n, ..] => *n,
            _ => 0,
        };
        if !xs.device().is_cpu() {
            return f(xs);
        }
        // Tracked computations take candle's tensor ops, whose parallel loops would only contend
        // with concurrent chunks; one image has nothing to cut. Either way the whole forward
        // runs on a rayon worker, so that each operator's parallel loop is a fork-join inside
        // the pool instead of a job injected from this thread, which then sleeps on a latch until
        // the pool wakes it (two context switches per loop, ~7% of T 224 batch 1).
        let tracked = self.has_vars || xs.track_op();
        if n < 2 && threads >= 2 && self.policy.spin_wait() && !tracked {
            // One image: keep the other workers polling between the operators' parallel loops
            // (`KernelPolicy::with_spin_wait`).
            return crate::cpu::on_pool_spinning(|| f(xs));
        }
        if n < 2 || threads < 2 || self.policy.is_reference() || tracked {
            return crate::cpu::on_pool(|| f(xs));
        }
        let chunks = threads.min(n);
        let per = n.div_ceil(chunks);
        let parts: Vec<Tensor> = (0..n.div_ceil(per))
            .map(|c| xs.narrow(0, c * per, per.min(n - c * per)))
            .collect::<Result<_>>()?;
        use rayon::prelude::*;
        let outs: Vec<Vec<Tensor>> = parts.par_iter().map(&f).collect::<Result<_>>()?;
        let Some(first) = outs.first() else {
            return f(xs);
        };
        (0..first.len())
            .map(|i| {
                let pieces: Vec<&Tensor> = outs.iter().map(|o| &o[i]).collect();
                Tensor::cat(&pieces, 0)
            })
            .collect()
    }

    /// Stage outputs for `out_indices` (all four for `new`), NCHW and contiguous, strides
    /// 4, 8, 16, 32: after the stage-end LayerNorm where the variant has one, before downsampling.
    pub fn forward_features(&self, xs: &Tensor) -> Result<Vec<Tensor>> {
        self.forward_features_t(xs, false)
    }

    /// [`InternImage::forward_features`] in training mode when `train` (stochastic depth and
    /// dropout active), e.g. for a detector trained on the backbone's features.
    pub fn forward_features_t(&self, xs: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let xs = self.prepare_input(xs)?;
        let last = self.out_indices.iter().copied().max().unwrap_or(3);
        self.per_batch_chunk(&xs, |x| {
            let stages = self.stages(x, last, &mut Recorder::mode(train))?;
            self.out_indices
                .iter()
                .map(|&i| {
                    stages[i]
                        .permute((0, 3, 1, 2))?
                        .contiguous()?
                        .to_dtype(self.dtype)
                })
                .collect()
        })
    }

    /// The offsets and weights that block `block` of stage `level` feeds to its core op for
    /// image batch `xs` (N, 3, H, W): DCNv3's softmax weights, or DCNv4's mask as given (unpacked
    /// from its offset_mask into the DCNv3 layout).
    pub fn dcn_sampling(&self, xs: &Tensor, level: usize, block: usize) -> Result<DcnSampling> {
        if level > 3 {
            bail!("InternImage::dcn_sampling: level {level} out of range 0..=3");
        }
        let depth = self.cfg.depths[level];
        if block >= depth {
            bail!("InternImage::dcn_sampling: stage {level} has {depth} blocks, asked for block {block}");
        }
        let xs = self.prepare_input(xs)?;
        let mut x = self.stem.forward(&xs)?;
        for l in &self.levels[..level] {
            let s = l.forward_stage(&x, &mut Recorder::off(), false)?;
            x = l.downsample(&s)?;
        }
        let lv = &self.levels[level];
        for (b, blk) in lv.blocks.iter().enumerate().take(block) {
            x = blk.forward_rec(&x, &mut Recorder::off())?;
            x = lv.post_norm(b, x)?;
        }
        let blk = &lv.blocks[block];
        let sampling = blk.dcn().sampling(&blk.dcn_input(&x)?)?;
        Ok(DcnSampling {
            offset: sampling.offset.to_dtype(self.dtype)?,
            mask: sampling.mask.to_dtype(self.dtype)?,
            ..sampling
        })
    }

    /// Named intermediate activations for parity debugging (names as in the fixtures' `dbg.*`:
    /// `patch_embed`, `l0b0.core.{input,offset,mask,out}`, `l0b0.dcn.out`, `l0b0.out`,
    /// `level{i}.out` (after downsampling, NHWC), `clip_projector`, `head_in`), plus `logits`.
    #[doc(hidden)]
    pub fn debug_activations(&self, xs: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let mut rec = Recorder::enabled();
        let pooled = self.pooled_rec(xs, &mut rec)?;
        let logits = self.logits(&pooled)?;
        rec.put("logits", &logits);
        Ok(rec.into_items())
    }

    fn logits(&self, pooled: &Tensor) -> Result<Tensor> {
        match &self.head {
            Some(Head::Conv { fc, .. }) | Some(Head::Clip { fc, .. }) => fc.forward(pooled),
            None => {
                bail!("InternImage: this network was built without a head; use forward_features")
            }
        }
    }
}

impl InternImage {
    /// Logits (N, num_classes) for an image batch (N, 3, H, W), in training mode when `train`
    /// (see [`InternImage::forward_pooled_t`]); `forward_t(xs, false)` is `forward(xs)`.
    ///
    /// This inherent method is what `model.forward_t(..)` calls. Through the
    /// `candle_nn::ModuleT` trait (candle's blanket impl for every `Module`) the flag is ignored,
    /// so pass the model to generic training code as a closure over this method.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let pooled = self.pooled_compute(xs, train)?;
        self.logits(&pooled)?.to_dtype(self.dtype)
    }
}

impl Module for InternImage {
    /// Logits (N, num_classes) for an image batch (N, 3, H, W).
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_t(xs, false)
    }
}
