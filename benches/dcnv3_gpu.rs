//! CUDA timings (`cargo bench --features cuda --bench dcnv3_gpu`; prints a table, no assertions).
//!
//! * the DCNv3 core op, forward and backward, at the InternImage-T stage shapes (224 input) and at
//!   detection size (stage 1 of a 800x1344 image: 200x336, C = 64, G = 4), batch 1 and 16, in f32,
//!   f16 and bf16;
//! * InternImage-T and -B images per second at 224 (batch 32, random weights), f32 and bf16.
//!
//! Each measurement also goes to stdout as a `BENCH_JSON {...}` line for scripts/gpu_summary.py,
//! which sets our numbers next to torchvision's deform_conv2d and the grid_sample formulation
//! (scripts/gpu_torch_bench.py) measured on the same GPU. Options: `--quick` (fewer shapes).

#[cfg(feature = "cuda")]
mod bench {
    use candle_core::{DType, Device, Module, Result, Tensor};
    use internimage::ops::dcnv3::{dcnv3, dcnv3_backward};
    use internimage::{Config, Dcnv3Config, InternImage};
    use std::time::Instant;

    /// Median milliseconds of `f` (after warm-up), synchronising the device around each call.
    fn time_ms(dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        dev.synchronize()?;
        let mut v = Vec::new();
        let start = Instant::now();
        while v.len() < 5 || (v.len() < 50 && start.elapsed().as_secs_f64() < 0.5) {
            let t = Instant::now();
            f()?;
            dev.synchronize()?;
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        v.sort_by(|a, b| a.total_cmp(b));
        Ok(v[v.len() / 2])
    }

    fn op_row(
        dev: &Device,
        label: &str,
        n: usize,
        h: usize,
        w: usize,
        g: usize,
        dtype: DType,
    ) -> Result<()> {
        let cg = 16;
        let c = g * cg;
        let cfg = Dcnv3Config::internimage(g, cg, 1.0);
        let p = cfg.points();
        let x = Tensor::randn(0f32, 1.0, (n, h, w, c), dev)?.to_dtype(dtype)?;
        let off = Tensor::randn(0f32, 1.5, (n, h, w, g * p * 2), dev)?.to_dtype(dtype)?;
        let m = candle_nn::ops::softmax_last_dim(&Tensor::randn(0f32, 1.0, (n, h, w, g, p), dev)?)?
            .reshape((n, h, w, g * p))?
            .to_dtype(dtype)?;
        let fwd = time_ms(dev, || dcnv3(&x, &off, &m, &cfg).map(|_| ()))?;
        let go = Tensor::randn(0f32, 1.0, (n, h, w, c), dev)?.to_dtype(dtype)?;
        let bwd = time_ms(dev, || dcnv3_backward(&x, &off, &m, &go, &cfg).map(|_| ()))?;
        // Bytes the forward must move at least: input once, offsets, mask, output.
        let bytes = (2 * n * h * w * c + n * h * w * g * p * 3) * dtype.size_in_bytes();
        let gbs = bytes as f64 / (fwd * 1e-3) / 1e9;
        println!(
            "{label:<22} {n:>3} {h:>4}x{w:<4} C{c:<4} G{g:<3} {:<5} fwd {fwd:>9.4} ms ({gbs:>7.1} GB/s min traffic)  bwd {bwd:>9.4} ms",
            format!("{dtype:?}")
        );
        println!(
            "BENCH_JSON {{\"kind\":\"op\",\"label\":\"{label}\",\"n\":{n},\"h\":{h},\"w\":{w},\"c\":{c},\"g\":{g},\"dtype\":\"{dtype:?}\",\"fwd_ms\":{fwd},\"bwd_ms\":{bwd}}}"
        );
        Ok(())
    }

    fn model_row(dev: &Device, name: &str, dtype: DType, batch: usize) -> Result<()> {
        let cfg = Config::preset(name)?;
        let vb = candle_nn::VarBuilder::zeros(dtype, dev);
        let model = InternImage::new(&cfg, vb)?;
        let x = Tensor::randn(0f32, 1.0, (batch, 3, 224, 224), dev)?.to_dtype(dtype)?;
        let ms = time_ms(dev, || model.forward(&x).map(|_| ()))?;
        let ips = batch as f64 / (ms * 1e-3);
        println!(
            "InternImage-{name:<3} 224 batch {batch:<3} {:<5} {ms:>9.2} ms  {ips:>8.1} images/s",
            format!("{dtype:?}")
        );
        println!(
            "BENCH_JSON {{\"kind\":\"model\",\"model\":\"{name}\",\"batch\":{batch},\"dtype\":\"{dtype:?}\",\"ms\":{ms},\"images_per_s\":{ips}}}"
        );
        Ok(())
    }

    pub fn main() -> Result<()> {
        let quick = std::env::args().any(|a| a == "--quick");
        let dev = match Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                println!("dcnv3_gpu bench: no CUDA device ({e}); nothing measured");
                return Ok(());
            }
        };
        println!("== DCNv3 core op on CUDA (median of repeated calls, device synchronised)");
        let batches: &[usize] = if quick { &[1] } else { &[1, 16] };
        for &dtype in &[DType::F32, DType::F16, DType::BF16] {
            for &n in batches {
                for (i, (s, g)) in [(56, 4), (28, 8), (14, 16), (7, 32)].iter().enumerate() {
                    op_row(&dev, &format!("T stage{} 224", i + 1), n, *s, *s, *g, dtype)?;
                }
                op_row(&dev, "det stage1 800x1344", n, 200, 336, 4, dtype)?;
            }
        }
        println!("== InternImage at 224 (random weights)");
        for name in ["t", "b"] {
            for &dtype in &[DType::F32, DType::BF16] {
                model_row(&dev, name, dtype, if quick { 8 } else { 32 })?;
            }
        }
        Ok(())
    }
}

fn main() {
    #[cfg(feature = "cuda")]
    if let Err(e) = bench::main() {
        eprintln!("dcnv3_gpu bench failed: {e}");
        std::process::exit(1);
    }
    #[cfg(not(feature = "cuda"))]
    println!("dcnv3_gpu bench: built without the `cuda` feature; nothing to measure");
}
