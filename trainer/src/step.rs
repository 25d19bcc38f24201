//! One optimizer step, in three phases: accumulate (forward and backward over this rank's
//! micro-batches, gradients all-reduced bucket by bucket during the last backward), agree (one
//! small all-reduce so that every rank takes the same decisions), update (clip, AdamW, EMA).

use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::{Device, Tensor};
use flux::grad::{GradSink, NoSink};

use crate::config::OnNonFinite;
use crate::data::sample::Sample;
use crate::ddp::consistency::check_lora;
use crate::ddp::{Dist, GradReducer, ReduceOp};
use crate::error::{Result, TrainerError};
use crate::metrics::StepMetrics;
use crate::objective::{self, DrawAt, LossParts};
use crate::optim::{clip_factor, global_norm, lr_at};
use crate::run::{lora_vars, Run};

/// What this rank computed in a step, before the ranks agree.
pub struct Accumulated {
    /// LoRA gradients, already averaged over micro-steps and ranks.
    pub grads: Vec<Tensor>,
    /// This rank's losses, averaged over its micro-steps.
    pub parts: LossParts,
    /// Tokens processed by all ranks.
    pub tokens: usize,
}

/// What every rank learns from the step's one small all-reduce, so all decide the same: the
/// mean losses, whether any rank saw a non-finite loss or was asked to stop, and (with shards)
/// every rank's data cursor, which a checkpoint keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct StepAgreement {
    pub losses: LossParts,
    pub any_nonfinite: bool,
    pub any_stop: bool,
    pub cursors: Option<Vec<datasets::Cursor>>,
}

/// Slots of the packed vector before the cursors.
const FIXED_SLOTS: usize = 6;

impl StepAgreement {
    /// This rank's contribution: summed over ranks, [`Self::unpack`] reads the agreement.
    /// Cursors take two slots per rank, zero except this rank's own.
    pub fn pack(
        parts: &LossParts,
        stop: bool,
        cursor: Option<datasets::Cursor>,
        rank: usize,
        world: usize,
    ) -> Vec<f64> {
        let mut v = vec![
            parts.total,
            parts.diff,
            parts.scal,
            parts.mdl,
            f64::from(u8::from(!parts.total.is_finite())),
            f64::from(u8::from(stop)),
        ];
        if let Some(c) = cursor {
            let mut slots = vec![0f64; 2 * world];
            slots[2 * rank] = c.epoch as f64;
            slots[2 * rank + 1] = c.batch as f64;
            v.extend(slots);
        }
        v
    }

    /// The agreement from the sum over `world` ranks of their packed vectors.
    pub fn unpack(sum: &[f64], world: usize) -> Self {
        let w = world as f64;
        let cursors = (sum.len() > FIXED_SLOTS).then(|| {
            sum[FIXED_SLOTS..]
                .chunks(2)
                .map(|c| datasets::Cursor {
                    epoch: c[0] as u64,
                    batch: c[1] as usize,
                })
                .collect()
        });
        Self {
            losses: LossParts {
                total: sum[0] / w,
                diff: sum[1] / w,
                scal: sum[2] / w,
                mdl: sum[3] / w,
            },
            any_nonfinite: sum[4] > 0.0,
            any_stop: sum[5] > 0.0,
            cursors,
        }
    }

    /// Packs, all-reduces and unpacks.
    pub fn reach(
        dist: &Dist,
        device: &Device,
        parts: &LossParts,
        stop: bool,
        cursor: Option<datasets::Cursor>,
    ) -> Result<Self> {
        let (rank, world) = (dist.rank(), dist.world_size());
        let mine = Self::pack(parts, stop, cursor, rank, world);
        let t = Tensor::new(mine.as_slice(), device)?;
        let sum = dist
            .call("step agreement all-reduce", move |c| {
                c.all_reduce(&t, ReduceOp::Sum)
            })?
            .to_vec1::<f64>()?;
        Ok(Self::unpack(&sum, world))
    }
}

impl Run {
    /// One optimizer step (over `train.grad_accum` micro-batches on every rank).
    pub fn train_step(&mut self, step: u64) -> Result<(StepMetrics, LossParts)> {
        let started = Instant::now();
        let acc = self.accumulate(step)?;
        self.finish_step(step, acc, started)
    }

    /// The rest of a step after [`Run::accumulate`]: the ranks agree, the update, the periodic
    /// weight check, and the step's metrics timed from `started`.
    pub fn finish_step(
        &mut self,
        step: u64,
        acc: Accumulated,
        started: Instant,
    ) -> Result<(StepMetrics, LossParts)> {
        let agreed = StepAgreement::reach(
            &self.dist,
            &self.device,
            &acc.parts,
            self.stop_requested.load(Ordering::SeqCst),
            self.data.shard_cursor(),
        )?;
        self.stop_agreed = agreed.any_stop;
        if let Some(cursors) = &agreed.cursors {
            self.ledger.data_cursors = cursors.clone();
        }
        let (lr, grad_norm, skipped) = self.update(step, acc.grads, &agreed)?;
        let every = self.cfg.distributed.check_weights_every;
        if every > 0 && (step + 1).is_multiple_of(every) {
            check_lora(&self.dist, &self.lora, &format!("after step {}", step + 1))?;
        }
        let secs = started.elapsed().as_secs_f64();
        let parts = agreed.losses;
        let m = StepMetrics {
            step: step + 1,
            loss: parts.total,
            loss_diff: parts.diff,
            loss_scal: parts.scal,
            loss_mdl: parts.mdl,
            grad_norm,
            lr,
            s_per_step: secs,
            tokens_per_s: acc.tokens as f64 / secs.max(1e-9),
            skipped,
        };
        Ok((m, parts))
    }

