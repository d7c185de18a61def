"""Block-size sweeps of the Triton soft forward on a GPU (needs no C++ build).

``--path fused`` (default): the fused forward's two launches, coords (c = R_b^T (mix -
base), partial sums over DSPLIT slices of d) and apply (out = base + R_b m c), each timed
alone for a set of block sizes around what ``_config`` picks.

``--path add_product``: the projected path's output kernel (out = base + block(e) RV^T, and
g_base likewise in the backward), each block configuration timed alone and inside the
triton backend's forward and forward+backward, beside the torch reference and cuBLAS's addmm.

``--path projection``: the projected path's projection kernel (P = x [R | -2 v_b], tiles of
one example's rows, d split SPLIT ways; HYPERDAS_FAST_TRITON_PROJECTION=triton), each block
configuration timed alone and inside the forward and forward+backward, beside cuBLAS's x RV
(the default projection) in the same rounds.

``--path onepass``: the experimental onepass forward (``triton_projected.forward_onepass``:
the P_S GEMM, then one kernel per BT1 rows over all of d), over BT1 (rows per program), BD1
(d chunk), W1 (warps) and S1 (pipeline stages), beside the projected forward and the torch
reference in the same run. Each program reads all of R [d, k] twice (once per pass over d),
so R's traffic from the L2, (B*T / BT1) * 2 d k bytes, is 4x base's at BT1 = 32 and k = 128;
the rows report it (``r_l2_bytes``) next to the time, to tell whether larger row tiles pay.

Every timing is a CUDA-graph replay with the L2 flushed before each, and each variant's
full forward is checked against the float64 reference (|out - ref64| <= 4 |torch_bf16 -
ref64|). Writes JSON:

    python benchmarks/sweep_triton_forward.py --out /tmp/sweep.json [--path onepass] [--shape B T S d k]
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import L2_FLUSH_BYTES, _cuda_event_times, _cuda_graph, machine_info, write_json_atomic  # noqa: E402

from hyperdas_fast.ops import triton_kernels as tk  # noqa: E402
from hyperdas_fast.ops import triton_projected as tp  # noqa: E402
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


def make_problem(shape, device):
    """The inputs, the float64 reference output and the torch reference's own error in the
    sweep's dtype (bf16 on a GPU, fp32 under the interpreter)."""
    B, T, S, d, k = shape
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    base = torch.randn(B, T, d, generator=g).to(device, dt)
    source = torch.randn(B, S, d, generator=g).to(device, dt)
    weights = torch.softmax(torch.randn(B, S + 1, T, generator=g), 1).to(device, dt)
    basis = torch.linalg.qr(torch.randn(d, k, generator=g))[0].contiguous().to(device, dt)
    reflect = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=-1).to(device, dt)
    mask = torch.rand(B, k, generator=g).to(device, dt)
    inputs = (base, source, weights, basis, reflect, mask)
    ref = interchange_reference(*[a.double() for a in inputs])
    err_torch = (interchange_reference(*inputs).double() - ref).abs().max().item()
    return inputs, ref, err_torch


def checked(out, ref, err_torch):
    err = (out.double() - ref).abs().max().item()
    return dict(max_err=err, err_torch_bf16=err_torch, correct=bool(err <= 4 * err_torch + 1e-2))


