//! ImageNet class labels for the released classification heads, and top-k predictions.
//!
//! The three tables are embedded in the crate (no files to ship, no network):
//!
//! * [`imagenet1k()`]: the 1000 ILSVRC-2012 classes in the order of every 1000-class head
//!   (sorted WordNet ids: index 0 = `n01440764` "tench", 999 = `n15075141` "toilet tissue").
//! * [`imagenet22k()`]: the 21841 classes of the 22k heads (L/XL-22k, H/G joint-to-22k), in the
//!   order of the official `22k_class_to_idx.json` (the sorted fall11 synset list).
//! * [`map_22k_to_1k()`]: for each 1k class, the 22k logit the official evaluation uses
//!   (`logits[:, map]`; 1k classes 849 and 850 both map to 22k index 11136).
//!
//! Names are the WordNet lemma lists (`"tench, Tinca tinca"`); [`Prediction::short_name`] gives the
//! first lemma.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use internimage::{labels, zoo::LabelSet};
//! let mut logits = vec![0f32; 1000];
//! logits[281] = 8.0; // tabby cat
//! let logits = Tensor::from_vec(logits, (1, 1000), &Device::Cpu)?;
//! let top = labels::top_k(&logits, LabelSet::Imagenet1k, 3)?;
//! assert_eq!(top[0][0].index, 281);
//! assert_eq!(top[0][0].wnid, "n02123045");
//! assert_eq!(top[0][0].short_name(), "tabby");
//! # Ok::<(), candle_core::Error>(())
//! ```

use std::sync::OnceLock;

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::zoo::LabelSet;

const IMAGENET1K_TSV: &str = include_str!("../labels/imagenet1k.tsv");
const IMAGENET22K_TSV: &str = include_str!("../labels/imagenet22k.tsv");
const MAP_22K_TO_1K_TXT: &str = include_str!("../labels/map22kto1k.txt");

/// One class of a label table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label {
    /// WordNet id, e.g. `n01440764`.
    pub wnid: &'static str,
    /// Comma-separated WordNet lemma names, e.g. `tench, Tinca tinca`.
    pub name: &'static str,
}

/// An ordered list of classes: position `i` is the label of logit `i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelTable {
    labels: Vec<Label>,
}

impl LabelTable {
    /// Parses `index <TAB> wnid <TAB> names` lines; the index column must count 0, 1, 2, ...
    fn parse(what: &str, text: &'static str) -> Result<Self> {
        let mut labels = Vec::new();
        for (line_no, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mut fields = line.splitn(3, '\t');
            let (Some(index), Some(wnid), Some(name)) =
                (fields.next(), fields.next(), fields.next())
            else {
                bail!(
                    "{what}: line {} is not `index<TAB>wnid<TAB>names`: {line:?}",
                    line_no + 1
                )
            };
            if index.trim().parse::<usize>().ok() != Some(labels.len()) {
                bail!(
                    "{what}: line {} has index {index:?}, expected {}",
                    line_no + 1,
                    labels.len()
                )
            }
            labels.push(Label {
                wnid: wnid.trim(),
                name: name.trim(),
            });
        }
        Ok(Self { labels })
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the table has no classes (never the case for the embedded tables).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The label of class `index`, or `None` when out of range.
    pub fn get(&self, index: usize) -> Option<&Label> {
        self.labels.get(index)
    }

    /// All labels in class order.
    pub fn labels(&self) -> &[Label] {
        &self.labels
    }

    /// The class index of a WordNet id (linear search), or `None`.
    pub fn index_of(&self, wnid: &str) -> Option<usize> {
        self.labels.iter().position(|l| l.wnid == wnid)
    }
}

fn parsed_table(
    cell: &'static OnceLock<std::result::Result<LabelTable, String>>,
    what: &str,
    text: &'static str,
) -> Result<&'static LabelTable> {
    cell.get_or_init(|| LabelTable::parse(what, text).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| candle_core::Error::msg(format!("embedded label table is corrupt: {e}")))
}

/// The 1000 ImageNet-1k classes (ILSVRC-2012 order). Parsed once, on first use.
pub fn imagenet1k() -> Result<&'static LabelTable> {
    static CELL: OnceLock<std::result::Result<LabelTable, String>> = OnceLock::new();
    parsed_table(&CELL, "imagenet1k.tsv", IMAGENET1K_TSV)
}

/// The 21841 ImageNet-22k classes (sorted fall11 synsets). Parsed once, on first use.
pub fn imagenet22k() -> Result<&'static LabelTable> {
    static CELL: OnceLock<std::result::Result<LabelTable, String>> = OnceLock::new();
    parsed_table(&CELL, "imagenet22k.tsv", IMAGENET22K_TSV)
}

/// The label table of a [`LabelSet`].
pub fn table(set: LabelSet) -> Result<&'static LabelTable> {
    match set {
        LabelSet::Imagenet1k => imagenet1k(),
        LabelSet::Imagenet22k => imagenet22k(),
    }
}

