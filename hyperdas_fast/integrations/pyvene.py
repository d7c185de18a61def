"""pyvene drop-in interventions computed with ``hyperdas_fast.ops``.

pyvene (https://github.com/stanfordnlp/pyvene) is an optional extra. Researchers who
already run DAS through it swap one import::

    import pyvene as pv
    from hyperdas_fast.integrations import pyvene as hfpv

    config = pv.IntervenableConfig(
        representations=[{"layer": 10, "component": "block_output", "unit": "pos",
                          "max_number_of_units": 1, "low_rank_dimension": 64}],
        intervention_types=hfpv.LowRankRotatedSpaceIntervention,  # was pv.LowRank...
    )
    intervenable = pv.IntervenableModel(config, model)   # or hfpv.IntervenableModel

The classes below are subclasses of pyvene's own (so every ``isinstance`` check in
pyvene, ``IntervenableModel.save``/``load`` and ``set_temperature`` treat them as the
originals) with the same constructor arguments, parameters and state-dict keys: a
state dict saved from ``pyvene.LowRankRotatedSpaceIntervention`` loads into ours with
``strict=True`` and back. Only ``forward`` differs. Every one of them is the aligned
patch of ``hyperdas_fast.ops``:

    out = base + R diag(m) R^T (source - base)        (at the gathered positions)

- ``VanillaIntervention``: no basis (out = source on the swapped coordinates).
- ``RotatedSpaceIntervention``: R = the first ``interchange_dim`` columns of the d x d
  rotation (pyvene rotates, swaps those coordinates and rotates back: the same map).
- ``LowRankRotatedSpaceIntervention``: R = the [d, k] low-rank rotation.
- ``BoundlessRotatedSpaceIntervention``: R = the d x d rotation, m = pyvene's sigmoid
  boundary mask.
- ``subspaces`` (per-example coordinate sets, with ``subspace_partition``) become a
  per-example mask m [B, k] on the rotated coordinates.

What is faster than pyvene's classes: the orthogonal parametrization of the rotation
(a Householder product or a matrix exponential plus a d x d matmul) is evaluated once
per forward instead of three times, and not at all while the weights are unchanged and
no gradient is needed (it is cached on the parameter versions); the patch is one
``ops.interchange_hard`` call (rows only, C++ kernel when built; the differentiable
PyTorch path when gradients are needed).

``IntervenableModel`` (optional, also a drop-in) is pyvene's ``IntervenableModel`` with
one change: the source forward stops as soon as every activation it must collect has
been collected (pyvene runs the whole source model, LM head included, and throws the
result away). Outputs are identical; it falls back to pyvene's behaviour for serial
mode, generation, stateful (recurrent) models and source representations passed in.

``das_interchange`` is the native path without pyvene at all (forward hooks on the HF
model, the source forward cut at the intervened layer, ``ops.interchange_hard`` in
place on the residual stream, logits only where asked).

Known transformers 5.x notes (pyvene 0.1.8 was written for transformers 4.x): for
Llama-family models the "block_output" component works unchanged (decoder layers now
return a tensor instead of a tuple; pyvene handles both). ``print(intervenable)`` fails
in pyvene 0.1.8 (``__str__`` reads a missing attribute), unrelated to transformers.
pyvene's IntervenableModel removes every forward hook registered on the wrapped model
at each call (its state cleanup), so hooks of your own on that model do not survive a
pyvene call; ``das_interchange`` registers and removes its hooks within each call.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import ops

try:  # pyvene prints a notice about nnsight on import; keep it quiet.
    with contextlib.redirect_stdout(io.StringIO()):
        import pyvene as _pv
    PYVENE_AVAILABLE = True
    PYVENE_IMPORT_ERROR: Optional[BaseException] = None
except Exception as error:  # ImportError, or pyvene failing against this transformers
    _pv = None
    PYVENE_AVAILABLE = False
    PYVENE_IMPORT_ERROR = error

INSTALL_HINT = (
    "install it with: python -m pip install --no-deps -r requirements-pyvene.txt (pyvene==0.1.8; "
    "--no-deps keeps torch/transformers: what pyvene imports is already installed)"
)


# ---------------------------------------------------------------------------------------
# Fallback bases: used only when pyvene is not importable, so the drop-in classes still
# work (standalone, same parameters and state-dict keys). They mirror pyvene 0.1.8's
# constructor semantics; they are not a copy of its code.
# ---------------------------------------------------------------------------------------


def _expand_partition(partition):
    if partition is None:
        return None
    expanded = []
    for part in partition:
        if len(part) == 2 and isinstance(part[0], int):
            expanded.append(list(range(part[0], part[1])))
        else:
            expanded.append(list(part))
    return expanded


class _FallbackIntervention(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.trainable = False
        self.is_source_constant = False
        self.keep_last_dim = kwargs.get("keep_last_dim", False)
        self.use_fast = kwargs.get("use_fast", False)
        self.subspace_partition = _expand_partition(kwargs.get("subspace_partition"))
        if kwargs.get("embed_dim") is not None:
            self.register_buffer("embed_dim", torch.tensor(kwargs["embed_dim"]))
            self.register_buffer("interchange_dim", torch.tensor(kwargs["embed_dim"]))
        else:
            self.embed_dim = None
            self.interchange_dim = None
        if kwargs.get("source_representation") is not None:
            self.is_source_constant = True
            self.register_buffer("source_representation", kwargs["source_representation"])
        else:
            self.source_representation = None

    def set_interchange_dim(self, interchange_dim):
        self.interchange_dim = (
            interchange_dim if isinstance(interchange_dim, Tensor) else torch.tensor(interchange_dim)
        )


class _FallbackTrainable(_FallbackIntervention):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.trainable = True
        self.is_source_constant = False


class _RotateLayer(nn.Module):
    """weight [n, m] with orthogonal columns; forward(x) = x @ weight (pyvene's layers)."""

    def __init__(self, n: int, m: Optional[int] = None):
        super().__init__()
        weight = torch.empty(n, n if m is None else m)
        nn.init.orthogonal_(weight)
        self.weight = nn.Parameter(weight, requires_grad=True)

    def forward(self, x):
        return torch.matmul(x.to(self.weight.dtype), self.weight)


def _embed_dim_int(kwargs) -> int:
    if kwargs.get("embed_dim") is None:
        raise ValueError("embed_dim must be the hidden size of the intervened representation (an int), got None")
    return int(kwargs["embed_dim"])


class _FallbackVanilla(_FallbackIntervention):
    is_repr_distributed = False


class _FallbackRotated(_FallbackTrainable):
    is_repr_distributed = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rotate_layer = nn.utils.parametrizations.orthogonal(_RotateLayer(_embed_dim_int(kwargs)))


class _FallbackLowRank(_FallbackTrainable):
    is_repr_distributed = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if kwargs.get("low_rank_dimension") is None:
            raise ValueError("low_rank_dimension must be given (the subspace size k, an int)")
        layer = _RotateLayer(_embed_dim_int(kwargs), int(kwargs["low_rank_dimension"]))
        self.rotate_layer = nn.utils.parametrizations.orthogonal(layer)


class _FallbackBoundless(_FallbackTrainable):
    is_repr_distributed = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        dim = _embed_dim_int(kwargs)
        self.rotate_layer = nn.utils.parametrizations.orthogonal(_RotateLayer(dim))
        self.intervention_boundaries = nn.Parameter(torch.tensor([0.5]), requires_grad=True)
        self.temperature = nn.Parameter(torch.tensor(50.0))
        self.intervention_population = nn.Parameter(torch.arange(0, dim), requires_grad=False)

    def get_boundary_parameters(self):
        return self.intervention_boundaries

    def get_temperature(self):
        return self.temperature

    def set_temperature(self, temp: Tensor):
        self.temperature.data = temp

    def set_intervention_boundaries(self, intervention_boundaries):
        self.intervention_boundaries = nn.Parameter(torch.tensor([intervention_boundaries]), requires_grad=True)


if PYVENE_AVAILABLE:
    _VanillaBase = _pv.VanillaIntervention
    _RotatedBase = _pv.RotatedSpaceIntervention
    _LowRankBase = _pv.LowRankRotatedSpaceIntervention
    _BoundlessBase = _pv.BoundlessRotatedSpaceIntervention
else:
    _VanillaBase = _FallbackVanilla
    _RotatedBase = _FallbackRotated
    _LowRankBase = _FallbackLowRank
    _BoundlessBase = _FallbackBoundless


# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------


def _sigmoid_boundary(population: Tensor, low: float, high: Tensor, temperature: Tensor) -> Tensor:
    return torch.sigmoid((population - low) / temperature) * torch.sigmoid((high - population) / temperature)


def _match_source(base: Tensor, source: Tensor) -> Tensor:
    if not isinstance(base, Tensor) or not isinstance(source, Tensor):
        raise ValueError(
            f"base and source must be tensors, got {type(base).__name__} and {type(source).__name__}"
        )
    if source.shape != base.shape:
        try:
            source = source.expand(base.shape)
        except RuntimeError:
            raise ValueError(
                f"source with shape {list(source.shape)} cannot be broadcast to base {list(base.shape)}"
            ) from None
    return source


def _subspace_indices(subspaces, partition, batch: int) -> List[List[int]]:
    """pyvene's ``subspaces`` argument -> one list of coordinate indices per example."""
    if isinstance(subspaces, Tensor):
        subspaces = subspaces.tolist()
    subspaces = list(subspaces)
    if len(subspaces) == 1 and batch > 1:
        subspaces = subspaces * batch
    if len(subspaces) != batch:
        raise ValueError(f"subspaces must give one index list per example ({batch}), got {len(subspaces)}")
    rows = []
    for entry in subspaces:
        entry = [entry] if isinstance(entry, int) else list(entry)
        if partition is None:
            rows.append([int(i) for i in entry])
        else:
            idx: List[int] = []
            for part in entry:
                idx.extend(partition[int(part)])
            rows.append(idx)
    return rows


def _subspace_mask(subspaces, partition, batch: int, k: int, dtype, device) -> Tensor:
    rows = _subspace_indices(subspaces, partition, batch)
    mask = torch.zeros(batch, k, dtype=dtype, device=device)
    for b, idx in enumerate(rows):
        if idx:
            if max(idx) >= k or min(idx) < -k:
                raise ValueError(f"subspace indices must lie in [0, {k - 1}], got {idx}")
            mask[b, idx] = 1
    return mask


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def aligned_patch(
    base: Tensor, source: Tensor, basis: Optional[Tensor], mask: Optional[Tensor] = None
) -> Tensor:
    """out = base + R diag(m) R^T (source - base) for base/source [B, ..., d] (row-aligned).

    The patch is ``ops.interchange_hard`` with each base row taking the source row at the
    same place (source_index = arange), so with ``basis=None`` out = source. Runs in the
    basis dtype (pyvene casts to the weight dtype) and returns base's dtype. Differentiable
    (the op uses its PyTorch path when gradients are needed).
    """
    source = _match_source(base, source)
    out_dtype = base.dtype
    dtype = basis.dtype if basis is not None else base.dtype
    shape = base.shape
    batch = shape[0] if base.dim() >= 2 else 1
    hidden = shape[-1]
    x = base.to(dtype).reshape(batch, -1, hidden)
    y = source.to(dtype).reshape(batch, -1, hidden)
    tokens = x.shape[1]
    index = torch.arange(tokens, device=x.device).expand(batch, tokens)
    if mask is not None:
        mask = mask.to(dtype)  # [k] or [B, k]: one gate per example, shared by its rows
    out = ops.interchange_hard(x, y, index, basis=basis, mask=mask)
    return out.reshape(shape).to(out_dtype)


class _CachedRotation:
    """Mixin: the parametrized rotation evaluated once per call, and cached while its
    parameters are unchanged and no gradient is needed.

    Unchanged means equal values, not only the same storage and version counter: a write
    through ``.data`` (``p.data -= lr * g``, weight editing, an EMA) bumps no version, and a
    cache keyed on versions alone kept serving the old rotation. Comparing against a copy
    reads the parameters once per call, far less than evaluating the parametrization."""

    def _rotation(self) -> Tensor:
        layer = self.rotate_layer
        original = layer.parametrizations.weight.original
        if _needs_grad(original):
            return layer.weight
        tensors = [original] + list(layer.parametrizations.weight.buffers())
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for t in tensors)
        cached = self.__dict__.get("_hdf_rotation_cache")
        if cached is not None and cached[0] == key and all(torch.equal(t, c) for t, c in zip(tensors, cached[1])):
            return cached[2]
        with torch.no_grad():
            weight = layer.weight.detach()
        self.__dict__["_hdf_rotation_cache"] = (key, [t.detach().clone() for t in tensors], weight)
        return weight


