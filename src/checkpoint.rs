//! Reading InternImage weight files: official `.pth`, Hugging Face safetensors or
//! `pytorch_model.bin` (single, or sharded with an index json).
//!
//! The format is detected from the file's first bytes, not its extension. Tensor names are
//! normalised to the official state-dict names the model asks for:
//! a leading `model.` (Hugging Face), `module.` (DDP) or `backbone.` (mmdet/mmseg) is stripped and
//! `layer_scale1/2` is read as `gamma1/2`. Tensors the model does not ask for (a head when building
//! a backbone, `num_batches_tracked`, a detector's neck) are ignored.
//!
//! `.pth` files are read by a small pickle reader of our own that never executes or imports
//! anything: training checkpoints (`{'model', 'optimizer', 'lr_scheduler', 'epoch', 'config':
//! <yacs CfgNode>, 'model_ema', ...}`), mmdet/mmseg files (`state_dict` + `meta`) and bare state
//! dicts load alike; objects of unknown classes are kept opaque and skipped. Which entry holds the
//! weights is chosen by [`PthWeights`] in [`OpenOptions`] (default: `model`, then `state_dict`,
//! then the top level; [`PthWeights::Ema`] takes `model_ema`). A tensor that cannot be read (an
//! unsupported dtype or layout, malformed arguments, a view repeating storage elements) is an
//! error naming it and the reason when the model asks for it. Hostile files stay cheap: ranks,
//! names and the number of tensors are bounded, and so is the pickle reader's memory.
//!
//! Every floating tensor is checked once for NaN/Inf as it is loaded (one pass over its bytes,
//! before any conversion); the error names the tensor and the file
//! ([`OpenOptions::check_finite`] turns this off).
//!
//! Failures are typed (see [`crate::Error::find`]): [`crate::Error::Io`],
//! [`crate::Error::UnsupportedCheckpoint`], [`crate::Error::TruncatedCheckpoint`],
//! [`crate::Error::InvalidCheckpoint`], [`crate::Error::MissingTensor`],
//! [`crate::Error::ShapeMismatch`], [`crate::Error::NonFinite`].

mod pickle;

use crate::error::Error as IoError;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{bail, DType, Device, Error, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// A safetensors failure of `path` as a typed error: truncated (the header promises more bytes
/// than the file has), an I/O error, or a malformed file.
fn safetensors_error(path: &Path, message: String, e: Error) -> Error {
    let path = path.to_path_buf();
    match e {
        Error::WithPath { inner, .. } | Error::WithBacktrace { inner, .. } => {
            safetensors_error(&path, message, *inner)
        }
        Error::SafeTensor(safetensors::SafeTensorError::MetadataIncompleteBuffer) => {
            IoError::TruncatedCheckpoint { path, message }.into()
        }
        Error::Io(source) => IoError::Io {
            path,
            message,
            source,
        }
        .into(),
        _ => IoError::InvalidCheckpoint { path, message }.into(),
    }
}

/// Opens `path` for reading if it is a regular file (following symlinks): opening a FIFO would
/// block forever, and a directory or device is never a weight file.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    let kind = std::fs::metadata(path)?.file_type();
    if kind.is_file() {
        return std::fs::File::open(path);
    }
    let what = if kind.is_dir() {
        "a directory"
    } else {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            if kind.is_fifo() {
                "a FIFO (named pipe)"
            } else if kind.is_socket() {
                "a socket"
            } else if kind.is_block_device() || kind.is_char_device() {
                "a device"
            } else {
                "a special file"
            }
        }
        #[cfg(not(unix))]
        "a special file"
    };
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("it is {what}, not a regular file; give the path of a weight file"),
    ))
}

/// Detects the format of `path` from its first bytes.
pub fn detect_format(path: impl AsRef<Path>) -> Result<Format> {
    let path = path.as_ref();
    let mut f = open_regular(path).map_err(|e| {
        IoError::io(
            path,
            format!("cannot open checkpoint {}: {e}", path.display()),
            e,
        )
    })?;
    let file_len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut head = Vec::with_capacity(16);
    (&mut f).take(16).read_to_end(&mut head).map_err(|e| {
        IoError::io(
            path,
            format!("cannot read checkpoint {}: {e}", path.display()),
            e,
        )
    })?;
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
        return Err(IoError::TruncatedCheckpoint {
            path: path.to_path_buf(),
            message: format!(
                "checkpoint {} looks like safetensors but is truncated: header of {header_len} bytes, file of {file_len} bytes",
                path.display()
            ),
        }
        .into());
    }
    if head.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{') {
        return Ok(Format::SafetensorsIndex);
    }
    if head.first() == Some(&0x80) {
        return Err(IoError::UnsupportedCheckpoint {
            path: path.to_path_buf(),
            message: format!(
                "checkpoint {} is a legacy (non-zip) PyTorch pickle; re-save it with torch >= 1.6 \
                 (torch.save(obj, path)) or convert it to safetensors",
                path.display()
            ),
        }
        .into());
    }
    Err(IoError::UnsupportedCheckpoint {
        path: path.to_path_buf(),
        message: format!(
            "checkpoint {} is neither a PyTorch zip (.pth), a safetensors file nor a safetensors index json \
             (first bytes {:02x?})",
            path.display(),
            &head[..head.len().min(8)]
        ),
    }
    .into())
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

