//! Validates `weights-manifest.json` against the facts of the spec (`../shared/spec/internimage.md`
//! sections 1.1, 1.2 and 4), written out here independently of the crate's code.

use internimage::zoo::{self, LabelSet, Variant, WeightFormat};
use std::collections::HashSet;

/// Spec §1.1, one row per variant: channels, depths, groups, layer_scale, offset_scale,
/// post_norm, res_post_norm, number of level-2 post norms, dw kernel, centre feature scale,
/// CLIP-projector head.
struct Arch {
    c: usize,
    depths: [usize; 4],
    groups: [usize; 4],
    layer_scale: bool,
    offset_scale: f64,
    post_norm: bool,
    res_post_norm: bool,
    level2_post_norms: usize,
    dw_k: usize,
    cfs: bool,
    clip: bool,
}

fn arch(v: Variant) -> Arch {
    let a = |c, depths, groups, ls, os, post, rpn, l2, k, cfs, clip| Arch {
        c,
        depths,
        groups,
        layer_scale: ls,
        offset_scale: os,
        post_norm: post,
        res_post_norm: rpn,
        level2_post_norms: l2,
        dw_k: k,
        cfs,
        clip,
    };
    match v {
        Variant::T => a(
            64,
            [4, 4, 18, 4],
            [4, 8, 16, 32],
            false,
            1.0,
            false,
            false,
            0,
            3,
            false,
            false,
        ),
        Variant::S => a(
            80,
            [4, 4, 21, 4],
            [5, 10, 20, 40],
            true,
            1.0,
            true,
            false,
            0,
            3,
            false,
            false,
        ),
        Variant::B => a(
            112,
            [4, 4, 21, 4],
            [7, 14, 28, 56],
            true,
            1.0,
            true,
            false,
            0,
            3,
            false,
            false,
        ),
        Variant::L => a(
            160,
            [5, 5, 22, 5],
            [10, 20, 40, 80],
            true,
            2.0,
            true,
            false,
            0,
            3,
            false,
            false,
        ),
        Variant::Xl => a(
            192,
            [5, 5, 24, 5],
            [12, 24, 48, 96],
            true,
            2.0,
            true,
            false,
            0,
            3,
            false,
            false,
        ),
        Variant::H => a(
            320,
            [6, 6, 32, 6],
            [10, 20, 40, 80],
            false,
            1.0,
            false,
            true,
            5,
            5,
            true,
            true,
        ),
        Variant::G => a(
            512,
            [2, 2, 48, 4],
            [16, 32, 64, 128],
            false,
            1.0,
            true,
            false,
            8,
            5,
            true,
            true,
        ),
        // FlashInternImage entries are checked by tests/flash_zoo.rs.
        v => panic!("{v:?} is not an InternImage (DCNv3) variant"),
    }
}

/// The InternImage (DCNv3) entries of the zoo (the FlashInternImage ones are checked by
/// tests/flash_zoo.rs).
fn dcnv3_models() -> Vec<&'static zoo::PretrainedModel> {
    zoo::list()
        .unwrap()
        .iter()
        .filter(|m| !m.variant.is_flash())
        .collect()
}

/// Parameter count from the state-dict layout of spec §2.5 (all tensors except BN buffers).
fn param_count(a: &Arch, n: u64) -> u64 {
    let c0 = a.c as u64;
    let h = c0 / 2;
    let mut p = 3 * h * 9 + h + 2 * h + h * c0 * 9 + c0 + 2 * c0;
    for i in 0..4 {
        let c = c0 << i;
        let g = a.groups[i] as u64;
        let k = a.dw_k as u64;
        let mut blk = 2 * c // norm1
            + c * k * k + c + 2 * c // depthwise conv + its LN
            + g * 18 * c + g * 18 // offset
            + g * 9 * c + g * 9 // mask
            + 2 * (c * c + c) // input/output proj
            + 2 * c // norm2
            + 4 * c * c + 4 * c + 4 * c * c + c; // mlp
        if a.layer_scale {
            blk += 2 * c;
        }
        if a.cfs {
            blk += g * c + g;
        }
        if a.res_post_norm {
            blk += 4 * c;
        }
        p += blk * a.depths[i] as u64;
        if !a.post_norm || a.cfs {
            p += 2 * c;
        }
        if i == 2 {
            p += a.level2_post_norms as u64 * 2 * c;
        }
        if i < 3 {
            p += 2 * c * c * 9 + 4 * c;
        }
    }
    if a.clip {
        p += 8 * c0 * 4096 + 4096 + 4 * c0 * 1024 + 1024;
        p += 6 * 1024 + 3 * 1024 * 1024 + 3 * 1024 + 1024 * 768 + 768 + 2 * 768;
        p += 768 * n + n;
    } else {
        p += 8 * c0 * 12 * c0 + 2 * 12 * c0 + 12 * c0 * n + n;
    }
    p
}

