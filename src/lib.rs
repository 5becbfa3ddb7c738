//! InternImage (CVPR 2023) for [Candle](https://github.com/huggingface/candle): the DCNv3
//! deformable-convolution operator (CPU, CUDA, Metal; forward and backward) and every released
//! InternImage variant (T, S, B, L, XL, H, G), loading the official checkpoints unchanged.
//!
//! * [`ops::dcnv3()`]: the DCNv3 core as a Candle `CustomOp3` (channels-last, any batch size,
//!   f32/f16/bf16, differentiable); [`ops::dcnv4()`]: the DCNv4 core of FlashInternImage (one
//!   packed offset_mask, mask as given) on the same kernels, a `CustomOp2`.
//! * FlashInternImage T/S/B/L: [`Config::flash_t`] ... [`Config::flash_l`] (`core_op: "DCNv4"`).
//! * [`InternImage`] / [`Config`]: the network; [`InternImage::forward_features`] gives the four
//!   NCHW stage maps a detector needs, [`InternImage::backbone`] builds it without a head.
//! * [`zoo`]: the registry of released checkpoints (`weights-manifest.json`), `hub` (feature
//!   `hub`): cached, verified downloads from the Hugging Face Hub, `preprocess` (feature `image`):
//!   the official evaluation transform, [`labels`]: ImageNet-1k/22k names.
//! * [`Error`]: the typed failures of the I/O layers (offline and not cached, not on the Hub,
//!   integrity, truncated checkpoint, missing tensor, image too large, ...) inside the
//!   `candle_core::Error` every function returns; [`Error::find`] gets them back.
//!
//! Classify a photo with a released model (downloads ~120 MB on first use):
//!
//! ```no_run
//! # #[cfg(all(feature = "hub", feature = "image"))]
//! # fn main() -> candle_core::Result<()> {
//! use candle_core::{DType, Device, Module};
//! use internimage::{labels, preprocess, zoo, InternImage};
//!
//! let device = Device::Cpu;
//! let entry = zoo::get("internimage_t_1k_224")?;
//! let model = InternImage::from_pretrained(&entry.name, DType::F32, &device)?;
//! let image = preprocess::load_image("assets/chelsea.png", &entry.preprocess, &device)?;
//! let logits = model.forward(&image.unsqueeze(0)?)?;
//! for p in &labels::top_k(&logits, entry.label_set, 5)?[0] {
//!     println!("{:5.1}%  {}", 100.0 * p.probability, p.name);
//! }
//! # Ok(())
//! # }
//! # #[cfg(not(all(feature = "hub", feature = "image")))]
//! # fn main() {}
//! ```
//!
//! Build a network from a [`Config`] and local weights (this example runs in `cargo test`, on the
//! small test checkpoint in `../shared/fixtures`):
//!
//! ```
//! # fn main() -> candle_core::Result<()> {
//! # let path = "../shared/fixtures/weights/tiny_b.safetensors";
//! # assert!(
//! #     std::path::Path::new(path).exists(),
//! #     "this doctest reads {path}: run it from a checkout with ../shared/fixtures beside it"
//! # );
//! use candle_core::{DType, Device, Module, Tensor};
//! use internimage::{Config, InternImage};
//!
//! // A small B-style network (post-norm, layer scale, offset_scale 2) with 100 classes.
//! let cfg = Config {
//!     channels: 12,
//!     depths: vec![1, 1, 3, 1],
//!     groups: vec![3, 6, 12, 24],
//!     offset_scale: 2.0,
//!     num_classes: 100,
//!     ..Config::b()
//! };
//! let model = InternImage::from_checkpoint(&cfg, path, DType::F32, &Device::Cpu)?;
//! let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 96), &Device::Cpu)?;
//! assert_eq!(model.forward(&x)?.dims(), &[2, 100]);
//! let levels = model.forward_features(&x)?; // NCHW, strides 4, 8, 16, 32
//! assert_eq!(levels[3].dims(), &[2, 96, 2, 3]);
//! # Ok(())
//! # }
//! ```
//!
//! The operator alone (InternImage's 3x3 setting, 4 groups of 16 channels):
//!
//! ```
//! # fn main() -> candle_core::Result<()> {
//! use candle_core::{Device, Tensor};
//! use internimage::{dcnv3, Dcnv3Config};
//!
//! let cfg = Dcnv3Config::internimage(4, 16, 1.0);
//! let dev = Device::Cpu;
//! let input = Tensor::randn(0f32, 1.0, (1, 8, 8, 64), &dev)?;
//! let offset = Tensor::zeros((1, 8, 8, 4 * 9 * 2), candle_core::DType::F32, &dev)?;
//! let mask = Tensor::full(1f32 / 9.0, (1, 8, 8, 4 * 9), &dev)?; // zero offsets + uniform mask = 3x3 box filter
//! let out = dcnv3(&input, &offset, &mask, &cfg)?;
//! assert_eq!(out.dims(), &[1, 8, 8, 64]);
//! # Ok(())
//! # }
//! ```

pub mod checkpoint;
pub mod cpu;
pub mod error;
#[cfg(feature = "hub")]
pub mod hub;
pub mod labels;
pub mod memory;
pub mod model;
pub mod ops;
pub mod optim;
#[cfg(feature = "image")]
pub mod preprocess;
pub mod zoo;

/// Services share one model across threads (`Arc<InternImage>`): a compile-time check that it
/// stays `Send + Sync` (tests/thread_safety.rs checks the results).
const _: fn() = {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<InternImage>
};

pub use cpu::{Isa, KernelPolicy};
pub use error::Error;
pub use model::{
    Config, CoreOp, DcnSampling, Dcnv3Layer, Dcnv3LayerConfig, InternImage, TrainOptions,
    Trainable, TrainableModel,
};
pub use ops::dcnv3::{dcnv3, Dcnv3Config};
pub use ops::dcnv4::dcnv4;
pub use optim::AdamW;
