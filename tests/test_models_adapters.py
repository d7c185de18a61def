"""Adapters (Llama family, GPT-2), the collator, the loss and the plot."""
import pytest
import torch

from hyperdas_fast.data.collate import HyperDASCollator
from hyperdas_fast.models.adapters import get_adapter
from hyperdas_fast.models.hyperdas import HyperDASModel
from hyperdas_fast.training.losses import hyperdas_loss, sparsity_penalty, sparsity_schedule


def tiny(kind):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=100, num_hidden_layers=4)
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_head=4, n_layer=4, vocab_size=100, n_positions=64)).eval()
    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[kind]
    cfg = cfg_cls(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **common)
    return model_cls(cfg).eval()


def toy_batch(batch=3, seq=7, src=6, concept=3, vocab=100):
    g = torch.Generator().manual_seed(0)
    am = torch.ones(batch, seq, dtype=torch.long)
    am[0, -2:] = 0
    sam = torch.ones(batch, src, dtype=torch.long)
    sam[1, -1] = 0
    labels = torch.full((batch, seq), -100)
    labels[:, 3] = torch.randint(0, vocab, (batch,), generator=g)
    inter = am.bool().clone()
    inter[:, 4:] = False
    return {
        "base_input_ids": torch.randint(0, vocab, (batch, seq), generator=g), "base_attention_mask": am,
        "base_intervention_mask": inter, "labels": labels,
        "source_input_ids": torch.randint(0, vocab, (batch, src), generator=g), "source_attention_mask": sam,
        "concept_input_ids": torch.randint(0, vocab, (batch, concept), generator=g),
        "concept_attention_mask": torch.ones(batch, concept, dtype=torch.long),
        "is_causal": torch.tensor([True, False, True][:batch]),
        "base_entity_pos": torch.tensor([1, 2, 0][:batch]), "source_entity_pos": torch.tensor([2, 1, -1][:batch]),
    }


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gpt2"])
def test_adapter_reproduces_hf_forward(kind):
    model = tiny(kind)
    ad = get_adapter(model)
    assert ad.num_layers == 4 and ad.hidden_size == 32
    b = toy_batch()
    ids, am = b["base_input_ids"], b["base_attention_mask"]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, output_hidden_states=True)
        states = ad.hidden_states(ids, am)
        # split run: blocks [0, 2) then [2, 4)
        mid = ad.run_blocks(ad.embed(ids), 0, 2, am)
        out = ad.logits(ad.run_blocks(mid, 2, 4, am))
    real = am.bool()
    for l in range(4):  # HF's last entry is after the final norm
        assert torch.allclose(states[l][real], ref.hidden_states[l][real], atol=1e-5), l
    assert torch.allclose(out[real], ref.logits[real], atol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
@pytest.mark.parametrize("subspace", ["reflect", "boundless"])
def test_hyperdas_model_on_other_families(kind, subspace):
    model = tiny(kind)
    hd = HyperDASModel(model, layer=2, feature_dim=8, num_hypernet_layers=2, subspace=subspace)
    b = toy_batch()
    out = hd(b, logits_at="labels")
    loss, parts = hyperdas_loss(out.logits, b["labels"], b["is_causal"], out.weights, sparsity_coef=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in hd.trainable_parameters()]
    assert all(g is not None for g in grads[:5])
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    for mode in ("column_argmax", "global_argmax", "bidding_argmax", "groundtruth"):
        with torch.no_grad():
            o = hd(b, inference_mode=mode)
        assert o.logits.shape == (3, 7, 100) and o.source_index.shape == (3, 7)
    gt = hd(b, inference_mode="groundtruth").source_index
    assert gt[0, 1] == 2 and gt[1, 2] == 1 and torch.all(gt[2] == -1)


def test_unknown_model_type():
    from transformers import BertConfig, BertModel

    with pytest.raises(ValueError, match="unsupported model type 'bert'.*gpt2"):
        get_adapter(BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32)))
    with pytest.raises(ValueError, match="unsupported model type"):
        get_adapter(torch.nn.Linear(2, 2))


