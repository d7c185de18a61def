import json
import os
import re
import types

import pytest
import torch

from hyperdas_fast.data import ravel


def _row(entity, cf, causal=True, target="France", cf_target="Italy", prefix=None):
    prefix = prefix if prefix is not None else f"city: {entity}"
    return {
        "input_prefix": prefix,
        "input_suffix": ", country:",
        "counterfactual_input_prefix": f"city: {cf}",
        "counterfactual_input_suffix": ", country:",
        "edit_instruction": f"{entity} ; {cf} - Country",
        "entity": entity,
        "counterfactual_entity": cf,
        "target": target,
        "counterfactual_target": cf_target,
        "attribute_type": "causal" if causal else "isolate",
        "domain": "city",
        "attribute": "Country" if causal else "Continent",
        "verify_text": f"city: {cf}, country:" if causal else f"city: {entity}, country:",
    }


def test_default_dir_and_env(tmp_path, monkeypatch, ravel_dir):
    monkeypatch.delenv(ravel.ENV_VAR, raising=False)
    assert ravel.default_data_dir().name == "ravel"
    monkeypatch.setenv(ravel.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="HYPERDAS_FAST_RAVEL_DIR"):
        ravel.load_rows("city", "country", "test")
    with pytest.raises(FileNotFoundError, match="data-dir"):
        ravel.resolve_data_dir(tmp_path / "missing")


def test_available_and_errors(ravel_dir):
    splits = ravel.available_splits(ravel_dir)
    assert set(splits) == set(ravel.DOMAINS)
    assert "country_of_birth" in splits["nobel_prize_winner"]
    assert "work_location" in splits["occupation"]
    with pytest.raises(ValueError, match="domain must be one of"):
        ravel.load_rows("planets", data_dir=ravel_dir)
    with pytest.raises(ValueError, match="country, language"):
        ravel.load_rows("city", "population", data_dir=ravel_dir)
    with pytest.raises(ValueError, match="split"):
        ravel.load_rows("city", "country", "dev", data_dir=ravel_dir)


