"""Block-size sweep of the Triton soft forward's two kernels on a GPU (needs no C++ build).

The forward is two launches: coords (c = R_b^T (mix - base), partial sums over DSPLIT
slices of d) and apply (out = base + R_b m c). Each is timed alone, as CUDA-graph replays
with the L2 flushed before each, for a set of block sizes around what ``_config`` picks,
and each variant's full forward is checked against the float64 reference
(|out - ref64| <= 4 |torch_bf16 - ref64|). Writes JSON:

    python benchmarks/sweep_triton_forward.py --out /tmp/sweep.json [--shape B T S d k]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import L2_FLUSH_BYTES, _cuda_event_times, _cuda_graph, machine_info, write_json_atomic  # noqa: E402

from hyperdas_fast.ops import triton_kernels as tk  # noqa: E402
from hyperdas_fast.ops.reference import interchange_reference  # noqa: E402


def graph_ms(fn, device, flush, repeats=30):
    """Median ms of a CUDA-graph replay of fn (fn itself if it cannot be captured)."""
    if device.type != "cuda":  # a check of this script under TRITON_INTERPRET=1, not a timing
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    graph = _cuda_graph(fn, device)
    call = graph.replay if graph is not None else fn
    return statistics.median(_cuda_event_times({"fn": call}, device, repeats, float("inf"), flush)["fn"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", nargs=5, type=int, default=[32, 128, 128, 4096, 128], metavar=("B", "T", "S", "d", "k"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cpu: check the script under TRITON_INTERPRET=1")
    args = parser.parse_args()
    device = torch.device(args.device)
    B, T, S, d, k = args.shape
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    base = torch.randn(B, T, d, generator=g).to(device, dt)
    source = torch.randn(B, S, d, generator=g).to(device, dt)
    weights = torch.softmax(torch.randn(B, S + 1, T, generator=g), 1).to(device, dt)
    basis = torch.linalg.qr(torch.randn(d, k, generator=g))[0].contiguous().to(device, dt)
    reflect = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=-1).to(device, dt)
    mask = torch.rand(B, k, generator=g).to(device, dt)
    args64 = [a.double() for a in (base, source, weights, basis, reflect, mask)]
    ref = interchange_reference(*args64)
    err_torch = (interchange_reference(base, source, weights, basis, reflect, mask).double() - ref).abs().max().item()
    flush = torch.empty(L2_FLUSH_BYTES // 4 if device.type == "cuda" else 1, dtype=torch.int32, device=device)
    elem = 2
    io_fwd = elem * (3 * B * T * d + B * S * d)  # base read twice, source, out (the design's floor)
    default = tk._config(base, T, B, d, k, S)
    original_config = tk._config
    rows = []

    def run_variant(kind, over):
        cfg = dict(default, **over)
        tk._config = lambda *a, **kw: cfg  # noqa: E731
        try:
            u = tk._u(basis, reflect)
            c, vd, *_ = tk._launch_coords(base, source, weights, basis, reflect, cfg)
            out = torch.empty_like(base)
            coords_ms = graph_ms(lambda: tk._launch_coords(base, source, weights, basis, reflect, cfg), device, flush)
            apply_ms = graph_ms(lambda: tk._launch_apply(base, out, c, vd, mask, basis, reflect, u, cfg), device, flush)
            full = tk._forward(base, source, weights, basis, reflect, mask)
            err = (full.double() - ref).abs().max().item()
            fwd_ms = graph_ms(lambda: tk._forward(base, source, weights, basis, reflect, mask), device, flush)
            row = dict(kind=kind, override=over, coords_ms=coords_ms, apply_ms=apply_ms, forward_ms=fwd_ms,
                       max_err=err, err_torch_bf16=err_torch, correct=bool(err <= 4 * err_torch + 1e-2),
                       forward_gbps=io_fwd / fwd_ms / 1e6)
        except Exception as exc:  # noqa: BLE001  (a variant that does not compile or fit)
            row = dict(kind=kind, override=over, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            tk._config = original_config
        rows.append(row)
        print(row, flush=True)

    run_variant("default", {})
    def cdiv(a, b):
        return -(-a // b)

    for (bt, bd, w), split in itertools.product([(64, 32, 8), (64, 64, 8), (128, 32, 8), (64, 32, 4), (128, 64, 8)],
                                               [1, 2, 4, 8]):
        chunks = cdiv(d, bd)
        span = cdiv(chunks, split)
        run_variant("coords", dict(BT1=bt, BD1=bd, W1=w, DSPLIT=cdiv(chunks, span), SPAN1=span * bd))
    for bt, bd, w, dspan in [(64, 64, 8, 512), (64, 128, 8, 512), (128, 64, 8, 512), (32, 64, 4, 512),
                             (64, 64, 4, 1024), (64, 128, 8, 4096), (128, 128, 8, 1024), (32, 128, 4, 256)]:
        run_variant("apply", dict(BT2=bt, BD2=bd, W2=w, DSPAN2=dspan))
    payload = dict(benchmark="triton soft forward block-size sweep", machine=machine_info(device),
                   shape=dict(B=B, T=T, S=S, d=d, k=k), dtype=str(dt), default_config=default,
                   floor_bytes=io_fwd, results=rows)
    write_json_atomic(args.out, payload)
    best = min((r for r in rows if r.get("correct")), key=lambda r: r["forward_ms"], default=None)
    print("default", rows[0].get("forward_ms"), "best", best)


if __name__ == "__main__":
    main()