def test_llama_layouts_it_does_not_compute_are_refused():
    """Models with the Llama module layout whose forward does more than the adapter re-runs
    (Granite's multipliers, Phi-3's fused projections) gave silently different logits or an
    AttributeError; sliding-window attention is exact only up to the window."""
    import transformers as tf

    small = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                 num_hidden_layers=2)
    with pytest.raises(ValueError, match="unsupported model type 'granite': it has embedding_multiplier"):
        get_adapter(tf.GraniteForCausalLM(tf.GraniteConfig(embedding_multiplier=12.0, **small)))
    with pytest.raises(ValueError, match="unsupported model type 'phi3': it has fused attention projections"):
        get_adapter(tf.Phi3ForCausalLM(tf.Phi3Config(pad_token_id=0, **small)))
    adapter = get_adapter(tf.MistralForCausalLM(tf.MistralConfig(sliding_window=4, **small)).eval())
    adapter.prepare(torch.zeros(1, 4, dtype=torch.long), None)
    with pytest.raises(ValueError, match="5 tokens exceed mistral's sliding attention window of 4"):
        adapter.prepare(torch.zeros(1, 5, dtype=torch.long), None)
    assert get_adapter(tf.Qwen2ForCausalLM(tf.Qwen2Config(sliding_window=4, **small))).sliding_window is None
    # Qwen2 with the window switched on for no layer (max_window_layers >= its layers): full attention
    # everywhere, so longer inputs are exact, and were refused
    qwen = tf.Qwen2Config(sliding_window=4, use_sliding_window=True, max_window_layers=2, **small)
    assert set(qwen.layer_types) == {"full_attention"}
    assert get_adapter(tf.Qwen2ForCausalLM(qwen).eval()).sliding_window is None


@pytest.mark.parametrize("case", ["glm4", "afmoe", "gpt_oss", "stablelm_parallel", "mellum"])
def test_llama_layout_models_that_would_fail_or_differ_are_refused(case):
    """Models with the Llama module layout outside the tested list: extra block norms (GLM-4,
    AFMoE) had silently given other hidden states, scaled embeddings (AFMoE's mup) other
    logits, and an MoE MLP returning a tuple (gpt-oss), a block without its second norm
    (StableLM's parallel residual) or a rotary embedding with other arguments (Mellum) an
    obscure TypeError mid-forward. Now a clear ValueError names the model type and why."""
    import transformers as tf

    kw = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=2, head_dim=16, pad_token_id=0)
    config_cls, model_cls, extra, why = {
        "glm4": (tf.Glm4Config, tf.Glm4ForCausalLM, {}, "blocks with post_mlp_layernorm"),
        "afmoe": (tf.AfmoeConfig, tf.AfmoeForCausalLM, dict(mup_enabled=True), "mup_enabled"),
        "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM, {}, "a probe forward failed"),
        "stablelm_parallel": (tf.StableLmConfig, tf.StableLmForCausalLM, dict(use_parallel_residual=True),
                              "blocks without post_attention_layernorm"),
        "mellum": (tf.MellumConfig, tf.MellumForCausalLM, {}, "a probe forward failed"),
    }[case]
    torch.manual_seed(0)
    model = model_cls(config_cls(**kw, **extra)).eval()
    with pytest.raises(ValueError, match=f"unsupported model type '{model.config.model_type}': .*{why}"):
        get_adapter(model)


