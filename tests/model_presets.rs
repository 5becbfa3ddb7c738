//! Every preset builds, with the parameter counts of the spec table and the official
//! state-dict names, without allocating the (up to 12 GB of) weights: a recording backend hands
//! out zero-stride broadcast tensors.

mod common;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use internimage::{Config, InternImage};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

type Log = Arc<Mutex<BTreeMap<String, Vec<usize>>>>;

/// Records every requested (name, shape); returns a broadcast scalar (no allocation).
struct Recorder(Log);

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let prev = self
            .0
            .lock()
            .unwrap()
            .insert(name.to_string(), s.dims().to_vec());
        assert!(prev.is_none(), "tensor {name} requested twice");
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("unchecked get of {name}")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        panic!("contains_tensor({name}): the model should not probe for optional tensors")
    }
}

fn record(cfg: &Config, backbone: Option<&[usize]>) -> BTreeMap<String, Vec<usize>> {
    let log: Log = Arc::default();
    let vb = VarBuilder::from_backend(Box::new(Recorder(log.clone())), DType::F32, Device::Cpu);
    let model = match backbone {
        None => InternImage::new(cfg, vb).unwrap(),
        Some(idx) => InternImage::backbone(cfg, idx, vb).unwrap(),
    };
    drop(model);
    let map = log.lock().unwrap().clone();
    map
}

fn is_buffer(name: &str) -> bool {
    name.ends_with("running_mean")
        || name.ends_with("running_var")
        || name.ends_with("num_batches_tracked")
}

fn n_params(names: &BTreeMap<String, Vec<usize>>) -> usize {
    names
        .iter()
        .filter(|(n, _)| !is_buffer(n))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// The official state-dict keys (spec §2.5), written out independently of the model code.
fn official_state_dict(cfg: &Config) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    let mut put = |n: String, s: &[usize]| {
        m.insert(n, s.to_vec());
    };
    let c0 = cfg.channels;
    put("patch_embed.conv1.weight".into(), &[c0 / 2, 3, 3, 3]);
    put("patch_embed.conv1.bias".into(), &[c0 / 2]);
    put("patch_embed.norm1.1.weight".into(), &[c0 / 2]);
    put("patch_embed.norm1.1.bias".into(), &[c0 / 2]);
    put("patch_embed.conv2.weight".into(), &[c0, c0 / 2, 3, 3]);
    put("patch_embed.conv2.bias".into(), &[c0]);
    put("patch_embed.norm2.1.weight".into(), &[c0]);
    put("patch_embed.norm2.1.bias".into(), &[c0]);
    let k = cfg.dw_kernel_size.unwrap_or(3);
    for i in 0..4 {
        let c = c0 << i;
        let g = cfg.groups[i];
        let hid = (c as f64 * cfg.mlp_ratio) as usize;
        for j in 0..cfg.depths[i] {
            let p = format!("levels.{i}.blocks.{j}.");
            for (n, s) in [
                ("norm1.0.weight", vec![c]),
                ("norm1.0.bias", vec![c]),
                ("dcn.dw_conv.0.weight", vec![c, 1, k, k]),
                ("dcn.dw_conv.0.bias", vec![c]),
                ("dcn.dw_conv.1.1.weight", vec![c]),
                ("dcn.dw_conv.1.1.bias", vec![c]),
                ("dcn.offset.weight", vec![g * 18, c]),
                ("dcn.offset.bias", vec![g * 18]),
                ("dcn.mask.weight", vec![g * 9, c]),
                ("dcn.mask.bias", vec![g * 9]),
                ("dcn.input_proj.weight", vec![c, c]),
                ("dcn.input_proj.bias", vec![c]),
                ("dcn.output_proj.weight", vec![c, c]),
                ("dcn.output_proj.bias", vec![c]),
                ("norm2.0.weight", vec![c]),
                ("norm2.0.bias", vec![c]),
                ("mlp.fc1.weight", vec![hid, c]),
                ("mlp.fc1.bias", vec![hid]),
                ("mlp.fc2.weight", vec![c, hid]),
                ("mlp.fc2.bias", vec![c]),
            ] {
                put(format!("{p}{n}"), &s);
            }
            if cfg.layer_scale.is_some() {
                put(format!("{p}gamma1"), &[c]);
                put(format!("{p}gamma2"), &[c]);
            }
            if cfg.center_feature_scale {
                put(format!("{p}dcn.center_feature_scale_proj_weight"), &[g, c]);
                put(format!("{p}dcn.center_feature_scale_proj_bias"), &[g]);
            }
            if cfg.res_post_norm {
                for n in [
                    "res_post_norm1.0.weight",
                    "res_post_norm1.0.bias",
                    "res_post_norm2.0.weight",
                    "res_post_norm2.0.bias",
                ] {
                    put(format!("{p}{n}"), &[c]);
                }
            }
        }
        if !cfg.post_norm || cfg.center_feature_scale {
            put(format!("levels.{i}.norm.0.weight"), &[c]);
            put(format!("levels.{i}.norm.0.bias"), &[c]);
        }
        if i == 2 && cfg.level2_post_norm {
            for kk in 0..cfg.level2_post_norm_block_ids.as_ref().unwrap().len() {
                put(format!("levels.2.post_norms.{kk}.0.weight"), &[c]);
                put(format!("levels.2.post_norms.{kk}.0.bias"), &[c]);
            }
        }
        if i < 3 {
            put(
                format!("levels.{i}.downsample.conv.weight"),
                &[2 * c, c, 3, 3],
            );
            put(format!("levels.{i}.downsample.norm.1.weight"), &[2 * c]);
            put(format!("levels.{i}.downsample.norm.1.bias"), &[2 * c]);
        }
    }
    if cfg.num_classes > 0 {
        let c3 = c0 * 8;
        if cfg.use_clip_projector {
            put("dcnv3_head_x4.0.weight".into(), &[4096, c3, 1, 1]);
            put("dcnv3_head_x4.0.bias".into(), &[4096]);
            put("dcnv3_head_x3.weight".into(), &[1024, c0 * 4, 1, 1]);
            put("dcnv3_head_x3.bias".into(), &[1024]);
            for x in ["q", "k", "v"] {
                put(format!("clip_projector.norm1_{x}.0.weight"), &[1024]);
                put(format!("clip_projector.norm1_{x}.0.bias"), &[1024]);
                put(
                    format!("clip_projector.cross_dcn.{x}.weight"),
                    &[1024, 1024],
                );
                put(format!("clip_projector.cross_dcn.{x}_bias"), &[1024]);
            }
            put("clip_projector.cross_dcn.proj.weight".into(), &[768, 1024]);
            put("clip_projector.cross_dcn.proj.bias".into(), &[768]);
            put("fc_norm.0.weight".into(), &[768]);
            put("fc_norm.0.bias".into(), &[768]);
            put("head.weight".into(), &[cfg.num_classes, 768]);
            put("head.bias".into(), &[cfg.num_classes]);
        } else {
            let ch = (c3 as f64 * cfg.cls_scale) as usize;
            put("conv_head.0.weight".into(), &[ch, c3, 1, 1]);
            for n in ["weight", "bias", "running_mean", "running_var"] {
                put(format!("conv_head.1.0.{n}"), &[ch]);
            }
            put("conv_head.1.0.num_batches_tracked".into(), &[]);
            put("head.weight".into(), &[cfg.num_classes, ch]);
            put("head.bias".into(), &[cfg.num_classes]);
        }
    }
    m
}