def sweep_fused(inputs, ref, err_torch, device, flush):
    base, source, weights, basis, reflect, mask = inputs
    B, T, d = base.shape
    S, k = source.shape[1], basis.shape[1]
    elem = base.element_size()
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
            fwd_ms = graph_ms(lambda: tk._forward(base, source, weights, basis, reflect, mask), device, flush)
            row = dict(kind=kind, override=over, coords_ms=coords_ms, apply_ms=apply_ms, forward_ms=fwd_ms,
                       **checked(full, ref, err_torch), forward_gbps=io_fwd / fwd_ms / 1e6)
        except Exception as exc:  # noqa: BLE001  (a variant that does not compile or fit)
            row = dict(kind=kind, override=over, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            tk._config = original_config
        rows.append(row)
        print(row, flush=True)

    # The fused path only: at the default shape the triton backend would take the projected one.
    os.environ[tp.ENV_PATH] = "fused"
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
    return dict(default_config=default, floor_bytes=io_fwd), rows


# (BT1, BD1, W1, S1) variants of the onepass kernel for a GPU; the interpreter (fp32) checks
# a few, with tl.dot's smallest blocks. Compiled for sm_90 in bf16 at k = 128 (ad hoc, with
# cuobjdump): all fit in 100 KB of shared memory; 64 rows with 4 warps and d chunks of 64
# spill registers (80-184 bytes of stack), so those are left out.
ONEPASS_VARIANTS = [(bt, bd, w, st) for bt in (32, 64) for bd in (32, 64) for w in (4, 8) for st in (2, 3, 4)
                    if not (bt == 64 and bd == 64 and w == 4)] + \
    [(16, 64, 4, 3), (16, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2)]
ONEPASS_VARIANTS_INTERPRETER = [(16, 32, 1, 1), (32, 16, 1, 1), (64, 32, 1, 1)]


def sweep_onepass(inputs, ref, err_torch, device, flush, baselines_only=False):
    base, source, weights, basis, reflect, mask = inputs
    B, T, d = base.shape
    S, k = source.shape[1], basis.shape[1]
    elem = base.element_size()
    # the effective bytes of the op (base, source, out) and the onepass kernel's own floor
    # (base read once, out written, P_S read)
    io_fwd = elem * (2 * B * T * d + B * S * d)
    kernel_floor = elem * (2 * B * T * d + B * S * (k + B))
    default = tp._launch_config(base, k, B)
    original_config = tp._launch_config
    rows = []

    def forward(path):
        def run():
            os.environ[tp.ENV_PATH] = path  # read by each call (and by each graph capture)
            return tk._forward(base, source, weights, basis, reflect, mask)

        return run

    # Baselines in the same run: the torch reference, the projected forward, and its parts
    # (the P_S GEMM, alike P_B's at S = T; the output GEMM out = base + E RV^T), and a copy of
    # base (its read and write: the memory's own speed on this op's largest stream).
    RV = tp._rv(basis, reflect)
    E = torch.randn(B * T, RV.shape[1], device=device, dtype=base.dtype)
    baselines = {
        "torch_reference": lambda: interchange_reference(base, source, weights, basis, reflect, mask),
        "projected": forward("projected"),
        "ps_gemm": lambda: tp._project(source, RV),
        "out_addmm": lambda: torch.addmm(base.view(B * T, d), E, RV.t()),
        "out_add_product": lambda: tp.add_product(base.view(B * T, d), E, RV),
        "copy_base": lambda: base.clone(),
    }
    part_bytes = {"ps_gemm": elem * (B * S * d), "out_addmm": elem * 2 * B * T * d,
                  "out_add_product": elem * 2 * B * T * d, "copy_base": elem * 2 * B * T * d}
    for name, fn in baselines.items():
        row = dict(kind=name, forward_ms=graph_ms(fn, device, flush))
        if name in part_bytes:
            row["gbps"] = part_bytes[name] / row["forward_ms"] / 1e6
        else:
            row.update(checked(fn(), ref, err_torch), forward_gbps=io_fwd / row["forward_ms"] / 1e6)
        rows.append(row)
        print(row, flush=True)
    variants = ONEPASS_VARIANTS if device.type == "cuda" else ONEPASS_VARIANTS_INTERPRETER
    if baselines_only:
        variants = []
    for bt, bd, w, st in [(default["BT1"], default["BD1"], default["W1"], default["S1"])] + variants:
        over = dict(BT1=bt, BD1=bd, W1=w, S1=st)
        cfg = dict(default, **over)
        tp._launch_config = lambda *a, **kw: cfg  # noqa: E731
        fn = forward("onepass")
        try:
            out = fn()
            ms = graph_ms(fn, device, flush)
            row = dict(kind="onepass", override=over, forward_ms=ms, **checked(out, ref, err_torch),
                       forward_gbps=io_fwd / ms / 1e6, programs=B * -(-T // bt),
                       r_l2_bytes=B * -(-T // bt) * 2 * d * k * elem)
        except Exception as exc:  # noqa: BLE001  (a variant that does not compile or fit)
            row = dict(kind="onepass", override=over, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            tp._launch_config = original_config
        rows.append(row)
        print(row, flush=True)
    return dict(default_config=default, effective_bytes=io_fwd, onepass_kernel_floor_bytes=kernel_floor), rows


# (BM, BN, BK, warps, stages, X_FIRST) of the output kernel (triton_projected.add_product)
ADD_PRODUCT_VARIANTS = [(128, 128, 32, 8, 3, False), (128, 128, 32, 8, 3, True), (64, 128, 32, 4, 3, False),
                        (64, 128, 32, 4, 3, True), (64, 128, 64, 4, 3, True), (128, 64, 32, 4, 3, True),
                        (64, 64, 32, 4, 3, True), (32, 128, 32, 4, 3, True), (64, 256, 32, 8, 3, True),
                        (128, 256, 32, 8, 3, True), (128, 128, 64, 8, 2, True), (64, 128, 32, 8, 4, True)]
ADD_PRODUCT_VARIANTS_INTERPRETER = [(16, 32, 16, 1, 1, False), (32, 16, 16, 1, 1, True)]


def sweep_add_product(inputs, ref, err_torch, device, flush):
    """The output kernel's block sizes, each timed alone and inside the triton backend's
    forward and forward+backward (its two uses: out and g_base), all side by side with the
    torch reference and cuBLAS's addmm (which copies base first) in one set of rounds."""
    base, source, weights, basis, reflect, mask = inputs
    B, T, d = base.shape
    S = source.shape[1]
    elem = base.element_size()
    RV = tp._rv(basis, reflect)
    E = torch.randn(B * T, RV.shape[1], device=device, dtype=base.dtype)
    leaves = [a.detach().clone().requires_grad_() for a in inputs]
    grad_out = torch.randn_like(base)
    io_fwd = elem * (2 * B * T * d + B * S * d)

    def forward(fn):
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run

    def forward_backward(fn):
        def run():
            for a in leaves:
                a.grad = None
            fn(*leaves).backward(grad_out)
        return run

    def capture(fn):
        if device.type != "cuda":
            return fn
        graph = _cuda_graph(fn, device)
        return graph.replay if graph is not None else fn

    os.environ.pop(tp.ENV_PATH, None)  # the default paths: projected at the sweep's shape
    calls, rows = {}, {}
    for name, fn in (("torch", interchange_reference), ("triton", tk.interchange_soft)):
        calls[f"{name}:forward"] = capture(forward(fn))
        calls[f"{name}:forward+backward"] = capture(forward_backward(fn))
    calls["out_addmm"] = capture(lambda: torch.addmm(base.view(B * T, d), E, RV.t()))
    calls["copy_base"] = capture(lambda: base.clone())
    original = tp._add_product_config
    variants = ADD_PRODUCT_VARIANTS if device.type == "cuda" else ADD_PRODUCT_VARIANTS_INTERPRETER
    try:
        for bm, bn, bk, w, st, x_first in variants:
            cfg = dict(BM=bm, BN=bn, BK=bk, W=w, S=st, X_FIRST=x_first)
            key = "add_product" + "".join(f" {k}={v}" for k, v in cfg.items())
            tp._add_product_config = lambda x, _cfg=cfg: _cfg  # read at launch, so at capture
            try:
                rows[key] = dict(kind="add_product", config=cfg, **checked(forward(tk.interchange_soft)(), ref, err_torch))
                calls[key] = capture(lambda: tp.add_product(base.view(B * T, d), E, RV))
                calls[key + " :forward"] = capture(forward(tk.interchange_soft))
                calls[key + " :forward+backward"] = capture(forward_backward(tk.interchange_soft))
            except Exception as exc:  # noqa: BLE001  (a variant that does not compile or fit)
                rows[key] = dict(kind="add_product", config=cfg, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        tp._add_product_config = original
    if device.type == "cuda":
        times = {n: statistics.median(t) for n, t in _cuda_event_times(calls, device, 30, float("inf"), flush).items()}
    else:  # a check of this script under TRITON_INTERPRET=1, not a timing
        times = {n: graph_ms(fn, device, flush) for n, fn in calls.items()}
    out = [dict(kind=n, ms=times[n], **({"gbps": elem * 2 * B * T * d / times[n] / 1e6} if n in ("out_addmm", "copy_base")
                                        else {}))
           for n in ("torch:forward", "torch:forward+backward", "triton:forward", "triton:forward+backward",
                     "out_addmm", "copy_base")]
    for key, row in rows.items():
        if "error" not in row:
            row.update(kernel_ms=times[key], kernel_gbps=elem * 2 * B * T * d / times[key] / 1e6,
                       forward_ms=times[key + " :forward"], forward_backward_ms=times[key + " :forward+backward"],
                       forward_gbps=io_fwd / times[key + " :forward"] / 1e6,
                       forward_speedup_vs_torch=times["torch:forward"] / times[key + " :forward"],
                       forward_backward_speedup_vs_torch=times["torch:forward+backward"] / times[key + " :forward+backward"])
        out.append(row)
        print(row, flush=True)
    return dict(default_config=original(base), effective_bytes=io_fwd), out


# (BM, BD, SPLIT, warps, stages) of the projection kernel (triton_projected.project_triton).
# Compiled for sm_90 in bf16 at k = 128 without a GPU (triton.compile + cuobjdump): none
# spills but (64, 64, *, 4 warps) with 16 bytes of stack; 32-row tiles with d chunks of 64
# spilled 96 bytes and are left out.
PROJECTION_VARIANTS = [(64, 32, 1, 4, 4), (64, 32, 2, 4, 4), (64, 32, 4, 4, 4), (64, 32, 8, 4, 4),
                       (128, 32, 4, 8, 4), (128, 32, 8, 8, 4), (128, 64, 2, 8, 3), (128, 64, 4, 8, 3),
                       (128, 64, 8, 8, 3), (64, 64, 4, 4, 3), (64, 64, 8, 4, 3), (32, 32, 8, 4, 4)]
PROJECTION_VARIANTS_INTERPRETER = [(16, 32, 1, 1, 1), (32, 16, 3, 1, 1)]


def sweep_projection(inputs, ref, err_torch, device, flush):
    """The projection kernel (HYPERDAS_FAST_TRITON_PROJECTION=triton) against cuBLAS's x RV:
    each block configuration timed alone on base and inside the triton backend's forward and
    forward+backward, side by side with the cuBLAS projection, the forward and
    forward+backward with it, the torch reference and a copy of base, in one set of rounds."""
    base, source, weights, basis, reflect, mask = inputs
    B, T, d = base.shape
    S = source.shape[1]
    elem = base.element_size()
    RV = tp._rv(basis, reflect)
    leaves = [a.detach().clone().requires_grad_() for a in inputs]
    grad_out = torch.randn_like(base)
    io_fwd = elem * (2 * B * T * d + B * S * d)
    read_base = elem * B * T * d  # what a projection of base must read

    def with_projection(method, fn):
        def run():
            os.environ[tp.ENV_PROJECTION] = method  # read by each call (and by each graph capture)
            return fn()
        return run

    def forward():
        with torch.no_grad():
            return tk.interchange_soft(*inputs)

    def forward_backward():
        for a in leaves:
            a.grad = None
        tk.interchange_soft(*leaves).backward(grad_out)

    def capture(fn):
        if device.type != "cuda":
            return fn
        graph = _cuda_graph(fn, device)
        return graph.replay if graph is not None else fn

    os.environ[tp.ENV_PATH] = "projected"
    calls, rows = {}, {}
    calls["torch:forward"] = capture(lambda: interchange_reference(*inputs))
    calls["cublas:projection"] = capture(lambda: tp._project(base, RV))
    calls["cublas:forward"] = capture(with_projection("cublas", forward))
    calls["cublas:forward+backward"] = capture(with_projection("cublas", forward_backward))
    calls["copy_base"] = capture(lambda: base.clone())
    original = tp._project_config
    variants = PROJECTION_VARIANTS if device.type == "cuda" else PROJECTION_VARIANTS_INTERPRETER
    try:
        for bm, bd, split, w, st in variants:
            cfg = dict(BM=bm, BD=bd, SPLIT=split, W=w, S=st)
            key = "projection" + "".join(f" {k}={v}" for k, v in cfg.items())
            tp._project_config = lambda x, rows_, _cfg=cfg: _cfg  # read at launch, so at capture
            try:
                rows[key] = dict(kind="projection", config=cfg,
                                 **checked(with_projection("triton", forward)(), ref, err_torch))
                calls[key] = capture(lambda: tp.project_triton(base, basis, reflect))
                calls[key + " :forward"] = capture(with_projection("triton", forward))
                calls[key + " :forward+backward"] = capture(with_projection("triton", forward_backward))
            except Exception as exc:  # noqa: BLE001  (a variant that does not compile or fit)
                rows[key] = dict(kind="projection", config=cfg, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        tp._project_config = original
        os.environ.pop(tp.ENV_PROJECTION, None)
    if device.type == "cuda":
        times = {n: statistics.median(t) for n, t in _cuda_event_times(calls, device, 30, float("inf"), flush).items()}
    else:  # a check of this script under TRITON_INTERPRET=1, not a timing
        times = {n: graph_ms(fn, device, flush) for n, fn in calls.items()}
    out = [dict(kind="torch:forward", ms=times["torch:forward"]),
           dict(kind="cublas:projection", ms=times["cublas:projection"],
                gbps=read_base / times["cublas:projection"] / 1e6),
           dict(kind="cublas:forward", ms=times["cublas:forward"],
                forward_gbps=io_fwd / times["cublas:forward"] / 1e6),
           dict(kind="cublas:forward+backward", ms=times["cublas:forward+backward"]),
           dict(kind="copy_base", ms=times["copy_base"], gbps=2 * read_base / times["copy_base"] / 1e6)]
    for key, row in rows.items():
        if "error" not in row:
            row.update(kernel_ms=times[key], kernel_gbps=read_base / times[key] / 1e6,
                       forward_ms=times[key + " :forward"], forward_backward_ms=times[key + " :forward+backward"],
                       forward_gbps=io_fwd / times[key + " :forward"] / 1e6,
                       forward_speedup_vs_cublas=times["cublas:forward"] / times[key + " :forward"],
                       forward_backward_speedup_vs_cublas=(times["cublas:forward+backward"]
                                                           / times[key + " :forward+backward"]),
                       forward_speedup_vs_torch=times["torch:forward"] / times[key + " :forward"])
        out.append(row)
        print(row, flush=True)
    return dict(default_config=original(base, B * T), effective_bytes=io_fwd), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", nargs=5, type=int, default=[32, 128, 128, 4096, 128], metavar=("B", "T", "S", "d", "k"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cpu: check the script under TRITON_INTERPRET=1")
    parser.add_argument("--path", choices=["fused", "onepass", "add_product", "projection"], default="fused")
    parser.add_argument("--baselines-only", action="store_true",
                        help="onepass: the baselines and the default configuration, no other variants")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    B, T, S, d, k = args.shape
    inputs, ref, err_torch = make_problem(args.shape, device)
    flush = torch.empty(L2_FLUSH_BYTES // 4 if device.type == "cuda" else 1, dtype=torch.int32, device=device)
    saved_path = os.environ.get(tp.ENV_PATH)
    saved_projection = os.environ.get(tp.ENV_PROJECTION)
    try:
        if args.path == "fused":
            info, rows = sweep_fused(inputs, ref, err_torch, device, flush)
        elif args.path == "add_product":
            info, rows = sweep_add_product(inputs, ref, err_torch, device, flush)
        elif args.path == "projection":
            info, rows = sweep_projection(inputs, ref, err_torch, device, flush)
        else:
            info, rows = sweep_onepass(inputs, ref, err_torch, device, flush, args.baselines_only)
    finally:
        for name, saved in ((tp.ENV_PATH, saved_path), (tp.ENV_PROJECTION, saved_projection)):
            os.environ.pop(name, None)
            if saved is not None:
                os.environ[name] = saved
    payload = dict(benchmark=f"triton soft forward block-size sweep ({args.path})", machine=machine_info(device),
                   shape=dict(B=B, T=T, S=S, d=d, k=k), dtype=str(inputs[0].dtype), **info, results=rows)
    write_json_atomic(args.out, payload)
    timed = [r for r in rows if r.get("correct") and r["kind"] in ("default", "coords", "apply", "onepass", "add_product",
                                                                   "projection")]
    best = min(timed, key=lambda r: r["forward_ms"], default=None)
    print("first", timed[0].get("forward_ms") if timed else None, "best", best)
    return payload


if __name__ == "__main__":
    main()
