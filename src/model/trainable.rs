//! Transfer learning: a network whose chosen parameters are `Var`s, built from any checkpoint the
//! crate reads, with frozen parts, a replaceable classifier, and saving in the official layout.
//!
//! Frozen parameters are plain tensors, so their layers keep the fast inference kernels (packed
//! GEMM, fused MLP); trainable ones are `Var`s and their layers take differentiable paths. A
//! layer is laid out when it is built, so freezing is decided when the model is built
//! ([`TrainOptions::trainable`]); [`TrainableModel::reset_classifier`] rebuilds the model around
//! the same `Var`s.

use super::{Config, InternImage};
use crate::checkpoint::CheckpointBackend;
use candle_core::{bail, DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Which parameters of a [`TrainableModel`] learn; the others are frozen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    /// Every parameter.
    All,
    /// Only what follows the backbone: the classifier `head`, the conv head (`conv_head`) or the
    /// H/G CLIP projector (`dcnv3_head_x3/x4`, `clip_projector`, `fc_norm`). `--freeze-backbone`.
    Head,
    /// The last `n` stages (`levels.{4-n}..levels.3`) and the head; the stem and earlier stages
    /// are frozen. `LastLevels(4)` trains everything but the stem.
    LastLevels(usize),
    /// Every normalisation layer's affine weight and bias (LayerNorm, BatchNorm), the layer-scale
    /// gammas and the head; everything else is frozen.
    Norms,
}

impl Trainable {
    /// Whether the parameter `name` (official name) learns under this choice.
    pub fn includes(&self, name: &str) -> bool {
        if is_buffer(name) {
            return false;
        }
        let in_head = !name.starts_with("patch_embed.") && !name.starts_with("levels.");
        match *self {
            Trainable::All => true,
            Trainable::Head => in_head,
            Trainable::LastLevels(n) => {
                in_head
                    || name
                        .strip_prefix("levels.")
                        .and_then(|rest| rest.split('.').next())
                        .and_then(|i| i.parse::<usize>().ok())
                        .is_some_and(|i| i + n.min(4) >= 4)
            }
            Trainable::Norms => in_head || is_norm_param(name),
        }
    }
}

/// BatchNorm statistics: state, never parameters.
fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean")
        || name.ends_with(".running_var")
        || name.ends_with(".num_batches_tracked")
}

/// Affine parameters of a normalisation layer or a layer-scale gamma (official names: the
/// LayerNorms sit in modules named `*norm*`, the DCNv3 offset-branch LN is `dw_conv.1.1`).
fn is_norm_param(name: &str) -> bool {
    let module = name.rsplit_once('.').map_or("", |(m, _)| m);
    module.split('.').any(|part| part.contains("norm"))
        || module.ends_with("dw_conv.1.1")
        || name.ends_with(".gamma1")
        || name.ends_with(".gamma2")
}

/// How [`InternImage::trainable`] builds the model.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// Which parameters learn.
    pub trainable: Trainable,
    /// Replace the classifier by a freshly initialised one with this many classes (timm's
    /// `reset_classifier`); `None` keeps the checkpoint's head.
    pub num_classes: Option<usize>,
    /// Stochastic-depth rate for training (`Config::drop_path_rate`); `None` keeps the config's.
    pub drop_path_rate: Option<f64>,
}

impl Default for TrainOptions {
    /// Everything trainable, the checkpoint's head, the config's drop-path rate.
    fn default() -> Self {
        Self {
            trainable: Trainable::All,
            num_classes: None,
            drop_path_rate: None,
        }
    }
}

/// Where the parameters of a model being built come from.
enum Source {
    /// Weight files.
    Checkpoint(CheckpointBackend),
    /// The tensors of a model built before (official names).
    Tensors(HashMap<String, Tensor>),
}

/// The `VarBuilder` backend of a trainable model: parameters from `source` (or, for the names
/// `fresh` lists, a new initialisation), as `Var`s in `varmap` where `trainable` says so, every
/// tensor handed out being recorded (official names) for saving.
struct TrainBackend {
    source: Source,
    varmap: VarMap,
    trainable: Trainable,
    fresh: Vec<String>,
    served: Arc<Mutex<Vec<(String, Tensor)>>>,
}

