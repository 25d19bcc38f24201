#!/usr/bin/env bash
# Regenerates the parity fixtures: diffusers' forward (trainer/tests/fixtures/parity) and the
# official MOSAIC forward and losses (trainer/tests/fixtures/mosaic). Creates a venv with
# torch and diffusers (CPU use only) under ci/.venv unless PARITY_PYTHON names an interpreter
# that already has them. The Rust parity test reads the committed files and needs no Python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PARITY_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ ! -x ci/.venv/bin/python ]; then
    python3 -m venv ci/.venv
    ci/.venv/bin/pip install -q --upgrade pip
    ci/.venv/bin/pip install -q torch diffusers peft safetensors
  fi
  PY=ci/.venv/bin/python
fi
rm -rf trainer/tests/fixtures/parity trainer/tests/fixtures/mosaic
"$PY" ci/make_parity_fixtures.py trainer/tests/fixtures/parity
"$PY" ci/make_mosaic_parity_fixtures.py trainer/tests/fixtures/mosaic
