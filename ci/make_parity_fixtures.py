#!/usr/bin/env python3
"""Builds the diffusers parity fixtures under trainer/tests/fixtures/parity/.

A small random FluxTransformer2DModel (diffusers, CPU, float32) is saved
  - in the diffusers layout, sharded with an index json (diffusers/transformer/), and
  - in BFL single-file naming (bfl.safetensors), written by our own inverse of diffusers'
    BFL->diffusers converter; the script checks that diffusers' converter maps it back to the
    exact original state dict,
with one forward's inputs (inputs.safetensors, named like forward's arguments) and output
(expected.safetensors, tensor `output`). Weights are stored in bf16 to keep the fixtures
small; the model computes in float32 on exactly those bf16 values.

Run through ci/parity.sh (which makes the venv); the Rust test needs only the files.
"""
import json
import os
import sys

import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders import single_file_utils
from safetensors.torch import save_file

OUT = sys.argv[1] if len(sys.argv) > 1 else "trainer/tests/fixtures/parity"

CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    guidance_embeds=True,
    axes_dims_rope=(4, 14, 14),
)


def diffusers_to_bfl(sd, num_double, num_single):
    """Inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers."""
    out = {}

    def mv(src, dst):
        for s in ("weight", "bias"):
            if f"{src}.{s}" in sd:
                out[f"{dst}.{s}"] = sd[f"{src}.{s}"]

    mv("x_embedder", "img_in")
    mv("context_embedder", "txt_in")
    mv("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    mv("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    mv("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    mv("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    mv("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
    mv("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    mv("proj_out", "final_layer.linear")
    for s in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{s}"].chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift, scale], dim=0)
    for i in range(num_double):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        mv(f"{d}.norm1.linear", f"{b}.img_mod.lin")
        mv(f"{d}.norm1_context.linear", f"{b}.txt_mod.lin")
        for s in ("weight", "bias"):
            out[f"{b}.img_attn.qkv.{s}"] = torch.cat([sd[f"{d}.attn.to_{x}.{s}"] for x in "qkv"], 0)
            out[f"{b}.txt_attn.qkv.{s}"] = torch.cat([sd[f"{d}.attn.add_{x}_proj.{s}"] for x in "qkv"], 0)
        out[f"{b}.img_attn.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{b}.img_attn.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
        out[f"{b}.txt_attn.norm.query_norm.scale"] = sd[f"{d}.attn.norm_added_q.weight"]
        out[f"{b}.txt_attn.norm.key_norm.scale"] = sd[f"{d}.attn.norm_added_k.weight"]
        mv(f"{d}.attn.to_out.0", f"{b}.img_attn.proj")
        mv(f"{d}.attn.to_add_out", f"{b}.txt_attn.proj")
        mv(f"{d}.ff.net.0.proj", f"{b}.img_mlp.0")
        mv(f"{d}.ff.net.2", f"{b}.img_mlp.2")
        mv(f"{d}.ff_context.net.0.proj", f"{b}.txt_mlp.0")
        mv(f"{d}.ff_context.net.2", f"{b}.txt_mlp.2")
    for i in range(num_single):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        mv(f"{d}.norm.linear", f"{b}.modulation.lin")
        for s in ("weight", "bias"):
            out[f"{b}.linear1.{s}"] = torch.cat(
                [sd[f"{d}.attn.to_q.{s}"], sd[f"{d}.attn.to_k.{s}"], sd[f"{d}.attn.to_v.{s}"], sd[f"{d}.proj_mlp.{s}"]], 0
            )
        out[f"{b}.norm.query_norm.scale"] = sd[f"{d}.attn.norm_q.weight"]
        out[f"{b}.norm.key_norm.scale"] = sd[f"{d}.attn.norm_k.weight"]
        mv(f"{d}.proj_out", f"{b}.linear2")
    return out


def diffusers_converter(hidden):
    """diffusers' own BFL->diffusers converter, with its hard-coded FLUX.1-dev width
    (`inner_dim = 3072`) replaced by ours; the rest of its mapping runs unchanged."""
    import inspect
    import textwrap

    fn = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    src = textwrap.dedent(inspect.getsource(fn))
    if src.count("inner_dim = 3072") != 1:
        raise SystemExit("diffusers' converter changed: cannot re-size it; update this script")
    src = src.replace("inner_dim = 3072", f"inner_dim = {hidden}")
    scope = dict(vars(single_file_utils))
    exec(compile(src, "<resized converter>", "exec"), scope)
    return scope[fn.__name__]


def main():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG).eval()
    with torch.no_grad():
        # Every parameter random (diffusers zero-inits nothing here, but make gates and norms
        # clearly non-trivial), rounded to bf16 so the stored files are exact.
        for p in model.parameters():
            p.copy_((torch.randn_like(p) * 0.1).to(torch.bfloat16).to(torch.float32))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    os.makedirs(OUT, exist_ok=True)
    tdir = os.path.join(OUT, "diffusers", "transformer")
    model.to(torch.bfloat16).save_pretrained(tdir, safe_serialization=True, max_shard_size="300KB")
    model.to(torch.float32)
    if not os.path.exists(os.path.join(tdir, "diffusion_pytorch_model.safetensors.index.json")):
        raise SystemExit("expected a sharded save with an index json")

    bfl = diffusers_to_bfl(sd, CONFIG["num_layers"], CONFIG["num_single_layers"])
    convert = diffusers_converter(CONFIG["attention_head_dim"] * CONFIG["num_attention_heads"])
    back = convert(dict(bfl))
    if set(back) != set(sd):
        raise SystemExit(f"BFL round trip key mismatch: {set(back) ^ set(sd)}")
    for k in sd:
        if not torch.equal(back[k], sd[k]):
            raise SystemExit(f"BFL round trip changed {k}")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in bfl.items()}, os.path.join(OUT, "bfl.safetensors"))

    g = torch.Generator().manual_seed(1)
    b, rows, cols, L = 2, 4, 6, 7
    img_ids = torch.tensor([[0.0, r, c] for r in range(rows) for c in range(cols)])
    inputs = {
        "hidden_states": torch.randn(b, rows * cols, 64, generator=g),
        "encoder_hidden_states": torch.randn(b, L, CONFIG["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(b, CONFIG["pooled_projection_dim"], generator=g),
        "timestep": torch.tensor([0.3, 0.8]),
        "guidance": torch.tensor([3.5, 1.0]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(L, 3),
    }
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    save_file({k: v.contiguous() for k, v in inputs.items()}, os.path.join(OUT, "inputs.safetensors"))
    save_file({"output": out.contiguous()}, os.path.join(OUT, "expected.safetensors"))
    import diffusers
    with open(os.path.join(OUT, "SOURCE.json"), "w") as f:
        json.dump({"diffusers": diffusers.__version__, "torch": torch.__version__, "config": CONFIG, "script": "ci/make_parity_fixtures.py"}, f, indent=2)
    print(f"wrote fixtures to {OUT}; output std {out.std().item():.4f}")


if __name__ == "__main__":
    main()