/// Locks a mutex shared by the model builder; poisoned only if a builder thread panicked.
fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| candle_core::Error::msg("trainable model: a builder thread panicked"))
}

impl TrainBackend {
    fn record(&self, name: &str, t: &Tensor) -> Result<()> {
        lock(&self.served)?.push((name.to_string(), t.clone()));
        Ok(())
    }

    fn existing_var(&self, name: &str) -> Result<Option<Var>> {
        Ok(lock(self.varmap.data())?.get(name).cloned())
    }

    fn load(&self, s: &Shape, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        match &self.source {
            Source::Checkpoint(c) => c.get(s.clone(), name, Default::default(), dtype, dev),
            Source::Tensors(map) => match map.get(name) {
                Some(t) if t.shape() == s => t.to_dtype(dtype)?.to_device(dev),
                Some(t) => bail!(
                    "trainable model: tensor `{name}` is {:?}, the model expects {:?}",
                    t.dims(),
                    s.dims()
                ),
                None => bail!("trainable model: missing tensor `{name}`"),
            },
        }
    }

    /// A new classifier parameter: weight ~ N(0, 0.02) (the official trunc_normal std), bias 0.
    fn init_fresh(s: &Shape, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        if name.ends_with(".bias") {
            Tensor::zeros(s, dtype, dev)
        } else {
            Tensor::randn(0f32, 0.02, s, dev)?.to_dtype(dtype)
        }
    }
}

impl SimpleBackend for TrainBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        if let Some(var) = self.existing_var(name)? {
            if var.shape() != &s {
                bail!(
                    "trainable model: parameter `{name}` is {:?}, the model expects {:?}",
                    var.dims(),
                    s.dims()
                );
            }
            let t = var.as_tensor().clone();
            self.record(name, &t)?;
            return Ok(t);
        }
        let value = if self.fresh.iter().any(|f| f == name) {
            Self::init_fresh(&s, name, dtype, dev)?
        } else {
            self.load(&s, name, dtype, dev)?
        };
        let t = if self.trainable.includes(name) && value.dtype().is_float() {
            let var = Var::from_tensor(&value)?;
            let t = var.as_tensor().clone();
            lock(self.varmap.data())?.insert(name.to_string(), var);
            t
        } else {
            value
        };
        self.record(name, &t)?;
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        match &self.source {
            Source::Checkpoint(c) => c.get_unchecked(name, dtype, dev),
            Source::Tensors(map) => match map.get(name) {
                Some(t) => t.to_dtype(dtype)?.to_device(dev),
                None => bail!("trainable model: missing tensor `{name}`"),
            },
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.source {
            Source::Checkpoint(c) => c.contains_tensor(name),
            Source::Tensors(map) => map.contains_key(name),
        }
    }
}

/// A network with `Var` parameters for fine-tuning: the model, its trainable `Var`s (official
/// names, in a `VarMap` for candle's optimizers) and every tensor it reads (for saving).
pub struct TrainableModel {
    model: InternImage,
    varmap: VarMap,
    tensors: Vec<(String, Tensor)>,
    dtype: DType,
    device: Device,
    trainable: Trainable,
}

