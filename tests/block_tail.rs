//! The fused inference tail of pre-norm blocks (output projection, residual, LayerNorm, MLP and
//! residual by row blocks, `ops::dense::block_tail`) inside whole networks: `forward` (which takes
//! it where there are enough rows) gives bit for bit the logits of the debug pass, which records
//! every activation and so runs the unfused ops with the same kernels.

use candle_core::{DType, Device, Module, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};
use internimage::{Config, InternImage};

/// Random weights: N(0, 0.02) matrices and biases, norm scales 1 + N(0, 0.1), layer scales
/// N(0, 0.5) (so that gamma matters), BatchNorm statistics 0 and 1.
struct RandomWeights;

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let leaf = name.rsplit('.').next().unwrap_or(name);
        let t = if leaf == "running_var" {
            Tensor::ones(s, DType::F32, dev)?
        } else if leaf == "running_mean" || leaf == "num_batches_tracked" {
            Tensor::zeros(s, DType::F32, dev)?
        } else if leaf.starts_with("gamma") {
            Tensor::randn(0f32, 0.5, s, dev)?
        } else if s.rank() == 1 && leaf == "weight" {
            (Tensor::randn(0f32, 0.1, s, dev)? + 1.0)?
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

fn check(name: &str, cfg: Config) {
    check_dtype(name, cfg, DType::F32)
}

/// As [`check`], for a network built in `dtype`. bf16: on a CPU with AVX512_BF16 or AMX the
/// network keeps bf16 GEMM weights and f32 activations and takes the fused tail too (elsewhere it
/// is bf16 throughout and takes the unfused ops both times); the debug pass records the logits in
/// the compute dtype, `forward` returns them in bf16.
fn check_dtype(name: &str, cfg: Config, dtype: DType) {
    // Two threads: stage 1 of a 112 x 112 image (784 rows) then fills whole row blocks on
    // every thread (the fused tail), the later stages do not (the unfused ops).
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        let vb = VarBuilder::from_backend(Box::new(RandomWeights), dtype, Device::Cpu);
        let model = InternImage::new(&cfg, vb).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 3, 112, 112), &Device::Cpu).unwrap();
        let fused = model.forward(&x).unwrap();
        let acts = model.debug_activations(&x).unwrap();
        let unfused = &acts.iter().find(|(n, _)| n == "logits").unwrap().1;
        assert_eq!(fused.dtype(), dtype);
        let values = |t: &Tensor| {
            let t = t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (a, b) = (values(&fused), values(unfused));
        assert_eq!(a.len(), b.len());
        assert!(a.iter().all(|v| v.is_finite()), "{name}: non-finite logits");
        let bad = a
            .iter()
            .zip(&b)
            .position(|(p, q)| p.to_bits() != q.to_bits());
        assert!(bad.is_none(), "{name}: logits differ at {bad:?}");
    });
}

fn small(mut cfg: Config) -> Config {
    cfg.depths = vec![2, 1, 1, 1];
    cfg
}

#[test]
fn internimage_t_blocks_with_layer_scale() {
    let mut cfg = small(Config::t());
    cfg.layer_scale = Some(1e-5);
    check("T with layer scale", cfg);
}

#[test]
fn internimage_t_blocks_without_layer_scale() {
    check("T", small(Config::t()));
}

#[test]
fn internimage_t_blocks_with_bf16_gemm_weights() {
    let mut cfg = small(Config::t());
    cfg.layer_scale = Some(1e-5);
    check_dtype("T bf16", cfg, DType::BF16);
}

#[test]
fn flash_internimage_t_blocks() {
    check("Flash-T", small(Config::flash_t()));
}
