//! Classify images with a released InternImage checkpoint and print the top-k ImageNet labels.
//!
//! ```text
//! cargo run --release --example classify                       # the sample photo, InternImage-T
//! cargo run --release --example classify -- cat.jpg photos/    # files and directories
//! cargo run --release --example classify -- --model internimage_l_22kto1k_384 --top-k 3 a.jpg
//! cargo run --release --example classify -- --model flash_internimage_t_1k_224 a.jpg  # DCNv4
//! cargo run --release --example classify -- --weights internimage_t_1k_224.pth a.jpg   # no network
//! cargo run --release --example classify -- --weights model.safetensors --config config.json a.jpg
//! cargo run --release --features cuda --example classify -- --device cuda --dtype f16 photos/
//! ```
//!
//! Options (see `--help`):
//!
//! * `--model NAME`: zoo name (default `internimage_t_1k_224`); gives the architecture, the
//!   preprocessing (input size) and the label set. Without `--weights` the checkpoint is downloaded
//!   from the Hugging Face Hub into the standard cache (`HF_HOME`, `HF_HUB_CACHE`, `HF_ENDPOINT`,
//!   `HF_TOKEN`, `HF_HUB_OFFLINE=1` are honoured; needs the `hub` feature, on by default).
//! * `--weights PATH`: a local `.pth`, `.safetensors` or `model.safetensors.index.json`; no network.
//!   `--config PATH` reads the architecture from a Hugging Face `config.json` instead of the zoo entry.
//! * `--labels PATH`: class names, one per line (the `labels.txt` a `finetune` run writes).
//! * `--size S`: evaluation resolution (default: the zoo entry's, e.g. 224).
//! * `--top-k K` (default 5), `--batch-size B` (default 8; one forward pass per batch),
//!   `--device cpu|cuda|metal`, `--dtype f32|f16|bf16`, `--json`, `--logits` (JSON: add raw logits).
//!
//! Labels: a 1000-class head gets the ImageNet-1k names, a 21841-class head the ImageNet-22k
//! names. Any other head size (a custom fine-tune, or the 100-class test checkpoints) is printed
//! by class index only (`class 17`, empty WordNet id) rather than borrowing unrelated names.
//!
//! Directories are expanded (not recursively) to the image files they contain. A file that cannot
//! be read or decoded gets an error line (on stderr, and an `"error"` entry with `--json`); the
//! other files are still classified, and the exit status is 1 when any file failed.
//!
//! Output format (shown for the 100-class test network of `../shared/fixtures`, whose head has no
//! ImageNet label set; a 1000-class head prints `name  (wnid, class i)` instead):
//!
//! ```text
//! $ classify --weights ../shared/fixtures/weights/tiny_b.safetensors --config tiny_b_config.json --top-k 3
//! /path/to/assets/chelsea.png
//!    1.    1.25%  class 17
//!    2.    1.20%  class 94
//!    3.    1.17%  class 29
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Module, Result, Tensor};
use clap::Parser;
use internimage::labels::{self, Prediction};
use internimage::zoo::{self, LabelSet, PreprocessConfig};
use internimage::{preprocess, Config, InternImage};

const DEFAULT_MODEL: &str = "internimage_t_1k_224";
const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/chelsea.png");
const IMAGE_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "gif", "bmp", "tif", "tiff", "webp", "pnm", "ppm", "pgm", "pbm", "pam",
    "ico",
];

