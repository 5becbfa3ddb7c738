//! Spin-waiting (`KernelPolicy::with_spin_wait`, on by default) changes no value. The only test
//! of its process, so that no other forward runs beside it (spin-waiting steps aside while
//! another single-image forward runs in the process).

mod common;

use candle_core::{DType, Device, Module, Tensor};
use common::{fixture_tensors, manifest, manifest_tol, max_violation, net_config, net_weights};
use internimage::{InternImage, KernelPolicy};

/// A single image gives bit for bit the same logits and stage maps with the pool's workers
/// polling or sleeping between parallel loops, on pools of 1, 2 and 3 threads, and the logits
/// match the official ones.
#[test]
fn spin_wait_changes_no_value() {
    let cfg = net_config("tiny_b");
    let path = net_weights("tiny_b", "safetensors");
    let build = |spin: bool| {
        let policy = KernelPolicy::fast().with_spin_wait(spin);
        InternImage::from_checkpoint_with_policy(&cfg, &path, DType::F32, &Device::Cpu, policy)
            .unwrap()
    };
    let (polling, sleeping) = (build(true), build(false));
    assert!(polling.kernel_policy().spin_wait() && !sleeping.kernel_policy().spin_wait());
    let x = fixture_tensors("inputs.safetensors")["photo"].clone();
    assert_eq!(x.dim(0).unwrap(), 1, "a single image");
    let expected = fixture_tensors("expected/tiny_b.safetensors");
    let (atol, rtol) = manifest_tol(&manifest(), "tiny_b", "logits.photo");
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    };
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let run = |m: &InternImage| {
            pool.install(|| {
                let logits = m.forward(&x).unwrap();
                let (worst, _) = max_violation(&logits, &expected["logits.photo"], atol, rtol);
                assert!(worst <= 0.0, "{threads} threads: logits off by {worst:e}");
                let mut out = vec![bits(&logits)];
                out.extend(m.forward_features(&x).unwrap().iter().map(bits));
                out
            })
        };
        assert_eq!(run(&polling), run(&sleeping), "{threads} threads");
    }
}
