"""The MDAS baseline (RAVEL): one learned low-rank orthogonal subspace per domain.

At layer L the base prompt's entity token (its last token, ``base_entity_pos``) takes the
subspace component of the counterfactual entity's last token (``source_entity_pos``):

    out[b, t*] = base[b, t*] + R R^T (source[b, s*] - base[b, t*]),   R [d, k] orthonormal

and blocks L..N-1 run on the patched stream. This is the op's hard form
(``ops.interchange_hard``, differentiable in the basis on the ``torch`` path), with the
groundtruth positions. Trained on all attributes of a domain with the HyperDAS loss.

``MDASModel.forward`` has HyperDASModel's interface (batch from ``HyperDASCollator`` ->
output with ``logits`` and one-hot ``weights`` [B, S+1, T]), so the trainer and the
evaluator treat both alike. Every inference mode gives the groundtruth positions.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..data.collate import IGNORE_INDEX, HyperDASCollator
from .adapters import get_adapter
from .hyperdas import check_right_padded, seeded_init
from .selector import INFERENCE_MODES, one_hot_weights
from .subspace import OrthogonalBasis

CONFIG_NAME = "mdas_config.json"
WEIGHTS_NAME = "mdas.safetensors"
FORMAT_VERSION = 1


@dataclass
class MDASOutput:
    logits: Tensor
    weights: Tensor
    basis: Tensor
    reflect: Optional[Tensor] = None
    mask: Optional[Tensor] = None
    source_index: Optional[Tensor] = None


class MDASModel(nn.Module):
    """Frozen target + one orthogonal basis [d, k] applied at the entity's last token."""

    supported_inference_modes = ("groundtruth",)

    def __init__(self, target: nn.Module, layer: int = 15, feature_dim: int = 128, backend: str = "auto"):
        super().__init__()
        adapter = get_adapter(target)
        n, d = adapter.num_layers, adapter.hidden_size
        if not isinstance(layer, int) or not 0 < layer < n:
            raise ValueError(f"layer must be an integer with 0 < layer < num_layers = {n}, got {layer!r}")
        if not isinstance(feature_dim, int) or not 1 <= feature_dim <= d:
            raise ValueError(f"feature_dim must be an integer in [1, hidden size = {d}], got {feature_dim!r}")
        for p in target.parameters():
            p.requires_grad_(False)
        target.eval()
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "adapter", adapter)
        self.layer, self.feature_dim, self.backend = layer, feature_dim, backend
        self.basis = OrthogonalBasis(d, feature_dim, dtype=adapter.dtype, device=adapter.device)

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, lr: float = 4e-5, basis_lr: float = 1e-3, weight_decay: float = 0.01) -> List[Dict[str, Any]]:
        """One group: the basis at ``basis_lr`` without weight decay."""
        return [{"params": self.trainable_parameters(), "lr": basis_lr, "weight_decay": 0.0, "name": "basis"}]

    def _get(self, batch, key):
        value = batch.get(key)
        if value is None:
            raise ValueError(f"batch is missing {key!r} (see hyperdas_fast.data.collate.HyperDASCollator)")
        return value.to(self.adapter.device)

    def forward(self, batch: Dict[str, Tensor], inference_mode: Optional[str] = None, logits_at: str = "all") -> MDASOutput:
        if inference_mode is not None and inference_mode not in INFERENCE_MODES:
            raise ValueError(f"inference_mode must be one of {INFERENCE_MODES} or None, got {inference_mode!r}")
        if logits_at not in ("all", "labels"):
            raise ValueError(f"logits_at must be 'all' or 'labels', got {logits_at!r}")
        ad, L = self.adapter, self.layer
        base_ids, base_am = self._get(batch, "base_input_ids"), self._get(batch, "base_attention_mask")
        src_ids, src_am = self._get(batch, "source_input_ids"), self._get(batch, "source_attention_mask")
        # positions (and entity positions) count from column 0
        check_right_padded({"base_attention_mask": base_am, "source_attention_mask": src_am})
        bpos, spos = self._get(batch, "base_entity_pos").long(), self._get(batch, "source_entity_pos").long()
        B, T = base_ids.shape
        S = src_ids.shape[1]
        with torch.no_grad():
            src_L = ad.hidden_states(src_ids, src_am, end=L)[L]
            mask4d, pos = ad.prepare(base_ids, base_am)
            emb = ad.embed(base_ids, pos)
            pos_emb = ad.position_embeddings(emb, pos)
            base_L = ad.run_blocks(emb, 0, L, base_am, pos, mask4d=mask4d, pos_emb=pos_emb)
        ok = (bpos >= 0) & (bpos < T) & (spos >= 0) & (spos < S)
        source_index = torch.full((B, T), ops.KEEP, dtype=torch.long, device=base_ids.device)
        rows = torch.arange(B, device=base_ids.device)[ok]
        source_index[rows, bpos[ok]] = spos[ok]
        basis = self.basis()
        grad = torch.is_grad_enabled() and basis.requires_grad
        stream = ops.interchange_hard(base_L.contiguous(), src_L, source_index, basis, None, None,
                                      inplace=not grad, backend=self.backend)
        hidden = ad.run_blocks(stream, L, ad.num_layers, base_am, pos, mask4d=mask4d, pos_emb=pos_emb)
        if logits_at == "labels":
            hidden = hidden[self._get(batch, "labels") != IGNORE_INDEX]
        logits = ad.logits(hidden)
        weights = one_hot_weights(source_index, S, dtype=logits.dtype)
        return MDASOutput(logits, weights, basis, None, None, source_index)


