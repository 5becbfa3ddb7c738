//! The model zoo: every released InternImage and FlashInternImage classification checkpoint,
//! read from `weights-manifest.json` (embedded in the crate at build time). The FlashInternImage
//! entries are raw `.pth` files of the Hub repository `OpenGVLab/DCNv4` (no `config.json`: the
//! architecture is the preset).
//!
//! ```
//! use internimage::zoo;
//!
//! let t = zoo::get("internimage_t_1k_224")?;
//! assert_eq!(t.num_classes, 1000);
//! assert_eq!(t.preprocess.crop_size, 224);
//! assert_eq!(t.hub.repo, "OpenGVLab/internimage_t_1k_224");
//! let cfg = t.config(); // the InternImage-T preset with a 1000-class head
//! assert_eq!(cfg.channels, 64);
//! assert!(zoo::get("internimage_q").is_err()); // the error lists every known name
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::model::Config;
use candle_core::Result;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// Which label table a classification head predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelSet {
    /// ImageNet-1k, 1000 classes in ILSVRC-2012 order.
    Imagenet1k,
    /// ImageNet-22k, 21841 classes (sorted fall11 synsets).
    Imagenet22k,
}

/// The evaluation transform of one checkpoint: resize the shorter side, centre crop, normalise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessConfig {
    /// Shorter side after the (bicubic, antialiased) resize.
    pub resize_shorter_side: u32,
    /// Side of the square centre crop.
    pub crop_size: u32,
    /// Per-channel mean (RGB, on the 0..1 scale).
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB, on the 0..1 scale).
    pub std: [f32; 3],
}

impl PreprocessConfig {
    /// The official evaluation transform at `size` (crop ratio 1.0, ImageNet mean/std).
    pub fn imagenet(size: u32) -> Self {
        Self {
            resize_shorter_side: size,
            crop_size: size,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

impl LabelSet {
    /// Number of classes of this label table (1000 or 21841).
    pub fn num_classes(self) -> usize {
        match self {
            LabelSet::Imagenet1k => 1000,
            LabelSet::Imagenet22k => 21841,
        }
    }

    /// The label set whose size is `num_classes`, if any.
    pub fn from_num_classes(num_classes: usize) -> Option<Self> {
        match num_classes {
            1000 => Some(LabelSet::Imagenet1k),
            21841 => Some(LabelSet::Imagenet22k),
            _ => None,
        }
    }
}

/// An InternImage size preset (`Config::t()` ... `Config::g()`, and the FlashInternImage
/// presets `Config::flash_t()` ... `Config::flash_l()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// InternImage-T (30M parameters).
    T,
    /// InternImage-S (50M).
    S,
    /// InternImage-B (97M).
    B,
    /// InternImage-L (223M).
    L,
    /// InternImage-XL (335M).
    Xl,
    /// InternImage-H (1.08B).
    H,
    /// InternImage-G (3B).
    G,
    /// FlashInternImage-T (DCNv4, 30M).
    #[serde(rename = "flash_t")]
    FlashT,
    /// FlashInternImage-S (DCNv4, 50M).
    #[serde(rename = "flash_s")]
    FlashS,
    /// FlashInternImage-B (DCNv4, 97M).
    #[serde(rename = "flash_b")]
    FlashB,
    /// FlashInternImage-L (DCNv4, 223M).
    #[serde(rename = "flash_l")]
    FlashL,
}

impl Variant {
    /// Every variant: InternImage smallest first, then FlashInternImage smallest first.
    pub const ALL: [Variant; 11] = [
        Variant::T,
        Variant::S,
        Variant::B,
        Variant::L,
        Variant::Xl,
        Variant::H,
        Variant::G,
        Variant::FlashT,
        Variant::FlashS,
        Variant::FlashB,
        Variant::FlashL,
    ];

    /// Whether this is a FlashInternImage (DCNv4) variant.
    pub fn is_flash(self) -> bool {
        matches!(
            self,
            Variant::FlashT | Variant::FlashS | Variant::FlashB | Variant::FlashL
        )
    }

    /// The lowercase name used in the manifest and by `Config::preset` (`"t"` ... `"g"`,
    /// `"flash_t"` ... `"flash_l"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::T => "t",
            Variant::S => "s",
            Variant::B => "b",
            Variant::L => "l",
            Variant::Xl => "xl",
            Variant::H => "h",
            Variant::G => "g",
            Variant::FlashT => "flash_t",
            Variant::FlashS => "flash_s",
            Variant::FlashB => "flash_b",
            Variant::FlashL => "flash_l",
        }
    }

