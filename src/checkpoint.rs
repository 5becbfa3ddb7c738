//! Reading InternImage weight files: official `.pth`, Hugging Face safetensors or
//! `pytorch_model.bin` (single, or sharded with an index json).
//!
//! The format is detected from the file's first bytes, not its extension. Tensor names are
//! normalised to the official state-dict names the model asks for:
//! a leading `model.` (Hugging Face), `module.` (DDP) or `backbone.` (mmdet/mmseg) is stripped and
//! `layer_scale1/2` is read as `gamma1/2`. Tensors the model does not ask for (a head when building
//! a backbone, `num_batches_tracked`, a detector's neck) are ignored.

use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Error, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The on-disk format of a weight file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// PyTorch zip checkpoint (`torch.save`, weights under `model`, `state_dict` or top level).
    Pth,
    /// A safetensors file.
    Safetensors,
    /// A shard index json: `model.safetensors.index.json` (safetensors shards) or
    /// `pytorch_model.bin.index.json` (PyTorch zip shards).
    SafetensorsIndex,
}

fn msg(s: String) -> Error {
    Error::Msg(s)
}

/// Detects the format of `path` from its first bytes.
pub fn detect_format(path: impl AsRef<Path>) -> Result<Format> {
    let path = path.as_ref();
    let mut f = std::fs::File::open(path)
        .map_err(|e| msg(format!("cannot open checkpoint {}: {e}", path.display())))?;
    let file_len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut head = Vec::with_capacity(16);
    (&mut f)
        .take(16)
        .read_to_end(&mut head)
        .map_err(|e| msg(format!("cannot read checkpoint {}: {e}", path.display())))?;
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Ok(Format::Pth);
    }
    if head.len() >= 9 && head[8] == b'{' {
        let mut n = [0u8; 8];
        n.copy_from_slice(&head[..8]);
        let header_len = u64::from_le_bytes(n);
        if header_len.saturating_add(8) <= file_len {
            return Ok(Format::Safetensors);
        }
        bail!(
            "checkpoint {} looks like safetensors but is truncated: header of {header_len} bytes, file of {file_len} bytes",
            path.display()
        );
    }
    if head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        return Ok(Format::SafetensorsIndex);
    }
    if head.first() == Some(&0x80) {
        bail!(
            "checkpoint {} is a legacy (non-zip) PyTorch pickle; re-save it with torch >= 1.6 \
             (torch.save(obj, path)) or convert it to safetensors",
            path.display()
        );
    }
    bail!(
        "checkpoint {} is neither a PyTorch zip (.pth), a safetensors file nor a safetensors index json \
         (first bytes {:02x?})",
        path.display(),
        &head[..head.len().min(8)]
    )
}

/// Maps a stored tensor name to the official state-dict name the model uses.
pub fn canonical_name(stored: &str) -> String {
    let mut name = stored;
    loop {
        let stripped = ["model.", "module.", "backbone."]
            .iter()
            .find_map(|p| name.strip_prefix(p));
        match stripped {
            Some(s) => name = s,
            None => break,
        }
    }
    match name.rsplit_once('.') {
        Some((pre, "layer_scale1")) => format!("{pre}.gamma1"),
        Some((pre, "layer_scale2")) => format!("{pre}.gamma2"),
        _ => name.to_string(),
    }
}

