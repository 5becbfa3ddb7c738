//! The CPU GEMM of this crate against the `gemm` crate (0.19, the one Candle uses) with its
//! AVX-512 micro-kernels (`x86-v4` feature, on in this crate's dependency: the training
//! kernels' weight gradients use it), at InternImage-T's
//! linear-layer shapes: `y (M x N) = x (M x K) @ w^T + b`.
//!
//! `cargo bench --bench gemm`. Rayon's global pool (all cores unless `RAYON_NUM_THREADS` says
//! otherwise); each
//! row is the median of 30 calls after 5 warm-up calls, in GFLOP/s (2 M N K flops per call).
//! Ours: the weight packed once when the layer is built (`internimage::ops::Linear`), the call
//! allocating its output tensor. `gemm` crate: a preallocated output, the weight read through a
//! transposed view and packed by the crate on each call (how Candle's matmul runs it).

use candle_core::{DType, Device, Module, Result, Tensor};
use internimage::{Isa, KernelPolicy};
use std::time::Instant;

fn median_secs(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..5 {
        f()?;
    }
    let mut ts = Vec::with_capacity(30);
    for _ in 0..30 {
        let t = Instant::now();
        f()?;
        ts.push(t.elapsed().as_secs_f64());
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[ts.len() / 2])
}

fn ours(x: &Tensor, w: &Tensor, b: &Tensor, policy: KernelPolicy) -> Result<f64> {
    let lin = internimage::ops::Linear::with_policy(w.clone(), Some(b.clone()), policy)?;
    if !lin.is_packed() {
        candle_core::bail!("the {policy} layer was not packed");
    }
    median_secs(|| lin.forward(x).map(|_| ()))
}

fn gemm_crate(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Result<f64> {
    let threads = rayon::current_num_threads();
    let mut y = vec![0f32; m * n];
    median_secs(|| {
        // SAFETY: `y` is m x n row-major (row stride n, column stride 1), `x` m x k row-major,
        // and the right-hand side is w^T read from the n x k row-major `w` (row stride 1 along
        // k, column stride k along n): every index the crate forms is inside the three slices.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                y.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
        Ok(())
    })
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let shapes: [(&str, usize, usize, usize); 8] = [
        ("stage-1 fc1, b1", 3136, 64, 256),
        ("stage-1 fc2, b1", 3136, 256, 64),
        ("stage-2 fc1, b1", 784, 128, 512),
        ("stage-3 fc1, b1", 196, 256, 1024),
        ("stage-3 fc2, b1", 196, 1024, 256),
        ("stage-4 fc1, b1", 49, 512, 2048),
        ("stage-4 fc2, b1", 49, 2048, 512),
        ("stage-3 fc1, b8", 1568, 256, 1024),
    ];
    let mut policies = vec![("ours AVX2", KernelPolicy::with_isa(Isa::Avx2))];
    policies.push(("ours AVX-512", KernelPolicy::with_isa(Isa::Avx512)));
    let bf16 = Isa::Avx512Bf16.is_supported();
    println!(
        "GEMM GFLOP/s, {} threads, CPU supports {:?}",
        rayon::current_num_threads(),
        Isa::supported()
    );
    println!();
    println!(
        "| shape (M x K -> N) | ours AVX2 | ours AVX-512 | gemm 0.19 x86-v4 | ours AVX512_BF16 (bf16 weights) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (what, m, k, n) in shapes {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)?;
        let b = Tensor::randn(0f32, 0.02, n, &dev)?;
        let flops = 2.0 * (m * n * k) as f64;
        let rate = |s: f64| format!("{:.0}", flops / s / 1e9);
        let mut row = format!("| {what}: {m} x {k} -> {n} |");
        for (_, policy) in &policies {
            match policy {
                Ok(p) => row += &format!(" {} |", rate(ours(&x, &w, &b, *p)?)),
                Err(_) => row += " - |",
            }
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.flatten_all()?.to_vec1::<f32>()?;
        row += &format!(" {} |", rate(gemm_crate(&xs, &ws, m, n, k)?));
        if bf16 {
            let p = KernelPolicy::with_isa(Isa::Avx512Bf16)?;
            let s = ours(&x, &w.to_dtype(DType::BF16)?, &b.to_dtype(DType::BF16)?, p)?;
            row += &format!(" {} |", rate(s));
        } else {
            row += " - |";
        }
        println!("{row}");
    }
    Ok(())
}
