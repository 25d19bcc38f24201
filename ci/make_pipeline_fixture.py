#!/usr/bin/env python3
"""Whole-pipeline sampling parity: diffusers' FluxPipeline from a prompt (no references) with
the tiny pipeline of ci/tiny_flux_pipeline.py, from fixed start latents. Writes
trainer/tests/fixtures/pipeline/:
  inputs.safetensors    `latents` [1, 16, 64] (packed start latents of a 64 x 64 image)
  expected.safetensors  `latents` (final, packed) and `image` [1, 64, 64, 3] in [0, 1]
  case.json             prompt, steps, guidance, size, T5 tokens

Usage: python ci/make_pipeline_fixture.py   (from the repository root)
"""
import json
import os
import sys

import torch
from diffusers import FluxPipeline
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_flux_pipeline  # noqa: E402

out = "trainer/tests/fixtures/pipeline"
os.makedirs(out, exist_ok=True)
captions = tiny_flux_pipeline.captions()
t5_tokens = captions["t5_tokens"]
pipe = FluxPipeline(**tiny_flux_pipeline.components())
prompt, steps, guidance, size = captions["captions"][0], 4, 3.5, 64
g = torch.Generator().manual_seed(7)
latents = torch.randn(1, (size // 16) ** 2, 64, generator=g)
common = dict(prompt=prompt, latents=latents.clone(), height=size, width=size,
              num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=t5_tokens)
with torch.no_grad():
    final = pipe(**common, output_type="latent").images
    image = pipe(**common, output_type="np").images
save_file({"latents": latents}, os.path.join(out, "inputs.safetensors"))
save_file({"latents": final.contiguous(), "image": torch.from_numpy(image).contiguous()},
          os.path.join(out, "expected.safetensors"))
json.dump({"prompt": prompt, "steps": steps, "guidance": guidance, "size": size,
           "t5_tokens": t5_tokens}, open(os.path.join(out, "case.json"), "w"), indent=1)
print("final", tuple(final.shape), "image", image.shape, float(image.mean()))