def test_llama_layout_models_that_match_are_accepted_after_a_probe():
    """Outside the tested list, a Llama-layout model whose probe forward matches the model's
    own (Qwen3: its q/k norms live inside the attention module) is accepted, and runs."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.Qwen3ForCausalLM(tf.Qwen3Config(vocab_size=100, hidden_size=64, intermediate_size=128,
                                               num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                               head_dim=16)).eval()
    ad = get_adapter(model)
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(ad.logits(ad.hidden_states(ids, None)[-1]), model(ids).logits)


def test_gpt2_needs_its_head_and_stays_within_its_positions():
    import transformers as tf

    config = tf.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=100, n_positions=16)
    with pytest.raises(ValueError, match="'gpt2' \\(GPT2Model\\) must be a causal LM with .transformer and .lm_head"):
        get_adapter(tf.GPT2Model(config))
    model = tf.GPT2LMHeadModel(config).eval()
    adapter = get_adapter(model)
    adapter.prepare(torch.zeros(1, 16, dtype=torch.long), None)
    with pytest.raises(ValueError, match="17 tokens exceed gpt2's 16 learned positions"):
        adapter.prepare(torch.zeros(1, 17, dtype=torch.long), None)
    # intervene checks the longest sequence its decoding reaches before any work (an
    # IndexError in the position table, mid-generation, before)
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(100)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0", pad_token="w1", eos_token="w2")
    from hyperdas_fast import HyperDAS

    hd = HyperDAS(model, tokenizer=tok, layer=1, feature_dim=4, num_hypernet_layers=1)
    prompt = " ".join(f"w{3 + i % 7}" for i in range(12))
    room = 16 - len(tok(prompt)["input_ids"]) + 1  # new tokens that keep the sequence within 16
    hd.intervene(prompt, prompt, "w5", max_new_tokens=room)
    with pytest.raises(ValueError, match="17 tokens exceed gpt2's 16 learned positions"):
        hd.intervene(prompt, prompt, "w5", max_new_tokens=room + 1)


def test_parameter_groups_split_basis():
    hd = HyperDASModel(tiny("llama"), layer=2, feature_dim=8, num_hypernet_layers=1)
    groups = hd.parameter_groups(lr=1e-4, basis_lr=1e-3, weight_decay=0.1)
    basis = {id(p) for p in hd.subspace.basis.parameters()}
    assert {id(p) for p in groups[1]["params"]} == basis and groups[1]["weight_decay"] == 0.0
    assert not basis & {id(p) for p in groups[0]["params"]}
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in hd.trainable_parameters())
    assert not any(p.requires_grad for p in hd.target.parameters())


def test_hard_modes():
    from hyperdas_fast.models.selector import hard_source_index

    # B=1, S=2 (+SELF), T=3
    w = torch.tensor([[[0.6, 0.1, 0.5], [0.3, 0.2, 0.1], [0.1, 0.7, 0.4]]])
    assert hard_source_index(w, "column_argmax").tolist() == [[0, -1, 0]]
    assert hard_source_index(w, "global_argmax").tolist() == [[0, -1, -1]]
    # source 0 bids for column 0 (0.6), source 1 for column 0 too (0.3): column 0 takes source 0
    assert hard_source_index(w, "bidding_argmax").tolist() == [[0, -1, -1]]
    # as in the original code, [SELF] counts as at least 0.1 (BIDDING_THRESHOLD) and a tie goes
    # to the bidder: 0.08 beats [SELF] 0.05 but not the threshold; 0.1 ties it and wins
    weak = torch.tensor([[[0.08, 0.0], [0.0, 0.1], [0.05, 0.05]]])
    assert hard_source_index(weak, "bidding_argmax").tolist() == [[-1, 1]]
    tie = torch.tensor([[[0.3, 0.0], [0.0, 0.2], [0.3, 0.5]]])
    assert hard_source_index(tie, "bidding_argmax").tolist() == [[0, -1]]
    mask = torch.tensor([[False, True, True]])
    assert hard_source_index(w, "column_argmax", base_mask=mask).tolist() == [[-1, -1, 0]]
    with pytest.raises(ValueError, match="inference_mode"):
        hard_source_index(w, "nope")


def test_collator_alignment(smollm2):
    _, tok = smollm2
    col = HyperDASCollator(tok)
    recs = [
        {"base_prompt": "city: Vienna, country:", "counterfactual_prompt": "city: Paris, country:",
         "concept": "country", "label": "Austria", "is_causal": True, "base_prefix": "city: Vienna",
         "counterfactual_prefix": "city: Paris"},
        {"base_prompt": 'x: "', "counterfactual_prompt": "y", "concept": "c", "label": "France",
         "is_causal": False, "base_entity_pos": 0},
    ]
    b = col(recs)
    n0 = len(tok("city: Vienna, country:")["input_ids"])
    lab = tok(" Austria", add_special_tokens=False)["input_ids"]
    assert b["base_input_ids"][0, n0:n0 + len(lab)].tolist() == lab
    assert b["labels"][0, n0 - 1:n0 - 1 + len(lab)].tolist() == lab
    assert (b["labels"][0] != -100).sum() == len(lab)
    assert b["base_intervention_mask"][0].tolist() == [True] * n0 + [False] * (b["base_input_ids"].shape[1] - n0)
    lab1 = tok("France", add_special_tokens=False)["input_ids"]  # no space after a quote
    n1 = len(tok('x: "')["input_ids"])
    assert b["base_input_ids"][1, n1:n1 + len(lab1)].tolist() == lab1
    assert b["is_causal"].tolist() == [True, False]
    assert b["base_entity_pos"].tolist() == [len(tok("city: Vienna")["input_ids"]) - 1, 0]
    assert b["source_entity_pos"].tolist()[1] == -1
    inf = col([{**recs[0], "label": ""}])
    assert (inf["labels"] == -100).all() and inf["base_intervention_mask"].all()
    with pytest.raises(ValueError, match="base_prompt"):
        col([{**recs[0], "base_prompt": ""}])


def test_loss_parts_and_schedule():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 10, requires_grad=True)
    labels = torch.full((2, 4), -100)
    labels[0, 1], labels[1, 2], labels[1, 3] = 3, 4, 5
    causal = torch.tensor([True, False])
    w = torch.softmax(torch.randn(2, 3, 4), dim=1)
    loss, parts = hyperdas_loss(logits, labels, causal, w, causal_weight=3.5, isolation_weight=0.5, sparsity_coef=2.0)
    ce = torch.nn.functional.cross_entropy
    c = ce(logits[0, 1:2], labels[0, 1:2])
    i = ce(logits[1, 2:4], labels[1, 2:4])
    sp = torch.relu(w[:, :2].sum(-1) - 1).sum(-1).mean()  # summed over source rows, mean over examples
    assert sp > 0
    assert torch.allclose(loss, 3.5 * c + 0.5 * i + 2.0 * sp, atol=1e-5)
    assert parts["num_label_tokens"] == 3
    assert torch.allclose(sparsity_penalty(w), sp)
    # Source padding (zero rows before [SELF], as a batch with a longer counterfactual
    # pads them) changes neither the penalty nor its gradient.
    padded = torch.cat([w[:, :2], torch.zeros(2, 9, 4), w[:, 2:]], dim=1)
    assert torch.allclose(sparsity_penalty(padded), sp)
    g = torch.autograd.grad(sparsity_penalty(w.requires_grad_()), w)[0]
    gp = torch.autograd.grad(sparsity_penalty(padded.requires_grad_()), padded)[0]
    assert torch.allclose(gp[:, :2], g[:, :2]) and torch.equal(gp[:, 2:11], torch.zeros(2, 9, 4))
    loss.backward()
    assert logits.grad is not None
    assert sparsity_schedule(0, 10, 100) == 0.15 and sparsity_schedule(9, 10, 100) == 0.15
    assert abs(sparsity_schedule(55, 10, 100) - (0.15 + 1.35 * 0.5)) < 1e-9
    assert sparsity_schedule(100, 10, 100) == 1.5 and sparsity_schedule(500, 10, 100) == 1.5
    with pytest.raises(ValueError, match="label"):
        hyperdas_loss(logits, torch.full((2, 4), -100), causal)


def test_plot_positions(smollm2, tmp_path):
    from hyperdas_fast.models.hyperdas import HyperDAS

    target, tok = smollm2
    hd = HyperDAS(target, tokenizer=tok, layer=10, feature_dim=8, num_hypernet_layers=1)
    fig = hd.plot_positions("city: Vienna, country:", "city: Paris, country:", "country", path=tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 1000
    ax = fig.axes[0]
    n_src = len(tok("city: Paris, country:")["input_ids"]) + 1
    assert len(ax.get_yticklabels()) == n_src and ax.get_yticklabels()[-1].get_text() == "[SELF]"


XA_DIMS = dict(d=32, H=4, kv=2, hd=8, B=3, C=5, K=11)


def _cross_attention_case(q_norm=None, k_norm=None):
    """A float64 CrossAttention (GQA, biases, a key scale) with queries, keys and a padding mask."""
    from hyperdas_fast.models.hypernetwork import CrossAttention

    d, H, kv, hd, B, C, K = XA_DIMS.values()
    torch.manual_seed(0)
    xa = CrossAttention(torch.nn.LayerNorm(d), torch.randn(H * hd, d), torch.randn(kv * hd, d), torch.randn(kv * hd, d),
                        torch.randn(d, H * hd), tuple(torch.randn(n) for n in (H * hd, kv * hd, kv * hd, d)),
                        H, kv, hd, q_norm, k_norm).double()
    with torch.no_grad():
        xa.key_scale.uniform_(0.5, 1.5)
    h = torch.randn(B, C, d, dtype=torch.double)
    keys = torch.randn(B, K, d, dtype=torch.double)
    mask = torch.rand(B, K) > 0.3
    mask[:, 0] = True
    return xa, h, keys, mask


def _literal_attention(xa, h, keys, mask, q, k):
    """Ordinary attention of queries q [B, H, C, hd] over keys k [B, kv, K, hd] (the values
    projected from the keys), residual included: what CrossAttention must equal."""
    import torch.nn.functional as F

    d, H, kv, hd, B, C, K = XA_DIMS.values()
    k = k.repeat_interleave(H // kv, dim=1)
    v = xa.v_proj(keys * xa.key_scale).view(B, K, kv, hd).transpose(1, 2).repeat_interleave(H // kv, dim=1)
    return h + xa.o_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
                         .transpose(1, 2).reshape(B, C, H * hd))


def test_cross_attention_matches_projected_keys():
    """The query-side cross-attention equals projecting every key (GQA, biases, padding)."""
    d, H, kv, hd, B, C, K = XA_DIMS.values()
    xa, h, keys, mask = _cross_attention_case()
    q = xa.q_proj(xa.norm(h)).view(B, C, H, hd).transpose(1, 2)
    k = xa.k_proj(keys * xa.key_scale).view(B, K, kv, hd).transpose(1, 2)
    assert torch.allclose(xa(h, keys, mask), _literal_attention(xa, h, keys, mask, q, k), atol=1e-10)


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rotary"])
@pytest.mark.parametrize("norm_size", ["head", "all_heads"])
def test_cross_attention_applies_the_blocks_query_key_norms(norm_size, rotary):
    """With q/k norms (Qwen3's over one head, or one over all heads) the queries and the
    projected keys go through them, as in the block's own attention: normed, then rotated
    (with rotary); against a literal version (GQA, biases, padding)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    d, H, kv, hd, B, C, K = XA_DIMS.values()
    q_norm = Qwen3RMSNorm(hd if norm_size == "head" else H * hd)
    k_norm = Qwen3RMSNorm(hd if norm_size == "head" else kv * hd)
    with torch.no_grad():
        q_norm.weight.uniform_(0.5, 2.0)
        k_norm.weight.uniform_(0.5, 2.0)
    xa, h, keys, mask = _cross_attention_case(q_norm, k_norm)
    q, k = xa.q_proj(xa.norm(h)), xa.k_proj(keys * xa.key_scale)
    if norm_size == "head":
        q, k = xa.q_norm(q.view(B, C, H, hd)), xa.k_norm(k.view(B, K, kv, hd))
    else:
        q, k = xa.q_norm(q).view(B, C, H, hd), xa.k_norm(k).view(B, K, kv, hd)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    rot = None
    if rotary:
        angle = torch.rand(B, K, hd // 2, dtype=torch.double) * 6
        k_cs = (torch.cat([angle, angle], -1).cos(), torch.cat([angle, angle], -1).sin())
        q_cs = (torch.ones(1, C, hd, dtype=torch.double) * 0.6, torch.ones(1, C, hd, dtype=torch.double) * 0.8)
        q, _ = apply_rotary_pos_emb(q, q, *q_cs)
        _, k = apply_rotary_pos_emb(k, k, *k_cs)
        rot = (q_cs, k_cs)
    ref = _literal_attention(xa, h, keys, mask, q, k)
    assert torch.allclose(xa(h, keys, mask, rot), ref, atol=1e-10)
    xa.q_norm = xa.k_norm = None  # without them the result differs: the norms are applied
    assert not torch.allclose(xa(h, keys, mask, rot), ref, atol=1e-3)


def test_hypernetwork_copies_qwen3_query_key_norms():
    """A Qwen3 target: each cross-attention starts with its block's q_norm / k_norm weights,
    and they train; a Llama target has none."""
    import transformers as tf

    cfg = tf.Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=4, head_dim=8)
    torch.manual_seed(0)
    model = tf.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.5, 2.0)
            layer.self_attn.k_norm.weight.uniform_(0.5, 2.0)
    hd = HyperDASModel(model, layer=2, feature_dim=8, num_hypernet_layers=1)
    block = model.model.layers[0].self_attn
    for xa in (hd.hypernet.base_xattn[0], hd.hypernet.source_xattn[0]):
        assert torch.equal(xa.q_norm.weight, block.q_norm.weight) and xa.q_norm is not block.q_norm
        assert torch.equal(xa.k_norm.weight, block.k_norm.weight)
    b = toy_batch()
    out = hd(b, logits_at="labels")
    loss, _ = hyperdas_loss(out.logits, b["labels"], b["is_causal"], out.weights, sparsity_coef=1.0)
    loss.backward()
    assert hd.hypernet.base_xattn[0].k_norm.weight.grad.abs().sum() > 0
    llama = HyperDASModel(tiny("llama"), layer=2, feature_dim=8, num_hypernet_layers=1)
    assert llama.hypernet.base_xattn[0].q_norm is None and llama.hypernet.base_xattn[0].k_norm is None


