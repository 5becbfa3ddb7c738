//! CPU speed and peak memory of InternImage-T (and FlashInternImage-T, `flash_*` cases) with
//! random weights.
//!
//! `cargo bench --bench model` (optionally `-- <case substring>...`). Every case runs in a fresh
//! subprocess of this binary, so the peak RSS (`VmHWM`) is per case. Times are medians after
//! warm-up. The `reference` rows run the same network with `INTERNIMAGE_REFERENCE_OPS=1`, i.e.
//! candle's own `gelu_erf` and grouped `conv2d` instead of this crate's CPU kernels: the speed-up
//! column is measured against that same-run baseline. The `op:` rows time single operators at
//! InternImage-T shapes (candle's op vs ours). `train_t224_b8` times one training step (forward
//! in training mode, cross-entropy, backward, AdamW) with every parameter a `Var`.
//! `callers_t224` measures images/s of InternImage-T 224 when 1, 2 and 4 caller threads share one
//! `Arc<InternImage>`, each running batch-1 forwards in a loop for a fixed time
//! (`BENCH_CALLERS_SECS`, default 8 s per setting), and the ratio to 1 caller: whether
//! concurrent callers add throughput or fight over the same rayon pool (oversubscription).
//! `gemm` gives the GFLOP/s of the packed linear layer (`ops::Linear`, f32 input and output,
//! bias) at InternImage-T shapes for each GEMM kernel the CPU has: f32 weights, bf16 weights on
//! AVX512_BF16 (`VDPBF16PS`) and bf16 weights on AMX (`TDPBF16PS`). The `_bf16_avx512bf16`
//! cases run the bf16 network with the kernels capped at AVX512_BF16 (no AMX). The `_retain`
//! cases (`t224_b1_retain`, `t224_b8_retain`, `flash_t224_b1_retain`, `flash_t224_b8_retain`)
//! run after `internimage::memory::retain_freed_memory()`, as a serving loop would (freed
//! buffers kept by the allocator instead of mapped and faulted in again each forward).
//!
//! With `BENCH_ANCHOR_PYTHON=<a python with onnxruntime>` the bench instead runs the speed
//! anchor (ConvNeXt-T in ONNX Runtime, `../shared/anchors/ort_convnext_tiny.py`) and the model
//! cases alternately for `BENCH_ROUNDS` rounds (default 3; cases T and FlashInternImage-T 224 at
//! batch 1 and 8, or those matching the arguments) and prints each case's ratio to the anchor
//! run of its own round, and the medians. With `BENCH_TORCH_PYTHON=<a python with torch>` it
//! runs our training step and the PyTorch reference step (`benches/torch_reference/`) in ABBA
//! rounds and prints the time and peak-memory ratios.

use candle_core::{DType, Device, Module, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use internimage::{Config, InternImage};
use std::process::Command;
use std::time::Instant;

/// Random weights of a sensible scale: N(0, 0.02) matrices and biases, unit norm scales, zero
/// BatchNorm means and unit variances. (Zeros would make the DCNv3 offsets trivial.)
struct RandomWeights;

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let t = if leaf == "running_var" {
            Tensor::ones(s, DType::F32, dev)?
        } else if leaf == "running_mean" || leaf == "num_batches_tracked" {
            Tensor::zeros(s, DType::F32, dev)?
        } else if s.rank() == 1 && (leaf == "weight" || leaf.starts_with("gamma")) {
            Tensor::ones(s, DType::F32, dev)?
        } else {
            Tensor::randn(0f32, 0.02, s, dev)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights: {name} requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

fn vb() -> VarBuilder<'static> {
    vb_of(DType::F32)
}

fn vb_of(dtype: DType) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights), dtype, Device::Cpu)
}

/// [`RandomWeights`] as trainable `Var`s (floating parameters; BatchNorm statistics stay
/// constants), collected for the optimiser.
#[derive(Default)]
struct RandomVars {
    vars: std::sync::Arc<std::sync::Mutex<Vec<candle_core::Var>>>,
}

