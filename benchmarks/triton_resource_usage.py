"""Registers and spills of Triton kernels compiled for a GPU architecture, on a machine
without a GPU (triton.compile for a GPUTarget, then cuobjdump --dump-resource-usage, both
shipped in Triton's NVIDIA backend). A kernel that spills (STACK > 0) reads and writes
local memory in its inner loop; this tells before a GPU session's minutes are spent.

    python benchmarks/triton_resource_usage.py            # the projection kernel's sweep variants, bf16, sm_90
    python benchmarks/triton_resource_usage.py --arch 80 --dtype fp32
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hyperdas_fast.ops import triton_projected as tp  # noqa: E402


def cuobjdump_path() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(fn, signature: Dict[str, str], constexprs: Dict[str, object], num_warps: int, num_stages: int,
                   arch: int = 90) -> Dict[str, int]:
    """{"REG": registers per thread, "STACK": bytes of stack (spills), "SHARED": static shared
    bytes} of ``fn`` compiled for sm_<arch>."""
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", out))
    if "REG" not in found:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-300:]}")
    return {key: int(value) for key, value in found.items()}


def projection_kernel_usage(dtype: str, BM: int, BD: int, num_warps: int, num_stages: int, k: int = 128,
                            arch: int = 90) -> Dict[str, int]:
    """Resource usage of ``triton_projected._project_kernel`` (with reflect) for x in ``dtype``
    ("bf16", "fp16", "fp32")."""
    signature = {"x_ptr": f"*{dtype}", "r_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "p_ptr": "*fp32",
                 "n": "i32", "d": "i32", "k": "i32", "Kp": "i32", "d_per_split": "i32", "rows_total": "i32",
                 "HAS_REFLECT": "constexpr", "IEEE": "constexpr", "BM": "constexpr", "BK": "constexpr",
                 "BD": "constexpr"}
    constexprs = {"HAS_REFLECT": True, "IEEE": dtype == "fp32", "BM": BM, "BK": triton.next_power_of_2(k), "BD": BD}
    return resource_usage(tp._project_kernel, signature, constexprs, num_warps, num_stages, arch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--k", type=int, default=128)
    args = parser.parse_args(argv)
    import sweep_triton_forward as sweep

    rows = []
    for bm, bd, split, warps, stages in sweep.PROJECTION_VARIANTS:
        usage = projection_kernel_usage(args.dtype, bm, bd, warps, stages, args.k, args.arch)
        rows.append(dict(BM=bm, BD=bd, warps=warps, stages=stages, **usage))
        print(f"_project_kernel {args.dtype} sm_{args.arch} BM={bm} BD={bd} warps={warps} stages={stages}: "
              f"{usage['REG']} registers, {usage['STACK']} bytes of stack", flush=True)
    return rows


if __name__ == "__main__":
    main()
