#!/usr/bin/env python3
"""Whole-pipeline sampling parity: diffusers' FluxPipeline from a prompt (no references) with
the tiny transformer of trainer/tests/fixtures/parity, the tiny T5, CLIP and tokenizers of
datasets/tests/fixtures/encoders and the tiny VAE of datasets/tests/fixtures/vae_decoder, from
fixed start latents. Writes trainer/tests/fixtures/pipeline/:
  inputs.safetensors    `latents` [1, 16, 64] (packed start latents of a 64 x 64 image)
  expected.safetensors  `latents` (final, packed) and `image` [1, 64, 64, 3] in [0, 1]
  case.json             prompt, steps, guidance, size, T5 tokens

Usage: python ci/make_pipeline_fixture.py   (from the repository root)
"""
import json
import os

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

enc = "datasets/tests/fixtures/encoders"
out = "trainer/tests/fixtures/pipeline"
os.makedirs(out, exist_ok=True)
captions = json.load(open(os.path.join(enc, "captions.json")))
t5_tokens = captions["t5_tokens"]
transformer = FluxTransformer2DModel.from_pretrained(
    "trainer/tests/fixtures/parity/diffusers", subfolder="transformer", torch_dtype=torch.float32)
vae = AutoencoderKL.from_pretrained("datasets/tests/fixtures/vae_decoder/vae", torch_dtype=torch.float32)
scheduler = FlowMatchEulerDiscreteScheduler(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
pipe = FluxPipeline(
    scheduler=scheduler, vae=vae,
    text_encoder=CLIPTextModel.from_pretrained(os.path.join(enc, "text_encoder")),
    tokenizer=CLIPTokenizer.from_pretrained(os.path.join(enc, "tokenizer")),
    text_encoder_2=T5EncoderModel.from_pretrained(os.path.join(enc, "text_encoder_2")),
    tokenizer_2=T5TokenizerFast.from_pretrained(os.path.join(enc, "tokenizer_2")),
    transformer=transformer)
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