impl std::fmt::Debug for TrainableModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainableModel")
            .field("model", &self.model)
            .field("trainable", &self.trainable)
            .field("vars", &self.trainable_names().len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl InternImage {
    /// Builds a model for training from weight files (official `.pth`, Hugging Face
    /// safetensors, shards or an index json; what [`InternImage::from_checkpoint`] reads), with
    /// the parameters `options.trainable` selects as `Var`s. `cfg` describes the checkpoint;
    /// `options.num_classes` replaces its classifier.
    pub fn trainable<P: AsRef<Path>>(
        cfg: &Config,
        paths: &[P],
        options: &TrainOptions,
        dtype: DType,
        device: &Device,
    ) -> Result<TrainableModel> {
        let source = Source::Checkpoint(CheckpointBackend::open(paths)?);
        let mut cfg = cfg.clone();
        if let Some(rate) = options.drop_path_rate {
            cfg.drop_path_rate = rate;
        }
        let fresh = match options.num_classes {
            Some(n) => {
                cfg.num_classes = n;
                vec!["head.weight".to_string(), "head.bias".to_string()]
            }
            None => Vec::new(),
        };
        TrainableModel::build(
            &cfg,
            source,
            VarMap::new(),
            options.trainable,
            fresh,
            dtype,
            device,
        )
    }
}

impl TrainableModel {
    fn build(
        cfg: &Config,
        source: Source,
        varmap: VarMap,
        trainable: Trainable,
        fresh: Vec<String>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let served = Arc::new(Mutex::new(Vec::new()));
        let backend = TrainBackend {
            source,
            varmap: varmap.clone(),
            trainable,
            fresh,
            served: served.clone(),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let mut model = InternImage::new_exact_dtype(cfg, vb)?;
        model.has_vars = !varmap.all_vars().is_empty();
        let tensors = std::mem::take(&mut *lock(&served)?);
        Ok(Self {
            model,
            varmap,
            tensors,
            dtype,
            device: device.clone(),
            trainable,
        })
    }

    /// The network (`forward_t(xs, true)` for training steps).
    pub fn model(&self) -> &InternImage {
        &self.model
    }

    /// The trainable parameters, keyed by official name (pass `varmap().all_vars()` to an
    /// optimizer).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The trainable parameters (for `candle_nn::AdamW::new`).
    pub fn vars(&self) -> Vec<Var> {
        self.varmap.all_vars()
    }

    /// The trainable parameter `name` (official name, e.g. `levels.0.blocks.0.dcn.offset.weight`).
    pub fn var(&self, name: &str) -> Option<Var> {
        self.varmap.data().lock().ok()?.get(name).cloned()
    }

    /// Official names of the trainable parameters, sorted.
    pub fn trainable_names(&self) -> Vec<String> {
        let mut names: Vec<String> = match self.varmap.data().lock() {
            Ok(d) => d.keys().cloned().collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }

    /// Replaces the classifier by a new, freshly initialised one with `num_classes` outputs
    /// (timm's `reset_classifier`); every other parameter, trainable or frozen, is kept.
    pub fn reset_classifier(&mut self, num_classes: usize) -> Result<()> {
        let mut cfg = self.model.config().clone();
        cfg.num_classes = num_classes;
        let fresh = vec!["head.weight".to_string(), "head.bias".to_string()];
        if let Ok(mut data) = self.varmap.data().lock() {
            for f in &fresh {
                data.remove(f);
            }
        }
        let source = Source::Tensors(
            self.tensors
                .iter()
                .filter(|(n, _)| !fresh.contains(n))
                .cloned()
                .collect(),
        );
        *self = Self::build(
            &cfg,
            source,
            self.varmap.clone(),
            self.trainable,
            fresh,
            self.dtype,
            &self.device,
        )?;
        Ok(())
    }

    /// Every tensor of the model (trainable ones with their current values), official names.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.tensors.iter().cloned().collect()
    }

    /// Writes `dir/model.safetensors` (official key names, as the released `.pth` files, current
    /// values) and `dir/config.json` (the Hugging Face schema of [`Config`]); both are read back
    /// by [`InternImage::from_checkpoint`] / [`Config::from_file`] and by
    /// `classify --weights dir/model.safetensors --config dir/config.json`. Returns the two paths.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<(PathBuf, PathBuf)> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| {
            candle_core::Error::msg(format!("cannot create directory {}: {e}", dir.display()))
        })?;
        let weights = dir.join("model.safetensors");
        let config = dir.join("config.json");
        let tensors: HashMap<String, Tensor> = self
            .tensors
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.detach().contiguous()?)))
            .collect::<Result<_>>()?;
        candle_core::safetensors::save(&tensors, &weights).map_err(|e| {
            candle_core::Error::msg(format!("cannot write {}: {e}", weights.display()))
        })?;
        let json = serde_json::to_string_pretty(self.model.config())
            .map_err(|e| candle_core::Error::msg(format!("cannot serialise the config: {e}")))?;
        std::fs::write(&config, json).map_err(|e| {
            candle_core::Error::msg(format!("cannot write {}: {e}", config.display()))
        })?;
        Ok((weights, config))
    }
}
