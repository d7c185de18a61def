"""Train HyperDAS (or the MDAS baseline) on RAVEL. See ``python train.py --help``.

    python train.py --domain city --layer 15 --feature_dim 128 --epochs 5
"""
import sys

from hyperdas_fast.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
