//! Parity of FlashInternImage (DCNv4 blocks) with the official PyTorch outputs
//! (`../shared/fixtures/flash/`): tiny_flash_s (post-norm, layer scale, depthwise offset/mask
//! conv, offset_scale 0.5, no output/fc2 biases) and tiny_flash_l (offset_scale 2, output_proj
//! and fc2 biases, 32 channels per group), loaded from their `{'model': ...}` `.pth` files with
//! the architecture from the `hf_config` of their json; plus the presets' parameter counts.

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;
use internimage::{Config, CoreOp, InternImage};
use std::collections::HashMap;

/// The network's Config (from the `hf_config` dict of its json), which must select DCNv4.
fn config(net: &str) -> Config {
    let cfg = common::flash_config(net);
    assert_eq!(cfg.core_op, CoreOp::Dcnv4);
    cfg
}

fn run_parity(net: &str) {
    let cfg = config(net);
    let model =
        InternImage::from_checkpoint(&cfg, common::flash_weights(net), DType::F32, &Device::Cpu)
            .unwrap();
    let expected =
        common::load_safetensors(common::flash_dir().join(format!("expected/{net}.safetensors")));
    let manifest = common::read_json(common::flash_dir().join("manifest.json"));
    let inputs = common::fixture_tensors("inputs.safetensors");
    let mut ours: HashMap<String, Tensor> = HashMap::new();
    for input in ["photo", "rand", "odd"] {
        let x = &inputs[input];
        ours.insert(format!("logits.{input}"), model.forward(x).unwrap());
        if input != "photo" {
            for (i, s) in model.forward_features(x).unwrap().into_iter().enumerate() {
                ours.insert(format!("stage{i}.{input}"), s);
            }
        }
    }
    let mut failures = Vec::new();
    let mut worst_abs = 0f64;
    for (name, reference) in &expected {
        let (atol, rtol) = common::manifest_tol(&manifest, net, name);
        let o = &ours[name.as_str()];
        let (worst, max_abs) = common::max_violation(o, reference, atol, rtol);
        worst_abs = worst_abs.max(max_abs);
        if worst > 0.0 {
            failures.push(format!(
                "{name}: max |diff| {max_abs:.3e} exceeds atol {atol:.1e} + rtol {rtol:.1e}*|ref|"
            ));
        }
    }
    assert_eq!(expected.len(), 11);
    assert!(failures.is_empty(), "{net}:\n{}", failures.join("\n"));
    println!(
        "{net}: {} tensors within tolerance, max |diff| {worst_abs:.2e}",
        expected.len()
    );
}

#[test]
fn tiny_flash_s_matches_pytorch() {
    run_parity("tiny_flash_s");
}

#[test]
fn tiny_flash_l_matches_pytorch() {
    run_parity("tiny_flash_l");
}

/// Parameters of the network built by `cfg`, without allocating weights: a backend that
/// records each requested tensor's size and hands out one zero broadcast to the shape.
fn param_count(cfg: &Config) -> usize {
    use std::sync::{Arc, Mutex};
    #[derive(Clone)]
    struct Counter(Arc<Mutex<HashMap<String, usize>>>);
    impl candle_nn::var_builder::SimpleBackend for Counter {
        fn get(
            &self,
            s: candle_core::Shape,
            name: &str,
            _: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0
                .lock()
                .unwrap()
                .insert(name.to_string(), s.elem_count());
            // One element broadcast to the shape: nothing proportional to the size is allocated.
            Tensor::zeros(1, dtype, dev)?.broadcast_as(s)
        }
        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("unexpected unchecked get of {name}")
        }
        fn contains_tensor(&self, _: &str) -> bool {
            true
        }
    }
    let counter = Counter(Arc::new(Mutex::new(HashMap::new())));
    let vb = VarBuilder::from_backend(Box::new(counter.clone()), DType::F32, Device::Cpu);
    InternImage::new(cfg, vb).unwrap();
    let map = counter.0.lock().unwrap();
    // BatchNorm running statistics are buffers, not parameters.
    map.iter()
        .filter(|(k, _)| !k.contains("running_") && !k.contains("num_batches"))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn preset_parameter_counts_match_the_spec() {
    for (cfg, want) in [
        (Config::flash_t(), 29_815_528),
        (Config::flash_s(), 50_067_496),
        (Config::flash_b(), 97_448_960),
        (Config::flash_l(), 223_297_080),
    ] {
        assert_eq!(param_count(&cfg), want, "{cfg:?}");
    }
}

#[test]
fn tiny_parameter_counts_match_the_manifest() {
    let manifest = common::read_json(common::flash_dir().join("manifest.json"));
    for net in ["tiny_flash_s", "tiny_flash_l"] {
        let want = manifest["models"][net]["params"].as_u64().unwrap() as usize;
        assert_eq!(param_count(&config(net)), want, "{net}");
    }
}

