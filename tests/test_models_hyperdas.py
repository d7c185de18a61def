"""HyperDAS model: intervened forward vs a hook-built reference, block-call counts, training,
intervene(), save/load, and bad input."""
import json

import pytest
import torch

from hyperdas_fast.data.collate import HyperDASCollator
from hyperdas_fast.models.hyperdas import HyperDAS, HyperDASModel
from hyperdas_fast.models.selector import INFERENCE_MODES
from hyperdas_fast.models.subspace import SUBSPACES
from hyperdas_fast.ops.reference import interchange_reference, interchange_rows_reference
from hyperdas_fast.training.losses import hyperdas_loss

LAYER = 12


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core machine this is much faster than two."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

RECORDS = [
    {"base_prompt": "city: Vienna, country:", "counterfactual_prompt": "city: Paris, country:",
     "concept": "country", "label": "France", "is_causal": True,
     "base_prefix": "city: Vienna", "counterfactual_prefix": "city: Paris"},
    {"base_prompt": "city: Rome, country:", "counterfactual_prompt": "The city of Tokyo is lovely",
     "concept": "country", "label": "Japan", "is_causal": True,
     "base_prefix": "city: Rome", "counterfactual_prefix": "The city of Tokyo"},
    {"base_prompt": "city: Berlin, continent:", "counterfactual_prompt": "city: Lima, country:",
     "concept": "country", "label": "Europe", "is_causal": False,
     "base_prefix": "city: Berlin", "counterfactual_prefix": "city: Lima"},
]


@pytest.fixture(scope="module")
def batch(smollm2):
    return HyperDASCollator(smollm2[1])(RECORDS)


@pytest.fixture(scope="module")
def layer_states(smollm2, batch):
    """Layer-L base and counterfactual states from the HF model's own forward (output_hidden_states)."""
    target, _ = smollm2
    with torch.no_grad():
        base = target(input_ids=batch["base_input_ids"], attention_mask=batch["base_attention_mask"],
                      output_hidden_states=True).hidden_states[LAYER]
        source = target(input_ids=batch["source_input_ids"], attention_mask=batch["source_attention_mask"],
                        output_hidden_states=True).hidden_states[LAYER]
    return base, source


def reference_logits(target, batch, out, layer, states):
    """Hook-built reference: HF layer-L states, the reference op, and a forward pre-hook on
    block L that swaps in the patched residual stream."""
    base, source = states
    with torch.no_grad():
        d64 = lambda t: None if t is None else t.detach().double()
        if out.source_index is None:
            patched = interchange_reference(base.double(), source.double(), d64(out.weights), d64(out.basis),
                                            d64(out.reflect), d64(out.mask))
        else:
            b, t = torch.nonzero(out.source_index >= 0, as_tuple=True)
            s = out.source_index[b, t]
            patched = interchange_rows_reference(base.double(), source.double(), b, t, s, d64(out.basis),
                                                 d64(out.reflect), d64(out.mask))
        patched = patched.float()

        def hook(module, args, kwargs):
            return (patched,) + tuple(args[1:]), kwargs

        handle = target.model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            logits = target(input_ids=batch["base_input_ids"], attention_mask=batch["base_attention_mask"]).logits
        finally:
            handle.remove()
    return logits


