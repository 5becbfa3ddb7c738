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
use internimage::labels::{self, Prediction};
use internimage::zoo::{self, LabelSet, PreprocessConfig};
use internimage::{preprocess, Config, InternImage};

const DEFAULT_MODEL: &str = "internimage_t_1k_224";
const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/chelsea.png");
const IMAGE_EXTENSIONS: &[&str] = &[
    "png", "jpg", "jpeg", "gif", "bmp", "tif", "tiff", "webp", "pnm", "ppm", "pgm", "pbm", "pam",
    "ico",
];

const HELP: &str = "\
classify: top-k ImageNet labels for images with InternImage

USAGE:
    cargo run --release --example classify -- [OPTIONS] [IMAGE|DIR ...]

With no IMAGE the sample photo assets/chelsea.png is classified.

OPTIONS:
    --model NAME        zoo model (default internimage_t_1k_224); gives architecture,
                        input size and labels; downloaded from the Hub unless --weights
    --weights PATH      local checkpoint (.pth, .safetensors or .safetensors.index.json);
                        no network
    --config PATH       Hugging Face config.json with the architecture of --weights
                        (default: the --model entry's architecture)
    --labels PATH       class names, one per line (e.g. labels.txt of a finetune run);
                        replaces the ImageNet names
    --size S            input resolution (default: the model's, e.g. 224)
    --top-k K           number of classes to print per image (default 5)
    --batch-size B      images per forward pass (default 8)
    --device DEV        cpu | cuda | metal (default cpu)
    --dtype T           f32 | f16 | bf16 (default f32)
    --json              print one JSON document on stdout
    --logits            with --json: include the raw logits of each image
    --list-models       print the zoo model names and exit
    -h, --help          print this help

Heads with 1000 or 21841 classes get ImageNet-1k / -22k names; other head sizes are
printed by class index. Exit status 1 when any image failed, 2 on bad arguments.
";

#[derive(Debug)]
struct Args {
    model: String,
    weights: Option<PathBuf>,
    config: Option<PathBuf>,
    labels: Option<Vec<String>>,
    size: Option<u32>,
    top_k: usize,
    batch_size: usize,
    device: String,
    dtype: DType,
    json: bool,
    logits: bool,
    list_models: bool,
    inputs: Vec<PathBuf>,
}

fn parse_args(argv: impl IntoIterator<Item = String>) -> std::result::Result<Option<Args>, String> {
    let mut args = Args {
        model: DEFAULT_MODEL.to_string(),
        weights: None,
        config: None,
        labels: None,
        size: None,
        top_k: 5,
        batch_size: 8,
        device: "cpu".to_string(),
        dtype: DType::F32,
        json: false,
        logits: false,
        list_models: false,
        inputs: Vec::new(),
    };
    let mut it = argv.into_iter();
    let mut only_paths = false;
    while let Some(arg) = it.next() {
        if only_paths || !arg.starts_with('-') || arg == "-" {
            args.inputs.push(PathBuf::from(arg));
            continue;
        }
        // Accept both `--opt value` and `--opt=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| -> std::result::Result<String, String> {
            match inline.clone().or_else(|| it.next()) {
                Some(v) => Ok(v),
                None => Err(format!("{name} needs a value")),
            }
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--" => only_paths = true,
            "--model" => args.model = value("--model")?,
            "--weights" => args.weights = Some(PathBuf::from(value("--weights")?)),
            "--config" => args.config = Some(PathBuf::from(value("--config")?)),
            "--labels" => {
                let path = value("--labels")?;
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("--labels: cannot read {path}: {e}"))?;
                args.labels = Some(text.lines().map(|l| l.trim().to_string()).collect());
            }
            "--size" => {
                let v = value("--size")?;
                args.size = Some(
                    v.parse()
                        .ok()
                        .filter(|&s: &u32| s > 0)
                        .ok_or(format!("--size expects a positive integer, got {v:?}"))?,
                )
            }
            "--top-k" | "--topk" => {
                let v = value("--top-k")?;
                args.top_k = v
                    .parse()
                    .ok()
                    .filter(|&k: &usize| k > 0)
                    .ok_or(format!("--top-k expects a positive integer, got {v:?}"))?
            }
            "--batch-size" => {
                let v = value("--batch-size")?;
                args.batch_size = v.parse().ok().filter(|&k: &usize| k > 0).ok_or(format!(
                    "--batch-size expects a positive integer, got {v:?}"
                ))?
            }
            "--device" => {
                let v = value("--device")?;
                if !["cpu", "cuda", "metal"].contains(&v.as_str()) {
                    return Err(format!("--device expects cpu, cuda or metal, got {v:?}"));
                }
                args.device = v
            }
            "--dtype" => {
                let v = value("--dtype")?;
                args.dtype = match v.as_str() {
                    "f32" | "float32" => DType::F32,
                    "f16" | "float16" => DType::F16,
                    "bf16" | "bfloat16" => DType::BF16,
                    _ => return Err(format!("--dtype expects f32, f16 or bf16, got {v:?}")),
                }
            }
            "--json" => args.json = true,
            "--logits" => args.logits = true,
            "--list-models" => args.list_models = true,
            _ => return Err(format!("unknown option {arg:?} (see --help)")),
        }
    }
    Ok(Some(args))
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
                    outcomes[*i] = Some(Outcome::Err(format!("inference failed: {}", plain(&e))));
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
            Err(e) => outcomes[i] = Some(Outcome::Err(plain(&e))),
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

/// The message of an error without the backtrace candle attaches when `RUST_BACKTRACE` is set.
fn plain(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => plain(inner),
        candle_core::Error::Context { inner, context } => format!("{context}: {}", plain(inner)),
        other => other.to_string(),
    }
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
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {}", plain(&e));
            ExitCode::from(1)
        }
    }
}
