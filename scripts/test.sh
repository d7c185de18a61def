#!/usr/bin/env bash
# The README's test command: installs what it needs, builds the extension, then runs
# the test suite (the CUDA sources are compile-checked with nvcc by tests/test_cuda_compile.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -m pytest -q -p no:cacheprovider --timeout=1500 tests "$@"
