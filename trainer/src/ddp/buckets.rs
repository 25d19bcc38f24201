//! Gradient buckets: the LoRA gradients grouped, in the order the backward pass finishes them,
//! into flat buffers of about `distributed.bucket_mb`. A bucket is handed to the communication
//! thread as soon as its last gradient is final, so its all-reduce runs while the backward pass
//! recomputes earlier blocks. Buckets are submitted in a fixed order, identical on all ranks.

use candle_core::Tensor;

use super::{Dist, DistError, Pending, ReduceOp};
use crate::error::{Result, TrainerError};
use flux::grad::GradSink;

/// Which gradients go together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketPlan {
    /// Variable indices per bucket, in readiness order.
    pub buckets: Vec<Vec<usize>>,
    /// The bucket of each variable.
    pub bucket_of: Vec<usize>,
}

impl BucketPlan {
    /// `bytes[i]` is variable i's gradient size; `ready_order` lists the variables in the order
    /// the backward pass finishes them. A bucket closes once it holds at least `cap_bytes`.
    pub fn new(bytes: &[usize], ready_order: &[usize], cap_bytes: usize) -> Self {
        let mut buckets: Vec<Vec<usize>> = Vec::new();
        let mut bucket_of = vec![0; bytes.len()];
        let mut cur: Vec<usize> = Vec::new();
        let mut size = 0;
        for &i in ready_order {
            cur.push(i);
            size += bytes[i];
            if size >= cap_bytes {
                buckets.push(std::mem::take(&mut cur));
                size = 0;
            }
        }
        if !cur.is_empty() {
            buckets.push(cur);
        }
        for (b, members) in buckets.iter().enumerate() {
            for &i in members {
                bucket_of[i] = b;
            }
        }
        Self { buckets, bucket_of }
    }
}

/// The sink of the final micro-step: adds the gradients of earlier micro-steps, scales, and
/// all-reduces (mean over ranks) bucket by bucket while the backward pass goes on.
pub struct GradReducer<'a> {
    plan: &'a BucketPlan,
    dist: &'a Dist,
    /// Sum of earlier micro-steps' gradients.
    prior: Option<Vec<Tensor>>,
    /// 1 / micro-steps.
    scale: f64,
    slots: Vec<Option<Tensor>>,
    missing: Vec<usize>,
    next_bucket: usize,
    pending: Vec<Pending<Tensor>>,
}

impl<'a> GradReducer<'a> {
    pub fn new(
        plan: &'a BucketPlan,
        dist: &'a Dist,
        prior: Option<Vec<Tensor>>,
        scale: f64,
    ) -> Self {
        Self {
            plan,
            dist,
            prior,
            scale,
            slots: vec![None; plan.bucket_of.len()],
            missing: plan.buckets.iter().map(Vec::len).collect(),
            next_bucket: 0,
            pending: Vec::new(),
        }
    }

    /// Submits every complete bucket that is next in order.
    fn submit_ready(&mut self) -> Result<()> {
        while self.next_bucket < self.plan.buckets.len() && self.missing[self.next_bucket] == 0 {
            let members = &self.plan.buckets[self.next_bucket];
            let flat: Vec<Tensor> = members
                .iter()
                .map(|&i| match &self.slots[i] {
                    Some(g) => Ok(g.flatten_all()?),
                    None => Err(DistError::Mismatch(format!(
                        "gradient {i} missing from a complete bucket"
                    ))
                    .into()),
                })
                .collect::<Result<_>>()?;
            let flat = Tensor::cat(&flat, 0)?;
            self.pending
                .push(self.dist.submit("gradient bucket all-reduce", move |c| {
                    c.all_reduce(&flat, ReduceOp::Mean)
                }));
            self.next_bucket += 1;
        }
        Ok(())
    }

    /// Waits for every bucket and returns the averaged gradients in variable order, shaped
    /// like `like`.
    pub fn finish(mut self, like: &[Tensor]) -> Result<Vec<Tensor>> {
        self.submit_ready()?;
        if self.next_bucket != self.plan.buckets.len() {
            return Err(DistError::Mismatch(format!(
                "backward finished with {} of {} gradient buckets complete",
                self.next_bucket,
                self.plan.buckets.len()
            ))
            .into());
        }
        let mut out: Vec<Option<Tensor>> = vec![None; like.len()];
        for (members, pending) in self.plan.buckets.iter().zip(self.pending) {
            let flat = pending.wait()?;
            let mut offset = 0;
            for &i in members {
                let n = like[i].elem_count();
                out[i] = Some(flat.narrow(0, offset, n)?.reshape(like[i].shape())?);
                offset += n;
            }
        }
        out.into_iter()
            .enumerate()
            .map(|(i, g)| {
                g.ok_or_else(|| DistError::Mismatch(format!("gradient {i} is in no bucket")).into())
            })
            .collect()
    }
}

impl GradSink<TrainerError> for GradReducer<'_> {
    fn ready(&mut self, index: usize, grad: &Tensor) -> Result<()> {
        if self.slots[index].is_some() {
            return Ok(());
        }
        let g = match &self.prior {
            Some(p) => (&p[index] + grad)?,
            None => grad.clone(),
        };
        let g = if self.scale == 1.0 {
            g
        } else {
            (g * self.scale)?
        };
        self.slots[index] = Some(g);
        self.missing[self.plan.bucket_of[index]] -= 1;
        self.submit_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_follows_readiness_order_and_cap() {
        let p = BucketPlan::new(&[10, 10, 10, 10, 10], &[4, 3, 2, 1, 0], 25);
        assert_eq!(p.buckets, vec![vec![4, 3, 2], vec![1, 0]]);
        assert_eq!(p.bucket_of, vec![1, 1, 0, 0, 0]);
        let one = BucketPlan::new(&[10, 10], &[1, 0], usize::MAX);
        assert_eq!(one.buckets, vec![vec![1, 0]]);
    }

    #[test]
    fn single_rank_reducer_averages_micro_steps_in_variable_order() {
        let dev = candle_core::Device::Cpu;
        let dist = Dist::single();
        let like = vec![
            Tensor::zeros((2, 2), candle_core::DType::F32, &dev).unwrap(),
            Tensor::zeros(3, candle_core::DType::F32, &dev).unwrap(),
        ];
        let plan = BucketPlan::new(&[16, 12], &[1, 0], 1);
        let prior = vec![
            Tensor::ones((2, 2), candle_core::DType::F32, &dev).unwrap(),
            Tensor::ones(3, candle_core::DType::F32, &dev).unwrap(),
        ];
        let mut r = GradReducer::new(&plan, &dist, Some(prior), 0.5);
        r.ready(1, &Tensor::new(&[3f32, 5., 7.], &dev).unwrap())
            .unwrap();
        r.ready(0, &Tensor::new(&[[1f32, 1.], [1., 1.]], &dev).unwrap())
            .unwrap();
        let out = r.finish(&like).unwrap();
        assert_eq!(out[0].to_vec2::<f32>().unwrap(), vec![vec![1.0; 2]; 2]);
        assert_eq!(out[1].to_vec1::<f32>().unwrap(), vec![2.0, 3.0, 4.0]);
    }
}