/// classify: top-k ImageNet labels for images with InternImage
#[derive(Debug, Parser)]
#[command(
    name = "classify",
    override_usage = "cargo run --release --example classify -- [OPTIONS] [IMAGE|DIR ...]",
    after_help = "With no IMAGE the sample photo assets/chelsea.png is classified.\n\n\
Heads with 1000 or 21841 classes get ImageNet-1k / -22k names; other head sizes are \
printed by class index. Exit status 1 when any image failed, 2 on bad arguments."
)]
struct Args {
    /// zoo model; gives architecture, input size and labels; downloaded from the Hub unless
    /// --weights
    #[arg(long, value_name = "NAME", default_value = DEFAULT_MODEL)]
    model: String,
    /// local checkpoint (.pth, .safetensors or .safetensors.index.json); no network
    #[arg(long, value_name = "PATH")]
    weights: Option<PathBuf>,
    /// Hugging Face config.json with the architecture of --weights (default: the --model
    /// entry's architecture)
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// class names, one per line (e.g. labels.txt of a finetune run); replaces the ImageNet
    /// names
    #[arg(long = "labels", value_name = "PATH")]
    labels_file: Option<PathBuf>,
    /// The names read from --labels.
    #[arg(skip)]
    labels: Option<Vec<String>>,
    /// input resolution (default: the model's, e.g. 224)
    #[arg(long, value_name = "S", value_parser = positive::<u32>)]
    size: Option<u32>,
    /// number of classes to print per image
    #[arg(long = "top-k", alias = "topk", value_name = "K", default_value_t = 5, value_parser = positive::<usize>)]
    top_k: usize,
    /// images per forward pass
    #[arg(long, value_name = "B", default_value_t = 8, value_parser = positive::<usize>)]
    batch_size: usize,
    /// device to run on
    #[arg(long, value_name = "DEV", default_value = "cpu", value_parser = ["cpu", "cuda", "metal"])]
    device: String,
    /// f32 | f16 | bf16
    #[arg(long, value_name = "T", default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
    /// print one JSON document on stdout
    #[arg(long)]
    json: bool,
    /// with --json: include the raw logits of each image
    #[arg(long)]
    logits: bool,
    /// print the zoo model names and exit
    #[arg(long)]
    list_models: bool,
    /// image files and directories (not recursive)
    #[arg(value_name = "IMAGE|DIR")]
    inputs: Vec<PathBuf>,
}

/// A positive integer (`--size`, `--top-k`, `--batch-size`).
fn positive<T: std::str::FromStr + PartialOrd + Default>(
    v: &str,
) -> std::result::Result<T, String> {
    v.parse()
        .ok()
        .filter(|x: &T| *x > T::default())
        .ok_or(format!("expects a positive integer, got {v:?}"))
}

/// `--dtype`: f32 | f16 | bf16 (or their long names).
fn parse_dtype(v: &str) -> std::result::Result<DType, String> {
    match v {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(format!("expects f32, f16 or bf16, got {v:?}")),
    }
}

/// Reads the `--labels` file, if any (one name per line).
fn read_labels(args: &mut Args) -> std::result::Result<(), String> {
    if let Some(path) = &args.labels_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--labels: cannot read {}: {e}", path.display()))?;
        args.labels = Some(text.lines().map(|l| l.trim().to_string()).collect());
    }
    Ok(())
}

fn device(name: &str) -> Result<Device> {
    match name {
        "cuda" => Device::new_cuda(0),
        "metal" => Device::new_metal(0),
        _ => Ok(Device::Cpu),
    }
}

/// Expands directories (sorted, not recursive) into their image files. A directory without
/// images or an unreadable directory becomes an error entry.
fn expand_inputs(inputs: &[PathBuf]) -> Vec<(PathBuf, Option<String>)> {
    let mut out = Vec::new();
    for p in inputs {
        if !p.is_dir() {
            out.push((p.clone(), None));
            continue;
        }
        let entries = match std::fs::read_dir(p) {
            Ok(e) => e,
            Err(e) => {
                out.push((p.clone(), Some(format!("cannot read directory: {e}"))));
                continue;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|f| {
                f.is_file()
                    && f.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                        IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                    })
            })
            .collect();
        files.sort();
        if files.is_empty() {
            out.push((
                p.clone(),
                Some("directory contains no image files".to_string()),
            ));
        }
        out.extend(files.into_iter().map(|f| (f, None)));
    }
    out
}

/// The network, its input transform and its label set.
fn load_model(
    args: &Args,
    dev: &Device,
) -> Result<(InternImage, PreprocessConfig, Option<LabelSet>)> {
    let entry = zoo::get(&args.model);
    let model = match &args.weights {
        Some(weights) => {
            let cfg = match &args.config {
                Some(path) => Config::from_file(path)?,
                None => match &entry {
                    Ok(e) => e.config(),
                    Err(e) => candle_core::bail!(
                        "{e}\n(with --weights, pass --config config.json or a zoo --model)"
                    ),
                },
            };
            InternImage::from_checkpoint(&cfg, weights, args.dtype, dev)?
        }
        None => from_hub(&args.model, args.dtype, dev)?,
    };
    let mut pre = match (&entry, args.size) {
        (_, Some(s)) => PreprocessConfig::imagenet(s),
        (Ok(e), None) => e.preprocess.clone(),
        (Err(_), None) => PreprocessConfig::imagenet(224),
    };
    if let Some(s) = args.size {
        pre.resize_shorter_side = s;
        pre.crop_size = s;
    }
    let num_classes = model.config().num_classes;
    // The zoo entry's label set when the head matches it, else whatever the head size says.
    let label_set = match &entry {
        Ok(e) if e.label_set.num_classes() == num_classes => Some(e.label_set),
        _ => LabelSet::from_num_classes(num_classes),
    };
    Ok((model, pre, label_set))
}

