"""How many RAVEL rows expect a value longer than the knowledge filter's continuation?

With RAVEL's own labels (label mode "data") a row is kept only when the model's greedy
continuations of the base prompt and of verify_text start with the values the row expects
(``target`` and ``expected_answer``). A value longer than the continuation can never match,
so before the filter gave such values a longer continuation (hyperdas_fast/data/ravel.py:
filter_known), those rows could never be kept. This counts them per attribute and split, in
the tokens of the embedded model's tokenizer (a leading space, as after "country:").

    python scripts/ravel_answer_lengths.py --out results/ravel/answer_lengths_smollm2.json
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import git_commit, write_json_atomic  # noqa: E402

from hyperdas_fast.data import ravel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="RAVEL folder (default: $HYPERDAS_FAST_RAVEL_DIR or ../shared/ravel)")
    parser.add_argument("--model", default=None, help="tokenizer of this model (default: the embedded SmolLM2)")
    parser.add_argument("--max-new-tokens", type=int, default=6, help="the continuation's length being checked")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from hyperdas_fast.models.default_model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    cache = {}

    def too_long(value: str) -> bool:
        if value not in cache:
            cache[value] = len(tokenizer(" " + value.strip(), add_special_tokens=False).input_ids) > args.max_new_tokens
        return cache[value]

    splits = ravel.available_splits(args.data_dir)
    table = []
    for domain in sorted(splits):
        for attribute in sorted(splits[domain]):
            for split in ("train", "test"):
                rows = ravel.load_rows(domain, attribute, split, args.data_dir)
                target = sum(too_long(r["target"]) for r in rows)
                expected = sum(too_long(ravel.expected_answer(r)) for r in rows)
                either = sum(too_long(r["target"]) or too_long(ravel.expected_answer(r)) for r in rows)
                table.append(dict(domain=domain, attribute=attribute, split=split, rows=len(rows),
                                  target_too_long=target, expected_too_long=expected, either_too_long=either,
                                  either_fraction=either / len(rows) if rows else 0.0))
                print(f"{domain:20s} {attribute:18s} {split:5s} rows {len(rows):6d}  "
                      f"unkeepable {either:5d} ({100 * either / max(1, len(rows)):.1f} %)", flush=True)
    write_json_atomic(Path(args.out), {
        "what": "RAVEL rows whose target or expected answer is longer than max_new_tokens tokens",
        "commit": git_commit(), "model": args.model or "smollm2-135m-instruct (embedded)",
        "data_dir": str(ravel.resolve_data_dir(args.data_dir)), "max_new_tokens": args.max_new_tokens,
        "rows": table,
    })


if __name__ == "__main__":
    main()