/// The largest safetensors index read (real ones list a few thousand tensors in well under
/// 1 MB).
const MAX_INDEX_BYTES: u64 = 64 << 20;

/// The shard file names of a `model.safetensors.index.json` (`weight_map` values), sorted,
/// without repeats; each a plain relative path (absolute paths, `..`, drive letters and
/// backslashes are rejected: an index is often downloaded, and must not make us open
/// `/etc/passwd`, `../../x` or a device). The Hub layer downloads these names; [`shards_from_index`]
/// resolves them next to the index.
pub(crate) fn shard_names(index: &Path) -> Result<Vec<String>> {
    let invalid = |message: String| -> Error {
        IoError::InvalidCheckpoint {
            path: index.to_path_buf(),
            message,
        }
        .into()
    };
    let mut text = String::new();
    let read =
        open_regular(index).and_then(|f| f.take(MAX_INDEX_BYTES + 1).read_to_string(&mut text));
    read.map_err(|e| {
        IoError::io(
            index,
            format!("cannot read safetensors index {}: {e}", index.display()),
            e,
        )
    })?;
    if text.len() as u64 > MAX_INDEX_BYTES {
        return Err(invalid(format!(
            "safetensors index {} is larger than {} MiB; not a shard index",
            index.display(),
            MAX_INDEX_BYTES >> 20
        )));
    }
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        invalid(format!(
            "invalid safetensors index {}: {e}",
            index.display()
        ))
    })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| {
            invalid(format!(
                "safetensors index {} has no \"weight_map\" object (tensor name -> shard file)",
                index.display()
            ))
        })?;
    let mut names: Vec<String> = Vec::new();
    for (tensor, v) in map {
        let f = v.as_str().ok_or_else(|| {
            invalid(format!(
                "safetensors index {}: weight_map[{:?}] is not a file name: {}",
                index.display(),
                clip(tensor),
                clip(&v.to_string())
            ))
        })?;
        let plain = !f.is_empty()
            && !f.contains('\0')
            && !f.contains('\\')
            && !f.contains(':')
            && Path::new(f)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain {
            return Err(invalid(format!(
                "safetensors index {} lists the shard {:?}, which is not a plain relative path \
                 inside the index's directory; shards must sit next to (or below) the index",
                index.display(),
                clip(f)
            )));
        }
        names.push(f.to_string());
    }
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(invalid(format!(
            "safetensors index {} lists no files",
            index.display()
        )));
    }
    Ok(names)
}

/// Reads the shard list of a `model.safetensors.index.json` (at most 64 MiB): its `weight_map`
/// file names, sorted and without repeats, resolved next to it. Absolute paths, `..`, drive
/// letters and backslashes are rejected (an index is often downloaded).
pub fn shards_from_index(index: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let index = index.as_ref();
    let dir = index.parent().unwrap_or_else(|| Path::new("."));
    Ok(shard_names(index)?
        .iter()
        .map(|name| dir.join(name))
        .collect())
}

/// Which entry of a PyTorch `.pth` checkpoint holds the weights.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PthWeights {
    /// `model` (released and training checkpoints), else `state_dict` (mmdet/mmseg), else the
    /// top level (a bare state dict).
    #[default]
    Auto,
    /// The exponential-moving-average weights of a training checkpoint: `model_ema` (the
    /// official training code), else `state_dict_ema` (timm).
    Ema,
    /// The entry under this top-level key.
    Key(String),
}

/// Options of [`CheckpointBackend::open_with`] / [`var_builder_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOptions {
    /// Which entry of a `.pth` file holds the weights (safetensors files ignore it).
    pub pth_weights: PthWeights,
    /// Check every floating tensor for NaN/Inf when it is loaded (default `true`).
    pub check_finite: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            pth_weights: PthWeights::Auto,
            check_finite: true,
        }
    }
}

