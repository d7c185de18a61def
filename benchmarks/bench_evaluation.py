"""A full HyperDAS evaluation pass on RAVEL prompts: examples per second and peak memory,
with the op on the `torch` reference and on the fastest backend (`auto`), side by side.

The model is an untrained HyperDAS on the embedded SmolLM2 (speed does not depend on the
weights). Each pass evaluates the same records in each inference mode with
``hyperdas_fast.evaluation.metrics.evaluate`` (teacher-forced label logits, as in training).

    python benchmarks/bench_evaluation.py --out benchmarks/results/evaluation_cpu.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, peak_memory_bytes, write_json_atomic  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--feature-dim", type=int, default=128)
    parser.add_argument("--modes", nargs="+", default=["default", "column_argmax"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from hyperdas_fast import ops
    from hyperdas_fast.data.ravel import load_rows, to_records
    from hyperdas_fast.evaluation.metrics import evaluate
    from hyperdas_fast.models.hyperdas import HyperDAS

    device = torch.device(args.device)
    torch.manual_seed(0)
    results = []
    backends = ["torch", "auto"]
    models = {b: HyperDAS(layer=args.layer, feature_dim=args.feature_dim, backend=b, device=device) for b in backends}
    # One set of weights for both: the backend must be the only difference.
    models["auto"].model.load_state_dict(models["torch"].model.state_dict())
    rows = load_rows("city", "country", split="test", data_dir=args.data_dir)[: args.examples]
    records = to_records(rows, models["torch"].tokenizer)
    for mode in args.modes:
        times = {b: [] for b in backends}
        for _ in range(args.repeats):
            for backend in backends:  # interleaved so both see the same machine load
                hd = models[backend]
                with torch.no_grad():
                    start = time.perf_counter()
                    evaluate(hd, records, hd.collator, modes=(mode,), batch_size=args.batch_size)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[backend].append(time.perf_counter() - start)
        for backend in backends:
            hd = models[backend]
            with torch.no_grad():
                peak = peak_memory_bytes(
                    lambda: evaluate(hd, records[: args.batch_size], hd.collator, modes=(mode,),
                                     batch_size=args.batch_size), device)
            median = sorted(times[backend])[len(times[backend]) // 2]
            results.append(dict(mode=mode, op_backend=backend, seconds=times[backend], median_s=median,
                                examples_per_s=len(records) / median, peak_bytes_one_batch=peak))
            print(f"{mode:14s} op={backend:5s} {median:7.2f} s  {len(records) / median:7.1f} examples/s", flush=True)
    for r in results:
        ref = next(x for x in results if x["mode"] == r["mode"] and x["op_backend"] == "torch")
        r["speedup_vs_torch_op"] = ref["median_s"] / r["median_s"]
    payload = {
        "benchmark": "HyperDAS evaluation pass (RAVEL city/country test prompts, untrained HyperDAS)",
        "machine": machine_info(device),
        "available_op_backends": ops.available_backends(device),  # auto takes cpp on CPU, cuda on GPU
        "settings": {"examples": len(records), "batch_size": args.batch_size, "layer": args.layer,
                     "feature_dim": args.feature_dim, "model": "smollm2-135m-instruct (embedded)",
                     "dtype": "float32", "repeats": args.repeats},
        "results": results,
    }
    if args.out:
        write_json_atomic(args.out, payload)
        print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
