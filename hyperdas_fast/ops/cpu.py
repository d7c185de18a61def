"""The ``cpp`` backend: C++ CPU kernels (``csrc/cpu``) through the torch.library ops.

Importing this module raises ImportError when the extension ``hyperdas_fast._C`` is not
built (the dispatcher in ``ops/__init__.py`` then treats the backend as unavailable).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .library import interchange_fwd, ops  # ImportError when hyperdas_fast._C is missing

# interchange_rows runs the in-place C++ kernel, which has no autograd.
ROWS_AUTOGRAD = False


def is_available(device) -> bool:
    return torch.device(device).type == "cpu"


def interchange_soft(base, source, weights, basis, reflect, mask) -> Tensor:
    # With a gradient needed, the forward also returns the coordinates that the backward
    # reuses (one [B*T, d] x [d, k] GEMM fewer).
    return interchange_fwd(base, source, weights, basis, reflect, mask)


def interchange_rows(
    base, source, batch_index, base_pos, source_pos, basis, reflect, mask, inplace
) -> Tensor:
    out = base if inplace else base.clone(memory_format=torch.contiguous_format)
    ops.interchange_rows_(out, source, batch_index, base_pos, source_pos, basis, reflect, mask)
    return out