impl candle_nn::var_builder::SimpleBackend for RandomVars {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = RandomWeights.get(s, name, h, dtype, dev)?;
        if name.contains("running_") || name.ends_with("num_batches_tracked") {
            return Ok(t);
        }
        let v = candle_core::Var::from_tensor(&t)?;
        let out = v.as_tensor().clone();
        self.vars
            .lock()
            .map_err(|_| candle_core::Error::msg("poisoned"))?
            .push(v);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights: {name} requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// One training step of InternImage-T at 224, batch 8, f32: forward in training mode (drop
/// path 0.1 as the official T fine-tune), cross-entropy, backward, AdamW update. Prints
/// `RESULT train_t224_b8 <ms/img> <img/s> <rss MiB>` (one step = 8 images).
fn run_train_case(name: &str) -> Result<()> {
    use candle_nn::Optimizer;
    // As examples/finetune.rs: freed activations' memory is kept for the next step.
    internimage::memory::retain_freed_memory();
    let batch = 8;
    let cfg = Config {
        drop_path_rate: 0.1,
        ..Config::t()
    };
    let backend = RandomVars::default();
    let vars = backend.vars.clone();
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    let model = InternImage::new(&cfg, vb)?;
    let vars = vars
        .lock()
        .map_err(|_| candle_core::Error::msg("poisoned"))?
        .clone();
    let mut opt = internimage::AdamW::new_lr(vars, 1e-4)?;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), &Device::Cpu)?;
    let targets = Tensor::arange(0u32, batch as u32, &Device::Cpu)?;
    if std::env::var_os("TRAIN_PARTS").is_some() {
        for _ in 0..2 {
            let t0 = Instant::now();
            let logits = model.forward_t(&x, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            opt.step(&grads)?;
            eprintln!(
                "forward {:.0} ms, backward {:.0} ms, step {:.0} ms",
                (t1 - t0).as_secs_f64() * 1e3,
                (t2 - t1).as_secs_f64() * 1e3,
                t2.elapsed().as_secs_f64() * 1e3
            );
        }
    }
    let secs = time_it(1, 3, || {
        let logits = model.forward_t(&x, true)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &targets)?;
        opt.backward_step(&loss)
    })?;
    let per_img = secs / batch as f64;
    println!(
        "RESULT {name} {:.2} {:.2} {:.1}",
        per_img * 1e3,
        1.0 / per_img,
        peak_rss_mib()
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Peak resident set (VmHWM) of this process in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// CPU time consumed so far by all threads of this process, in seconds.
fn cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// When `BENCH_CPU_TIME` is set, `time_it` reports process CPU time instead of wall time (useful
/// single-threaded on a busy machine, where wall time mostly measures the other processes).
fn use_cpu_time() -> bool {
    std::env::var_os("BENCH_CPU_TIME").is_some()
}

/// Runs `f` `warm` + `runs` times; returns the median seconds of the timed runs.
fn time_it(warm: usize, runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warm {
        f()?;
    }
    let cpu = use_cpu_time();
    let mut ts = Vec::with_capacity(runs);
    for _ in 0..runs {
        let (t, c) = (Instant::now(), if cpu { cpu_secs() } else { 0.0 });
        f()?;
        ts.push(if cpu {
            cpu_secs() - c
        } else {
            t.elapsed().as_secs_f64()
        });
    }
    Ok(median(ts))
}

struct Case {
    name: &'static str,
    /// Run with candle's generic ops instead of ours.
    reference: bool,
    /// Cap the kernels at this instruction set (`INTERNIMAGE_ISA`; the case is skipped when the
    /// CPU lacks it).
    isa: Option<&'static str>,
    what: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "t224_b1",
        reference: false,
        isa: None,
        what: "T, 224x224, batch 1, logits",
    },
    Case {
        name: "t224_b8",
        reference: false,
        isa: None,
        what: "T, 224x224, batch 8, logits",
    },
    Case {
        name: "t224_b1_retain",
        reference: false,
        isa: None,
        what: "T, 224x224, batch 1, logits, after memory::retain_freed_memory() (a serving loop's allocator setting)",
    },
    Case {
        name: "t224_b8_retain",
        reference: false,
        isa: None,
        what: "T, 224x224, batch 8, logits, after memory::retain_freed_memory() (a serving loop's allocator setting)",
    },
    Case {
        name: "t224_b1_nospin",
        reference: false,
        isa: None,
        what: "T, 224x224, batch 1, logits, workers sleeping between operators (INTERNIMAGE_SPIN_WAIT=0)",
    },
    Case {
        name: "flash_t224_b1",
        reference: false,
        isa: None,
        what: "FlashInternImage-T, 224x224, batch 1, logits",
    },
    Case {
        name: "flash_t224_b8",
        reference: false,
        isa: None,
        what: "FlashInternImage-T, 224x224, batch 8, logits",
    },
    Case {
        name: "flash_t224_b1_retain",
        reference: false,
        isa: None,
        what: "FlashInternImage-T, 224x224, batch 1, logits, after memory::retain_freed_memory()",
    },
    Case {
        name: "flash_t224_b8_retain",
        reference: false,
        isa: None,
        what: "FlashInternImage-T, 224x224, batch 8, logits, after memory::retain_freed_memory()",
    },
    Case {
        name: "t512_backbone_b1",
        reference: false,
        isa: None,
        what: "T backbone, 512x512, batch 1, 4 stages",
    },
    Case {
        name: "t224_b1_avx2",
        reference: false,
        isa: Some("avx2"),
        what: "T, 224x224, batch 1, logits, kernels capped at AVX2",
    },
    Case {
        name: "t224_b8_avx2",
        reference: false,
        isa: Some("avx2"),
        what: "T, 224x224, batch 8, logits, kernels capped at AVX2",
    },
    Case {
        name: "t224_b1_bf16",
        reference: false,
        isa: None,
        what: "T, 224x224, batch 1, logits, bf16 model (bf16 GEMM weights and f32 activations with AVX512_BF16/AMX, else bf16 throughout with f32 compute)",
    },
    Case {
        name: "t224_b8_bf16",
        reference: false,
        isa: None,
        what: "T, 224x224, batch 8, logits, bf16 model (as t224_b1_bf16)",
    },
    Case {
        name: "t224_b1_bf16_avx512bf16",
        reference: false,
        isa: Some("avx512bf16"),
        what: "T, 224x224, batch 1, logits, bf16, kernels capped at AVX512_BF16 (no AMX)",
    },
    Case {
        name: "t224_b8_bf16_avx512bf16",
        reference: false,
        isa: Some("avx512bf16"),
        what: "T, 224x224, batch 8, logits, bf16, kernels capped at AVX512_BF16 (no AMX)",
    },
    Case {
        name: "gemm",
        reference: false,
        isa: None,
        what: "packed linear GFLOP/s at T shapes: f32, bf16 VDPBF16PS, bf16 AMX",
    },
    Case {
        name: "t224_b1_portable",
        reference: false,
        isa: Some("portable"),
        what: "T, 224x224, batch 1, logits, portable kernels (no SIMD extension)",
    },
    Case {
        name: "t224_b1_reference",
        reference: true,
        isa: None,
        what: "T, 224, batch 1, candle gelu_erf + grouped conv2d",
    },
    Case {
        name: "t224_b8_reference",
        reference: true,
        isa: None,
        what: "T, 224, batch 8, candle gelu_erf + grouped conv2d",
    },
    Case {
        name: "train_t224_b8",
        reference: false,
        isa: None,
        what: "T, 224, batch 8, one training step (forward, backward, AdamW)",
    },
    Case {
        name: "train_t224_b8_nospin",
        reference: false,
        isa: None,
        what: "the training step with CANDLE_BARRIER_POOL_SPIN_LIMIT=0",
    },
    Case {
        name: "train_t224_b8_candle1",
        reference: false,
        isa: None,
        what: "the training step with CANDLE_NUM_THREADS=1 (as examples/finetune.rs sets it)",
    },
    Case {
        name: "callers_t224",
        reference: false,
        isa: None,
        what: "T, 224, batch 1, 1/2/4 caller threads sharing one Arc<InternImage>",
    },
    Case {
        name: "ops",
        reference: false,
        isa: None,
        what: "single operators, candle vs ours",
    },
    Case {
        name: "breakdown",
        reference: false,
        isa: None,
        what: "T 224 batch 1 forward rebuilt from the crate ops, timed alone",
    },
];

