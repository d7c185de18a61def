"""The same DAS intervention through pyvene, our pyvene drop-in, and our native path.

A low-rank rotated-space (DAS) intervention at the output of one decoder block of the
embedded SmolLM2-135M, at the entity's last token, base = a RAVEL city_country_test
prompt, source = its counterfactual prompt. For each batch size, side by side and
interleaved (one call of each method per round, so load from other processes hits all
methods alike):

  a_pyvene          pyvene.IntervenableModel + pyvene.LowRankRotatedSpaceIntervention
  b_dropin_class    pyvene.IntervenableModel + hyperdas_fast LowRankRotatedSpaceIntervention
                    (the one-import change: only the intervention class is ours)
  b_dropin          hyperdas_fast IntervenableModel + our class (pyvene's IntervenableModel
                    whose source forward stops after the intervened layer)
  c_native_padded   hyperdas_fast.integrations.pyvene.das_interchange(regroup=False): forward
                    hooks on the HF model, source forward cut at the layer (and after the
                    entity token), ops.interchange_hard in place, logits at the last token
                    only (no pyvene); the padded batch as given
  c_native          the same with regroup=True (default): the call regroups the batch's rows
                    by real length, so right padding costs ~nothing

All return the same last-token logits (checked; max abs difference in the JSON). Reports
interventions per second (median over rounds; the order of the methods rotates each
round), peak resident-memory growth of one call (sampled, on the warm-up call), the
ratios to a_pyvene, and a PNG of throughput against batch size.

    python benchmarks/bench_pyvene.py            # ~5 min on the shared 2-core CPU machine
    python benchmarks/bench_pyvene.py --batch-sizes 1 8 --rounds 2   # quick
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS_DIR, machine_info, write_json_atomic  # noqa: E402

from hyperdas_fast import ops  # noqa: E402
from hyperdas_fast.integrations import pyvene as hp  # noqa: E402

METHODS = ["a_pyvene", "b_dropin_class", "b_dropin", "c_native_padded", "c_native"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(fn: Callable[[], object], interval_s: float = 0.001) -> int:
    """Peak resident memory above the pre-call level during one call of fn().

    Freed heap memory is handed back first (glibc malloc_trim), then a thread samples
    /proc/self/statm every ``interval_s``. (The profiler's [memory] events that
    benchmarks/common.peak_memory_bytes relies on are not emitted by this torch build on CPU.)
    """
    import ctypes
    import gc
    import threading

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss_bytes())
    return peak[0] - before


def ravel_rows(ravel_dir: Path, n: int):
    import datasets

    ds = datasets.load_from_disk(str(ravel_dir / "city_country_test"))
    return ds.select(range(min(n, len(ds))))


def make_batch(tok, rows):
    base = [r["input_prefix"] + r["input_suffix"] for r in rows]
    cf = [r["counterfactual_input_prefix"] + r["counterfactual_input_suffix"] for r in rows]
    base_pos = [len(tok(r["input_prefix"]).input_ids) - 1 for r in rows]
    cf_pos = [len(tok(r["counterfactual_input_prefix"]).input_ids) - 1 for r in rows]
    b = tok(base, return_tensors="pt", padding=True)
    s = tok(cf, return_tensors="pt", padding=True)
    return b, s, base_pos, cf_pos


def last_logits(logits, inputs):
    last = inputs["attention_mask"].sum(1) - 1
    return logits[torch.arange(logits.shape[0]), last]


def build_methods(model, layer: int, rank: int, seed: int) -> Dict[str, Callable]:
    import pyvene as pv

    def config(cls):
        return pv.IntervenableConfig(
            representations=[{"layer": layer, "component": "block_output", "unit": "pos",
                              "max_number_of_units": 1, "low_rank_dimension": rank}],
            intervention_types=cls)

    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        a = pv.IntervenableModel(config(pv.LowRankRotatedSpaceIntervention), model)
        key = next(iter(a.interventions))
        state = a.interventions[key].state_dict()
        b1 = pv.IntervenableModel(config(hp.LowRankRotatedSpaceIntervention), model)
        b1.interventions[key].load_state_dict(state)
        b2 = hp.IntervenableModel(config(hp.LowRankRotatedSpaceIntervention), model)
        b2.interventions[key].load_state_dict(state)
    # The native path gets the same basis, computed once (it is a fixed tensor there).
    basis = a.interventions[key].rotate_layer.weight.detach().clone()

    def via(intervenable):
        def run(batch):
            b, s, bpos, spos = batch
            units = {"sources->base": ([[[p] for p in spos]], [[[p] for p in bpos]])}
            return last_logits(intervenable(b, [s], units)[1].logits, b)
        return run

    def native(regroup):
        def run(batch):
            b, s, bpos, spos = batch
            return hp.das_interchange(model, b, s, bpos, spos, layer, basis, regroup=regroup)
        return run

    return {"a_pyvene": via(a), "b_dropin_class": via(b1), "b_dropin": via(b2),
            "c_native_padded": native(False), "c_native": native(True)}


def plot(results: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "a_pyvene": "(a) pyvene",
        "b_dropin_class": "(b) pyvene + our class",
        "b_dropin": "(b) our drop-in IntervenableModel + class",
        "c_native_padded": "(c) native, padded batch as given",
        "c_native": "(c) native, rows regrouped by length",
    }
    sizes = [int(b) for b in results["per_batch"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        ys = [results["per_batch"][str(b)]["methods"][method]["interventions_per_s"] for b in sizes]
        ax.plot(sizes, ys, marker="o", label=labels[method])
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(b) for b in sizes])
    ax.set_xlabel("batch size (RAVEL city_country prompts)")
    ax.set_ylabel("interventions / s (median)")
    shapes = results["shapes"]
    ax.set_title(f"DAS low-rank (k={shapes['rank']}) at layer {shapes['layer']}, SmolLM2-135M, CPU "
                 f"({results['machine']['torch_threads']} thread)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32],
                        help="default 1 8 16 32 (64 takes ~3 more minutes on the shared machine)")
    parser.add_argument("--rounds", type=int, nargs="+", default=None,
                        help="timed rounds per batch size (one per size, or one for all); default 5 3 3 3")
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the machine's 2 cores are shared)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory calls")
    parser.add_argument("--ravel-dir", default=os.environ.get(
        "HYPERDAS_FAST_RAVEL_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "ravel")))
    parser.add_argument("--out", default=str(RESULTS_DIR / "pyvene_cpu.json"))
    parser.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    args = parser.parse_args(argv)
    if not hp.PYVENE_AVAILABLE:
        print(f"error: pyvene is not importable ({hp.PYVENE_IMPORT_ERROR}); {hp.INSTALL_HINT}", file=sys.stderr)
        return 2
    rounds = args.rounds or ([5, 3, 3, 3][: len(args.batch_sizes)] + [3] * max(0, len(args.batch_sizes) - 4))
    if len(rounds) == 1:
        rounds = rounds * len(args.batch_sizes)
    if len(rounds) != len(args.batch_sizes):
        parser.error("--rounds needs one value or one per batch size")

    torch.set_num_threads(args.threads)
    from hyperdas_fast.models.default_model import load_model

    started = time.perf_counter()
    load_before = os.getloadavg()
    model, tok = load_model()
    methods = build_methods(model, args.layer, args.rank, args.seed)
    rows = ravel_rows(Path(args.ravel_dir), max(args.batch_sizes))
    import pyvene as pv

    results: Dict = {
        "benchmark": "pyvene_vs_hyperdas_fast",
        "machine": machine_info(torch.device("cpu")),
        "note": ("Shared 2-core CPU machine: other developers' jobs ran at the same time (load averages "
                 "below), so absolute numbers are noisy; methods are interleaved round by round so the "
                 "ratios compare like with like. One torch thread: two OpenMP threads competing with "
                 "other processes made forwards up to ~15x slower."),
        "versions": {"pyvene": getattr(pv, "__version__", "0.1.8"),
                     "transformers": __import__("transformers").__version__,
                     "op_backend_cpu": [b for b in ops.available_backends("cpu")]},
        "shapes": {"model": "SmolLM2-135M-Instruct (fp32)", "hidden": model.config.hidden_size,
                   "layers": model.config.num_hidden_layers, "layer": args.layer, "rank": args.rank,
                   "component": "block_output", "position": "entity last token",
                   "data": "RAVEL city_country_test (first rows), right padded"},
        "methods": {
            "a_pyvene": "pyvene.IntervenableModel + pyvene.LowRankRotatedSpaceIntervention",
            "b_dropin_class": "pyvene.IntervenableModel + hyperdas_fast.integrations.pyvene.LowRankRotatedSpaceIntervention",
            "b_dropin": "hyperdas_fast.integrations.pyvene.IntervenableModel + our LowRankRotatedSpaceIntervention",
            "c_native_padded": ("hyperdas_fast.integrations.pyvene.das_interchange(regroup=False): hooks on the HF "
                                "model, source forward cut at the layer and after the entity token, "
                                "ops.interchange_hard in place, last-token logits; the padded batch as given"),
            "c_native": ("das_interchange(regroup=True, the default): the same, with the batch's rows "
                         "regrouped by real length inside the call so right padding costs ~nothing"),
        },
        "per_batch": {},
    }
    results["load_average_before"] = [round(x, 2) for x in load_before]

    with torch.no_grad():
        warm = make_batch(tok, rows.select(range(min(2, len(rows)))))
        for fn in methods.values():  # one-time costs (lazy inits, first allocations) go here
            fn(warm)
        for batch_size, n_rounds in zip(args.batch_sizes, rounds):
            batch = make_batch(tok, rows.select(range(batch_size)))
            # warm-up call of each method = the agreement check (+ its peak memory)
            outputs, peaks = {}, {}
            for m, fn in methods.items():
                def call(m=m, fn=fn):
                    outputs[m] = fn(batch)
                if args.no_memory:
                    call()
                else:
                    peaks[m] = peak_rss_growth(call)
            ref = outputs["a_pyvene"]
            agreement = {m: float((o - ref).abs().max()) for m, o in outputs.items()}
            times: Dict[str, List[float]] = {m: [] for m in methods}
            names = list(methods)
            for r in range(n_rounds):
                for m in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
                    t0 = time.perf_counter()
                    methods[m](batch)
                    times[m].append(time.perf_counter() - t0)
            entry = {"batch_size": batch_size, "base_tokens": int(batch[0]["input_ids"].shape[1]),
                     "source_tokens": int(batch[1]["input_ids"].shape[1]), "rounds": n_rounds,
                     "max_abs_logit_diff_vs_pyvene": agreement, "methods": {}}
            for m in methods:
                med = statistics.median(times[m])
                entry["methods"][m] = {
                    "median_s": med, "min_s": min(times[m]), "max_s": max(times[m]),
                    "interventions_per_s": batch_size / med,
                }
                if m in peaks:
                    entry["methods"][m]["peak_rss_growth_mib"] = round(peaks[m] / 2**20, 1)
            base_ips = entry["methods"]["a_pyvene"]["interventions_per_s"]
            entry["speedup_vs_pyvene"] = {m: entry["methods"][m]["interventions_per_s"] / base_ips for m in methods}
            # Load from other processes only ever adds time: the ratio of the fastest rounds
            # is a second, less noisy estimate.
            entry["speedup_vs_pyvene_min_time"] = {
                m: entry["methods"]["a_pyvene"]["min_s"] / entry["methods"][m]["min_s"] for m in methods}
            results["per_batch"][str(batch_size)] = entry
            print(f"B={batch_size:3d} T={entry['base_tokens']}/{entry['source_tokens']} " + "  ".join(
                f"{m}: {entry['methods'][m]['interventions_per_s']:7.2f}/s (x{entry['speedup_vs_pyvene'][m]:.2f})"
                for m in methods), flush=True)

    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["wall_s"] = round(time.perf_counter() - started, 1)
    if "32" in results["per_batch"]:
        s32 = results["per_batch"]["32"]["speedup_vs_pyvene"]
        results["targets_at_batch_32"] = {
            "c_native_vs_a (target >= 2.0)": round(s32["c_native"], 3),
            "c_native_padded_vs_a": round(s32["c_native_padded"], 3),
            "b_dropin_vs_a (target >= 1.3)": round(s32["b_dropin"], 3),
            "b_dropin_class_vs_a (class swap only)": round(s32["b_dropin_class"], 3),
            "same, from the fastest rounds": {
                m: round(v, 3) for m, v in results["per_batch"]["32"]["speedup_vs_pyvene_min_time"].items()},
        }
    out = Path(args.out)
    write_json_atomic(out, results)
    plot(results, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(f"wrote {out} ({results['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
