"""Where one call of the interchange op spends its time: a torch.profiler table per backend.

For each backend, warms up, then profiles a few calls (forward, or forward+backward) and
prints the ops and kernels sorted by device time (self CUDA time on a GPU, self CPU time on
the CPU), with how many launches each call makes. Writes the rows as JSON with --out.

    python benchmarks/profile_op.py --device cuda --shape llama3_B32_T128 --backends torch cuda triton
    python benchmarks/profile_op.py --device cuda --backends triton:projected triton:onepass
    HYPERDAS_FAST_CUDA_SOFT=projected python benchmarks/profile_op.py --device cuda --pass forward+backward
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ops import FORCED_PATHS, SHAPES, forced_path, make_inputs  # noqa: E402
from common import machine_info, write_json_atomic  # noqa: E402

from hyperdas_fast import ops  # noqa: E402


def implementation(name: str):
    """A backend ("triton") or a backend with its soft path forced ("triton:onepass")."""
    backend, _, path = name.partition(":")
    if backend in FORCED_PATHS and not path:  # clears what an earlier forced name left set
        return forced_path(backend, None)
    if not path:
        return lambda *a: ops.interchange(*a, backend=backend)
    if backend not in FORCED_PATHS or path not in FORCED_PATHS[backend][1]:
        raise SystemExit(f"--backends: unknown {name!r}; forced paths: "
                         + ", ".join(f"{b}:{p}" for b, (_, ps) in FORCED_PATHS.items() for p in ps))
    return forced_path(backend, path)


def profile_backend(name, args, grad_out, mode, device, calls):
    leaves = [a.detach().clone().requires_grad_() for a in args]
    fn = implementation(name)

    def run():
        if mode == "forward":
            with torch.no_grad():
                fn(*args)
        else:
            for a in leaves:
                a.grad = None
            fn(*leaves).backward(grad_out)

    for _ in range(3):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = []
    for evt in prof.key_averages():
        t = getattr(evt, key, 0) or 0
        if t <= 0:
            continue
        rows.append(dict(name=evt.key, calls_per_op_call=evt.count / calls, us_per_op_call=t / calls))
    rows.sort(key=lambda r: -r["us_per_op_call"])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--shape", default="llama3_B32_T128", choices=list(SHAPES))
    parser.add_argument("--backends", nargs="*", default=None,
                        help="backends, or a backend with its soft path forced (triton:projected)")
    parser.add_argument("--pass", dest="mode", default="forward", choices=["forward", "forward+backward"])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    backends = args.backends or [b for b in ops.available_backends(device) if not (device.type == "cpu" and b == "triton")]
    base, source, weights, basis, reflect, mask, _ = make_inputs(SHAPES[args.shape], dtype, device)
    inputs = (base, source, weights, basis, reflect, mask)
    grad_out = torch.randn_like(base)
    for backend in backends:
        implementation(backend)  # an unknown name fails before anything is profiled
    result = {}
    for backend in backends:
        rows = profile_backend(backend, inputs, grad_out, args.mode, device, args.calls)
        result[backend] = rows
        print(f"# {backend} {args.shape} {args.mode}: {len(rows)} distinct ops/kernels")
        for r in rows[: args.top]:
            print(f"  {r['us_per_op_call']:10.1f} us  x{r['calls_per_op_call']:5.1f}  {r['name'][:100]}")
    if args.out:
        write_json_atomic(args.out, dict(benchmark="interchange op profile", machine=machine_info(device),
                                         shape=SHAPES[args.shape], dtype=str(dtype), pass_=args.mode, results=result))


if __name__ == "__main__":
    main()