/// Where a tensor of a `.pth` file lives: its storage's key (record `<prefix>data/<key>`) and
/// its strided view of the storage.
#[derive(Debug, Clone)]
struct PthTensor {
    key: String,
    dtype: DType,
    storage_len: usize,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

/// Why a tensor entry of a `.pth` file cannot be loaded (told when the model asks for it).
#[derive(Debug, Clone)]
struct Unreadable {
    /// A valid tensor of a kind this crate does not read (dtype, layout), not a malformed one.
    unsupported: bool,
    reason: String,
}

/// The error for a file (or tensor) that cannot be read: unsupported when it is a valid one of a
/// kind this crate does not read, invalid when it is malformed.
fn unreadable_error(unsupported: bool, path: PathBuf, message: String) -> Error {
    if unsupported {
        IoError::UnsupportedCheckpoint { path, message }.into()
    } else {
        IoError::InvalidCheckpoint { path, message }.into()
    }
}

/// A tensor entry of a `.pth` file: readable, or why not.
type Found = std::result::Result<PthTensor, Unreadable>;

/// The tensor entries of a `.pth` weight dict, by stored name.
#[derive(Default)]
struct PthTensors {
    readable: HashMap<String, PthTensor>,
    unreadable: HashMap<String, Unreadable>,
}

impl PthTensors {
    fn is_empty(&self) -> bool {
        self.readable.is_empty() && self.unreadable.is_empty()
    }
}

/// A PyTorch zip checkpoint: the tensor table from `data.pkl` and the open archive.
struct PthFile {
    /// The folder of `data.pkl` in the archive (`archive/`), which holds `data/<key>`.
    prefix: String,
    tensors: HashMap<String, PthTensor>,
    /// Tensor entries that cannot be loaded, and why.
    unreadable: HashMap<String, Unreadable>,
    zip: Mutex<zip::ZipArchive<std::io::BufReader<std::fs::File>>>,
}

/// The largest `data.pkl` read (the pickle holds names and metadata, not tensor data).
const MAX_PICKLE_BYTES: u64 = 1 << 30;

/// The most dimensions of a `.pth` tensor (weights have at most 5; each entry copies them).
const MAX_RANK: usize = 16;

/// The most tensor entries under the weight entry of a `.pth` file (real ones have thousands).
const MAX_TENSORS: usize = 1 << 18;

/// The longest tensor name of a `.pth` file (real ones are under 200 bytes).
const MAX_NAME_BYTES: usize = 1024;

/// The longest storage key of a `.pth` file (torch writes a decimal number).
const MAX_KEY_BYTES: usize = 64;

/// `s`, cut to 64 bytes for a message kept per tensor entry (a hostile file's names are long).
fn clip(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s.to_string(),
    }
}

fn storage_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "DoubleStorage" => DType::F64,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "ByteStorage" | "BoolStorage" => DType::U8,
        _ => return None,
    })
}

/// The tensor described by node `id` (`_rebuild_tensor_v2` of a storage, possibly wrapped in
/// `_rebuild_parameter`), or why it cannot be loaded (an unsupported dtype or layout, malformed
/// arguments); `None` when `id` is not a tensor at all.
fn tensor_of(p: &pickle::Pickle, id: pickle::Id, depth: usize) -> Option<Found> {
    let (module, name) = p.callable_name(id)?;
    if module != "torch._utils" || !name.starts_with("_rebuild") {
        return None;
    }
    let fail = |unsupported: bool, reason: String| {
        Some(Err(Unreadable {
            unsupported,
            reason,
        }))
    };
    let Some(args) = p.call_args(id) else {
        return fail(
            false,
            format!(
                "the arguments of torch._utils.{} are not a tuple",
                clip(name)
            ),
        );
    };
    match name {
        "_rebuild_parameter" | "_rebuild_parameter_with_state" => {
            if depth >= 4 {
                return fail(false, "parameters nested more than 4 deep".into());
            }
            match args.first().and_then(|&a| tensor_of(p, a, depth + 1)) {
                Some(found) => Some(found),
                None => fail(true, "a Parameter whose data is not a dense tensor".into()),
            }
        }
        "_rebuild_tensor_v2" | "_rebuild_tensor" => Some(rebuild_tensor(p, args)),
        _ => {
            // `_rebuild_tensor_v3` carries the dtype as its 7th argument (float8, uint16, ...).
            let dtype = match args.get(6).map(|&d| p.node(d)) {
                Some(pickle::Node::Global { module, name }) if module == "torch" => {
                    format!(" of dtype torch.{}", clip(name))
                }
                _ => String::new(),
            };
            fail(
                true,
                format!(
                    "it is a tensor{dtype} rebuilt by torch._utils.{} (a dtype or layout this \
                     crate does not read: quantized, sparse, meta, float8, ...); re-save it as a \
                     dense float32/float16/bfloat16 tensor",
                    clip(name)
                ),
            )
        }
    }
}

