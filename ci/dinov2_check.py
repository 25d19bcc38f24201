#!/usr/bin/env python3
"""DINOv2 at a released model's size: `trainer eval --dino` against transformers.

The committed fixture (trainer/tests/fixtures/eval) checks DINOv2 on tiny models; this builds a
Dinov2Model of facebook/dinov2-base's config (768 wide, 12 layers of 12 heads, patches of 14,
position embeddings for 518 pixels: 37 x 37, resized to the 224-pixel crop's 16 x 16) with
seeded random weights, writes it without a preprocessor_config.json (so `trainer eval` must
use facebook/dinov2's processor by itself: shortest edge 256, centre crop 224, bicubic,
ImageNet statistics), scores the fixture's cases with transformers and with TRAINER, and fails
when a case differs by more than 2e-3 (preprocessing differs from PIL's by about a grey level).

  python ci/dinov2_check.py TRAINER FIXTURE_DIR WORK_DIR
"""
import json
import os
import subprocess
import sys

import torch
from PIL import Image
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

trainer, fixture, work = sys.argv[1:4]
model_dir = os.path.join(work, "dinov2-base-random")
torch.manual_seed(3)
model = Dinov2Model(Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 image_size=518, patch_size=14)).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
model.save_pretrained(model_dir)
proc = BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                         resample=3, image_mean=[0.485, 0.456, 0.406],
                         image_std=[0.229, 0.224, 0.225])


def cls(path):
    img = Image.open(os.path.join(fixture, path)).convert("RGB")
    with torch.no_grad():
        return model(pixel_values=proc(images=img, return_tensors="pt")["pixel_values"]
                     ).last_hidden_state[0, 0]


cos = torch.nn.functional.cosine_similarity
theirs = {}
for case in json.load(open(os.path.join(fixture, "cases.json"))):
    refs = case["image_paths"] if isinstance(case["image_paths"], list) else [case["image_paths"]]
    sample = cls(f"samples/{case['index']}.png")
    theirs[case["index"]] = torch.stack([cos(sample, cls(r), dim=0) for r in refs]).mean().item()

out = os.path.join(work, "metrics.json")
subprocess.run([trainer, "eval", "--samples", os.path.join(fixture, "samples"),
                "--cases", os.path.join(fixture, "cases.json"), "--dino", model_dir,
                "--out", out], check=True, stdout=subprocess.DEVNULL)
ours = {c["index"]: c["dino"] for c in json.load(open(out))["cases"]}
worst = 0.0
for index, want in theirs.items():
    got = ours[index]
    worst = max(worst, abs(got - want))
    print(f"case {index}: DINO {got:.5f} (ours) {want:.5f} (transformers)")
print(f"largest difference {worst:.2e}")
if worst > 2e-3:
    sys.exit("DINOv2 at dinov2-base's size differs from transformers by more than 2e-3")
