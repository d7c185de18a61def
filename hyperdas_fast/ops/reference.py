"""Pure-PyTorch references for the interchange intervention.

Shapes: B batch, T base tokens, S counterfactual (source) tokens, d hidden size,
k subspace size, P selected rows (hard mode).

    mix[b,t] = sum_{s<S} w[b,s,t] * source[b,s] + w[b,S,t] * base[b,t]
    out[b,t] = base[b,t] + R_b diag(m_b) R_b^T (mix[b,t] - base[b,t]),   R_b = (I - 2 v_b v_b^T) R

``interchange_reference`` is written plainly from the formula: one batched matmul for
the mix and the factored Householder (R_b is never built), so it costs O(B T (S + k) d).
It runs in the inputs' dtype and is the `torch` backend and the ground truth of the
tests (called on float64 copies).

``interchange_paper`` reproduces the original HyperDAS formulation (an einsum to
[B, S, T, d], a dense [B, d, d] Householder matrix, the patch applied at every
position). It exists only so the benchmarks can show what the fused kernels save.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def subspace_project(
    x: Tensor, basis: Tensor, reflect: Optional[Tensor] = None, mask: Optional[Tensor] = None
) -> Tensor:
    """R_b diag(m_b) R_b^T x for x [B, N, d], basis R [d, k], reflect v [B, d], mask [B, k] or [k].

    Uses R_b^T x = R^T x - 2 u (v.x) and R_b c = R c - 2 v (u.c) with u = R^T v, so
    nothing of size d x d is formed.
    """
    coords = x @ basis  # [B, N, k]
    if reflect is not None:
        u = reflect @ basis  # [B, k]
        coords = coords - 2.0 * (x @ reflect.unsqueeze(-1)) * u.unsqueeze(1)
    if mask is not None:
        coords = coords * (mask.unsqueeze(1) if mask.dim() == 2 else mask)
    y = coords @ basis.t()
    if reflect is not None:
        y = y - 2.0 * (coords @ u.unsqueeze(-1)) * reflect.unsqueeze(1)
    return y


def soft_mix(base: Tensor, source: Tensor, weights: Tensor) -> Tensor:
    """mix [B, T, d] from base [B, T, d], source [B, S, d] and weights [B, S+1, T]."""
    num_source = source.shape[1]
    mix = torch.bmm(weights[:, :num_source, :].transpose(1, 2), source)
    return mix + weights[:, num_source, :].unsqueeze(-1) * base


def interchange_reference(
    base: Tensor,
    source: Tensor,
    weights: Tensor,
    basis: Optional[Tensor] = None,
    reflect: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Soft interchange: base [B, T, d], source [B, S, d], weights [B, S+1, T] -> [B, T, d].

    With ``basis=None`` this is the vanilla interchange (out = mix).
    """
    mix = soft_mix(base, source, weights)
    if basis is None:
        return mix
    return base + subspace_project(mix - base, basis, reflect, mask)


def patched_rows(
    base: Tensor,
    source: Tensor,
    batch_index: Tensor,
    base_pos: Tensor,
    source_pos: Tensor,
    basis: Optional[Tensor] = None,
    reflect: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """The P patched rows [P, d]: x + R_b diag(m_b) R_b^T (source[b, s] - x) with x = base[b, t],
    (b, t, s) = (batch_index[p], base_pos[p], source_pos[p]); source[b, s] when basis is None."""
    x = base[batch_index, base_pos]  # [P, d]
    y = source[batch_index, source_pos]
    if basis is None:
        return y
    row_reflect = None if reflect is None else reflect[batch_index]
    row_mask = mask[batch_index] if (mask is not None and mask.dim() == 2) else mask
    # Treat the P rows as a batch of P single-token examples.
    return x + subspace_project((y - x).unsqueeze(1), basis, row_reflect, row_mask).squeeze(1)


def interchange_rows_reference(
    base: Tensor,
    source: Tensor,
    batch_index: Tensor,
    base_pos: Tensor,
    source_pos: Tensor,
    basis: Optional[Tensor] = None,
    reflect: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Hard interchange on P selected rows; returns a new [B, T, d] tensor.

    Row p sets out[b, t] = x + R_b diag(m_b) R_b^T (source[b, s] - x) with x = base[b, t],
    (b, t, s) = (batch_index[p], base_pos[p], source_pos[p]); every other row is base.
    """
    patched = patched_rows(base, source, batch_index, base_pos, source_pos, basis, reflect, mask)
    out = base.clone()
    out[batch_index, base_pos] = patched.to(base.dtype)
    return out


def interchange_paper(
    base: Tensor,
    source: Tensor,
    weights: Tensor,
    basis: Optional[Tensor] = None,
    reflect: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """The original HyperDAS formulation, kept for benchmarks only (same result, more work).

    Builds the [B, S, T, d] weighted-source tensor, a dense [B, d, d] Householder matrix
    and rotates every base position, as the paper's code does.
    """
    num_source = source.shape[1]
    weighted = torch.einsum("bst,bsd->bstd", weights[:, :num_source, :], source)
    mix = weighted.sum(dim=1) + weights[:, num_source, :].unsqueeze(-1) * base
    if basis is None:
        return mix
    batch, _, hidden = base.shape
    if reflect is not None:
        eye = torch.eye(hidden, dtype=base.dtype, device=base.device)
        householder = eye.unsqueeze(0) - 2.0 * torch.einsum("bi,bj->bij", reflect, reflect)
        rotation = householder @ basis  # [B, d, k]
    else:
        rotation = basis.unsqueeze(0).expand(batch, -1, -1)
    rotated_base = base @ rotation
    rotated_mix = mix @ rotation
    rotated = rotated_mix - rotated_base
    if mask is not None:
        rotated = rotated * (mask.unsqueeze(1) if mask.dim() == 2 else mask)
    return base + rotated @ rotation.transpose(1, 2)
