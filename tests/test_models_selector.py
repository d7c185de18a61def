"""Position selector: the factored scores against the original's formulation built literally
(the [B, S, T, 2d] pair tensor, a flattened key list, rotary embeddings applied with
Hugging Face's own apply_rotary_pos_emb at cumsum(mask) * mask positions)."""
import pytest
import torch

from hyperdas_fast.models.selector import PositionSelector, hard_source_index, selector_weights_reference


def original_weights(sel: PositionSelector, query, base, source, base_mask, source_mask, query_pos):
    """The selector's weights the way the original code computes them, in float64."""
    sel = sel.double()
    return selector_weights_reference(sel, query.double(), base.double(), source.double(), base_mask, source_mask,
                                      query_pos).double()


def make_case(B, T, S, d, heads, seed=0, padded=True):
    g = torch.Generator().manual_seed(seed)
    sel = PositionSelector(d, heads)
    with torch.no_grad():
        for p in sel.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0))
    query, base, source = (torch.randn(B, d, generator=g), torch.randn(B, T, d, generator=g),
                           torch.randn(B, S, d, generator=g))
    base_mask = torch.ones(B, T, dtype=torch.bool)
    source_mask = torch.ones(B, S, dtype=torch.bool)
    if padded and B > 1:
        base_mask[1, T - 2:] = False  # padding / label tokens at the end
        source_mask[1, S - 1:] = False
        if B > 2:
            base_mask[2, 0] = False  # a hole: positions count valid tokens only
            source_mask[2, 1] = False
    query_pos = torch.randint(0, 9, (B,), generator=g)
    return sel, (query, base, source, base_mask, source_mask, query_pos)


@pytest.mark.parametrize("B, T, S, d, heads", [(1, 1, 1, 8, 1), (3, 5, 4, 16, 2), (3, 7, 6, 24, 3), (2, 9, 3, 32, 4)])
def test_rotary_scores_match_the_original_formulation(B, T, S, d, heads):
    sel, args = make_case(B, T, S, d, heads)
    got = sel.double()(*[a.double() if a.is_floating_point() else a for a in args])
    # float64 scores; the selector's softmax runs in float32 whatever the input dtype
    torch.testing.assert_close(got, original_weights(sel, *args), rtol=1e-6, atol=1e-7)


def test_rotary_scores_in_float32_and_with_gradients():
    sel, args = make_case(3, 7, 6, 24, 3)
    sel = sel.float()
    query = args[0].clone().requires_grad_()
    got = sel(query, *args[1:])
    ref = original_weights(sel, *args)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    got[:, :-1].sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all() and query.grad.abs().sum() > 0


def test_rotary_lets_base_columns_prefer_different_source_tokens():
    """What the rotary version is for: without it every column's argmax over the source
    rows is the same token; with it, columns differ (here, on random weights)."""
    sel, (query, base, source, base_mask, source_mask, query_pos) = make_case(4, 12, 10, 32, 4, padded=False)
    rotary = sel(query, base, source, base_mask, source_mask, query_pos)[:, :-1].argmax(1)  # [B, T]
    sel.rotary = False
    additive = sel(query, base, source, base_mask, source_mask, query_pos)[:, :-1].argmax(1)
    assert all(len(set(row.tolist())) == 1 for row in additive)
    assert any(len(set(row.tolist())) > 1 for row in rotary)
    # and so column_argmax reaches more than one source token per example
    picked = hard_source_index(sel.float()(query, base, source, base_mask, source_mask, query_pos), "column_argmax")
    assert picked.shape == (4, 12)


def test_inv_freq_is_checked_and_taken_from_the_caller():
    with pytest.raises(ValueError, match="even head_dim"):
        PositionSelector(9, 3)
    with pytest.raises(ValueError, match="inv_freq must have head_dim / 2 = 4 entries"):
        PositionSelector(16, 2, inv_freq=torch.ones(3))
    sel = PositionSelector(16, 2, inv_freq=torch.arange(4.0))
    assert torch.equal(sel.inv_freq, torch.arange(4.0))
    assert "inv_freq" not in sel.state_dict()  # derived from the target, not a weight
    assert PositionSelector(9, 3, rotary=False).rotary is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inv_freq_stays_float32_when_the_module_is_cast(dtype):
    """Module.to(dtype) casts floating buffers: bf16 frequencies would be off by up to 0.4 %,
    whole radians at positions of a few hundred."""
    sel = PositionSelector(64, 4, inv_freq=500000.0 ** (-torch.arange(8, dtype=torch.float64) / 8))
    expected = sel.inv_freq.clone()
    for cast in (lambda m: m.to(dtype), lambda m: m.to(dtype).float(), lambda m: m.half(), lambda m: m.bfloat16()):
        cast(sel)
        assert sel.inv_freq.dtype == torch.float32 and torch.equal(sel.inv_freq, expected)
    assert sel.q_proj.weight.dtype == torch.bfloat16  # the weights were cast


def test_frequencies_come_from_the_target_config_in_float32():
    """rotary_frequencies recomputes the target's frequencies (Llama 3 scaling included)
    rather than copying its inv_freq buffer, which a bf16 cast of the target has rounded;
    with another head size it takes the target's theta from config.rope_parameters
    (transformers 5) rather than silently using 10000."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from hyperdas_fast.models.adapters import get_adapter
    from hyperdas_fast.models.hyperdas import rotary_frequencies

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                                         rope_scaling=scaling, max_position_embeddings=256))
    exact = rotary_frequencies(llama, get_adapter(llama), 16)
    assert torch.equal(exact, llama.model.rotary_emb.inv_freq.float())
    llama.to(torch.bfloat16)
    assert llama.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    assert torch.equal(rotary_frequencies(llama, get_adapter(llama), 16), exact)
    qwen = Qwen3ForCausalLM(Qwen3Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6))
    theta_1e6 = 1e6 ** (-torch.arange(8, dtype=torch.float64) / 8)
    torch.testing.assert_close(rotary_frequencies(qwen, get_adapter(qwen), 16), theta_1e6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_scores_on_cuda(dtype):
    """The factored rotary scores on CUDA, in the model's dtype, against the original's
    formulation in float64 on the CPU; tolerance from the same-dtype literal version's own
    error on CUDA."""
    sel, args = make_case(3, 17, 13, 64, 4)
    ref = original_weights(sel, *args)
    cuda_args = [a.to("cuda", dtype) if a.is_floating_point() else a.to("cuda") for a in args]
    sel_cuda = PositionSelector(64, 4).to("cuda")
    sel_cuda.load_state_dict(sel.state_dict())
    sel_cuda.to(dtype)
    assert sel_cuda.inv_freq.dtype == torch.float32
    got = sel_cuda(*cuda_args).double().cpu()
    same_dtype = selector_weights_reference(sel_cuda, *cuda_args).double().cpu()
    assert (got - ref).abs().max() <= 2 * (same_dtype - ref).abs().max() + 1e-6
