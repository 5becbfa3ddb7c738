//! Fine-tune an InternImage checkpoint on an image folder (`root/<class>/*.jpg|png|...`).
//!
//! ```text
//! cargo run --release --example finetune -- --data flowers/ --epochs 5 --output runs/flowers
//! cargo run --release --example finetune -- --data flowers/ --freeze-backbone --lr 1e-3
//! cargo run --release --example finetune -- --data flowers/ --resume runs/flowers
//! cargo run --release --example classify -- --weights runs/flowers/model.safetensors \
//!     --config runs/flowers/config.json --labels runs/flowers/labels.txt photo.jpg
//! ```
//!
//! The classes are the sub-directories of `--data` (sorted by name); a seeded shuffle puts
//! `--val-fraction` of each class into the validation split. Training images get a random
//! resized crop (scale 0.08-1, aspect 3/4-4/3, bicubic) and a horizontal flip, validation images
//! the official evaluation transform. The head is replaced by one with as many outputs as there
//! are classes; AdamW (weight decay 0.05) with a linear warm-up and a cosine schedule, label
//! smoothing, stochastic depth `--drop-path`. After every epoch the validation accuracy is
//! printed and `--output` receives `model.safetensors` + `config.json` (official key layout,
//! read by `classify --weights --config` and `InternImage::from_checkpoint`), `labels.txt` (one
//! class name per line, for `classify --labels`) and `state.json` (epochs done). `--resume DIR`
//! continues from such a directory and keeps saving there (unless `--output` names another): the
//! weights, config and epoch count come back; the classes come from `--data` again and must be
//! as many as the saved head has; the AdamW moments start afresh (they are not saved).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Optimizer, ParamsAdamW};
use clap::Parser;
use image::imageops::FilterType;
use indicatif::{ProgressBar, ProgressStyle};
use internimage::zoo::{self, PreprocessConfig};
use internimage::AdamW;
use internimage::{preprocess, Config, InternImage, TrainOptions, Trainable, TrainableModel};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// finetune: fine-tune InternImage on an image folder (root/<class>/*.jpg)
#[derive(Debug, Parser)]
#[command(
    name = "finetune",
    override_usage = "cargo run --release --example finetune -- --data DIR [OPTIONS]"
)]
struct Args {
    /// image folder: one sub-directory per class
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// zoo model giving the architecture; its weights are downloaded from the Hub unless
    /// --weights is given
    #[arg(long, value_name = "NAME", default_value = "internimage_t_1k_224")]
    model: String,
    /// local checkpoint to start from (.pth, .safetensors, index json)
    #[arg(long, value_name = "PATH")]
    weights: Option<PathBuf>,
    /// config.json with the architecture of --weights (default: --model's)
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// continue a run saved by this example in DIR (weights, config, epochs done); it keeps
    /// saving there unless --output says otherwise
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// where to save after each epoch [default: the --resume DIR, else runs/finetune]
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,
    /// epochs
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = at_least_one)]
    epochs: usize,
    /// images per step
    #[arg(long, value_name = "B", default_value_t = 16, value_parser = at_least_one)]
    batch_size: usize,
    /// peak learning rate (try 1e-3 with --freeze-backbone)
    #[arg(long, value_name = "LR", default_value_t = 1e-4)]
    lr: f64,
    /// linear warm-up length in epochs
    #[arg(long, value_name = "W", default_value_t = 1.0)]
    warmup_epochs: f64,
    /// AdamW weight decay
    #[arg(long, value_name = "WD", default_value_t = 0.05)]
    weight_decay: f64,
    /// label smoothing, in [0, 1)
    #[arg(long, value_name = "E", default_value_t = 0.1, value_parser = unit_interval)]
    label_smoothing: f64,
    /// stochastic depth rate
    #[arg(long, value_name = "R", default_value_t = 0.1)]
    drop_path: f64,
    /// training and evaluation resolution (default: the model's)
    #[arg(long, value_name = "S")]
    size: Option<u32>,
    /// share of each class held out for validation, in [0, 1)
    #[arg(long, value_name = "F", default_value_t = 0.2, value_parser = unit_interval)]
    val_fraction: f64,
    /// train only the head (conv head / CLIP projector and classifier)
    #[arg(long)]
    freeze_backbone: bool,
    /// seed of the split, shuffle and augmentation (the new head's initial weights are not
    /// seeded)
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,
    /// f32 | bf16
    #[arg(long, value_name = "T", default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
}

