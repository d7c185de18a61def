"""HyperDAS training loss and the sparsity schedule (HYPERDAS.md section 3).

loss = causal_weight * CE(causal examples) + isolation_weight * CE(isolation examples)
       + sparsity_coef * mean_b sum_s relu(sum_t w[b, s, t] - 1)

CE is the mean over the label tokens of each group (token-level). The sparsity term
penalises a counterfactual token whose selection mass over the base tokens exceeds 1,
summed over an example's counterfactual tokens and averaged over examples, as the
original code reduces it. Padding source rows have zero weight and add nothing, and, as
the sum does not divide by the padded width, the penalty of an example does not depend
on how long the batch's other counterfactuals are (a mean over (example, source row) did:
the same weights gave 1.0 alone and 0.55 in a batch padded to 11 source rows).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _label_logits(logits: Tensor, labels: Tensor):
    """(logits [P, V], targets [P], example index [P]) at the label positions.

    ``logits`` is [B, T, V], or already packed [P, V]: the rows at ``labels != -100`` in
    row-major order (what ``HyperDASModel.forward(..., logits_at="labels")`` returns).
    """
    valid = labels != IGNORE_INDEX
    example = valid.nonzero(as_tuple=True)[0]
    targets = labels[valid]
    if logits.dim() == 3:
        if logits.shape[:2] != labels.shape:
            raise ValueError(f"logits [B, T, V] must match labels [B, T]; got {list(logits.shape)} and {list(labels.shape)}")
        rows = logits[valid]
    elif logits.dim() == 2:
        if logits.shape[0] != targets.numel():
            raise ValueError(f"packed logits must have one row per label token ({targets.numel()}), got {logits.shape[0]}")
        rows = logits
    else:
        raise ValueError(f"logits must be [B, T, V] or packed [P, V], got {list(logits.shape)}")
    return rows, targets, example


def _excess_mass(weights: Tensor) -> Tensor:
    """Per example, the sum over source rows of relu(selection mass over base tokens - 1) [B]."""
    mass = weights[:, :-1, :].float().sum(dim=-1)  # [B, S]
    return F.relu(mass - 1.0).sum(dim=-1)


def sparsity_penalty(weights: Tensor) -> Tensor:
    """mean over examples of sum over source rows of relu(selection mass over base tokens -
    1); weights [B, S+1, T]."""
    return _excess_mass(weights).mean()


def hyperdas_loss(
    logits: Tensor,
    labels: Tensor,
    is_causal: Tensor,
    weights: Optional[Tensor] = None,
    causal_weight: float = 3.5,
    isolation_weight: float = 0.5,
    sparsity_coef: float = 0.0,
    totals: Optional[Dict[str, int]] = None,
) -> Tuple[Tensor, Dict[str, float]]:
    """Weighted causal / isolation cross-entropy plus the sparsity penalty.

    ``totals`` (data-parallel training): the whole batch's "causal_tokens",
    "isolation_tokens" and "examples", summed over the ranks. Each mean then divides this shard's sum by the whole batch's count, so
    the ranks' losses, and gradients, add up to those of the whole batch in one process.

    Args:
        logits: [B, T, V] or packed [P, V] (see ``_label_logits``).
        labels: [B, T], -100 where no label token is predicted (already shifted).
        is_causal: [B] bool.
        weights: [B, S+1, T] selector weights (None: no sparsity term).
    Returns:
        (loss, parts) with parts = {"loss", "causal_loss", "isolation_loss", "sparsity", "num_label_tokens"}.
    """
    rows, targets, example = _label_logits(logits, labels)
    if targets.numel() == 0:
        raise ValueError("labels has no label token (all -100); training needs non-empty labels")
    token_loss = F.cross_entropy(rows.float(), targets, reduction="none")
    causal_tok = is_causal.to(token_loss.device).bool()[example]
    zero = token_loss.sum() * 0.0

    def group(mask, total=None):
        n = mask.sum() if total is None else total
        return (token_loss * mask).sum() / n if n > 0 else zero

    if totals is None:
        causal = group(causal_tok)
        isolation = group(~causal_tok)
        sparsity = sparsity_penalty(weights) if weights is not None else zero
    else:
        causal = group(causal_tok, totals["causal_tokens"])
        isolation = group(~causal_tok, totals["isolation_tokens"])
        sparsity = zero
        if weights is not None:  # this shard's share of the mean over examples
            sparsity = _excess_mass(weights).sum() / max(1, totals["examples"])
    loss = causal_weight * causal + isolation_weight * isolation
    if weights is not None and sparsity_coef:
        loss = loss + sparsity_coef * sparsity
    parts = {
        "loss": float(loss.detach()),
        "causal_loss": float(causal.detach()),
        "isolation_loss": float(isolation.detach()),
        "sparsity": float(sparsity.detach()),
        "num_label_tokens": int(targets.numel()),
    }
    return loss, parts


def sparsity_schedule(step: int, warmup_steps: int, total_steps: int, start: float = 0.15, end: float = 1.5) -> float:
    """Sparsity coefficient: ``start`` during the warm-up, then linear from ``start`` to ``end``
    at ``total_steps`` (constant ``end`` afterwards)."""
    if step < warmup_steps or total_steps <= warmup_steps:
        return float(start) if step < warmup_steps else float(end)
    frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return float(start + (end - start) * frac)


__all__ = ["hyperdas_loss", "sparsity_schedule", "sparsity_penalty", "IGNORE_INDEX"]
