"""Sweeps: batching by length and token budget, streaming JSONL output, resume after a
crash or a SIGKILL with every id written exactly once, malformed input lines."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from hyperdas_fast import sweep

ROOT = Path(__file__).resolve().parents[1]


def make_records(n, start=0):
    return [
        {"id": f"ex{i}", "base": "b" * (5 + (i * 7) % 40), "counterfactual": f"cf {i}", "concept": "city - country"}
        for i in range(start, start + n)
    ]


def fake_intervene(bases, cfs, concepts):
    return [f"{b[:3]}|{c}" for b, c in zip(bases, cfs)]


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def read_output(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def assert_exactly_once(path, ids):
    counts = Counter(row["id"] for row in read_output(path))
    assert set(counts) == set(ids)
    assert max(counts.values()) == 1
    for row in read_output(path):
        assert row["output"] == fake_intervene([row["base"]], [row["counterfactual"]], [row["concept"]])[0]


def test_batches_sorted_and_within_token_budget():
    records = [{"id": i, "base": "x" * n, "counterfactual": "", "concept": ""} for i, n in enumerate([40, 4, 80, 8, 12, 400])]
    length = lambda r: len(r["base"]) + 1  # noqa: E731
    batches = sweep.plan_batches(records, length, batch_tokens=100, max_batch_size=3)
    flat = [length(r) for b in batches for r in b]
    assert flat == sorted(flat)
    assert sorted(r["id"] for b in batches for r in b) == list(range(6))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * max(length(r) for r in batch) <= 100
    assert [r["id"] for r in batches[-1]] == [5]  # longer than the budget: alone


def test_streams_results_from_list_generator_and_dataset(tmp_path):
    import datasets

    records = make_records(50)
    calls = []

    def fn(b, c, k):
        calls.append(len(b))
        return fake_intervene(b, c, k)

    streamed = list(sweep.iter_sweep(records, None, fn, batch_tokens=64, progress=False))
    assert sorted(r["id"] for r in streamed) == sorted(r["id"] for r in records)
    assert len(calls) > 1 and max(calls) <= 64
    gen = (r for r in records)
    summary = sweep.run_sweep(gen, tmp_path / "gen.jsonl", fake_intervene, progress=False)
    assert summary.written == 50
    assert_exactly_once(tmp_path / "gen.jsonl", [r["id"] for r in records])
    ds = datasets.Dataset.from_list(records)
    summary = sweep.run_sweep(ds, tmp_path / "ds.jsonl", fake_intervene, progress=True)
    assert summary.written == 50
    assert_exactly_once(tmp_path / "ds.jsonl", [r["id"] for r in records])


def test_aliases_and_default_ids():
    rows = [{"base_prompt": "a", "source": "b", "edit_instruction": "c"}, {"base": "d", "counterfactual": "e", "concept": "f"}]
    out = list(sweep.iter_sweep(rows, None, fake_intervene, progress=False))
    assert sorted(r["id"] for r in out) == [0, 1]
    assert {r["base"] for r in out} == {"a", "d"}


def test_crash_in_callable_then_resume_each_id_once(tmp_path):
    records = make_records(1000)
    out = tmp_path / "out.jsonl"
    state = {"batches": 0}

    def flaky(b, c, k):
        state["batches"] += 1
        if state["batches"] == 8:
            raise RuntimeError("simulated crash")
        return fake_intervene(b, c, k)

    with pytest.raises(RuntimeError, match="simulated crash"):
        sweep.run_sweep(records, out, flaky, batch_tokens=512, max_batch_size=64, sort_window=300, progress=False)
    written = len(read_output(out))
    assert 0 < written < 1000
    summary = sweep.run_sweep(records, out, fake_intervene, batch_tokens=512, sort_window=300, progress=False)
    assert summary.already_done == written
    assert summary.written == 1000 - written
    assert_exactly_once(out, [r["id"] for r in records])
    # a third run has nothing left to do
    assert sweep.run_sweep(records, out, fake_intervene, progress=False).written == 0


def test_truncated_last_line_is_cut_and_redone(tmp_path):
    records = make_records(30)
    out = tmp_path / "out.jsonl"
    sweep.run_sweep(records[:10], out, fake_intervene, progress=False)
    with open(out, "a") as handle:
        handle.write('{"id": "ex10", "base": "bbb')  # a write cut by a kill
    summary = sweep.run_sweep(records, out, fake_intervene, progress=False)
    assert summary.truncated_bytes > 0
    assert summary.already_done == 10 and summary.written == 20
    assert_exactly_once(out, [r["id"] for r in records])


def test_corrupt_line_inside_output_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    write_jsonl(out, ["not json", {"id": "ex0", "output": 1}])
    with pytest.raises(ValueError, match="unreadable line"):
        sweep.run_sweep(make_records(2), out, fake_intervene, progress=False)


SIGKILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from hyperdas_fast import sweep

    def slow(b, c, k):
        time.sleep(0.02)
        return [f"{{x[:3]}}|{{y}}" for x, y in zip(b, c)]

    sweep.run_sweep({inp!r}, {out!r}, slow, batch_tokens=256, max_batch_size=16, progress=False)
    """
)