    /// The architecture preset of this variant (with the 1000-class head of the presets).
    pub fn config(self) -> Config {
        match self {
            Variant::T => Config::t(),
            Variant::S => Config::s(),
            Variant::B => Config::b(),
            Variant::L => Config::l(),
            Variant::Xl => Config::xl(),
            Variant::H => Config::h(),
            Variant::G => Config::g(),
            Variant::FlashT => Config::flash_t(),
            Variant::FlashS => Config::flash_s(),
            Variant::FlashB => Config::flash_b(),
            Variant::FlashL => Config::flash_l(),
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Storage format of a checkpoint file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// Hugging Face safetensors (keys prefixed `model.`, `layer_scale1/2` for the gammas).
    Safetensors,
    /// PyTorch zip checkpoint (`torch.save({'model': state_dict})`, plain module keys), e.g.
    /// the FlashInternImage files of `OpenGVLab/DCNv4`.
    Pth,
}

/// One file of a Hub repository, with what is known about it in advance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubFile {
    /// Path of the file inside the repository (e.g. `model.safetensors`).
    pub name: String,
    /// Size in bytes, if known (`None` when the size was never observed).
    pub size_bytes: Option<u64>,
    /// Whether `size_bytes` is exact; `false` means the rounded value the Hub web page shows.
    #[serde(default)]
    pub size_exact: bool,
    /// Pinned SHA-256 of the content (64 lowercase hex digits); `None` = verify against the
    /// Hub's ETag instead, which for large (LFS) files is their SHA-256.
    pub sha256: Option<String>,
}

impl HubFile {
    /// A file with nothing known in advance (no size, no pinned hash).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            size_bytes: None,
            size_exact: false,
            sha256: None,
        }
    }

    /// The same file with a pinned SHA-256 (64 hex digits, checked when downloaded).
    pub fn with_sha256(mut self, sha256: impl Into<String>) -> Self {
        self.sha256 = Some(sha256.into());
        self
    }
}

/// Where a checkpoint lives on the Hugging Face Hub (a model repository at a revision).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubRepo {
    /// Repository id, `owner/name`.
    pub repo: String,
    /// Branch, tag or 40-hex commit (`main` unless pinned).
    pub revision: String,
    /// Format of the weight files.
    pub format: WeightFormat,
    /// Storage dtype of the weights (`f32` for every release).
    pub dtype: String,
    /// Prefix of every tensor name in the files (`model.` in the Hugging Face repos).
    pub key_prefix: String,
    /// The Hugging Face `config.json` of the repository, if it has one.
    pub config_file: Option<String>,
    /// Index of a sharded checkpoint (`model.safetensors.index.json`), if sharded.
    pub index_file: Option<HubFile>,
    /// The weight files (one file, or every shard in order). May be empty when `index_file` is
    /// set: the shards are then read from the index.
    pub files: Vec<HubFile>,
}

impl HubRepo {
    /// A repository with a single `model.safetensors` and a `config.json`, at `main`.
    pub fn safetensors(repo: impl Into<String>) -> Self {
        Self {
            repo: repo.into(),
            revision: "main".to_string(),
            format: WeightFormat::Safetensors,
            dtype: "f32".to_string(),
            key_prefix: "model.".to_string(),
            config_file: Some("config.json".to_string()),
            index_file: None,
            files: vec![HubFile::new("model.safetensors")],
        }
    }

    /// The same repository at another revision (branch, tag or commit).
    pub fn with_revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = revision.into();
        self
    }

    /// Sum of the known weight file sizes (`None` if any size is unknown).
    pub fn total_size_bytes(&self) -> Option<u64> {
        self.files.iter().map(|f| f.size_bytes).sum()
    }
}

/// The flat `.pth` alternative of a release in the `OpenGVLab/InternImage` repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PthFile {
    /// Repository id (`OpenGVLab/InternImage`).
    pub repo: String,
    /// Branch, tag or commit.
    pub revision: String,
    /// File name in the repository.
    pub file: String,
    /// Key of the state dict inside the pickle (`model`).
    pub state_dict_key: String,
}

impl PthFile {
    /// Download URL on the public Hub (`https://huggingface.co/<repo>/resolve/<rev>/<file>`).
    pub fn url(&self) -> String {
        format!(
            "https://huggingface.co/{}/resolve/{}/{}",
            self.repo, self.revision, self.file
        )
    }
}

/// The architecture of a checkpoint: a size preset and the head size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpec {
    /// The size preset.
    pub preset: Variant,
    /// Classes of the classification head.
    pub num_classes: usize,
}

