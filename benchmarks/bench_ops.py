"""Times every available backend of the interchange op, side by side in one run.

Implementations are timed side by side, round by round (each round calls each once).
For each shape: soft forward, soft forward+backward, and the hard (sparse, in place)
forward; for each available backend plus the paper formulation (soft only). Reports the
median ms, effective GB/s (bytes that must move at least once / time), peak memory, and
the ratios to the `torch` reference and to the paper formulation. Writes JSON. With
``--runs N`` the whole measurement repeats N times and each row gives the median over the
runs, with every ratio's range across them.

    python benchmarks/bench_ops.py --device cpu --runs 5 --out benchmarks/results/ops_cpu.json
    python benchmarks/bench_ops.py --device cuda --dtype bfloat16 --out benchmarks/results/ops_h100.json
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (cuda_copy_bandwidth_gbps, interleaved_median_ms, machine_info, peak_memory_bytes,  # noqa: E402
                    write_json_atomic)  # noqa: E402

from hyperdas_fast import ops  # noqa: E402
from hyperdas_fast.ops.reference import interchange_paper  # noqa: E402

SHAPES = {
    # SmolLM2-135M: d=576
    "smollm2_k16": dict(B=16, T=24, S=24, d=576, k=16),
    "smollm2_k64": dict(B=16, T=24, S=24, d=576, k=64),
    # Llama-3-8B: d=4096, k=128
    "llama3_B8_T32": dict(B=8, T=32, S=32, d=4096, k=128),
    "llama3_B8_T128": dict(B=8, T=128, S=128, d=4096, k=128),
    "llama3_B32_T32": dict(B=32, T=32, S=32, d=4096, k=128),
    "llama3_B32_T128": dict(B=32, T=128, S=128, d=4096, k=128),
}
# GiB; the paper formulation builds [B,S,T,d] and [B,d,d] tensors and is skipped above this.
PAPER_MEMORY_LIMIT_GIB = 6.0


def make_inputs(shape: Dict[str, int], dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    B, T, S, d, k = (shape[x] for x in "BTSdk")

    def randn(*size):
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

    base, source = randn(B, T, d), randn(B, S, d)
    weights = torch.softmax(torch.randn(B, S + 1, T, generator=g), dim=1).to(device=device, dtype=dtype)
    basis = torch.linalg.qr(torch.randn(d, k, generator=g))[0].to(device=device, dtype=dtype)
    reflect = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=-1).to(device=device, dtype=dtype)
    mask = torch.rand(B, k, generator=g).to(device=device, dtype=dtype)
    # Hard mode: each base token takes a random source token with probability 1/2.
    index = torch.randint(0, S, (B, T), generator=g)
    index[torch.rand(B, T, generator=g) < 0.5] = ops.KEEP
    return base, source, weights, basis, reflect, mask, index.to(device)


def soft_bytes(shape, elem: int, backward: bool) -> int:
    B, T, S, d, k = (shape[x] for x in "BTSdk")
    inputs = B * T * d + B * S * d + B * (S + 1) * T + d * k + B * d + B * k
    output = B * T * d
    if not backward:
        return elem * (inputs + output)
    # backward reads grad_out and the inputs again, and writes one gradient per input
    return elem * (inputs + output + output + inputs + inputs)


def paper_fits(shape, elem: int) -> bool:
    B, T, S, d, _ = (shape[x] for x in "BTSdk")
    need = elem * (B * S * T * d + B * d * d) * 3  # forward temporaries and their grads
    return need / 2**30 <= PAPER_MEMORY_LIMIT_GIB


# backend -> (the variable that forces its soft path, the paths)
FORCED_PATHS = {
    "cpp": ("HYPERDAS_FAST_CPU_SOFT", ("per_example", "batched")),
    "triton": ("HYPERDAS_FAST_TRITON_SOFT", ("fused", "projected", "onepass", "chunked")),
    "cuda": ("HYPERDAS_FAST_CUDA_SOFT", ("fused", "projected", "projected_kernels", "projected_apply")),
}


def forced_path(backend: str, path: Optional[str]):
    """The backend with its soft path forced (the variable is read on every call, so the
    forward and the backward both run that path, and a CUDA graph captures that path);
    None: the path the backend picks itself."""
    variable = FORCED_PATHS[backend][0]

    def run(*args):
        if path is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = path
        return ops.interchange(*args, backend=backend)

    return run


def bench_shape(name, shape, backends: List[str], dtype, device, repeats: int,
                cpu_paths: bool = False, triton_paths: bool = False,
                cuda_paths: bool = False) -> List[Dict[str, object]]:
    elem = torch.tensor([], dtype=dtype).element_size()
    base, source, weights, basis, reflect, mask, index = make_inputs(shape, dtype, device)
    rows: List[Dict[str, object]] = []
    io_bytes = elem * (base.numel() * 2 + source.numel() + weights.numel() + basis.numel() + reflect.numel() + mask.numel())

    soft_impls = {b: functools.partial(ops.interchange, backend=b) for b in backends}
    for backend, wanted in (("cpp", cpu_paths and device.type == "cpu"), ("triton", triton_paths),
                            ("cuda", cuda_paths)):
        if wanted and backend in backends:
            # the plain backend must clear the variable the forced paths leave set
            soft_impls[backend] = forced_path(backend, None)
            soft_impls.update({f"{backend}:{p}": forced_path(backend, p) for p in FORCED_PATHS[backend][1]})
    if paper_fits(shape, elem):
        soft_impls["paper"] = interchange_paper
    args = (base, source, weights, basis, reflect, mask)
    grad_args = [a.detach().clone().requires_grad_() for a in args]
    grad_out = torch.randn_like(base)

    def forward(fn):
        return lambda: fn(*args)

    def forward_backward(fn):
        def run():
            for a in grad_args:
                a.grad = None
            fn(*grad_args).backward(grad_out)

        return run

    # The backends are timed side by side, round by round (interleaved_median_ms). The paper
    # formulation is timed on its own: its [B,S,T,d] temporaries (tens of MB per call) would
    # evict the caches and make the allocator return memory to the OS between the others' calls.
    groups = [[b for b in soft_impls if b != "paper"]] + ([["paper"]] if "paper" in soft_impls else [])
    fwd_timing, fwd_bwd_timing = {}, {}
    for group in groups:
        with torch.no_grad():
            fwd_timing.update(interleaved_median_ms({n: forward(soft_impls[n]) for n in group}, device,
                                                    repeats=repeats))
        fwd_bwd_timing.update(interleaved_median_ms({n: forward_backward(soft_impls[n]) for n in group}, device,
                                                    repeats=repeats))
    for impl_name, fn in soft_impls.items():
        with torch.no_grad():
            peak = peak_memory_bytes(forward(fn), device)
        timing = fwd_timing[impl_name]
        rows.append(dict(shape=name, mode="soft", pass_="forward", impl=impl_name, **timing,
                         gbps=soft_bytes(shape, elem, False) / timing["median_ms"] / 1e6,
                         peak_bytes=peak, peak_over_io=(peak / io_bytes) if peak else None))
        peak = peak_memory_bytes(forward_backward(fn), device)
        timing = fwd_bwd_timing[impl_name]
        rows.append(dict(shape=name, mode="soft", pass_="forward+backward", impl=impl_name, **timing,
                         gbps=soft_bytes(shape, elem, True) / timing["median_ms"] / 1e6,
                         peak_bytes=peak, peak_over_io=(peak / io_bytes) if peak else None))

    for variable, _ in FORCED_PATHS.values():
        os.environ.pop(variable, None)
    rows_selected = int((index >= 0).sum())
    hard_bytes = elem * (3 * rows_selected * shape["d"] + basis.numel() + reflect.numel() + mask.numel())

    # On the CPU the timed call is the whole API call (as in the committed CPU results). On CUDA
    # the rows are chosen once, outside the timed call: ops.interchange_hard checks the index
    # range on the host (a device sync), which a CUDA graph cannot capture.
    if device.type == "cuda":
        ops.interchange_hard(base.clone(), source, index, basis, reflect, mask, inplace=True)  # validates once
        batch_index, base_pos = torch.nonzero(index >= 0, as_tuple=True)
        source_pos = index[batch_index, base_pos].long()

    def hard(impl_name):
        work = base.clone()
        if device.type != "cuda":
            return lambda: ops.interchange_hard(work, source, index, basis, reflect, mask, inplace=True,
                                                backend=impl_name)
        impl = ops._pick(impl_name, device)
        return lambda: impl.interchange_rows(work, source, batch_index, base_pos, source_pos, basis, reflect, mask,
                                             True)

    with torch.no_grad():
        hard_timing = interleaved_median_ms({b: hard(b) for b in backends}, device, repeats=repeats)
    for impl_name in backends:
        timing = hard_timing[impl_name]
        rows.append(dict(shape=name, mode="hard", pass_="forward", impl=impl_name, **timing,
                         gbps=hard_bytes / timing["median_ms"] / 1e6, rows=rows_selected,
                         peak_bytes=None, peak_over_io=None))
    return rows


def add_ratios(rows: List[Dict[str, object]]) -> None:
    by_key = {(r["shape"], r["mode"], r["pass_"], r["impl"]): r for r in rows}
    for r in rows:
        for ref in ("torch", "paper"):
            other = by_key.get((r["shape"], r["mode"], r["pass_"], ref))
            if other is not None:
                r[f"speedup_vs_{ref}"] = other["median_ms"] / r["median_ms"]
                if "eager_median_ms" in r and "eager_median_ms" in other:
                    r[f"eager_speedup_vs_{ref}"] = other["eager_median_ms"] / r["eager_median_ms"]


def summarize_runs(runs: List[List[Dict[str, object]]]) -> List[Dict[str, object]]:
    """One row per (shape, mode, pass, impl) from several whole runs of the benchmark.

    Each run's ratios come from implementations timed side by side in that run; the summary
    takes, per field, the median over runs (median_ms, gbps and every speedup_vs_*), with
    the per-run values kept under ``runs`` and each speedup's range as ``*_min``/``*_max``.
    A single run is returned as it is.
    """
    if len(runs) == 1:
        return runs[0]
    key = lambda r: (r["shape"], r["mode"], r["pass_"], r["impl"])  # noqa: E731
    by_key: Dict[tuple, List[Dict[str, object]]] = {}
    for rows in runs:
        for r in rows:
            by_key.setdefault(key(r), []).append(r)
    summary = []
    for group in by_key.values():
        row = dict(group[0])
        numeric = [k for k, v in row.items() if k in ("median_ms", "gbps") or k.startswith(("speedup_vs_", "eager_"))]
        for k in numeric:
            values = [r[k] for r in group if r.get(k) is not None]
            if values:
                row[k] = statistics.median(values)
                if "speedup_vs_" in k:
                    row[f"{k}_min"], row[f"{k}_max"] = min(values), max(values)
        row["min_ms"] = min(r["min_ms"] for r in group)
        row["max_ms"] = max(r["max_ms"] for r in group)
        row["runs"] = [{k: r[k] for k in ("median_ms", *[k for k in r if "speedup_vs_" in k])} for r in group]
        summary.append(row)
    return summary


def main(argv=None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    parser.add_argument("--shapes", nargs="*", default=None, help=f"subset of {list(SHAPES)}")
    parser.add_argument("--backends", nargs="*", default=None, help="default: all available")
    parser.add_argument("--repeats", type=int, default=50, help="rounds (each times every implementation once)")
    parser.add_argument("--runs", type=int, default=1,
                        help="whole runs over all shapes, one after another; rows report the median over "
                             "runs of each run's median and ratios, with each ratio's range (a shared "
                             "machine's speed drifts between minutes)")
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="hardware memory bandwidth peak in GB/s, to report the fraction reached "
                             "(datasheet: H100 SXM 3350, H200 4800)")
    parser.add_argument("--cpu-paths", action="store_true",
                        help="also time the cpp backend's two soft paths, each forced (cpp:per_example, cpp:batched)")
    parser.add_argument("--triton-paths", action="store_true",
                        help="also time the triton backend's soft paths, each forced (triton:fused, "
                             "triton:projected, triton:onepass, triton:chunked)")
    parser.add_argument("--cuda-paths", action="store_true",
                        help="also time the cuda backend's soft paths, each forced (cuda:fused, cuda:projected, "
                             "cuda:projected_kernels, cuda:projected_apply)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    backends = args.backends or ops.available_backends(device)
    if device.type == "cpu":
        backends = [b for b in backends if b != "triton"]  # the interpreter is not a benchmark
    shapes = args.shapes or list(SHAPES)
    copy_gbps = cuda_copy_bandwidth_gbps(device) if device.type == "cuda" else None
    if copy_gbps:
        print(f"# measured device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", flush=True)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    def payload_of(rows: List[Dict[str, object]], shapes_done: List[str]) -> Dict[str, object]:
        rows = [dict(r) for r in rows]
        for r in rows:
            if args.peak_gbps:
                r["fraction_of_peak_bandwidth"] = r["gbps"] / args.peak_gbps
            if copy_gbps:
                r["fraction_of_copy_bandwidth"] = r["gbps"] / copy_gbps
        return {
            "benchmark": "interchange op",
            "machine": machine_info(device),
            "dtype": str(dtype),
            "backends": backends,
            "shapes": {n: SHAPES[n] for n in shapes_done},
            "runs": args.runs,
            "repeats": args.repeats,
            "peak_bandwidth_gbps": args.peak_gbps,
            "measured_copy_bandwidth_gbps": copy_gbps,
            "results": rows,
        }

    runs: List[List[Dict[str, object]]] = []
    for run in range(args.runs):
        rows: List[Dict[str, object]] = []
        for i, name in enumerate(shapes):
            print(f"# {name} {SHAPES[name]}" + (f" (run {run + 1}/{args.runs})" if args.runs > 1 else ""), flush=True)
            rows.extend(bench_shape(name, SHAPES[name], backends, dtype, device, args.repeats, args.cpu_paths,
                                    args.triton_paths, args.cuda_paths))
            if args.out and args.runs == 1 and i + 1 < len(shapes):
                # the shapes measured so far, in case a time limit stops the rest (a lent GPU's
                # call has one); the complete file replaces it at the end
                add_ratios(rows)
                write_json_atomic(args.out, dict(payload_of(rows, shapes[: i + 1]), partial=True))
        add_ratios(rows)
        runs.append(rows)
    payload = payload_of(summarize_runs(runs), shapes)
    for r in payload["results"]:
        ratio = "  ".join(
            f"{k}={v:.2f}x" + (f" [{r[k + '_min']:.2f}-{r[k + '_max']:.2f}]" if k + "_min" in r else "")
            for k, v in r.items() if k.startswith(("speedup_vs_", "eager_speedup_vs_")) and not k.endswith(("_min", "_max"))
        )
        eager = f" (eager {r['eager_median_ms']:.3f})" if "eager_median_ms" in r else ""
        print(f"{r['shape']:16s} {r['mode']:4s} {r['pass_']:16s} {r['impl']:16s} "
              f"{r['median_ms']:9.3f} ms{eager} {r['gbps']:8.2f} GB/s  {ratio}", flush=True)
    if args.out:
        write_json_atomic(args.out, payload)
        print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