# ---------------------------------------------------------------------------------------
# The drop-in classes
# ---------------------------------------------------------------------------------------


class VanillaIntervention(_VanillaBase):
    """pyvene's VanillaIntervention: swap the first ``interchange_dim`` coordinates (or
    the ``subspaces`` coordinates) of base for source's. Unlike pyvene's, ``base`` is not
    modified in place."""

    def forward(self, base, source, subspaces=None, **kwargs):
        if getattr(self, "source_representation", None) is not None:
            source = self.source_representation
        source = _match_source(base, source)
        hidden = base.shape[-1]
        dim = self.interchange_dim
        dim = hidden if dim is None else int(dim)
        if subspaces is None and dim >= hidden:
            return aligned_patch(base, source, None)
        if subspaces is None:
            keep = torch.zeros(hidden, dtype=torch.bool, device=base.device)
            keep[:dim] = True
            return torch.where(keep, source, base)
        batch = base.shape[0]
        mask = _subspace_mask(subspaces, self.subspace_partition, batch, hidden, torch.bool, base.device)
        mask = mask.view(batch, *([1] * (base.dim() - 2)), hidden)
        return torch.where(mask, source, base)

    def __str__(self):
        return "VanillaIntervention(hyperdas_fast)"


class RotatedSpaceIntervention(_CachedRotation, _RotatedBase):
    """pyvene's RotatedSpaceIntervention (full d x d rotation, swap the first
    ``interchange_dim`` rotated coordinates or the ``subspaces`` ones)."""

    def forward(self, base, source, subspaces=None, **kwargs):
        rotation = self._rotation()
        hidden = rotation.shape[0]
        if subspaces is not None:
            mask = _subspace_mask(subspaces, self.subspace_partition, base.shape[0], hidden,
                                  rotation.dtype, rotation.device)
            return aligned_patch(base, source, rotation, mask)
        dim = self.interchange_dim
        dim = hidden if dim is None else min(int(dim), hidden)
        return aligned_patch(base, source, rotation[:, :dim])

    def __str__(self):
        return "RotatedSpaceIntervention(hyperdas_fast)"


