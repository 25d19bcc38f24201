//! FLUX.1 double- and single-stream blocks with MOSAIC's reference branch (design.md §3.5,
//! §4.2-4.4).
//!
//! Every block maps three token streams to three: text, target, references. Text and target
//! use the conditioning vector of (t, guidance); references use their own (t = 0) and pass
//! through the LoRA. One joint attention runs over [text; target; references], with an
//! additive mask that keeps references from attending to each other when configured.
//!
//! Shape legend: `x_bsd` batch, tokens, hidden; `q_bhsd` batch, heads, tokens, head dim;
//! `temb_bd` batch, hidden; `rows_pn` sampled reference points, target tokens.

use candle_core::Tensor;

use crate::attention::{attention, Attention, GroupMask};
use crate::error::Result;
use crate::lora::LoraView;
use crate::ops::{apply_rope, frozen_linear, gelu, layer_norm, modulate, rms_norm};
use crate::ref_cache::RefKv;
use crate::weights::Weights;

/// FLUX uses eps 1e-6 in every LayerNorm and RMSNorm.
const NORM_EPS: f64 = 1e-6;

/// A frozen linear layer known by its module path (the LoRA key).
pub struct Linear {
    pub name: String,
    w: Tensor,
    b: Tensor,
}

impl Linear {
    pub fn load(weights: &Weights, name: &str) -> Result<Self> {
        Ok(Self {
            name: name.to_string(),
            w: weights.get(&format!("{name}.weight"))?.clone(),
            b: weights.get(&format!("{name}.bias"))?.clone(),
        })
    }

    /// Base weights only, or base + LoRA delta when `lora` is given (reference tokens).
    pub fn apply(&self, x: &Tensor, lora: Option<LoraView>) -> Result<Tensor> {
        let y = frozen_linear(x, &self.w, Some(&self.b))?;
        match lora {
            Some(l) => l.add_delta(&self.name, x, y),
            None => Ok(y),
        }
    }
}

/// The three streams between blocks.
#[derive(Clone)]
pub struct Streams {
    pub txt: Tensor,
    pub tgt: Tensor,
    pub refs: Option<Tensor>,
}

impl Streams {
    pub fn as_vec(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.txt, &self.tgt];
        v.extend(self.refs.as_ref());
        v
    }

    pub fn from_vec(mut v: Vec<Tensor>) -> Self {
        let refs = if v.len() == 3 { v.pop() } else { None };
        let tgt = v.pop().expect("target stream");
        let txt = v.pop().expect("text stream");
        Self { txt, tgt, refs }
    }
}

/// Per-forward constants shared by every block.
pub struct BlockCtx {
    /// silu(temb) of text and target, [B, D].
    pub temb_act: Tensor,
    /// silu(temb) of the references (t = 0), [B, D].
    pub temb_ref_act: Option<Tensor>,
    /// RoPE tables of the whole sequence [text; target; references], [S, hd/2].
    pub cos: Tensor,
    pub sin: Tensor,
    /// Which tokens may not see which (references isolated from each other), or none when
    /// every token sees every token.
    pub mask: Option<GroupMask>,
    /// How attention is computed (memory-linear chunks by default).
    pub attention: Attention,
    /// Per batch element, the sampled reference tokens (indices into the reference stream)
    /// whose attention rows the losses need.
    pub row_queries: Option<Vec<Tensor>>,
    /// Rows from composed candle ops instead of the fused op.
    pub plain_rows: bool,
    /// The reference K/V cache of sampling ([`crate::ref_cache`]).
    pub ref_kv: RefKv,
}

/// One branch entering a block: its tokens, conditioning and whether LoRA applies.
struct Branch<'a> {
    x: &'a Tensor,
    temb: &'a Tensor,
    lora: Option<LoraView<'a>>,
    text: bool,
}

fn branches<'a>(s: &'a Streams, ctx: &'a BlockCtx, lora: LoraView<'a>) -> Vec<Branch<'a>> {
    let mut v = vec![
        Branch {
            x: &s.txt,
            temb: &ctx.temb_act,
            lora: None,
            text: true,
        },
        Branch {
            x: &s.tgt,
            temb: &ctx.temb_act,
            lora: None,
            text: false,
        },
    ];
    if let (Some(r), Some(t)) = (&s.refs, &ctx.temb_ref_act) {
        v.push(Branch {
            x: r,
            temb: t,
            lora: Some(lora),
            text: false,
        });
    }
    v
}