/// One model case in this process: prints `RESULT <name> <ms/img> <img/s> <rss MiB>`.
fn run_model_case(name: &str) -> Result<()> {
    if name.ends_with("_retain") {
        // As a serving loop would: freed activations' memory kept for the next forward.
        internimage::memory::retain_freed_memory();
    }
    let base = [
        "_reference",
        "_avx2",
        "_portable",
        "_avx512bf16",
        "_bf16",
        "_retain",
        "_nospin",
    ]
    .iter()
    .fold(name, |n, s| n.trim_end_matches(s));
    let flash = base.starts_with("flash_");
    let (size, batch, backbone) = match base.trim_start_matches("flash_") {
        "t224_b1" => (224, 1, false),
        "t224_b8" => (224, 8, false),
        "t512_backbone_b1" => (512, 1, true),
        other => candle_core::bail!("unknown case {other}"),
    };
    let cfg = if flash {
        Config::flash_t()
    } else {
        Config::t()
    };
    let dtype = if name.contains("_bf16") {
        DType::BF16
    } else {
        DType::F32
    };
    let x = Tensor::randn(0f32, 1.0, (batch, 3, size, size), &Device::Cpu)?.to_dtype(dtype)?;
    let (warm, runs) = match (name.ends_with("_reference"), batch) {
        (true, _) => (1, 3),
        (false, 1) => (3, 15),
        (false, _) => (2, 5),
    };
    let secs = if backbone {
        let m = InternImage::backbone(&cfg, &[0, 1, 2, 3], vb_of(dtype))?;
        time_it(warm, runs, || m.forward_features(&x).map(|_| ()))?
    } else {
        let m = InternImage::new(&cfg, vb_of(dtype))?;
        time_it(warm, runs, || {
            let y = m.forward(&x)?;
            if y.dims() != [batch, cfg.num_classes] {
                candle_core::bail!("unexpected logits shape {:?}", y.dims());
            }
            Ok(())
        })?
    };
    let per_img = secs / batch as f64;
    println!(
        "RESULT {name} {:.2} {:.2} {:.1}",
        per_img * 1e3,
        1.0 / per_img,
        peak_rss_mib()
    );
    Ok(())
}

