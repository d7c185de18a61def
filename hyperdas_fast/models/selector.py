"""Token-position selector: weights [B, S+1, T] and the inference modes.

A cross-attention head whose query is the hypernetwork's last token and whose keys are
the (source s, base t) pairs at the intervened layer plus one [SELF] key per base token.
In the original code each pair key is ``k_proj(q_combine([base_t ; source_s]))``, a
[B, S, T, 2d] tensor. ``q_combine`` is linear, so ``q_combine([a; b]) = W1 a + W2 b + c``
and the pair key splits into a base part and a source part,

    k[s, t] = K(W1 a_t + c) + K W2 b_s = kb[t] + ks[s],

computed from one [B, T, d] and one [B, S, d] projection. The [SELF] key of base token t
is ``K_self(a_t)``. Scores are averaged over heads and softmaxed over the S+1 axis.
Source padding rows get zero weight; base columns outside the intervention mask (padding,
label tokens) are forced to [SELF].

Rotary positions (``rotary=True``, the default, as in the original): the original lays the
keys out as one flattened list, the S x T pairs row by row and then the T [SELF] keys, and
rotates query and keys with rotary embeddings at their positions in it (valid entries
counted from 1, as its ``cumsum(mask) * mask`` does). Pair (s, t) sits at
p = rs(s) Tb + rt(t) + 1, where rs, rt count the valid source / base tokens before s / t
and Tb is the number of valid base tokens. With the rotary pairs of each head as complex
numbers (HF's rotate-half layout), the score is

    score[s, t] = Re sum_j conj(q_j) (kb_j[t] + ks_j[s]) exp(i theta_j (p(s, t) - p_q))
                = Re [A(s) . kb~(t)] + Re [sum_h A(s) ks(s)] . exp(i theta (rt(t) + 1)),
    A(s) = conj(q) exp(i theta (rs(s) Tb - p_q)),   kb~(t) = kb(t) exp(i theta (rt(t) + 1)),

two batched products of [B, S, d] x [d, T] and [B, S, hd] x [hd, T]: still no pair
tensor. HyperDASModel passes p_q = the last concept token's index (the original, on its
left-padded input, counts from 1: one more, the same for every example, so a fixed
rotation of q that q_proj absorbs). The phase varies with s and t jointly, so different
base tokens can prefer different source tokens. Without rotary (``rotary=False``, what checkpoints from before
this option were trained with) score[s, t] = ss[s] + sb[t]: every base column prefers the
same source token, column_argmax draws on one source token per example and
bidding_argmax changes at most one column.

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

from .adapters import RotaryFrequencies

KEEP = -1
INFERENCE_MODES = ("default", "column_argmax", "global_argmax", "bidding_argmax", "groundtruth")


class PositionSelector(nn.Module):
    """weights [B, S+1, T] from the hypernetwork query [B, d] and layer-L states."""

    def __init__(self, hidden_size: int, num_heads: int, dtype=None, device=None, rotary: bool = True,
                 inv_freq: Optional[Tensor] = None, rope_theta: float = 10000.0):
        """rotary: rotate query and keys at their positions in the original's flattened key list
        (see the module docstring). inv_freq [head_dim / 2]: the rotary frequencies (the target
        model's, so that scaled variants such as Llama 3's carry over); None: ``rope_theta **
        (-2j / head_dim)``."""
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        self.rotary = bool(rotary)
        if self.rotary:
            if self.head_dim % 2:
                raise ValueError(f"rotary needs an even head_dim, got {self.head_dim} "
                                 f"(hidden_size {hidden_size} / num_heads {num_heads})")
            half = self.head_dim // 2
            if inv_freq is None:
                inv_freq = rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / self.head_dim)
            inv_freq = torch.as_tensor(inv_freq).detach().reshape(-1)
            if inv_freq.numel() != half:
                raise ValueError(f"inv_freq must have head_dim / 2 = {half} entries, got {inv_freq.numel()}")
            self.frequencies = RotaryFrequencies(inv_freq, device)  # float32, not saved
        kw = dict(dtype=dtype, device=device)
        self.q_proj = nn.Linear(hidden_size, hidden_size, **kw)
        # q_combine: Linear(2d -> d) over [base ; source]; kept as one weight, applied in halves.
        self.q_combine = nn.Linear(2 * hidden_size, hidden_size, **kw)
        self.k_proj = nn.Linear(hidden_size, hidden_size, **kw)
        self.self_proj = nn.Linear(hidden_size, hidden_size, **kw)
        self.state_scale = nn.Parameter(torch.ones(hidden_size, **kw))

    @property
    def inv_freq(self) -> Tensor:
        """The rotary frequencies [head_dim / 2], float32 (rotary only)."""
        return self.frequencies.inv_freq

    def pair_parts(self, base: Tensor, source: Tensor):
        """Projected base keys [B, T, d] (with biases) and source keys [B, S, d] (no bias)."""
        d = self.hidden_size
        w1, w2 = self.q_combine.weight[:, :d], self.q_combine.weight[:, d:]
        kb = self.k_proj(base @ w1.t() + self.q_combine.bias)
        ks = (source @ w2.t()) @ self.k_proj.weight.t()
        return kb, ks

    def forward(self, query: Tensor, base: Tensor, source: Tensor, base_mask: Tensor, source_mask: Tensor,
                query_pos: Optional[Tensor] = None) -> Tensor:
        """query [B, d]; base [B, T, d], source [B, S, d] layer-L states; base_mask [B, T] bool
        (True = may be intervened), source_mask [B, S] bool (True = real token); query_pos [B]
        the query token's position in the hypernetwork's input (rotary only; None: 0)
        -> [B, S+1, T]."""
        from .hypernetwork import rms_unit

        base_n = rms_unit(base) * self.state_scale
        source_n = rms_unit(source) * self.state_scale
        batch, seq, _ = base.shape
        heads, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).view(batch, heads, hd)
        kb, ks = self.pair_parts(base_n, source_n)
        kself = self.self_proj(base_n)
        scale = hd ** -0.5 / heads  # mean over heads of scaled dot products
        if self.rotary:
            scores, score_self = self._rotary_scores(q, kb, ks, kself, base_mask.bool(), source_mask.bool(), query_pos)
            scores, score_self = scores * scale, score_self * scale
        else:
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

    def _rotary_scores(self, q: Tensor, kb: Tensor, ks: Tensor, kself: Tensor, base_mask: Tensor,
                       source_mask: Tensor, query_pos: Optional[Tensor]):
        """Unscaled, head-summed rotary scores: pairs [B, S, T] and [SELF] [B, T], in float32
        (float64 for float64 inputs; see the module docstring for the algebra)."""
        batch, seq, _ = kb.shape
        cdt = torch.promote_types(kb.dtype, torch.float32)
        num_source = ks.shape[1]
        heads, half = self.num_heads, self.head_dim // 2

        def halves(x, rows):  # [B, X, d] -> real and imaginary parts [B, X, H, hd/2]
            x = x.to(cdt).view(batch, rows, heads, 2, half)
            return x[..., 0, :], x[..., 1, :]

        def phase(pos):  # positions [B, X] -> cos, sin [B, X, 1, hd/2] (angles in float64)
            angle = pos.double().unsqueeze(-1) * self.inv_freq.double()
            return torch.cos(angle).to(cdt).unsqueeze(2), torch.sin(angle).to(cdt).unsqueeze(2)

        base_count = base_mask.long().sum(1, keepdim=True)  # Tb [B, 1]
        rank_t = base_mask.long().cumsum(1) - base_mask.long()  # valid base tokens before t
        rank_s = source_mask.long().cumsum(1) - source_mask.long()
        qpos = torch.zeros(batch, 1, dtype=torch.long, device=kb.device) if query_pos is None \
            else query_pos.to(kb.device).long().view(batch, 1)
        q_re, q_im = halves(q.reshape(batch, 1, -1), 1)  # [B, 1, H, hd/2]
        q_im = -q_im  # conj(q)

        def times(a_re, a_im, c, s):  # (a_re + i a_im) (c + i s)
            return a_re * c - a_im * s, a_re * s + a_im * c

        a_re, a_im = times(q_re, q_im, *phase(rank_s * base_count - qpos))  # A(s) [B, S, H, hd/2]
        ct, st = phase(rank_t + 1)  # [B, T, 1, hd/2]
        kb_re, kb_im = times(*halves(kb, seq), ct, st)
        # Re[A . kb~] = A_re . kb~_re - A_im . kb~_im, summed over heads and frequencies
        pair = torch.bmm(torch.cat([a_re, -a_im], -1).reshape(batch, num_source, -1),
                         torch.cat([kb_re, kb_im], -1).reshape(batch, seq, -1).transpose(1, 2))
        ks_re, ks_im = halves(ks, num_source)
        c_re, c_im = times(a_re, a_im, ks_re, ks_im)
        c_re, c_im = c_re.sum(2), c_im.sum(2)  # over heads: the phase of t is the same in every head
        pair = pair + torch.bmm(torch.cat([c_re, -c_im], -1),
                                torch.cat([ct.squeeze(2), st.squeeze(2)], -1).transpose(1, 2))
        # [SELF] keys after the S x T pairs: valid pairs Sv * Tb, then every base index t
        valid_pairs = source_mask.long().sum(1, keepdim=True) * base_count
        t_index = torch.arange(seq, device=kb.device).unsqueeze(0)
        self_re, self_im = times(q_re, q_im, *phase(valid_pairs + t_index + 1 - qpos))  # [B, T, H, hd/2]
        k_re, k_im = halves(kself, seq)
        score_self = (self_re * k_re - self_im * k_im).sum((2, 3))
        return pair, score_self


def selector_weights_reference(sel: PositionSelector, query: Tensor, base: Tensor, source: Tensor, base_mask: Tensor,
                               source_mask: Tensor, query_pos: Optional[Tensor] = None) -> Tensor:
    """The selector's weights [B, S+1, T] computed the way the original code does: the
    [B, S, T, 2d] pair tensor through q_combine and k_proj, the keys as one flattened list,
    rotary embeddings (Hugging Face's apply_rotary_pos_emb) at ``cumsum(mask) * mask``
    positions (``sel.rotary``), per-head scores averaged over heads. For tests and the
    training-step benchmark; O(B S T d) memory. Same arguments as ``PositionSelector.forward``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from .hypernetwork import rms_unit

    B, T, d = base.shape
    S = source.shape[1]
    H, hd = sel.num_heads, sel.head_dim
    base_mask, source_mask = base_mask.bool(), source_mask.bool()
    base_n = rms_unit(base) * sel.state_scale
    source_n = rms_unit(source) * sel.state_scale
    pairs = torch.cat([base_n.unsqueeze(1).expand(B, S, T, d), source_n.unsqueeze(2).expand(B, S, T, d)], -1)
    keys = torch.cat([sel.k_proj(sel.q_combine(pairs)), sel.self_proj(base_n).unsqueeze(1)], 1)  # [B, S+1, T, d]
    keys = keys.reshape(B, (S + 1) * T, H, hd).transpose(1, 2)  # [B, H, (S+1)T, hd]
    q = sel.q_proj(query).view(B, H, 1, hd)
    if sel.rotary:
        flat_mask = torch.cat([source_mask.unsqueeze(-1) & base_mask.unsqueeze(1),
                               torch.ones(B, 1, T, dtype=torch.bool, device=base.device)], 1).reshape(B, -1).long()
        key_pos = flat_mask.cumsum(1) * flat_mask
        qpos = torch.zeros(B, 1, dtype=torch.long, device=base.device) if query_pos is None \
            else query_pos.to(base.device).long().view(B, 1)

        def cos_sin(pos):  # HF's rotate-half layout: the frequencies repeated over both halves
            angle = pos.double().unsqueeze(-1) * sel.inv_freq.double()
            angle = torch.cat([angle, angle], -1)
            return angle.cos().to(keys.dtype), angle.sin().to(keys.dtype)

        _, keys = apply_rotary_pos_emb(keys, keys, *cos_sin(key_pos))
        q, _ = apply_rotary_pos_emb(q, q, *cos_sin(qpos))
    scores = (q @ keys.transpose(2, 3)).squeeze(2) / hd ** 0.5  # [B, H, (S+1)T]
    scores = scores.mean(1).view(B, S + 1, T)
    scores = torch.cat([scores[:, :S].masked_fill(~source_mask.unsqueeze(-1), float("-inf")), scores[:, S:]], 1)
    weights = torch.softmax(scores.float(), 1).to(base.dtype)
    keep = torch.zeros_like(weights)
    keep[:, -1] = 1.0
    return torch.where(base_mask.unsqueeze(1), weights, keep)


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


__all__ = ["PositionSelector", "selector_weights_reference", "hard_source_index", "one_hot_weights", "INFERENCE_MODES", "KEEP"]
