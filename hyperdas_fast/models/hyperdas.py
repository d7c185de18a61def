"""HyperDAS on a Hugging Face decoder: the model (``HyperDASModel``) and the public API (``HyperDAS``).

One step (``HyperDASModel.forward``):

1. base forward (no grad): residual states of all layers; the layer-L state and the
   attention mask / position embeddings are kept for step 4 (prefix reuse);
2. counterfactual forward (no grad): residual states of all layers;
3. hypernetwork(concept, both stacks) -> last-token embedding -> selector weights
   [B, S+1, T] and subspace (basis, reflect, mask) (orthogonal basis evaluated once);
4. ``ops.interchange`` (soft) or ``ops.interchange_hard`` (argmax modes, in place on the
   residual stream when no gradient is needed) at layer L, then blocks L..N-1 only, final
   norm and LM head.

The target model runs once on the base, once on the counterfactual, and blocks L..N-1 once
more. ``reuse_prefix=False`` recomputes blocks 0..L-1 for the intervened run instead (the
hook-style pipeline; same numbers, used by the tests).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..atomic import publish
from ..data.collate import IGNORE_INDEX, HyperDASCollator
from .adapters import get_adapter, rope_parameters
from .hypernetwork import HyperNetwork, stack_layer_keys
from .selector import INFERENCE_MODES, PositionSelector, hard_source_index
from .subspace import SUBSPACES, make_subspace


@contextlib.contextmanager
def seeded_init(seed: Optional[int], device: Union[str, torch.device, None] = None):
    """Draw what is created inside from torch's generator(s) seeded with ``seed``; the
    caller's RNG state is restored afterwards. ``seed=None``: the global generators as they
    are (no seeding). Seeds the CPU generator and, for a CUDA ``device``, that device's."""
    if seed is None:
        yield
        return
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(int(seed))
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(int(seed))
        yield

CONFIG_NAME = "hyperdas_config.json"
WEIGHTS_NAME = "hyperdas.safetensors"
FORMAT_VERSION = 1


def check_right_padded(masks: Dict[str, Tensor]) -> None:
    """Positions are 0, 1, 2, ... from the first column and the hypernetwork's query is the
    concept's last real token: both need right padding (ones, then zeros), as
    HyperDASCollator makes. A left-padded row would shift every position (results differ
    from the unpadded prompt by far more than rounding), so it is refused. ``masks``: name ->
    [B, T] attention mask; one host sync for all of them (this runs every step)."""
    flags = {}
    for name, attention_mask in masks.items():
        am = attention_mask.bool()
        if am.dim() != 2:
            raise ValueError(f"{name} must be [B, T], got shape {list(am.shape)}")
        flags[name] = (am[:, 1:] & ~am[:, :-1]).any(dim=1)  # [B]: a pad before a real token
    if not bool(torch.cat(list(flags.values())).any()):
        return
    for name, bad in flags.items():
        rows = bad.nonzero().flatten().tolist()
        if rows:
            raise ValueError(f"{name} must be right-padded (ones, then zeros; HyperDASCollator pads on the right), "
                             f"but rows {rows[:8]} have a padded position before a real token")


