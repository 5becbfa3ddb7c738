//! DCNv3 core operator benchmark on the CPU (harness = false; run `cargo bench --bench dcnv3`).
//!
//! InternImage-T shapes: stage 1 (N=1, 56x56, C=64, G=4), stage 3 (N=1, 14x14, C=256, G=16) and
//! stage 1 at N=8, kernel 3x3, f32. For each: forward and backward (grad of input, offset, mask) of
//! our op with the default rayon pool (all cores) and with one thread, and as a baseline the same
//! operator written with plain candle tensor ops (a gather formulation like the official
//! pure-PyTorch core: per kernel point and bilinear corner one `index_select`), measured in the same
//! run; its backward is candle's autograd through that formulation. Prints median milliseconds.
//! Set `DCNV3_BENCH_SKIP_BASELINE=1` to time only our op.
//!
//! Our op is timed from a worker of its thread pool, as the network calls it (the whole forward
//! runs on the pool: `internimage::cpu::on_pool`); the column "fwd, from outside" times the same
//! call from the main thread, which hands each call to the pool and sleeps until it is done (two
//! context switches a call: tens of microseconds on a virtual machine).
//!
//! A second table times the DCNv4 core (FlashInternImage) at the same shapes, on the same
//! values packed into its (N, H, W, K_pad) offset_mask, next to our DCNv3 core and to DCNv3's
//! core plus the per-group mask softmax that the DCNv3 module needs and DCNv4 drops.

use candle_core::{DType, Device, Result, Tensor, Var};
use internimage::cpu::on_pool;
use internimage::ops::dcnv3::{dcnv3, dcnv3_backward, Dcnv3Config};
use internimage::ops::dcnv4::{dcnv4, dcnv4_backward, offset_mask_channels};
use std::time::{Duration, Instant};