@pytest.mark.parametrize("subspace", SUBSPACES)
def test_forward_matches_hook_reference(smollm2, batch, layer_states, subspace):
    target, _ = smollm2
    torch.manual_seed(1)
    model = HyperDASModel(target, layer=LAYER, feature_dim=16, num_hypernet_layers=1, subspace=subspace)
    real = batch["base_attention_mask"].bool()
    for mode in INFERENCE_MODES:
        results = []
        ref = None
        for reuse in (True, False):
            model.reuse_prefix = reuse
            with torch.no_grad():
                out = model(batch, inference_mode=mode)
            if ref is None:
                ref = reference_logits(target, batch, out, LAYER, layer_states)
            assert out.logits.shape == ref.shape
            err = (out.logits - ref)[real].abs().max().item()
            assert err < 2e-3, f"{subspace}/{mode}/reuse={reuse}: max |logits - reference| = {err}"
            results.append(out.logits)
        assert torch.allclose(results[0][real], results[1][real], atol=1e-4)
        if mode != "default":
            assert out.source_index is not None
    # The intervention must change something (the reference is not just the base run).
    with torch.no_grad():
        plain = target(input_ids=batch["base_input_ids"], attention_mask=batch["base_attention_mask"]).logits
        out = model(batch, inference_mode="groundtruth")
    assert (out.logits - plain)[real].abs().max() > 1e-3


def test_weights_shape_and_masks(smollm2, batch):
    target, _ = smollm2
    model = HyperDASModel(target, layer=LAYER, feature_dim=8, num_hypernet_layers=1)
    with torch.no_grad():
        out = model(batch)
    B, T = batch["base_input_ids"].shape
    S = batch["source_input_ids"].shape[1]
    assert out.weights.shape == (B, S + 1, T)
    assert torch.allclose(out.weights.sum(1), torch.ones(B, T), atol=1e-5)
    # label tokens and padding are never intervened: their column is all [SELF]
    inter = batch["base_intervention_mask"] & batch["base_attention_mask"].bool()
    assert torch.all(out.weights[:, -1, :][~inter] == 1)
    # source padding rows get no weight
    pad_rows = ~batch["source_attention_mask"].bool()
    assert torch.all(out.weights[:, :S, :].permute(0, 2, 1)[pad_rows.unsqueeze(1).expand(B, T, S)] == 0)
    assert out.basis.shape == (576, 8) and out.reflect.shape == (B, 576)
    eye = out.basis.t() @ out.basis
    assert torch.allclose(eye, torch.eye(8), atol=1e-4)


@pytest.mark.parametrize("reuse", [True, False])
def test_block_calls_per_training_step(smollm2, batch, reuse):
    target, _ = smollm2
    model = HyperDASModel(target, layer=LAYER, feature_dim=8, num_hypernet_layers=1, reuse_prefix=reuse)
    n = model.adapter.num_layers
    calls = [0] * n
    hf_calls = []
    model.adapter.block_callback = lambda i: calls.__setitem__(i, calls[i] + 1)
    handle = target.register_forward_pre_hook(lambda *a: hf_calls.append(1))
    hooks = [blk.register_forward_pre_hook(lambda m, a, i=i: calls_hf.__setitem__(i, calls_hf[i] + 1))
             for i, blk in enumerate(model.adapter.blocks)]
    calls_hf = [0] * n
    try:
        out = model(batch, logits_at="labels")
        loss, _ = hyperdas_loss(out.logits, batch["labels"], batch["is_causal"], out.weights, sparsity_coef=0.5)
        loss.backward()
    finally:
        model.adapter.block_callback = None
        handle.remove()
        for h in hooks:
            h.remove()
    prefix = 3 if not reuse else 2
    assert calls[:LAYER] == [prefix] * LAYER
    assert calls[LAYER:] == [3] * (n - LAYER)
    assert calls_hf == calls  # every block call went through the adapter (no hidden forwards)
    assert hf_calls == []  # the HF model's own forward never runs
    assert all(p.grad is None for p in target.parameters())