/// Images/s of T 224 batch 1 with 1, 2 and 4 caller threads sharing one `Arc<InternImage>`, each
/// running forwards in a loop for a fixed time: prints `CALLERS <threads> <images/s> <images>`.
fn run_callers_case() -> Result<()> {
    use std::sync::{Arc, Barrier};
    use std::time::Duration;
    let secs: f64 = std::env::var("BENCH_CALLERS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&s: &f64| s > 0.0)
        .unwrap_or(8.0);
    let cfg = Config::t();
    let model = Arc::new(InternImage::new(&cfg, vb())?);
    for callers in [1usize, 2, 4] {
        let start = Arc::new(Barrier::new(callers + 1));
        let results = std::thread::scope(|scope| -> Result<(usize, f64)> {
            let handles: Vec<_> = (0..callers)
                .map(|i| {
                    let model = Arc::clone(&model);
                    let start = Arc::clone(&start);
                    scope.spawn(move || -> Result<usize> {
                        // Each caller has its own input; one warm-up forward before the clock.
                        let x = Tensor::randn(0f32, 1.0, (1, 3, 224, 224), &Device::Cpu)?
                            .affine(1.0, i as f64 * 1e-3)?;
                        model.forward(&x)?;
                        start.wait();
                        let deadline = Instant::now() + Duration::from_secs_f64(secs);
                        let mut n = 0usize;
                        while Instant::now() < deadline {
                            let y = model.forward(&x)?;
                            if y.dims() != [1, cfg.num_classes] {
                                candle_core::bail!("unexpected logits shape {:?}", y.dims());
                            }
                            n += 1;
                        }
                        Ok(n)
                    })
                })
                .collect();
            start.wait();
            let t0 = Instant::now();
            let mut total = 0usize;
            for h in handles {
                total += h
                    .join()
                    .map_err(|_| candle_core::Error::msg("a caller thread panicked"))??;
            }
            Ok((total, t0.elapsed().as_secs_f64()))
        })?;
        let (images, elapsed) = results;
        println!("CALLERS {callers} {:.3} {images}", images as f64 / elapsed);
    }
    Ok(())
}

/// Operator timings: prints `OP <label> <candle ms> <ours ms>`.
fn run_ops() -> Result<()> {
    use internimage::ops::depthwise::DepthwiseConv2dNhwc;
    let dev = Device::Cpu;
    // GELU on the stage-1 MLP hidden activations.
    let h = Tensor::randn(0f32, 2.0, (1, 56, 56, 256), &dev)?;
    let a = time_it(3, 20, || h.gelu_erf().map(|_| ()))?;
    let b = time_it(3, 20, || internimage::ops::gelu_erf(&h).map(|_| ()))?;
    println!("OP gelu_erf_56x56x256 {:.3} {:.3}", a * 1e3, b * 1e3);
    // fc1 + bias + GELU (stage 1): unfused candle vs fused.
    let x = Tensor::randn(0f32, 1.0, (1, 56, 56, 64), &dev)?;
    let lin = candle_nn::Linear::new(
        Tensor::randn(0f32, 0.1, (256, 64), &dev)?,
        Some(Tensor::randn(0f32, 0.1, 256, &dev)?),
    );
    let packed = internimage::ops::Linear::new(lin.weight().clone(), lin.bias().cloned())?;
    let a = time_it(3, 20, || lin.forward(&x)?.gelu_erf().map(|_| ()))?;
    let b = time_it(3, 20, || packed.forward_gelu(&x).map(|_| ()))?;
    println!("OP fc1+gelu_56x56x64->256 {:.3} {:.3}", a * 1e3, b * 1e3);
    // The whole MLP (fc1 + GELU + fc2): candle's linears + gelu_erf vs ops::mlp on packed layers.
    for (hw, c, batch) in [
        (56usize, 64usize, 1usize),
        (14, 256, 1),
        (56, 64, 8),
        (14, 256, 8),
    ] {
        let x = Tensor::randn(0f32, 1.0, (batch, hw, hw, c), &dev)?;
        let fc1 = candle_nn::Linear::new(
            Tensor::randn(0f32, 0.05, (4 * c, c), &dev)?,
            Some(Tensor::randn(0f32, 0.05, 4 * c, &dev)?),
        );
        let fc2 = candle_nn::Linear::new(
            Tensor::randn(0f32, 0.05, (c, 4 * c), &dev)?,
            Some(Tensor::randn(0f32, 0.05, c, &dev)?),
        );
        let a = time_it(2, 10, || {
            let h = fc1.forward(&x)?.gelu_erf()?;
            fc2.forward(&h).map(|_| ())
        })?;
        let p1 = internimage::ops::Linear::new(fc1.weight().clone(), fc1.bias().cloned())?;
        let p2 = internimage::ops::Linear::new(fc2.weight().clone(), fc2.bias().cloned())?;
        let b = time_it(2, 10, || internimage::ops::mlp(&x, &p1, &p2).map(|_| ()))?;
        println!(
            "OP mlp_b{batch}_{hw}x{hw}x{c}_(candle_vs_packed) {:.3} {:.3}",
            a * 1e3,
            b * 1e3
        );
    }
    // Stem conv2 and the first downsampling: NCHW conv2d with permutes vs the NHWC im2col+GEMM.
    for (hw, cin) in [(112usize, 32usize), (56, 64), (14, 256)] {
        let cout = 2 * cin;
        let x = Tensor::randn(0f32, 1.0, (1, hw, hw, cin), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (cout, cin, 3, 3), &dev)?;
        let conv = internimage::ops::Conv2dNhwc::new(&w, None, 2, 1)?;
        let a = time_it(2, 10, || {
            let y = x.permute((0, 3, 1, 2))?.conv2d(&w, 1, 2, 1, 1)?;
            y.permute((0, 2, 3, 1))?.contiguous().map(|_| ())
        })?;
        let b = time_it(2, 10, || conv.forward(&x).map(|_| ()))?;
        println!(
            "OP conv3x3s2_{hw}x{hw}x{cin}->{cout} {:.3} {:.3}",
            a * 1e3,
            b * 1e3
        );
    }
    // LayerNorm and the DCNv3 mask softmax at stage-1 and stage-3 shapes.
    for (hw, c, g) in [(56usize, 64usize, 4usize), (14, 256, 16)] {
        let x = Tensor::randn(0f32, 1.0, (1, hw, hw, c), &dev)?;
        let (lw, lb) = (
            Tensor::ones(c, DType::F32, &dev)?,
            Tensor::zeros(c, DType::F32, &dev)?,
        );
        let ln = candle_nn::LayerNorm::new(lw.clone(), lb.clone(), 1e-6);
        let a = time_it(3, 20, || ln.forward(&x).map(|_| ()))?;
        let b = time_it(3, 20, || {
            internimage::ops::layer_norm_last_dim(&x, &lw, &lb, 1e-6).map(|_| ())
        })?;
        println!("OP layernorm_{hw}x{hw}x{c} {:.3} {:.3}", a * 1e3, b * 1e3);
        let m = Tensor::randn(0f32, 1.0, (1, hw, hw, g * 9), &dev)?;
        let a = time_it(3, 20, || {
            let t = m.reshape((1, hw, hw, g, 9))?;
            candle_nn::ops::softmax_last_dim(&t)?
                .reshape((1, hw, hw, ()))
                .map(|_| ())
        })?;
        let b = time_it(3, 20, || {
            internimage::ops::softmax_groups(&m, 9).map(|_| ())
        })?;
        println!("OP softmax9_{hw}x{hw}x{g}x9 {:.3} {:.3}", a * 1e3, b * 1e3);
    }
    for (hw, c) in [(56usize, 64usize), (28, 128), (14, 256), (7, 512)] {
        let x = Tensor::randn(0f32, 1.0, (1, hw, hw, c), &dev)?;
        let w = Tensor::randn(0f32, 0.2, (c, 1, 3, 3), &dev)?;
        let bias = Tensor::randn(0f32, 0.2, c, &dev)?;
        let m = DepthwiseConv2dNhwc::new(&w, Some(&bias), 1)?;
        // The portable formulation: NHWC -> NCHW, grouped conv2d, back to NHWC.
        let a = time_it(1, 5, || {
            let y = x
                .permute((0, 3, 1, 2))?
                .contiguous()?
                .conv2d(&w, 1, 1, 1, c)?;
            y.broadcast_add(&bias.reshape((1, c, 1, 1))?)?
                .permute((0, 2, 3, 1))?
                .contiguous()
                .map(|_| ())
        })?;
        let b = time_it(5, 50, || m.forward(&x).map(|_| ()))?;
        println!("OP dwconv3x3_{hw}x{hw}x{c} {:.3} {:.3}", a * 1e3, b * 1e3);
    }
    Ok(())
}

/// Times every operator of one InternImage-T forward (224, batch 1) at its real shape, using
/// the same crate ops the network calls, and prints `BRK <category> <ms per forward>`
/// (operator time x number of uses).
fn run_breakdown() -> Result<()> {
    use internimage::ops::depthwise::DepthwiseConv2dNhwc;
    use internimage::ops::{
        dcnv3, gelu_erf, layer_norm_last_dim, mlp, softmax_groups, Conv2dNhwc, Dcnv3Config, Linear,
    };
    use std::collections::BTreeMap;
    let dev = Device::Cpu;
    // Batch size from BENCH_BREAKDOWN_BATCH (default 1); times are reported per image.
    let nb: usize = std::env::var("BENCH_BREAKDOWN_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let mut cat: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut add = |k: &'static str, secs: f64, times: usize| {
        *cat.entry(k).or_insert(0.0) += secs * 1e3 * times as f64 / nb as f64;
    };
    let (w, r) = (2, 9);
    let lin = |i: usize, o: usize| -> Result<Linear> {
        Linear::new(
            Tensor::randn(0f32, 0.02, (o, i), &dev)?,
            Some(Tensor::randn(0f32, 0.02, o, &dev)?),
        )
    };
    let ln = |x: &Tensor| -> Result<f64> {
        let c = x.dim(3)?;
        let (lw, lb) = (
            Tensor::ones(c, DType::F32, &dev)?,
            Tensor::zeros(c, DType::F32, &dev)?,
        );
        time_it(w, r, || layer_norm_last_dim(x, &lw, &lb, 1e-6).map(|_| ()))
    };
    let conv = |x: &Tensor, cout: usize| -> Result<(f64, Tensor)> {
        let cin = x.dim(3)?;
        let wt = Tensor::randn(0f32, 0.02, (cout, cin, 3, 3), &dev)?;
        let c = Conv2dNhwc::new(&wt, None, 2, 1)?;
        Ok((time_it(w, r, || c.forward(x).map(|_| ()))?, c.forward(x)?))
    };
    // Stem: conv 3->32 s2, LN, GELU, conv 32->64 s2, LN.
    let img = Tensor::randn(0f32, 1.0, (nb, 224, 224, 3), &dev)?;
    let (t, s1) = conv(&img, 32)?;
    add("conv 3x3 s2 (stem, downsample; NHWC im2col+GEMM)", t, 1);
    add("layernorm", ln(&s1)?, 1);
    add(
        "gelu (stem, offset branch)",
        time_it(w, r, || gelu_erf(&s1).map(|_| ()))?,
        1,
    );
    let (t, s2) = conv(&s1, 64)?;
    add("conv 3x3 s2 (stem, downsample; NHWC im2col+GEMM)", t, 1);
    add("layernorm", ln(&s2)?, 1);
    let cfg = Config::t();
    for i in 0..4 {
        let c = cfg.stage_channels(i);
        let hw = 56 >> i;
        let g = cfg.groups[i];
        let d = cfg.depths[i];
        let x = Tensor::randn(0f32, 1.0, (nb, hw, hw, c), &dev)?;
        add("layernorm", ln(&x)?, 3 * d);
        for (o, k) in [(c, 2), (g * 18, 1), (g * 9, 1)] {
            let l = lin(c, o)?;
            let t = time_it(w, r, || l.forward(&x).map(|_| ()))?;
            add("linear, DCNv3 (input, offset, mask, output)", t, k * d);
        }
        let l1 = lin(c, 4 * c)?;
        let l2 = lin(4 * c, c)?;
        add(
            "MLP (fc1 + GELU + fc2, ops::mlp)",
            time_it(w, r, || mlp(&x, &l1, &l2).map(|_| ()))?,
            d,
        );
        add(
            "gelu (stem, offset branch)",
            time_it(w, r, || gelu_erf(&x).map(|_| ()))?,
            d,
        );
        let dw = DepthwiseConv2dNhwc::new(&Tensor::randn(0f32, 0.2, (c, 1, 3, 3), &dev)?, None, 1)?;
        add(
            "depthwise conv",
            time_it(w, r, || dw.forward(&x).map(|_| ()))?,
            d,
        );
        let m = Tensor::randn(0f32, 1.0, (nb, hw, hw, g * 9), &dev)?;
        add(
            "softmax over the 9 points",
            time_it(w, r, || softmax_groups(&m, 9).map(|_| ()))?,
            d,
        );
        let off = (Tensor::randn(0f32, 1.0, (nb, hw, hw, g * 18), &dev)? * 0.5)?;
        let mask = softmax_groups(&m, 9)?;
        let dc = Dcnv3Config::internimage(g, c / g, 1.0);
        add(
            "dcnv3 core",
            time_it(w, r, || dcnv3(&x, &off, &mask, &dc).map(|_| ()))?,
            d,
        );
        add(
            "residual add (candle binary op; the network uses its own rayon kernel)",
            time_it(w, r, || (&x + &x).map(|_| ()))?,
            2 * d,
        );
        if i < 3 {
            let (t, y) = conv(&x, 2 * c)?;
            add("conv 3x3 s2 (stem, downsample; NHWC im2col+GEMM)", t, 1);
            add("layernorm", ln(&y)?, 1);
        }
    }
    // Head: 1x1 conv 512->768 (as a linear) + GELU, mean pool, Linear 768->1000.
    let x = Tensor::randn(0f32, 1.0, (nb, 7, 7, 512), &dev)?;
    let p = lin(512, 768)?;
    let fc = lin(768, 1000)?;
    add(
        "head",
        time_it(w, r, || {
            let y = p.forward_gelu(&x)?.reshape((nb, 49, 768))?.mean(1)?;
            fc.forward(&y).map(|_| ())
        })?,
        1,
    );
    for (k, v) in &cat {
        println!("BRK {} {v:.3}", k.replace(' ', "_"));
    }
    Ok(())
}

/// GFLOP/s of `ops::Linear` (f32 rows in and out, bias) per GEMM kernel at T shapes (m, k, n):
/// prints `GEMM <m>x<k>x<n> <f32> <bf16 VDPBF16PS> <bf16 AMX>` (`-` where the CPU lacks one).
fn run_gemm() -> Result<()> {
    use internimage::{Isa, KernelPolicy};
    let dev = Device::Cpu;
    for (m, k, n) in [
        (3136usize, 64usize, 256usize),
        (3136, 256, 64),
        (3136, 64, 64),
        (784, 128, 512),
        (784, 512, 128),
        (196, 256, 1024),
        (196, 1024, 256),
        (49, 512, 2048),
        (49, 2048, 512),
        (25088, 64, 256),
        (25088, 256, 64),
    ] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
        let b = Tensor::randn(0f32, 0.05, n, &dev)?;
        let flops = 2.0 * (m * n * k) as f64;
        let runs = (2e10 / flops).clamp(5.0, 200.0) as usize;
        let mut cols = Vec::new();
        for (isa, dtype) in [
            (Isa::detect(), DType::F32),
            (Isa::Avx512Bf16, DType::BF16),
            (Isa::Amx, DType::BF16),
        ] {
            if !isa.is_supported() {
                cols.push("-".to_string());
                continue;
            }
            let policy = KernelPolicy::with_isa(isa)?;
            let lin = internimage::ops::Linear::with_policy(
                w.to_dtype(dtype)?,
                Some(b.to_dtype(dtype)?),
                policy,
            )?;
            let t = time_it(3, runs, || lin.forward(&x).map(|_| ()))?;
            cols.push(format!("{:.1}", flops / t * 1e-9));
        }
        println!("GEMM {m}x{k}x{n} {}", cols.join(" "));
    }
    Ok(())
}