/// (name, config, params with the 1k head, with the 21841 head, backbone only) from the spec table;
/// the number of decimals is the precision the table states.
fn table() -> Vec<(
    &'static str,
    Config,
    &'static str,
    Option<&'static str>,
    &'static str,
)> {
    vec![
        ("T", Config::t(), "29.92", None, "28.75"),
        ("S", Config::s(), "50.08", None, "48.50"),
        ("B", Config::b(), "97.46", None, "94.91"),
        ("L", Config::l(), "223.33", Some("263.37"), "218.95"),
        ("XL", Config::xl(), "334.82", Some("382.86"), "328.97"),
        ("H", Config::h(), "1089.6", Some("1105.7"), "1073.1"),
        ("G", Config::g(), "3076.4", Some("3092.4"), "3052.8"),
    ]
}

fn millions(n: usize, like: &str) -> String {
    let decimals = like.split('.').nth(1).map_or(0, |d| d.len());
    format!("{:.*}", decimals, n as f64 / 1e6)
}

fn check_names(variant: &str, cfg: &Config, recorded: &BTreeMap<String, Vec<usize>>) {
    let mut official = official_state_dict(cfg);
    // num_batches_tracked is never read (an int64 counter with no effect at inference).
    official.remove("conv_head.1.0.num_batches_tracked");
    let missing: Vec<_> = official
        .keys()
        .filter(|k| !recorded.contains_key(*k))
        .collect();
    let extra: Vec<_> = recorded
        .keys()
        .filter(|k| !official.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{variant}: not requested {missing:?}, unexpected {extra:?}"
    );
    for (k, s) in &official {
        assert_eq!(&recorded[k], s, "{variant}: shape of {k}");
    }
}

