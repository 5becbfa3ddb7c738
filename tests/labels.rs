//! Label tables, the 22k->1k map and top-k predictions.

mod common;

use candle_core::{Device, Tensor};
use internimage::labels::{self, Prediction};
use internimage::zoo::LabelSet;

#[test]
fn imagenet1k_table() {
    let t = labels::imagenet1k().unwrap();
    assert_eq!(t.len(), 1000);
    let first = t.get(0).unwrap();
    assert_eq!(first.wnid, "n01440764");
    assert_eq!(first.name, "tench, Tinca tinca");
    let last = t.get(999).unwrap();
    assert_eq!(last.wnid, "n15075141");
    assert_eq!(last.name, "toilet tissue, toilet paper, bathroom tissue");
    assert_eq!(t.get(281).unwrap().wnid, "n02123045"); // tabby cat
    assert!(t.get(1000).is_none());
    assert_eq!(t.index_of("n02123045"), Some(281));
    // ILSVRC-2012 order = sorted WordNet ids, all distinct.
    assert!(t.labels().windows(2).all(|w| w[0].wnid < w[1].wnid));
    assert!(t
        .labels()
        .iter()
        .all(|l| l.wnid.len() == 9 && !l.name.is_empty()));
}

#[test]
fn imagenet22k_table() {
    let t = labels::imagenet22k().unwrap();
    assert_eq!(t.len(), 21841);
    assert_eq!(t.get(0).unwrap().wnid, "n00004475");
    assert_eq!(t.get(0).unwrap().name, "organism, being");
    assert!(t.labels().windows(2).all(|w| w[0].wnid < w[1].wnid));
    assert_eq!(t.get(11136).unwrap().wnid, "n04398044"); // teapot, target of 1k 849 and 850
    assert!(std::ptr::eq(
        labels::table(LabelSet::Imagenet22k).unwrap(),
        t
    ));
}

#[test]
fn map_22k_to_1k() {
    let map = labels::map_22k_to_1k().unwrap();
    assert_eq!(map.len(), 1000);
    assert_eq!(&map[..3], &[359, 368, 460]);
    assert_eq!(map[849], 11136);
    assert_eq!(map[850], 11136);
    let t1k = labels::imagenet1k().unwrap();
    let t22k = labels::imagenet22k().unwrap();
    // Every other class maps to the same WordNet id; 850 (n04399382, teddy bear) has no 22k twin.
    let mut mismatches = vec![];
    for (i, &j) in map.iter().enumerate() {
        if t1k.get(i).unwrap().wnid != t22k.get(j).unwrap().wnid {
            mismatches.push(i);
        }
    }
    assert_eq!(mismatches, vec![850]);
    assert_eq!(t1k.get(850).unwrap().wnid, "n04399382");
    assert_eq!(t22k.index_of("n04399382"), None);
}