def test_cross_attention_with_rotary_matches_the_original():
    """hypernet_rotary: keys projected, rotated (HF's apply_rotary_pos_emb) at cumsum(mask) *
    mask positions of the flat key list, queries at theirs, then ordinary attention (GQA,
    biases, padding), against a literal version; and through a whole HyperDASModel."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d, H, kv, hd, B, C, K = XA_DIMS.values()
    xa, h, keys, mask = _cross_attention_case()
    inv_freq = 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.double) / hd)

    def cos_sin(pos):
        angle = pos.double().unsqueeze(-1) * inv_freq
        angle = torch.cat([angle, angle], -1)
        return angle.cos(), angle.sin()

    key_pos = mask.long().cumsum(1) * mask.long()
    q_cs, k_cs = cos_sin(torch.arange(C).unsqueeze(0)), cos_sin(key_pos)
    q = xa.q_proj(xa.norm(h)).view(B, C, H, hd).transpose(1, 2)
    k = xa.k_proj(keys * xa.key_scale).view(B, K, kv, hd).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, *q_cs)
    _, k = apply_rotary_pos_emb(k, k, *k_cs)
    ref = _literal_attention(xa, h, keys, mask, q, k)
    assert torch.allclose(xa(h, keys, mask, (q_cs, k_cs)), ref, atol=1e-10)
    assert not torch.allclose(xa(h, keys, mask), ref, atol=1e-3)  # the positions matter

    model = tiny("llama")
    torch.manual_seed(1)
    plain = HyperDASModel(model, layer=2, feature_dim=8, num_hypernet_layers=1)
    torch.manual_seed(1)
    rot = HyperDASModel(model, layer=2, feature_dim=8, num_hypernet_layers=1, hypernet_rotary=True)
    b = toy_batch()
    out = rot(b, logits_at="labels")
    loss, _ = hyperdas_loss(out.logits, b["labels"], b["is_causal"], out.weights, sparsity_coef=1.0)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in rot.trainable_parameters() if p.grad is not None)
    with torch.no_grad():
        assert not torch.allclose(plain(b).weights, rot(b).weights)
    with pytest.raises(ValueError, match="hypernet_rotary supports the Llama-layout families"):
        HyperDASModel(tiny("gpt2"), layer=2, feature_dim=8, num_hypernet_layers=1, hypernet_rotary=True)


def test_hypernet_rotary_frequencies_are_fixed_float32():
    """The cross-attention's rotary frequencies come from the target's rope config in float32:
    a target cast to bf16 (which casts its rotary buffer) rotates the keys as the float32 one
    does, and a dynamic rope (which rescales its buffer for long inputs: the keys reach
    positions beyond max_position_embeddings) is neither rescaled for the keys only nor
    changed in the target. SmolLM3's no-rope blocks get no rotary here either."""
    import transformers as tf

    model = tiny("llama")
    fp32 = HyperDASModel(model, layer=2, feature_dim=8, num_hypernet_layers=1, hypernet_rotary=True).hypernet.inv_freq
    half = tiny("llama").to(torch.bfloat16)
    assert half.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    hd = HyperDASModel(half, layer=2, feature_dim=8, num_hypernet_layers=1, hypernet_rotary=True)
    assert hd.hypernet.inv_freq.dtype == torch.float32 and torch.equal(hd.hypernet.inv_freq, fp32)
    hd.to(torch.float16)
    assert hd.hypernet.inv_freq.dtype == torch.float32

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=4, max_position_embeddings=16,
                         rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    dynamic = tf.LlamaForCausalLM(cfg).eval()
    before = dynamic.model.rotary_emb.inv_freq.clone()
    hd = HyperDASModel(dynamic, layer=2, feature_dim=8, num_hypernet_layers=1, hypernet_rotary=True)
    with torch.no_grad():
        hd(toy_batch())  # 5 layers x the base tokens: key positions past 16
    assert torch.equal(dynamic.model.rotary_emb.inv_freq, before)

    cfg = tf.SmolLM3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                           num_key_value_heads=2, num_hidden_layers=4, no_rope_layers=[1, 0, 1, 0],
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    smollm3 = tf.SmolLM3ForCausalLM(cfg).eval()
    hd = HyperDASModel(smollm3, layer=3, feature_dim=8, num_hypernet_layers=2, hypernet_rotary=True)
    calls = []
    for xattn in list(hd.hypernet.base_xattn) + list(hd.hypernet.source_xattn):
        xattn.register_forward_pre_hook(lambda m, args: calls.append(args[3] is not None))
    with torch.no_grad():
        hd(toy_batch())
    assert calls == [True, True, False, False]  # block 0 rotates, block 1 (no rope) does not


