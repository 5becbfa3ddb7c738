//! The model zoo: every released InternImage checkpoint, read from `weights-manifest.json`.
//! (Skeleton: shared types; the registry is filled in by the zoo work.)

use serde::{Deserialize, Serialize};

/// Which label table a classification head predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelSet {
    /// ImageNet-1k, 1000 classes in ILSVRC-2012 order.
    Imagenet1k,
    /// ImageNet-22k, 21841 classes (sorted fall11 synsets).
    Imagenet22k,
}

/// The evaluation transform of one checkpoint: resize the shorter side, centre crop, normalise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessConfig {
    /// Shorter side after the (bicubic, antialiased) resize.
    pub resize_shorter_side: u32,
    /// Side of the square centre crop.
    pub crop_size: u32,
    /// Per-channel mean (RGB, on the 0..1 scale).
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB, on the 0..1 scale).
    pub std: [f32; 3],
}

impl PreprocessConfig {
    /// The official evaluation transform at `size` (crop ratio 1.0, ImageNet mean/std).
    pub fn imagenet(size: u32) -> Self {
        Self {
            resize_shorter_side: size,
            crop_size: size,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}
