//! One `Arc<InternImage>` shared by many threads (the way a service uses it): results are
//! bit-identical to single-threaded ones for mixed batch sizes, and calls from inside the
//! caller's own rayon pool (`par_iter`) and from `tokio::task::spawn_blocking` finish.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor};
use internimage::InternImage;
use rayon::prelude::*;

fn model() -> Arc<InternImage> {
    let cfg = common::net_config("tiny_b");
    Arc::new(
        InternImage::from_checkpoint(
            &cfg,
            common::net_weights("tiny_b", "safetensors"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap(),
    )
}

/// Inputs of batch sizes 1, 2, 3 and 4 (64 x 96, different values each).
fn batches() -> Vec<Tensor> {
    [1usize, 3, 2, 4, 1, 2]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let len = n * 3 * 64 * 96;
            let v: Vec<f32> = (0..len)
                .map(|j| (((j * 7919 + i * 104729) % 1000) as f32 / 500.0) - 1.0)
                .collect();
            Tensor::from_vec(v, (n, 3, 64, 96), &Device::Cpu).unwrap()
        })
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    common::to_f32_vec(t).iter().map(|v| v.to_bits()).collect()
}

#[test]
fn shared_model_across_8_threads_is_bit_identical() {
    let model = model();
    let inputs = batches();
    let reference: Vec<Vec<u32>> = inputs
        .iter()
        .map(|x| bits(&model.forward(x).unwrap()))
        .collect();
    let inputs = Arc::new(inputs);
    let reference = Arc::new(reference);
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let (model, inputs, reference) = (model.clone(), inputs.clone(), reference.clone());
            std::thread::spawn(move || {
                // Each thread walks the batches in its own order, twice.
                for k in 0..2 * inputs.len() {
                    let i = (k + t) % inputs.len();
                    let got = bits(&model.forward(&inputs[i]).unwrap());
                    assert_eq!(got, reference[i], "thread {t}, batch {i}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Runs `f` on a helper thread and fails if it does not finish within `limit` (a deadlock).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .expect("did not finish: deadlock or oversubscription collapse")
}

#[test]
fn calls_from_a_caller_rayon_pool_and_par_iter_finish() {
    let model = model();
    let inputs = batches();
    let reference: Vec<Vec<u32>> = inputs
        .iter()
        .map(|x| bits(&model.forward(x).unwrap()))
        .collect();
    for threads in [1usize, 2, 4] {
        let (m, xs) = (model.clone(), inputs.clone());
        let t0 = Instant::now();
        let got = within(Duration::from_secs(120), move || {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                xs.par_iter()
                    .map(|x| bits(&m.forward(x).unwrap()))
                    .collect::<Vec<_>>()
            })
        });
        println!(
            "caller rayon pool of {threads}: {} batches in {:.2} s",
            inputs.len(),
            t0.elapsed().as_secs_f64()
        );
        assert_eq!(got, reference, "pool of {threads}");
    }
    // The global pool too.
    let (m, xs) = (model.clone(), inputs.clone());
    let got = within(Duration::from_secs(120), move || {
        xs.par_iter()
            .map(|x| bits(&m.forward(x).unwrap()))
            .collect::<Vec<_>>()
    });
    assert_eq!(got, reference);
}

#[test]
fn calls_from_tokio_spawn_blocking_finish() {
    let model = model();
    let inputs = batches();
    let reference: Vec<Vec<u32>> = inputs
        .iter()
        .map(|x| bits(&model.forward(x).unwrap()))
        .collect();
    let got = within(Duration::from_secs(120), move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async move {
            let tasks: Vec<_> = inputs
                .into_iter()
                .map(|x| {
                    let m = model.clone();
                    tokio::task::spawn_blocking(move || bits(&m.forward(&x).unwrap()))
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        })
    });
    assert_eq!(got, reference);
}