def test_training_reduces_loss(smollm2):
    target, tok = smollm2
    torch.manual_seed(0)
    hd = HyperDAS(target, tokenizer=tok, layer=15, feature_dim=16, num_hypernet_layers=1)
    records = [
        {"base_prompt": f"city: {a}, country:", "counterfactual_prompt": f"city: {b}, country:",
         "concept": "country", "label": c, "is_causal": True}
        for a, b, c in [("Vienna", "Paris", "France"), ("Rome", "Tokyo", "Japan"),
                        ("Berlin", "Madrid", "Spain"), ("Oslo", "Cairo", "Egypt")]
    ]
    batch = hd.collator(records)
    opt = torch.optim.AdamW(hd.model.parameter_groups(lr=3e-4, basis_lr=3e-3))
    losses = []
    for _ in range(8):
        out = hd.model(batch, logits_at="labels")
        loss, parts = hyperdas_loss(out.logits, batch["labels"], batch["is_causal"], out.weights, sparsity_coef=0.15)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hd.model.trainable_parameters(), 4.0)
        opt.step()
        losses.append(parts["loss"])
    assert all(p.grad is None for p in target.parameters())
    assert losses[-1] < 0.7 * losses[0], losses
    assert min(losses[-3:]) < min(losses[:3]), losses


def test_packed_logits_match_full(smollm2, batch):
    target, _ = smollm2
    model = HyperDASModel(target, layer=LAYER, feature_dim=8, num_hypernet_layers=1)
    with torch.no_grad():
        full = model(batch)
        packed = model(batch, logits_at="labels")
    sel = batch["labels"] != -100
    assert torch.allclose(full.logits[sel], packed.logits, atol=1e-4)
    a, _ = hyperdas_loss(full.logits, batch["labels"], batch["is_causal"], full.weights)
    b, _ = hyperdas_loss(packed.logits, batch["labels"], batch["is_causal"], packed.weights)
    assert torch.allclose(a, b, atol=1e-4)


def test_intervene_returns_text(smollm2):
    target, tok = smollm2
    hd = HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=16, num_hypernet_layers=1)
    text = hd.intervene("city: Vienna, country:", "city: Paris, country:", "country", max_new_tokens=4)
    assert isinstance(text, str) and len(text) > 0
    texts = hd.intervene(["city: Vienna, country:", "city: Rome, country:"],
                         ["city: Paris, country:", "city: Lima, country:"], ["country", "country"],
                         max_new_tokens=3, inference_mode="column_argmax")
    assert isinstance(texts, list) and len(texts) == 2 and all(isinstance(t, str) and t for t in texts)


def test_intervene_batched_equals_single(smollm2):
    target, tok = smollm2
    torch.manual_seed(3)
    hd = HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=16, num_hypernet_layers=1)
    pairs = [("city: Vienna, country:", "city: Paris, country:"), ("The capital city of Italy is", "city: Lima, country:")]
    batched = hd.intervene([p[0] for p in pairs], [p[1] for p in pairs], ["country"] * 2, max_new_tokens=2)
    single = [hd.intervene(b, c, "country", max_new_tokens=2) for b, c in pairs]
    assert batched == single


def test_save_load_roundtrip(smollm2, batch, tmp_path):
    target, tok = smollm2
    torch.manual_seed(5)
    hd = HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=8, num_hypernet_layers=1, subspace="mask",
                  init_from_target=False)
    hd.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["hyperdas.safetensors", "hyperdas_config.json"]
    loaded = HyperDAS.load(tmp_path / "ckpt", model=target, tokenizer=tok)
    assert loaded.config == hd.config
    with torch.no_grad():
        a = hd.model(batch).logits
        b = loaded.model(batch).logits
    assert torch.allclose(a, b, atol=1e-5)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "ckpt" / "hyperdas.safetensors"))
    # trainable weights (+ the orthogonal parametrization's buffer), nothing of the frozen target
    expected = sum(p.numel() for p in hd.model.trainable_parameters()) + sum(b.numel() for b in hd.model.buffers(recurse=True)
                   if any(b is v for v in hd.model.state_dict(keep_vars=True).values()))
    assert sum(v.numel() for v in saved.values()) == expected
    assert sum(v.numel() for v in saved.values()) < 0.2 * sum(p.numel() for p in target.parameters())


