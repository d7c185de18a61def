"""Trainer, checkpoints and resume on a tiny random Llama (fast) with the MDAS model,
plus one short HyperDAS run on the same tiny model."""
import json
import math

import pytest
import torch

from hyperdas_fast.data import ravel
from hyperdas_fast.training import checkpoint as ckpt
from hyperdas_fast.training.trainer import TrainConfig, Trainer


def tiny_llama(vocab, seed=0, layers=3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from hyperdas_fast.models.default_model import default_model_dir

    t = AutoTokenizer.from_pretrained(default_model_dir())
    if t.pad_token is None:
        t.pad_token = t.eos_token
    return t


@pytest.fixture(scope="module")
def records(tok, ravel_dir):
    rows = ravel.load_rows("city", "continent", "test", ravel_dir)
    rows = rows[:20] + [r for r in rows if r["attribute_type"] == "isolate"][:20]
    return ravel.to_records(rows, tok)


def _mdas(tok, seed=0):
    from hyperdas_fast.models.mdas import MDASModel

    model = tiny_llama(len(tok), 0)  # the same frozen target; ``seed`` changes the basis init
    torch.manual_seed(seed + 100)
    return MDASModel(model, layer=1, feature_dim=8)


def _weights(net):
    return {n: p.detach().clone() for n, p in ckpt.model_state(net).items()}


def _cfg(records, run_dir, **kw):
    base = dict(epochs=2, batch_size=8, train_records=records[:28], eval_records=records[28:36], progress=False,
                basis_lr=1e-2, checkpoint_dir=str(run_dir), seed=7)
    base.update(kw)
    return TrainConfig(**base)


def test_train_runs_and_logs(tok, records, tmp_path):
    net = _mdas(tok)
    before = _weights(net)
    res = Trainer(net, _cfg(records, tmp_path, eval_every=2), tokenizer=tok).train()
    assert res["steps"] == 2 * math.ceil(28 / 8)
    after = _weights(net)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["type"] == "train"] == list(range(1, res["steps"] + 1))
    assert any(r["type"] == "eval" for r in lines)
    assert (tmp_path / "train.csv").read_text().startswith("step,epoch,loss")
    assert "groundtruth" in (tmp_path / "eval.csv").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["method"] == "MDAS" and results["primary_mode"] == "groundtruth"
    overall = results["metrics"]["groundtruth"]["overall"]
    assert overall["n_causal"] + overall["n_isolation"] == 8
    # the orthogonal parametrization keeps the basis orthonormal through training
    basis = net.basis().detach()
    assert torch.allclose(basis.T @ basis, torch.eye(8), atol=1e-4)
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


class _Killed(Exception):
    pass


def test_resume_gives_identical_weights(tok, records, tmp_path):
    full = _mdas(tok)
    Trainer(full, _cfg(records, tmp_path / "full", final_eval=False), tokenizer=tok).train()

    def kill_at(k):
        def cb(trainer, step, row):
            if step == k:
                raise _Killed()
        return cb

    part = _mdas(tok)
    with pytest.raises(_Killed):
        Trainer(part, _cfg(records, tmp_path / "part", checkpoint_every=3, final_eval=False), tokenizer=tok,
                callbacks=[kill_at(4)]).train()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "part")] == [3]
    resumed = _mdas(tok, seed=1)  # different init: everything must come from the checkpoint
    res = Trainer(resumed, _cfg(records, tmp_path / "part", checkpoint_every=3, final_eval=False, resume=True),
                  tokenizer=tok).train()
    assert res["steps"] == 8
    a, b = _weights(full), _weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the killed run's step 4 was dropped and logged again