#[test]
fn presets_parameter_counts_and_names() {
    for (variant, cfg, p1k, p22k, pbb) in table() {
        let rec = record(&cfg, None);
        check_names(variant, &cfg, &rec);
        assert_eq!(millions(n_params(&rec), p1k), p1k, "{variant} 1k params");

        if let Some(p22k) = p22k {
            let cfg22 = cfg.clone().with_num_classes(21841);
            let rec = record(&cfg22, None);
            check_names(variant, &cfg22, &rec);
            assert_eq!(millions(n_params(&rec), p22k), p22k, "{variant} 22k params");
        }

        let cfg0 = cfg.clone().with_num_classes(0);
        let rec0 = record(&cfg0, None);
        check_names(variant, &cfg0, &rec0);
        assert_eq!(
            millions(n_params(&rec0), pbb),
            pbb,
            "{variant} backbone params"
        );
        // backbone() ignores num_classes and builds the same trunk.
        let rec_bb = record(&cfg, Some(&[1, 2, 3]));
        assert_eq!(rec_bb, rec0, "{variant} backbone()");
    }
}

#[test]
fn t_state_dict_has_633_tensors() {
    let official = official_state_dict(&Config::t());
    assert_eq!(official.len(), 633);
    assert_eq!(official.keys().filter(|k| is_buffer(k)).count(), 3);
    let rec = record(&Config::t(), None);
    // Everything but num_batches_tracked is read.
    assert_eq!(rec.len(), 632);
}

/// The requested names are exactly the keys of the official tiny checkpoints.
#[test]
fn tiny_checkpoints_names_match() {
    for (net, count) in [("tiny_b", 157), ("tiny_h", 233)] {
        let v = common::net_meta(net);
        let cfg = common::config_of_meta(&v);
        let path = common::net_weights(net, "pth");
        let infos = candle_core::pickle::read_pth_tensor_info(&path, false, Some("model")).unwrap();
        assert_eq!(infos.len(), count);
        let file: BTreeMap<String, Vec<usize>> = infos
            .into_iter()
            .filter(|i| !i.name.ends_with("num_batches_tracked"))
            .map(|i| (i.name.clone(), i.layout.dims().to_vec()))
            .collect();
        let rec = record(&cfg, None);
        assert_eq!(rec, file, "{net}");
        check_names(net, &cfg, &rec);
        assert_eq!(
            n_params(&rec),
            v["n_params"].as_u64().unwrap() as usize,
            "{net} n_params"
        );
    }
}

#[test]
fn config_json_round_trip_and_validation() {
    // HF config.json of internimage_h_22kto1k_640-like content: extra fields are ignored.
    let json = r#"{"architectures":["InternImageModelForImageClassification"],"auto_map":{},
        "act_layer":"GELU","center_feature_scale":true,"channels":320,"cls_scale":1.5,"core_op":"DCNv3",
        "depths":[6,6,32,6],"drop_path_rate":0.0,"drop_path_type":"linear","drop_rate":0.0,
        "dw_kernel_size":5,"groups":[10,20,40,80],"layer_scale":null,"level2_post_norm":true,
        "level2_post_norm_block_ids":[5,11,17,23,29],"mlp_ratio":4.0,"model_type":"internimage",
        "norm_layer":"LN","num_classes":1000,"offset_scale":1.0,"post_norm":false,"remove_center":false,
        "res_post_norm":true,"torch_dtype":"float32","transformers_version":"4.37.2",
        "use_clip_projector":true,"with_cp":false}"#;
    assert_eq!(Config::from_json_str(json).unwrap(), Config::h());
    assert_eq!(Config::from_json_str("{}").unwrap(), Config::t());
    let err = Config::from_json_str(r#"{"channels": 64, "groups": [3, 8, 16, 32]}"#).unwrap_err();
    assert!(err.to_string().contains("groups"), "{err}");
    let err = Config::from_json_str(r#"{"depths": [1, 2, 3]}"#).unwrap_err();
    assert!(err.to_string().contains("4 entries"), "{err}");
    let err = Config::from_json_str(r#"{"level2_post_norm": true}"#).unwrap_err();
    assert!(
        err.to_string().contains("level2_post_norm_block_ids"),
        "{err}"
    );
    let err =
        Config::from_json_str(r#"{"level2_post_norm": true, "level2_post_norm_block_ids": [18]}"#)
            .unwrap_err();
    assert!(err.to_string().contains("18"), "{err}");
    let err = Config::from_json_str(r#"{"dw_kernel_size": 4}"#).unwrap_err();
    assert!(err.to_string().contains("odd"), "{err}");
    assert!(Config::from_json_str("not json").is_err());
    for v in ["t", "S", "b", "l", "XL", "h", "g"] {
        Config::preset(v).unwrap().validate().unwrap();
    }
    assert!(Config::preset("m").is_err());
}
