#!/usr/bin/env python3
"""Builds the MOSAIC parity fixtures under trainer/tests/fixtures/mosaic/.

What the official PyTorch code computes (bytedance-fanqie-ai/MOSAIC @c5cc7c6), re-implemented
here in plain torch after reading it, on a tiny random diffusers FluxTransformer2DModel with a
PEFT LoRA whose B is non-zero:

- the per-branch forward of src/flux_omini_mosaic.py (transformer_forward, block_forward,
  single_block_forward, attn_forward): branches [text, target, reference 0, ...], each with its
  own modulation (references at t = 0, guidance 1), the LoRA on the reference branches only
  (every adapted module: x_embedder, the modulation linears, q/k/v, out, ff.net.2, proj_mlp,
  proj_out), references shifted left by their width per index, and the group mask (references do
  not attend to each other; text and target see everything);
- the attention maps of the double blocks: for each reference token, the head mean of
  softmax(q_ref k_tgt^T / sqrt(d)) over the target tokens (after QK norm and RoPE), averaged over
  the blocks;
- train.py compute_align_sep_losses (SCAL pooled over every pair, -log(A + 1e-9); MDL the
  negated mean JSD, eps 1e-8, of each reference's mean row over ALL its tokens), generalised
  from equal reference lengths to segments; and the paper's eq. 10-14 on the same rows (SCAL per
  reference, MDL the symmetric KL of the points' mean rows, as train.py's sym_kl_divergence).

Cases k1, k2, k3 hold 1, 2 and 3 references of unequal token counts. Each writes
<case>/inputs.safetensors (named as `trainer forward` reads them) and <case>/expected.safetensors:
output, attention_rows, loss_scal_official, loss_mdl_official, loss_scal_paper, loss_mdl_paper,
and three negative controls the Rust test must be far from: control_lora_everywhere (the LoRA on
text and target too), control_offset_flipped (references shifted right instead of left),
control_refs_see_each_other (no group mask; K >= 2 only). `output_kv_cache` is the output of
the first denoising step of inference.py with kv_cache on, where references see only themselves
(group_mask[2:, :2] = False).

The weights (bf16 values, computed in f32) go to transformer/ in the diffusers layout and the
LoRA to lora.safetensors in diffusers' key layout (transformer.<module>.lora_A/B.weight,
lora_alpha = r so the file needs no alpha). Run through ci/parity.sh.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
import diffusers
import peft
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb
from peft import LoraConfig
from safetensors.torch import save_file

OUT = sys.argv[1] if len(sys.argv) > 1 else "trainer/tests/fixtures/mosaic"

CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    guidance_embeds=True,
    axes_dims_rope=(4, 14, 14),
)
RANK = 4
# train.py's target_modules regex.
TARGETS = (
    r"(.*x_embedder|.*(?<!single_)transformer_blocks\.[0-9]+\.norm1\.linear"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_k|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_q"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_v|.*(?<!single_)transformer_blocks\.[0-9]+\.attn\.to_out\.0"
    r"|.*(?<!single_)transformer_blocks\.[0-9]+\.ff\.net\.2|.*single_transformer_blocks\.[0-9]+\.norm\.linear"
    r"|.*single_transformer_blocks\.[0-9]+\.proj_mlp|.*single_transformer_blocks\.[0-9]+\.proj_out"
    r"|.*single_transformer_blocks\.[0-9]+\.attn.to_k|.*single_transformer_blocks\.[0-9]+\.attn.to_q"
    r"|.*single_transformer_blocks\.[0-9]+\.attn.to_v|.*single_transformer_blocks\.[0-9]+\.attn.to_out)"
)


def linear(mod, x, lora_on):
    """A module that may carry the PEFT adapter: the base layer, plus B A x scaled when on."""
    if hasattr(mod, "base_layer"):
        y = mod.base_layer(x)
        if lora_on:
            y = y + mod.lora_B["default"](mod.lora_A["default"](x)) * mod.scaling["default"]
        return y
    return mod(x)


def layer_norm(x):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def rms(x, weight):
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return x * weight


def heads(x, h):
    b, s, _ = x.shape
    return x.view(b, s, h, -1).transpose(1, 2)


class Branches:
    """What the forward needs per branch: text, target, then each reference."""

    def __init__(self, n_refs, lora_everywhere, group_mask, kv_cache=False):
        self.n = 2 + n_refs
        self.lora = [lora_everywhere, lora_everywhere] + [True] * n_refs
        self.mask = torch.ones(self.n, self.n, dtype=torch.bool)
        if group_mask:
            self.mask[2:, 2:] = torch.eye(n_refs, dtype=torch.bool)
        if kv_cache:
            # inference.py with kv_cache: references do not see the text and target branches.
            self.mask[2:, :2] = False


def attention(br, qs, ks, vs, pos):
    """Joint attention per query branch over the key branches the group mask allows."""
    qs = [apply_rotary_emb(q, pos[i]) for i, q in enumerate(qs)]
    ks = [apply_rotary_emb(k, pos[i]) for i, k in enumerate(ks)]
    outs = []
    for i in range(br.n):
        keep = [j for j in range(br.n) if br.mask[i, j]]
        k = torch.cat([ks[j] for j in keep], dim=2)
        v = torch.cat([vs[j] for j in keep], dim=2)
        o = F.scaled_dot_product_attention(qs[i], k, v)
        b, h, s, d = o.shape
        outs.append(o.transpose(1, 2).reshape(b, s, h * d))
    # Attention maps of the reference queries over the target keys (branch 1).
    d = qs[1].shape[-1]
    maps = [
        F.softmax(qs[i] @ ks[1].transpose(-1, -2) / d**0.5, dim=-1).mean(dim=1)
        for i in range(2, br.n)
    ]
    return outs, (torch.cat(maps, dim=1) if maps else None)


def double_block(blk, br, hs, tembs, pos):
    h = blk.attn.heads
    mods, qs, ks, vs = [], [], [], []
    for i, x in enumerate(hs):
        norm = blk.norm1_context if i == 0 else blk.norm1
        e = linear(norm.linear, F.silu(tembs[i]), br.lora[i] and i > 0)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = e.chunk(6, dim=1)
        xn = layer_norm(x) * (1 + scale[:, None]) + shift[:, None]
        mods.append((gate, shift_mlp, scale_mlp, gate_mlp))
        a = blk.attn
        if i == 0:
            q, k, v = a.add_q_proj(xn), a.add_k_proj(xn), a.add_v_proj(xn)
            q, k = rms(heads(q, h), a.norm_added_q.weight), rms(heads(k, h), a.norm_added_k.weight)
        else:
            on = br.lora[i]
            q, k, v = (linear(a.to_q, xn, on), linear(a.to_k, xn, on), linear(a.to_v, xn, on))
            q, k = rms(heads(q, h), a.norm_q.weight), rms(heads(k, h), a.norm_k.weight)
        qs.append(q)
        ks.append(k)
        vs.append(heads(v, h))
    outs, maps = attention(br, qs, ks, vs, pos)
    new = []
    for i, x in enumerate(hs):
        gate, shift_mlp, scale_mlp, gate_mlp = mods[i]
        if i == 0:
            o = blk.attn.to_add_out(outs[i])
        else:
            o = linear(blk.attn.to_out[0], outs[i], br.lora[i])
        x = x + o * gate[:, None]
        norm2 = blk.norm2_context if i == 0 else blk.norm2
        xn = norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        ff = blk.ff_context if i == 0 else blk.ff
        y = F.gelu(ff.net[0].proj(xn), approximate="tanh")
        y = linear(ff.net[2], y, br.lora[i] and i > 0)
        new.append(x + y * gate_mlp[:, None])
    return new, maps


def single_block(blk, br, hs, tembs, pos):
    h = blk.attn.heads
    gates, mlps, qs, ks, vs = [], [], [], [], []
    for i, x in enumerate(hs):
        on = br.lora[i]
        e = linear(blk.norm.linear, F.silu(tembs[i]), on)
        shift, scale, gate = e.chunk(3, dim=1)
        xn = layer_norm(x) * (1 + scale[:, None]) + shift[:, None]
        gates.append(gate)
        mlps.append(F.gelu(linear(blk.proj_mlp, xn, on), approximate="tanh"))
        a = blk.attn
        q, k, v = linear(a.to_q, xn, on), linear(a.to_k, xn, on), linear(a.to_v, xn, on)
        qs.append(rms(heads(q, h), a.norm_q.weight))
        ks.append(rms(heads(k, h), a.norm_k.weight))
        vs.append(heads(v, h))
    outs, _ = attention(br, qs, ks, vs, pos)
    return [
        x + gates[i][:, None] * linear(blk.proj_out, torch.cat([outs[i], mlps[i]], dim=2), br.lora[i])
        for i, x in enumerate(hs)
    ]


def mosaic_forward(m, inp, refs, ref_ids, lora_everywhere=False, group_mask=True,
                   kv_cache=False):
    """Returns (target output [B, N, C], rows [B, sum N_k, N_tgt] averaged over double blocks)."""
    br = Branches(len(refs), lora_everywhere, group_mask, kv_cache)
    b = inp["hidden_states"].shape[0]
    t, g = inp["timestep"], inp["guidance"]
    rt = inp.get("ref_timestep", torch.zeros(b))
    rg = inp.get("ref_guidance", torch.ones(b))
    pooled = inp["pooled_projections"]
    temb = m.time_text_embed(t * 1000, g * 1000, pooled)
    rtemb = m.time_text_embed(rt * 1000, rg * 1000, pooled)
    tembs = [temb, temb] + [rtemb] * len(refs)
    hs = [m.context_embedder(inp["encoder_hidden_states"]),
          linear(m.x_embedder, inp["hidden_states"], br.lora[1])]
    hs += [linear(m.x_embedder, r, True) for r in refs]
    ids = [inp["txt_ids"], inp["img_ids"]] + ref_ids
    pos = [m.pos_embed(i) for i in ids]
    maps = []
    for blk in m.transformer_blocks:
        hs, mp = double_block(blk, br, hs, tembs, pos)
        maps.append(mp)
    for blk in m.single_transformer_blocks:
        hs = single_block(blk, br, hs, tembs, pos)
    e = m.norm_out.linear(F.silu(tembs[1]))
    scale, shift = e.chunk(2, dim=1)
    x = layer_norm(hs[1]) * (1 + scale[:, None]) + shift[:, None]
    rows = torch.stack(maps).mean(dim=0) if refs else None
    return m.proj_out(x), rows


def official_losses(rows, points, targets, lens):
    """compute_align_sep_losses on [sum N_k, N_tgt] rows, with per-reference segments."""
    scal = torch.stack([-torch.log(rows[u, v] + 1e-9) for u, v in zip(points, targets)]).mean()
    starts = [sum(lens[:k]) for k in range(len(lens))]
    avg = [rows[s:s + n].mean(dim=0) for s, n in zip(starts, lens)]

    def jsd(p, q, eps=1e-8):
        m = 0.5 * (p + q)
        kl_pm = (p * (p.add(eps).log() - m.add(eps).log())).sum()
        kl_qm = (q * (q.add(eps).log() - m.add(eps).log())).sum()
        return 0.5 * (kl_pm + kl_qm)

    k = len(lens)
    if k < 2:
        return scal, torch.tensor(0.0)
    sep = sum(jsd(avg[i], avg[j]) for i in range(k) for j in range(i + 1, k)) / (k * (k - 1) / 2)
    return scal, -sep


def paper_losses(rows, points, targets, lens):
    """Paper eq. 10-14 on the given pairs: SCAL per reference; MDL the symmetric KL (eq. 13,
    eps as train.py's sym_kl_divergence) of the normalised mean rows of each reference's points."""
    starts = [sum(lens[:k]) for k in range(len(lens))]
    ref_of = [max(k for k in range(len(lens)) if starts[k] <= u) for u in points]
    per_ref, dists = [], []
    for k in range(len(lens)):
        mine = [(u, v) for (u, v), r in zip(zip(points, targets), ref_of) if r == k]
        if not mine:
            continue
        per_ref.append(torch.stack([torch.log(rows[u, v] + 1e-9) for u, v in mine]).mean())
        a = torch.stack([rows[u] for u, _ in mine]).mean(dim=0)
        dists.append(a / a.sum())
    scal = -torch.stack(per_ref).mean()

    def sym_kl(p, q, eps=1e-8):
        p, q = p + eps, q + eps
        return 0.5 * ((p * (p.log() - q.log())).sum() + (q * (q.log() - p.log())).sum())

    k = len(dists)
    if k < 2:
        return scal, torch.tensor(0.0)
    total = sum(sym_kl(dists[i], dists[j]) for i in range(k) for j in range(k) if i != j)
    return scal, -total / (k * (k - 1))


def grid_ids(rows, cols, col_offset=0):
    ids = torch.zeros(rows * cols, 3)
    for r in range(rows):
        for c in range(cols):
            ids[r * cols + c] = torch.tensor([0.0, r, c + col_offset])
    return ids


def make_case(m, name, sides, gen, explicit_ids, explicit_ref_t):
    b, rows_t, cols_t, text = 1, 4, 4, 5
    n_tgt = rows_t * cols_t
    inp = {
        "hidden_states": torch.randn(b, n_tgt, 64, generator=gen),
        "encoder_hidden_states": torch.randn(b, text, 32, generator=gen),
        "pooled_projections": torch.randn(b, 16, generator=gen),
        "timestep": torch.tensor([0.63]),
        "guidance": torch.tensor([1.0]),
        "img_ids": grid_ids(rows_t, cols_t),
        "txt_ids": torch.zeros(text, 3),
    }
    if explicit_ref_t:
        inp["ref_timestep"] = torch.tensor([0.0])
        inp["ref_guidance"] = torch.tensor([1.0])
    refs, ids, flipped, lens = [], [], [], []
    for k, s in enumerate(sides):
        r = torch.randn(b, s * s, 64, generator=gen)
        refs.append(r)
        ids.append(grid_ids(s, s, -s * (k + 1)))
        flipped.append(grid_ids(s, s, s * (k + 1)))
        lens.append(s * s)
        inp[f"ref_hidden_states.{k}"] = r
        if explicit_ids:
            inp[f"ref_img_ids.{k}"] = ids[-1]
    # Pairs: about half of each reference's tokens (each once, as the official dict keys), each
    # to a random target token.
    points, targets = [], []
    offset = 0
    for n in lens:
        chosen = torch.randperm(n, generator=gen)[: max(1, n // 2)]
        for u in chosen.tolist():
            points.append(offset + u)
            targets.append(int(torch.randint(n_tgt, (1,), generator=gen)))
        offset += n
    inp["ref_points"] = torch.tensor(points, dtype=torch.int64)
    inp["ref_targets"] = torch.tensor(targets, dtype=torch.int64)
    with torch.no_grad():
        out, rows = mosaic_forward(m, inp, refs, ids)
        r0 = rows[0]
        scal_o, mdl_o = official_losses(r0, points, targets, lens)
        scal_p, mdl_p = paper_losses(r0, points, targets, lens)
        expected = {
            "output": out,
            "attention_rows": rows[:, points],
            "loss_scal_official": scal_o.reshape(1),
            "loss_mdl_official": mdl_o.reshape(1),
            "loss_scal_paper": scal_p.reshape(1),
            "loss_mdl_paper": mdl_p.reshape(1),
            "control_lora_everywhere": mosaic_forward(m, inp, refs, ids, lora_everywhere=True)[0],
            "control_offset_flipped": mosaic_forward(m, inp, refs, flipped)[0],
            "output_kv_cache": mosaic_forward(m, inp, refs, ids, kv_cache=True)[0],
        }
        if len(refs) >= 2:
            expected["control_refs_see_each_other"] = mosaic_forward(
                m, inp, refs, ids, group_mask=False)[0]
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in inp.items()}, os.path.join(d, "inputs.safetensors"))
    save_file({k: v.contiguous().float() for k, v in expected.items()},
              os.path.join(d, "expected.safetensors"))


def main():
    torch.manual_seed(0)
    m = FluxTransformer2DModel(**CONFIG).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".norm_" in name:
                # QK-norm gains near 1, so attention logits are O(sqrt(d)) and the rows peaked:
                # the references' mean rows then differ and MDL is far from 0.
                p.copy_(1.0 + torch.randn_like(p) * 0.2)
            else:
                p.copy_(torch.randn_like(p) * 0.1)
            p.copy_(p.to(torch.bfloat16).float())
    os.makedirs(OUT, exist_ok=True)
    # The base as bf16 values, in the diffusers layout; computed in f32 on those values.
    m.to(torch.bfloat16).save_pretrained(os.path.join(OUT, "transformer"))
    m.to(torch.float32)
    m.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                             target_modules=TARGETS))
    lora = {}
    with torch.no_grad():
        for name, mod in m.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                a.copy_((torch.randn_like(a) * 0.3).to(torch.bfloat16).float())
                b.copy_((torch.randn_like(b) * 0.3).to(torch.bfloat16).float())
                lora[f"transformer.{name}.lora_A.weight"] = a.clone()
                lora[f"transformer.{name}.lora_B.weight"] = b.clone()
    save_file(lora, os.path.join(OUT, "lora.safetensors"))
    gen = torch.Generator().manual_seed(1)
    make_case(m, "k1", [3], gen, explicit_ids=False, explicit_ref_t=False)
    make_case(m, "k2", [3, 2], gen, explicit_ids=True, explicit_ref_t=True)
    make_case(m, "k3", [3, 2, 4], gen, explicit_ids=False, explicit_ref_t=True)
    with open(os.path.join(OUT, "SOURCE.json"), "w") as f:
        json.dump({"diffusers": diffusers.__version__, "peft": peft.__version__,
                   "torch": torch.__version__, "config": CONFIG, "lora_rank": RANK,
                   "official": "bytedance-fanqie-ai/MOSAIC@c5cc7c6",
                   "script": "ci/make_mosaic_parity_fixtures.py"}, f, indent=2)
    print(f"wrote {len(lora) // 2} adapted modules and 3 cases to {OUT}")


if __name__ == "__main__":
    main()
