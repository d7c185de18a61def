"""The HyperDAS hypernetwork: a concept encoder built from the target's own blocks.

It is the first ``N`` decoder blocks of the target model (copied, trainable,
initialised from the target's weights or re-initialised), reading the concept text.
Each block gets two extra cross-attention sub-layers between its self-attention and
its MLP: one over the base and one over the counterfactual hidden states of *all*
layers and tokens (keys = tokens x layers, padding masked). Their projections are
initialised from the block's self-attention weights.

The key hidden states come from the target's residual stream, whose scale grows with
depth; they are RMS-normalised once per forward and each cross-attention folds its
norm weight into its key/value projections, so no per-layer copy of the keys is made.
Where the block's attention normalises its queries and keys (Qwen3's per-head q_norm /
k_norm; a norm over all heads is handled too), the cross-attention copies those norms too,
as it copies the projections they were trained with.
"""
from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .adapters import LLAMA_FAMILY, DecoderAdapter, RotaryFrequencies, additive_mask, rope_parameters


def rms_unit(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / rms(x) over the last axis (no weight)."""
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)


def query_key_norms(block: nn.Module) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
    """The norms a block's self-attention applies to its projected queries and keys (Qwen3
    names them q_norm / k_norm), or None where it has none."""
    attn = getattr(block, "self_attn", None)
    norms = []
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name, None)
        norms.append(norm if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity) else None)
    return norms[0], norms[1]


def head_norm(norm: Optional[nn.Module], x: Tensor, heads: int) -> Tensor:
    """x [..., heads * head_dim] through a q/k norm over one head or over all heads (x itself
    for None)."""
    if norm is None:
        return x
    size = norm.weight.numel() if getattr(norm, "weight", None) is not None else x.shape[-1] // heads
    if size == x.shape[-1]:
        return norm(x)
    return norm(x.reshape(*x.shape[:-1], x.shape[-1] // size, size)).reshape(x.shape)


class CrossAttention(nn.Module):
    """Pre-norm residual cross-attention: hidden [B, C, d] attends to keys [B, K, d].

    The query norm is a copy of the block's input norm (trainable); key/value inputs are
    RMS-normalised by the caller and scaled by ``key_scale`` (the norm weight, frozen).
    Grouped-query attention follows the source block (num_kv_heads may be < num_heads).
    """

    def __init__(self, norm: nn.Module, q_w: Tensor, k_w: Tensor, v_w: Tensor, o_w: Tensor, biases,
                 num_heads: int, num_kv_heads: int, head_dim: int, q_norm: Optional[nn.Module] = None,
                 k_norm: Optional[nn.Module] = None):
        """q_norm / k_norm: the block's norms of the projected queries / keys (copied,
        trainable), over one head (weight [head_dim]) or all heads (weight [heads * head_dim]);
        None where the block has none. A k_norm acts on each projected key, so the keys are
        then projected (see forward)."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.norm = copy.deepcopy(norm)
        self.q_norm = None if q_norm is None else copy.deepcopy(q_norm)
        self.k_norm = None if k_norm is None else copy.deepcopy(k_norm)
        hidden = o_w.shape[0]
        q_b, k_b, v_b, o_b = biases

        def linear(w, b):
            layer = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
            with torch.no_grad():
                layer.weight.copy_(w)
                if b is not None:
                    layer.bias.copy_(b)
            return layer

        self.q_proj = linear(q_w, q_b)
        self.k_proj = linear(k_w, k_b)
        self.v_proj = linear(v_w, v_b)
        self.o_proj = linear(o_w, o_b)
        scale = getattr(norm, "weight", None)
        scale = torch.ones(hidden, dtype=q_w.dtype, device=q_w.device) if scale is None else scale.detach().clone()
        self.register_buffer("key_scale", scale, persistent=False)

    def _per_head(self, kv: Tensor) -> Tensor:
        """[Hkv, ...] -> [H, ...]: query head h gets KV head h // (H / Hkv).

        expand + reshape, not indexing with a head -> group index: the backward of indexing
        with repeated indices is index_put_(accumulate=True), which on the CPU adds with
        float atomics from several threads, so its sums depend on thread timing (runs with
        the same seed differed under CPU load). The backward of expand is a plain sum.
        """
        rep = self.num_heads // self.num_kv_heads
        return kv.unsqueeze(1).expand(kv.shape[0], rep, *kv.shape[1:]).reshape(self.num_heads, *kv.shape[1:])

    def forward(self, hidden: Tensor, keys_unit: Tensor, key_mask: Tensor, rotary=None) -> Tensor:
        """hidden [B, C, d]; keys_unit [B, K, d] RMS-normalised; key_mask [B, K] bool (True = attend);
        rotary: None, or ((cos, sin) of the queries [1 or B, C, hd], (cos, sin) of the keys [B, K, hd]).

        Without rotary the K key states are never projected. With g(h) the KV head of query head h:
            q_h . (W_k,g x_j + b_k) = (W_k,g^T q_h) . x_j + const_j   (the bias cancels in the softmax)
            sum_j a_hj (W_v,g x_j + b_v) = W_v,g (sum_j a_hj x_j) + b_v
        so the work is O(B C H K d) on the few concept queries instead of O(B K d hd Hkv) on the
        many keys (tokens x layers), and only the shared key tensor is saved for backward. With
        rotary (the original's positions, see HyperNetwork) the rotation of key j depends on j,
        and with a k_norm each key is normalised on its own, so the keys are then projected
        (and rotated as the original does); the values still fold.
        """
        batch, length, d = hidden.shape
        heads, hd = self.num_heads, self.head_dim
        w_v = self._per_head((self.v_proj.weight * self.key_scale).view(self.num_kv_heads, hd, d))
        q = head_norm(self.q_norm, self.q_proj(self.norm(hidden)), heads).view(batch, length, heads, hd)
        if rotary is None and self.k_norm is None:
            w_k = self._per_head((self.k_proj.weight * self.key_scale).view(self.num_kv_heads, hd, d))  # [H, hd, d]
            q_keys = torch.einsum("bchk,hkd->bchd", q, w_k).reshape(batch, length * heads, d)
            scores = torch.bmm(q_keys, keys_unit.transpose(1, 2)) * hd ** -0.5  # [B, C*H, K]
        else:
            num_keys = keys_unit.shape[1]
            k = nn.functional.linear(keys_unit, self.k_proj.weight * self.key_scale, self.k_proj.bias)
            k = head_norm(self.k_norm, k, self.num_kv_heads)
            k = k.view(batch, num_keys, self.num_kv_heads, hd).transpose(1, 2)  # [B, Hkv, K, hd]
            q_rot = q.transpose(1, 2)  # [B, H, C, hd]
            k_rot = k
            if rotary is not None:
                from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

                (q_cos, q_sin), (k_cos, k_sin) = rotary
                q_rot, _ = apply_rotary_pos_emb(q_rot, q_rot, q_cos, q_sin)
                _, k_rot = apply_rotary_pos_emb(k, k, k_cos, k_sin)
            k_rot = self._per_head(k_rot.transpose(0, 1)).transpose(0, 1)  # [B, H, K, hd]
            scores = (q_rot @ k_rot.transpose(2, 3)) * hd ** -0.5  # [B, H, C, K]
            scores = scores.transpose(1, 2).reshape(batch, length * heads, num_keys)
        scores = scores.masked_fill(~key_mask.bool().unsqueeze(1), float("-inf"))
        low = hidden.dtype in (torch.float16, torch.bfloat16)
        probs = torch.softmax(scores.float() if low else scores, dim=-1).to(hidden.dtype)
        context = torch.bmm(probs, keys_unit).view(batch, length, heads, d)  # [B, C, H, d]
        out = torch.einsum("bchd,hkd->bchk", context, w_v)
        if self.v_proj.bias is not None:
            out = out + self._per_head(self.v_proj.bias.view(self.num_kv_heads, hd))
        return hidden + self.o_proj(out.reshape(batch, length, heads * hd))


