"""The interchange intervention op and its backends.

Public functions (all shapes as in ``reference.py``):

- ``interchange(base, source, weights, basis=None, reflect=None, mask=None, backend="auto")``
  soft form, differentiable in every tensor argument.
- ``interchange_hard(base, source, source_index, ...)``: every base token takes one source
  token (``source_index[b, t] = s``) or keeps its value (``KEEP = -1``); only the chosen
  rows are computed, optionally in place on ``base`` (the residual stream).
- ``interchange_triples(base, source, triples, ...)``: the same with a [P, 3] tensor of
  (batch, base_pos, source_pos) rows.

Backends: ``torch`` (reference), ``cpp`` (C++ CPU kernels), ``triton`` and ``cuda`` (GPU
kernels). ``auto`` picks the fastest backend available for the inputs' device.
"""
from __future__ import annotations

import importlib
import sys
from typing import Dict, List, Optional

import torch
from torch import Tensor

from . import checks
from .reference import (
    interchange_paper,
    interchange_reference,
    interchange_rows_reference,
    patched_rows,
    subspace_project,
)

KEEP = -1

# name -> module path; each module exposes is_available(device), interchange_soft(...),
# interchange_rows(...), and ROWS_AUTOGRAD (whether interchange_rows is differentiable).
_BACKEND_MODULES = {
    "cpp": "hyperdas_fast.ops.cpu",
    "triton": "hyperdas_fast.ops.triton_kernels",
    "cuda": "hyperdas_fast.ops.cuda",
}
# Preference order for backend="auto", fastest first (from benchmarks/results). On a GPU the
# cuda backend comes first: eager calls at the sizes HyperDAS trains at are bound by the
# host's launch work, and it launches the fewest kernels (SmolLM2 forward, eager, on an
# H200: 0.18 ms against 0.48 for triton; benchmarks/results/ops_h200_45e5f3b.json). Soft calls
# from B*T*d = 2^24 up take triton: a model of that size keeps the GPU busy far longer than
# the host takes to launch, so GPU time is what a step pays, and triton's kernels take less
# (Llama-3-8B B=32 T=128: 103 against 132 us forward, 344 against 403 forward and backward;
# benchmarks/results/ops_h200.json at 54324ce).
_AUTO_ORDER = {"cuda": ["cuda", "triton", "torch"], "cpu": ["cpp", "torch"]}
_AUTO_ORDER_LARGE_SOFT = {"cuda": ["triton", "cuda", "torch"]}
AUTO_TRITON_SOFT_FROM = 2 ** 24  # B*T*d


class _TorchBackend:
    ROWS_AUTOGRAD = True

    @staticmethod
    def is_available(device: torch.device) -> bool:
        return True

    @staticmethod
    def interchange_soft(base, source, weights, basis, reflect, mask):
        return interchange_reference(base, source, weights, basis, reflect, mask)

    @staticmethod
    def interchange_rows(base, source, batch_index, base_pos, source_pos, basis, reflect, mask, inplace):
        if not inplace:
            return interchange_rows_reference(
                base, source, batch_index, base_pos, source_pos, basis, reflect, mask
            )
        y = patched_rows(base, source, batch_index, base_pos, source_pos, basis, reflect, mask)
        base[batch_index, base_pos] = y
        return base


_loaded: Dict[str, object] = {"torch": _TorchBackend}


def _load_backend(name: str):
    if name in _loaded:
        return _loaded[name]
    if name not in _BACKEND_MODULES:
        raise ValueError(f"backend must be one of auto, torch, {', '.join(_BACKEND_MODULES)}; got {name!r}")
    # A module imported already (e.g. by the user, before torch.compile) is taken as it is:
    # tracing an import under torch.compile(fullgraph=True) fails.
    module = sys.modules.get(_BACKEND_MODULES[name])
    if module is None:
        try:
            module = importlib.import_module(_BACKEND_MODULES[name])
        except ImportError:
            module = None
    _loaded[name] = module
    return module


def available_backends(device: torch.device | str = "cpu") -> List[str]:
    """Backends that can run on ``device`` in this installation."""
    device = torch.device(device)
    names = ["torch"]
    for name in _BACKEND_MODULES:
        module = _load_backend(name)
        if module is not None and module.is_available(device):
            names.append(name)
    return names


def _auto_order(device: torch.device, soft_size: int = 0) -> List[str]:
    """backend="auto"'s preference order for a device (soft_size: B*T*d of a soft call)."""
    if soft_size >= AUTO_TRITON_SOFT_FROM and device.type in _AUTO_ORDER_LARGE_SOFT:
        return _AUTO_ORDER_LARGE_SOFT[device.type]
    return _AUTO_ORDER.get(device.type, ["torch"])


def _pick(backend: str, device: torch.device, soft_size: int = 0):
    if backend == "auto":
        for name in _auto_order(device, soft_size):
            module = _load_backend(name)
            if module is not None and module.is_available(device):
                return module
        return _TorchBackend
    module = _load_backend(backend)
    if module is None or not module.is_available(device):
        raise ValueError(
            f"backend={backend!r} is not available for {device} tensors here; "
            f"available: {available_backends(device)}"
        )
    return module