def test_sigkill_halfway_then_resume_each_id_once(tmp_path):
    records = make_records(1000)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, records)
    script = tmp_path / "run.py"
    script.write_text(SIGKILL_SCRIPT.format(root=str(ROOT), inp=str(inp), out=str(out)))
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 300:
                break
            time.sleep(0.005)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    written = out.read_bytes().count(b"\n")
    assert 300 <= written < 1000
    summary = sweep.run_sweep(inp, out, fake_intervene, progress=False)
    assert summary.written + summary.already_done == 1000
    assert_exactly_once(out, [r["id"] for r in records])


def test_malformed_lines_skip_mode(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = make_records(6)
    write_jsonl(inp, [good[0], good[1], "{not json", good[2], '["a list"]', {"id": "x", "base": "b"}, good[3],
                      {"id": "y", "base": 1, "counterfactual": "c", "concept": "d"}, good[4], good[5]])
    summary = sweep.run_sweep(inp, out, fake_intervene, on_bad_line="skip", progress=False)
    err = capsys.readouterr().err
    assert [b.where for b in summary.bad] == ["line 3", "line 5", "line 6", "line 8"]
    for n in (3, 5, 6, 8):
        assert f"line {n}:" in err
    assert "missing field 'counterfactual'" in err
    assert_exactly_once(out, [r["id"] for r in good])


def test_malformed_line_stop_mode_keeps_written_results(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = make_records(8)
    write_jsonl(inp, good[:5] + ["{broken"] + good[5:])
    with pytest.raises(ValueError, match="line 6"):
        sweep.run_sweep(inp, out, fake_intervene, on_bad_line="stop", progress=False)
    assert_exactly_once(out, [r["id"] for r in good[:5]])  # everything before the bad line
    # fix the line and resume: the rest is done once
    write_jsonl(inp, good)
    sweep.run_sweep(inp, out, fake_intervene, on_bad_line="stop", progress=False)
    assert_exactly_once(out, [r["id"] for r in good])


def test_duplicate_ids_written_once(tmp_path):
    rows = make_records(3) + make_records(2)
    summary = sweep.run_sweep(rows, tmp_path / "o.jsonl", fake_intervene, progress=False)
    assert summary.duplicates == 2
    assert_exactly_once(tmp_path / "o.jsonl", ["ex0", "ex1", "ex2"])


def test_duplicate_warning_names_both_lines(tmp_path, capsys):
    """The warning names where the skipped record and the first one were read, and says when
    the skipped id is a default one (a line without an id gets its line number, which an
    explicit id can already hold)."""
    rows = make_records(2)
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, [dict(rows[0], id=2), {k: v for k, v in rows[1].items() if k != "id"}])
    summary = sweep.run_sweep(inp, tmp_path / "o.jsonl", fake_intervene, progress=False)
    assert summary.duplicates == 1
    err = capsys.readouterr().err
    assert "duplicate id 2 at line 2 (its default id: it has none), first at line 1: skipped" in err, err
    assert [json.loads(x)["id"] for x in (tmp_path / "o.jsonl").read_text().splitlines()] == [2]


def test_bad_options_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="batch_tokens"):
        sweep.run_sweep(make_records(1), None, fake_intervene, batch_tokens=0)
    with pytest.raises(ValueError, match="on_bad_line"):
        sweep.run_sweep(make_records(1), None, fake_intervene, on_bad_line="ignore")
    with pytest.raises(FileNotFoundError, match="JSONL"):
        sweep.run_sweep(tmp_path / "missing.jsonl", None, fake_intervene)
    with pytest.raises(ValueError, match="returned 0 results"):
        sweep.run_sweep(make_records(2), None, lambda b, c, k: [], progress=False)


