//! Condition dropout (`data.drop_refs`, `data.drop_text`, `data.drop_both`): some samples train
//! without their references (latents set to 0) or without their caption (the empty caption's
//! embeddings), so the model learns the unconditional branches classifier-free guidance uses at
//! inference.
//!
//! As the official dataset does, one uniform draw u per sample decides: u < drop_refs drops the
//! references, then the next drop_text of the unit interval drops the caption, then the next
//! drop_both drops both. The draw comes from the sample's (seed, step, slot) stream, so a
//! resumed run drops exactly the same samples.

use candle_core::Tensor;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainerError};

/// The three probabilities (official: 0.05 each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DropoutSpec {
    pub refs: f64,
    pub text: f64,
    pub both: f64,
}

/// What condition dropout removed from one sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub refs: bool,
    pub text: bool,
}

impl DropoutSpec {
    /// Each probability in [0, 1] and their sum at most 1, naming the `data.*` key.
    pub fn validate(&self) -> Result<()> {
        for (key, p) in [
            ("data.drop_refs", self.refs),
            ("data.drop_text", self.text),
            ("data.drop_both", self.both),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(TrainerError::config(
                    key,
                    format!("{p} is not a probability in [0, 1]"),
                ));
            }
        }
        let sum = self.refs + self.text + self.both;
        if sum > 1.0 {
            return Err(TrainerError::config(
                "data.drop_both",
                format!("data.drop_refs + data.drop_text + data.drop_both = {sum} exceeds 1 (they are exclusive shares of one draw)"),
            ));
        }
        Ok(())
    }

    /// Whether some samples lose their caption (the empty caption's embeddings are needed).
    pub fn drops_text(&self) -> bool {
        self.text > 0.0 || self.both > 0.0
    }

    /// One sample's dropout from its stream; draws nothing when dropout is off.
    pub fn draw(&self, rng: &mut impl Rng) -> Dropped {
        if self.refs + self.text + self.both <= 0.0 {
            return Dropped::default();
        }
        let u: f64 = rng.random();
        if u < self.refs {
            Dropped {
                refs: true,
                text: false,
            }
        } else if u < self.refs + self.text {
            Dropped {
                refs: false,
                text: true,
            }
        } else if u < self.refs + self.text + self.both {
            Dropped {
                refs: true,
                text: true,
            }
        } else {
            Dropped::default()
        }
    }
}

/// The embeddings of the empty caption "", which replace a dropped caption's.
#[derive(Debug, Clone)]
pub struct EmptyCaption {
    /// [L, context_dim]
    pub txt: Tensor,
    /// [pooled_dim]
    pub pooled: Tensor,
}

impl EmptyCaption {
    /// Checks that the embeddings fit samples whose caption embeddings are `txt` and `pooled`.
    pub fn check_fits(&self, txt: &Tensor, pooled: &Tensor) -> Result<()> {
        if self.txt.dims() != txt.dims() || self.pooled.dims() != pooled.dims() {
            return Err(TrainerError::Input {
                name: "the empty caption's embeddings".into(),
                reason: format!(
                    "have shapes {:?} and {:?}, the samples' captions {:?} and {:?} (was the cache made with other text settings?)",
                    self.txt.dims(),
                    self.pooled.dims(),
                    txt.dims(),
                    pooled.dims()
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flux::rng::{stream, Purpose};

    #[test]
    fn shares_of_one_draw_follow_the_probabilities() {
        let spec = DropoutSpec {
            refs: 0.05,
            text: 0.05,
            both: 0.05,
        };
        let n = 40_000;
        let (mut refs, mut text, mut both) = (0, 0, 0);
        for slot in 0..n {
            match spec.draw(&mut stream(7, Purpose::Dropout, &[0, slot])) {
                Dropped {
                    refs: true,
                    text: false,
                } => refs += 1,
                Dropped {
                    refs: false,
                    text: true,
                } => text += 1,
                Dropped {
                    refs: true,
                    text: true,
                } => both += 1,
                _ => {}
            }
        }
        for (what, count) in [("refs", refs), ("text", text), ("both", both)] {
            let share = count as f64 / n as f64;
            assert!((share - 0.05).abs() < 0.006, "{what}: {share}");
        }
    }

    #[test]
    fn off_draws_nothing_and_one_always_drops() {
        let mut r = stream(1, Purpose::Dropout, &[0]);
        assert_eq!(DropoutSpec::default().draw(&mut r), Dropped::default());
        let always = DropoutSpec {
            refs: 0.0,
            text: 0.0,
            both: 1.0,
        };
        assert_eq!(
            always.draw(&mut r),
            Dropped {
                refs: true,
                text: true
            }
        );
    }

    #[test]
    fn bad_probabilities_are_named() {
        let e = DropoutSpec {
            refs: 1.5,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("data.drop_refs"), "{e}");
        let e = DropoutSpec {
            refs: 0.5,
            text: 0.4,
            both: 0.2,
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("exceeds 1"), "{e}");
    }
}
