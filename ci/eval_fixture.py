#!/usr/bin/env python3
"""Builds the fixture of `trainer eval` under trainer/tests/fixtures/eval/: what transformers
computes for DreamBench's metrics on tiny random models.

  clip/   a tiny CLIPModel (config.json, model.safetensors), its tokenizer.json (the tiny CLIP BPE
          of datasets/tests/fixtures/encoders/tokenizer) and CLIPImageProcessor's
          preprocessor_config.json (shortest edge 32, centre crop 32, bicubic)
  dino/   a tiny ViTModel (DINO's architecture, ViT-S/16 in small) and ViTImageProcessor's
          preprocessor_config.json (32 x 32, bilinear)
  dinov2/, dinov2-swiglu/   tiny Dinov2Models (DINOv2's architecture: layer scale, GELU MLP;
          the second with the SwiGLU MLP of dinov2-giant), position embeddings for a 5 x 5
          grid of patches while the images give 4 x 4, so they are resized (bicubic) as for
          facebook/dinov2-* at 224 pixels, and BitImageProcessor's preprocessor_config.json
          (shortest edge 36, centre crop 32, bicubic, ImageNet statistics; facebook/dinov2's
          256 / 224 in small)
  refs/, samples/, cases.json   three cases in the official format (one to three references),
          one sample per case (`<index>.png`, as `trainer sample --cases` names them)
  expected.safetensors   per image: the processors' pixel_values (clip_pixels.<name>,
          dino_pixels.<name>) and the models' embeddings from them (clip_image.<name>,
          dino_cls.<name>, dinov2_pixels.<name>, dinov2_cls.<name>, dinov2_swiglu_cls.<name>),
          clip_text.<index> per prompt; the metrics (clip_i, clip_t, dino, dinov2) per case and
          overall, as the paper averages them (per case over references, then over cases)

Embeddings: CLIPModel.get_image_features / get_text_features (projected), and ViTModel's and
Dinov2Model's last_hidden_state[:, 0] (the CLS token after the final layer norm). Usage, with a Python that
has torch, transformers and pillow: python ci/eval_fixture.py trainer/tests/fixtures/eval
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel,
                          CLIPTokenizerFast, Dinov2Config, Dinov2Model, ViTConfig, ViTImageProcessor,
                          ViTModel)

out = sys.argv[1]
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.manual_seed(0)
rng = np.random.default_rng(0)

# --- models
clip_cfg = CLIPConfig(
    text_config=dict(vocab_size=633, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=16, bos_token_id=631,
                     eos_token_id=2, pad_token_id=1),
    vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, image_size=32, patch_size=8),
    projection_dim=12,
)
clip = CLIPModel(clip_cfg).eval()
dino = ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=32, image_size=32, patch_size=8, qkv_bias=True),
                add_pooling_layer=False).eval()
with torch.no_grad():
    for m in (clip, dino):
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
clip_dir, dino_dir = os.path.join(out, "clip"), os.path.join(out, "dino")
clip.save_pretrained(clip_dir)
dino.save_pretrained(dino_dir)
tok_src = os.path.join(root, "datasets/tests/fixtures/encoders/tokenizer")
tok = CLIPTokenizerFast(os.path.join(tok_src, "vocab.json"), os.path.join(tok_src, "merges.txt"))
tok.save_pretrained(clip_dir)
for f in os.listdir(clip_dir):
    if f not in ("config.json", "model.safetensors", "tokenizer.json"):
        os.remove(os.path.join(clip_dir, f))
clip_proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                               resample=3)
dino_proc = ViTImageProcessor(size={"height": 32, "width": 32}, resample=2)
clip_proc.save_pretrained(clip_dir)
dino_proc.save_pretrained(dino_dir)

# DINOv2: drawn after the models above, from their own seed, so that those stay as they were.
torch.manual_seed(1)
dinov2s = {}
for name, swiglu in (("dinov2", False), ("dinov2-swiglu", True)):
    m = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 mlp_ratio=2, image_size=40, patch_size=8,
                                 use_swiglu_ffn=swiglu)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(os.path.join(out, name))
    dinov2s[name] = m
dinov2_proc = BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                                resample=3, image_mean=[0.485, 0.456, 0.406],
                                image_std=[0.229, 0.224, 0.225])
for name in dinov2s:
    dinov2_proc.save_pretrained(os.path.join(out, name))


# --- images: smooth random fields of varied sizes, so resampling has something to smooth
def picture(w, h):
    base = rng.uniform(0, 255, size=(h // 8 + 2, w // 8 + 2, 3)).astype(np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BICUBIC)


os.makedirs(os.path.join(out, "refs"), exist_ok=True)
os.makedirs(os.path.join(out, "samples"), exist_ok=True)
cases, names = [], []
for index, (prompt, sizes) in enumerate([
    ("a red square and a green disc", [(60, 45)]),
    ("two cats and a dog in the park", [(40, 64), (50, 50)]),
    ("a mug, a hat and a clock on a table", [(48, 36), (33, 70), (64, 64)]),
]):
    paths = []
    for k, (w, h) in enumerate(sizes):
        name = f"refs/{index}-{k}.png"
        picture(w, h).save(os.path.join(out, name))
        paths.append(name)
    picture(64, 64).save(os.path.join(out, "samples", f"{index}.png"))
    cases.append({"index": index, "prompt": prompt,
                  "image_paths": paths[0] if len(paths) == 1 else paths})
    names.append((index, prompt, paths))
with open(os.path.join(out, "cases.json"), "w") as f:
    json.dump(cases, f, indent=1)

# --- what transformers computes
expected = {}


def embed(path):
    img = Image.open(os.path.join(out, path)).convert("RGB")
    key = path.replace("/", ".")
    cp = clip_proc(images=img, return_tensors="pt")["pixel_values"]
    dp = dino_proc(images=img, return_tensors="pt")["pixel_values"]
    d2p = dinov2_proc(images=img, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ci = clip.get_image_features(pixel_values=cp)
        dc = dino(pixel_values=dp).last_hidden_state[:, 0]
        d2 = dinov2s["dinov2"](pixel_values=d2p).last_hidden_state[:, 0]
        d2s = dinov2s["dinov2-swiglu"](pixel_values=d2p).last_hidden_state[:, 0]
    ci = ci.pooler_output if hasattr(ci, "pooler_output") else ci
    expected[f"clip_pixels.{key}"] = cp[0]
    expected[f"dino_pixels.{key}"] = dp[0]
    expected[f"clip_image.{key}"] = ci[0]
    expected[f"dino_cls.{key}"] = dc[0]
    expected[f"dinov2_pixels.{key}"] = d2p[0]
    expected[f"dinov2_cls.{key}"] = d2[0]
    expected[f"dinov2_swiglu_cls.{key}"] = d2s[0]
    return ci[0], dc[0], d2[0]


cos = torch.nn.functional.cosine_similarity
per_case = {"clip_i": [], "clip_t": [], "dino": [], "dinov2": []}
for index, prompt, paths in names:
    s_clip, s_dino, s_dinov2 = embed(f"samples/{index}.png")
    refs = [embed(p) for p in paths]
    ids = tok(prompt, truncation=True, max_length=16, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        t = clip.get_text_features(input_ids=ids)
    t = t.pooler_output if hasattr(t, "pooler_output") else t
    expected[f"clip_text.{index}"] = t[0]
    expected[f"text_ids.{index}"] = ids[0].to(torch.int64)
    ci = torch.stack([cos(s_clip, r[0], dim=0) for r in refs]).mean()
    di = torch.stack([cos(s_dino, r[1], dim=0) for r in refs]).mean()
    d2i = torch.stack([cos(s_dinov2, r[2], dim=0) for r in refs]).mean()
    ct = cos(s_clip, t[0], dim=0)
    for k, v in (("clip_i", ci), ("clip_t", ct), ("dino", di), ("dinov2", d2i)):
        expected[f"{k}.{index}"] = v.reshape(1)
        per_case[k].append(v)
for k, v in per_case.items():
    expected[k] = torch.stack(v).mean().reshape(1)
save_file({k: v.contiguous().float() if v.dtype != torch.int64 else v.contiguous()
           for k, v in expected.items()}, os.path.join(out, "expected.safetensors"))
print({k: float(expected[k]) for k in per_case})