class LowRankRotatedSpaceIntervention(_CachedRotation, _LowRankBase):
    """pyvene's LowRankRotatedSpaceIntervention: out = base + R R^T (source - base) with
    R = rotate_layer.weight [d, k] (or the ``subspaces`` columns of it per example)."""

    def forward(self, base, source, subspaces=None, **kwargs):
        rotation = self._rotation()
        mask = None
        if subspaces is not None:
            mask = _subspace_mask(subspaces, self.subspace_partition, base.shape[0], rotation.shape[1],
                                  rotation.dtype, rotation.device)
        return aligned_patch(base, source, rotation, mask)

    def __str__(self):
        return "LowRankRotatedSpaceIntervention(hyperdas_fast)"


class BoundlessRotatedSpaceIntervention(_CachedRotation, _BoundlessBase):
    """pyvene's BoundlessRotatedSpaceIntervention: out = base + R diag(m) R^T (source - base),
    m the sigmoid boundary mask over the d rotated coordinates."""

    def boundary_mask(self) -> Tensor:
        dim = int(self.embed_dim) if self.embed_dim is not None else self.intervention_population.numel()
        boundary = torch.clamp(self.intervention_boundaries, 1e-3, 1)
        return _sigmoid_boundary(self.intervention_population, 0.0, boundary[0] * dim, self.temperature)

    def forward(self, base, source, subspaces=None, **kwargs):
        rotation = self._rotation()
        mask = self.boundary_mask().to(rotation.dtype)
        return aligned_patch(base, source, rotation, mask)

    def __str__(self):
        return "BoundlessRotatedSpaceIntervention(hyperdas_fast)"


