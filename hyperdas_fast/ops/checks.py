"""Input guard for the interchange op: every mismatch is a ValueError that names the
argument and says what shape, dtype or device was expected."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _require_tensor(name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {value.layout}; "
                         f"call .to_dense() first")
    return value


def _require_same(name: str, t: Tensor, ref: Tensor, ref_name: str = "base") -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must be on one device"
        )
    if t.dtype != ref.dtype:
        raise ValueError(
            f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; all inputs must share one dtype"
        )


def check_subspace(
    base: Tensor,
    basis: Optional[Tensor],
    reflect: Optional[Tensor],
    mask: Optional[Tensor],
    batch: int,
) -> None:
    hidden = base.shape[-1]
    if basis is None:
        if reflect is not None or mask is not None:
            raise ValueError("reflect and mask need a basis [d, k]; got basis=None (vanilla interchange)")
        return
    basis = _require_tensor("basis", basis)
    _require_same("basis", basis, base)
    if basis.dim() != 2 or basis.shape[0] != hidden:
        raise ValueError(f"basis must be [d, k] = [{hidden}, k], got {_shape(basis)}")
    k = basis.shape[1]
    if not 1 <= k <= hidden:
        raise ValueError(f"basis must have 1 <= k <= d = {hidden} columns, got k = {k}")
    if reflect is not None:
        reflect = _require_tensor("reflect", reflect)
        _require_same("reflect", reflect, base)
        if tuple(reflect.shape) != (batch, hidden):
            raise ValueError(f"reflect must be [B, d] = [{batch}, {hidden}], got {_shape(reflect)}")
    if mask is not None:
        mask = _require_tensor("mask", mask)
        _require_same("mask", mask, base)
        if tuple(mask.shape) not in ((batch, k), (k,)):
            raise ValueError(f"mask must be [B, k] = [{batch}, {k}] or [k] = [{k}], got {_shape(mask)}")


def _check_states(base, source) -> Tuple[int, int, int, int]:
    base = _require_tensor("base", base)
    source = _require_tensor("source", source)
    if base.dtype not in FLOAT_DTYPES:
        raise ValueError(f"base must be a floating tensor (fp16, bf16, fp32, fp64), got {base.dtype}")
    if base.dim() != 3:
        raise ValueError(f"base must be [B, T, d], got {_shape(base)}")
    batch, tokens, hidden = base.shape
    if batch == 0:
        raise ValueError(f"base has an empty batch: {_shape(base)}; B must be >= 1")
    if tokens == 0 or hidden == 0:
        raise ValueError(f"base must have T >= 1 tokens and d >= 1, got {_shape(base)}")
    _require_same("source", source, base)
    if source.dim() != 3 or source.shape[0] != batch or source.shape[2] != hidden:
        raise ValueError(f"source must be [B, S, d] = [{batch}, S, {hidden}], got {_shape(source)}")
    if source.shape[1] == 0:
        raise ValueError(f"source must have S >= 1 tokens, got {_shape(source)}")
    return batch, tokens, source.shape[1], hidden


def check_soft(base, source, weights, basis, reflect, mask) -> None:
    batch, tokens, num_source, _ = _check_states(base, source)
    weights = _require_tensor("weights", weights)
    _require_same("weights", weights, base)
    if tuple(weights.shape) != (batch, num_source + 1, tokens):
        raise ValueError(
            f"weights must be [B, S+1, T] = [{batch}, {num_source + 1}, {tokens}] "
            f"(S source rows plus the [SELF] row), got {_shape(weights)}"
        )
    check_subspace(base, basis, reflect, mask, batch)


def check_rows(base, source, batch_index, base_pos, source_pos, basis, reflect, mask) -> None:
    batch, tokens, num_source, _ = _check_states(base, source)
    for name, idx, bound in (
        ("batch_index", batch_index, batch),
        ("base_pos", base_pos, tokens),
        ("source_pos", source_pos, num_source),
    ):
        idx = _require_tensor(name, idx)
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an integer tensor (int64), got {idx.dtype}")
        if idx.dim() != 1 or idx.shape[0] != batch_index.shape[0]:
            raise ValueError(f"{name} must be [P] like batch_index [{batch_index.shape[0]}], got {_shape(idx)}")
        if idx.device != base.device:
            raise ValueError(f"{name} is on {idx.device} but base is on {base.device}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= bound):
            raise ValueError(
                f"{name} has values in [{int(idx.min())}, {int(idx.max())}] but must lie in [0, {bound - 1}]"
            )
    if batch_index.numel():
        flat = batch_index.long() * tokens + base_pos.long()
        if torch.unique(flat).numel() != flat.numel():
            raise ValueError("(batch_index, base_pos) pairs must be unique: a base row can take one source row")
    check_subspace(base, basis, reflect, mask, batch)


def check_source_index(base, source, source_index) -> None:
    batch, tokens, num_source, _ = _check_states(base, source)
    source_index = _require_tensor("source_index", source_index)
    if source_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"source_index must be an integer tensor (int64), got {source_index.dtype}")
    if tuple(source_index.shape) != (batch, tokens):
        raise ValueError(f"source_index must be [B, T] = [{batch}, {tokens}], got {_shape(source_index)}")
    if source_index.device != base.device:
        raise ValueError(f"source_index is on {source_index.device} but base is on {base.device}")
    if source_index.numel() and (int(source_index.min()) < -1 or int(source_index.max()) >= num_source):
        raise ValueError(
            f"source_index values must lie in [-1, {num_source - 1}] (-1 = keep the base row), "
            f"got [{int(source_index.min())}, {int(source_index.max())}]"
        )
