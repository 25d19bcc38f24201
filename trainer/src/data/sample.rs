//! A training sample in latent space, whatever its source: the packed target latent, the
//! caption embeddings and the references with their correspondences as token pairs.

use candle_core::Tensor;
use datasets::{TokenGrid, TokenPair};

/// One reference image: packed latent tokens and its correspondences to the target.
#[derive(Clone)]
pub struct RefSample {
    /// [M_k, 64]
    pub latent: Tensor,
    pub grid: TokenGrid,
    pub pairs: Vec<TokenPair>,
}

#[derive(Clone)]
pub struct Sample {
    /// [N, 64] packed clean target latent.
    pub x0: Tensor,
    pub grid: TokenGrid,
    /// [L, context_dim]
    pub txt: Tensor,
    /// [pooled_dim]
    pub pooled: Tensor,
    pub refs: Vec<RefSample>,
}