#[test]
fn presets_by_name_and_json() {
    assert_eq!(Config::preset("flash_b").unwrap(), Config::flash_b());
    let cfg = Config::from_json_str(r#"{"core_op":"DCNv4","dw_kernel_size":3}"#).unwrap();
    assert!(cfg.is_flash() && !cfg.mlp_fc2_bias && !cfg.dcn_output_bias);
    assert_eq!(Config::default().core_op, CoreOp::Dcnv3);
    let e = Config::from_json_str(r#"{"core_op":"DCNv5"}"#).unwrap_err();
    assert!(e.to_string().contains("DCNv5"), "{e}");
}

/// Backbone without head (`backbone()`, head weights ignored): NCHW stage outputs equal to the
/// full network's; and the pooled vector.
#[test]
fn backbone_and_pooled() {
    let cfg = config("tiny_flash_l");
    let dev = Device::Cpu;
    let full = InternImage::from_checkpoint(
        &cfg,
        common::flash_weights("tiny_flash_l"),
        DType::F32,
        &dev,
    )
    .unwrap();
    let vb = internimage::checkpoint::var_builder(
        &[common::flash_weights("tiny_flash_l")],
        DType::F32,
        &dev,
    )
    .unwrap();
    let bb = InternImage::backbone(&cfg, &[1, 3], vb).unwrap();
    assert!(!bb.has_head());
    let x = common::fixture_tensors("inputs.safetensors")["odd"].clone();
    let a = full.forward_features(&x).unwrap();
    let b = bb.forward_features(&x).unwrap();
    assert_eq!(b.len(), 2);
    assert_eq!(common::max_abs_diff(&a[1], &b[0]), 0.0);
    assert_eq!(common::max_abs_diff(&a[3], &b[1]), 0.0);
    let pooled = full.forward_pooled(&x).unwrap();
    assert_eq!(pooled.dims(), &[1, 384]);

    // Detection layout: every name under `backbone.` (no head), here re-saved as safetensors.
    let names =
        internimage::checkpoint::CheckpointBackend::open(&[common::flash_weights("tiny_flash_l")])
            .unwrap()
            .names();
    let vb = internimage::checkpoint::var_builder(
        &[common::flash_weights("tiny_flash_l")],
        DType::F32,
        &dev,
    )
    .unwrap();
    let mut det: HashMap<String, Tensor> = HashMap::new();
    for n in names
        .iter()
        .filter(|n| !n.starts_with("head") && !n.starts_with("conv_head"))
    {
        det.insert(format!("backbone.{n}"), vb.get_unchecked(n).unwrap());
    }
    let path = std::env::temp_dir().join(format!("flash_det_{}.safetensors", std::process::id()));
    candle_core::safetensors::save(&det, &path).unwrap();
    let vb = internimage::checkpoint::var_builder(&[&path], DType::F32, &dev).unwrap();
    let det_bb = InternImage::backbone(&cfg, &[1, 3], vb).unwrap();
    let c = det_bb.forward_features(&x).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(common::max_abs_diff(&b[0], &c[0]), 0.0);
    assert_eq!(common::max_abs_diff(&b[1], &c[1]), 0.0);
}

/// Gradients through a DCNv4 layer with trainable weights (a VarMap): to its input and to
/// every weight, finite and non-zero (the offset_mask projection is zero-initialised in the
/// official code, so it is filled with small values here to make the sampling non-trivial).
#[test]
fn dcnv4_layer_gradients() {
    use internimage::model::{Dcnv4Layer, Dcnv4LayerConfig};
    let dev = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let cfg = Dcnv4LayerConfig {
        output_bias: true,
        ..Dcnv4LayerConfig::new(32, 2, 1.0)
    };
    let layer = Dcnv4Layer::new(&cfg, vb).unwrap();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let t = Tensor::randn(0f32, 0.2, var.shape(), &dev).unwrap();
        var.set(&t).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 6, 32), &dev).unwrap()).unwrap();
    let y = layer.forward(x.as_tensor()).unwrap();
    assert_eq!(y.dims(), &[2, 5, 6, 32]);
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let nonzero = |t: &Tensor| {
        let v = common::to_f32_vec(t);
        v.iter().all(|a| a.is_finite()) && v.iter().any(|&a| a != 0.0)
    };
    assert!(nonzero(grads.get(x.as_tensor()).unwrap()), "input gradient");
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(nonzero(g), "{name}");
    }
}

/// f16 and bf16 weights: logits close to the f32 network's.
#[test]
fn half_dtypes_close_to_f32() {
    let cfg = config("tiny_flash_s");
    let dev = Device::Cpu;
    let x = common::fixture_tensors("inputs.safetensors")["photo"].clone();
    let f32_ = InternImage::from_checkpoint(
        &cfg,
        common::flash_weights("tiny_flash_s"),
        DType::F32,
        &dev,
    )
    .unwrap()
    .forward(&x)
    .unwrap();
    let scale = common::to_f32_vec(&f32_)
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()));
    // Tolerance relative to the largest logit: 5% for bf16 (8-bit mantissa through ~20 layers),
    // 1% for f16.
    for (dt, rel) in [(DType::F16, 0.01f32), (DType::BF16, 0.05)] {
        let m = InternImage::from_checkpoint(&cfg, common::flash_weights("tiny_flash_s"), dt, &dev)
            .unwrap();
        let y = m.forward(&x).unwrap();
        assert_eq!(y.dtype(), dt);
        let d = common::max_abs_diff(&y.to_dtype(DType::F32).unwrap(), &f32_);
        assert!(d <= rel * scale, "{dt:?}: max |diff| {d} vs scale {scale}");
    }
}
