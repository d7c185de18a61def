"""The CLIs end to end on a tiny random Llama saved to disk (no knowledge filtering)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hyperdas_fast import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hyperdas_fast.models.default_model import default_model_dir

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _train_args(model_dir, run_dir, ravel_dir, method="mdas", extra=()):
    return ["--method", method, "--model", str(model_dir), "--domain", "city", "--attribute", "continent",
            "--layer", "1", "--feature_dim", "8", "--epochs", "1", "--max-steps", "2", "--batch_size", "4",
            "--no-filter", "--max-examples", "8", "--max-test-examples", "6", "--checkpoint_dir", str(run_dir),
            "--data-dir", str(ravel_dir), "--no-progress", "--num_hypernet_layers", "1", *extra]


@pytest.mark.parametrize("method", ["mdas", "hyperdas"])
def test_train_then_evaluate(method, tiny_model_dir, tmp_path, ravel_dir, monkeypatch):
    monkeypatch.delenv("HYPERDAS_FAST_RAVEL_DIR", raising=False)
    run = tmp_path / "run"
    # a relative --data-dir is stored absolute: evaluate.py then works from any directory
    monkeypatch.chdir(tmp_path)
    assert cli.train_main(_train_args(tiny_model_dir, run, os.path.relpath(ravel_dir), method)) == 0
    assert (run / "results.json").is_file() and (run / "final").is_dir()
    assert json.loads((run / "train_config.json").read_text())["train"]["data_dir"] == str(ravel_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # no --max-examples: the training run's --max-test-examples 6, i.e. the test set behind results.json
    assert cli.evaluate_main(["--model_path", str(run), "--no-progress"]) == 0
    result = json.loads((run / "eval_city_continent.json").read_text())
    assert result["method"] == ("MDAS" if method == "mdas" else "HyperDAS")
    assert result["test_examples"] == 6
    md = (run / "eval_city_continent_table.md").read_text()
    assert "| Method | City | Nobel Laureate | Occupation | Physical Object | Verb | Average |" in md
    # the training checkpoint file evaluates too, into its own file beside the final model's
    ckpt = sorted(run.glob("ckpt-*.safetensors"))[-1]
    final_eval = (run / "eval_city_continent.json").read_text()
    assert cli.evaluate_main(["--model_path", str(ckpt), "--max-examples", "6", "--no-progress"]) == 0
    again = json.loads((run / f"eval_city_continent_{ckpt.stem}.json").read_text())
    assert (run / "eval_city_continent.json").read_text() == final_eval
    mode = again["primary_mode"]
    assert again["metrics"][mode]["overall"] == result["metrics"][mode]["overall"]
    # --out with a dot in its name: the extension is appended, not substituted
    assert cli.evaluate_main(["--model_path", str(ckpt), "--max-examples", "6", "--no-progress",
                              "--out", str(tmp_path / "from_ckpt.v1.5")]) == 0
    assert json.loads((tmp_path / "from_ckpt.v1.5.json").read_text())["metrics"] == again["metrics"]
    # the run folder now holds a run: a new one there is refused (exit 2) unless it --overwrite's it
    monkeypatch.chdir(tmp_path)
    args = _train_args(tiny_model_dir, run, os.path.relpath(ravel_dir), method, ("--no_final_eval",))
    assert cli.train_main(args) == 2
    assert (run / "results.json").is_file()
    assert cli.train_main(args + ["--overwrite"]) == 0
    assert not (run / "results.json").exists() and not list(run.glob("eval_*"))


def test_hypernet_qk_norm_flag_and_runs_from_before_it(tmp_path, ravel_dir, monkeypatch):
    """A Qwen3 target: its q/k norms are copied by default and recorded; --no-hypernet-qk-norm
    builds without them; a run from before the option (no hypernet_qk_norm anywhere, no norm
    weights) evaluates from its training checkpoint, and resumes only with the flag."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from hyperdas_fast.models.default_model import default_model_dir

    monkeypatch.delenv("HYPERDAS_FAST_RAVEL_DIR", raising=False)
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny_qwen3"
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=256, tie_word_embeddings=True)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    def model_config(run):
        return json.loads((run / "train_config.json").read_text())["model_config"]

    on, off = tmp_path / "on", tmp_path / "off"
    assert cli.train_main(_train_args(model_dir, on, ravel_dir, "hyperdas", ("--no_final_eval",))) == 0
    assert model_config(on)["hypernet_qk_norm"] is True
    with safe_open(str(sorted(on.glob("ckpt-*.safetensors"))[-1]), "pt") as f:
        assert [k for k in f.keys() if "xattn" in k and "k_norm" in k]  # (the copied blocks have theirs too)
    assert cli.train_main(_train_args(model_dir, off, ravel_dir, "hyperdas",
                                      ("--no_final_eval", "--no-hypernet-qk-norm"))) == 0
    assert model_config(off)["hypernet_qk_norm"] is False
    # "off" as a run from before the option: the key removed from its config and checkpoints
    cfg = json.loads((off / "train_config.json").read_text())
    del cfg["model_config"]["hypernet_qk_norm"]
    (off / "train_config.json").write_text(json.dumps(cfg))
    for ckpt_file in off.glob("ckpt-*.safetensors"):
        with safe_open(str(ckpt_file), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        assert not [k for k in tensors if "xattn" in k and ("q_norm" in k or "k_norm" in k)]
        state = json.loads(meta["state"])
        del state["trainer"]["model_config"]["hypernet_qk_norm"]
        meta["state"] = json.dumps(state)
        save_file(tensors, str(ckpt_file), metadata=meta)
    last = sorted(off.glob("ckpt-*.safetensors"))[-1]
    assert cli.evaluate_main(["--model_path", str(last), "--max-examples", "6", "--no-progress"]) == 0
    resume = _train_args(model_dir, off, ravel_dir, "hyperdas", ("--no_final_eval", "--resume", "--max-steps", "3"))
    assert cli.train_main(resume) == 2  # built with the norms now: refused, naming hypernet_qk_norm
    assert cli.train_main(resume + ["--no-hypernet-qk-norm"]) == 0


def test_same_seed_same_weights(tiny_model_dir, tmp_path, ravel_dir):
    """The same training command with the same --seed gives bitwise the same weights, whatever
    the global RNG state before it (the initialisation used to come from the unseeded RNG)."""
    from safetensors.torch import load_file

    weights = []
    for i, seed in enumerate((11, 11, 12)):
        torch.manual_seed(100 + i)
        run = tmp_path / f"run{i}"
        args = _train_args(tiny_model_dir, run, ravel_dir, "hyperdas", ("--seed", str(seed), "--no_final_eval"))
        assert cli.train_main(args) == 0
        weights.append(load_file(str(run / "final" / "hyperdas.safetensors")))
    a, b, c = weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_table_subcommand(tmp_path):
    def res(method, domain, value):
        return {"method": method, "domain": domain, "primary_mode": "default",
                "metrics": {"default": {"domains": {domain: {"disentangle": value}}}}}

    files = []
    for i, r in enumerate([res("HyperDAS", "city", 0.5), res("MDAS", "city", 0.25), res("HyperDAS", "verb", 1.0)]):
        p = tmp_path / f"r{i}.json"
        p.write_text(json.dumps(r))
        files.append(str(p))
    assert cli.main(["table", *files, "--out", str(tmp_path / "table")]) == 0
    md = (tmp_path / "table.md").read_text().splitlines()
    assert md[2].startswith("| MDAS | 25.0 |") and md[3] == "| HyperDAS | 50.0 | - | - | - | 100.0 | 75.0 |"
    table = json.loads((tmp_path / "table.json").read_text())["table"]
    assert table["HyperDAS"]["Average"] == 75.0
    # --mode: HyperDAS reports global_argmax where it has it; MDAS (groundtruth only) keeps its primary mode
    r = res("HyperDAS", "city", 0.5)
    r["metrics"]["global_argmax"] = {"domains": {"city": {"disentangle": 0.75}}}
    m = {"method": "MDAS", "domain": "city", "primary_mode": "groundtruth",
         "metrics": {"groundtruth": {"domains": {"city": {"disentangle": 0.25}}}}}
    (tmp_path / "h.json").write_text(json.dumps(r))
    (tmp_path / "m.json").write_text(json.dumps(m))
    assert cli.main(["table", str(tmp_path / "h.json"), str(tmp_path / "m.json"), "--mode", "global_argmax",
                     "--out", str(tmp_path / "t2")]) == 0
    t2 = json.loads((tmp_path / "t2.json").read_text())
    assert t2["table"]["HyperDAS"]["City"] == 75.0 and t2["table"]["MDAS"]["City"] == 25.0
    assert [s["mode_used"] for s in t2["sources"]] == ["global_argmax", "groundtruth"]
    # --out with dots in its name keeps them ("table.v1.5" used to write table.v1.json)
    assert cli.main(["table", files[0], "--out", str(tmp_path / "table.v1.5")]) == 0
    assert (tmp_path / "table.v1.5.json").is_file() and (tmp_path / "table.v1.5.md").is_file()
    assert not (tmp_path / "table.v1.json").exists()


def test_table_bad_inputs(tmp_path, capsys):
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    assert cli.main(["table", str(listed), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert str(listed) in err and "expected a JSON object" in err
    with pytest.raises(SystemExit) as exc:
        cli.main(["table", str(listed), "--mode", "bogus"])
    assert exc.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_bad_inputs(tiny_model_dir, tmp_path, ravel_dir, capsys, monkeypatch):
    assert cli.train_main(["--data-dir", str(tmp_path / "missing")]) == 2
    assert "RAVEL data directory not found" in capsys.readouterr().err
    assert cli.train_main(["--domain", "planets", "--data-dir", str(ravel_dir)]) == 2
    assert "domain must be one of" in capsys.readouterr().err
    assert cli.train_main(["--domain", "city", "--attribute", "mayor", "--data-dir", str(ravel_dir)]) == 2
    assert "attribute for domain 'city' must be one of" in capsys.readouterr().err
    assert cli.evaluate_main(["--model_path", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err
    # a corrupt trained model: clear error, no result written
    run = tmp_path / "run"
    assert cli.train_main(_train_args(tiny_model_dir, run, ravel_dir, extra=["--no_final_eval"])) == 0
    # $HYPERDAS_FAST_RAVEL_DIR beats the data folder stored at training time (data moved / another machine)
    monkeypatch.setenv("HYPERDAS_FAST_RAVEL_DIR", str(tmp_path / "moved_ravel"))
    assert cli.evaluate_main(["--model_path", str(run), "--no-progress"]) == 2
    assert f"RAVEL data directory not found: {tmp_path / 'moved_ravel'}" in capsys.readouterr().err
    monkeypatch.delenv("HYPERDAS_FAST_RAVEL_DIR")
    weights = run / "final" / "mdas.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    assert cli.evaluate_main(["--model_path", str(run), "--no-progress"]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert not list(run.glob("eval_*"))
    ckpt = sorted(run.glob("ckpt-*.safetensors"))[-1]
    data = bytearray(ckpt.read_bytes())
    data[-8] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    assert cli.evaluate_main(["--model_path", str(ckpt), "--no-progress"]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_bad_train_options(tmp_path, ravel_dir, monkeypatch, capsys):
    """Errors that come before any training: each one line naming the culprit, exit status 2."""
    # a misspelt inference mode is an argparse error listing the valid ones (it used to be dropped)
    for option in ("--final_eval_modes", "--eval-modes"):
        with pytest.raises(SystemExit) as exc:
            cli.train_main([option, "default", "global_argmx", "--data-dir", str(ravel_dir)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "invalid choice: 'global_argmx'" in err and "global_argmax" in err
    # a path-like --model that does not exist is named, not sent to the hub as a repo id
    missing = tmp_path / "no_such_model"
    assert cli.train_main(["--model", str(missing), "--data-dir", str(ravel_dir)]) == 2
    assert f"model path not found: {missing}" in capsys.readouterr().err
    # an empty data folder is named in the error
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.train_main(["--data-dir", str(empty)]) == 2
    assert f"no split folders in the RAVEL data directory {empty.resolve()}" in capsys.readouterr().err
    # --device cuda without CUDA: a clear error, not torch's AssertionError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.train_main(["--device", "cuda", "--data-dir", str(ravel_dir)]) == 2
    assert "--device cuda requested but CUDA is not available" in capsys.readouterr().err
    assert cli.evaluate_main(["--model_path", str(tmp_path), "--device", "cuda:0"]) == 2
    assert "--device cuda:0 requested but CUDA is not available" in capsys.readouterr().err


def test_resolve_model_path(tmp_path, monkeypatch):
    from hyperdas_fast.models.default_model import resolve_model_path

    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # hub name: as given
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    for missing in ("./gone", "../gone", "~/surely_not_a_model_dir_here", str(tmp_path / "gone")):
        with pytest.raises(FileNotFoundError, match=re.escape(f"model path not found: {missing}")):
            resolve_model_path(missing)


def test_entry_scripts_help():
    for script in ("train.py", "evaluate.py"):
        out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0 and "--domain" in out.stdout