#[test]
fn logits_22k_to_1k_selects_the_mapped_columns() {
    let data: Vec<f32> = (0..2 * 21841).map(|i| i as f32).collect();
    let logits = Tensor::from_vec(data, (2, 21841), &Device::Cpu).unwrap();
    let l1k = labels::logits_22k_to_1k(&logits).unwrap();
    assert_eq!(l1k.dims(), &[2, 1000]);
    let v = l1k.to_vec2::<f32>().unwrap();
    assert_eq!(v[0][0], 359.0);
    assert_eq!(v[0][849], 11136.0);
    assert_eq!(v[1][850], 21841.0 + 11136.0);
    let bad = Tensor::zeros((1, 1000), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(labels::logits_22k_to_1k(&bad).is_err());
}

#[test]
fn top_k_probabilities_and_order() {
    // Logits ln 4, ln 2, ln 1 on classes 281, 7, 999 and -inf-like elsewhere:
    // probabilities 4/7, 2/7, 1/7 up to the tiny mass of the other 997 classes.
    let mut row = vec![-1000f32; 1000];
    row[281] = 4f32.ln();
    row[7] = 2f32.ln();
    row[999] = 0.0;
    let mut row2 = vec![0f32; 1000]; // uniform: ties broken by the lower index
    row2[500] = 1.0;
    let logits = Tensor::from_vec([row, row2].concat(), (2, 1000), &Device::Cpu).unwrap();
    let top = labels::top_k(&logits, LabelSet::Imagenet1k, 3).unwrap();
    assert_eq!(top.len(), 2);
    let idx: Vec<usize> = top[0].iter().map(|p| p.index).collect();
    assert_eq!(idx, vec![281, 7, 999]);
    for (p, want) in top[0].iter().zip([4.0 / 7.0, 2.0 / 7.0, 1.0 / 7.0]) {
        assert!((p.probability - want).abs() < 1e-6, "{p:?} vs {want}");
    }
    assert_eq!(
        top[0][0],
        Prediction {
            index: 281,
            wnid: "n02123045".into(),
            name: "tabby, tabby cat".into(),
            probability: top[0][0].probability,
        }
    );
    assert_eq!(top[0][0].short_name(), "tabby");
    assert_eq!(top[0][1].wnid, "n01514668"); // 7: cock
    assert_eq!(top[0][2].short_name(), "toilet tissue");
    // Second row: e/(e+999) first, then classes 0 and 1 with 1/(e+999).
    let e = std::f64::consts::E;
    let idx: Vec<usize> = top[1].iter().map(|p| p.index).collect();
    assert_eq!(idx, vec![500, 0, 1]);
    assert!((top[1][0].probability as f64 - e / (e + 999.0)).abs() < 1e-7);
    assert!((top[1][1].probability as f64 - 1.0 / (e + 999.0)).abs() < 1e-7);
}

#[test]
fn top_k_edge_cases() {
    let logits = Tensor::new(&[1f32, 3.0, 2.0], &Device::Cpu).unwrap(); // rank 1 = one image
    let top = labels::top_k_indices(&logits, 10).unwrap();
    assert_eq!(top.len(), 1);
    assert_eq!(
        top[0].iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![1, 2, 0]
    );
    let sum: f32 = top[0].iter().map(|p| p.1).sum();
    assert!((sum - 1.0).abs() < 1e-6);
    assert!(labels::top_k_indices(&logits, 0).unwrap()[0].is_empty());
    let u = labels::top_k_unlabelled(&logits, 1).unwrap();
    assert_eq!(u[0][0].index, 1);
    assert_eq!(u[0][0].wnid, "");
    assert_eq!(u[0][0].name, "class 1");
    // Large logits do not overflow.
    let big = Tensor::new(&[[1e30f32, 0.0]], &Device::Cpu).unwrap();
    let t = labels::top_k_indices(&big, 2).unwrap();
    assert_eq!(t[0][0], (0, 1.0));
    assert_eq!(t[0][1], (1, 0.0));
}

#[test]
fn class_count_mismatch_is_an_error() {
    let logits = Tensor::zeros((1, 100), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = labels::top_k(&logits, LabelSet::Imagenet1k, 5)
        .unwrap_err()
        .to_string();
    assert!(err.contains("100") && err.contains("1000"), "{err}");
    let logits = Tensor::zeros((1, 1000), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(labels::top_k(&logits, LabelSet::Imagenet22k, 5).is_err());
    let rank3 = Tensor::zeros((1, 1, 1000), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(labels::top_k(&rank3, LabelSet::Imagenet1k, 5).is_err());
}

/// Top-k of the official tiny_b logits of the fixture photo (100 classes): indices and
/// probabilities computed independently (Python softmax of the golden logits).
#[test]
fn top_k_of_fixture_logits() {
    let t = common::fixture_tensors("expected/tiny_b.safetensors");
    let logits = &t["logits.photo"];
    let top = labels::top_k_unlabelled(logits, 5).unwrap();
    let idx: Vec<usize> = top[0].iter().map(|p| p.index).collect();
    assert_eq!(idx, vec![17, 94, 29, 27, 34]);
    let want = [
        0.01253005f32,
        0.01204919,
        0.01165786,
        0.01144945,
        0.01139109,
    ];
    for (p, w) in top[0].iter().zip(want) {
        assert!((p.probability - w).abs() <= 1e-7, "{p:?} vs {w}");
    }
    let top = labels::top_k_indices(&t["logits.rand"], 5).unwrap();
    assert_eq!(
        top[0].iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![17, 94, 34, 59, 20]
    );
    assert_eq!(
        top[1].iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![17, 94, 34, 29, 84]
    );
}
