//! InternImage (CVPR 2023) for Candle.
//!
//! (Crate-level docs with a runnable example are written once the public API settles.)

pub mod ops;
pub mod zoo;

pub use ops::dcnv3::{dcnv3, Dcnv3Config};
