#!/usr/bin/env python3
"""Image-to-image sampling parity: diffusers' FluxImg2ImgPipeline with the tiny pipeline of
ci/tiny_flux_pipeline.py, from a fixed start picture and fixed noise. Writes
trainer/tests/fixtures/img2img/:
  init.png              the 64 x 64 start picture (its own size: no resize)
  inputs.safetensors    `noise` [1, 16, 64] (packed) mixed into the picture's latents
  expected.safetensors  `latents` (final, packed) and `image` [1, 64, 64, 3] in [0, 1]
  case.json             prompt, steps, strength, guidance, size, T5 tokens

Two things are pinned that the pipeline would draw: the noise (its `randn_tensor`, replaced by
the saved tensor) and the picture's latents, which diffusers samples from the VAE's posterior
where this project takes the posterior's mode (deterministic; for FLUX's VAE the posterior's
spread is negligible), so the fixture's pipeline encodes with the mode as well.

Usage: python ci/make_img2img_fixture.py   (from the repository root)
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from diffusers import FluxImg2ImgPipeline
from diffusers.pipelines.flux import pipeline_flux_img2img
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_flux_pipeline  # noqa: E402

out = "trainer/tests/fixtures/img2img"
os.makedirs(out, exist_ok=True)
captions = tiny_flux_pipeline.captions()
t5_tokens = captions["t5_tokens"]
prompt, steps, strength, guidance, size = captions["captions"][0], 5, 0.6, 3.5, 64

# The start picture: a vertical gradient with a square, saved losslessly.
y, x = np.mgrid[0:size, 0:size]
pic = np.stack([40 + 3 * y, 200 - 2 * x, 90 + x + y], axis=-1).clip(0, 255).astype(np.uint8)
pic[16:40, 20:48] = [230, 30, 30]
init_path = os.path.join(out, "init.png")
Image.fromarray(pic).save(init_path)

g = torch.Generator().manual_seed(11)
noise = torch.randn(1, 16, size // 8, size // 8, generator=g)


class ModeFluxImg2Img(FluxImg2ImgPipeline):
    """Encodes the start picture with the posterior's mode, as this project does."""

    def _encode_vae_image(self, image, generator):
        latents = self.vae.encode(image).latent_dist.mode()
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor


pipeline_flux_img2img.randn_tensor = lambda shape, **kw: noise.clone()
pipe = ModeFluxImg2Img(**tiny_flux_pipeline.components())
common = dict(prompt=prompt, image=Image.open(init_path), strength=strength, height=size,
              width=size, num_inference_steps=steps, guidance_scale=guidance,
              max_sequence_length=t5_tokens)
with torch.no_grad():
    final = pipe(**common, output_type="latent").images
    image = pipe(**common, output_type="np").images
packed = pipe._pack_latents(noise, 1, 16, size // 8, size // 8)
save_file({"noise": packed.contiguous()}, os.path.join(out, "inputs.safetensors"))
save_file({"latents": final.contiguous(), "image": torch.from_numpy(image).contiguous()},
          os.path.join(out, "expected.safetensors"))
json.dump({"prompt": prompt, "steps": steps, "strength": strength, "guidance": guidance,
           "size": size, "t5_tokens": t5_tokens}, open(os.path.join(out, "case.json"), "w"), indent=1)
print("final", tuple(final.shape), "image", image.shape, float(image.mean()))
