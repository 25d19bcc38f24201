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

impl Sample {
    /// The position ids of the references' tokens (reference k placed by
    /// `flux::embed::reference_ids`) and each reference's token count: `RefInputs`'s `ids` and
    /// `lens`.
    pub fn ref_positions(&self) -> (Vec<[f32; 3]>, Vec<usize>) {
        let mut ids = Vec::new();
        let mut lens = Vec::new();
        for (k, r) in self.refs.iter().enumerate() {
            ids.extend(flux::embed::reference_ids(r.grid.rows, r.grid.cols, k));
            lens.push(r.grid.len());
        }
        (ids, lens)
    }

    /// The references' latents one after the other [sum of M_k, 64], or zeros of that shape
    /// (references dropped, or zeroed for a measure).
    pub fn ref_latents(&self, zeroed: bool) -> candle_core::Result<Tensor> {
        let all = Tensor::cat(&self.refs.iter().map(|r| &r.latent).collect::<Vec<_>>(), 0)?;
        if zeroed {
            all.zeros_like()
        } else {
            Ok(all)
        }
    }
}