/// The tensor of `_rebuild_tensor_v2(storage, offset, shape, strides, ...)`, or why it cannot be
/// loaded.
fn rebuild_tensor(p: &pickle::Pickle, args: &[pickle::Id]) -> Found {
    let malformed = |reason: String| Unreadable {
        unsupported: false,
        reason,
    };
    let (&storage, &offset, &shape, &strides) = match args {
        [a, b, c, d, ..] => (a, b, c, d),
        _ => {
            return Err(malformed(format!(
                "torch._utils._rebuild_tensor_v2 has {} arguments, at least 4 expected",
                args.len()
            )))
        }
    };
    // ('storage', torch.<Type>Storage, key, location, numel)
    let pid = match p.node(storage) {
        pickle::Node::PersId(pid) => p.as_seq(*pid).unwrap_or(&[]),
        _ => &[],
    };
    if pid.len() < 5 || p.as_str(pid[0]) != Some("storage") {
        return Err(malformed(
            "its storage is not a ('storage', type, key, location, size) reference".into(),
        ));
    }
    let dtype = match p.node(pid[1]) {
        pickle::Node::Global { module, name } if module == "torch" => storage_dtype(name)
            .ok_or_else(|| Unreadable {
                unsupported: true,
                reason: format!(
                    "its storage is torch.{}, a dtype this crate does not read (it reads \
                     float32/16/64, bfloat16, int64/32/16, uint8 and bool); convert the tensor, \
                     e.g. `t.float()`, and re-save",
                    clip(name)
                ),
            })?,
        pickle::Node::Global { module, name } => {
            return Err(malformed(format!(
                "its storage type {}.{} is not a torch storage class",
                clip(module),
                clip(name)
            )))
        }
        _ => {
            return Err(malformed(
                "its storage type is not a torch storage class".into(),
            ))
        }
    };
    let key = match p.node(pid[2]) {
        // Checked before copying: a memoised key may be shared by many tensors.
        pickle::Node::Str(s)
            if !s.is_empty()
                && s.len() <= MAX_KEY_BYTES
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
        {
            s.clone()
        }
        pickle::Node::Int(i) if *i >= 0 => i.to_string(),
        // Record names are plain keys; anything else is not a real file.
        _ => {
            return Err(malformed(
                "its storage key is not a plain record name".into(),
            ))
        }
    };
    let count = |what: &str, id: pickle::Id| -> std::result::Result<usize, Unreadable> {
        match p.as_int(id) {
            Some(v) => usize::try_from(v).map_err(|_| malformed(format!("its {what} is {v}"))),
            None => Err(malformed(format!("its {what} is not an integer"))),
        }
    };
    let storage_len = count("storage size", pid[4])?;
    let offset = count("storage offset", offset)?;
    // Checked before copying: a hostile file may share one huge tuple between many entries.
    let ints = |what: &str, id: pickle::Id| -> std::result::Result<Vec<usize>, Unreadable> {
        let seq = p
            .as_seq(id)
            .ok_or_else(|| malformed(format!("its {what} is not a tuple")))?;
        if seq.len() > MAX_RANK {
            return Err(Unreadable {
                unsupported: true,
                reason: format!(
                    "it has {} dimensions; this crate reads tensors of at most {MAX_RANK}",
                    seq.len()
                ),
            });
        }
        seq.iter()
            .map(|&d| count(&format!("{what} entry"), d))
            .collect()
    };
    let shape = ints("shape", shape)?;
    let strides = ints("stride", strides)?;
    if shape.len() != strides.len() {
        return Err(malformed(format!(
            "its shape {shape:?} and strides {strides:?} differ in length"
        )));
    }
    Ok(PthTensor {
        key,
        dtype,
        storage_len,
        offset,
        shape,
        strides,
    })
}

/// The tensor entries of the dict-like node `id`, by name. Too many entries or an overlong name
/// is an error (a hostile file: cost must stay bounded).
fn tensors_in(p: &pickle::Pickle, id: pickle::Id) -> std::result::Result<PthTensors, String> {
    let mut out = PthTensors::default();
    let mut count = 0usize;
    for &(k, v) in p.dict_items(id).unwrap_or(&[]) {
        let Some(name) = p.as_str(k) else { continue };
        let Some(found) = tensor_of(p, v, 0) else {
            continue;
        };
        count += 1;
        if count > MAX_TENSORS {
            return Err(format!(
                "more than {MAX_TENSORS} tensors in one state dict; not a weight checkpoint"
            ));
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(format!(
                "a tensor name of {} bytes (at most {MAX_NAME_BYTES}); not a weight checkpoint",
                name.len()
            ));
        }
        match found {
            Ok(t) => {
                out.unreadable.remove(name);
                out.readable.insert(name.to_string(), t);
            }
            Err(why) => {
                out.readable.remove(name);
                out.unreadable.insert(name.to_string(), why);
            }
        }
    }
    Ok(out)
}

fn top_level_keys(p: &pickle::Pickle) -> String {
    let keys: Vec<String> = p
        .dict_items(p.root)
        .unwrap_or(&[])
        .iter()
        .filter_map(|(k, _)| p.as_str(*k))
        .take(20)
        .map(|k| format!("{k:?}"))
        .collect();
    if keys.is_empty() {
        "no string keys".to_string()
    } else {
        keys.join(", ")
    }
}