def test_hypernet_rotary_refuses_models_that_rotate_otherwise():
    import transformers as tf

    cfg = tf.Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=4, head_dim=8)
    with pytest.raises(ValueError, match="hypernet_rotary supports the Llama-layout families"):
        HyperDASModel(tf.Qwen3ForCausalLM(cfg).eval(), layer=2, feature_dim=8, num_hypernet_layers=1,
                      hypernet_rotary=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_backward(dtype):
    model = tiny("llama").to(dtype)
    hd = HyperDASModel(model, layer=2, feature_dim=8, num_hypernet_layers=1)
    b = toy_batch()
    out = hd(b, logits_at="labels")
    assert out.logits.dtype == dtype and out.weights.dtype == dtype and out.basis.dtype == dtype
    loss, _ = hyperdas_loss(out.logits, b["labels"], b["is_causal"], out.weights, sparsity_coef=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in hd.trainable_parameters() if p.grad is not None)
    with torch.no_grad():
        assert torch.isfinite(hd(b, inference_mode="bidding_argmax").logits).all()


def test_hypernetwork_init_from_target_or_scratch():
    model = tiny("llama")
    warm = HyperDASModel(model, layer=2, feature_dim=8, num_hypernet_layers=2)
    cold = HyperDASModel(model, layer=2, feature_dim=8, num_hypernet_layers=2, init_from_target=False)
    src = model.model.layers[1].mlp.up_proj.weight
    assert torch.equal(warm.hypernet.blocks[1].mlp.up_proj.weight, src)
    assert warm.hypernet.blocks[1].mlp.up_proj.weight.data_ptr() != src.data_ptr()  # a copy, trainable
    assert warm.hypernet.blocks[1].mlp.up_proj.weight.requires_grad and not src.requires_grad
    # cross-attention initialised from the block's self-attention
    assert torch.equal(warm.hypernet.base_xattn[0].q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(cold.hypernet.blocks[1].mlp.up_proj.weight, src)
    with torch.no_grad():
        assert torch.isfinite(cold(toy_batch()).logits).all()


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_intervene_cache_on_other_families(smollm2, kind):
    import transformers as tf

    from hyperdas_fast.models.hyperdas import HyperDAS

    _, tok = smollm2
    torch.manual_seed(0)
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_head=4, n_layer=4, vocab_size=49152, n_positions=64))
    else:
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                   num_key_value_heads=2, num_hidden_layers=4, vocab_size=49152))
    hd = HyperDAS(model.eval(), tokenizer=tok, layer=2, feature_dim=8, num_hypernet_layers=1)
    args = (["city: Vienna, country:", "a much longer prompt about the city of Rome in"], ["city: Paris, country:"] * 2,
            ["country"] * 2)
    assert hd.intervene(*args, max_new_tokens=4) == hd.intervene(*args, max_new_tokens=4, use_cache=False)


