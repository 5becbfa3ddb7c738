//! Hyper-parameters of an InternImage network, readable from the Hugging Face `config.json`.

use candle_core::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// `bail!` with a typed [`crate::Error::BadConfig`].
/// The widest stage-0 `channels` a [`Config`] may ask for (stage 3 then has 8x as many).
const LIMIT_CHANNELS: usize = 1 << 16;

macro_rules! bad_config {
    ($($arg:tt)*) => {
        return Err(crate::error::Error::bad_config(format!($($arg)*)).into())
    };
}

/// The deformable operator of the blocks (`core_op` of the official configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum CoreOp {
    /// InternImage's DCNv3 module (dw-conv + LN + GELU offset branch, softmax mask).
    #[default]
    #[serde(rename = "DCNv3", alias = "DCNv3_pytorch")]
    Dcnv3,
    /// FlashInternImage's DCNv4 module (one packed offset/mask projection, mask as given).
    #[serde(rename = "DCNv4")]
    Dcnv4,
}

/// InternImage hyper-parameters, named like the official constructor and the Hugging Face
/// `config.json` of the released repos (unknown fields such as `with_cp` are ignored; missing
/// fields take the InternImage-T value). Serialises to the same schema (what
/// [`crate::model::TrainableModel::save`] writes next to the weights).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    /// Width of stage 0; stage `i` has `channels * 2^i` channels.
    pub channels: usize,
    /// Number of blocks per stage (4 stages).
    pub depths: Vec<usize>,
    /// DCNv3 groups per stage (4 stages); `channels * 2^i / groups[i]` must be an integer.
    pub groups: Vec<usize>,
    /// Hidden width of the MLP relative to the stage width.
    pub mlp_ratio: f64,
    /// DCNv3 offset scale (multiplies both the kernel grid and the learned offsets).
    pub offset_scale: f64,
    /// Layer-scale init value; `Some(_)` means the blocks have `gamma1`/`gamma2` parameters.
    pub layer_scale: Option<f64>,
    /// Post-norm blocks (`x + norm(f(x))`); also drops the stage-end norm unless
    /// `center_feature_scale` is set.
    pub post_norm: bool,
    /// Residual post-norm blocks (`x + res_post_norm(f(norm(x)))`, InternImage-H).
    pub res_post_norm: bool,
    /// Extra LayerNorms after some blocks of stage 2 (H/G).
    pub level2_post_norm: bool,
    /// Which blocks of stage 2 are followed by an extra LayerNorm (needed when
    /// `level2_post_norm` is set).
    pub level2_post_norm_block_ids: Option<Vec<usize>>,
    /// Kernel of the depthwise convolution in the offset branch: DCNv3 always has one (`None` =
    /// 3); DCNv4 has one (`offset_mask_dw`) only when this is set (`None` = none, as in
    /// FlashInternImage-T).
    pub dw_kernel_size: Option<usize>,
    /// Centre feature scale in DCNv3 (H/G).
    pub center_feature_scale: bool,
    /// CLIP-projector (attention pooling) head of H/G instead of the conv head.
    pub use_clip_projector: bool,
    /// Drop the centre sampling point of the DCNv3 kernel (8 points instead of 9).
    pub remove_center: bool,
    /// Width of the conv head relative to the last stage (`int(8C * cls_scale)`).
    pub cls_scale: f64,
    /// Classes of the classification head; 0 builds no head at all.
    pub num_classes: usize,
    /// Stochastic depth in training mode ([`crate::InternImage::forward_t`]): block `i` of the
    /// `n` blocks (global index) drops its residual branches with probability
    /// `drop_path_rate * i / (n - 1)`, as the official code. 0 in the presets (inference).
    pub drop_path_rate: f64,
    /// Dropout after the MLP's GELU and after its second linear, in training mode (the official
    /// `drop_rate`, 0 in every release).
    pub drop_rate: f64,
    /// Deformable operator of the blocks: DCNv3 (InternImage) or DCNv4 (FlashInternImage).
    pub core_op: CoreOp,
    /// MLP `fc2` has a bias (always for DCNv3; FlashInternImage-L only for DCNv4).
    pub mlp_fc2_bias: bool,
    /// DCNv4 `output_proj` has a bias (FlashInternImage-L); DCNv3 always has one.
    pub dcn_output_bias: bool,
}