fn open_pth(path: &Path, which: &PthWeights) -> Result<PthFile> {
    // Every failure names the file; the variant says what kind of failure it is.
    let text = |e: &str| format!("cannot read PyTorch checkpoint {}: {e}", path.display());
    let path_buf = || path.to_path_buf();
    let invalid = |e: String| -> Error {
        IoError::InvalidCheckpoint {
            path: path_buf(),
            message: text(&e),
        }
        .into()
    };
    let truncated = |e: String| -> Error {
        IoError::TruncatedCheckpoint {
            path: path_buf(),
            message: text(&e),
        }
        .into()
    };
    let unsupported = |e: String| -> Error {
        IoError::UnsupportedCheckpoint {
            path: path_buf(),
            message: text(&e),
        }
        .into()
    };
    let missing = |name: &str, e: String| -> Error {
        IoError::MissingTensor {
            name: name.to_string(),
            message: text(&e),
        }
        .into()
    };
    let file = open_regular(path).map_err(|e| IoError::io(path, text(&e.to_string()), e))?;
    // `torch.save` writes the zip's directory last: a file without one was cut short.
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        let m = format!("not a valid zip archive ({e})");
        match e {
            zip::result::ZipError::UnsupportedArchive(_) => unsupported(m),
            _ => truncated(m),
        }
    })?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.len())
        .ok_or_else(|| unsupported("no data.pkl in the archive (not a torch.save file)".into()))?;
    let prefix = pkl_name.strip_suffix("data.pkl").unwrap_or("").to_string();
    let mut bytes = Vec::new();
    zip.by_name(&pkl_name)
        .map_err(|e| invalid(format!("cannot open {pkl_name}: {e}")))?
        .take(MAX_PICKLE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| {
            let m = format!("cannot read {pkl_name}: {e}");
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                truncated(m)
            } else {
                invalid(m)
            }
        })?;
    if bytes.len() as u64 > MAX_PICKLE_BYTES {
        return Err(unsupported(format!("{pkl_name} is larger than 1 GiB")));
    }
    let p = pickle::parse(&bytes).map_err(|e| {
        let m = format!("{pkl_name}: {e}");
        if e.starts_with("truncated") {
            truncated(m)
        } else {
            invalid(m)
        }
    })?;
    let entries = |id: pickle::Id| tensors_in(&p, id).map_err(invalid);
    let under = |key: &str| p.get(p.root, key).map(entries).transpose();
    let found = match which {
        PthWeights::Auto => match under("model")?.filter(|t| !t.is_empty()) {
            Some(t) => t,
            None => match under("state_dict")?.filter(|t| !t.is_empty()) {
                Some(t) => t,
                None => entries(p.root)?,
            },
        },
        PthWeights::Ema => match under("model_ema")? {
            Some(t) => t,
            None => under("state_dict_ema")?.ok_or_else(|| {
                missing(
                    "model_ema",
                    format!(
                        "no EMA weights: neither \"model_ema\" nor \"state_dict_ema\" is a key \
                         (keys: {})",
                        top_level_keys(&p)
                    ),
                )
            })?,
        },
        PthWeights::Key(k) => under(k)?.ok_or_else(|| {
            missing(
                k,
                format!(
                    "no key {k:?} at the top level (keys: {})",
                    top_level_keys(&p)
                ),
            )
        })?,
    };
    if found.readable.is_empty() {
        let looked = match which {
            PthWeights::Auto => "under \"model\", \"state_dict\" and the top level".to_string(),
            PthWeights::Ema => "under \"model_ema\" / \"state_dict_ema\"".to_string(),
            PthWeights::Key(k) => format!("under {k:?}"),
        };
        if found.unreadable.is_empty() {
            return Err(unreadable_error(
                true,
                path_buf(),
                format!(
                    "PyTorch checkpoint {} holds no tensors (looked {looked}; top-level keys: {})",
                    path.display(),
                    top_level_keys(&p)
                ),
            ));
        }
        // Name the tensors that are there and why none can be read.
        let mut why: Vec<(&String, &Unreadable)> = found.unreadable.iter().collect();
        why.sort_by(|a, b| a.0.cmp(b.0));
        let listed: Vec<String> = why
            .iter()
            .take(3)
            .map(|(name, u)| format!("`{name}`: {}", u.reason))
            .collect();
        let more = match why.len() {
            n if n > 3 => format!(" (and {} more)", n - 3),
            _ => String::new(),
        };
        let message = format!(
            "PyTorch checkpoint {} holds no tensor this crate can read (looked {looked}): {}{more}",
            path.display(),
            listed.join("; ")
        );
        let unsupported = why.iter().any(|(_, u)| u.unsupported);
        return Err(unreadable_error(unsupported, path_buf(), message));
    }
    Ok(PthFile {
        prefix,
        tensors: found.readable,
        unreadable: found.unreadable,
        zip: Mutex::new(zip),
    })
}

