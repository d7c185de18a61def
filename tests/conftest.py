import os

import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present.
# This must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, fp32, CPU, eval mode.

    Loaded once per test session (converted from the package's GGUF on first use and
    cached as safetensors). Tests must not modify its weights.
    """
    from hyperdas_fast.models.default_model import load_model

    torch.manual_seed(0)
    return load_model()


@pytest.fixture(scope="session")
def ravel_dir():
    """The RAVEL data folder (../shared/ravel by default; HYPERDAS_FAST_RAVEL_DIR overrides)."""
    from pathlib import Path

    path = Path(os.environ.get("HYPERDAS_FAST_RAVEL_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "ravel"))
    if not path.is_dir():
        pytest.fail(f"RAVEL data not found at {path}; set HYPERDAS_FAST_RAVEL_DIR")
    return path.resolve()