class HyperNetwork(nn.Module):
    """Concept encoder: embeddings of the target (shared, frozen) -> N copied blocks, each
    self-attention -> cross-attention(base) -> cross-attention(counterfactual) -> MLP,
    then a copy of the target's final norm. ``forward`` returns [B, C, d]."""

    def __init__(self, adapter: DecoderAdapter, num_layers: int = 2, init_from_target: bool = True,
                 rotary: bool = False, qk_norm: bool = True):
        """rotary: rotate the cross-attention keys at their positions in the flattened (token x
        layer) key list, ``cumsum(mask) * mask`` as the original does, and the concept queries
        at theirs (the target's rotary embeddings; refused for a model without them). Off by
        default: the keys must then be projected (see CrossAttention.forward).
        qk_norm: copy each block's query / key norms into its cross-attentions where it has
        them (``self.qk_norm`` says whether any were found)."""
        super().__init__()
        if not 1 <= num_layers <= adapter.num_layers:
            raise ValueError(f"num_hypernet_layers must be in [1, {adapter.num_layers}], got {num_layers}")
        self.rotary = bool(rotary)
        if self.rotary:
            # Only where the copied blocks rotate as Llama does (rotate-half over the whole
            # head): partial (StableLM, GLM, Nemotron) or interleaved (ERNIE 4.5) rotary would
            # fail, or rotate otherwise than the model's own attention.
            if adapter.model_type not in LLAMA_FAMILY:
                raise ValueError(f"hypernet_rotary supports the Llama-layout families {LLAMA_FAMILY}; "
                                 f"{adapter.model_type} is not one of them")
            inv_freq, scaling = rope_parameters(adapter)
            head_dim = adapter.block_attention_parts(adapter.blocks[0])[-1]
            if inv_freq is None or inv_freq.numel() * 2 != head_dim:
                raise ValueError(f"hypernet_rotary needs rotary embeddings over the whole head ({head_dim}); "
                                 f"{adapter.model_type} has "
                                 f"{'none' if inv_freq is None else 2 * inv_freq.numel()}")
            # fixed float32 frequencies (see rope_parameters), the same for queries and keys
            self.frequencies, self.rope_scaling = RotaryFrequencies(inv_freq, adapter.device), scaling
        # Keep the adapter out of the module tree (the target model is not ours to save).
        object.__setattr__(self, "_adapter", adapter)
        self.blocks = nn.ModuleList()
        self.base_xattn = nn.ModuleList()
        self.source_xattn = nn.ModuleList()
        for index in range(num_layers):
            block = copy.deepcopy(adapter.blocks[index])
            parts = adapter.block_attention_parts(block)
            norm, q_w, k_w, v_w, o_w, biases, heads, kv_heads, head_dim = parts
            q_norm, k_norm = query_key_norms(block) if qk_norm else (None, None)
            self.blocks.append(block)
            for target in (self.base_xattn, self.source_xattn):
                target.append(CrossAttention(norm, q_w.detach(), k_w.detach(), v_w.detach(), o_w.detach(),
                                             tuple(None if b is None else b.detach() for b in biases),
                                             heads, kv_heads, head_dim, q_norm, k_norm))
        self.qk_norm = any(xa.q_norm is not None or xa.k_norm is not None for xa in self.base_xattn)
        self.final_norm = copy.deepcopy(adapter.final_norm)
        for param in self.parameters():
            param.requires_grad_(True)
        if not init_from_target:
            self.reset_parameters()

    @property
    def inv_freq(self) -> Tensor:
        """The cross-attention's rotary frequencies [head_dim / 2], float32 (rotary only)."""
        return self.frequencies.inv_freq

    def _cos_sin(self, positions: Tensor, dtype: torch.dtype):
        """positions [1 or B, P] -> (cos, sin) [., P, head_dim] in HF's rotate-half layout,
        times the rope's attention scaling, as the target's rotary module computes them."""
        angle = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq
        angle = torch.cat([angle, angle], -1)
        return (angle.cos() * self.rope_scaling).to(dtype), (angle.sin() * self.rope_scaling).to(dtype)

    def reset_parameters(self) -> None:
        """Re-initialise every linear layer (training from scratch instead of from the target)."""
        std = float(getattr(self._adapter.config, "initializer_range", 0.02))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, concept_ids: Tensor, concept_mask: Tensor, base_keys: Tensor, base_key_mask: Tensor,
                source_keys: Tensor, source_key_mask: Tensor) -> Tensor:
        """concept ids/mask [B, C]; *_keys [B, K, d] raw residual states (tokens x layers);
        *_key_mask [B, K] bool. Returns the final-normed hidden states [B, C, d]."""
        adapter = self._adapter
        hidden = adapter.embed(concept_ids)
        seq = concept_ids.shape[1]
        position_ids = torch.arange(seq, device=concept_ids.device).unsqueeze(0)
        mask = additive_mask(concept_mask, seq, seq, hidden.dtype, hidden.device)
        pos_emb = adapter.position_embeddings(hidden, position_ids)
        base_unit = rms_unit(base_keys)
        source_unit = rms_unit(source_keys)
        base_rot = source_rot = None
        if self.rotary:
            def key_rotary(key_mask):  # positions 1.. of the valid keys in the flat list
                keep = key_mask.long()
                return self._cos_sin(keep.cumsum(1) * keep, hidden.dtype)

            query_rot = self._cos_sin(position_ids, hidden.dtype)
            base_rot = (query_rot, key_rotary(base_key_mask))
            source_rot = (query_rot, key_rotary(source_key_mask))
        for block, xb, xs in zip(self.blocks, self.base_xattn, self.source_xattn):
            # a block without rotary in its own attention (SmolLM3's no-rope layers) gets none here
            uses_rope = bool(getattr(getattr(block, "self_attn", None), "use_rope", True))
            hidden = adapter.block_self_attention(block, hidden, mask, position_ids, pos_emb)
            hidden = xb(hidden, base_unit, base_key_mask, base_rot if uses_rope else None)
            hidden = xs(hidden, source_unit, source_key_mask, source_rot if uses_rope else None)
            hidden = adapter.block_mlp(block, hidden)
        return self.final_norm(hidden)


def stack_layer_keys(states, attention_mask: Tensor):
    """List of (N+1) [B, T, d] states -> keys [B, T*(N+1), d] (token-major) and mask [B, T*(N+1)] bool."""
    keys = torch.stack(list(states), dim=2)  # [B, T, L, d]
    batch, seq, layers, hidden = keys.shape
    mask = attention_mask.to(torch.bool).unsqueeze(-1).expand(batch, seq, layers).reshape(batch, seq * layers)
    return keys.reshape(batch, seq * layers, hidden), mask


__all__ = ["HyperNetwork", "CrossAttention", "stack_layer_keys", "rms_unit"]
