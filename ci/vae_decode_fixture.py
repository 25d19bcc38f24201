#!/usr/bin/env python3
"""The VAE decoder's parity fixture: a tiny FLUX-like diffusers AutoencoderKL (the encoders
fixture's configuration, with its decoder), saved as a diffusers `vae/` folder, and what it
decodes from fixed latents as FluxPipeline does (z / scaling_factor + shift_factor).

  vae/config.json, vae/diffusion_pytorch_model.safetensors
  expected.safetensors: `latents` [2, 16, 4, 4] (FLUX-normalised), `images` [2, 3, 32, 32]

Usage: python ci/vae_decode_fixture.py datasets/tests/fixtures/vae_decoder
"""
import os
import sys

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

out = sys.argv[1]
torch.manual_seed(5)
vae = AutoencoderKL(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,  # 8x, as FLUX's
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 32, 32),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
).eval()
# Non-trivial norms and biases so a wrong mapping shows.
with torch.no_grad():
    for name, p in vae.named_parameters():
        if name.endswith("bias") or "norm" in name:
            p.add_(0.1 * torch.randn_like(p))
vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
g = torch.Generator().manual_seed(11)
latents = torch.randn(2, 16, 4, 4, generator=g)
with torch.no_grad():
    z = latents / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(z, return_dict=False)[0]
save_file({"latents": latents.contiguous(), "images": images.contiguous()},
          os.path.join(out, "expected.safetensors"))
print("images", tuple(images.shape), "max", float(images.abs().max()))