#[cfg(feature = "hub")]
fn from_hub(name: &str, dtype: DType, dev: &Device) -> Result<InternImage> {
    InternImage::from_pretrained(name, dtype, dev)
}

#[cfg(not(feature = "hub"))]
fn from_hub(name: &str, _dtype: DType, _dev: &Device) -> Result<InternImage> {
    candle_core::bail!(
        "this build has no `hub` feature, so {name} cannot be downloaded: pass --weights PATH \
         (and --config) or rebuild with --features hub"
    )
}

enum Outcome {
    Ok {
        predictions: Vec<Prediction>,
        logits: Option<Vec<f32>>,
    },
    Err(String),
}

/// Top-k predictions of one image, and its raw logits when `--logits` is set; an error for an
/// image whose logits are not all finite (broken weights or input) instead of `NaN%`.
type BatchItem = std::result::Result<(Vec<Prediction>, Option<Vec<f32>>), String>;

fn classify_batch(
    model: &InternImage,
    batch: &[Tensor],
    label_set: Option<LabelSet>,
    args: &Args,
    dev: &Device,
) -> Result<Vec<BatchItem>> {
    let xs = Tensor::stack(batch, 0)?.to_device(dev)?;
    let logits = model
        .forward(&xs)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    let preds = match (&args.labels, label_set) {
        (Some(names), _) => {
            let classes = logits.dims().last().copied().unwrap_or(0);
            if names.len() != classes {
                candle_core::bail!(
                    "--labels lists {} names but the model has {classes} classes",
                    names.len()
                );
            }
            let mut preds = labels::top_k_unlabelled(&logits, args.top_k)?;
            for p in preds.iter_mut().flatten() {
                p.name = names[p.index].clone();
            }
            preds
        }
        (None, Some(set)) => labels::top_k(&logits, set, args.top_k)?,
        (None, None) => labels::top_k_unlabelled(&logits, args.top_k)?,
    };
    let rows = logits.to_vec2::<f32>()?;
    Ok(preds
        .into_iter()
        .zip(rows)
        .map(|(p, row)| {
            let bad = row.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                Err(format!(
                    "the model produced non-finite logits for this image ({bad} of {} are NaN/Inf); \
                     check the weights (a diverged checkpoint) and the --dtype",
                    row.len()
                ))
            } else {
                Ok((p, args.logits.then_some(row)))
            }
        })
        .collect())
}

