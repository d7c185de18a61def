"""Counts the kernels each projected soft path launches per call, on the CPU (no GPU needed).

At Llama-3-8B shapes a call's kernels take tens of microseconds on a GPU, so the count of
small kernels matters. Two versions of the same algebra are compared: the CUDA backend's
ATen one (``csrc/common/interchange_projected.h``, run here through its CPU registration
``interchange_{fwd,bwd}_projected``) and the triton backend's (``triton_projected.py``,
whose Triton kernels are counted by stubbing them out).

An ATen call counts when it launches work (views, empty, no-op ``to`` and the like do not)
and no enclosing ATen call is counted already. Counted in the inputs' dtype (default fp32,
where ``to(float32)`` is a no-op; a bf16 call adds its casts).

    python benchmarks/count_kernels.py --out benchmarks/results/kernel_counts_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import hyperdas_fast.ops.library  # noqa: E402,F401  (registers the C++ ops)

NO_KERNEL = {
    "aten::" + name for name in (
        "view", "reshape", "t", "transpose", "narrow", "select", "unsqueeze", "squeeze", "diagonal",
        "alias", "slice", "expand", "as_strided", "_reshape_alias", "detach", "permute", "_unsafe_view",
        "empty", "empty_like", "empty_strided", "new_empty", "resize_", "lift_fresh", "result_type",
        "contiguous", "to", "unbind", "split", "resolve_conj", "_conj", "conj", "set_",
    )
}


def aten_calls(fn) -> Counter:
    """Outermost kernel-launching ATen calls of one fn() (after a warm-up call)."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counted = Counter()
    for event in prof.events():
        if not event.name.startswith("aten::") or event.name in NO_KERNEL:
            continue
        parent = event.cpu_parent
        while parent is not None and not (parent.name.startswith("aten::") and parent.name not in NO_KERNEL):
            parent = parent.cpu_parent
        if parent is None:
            counted[event.name] += 1
    return counted


class _CountedLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` records a launch."""

    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(self.name)


def count(B=4, T=8, S=6, d=64, k=8, dtype=torch.float32) -> dict:
    from hyperdas_fast.ops import triton_kernels as tk
    from hyperdas_fast.ops import triton_projected as tp

    g = torch.Generator().manual_seed(0)
    base, source, grad = (torch.randn(B, X, d, generator=g, dtype=dtype) for X in (T, S, T))
    weights = torch.softmax(torch.randn(B, S + 1, T, generator=g), 1).to(dtype)
    basis = torch.linalg.qr(torch.randn(d, k, generator=g))[0].to(dtype)
    reflect = torch.nn.functional.normalize(torch.randn(B, d, generator=g), dim=-1).to(dtype)
    mask = torch.rand(B, k, generator=g).to(dtype)
    lib = torch.ops.hyperdas_fast

    launches: list = []
    stubbed = ("_kspace_rows_kernel", "_kspace_sources_kernel", "_add_product_kernel")
    saved = {name: getattr(tp, name) for name in stubbed}
    for name in stubbed:
        setattr(tp, name, _CountedLaunch(launches, name))
    try:
        def triton_fwd():
            u = tk._u(basis, reflect)
            m, m_stride = tk._expanded_mask(mask, B, k, base.device)
            tp.forward(base, source, weights, basis, reflect, u, m, m_stride, True)

        def triton_bwd():
            u = tk._u(basis, reflect)
            m, m_stride = tk._expanded_mask(mask, B, k, base.device)
            tp.backward(grad, base, source, weights, basis, reflect, mask, u, m, m_stride)

        calls = {
            "aten_projected_forward": (lambda: lib.interchange_fwd_projected(
                base, source, weights, basis, reflect, mask, False), None),
            "aten_projected_backward": (lambda: lib.interchange_bwd_projected(
                grad, base, source, weights, basis, reflect, mask), None),
            "triton_projected_forward": (triton_fwd, launches),
            "triton_projected_backward": (triton_bwd, launches),
        }
        result = {}
        for name, (fn, log) in calls.items():
            fn()  # warm-up outside the count
            if log is not None:
                log.clear()
            aten = aten_calls(fn)
            n_triton = len(log) // 2 if log is not None else 0  # aten_calls runs fn twice
            result[name] = dict(aten_calls=sum(aten.values()), triton_launches=n_triton, by_op=dict(aten))
    finally:
        for name, kernel in saved.items():
            setattr(tp, name, kernel)
    from common import machine_info  # benchmarks/common.py

    return dict(benchmark="kernel-launching calls per projected soft pass", machine=machine_info(base.device),
                shape=dict(B=B, T=T, S=S, d=d, k=k), dtype=str(dtype), reflect=True, mask="[B, k]",
                counts=result)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    payload = count()
    for name, c in payload["counts"].items():
        print(f"{name:28s} {c['aten_calls']:3d} ATen calls + {c['triton_launches']} Triton kernels   "
              + ", ".join(f"{op.split('::')[1]} {n}" for op, n in sorted(c["by_op"].items(), key=lambda x: -x[1])))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, args.out)
    return payload


if __name__ == "__main__":
    main()