    /// Forward and backward over this rank's micro-batches. Non-final micro-steps accumulate
    /// locally with no communication; on the final one each bucket is averaged over micro-steps
    /// and ranks as soon as the backward pass has finished it.
    pub fn accumulate(&mut self, step: u64) -> Result<Accumulated> {
        let accum = self.cfg.train.grad_accum;
        let batch = self.cfg.train.batch_size;
        let (rank, world) = (self.dist.rank(), self.dist.world_size());
        let with_rows = self.objective().needs_rows(step);
        let mut sum: Option<Vec<Tensor>> = None;
        let mut out = Accumulated {
            grads: Vec::new(),
            parts: LossParts::default(),
            tokens: 0,
        };
        for micro in 0..accum {
            let owned = self.data.next_micro_batch(rank, batch)?;
            let samples: Vec<&Sample> = owned.iter().collect();
            let _span = tracing::debug_span!("forward_backward", step, micro).entered();
            // Draws are keyed by the sample's slot in the step's global batch, so they do not
            // depend on how the batch is split over ranks.
            let at = DrawAt {
                seed: self.cfg.run.seed,
                step,
                first_slot: ((micro * world + rank) * batch) as u64,
            };
            let prep = objective::prepare(
                &self.objective(),
                &samples,
                at,
                with_rows,
                self.model.dtype(),
                &self.device,
            )?;
            let mut reducer = (micro + 1 == accum)
                .then(|| GradReducer::new(&self.plan, &self.dist, sum.take(), 1.0 / accum as f64));
            let mut local = NoSink;
            let (p, g) = objective::loss_and_lora_grads_into(
                &self.model,
                &self.lora,
                &prep,
                &self.objective(),
                step,
                self.cfg.train.checkpointing,
                match reducer.as_mut() {
                    Some(r) => r as &mut dyn GradSink<TrainerError>,
                    None => &mut local,
                },
            )?;
            match reducer {
                Some(r) => out.grads = r.finish(&g)?,
                None => sum = Some(add_grads(sum.take(), g)?),
            }
            out.tokens += prep.tokens * samples.len() * world;
            out.parts.add_scaled(&p, 1.0 / accum as f64);
        }
        Ok(out)
    }

    /// Clips and applies the agreed gradients (AdamW, then EMA), or skips the update when a
    /// loss or the gradient is not finite. Returns (learning rate, gradient norm, skipped).
    pub fn update(
        &mut self,
        step: u64,
        grads: Vec<Tensor>,
        agreed: &StepAgreement,
    ) -> Result<(f64, f64, bool)> {
        let _phase = flux::profile::phase("update: clip, AdamW, EMA", &self.device);
        let lr = lr_at(&self.cfg.optim, step, self.cfg.train.max_steps);
        let norm = global_norm(&grads)?;
        let skipped = agreed.any_nonfinite || !norm.is_finite();
        if skipped {
            let what = format!("loss {}, grad norm {norm}", agreed.losses.total);
            match self.cfg.train.on_nonfinite {
                OnNonFinite::Stop => return Err(TrainerError::NonFinite { step, what }),
                OnNonFinite::Skip => {
                    tracing::warn!(step, %what, "non-finite loss or gradient: update skipped, weights unchanged")
                }
            }
            return Ok((lr, norm, true));
        }
        let _span = tracing::debug_span!("optimizer", step).entered();
        let vars = lora_vars(&self.lora);
        let grad_scale = clip_factor(norm, self.cfg.optim.clip());
        self.opt
            .step(&self.cfg.optim, &vars, &grads, lr, grad_scale)?;
        if let Some(ema) = &mut self.ema {
            ema.update(&vars, step)?;
        }
        Ok((lr, norm, false))
    }
}

/// `acc + g`, elementwise per tensor (`g` when nothing is accumulated yet).
fn add_grads(acc: Option<Vec<Tensor>>, g: Vec<Tensor>) -> Result<Vec<Tensor>> {
    Ok(match acc {
        None => g,
        Some(acc) => acc
            .iter()
            .zip(&g)
            .map(|(a, b)| a + b)
            .collect::<candle_core::Result<_>>()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agreement_sums_flags_averages_losses_and_gathers_cursors() {
        let world = 3;
        let cursor = |r: usize| datasets::Cursor {
            epoch: 2,
            batch: 10 + r,
        };
        let parts = |x: f64| LossParts {
            total: x,
            diff: x / 2.0,
            scal: 1.0,
            mdl: -x,
        };
        let packed: Vec<Vec<f64>> = (0..world)
            .map(|r| {
                let total = if r == 1 { f64::NAN } else { r as f64 };
                StepAgreement::pack(&parts(total), r == 2, Some(cursor(r)), r, world)
            })
            .collect();
        let sum: Vec<f64> = (0..packed[0].len())
            .map(|i| packed.iter().map(|p| p[i]).sum())
            .collect();
        let a = StepAgreement::unpack(&sum, world);
        assert!(a.any_nonfinite && a.any_stop);
        assert_eq!(a.losses.scal, 1.0);
        assert_eq!(a.cursors, Some((0..world).map(cursor).collect()));

        let calm = StepAgreement::pack(&parts(3.0), false, None, 0, 1);
        let a = StepAgreement::unpack(&calm, 1);
        assert_eq!(
            a,
            StepAgreement {
                losses: parts(3.0),
                any_nonfinite: false,
                any_stop: false,
                cursors: None,
            }
        );
    }
}