def test_mdas_groundtruth_training_gives_basis_gradient():
    """MDAS baseline: DAS subspace + groundtruth positions, trained through the hard path."""
    hd = HyperDASModel(tiny("llama"), layer=2, feature_dim=4, num_hypernet_layers=1, subspace="das")
    b = toy_batch()
    out = hd(b, inference_mode="groundtruth", logits_at="labels")
    loss, _ = hyperdas_loss(out.logits, b["labels"], b["is_causal"])
    loss.backward()
    grad = hd.subspace.basis.linear.parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0


def test_train_delegates_to_trainer(smollm2, monkeypatch):
    import hyperdas_fast.training.trainer as trainer_mod
    from hyperdas_fast.models.hyperdas import HyperDAS

    seen = {}

    class FakeTrainer:
        def __init__(self, wrapper, config):
            seen["wrapper"], seen["config"] = wrapper, config

        def train(self):
            return "done"

    monkeypatch.setattr(trainer_mod, "Trainer", FakeTrainer)
    target, tok = smollm2
    hd = HyperDAS(target, tokenizer=tok, layer=10, feature_dim=8, num_hypernet_layers=1)
    assert hd.train(dataset_path="/data/ravel", epochs=2, batch_size=4, lr=1e-4) == "done"
    assert seen["wrapper"] is hd
    c = seen["config"]
    assert (c.data_dir, c.epochs, c.batch_size, c.lr) == ("/data/ravel", 2, 4, 1e-4)


