//! LoRA gradients of a loss on the model output, with or without block-wise recomputation.
//!
//! candle has no gradient checkpointing, so we do it by hand (design.md §8): forward every block
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

use crate::blocks::Streams;
use crate::error::{FluxError, Result};
use crate::lora::Lora;
use crate::transformer::{BlockId, Flux, ModelInputs, RowAccumulator};

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

/// Adds sum(a * b) to an optional running objective. Terms are summed in f32 (f64 stays f64):
/// a bf16 block's outputs and its f32 loss rows meet in one objective.
fn add_dot(obj: Option<Tensor>, a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    let term = (a * b)?.sum_all()?;
    let term = match term.dtype() {
        candle_core::DType::F64 => term,
        _ => term.to_dtype(candle_core::DType::F32)?,
    };
    Ok(Some(match obj {
        None => term,
        Some(o) => (o + term)?,
    }))
}

/// Receives each LoRA gradient (by index in `Lora::named_vars()` order) as soon as it is final,
/// so data parallelism can reduce it while the backward pass goes on. `E` is the caller's error
/// type (a sink that hands gradients to communication fails with communication errors).
pub trait GradSink<E> {
    fn ready(&mut self, index: usize, grad: &Tensor) -> std::result::Result<(), E>;
}

/// Ignores gradients.
pub struct NoSink;

impl<E> GradSink<E> for NoSink {
    fn ready(&mut self, _index: usize, _grad: &Tensor) -> std::result::Result<(), E> {
        Ok(())
    }
}

/// The block a LoRA module lives in (None: the embeddings, outside every block).
pub fn block_of_module(module: &str) -> Option<BlockId> {
    let index = |rest: &str| rest.split('.').next().and_then(|i| i.parse::<usize>().ok());
    if let Some(rest) = module.strip_prefix("single_transformer_blocks.") {
        index(rest).map(BlockId::Single)
    } else if let Some(rest) = module.strip_prefix("transformer_blocks.") {
        index(rest).map(BlockId::Double)
    } else {
        None
    }
}

/// The block owning each LoRA variable, in `named_vars()` order.
fn owners(lora: &Lora) -> Vec<Option<BlockId>> {
    lora.named_vars()
        .iter()
        .map(|(name, _)| block_of_module(name.rsplit_once('.').map_or(name.as_str(), |p| p.0)))
        .collect()
}

/// LoRA variable indices in the order the block-wise backward finishes them: the last block's
/// first, the embeddings' last.
pub fn readiness_order(model: &Flux, lora: &Lora) -> Vec<usize> {
    let ids = model.block_ids();
    let pos = |o: &Option<BlockId>| match o {
        Some(id) => ids.len() - 1 - ids.iter().position(|x| x == id).unwrap_or(0),
        None => ids.len(),
    };
    let own = owners(lora);
    let mut order: Vec<usize> = (0..own.len()).collect();
    order.sort_by_key(|&i| pos(&own[i]));
    order
}

/// Runs the model, evaluates `loss_fn(pred, rows)` and returns its extra output with the
/// gradient of every LoRA variable, in `lora.named_vars()` order. Errors are the caller's type
/// `E` (the loss is the caller's), which model errors convert into.
pub fn loss_and_grads<T, E>(
    model: &Flux,
    inp: &ModelInputs,
    lora: &Lora,
    checkpointing: bool,
    loss_fn: impl Fn(&Tensor, Option<&[Tensor]>) -> std::result::Result<(Tensor, T), E>,
) -> std::result::Result<(T, Vec<Tensor>), E>
where
    E: From<FluxError> + From<candle_core::Error>,
{
    loss_and_grads_into(model, inp, lora, checkpointing, loss_fn, &mut NoSink)
}

/// As [`loss_and_grads`], also handing each gradient to `sink` once it is final: with
/// recomputation, right after its block's backward; without, all at the end.
pub fn loss_and_grads_into<T, E>(
    model: &Flux,
    inp: &ModelInputs,
    lora: &Lora,
    checkpointing: bool,
    loss_fn: impl Fn(&Tensor, Option<&[Tensor]>) -> std::result::Result<(Tensor, T), E>,
    sink: &mut dyn GradSink<E>,
) -> std::result::Result<(T, Vec<Tensor>), E>
where
    E: From<FluxError> + From<candle_core::Error>,
{
    let dev = model.device().clone();
    if !checkpointing {
        let fwd = crate::profile::phase("forward (graph)", &dev);
        let out = model.forward(inp, lora.view(true))?;
        let (total, extra) = loss_fn(&out.pred, out.rows.as_deref())?;
        drop(fwd);
        let _bwd = crate::profile::phase("backward", &dev);
        let store = total.backward()?;
        let mut acc = vec![None; lora.named_vars().len()];
        accumulate(&mut acc, lora, &store)?;
        let grads = finish(acc, lora)?;
        for (i, g) in grads.iter().enumerate() {
            sink.ready(i, g)?;
        }
        return Ok((extra, grads));
    }
    let own = owners(lora);

    // 1. Forward without a graph, keeping each block's input.
    let fwd = crate::profile::phase("forward (no graph)", &dev);
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
    drop(fwd);
    let head = crate::profile::phase("loss head: forward + backward", &dev);

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
                    Some(g) => g / selected as f64,
                    None => v.as_tensor().zeros_like(),
                })
                .collect::<candle_core::Result<_>>()?,
        ),
        None => None,
    };

    drop(head);

    // 3. Blocks from the last: recompute with a graph, backprop the cotangents.
    for (&id, input) in ids.iter().zip(inputs).rev() {
        let kind = match id {
            BlockId::Double(_) => "double block: recompute + backward",
            BlockId::Single(_) => "single block: recompute + backward",
        };
        let _block = crate::profile::phase(kind, &dev);
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
            for (i, (_, var)) in lora.named_vars().into_iter().enumerate() {
                if own[i] == Some(id) {
                    sink.ready(i, &var.as_tensor().zeros_like()?)?;
                }
            }
            continue;
        };
        let store = obj.backward()?;
        accumulate(&mut acc, lora, &store)?;
        // This block's adapters are used nowhere else: their gradients are final.
        for (i, (_, var)) in lora.named_vars().into_iter().enumerate() {
            if own[i] == Some(id) {
                match &acc[i] {
                    Some(g) => sink.ready(i, g)?,
                    None => sink.ready(i, &var.as_tensor().zeros_like()?)?,
                }
            }
        }
        cot = in_vars
            .iter()
            .map(|v| store.get(v.as_tensor()).cloned())
            .collect();
    }

    // 4. The embeddings (x_embedder carries a LoRA on references).
    let _emb = crate::profile::phase("embeddings: forward + backward", &dev);
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
    let grads = finish(acc, lora)?;
    for (i, g) in grads.iter().enumerate() {
        if own[i].is_none() {
            sink.ready(i, g)?;
        }
    }
    Ok((extra, grads))
}