/// Spec §1.2 / §4: name, variant, classes, resolution, `.pth` file, top-1, README params.
type Release = (
    &'static str,
    Variant,
    usize,
    u32,
    &'static str,
    Option<f32>,
    &'static str,
);
const RELEASES: [Release; 11] = [
    (
        "internimage_t_1k_224",
        Variant::T,
        1000,
        224,
        "internimage_t_1k_224.pth",
        Some(83.5),
        "30M",
    ),
    (
        "internimage_s_1k_224",
        Variant::S,
        1000,
        224,
        "internimage_s_1k_224.pth",
        Some(84.2),
        "50M",
    ),
    (
        "internimage_b_1k_224",
        Variant::B,
        1000,
        224,
        "internimage_b_1k_224.pth",
        Some(84.9),
        "97M",
    ),
    (
        "internimage_l_22kto1k_384",
        Variant::L,
        1000,
        384,
        "internimage_l_22kto1k_384.pth",
        Some(87.7),
        "223M",
    ),
    (
        "internimage_xl_22kto1k_384",
        Variant::Xl,
        1000,
        384,
        "internimage_xl_22kto1k_384.pth",
        Some(88.0),
        "335M",
    ),
    (
        "internimage_h_22kto1k_640",
        Variant::H,
        1000,
        640,
        "internimage_h_22kto1k_640.pth",
        Some(89.6),
        "1.08B",
    ),
    (
        "internimage_g_22kto1k_512",
        Variant::G,
        1000,
        512,
        "internimage_g_22kto1k_512.pth",
        Some(90.1),
        "3B",
    ),
    (
        "internimage_l_22k_384",
        Variant::L,
        21841,
        384,
        "internimage_l_22k_192to384.pth",
        None,
        "223M",
    ),
    (
        "internimage_xl_22k_384",
        Variant::Xl,
        21841,
        384,
        "internimage_xl_22k_192to384.pth",
        None,
        "335M",
    ),
    (
        "internimage_h_jointto22k_384",
        Variant::H,
        21841,
        384,
        "internimage_h_jointto22k_384.pth",
        None,
        "1.08B",
    ),
    (
        "internimage_g_jointto22k_384",
        Variant::G,
        21841,
        384,
        "internimage_g_pretrainto22k_384.pth",
        None,
        "3B",
    ),
];

#[test]
fn manifest_lists_every_release_once() {
    let models = dcnv3_models();
    assert_eq!(models.len(), RELEASES.len());
    let names: HashSet<&str> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names.len(), models.len(), "names must be unique");
    for (name, ..) in RELEASES {
        assert!(names.contains(name), "{name} missing from the manifest");
    }
    assert_eq!(zoo::names().unwrap().len(), RELEASES.len() + 4);
}

#[test]
fn entries_match_the_spec() {
    for (name, variant, classes, res, pth, top1, params_readme) in RELEASES {
        let m = zoo::get(name).unwrap();
        assert_eq!(m.name, name);
        assert_eq!(m.variant, variant, "{name}");
        assert_eq!(m.config_spec.preset, variant, "{name}");
        assert_eq!(m.num_classes, classes, "{name}");
        assert_eq!(m.config_spec.num_classes, classes, "{name}");
        let labels = if classes == 1000 {
            LabelSet::Imagenet1k
        } else {
            LabelSet::Imagenet22k
        };
        assert_eq!(m.label_set, labels, "{name}");
        assert_eq!(m.label_set.num_classes(), classes, "{name}");
        assert_eq!(m.input_size, res, "{name}");
        assert_eq!(m.metrics.top1, top1, "{name}");
        assert_eq!(m.metrics.params_readme, params_readme, "{name}");

        // Hub repository and files.
        assert_eq!(m.hub.repo, format!("OpenGVLab/{name}"));
        assert_eq!(m.hub.revision, "main");
        assert_eq!(m.hub.format, WeightFormat::Safetensors);
        assert_eq!(m.hub.key_prefix, "model.");
        assert_eq!(m.hub.config_file.as_deref(), Some("config.json"));
        for f in m.hub.files.iter().chain(m.hub.index_file.iter()) {
            if let Some(sha) = &f.sha256 {
                assert!(
                    sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
                    "{name}: {sha}"
                );
            }
        }
        if name == "internimage_g_jointto22k_384" {
            let files: Vec<&str> = m.hub.files.iter().map(|f| f.name.as_str()).collect();
            assert_eq!(
                files,
                [
                    "model-00001-of-00003.safetensors",
                    "model-00002-of-00003.safetensors",
                    "model-00003-of-00003.safetensors"
                ]
            );
            assert_eq!(
                m.hub.index_file.as_ref().unwrap().name,
                "model.safetensors.index.json"
            );
        } else {
            assert_eq!(m.hub.files.len(), 1, "{name}");
            assert_eq!(m.hub.files[0].name, "model.safetensors", "{name}");
            assert!(m.hub.index_file.is_none(), "{name}");
        }

        // `.pth` alternative.
        let p = m.pth.as_ref().unwrap();
        assert_eq!(p.repo, "OpenGVLab/InternImage");
        assert_eq!(p.file, pth);
        assert_eq!(p.state_dict_key, "model");
        assert_eq!(
            p.url(),
            format!("https://huggingface.co/OpenGVLab/InternImage/resolve/main/{pth}")
        );

        // Spec §4: resize the shorter side to S, centre crop S, ImageNet mean/std.
        assert_eq!(m.preprocess.resize_shorter_side, res, "{name}");
        assert_eq!(m.preprocess.crop_size, res, "{name}");
        assert_eq!(m.preprocess.mean, [0.485, 0.456, 0.406]);
        assert_eq!(m.preprocess.std, [0.229, 0.224, 0.225]);
    }
}