/// The flat index and kind (`"NaN"` or `"Inf"`) of the first non-finite element of a tensor.
type NonFiniteAt = (usize, &'static str);

/// Why a tensor of a `.pth` file could not be read.
struct ReadFail {
    /// Its record ends before its storage does (a cut file).
    truncated: bool,
    message: String,
}

impl From<String> for ReadFail {
    fn from(message: String) -> Self {
        Self {
            truncated: false,
            message,
        }
    }
}

impl From<&str> for ReadFail {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

impl ReadFail {
    fn truncated(message: String) -> Self {
        Self {
            truncated: true,
            message,
        }
    }
}

impl PthFile {
    /// Reads tensor `t` (contiguous, on the CPU) from its zip record; with `check_finite`, also
    /// the first NaN/Inf element of a floating tensor (one pass over the bytes read).
    fn read(
        &self,
        t: &PthTensor,
        check_finite: bool,
    ) -> std::result::Result<(Tensor, Option<NonFiniteAt>), ReadFail> {
        let es = t.dtype.size_in_bytes();
        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or("shape overflows")?;
        let storage_bytes = t
            .storage_len
            .checked_mul(es)
            .ok_or("storage size overflows")?;
        // More elements than storage means elements repeat (stride 0): bytes read stay bounded.
        if numel > t.storage_len {
            return Err(format!(
                "its view (shape {:?}, strides {:?}) has {numel} elements but its storage only {}: \
                 the tensor repeats storage elements (saved from an `expand` or another stride-0 \
                 view); re-save it with `.contiguous()` or `.clone()`",
                t.shape, t.strides, t.storage_len
            )
            .into());
        }
        if numel > 0 {
            let last = t
                .shape
                .iter()
                .zip(&t.strides)
                .try_fold(t.offset, |a, (&d, &s)| {
                    a.checked_add((d - 1).checked_mul(s)?)
                })
                .ok_or("view overflows")?;
            if last >= t.storage_len {
                return Err(format!(
                    "view (offset {}, shape {:?}, strides {:?}) exceeds its storage of {} elements",
                    t.offset, t.shape, t.strides, t.storage_len
                )
                .into());
            }
        }
        let record = format!("{}data/{}", self.prefix, t.key);
        let mut zip = self.zip.lock().map_err(|_| "archive lock poisoned")?;
        let mut rec = zip
            .by_name(&record)
            .map_err(|e| ReadFail::from(format!("record {record}: {e}")))?;
        if rec.size() < storage_bytes as u64 {
            return Err(ReadFail::truncated(format!(
                "record {record} holds {} bytes, its storage needs {storage_bytes}",
                rec.size()
            )));
        }
        let mut data = Vec::new();
        data.try_reserve_exact(storage_bytes)
            .map_err(|_| ReadFail::from(format!("cannot allocate {storage_bytes} bytes")))?;
        (&mut rec)
            .take(storage_bytes as u64)
            .read_to_end(&mut data)
            .map_err(|e| {
                let m = format!("record {record}: {e}");
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    ReadFail::truncated(m)
                } else {
                    ReadFail::from(m)
                }
            })?;
        if data.len() < storage_bytes {
            return Err(ReadFail::truncated(format!("record {record} is truncated")));
        }
        drop(rec);
        drop(zip);
        let contiguous = {
            let mut expect = 1usize;
            let mut ok = true;
            for (&d, &s) in t.shape.iter().zip(&t.strides).rev() {
                if d != 1 && s != expect {
                    ok = false;
                }
                expect = expect.saturating_mul(d);
            }
            ok
        };
        let bytes: std::borrow::Cow<'_, [u8]> = if numel == 0 {
            std::borrow::Cow::Owned(Vec::new())
        } else if contiguous {
            std::borrow::Cow::Borrowed(&data[t.offset * es..(t.offset + numel) * es])
        } else {
            let len = numel.checked_mul(es).ok_or("tensor size overflows")?;
            let mut out = Vec::new();
            out.try_reserve_exact(len)
                .map_err(|_| ReadFail::from(format!("cannot allocate {len} bytes")))?;
            let mut idx = vec![0usize; t.shape.len()];
            for _ in 0..numel {
                let at = t.offset
                    + idx
                        .iter()
                        .zip(&t.strides)
                        .map(|(&i, &s)| i * s)
                        .sum::<usize>();
                out.extend_from_slice(&data[at * es..(at + 1) * es]);
                for d in (0..idx.len()).rev() {
                    idx[d] += 1;
                    if idx[d] < t.shape[d] {
                        break;
                    }
                    idx[d] = 0;
                }
            }
            std::borrow::Cow::Owned(out)
        };
        let bad = if check_finite {
            first_non_finite(&bytes, t.dtype)
        } else {
            None
        };
        let tensor = Tensor::from_raw_buffer(&bytes, t.dtype, &t.shape, &Device::Cpu)
            .map_err(|e| ReadFail::from(e.to_string()))?;
        Ok((tensor, bad))
    }
}

