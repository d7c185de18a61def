"""Uniform access to the parts of a Hugging Face decoder-only model.

An adapter says where the token embedding, the decoder blocks, the final norm and the
LM head live, and runs any range of blocks ``[start, end)`` on a residual stream. That
is what lets HyperDAS reuse the prefix of the base forward (blocks ``0..L-1``) and run
only blocks ``L..N-1`` for the intervened run.

Supported families: the Llama family (``llama``, ``qwen2``, ``mistral``, and models
that share its block layout such as SmolLM2) and ``gpt2``. A model type outside that list
with the Llama module layout is accepted only when its blocks hold nothing else and a
short probe forward through the adapter matches the model's own forward.

Attention masks are built here as additive float masks ``[B, 1, Tq, Tk]`` (causal and
key padding), which every attention implementation of those families accepts
(eager and sdpa). Position ids are ``0..T-1`` (right padding).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

LLAMA_FAMILY = ("llama", "qwen2", "mistral", "smollm2", "smollm3", "olmo")
GPT2_FAMILY = ("gpt2",)
SUPPORTED_MODEL_TYPES = LLAMA_FAMILY + GPT2_FAMILY


def additive_mask(
    attention_mask: Optional[Tensor],
    query_len: int,
    key_len: int,
    dtype: torch.dtype,
    device: torch.device,
    causal: bool = True,
    past: int = 0,
) -> Tensor:
    """Additive mask [B or 1, 1, Tq, Tk]: 0 where query i may attend key j, a large negative
    number elsewhere. ``attention_mask`` [B, Tk] (1 = real token) masks key padding;
    ``causal`` adds j <= i + past. A row with no allowed key is left fully open (it is padding)."""
    allowed = torch.ones(query_len, key_len, dtype=torch.bool, device=device)
    if causal:
        q = torch.arange(query_len, device=device).unsqueeze(1) + past
        k = torch.arange(key_len, device=device).unsqueeze(0)
        allowed = k <= q
    allowed = allowed.view(1, 1, query_len, key_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    # Rows with nothing to attend to (left padding) would give NaN; open them instead.
    empty = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | empty
    out = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


class DecoderAdapter:
    """Base adapter. Subclasses fill ``embed_tokens``, ``blocks``, ``final_norm``, ``lm_head``.

    Attributes: ``model`` (the HF causal LM), ``model_type``, ``hidden_size``,
    ``num_layers``, ``num_heads``, ``blocks`` (nn.ModuleList).
    """

    family = "base"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.model_type = getattr(self.config, "model_type", type(model).__name__)
        self.hidden_size = int(self.config.hidden_size)
        self.num_layers = len(self.blocks)
        self.num_heads = int(self.config.num_attention_heads)
        # Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window): the blocks
        # run with a full causal mask here, exact only up to the window's length.
        window = getattr(self.config, "sliding_window", None)
        if getattr(self.config, "use_sliding_window", True) is False:
            window = None
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types and "sliding_attention" not in layer_types:
            window = None  # (Qwen2 with max_window_layers >= its layers: full attention everywhere)
        # Learned absolute positions (GPT-2) end at the table's size.
        self.max_positions = getattr(self.config, "n_positions", None) if self.family == "gpt2" else None
        self.sliding_window = int(window) if window else None
        # Optional hook: called as block_callback(index) before each block runs (tests count calls).
        self.block_callback: Optional[Callable[[int], None]] = None

    # -- parts -----------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def embed(self, input_ids: Tensor, position_ids: Optional[Tensor] = None) -> Tensor:
        """Token (and, for GPT-2, position) embeddings: [B, T] -> [B, T, d]."""
        raise NotImplementedError

    def position_embeddings(self, hidden: Tensor, position_ids: Tensor):
        """Rotary (cos, sin) for the Llama family; None for GPT-2."""
        return None

    def logits(self, hidden: Tensor) -> Tensor:
        """Final norm + LM head: [..., d] -> [..., V]."""
        return self.lm_head(self.final_norm(hidden))

    def call_block(self, index: int, hidden: Tensor, mask: Tensor, position_ids: Tensor, pos_emb, cache=None) -> Tensor:
        """Run block ``index``; with a transformers ``Cache`` its keys/values are appended to it."""
        raise NotImplementedError

    # -- sub-layers of one block (the hypernetwork runs them with cross-attention between) --
    def block_self_attention(self, block: nn.Module, hidden: Tensor, mask: Tensor, position_ids: Tensor, pos_emb) -> Tensor:
        """hidden + self-attention(norm(hidden)) of ``block``."""
        raise NotImplementedError

    def block_mlp(self, block: nn.Module, hidden: Tensor) -> Tensor:
        """hidden + MLP(norm(hidden)) of ``block``."""
        raise NotImplementedError

    def block_attention_parts(self, block: nn.Module):
        """(input norm, q_weight [H*hd, d], k_weight [Hkv*hd, d], v_weight, o_weight [d, H*hd],
        biases (q, k, v, o) or None, num_heads, num_kv_heads, head_dim) of ``block``'s self-attention."""
        raise NotImplementedError

    # -- running ---------------------------------------------------------------
    def check_length(self, length: int) -> None:
        """ValueError when ``length`` tokens exceed the model's sliding attention window, or
        its table of learned positions (GPT-2's n_positions)."""
        if self.max_positions is not None and length > self.max_positions:
            raise ValueError(f"{length} tokens exceed {self.model_type}'s {self.max_positions} learned positions "
                             f"(n_positions): shorten the prompts (and max_new_tokens)")
        if self.sliding_window is not None and length > self.sliding_window:
            raise ValueError(f"{length} tokens exceed {self.model_type}'s sliding attention window of "
                             f"{self.sliding_window}, which hyperdas_fast does not implement (its results are "
                             f"exact up to {self.sliding_window} tokens)")

    def prepare(self, input_ids_or_hidden: Tensor, attention_mask: Optional[Tensor], position_ids: Optional[Tensor] = None):
        """(mask [B,1,T,T], position_ids [1 or B, T], position embeddings) for a sequence."""
        seq = input_ids_or_hidden.shape[1]
        self.check_length(seq)
        device = input_ids_or_hidden.device
        if position_ids is None:
            position_ids = torch.arange(seq, device=device).unsqueeze(0)
        mask = additive_mask(attention_mask, seq, seq, self.dtype, device)
        return mask, position_ids

    def run_blocks(
        self,
        hidden: Tensor,
        start: int,
        end: int,
        attention_mask: Optional[Tensor],
        position_ids: Optional[Tensor] = None,
        mask4d: Optional[Tensor] = None,
        pos_emb=None,
        collect: Optional[List[Tensor]] = None,
        cache=None,
    ) -> Tensor:
        """Run blocks ``[start, end)`` on the residual stream ``hidden`` [B, T, d].

        ``attention_mask`` [B, T] (1 = token, right padding). ``mask4d`` / ``pos_emb`` may be
        passed precomputed (from ``prepare`` / ``position_embeddings``). When ``collect`` is a
        list, the output of every block is appended to it. ``cache`` (a transformers
        ``DynamicCache``) makes the blocks append their keys/values to it (generation).
        """
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"need 0 <= start <= end <= {self.num_layers}, got start={start}, end={end}")
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        if mask4d is None:
            self.check_length(hidden.shape[1])
            mask4d = additive_mask(attention_mask, hidden.shape[1], hidden.shape[1], hidden.dtype, hidden.device)
        if pos_emb is None:
            pos_emb = self.position_embeddings(hidden, position_ids)
        for index in range(start, end):
            if self.block_callback is not None:
                self.block_callback(index)
            hidden = self.call_block(index, hidden, mask4d, position_ids, pos_emb, cache)
            if collect is not None:
                collect.append(hidden)
        return hidden

    def hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor], end: Optional[int] = None) -> List[Tensor]:
        """Residual stream before block 0 (embeddings) and after each block up to ``end``
        (default all): a list of ``end + 1`` tensors [B, T, d]; entry ``l`` is the input of block ``l``."""
        end = self.num_layers if end is None else end
        mask4d, position_ids = self.prepare(input_ids, attention_mask)
        hidden = self.embed(input_ids, position_ids)
        states = [hidden]
        self.run_blocks(hidden, 0, end, attention_mask, position_ids, mask4d=mask4d, collect=states)
        return states


