"""The CLIs end to end on a tiny random Llama saved to disk (no knowledge filtering)."""
import json
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
def test_train_then_evaluate(method, tiny_model_dir, tmp_path, ravel_dir):
    run = tmp_path / "run"
    assert cli.train_main(_train_args(tiny_model_dir, run, ravel_dir, method)) == 0
    assert (run / "results.json").is_file() and (run / "final").is_dir()
    assert cli.evaluate_main(["--model_path", str(run), "--max-examples", "6", "--no-progress"]) == 0
    result = json.loads((run / "eval_city_continent.json").read_text())
    assert result["method"] == ("MDAS" if method == "mdas" else "HyperDAS")
    assert result["test_examples"] == 6
    md = (run / "eval_city_continent_table.md").read_text()
    assert "| Method | City | Nobel Laureate | Occupation | Physical Object | Verb | Average |" in md
    # the training checkpoint file evaluates too
    ckpt = sorted(run.glob("ckpt-*.safetensors"))[-1]
    assert cli.evaluate_main(["--model_path", str(ckpt), "--max-examples", "6", "--no-progress",
                              "--out", str(tmp_path / "from_ckpt")]) == 0
    again = json.loads((tmp_path / "from_ckpt.json").read_text())
    mode = again["primary_mode"]
    assert again["metrics"][mode]["overall"] == result["metrics"][mode]["overall"]


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


def test_bad_inputs(tiny_model_dir, tmp_path, ravel_dir, capsys):
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


def test_entry_scripts_help():
    for script in ("train.py", "evaluate.py"):
        out = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0 and "--domain" in out.stdout