def test_checkpoint_roundtrip_and_corruption(tok, records, tmp_path):
    net = _mdas(tok)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    net(__import__("hyperdas_fast.data.collate", fromlist=["x"]).HyperDASCollator(tok)(records[:4]), logits_at="labels").logits.sum().backward()
    opt.step()
    path = ckpt.save_checkpoint(tmp_path, 5, net, opt, sched, {"epoch": 0})
    other = _mdas(tok, seed=3)
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-2)
    state = ckpt.load_checkpoint(path, other, opt2)
    assert state["step"] == 5
    for k, v in _weights(net).items():
        assert torch.equal(v, _weights(other)[k])
    assert ckpt.latest_checkpoint(tmp_path) == path
    # flip bytes in the tensor data: the checksum catches it
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    bad = tmp_path / "ckpt-00000006.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_checkpoint(bad, other)
    trunc = tmp_path / "ckpt-00000007.safetensors"
    trunc.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="ckpt-00000007"):
        ckpt.read_checkpoint(trunc)
    with pytest.warns(UserWarning, match="damaged"):
        assert ckpt.latest_checkpoint(tmp_path) == path
    with pytest.raises(FileNotFoundError):
        ckpt.read_checkpoint(tmp_path / "nope.safetensors")


def test_config_errors(tok, records, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(_mdas(tok), TrainConfig(batch_size=0), tokenizer=tok)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        Trainer(_mdas(tok), TrainConfig(checkpoint_every=2), tokenizer=tok)
    with pytest.raises(ValueError, match="label_mode"):
        Trainer(_mdas(tok), TrainConfig(label_mode="guess"), tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer"):
        Trainer(_mdas(tok), TrainConfig())
    with pytest.raises(ValueError, match=r"final_eval_modes has unknown inference modes \['global_argmx'\]"):
        Trainer(_mdas(tok), TrainConfig(final_eval_modes=("global_argmax", "global_argmx")), tokenizer=tok)
    with pytest.raises(ValueError, match="resume and overwrite"):
        Trainer(_mdas(tok), TrainConfig(checkpoint_dir=str(tmp_path), resume=True, overwrite=True), tokenizer=tok)


def _train_steps(tok, records, run_dir, **kw):
    """A short MDAS run (batch 4 over 28 examples: 7 steps per epoch)."""
    kw = dict(dict(batch_size=4, epochs=1, final_eval=False), **kw)
    net = _mdas(tok)
    return net, Trainer(net, _cfg(records, run_dir, **kw), tokenizer=tok).train()


def _logged_steps(run_dir):
    return [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_new_run_in_an_earlier_runs_folder(tok, records, tmp_path):
    """A new run in a folder holding an earlier one is refused (the earlier run's later
    checkpoints used to outrank the new ones: pruning deleted each new checkpoint right after
    writing it, and --resume restored the earlier run's weights); overwrite=True replaces it."""
    _train_steps(tok, records, tmp_path, checkpoint_every=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6, 7]
    with pytest.raises(ValueError, match="already holds a run .*ckpt-00000006.*--resume.*--overwrite"):
        _train_steps(tok, records, tmp_path, max_steps=2, checkpoint_every=1)
    net, res = _train_steps(tok, records, tmp_path, max_steps=2, checkpoint_every=1, overwrite=True)
    assert res["steps"] == 2 and [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2]
    assert _logged_steps(tmp_path) == [1, 2]
    tensors, _ = ckpt.read_checkpoint(ckpt.checkpoint_path(tmp_path, 2))
    for name, value in _weights(net).items():
        assert torch.equal(tensors[f"model/{name}"], value)


def test_resume_sets_aside_damaged_checkpoints(tok, records, tmp_path):
    """Resume skips a damaged newest checkpoint; it is renamed (kept, not deleted) so that
    it neither outranks the checkpoints the resumed run writes nor is found by a later
    resume, and the metrics rows after the restored step are dropped. With no readable
    checkpoint at all the run starts over with an empty log."""
    full, _ = _train_steps(tok, records, tmp_path / "full")
    run = tmp_path / "run"
    _train_steps(tok, records, run, checkpoint_every=2, keep_checkpoints=3)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 6, 7]
    for step in (6, 7):  # truncate one, flip bytes in the other
        path = ckpt.checkpoint_path(run, step)
        data = bytearray(path.read_bytes())
        data[-20] ^= 0xFF
        path.write_bytes(bytes(data[:100]) if step == 7 else bytes(data))
    (run / ".ckpt-x1y2.tmp").write_bytes(b"partial")  # left by a save killed mid-write
    (run / ".tmpAb12Cd").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="damaged"):
        resumed, res = _train_steps(tok, records, run, checkpoint_every=2, keep_checkpoints=3, resume=True)
    assert res["steps"] == 7 and [s for s, _ in ckpt.list_checkpoints(run)] == [4, 6, 7]
    assert sorted(p.name for p in run.glob("*.damaged")) == ["ckpt-00000006.safetensors.damaged",
                                                             "ckpt-00000007.safetensors.damaged"]
    assert not list(run.glob(".*"))
    assert _logged_steps(run) == list(range(1, 8))
    for name, value in _weights(full).items():
        assert torch.equal(_weights(resumed)[name], value), name

    only_damaged = tmp_path / "only_damaged"
    _train_steps(tok, records, only_damaged, max_steps=3, checkpoint_every=3)
    ckpt.checkpoint_path(only_damaged, 3).write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="no checkpoint found"):
        _train_steps(tok, records, only_damaged, max_steps=2, resume=True)
    assert _logged_steps(only_damaged) == [1, 2]
    assert [s for s, _ in ckpt.list_checkpoints(only_damaged)] == [2]


