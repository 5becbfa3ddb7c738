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
//! then the top level; [`PthWeights::Ema`] takes `model_ema`).
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

/// Detects the format of `path` from its first bytes.
pub fn detect_format(path: impl AsRef<Path>) -> Result<Format> {
    let path = path.as_ref();
    let mut f = std::fs::File::open(path).map_err(|e| {
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

/// Reads the shard list of a `model.safetensors.index.json` (paths resolved next to it; absolute
/// paths, `..`, drive letters and backslashes are rejected).
pub fn shards_from_index(index: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let index = index.as_ref();
    let invalid = |message: String| -> Error {
        IoError::InvalidCheckpoint {
            path: index.to_path_buf(),
            message,
        }
        .into()
    };
    let text = std::fs::read_to_string(index).map_err(|e| {
        IoError::io(
            index,
            format!("cannot read safetensors index {}: {e}", index.display()),
            e,
        )
    })?;
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
                "safetensors index {} has no \"weight_map\" object",
                index.display()
            ))
        })?;
    let dir = index.parent().unwrap_or_else(|| Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for v in map.values() {
        let f = v.as_str().ok_or_else(|| {
            invalid(format!(
                "safetensors index {}: non-string file name {v}",
                index.display()
            ))
        })?;
        // Shards must be plain relative paths below the index's directory: an index is often
        // downloaded, and must not make us open `/etc/passwd`, `../../x` or a device.
        let rel = Path::new(f);
        let plain = !f.is_empty()
            && !f.contains('\0')
            && !f.contains('\\')
            && !f.contains(':')
            && rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain {
            return Err(invalid(format!(
                "safetensors index {} lists the shard {f:?}, which is not a plain relative path \
                 inside the index's directory; shards must sit next to (or below) the index",
                index.display()
            )));
        }
        let p = dir.join(rel);
        if !files.contains(&p) {
            files.push(p);
        }
    }
    if files.is_empty() {
        return Err(invalid(format!(
            "safetensors index {} lists no files",
            index.display()
        )));
    }
    Ok(files)
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

/// Where a tensor of a `.pth` file lives: its zip record and its strided view of the storage.
#[derive(Debug, Clone)]
struct PthTensor {
    record: String,
    dtype: DType,
    storage_len: usize,
    offset: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

/// A PyTorch zip checkpoint: the tensor table from `data.pkl` and the open archive.
struct PthFile {
    tensors: HashMap<String, PthTensor>,
    zip: Mutex<zip::ZipArchive<std::io::BufReader<std::fs::File>>>,
}

/// The largest `data.pkl` read (the pickle holds names and metadata, not tensor data).
const MAX_PICKLE_BYTES: u64 = 1 << 30;

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

/// The tensor described by node `id`, if it is one (`_rebuild_tensor_v2` of a storage, possibly
/// wrapped in `_rebuild_parameter`). Tensors of unsupported dtypes, quantized tensors and
/// anything else give `None`.
fn tensor_of(p: &pickle::Pickle, id: pickle::Id, prefix: &str, depth: usize) -> Option<PthTensor> {
    if depth > 4 {
        return None;
    }
    let (module, name) = p.callable_name(id)?;
    let args = p.call_args(id)?;
    if module != "torch._utils" {
        return None;
    }
    match name {
        "_rebuild_parameter" | "_rebuild_parameter_with_state" => {
            tensor_of(p, *args.first()?, prefix, depth + 1)
        }
        "_rebuild_tensor_v2" | "_rebuild_tensor" => {
            let pickle::Node::PersId(pid) = p.node(*args.first()?) else {
                return None;
            };
            // ('storage', torch.<Type>Storage, key, location, numel)
            let pid = p.as_seq(*pid)?;
            if pid.len() < 5 || p.as_str(pid[0]) != Some("storage") {
                return None;
            }
            let dtype = match p.node(pid[1]) {
                pickle::Node::Global { module, name } if module == "torch" => storage_dtype(name)?,
                _ => return None,
            };
            let key = match p.node(pid[2]) {
                pickle::Node::Str(s) => s.clone(),
                pickle::Node::Int(i) => i.to_string(),
                _ => return None,
            };
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return None; // record names are plain keys; anything else is not a real file
            }
            let storage_len = usize::try_from(p.as_int(pid[4])?).ok()?;
            let offset = usize::try_from(p.as_int(*args.get(1)?)?).ok()?;
            let ints = |id: pickle::Id| -> Option<Vec<usize>> {
                p.as_seq(id)?
                    .iter()
                    .map(|&d| usize::try_from(p.as_int(d)?).ok())
                    .collect()
            };
            let shape = ints(*args.get(2)?)?;
            let strides = ints(*args.get(3)?)?;
            if shape.len() != strides.len() {
                return None;
            }
            Some(PthTensor {
                record: format!("{prefix}data/{key}"),
                dtype,
                storage_len,
                offset,
                shape,
                strides,
            })
        }
        _ => None,
    }
}

/// The tensors of the dict-like node `id`, by name.
fn tensors_in(p: &pickle::Pickle, id: pickle::Id, prefix: &str) -> HashMap<String, PthTensor> {
    let mut out = HashMap::new();
    for &(k, v) in p.dict_items(id).unwrap_or(&[]) {
        if let (Some(name), Some(t)) = (p.as_str(k), tensor_of(p, v, prefix, 0)) {
            out.insert(name.to_string(), t);
        }
    }
    out
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
    let file = std::fs::File::open(path).map_err(|e| IoError::io(path, text(&e.to_string()), e))?;
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
    let under = |key: &str| p.get(p.root, key).map(|id| tensors_in(&p, id, &prefix));
    let tensors = match which {
        PthWeights::Auto => under("model")
            .filter(|t| !t.is_empty())
            .or_else(|| under("state_dict").filter(|t| !t.is_empty()))
            .unwrap_or_else(|| tensors_in(&p, p.root, &prefix)),
        PthWeights::Ema => under("model_ema")
            .or_else(|| under("state_dict_ema"))
            .ok_or_else(|| {
                missing(
                    "model_ema",
                    format!(
                        "no EMA weights: neither \"model_ema\" nor \"state_dict_ema\" is a key \
                         (keys: {})",
                        top_level_keys(&p)
                    ),
                )
            })?,
        PthWeights::Key(k) => under(k).ok_or_else(|| {
            missing(
                k,
                format!(
                    "no key {k:?} at the top level (keys: {})",
                    top_level_keys(&p)
                ),
            )
        })?,
    };
    if tensors.is_empty() {
        let looked = match which {
            PthWeights::Auto => "under \"model\", \"state_dict\" and the top level".to_string(),
            PthWeights::Ema => "under \"model_ema\" / \"state_dict_ema\"".to_string(),
            PthWeights::Key(k) => format!("under {k:?}"),
        };
        return Err(IoError::UnsupportedCheckpoint {
            path: path_buf(),
            message: format!(
                "PyTorch checkpoint {} holds no tensors (looked {looked}; top-level keys: {})",
                path.display(),
                top_level_keys(&p)
            ),
        }
        .into());
    }
    Ok(PthFile {
        tensors,
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
        let mut zip = self.zip.lock().map_err(|_| "archive lock poisoned")?;
        let mut rec = zip
            .by_name(&t.record)
            .map_err(|e| ReadFail::from(format!("record {}: {e}", t.record)))?;
        if rec.size() < storage_bytes as u64 {
            return Err(ReadFail::truncated(format!(
                "record {} holds {} bytes, its storage needs {storage_bytes}",
                t.record,
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
                let m = format!("record {}: {e}", t.record);
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    ReadFail::truncated(m)
                } else {
                    ReadFail::from(m)
                }
            })?;
        if data.len() < storage_bytes {
            return Err(ReadFail::truncated(format!(
                "record {} is truncated",
                t.record
            )));
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
            let mut out = Vec::with_capacity(numel * es);
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

/// A [`SimpleBackend`] over one or more weight files with InternImage name normalisation and
/// error messages that name the tensor, the shapes and the file.
pub struct CheckpointBackend {
    sources: Vec<(PathBuf, Format, Source)>,
    entries: HashMap<String, Entry>,
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
        self.entries.contains_key(name)
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