def test_empty_data_dir_is_named(tmp_path):
    with pytest.raises(ValueError, match=f"no split folders in the RAVEL data directory {re.escape(str(tmp_path.resolve()))}"):
        ravel.load_rows("city", "country", "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match=f"no RAVEL domain has split folders .* {re.escape(str(tmp_path.resolve()))}"):
        ravel.load_rows("all", None, "test", data_dir=tmp_path)


def test_given_split_and_built_split(ravel_dir):
    train = ravel.load_rows("city", "language", "train", ravel_dir)
    assert len(train) == 11944 and train[0]["split_source"] == "given"
    assert all(r["edit_attribute"] == "language" for r in train[:50])
    tr = ravel.load_rows("verb", "past_tense", "train", ravel_dir, seed=3)
    te = ravel.load_rows("verb", "past_tense", "test", ravel_dir, seed=3)
    assert tr and te and tr[0]["split_source"] == "built"
    ents = lambda rows: {r["entity"] for r in rows} | {r["counterfactual_entity"] for r in rows}
    assert not ents(tr) & ents(te)
    # deterministic for a seed, different for another
    again = ravel.load_rows("verb", "past_tense", "train", ravel_dir, seed=3)
    assert [r["entity"] for r in again] == [r["entity"] for r in tr]
    other = ravel.load_rows("verb", "past_tense", "train", ravel_dir, seed=4)
    assert [r["entity"] for r in other] != [r["entity"] for r in tr]


def test_domain_and_all(ravel_dir):
    rows = ravel.load_rows("occupation", None, "train", ravel_dir)
    assert {r["edit_attribute"] for r in rows} == {"duty", "industry", "work_location"}
    assert ravel.list_attributes("Nobel Laureate", ravel_dir)[0] == "award_year"


def test_all_domains_caps_each_domain(ravel_dir, smollm2):
    """--domain all: max_examples caps every domain, and each domain's records are those
    of a single-domain load (HyperDAS on "all" and per-domain MDAS see the same examples)."""
    _, tok = smollm2
    both = ravel.load_dataset("all", None, "test", ravel_dir, tokenizer=tok, filter=False, max_examples=3, seed=1)
    by_domain = {}
    for r in both:
        by_domain.setdefault(r["domain"], []).append(r)
    assert sorted(by_domain) == sorted(ravel.DOMAINS)
    assert all(len(v) == 3 for v in by_domain.values())
    one = ravel.load_dataset("occupation", None, "test", ravel_dir, tokenizer=tok, filter=False, max_examples=3, seed=1)
    assert by_domain["occupation"] == one


def test_entity_disjoint_split_small():
    rows = [_row(f"E{i}", f"E{(i * 7 + 3) % 20}") for i in range(20)]
    tr, te = ravel.entity_disjoint_split(rows, 0.5, seed=1)
    ents = lambda rows: {r["entity"] for r in rows} | {r["counterfactual_entity"] for r in rows}
    assert not ents(tr) & ents(te)
    with pytest.raises(ValueError, match="test_fraction"):
        ravel.entity_disjoint_split(rows, 1.5)


def test_records_and_entity_positions(smollm2):
    _, tok = smollm2
    rows = [
        _row("Boston", "Paris"),
        _row("Boston", "Paris", causal=False, prefix='[{"city": "Boston'),
    ]
    rows[1]["input_suffix"] = '", "country": "'
    recs = ravel.to_records(rows, tok)
    assert recs[0]["label"] == " Italy" and recs[0]["is_causal"]
    assert recs[1]["label"] == "France" and not recs[1]["is_causal"]
    for rec, row in zip(recs, rows):
        ids = tok(rec["base_prompt"])["input_ids"]
        piece = tok.decode(ids[: rec["base_entity_pos"] + 1])
        assert piece.rstrip().endswith("Boston"), piece
        sids = tok(rec["counterfactual_prompt"])["input_ids"]
        assert tok.decode(sids[: rec["source_entity_pos"] + 1]).endswith("Paris")
    assert recs[0]["concept"] == "Boston ; Paris - Country"


def test_answer_matching():
    assert ravel.answer_matches(' United States.\n\nThe', "United States")
    assert ravel.answer_matches('France"}, {"city', "France")
    assert not ravel.answer_matches(" Franceville", "France")
    assert not ravel.answer_matches(" the United states", "United States")
    # case is kept: the metric scores the label's exact tokens
    assert not ravel.answer_matches(" United states.", "United States")
    assert ravel.normalize_answer("United States") == ravel.normalize_answer("united states")
    assert ravel.extract_answer(' Zambia.\n\nThe answer') == "Zambia"
    assert ravel.extract_answer('Mexico"}, {"city": "') == "Mexico"
    assert ravel.extract_answer(" 28.6, lng") == "28.6"


class _FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))


def test_model_fingerprint_ignores_where_the_model_was_loaded_from(tmp_path):
    """The knowledge-filter cache key: the same weights and tokenizer loaded from another
    folder (another HYPERDAS_FAST_CACHE) give the same key, so the filter is not re-run;
    other weights give another key."""
    import shutil

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hyperdas_fast.models.default_model import default_model_dir

    copy = tmp_path / "copy"
    copy.mkdir()
    for f in default_model_dir().iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, copy / f.name)
    tokenizers = [AutoTokenizer.from_pretrained(default_model_dir()), AutoTokenizer.from_pretrained(copy)]
    assert tokenizers[0].name_or_path != tokenizers[1].name_or_path

    def tiny(seed, path):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2))
        model.config._name_or_path = path
        return model

    a = ravel.model_fingerprint(tiny(0, str(default_model_dir())), tokenizers[0])
    assert ravel.model_fingerprint(tiny(0, str(copy)), tokenizers[1]) == a
    assert ravel.model_fingerprint(tiny(1, str(copy)), tokenizers[1]) != a
    # weights changed only past the first tensors (a model fine-tuned in its later layers)
    later = tiny(0, str(copy))
    with torch.no_grad():
        list(later.parameters())[-2].add_(1.0)
    assert ravel.model_fingerprint(later, tokenizers[1]) != a


