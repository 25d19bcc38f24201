#!/usr/bin/env python3
"""Reads a run's TensorBoard event files with TensorBoard's own EventAccumulator and checks that
they hold what the trainer wrote: every step scalar of metrics.jsonl (same steps, same values
in f32) and one validation grid image per validation line.

Usage: ci/tensorboard_check.py RUN_DIR
"""
import json
import math
import os
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run = sys.argv[1]
acc = EventAccumulator(os.path.join(run, "tb"), size_guidance={"scalars": 0, "images": 0})
acc.Reload()
tags = acc.Tags()
lines = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
steps = [l for l in lines if "loss" in l]
validations = [l for l in lines if "validation" in l]

for tag, key in [("loss/total", "loss"), ("loss/diff", "loss_diff"), ("loss/scal", "loss_scal"),
                 ("loss/mdl", "loss_mdl"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm")]:
    assert tag in tags["scalars"], f"{tag} missing; scalars: {tags['scalars']}"
    events = acc.Scalars(tag)
    want = [(l["step"], l[key]) for l in steps if l[key] is not None and math.isfinite(l[key])]
    assert [e.step for e in events] == [s for s, _ in want], f"{tag}: steps differ"
    for e, (_, v) in zip(events, want):
        assert abs(e.value - v) <= 1e-6 * max(1.0, abs(v)), f"{tag} step {e.step}: {e.value} vs {v}"

images = acc.Images("validation/grid") if "validation/grid" in tags["images"] else []
assert [i.step for i in images] == [v["step"] for v in validations], \
    f"grid images at {[i.step for i in images]}, validations at {[v['step'] for v in validations]}"
for i in images:
    assert i.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n" and i.width > 0 and i.height > 0
print(f"tensorboard: {len(steps)} steps x {len(tags['scalars'])} scalars and "
      f"{len(images)} validation grids read back by EventAccumulator")