/// The index of the first NaN/Inf element of little-endian `bytes` of `dtype`, and its kind.
/// Integer dtypes have none.
fn first_non_finite(bytes: &[u8], dtype: DType) -> Option<(usize, &'static str)> {
    fn kind(nan: bool) -> &'static str {
        if nan {
            "NaN"
        } else {
            "Inf"
        }
    }
    match dtype {
        DType::F32 => bytes.chunks_exact(4).enumerate().find_map(|(i, b)| {
            let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            (v & 0x7f80_0000 == 0x7f80_0000).then(|| (i, kind(v & 0x007f_ffff != 0)))
        }),
        DType::F16 => bytes.chunks_exact(2).enumerate().find_map(|(i, b)| {
            let v = u16::from_le_bytes([b[0], b[1]]);
            (v & 0x7c00 == 0x7c00).then(|| (i, kind(v & 0x03ff != 0)))
        }),
        DType::BF16 => bytes.chunks_exact(2).enumerate().find_map(|(i, b)| {
            let v = u16::from_le_bytes([b[0], b[1]]);
            (v & 0x7f80 == 0x7f80).then(|| (i, kind(v & 0x007f != 0)))
        }),
        DType::F64 => bytes.chunks_exact(8).enumerate().find_map(|(i, b)| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            let v = u64::from_le_bytes(a);
            (v & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000)
                .then(|| (i, kind(v & 0x000f_ffff_ffff_ffff != 0)))
        }),
        _ => None,
    }
}

