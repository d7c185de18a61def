"""Atomic safetensors training checkpoints and resume.

One file per checkpoint, ``<dir>/ckpt-<step:08d>.safetensors``, holding

- ``model/<name>``: the model's trainable parameters and buffers (frozen weights are not saved);
- ``optim/<index>/<key>``: the optimizer's tensor state (AdamW moments and steps);
- ``rng/torch`` (and ``rng/cuda/<i>``): the torch generator states;
- metadata ``state`` (JSON): step, epoch, position in the epoch, the epoch's data order
  seed, optimizer param groups, scheduler state, Python and NumPy RNG states, the run
  config; ``checksum``: SHA-256 over all tensor bytes (detects corruption the
  safetensors header cannot).

Files are written to a temporary name in the same folder and renamed into place, so a
crash never leaves a half-written checkpoint under a real name. Loading a damaged file
raises ``CheckpointError`` (a ValueError) naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..atomic import publish

FORMAT = "hyperdas_fast.trainer/1"
_NAME = re.compile(r"^ckpt-(\d{8})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (corrupt, truncated, or not a checkpoint)."""


def checkpoint_path(directory, step: int) -> Path:
    return Path(directory) / f"ckpt-{step:08d}.safetensors"


def list_checkpoints(directory) -> List[Tuple[int, Path]]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        m = _NAME.match(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


# Temporary files a killed save leaves behind: ours (mkstemp) and safetensors' own, which
# save_file writes first and renames onto ours (".tmp" and six random characters).
_TEMP_NAME = re.compile(r"^(\.ckpt-.*\.tmp|\.tmp[A-Za-z0-9]{6})$")


def remove_stale_temp_files(directory) -> List[Path]:
    """Delete the temporary files of checkpoint saves that were killed mid-write (each as
    large as a checkpoint); returns their paths. Call only when no save is running."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for entry in directory.iterdir():
            if _TEMP_NAME.match(entry.name) and entry.is_file():
                try:
                    entry.unlink()
                    removed.append(entry)
                except OSError:
                    pass
    return removed


def set_aside(path, reason: str) -> Path:
    """Rename a checkpoint out of the ``ckpt-*.safetensors`` pattern (to ``<name>.<reason>``)
    so that resume and pruning no longer see it; nothing is deleted."""
    path = Path(path)
    target = path.with_name(f"{path.name}.{reason}")
    os.replace(path, target)
    return target


def _checksum(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rng_state() -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    py = random.getstate()
    npst = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }
    return tensors, meta


def set_rng_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"].to(torch.uint8).cpu())
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k].to(torch.uint8).cpu() for k in cuda]
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])
    if meta.get("python"):
        v, state, gauss = meta["python"]
        random.setstate((v, tuple(state), gauss))
    if meta.get("numpy"):
        name, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _optimizer_tensors(optimizer: torch.optim.Optimizer):
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim/{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def model_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's trainable parameters and its buffers (e.g. the base of an orthogonal
    parametrization), without frozen parameters (the target model's weights)."""
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    return {name: t for name, t in model.state_dict(keep_vars=True).items() if id(t) not in frozen}


def save_checkpoint(
    directory,
    step: int,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler=None,
    trainer_state: Optional[Dict[str, Any]] = None,
    keep: Optional[int] = 2,
) -> Path:
    """Write ``ckpt-<step>.safetensors`` atomically; keep the newest ``keep`` checkpoints up
    to ``step`` (a later one, from a run this one resumed before, is never pruned in favour
    of it: the trainer sets those aside when it resumes)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: Dict[str, torch.Tensor] = {
        f"model/{name}": t.detach().cpu().contiguous().clone() for name, t in model_state(model).items()
    }
    meta: Dict[str, Any] = {"step": int(step), "trainer": trainer_state or {}}
    if optimizer is not None:
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        tensors.update(opt_tensors)
        meta["optimizer"] = opt_meta
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    rng_tensors, rng_meta = rng_state()
    tensors.update(rng_tensors)
    meta["rng"] = rng_meta
    metadata = {"format": FORMAT, "state": json.dumps(meta), "checksum": _checksum(tensors)}
    target = checkpoint_path(directory, step)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        publish(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if keep is not None and keep > 0:
        upto = [(s, p) for s, p in list_checkpoints(directory) if s <= step]
        for _, old in upto[:-keep]:
            try:
                old.unlink()
            except OSError:
                pass
    return target


def read_checkpoint(path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(tensors, state) of a checkpoint file; CheckpointError when it is damaged."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file: {exc}") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a hyperdas_fast training checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r})")
    if metadata.get("checksum") != _checksum(tensors):
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum does not match its contents")
    try:
        state = json.loads(metadata["state"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: unreadable state metadata ({exc})") from exc
    return tensors, state


def read_state(path) -> Dict[str, Any]:
    """The state metadata of a checkpoint (step, trainer state, run config) without reading
    its tensors: enough to decide whether to resume from it before anything is restored."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return json.loads(metadata["state"])
    except Exception as exc:  # noqa: BLE001  (unreadable header or state)
        raise CheckpointError(f"checkpoint {path} has no readable state: {exc}") from exc


def latest_checkpoint(directory) -> Optional[Path]:
    """The newest readable checkpoint in ``directory`` (damaged ones are skipped with a warning)."""
    for _, path in reversed(list_checkpoints(directory)):
        try:
            read_checkpoint(path)
            return path
        except CheckpointError as exc:
            warnings.warn(f"skipping damaged checkpoint: {exc}")
    return None


def load_checkpoint(
    path,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler=None,
    restore_rng: bool = True,
) -> Dict[str, Any]:
    """Restore model params (and optimizer, scheduler, RNG) from ``path``; returns the
    saved state dict (``step``, ``trainer``)."""
    tensors, state = read_checkpoint(path)
    params = model_state(model)
    expected = set(params)
    saved = {k[len("model/"):] for k in tensors if k.startswith("model/")}
    if saved != expected:
        missing, extra = sorted(expected - saved)[:5], sorted(saved - expected)[:5]
        raise CheckpointError(f"checkpoint {path} does not match this model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name in saved:
            src = tensors[f"model/{name}"]
            if src.shape != params[name].shape:
                raise CheckpointError(f"checkpoint {path}: {name} has shape {list(src.shape)}, model has {list(params[name].shape)}")
            params[name].copy_(src.to(params[name].device, params[name].dtype))
    if optimizer is not None and "optimizer" in state:
        opt_meta = state["optimizer"]
        opt_state: Dict[int, Dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, idx, name = key.split("/", 2)
                opt_state.setdefault(int(idx), {})[name] = value
        for idx, scalars in opt_meta.get("scalars", {}).items():
            opt_state.setdefault(int(idx), {}).update(scalars)
        optimizer.load_state_dict({"state": opt_state, "param_groups": opt_meta["param_groups"]})
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(tensors, state.get("rng", {}))
    return state


__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "read_checkpoint", "latest_checkpoint",
           "list_checkpoints", "checkpoint_path", "read_state", "remove_stale_temp_files", "set_aside"]