def test_selector_option_is_saved_and_legacy_checkpoints_load_additive(smollm2, batch, tmp_path):
    """The rotary selector (default) takes the target's own rotary frequencies; the option is
    in the config and survives save/load; a checkpoint whose config has no "selector" entry
    (saved before the option existed) loads with the additive selector it was trained with."""
    target, tok = smollm2
    hd = HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=8, num_hypernet_layers=1, seed=1)
    assert hd.config["selector"] == "rotary" and hd.model.selector.rotary
    torch.testing.assert_close(hd.model.selector.inv_freq, target.model.rotary_emb.inv_freq.float())
    hd.save(tmp_path / "ckpt")
    assert HyperDAS.load(tmp_path / "ckpt", model=target, tokenizer=tok).model.selector.rotary
    cfg_path = tmp_path / "ckpt" / "hyperdas_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["selector"]
    cfg_path.write_text(json.dumps(cfg))
    legacy = HyperDAS.load(tmp_path / "ckpt", model=target, tokenizer=tok)
    assert legacy.config["selector"] == "additive" and not legacy.model.selector.rotary
    assert legacy.config["hypernet_rotary"] is False
    keyed = HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=8, num_hypernet_layers=1, seed=1,
                     hypernet_rotary=True)
    keyed.save(tmp_path / "keyed")
    assert HyperDAS.load(tmp_path / "keyed", model=target, tokenizer=tok).model.hypernet.rotary
    with torch.no_grad():
        w_rotary, w_additive = hd.model(batch).weights, legacy.model(batch).weights
    assert not torch.allclose(w_rotary, w_additive)
    with pytest.raises(ValueError, match="selector must be one of"):
        HyperDASModel(target, layer=LAYER, feature_dim=8, num_hypernet_layers=1, selector="pairwise")


def test_qk_norm_option_is_saved_and_legacy_checkpoints_load_without(smollm2, tmp_path):
    """A target with query/key norms (Qwen3): the cross-attentions copy them by default and the
    config records it; a checkpoint whose config has no "hypernet_qk_norm" (saved before the
    norms were copied: its weights have none) loads without them, strictly."""
    import transformers as tf

    _, tok = smollm2
    torch.manual_seed(0)
    target = tf.Qwen3ForCausalLM(tf.Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                num_hidden_layers=4, head_dim=8)).eval()
    kw = dict(tokenizer=tok, layer=2, feature_dim=8, num_hypernet_layers=1, seed=1)
    hd = HyperDAS(target, **kw)
    assert hd.config["hypernet_qk_norm"] is True and hd.model.hypernet.qk_norm
    hd.save(tmp_path / "ckpt")
    assert HyperDAS.load(tmp_path / "ckpt", model=target, tokenizer=tok).model.hypernet.qk_norm
    old = HyperDAS(target, hypernet_qk_norm=False, **kw)
    assert old.config["hypernet_qk_norm"] is False and old.model.hypernet.base_xattn[0].k_norm is None
    old.save(tmp_path / "old")
    cfg_path = tmp_path / "old" / "hyperdas_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["hypernet_qk_norm"]
    cfg_path.write_text(json.dumps(cfg))
    legacy = HyperDAS.load(tmp_path / "old", model=target, tokenizer=tok)
    assert not legacy.model.hypernet.qk_norm and legacy.config["hypernet_qk_norm"] is False
    # recorded as it took effect: a target without such norms records False
    assert HyperDAS(smollm2[0], **kw).config["hypernet_qk_norm"] is False