def test_collator_max_length_moves_entity_positions(smollm2):
    """max_length cuts prompts on the left: an entity position (given, or from a prefix) moves
    left by the tokens dropped and still points at the entity, is -1 once the entity is cut
    off, and the label is never cut (it had kept its last tokens: ' of America')."""
    _, tok = smollm2
    base, cf = "city to country: Bangkok is in Thailand. Paris is in", "city to country: Bangkok is in Thailand. Rome is in"
    full = {"base_prompt": base, "counterfactual_prompt": cf, "concept": "country", "label": "United States of America",
            "base_prefix": base[: -len(" is in")], "counterfactual_prefix": cf[: -len(" is in")]}
    given = {k: v for k, v in full.items() if not k.endswith("_prefix")}
    pos = len(tok(full["base_prefix"])["input_ids"]) - 1
    given.update(base_entity_pos=pos, source_entity_pos=pos)
    for record in (full, given):
        b = HyperDASCollator(tok, max_length=6)([record])
        p = int(b["base_entity_pos"][0])
        assert tok.decode([int(b["base_input_ids"][0, p])]) == " Paris"
        assert tok.decode([int(b["source_input_ids"][0, int(b["source_entity_pos"][0])])]) == " Rome"
        labels = [int(t) for t in b["labels"][0] if t != -100]
        assert tok.decode(labels) == " United States of America"
        cut = HyperDASCollator(tok, max_length=2)([record])
        assert cut["base_entity_pos"].tolist() == [-1] and cut["source_entity_pos"].tolist() == [-1]