/// Reads the shard list of a `model.safetensors.index.json` (paths resolved next to it).
pub fn shards_from_index(index: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let index = index.as_ref();
    let text = std::fs::read_to_string(index).map_err(|e| {
        msg(format!(
            "cannot read safetensors index {}: {e}",
            index.display()
        ))
    })?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        msg(format!(
            "invalid safetensors index {}: {e}",
            index.display()
        ))
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            msg(format!(
                "safetensors index {} has no \"weight_map\" object",
                index.display()
            ))
        })?;
    let dir = index.parent().unwrap_or_else(|| Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for v in map.values() {
        let f = v.as_str().ok_or_else(|| {
            msg(format!(
                "safetensors index {}: non-string file name {v}",
                index.display()
            ))
        })?;
        let p = dir.join(f);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    if files.is_empty() {
        bail!("safetensors index {} lists no files", index.display());
    }
    Ok(files)
}

enum Source {
    Pth(PthTensors),
    Safetensors(MmapedSafetensors),
}

struct Entry {
    source: usize,
    stored: String,
    shape: Shape,
}

/// A [`SimpleBackend`] over one or more weight files with InternImage name normalisation and
/// error messages that name the tensor, the shapes and the file.
pub struct CheckpointBackend {
    sources: Vec<(PathBuf, Format, Source)>,
    entries: HashMap<String, Entry>,
}

impl std::fmt::Debug for CheckpointBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointBackend")
            .field("files", &self.files())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

fn open_pth(path: &Path) -> Result<PthTensors> {
    let ctx = |e: Error| {
        msg(format!(
            "cannot read PyTorch checkpoint {}: {e}",
            path.display()
        ))
    };
    // Released files keep the weights under "model"; mmdet/mmseg under "state_dict";
    // a bare state dict has them at the top level.
    let mut last_err = None;
    for key in [Some("model"), Some("state_dict"), None] {
        match PthTensors::new(path, key) {
            Ok(t) if !t.tensor_infos().is_empty() => return Ok(t),
            Ok(_) => {}
            Err(e) => {
                let s = e.to_string();
                if !(s.contains("key") && s.contains("not found")) {
                    return Err(ctx(e));
                }
                last_err = Some(e);
            }
        }
    }
    match last_err {
        Some(e) => Err(ctx(e)),
        None => bail!(
            "PyTorch checkpoint {} holds no tensors (looked under \"model\", \"state_dict\" and the top level)",
            path.display()
        ),
    }
}

impl CheckpointBackend {
    /// Opens the given files (`.pth`, `.safetensors`, shards, or an index json).
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        if paths.is_empty() {
            bail!("no checkpoint file given");
        }
        let mut files: Vec<(PathBuf, Format)> = Vec::new();
        for p in paths {
            let p = p.as_ref();
            match detect_format(p)? {
                Format::SafetensorsIndex => {
                    for shard in shards_from_index(p)? {
                        // `model.safetensors.index.json` lists safetensors shards,
                        // `pytorch_model.bin.index.json` PyTorch zip shards.
                        match detect_format(&shard)? {
                            f @ (Format::Safetensors | Format::Pth) => files.push((shard, f)),
                            other => bail!(
                                "index {} lists {}, which is {other:?}, not a safetensors or PyTorch weight file",
                                p.display(),
                                shard.display()
                            ),
                        }
                    }
                }
                f => files.push((p.to_path_buf(), f)),
            }
        }
        let mut sources = Vec::with_capacity(files.len());
        let mut entries: HashMap<String, Entry> = HashMap::new();
        for (idx, (path, format)) in files.into_iter().enumerate() {
            let mut add = |stored: String, shape: Shape| {
                entries.entry(canonical_name(&stored)).or_insert(Entry {
                    source: idx,
                    stored,
                    shape,
                });
            };
            let source = match format {
                Format::Pth => {
                    let t = open_pth(&path)?;
                    for (name, info) in t.tensor_infos() {
                        add(name.clone(), info.layout.shape().clone());
                    }
                    Source::Pth(t)
                }
                _ => {
                    // SAFETY: memory-mapped read-only; the file must not be modified while in use
                    // (the same contract as `VarBuilder::from_mmaped_safetensors`).
                    let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| {
                        msg(format!(
                            "cannot read safetensors file {}: {e}",
                            path.display()
                        ))
                    })?;
                    for (name, view) in st.tensors() {
                        add(name, Shape::from(view.shape().to_vec()));
                    }
                    Source::Safetensors(st)
                }
            };
            sources.push((path, format, source));
        }
        Ok(Self { sources, entries })
    }

    /// The files this backend reads.
    pub fn files(&self) -> Vec<PathBuf> {
        self.sources.iter().map(|(p, _, _)| p.clone()).collect()
    }

    /// Official (normalised) names of all tensors in the files.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }

    fn files_str(&self) -> String {
        let f = self.files();
        if f.len() == 1 {
            format!("file {}", f[0].display())
        } else {
            let list: Vec<String> = f.iter().map(|p| p.display().to_string()).collect();
            format!("files [{}]", list.join(", "))
        }
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        match self.entries.get(name) {
            Some(e) => Ok(e),
            None => {
                let hf = if self.sources.iter().any(|(_, f, _)| *f != Format::Pth) {
                    let stored = match name.rsplit_once('.') {
                        Some((pre, "gamma1")) => format!("model.{pre}.layer_scale1"),
                        Some((pre, "gamma2")) => format!("model.{pre}.layer_scale2"),
                        _ => format!("model.{name}"),
                    };
                    format!(" (Hugging Face name `{stored}`)")
                } else {
                    String::new()
                };
                bail!(
                    "missing tensor `{name}`{hf} in checkpoint {}; does the Config match this checkpoint?",
                    self.files_str()
                )
            }
        }
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let e = self.entry(name)?;
        let (path, _, source) = &self.sources[e.source];
        let ctx = |err: Error| {
            msg(format!(
                "cannot read tensor `{}` from {}: {err}",
                e.stored,
                path.display()
            ))
        };
        let t = match source {
            Source::Pth(p) => match p.get(&e.stored).map_err(ctx)? {
                Some(t) => t,
                None => bail!("tensor `{}` vanished from {}", e.stored, path.display()),
            },
            Source::Safetensors(s) => s.load(&e.stored, &Device::Cpu).map_err(ctx)?,
        };
        // Convert on the CPU, then move: avoids a full-precision copy on the accelerator.
        t.to_dtype(dtype)?.contiguous()?.to_device(dev)
    }
}

impl SimpleBackend for CheckpointBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let e = self.entry(name)?;
        if e.shape != s {
            bail!(
                "shape mismatch for tensor `{name}`: the model expects {:?}, the checkpoint has {:?} ({}); \
                 does the Config match this checkpoint?",
                s.dims(),
                e.shape.dims(),
                self.sources[e.source].0.display()
            );
        }
        self.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

/// A `VarBuilder` over the given weight files (`.pth`, `.safetensors`, shards or an index json,
/// detected from the content) that answers with official InternImage tensor names.
pub fn var_builder<P: AsRef<Path>>(
    paths: &[P],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let backend = CheckpointBackend::open(paths)?;
    Ok(VarBuilder::from_backend(
        Box::new(backend),
        dtype,
        device.clone(),
    ))
}
