#!/usr/bin/env python3
"""Sigmas of FLUX sampling as diffusers computes them, for flux/src/schedule.rs's test.

FluxPipeline passes np.linspace(1, 1/steps, steps) and mu = calculate_shift(image_seq_len)
(base 256 -> 0.5, max 4096 -> 1.15) to FlowMatchEulerDiscreteScheduler.set_timesteps, with the
FLUX.1-dev scheduler config (use_dynamic_shifting, exponential time shift). Written for 1, 4 and
28 steps at 256, 512 and 1024 px (256, 1024 and 4096 target tokens), with the timesteps the
transformer receives (timestep / 1000).

Usage: python ci/scheduler_fixture.py flux/tests/fixtures/flow_match_sigmas.json
"""
import json
import sys

import diffusers
import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

config = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
cases = []
for px in (256, 512, 1024):
    seq = (px // 16) ** 2
    for steps in (1, 4, 28):
        s = FlowMatchEulerDiscreteScheduler(**config)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(seq, 256, 4096, 0.5, 1.15)
        timesteps, _ = retrieve_timesteps(s, steps, "cpu", sigmas=sigmas, mu=mu)
        cases.append({
            "px": px,
            "image_seq_len": seq,
            "steps": steps,
            "mu": mu,
            "sigmas": [float(x) for x in s.sigmas],
            "model_timesteps": [float(t) for t in (timesteps / 1000)],
        })
with open(sys.argv[1], "w") as f:
    json.dump({"diffusers": diffusers.__version__, "config": config, "cases": cases}, f, indent=1)
print(f"wrote {len(cases)} cases")