/// Median wall time of `f` in milliseconds (warm-up calls for at least ~0.3 s, then at least
/// `min_iters` iterations or ~0.6 s). The warm-up is that long because the first few dozen
/// calls in a thread pool that has not allocated yet pay for the allocator settling (glibc maps
/// fresh pages for each large buffer until its thresholds adapt): the backward at N=8 took
/// twice its steady time for its first ~25 calls in a fresh one-thread pool.
fn median_ms(mut f: impl FnMut(), min_iters: usize) -> f64 {
    let warm = Instant::now();
    for k in 0.. {
        if k >= 3 && warm.elapsed() >= Duration::from_millis(300) {
            break;
        }
        f();
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_iters
        || (start.elapsed() < Duration::from_millis(600) && times.len() < 500)
    {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// Deterministic pseudo-random values in [lo, hi).
fn lcg(len: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((s >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

/// DCNv3 with candle tensor ops only (zero-outside bilinear gather per point and corner).
fn dcnv3_candle_ops(
    input: &Tensor,
    offset: &Tensor,
    mask: &Tensor,
    cfg: &Dcnv3Config,
) -> Result<Tensor> {
    let (n, hin, win, c) = input.dims4()?;
    let (_, ho, wo, _) = mask.dims4()?;
    let (g, cg, np) = (cfg.group, cfg.group_channels, cfg.points());
    let dev = input.device();
    let flat = input.reshape((n * hin * win * g, cg))?;
    let off = offset.reshape((n, ho, wo, g, np, 2))?;
    let m = mask.reshape((n, ho, wo, g, np))?;
    let hx = (cfg.dilation_w * (cfg.kernel_w - 1) / 2) as f32;
    let hy = (cfg.dilation_h * (cfg.kernel_h - 1) / 2) as f32;
    let s = cfg.offset_scale as f32;
    let bx: Vec<f32> = (0..wo)
        .map(|w| (w * cfg.stride_w) as f32 - cfg.pad_w as f32 + hx)
        .collect();
    let by: Vec<f32> = (0..ho)
        .map(|h| (h * cfg.stride_h) as f32 - cfg.pad_h as f32 + hy)
        .collect();
    let bx = Tensor::from_vec(bx, (1, 1, wo, 1), dev)?;
    let by = Tensor::from_vec(by, (1, ho, 1, 1), dev)?;
    let nbase = Tensor::from_vec(
        (0..n).map(|i| (i * hin) as f32).collect::<Vec<_>>(),
        (n, 1, 1, 1),
        dev,
    )?;
    let gidx = Tensor::from_vec(
        (0..g).map(|i| i as f32).collect::<Vec<_>>(),
        (1, 1, 1, g),
        dev,
    )?;
    let mut acc: Option<Tensor> = None;
    let mut p = 0;
    for i in 0..cfg.kernel_w {
        for j in 0..cfg.kernel_h {
            if cfg.remove_center && i == cfg.kernel_w / 2 && j == cfg.kernel_h / 2 {
                continue;
            }
            let kx = s * ((i * cfg.dilation_w) as f32 - hx);
            let ky = s * ((j * cfg.dilation_h) as f32 - hy);
            let dx = off
                .narrow(4, p, 1)?
                .narrow(5, 0, 1)?
                .reshape((n, ho, wo, g))?;
            let dy = off
                .narrow(4, p, 1)?
                .narrow(5, 1, 1)?
                .reshape((n, ho, wo, g))?;
            let x = (dx * s as f64)?.broadcast_add(&(&bx + kx as f64)?)?;
            let y = (dy * s as f64)?.broadcast_add(&(&by + ky as f64)?)?;
            let (x0, y0) = (x.floor()?.detach(), y.floor()?.detach());
            let (lx, ly) = ((&x - &x0)?, (&y - &y0)?);
            let mp = m.narrow(4, p, 1)?.reshape((n, ho, wo, g))?;
            let corners = [
                (0.0, 0.0, ((1.0 - &ly)? * (1.0 - &lx)?)?),
                (0.0, 1.0, ((1.0 - &ly)? * &lx)?),
                (1.0, 0.0, (&ly * (1.0 - &lx)?)?),
                (1.0, 1.0, (&ly * &lx)?),
            ];
            for (ay, ax, wgt) in corners {
                let (yy, xx) = ((&y0 + ay)?, (&x0 + ax)?);
                let valid = (xx.ge(0f32)?.to_dtype(DType::F32)?
                    * xx.le((win - 1) as f32)?.to_dtype(DType::F32)?)?
                .mul(
                    &(yy.ge(0f32)?.to_dtype(DType::F32)?
                        * yy.le((hin - 1) as f32)?.to_dtype(DType::F32)?)?,
                )?;
                let xc = xx.clamp(0f32, (win - 1) as f32)?;
                let yc = yy.clamp(0f32, (hin - 1) as f32)?;
                let idx = ((yc.broadcast_add(&nbase)? * win as f64)? + xc)?;
                let idx = (idx * g as f64)?.broadcast_add(&gidx)?;
                let idx = idx.flatten_all()?.to_dtype(DType::U32)?;
                let rows = flat.index_select(&idx, 0)?;
                let w = (wgt * valid)?.mul(&mp)?.reshape((n * ho * wo * g, 1))?;
                let t = rows.broadcast_mul(&w)?;
                acc = Some(match acc {
                    None => t,
                    Some(a) => (a + t)?,
                });
            }
            p += 1;
        }
    }
    match acc {
        Some(a) => a.reshape((n, ho, wo, c)),
        None => candle_core::bail!("no points"),
    }
}

struct Shape {
    name: &'static str,
    n: usize,
    hw: usize,
    group: usize,
    cg: usize,
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let shapes = [
        Shape {
            name: "stage1 N=1 56x56 C=64 G=4",
            n: 1,
            hw: 56,
            group: 4,
            cg: 16,
        },
        Shape {
            name: "stage3 N=1 14x14 C=256 G=16",
            n: 1,
            hw: 14,
            group: 16,
            cg: 16,
        },
        Shape {
            name: "stage1 N=8 56x56 C=64 G=4",
            n: 8,
            hw: 56,
            group: 4,
            cg: 16,
        },
    ];
    let threads = rayon::current_num_threads();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(candle_core::Error::wrap)?;
    println!(
        "DCNv3 core, f32, CPU, kernel 3x3, offset_scale 1; rayon threads: {threads}; median ms"
    );
    println!(
        "| shape | N*H*W*C | fwd ({threads} thr) | fwd, from outside ({threads} thr) | fwd (1 thr) | fwd baseline | fwd speedup | ns/elem fwd | bwd ({threads} thr) | bwd (1 thr) | bwd baseline | bwd speedup | max|ours-baseline| |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (k, sh) in shapes.iter().enumerate() {
        let cfg = Dcnv3Config::internimage(sh.group, sh.cg, 1.0);
        let c = sh.group * sh.cg;
        let np = 9;
        let (n, h, w) = (sh.n, sh.hw, sh.hw);
        let input = Tensor::from_vec(
            lcg(n * h * w * c, 1 + k as u64, -1.0, 1.0),
            (n, h, w, c),
            &dev,
        )?;
        let offset = Tensor::from_vec(
            lcg(n * h * w * sh.group * np * 2, 2, -2.5, 2.5),
            (n, h, w, sh.group * np * 2),
            &dev,
        )?;
        let mask = Tensor::from_vec(
            lcg(n * h * w * sh.group * np, 3, 0.0, 2.0 / 9.0),
            (n, h, w, sh.group * np),
            &dev,
        )?;
        let gout = Tensor::from_vec(lcg(n * h * w * c, 4, -1.0, 1.0), (n, h, w, c), &dev)?;

        let ours = dcnv3(&input, &offset, &mask, &cfg)?;
        let base = dcnv3_candle_ops(&input, &offset, &mask, &cfg)?;
        let diff = (&ours - &base)?.abs()?.max_all()?.to_scalar::<f32>()?;

        let fwd = on_pool(|| median_ms(|| drop(dcnv3(&input, &offset, &mask, &cfg).unwrap()), 20));
        let fwd_outside = median_ms(|| drop(dcnv3(&input, &offset, &mask, &cfg).unwrap()), 20);
        let fwd1 =
            one.install(|| median_ms(|| drop(dcnv3(&input, &offset, &mask, &cfg).unwrap()), 10));
        let skip = std::env::var_os("DCNV3_BENCH_SKIP_BASELINE").is_some();
        let fwd_base = if skip {
            f64::NAN
        } else {
            median_ms(
                || drop(dcnv3_candle_ops(&input, &offset, &mask, &cfg).unwrap()),
                5,
            )
        };
        let bwd = on_pool(|| {
            median_ms(
                || drop(dcnv3_backward(&input, &offset, &mask, &gout, &cfg).unwrap()),
                20,
            )
        });
        let bwd1 = one.install(|| {
            median_ms(
                || drop(dcnv3_backward(&input, &offset, &mask, &gout, &cfg).unwrap()),
                10,
            )
        });
        let (vi, vo, vm) = (
            Var::from_tensor(&input)?,
            Var::from_tensor(&offset)?,
            Var::from_tensor(&mask)?,
        );
        let bwd_base = if skip {
            f64::NAN
        } else {
            let out = dcnv3_candle_ops(vi.as_tensor(), vo.as_tensor(), vm.as_tensor(), &cfg)?;
            let loss = (out * &gout)?.sum_all()?;
            median_ms(|| drop(loss.backward().unwrap()), 3)
        };
        let elems = n * h * w * c;
        println!(
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.2} | {:.1}x | {:.2} | {:.3} | {:.3} | {:.2} | {:.1}x | {:.1e} |",
            sh.name,
            elems,
            fwd,
            fwd_outside,
            fwd1,
            fwd_base,
            fwd_base / fwd,
            fwd * 1e6 / elems as f64,
            bwd,
            bwd1,
            bwd_base,
            bwd_base / bwd,
            diff
        );
    }
    println!(
        "baseline = the operator as candle tensor ops (gather per point and corner); its bwd = candle \
         autograd over the recorded graph (backward pass only, like ours)"
    );
    dcnv4_table(&shapes)?;
    Ok(())
}

/// DCNv4 vs DCNv3 at the same shapes and values (default rayon pool).
fn dcnv4_table(shapes: &[Shape]) -> Result<()> {
    let dev = Device::Cpu;
    let threads = rayon::current_num_threads();
    println!();
    println!("DCNv4 core vs our DCNv3 core, f32, CPU, {threads} threads (on the pool), median ms");
    println!(
        "| shape | v3 fwd | v3 softmax+fwd | v4 fwd | v4/v3 fwd | v4/(softmax+v3) | v3 bwd | v4 bwd | v4/v3 bwd |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (k, sh) in shapes.iter().enumerate() {
        let cfg = Dcnv3Config::internimage(sh.group, sh.cg, 1.0);
        let (n, h, w, c, g, np) = (sh.n, sh.hw, sh.hw, sh.group * sh.cg, sh.group, 9);
        let k_pad = offset_mask_channels(&cfg);
        let input = Tensor::from_vec(
            lcg(n * h * w * c, 1 + k as u64, -1.0, 1.0),
            (n, h, w, c),
            &dev,
        )?;
        let om = Tensor::from_vec(lcg(n * h * w * k_pad, 2, -2.5, 2.5), (n, h, w, k_pad), &dev)?;
        let body = om.narrow(3, 0, g * 3 * np)?.reshape((n, h, w, g, 3 * np))?;
        let offset = body
            .narrow(4, 0, 2 * np)?
            .reshape((n, h, w, g * 2 * np))?
            .contiguous()?;
        let mask = body
            .narrow(4, 2 * np, np)?
            .reshape((n, h, w, g * np))?
            .contiguous()?;
        let gout = Tensor::from_vec(lcg(n * h * w * c, 4, -1.0, 1.0), (n, h, w, c), &dev)?;
        let (v3, v3s, v4, b3, b4) = on_pool(|| {
            let v3 = median_ms(|| drop(dcnv3(&input, &offset, &mask, &cfg).unwrap()), 20);
            let v3s = median_ms(
                || {
                    let m = internimage::ops::softmax_groups(&mask, np).unwrap();
                    drop(dcnv3(&input, &offset, &m, &cfg).unwrap())
                },
                20,
            );
            let v4 = median_ms(|| drop(dcnv4(&input, &om, &cfg).unwrap()), 20);
            let b3 = median_ms(
                || drop(dcnv3_backward(&input, &offset, &mask, &gout, &cfg).unwrap()),
                10,
            );
            let b4 = median_ms(
                || drop(dcnv4_backward(&input, &om, &gout, &cfg).unwrap()),
                10,
            );
            (v3, v3s, v4, b3, b4)
        });
        println!(
            "| {} | {v3:.3} | {v3s:.3} | {v4:.3} | {:.2} | {:.2} | {b3:.3} | {b4:.3} | {:.2} |",
            sh.name,
            v4 / v3,
            v4 / v3s,
            b4 / b3
        );
    }
    Ok(())
}
