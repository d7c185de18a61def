"""How far can any subspace intervention at the base entity's last token go on the main job's
RAVEL test split? A full-rank MDAS (feature_dim = d, so R R^T = I: the whole residual vector
at that token is replaced by the counterfactual entity's) scored by the library's own
evaluate(), layer by layer. A learned subspace there is not strictly bounded by this, but a
full swap that rarely moves the answer says the setup (layer, position, labels), not the
training, limits causal accuracy.

    python scripts/ravel_full_swap_ceiling.py --out results/ravel/smollm2_city_country_seeded/full_swap_ceiling.json

Same split, seed and labels as scripts/run_main.sh (city / country, label_mode "model", 80
test examples, seed 0; the knowledge filter's cache from a main-job run is reused). "Layer L"
is the library's: the input of block L. About 10-20 s per layer on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import git_commit, write_json_atomic  # noqa: E402

from hyperdas_fast.data import HyperDASCollator, ravel  # noqa: E402
from hyperdas_fast.evaluation.metrics import evaluate  # noqa: E402
from hyperdas_fast.models.adapters import get_adapter  # noqa: E402
from hyperdas_fast.models.default_model import load_model  # noqa: E402
from hyperdas_fast.models.mdas import MDASModel  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 4, 6, 8, 10, 12, 15, 20, 25, 29])
    parser.add_argument("--domain", default="city")
    parser.add_argument("--attribute", default="country")
    parser.add_argument("--max-test-examples", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    started = time.time()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model()
    records = ravel.load_dataset(args.domain, args.attribute, "test", args.data_dir, model=model,
                                 tokenizer=tokenizer, filter=True, label_mode="model",
                                 max_examples=args.max_test_examples, seed=args.seed)
    n_causal = sum(bool(r["is_causal"]) for r in records)
    n_isolation = len(records) - n_causal
    collator = HyperDASCollator(tokenizer)
    d = get_adapter(model).hidden_size
    rows = []
    for layer in args.layers:
        net = MDASModel(model, layer=layer, feature_dim=d)
        with torch.no_grad():
            R = net.basis()
            identity_error = float((R @ R.T - torch.eye(d, dtype=R.dtype)).abs().max())
        overall = evaluate(net, records, collator, modes=("groundtruth",))["groundtruth"]["overall"]
        row = dict(layer=layer, causal_correct=round(overall["causal"] * n_causal),
                   isolation_correct=round(overall["isolation"] * n_isolation),
                   disentangle=overall["disentangle"], basis_identity_error=identity_error)
        rows.append(row)
        print(f"layer {layer:2d}: causal {row['causal_correct']}/{n_causal}, isolation "
              f"{row['isolation_correct']}/{n_isolation}, disentangle {100 * row['disentangle']:.1f}", flush=True)
    write_json_atomic(args.out, {
        "analysis": "full-swap (feature_dim = d) MDAS at the base entity's last token, library evaluate()",
        "commit": git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "domain": args.domain, "attribute": args.attribute, "label_mode": "model", "seed": args.seed,
        "n_causal": n_causal, "n_isolation": n_isolation, "no_intervention": "causal 0, isolation all",
        "seconds": round(time.time() - started, 1), "layers": rows,
    })


if __name__ == "__main__":
    main()