impl Default for Config {
    /// The defaults of the Hugging Face `InternImageConfig` (= InternImage-T, 1000 classes).
    fn default() -> Self {
        Self::t()
    }
}

impl Config {
    fn base(channels: usize, depths: [usize; 4], groups: [usize; 4]) -> Self {
        Self {
            channels,
            depths: depths.to_vec(),
            groups: groups.to_vec(),
            mlp_ratio: 4.0,
            offset_scale: 1.0,
            layer_scale: None,
            post_norm: false,
            res_post_norm: false,
            level2_post_norm: false,
            level2_post_norm_block_ids: None,
            dw_kernel_size: None,
            center_feature_scale: false,
            use_clip_projector: false,
            remove_center: false,
            cls_scale: 1.5,
            num_classes: 1000,
            drop_path_rate: 0.0,
            drop_rate: 0.0,
            core_op: CoreOp::Dcnv3,
            mlp_fc2_bias: false,
            dcn_output_bias: false,
        }
    }

    /// The FlashInternImage (DCNv4) counterpart of an InternImage preset: same skeleton, DCNv4
    /// blocks with the depthwise offset/mask convolution when the release has one.
    fn flash(base: Self, dw_kernel_size: Option<usize>) -> Self {
        Self {
            core_op: CoreOp::Dcnv4,
            dw_kernel_size,
            ..base
        }
    }

    /// FlashInternImage-T (29.8M parameters, ImageNet-1k head, 224 px).
    pub fn flash_t() -> Self {
        Self::flash(Self::t(), None)
    }

    /// FlashInternImage-S (50.1M parameters, ImageNet-1k head, 224 px).
    pub fn flash_s() -> Self {
        Self::flash(Self::s(), Some(3))
    }

    /// FlashInternImage-B (97.4M parameters, ImageNet-1k head, 224 px; offset_scale 0.5).
    pub fn flash_b() -> Self {
        Self {
            offset_scale: 0.5,
            ..Self::flash(Self::b(), Some(3))
        }
    }

    /// FlashInternImage-L (223.3M parameters, ImageNet-1k head, 384 px; output_proj and MLP fc2
    /// biases).
    pub fn flash_l() -> Self {
        Self {
            mlp_fc2_bias: true,
            dcn_output_bias: true,
            ..Self::flash(Self::l(), Some(3))
        }
    }

    /// Whether the blocks use DCNv4 (FlashInternImage).
    pub fn is_flash(&self) -> bool {
        self.core_op == CoreOp::Dcnv4
    }

    /// InternImage-T (30M parameters, ImageNet-1k head).
    pub fn t() -> Self {
        Self::base(64, [4, 4, 18, 4], [4, 8, 16, 32])
    }

    /// InternImage-S (50M parameters, ImageNet-1k head).
    pub fn s() -> Self {
        Self {
            layer_scale: Some(1e-5),
            post_norm: true,
            ..Self::base(80, [4, 4, 21, 4], [5, 10, 20, 40])
        }
    }

    /// InternImage-B (97M parameters, ImageNet-1k head).
    pub fn b() -> Self {
        Self {
            layer_scale: Some(1e-5),
            post_norm: true,
            ..Self::base(112, [4, 4, 21, 4], [7, 14, 28, 56])
        }
    }

    /// InternImage-L (223M parameters, ImageNet-1k head; use `.with_num_classes(21841)` for 22k).
    pub fn l() -> Self {
        Self {
            layer_scale: Some(1e-5),
            offset_scale: 2.0,
            post_norm: true,
            ..Self::base(160, [5, 5, 22, 5], [10, 20, 40, 80])
        }
    }

    /// InternImage-XL (335M parameters, ImageNet-1k head; use `.with_num_classes(21841)` for 22k).
    pub fn xl() -> Self {
        Self {
            layer_scale: Some(1e-5),
            offset_scale: 2.0,
            post_norm: true,
            ..Self::base(192, [5, 5, 24, 5], [12, 24, 48, 96])
        }
    }