def interchange(
    base: Tensor,
    source: Tensor,
    weights: Tensor,
    basis: Optional[Tensor] = None,
    reflect: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Soft interchange intervention.

    Args:
        base: [B, T, d] base hidden states at the intervened layer.
        source: [B, S, d] counterfactual hidden states at the same layer.
        weights: [B, S+1, T]; column t is a distribution over the S source tokens and
            the [SELF] row (index S, keep the base value).
        basis: [d, k] orthonormal columns R, or None for the vanilla interchange.
        reflect: [B, d] unit vectors v; the example's basis is (I - 2 v v^T) R.
        mask: [B, k] or [k] gate on the subspace coordinates (default all ones).
        backend: "auto", "torch", "cpp", "triton" or "cuda". "auto": cpp on the CPU; on a
            GPU cuda, or triton from B*T*d = 2^24 up (see _AUTO_ORDER).

    Returns:
        [B, T, d]: base + R_b diag(m) R_b^T (mix - base), mix = w^T [source; base].
    """
    checks.check_soft(base, source, weights, basis, reflect, mask)
    impl = _pick(backend, base.device, base.numel() if basis is not None else 0)
    return impl.interchange_soft(base, source, weights, basis, reflect, mask)


def interchange_triples(
    base: Tensor,
    source: Tensor,
    triples: Tensor,
    basis: Optional[Tensor] = None,
    reflect: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    inplace: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Hard interchange on the rows named by ``triples`` [P, 3] = (batch, base_pos, source_pos).

    Rows not named keep their base value. With ``inplace=True`` ``base`` is updated and
    returned (it must be contiguous); otherwise a new tensor is returned.
    """
    if not isinstance(triples, Tensor) or triples.dim() != 2 or triples.shape[1] != 3:
        shape = list(triples.shape) if isinstance(triples, Tensor) else type(triples).__name__
        raise ValueError(f"triples must be a [P, 3] integer tensor of (batch, base_pos, source_pos), got {shape}")
    if triples.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"triples must be an integer tensor (int64 or int32), got {triples.dtype}")
    if isinstance(base, Tensor) and triples.device != base.device:
        raise ValueError(f"triples is on {triples.device} but base is on {base.device}")
    batch_index, base_pos, source_pos = triples.long().unbind(1)
    checks.check_rows(base, source, batch_index, base_pos, source_pos, basis, reflect, mask)
    if inplace and not base.is_contiguous():
        raise ValueError(f"inplace=True needs a contiguous base; got strides {tuple(base.stride())}")
    if inplace and base.requires_grad and torch.is_grad_enabled():
        raise ValueError("inplace=True cannot update a base that requires grad; use inplace=False to train")
    impl = _pick(backend, base.device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (base, source, basis, reflect, mask)
    )
    if needs_grad and not getattr(impl, "ROWS_AUTOGRAD", False):
        impl = _TorchBackend
    return impl.interchange_rows(
        base, source, batch_index, base_pos, source_pos, basis, reflect, mask, inplace
    )


def interchange_hard(
    base: Tensor,
    source: Tensor,
    source_index: Tensor,
    basis: Optional[Tensor] = None,
    reflect: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    inplace: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Hard interchange: ``source_index`` [B, T] gives, per base token, the source token it
    takes, or ``KEEP`` (-1) to leave it unchanged. Only the chosen rows are computed."""
    checks.check_source_index(base, source, source_index)
    batch_index, base_pos = torch.nonzero(source_index >= 0, as_tuple=True)
    source_pos = source_index[batch_index, base_pos]
    triples = torch.stack([batch_index, base_pos, source_pos.long()], dim=1)
    return interchange_triples(base, source, triples, basis, reflect, mask, inplace, backend)


# Load the compiled backends now (cheap: two shared libraries) so that the first call
# under torch.compile(fullgraph=True) does not have to trace an import; Triton too where a
# GPU is there to run it (importing it costs about a second). Without a GPU the triton
# backend (the interpreter, for tests) is imported on first use: import
# hyperdas_fast.ops.triton_kernels, or call available_backends(), before compiling a call.
for _name in ("cpp", "cuda"):
    _load_backend(_name)
if torch.cuda.is_available():
    try:
        _load_backend("triton")
    except Exception:  # noqa: BLE001  (a broken Triton install must not break this import: it is reported on first use)
        _loaded.pop("triton", None)


def weights_to_source_index(weights: Tensor) -> Tensor:
    """One-hot weights [B, S+1, T] -> source_index [B, T] (argmax; the [SELF] row -> KEEP)."""
    num_source = weights.shape[1] - 1
    index = weights.argmax(dim=1)
    return torch.where(index == num_source, torch.full_like(index, KEEP), index)


__all__ = [
    "KEEP",
    "available_backends",
    "interchange",
    "interchange_hard",
    "interchange_triples",
    "interchange_paper",
    "interchange_reference",
    "interchange_rows_reference",
    "subspace_project",
    "weights_to_source_index",
]