/// For each ImageNet-1k class `i`, the ImageNet-22k logit index the official evaluation reads
/// (`logits_1k = logits_22k[:, map]`). 1000 entries.
pub fn map_22k_to_1k() -> Result<&'static [usize]> {
    static CELL: OnceLock<std::result::Result<Vec<usize>, String>> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut map = Vec::with_capacity(1000);
        for (line_no, line) in MAP_22K_TO_1K_TXT.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            match line.parse::<usize>() {
                Ok(v) if v < 21841 => map.push(v),
                _ => {
                    return Err(format!(
                        "map22kto1k.txt line {}: {line:?} is not a 22k index",
                        line_no + 1
                    ))
                }
            }
        }
        if map.len() != 1000 {
            return Err(format!(
                "map22kto1k.txt has {} entries, expected 1000",
                map.len()
            ));
        }
        Ok(map)
    })
    .as_deref()
    .map_err(|e| candle_core::Error::msg(format!("embedded label map is corrupt: {e}")))
}

/// Selects the 1000 ImageNet-1k logits from ImageNet-22k logits `(N, 21841)` -> `(N, 1000)`,
/// the way the official evaluation scores a 22k head on ImageNet-1k.
pub fn logits_22k_to_1k(logits: &Tensor) -> Result<Tensor> {
    let (_, c) = logits.dims2()?;
    if c != 21841 {
        bail!(
            "logits_22k_to_1k: expected (N, 21841) ImageNet-22k logits, got shape {:?}",
            logits.shape()
        )
    }
    let map: Vec<u32> = map_22k_to_1k()?.iter().map(|&i| i as u32).collect();
    let idx = Tensor::from_vec(map, 1000, logits.device())?;
    logits.index_select(&idx, 1)
}

/// One predicted class.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Class (logit) index.
    pub index: usize,
    /// WordNet id (`n02123045`); empty when the head has no label table.
    pub wnid: String,
    /// WordNet lemma names (`tabby, tabby cat`); `class <index>` when the head has no label table.
    pub name: String,
    /// Softmax probability over all classes of the head.
    pub probability: f32,
}

impl Prediction {
    /// The first lemma of [`name`](Self::name) (`tabby` for `tabby, tabby cat`).
    pub fn short_name(&self) -> &str {
        self.name.split(',').next().unwrap_or("").trim()
    }
}

/// Softmax + top-k of logits `(N, C)` (or `(C,)` for one image), without labels:
/// for each image the `k` most probable `(class index, probability)` pairs, most probable first
/// (ties: lower index first). `k` larger than `C` returns all classes.
pub fn top_k_indices(logits: &Tensor, k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
    let logits = match logits.rank() {
        1 => logits.unsqueeze(0)?,
        2 => logits.clone(),
        _ => bail!(
            "top-k expects logits of shape (N, num_classes) or (num_classes,), got {:?}",
            logits.shape()
        ),
    };
    let rows = logits
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .to_vec2::<f32>()?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        if row.is_empty() {
            bail!("top-k: logits have 0 classes")
        }
        // Stable softmax in f64.
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
        let exps: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| exps[b].total_cmp(&exps[a]).then(a.cmp(&b)));
        order.truncate(k);
        out.push(
            order
                .into_iter()
                .map(|i| (i, (exps[i] / sum) as f32))
                .collect(),
        );
    }
    Ok(out)
}

/// Softmax + top-k of logits `(N, C)` (or `(C,)`) with the names of `label_set`.
/// Fails when `C` is not the number of classes of `label_set`.
pub fn top_k(logits: &Tensor, label_set: LabelSet, k: usize) -> Result<Vec<Vec<Prediction>>> {
    let table = table(label_set)?;
    top_k_with_table(logits, table, k)
}

/// Softmax + top-k of logits `(N, C)` with the names of any [`LabelTable`].
/// Fails when `C` is not the number of classes of the table.
pub fn top_k_with_table(
    logits: &Tensor,
    table: &LabelTable,
    k: usize,
) -> Result<Vec<Vec<Prediction>>> {
    let c = logits.dims().last().copied().unwrap_or(0);
    if c != table.len() {
        bail!(
            "the logits have {c} classes (shape {:?}) but the label set has {} classes: \
             use the label set of the checkpoint's head (1000 for *_1k / *_22kto1k, 21841 for *_22k / \
             *_jointto22k), or labels::logits_22k_to_1k to score a 22k head with 1k labels",
            logits.shape(),
            table.len()
        )
    }
    let top = top_k_indices(logits, k)?;
    Ok(top
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|(index, probability)| {
                    let (wnid, name) = match table.get(index) {
                        Some(l) => (l.wnid.to_string(), l.name.to_string()),
                        None => (String::new(), format!("class {index}")),
                    };
                    Prediction {
                        index,
                        wnid,
                        name,
                        probability,
                    }
                })
                .collect()
        })
        .collect())
}

/// Softmax + top-k for a head without a label table (e.g. a custom fine-tune): predictions have
/// an empty `wnid` and the name `class <index>`.
pub fn top_k_unlabelled(logits: &Tensor, k: usize) -> Result<Vec<Vec<Prediction>>> {
    Ok(top_k_indices(logits, k)?
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|(index, probability)| Prediction {
                    index,
                    wnid: String::new(),
                    name: format!("class {index}"),
                    probability,
                })
                .collect()
        })
        .collect())
}
