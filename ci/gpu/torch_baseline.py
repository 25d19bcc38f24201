#!/usr/bin/env python3
"""The PyTorch side of the step benchmark: diffusers' FluxTransformer2DModel with a peft LoRA.

Same architecture sizes, token counts, LoRA targets and rank as `trainer bench-step`, seeded
random weights, SDPA attention, gradient checkpointing, AdamW on the LoRA only. The
reference tokens ride in the image sequence (diffusers has no separate reference stream), so
the joint sequence has the same length S as ours and every block sees the same token count.
It measures s/step (median after warm-up) and peak memory, and appends one JSON line with the
fields `trainer bench-step --json` writes, including the same model-FLOP count and MFU.

    torch_baseline.py --preset flux-dev --px 512 --refs 1 --device cuda --dtype bf16 --json out.jsonl
"""
import argparse
import json
import resource
import statistics
import time

PRESETS = {
    # heads, head dim, double blocks, single blocks, T5 width, pooled width, RoPE axes
    "tiny": (2, 32, 2, 2, 32, 16, (4, 14, 14)),
    "medium": (8, 64, 6, 12, 256, 128, (8, 28, 28)),
    "flux-dev": (24, 128, 19, 38, 4096, 768, (16, 56, 56)),
}

# The official MOSAIC LoRA targets (diffusers module names), as the trainer's default list.
TARGETS = [
    "x_embedder",
    r"transformer_blocks\.\d+\.norm1\.linear",
    r"transformer_blocks\.\d+\.attn\.to_q",
    r"transformer_blocks\.\d+\.attn\.to_k",
    r"transformer_blocks\.\d+\.attn\.to_v",
    r"transformer_blocks\.\d+\.attn\.to_out\.0",
    r"transformer_blocks\.\d+\.ff\.net\.2",
    r"single_transformer_blocks\.\d+\.norm\.linear",
    r"single_transformer_blocks\.\d+\.proj_mlp",
    r"single_transformer_blocks\.\d+\.proj_out",
    r"single_transformer_blocks\.\d+\.attn\.to_q",
    r"single_transformer_blocks\.\d+\.attn\.to_k",
    r"single_transformer_blocks\.\d+\.attn\.to_v",
]


def model_flops(hidden, blocks, tokens, batch):
    """The trainer's formula (trainer/src/bench_step.rs): 2 F_lin + 3 F_attn."""
    lin = 24.0 * hidden * hidden * tokens * blocks
    attn = 4.0 * tokens * tokens * hidden * blocks
    return batch * (2.0 * lin + 3.0 * attn)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=PRESETS, default="tiny")
    ap.add_argument("--px", type=int, default=128)
    ap.add_argument("--ref-px", type=int, default=None, help="reference size (default: --px)")
    ap.add_argument("--refs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1, help="samples per step (as train.batch_size)")
    ap.add_argument("--text-tokens", type=int, default=None, help="default: 512 (flux-dev), else 16")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="f32")
    ap.add_argument("--checkpointing", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--label", default="step")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cudnn-sdpa", type=int, default=0,
                    help="allow the cuDNN SDPA backend (off: flash/efficient kernels; the first "
                         "device run hit an illegal memory access in a backward)")
    a = ap.parse_args()

    import torch
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig, get_peft_model

    if a.threads:
        torch.set_num_threads(a.threads)
    if not a.cudnn_sdpa and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    torch.manual_seed(a.seed)
    heads, hd, nd, ns, ctx, pooled, axes = PRESETS[a.preset]
    text = a.text_tokens or (512 if a.preset == "flux-dev" else 16)
    ref_px = a.ref_px or a.px
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    grid = lambda px: (px // 16) * (px // 16)
    img_tokens = grid(a.px) + a.refs * grid(ref_px)
    tokens = text + img_tokens

    # Built directly in the base dtype on the device: no 48 GB f32 copy on the host.
    torch.set_default_dtype(dtype)
    with dev:
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=nd,
            num_single_layers=ns,
            attention_head_dim=hd,
            num_attention_heads=heads,
            joint_attention_dim=ctx,
            pooled_projection_dim=pooled,
            guidance_embeds=True,
            axes_dims_rope=list(axes),
        )
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    if a.checkpointing:
        model.enable_gradient_checkpointing()
    cfg = LoraConfig(
        r=a.rank,
        lora_alpha=a.rank,
        init_lora_weights="gaussian",
        target_modules="|".join(f"(^{t}$)" for t in TARGETS),
    )
    model = get_peft_model(model, cfg)  # adapters in f32 (peft upcasts them by default)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)

    g = torch.Generator(device="cpu").manual_seed(a.seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)
    b = a.batch
    x = rnd(b, img_tokens, 64)
    target = rnd(b, img_tokens, 64)
    enc = rnd(b, text, ctx)
    pool = rnd(b, pooled)
    side = a.px // 16
    img_ids = torch.zeros(img_tokens, 3)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids[: side * side, 1] = ys.flatten()
    img_ids[: side * side, 2] = xs.flatten()
    img_ids = img_ids.to(dev, dtype)
    txt_ids = torch.zeros(text, 3).to(dev, dtype)
    t = torch.full((b,), 0.5).to(dev, dtype)
    guidance = torch.full((b,), 1.0).to(dev, dtype)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        pred = model(
            hidden_states=x,
            encoder_hidden_states=enc,
            pooled_projections=pool,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(a.warmup):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    flops = model_flops(heads * hd, nd + ns, tokens, b)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    # The process's peak resident set (KiB on Linux): on the CPU the one measure both sides give.
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "label": a.label,
        "framework": f"PyTorch {torch.__version__} + diffusers + peft",
        "device": str(dev),
        "dtype": a.dtype,
        "tokens": tokens,
        "batch": b,
        "s_per_step": s,
        "steps": a.steps,
        "peak_bytes": peak,
        "max_rss_bytes": max_rss,
        "model_flops": flops,
        "tflops": flops / s / 1e12,
        "mfu": flops / s / 1e12 / a.peak_tflops,
        "peak_tflops": a.peak_tflops,
    }
    mem = f"{(peak or max_rss) / 1e9:.2f} GB"
    print(
        f"| {a.label} | {out['framework']} | {dev} | {a.dtype} | {tokens} | {s:.4f} | {mem} "
        f"| {out['tflops']:.2f} | {100 * out['mfu']:.1f}% |"
    )
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