def test_resume_refuses_other_options(tok, records, tmp_path):
    """Resuming with another learning rate, batch size or seed would mix two runs (the
    optimizer state kept the old learning rate while train_config.json claimed the new one):
    refused, naming the options. Training longer is allowed; a checkpoint past the end is not."""
    _train_steps(tok, records, tmp_path, max_steps=4, checkpoint_every=2)
    net = _mdas(tok, seed=5)
    before = _weights(net)
    with pytest.raises(ValueError, match=r"batch_size=4 \(now 8\), lr=4e-05 \(now 0.01\)"):
        Trainer(net, _cfg(records, tmp_path, max_steps=4, batch_size=8, lr=1e-2, epochs=1, final_eval=False,
                          resume=True), tokenizer=tok).train()
    assert all(torch.equal(before[k], v) for k, v in _weights(net).items())  # nothing restored
    with pytest.raises(ValueError, match="at step 4, beyond this run's 2 steps"):
        _train_steps(tok, records, tmp_path, max_steps=2, resume=True)
    _, res = _train_steps(tok, records, tmp_path, max_steps=6, resume=True)
    assert res["steps"] == 6 and _logged_steps(tmp_path) == list(range(1, 7))


def test_hyperdas_short_training(tok, records, tmp_path):
    from hyperdas_fast.models.hyperdas import HyperDAS

    hd = HyperDAS(tiny_llama(len(tok)), layer=1, feature_dim=8, num_hypernet_layers=1, tokenizer=tok)
    before = _weights(hd.model)
    res = Trainer(hd, _cfg(records, tmp_path, epochs=1, max_steps=2, final_eval_modes=("default", "groundtruth"))).train()
    assert res["steps"] == 2 and set(res["eval"]) == {"default", "groundtruth"}
    after = _weights(hd.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "final" / "hyperdas.safetensors").is_file()
    cfg = json.loads((tmp_path / "train_config.json").read_text())
    assert cfg["method"] == "HyperDAS" and cfg["model_config"]["layer"] == 1