def test_load_in_half_precision_recognises_the_target(smollm2, tmp_path):
    """A checkpoint of the fp32 target loads onto the same weights in bf16 and fp16 (the bf16
    load was refused: the embedding checksum moved by more than its tolerance), and the
    position heatmap is computed in eval mode (with dropout, two calls differed)."""
    from hyperdas_fast.models.default_model import load_model

    target, tok = smollm2
    hd = HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=8, num_hypernet_layers=1)
    hd.save(tmp_path / "ckpt")
    for dtype in (torch.bfloat16, torch.float16):
        half, _ = load_model(dtype=dtype)
        HyperDAS.load(tmp_path / "ckpt", model=half, tokenizer=tok)
    # (SmolLM2 has no dropout, so the mode is checked where the weights are computed)
    modes, encode = [], hd.model.encode
    hd.model.encode = lambda batch: (modes.append(hd.model.training), encode(batch))[1]
    hd.model.train()
    hd.position_weights("city: Vienna, country:", "city: Paris, country:", "country")
    assert modes == [False] and hd.model.training


def test_load_refuses_weights_from_another_save_or_corrupt(smollm2, tmp_path):
    target, tok = smollm2
    first = HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=8, num_hypernet_layers=1)
    first.save(tmp_path / "a")
    torch.manual_seed(1)
    HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=8, num_hypernet_layers=1).save(tmp_path / "b")
    # new weights beside an old config: what a crash between the two renames would leave
    (tmp_path / "b" / "hyperdas.safetensors").replace(tmp_path / "a" / "hyperdas.safetensors")
    with pytest.raises(ValueError, match="does not match"):
        HyperDAS.load(tmp_path / "a", model=target, tokenizer=tok)
    first.save(tmp_path / "c")
    (tmp_path / "c" / "hyperdas_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt HyperDAS config"):
        HyperDAS.load(tmp_path / "c", model=target, tokenizer=tok)


def tiny_llama(hidden=64, vocab=49152):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_load_against_different_target_fails(smollm2, tmp_path):
    target, tok = smollm2
    hd = HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=8, num_hypernet_layers=1)
    hd.save(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="different target model"):
        HyperDAS.load(tmp_path / "ckpt", model=tiny_llama(), tokenizer=tok)


def test_bad_inputs(smollm2):
    target, tok = smollm2
    with pytest.raises(ValueError, match="layer"):
        HyperDAS(target, tokenizer=tok, layer=0)
    with pytest.raises(ValueError, match="layer"):
        HyperDAS(target, tokenizer=tok, layer=30)
    with pytest.raises(ValueError, match="feature_dim"):
        HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=577)
    with pytest.raises(ValueError, match="subspace"):
        HyperDAS(target, tokenizer=tok, layer=LAYER, subspace="nope")
    hd = HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=8, num_hypernet_layers=1)
    with pytest.raises(ValueError, match="base_prompt"):
        hd.intervene("", "city: Paris, country:", "country")
    with pytest.raises(ValueError, match="concept"):
        hd.intervene("city: Vienna, country:", "city: Paris, country:", "  ")
    with pytest.raises(ValueError, match="one length"):
        hd.intervene(["a b", "c d"], ["e f"], ["g", "h"])
    with pytest.raises(ValueError, match="inference_mode"):
        hd.intervene("city: Vienna, country:", "city: Paris, country:", "country", inference_mode="best")

    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64))
    with pytest.raises(ValueError, match="unsupported model type 'bert'.*llama"):
        HyperDAS(bert, tokenizer=tok, layer=1)


def test_hypernetwork_does_not_read_the_label(smollm2):
    """The label tokens the collator appends to the base prompt are not keys of the
    hypernetwork: weights, subspace and patched stream on the prompt are the same for any
    label, and for none (what intervene() builds). They had differed by up to 3e-2."""
    target, tok = smollm2
    hd = HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=8, num_hypernet_layers=1, seed=0)
    collate = HyperDASCollator(tok)
    record = {k: v for k, v in RECORDS[0].items() if k != "label"}
    with torch.no_grad():
        enc = {label: hd.model.encode(collate([dict(record, label=label)])) for label in ("", "France", "Austria")}
    n = enc[""]["weights"].shape[-1]
    assert enc["France"]["weights"].shape[-1] > n  # the label tokens are there
    for label in ("France", "Austria"):
        assert torch.equal(enc[label]["weights"][..., :n], enc[""]["weights"])
        assert torch.equal(enc[label]["reflect"], enc[""]["reflect"])
        torch.testing.assert_close(enc[label]["stream"][:, :n], enc[""]["stream"], rtol=0, atol=1e-5)