class LlamaAdapter(DecoderAdapter):
    """Llama, Qwen2, Mistral, SmolLM2 and other models with the Llama block layout."""

    family = "llama"

    def __init__(self, model: nn.Module):
        inner = model.model
        self.embed_tokens = inner.embed_tokens
        self.blocks = inner.layers
        self.final_norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        super().__init__(model)

    def embed(self, input_ids, position_ids=None):
        return self.embed_tokens(input_ids)

    def position_embeddings(self, hidden, position_ids):
        return self.rotary(hidden, position_ids=position_ids)

    def call_block(self, index, hidden, mask, position_ids, pos_emb, cache=None):
        extra = {} if cache is None else {"cache": cache, "use_cache": True}
        out = self.blocks[index](hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=pos_emb,
                                 **extra)
        return out[0] if isinstance(out, tuple) else out

    def block_self_attention(self, block, hidden, mask, position_ids, pos_emb):
        out = block.self_attn(
            hidden_states=block.input_layernorm(hidden),
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=pos_emb,
        )[0]
        return hidden + out

    def block_mlp(self, block, hidden):
        return hidden + block.mlp(block.post_attention_layernorm(hidden))

    def block_attention_parts(self, block):
        attn = block.self_attn
        biases = tuple(getattr(getattr(attn, n), "bias", None) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        head_dim = attn.head_dim
        num_heads = attn.q_proj.weight.shape[0] // head_dim
        num_kv = attn.k_proj.weight.shape[0] // head_dim
        return (block.input_layernorm, attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
                attn.o_proj.weight, biases, num_heads, num_kv, head_dim)


class GPT2Adapter(DecoderAdapter):
    """GPT-2 (learned absolute positions, Conv1D projections)."""

    family = "gpt2"

    def __init__(self, model: nn.Module):
        inner = model.transformer
        self.embed_tokens = inner.wte
        self.embed_positions = inner.wpe
        self.blocks = inner.h
        self.final_norm = inner.ln_f
        self.lm_head = model.lm_head
        super().__init__(model)

    def embed(self, input_ids, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.embed_tokens(input_ids) + self.embed_positions(position_ids)

    def call_block(self, index, hidden, mask, position_ids, pos_emb, cache=None):
        extra = {} if cache is None else {"cache": cache, "use_cache": True}
        out = self.blocks[index](hidden, attention_mask=mask, **extra)
        return out[0] if isinstance(out, tuple) else out

    def block_self_attention(self, block, hidden, mask, position_ids, pos_emb):
        return hidden + block.attn(block.ln_1(hidden), attention_mask=mask)[0]

    def block_mlp(self, block, hidden):
        return hidden + block.mlp(block.ln_2(hidden))

    def block_attention_parts(self, block):
        attn = block.attn
        d = self.hidden_size
        w = attn.c_attn.weight  # Conv1D: [d, 3d], y = x @ w + b
        b = attn.c_attn.bias
        q_w, k_w, v_w = (w[:, i * d:(i + 1) * d].t() for i in range(3))
        q_b, k_b, v_b = (b[i * d:(i + 1) * d] for i in range(3))
        o_w = attn.c_proj.weight.t()
        heads = self.num_heads
        return (block.ln_1, q_w, k_w, v_w, o_w, (q_b, k_b, v_b, attn.c_proj.bias), heads, heads, d // heads)


def _unsupported_llama_layout(config, block: nn.Module) -> List[str]:
    """What a model with the Llama module layout may compute that LlamaAdapter does not
    (it re-runs embeddings, blocks, final norm and head itself): each would give silently
    different hidden states and logits, so such models are refused."""
    found = []
    for name in ("embedding_multiplier", "logits_scaling", "residual_multiplier", "attention_multiplier"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            found.append(f"{name}={getattr(config, name)}")  # Granite
    for name in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, name, None) is not None:
            found.append(f"{name}={getattr(config, name)}")  # Gemma 2
    for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
        if hasattr(block, name):
            found.append(f"blocks with {name}")  # Gemma 2/3, OLMo 2
    attn = getattr(block, "self_attn", None)
    if attn is not None and not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        found.append("fused attention projections (no q_proj/k_proj/v_proj/o_proj)")  # Phi-3
    if getattr(config, "mup_enabled", False):
        found.append("mup_enabled (scaled embeddings)")  # AFMoE
    # The adapter computes a block as x + attn(norm1(x)), then x + mlp(norm2(x)): any other
    # module a block holds (an extra norm, a gate) is something it would leave out.
    extra = sorted(name for name, child in block.named_children()
                   if name not in LLAMA_BLOCK_PARTS and not isinstance(child, nn.Dropout)
                   and not name.startswith(("pre_feedforward", "post_feedforward")))
    if extra:
        found.append(f"blocks with {', '.join(extra)}")  # GLM-4's post_*_layernorm, AFMoE's *_mlp_layernorm
    missing = [name for name in LLAMA_BLOCK_PARTS if getattr(block, name, None) is None]
    if missing:
        found.append(f"blocks without {', '.join(missing)}")  # StableLM with a parallel residual
    return found


# What a Llama-layout block holds, and all the adapter runs of it.
LLAMA_BLOCK_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


def _probe_llama_layout(adapter: "LlamaAdapter") -> Optional[str]:
    """For a model type outside the tested list that has the Llama module layout: run a
    4-token prompt (a padded second row) through the adapter and through the model's own
    forward, and block 0 whole and as the two halves the hypernetwork runs. What fails or
    differs, or None. (MoE blocks whose MLP returns a tuple, rotary embeddings that need
    other arguments, embeddings scaled inside the model's forward: each passes the layout
    check and then fails, or silently gives other logits.)"""
    model = adapter.model
    if any(p.is_meta for p in model.parameters()):
        return None  # nothing to run (weights not materialised)
    vocab = int(getattr(adapter.config, "vocab_size", 2) or 2)
    ids = (torch.arange(8, device=adapter.device).view(2, 4) % max(1, vocab - 1)) + min(1, vocab - 1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], device=adapter.device)
    try:
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits.float()
            ours = adapter.logits(adapter.hidden_states(ids, mask)[-1]).float()
            mask4d, pos = adapter.prepare(ids, mask)
            hidden = adapter.embed(ids, pos)
            pos_emb = adapter.position_embeddings(hidden, pos)
            block = adapter.blocks[0]
            whole = adapter.call_block(0, hidden, mask4d, pos, pos_emb).float()
            halves = adapter.block_mlp(block, adapter.block_self_attention(block, hidden, mask4d, pos, pos_emb)).float()
    except Exception as exc:  # noqa: BLE001  (any failure means: not runnable here)
        return f"a probe forward failed ({type(exc).__name__}: {str(exc)[:200]})"
    tol = 1e-3 if adapter.dtype == torch.float32 else 5e-2
    real = mask.bool()
    for what, a, b in (("logits", ours[real], ref[real]), ("block 0 run as two halves", halves, whole)):
        err = (a - b).abs().max().item()
        if not err <= tol * (1 + b.abs().max().item()):
            return f"its {what} differ from the model's own forward by {err:.3g}"
    return None


def get_adapter(model: nn.Module) -> DecoderAdapter:
    """The adapter for a Hugging Face causal LM; ValueError for an unsupported model type."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in GPT2_FAMILY:
        if not hasattr(model, "transformer") or not hasattr(model, "lm_head"):
            raise ValueError(f"model of type {model_type!r} ({type(model).__name__}) must be a causal LM with "
                             ".transformer and .lm_head (e.g. GPT2LMHeadModel)")
        return GPT2Adapter(model)
    if model_type in LLAMA_FAMILY or (
        model_type is not None
        and hasattr(model, "model")
        and hasattr(getattr(model, "model"), "layers")
        and hasattr(getattr(model, "model"), "rotary_emb")
        and all(hasattr(model.model.layers[0], n) for n in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"))
    ):
        if not hasattr(model, "lm_head") or not hasattr(model, "model"):
            raise ValueError(f"model of type {model_type!r} must be a causal LM with .model and .lm_head")
        unsupported = _unsupported_llama_layout(config, model.model.layers[0])
        if unsupported:
            raise ValueError(f"unsupported model type {model_type!r}: it has {', '.join(unsupported)}, which "
                             f"hyperdas_fast's Llama adapter does not compute; supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        adapter = LlamaAdapter(model)
        if model_type not in LLAMA_FAMILY:
            problem = _probe_llama_layout(adapter)
            if problem:
                raise ValueError(f"unsupported model type {model_type!r}: it has the Llama module layout, but "
                                 f"{problem}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        return adapter
    raise ValueError(
        f"unsupported model type {model_type!r} ({type(model).__name__}); supported: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)} (decoder-only causal LMs)"
    )


def rope_parameters(adapter: DecoderAdapter):
    """(inv_freq [head_dim / 2] float32 on the CPU, attention_scaling) of the target's rotary
    embeddings, recomputed from its config by the rotary module's own initialisation, or
    (None, 1.0) for a model without them. Recomputed rather than copied from the module's
    inv_freq buffer: a target cast to bf16 has cast that buffer too (its angles at positions in
    the thousands would be off by radians), and a dynamic rope rewrites it per call."""
    rotary = getattr(adapter, "rotary", None)
    if rotary is None:
        return None, 1.0
    config = getattr(rotary, "config", None) or getattr(adapter, "config", None)
    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rope_type = getattr(rotary, "rope_type", "default")
        init = rotary.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
        inv_freq, scaling = init(config)
    except Exception:  # noqa: BLE001 - an older or custom rotary module: its buffer, as it is
        inv_freq, scaling = getattr(rotary, "inv_freq", None), getattr(rotary, "attention_scaling", 1.0)
    if not isinstance(inv_freq, Tensor):
        return None, 1.0
    return inv_freq.detach().float().cpu(), float(scaling)


class RotaryFrequencies(nn.Module):
    """Rotary frequencies inv_freq [n] as a non-persistent float32 buffer (derived from the
    target's config, not a weight) that stays float32 when the module holding it is cast:
    Module.to(bf16) casts floating buffers, and bf16 frequencies put angles of a few hundred
    radians off by whole radians."""

    def __init__(self, inv_freq: Tensor, device=None):
        super().__init__()
        self._fp32 = torch.as_tensor(inv_freq).detach().reshape(-1).to(dtype=torch.float32, device="cpu")
        self.register_buffer("inv_freq", self._fp32.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._fp32.to(self.inv_freq.device)
        return self


__all__ = ["DecoderAdapter", "LlamaAdapter", "GPT2Adapter", "get_adapter", "additive_mask", "rope_parameters",
           "RotaryFrequencies", "SUPPORTED_MODEL_TYPES", "LLAMA_FAMILY"]