def test_resume_refuses_another_selector(tok, records, tmp_path):
    """The rotary and additive selectors have the same weights but different scores: a run
    resumed with the other one would train half of each. Refused; so is resuming, with the
    rotary default, a checkpoint saved before checkpoints recorded the selector (additive)."""
    from hyperdas_fast.models.hyperdas import HyperDAS

    def hyperdas(selector):
        return HyperDAS(tiny_llama(len(tok)), layer=1, feature_dim=8, num_hypernet_layers=1, tokenizer=tok,
                        seed=3, selector=selector)

    cfg = dict(epochs=1, max_steps=2, checkpoint_every=1, final_eval=False)
    Trainer(hyperdas("additive"), _cfg(records, tmp_path, **cfg)).train()
    with pytest.raises(ValueError, match=r"model was built with selector='additive' \(now 'rotary'\)"):
        Trainer(hyperdas("rotary"), _cfg(records, tmp_path, **cfg, resume=True)).train()
    Trainer(hyperdas("additive"), _cfg(records, tmp_path, **cfg, resume=True)).train()  # the same one resumes
    # a checkpoint without model_config (older than the option) counts as additive
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = ckpt.latest_checkpoint(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(metadata["state"])
    assert state["trainer"]["model_config"]["selector"] == "additive"
    state["trainer"].pop("model_config")
    save_file(tensors, str(path), metadata={**metadata, "state": json.dumps(state)})
    with pytest.raises(ValueError, match=r"selector='additive' \(now 'rotary'\)"):
        Trainer(hyperdas("rotary"), _cfg(records, tmp_path, **cfg, resume=True)).train()
    # the same for the hypernetwork's rotary keys (off in a checkpoint older than the option)
    rotary_keys = HyperDAS(tiny_llama(len(tok)), layer=1, feature_dim=8, num_hypernet_layers=1, tokenizer=tok,
                           seed=3, selector="additive", hypernet_rotary=True)
    with pytest.raises(ValueError, match=r"hypernet_rotary=False \(now True\)"):
        Trainer(rotary_keys, _cfg(records, tmp_path, **cfg, resume=True)).train()


def test_resume_checks_a_bare_models_options_but_not_its_initialisation(tok, records, tmp_path):
    """A bare HyperDASModel records its layer, feature_dim, subspace and selector too: resuming
    at another layer (same weight shapes) is refused. init_from_target only decided the
    initial weights, which the resume overwrites: a resume with the other value goes on."""
    from hyperdas_fast.models.hyperdas import HyperDAS, HyperDASModel

    cfg = dict(epochs=1, max_steps=2, checkpoint_every=1, final_eval=False)
    bare = lambda layer: HyperDASModel(tiny_llama(len(tok)), layer=layer, feature_dim=8, num_hypernet_layers=1)
    Trainer(bare(1), _cfg(records, tmp_path / "bare", **cfg), tokenizer=tok).train()
    written = json.loads((tmp_path / "bare" / "train_config.json").read_text())["model_config"]
    assert written == {"layer": 1, "feature_dim": 8, "num_hypernet_layers": 1, "subspace": "reflect",
                       "selector": "rotary", "hypernet_rotary": False, "hypernet_qk_norm": False}
    with pytest.raises(ValueError, match=r"layer=1 \(now 2\)"):
        Trainer(bare(2), _cfg(records, tmp_path / "bare", **cfg, resume=True), tokenizer=tok).train()

    def wrapped(init):
        return HyperDAS(tiny_llama(len(tok)), layer=1, feature_dim=8, num_hypernet_layers=1, tokenizer=tok, seed=3,
                        init_from_target=init)

    Trainer(wrapped(True), _cfg(records, tmp_path / "wrapped", **cfg)).train()
    Trainer(wrapped(False), _cfg(records, tmp_path / "wrapped", **cfg, resume=True)).train()


def test_periodic_eval_spreads_over_domains_and_sizes_are_checked():
    """The periodic evaluation's eval_max_examples records are spread over the test records
    (grouped by domain and attribute), where the first ones covered only the first domain
    or two; the optional sizes are refused at 0, below 0 and as bools."""
    from hyperdas_fast.training.trainer import TrainConfig, spread

    records = [("city", i) for i in range(100)] + [("nobel", i) for i in range(100)] + [("occupation", i) for i in range(56)]
    picked = spread(records, 128)
    assert len(picked) == 128 and len(set(picked)) == 128
    assert {d for d, _ in picked} == {"city", "nobel", "occupation"}
    assert spread(records, None) == records and spread(records, 1000) == records
    for name in ("max_examples", "max_test_examples", "eval_max_examples", "max_steps"):
        for bad in (0, -5, True):
            with pytest.raises(ValueError, match=f"{name} must be a positive integer or None"):
                TrainConfig(**{name: bad}).validate()
