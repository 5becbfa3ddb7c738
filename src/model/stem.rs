//! The stem (`patch_embed`): two stride-2 3x3 convolutions with LayerNorm and GELU.

use crate::cpu::KernelPolicy;
use crate::model::nn::{layer_norm, Conv2d, LayerNorm};
use crate::ops::gelu_erf_with;
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// conv1 -> LN -> GELU -> conv2 -> LN; NCHW image in, NHWC features (stride 4) out.
#[derive(Debug, Clone)]
pub(crate) struct Stem {
    conv1: Conv2d,
    norm1: LayerNorm,
    conv2: Conv2d,
    norm2: LayerNorm,
    policy: KernelPolicy,
}

impl Stem {
    pub(crate) fn new(
        in_chans: usize,
        c: usize,
        vb: VarBuilder,
        policy: KernelPolicy,
    ) -> Result<Self> {
        Ok(Self {
            conv1: Conv2d::load_s2(in_chans, c / 2, true, vb.pp("conv1"), policy)?,
            norm1: layer_norm(c / 2, vb.pp("norm1.1"), policy)?,
            conv2: Conv2d::load_s2(c / 2, c, true, vb.pp("conv2"), policy)?,
            norm2: layer_norm(c, vb.pp("norm2.1"), policy)?,
            policy,
        })
    }
}

impl Module for Stem {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let x = self.conv1.forward_nhwc(&xs.permute((0, 2, 3, 1))?)?;
        let x = gelu_erf_with(&self.norm1.forward(&x)?, self.policy)?;
        self.norm2.forward(&self.conv2.forward_nhwc(&x)?)
    }
}