/// Numbers for the zoo table (official README, and the parameter count derived from the
/// architecture).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// ImageNet-1k top-1 accuracy (%) from the official README (`None` for 22k pre-training).
    pub top1: Option<f32>,
    /// Exact number of parameters (derived from the architecture, including the head).
    pub params: u64,
    /// Parameter count as the README prints it (`30M`, `1.08B`).
    pub params_readme: String,
    /// FLOPs at the input resolution as the README prints it (`5G`), if given.
    pub flops_readme: Option<String>,
}

/// One released InternImage classification checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainedModel {
    /// Zoo name, also the Hub repository name (`internimage_t_1k_224`).
    pub name: String,
    /// Size preset.
    pub variant: Variant,
    /// Short human description of the release (`T, ImageNet-1k`).
    pub release: String,
    /// Training data of the release.
    pub pretraining: String,
    /// The Hugging Face repository with the safetensors weights.
    pub hub: HubRepo,
    /// The `.pth` alternative, if released.
    pub pth: Option<PthFile>,
    /// Architecture (preset and head size).
    #[serde(rename = "config")]
    pub config_spec: ConfigSpec,
    /// Classes of the classification head.
    pub num_classes: usize,
    /// Which label table the head predicts.
    pub label_set: LabelSet,
    /// Evaluation resolution (side of the square input).
    pub input_size: u32,
    /// The official evaluation transform.
    pub preprocess: PreprocessConfig,
    /// Accuracy, parameters and FLOPs for the zoo table.
    pub metrics: Metrics,
    /// Caveats about this entry (e.g. a size that was never observed), if any.
    pub notes: Option<String>,
}

impl PretrainedModel {
    /// The network configuration of this checkpoint (preset with this head size).
    pub fn config(&self) -> Config {
        self.config_spec
            .preset
            .config()
            .with_num_classes(self.config_spec.num_classes)
    }
}

/// The manifest document (`weights-manifest.json`).
#[derive(Debug, Clone, Deserialize)]
struct Manifest {
    format_version: u32,
    models: Vec<PretrainedModel>,
}

/// The manifest, embedded at build time.
pub(crate) const MANIFEST_JSON: &str = include_str!("../weights-manifest.json");

fn parse_manifest(json: &str) -> std::result::Result<Vec<PretrainedModel>, String> {
    let manifest: Manifest = serde_json::from_str(json)
        .map_err(|e| format!("weights-manifest.json does not parse: {e}"))?;
    if manifest.format_version != 1 {
        return Err(format!(
            "weights-manifest.json has format_version {}, this build reads version 1",
            manifest.format_version
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for m in &manifest.models {
        if !seen.insert(m.name.as_str()) {
            return Err(format!("weights-manifest.json lists {:?} twice", m.name));
        }
        if m.config_spec.num_classes != m.num_classes || m.label_set.num_classes() != m.num_classes
        {
            return Err(format!(
                "weights-manifest.json entry {:?}: num_classes {}, config.num_classes {} and label set {:?} ({} classes) disagree",
                m.name,
                m.num_classes,
                m.config_spec.num_classes,
                m.label_set,
                m.label_set.num_classes()
            ));
        }
        if m.hub.files.is_empty() && m.hub.index_file.is_none() {
            return Err(format!(
                "weights-manifest.json entry {:?} names no weight file and no index",
                m.name
            ));
        }
    }
    Ok(manifest.models)
}

static MODELS: OnceLock<std::result::Result<Vec<PretrainedModel>, String>> = OnceLock::new();

/// Every released checkpoint, in manifest order (parsed once from the embedded manifest).
pub fn list() -> Result<&'static [PretrainedModel]> {
    match MODELS.get_or_init(|| parse_manifest(MANIFEST_JSON)) {
        Ok(models) => Ok(models.as_slice()),
        Err(e) => Err(crate::error::Error::bad_config(e.clone()).into()),
    }
}

/// The names of every released checkpoint, in manifest order.
pub fn names() -> Result<Vec<&'static str>> {
    Ok(list()?.iter().map(|m| m.name.as_str()).collect())
}

/// The checkpoint called `name` (also accepts the Hub id `OpenGVLab/<name>`).
///
/// An unknown name is an error that lists every known name.
pub fn get(name: &str) -> Result<&'static PretrainedModel> {
    let models = list()?;
    let wanted = name.trim();
    if let Some(m) = models
        .iter()
        .find(|m| m.name == wanted || (m.hub.repo == wanted && m.hub.repo.ends_with(&m.name)))
    {
        return Ok(m);
    }
    let known: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    Err(crate::error::Error::UnknownModel {
        name: name.to_string(),
        message: format!(
            "unknown InternImage model {name:?}; known models: {}",
            known.join(", ")
        ),
    }
    .into())
}
