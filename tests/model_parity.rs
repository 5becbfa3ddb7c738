//! Parity of the InternImage network with the official PyTorch outputs (`../shared/fixtures`):
//! tiny_b and tiny_h, each loaded from the `.pth` and from the Hugging Face safetensors file.

mod common;

use candle_core::{DType, Device, Module, Tensor};
use common::{
    fixture_tensors, manifest, max_violation as compare, net_config as config, net_weights,
};
use internimage::{InternImage, Isa, KernelPolicy};
use std::collections::HashMap;

fn inputs() -> HashMap<String, Tensor> {
    fixture_tensors("inputs.safetensors")
}

fn run_parity(net: &str, weights_ext: &str) {
    run_parity_with(net, weights_ext, KernelPolicy::fast());
}

fn run_parity_with(net: &str, weights_ext: &str, policy: KernelPolicy) {
    let cfg = config(net);
    let path = net_weights(net, weights_ext);
    let model =
        InternImage::from_checkpoint_with_policy(&cfg, &path, DType::F32, &Device::Cpu, policy)
            .unwrap();
    assert_eq!(model.kernel_policy(), policy);
    let expected = fixture_tensors(&format!("expected/{net}.safetensors"));
    let manifest = manifest();
    let tensors = manifest["models"][net]["tensors"].as_object().unwrap();
    let inputs = inputs();

    let mut ours: HashMap<String, Tensor> = HashMap::new();
    for input in ["photo", "rand", "odd"] {
        if !expected.contains_key(&format!("logits.{input}")) {
            continue;
        }
        let x = &inputs[input];
        ours.insert(format!("logits.{input}"), model.forward(x).unwrap());
        for (i, s) in model.forward_features(x).unwrap().into_iter().enumerate() {
            ours.insert(format!("stage{i}.{input}"), s);
        }
    }
    for (name, t) in model.debug_activations(&inputs["photo"]).unwrap() {
        ours.insert(format!("dbg.photo.{name}"), t);
    }

    let mut failures = Vec::new();
    let mut checked = 0;
    let mut worst_abs = 0f64;
    for (name, reference) in expected.iter() {
        let (atol, rtol) = common::atol_rtol(&tensors[name.as_str()]);
        let Some(o) = ours.get(name) else {
            failures.push(format!("{name}: not produced"));
            continue;
        };
        let (worst, max_abs) = compare(o, reference, atol, rtol);
        checked += 1;
        worst_abs = worst_abs.max(max_abs);
        if worst > 0.0 {
            failures.push(format!(
                "{name}: max |diff| {max_abs:.3e} exceeds atol {atol:.1e} + rtol {rtol:.1e}*|ref|"
            ));
        }
    }
    assert_eq!(
        checked
            + failures
                .iter()
                .filter(|f| f.ends_with("not produced"))
                .count(),
        expected.len()
    );
    assert!(
        failures.is_empty(),
        "{net} from .{weights_ext} ({policy}): {} of {} tensors fail:\n{}",
        failures.len(),
        expected.len(),
        failures.join("\n")
    );
    assert!(checked >= 19, "only {checked} tensors compared");
    println!(
        "{net} from .{weights_ext} ({policy}): {checked} tensors within tolerance, max |diff| {worst_abs:.2e}"
    );
}

#[test]
fn tiny_b_pth() {
    run_parity("tiny_b", "pth");
}

#[test]
fn tiny_b_safetensors() {
    run_parity("tiny_b", "safetensors");
}

#[test]
fn tiny_h_pth() {
    run_parity("tiny_h", "pth");
}

#[test]
fn tiny_h_safetensors() {
    run_parity("tiny_h", "safetensors");
}

/// Every kernel policy this CPU can run (each instruction set, the portable path a CPU without
/// SIMD extensions takes, and candle's reference ops) gives the official outputs, in one process.
#[test]
fn every_kernel_policy_matches_the_goldens() {
    let mut policies = vec![KernelPolicy::reference()];
    for isa in Isa::supported() {
        policies.push(KernelPolicy::with_isa(isa).unwrap());
    }
    // Workers that sleep between the operators' parallel loops (the others poll).
    policies.push(KernelPolicy::fast().with_spin_wait(false));
    assert!(
        policies.len() >= 3,
        "reference, portable and at least one SIMD path"
    );
    for policy in policies {
        for net in ["tiny_b", "tiny_h"] {
            run_parity_with(net, "pth", policy);
        }
    }
}

/// The top-1 class of the photo agrees, and the backbone built from the same file gives the
/// same stage outputs as the classifier (head weights ignored).
#[test]
fn backbone_matches_classifier() {
    let cfg = config("tiny_b");
    let path = net_weights("tiny_b", "safetensors");
    let vb = internimage::checkpoint::var_builder(&[&path], DType::F32, &Device::Cpu).unwrap();
    let bb = InternImage::backbone(&cfg, &[3, 1], vb).unwrap();
    assert!(!bb.has_head());
    assert_eq!(bb.out_indices(), &[1, 3]);
    let expected = fixture_tensors("expected/tiny_b.safetensors");
    let feats = bb.forward_features(&inputs()["rand"]).unwrap();
    assert_eq!(feats.len(), 2);
    for (f, i) in feats.iter().zip([1, 3]) {
        let (worst, _) = compare(f, &expected[&format!("stage{i}.rand")], 1.5e-4, 1e-4);
        assert!(worst <= 0.0, "stage {i}");
    }
    assert!(bb.forward(&inputs()["rand"]).is_err());
}

