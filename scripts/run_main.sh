#!/usr/bin/env bash
# The main job: train HyperDAS on RAVEL city/country with the embedded SmolLM2-135M-Instruct
# on the CPU (about 3 minutes; settings from results/ravel/smollm2_city_country_best), then
# evaluate it in every inference mode on the entity-disjoint test split (results.json and a
# Markdown table in the run folder). Installs what it needs first. Extra arguments are
# passed to train.py (e.g. --max-steps 20, --domain all, --method mdas, --model PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Each run replaces the previous one in runs/hyperdas_city_country, unless it resumes it.
overwrite=--overwrite
for arg in "$@"; do [[ "$arg" == --resume* ]] && overwrite=; done
python train.py --domain city --attribute country --layer 15 --feature_dim 128 \
  --label-mode model --max-examples 160 --max-test-examples 80 --batch_size 8 --epochs 3 \
  --lr 5e-4 --causal_weight 1.0 --isolation_weight 1.0 \
  --seed 0 --checkpoint_dir runs/hyperdas_city_country --checkpoint_every 20 $overwrite "$@"