/// The dtype of a safetensors view, for the finiteness check (only floating types matter).
fn st_float_dtype(d: safetensors::Dtype) -> Option<DType> {
    match d {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}

enum Source {
    Pth(PthFile),
    Safetensors(MmapedSafetensors),
}

struct Entry {
    source: usize,
    stored: String,
    shape: Shape,
}

/// A tensor of a `.pth` file that cannot be loaded, kept to say why when it is asked for.
struct Skipped {
    source: usize,
    stored: String,
    why: Unreadable,
}

/// A [`SimpleBackend`] over one or more weight files with InternImage name normalisation and
/// error messages that name the tensor, the shapes and the file.
pub struct CheckpointBackend {
    sources: Vec<(PathBuf, Format, Source)>,
    entries: HashMap<String, Entry>,
    /// Tensors present but unreadable (not in `entries`), by official name.
    skipped: HashMap<String, Skipped>,
    check_finite: bool,
}

impl std::fmt::Debug for CheckpointBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointBackend")
            .field("files", &self.files())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl CheckpointBackend {
    /// Opens the given files (`.pth`, `.safetensors`, shards, or an index json) with the default
    /// [`OpenOptions`].
    pub fn open<P: AsRef<Path>>(paths: &[P]) -> Result<Self> {
        Self::open_with(paths, &OpenOptions::default())
    }

    /// Opens the given files with explicit options (e.g. the EMA weights of a `.pth`).
    pub fn open_with<P: AsRef<Path>>(paths: &[P], opts: &OpenOptions) -> Result<Self> {
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
                            other => {
                                return Err(IoError::UnsupportedCheckpoint {
                                    path: shard.clone(),
                                    message: format!(
                                        "index {} lists {}, which is {other:?}, not a safetensors or PyTorch weight file",
                                        p.display(),
                                        shard.display()
                                    ),
                                }
                                .into())
                            }
                        }
                    }
                }
                f => files.push((p.to_path_buf(), f)),
            }
        }
        let mut sources = Vec::with_capacity(files.len());
        let mut entries: HashMap<String, Entry> = HashMap::new();
        let mut skipped: HashMap<String, Skipped> = HashMap::new();
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
                    let t = open_pth(&path, &opts.pth_weights)?;
                    for (name, info) in &t.tensors {
                        add(name.clone(), Shape::from(info.shape.clone()));
                    }
                    for (name, why) in &t.unreadable {
                        skipped.entry(canonical_name(name)).or_insert(Skipped {
                            source: idx,
                            stored: name.clone(),
                            why: why.clone(),
                        });
                    }
                    Source::Pth(t)
                }
                _ => {
                    // SAFETY: memory-mapped read-only; the file must not be modified while in use
                    // (the same contract as `VarBuilder::from_mmaped_safetensors`).
                    let st = unsafe { MmapedSafetensors::new(&path) }.map_err(|e| {
                        let message = format!(
                            "cannot read safetensors file {}: {}",
                            path.display(),
                            crate::error::user_message(&e)
                        );
                        safetensors_error(&path, message, e)
                    })?;
                    for (name, view) in st.tensors() {
                        add(name, Shape::from(view.shape().to_vec()));
                    }
                    Source::Safetensors(st)
                }
            };
            sources.push((path, format, source));
        }
        Ok(Self {
            sources,
            entries,
            skipped,
            check_finite: opts.check_finite,
        })
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
        if let (None, Some(s)) = (self.entries.get(name), self.skipped.get(name)) {
            let path = self.sources[s.source].0.clone();
            let message = format!(
                "cannot read tensor `{}` from {}: {}",
                s.stored,
                path.display(),
                s.why.reason
            );
            return Err(unreadable_error(s.why.unsupported, path, message));
        }
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
                Err(IoError::MissingTensor {
                    name: name.to_string(),
                    message: format!(
                        "missing tensor `{name}`{hf} in checkpoint {}; does the Config match this checkpoint?",
                        self.files_str()
                    ),
                }
                .into())
            }
        }
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let e = self.entry(name)?;
        let (path, _, source) = &self.sources[e.source];
        let text = |err: &dyn std::fmt::Display| {
            format!(
                "cannot read tensor `{}` from {}: {err}",
                e.stored,
                path.display()
            )
        };
        // A safetensors record that cannot be read: the file was cut, or it is malformed.
        let ctx = |err: Error| -> Error {
            let message = text(&crate::error::user_message(&err));
            safetensors_error(path, message, err)
        };
        let non_finite = |at: Option<(usize, &str)>| -> Result<()> {
            match at {
                Some((i, kind)) if self.check_finite => Err(IoError::NonFinite {
                    name: e.stored.clone(),
                    message: format!(
                        "tensor `{}` in {} holds non-finite values (first: {kind} at flat index {i}); \
                         the checkpoint is corrupt or its training diverged",
                        e.stored,
                        path.display()
                    ),
                }
                .into()),
                _ => Ok(()),
            }
        };
        let t = match source {
            Source::Pth(p) => {
                let info = p.tensors.get(&e.stored).ok_or_else(|| {
                    msg(format!(
                        "tensor `{}` vanished from {}",
                        e.stored,
                        path.display()
                    ))
                })?;
                let (t, bad) = p.read(info, self.check_finite).map_err(|err| -> Error {
                    let message = text(&err.message);
                    let path = path.clone();
                    if err.truncated {
                        IoError::TruncatedCheckpoint { path, message }.into()
                    } else {
                        IoError::InvalidCheckpoint { path, message }.into()
                    }
                })?;
                non_finite(bad)?;
                t
            }
            Source::Safetensors(s) => {
                if self.check_finite {
                    let view = s.get(&e.stored).map_err(ctx)?;
                    if let Some(dt) = st_float_dtype(view.dtype()) {
                        non_finite(first_non_finite(view.data(), dt))?;
                    }
                }
                s.load(&e.stored, &Device::Cpu).map_err(ctx)?
            }
        };
        // Convert on the CPU, then move: avoids a full-precision copy on the accelerator.
        let from = t.dtype();
        let t = t
            .to_dtype(dtype)
            .and_then(|t| t.contiguous())
            .map_err(|err| -> Error {
                IoError::UnsupportedCheckpoint {
                    path: path.clone(),
                    message: format!(
                        "cannot convert tensor `{}` of {} from {from:?} to {dtype:?} ({}); \
                         re-save the checkpoint with float32, float16 or bfloat16 weights",
                        e.stored,
                        path.display(),
                        crate::error::user_message(&err)
                    ),
                }
                .into()
            })?;
        t.to_device(dev)
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
            return Err(IoError::ShapeMismatch {
                name: name.to_string(),
                expected: s.dims().to_vec(),
                found: e.shape.dims().to_vec(),
                message: format!(
                    "shape mismatch for tensor `{name}`: the model expects {:?}, the checkpoint has {:?} ({}); \
                     does the Config match this checkpoint?",
                    s.dims(),
                    e.shape.dims(),
                    self.sources[e.source].0.display()
                ),
            }
            .into());
        }
        self.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        // An unreadable tensor is there: asking for it says why it cannot be read.
        self.entries.contains_key(name) || self.skipped.contains_key(name)
    }
}

/// [`var_builder`] with explicit [`OpenOptions`], e.g. the EMA weights of a training checkpoint:
///
/// ```no_run
/// use candle_core::{DType, Device};
/// use internimage::checkpoint::{var_builder_with, OpenOptions, PthWeights};
/// use internimage::{Config, InternImage};
///
/// let opts = OpenOptions { pth_weights: PthWeights::Ema, ..OpenOptions::default() };
/// let vb = var_builder_with(&["ckpt_epoch_299.pth"], &opts, DType::F32, &Device::Cpu)?;
/// let model = InternImage::new(&Config::t(), vb)?;
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn var_builder_with<P: AsRef<Path>>(
    paths: &[P],
    opts: &OpenOptions,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let backend = CheckpointBackend::open_with(paths, opts)?;
    Ok(VarBuilder::from_backend(
        Box::new(backend),
        dtype,
        device.clone(),
    ))
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
