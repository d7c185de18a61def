"""CUDA backend of the interchange op: binds the kernels of csrc/cuda (the extension
``hyperdas_fast._C_cuda``), which implement the CUDA dispatch key of the ops
``hyperdas_fast::interchange_fwd``, ``interchange_bwd`` and ``interchange_rows_``.

The op schemas and their autograd (C++, the Autograd key) live in the CPU extension
``hyperdas_fast._C``, which ``hyperdas_fast.ops.library`` loads (adding the fake kernels);
this module imports it first. Importing
raises ImportError when either extension is missing (e.g. a CPU-only build).

Forward and rows run fused kernels for fp32/fp16/bf16 with k <= 256 (ATen for float64 or
larger k); the backward is ATen/cuBLAS (see csrc/cuda/interchange_cuda.cpp).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import library  # noqa: F401  (loads _C: op schemas + autograd; ImportError if missing)

try:
    from .. import _C_cuda  # noqa: F401  (registers the CUDA kernels)
except ImportError as exc:
    raise ImportError(f"hyperdas_fast._C_cuda is not built: {exc}") from exc
except OSError as exc:  # e.g. a CUDA runtime library that cannot be loaded
    raise ImportError(f"hyperdas_fast._C_cuda cannot be loaded: {exc}") from exc

ROWS_AUTOGRAD = False


def is_available(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def interchange_soft(base, source, weights, basis, reflect, mask) -> Tensor:
    # with_coords=False: the fused CUDA forward does not keep c; the backward recomputes it.
    return torch.ops.hyperdas_fast.interchange_fwd(base, source, weights, basis, reflect, mask, False)[0]


def interchange_rows(base, source, batch_index, base_pos, source_pos, basis, reflect, mask, inplace) -> Tensor:
    out = base if inplace else base.clone(memory_format=torch.contiguous_format)
    torch.ops.hyperdas_fast.interchange_rows_(out, source, batch_index, base_pos, source_pos, basis, reflect, mask)
    return out


__all__ = ["ROWS_AUTOGRAD", "is_available", "interchange_soft", "interchange_rows"]
