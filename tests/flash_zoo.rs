//! The FlashInternImage entries of the zoo against the spec (`../shared/spec/flash-internimage.md`
//! sections 3 and 4), written out here independently of the crate's code, and the README table.

use internimage::zoo::{self, LabelSet, Variant, WeightFormat};
use internimage::Config;

/// name, variant, Hub file, input size, top-1, exact parameters, README params.
const FLASH: [(&str, Variant, &str, u32, f32, u64); 4] = [
    (
        "flash_internimage_t_1k_224",
        Variant::FlashT,
        "flash_intern_image_t_1k_224.pth",
        224,
        83.6,
        29_815_528,
    ),
    (
        "flash_internimage_s_1k_224",
        Variant::FlashS,
        "flash_intern_image_s_1k_224.pth",
        224,
        84.4,
        50_067_496,
    ),
    (
        "flash_internimage_b_1k_224",
        Variant::FlashB,
        "flash_intern_image_b_1k_224.pth",
        224,
        84.9,
        97_448_960,
    ),
    (
        "flash_internimage_l_22kto1k_384",
        Variant::FlashL,
        "flash_internimage_l_22kto1k_384.pth",
        384,
        88.1,
        223_297_080,
    ),
];

#[test]
fn entries_match_the_spec() {
    for (name, variant, file, size, top1, params) in FLASH {
        let m = zoo::get(name).unwrap();
        assert_eq!(m.variant, variant);
        assert!(m.variant.is_flash());
        assert_eq!(m.hub.repo, "OpenGVLab/DCNv4");
        assert_eq!(m.hub.format, WeightFormat::Pth);
        assert_eq!(
            m.hub.config_file, None,
            "{name}: the repo has no config.json"
        );
        let files: Vec<&str> = m.hub.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(files, [file]);
        assert_eq!(m.num_classes, 1000);
        assert_eq!(m.label_set, LabelSet::Imagenet1k);
        assert_eq!(m.input_size, size);
        assert_eq!(m.preprocess.crop_size, size);
        assert_eq!(m.metrics.top1, Some(top1));
        assert_eq!(m.metrics.params, params);
        let cfg = m.config();
        assert!(cfg.is_flash());
        assert_eq!(cfg, Config::preset(variant.as_str()).unwrap());
    }
    let cfg_b = zoo::get("flash_internimage_b_1k_224").unwrap().config();
    assert_eq!(cfg_b.offset_scale, 0.5);
    let cfg_l = zoo::get("flash_internimage_l_22kto1k_384")
        .unwrap()
        .config();
    assert!(cfg_l.mlp_fc2_bias && cfg_l.dcn_output_bias && cfg_l.offset_scale == 2.0);
    let cfg_t = zoo::get("flash_internimage_t_1k_224").unwrap().config();
    assert!(cfg_t.dw_kernel_size.is_none() && !cfg_t.post_norm && cfg_t.layer_scale.is_none());
    // The shared repo id does not resolve to one of the four models.
    assert!(zoo::get("OpenGVLab/DCNv4").is_err());
}

#[test]
fn readme_table_lists_them() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for (name, _, _, _, top1, _) in FLASH {
        let row = readme
            .lines()
            .find(|l| l.starts_with('|') && l.contains(&format!("`{name}`")))
            .unwrap_or_else(|| panic!("README has no table row for {name}"));
        assert!(row.contains(&format!("{top1}")), "{row}");
    }
}
