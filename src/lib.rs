//! InternImage (CVPR 2023) for Candle.
//!
//! (Crate-level docs with a runnable example are written once the public API settles.)

pub mod checkpoint;
#[cfg(feature = "hub")]
pub mod hub;
pub mod model;
pub mod labels;
pub mod ops;
#[cfg(feature = "image")]
pub mod preprocess;
pub mod zoo;

pub use ops::dcnv3::{dcnv3, Dcnv3Config};
pub use model::{Config, DcnSampling, Dcnv3Layer, Dcnv3LayerConfig, InternImage};