def test_filter_logic_and_cache(tmp_path, monkeypatch):
    rows = [
        _row("A", "B", True, "France", "Italy"),   # known
        _row("C", "D", True, "Spain", "Peru"),     # base unknown
        _row("E", "F", False, "Chad", "Mali"),     # isolation, known
    ]
    answers = {
        "city: A, country:": " France.", "city: B, country:": " Italy\n",
        "city: C, country:": " Brazil", "city: D, country:": " Peru",
        "city: E, country:": " Chad",
    }
    calls = []

    def fake_generate(model, tok, prompts, max_new_tokens=6, batch_size=32):
        calls.append(list(prompts))
        return [answers[p] for p in prompts]

    monkeypatch.setattr(ravel, "greedy_generate", fake_generate)
    model = _FakeModel()
    kept = ravel.filter_known(rows, model, None, cache_dir=tmp_path)
    assert sorted(r["entity"] for r in kept) == ["A", "E"]
    n_calls = len(calls)
    again = ravel.filter_known(rows, model, None, cache_dir=tmp_path)
    assert again == kept and len(calls) == n_calls  # served from the cache
    labelled = ravel.filter_known(rows, model, None, label_mode="model", cache_dir=tmp_path)
    assert len(calls) == n_calls  # generations cached per prompt
    by = {r["entity"]: r["model_label"] for r in labelled}
    assert by == {"A": "Italy", "C": "Peru", "E": "Chad"}
    files = list(tmp_path.rglob("*.json"))
    assert files and not list(tmp_path.rglob("*.tmp"))
    # another generation length is another cache: with 1 token, " France." still matches, but
    # nothing of the 6-token run is served to it
    n_calls = len(calls)
    ravel.filter_known(rows, model, None, max_new_tokens=1, cache_dir=tmp_path)
    assert len(calls) > n_calls
    with pytest.raises(ValueError, match="label_mode"):
        ravel.filter_known(rows, model, None, label_mode="guess", cache_dir=tmp_path)


class _WordTokenizer:
    """Counts words as tokens (what filter_known asks of a tokenizer in label mode "data")."""

    def __call__(self, text, add_special_tokens=True):
        return types.SimpleNamespace(input_ids=text.split())

    def __len__(self):
        return 100


def test_filter_generates_long_enough_for_long_values(tmp_path, monkeypatch):
    """A value longer than max_new_tokens gets a continuation of its length plus one (so it
    can match at all); every other prompt keeps max_new_tokens, and the generations of each
    length go to that length's cache."""
    long_value = "Central African Republic of the Congo"  # 6 words
    rows = [_row("A", "B", True, "France", long_value), _row("C", "D", False, long_value, "Peru"),
            _row("E", "B", True, "France", "Peru")]  # B's prompt again, now expecting a short value
    truth = {"city: A, country:": " France", "city: B, country:": f" {long_value} and more",
             "city: C, country:": f" {long_value}.", "city: E, country:": " France"}
    calls = []

    def fake_generate(model, tok, prompts, max_new_tokens=6, batch_size=32):
        calls.append((max_new_tokens, sorted(prompts)))
        return [" " + " ".join(truth[p].split()[:max_new_tokens]) for p in prompts]

    monkeypatch.setattr(ravel, "greedy_generate", fake_generate)
    # both row orders: a prompt needed at two lengths gets the longer one, whichever row comes last
    for i, order in enumerate((rows, rows[::-1])):
        calls.clear()
        kept = ravel.filter_known(order, _FakeModel(), _WordTokenizer(), max_new_tokens=3, cache_dir=tmp_path / str(i))
        assert sorted(r["entity"] for r in kept) == ["A", "C"]
        assert sorted(calls) == [(3, ["city: A, country:", "city: E, country:"]),
                                 (7, ["city: B, country:", "city: C, country:"])]
        assert sorted(p.name for p in (tmp_path / str(i)).rglob("generations-*.json")) == [
            "generations-3.json", "generations-7.json"]
    # without a tokenizer to count with, every prompt gets max_new_tokens: the long values fail
    calls.clear()
    assert ravel.filter_known(rows, _FakeModel(), None, max_new_tokens=3, cache_dir=tmp_path / "plain") == []
    assert [n for n, _ in calls] == [3]


