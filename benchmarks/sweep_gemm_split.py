"""The projected path's GEMMs over d, as cuBLAS runs them and split by hand (GPU only).

Both GPU backends' projected soft path spend most of their time in two kinds of skinny GEMM
(csrc/common/interchange_projected.h): the projections P = x RV ([N, d] @ [d, Kc], Kc = k + B,
long reduction over d) and the backward's g_R = X^T A ([d, N] @ [N, Kc], long reduction over
N). On an H200 at Llama-3-8B B=32 T=128 (N = 4096, d = 4096, Kc = 160) cuBLAS ran each in
about 21 us (1.6 TB/s; profile_forward_backward_h200_45e5f3b.json) with ~130 thread
blocks, one per SM, each walking the whole reduction. This sweep times, side by side, the
GEMM as the code calls it against the same product with the reduction split into c chunks
by hand (one strided-batched GEMM with an fp32 result, then a sum over the chunks), and the
transposed call (cuBLAS picks other tiles for it), to tell whether a split pays.

Each variant's result is checked against the fp32 product of the same operands.

    python benchmarks/sweep_gemm_split.py --out /tmp/gemm_split.json [--shape N d Kc ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import interleaved_median_ms, machine_info, write_json_atomic  # noqa: E402

SPLITS = (2, 4, 8)


def projection_variants(x, rv) -> Dict[str, Callable[[], torch.Tensor]]:
    """P = x rv ([N, d] @ [d, Kc]); the code's call returns x's dtype."""
    N, d = x.shape
    out = {
        "mm": lambda: torch.mm(x, rv),
        "mm_fp32_out": lambda: torch.mm(x, rv, out_dtype=torch.float32),
        "transposed": lambda: torch.mm(rv.t(), x.t()).t(),
    }
    for c in SPLITS:
        if d % c:
            continue
        xs = x.view(N, c, d // c).transpose(0, 1)  # [c, N, d/c], rows d apart: no copy
        rs = rv.view(c, d // c, rv.shape[1])
        out[f"split{c}"] = lambda xs=xs, rs=rs: torch.bmm(xs, rs, out_dtype=torch.float32).sum(0).to(x.dtype)
    return out


def reduction_variants(g, a) -> Dict[str, Callable[[], torch.Tensor]]:
    """g^T a ([d, N] @ [N, Kc]) in fp32, as the backward's g_R terms."""
    N, d = g.shape
    out = {
        "mm_fp32_out": lambda: torch.mm(g.t(), a, out_dtype=torch.float32),
        "mm_then_upcast": lambda: torch.mm(g.t(), a).float(),
        "transposed": lambda: torch.mm(a.t(), g, out_dtype=torch.float32).t(),
    }
    for c in SPLITS:
        if N % c:
            continue
        gs = g.view(c, N // c, d).transpose(1, 2)  # [c, d, N/c]
        as_ = a.view(c, N // c, a.shape[1])
        out[f"split{c}"] = lambda gs=gs, as_=as_: torch.bmm(gs, as_, out_dtype=torch.float32).sum(0)
    return out


def run(shapes, dtype, repeats):
    device = torch.device("cuda")
    rows = []
    for N, d, kc in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(N, d, device=device, dtype=dtype, generator=gen)
        rv = torch.randn(d, kc, device=device, dtype=dtype, generator=gen) / d ** 0.5
        a = torch.randn(N, kc, device=device, dtype=dtype, generator=gen)
        for kind, variants, exact in (
            ("projection", projection_variants(x, rv), x.float() @ rv.float()),
            ("reduction", reduction_variants(x, a), x.float().t() @ a.float()),
        ):
            for name in list(variants):  # a torch without an overload (out_dtype: 2.8+) skips that variant
                try:
                    variants[name]()
                except (RuntimeError, TypeError) as exc:
                    print(f"{kind} {name}: skipped ({exc})", flush=True)
                    rows.append({"kind": kind, "N": N, "d": d, "Kc": kc, "variant": name, "error": str(exc)[:300]})
                    del variants[name]
            times = interleaved_median_ms(variants, device, repeats=repeats)
            base_ms = times[next(iter(variants))]["median_ms"]
            nbytes = (x.numel() + (rv if kind == "projection" else a).numel()) * x.element_size()
            for name, fn in variants.items():
                got = fn().float()
                rel = ((got - exact).abs().max() / exact.abs().max()).item()
                t = times[name]
                rows.append({"kind": kind, "N": N, "d": d, "Kc": kc, "variant": name, **t,
                             "gbps": nbytes / (t["median_ms"] * 1e-3) / 1e9,
                             "speedup_vs_first": base_ms / t["median_ms"], "max_rel_err": rel})
                print(f"{kind:10s} N={N} d={d} Kc={kc} {name:15s} {t['median_ms'] * 1e3:7.1f} us "
                      f"{rows[-1]['gbps']:6.0f} GB/s x{rows[-1]['speedup_vs_first']:.2f} err {rel:.1e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shape", type=int, nargs=3, action="append", metavar=("N", "d", "Kc"),
                        help="default: Llama-3-8B B=32 T=128 (4096 4096 160) and B=8 T=128 (1024 4096 136)")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_gemm_split: needs a CUDA device")
    shapes = args.shape or [(4096, 4096, 160), (1024, 4096, 136)]
    rows = run(shapes, torch.bfloat16, args.repeats)
    write_json_atomic(args.out, {"benchmark": "projected path GEMMs: cuBLAS as called vs reduction split by hand",
                                 "machine": machine_info(torch.device("cuda")), "dtype": "torch.bfloat16",
                                 "timer": "cuda graph replay, cuda events, L2 flushed before each call",
                                 "results": rows})


if __name__ == "__main__":
    main()