@dataclass
class HyperDASOutput:
    """Result of ``HyperDASModel.forward``.

    logits: [B, T, V] (``logits_at="all"``) or packed [P, V] rows at ``labels != -100``
        (``logits_at="labels"``; row-major order, what ``hyperdas_loss`` accepts).
    weights: [B, S+1, T] soft selector weights (columns outside the intervention mask = [SELF]).
    basis [d, k], reflect [B, d] | None, mask [B, k] | [k] | None: the subspace used.
    source_index: [B, T] the hard selection (KEEP = -1) in argmax modes, else None.
    """

    logits: Tensor
    weights: Tensor
    basis: Optional[Tensor]
    reflect: Optional[Tensor]
    mask: Optional[Tensor]
    source_index: Optional[Tensor] = None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checkpoint(directory, state: Dict[str, Tensor], config: Dict[str, Any],
                     weights_name: str = WEIGHTS_NAME, config_name: str = CONFIG_NAME) -> Path:
    """Write ``state`` (safetensors) then ``config`` (JSON) into ``directory``, each atomically.

    The config records the weights' SHA-256, so a crash between the two renames (new
    weights beside an old config) is detected by ``read_checkpoint`` instead of loading
    mismatched files."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(prefix=".weights.", dir=directory)
    os.close(fd)
    save_file(state, tmp)
    config = {**config, "weights_sha256": _sha256(Path(tmp))}
    publish(tmp, directory / weights_name)
    fd, tmp = tempfile.mkstemp(prefix=".config.", dir=directory)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)
    publish(tmp, directory / config_name)
    return directory


def read_checkpoint(directory, kind: str = "HyperDAS", weights_name: str = WEIGHTS_NAME,
                    config_name: str = CONFIG_NAME):
    """(config dict, weights path) of a checkpoint folder; FileNotFoundError when a file is
    missing, ValueError when the config is corrupt or does not match the weights."""
    directory = Path(directory)
    cfg_path, w_path = directory / config_name, directory / weights_name
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(f"{directory} has no {kind} checkpoint ({config_name} and {weights_name})")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise ValueError(f"corrupt {kind} config {cfg_path}: {exc}") from exc
    expected = config.get("weights_sha256")
    if expected is not None and _sha256(w_path) != expected:
        raise ValueError(f"{kind} checkpoint {directory}: {weights_name} does not match {config_name} "
                         "(corrupt, or an interrupted save); save again")
    return config, w_path


def load_checkpoint_weights(w_path: Path, device, kind: str = "HyperDAS") -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(w_path), device=str(device))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"corrupt {kind} weights {w_path}: {exc}") from exc


def target_fingerprint(model: nn.Module) -> Dict[str, Any]:
    """Architecture facts plus a checksum of a slice of the input embedding, to recognise the target."""
    config = model.config
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    arch = {k: getattr(config, k, None) for k in keys}
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        rows = emb[: min(64, emb.shape[0])]
        checksum = float(rows.double().sum())
        # The same sum over the rows rounded to bfloat16: equal whether the target was loaded
        # in fp32, bf16 or fp16 (the plain sum moves by more than its tolerance in bf16).
        checksum_bf16 = float(rows.to(torch.bfloat16).double().sum())
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    return {"name": getattr(config, "_name_or_path", "") or "", **arch, "arch_digest": digest,
            "embedding_checksum": checksum, "embedding_checksum_bf16": checksum_bf16}


def loadable_name(model: nn.Module) -> str:
    """The name or path a Hugging Face model was loaded from; "" for one built in memory."""
    return getattr(getattr(model, "config", None), "_name_or_path", "") or ""


def target_to_load(config: Dict[str, Any], directory) -> Optional[str]:
    """What ``load`` loads when it gets no model: None for the embedded default, else the
    name or path recorded at save. ValueError for a checkpoint of a target built in memory:
    there is nothing to load it from (checkpoints from before ``target_class`` recorded the
    class name in its place, which from_pretrained would have looked up on the hub)."""
    from .default_model import DEFAULT_MODEL_NAME

    name = config.get("target_name") or ""
    if name == DEFAULT_MODEL_NAME:
        return None
    legacy_class = (name and "/" not in name and not os.path.exists(name)
                    and name.endswith(("ForCausalLM", "LMHeadModel")))
    if not name or legacy_class:
        cls_name = config.get("target_class") or name or "a model"
        raise ValueError(f"checkpoint {directory} was trained on a target built in memory ({cls_name}), with no "
                         f"name or path to load it from: pass the same model, load(..., model=...)")
    return name


def check_target(config: Dict[str, Any], model: nn.Module, directory) -> None:
    """ValueError unless ``model`` is the target the checkpoint in ``directory`` was trained
    on (architecture, and a checksum of part of its input embedding)."""
    saved, now = config["target"], target_fingerprint(model)
    here = loadable_name(model) or type(model).__name__
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if key in saved and saved.get(key) != now.get(key):
            raise ValueError(f"checkpoint {directory} was trained on a different target model: {key} is "
                             f"{saved.get(key)!r} there and {now.get(key)!r} here ({config.get('target_name')!r} vs {here!r})")
    # The same target loaded in fp32 or fp16 matches the plain checksum, in bf16 the bf16
    # one; a checkpoint from before the bf16 checksum, loaded in bf16, gets the rounding's
    # own error as slack.
    emb = model.get_input_embeddings().weight
    slack = 0.0
    if "embedding_checksum_bf16" not in saved and emb.dtype == torch.bfloat16:
        slack = float(emb[:64].double().abs().sum()) * torch.finfo(emb.dtype).eps
    pairs = [(saved[k], now[k]) for k in ("embedding_checksum", "embedding_checksum_bf16")
             if saved.get(k) is not None and now.get(k) is not None]
    if pairs and not any(abs(a - b) <= 1e-3 * max(1.0, abs(a)) + slack for a, b in pairs):
        raise ValueError(f"checkpoint {directory} was trained on a different target model: the embedding "
                         f"weights differ ({config.get('target_name')!r} vs {here!r})")


SELECTORS = ("rotary", "additive")
# What a checkpoint without a "selector" entry was trained with (saved before the option).
LEGACY_SELECTOR = "additive"
# The options of a HyperDAS checkpoint saved before they existed: what it was trained with.
LEGACY_OPTIONS = {"selector": LEGACY_SELECTOR, "hypernet_rotary": False, "hypernet_qk_norm": False}


def rotary_frequencies(target: nn.Module, adapter, head_dim: int) -> Optional[Tensor]:
    """The target's rotary frequencies [head_dim / 2] in float32 for the selector (its scaled
    variants, such as Llama 3's, included; see adapters.rope_parameters for why they are
    recomputed), or None (no rotary embeddings, as in GPT-2: the selector then uses theta =
    10000)."""
    inv_freq, _ = rope_parameters(adapter)
    if inv_freq is not None and inv_freq.numel() == head_dim // 2:
        return inv_freq
    # Another head size than the target's (an explicit head_dim): its theta, our head size.
    # transformers 5 keeps theta in config.rope_parameters, earlier versions in rope_theta.
    target_config = getattr(target, "config", None)
    theta = (getattr(target_config, "rope_parameters", None) or {}).get("rope_theta") \
        or getattr(target_config, "rope_theta", None)
    if isinstance(theta, (int, float)) and theta > 0:
        return float(theta) ** (-torch.arange(head_dim // 2, dtype=torch.float64) * 2 / head_dim)
    return None


class HyperDASModel(nn.Module):
    """Frozen target + hypernetwork + position selector + subspace module.

    Args:
        target: a Hugging Face causal LM (frozen here; kept outside this module's state_dict).
        layer: intervened layer L (0 < L < num_layers); the op patches the input of block L.
        feature_dim: subspace size k (<= hidden size).
        num_hypernet_layers: N hypernetwork blocks copied from the target's first N blocks.
        subspace: "reflect" (default), "mask", "das" or "boundless".
        reuse_prefix: run only blocks L..N-1 for the intervened run (False: recompute 0..L-1).
        init_from_target: initialise the hypernetwork from the target's weights.
        backend: op backend for ``ops.interchange`` ("auto", "torch", ...).
        selector: "rotary" (the original's rotary pair positions, the default) or "additive"
            (no rotary: what checkpoints saved before this option used); see models/selector.py.
        hypernet_rotary: rotary positions on the hypernetwork's cross-attention keys (tokens x
            layers), as in the original; off by default: it costs a projection of every key
            (see models/hypernetwork.py).
        hypernet_qk_norm: the cross-attention copies its block's query / key norms where the
            target has them (Qwen3); False leaves them out, as checkpoints saved before
            this option did. No effect on a target without them.
    """

    def __init__(self, target: nn.Module, layer: int = 15, feature_dim: int = 128, num_hypernet_layers: int = 2,
                 subspace: str = "reflect", reuse_prefix: bool = True, init_from_target: bool = True,
                 backend: str = "auto", selector: str = "rotary", hypernet_rotary: bool = False,
                 hypernet_qk_norm: bool = True):
        super().__init__()
        adapter = get_adapter(target)
        n = adapter.num_layers
        if not isinstance(layer, int) or not 0 < layer < n:
            raise ValueError(f"layer must be an integer with 0 < layer < num_layers = {n}, got {layer!r}")
        d = adapter.hidden_size
        if not isinstance(feature_dim, int) or not 1 <= feature_dim <= d:
            raise ValueError(f"feature_dim must be an integer in [1, hidden size = {d}], got {feature_dim!r}")
        if subspace not in SUBSPACES:
            raise ValueError(f"subspace must be one of {SUBSPACES}, got {subspace!r}")
        if selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
        for p in target.parameters():
            p.requires_grad_(False)
        target.eval()
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "adapter", adapter)
        self.layer, self.feature_dim, self.subspace_name = layer, feature_dim, subspace
        self.num_hypernet_layers = num_hypernet_layers
        self.reuse_prefix, self.backend = reuse_prefix, backend
        kw = dict(dtype=adapter.dtype, device=adapter.device)
        self.hypernet = HyperNetwork(adapter, num_hypernet_layers, init_from_target=init_from_target,
                                     rotary=hypernet_rotary, qk_norm=hypernet_qk_norm)
        self.selector_name = selector
        self.selector = PositionSelector(d, adapter.num_heads, rotary=selector == "rotary",
                                         inv_freq=rotary_frequencies(target, adapter, d // adapter.num_heads), **kw)
        self.subspace = make_subspace(subspace, d, feature_dim, **kw)

    # -- parameters --------------------------------------------------------------
    def trainable_parameters(self) -> List[nn.Parameter]:
        """All trainable parameters (the target model's are frozen and not included)."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, lr: float = 4e-5, basis_lr: float = 1e-3, weight_decay: float = 0.01) -> List[Dict[str, Any]]:
        """AdamW groups: everything at ``lr`` with ``weight_decay``; the orthogonal basis at
        ``basis_lr`` without weight decay."""
        basis_ids = {id(p) for p in self.subspace.basis_parameters()}
        rest = [p for p in self.trainable_parameters() if id(p) not in basis_ids]
        basis = [p for p in self.trainable_parameters() if id(p) in basis_ids]
        return [
            {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "main"},
            {"params": basis, "lr": basis_lr, "weight_decay": 0.0, "name": "basis"},
        ]

    # -- pipeline ----------------------------------------------------------------
    def _get(self, batch: Dict[str, Tensor], key: str, required: bool = True) -> Optional[Tensor]:
        value = batch.get(key)
        if value is None:
            if required:
                raise ValueError(f"batch is missing {key!r} (see hyperdas_fast.data.collate.HyperDASCollator)")
            return None
        return value.to(self.adapter.device)

    def encode(self, batch: Dict[str, Tensor], inference_mode: Optional[str] = None) -> Dict[str, Any]:
        """Steps 1-4 up to the patched layer-L stream: returns a dict with ``stream`` [B, T, d]
        (the intervened input of block L), ``weights``, ``basis``, ``reflect``, ``mask``,
        ``source_index`` and the base attention mask / position data for the remaining blocks."""
        mode = "default" if inference_mode is None else inference_mode
        if mode not in INFERENCE_MODES:
            raise ValueError(f"inference_mode must be one of {INFERENCE_MODES} or None, got {inference_mode!r}")
        ad, L = self.adapter, self.layer
        base_ids = self._get(batch, "base_input_ids")
        base_am = self._get(batch, "base_attention_mask")
        src_ids = self._get(batch, "source_input_ids")
        src_am = self._get(batch, "source_attention_mask")
        concept_ids = self._get(batch, "concept_input_ids")
        concept_am = self._get(batch, "concept_attention_mask")
        inter = self._get(batch, "base_intervention_mask", required=False)
        inter = base_am.bool() if inter is None else (inter.bool() & base_am.bool())
        check_right_padded({"base_attention_mask": base_am, "source_attention_mask": src_am,
                            "concept_attention_mask": concept_am})
        # The hypernetwork's base keys: the tokens that may be intervened on (the base prompt),
        # never the label tokens the collator appends (their states would tell it the answer;
        # the original code masks them too). A row with no such token keeps its prompt as
        # keys (an all-masked attention row would be NaN); nothing in it is intervened on.
        base_key_tokens = inter | (~inter.any(dim=1, keepdim=True) & base_am.bool())
        with torch.no_grad():
            mask4d, pos = ad.prepare(base_ids, base_am)
            emb = ad.embed(base_ids, pos)
            pos_emb = ad.position_embeddings(emb, pos)
            base_states = [emb]
            ad.run_blocks(emb, 0, ad.num_layers, base_am, pos, mask4d=mask4d, pos_emb=pos_emb, collect=base_states)
            src_states = ad.hidden_states(src_ids, src_am)
            # Keys = all layers as Hugging Face reports them (output_hidden_states: the last one
            # after the final norm), so a pipeline built on HF forwards sees the same keys.
            base_keys, base_key_mask = stack_layer_keys(base_states[:-1] + [ad.final_norm(base_states[-1])],
                                                        base_key_tokens)
            src_keys, src_key_mask = stack_layer_keys(src_states[:-1] + [ad.final_norm(src_states[-1])], src_am)
        base_L, src_L = base_states[L], src_states[L]
        del base_states, src_states
        hidden = self.hypernet(concept_ids, concept_am, base_keys, base_key_mask, src_keys, src_key_mask)
        last = concept_am.long().sum(dim=1).clamp_min(1) - 1
        query = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        weights = self.selector(query, base_L, src_L, inter, src_am.bool(), query_pos=last)
        basis, reflect, mask = self.subspace(query)
        source_index = None
        if not self.reuse_prefix:
            with torch.no_grad():
                base_L = ad.run_blocks(ad.embed(base_ids, pos), 0, L, base_am, pos, mask4d=mask4d, pos_emb=pos_emb)
        if mode == "default":
            stream = ops.interchange(base_L, src_L, weights, basis, reflect, mask, backend=self.backend)
        else:
            source_index = hard_source_index(
                weights, mode, inter, src_am.bool(),
                self._get(batch, "base_entity_pos", required=False),
                self._get(batch, "source_entity_pos", required=False),
            )
            grad = torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (basis, reflect, mask))
            stream = ops.interchange_hard(base_L.contiguous(), src_L, source_index, basis, reflect, mask,
                                          inplace=not grad, backend=self.backend)
        return {"stream": stream, "weights": weights, "basis": basis, "reflect": reflect, "mask": mask,
                "source_index": source_index, "base_attention_mask": base_am, "mask4d": mask4d,
                "position_ids": pos, "pos_emb": pos_emb}

    def forward(self, batch: Dict[str, Tensor], inference_mode: Optional[str] = None,
                logits_at: str = "all") -> HyperDASOutput:
        """Intervened forward of a collated batch (see HyperDASCollator).

        inference_mode: None / "default" (soft weights, differentiable), "column_argmax",
        "global_argmax", "bidding_argmax" or "groundtruth" (hard selection).
        logits_at: "all" -> logits [B, T, V]; "labels" -> packed [P, V] at labels != -100
        (skips the LM head elsewhere; what training needs).
        """
        if logits_at not in ("all", "labels"):
            raise ValueError(f"logits_at must be 'all' or 'labels', got {logits_at!r}")
        ad, L = self.adapter, self.layer
        enc = self.encode(batch, inference_mode)
        hidden = ad.run_blocks(enc["stream"], L, ad.num_layers, enc["base_attention_mask"], enc["position_ids"],
                               mask4d=enc["mask4d"], pos_emb=enc["pos_emb"])
        if logits_at == "labels":
            labels = self._get(batch, "labels")
            hidden = hidden[labels != IGNORE_INDEX]
        logits = ad.logits(hidden)
        return HyperDASOutput(logits, enc["weights"], enc["basis"], enc["reflect"], enc["mask"], enc["source_index"])


ModelLike = Union[None, str, os.PathLike, nn.Module]


class HyperDAS:
    """Public API: ``HyperDAS(model=None, layer=15, feature_dim=128, ...)``.

    ``model``: None (the embedded SmolLM2-135M-Instruct), a loaded Hugging Face causal LM,
    a local path or a hub name. Attributes: ``model`` (the ``HyperDASModel``), ``target``,
    ``tokenizer``, ``collator`` (``HyperDASCollator``), ``model_name``.
    """

    def __init__(self, model: ModelLike = None, layer: int = 15, feature_dim: int = 128,
                 num_hypernet_layers: int = 2, subspace: str = "reflect", dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[str, torch.device]] = None, tokenizer=None,
                 init_from_target: bool = True, reuse_prefix: bool = True, backend: str = "auto",
                 seed: Optional[int] = None, selector: str = "rotary", hypernet_rotary: bool = False,
                 hypernet_qk_norm: bool = True):
        """``seed``: the randomly initialised parts (selector, subspace module; the hypernetwork
        too with ``init_from_target=False``) are drawn from generators seeded with it, so the
        same seed gives the same initial weights in every process. None: torch's global RNG."""
        from .default_model import DEFAULT_MODEL_NAME, load_model

        if model is None or isinstance(model, (str, os.PathLike)):
            name = DEFAULT_MODEL_NAME if model is None else str(model)
            target, tok = load_model(None if model is None else str(model), dtype=dtype or torch.float32, device=device)
            tokenizer = tokenizer or tok
            self.target_name = name
        elif isinstance(model, nn.Module):
            target = model
            self.target_name = loadable_name(model)  # what save records for load to find it by
            name = self.target_name or type(model).__name__
            if dtype is not None or device is not None:
                target = target.to(device=device, dtype=dtype)
            if tokenizer is None:
                from transformers import AutoTokenizer

                try:
                    tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
                except Exception as exc:  # noqa: BLE001 - any failure means "pass it explicitly"
                    raise ValueError(f"could not load a tokenizer for {name!r}; pass tokenizer=...") from exc
        else:
            raise ValueError(f"model must be None, a path/hub name or a Hugging Face model, got {type(model).__name__}")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.target, self.tokenizer, self.model_name = target, tokenizer, name
        with seeded_init(seed, next(target.parameters()).device):
            self.model = HyperDASModel(target, layer=layer, feature_dim=feature_dim,
                                       num_hypernet_layers=num_hypernet_layers, subspace=subspace,
                                       reuse_prefix=reuse_prefix, init_from_target=init_from_target,
                                       backend=backend, selector=selector, hypernet_rotary=hypernet_rotary,
                                       hypernet_qk_norm=hypernet_qk_norm)
        self.collator = HyperDASCollator(tokenizer)
        # hypernet_qk_norm as it took effect: False for a target without such norms, so a
        # checkpoint of one resumes and loads the same with either setting
        self.config = {"layer": layer, "feature_dim": feature_dim, "num_hypernet_layers": num_hypernet_layers,
                       "subspace": subspace, "init_from_target": init_from_target, "selector": selector,
                       "hypernet_rotary": bool(hypernet_rotary), "hypernet_qk_norm": self.model.hypernet.qk_norm}

    @property
    def device(self) -> torch.device:
        return self.model.adapter.device

    # -- training ----------------------------------------------------------------
    def train(self, dataset_path=None, epochs: int = 1, batch_size: int = 16, **kwargs):
        """Train on a RAVEL-style dataset folder; delegates to ``hyperdas_fast.training.trainer.Trainer``."""
        from ..training.trainer import Trainer, TrainConfig

        return Trainer(self, TrainConfig(data_dir=dataset_path, epochs=epochs, batch_size=batch_size, **kwargs)).train()

    # -- inference ---------------------------------------------------------------
    @staticmethod
    def _as_lists(base_prompt, counterfactual_prompt, concept):
        single = isinstance(base_prompt, str)
        lists = [[x] if isinstance(x, str) else x for x in (base_prompt, counterfactual_prompt, concept)]
        names = ("base_prompt", "counterfactual_prompt", "concept")
        for name, value in zip(names, lists):
            if not isinstance(value, (list, tuple)) or len(value) == 0:
                raise ValueError(f"{name} must be a non-empty string or a non-empty list of strings")
            for item in value:
                if not isinstance(item, str) or not item.strip():
                    raise ValueError(f"{name} must contain non-empty strings, got {item!r}")
        if len({len(v) for v in lists}) != 1:
            raise ValueError(f"base_prompt, counterfactual_prompt and concept lists must have one length, got "
                             f"{[len(v) for v in lists]}")
        return single, lists

    def _batch(self, base, cf, concept, **extra):
        records = [{"base_prompt": b, "counterfactual_prompt": c, "concept": k, "label": "", "is_causal": True}
                   for b, c, k in zip(base, cf, concept)]
        return self.collator(records)

    @torch.no_grad()
    def intervene(self, base_prompt, counterfactual_prompt, concept, max_new_tokens: int = 8,
                  inference_mode: str = "default", use_cache: bool = True):
        """Greedy generation from the base prompt with the intervention applied at the prompt positions.

        Strings -> str; lists of equal length -> list[str]. The prompt's layer-L states are the
        intervened ones (computed once); generated tokens are not intervened. ``use_cache``
        decodes with a key/value cache (one prefill, then one token per step); False recomputes
        the whole sequence every step (slower, same tokens).
        """
        if inference_mode == "groundtruth":
            raise ValueError("inference_mode='groundtruth' needs entity positions; use HyperDASModel.forward with a collated batch")
        single, (base, cf, concept) = self._as_lists(base_prompt, counterfactual_prompt, concept)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            batch = self._batch(base, cf, concept)
            # the longest sequence decoding reaches, checked before any work (window, positions)
            model.adapter.check_length(batch["base_input_ids"].shape[1] + max_new_tokens - 1)
            patched = model.encode(batch, inference_mode)["stream"]  # [B, T, d]
            generate = self._generate_cached if use_cache else self._generate_recompute
            generated = generate(batch, patched, max_new_tokens)
            eos = self.tokenizer.eos_token_id
            cut = [g[: g.index(eos) + 1] if eos is not None and eos in g else g for g in generated]
            texts = [self.tokenizer.decode(g, skip_special_tokens=True) for g in cut]
        finally:
            model.train(was_training)
        return texts[0] if single else texts

    def _generate_cached(self, batch, patched: Tensor, max_new_tokens: int) -> List[List[int]]:
        from transformers import DynamicCache

        from .adapters import additive_mask

        ad, L = self.model.adapter, self.model.layer
        ids = batch["base_input_ids"].to(ad.device)
        am = batch["base_attention_mask"].to(ad.device)
        batch_size = ids.shape[0]
        rows = torch.arange(batch_size, device=ad.device)
        lengths = am.sum(1)
        cache = DynamicCache()
        mask4d, pos = ad.prepare(ids, am)
        hidden = ad.embed(ids, pos)
        pos_emb = ad.position_embeddings(hidden, pos)
        ad.run_blocks(hidden, 0, L, am, pos, mask4d=mask4d, pos_emb=pos_emb, cache=cache)
        hidden = ad.run_blocks(patched, L, ad.num_layers, am, pos, mask4d=mask4d, pos_emb=pos_emb, cache=cache)
        token = ad.logits(hidden[rows, lengths - 1]).argmax(-1)
        out = [token]
        for step in range(max_new_tokens - 1):
            am = torch.cat([am, torch.ones(batch_size, 1, dtype=am.dtype, device=am.device)], dim=1)
            ad.check_length(am.shape[1])
            pos = (lengths + step).unsqueeze(1)
            hidden = ad.embed(token.unsqueeze(1), pos)
            mask = additive_mask(am, 1, am.shape[1], hidden.dtype, hidden.device, causal=False)
            hidden = ad.run_blocks(hidden, 0, ad.num_layers, am, pos, mask4d=mask,
                                   pos_emb=ad.position_embeddings(hidden, pos), cache=cache)
            token = ad.logits(hidden[:, 0]).argmax(-1)
            out.append(token)
        return torch.stack(out, dim=1).tolist()

    def _generate_recompute(self, batch, patched: Tensor, max_new_tokens: int) -> List[List[int]]:
        ad, L = self.model.adapter, self.model.layer
        lengths = batch["base_attention_mask"].sum(1).tolist()
        prompts = [batch["base_input_ids"][i, : lengths[i]].tolist() for i in range(len(lengths))]
        generated: List[List[int]] = [[] for _ in prompts]
        for _ in range(max_new_tokens):
            seqs = [p + g for p, g in zip(prompts, generated)]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.collator.pad_id, dtype=torch.long)
            am = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
                am[i, : len(s)] = 1
            ids, am = ids.to(ad.device), am.to(ad.device)
            mask4d, pos = ad.prepare(ids, am)
            hidden = ad.embed(ids, pos)
            pos_emb = ad.position_embeddings(hidden, pos)
            hidden = ad.run_blocks(hidden, 0, L, am, pos, mask4d=mask4d, pos_emb=pos_emb)
            for i, n in enumerate(lengths):
                hidden[i, :n] = patched[i, :n]
            hidden = ad.run_blocks(hidden, L, ad.num_layers, am, pos, mask4d=mask4d, pos_emb=pos_emb)
            last = torch.tensor([len(s) - 1 for s in seqs], device=ad.device)
            nxt = ad.logits(hidden[torch.arange(len(seqs), device=ad.device), last]).argmax(-1).tolist()
            for i, tok in enumerate(nxt):
                generated[i].append(tok)
        return generated

    @torch.no_grad()
    def position_weights(self, base_prompt: str, counterfactual_prompt: str, concept: str):
        """(weights [S+1, T] numpy, source tokens + ["[SELF]"], base tokens) for one example
        (in eval mode, as ``intervene``: dropout would make two calls differ)."""
        _, (base, cf, concept) = self._as_lists(base_prompt, counterfactual_prompt, concept)
        batch = self._batch(base[:1], cf[:1], concept[:1])
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                enc = self.model.encode(batch)
        finally:
            self.model.train(was_training)
        weights = enc["weights"][0].float().cpu().numpy()
        conv = self.tokenizer.convert_ids_to_tokens
        src = conv(batch["source_input_ids"][0].tolist()) + ["[SELF]"]
        tgt = conv(batch["base_input_ids"][0].tolist())
        return weights, src, tgt

    def plot_positions(self, base_prompt: str, counterfactual_prompt: str, concept: str, path=None):
        """Heatmap of the selector weights (counterfactual tokens + [SELF] rows x base token columns)."""
        from ..evaluation.plots import plot_position_weights

        weights, src, tgt = self.position_weights(base_prompt, counterfactual_prompt, concept)
        return plot_position_weights(weights, src, tgt, path=path, title=f"concept: {concept}")

    # -- persistence ---------------------------------------------------------------
    def save(self, directory) -> Path:
        """Write ``hyperdas.safetensors`` (trainable weights) and ``hyperdas_config.json`` atomically."""
        config = {"format_version": FORMAT_VERSION, **self.config, "target_name": self.target_name,
                  "target_class": type(self.target).__name__, "target": target_fingerprint(self.target)}
        return write_checkpoint(directory, self.model.state_dict(), config)

    @classmethod
    def load(cls, directory, model: ModelLike = None, **kwargs) -> "HyperDAS":
        """Load a checkpoint written by ``save``; ``model`` None loads the target named in it.
        ValueError when the target model differs from the one it was trained on."""
        directory = Path(directory)
        config, w_path = read_checkpoint(directory, "HyperDAS")
        tokenizer = kwargs.pop("tokenizer", None)
        if model is None or isinstance(model, (str, os.PathLike)):
            from .default_model import load_model

            name = target_to_load(config, directory) if model is None else str(model)
            dtype = kwargs.pop("dtype", None) or torch.float32
            model, tok = load_model(name, dtype=dtype, device=kwargs.pop("device", None))
            tokenizer = tokenizer or tok
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be None, a path/hub name or a Hugging Face model, got {type(model).__name__}")
        check_target(config, model, directory)
        # init_from_target as saved: the weights are overwritten below either way, but the
        # loaded object's config (and a checkpoint saved from it) keeps saying how it began
        kwargs.setdefault("init_from_target", config.get("init_from_target", True))
        # the selector it was trained with (the weights fit either; the scores do not)
        kwargs.setdefault("selector", config.get("selector", LEGACY_SELECTOR))
        kwargs.setdefault("hypernet_rotary", config.get("hypernet_rotary", False))
        kwargs.setdefault("hypernet_qk_norm", config.get("hypernet_qk_norm", False))
        hd = cls(model, layer=config["layer"], feature_dim=config["feature_dim"],
                 num_hypernet_layers=config["num_hypernet_layers"], subspace=config["subspace"],
                 tokenizer=tokenizer, **kwargs)
        if config.get("target_name"):
            hd.model_name = hd.target_name = config["target_name"]
        hd.model.load_state_dict(load_checkpoint_weights(w_path, hd.device, "HyperDAS"), strict=True)
        return hd


__all__ = ["HyperDAS", "HyperDASModel", "HyperDASOutput", "SELECTORS", "check_target", "load_checkpoint_weights",
           "loadable_name", "read_checkpoint", "target_fingerprint", "target_to_load", "write_checkpoint"]