def test_no_usable_rows(tmp_path, monkeypatch, ravel_dir, smollm2):
    _, tok = smollm2
    monkeypatch.setattr(ravel, "greedy_generate", lambda m, t, p, *a, **k: ["???"] * len(p))
    monkeypatch.setattr(ravel, "filter_cache_dir", lambda: tmp_path)
    with pytest.raises(ValueError, match="no usable rows"):
        ravel.load_dataset("verb", "past_tense", "test", ravel_dir, model=_FakeModel(), tokenizer=tok, max_examples=5)


@pytest.mark.slow
def test_filter_real_model(tmp_path, smollm2, ravel_dir):
    model, tok = smollm2
    rows = ravel.load_rows("city", "continent", "test", ravel_dir)[:12]
    kept = ravel.filter_known(rows, model, tok, label_mode="model", max_examples=3, cache_dir=tmp_path, batch_size=8)
    assert 1 <= len(kept) <= 3 and all(r["model_label"] for r in kept)
    recs = ravel.to_records(kept, tok)
    assert all(isinstance(r["base_entity_pos"], int) for r in recs)
    gen = json.loads(next(tmp_path.rglob("generations-*.json")).read_text())
    assert gen


def _download_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "download_ravel.py"
    spec = importlib.util.spec_from_file_location("download_ravel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_download_parsing_on_local_files(ravel_dir, tmp_path):
    import shutil

    dl = _download_module()
    listing = [{"name": n.name, "type": "dir" if n.is_dir() else "file"} for n in ravel_dir.iterdir()]
    listing += [{"name": "README.md", "type": "file"}, {"name": "scratch", "type": "dir"}]
    names = dl.split_names(listing)
    assert "city_country_test" in names and "occupation_duty_train" in names and "scratch" not in names
    state = (ravel_dir / "city_country_test" / "state.json").read_text()
    assert dl.data_files(state) == ["data-00000-of-00001.arrow"]
    with pytest.raises(ValueError):
        dl.data_files(json.dumps({"_data_files": [{"filename": "../evil"}]}))
    assert dl.is_lfs_pointer(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    assert not dl.is_lfs_pointer((ravel_dir / "city_country_test" / "data-00000-of-00001.arrow").read_bytes()[:64])
    copy = tmp_path / "verb_past_tense_test"
    shutil.copytree(ravel_dir / "verb_past_tense_test", copy)
    assert dl.check_split(copy) == 3776


def test_unreadable_split_and_bad_max_examples_are_named(tmp_path, ravel_dir):
    """A split folder that datasets cannot read (malformed state.json, a cut arrow file)
    gives a ValueError naming the folder, where the bare JSONDecodeError / OSError named
    none; max_examples <= 0 is refused without the filter too (-5 had sliced off the last 5
    rows, 0 blamed the knowledge filter)."""
    import shutil
    from pathlib import Path

    split = next(p for p in Path(ravel_dir).iterdir() if p.name == "city_country_test")
    bad = tmp_path / "bad"
    shutil.copytree(split, bad / split.name)
    (bad / split.name / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"city_country_test is unreadable: JSONDecodeError"):
        ravel.load_rows("city", "country", "test", bad)
    arrow = next((bad / split.name).glob("*.arrow"))
    shutil.copytree(split, tmp_path / "cut" / split.name)
    cut = tmp_path / "cut" / split.name / arrow.name
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 3])
    with pytest.raises(ValueError, match="is unreadable"):
        ravel.load_rows("city", "country", "test", tmp_path / "cut")
    for bad_max in (0, -5):
        with pytest.raises(ValueError, match="max_examples must be a positive integer"):
            ravel.load_dataset("city", "country", "test", ravel_dir, tokenizer=object(), filter=False,
                               max_examples=bad_max)