def test_main_intervene_cli(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = make_records(5)
    write_jsonl(inp, good[:2] + ["oops"] + good[2:])
    argv = ["--input", str(inp), "--output", str(out), "--batch-tokens", "64", "--no-progress"]
    assert sweep.main_intervene(argv + ["--on-bad-line", "stop"], intervene_fn=fake_intervene) == 1
    assert "line 3" in capsys.readouterr().err
    assert len(read_output(out)) == 2
    assert sweep.main_intervene(argv + ["--on-bad-line", "skip"], intervene_fn=fake_intervene) == 0
    assert_exactly_once(out, [r["id"] for r in good])
    # a Namespace from a parser built with add_intervene_arguments works too
    import argparse

    parser = sweep.add_intervene_arguments(argparse.ArgumentParser())
    args = parser.parse_args(argv)
    assert sweep.main_intervene(args, intervene_fn=fake_intervene) == 0
    assert sweep.main_intervene(["--input", str(tmp_path / "nope.jsonl"), "--output", str(out)]) == 2
    assert "--input" in capsys.readouterr().err


def test_sweep_on_a_small_random_model(tmp_path):
    """The per-batch callable runs a real (tiny, random) Llama: a DAS interchange at one
    layer, greedy next token. Resume after a crash gives each id once, same outputs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hyperdas_fast.integrations.pyvene import das_interchange

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core machine: two OpenMP threads thrash under load
    try:
        _run_small_model_sweep(tmp_path, torch, LlamaConfig, LlamaForCausalLM, das_interchange)
    finally:
        torch.set_num_threads(threads)


def _run_small_model_sweep(tmp_path, torch, LlamaConfig, LlamaForCausalLM, das_interchange):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    basis = torch.linalg.qr(torch.randn(32, 4))[0]

    def encode(texts):
        ids = [[3 + (ord(ch) % 120) for ch in t] or [3] for t in texts]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        return {"input_ids": input_ids, "attention_mask": mask}, [len(x) - 1 for x in ids]

    def model_fn(bases, cfs, concepts):
        b, bpos = encode(bases)
        s, spos = encode(cfs)
        logits = das_interchange(model, b, s, bpos, spos, 0, basis)
        return logits.argmax(-1).tolist()

    records = make_records(40)
    reference = {r["id"]: r["output"] for r in sweep.iter_sweep(records, None, model_fn, progress=False)}
    out = tmp_path / "o.jsonl"
    calls = {"n": 0}

    def crashing(b, c, k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return model_fn(b, c, k)

    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(records, out, crashing, batch_tokens=48, progress=False)
    sweep.run_sweep(records, out, model_fn, batch_tokens=48, progress=False)
    rows = read_output(out)
    assert Counter(r["id"] for r in rows) == Counter(reference.keys())
    assert {r["id"]: r["output"] for r in rows} == reference


def test_main_intervene_builds_the_default_callable(tmp_path, monkeypatch):
    """Without an injected callable, main_intervene asks default_intervene_fn (HyperDAS)
    for one with the CLI's options, and uses its tokenizer for the lengths."""
    seen = {}

    class Tok:
        def __call__(self, text):
            seen.setdefault("tokenized", 0)
            seen["tokenized"] += 1
            return type("Enc", (), {"input_ids": text.split()})()

    def fake_default(model_path, max_new_tokens=8, inference_mode="default"):
        seen.update(model_path=model_path, max_new_tokens=max_new_tokens, inference_mode=inference_mode)
        fn = lambda b, c, k: fake_intervene(b, c, k)  # noqa: E731
        fn.tokenizer = Tok()
        return fn

    monkeypatch.setattr(sweep, "default_intervene_fn", fake_default)
    inp, out, ckpt = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "ckpt"
    write_jsonl(inp, make_records(4))
    rc = sweep.main_intervene(["--input", str(inp), "--output", str(out), "--model-path", str(ckpt),
                               "--max-new-tokens", "3", "--no-progress"])
    assert rc == 0
    assert seen["model_path"] == str(ckpt) and seen["max_new_tokens"] == 3 and seen["tokenized"] == 12
    assert_exactly_once(out, [f"ex{i}" for i in range(4)])


def test_records_that_cannot_be_written_back_and_field_collisions(tmp_path):
    """A line with a lone surrogate (valid JSON, not writable as UTF-8) is a bad line, where
    it had stopped the sweep after the model ran, losing its window; a record's own
    'output' field is refused rather than replaced; an alias present beside the field it
    names (e.g. "source" next to "counterfactual") is kept as the record's own field."""
    rows = make_records(3)
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, [rows[0], '{"id": "bad", "base": "\\ud800", "counterfactual": "c", "concept": "x"}',
                      dict(rows[1], output="gold"), dict(rows[2], source="wiki")])
    summary = sweep.run_sweep(inp, tmp_path / "o.jsonl", fake_intervene, progress=False)
    assert [b.where for b in summary.bad] == ["line 2", "line 3"]
    out = {r["id"]: r for r in read_output(tmp_path / "o.jsonl")}
    assert set(out) == {"ex0", "ex2"} and out["ex2"]["source"] == "wiki"