/// `--epochs`, `--batch-size`: at least 1.
fn at_least_one(v: &str) -> std::result::Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("must be an integer of at least 1, got {v:?}")),
    }
}

/// `--val-fraction`, `--label-smoothing`: a number in [0, 1).
fn unit_interval(v: &str) -> std::result::Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if (0.0..1.0).contains(&x) => Ok(x),
        _ => Err(format!("must be a number in [0, 1), got {v:?}")),
    }
}

/// `--dtype`: f32 | bf16.
fn parse_dtype(v: &str) -> std::result::Result<DType, String> {
    match v {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        other => Err(format!("expected f32 or bf16, got {other:?}")),
    }
}

/// Image files with their class index.
type Items = Vec<(PathBuf, usize)>;

/// The class folders of `root` (sorted) and every image file of each, as (path, class).
fn scan_folder(root: &Path) -> Result<(Vec<String>, Items)> {
    let read = |dir: &Path| {
        std::fs::read_dir(dir).map_err(|e| {
            candle_core::Error::msg(format!("cannot read directory {}: {e}", dir.display()))
        })
    };
    let mut classes: Vec<(String, PathBuf)> = read(root)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .map(|p| {
            (
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
                p,
            )
        })
        .collect();
    classes.sort();
    let exts = ["png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff"];
    let mut items = Vec::new();
    for (c, (_, dir)) in classes.iter().enumerate() {
        let mut files: Vec<PathBuf> = read(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| exts.contains(&e.to_ascii_lowercase().as_str()))
            })
            .collect();
        files.sort();
        items.extend(files.into_iter().map(|f| (f, c)));
    }
    if classes.len() < 2 || items.is_empty() {
        candle_core::bail!(
            "{}: expected at least two class sub-directories with images (root/<class>/*.jpg)",
            root.display()
        );
    }
    Ok((classes.into_iter().map(|(n, _)| n).collect(), items))
}

/// Seeded per-class split: (train, val); every class keeps at least one training image.
fn split(
    items: &[(PathBuf, usize)],
    classes: usize,
    fraction: f64,
    rng: &mut StdRng,
) -> (Items, Items) {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for c in 0..classes {
        let mut of_class: Vec<_> = items.iter().filter(|(_, k)| *k == c).cloned().collect();
        of_class.shuffle(rng);
        let n_val = ((of_class.len() as f64 * fraction).round() as usize)
            .min(of_class.len().saturating_sub(1));
        val.extend(of_class.drain(..n_val));
        train.extend(of_class);
    }
    (train, val)
}

/// Random resized crop (scale 0.08-1, log-uniform aspect 3/4-4/3, bicubic) and a random flip.
fn augment(path: &Path, size: u32, pre: &PreprocessConfig, rng: &mut StdRng) -> Result<Tensor> {
    let img = preprocess::to_rgb8(&preprocess::decode_image(path)?);
    let (w, h) = (img.width() as f64, img.height() as f64);
    let mut window = (0, 0, img.width(), img.height());
    for _ in 0..10 {
        let area = w * h * rng.random_range(0.08..=1.0);
        let ratio = rng
            .random_range((3f64 / 4.0).ln()..=(4f64 / 3.0).ln())
            .exp();
        let (cw, ch) = ((area * ratio).sqrt().round(), (area / ratio).sqrt().round());
        if cw >= 1.0 && ch >= 1.0 && cw <= w && ch <= h {
            let x = rng.random_range(0..=(w - cw) as u32);
            let y = rng.random_range(0..=(h - ch) as u32);
            window = (x, y, cw as u32, ch as u32);
            break;
        }
    }
    let crop = image::imageops::crop_imm(&img, window.0, window.1, window.2, window.3).to_image();
    let mut out = image::imageops::resize(&crop, size, size, FilterType::CatmullRom);
    if rng.random_bool(0.5) {
        image::imageops::flip_horizontal_in_place(&mut out);
    }
    preprocess::rgb_to_tensor(&out, pre.mean, pre.std, &Device::Cpu)
}

