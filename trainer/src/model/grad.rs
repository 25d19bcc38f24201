//! LoRA gradients of a loss on the model output, with or without block-wise recomputation.
//!
//! candle has no gradient checkpointing, so we do it by hand (DESIGN.md §9): forward every block
//! without a graph (LoRA detached) keeping only each block's input streams, evaluate the loss
//! head with its inputs as `Var`s, then walk the blocks backwards, recomputing each one from
//! `Var::from_tensor(input)` and backpropagating sum(output * cotangent) plus the block's share
//! of the attention-row losses. Peak memory holds one block's graph instead of all of them.
//!
//! The row losses couple the blocks only through the mean of their rows (paper eq. 8), so the
//! head stage differentiates the loss with respect to that mean, and each selected block gets
//! the cotangent d loss / d mean divided by the number of selected blocks.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::blocks::Streams;
use super::flux::{Flux, ModelInputs, RowAccumulator};
use super::lora::Lora;
use crate::error::Result;

/// Adds the gradient of every LoRA variable found in `store` to `acc`.
fn accumulate(acc: &mut [Option<Tensor>], lora: &Lora, store: &GradStore) -> Result<()> {
    for (slot, (_, var)) in acc.iter_mut().zip(lora.named_vars()) {
        if let Some(g) = store.get(var.as_tensor()) {
            *slot = Some(match slot.take() {
                None => g.clone(),
                Some(a) => (a + g)?,
            });
        }
    }
    Ok(())
}

/// Missing gradients (a variable no path reaches) become zeros.
fn finish(acc: Vec<Option<Tensor>>, lora: &Lora) -> Result<Vec<Tensor>> {
    acc.into_iter()
        .zip(lora.named_vars())
        .map(|(g, (_, v))| {
            Ok(match g {
                Some(g) => g,
                None => v.as_tensor().zeros_like()?,
            })
        })
        .collect()
}

/// Adds sum(a * b) to an optional running objective.
fn add_dot(obj: Option<Tensor>, a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let term = (a * b)?.sum_all()?;
    Ok(Some(match obj {
        None => term,
        Some(o) => (o + term)?,
    }))
}

/// Runs the model, evaluates `loss_fn(pred, rows)` and returns its extra output with the
/// gradient of every LoRA variable, in `lora.named_vars()` order.
pub fn loss_and_grads<T>(
    model: &Flux,
    inp: &ModelInputs,
    lora: &Lora,
    checkpointing: bool,
    loss_fn: impl Fn(&Tensor, Option<&[Tensor]>) -> Result<(Tensor, T)>,
) -> Result<(T, Vec<Tensor>)> {
    if !checkpointing {
        let out = model.forward(inp, lora.view(true))?;
        let (total, extra) = loss_fn(&out.pred, out.rows.as_deref())?;
        let store = total.backward()?;
        let mut acc = vec![None; lora.named_vars().len()];
        accumulate(&mut acc, lora, &store)?;
        return Ok((extra, finish(acc, lora)?));
    }

    // 1. Forward without a graph, keeping each block's input.
    let ctx = model.prepare(inp)?;
    let detached = lora.view(false);
    let ids = model.block_ids();
    let mut inputs: Vec<Streams> = Vec::with_capacity(ids.len());
    let mut s = model.embed(inp, detached)?;
    let mut rows_acc = RowAccumulator::default();
    for &id in &ids {
        let (next, rows) = model.run_block(id, &s, &ctx, detached)?;
        rows_acc.add(rows)?;
        inputs.push(s);
        s = next;
    }
    let selected = rows_acc.count();

    // 2. The loss head, differentiated with respect to the last target stream and the rows.
    let last = Var::from_tensor(&s.tgt)?;
    let row_vars: Option<Vec<Var>> = rows_acc
        .mean()?
        .map(|r| {
            r.iter()
                .map(Var::from_tensor)
                .collect::<candle_core::Result<_>>()
        })
        .transpose()?;
    let row_inputs: Option<Vec<Tensor>> = row_vars
        .as_ref()
        .map(|v| v.iter().map(|x| x.as_tensor().clone()).collect());
    let pred = model.head(last.as_tensor(), &ctx)?;
    let (total, extra) = loss_fn(&pred, row_inputs.as_deref())?;
    let store = total.backward()?;
    let mut acc = vec![None; lora.named_vars().len()];
    accumulate(&mut acc, lora, &store)?;
    let mut cot: Vec<Option<Tensor>> = vec![None, store.get(last.as_tensor()).cloned(), None];
    let row_cot: Option<Vec<Tensor>> = match &row_vars {
        Some(vars) => Some(
            vars.iter()
                .map(|v| match store.get(v.as_tensor()) {
                    Some(g) => Ok((g / selected as f64)?),
                    None => Ok(v.as_tensor().zeros_like()?),
                })
                .collect::<Result<_>>()?,
        ),
        None => None,
    };

    // 3. Blocks from the last: recompute with a graph, backprop the cotangents.
    for (&id, input) in ids.iter().zip(inputs).rev() {
        let in_vars: Vec<Var> = input
            .as_vec()
            .into_iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<_>>()?;
        let s_in = Streams::from_vec(in_vars.iter().map(|v| v.as_tensor().clone()).collect());
        let (out, rows) = model.run_block(id, &s_in, &ctx, lora.view(true))?;
        let mut obj = None;
        for (o, c) in out.as_vec().into_iter().zip(&cot) {
            if let Some(c) = c {
                obj = add_dot(obj, o, c)?;
            }
        }
        if let (Some(rows), Some(rc)) = (rows, &row_cot) {
            for (r, c) in rows.iter().zip(rc) {
                obj = add_dot(obj, r, c)?;
            }
        }
        let Some(obj) = obj else {
            cot = vec![None; 3];
            continue;
        };
        let store = obj.backward()?;
        accumulate(&mut acc, lora, &store)?;
        cot = in_vars
            .iter()
            .map(|v| store.get(v.as_tensor()).cloned())
            .collect();
    }

    // 4. The embeddings (x_embedder carries a LoRA on references).
    let emb = model.embed(inp, lora.view(true))?;
    let mut obj = None;
    for (o, c) in emb.as_vec().into_iter().zip(&cot) {
        if let Some(c) = c {
            obj = add_dot(obj, o, c)?;
        }
    }
    if let Some(obj) = obj {
        accumulate(&mut acc, lora, &obj.backward()?)?;
    }
    Ok((extra, finish(acc, lora)?))
}
