"""Token-position selector: weights [B, S+1, T] and the inference modes.

A cross-attention head whose query is the hypernetwork's last token and whose keys are
the (source s, base t) pairs at the intervened layer plus one [SELF] key per base token.
In the original code each pair key is ``k_proj(q_combine([base_t ; source_s]))``, a
[B, S, T, 2d] tensor. ``q_combine`` is linear, so ``q_combine([a; b]) = W1 a + W2 b + c``
and the pair score splits into a base part and a source part:

    score[b, h, s, t] = <q_h, K_h(W1 a_t + c)> + <q_h, K_h W2 b_s>

computed from one [B, T, d] and one [B, S, d] projection. The [SELF] key of base token t
is ``K_self(a_t)``. Scores are averaged over heads and softmaxed over the S+1 axis.
Source padding rows get zero weight; base columns outside the intervention mask (padding,
label tokens) are forced to [SELF].

Hard inference modes turn the weights into ``source_index`` [B, T] (KEEP = -1):

- ``column_argmax``: each base column takes its argmax over the S+1 rows.
- ``global_argmax``: per example, only the single (s, t) source entry with the highest
  weight is intervened.
- ``bidding_argmax``: each source token bids for the base column where its weight is
  highest; each column takes its highest bidder if that bid is at least the column's
  [SELF] weight raised to ``BIDDING_THRESHOLD`` (0.1, as in the original code, where a tie
  goes to the bidder), so every source token feeds at most one base token.
- ``groundtruth``: base token ``base_entity_pos`` takes source token ``source_entity_pos``
  (examples with -1 are left unchanged).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

KEEP = -1
INFERENCE_MODES = ("default", "column_argmax", "global_argmax", "bidding_argmax", "groundtruth")


class PositionSelector(nn.Module):
    """weights [B, S+1, T] from the hypernetwork query [B, d] and layer-L states."""

    def __init__(self, hidden_size: int, num_heads: int, dtype=None, device=None):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        kw = dict(dtype=dtype, device=device)
        self.q_proj = nn.Linear(hidden_size, hidden_size, **kw)
        # q_combine: Linear(2d -> d) over [base ; source]; kept as one weight, applied in halves.
        self.q_combine = nn.Linear(2 * hidden_size, hidden_size, **kw)
        self.k_proj = nn.Linear(hidden_size, hidden_size, **kw)
        self.self_proj = nn.Linear(hidden_size, hidden_size, **kw)
        self.state_scale = nn.Parameter(torch.ones(hidden_size, **kw))

    def pair_parts(self, base: Tensor, source: Tensor):
        """Projected base keys [B, T, d] (with biases) and source keys [B, S, d] (no bias)."""
        d = self.hidden_size
        w1, w2 = self.q_combine.weight[:, :d], self.q_combine.weight[:, d:]
        kb = self.k_proj(base @ w1.t() + self.q_combine.bias)
        ks = (source @ w2.t()) @ self.k_proj.weight.t()
        return kb, ks

    def forward(self, query: Tensor, base: Tensor, source: Tensor, base_mask: Tensor, source_mask: Tensor) -> Tensor:
        """query [B, d]; base [B, T, d], source [B, S, d] layer-L states; base_mask [B, T] bool
        (True = may be intervened), source_mask [B, S] bool (True = real token) -> [B, S+1, T]."""
        from .hypernetwork import rms_unit

        base_n = rms_unit(base) * self.state_scale
        source_n = rms_unit(source) * self.state_scale
        batch, seq, _ = base.shape
        heads, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).view(batch, heads, hd)
        kb, ks = self.pair_parts(base_n, source_n)
        kself = self.self_proj(base_n)
        scale = hd ** -0.5 / heads  # mean over heads of scaled dot products
        # sum_h <q_h, k_h> / H == <q, k> / H with q, k flattened over heads.
        q_flat = q.reshape(batch, 1, heads * hd)
        score_base = (kb * q_flat).sum(-1) * scale  # [B, T]
        score_source = (ks * q_flat).sum(-1) * scale  # [B, S]
        score_self = (kself * q_flat).sum(-1) * scale  # [B, T]
        scores = score_source.unsqueeze(-1) + score_base.unsqueeze(1)  # [B, S, T]
        scores = scores.masked_fill(~source_mask.bool().unsqueeze(-1), float("-inf"))
        scores = torch.cat([scores, score_self.unsqueeze(1)], dim=1)  # [B, S+1, T]
        weights = torch.softmax(scores.float(), dim=1).to(base.dtype)
        keep = torch.zeros_like(weights)
        keep[:, -1, :] = 1.0
        return torch.where(base_mask.bool().unsqueeze(1), weights, keep)


# The original's bidding_threshold: a column's [SELF] weight counts as at least this much
# against the bids, so a weak bid (a near-uniform selector) leaves the column unchanged.
BIDDING_THRESHOLD = 0.1


def hard_source_index(
    weights: Tensor,
    mode: str,
    base_mask: Optional[Tensor] = None,
    source_mask: Optional[Tensor] = None,
    base_entity_pos: Optional[Tensor] = None,
    source_entity_pos: Optional[Tensor] = None,
) -> Tensor:
    """source_index [B, T] (KEEP = -1) for a hard inference mode (see the module docstring)."""
    batch, rows, seq = weights.shape
    num_source = rows - 1
    device = weights.device
    if base_mask is None:
        base_mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    base_mask = base_mask.bool()
    w = weights.detach().float()
    if source_mask is not None:
        w = w.clone()
        w[:, :num_source, :] = w[:, :num_source, :].masked_fill(~source_mask.bool().unsqueeze(-1), -1.0)
    index = torch.full((batch, seq), KEEP, dtype=torch.long, device=device)
    if mode == "column_argmax":
        arg = w.argmax(dim=1)
        index = torch.where(arg == num_source, torch.full_like(arg, KEEP), arg)
    elif mode == "global_argmax":
        src = w[:, :num_source, :].masked_fill(~base_mask.unsqueeze(1), -1.0)
        flat = src.reshape(batch, -1).argmax(dim=1)
        s, t = flat // seq, flat % seq
        ok = src.reshape(batch, -1).gather(1, flat.unsqueeze(1)).squeeze(1) >= 0
        b = torch.arange(batch, device=device)[ok]
        index[b, t[ok]] = s[ok]
    elif mode == "bidding_argmax":
        src = w[:, :num_source, :].masked_fill(~base_mask.unsqueeze(1), -1.0)  # [B, S, T]
        bid, target = src.max(dim=2)  # each source's best column
        board = torch.full((batch, num_source, seq), -1.0, device=device)
        board.scatter_(2, target.unsqueeze(-1), bid.unsqueeze(-1))
        best_bid, best_source = board.max(dim=1)  # [B, T]
        take = (best_bid >= w[:, num_source, :].clamp(min=BIDDING_THRESHOLD)) & (best_bid >= 0)
        index = torch.where(take, best_source, index)
    elif mode == "groundtruth":
        if base_entity_pos is None or source_entity_pos is None:
            raise ValueError("inference_mode='groundtruth' needs base_entity_pos and source_entity_pos [B] in the batch")
        bpos = base_entity_pos.to(device).long()
        spos = source_entity_pos.to(device).long()
        ok = (bpos >= 0) & (spos >= 0)
        b = torch.arange(batch, device=device)[ok]
        index[b, bpos[ok]] = spos[ok]
        return index
    else:
        raise ValueError(f"inference_mode must be one of {INFERENCE_MODES} or None, got {mode!r}")
    return torch.where(base_mask, index, torch.full_like(index, KEEP))


def one_hot_weights(source_index: Tensor, num_source: int, dtype=torch.float32) -> Tensor:
    """source_index [B, T] -> one-hot weights [B, S+1, T] (KEEP -> the [SELF] row)."""
    rows = torch.where(source_index < 0, torch.full_like(source_index, num_source), source_index)
    out = torch.zeros(source_index.shape[0], num_source + 1, source_index.shape[1], dtype=dtype, device=source_index.device)
    return out.scatter_(1, rows.unsqueeze(1), 1.0)


__all__ = ["PositionSelector", "hard_source_index", "one_hot_weights", "INFERENCE_MODES", "KEEP"]