/// Cross-entropy with label smoothing `eps` (mean over the batch), computed in f32.
fn smoothed_cross_entropy(logits: &Tensor, targets: &Tensor, eps: f64) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let nll = logp
        .gather(&targets.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?
        .mean_all()?;
    let uniform = logp.mean(D::Minus1)?.neg()?.mean_all()?;
    (nll * (1.0 - eps))? + (uniform * eps)?
}

/// Learning rate at `step` of `total`: linear warm-up over `warmup` steps, then cosine to 0.
fn lr_at(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let t = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    0.5 * peak * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
}

/// Validation accuracy (top-1) of `model` on `items` with the evaluation transform.
fn evaluate(
    model: &InternImage,
    items: &[(PathBuf, usize)],
    pre: &PreprocessConfig,
    batch: usize,
) -> Result<f64> {
    let mut correct = 0usize;
    for chunk in items.chunks(batch) {
        let imgs: Vec<Tensor> = chunk
            .iter()
            .map(|(p, _)| preprocess::load_image(p, pre, model.device()))
            .collect::<Result<_>>()?;
        let pred = model
            .forward_t(&Tensor::stack(&imgs, 0)?, false)?
            .argmax(D::Minus1)?
            .to_vec1::<u32>()?;
        correct += pred
            .iter()
            .zip(chunk)
            .filter(|(p, (_, c))| **p as usize == *c)
            .count();
    }
    Ok(correct as f64 / items.len().max(1) as f64)
}