/// `dcn_sampling` returns exactly the arguments of the block's DCNv3 core call.
#[test]
fn dcn_sampling_matches_core_arguments() {
    let manifest = manifest();
    for net in ["tiny_b", "tiny_h"] {
        let cfg = config(net);
        let path = net_weights(net, "safetensors");
        let model = InternImage::from_checkpoint(&cfg, &path, DType::F32, &Device::Cpu).unwrap();
        let expected = fixture_tensors(&format!("expected/{net}.safetensors"));
        let s = model.dcn_sampling(&inputs()["photo"], 0, 0).unwrap();
        assert_eq!(s.cfg.group, cfg.groups[0]);
        assert_eq!(s.cfg.offset_scale, cfg.offset_scale);
        for (name, t) in [("offset", &s.offset), ("mask", &s.mask)] {
            let key = format!("dbg.photo.l0b0.core.{name}");
            let (atol, rtol) = common::manifest_tol(&manifest, net, &key);
            let (worst, _) = compare(t, &expected[&key], atol, rtol);
            assert!(worst <= 0.0, "{net} {name}");
        }
        // A later block works too (shapes only).
        let s = model.dcn_sampling(&inputs()["photo"], 2, 2).unwrap();
        assert_eq!(s.mask.dims(), &[1, 14, 14, cfg.groups[2] * 9]);
        assert_eq!(s.offset.dims(), &[1, 14, 14, cfg.groups[2] * 18]);
    }
}

/// The DCNv3 layer on its own (tiny_b's first block is post-norm, so its DCNv3 input is the
/// stem output): `dbg.photo.patch_embed` -> `dbg.photo.l0b0.dcn.out`.
#[test]
fn dcnv3_layer_standalone() {
    use internimage::{Dcnv3Layer, Dcnv3LayerConfig};
    let cfg = config("tiny_b");
    let path = net_weights("tiny_b", "pth");
    let vb = internimage::checkpoint::var_builder(&[&path], DType::F32, &Device::Cpu).unwrap();
    let layer_cfg = Dcnv3LayerConfig::new(cfg.channels, cfg.groups[0], cfg.offset_scale);
    let layer = Dcnv3Layer::new(&layer_cfg, vb.pp("levels.0.blocks.0.dcn")).unwrap();
    assert_eq!(layer.core_config().group_channels, 4);
    let expected = fixture_tensors("expected/tiny_b.safetensors");
    let out = layer.forward(&expected["dbg.photo.patch_embed"]).unwrap();
    let (worst, _) = compare(&out, &expected["dbg.photo.l0b0.dcn.out"], 1e-4, 1e-4);
    assert!(worst <= 0.0);
    let s = layer.sampling(&expected["dbg.photo.patch_embed"]).unwrap();
    let (worst, _) = compare(&s.mask, &expected["dbg.photo.l0b0.core.mask"], 1e-4, 1e-4);
    assert!(worst <= 0.0);
    // Wrong channel count -> error.
    let bad = Tensor::zeros((1, 8, 8, 5), DType::F32, &Device::Cpu).unwrap();
    assert!(layer.forward(&bad).is_err());
}

/// On the CPU a batch runs as one chunk per rayon thread; whatever the thread count and however
/// the batch splits (3 images over 1, 2 and 3 threads), logits and stage maps equal the goldens
/// of each image.
#[test]
fn batches_split_across_threads_match_goldens() {
    let cfg = config("tiny_b");
    let path = net_weights("tiny_b", "safetensors");
    let model = InternImage::from_checkpoint(&cfg, &path, DType::F32, &Device::Cpu).unwrap();
    let manifest = manifest();
    let tol = |name: &str| common::manifest_tol(&manifest, "tiny_b", name);
    let expected = fixture_tensors("expected/tiny_b.safetensors");
    let rand = &inputs()["rand"];
    // Images: rand[0], rand[1], rand[0].
    let x = Tensor::cat(&[rand, &rand.narrow(0, 0, 1).unwrap()], 0).unwrap();
    let triple = |t: &Tensor| Tensor::cat(&[t, &t.narrow(0, 0, 1).unwrap()], 0).unwrap();
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let (logits, stages) = pool.install(|| {
            (
                model.forward(&x).unwrap(),
                model.forward_features(&x).unwrap(),
            )
        });
        let (atol, rtol) = tol("logits.rand");
        let (worst, _) = compare(&logits, &triple(&expected["logits.rand"]), atol, rtol);
        assert!(worst <= 0.0, "{threads} threads: logits off by {worst:e}");
        for (i, s) in stages.iter().enumerate() {
            let name = format!("stage{i}.rand");
            let (atol, rtol) = tol(&name);
            let (worst, _) = compare(s, &triple(&expected[&name]), atol, rtol);
            assert!(worst <= 0.0, "{threads} threads: {name} off by {worst:e}");
        }
    }
}