/// [B, S, D] -> [B, H, S, hd] with the QK RMSNorm over hd applied when `norm` is given.
fn to_heads(x_bsd: &Tensor, heads: usize, norm: Option<&Tensor>) -> Result<Tensor> {
    let (b, s, d) = x_bsd.dims3()?;
    let x = x_bsd.reshape((b, s, heads, d / heads))?;
    let x = match norm {
        Some(w) => rms_norm(&x, w, NORM_EPS)?,
        None => x,
    };
    Ok(x.transpose(1, 2)?.contiguous()?)
}

/// Joint attention of the branches: concat, RoPE, (rows), attention, split back to [B, S_i, D].
struct Joint {
    outputs: Vec<Tensor>,
    rows: Option<Vec<Tensor>>,
}

fn joint_attention(
    qkv: Vec<(Tensor, Tensor, Tensor)>,
    ctx: &BlockCtx,
    emit_rows: bool,
) -> Result<Joint> {
    let lens: Vec<usize> = qkv
        .iter()
        .map(|(q, _, _)| q.dim(2))
        .collect::<candle_core::Result<_>>()?;
    let (qs, (ks, vs)): (Vec<_>, (Vec<_>, Vec<_>)) =
        qkv.into_iter().map(|(q, k, v)| (q, (k, v))).unzip();
    let q = apply_rope(&Tensor::cat(&qs, 2)?, &ctx.cos, &ctx.sin)?;
    let mut k = apply_rope(&Tensor::cat(&ks, 2)?, &ctx.cos, &ctx.sin)?;
    let mut v = Tensor::cat(&vs, 2)?;
    let rows = match (&ctx.row_queries, emit_rows, lens.len()) {
        (Some(queries), true, 3) => Some(attention_rows(
            &q,
            &k,
            lens[0],
            lens[1],
            lens[0] + lens[1],
            queries,
            ctx.plain_rows,
        )?),
        _ => None,
    };
    let o = if let Some(ref_lens) = ctx.ref_kv.fill_lens() {
        let shared = lens[0] + lens[1];
        let m = k.dim(2)? - shared;
        ctx.ref_kv
            .keep(k.narrow(2, shared, m)?, v.narrow(2, shared, m)?)?;
        private_reference_attention(&q, &k, &v, shared, ref_lens, ctx.attention)?
    } else {
        if let Some((k_ref, v_ref)) = ctx.ref_kv.next_read()? {
            k = Tensor::cat(&[&k, &k_ref], 2)?;
            v = Tensor::cat(&[&v, &v_ref], 2)?;
        }
        attention(&q, &k, &v, ctx.mask.as_ref(), ctx.attention)?
    };
    let (b, h, s, hd) = o.dims4()?;
    let o = o.transpose(1, 2)?.reshape((b, s, h * hd))?;
    let mut outputs = Vec::with_capacity(lens.len());
    let mut start = 0;
    for len in lens {
        outputs.push(o.narrow(1, start, len)?);
        start += len;
    }
    Ok(Joint { outputs, rows })
}

/// Attention where the `shared` leading tokens (text and target) see every token and each
/// reference (of `ref_lens` tokens, in order, after them) sees only its own tokens: the
/// official inference's mask when its reference cache is on.
fn private_reference_attention(
    q_bhsd: &Tensor,
    k_bhsd: &Tensor,
    v_bhsd: &Tensor,
    shared: usize,
    ref_lens: &[usize],
    kind: Attention,
) -> Result<Tensor> {
    let mut outs = vec![attention(
        &q_bhsd.narrow(2, 0, shared)?,
        k_bhsd,
        v_bhsd,
        None,
        kind,
    )?];
    let mut start = shared;
    for &len in ref_lens {
        let own = |t: &Tensor| t.narrow(2, start, len);
        outs.push(attention(
            &own(q_bhsd)?,
            &own(k_bhsd)?,
            &own(v_bhsd)?,
            None,
            kind,
        )?);
        start += len;
    }
    Ok(Tensor::cat(&outs, 2)?)
}

