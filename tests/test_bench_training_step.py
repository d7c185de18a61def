"""The training-step benchmark's "original pipeline" (benchmarks/bench_training_step.py)
must compute what HyperDASModel computes, or its time and memory ratios compare different
things: selector weights and logits agree, for both selectors, on a tiny random Llama."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_training_step  # noqa: E402

from hyperdas_fast.data import ravel  # noqa: E402
from hyperdas_fast.data.collate import HyperDASCollator  # noqa: E402
from hyperdas_fast.models.hyperdas import HyperDASModel  # noqa: E402


@pytest.mark.parametrize("selector,family", [("rotary", "llama"), ("additive", "llama"), ("rotary", "qwen3")])
def test_original_pipeline_computes_what_ours_does(selector, family, ravel_dir):
    """(qwen3: q/k norms, which our cross-attention copies; the original pipeline applies them too)"""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from hyperdas_fast.models.default_model import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    tok.pad_token = tok.pad_token or tok.eos_token
    torch.manual_seed(0)
    config, causal_lm = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen3Config, Qwen3ForCausalLM)
    cfg = config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, head_dim=16)
    records = ravel.to_records(ravel.load_rows("city", "continent", "test", ravel_dir)[:4], tok)
    batch = HyperDASCollator(tok)(records)
    model = HyperDASModel(causal_lm(cfg).eval(), layer=1, feature_dim=8, num_hypernet_layers=1,
                          selector=selector)
    assert model.hypernet.qk_norm == (family == "qwen3")
    with torch.no_grad():
        ours = model(batch)
        logits, weights = bench_training_step.original_forward(model, batch)
    torch.testing.assert_close(weights, ours.weights, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits, ours.logits, rtol=1e-4, atol=1e-4)
    # and the same loss, sparsity penalty included (its reduction once differed); the
    # selection mass of a source row exceeds 1 only after training, so test it with weights
    # scaled up
    from hyperdas_fast.training.losses import hyperdas_loss

    heavy = weights * torch.tensor([3.0] * (weights.shape[1] - 1) + [1.0]).view(1, -1, 1)
    labels = batch["labels"]
    ours_loss, _ = hyperdas_loss(ours.logits, labels, batch["is_causal"], heavy, sparsity_coef=0.5)
    original = bench_training_step.original_loss(logits, labels, batch["is_causal"], heavy, 0.5)
    assert torch.relu(heavy[:, :-1].sum(-1) - 1).sum() > 0
    torch.testing.assert_close(original, ours_loss, rtol=1e-5, atol=1e-5)