fn run(args: Args) -> Result<bool> {
    if args.list_models {
        for name in zoo::names()? {
            println!("{name}");
        }
        return Ok(true);
    }
    let dev = device(&args.device)?;
    let t0 = Instant::now();
    let (model, pre, label_set) = load_model(&args, &dev)?;
    eprintln!(
        "loaded {} ({} classes, {}) in {:.2}s; input {}x{}",
        args.weights
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| args.model.clone()),
        model.config().num_classes,
        match label_set {
            Some(LabelSet::Imagenet1k) => "ImageNet-1k labels",
            Some(LabelSet::Imagenet22k) => "ImageNet-22k labels",
            None => "no label set for this head size: printing class indices",
        },
        t0.elapsed().as_secs_f64(),
        pre.crop_size,
        pre.crop_size
    );

    let inputs = if args.inputs.is_empty() {
        vec![PathBuf::from(SAMPLE)]
    } else {
        args.inputs.clone()
    };
    let files = expand_inputs(&inputs);
    let mut outcomes: Vec<Option<Outcome>> = (0..files.len()).map(|_| None).collect();
    let t1 = Instant::now();
    let mut pending: Vec<(usize, Tensor)> = Vec::new();
    let mut n_ok_images = 0usize;
    let flush = |pending: &mut Vec<(usize, Tensor)>, outcomes: &mut Vec<Option<Outcome>>| {
        if pending.is_empty() {
            return;
        }
        let tensors: Vec<Tensor> = pending.iter().map(|(_, t)| t.clone()).collect();
        match classify_batch(&model, &tensors, label_set, &args, &dev) {
            Ok(results) => {
                for ((i, _), result) in pending.iter().zip(results) {
                    outcomes[*i] = Some(match result {
                        Ok((predictions, logits)) => Outcome::Ok {
                            predictions,
                            logits,
                        },
                        Err(e) => Outcome::Err(e),
                    });
                }
            }
            Err(e) => {
                for (i, _) in pending.iter() {
                    outcomes[*i] = Some(Outcome::Err(format!(
                        "inference failed: {}",
                        internimage::error::user_message(&e)
                    )));
                }
            }
        }
        pending.clear();
    };
    for (i, (path, err)) in files.iter().enumerate() {
        if let Some(e) = err {
            outcomes[i] = Some(Outcome::Err(e.clone()));
            continue;
        }
        match preprocess::load_image(path, &pre, &Device::Cpu) {
            Ok(t) => {
                pending.push((i, t));
                n_ok_images += 1;
                if pending.len() == args.batch_size {
                    flush(&mut pending, &mut outcomes);
                }
            }
            Err(e) => outcomes[i] = Some(Outcome::Err(internimage::error::user_message(&e))),
        }
    }
    flush(&mut pending, &mut outcomes);
    eprintln!(
        "classified {n_ok_images} image(s) in {:.2}s ({} per batch)",
        t1.elapsed().as_secs_f64(),
        args.batch_size
    );

    let mut all_ok = true;
    let mut json_results = Vec::new();
    for ((path, _), outcome) in files.iter().zip(outcomes) {
        let outcome = outcome.unwrap_or_else(|| Outcome::Err("not processed".into()));
        match outcome {
            Outcome::Ok {
                predictions,
                logits,
            } => {
                if args.json {
                    let mut v = serde_json::json!({
                        "file": path.display().to_string(),
                        "predictions": predictions.iter().map(|p| serde_json::json!({
                            "index": p.index,
                            "wnid": p.wnid,
                            "name": p.name,
                            "probability": p.probability,
                        })).collect::<Vec<_>>(),
                    });
                    if let Some(l) = logits {
                        v["logits"] = serde_json::json!(l);
                    }
                    json_results.push(v);
                } else {
                    print_text(path, &predictions);
                }
            }
            Outcome::Err(msg) => {
                all_ok = false;
                let shown = path.display().to_string();
                if msg.contains(&shown) {
                    eprintln!("error: {msg}");
                } else {
                    eprintln!("error: {shown}: {msg}");
                }
                if args.json {
                    json_results.push(serde_json::json!({
                        "file": path.display().to_string(),
                        "error": msg,
                    }));
                }
            }
        }
    }
    if args.json {
        let doc = serde_json::json!({
            "model": args.model,
            "weights": args.weights.as_ref().map(|p| p.display().to_string()),
            "num_classes": model.config().num_classes,
            "label_set": label_set.map(|s| match s {
                LabelSet::Imagenet1k => "imagenet1k",
                LabelSet::Imagenet22k => "imagenet22k",
            }),
            "input_size": pre.crop_size,
            "results": json_results,
        });
        match serde_json::to_string_pretty(&doc) {
            Ok(s) => println!("{s}"),
            Err(e) => candle_core::bail!("cannot write JSON: {e}"),
        }
    }
    Ok(all_ok)
}

fn print_text(path: &Path, predictions: &[Prediction]) {
    println!("{}", path.display());
    for (rank, p) in predictions.iter().enumerate() {
        let id = if p.wnid.is_empty() {
            String::new() // unlabelled head: the name is already "class <index>"
        } else {
            format!("  ({}, class {})", p.wnid, p.index)
        };
        println!(
            "  {:>2}. {:>7.2}%  {}{id}",
            rank + 1,
            100.0 * p.probability,
            p.name
        );
    }
}

fn main() -> ExitCode {
    // Bad arguments: clap prints the error and exits with status 2; --help exits with 0.
    let mut args = Args::parse();
    if let Err(e) = read_labels(&mut args) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {}", internimage::error::user_message(&e));
            ExitCode::from(1)
        }
    }
}