/// For each batch element, the head-averaged softmax over target tokens of the sampled
/// reference queries: softmax_v(Q_u K_v^T / sqrt(d)) with Q, K after QK norm and RoPE
/// (design.md §4.5). The softmax runs over target keys only, not the real attention row.
/// The fused op computes only those rows; `plain` composes candle ops (the reference).
pub fn attention_rows(
    q_bhsd: &Tensor,
    k_bhsd: &Tensor,
    tgt_start: usize,
    tgt_len: usize,
    ref_start: usize,
    queries: &[Tensor],
    plain: bool,
) -> Result<Vec<Tensor>> {
    let _phase = crate::profile::phase("op: loss rows forward", q_bhsd.device());
    let scale = 1.0 / (q_bhsd.dim(3)? as f64).sqrt();
    let ref_len = q_bhsd.dim(2)? - ref_start;
    let k_t = k_bhsd.narrow(2, tgt_start, tgt_len)?;
    let q_r = q_bhsd.narrow(2, ref_start, ref_len)?;
    let rows = if plain {
        kernels::attention_rows_plain
    } else {
        kernels::attention_rows
    };
    queries
        .iter()
        .enumerate()
        .map(|(b, idx)| Ok(rows(&q_r.get(b)?, &k_t.get(b)?, idx, scale)?))
        .collect()
}

fn gated_add(x: &Tensor, gate_bd: &Tensor, y: &Tensor) -> Result<Tensor> {
    let _phase = crate::profile::phase("op: modulate, gate forward", x.device());
    Ok((x + y.broadcast_mul(&crate::ops::per_token(gate_bd, y.dim(1)?)?)?)?)
}

/// Weights of one branch kind inside a double block.
struct DoubleBranchWeights {
    norm1: Linear,
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: Tensor,
    norm_k: Tensor,
    out: Linear,
    ff0: Linear,
    ff2: Linear,
}

impl DoubleBranchWeights {
    fn load(w: &Weights, p: &str, text: bool) -> Result<Self> {
        let l = |n: &str| Linear::load(w, &format!("{p}.{n}"));
        let t = |n: &str| -> Result<Tensor> { Ok(w.get(&format!("{p}.{n}.weight"))?.clone()) };
        Ok(if text {
            Self {
                norm1: l("norm1_context.linear")?,
                q: l("attn.add_q_proj")?,
                k: l("attn.add_k_proj")?,
                v: l("attn.add_v_proj")?,
                norm_q: t("attn.norm_added_q")?,
                norm_k: t("attn.norm_added_k")?,
                out: l("attn.to_add_out")?,
                ff0: l("ff_context.net.0.proj")?,
                ff2: l("ff_context.net.2")?,
            }
        } else {
            Self {
                norm1: l("norm1.linear")?,
                q: l("attn.to_q")?,
                k: l("attn.to_k")?,
                v: l("attn.to_v")?,
                norm_q: t("attn.norm_q")?,
                norm_k: t("attn.norm_k")?,
                out: l("attn.to_out.0")?,
                ff0: l("ff.net.0.proj")?,
                ff2: l("ff.net.2")?,
            }
        })
    }
}

/// A double-stream block: text has its own weights, image branches share theirs.
pub struct DoubleBlock {
    text: DoubleBranchWeights,
    image: DoubleBranchWeights,
    heads: usize,
}

impl DoubleBlock {
    pub fn load(w: &Weights, index: usize, heads: usize) -> Result<Self> {
        let p = format!("transformer_blocks.{index}");
        Ok(Self {
            text: DoubleBranchWeights::load(w, &p, true)?,
            image: DoubleBranchWeights::load(w, &p, false)?,
            heads,
        })
    }