DROP_IN_CLASSES = {
    "VanillaIntervention": VanillaIntervention,
    "RotatedSpaceIntervention": RotatedSpaceIntervention,
    "LowRankRotatedSpaceIntervention": LowRankRotatedSpaceIntervention,
    "BoundlessRotatedSpaceIntervention": BoundlessRotatedSpaceIntervention,
}


def convert(intervention: nn.Module) -> nn.Module:
    """A pyvene intervention -> the drop-in of the same kind with the same state (a new
    module; the original is untouched). Other kinds are returned unchanged."""
    name = type(intervention).__name__
    target = DROP_IN_CLASSES.get(name)
    if target is None or isinstance(intervention, target):
        return intervention
    new = target.__new__(target)
    nn.Module.__init__(new)
    new.__dict__.update({k: v for k, v in intervention.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")})
    new._parameters = dict(intervention._parameters)
    new._buffers = dict(intervention._buffers)
    new._modules = dict(intervention._modules)
    return new


# ---------------------------------------------------------------------------------------
# Drop-in IntervenableModel: the source forward stops once its activations are collected
# ---------------------------------------------------------------------------------------


class _SourceCollected(Exception):
    """Raised by a forward hook to end a source forward early (caught below)."""


if PYVENE_AVAILABLE:

    class _StopCatcher(nn.Module):
        def __init__(self, model: nn.Module):
            super().__init__()
            object.__setattr__(self, "_wrapped", model)

        def forward(self, *args, **kwargs):
            try:
                return self._wrapped(*args, **kwargs)
            except _SourceCollected:
                return None

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(object.__getattribute__(self, "_wrapped"), name)

    class IntervenableModel(_pv.IntervenableModel):
        """pyvene's IntervenableModel whose source forwards stop as soon as every getter
        of the current forward has collected its activation. Same constructor, forward,
        save and load; same outputs."""

        def __init__(self, config, model, **kwargs):
            super().__init__(config, model, **kwargs)
            self._hdf_pending: Optional[set] = None

        def _hdf_can_stop(self) -> bool:
            return (
                self.mode == "parallel"
                and self.is_model_stateless
                and not self._is_generation
                and not self.as_adaptor
            )

        def _intervention_getter(self, keys, unit_locations):
            handlers = super()._intervention_getter(keys, unit_locations)
            if self._hdf_pending is None:
                return handlers
            self._hdf_pending.update(keys)
            pending = self._hdf_pending

            def stop_hook(module, args, kwargs, output=None):
                if all(key in self.activations for key in pending):
                    raise _SourceCollected()

            for key in keys:
                handlers.handlers.append(self.intervention_hooks[key](stop_hook, with_kwargs=True))
            return handlers

        def _wait_for_forward_with_parallel_intervention(self, sources, unit_locations,
                                                         activations_sources=None, *args, **kwargs):
            if activations_sources is not None or not self._hdf_can_stop():
                return super()._wait_for_forward_with_parallel_intervention(
                    sources, unit_locations, activations_sources, *args, **kwargs)
            model = self.model
            self._modules["model"] = _StopCatcher(model)
            self._hdf_pending = set()
            try:
                return super()._wait_for_forward_with_parallel_intervention(
                    sources, unit_locations, activations_sources, *args, **kwargs)
            finally:
                self._modules["model"] = model
                self._hdf_pending = None

else:  # pragma: no cover - exercised only without pyvene

    class IntervenableModel:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise ImportError(f"hyperdas_fast.integrations.pyvene.IntervenableModel needs pyvene: {INSTALL_HINT}"
                              f" (import error: {PYVENE_IMPORT_ERROR})")


# ---------------------------------------------------------------------------------------
# Native path: no pyvene
# ---------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (Llama family, GPT-2, GPT-NeoX)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "layers", "h"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"model must be a Hugging Face decoder-only LM with decoder blocks; cannot find them in {type(model).__name__}")


def _hidden_of(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _positions(name: str, value, batch: int, device) -> Tensor:
    t = torch.as_tensor(value, device=device).long()
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must give one position per example: [B] = [{batch}], got {list(t.shape)}")
    return t


def length_groups(lengths: Sequence[int], overhead_tokens: int = 48) -> List[List[int]]:
    """Split rows into groups of similar length so that padding costs little.

    Rows are sorted by length and cut where it pays: the total cost, sum over groups of
    (rows x longest row + ``overhead_tokens`` per extra forward call), is minimised
    exactly (dynamic programming over the sorted order, O(B^2)). Returns row indices.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    if n == 0:
        return []
    best = [0.0] + [math.inf] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            cost = best[i] + (j - i) * longest + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def _select_rows(inputs: Dict[str, Tensor], rows: Tensor, width: int) -> Dict[str, Tensor]:
    return {k: (v[rows, :width] if isinstance(v, Tensor) and v.dim() == 2 else v) for k, v in inputs.items()}


@torch.no_grad()
def das_interchange(
    model: nn.Module,
    base_inputs: Dict[str, Tensor],
    source_inputs: Dict[str, Tensor],
    base_positions,
    source_positions,
    layer: int,
    basis: Optional[Tensor],
    mask: Optional[Tensor] = None,
    logits_at: str = "last",
    regroup: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Native DAS interchange at the output of block ``layer`` (pyvene's "block_output").

    Runs the source prompts (each up to its intervened token: later tokens cannot affect
    it in a causal model) through blocks 0..layer only and keeps the source rows, then the
    base prompts with a forward hook that patches, in place on the residual stream, base
    token ``base_positions[b]`` with that source row in the subspace ``basis`` [d, k]
    (None = the whole vector): ``ops.interchange_hard(..., inplace=True)``.

    With ``regroup=True`` (default) the rows of each pass are regrouped by real length
    (``length_groups``), so right padding costs almost nothing; results are the same per
    example (up to float rounding of differently shaped matmuls).

    Args:
        base_inputs / source_inputs: tokenizer outputs (input_ids, attention_mask), right padded.
        logits_at: "last" -> logits [B, vocab] at each example's last real token only;
            "all" -> [B, T, vocab] (implies regroup=False).
    Returns the logits described (inference only: no gradients).
    """
    if logits_at not in ("last", "all"):
        raise ValueError(f"logits_at must be 'last' or 'all', got {logits_at!r}")
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer must lie in [0, {len(layers) - 1}], got {layer}")
    block = layers[layer]
    batch = base_inputs["input_ids"].shape[0]
    device = base_inputs["input_ids"].device
    if source_inputs["input_ids"].shape[0] != batch:
        raise ValueError(
            f"source_inputs must have the base batch size {batch}, got {source_inputs['input_ids'].shape[0]}"
        )
    for name, inputs in (("base_inputs", base_inputs), ("source_inputs", source_inputs)):
        # The passes cut rows at their real length and read "last" at length - 1: with left
        # padding they would silently read padding (set tokenizer.padding_side = "right").
        attn = inputs.get("attention_mask")
        if attn is None or attn.dim() != 2:
            continue
        padding_first = (attn[:, 1:] > attn[:, :-1]).any(1)
        if bool(padding_first.any()):
            raise ValueError(f"{name} must be right padded (tokenizer.padding_side = 'right'); row "
                             f"{int(padding_first.nonzero()[0])} of its attention_mask has padding before tokens")
    bpos = _positions("base_positions", base_positions, batch, device)
    spos = _positions("source_positions", source_positions, batch, device)
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or head is None:
        body, logits_at = model, "all"
    regroup = regroup and logits_at == "last"

    # 1) source rows at the intervened layer: [B, d]
    captured: Dict[str, Tensor] = {}

    def grab(module, args, output):
        captured["h"] = _hidden_of(output)
        raise _SourceCollected()

    need = (spos + 1).tolist()
    groups = length_groups(need) if regroup else [list(range(batch))]
    source_rows: Optional[Tensor] = None
    handle = block.register_forward_hook(grab)
    try:
        for group in groups:
            rows = torch.tensor(group, device=device)
            width = max(need[i] for i in group)
            try:
                body(**_select_rows(source_inputs, rows, width), use_cache=False)
            except _SourceCollected:
                pass
            h = captured.pop("h")
            picked = h[torch.arange(len(group), device=device), spos[rows]]
            if source_rows is None:
                source_rows = picked.new_empty(batch, picked.shape[-1])
            source_rows[rows] = picked
    finally:
        handle.remove()
    if basis is not None:
        basis = basis.to(source_rows.dtype)
    if mask is not None:
        mask = mask.to(source_rows.dtype)

    # 2) the base pass with the patch at block ``layer``
    current: Dict[str, Tensor] = {}

    def patch(module, args, output):
        hidden = _hidden_of(output)
        rows = current["rows"]
        index = torch.full(hidden.shape[:2], ops.KEEP, dtype=torch.long, device=hidden.device)
        index[torch.arange(rows.numel(), device=hidden.device), bpos[rows]] = 0
        src = source_rows[rows].unsqueeze(1)
        row_mask = mask[rows] if (mask is not None and mask.dim() == 2) else mask
        if not hidden.is_contiguous():
            hidden = ops.interchange_hard(hidden.contiguous(), src, index, basis=basis, mask=row_mask,
                                          inplace=True, backend=backend)
            return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden
        ops.interchange_hard(hidden, src, index, basis=basis, mask=row_mask, inplace=True, backend=backend)
        return output

    attention = base_inputs.get("attention_mask")
    if attention is None:
        lengths = [base_inputs["input_ids"].shape[1]] * batch
    else:
        lengths = attention.long().sum(dim=1).tolist()
    handle = block.register_forward_hook(patch)
    try:
        if logits_at == "all":
            current["rows"] = torch.arange(batch, device=device)
            return model(**base_inputs, use_cache=False).logits
        groups = length_groups(lengths) if regroup else [list(range(batch))]
        out: Optional[Tensor] = None
        for group in groups:
            rows = torch.tensor(group, device=device)
            current["rows"] = rows
            width = max(lengths[i] for i in group)
            hidden = body(**_select_rows(base_inputs, rows, width), use_cache=False).last_hidden_state
            last = torch.tensor([lengths[i] - 1 for i in group], device=device)
            logits = head(hidden[torch.arange(len(group), device=device), last])
            if out is None:
                out = logits.new_empty(batch, logits.shape[-1])
            out[rows] = logits
        return out
    finally:
        handle.remove()


__all__ = [
    "PYVENE_AVAILABLE",
    "INSTALL_HINT",
    "VanillaIntervention",
    "RotatedSpaceIntervention",
    "LowRankRotatedSpaceIntervention",
    "BoundlessRotatedSpaceIntervention",
    "IntervenableModel",
    "DROP_IN_CLASSES",
    "aligned_patch",
    "convert",
    "das_interchange",
    "decoder_layers",
    "length_groups",
]