/// Loads the starting model: a resumed run, local weights, or the zoo checkpoint from the Hub.
fn load_model(a: &Args, classes: usize, device: &Device) -> Result<(TrainableModel, usize)> {
    let trainable = if a.freeze_backbone {
        Trainable::Head
    } else {
        Trainable::All
    };
    let mut options = TrainOptions {
        trainable,
        num_classes: Some(classes),
        drop_path_rate: Some(a.drop_path),
    };
    if let Some(dir) = &a.resume {
        let cfg = Config::from_file(dir.join("config.json"))?;
        if cfg.num_classes != classes {
            candle_core::bail!(
                "--resume {}: the saved head has {} classes, the data folder {classes}",
                dir.display(),
                cfg.num_classes
            );
        }
        options.num_classes = None;
        let done = std::fs::read_to_string(dir.join("state.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["epochs_done"].as_u64())
            .unwrap_or(0) as usize;
        let files = [dir.join("model.safetensors")];
        return Ok((
            InternImage::trainable(&cfg, &files, &options, a.dtype, device)?,
            done,
        ));
    }
    let cfg = match &a.config {
        Some(p) => Config::from_file(p)?,
        None => zoo::get(&a.model)?.config(),
    };
    let files = match &a.weights {
        Some(p) => vec![p.clone()],
        None => fetch_weights(&a.model)?,
    };
    Ok((
        InternImage::trainable(&cfg, &files, &options, a.dtype, device)?,
        0,
    ))
}

#[cfg(feature = "hub")]
fn fetch_weights(name: &str) -> Result<Vec<PathBuf>> {
    let hub = internimage::hub::Hub::new(internimage::hub::HubOptions::from_env())?;
    // The same resolution as from_pretrained (safetensors, pytorch_model.bin, the release .pth).
    Ok(hub.fetch_model(name)?.weights)
}

#[cfg(not(feature = "hub"))]
fn fetch_weights(name: &str) -> Result<Vec<PathBuf>> {
    candle_core::bail!("--model {name} needs the `hub` feature to download weights; pass --weights")
}

fn run(a: &Args) -> Result<()> {
    let device = Device::Cpu;
    let (classes, items) = scan_folder(&a.data)?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let (train, val) = split(&items, classes.len(), a.val_fraction, &mut rng);
    let (tm, epochs_done) = load_model(a, classes.len(), &device)?;
    let size = a
        .size
        .unwrap_or_else(|| zoo::get(&a.model).map_or(224, |e| e.preprocess.crop_size));
    let pre = PreprocessConfig::imagenet(size);
    println!(
        "{} classes, {} train / {} val images, {} trainable tensors, size {size}",
        classes.len(),
        train.len(),
        val.len(),
        tm.trainable_names().len()
    );
    let output = a
        .output
        .clone()
        .or_else(|| a.resume.clone())
        .unwrap_or_else(|| PathBuf::from("runs/finetune"));
    std::fs::create_dir_all(&output)
        .map_err(|e| candle_core::Error::msg(format!("cannot create {}: {e}", output.display())))?;
    let steps_per_epoch = train.len().div_ceil(a.batch_size);
    let total = steps_per_epoch * a.epochs;
    let warmup = (a.warmup_epochs * steps_per_epoch as f64) as usize;
    let mut opt = AdamW::new(
        tm.vars(),
        ParamsAdamW {
            lr: a.lr,
            weight_decay: a.weight_decay,
            ..Default::default()
        },
    )?;
    let model = tm.model();
    for epoch in epochs_done..a.epochs {
        let bar = ProgressBar::new(steps_per_epoch as u64);
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
                .map_err(|e| candle_core::Error::msg(e.to_string()))?
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{}/{}", epoch + 1, a.epochs));
        let mut order = train.clone();
        order.shuffle(&mut rng);
        let (mut loss_sum, mut seen, start) = (0f64, 0usize, Instant::now());
        for (i, chunk) in order.chunks(a.batch_size).enumerate() {
            let step = epoch * steps_per_epoch + i;
            opt.set_learning_rate(lr_at(step, total, warmup, a.lr));
            let imgs: Vec<Tensor> = chunk
                .iter()
                .map(|(p, _)| augment(p, size, &pre, &mut rng))
                .collect::<Result<_>>()?;
            let targets: Vec<u32> = chunk.iter().map(|(_, c)| *c as u32).collect();
            let targets = Tensor::new(targets.as_slice(), &device)?;
            let logits = model.forward_t(&Tensor::stack(&imgs, 0)?, true)?;
            let loss = smoothed_cross_entropy(&logits, &targets, a.label_smoothing)?;
            opt.backward_step(&loss)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            seen += chunk.len();
            bar.set_message(format!(
                "loss {:.4}  {:.1} img/s",
                loss_sum / seen as f64,
                seen as f64 / start.elapsed().as_secs_f64()
            ));
            bar.inc(1);
        }
        bar.finish();
        let acc = evaluate(model, &val, &pre, a.batch_size)?;
        println!(
            "epoch {}: train loss {:.4}, val accuracy {:.1}%",
            epoch + 1,
            loss_sum / seen.max(1) as f64,
            100.0 * acc
        );
        tm.save(&output)?;
        let write = |name: &str, text: String| {
            let p = output.join(name);
            std::fs::write(&p, text)
                .map_err(|e| candle_core::Error::msg(format!("cannot write {}: {e}", p.display())))
        };
        write("labels.txt", classes.join("\n") + "\n")?;
        write(
            "state.json",
            serde_json::json!({
                "epochs_done": epoch + 1,
                "train_loss": loss_sum / seen.max(1) as f64,
                "val_accuracy": acc,
            })
            .to_string(),
        )?;
    }
    println!("saved to {}", output.display());
    Ok(())
}

fn main() -> ExitCode {
    // Candle runs its own elementwise ops (among them the gradient sums of every backward) on a
    // thread pool of its own beside rayon's (which runs this crate's kernels): its workers spin
    // after each op, taking a core from the training kernels, or, parked, make the calling
    // thread wait for their wake-up at every op. Running those ops on the calling thread
    // (`CANDLE_NUM_THREADS=1`; they are memory-bound passes) made a training step of
    // InternImage-T ~5% faster than parked workers and ~10% faster than the default on a
    // 2-core machine (README, "Training speed"); this crate's kernels still use every core.
    // Set before any thread starts; a value the user set wins.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Keep freed activations' memory for the next step instead of faulting it in again (glibc;
    // a no-op elsewhere): ~7% less CPU time per step (README, "Training speed").
    internimage::memory::retain_freed_memory();
    // Bad arguments: clap prints the error and exits with status 2; --help exits with 0.
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("finetune: {}", internimage::error::user_message(&e));
            ExitCode::FAILURE
        }
    }
}