def test_left_padded_batches_are_refused(smollm2, batch):
    """Positions count from the first column and the query is the concept's last real token:
    a left-padded mask would silently shift both, so it is refused, naming the mask."""
    target, tok = smollm2
    hd = HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=8, num_hypernet_layers=1)
    for part in ("base", "source", "concept"):
        bad = dict(batch)
        ids, am = batch[f"{part}_input_ids"], batch[f"{part}_attention_mask"]
        # one pad token on the left of every row (the concept is one token: no room within)
        bad[f"{part}_input_ids"] = torch.cat([torch.full_like(ids[:, :1], tok.pad_token_id or 0), ids], dim=1)
        bad[f"{part}_attention_mask"] = torch.cat([torch.zeros_like(am[:, :1]), am], dim=1)
        if part == "base":
            for key in ("base_intervention_mask", "labels"):
                bad[key] = torch.cat([torch.zeros_like(batch[key][:, :1]), batch[key]], dim=1)
        with pytest.raises(ValueError, match=f"{part}_attention_mask must be right-padded.*rows \\[0, 1, 2\\]"):
            hd.model.encode(bad)
        if part != "concept":  # MDAS (no concept) too: its entity positions count from column 0 as well
            from hyperdas_fast.models.mdas import MDASModel

            with pytest.raises(ValueError, match=f"{part}_attention_mask must be right-padded"):
                MDASModel(target, layer=LAYER, feature_dim=8)(bad, inference_mode="groundtruth")


@pytest.mark.parametrize("mode", ["default", "column_argmax"])
def test_intervene_first_token_matches_forward(smollm2, mode):
    """The first generated token is the argmax of the intervened forward at the last prompt token."""
    target, tok = smollm2
    torch.manual_seed(7)
    hd = HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=16, num_hypernet_layers=1)
    bases = ["city: Vienna, country:", "The capital city of Italy is"]
    sources = ["city: Paris, country:", "city: Lima, country:"]
    batch = hd.collator([{"base_prompt": b, "counterfactual_prompt": s, "concept": "country", "label": ""}
                         for b, s in zip(bases, sources)])
    with torch.no_grad():
        logits = hd.model(batch, inference_mode=mode).logits
    last = batch["base_attention_mask"].sum(1) - 1
    expected = logits[torch.arange(2), last].argmax(-1).tolist()
    texts = hd.intervene(bases, sources, ["country"] * 2, max_new_tokens=1, inference_mode=mode)
    assert texts == [tok.decode([t], skip_special_tokens=True) for t in expected]


def test_intervene_cache_equals_recompute(smollm2):
    target, tok = smollm2
    torch.manual_seed(11)
    hd = HyperDAS(target, tokenizer=tok, layer=LAYER, feature_dim=16, num_hypernet_layers=1)
    bases = ["city: Vienna, country:", "The capital city of Italy is the city of"]
    sources = ["city: Paris, country:", "city: Lima, country:"]
    for mode in ("default", "bidding_argmax"):
        a = hd.intervene(bases, sources, ["country"] * 2, max_new_tokens=5, inference_mode=mode)
        b = hd.intervene(bases, sources, ["country"] * 2, max_new_tokens=5, inference_mode=mode, use_cache=False)
        assert a == b


