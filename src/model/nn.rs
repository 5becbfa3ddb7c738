//! Small shared helpers: LayerNorm loading and the debug-activation recorder.

use candle_core::{Result, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

/// LayerNorm epsilon used everywhere in InternImage.
pub const LN_EPS: f64 = 1e-6;

/// Loads an affine LayerNorm (`weight`, `bias`) with eps 1e-6.
pub(crate) fn layer_norm(size: usize, vb: VarBuilder) -> Result<LayerNorm> {
    let weight = vb.get(size, "weight")?;
    let bias = vb.get(size, "bias")?;
    Ok(LayerNorm::new(weight, bias, LN_EPS))
}

/// Collects named intermediate activations when enabled (parity debugging).
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    items: Option<Vec<(String, Tensor)>>,
    prefix: String,
}

impl Recorder {
    pub(crate) fn off() -> Self {
        Self::default()
    }

    pub(crate) fn enabled() -> Self {
        Self {
            items: Some(Vec::new()),
            prefix: String::new(),
        }
    }

    pub(crate) fn on(&self) -> bool {
        self.items.is_some()
    }

    pub(crate) fn set_prefix(&mut self, prefix: &str) {
        self.prefix = prefix.to_string();
    }

    pub(crate) fn put(&mut self, name: &str, t: &Tensor) {
        if let Some(items) = &mut self.items {
            items.push((format!("{}{}", self.prefix, name), t.clone()));
        }
    }

    pub(crate) fn into_items(self) -> Vec<(String, Tensor)> {
        self.items.unwrap_or_default()
    }
}