    /// InternImage-H (1.08B parameters, CLIP-projector head, ImageNet-1k classes).
    pub fn h() -> Self {
        Self {
            res_post_norm: true,
            level2_post_norm: true,
            level2_post_norm_block_ids: Some(vec![5, 11, 17, 23, 29]),
            dw_kernel_size: Some(5),
            center_feature_scale: true,
            use_clip_projector: true,
            ..Self::base(320, [6, 6, 32, 6], [10, 20, 40, 80])
        }
    }

    /// InternImage-G (3B parameters, CLIP-projector head, ImageNet-1k classes).
    pub fn g() -> Self {
        Self {
            post_norm: true,
            level2_post_norm: true,
            level2_post_norm_block_ids: Some(vec![5, 11, 17, 23, 29, 35, 41, 47]),
            dw_kernel_size: Some(5),
            center_feature_scale: true,
            use_clip_projector: true,
            ..Self::base(512, [2, 2, 48, 4], [16, 32, 64, 128])
        }
    }

    /// The preset of a variant name (`"t"`, `"s"`, `"b"`, `"l"`, `"xl"`, `"h"`, `"g"`, and
    /// `"flash_t"`, `"flash_s"`, `"flash_b"`, `"flash_l"` for FlashInternImage; any case).
    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "t" => Self::t(),
            "s" => Self::s(),
            "b" => Self::b(),
            "l" => Self::l(),
            "xl" => Self::xl(),
            "h" => Self::h(),
            "g" => Self::g(),
            "flash_t" => Self::flash_t(),
            "flash_s" => Self::flash_s(),
            "flash_b" => Self::flash_b(),
            "flash_l" => Self::flash_l(),
            other => {
                bad_config!(
                    "unknown InternImage variant {other:?}: expected one of t, s, b, l, xl, h, g, \
                     flash_t, flash_s, flash_b, flash_l"
                )
            }
        })
    }

    /// The same configuration with another number of classes (0 = no head).
    pub fn with_num_classes(mut self, num_classes: usize) -> Self {
        self.num_classes = num_classes;
        self
    }

    /// Parses a Hugging Face `config.json` (or any JSON object with these fields) and validates it.
    pub fn from_json_str(json: &str) -> Result<Self> {
        let cfg: Config = serde_json::from_str(json).map_err(|e| {
            crate::error::Error::bad_config(format!("invalid InternImage config JSON: {e}"))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates a Hugging Face `config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            crate::error::Error::io(
                path,
                format!("cannot read config {}: {e}", path.display()),
                e,
            )
        })?;
        Self::from_json_str(&text)
            .map_err(|e| crate::error::rewrite(e, |m| format!("{m} (file {})", path.display())))
    }

    /// Width of stage `i` (`channels * 2^i`).
    pub fn stage_channels(&self, i: usize) -> usize {
        self.channels << i
    }

    /// Kernel of the depthwise convolution of the DCNv3 offset branch.
    pub fn dw_kernel(&self) -> usize {
        self.dw_kernel_size.unwrap_or(3)
    }

    /// Whether each stage ends with a LayerNorm (`not post_norm or center_feature_scale`).
    pub fn has_level_norm(&self) -> bool {
        !self.post_norm || self.center_feature_scale
    }

    /// Width of the vector in front of the final Linear (12C for the conv head, 768 for H/G).
    pub fn pooled_dim(&self) -> usize {
        if self.use_clip_projector {
            crate::model::head::CLIP_EMBED_DIM
        } else {
            (self.stage_channels(3) as f64 * self.cls_scale) as usize
        }
    }

    /// Hidden width of the MLP of stage `i` (`int(C_i * mlp_ratio)`).
    pub fn mlp_hidden(&self, i: usize) -> usize {
        (self.stage_channels(i) as f64 * self.mlp_ratio) as usize
    }

    /// Stochastic-depth probability of block `block` (global index over all stages): linear from
    /// 0 to `drop_path_rate`.
    pub fn drop_path_prob(&self, block: usize) -> f64 {
        let n = self.depths.iter().fold(0usize, |a, &d| a.saturating_add(d));
        if n <= 1 {
            0.0
        } else {
            self.drop_path_rate * block as f64 / (n - 1) as f64
        }
    }

    /// Checks that the hyper-parameters describe a buildable network.
    pub fn validate(&self) -> Result<()> {
        for (name, rate) in [
            ("drop_path_rate", self.drop_path_rate),
            ("drop_rate", self.drop_rate),
        ] {
            if !(0.0..1.0).contains(&rate) {
                bad_config!("InternImage config: {name} must be in [0, 1), got {rate}");
            }
        }
        if self.channels == 0 {
            bad_config!("InternImage config: channels must be > 0");
        }
        if self.depths.len() != 4 || self.groups.len() != 4 {
            bad_config!(
                "InternImage config: depths and groups need 4 entries (one per stage), got depths {:?} and groups {:?}",
                self.depths,
                self.groups
            );
        }
        // Far above every released model (at most 512 channels, 48 blocks, 21,841 classes,
        // mlp_ratio 4, cls_scale 1.5, kernel 5): a value beyond them is a corrupt config, and
        // within them no size derived from the config overflows.
        let limits = [
            ("channels", self.channels as f64, LIMIT_CHANNELS as f64),
            (
                "depths[i]",
                self.depths.iter().copied().max().unwrap_or(0) as f64,
                4096.0,
            ),
            ("num_classes", self.num_classes as f64, (1u32 << 24) as f64),
            ("dw_kernel_size", self.dw_kernel() as f64, 255.0),
            ("mlp_ratio", self.mlp_ratio, 64.0),
            ("cls_scale", self.cls_scale, 64.0),
        ];
        for (name, v, max) in limits {
            if v > max {
                bad_config!(
                    "InternImage config: {name} = {v} is beyond what this crate builds (at most \
                     {max}); is the config.json corrupt?"
                );
            }
        }
        for i in 0..4 {
            let c = self.stage_channels(i);
            let g = self.groups[i];
            if g == 0 || !c.is_multiple_of(g) {
                bad_config!(
                    "InternImage config: stage {i} has {c} channels, not divisible into groups[{i}] = {g} DCNv3 groups"
                );
            }
        }
        if self.mlp_ratio.is_nan()
            || self.mlp_ratio <= 0.0
            || !self.mlp_ratio.is_finite()
            || self.mlp_hidden(0) == 0
        {
            bad_config!(
                "InternImage config: mlp_ratio must be a positive number, got {}",
                self.mlp_ratio
            );
        }
        if !self.offset_scale.is_finite() {
            bad_config!(
                "InternImage config: offset_scale must be finite, got {}",
                self.offset_scale
            );
        }
        if let Some(ls) = self.layer_scale {
            if !ls.is_finite() {
                bad_config!("InternImage config: layer_scale must be finite or null, got {ls}");
            }
        }
        if self.is_flash() && (self.center_feature_scale || self.use_clip_projector) {
            bad_config!(
                "InternImage config: core_op DCNv4 (FlashInternImage) supports neither \
                 center_feature_scale nor use_clip_projector (no released flash model uses them)"
            );
        }
        if self.is_flash() && self.remove_center {
            bad_config!("InternImage config: remove_center is not supported with core_op DCNv4");
        }
        let k = self.dw_kernel();
        if k.is_multiple_of(2) {
            bad_config!("InternImage config: dw_kernel_size must be odd, got {k}");
        }
        if self.level2_post_norm {
            match &self.level2_post_norm_block_ids {
                None => bad_config!(
                    "InternImage config: level2_post_norm is set but level2_post_norm_block_ids is null"
                ),
                Some(ids) => {
                    if let Some(bad) = ids.iter().find(|&&b| b >= self.depths[2]) {
                        bad_config!(
                            "InternImage config: level2_post_norm_block_ids contains {bad}, but stage 2 has only {} blocks",
                            self.depths[2]
                        );
                    }
                }
            }
        }
        if !self.use_clip_projector
            && self.num_classes > 0
            && (self.cls_scale.is_nan() || self.cls_scale <= 0.0 || self.pooled_dim() == 0)
        {
            bad_config!(
                "InternImage config: cls_scale must be positive, got {}",
                self.cls_scale
            );
        }
        Ok(())
    }
}