def test_a_second_sweep_on_the_same_output_is_refused(tmp_path):
    """Two sweeps appending to one file each read the done ids once, so every id was
    written twice: the output file is locked while a sweep runs."""
    out = tmp_path / "o.jsonl"
    first = sweep.iter_sweep(make_records(4), out, fake_intervene, progress=False, sort_window=1)
    next(first)  # the first sweep is running and holds the file
    with pytest.raises(RuntimeError, match="another sweep is writing"):
        sweep.run_sweep(make_records(4), out, fake_intervene, progress=False)
    list(first)
    assert sorted(r["id"] for r in read_output(out)) == ["ex0", "ex1", "ex2", "ex3"]
    sweep.run_sweep(make_records(4), out, fake_intervene, progress=False)  # released: all done already


def test_output_written_from_another_input_is_flagged(tmp_path, capsys):
    """An output file holding results for the same (default) ids but other records: the ids
    are still skipped as done (ids are what resume goes by), and the sweep says so and
    counts them, where it had reported them as plain resumed work."""
    out = tmp_path / "o.jsonl"
    first = [{k: v for k, v in r.items() if k != "id"} for r in make_records(3)]
    sweep.run_sweep(first, out, fake_intervene, progress=False)
    again = sweep.run_sweep(first, out, fake_intervene, progress=False)
    assert again.already_done == 3 and again.done_for_other_records == 0
    other = [dict(r, base="another " + r["base"]) for r in first]
    summary = sweep.run_sweep(other, out, fake_intervene, progress=False)
    assert summary.already_done == 3 and summary.done_for_other_records == 3
    assert "for another record" in capsys.readouterr().err