fn child(name: &str) -> Result<()> {
    if name == "gemm" {
        run_gemm()
    } else if name == "breakdown" {
        run_breakdown()
    } else if name == "ops" {
        run_ops()
    } else if name == "callers_t224" {
        run_callers_case()
    } else if name.starts_with("train_") {
        run_train_case(name)
    } else {
        run_model_case(name)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--case") {
        let Some(name) = args.get(i + 1) else {
            eprintln!("--case needs a name");
            std::process::exit(2);
        };
        if let Err(e) = child(name) {
            eprintln!("case {name} failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("cannot find the bench binary: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "InternImage-T CPU benchmark: {} threads (candle get_num_threads), f32 (bf16 rows: bf16), random N(0, 0.02) weights, kernels {} (CPU supports {:?}), {}",
        candle_core::utils::get_num_threads(),
        internimage::KernelPolicy::fast(),
        internimage::Isa::supported(),
        if use_cpu_time() { "CPU time of all threads (BENCH_CPU_TIME)" } else { "wall time" }
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine load average (1/5/15 min) at start: {} (other processes skew wall times)",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some(python) = std::env::var_os("BENCH_ANCHOR_PYTHON") {
        anchor_rounds(&exe, &python, &filters);
        return;
    }
    if let Some(python) = std::env::var_os("BENCH_TORCH_PYTHON") {
        torch_rounds(&exe, &python);
        return;
    }
    let mut results: Vec<(String, f64, f64, f64)> = Vec::new();
    let mut ops: Vec<(String, f64, f64)> = Vec::new();
    let mut brk: Vec<(String, f64)> = Vec::new();
    let mut callers: Vec<(usize, f64, usize)> = Vec::new();
    let mut gemms: Vec<String> = Vec::new();
    for case in CASES {
        if !filters.is_empty() && !filters.iter().any(|f| case.name.contains(f.as_str())) {
            continue;
        }
        eprintln!("running {} ({})", case.name, case.what);
        let Some(mut cmd) = case_command(&exe, case) else {
            continue;
        };
        let out = match cmd.output() {
            Ok(o) => o,
            Err(e) => {
                eprintln!("  failed to start: {e}");
                continue;
            }
        };
        if !out.status.success() {
            eprintln!("  failed: {}", String::from_utf8_lossy(&out.stderr));
            continue;
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| {
                f.get(i)
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(f64::NAN)
            };
            match f.first() {
                Some(&"RESULT") if f.len() == 5 => {
                    results.push((f[1].to_string(), num(2), num(3), num(4)))
                }
                Some(&"OP") if f.len() == 4 => ops.push((f[1].to_string(), num(2), num(3))),
                Some(&"BRK") if f.len() == 3 => brk.push((f[1].replace('_', " "), num(2))),
                Some(&"GEMM") if f.len() == 5 => gemms.push(format!(
                    "| {} | {} | {} | {} |",
                    f[1].replace('x', " x "),
                    f[2],
                    f[3],
                    f[4]
                )),
                Some(&"CALLERS") if f.len() == 4 => {
                    callers.push((num(1) as usize, num(2), num(3) as usize))
                }
                _ => {}
            }
        }
    }
    let find = |n: &str| results.iter().find(|r| r.0 == n).map(|r| r.1);
    if !results.is_empty() {
        println!();
        println!("| case | ms / image | images / s | peak RSS MiB | speed-up vs reference ops |");
        println!("|---|---:|---:|---:|---:|");
        for (name, ms, ips, rss) in &results {
            let base = find(&format!("{name}_reference"));
            let ratio = base.map_or(String::from("-"), |b| format!("{:.1}x", b / ms));
            println!("| {name} | {ms:.1} | {ips:.2} | {rss:.0} | {ratio} |");
        }
        if let Some(t) = find("train_t224_b8") {
            println!(
                "\ntraining step (T 224 batch 8): {:.0} ms per step",
                8.0 * t
            );
        }
        if let (Some(b1), Some(b8)) = (find("t224_b1"), find("t224_b8")) {
            println!("\nbatch 8 vs batch 1 throughput: {:.2}x", b1 / b8);
        }
        for b in ["b1", "b8"] {
            if let (Some(f32_ms), Some(bf16_ms)) =
                (find(&format!("t224_{b}")), find(&format!("t224_{b}_bf16")))
            {
                println!("bf16 / f32 images/s, 224 {b}: {:.2}x", f32_ms / bf16_ms);
            }
            if let (Some(f32_ms), Some(bf16_ms)) = (
                find(&format!("t224_{b}")),
                find(&format!("t224_{b}_bf16_avx512bf16")),
            ) {
                println!(
                    "bf16 (capped at AVX512_BF16, no AMX) / f32 images/s, 224 {b}: {:.2}x",
                    f32_ms / bf16_ms
                );
            }
        }
        for b in ["b1", "b8"] {
            if let (Some(v3), Some(v4)) =
                (find(&format!("t224_{b}")), find(&format!("flash_t224_{b}")))
            {
                println!(
                    "FlashInternImage-T / InternImage-T time, 224 {b}: {:.2}x",
                    v4 / v3
                );
            }
        }
    }
    if !ops.is_empty() {
        println!();
        println!("| operator (T shapes) | candle ms | ours ms | speed-up |");
        println!("|---|---:|---:|---:|");
        for (name, a, b) in &ops {
            println!("| {name} | {a:.3} | {b:.3} | {:.1}x |", a / b);
        }
    }
    if !gemms.is_empty() {
        println!();
        println!("| packed linear m x k x n (f32 in/out, bias) | f32 GFLOP/s | bf16 VDPBF16PS GFLOP/s | bf16 AMX GFLOP/s |");
        println!("|---|---:|---:|---:|");
        for row in &gemms {
            println!("{row}");
        }
    }
    if !callers.is_empty() {
        let one = callers.iter().find(|c| c.0 == 1).map(|c| c.1);
        println!();
        println!("| T 224 batch 1, caller threads sharing one Arc<InternImage> | images / s | images | vs 1 caller |");
        println!("|---|---:|---:|---:|");
        for (n, ips, images) in &callers {
            let ratio = one.map_or(String::from("-"), |o| format!("{:.2}x", ips / o));
            println!("| {n} | {ips:.2} | {images} | {ratio} |");
        }
    }
    if !brk.is_empty() {
        let total: f64 = brk.iter().map(|b| b.1).sum();
        brk.sort_by(|a, b| b.1.total_cmp(&a.1));
        println!();
        println!("| T 224 b1 forward, by operator type (timed alone x uses) | ms | share |");
        println!("|---|---:|---:|");
        for (k, v) in &brk {
            println!("| {k} | {v:.1} | {:.0}% |", 100.0 * v / total);
        }
        println!("| sum | {total:.1} | |");
    }
}

/// The command that runs `case` in its own process (`exe --case <name>` with the case's
/// environment), or `None` when the CPU lacks the instruction set the case caps the kernels at.
fn case_command(exe: &std::path::Path, case: &Case) -> Option<Command> {
    let mut cmd = Command::new(exe);
    cmd.args(["--case", case.name]);
    if case.reference {
        cmd.env("INTERNIMAGE_REFERENCE_OPS", "1");
    } else {
        cmd.env_remove("INTERNIMAGE_REFERENCE_OPS");
    }
    if case.name.ends_with("_nospin") {
        // Candle's pool for its own elementwise ops parks at once instead of spinning, and a
        // single-image forward lets rayon's workers sleep between operators
        // (`KernelPolicy::with_spin_wait(false)`).
        cmd.env("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
        cmd.env("INTERNIMAGE_SPIN_WAIT", "0");
    } else {
        cmd.env_remove("INTERNIMAGE_SPIN_WAIT");
    }
    if case.name.ends_with("_candle1") {
        // Candle's own elementwise ops run on the calling thread (no pool at all).
        cmd.env("CANDLE_NUM_THREADS", "1");
    }
    match case.isa {
        Some(name) => {
            let supported = internimage::Isa::parse(name).is_ok_and(|i| i.is_supported());
            if !supported {
                eprintln!("  skipped {}: this CPU has no {name}", case.name);
                return None;
            }
            cmd.env("INTERNIMAGE_ISA", name);
        }
        None => {
            cmd.env_remove("INTERNIMAGE_ISA");
        }
    }
    Some(cmd)
}

/// (ms per image, peak RSS MiB) of the first `RESULT <name> <ms> <images/s> <MiB>` line.
fn result_of(stdout: &[u8]) -> Option<(f64, f64)> {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().find(|l| l.starts_with("RESULT "))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    Some((f.get(2)?.parse().ok()?, f.get(4)?.parse().ok()?))
}

/// Runs `case` in its own process and returns its `RESULT` (ms per image, peak RSS MiB).
fn case_result(exe: &std::path::Path, case: &Case) -> Option<(f64, f64)> {
    let out = case_command(exe, case)?.output().ok()?;
    result_of(&out.stdout)
}

/// `BENCH_ROUNDS` (default 3).
fn rounds_setting() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(3)
}

/// Runs the ONNX Runtime anchor once: (batch 1, batch 8) ms per image.
fn anchor_ms(python: &std::ffi::OsStr, script: &str, threads: usize) -> Option<(f64, f64)> {
    let out = Command::new(python)
        .args([script, "--threads", &threads.to_string()])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("anchor failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // "convnext_tiny 224 batch 1: median 58.0 ms, min 54.4 ms, 58.0 ms/image"
    let per_image = |batch: &str| {
        let line = text.lines().find(|l| l.contains(batch))?;
        let head = line.strip_suffix("ms/image")?.trim_end();
        head.rsplit([' ', ',']).next()?.parse::<f64>().ok()
    };
    Some((per_image("batch 1:")?, per_image("batch 8:")?))
}

/// `BENCH_ANCHOR_PYTHON=<python with onnxruntime> cargo bench --bench model [-- cases]`: the
/// speed anchor (`../shared/anchors/ort_convnext_tiny.py`, or `BENCH_ANCHOR_SCRIPT`) and the
/// model cases alternately, `BENCH_ROUNDS` rounds (default 3): each round runs the anchor, then
/// each case in its own process, and each case is set against the anchor run of its own round at
/// the same batch size (this VM's speed drifts by tens of percent between minutes, so ratios
/// from one round are what compare). Prints every round and the median ratios.
fn anchor_rounds(exe: &std::path::Path, python: &std::ffi::OsStr, filters: &[&String]) {
    let script = std::env::var("BENCH_ANCHOR_SCRIPT").unwrap_or_else(|_| {
        format!(
            "{}/../shared/anchors/ort_convnext_tiny.py",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    let rounds = rounds_setting();
    let threads = candle_core::utils::get_num_threads();
    let default = ["t224_b1", "t224_b8", "flash_t224_b1", "flash_t224_b8"];
    // Forward cases only (a name with a batch size; not the reference ops).
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|c| c.name.contains("t224_b") && !c.name.starts_with("train_") && !c.reference)
        .filter(|c| {
            if filters.is_empty() {
                default.contains(&c.name)
            } else {
                filters.iter().any(|f| c.name.contains(f.as_str()))
            }
        })
        .collect();
    let names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    println!(
        "anchor: {script}, {threads} threads, {rounds} rounds; cases: {}",
        names.join(" ")
    );
    // Per case: (our ms per image, the round's anchor ms per image at the same batch).
    let mut pairs: Vec<Vec<(f64, f64)>> = vec![Vec::new(); cases.len()];
    for r in 1..=rounds {
        let Some((a1, a8)) = anchor_ms(python, &script, threads) else {
            eprintln!("round {r}: no anchor result; is onnxruntime installed for that python?");
            continue;
        };
        print!("round {r}: anchor {a1:.1} (b1) / {a8:.1} (b8) ms per image;");
        for (k, case) in cases.iter().enumerate() {
            let name = case.name;
            let anchor = if name.contains("_b8") { a8 } else { a1 };
            match case_result(exe, case) {
                Some((ms, _)) => {
                    print!(" {name} {ms:.1} ({:.2}x)", ms / anchor);
                    pairs[k].push((ms, anchor));
                }
                None => print!(" {name} failed"),
            }
        }
        println!();
    }
    println!();
    println!("| case | ms / image (median) | vs ORT ConvNeXt-T, round by round | median ratio |");
    println!("|---|---:|---|---:|");
    for (name, p) in names.iter().zip(&pairs) {
        if p.is_empty() {
            continue;
        }
        let ratios: Vec<f64> = p.iter().map(|(ms, a)| ms / a).collect();
        let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
        let ms: Vec<f64> = p.iter().map(|x| x.0).collect();
        println!(
            "| {name} | {:.1} | {} | {:.2}x |",
            median(ms),
            each.join(", "),
            median(ratios)
        );
    }
    for b in ["b1", "b8"] {
        let (t, f) = (format!("t224_{b}"), format!("flash_t224_{b}"));
        let (Some(ti), Some(fi)) = (
            names.iter().position(|c| *c == t),
            names.iter().position(|c| *c == f),
        ) else {
            continue;
        };
        let ratios: Vec<f64> = pairs[ti]
            .iter()
            .zip(&pairs[fi])
            .map(|(t, f)| f.0 / t.0)
            .collect();
        if !ratios.is_empty() {
            let each: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
            println!(
                "FlashInternImage-T / InternImage-T, 224 {b}: {} (median {:.2}x)",
                each.join(", "),
                median(ratios)
            );
        }
    }
}

/// `BENCH_TORCH_PYTHON=<a python with torch> cargo bench --bench model`: our training step
/// (`train_t224_b8_candle1`, as `examples/finetune.rs` runs it) against the PyTorch reference
/// step (`benches/torch_reference/train_step.py`, the official pure-PyTorch DCNv3 path, same
/// threads) in `BENCH_ROUNDS` ABBA rounds (ours, PyTorch, PyTorch, ours; each in its own
/// process), each of ours set against its neighbouring PyTorch run: prints the pairs, the
/// median time ratio and the peak-memory ratio (the gradients issue's target: <= 0.5x each).
fn torch_rounds(exe: &std::path::Path, python: &std::ffi::OsStr) {
    let script = format!(
        "{}/benches/torch_reference/train_step.py",
        env!("CARGO_MANIFEST_DIR")
    );
    let rounds = rounds_setting();
    let threads = candle_core::utils::get_num_threads();
    let Some(case) = CASES.iter().find(|c| c.name == "train_t224_b8_candle1") else {
        eprintln!("no training case");
        return;
    };
    let ours = || case_result(exe, case);
    let torch = || {
        let out = Command::new(python)
            .args([script.as_str(), "--threads", &threads.to_string()])
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "PyTorch step failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        result_of(&out.stdout)
    };
    println!("training step, T 224 batch 8, f32, {threads} threads: ours vs {script}, {rounds} ABBA rounds");
    let (mut time, mut mem) = (Vec::new(), Vec::new());
    for r in 1..=rounds {
        let (a, b, c, d) = (ours(), torch(), torch(), ours());
        let mut line = format!("round {r}:");
        for (o, t) in [(a, b), (d, c)] {
            match (o, t) {
                (Some(o), Some(t)) => {
                    line += &format!(
                        " ours {:.1} / PyTorch {:.1} ms per image = {:.2}x (RSS {:.0} / {:.0} MiB);",
                        o.0,
                        t.0,
                        o.0 / t.0,
                        o.1,
                        t.1
                    );
                    time.push(o.0 / t.0);
                    mem.push(o.1 / t.1);
                }
                _ => line += " a run failed;",
            }
        }
        println!("{line}");
    }
    if !time.is_empty() {
        let (within, pairs) = (time.iter().filter(|&&r| r <= 0.5).count(), time.len());
        println!(
            "time ours / PyTorch: median {:.2}x ({within} of {pairs} pairs <= 0.5x); peak RSS: median {:.2}x",
            median(time),
            median(mem)
        );
    }
}