    pub fn forward(
        &self,
        s: &Streams,
        ctx: &BlockCtx,
        lora: LoraView,
        emit_rows: bool,
    ) -> Result<(Streams, Option<Vec<Tensor>>)> {
        let brs = branches(s, ctx, lora);
        let mut mods = Vec::with_capacity(brs.len());
        let mut qkv = Vec::with_capacity(brs.len());
        for br in &brs {
            let w = if br.text { &self.text } else { &self.image };
            let m = w.norm1.apply(br.temb, br.lora)?.chunk(6, 1)?;
            let h = modulate(&layer_norm(br.x, NORM_EPS)?, &m[0], &m[1])?;
            qkv.push((
                to_heads(&w.q.apply(&h, br.lora)?, self.heads, Some(&w.norm_q))?,
                to_heads(&w.k.apply(&h, br.lora)?, self.heads, Some(&w.norm_k))?,
                to_heads(&w.v.apply(&h, br.lora)?, self.heads, None)?,
            ));
            mods.push(m);
        }
        let joint = joint_attention(qkv, ctx, emit_rows)?;
        let mut outs = Vec::with_capacity(brs.len());
        for ((br, m), a) in brs.iter().zip(&mods).zip(&joint.outputs) {
            let w = if br.text { &self.text } else { &self.image };
            let x = gated_add(br.x, &m[2], &w.out.apply(a, br.lora)?)?;
            let h = modulate(&layer_norm(&x, NORM_EPS)?, &m[3], &m[4])?;
            let ff = w.ff2.apply(&gelu(&w.ff0.apply(&h, br.lora)?)?, br.lora)?;
            outs.push(gated_add(&x, &m[5], &ff)?);
        }
        Ok((Streams::from_vec(outs), joint.rows))
    }
}

/// A single-stream block: one set of weights for all tokens, per-branch modulation.
pub struct SingleBlock {
    norm: Linear,
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: Tensor,
    norm_k: Tensor,
    proj_mlp: Linear,
    proj_out: Linear,
    heads: usize,
}

impl SingleBlock {
    pub fn load(w: &Weights, index: usize, heads: usize) -> Result<Self> {
        let p = format!("single_transformer_blocks.{index}");
        let l = |n: &str| Linear::load(w, &format!("{p}.{n}"));
        Ok(Self {
            norm: l("norm.linear")?,
            q: l("attn.to_q")?,
            k: l("attn.to_k")?,
            v: l("attn.to_v")?,
            norm_q: w.get(&format!("{p}.attn.norm_q.weight"))?.clone(),
            norm_k: w.get(&format!("{p}.attn.norm_k.weight"))?.clone(),
            proj_mlp: l("proj_mlp")?,
            proj_out: l("proj_out")?,
            heads,
        })
    }

    pub fn forward(
        &self,
        s: &Streams,
        ctx: &BlockCtx,
        lora: LoraView,
        emit_rows: bool,
    ) -> Result<(Streams, Option<Vec<Tensor>>)> {
        let brs = branches(s, ctx, lora);
        let mut pre = Vec::with_capacity(brs.len());
        let mut qkv = Vec::with_capacity(brs.len());
        for br in &brs {
            let m = self.norm.apply(br.temb, br.lora)?.chunk(3, 1)?;
            let h = modulate(&layer_norm(br.x, NORM_EPS)?, &m[0], &m[1])?;
            let mlp = gelu(&self.proj_mlp.apply(&h, br.lora)?)?;
            qkv.push((
                to_heads(&self.q.apply(&h, br.lora)?, self.heads, Some(&self.norm_q))?,
                to_heads(&self.k.apply(&h, br.lora)?, self.heads, Some(&self.norm_k))?,
                to_heads(&self.v.apply(&h, br.lora)?, self.heads, None)?,
            ));
            pre.push((m, mlp));
        }
        let joint = joint_attention(qkv, ctx, emit_rows)?;
        let mut outs = Vec::with_capacity(brs.len());
        for ((br, (m, mlp)), a) in brs.iter().zip(&pre).zip(&joint.outputs) {
            let cat = Tensor::cat(&[a, mlp], 2)?;
            outs.push(gated_add(
                br.x,
                &m[2],
                &self.proj_out.apply(&cat, br.lora)?,
            )?);
        }
        Ok((Streams::from_vec(outs), joint.rows))
    }
}