def test_checkpoint_of_a_target_built_in_memory_names_what_to_pass(smollm2, tmp_path):
    """A target built in memory has no name or path: the checkpoint records "" and the class,
    and load without model= says to pass the model, where it used to hand the class name to
    from_pretrained (a hub lookup). Checkpoints from before, with the class name as the target's
    name, get the same answer. With model= the checkpoint loads."""
    import json

    from hyperdas_fast.models.mdas import MDAS

    _, tok = smollm2
    tiny = tiny_llama()
    hd = HyperDAS(tiny, tokenizer=tok, layer=2, feature_dim=8, num_hypernet_layers=1)
    assert hd.model_name == "LlamaForCausalLM" and hd.target_name == ""
    hd.save(tmp_path / "h")
    config = json.loads((tmp_path / "h" / "hyperdas_config.json").read_text())
    assert config["target_name"] == "" and config["target_class"] == "LlamaForCausalLM"
    with pytest.raises(ValueError, match=r"built in memory \(LlamaForCausalLM\).*model="):
        HyperDAS.load(tmp_path / "h")
    HyperDAS.load(tmp_path / "h", model=tiny, tokenizer=tok)
    legacy = dict(config, target_name="LlamaForCausalLM")
    del legacy["target_class"]
    (tmp_path / "h" / "hyperdas_config.json").write_text(json.dumps(legacy))
    with pytest.raises(ValueError, match=r"built in memory \(LlamaForCausalLM\)"):
        HyperDAS.load(tmp_path / "h")

    MDAS(tiny, tokenizer=tok, layer=2, feature_dim=8).save(tmp_path / "m")
    with pytest.raises(ValueError, match="built in memory"):
        MDAS.load(tmp_path / "m")
    MDAS.load(tmp_path / "m", model=tiny, tokenizer=tok)


def test_mdas_load_checks_the_weights_and_takes_dtype(smollm2, tmp_path):
    """MDAS.load refuses a target of the same architecture with other weights (it compared
    the architecture alone), and MDAS converts a model passed in memory to dtype= as HyperDAS
    does (it ignored dtype and device there)."""
    from hyperdas_fast.models.mdas import MDAS

    _, tok = smollm2
    MDAS(tiny_llama(), tokenizer=tok, layer=2, feature_dim=8).save(tmp_path / "m")
    other = tiny_llama()
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.5)
    with pytest.raises(ValueError, match="embedding weights differ"):
        MDAS.load(tmp_path / "m", model=other, tokenizer=tok)
    half = MDAS(tiny_llama(), tokenizer=tok, layer=2, feature_dim=8, dtype=torch.bfloat16)
    assert next(half.target.parameters()).dtype == torch.bfloat16


def test_boundless_boundary_learns_in_bf16():
    """BoundlessDAS on a bf16 target: the index keeps every position of d = 576 (bf16 has
    only 8 bits: 575 was 576), and one small optimizer step moves the boundary (at 64 a bf16
    boundary moves in steps of 0.5, so a 1e-3 step was lost); the mask comes out in bf16."""
    from hyperdas_fast.models.subspace import make_subspace

    sub = make_subspace("boundless", 576, 64, dtype=torch.bfloat16)
    assert torch.equal(sub.index, torch.arange(576, dtype=torch.float32))
    _, _, mask = sub(torch.zeros(2, 576, dtype=torch.bfloat16))
    assert mask.dtype == torch.bfloat16 and mask.shape == (576,)
    before = sub.boundary.detach().clone()
    opt = torch.optim.SGD([sub.boundary], lr=1e-3)
    mask.float().sum().backward()
    opt.step()
    assert sub.boundary.dtype == torch.float32 and sub.boundary.item() != before.item()


def test_public_names_import_where_the_readme_says():
    from hyperdas_fast import MDAS, HyperDAS
    from hyperdas_fast.data import HyperDASCollator
    from hyperdas_fast.models import MDAS as models_mdas
    from hyperdas_fast.models.mdas import MDAS as module_mdas

    assert MDAS is models_mdas is module_mdas
    assert HyperDAS.__name__ == "HyperDAS" and HyperDASCollator.__name__ == "HyperDASCollator"
