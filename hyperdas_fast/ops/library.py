"""torch.library registration of the fused interchange ops.

The schemas and the CPU kernels are defined in C++ (``csrc/cpu``, built into
``hyperdas_fast._C``); the CUDA extension ``hyperdas_fast._C_cuda``, when built, adds CUDA
kernels for the same schemas. This module adds what is device-agnostic:

- fake (meta) kernels for ``torch.compile`` / FakeTensor tracing.

The autograd of ``interchange_fwd`` (its backward is ``interchange_bwd``, with the
forward's coords, and what ``interchange_fwd_train`` keeps, saved) is registered in C++ for the Autograd key
(``csrc/cpu/interchange_autograd.cpp``): a Python autograd.Function cost ~0.3 ms per call,
a sizeable share of the fused op's ~1-2 ms at the SmolLM2 training shape.

Ops (shapes as in ``reference.py``):

- ``torch.ops.hyperdas_fast.interchange_fwd(base, source, weights, basis, reflect, mask,
  with_coords=False) -> (out, coords)``: with ``with_coords`` and a basis, ``coords`` [B, T, k]
  is c = R_b^T (mix - base) (before the mask), saved for the backward so that it need not
  recompute it; otherwise an empty tensor. ``coords`` is not differentiable.
- ``torch.ops.hyperdas_fast.interchange_fwd_train(base, source, weights, basis, reflect, mask)
  -> (out, coords, saved)``: the forward the autograd runs when a gradient is needed and the
  device's backward can reuse part of it, which it returns as ``saved``. CPU: delta = mix -
  base [B, T, d], so the backward skips the mix (reduced precision: coords and delta are
  empty, and the backward recomputes them in float). CUDA (where the backward runs the
  k-space kernels): coords empty, and the projections [P_S; P_B] of source and base onto
  RV = [R | -2 V^T] with, with reflect, RV's own rows after them
  ([B*S + B*T (+ d), k (+ B)], base's dtype), so the backward projects only the gradient.
- ``torch.ops.hyperdas_fast.interchange_bwd(grad_out, base, source, weights, basis, reflect,
  mask, coords=None, saved=None) -> (g_base, g_source, g_weights, g_basis, g_reflect,
  g_mask)``; an empty tensor (numel 0) stands for the gradient of a None input. ``coords``
  and ``saved`` are the forward's (None or empty: recomputed from the inputs).
- ``torch.ops.hyperdas_fast.interchange_rows_(base, source, batch_index, base_pos, source_pos,
  basis, reflect, mask)``: hard mode, in place on a contiguous ``base``; inference only (no
  autograd).

Importing this module raises ImportError when ``hyperdas_fast._C`` is not built.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from hyperdas_fast import _C  # noqa: F401  (defines the schemas and the CPU kernels)

try:  # CUDA kernels for the same schemas, when that extension is built and loadable.
    from hyperdas_fast import _C_cuda  # noqa: F401
except (ImportError, OSError):
    _C_cuda = None

ops = torch.ops.hyperdas_fast


def _empty(ref: Tensor) -> Tensor:
    return ref.new_empty((0,))


@torch.library.register_fake("hyperdas_fast::interchange_fwd")
def _interchange_fwd_fake(base, source, weights, basis, reflect, mask, with_coords=False):
    if with_coords and basis is not None:
        coords = base.new_empty((base.shape[0], base.shape[1], basis.shape[1]))
    else:
        coords = _empty(base)
    return base.new_empty(base.shape), coords


@torch.library.register_fake("hyperdas_fast::interchange_fwd_train")
def _interchange_fwd_train_fake(base, source, weights, basis, reflect, mask):
    if base.device.type == "cuda":  # the projections (csrc/common/interchange_projected.h: kept_rows)
        B, T, d = base.shape
        S, k = source.shape[1], basis.shape[1]
        rows = B * S + B * T + (d if reflect is not None else 0)
        return base.new_empty(base.shape), _empty(base), base.new_empty((rows, k + (B if reflect is not None else 0)))
    if base.dtype in (torch.float16, torch.bfloat16):  # the backward recomputes them in float
        return base.new_empty(base.shape), _empty(base), _empty(base)
    coords = base.new_empty((base.shape[0], base.shape[1], basis.shape[1]))
    return base.new_empty(base.shape), coords, base.new_empty(base.shape)


@torch.library.register_fake("hyperdas_fast::interchange_bwd")
def _interchange_bwd_fake(grad_out, base, source, weights, basis, reflect, mask, coords=None, saved=None):
    def like(t: Optional[Tensor]) -> Tensor:
        return _empty(base) if t is None else base.new_empty(t.shape)

    return (
        base.new_empty(base.shape),
        base.new_empty(source.shape),
        base.new_empty(weights.shape),
        # g_basis comes in basis's memory layout (a QR factor is column-major)
        _empty(base) if basis is None else torch.empty_like(basis, memory_format=torch.preserve_format),
        like(reflect),
        like(mask),
    )


@torch.library.register_fake("hyperdas_fast::interchange_rows_")
def _interchange_rows_fake(base, source, batch_index, base_pos, source_pos, basis, reflect, mask):
    return None


def interchange_fwd(
    base: Tensor,
    source: Tensor,
    weights: Tensor,
    basis: Optional[Tensor] = None,
    reflect: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Differentiable soft interchange through the registered op (any device with a kernel).

    The forward returns the subspace coordinates for the backward when a gradient is needed.
    """
    return ops.interchange_fwd(
        base, source, weights, basis, reflect, mask, _coords_needed(base, source, weights, basis, reflect, mask)
    )[0]


def _coords_needed(*tensors: Optional[Tensor]) -> bool:
    """Whether the forward should return coords: a basis and an input that needs a gradient."""
    if tensors[3] is None or not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def interchange_rows_(
    base: Tensor,
    source: Tensor,
    batch_index: Tensor,
    base_pos: Tensor,
    source_pos: Tensor,
    basis: Optional[Tensor] = None,
    reflect: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Hard interchange in place on ``base`` (contiguous); returns ``base``. Not differentiable."""
    ops.interchange_rows_(base, source, batch_index, base_pos, source_pos, basis, reflect, mask)
    return base


__all__ = ["interchange_fwd", "interchange_rows_", "ops"]