#[test]
fn configs_are_the_presets() {
    for m in dcnv3_models() {
        let cfg = m.config();
        let a = arch(m.variant);
        assert_eq!(cfg.channels, a.c, "{}", m.name);
        assert_eq!(cfg.depths, a.depths, "{}", m.name);
        assert_eq!(cfg.groups, a.groups, "{}", m.name);
        assert_eq!(cfg.layer_scale.is_some(), a.layer_scale, "{}", m.name);
        if let Some(ls) = cfg.layer_scale {
            assert_eq!(ls, 1e-5);
        }
        assert_eq!(cfg.offset_scale, a.offset_scale, "{}", m.name);
        assert_eq!(cfg.post_norm, a.post_norm, "{}", m.name);
        assert_eq!(cfg.res_post_norm, a.res_post_norm, "{}", m.name);
        assert_eq!(cfg.level2_post_norm, a.level2_post_norms > 0, "{}", m.name);
        let ids = cfg.level2_post_norm_block_ids.clone().unwrap_or_default();
        assert_eq!(ids.len(), a.level2_post_norms, "{}", m.name);
        assert!(
            ids.iter().enumerate().all(|(k, &b)| b == 6 * k + 5),
            "{}: {ids:?}",
            m.name
        );
        assert_eq!(cfg.dw_kernel_size.unwrap_or(3), a.dw_k, "{}", m.name);
        assert_eq!(cfg.center_feature_scale, a.cfs, "{}", m.name);
        assert_eq!(cfg.use_clip_projector, a.clip, "{}", m.name);
        assert!(!cfg.remove_center);
        assert_eq!(cfg.mlp_ratio, 4.0);
        assert_eq!(cfg.cls_scale, 1.5);
        assert_eq!(cfg.num_classes, m.num_classes, "{}", m.name);
        cfg.validate().unwrap();
    }
}

#[test]
fn parameter_counts_and_sizes_agree() {
    // The spec's derived counts (§1.1), in millions, 1k head and 21841 head.
    let spec_m = |v: Variant, n: usize| -> f64 {
        match (v, n) {
            (Variant::T, 1000) => 29.92,
            (Variant::S, 1000) => 50.08,
            (Variant::B, 1000) => 97.46,
            (Variant::L, 1000) => 223.33,
            (Variant::Xl, 1000) => 334.82,
            (Variant::H, 1000) => 1089.6,
            (Variant::G, 1000) => 3076.4,
            (Variant::L, 21841) => 263.37,
            (Variant::Xl, 21841) => 382.86,
            (Variant::H, 21841) => 1105.7,
            (Variant::G, 21841) => 3092.4,
            other => panic!("no spec count for {other:?}"),
        }
    };
    let mut sizes_checked = 0;
    for m in dcnv3_models() {
        let derived = param_count(&arch(m.variant), m.num_classes as u64);
        assert_eq!(m.metrics.params, derived, "{}", m.name);
        let spec = spec_m(m.variant, m.num_classes) * 1e6;
        assert!(
            ((derived as f64) - spec).abs() <= 0.0005 * spec,
            "{}: {derived} vs {spec}",
            m.name
        );

        // fp32 checkpoints: size = 4 bytes per parameter (+ header, BN buffers) within 1%.
        assert_eq!(m.hub.dtype, "f32");
        match m.hub.total_size_bytes() {
            Some(size) => {
                let expected = 4.0 * derived as f64;
                let rel = (size as f64 - expected).abs() / expected;
                assert!(
                    rel <= 0.01,
                    "{}: {size} bytes vs {expected} (4 x params), {:.2}%",
                    m.name,
                    rel * 100.0
                );
                sizes_checked += 1;
            }
            None => assert!(
                m.notes
                    .as_deref()
                    .is_some_and(|n| n.contains("size") || n.contains("GB")),
                "{}: unknown size without a note",
                m.name
            ),
        }
    }
    // T, S, L-22k, H joint->22k and the three G joint->22k shards are known from the Hub.
    assert_eq!(sizes_checked, 5);
}

#[test]
fn unknown_name_lists_the_known_ones() {
    let err = zoo::get("internimage_q_1k_224").unwrap_err().to_string();
    assert!(err.contains("internimage_q_1k_224"), "{err}");
    for (name, ..) in RELEASES {
        assert!(err.contains(name), "{name} not listed in: {err}");
    }
    // The Hub id is accepted too.
    assert_eq!(
        zoo::get("OpenGVLab/internimage_s_1k_224").unwrap().name,
        "internimage_s_1k_224"
    );
}
