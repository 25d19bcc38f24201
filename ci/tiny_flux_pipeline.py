"""The tiny FLUX pipeline the sampling parity fixtures give diffusers: the tiny transformer of
trainer/tests/fixtures/parity, the tiny T5, CLIP and tokenizers of
datasets/tests/fixtures/encoders, the tiny VAE of datasets/tests/fixtures/vae_decoder, and
FluxPipeline's scheduler settings. Imported by ci/make_pipeline_fixture.py and
ci/make_img2img_fixture.py (run from the repository root)."""
import json
import os

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

ENCODERS = "datasets/tests/fixtures/encoders"


def captions():
    """The encoders fixture's captions.json: `captions` and `t5_tokens`."""
    return json.load(open(os.path.join(ENCODERS, "captions.json")))


def components():
    """Keyword arguments of a Flux pipeline's constructor."""
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(
            base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True),
        vae=AutoencoderKL.from_pretrained("datasets/tests/fixtures/vae_decoder/vae", torch_dtype=torch.float32),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(ENCODERS, "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(ENCODERS, "tokenizer")),
        text_encoder_2=T5EncoderModel.from_pretrained(os.path.join(ENCODERS, "text_encoder_2")),
        tokenizer_2=T5TokenizerFast.from_pretrained(os.path.join(ENCODERS, "tokenizer_2")),
        transformer=FluxTransformer2DModel.from_pretrained(
            "trainer/tests/fixtures/parity/diffusers", subfolder="transformer", torch_dtype=torch.float32),
    )