ModelLike = Union[None, str, os.PathLike, nn.Module]


class MDAS:
    """Public wrapper mirroring ``HyperDAS``: ``.model`` (MDASModel), ``.target``,
    ``.tokenizer``, ``.collator``, ``.config``, ``.model_name``; ``save`` / ``load``."""

    method = "mdas"

    def __init__(self, model: ModelLike = None, layer: int = 15, feature_dim: int = 128, tokenizer=None,
                 dtype: Optional[torch.dtype] = None, device=None, backend: str = "auto",
                 seed: Optional[int] = None, **_ignored):
        """``seed``: the basis is initialised from generators seeded with it (same seed, same
        initial basis in every process). None: torch's global RNG."""
        from .default_model import DEFAULT_MODEL_NAME, load_model

        from .hyperdas import loadable_name

        if model is None or isinstance(model, (str, os.PathLike)):
            name = DEFAULT_MODEL_NAME if model is None else str(model)
            target, tok = load_model(None if model is None else str(model), dtype=dtype or torch.float32, device=device)
            tokenizer = tokenizer or tok
            self.target_name = name
        elif isinstance(model, nn.Module):
            target = model
            self.target_name = loadable_name(model)  # what save records for load to find it by
            name = self.target_name or type(model).__name__
            if dtype is not None or device is not None:  # as HyperDAS does
                target = target.to(device=device, dtype=dtype)
            if tokenizer is None:
                raise ValueError("pass tokenizer=... with a loaded model")
        else:
            raise ValueError(f"model must be None, a path/hub name or a Hugging Face model, got {type(model).__name__}")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.target, self.tokenizer, self.model_name = target, tokenizer, name
        with seeded_init(seed, next(target.parameters()).device):
            self.model = MDASModel(target, layer=layer, feature_dim=feature_dim, backend=backend)
        self.collator = HyperDASCollator(tokenizer)
        self.config = {"layer": layer, "feature_dim": feature_dim}

    @property
    def device(self) -> torch.device:
        return self.model.adapter.device

    def train(self, dataset_path=None, epochs: int = 1, batch_size: int = 16, **kwargs):
        from ..training.trainer import TrainConfig, Trainer

        return Trainer(self, TrainConfig(data_dir=dataset_path, epochs=epochs, batch_size=batch_size, **kwargs)).train()

    def save(self, directory) -> Path:
        from .hyperdas import target_fingerprint, write_checkpoint

        config = {"format_version": FORMAT_VERSION, "method": "mdas", **self.config, "target_name": self.target_name,
                  "target_class": type(self.target).__name__, "target": target_fingerprint(self.target)}
        return write_checkpoint(directory, self.model.state_dict(), config, WEIGHTS_NAME, CONFIG_NAME)

    @classmethod
    def load(cls, directory, model: ModelLike = None, **kwargs) -> "MDAS":
        from .hyperdas import check_target, load_checkpoint_weights, read_checkpoint, target_to_load

        directory = Path(directory)
        config, w_path = read_checkpoint(directory, "MDAS", WEIGHTS_NAME, CONFIG_NAME)
        if model is None:
            model = target_to_load(config, directory)
        mdas = cls(model, layer=config["layer"], feature_dim=config["feature_dim"], **kwargs)
        # the same check as HyperDAS.load: architecture and an embedding checksum
        check_target(config, mdas.target, directory)
        if config.get("target_name"):
            mdas.model_name = mdas.target_name = config["target_name"]
        mdas.model.load_state_dict(load_checkpoint_weights(w_path, mdas.device, "MDAS"), strict=True)
        return mdas


__all__ = ["MDAS", "MDASModel", "MDASOutput"]
