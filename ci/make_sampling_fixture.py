#!/usr/bin/env python3
"""FLUX sampling parity fixture: diffusers' FluxPipeline denoising loop on the tiny transformer of
trainer/tests/fixtures/parity (no references), from fixed start latents and fixed prompt
embeddings, returning the final packed latents (output_type="latent"). Written to
trainer/tests/fixtures/sampling/{inputs,expected}.safetensors.

Usage: python ci/make_sampling_fixture.py trainer/tests/fixtures
"""
import os
import sys

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file

root = sys.argv[1] if len(sys.argv) > 1 else "trainer/tests/fixtures"
out = os.path.join(root, "sampling")
os.makedirs(out, exist_ok=True)
transformer = FluxTransformer2DModel.from_pretrained(
    os.path.join(root, "parity", "diffusers"), subfolder="transformer", torch_dtype=torch.float32
)
scheduler = FlowMatchEulerDiscreteScheduler(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
)
pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                    text_encoder_2=None, tokenizer_2=None, transformer=transformer)
g = torch.Generator().manual_seed(3)
height = width = 64  # 4 x 4 tokens of 2 x 2 latent patches (vae_scale_factor 8)
tokens = (height // 16) * (width // 16)
text = 5
latents = torch.randn(1, tokens, 64, generator=g)
prompt_embeds = torch.randn(1, text, transformer.config.joint_attention_dim, generator=g)
pooled = torch.randn(1, transformer.config.pooled_projection_dim, generator=g)
cases = {}
for steps in (1, 4, 8):
    with torch.no_grad():
        final = pipe(
            prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, latents=latents.clone(),
            height=height, width=width, num_inference_steps=steps, guidance_scale=3.5,
            output_type="latent", return_dict=False,
        )[0]
    cases[f"final_{steps}"] = final.contiguous()
save_file({"latents": latents, "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled,
           "guidance": torch.tensor([3.5])}, os.path.join(out, "inputs.safetensors"))
save_file(cases, os.path.join(out, "expected.safetensors"))
print(f"wrote {len(cases)} cases to {out}")
