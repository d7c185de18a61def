"""Evaluate a trained HyperDAS / MDAS model on a RAVEL test split. See ``python evaluate.py --help``.

    python evaluate.py --model_path checkpoints/hyperdas_city --domain city
"""
import sys

from hyperdas_fast.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
