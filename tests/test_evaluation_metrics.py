import json

import pytest
import torch

from hyperdas_fast.evaluation import metrics, tables


def _logits_for(pred, vocab=10):
    """one-hot-ish logits [B, T, V] whose argmax is ``pred`` [B, T]."""
    out = torch.zeros(*pred.shape, vocab)
    out.scatter_(-1, pred.unsqueeze(-1), 5.0)
    return out


def test_example_correct_first_three_tokens():
    labels = torch.full((4, 8), -100)
    labels[0, 2:4] = torch.tensor([1, 2])          # 2 tokens, both right
    labels[1, 1:6] = torch.tensor([3, 4, 5, 6, 7])  # 5 tokens, 4th wrong: still correct (first 3)
    labels[2, 0:3] = torch.tensor([1, 1, 1])        # 3rd wrong
    # row 3: no label tokens -> incorrect
    pred = labels.clamp_min(0).clone()
    pred[1, 4] = 0
    pred[2, 2] = 9
    logits = _logits_for(pred)
    got = metrics.example_correct(logits, labels)
    assert got.tolist() == [True, True, False, False]
    packed = logits[labels != -100]
    assert metrics.example_correct(packed, labels).tolist() == got.tolist()
    assert metrics.example_correct(logits, labels, max_label_tokens=5).tolist() == [True, False, False, False]
    with pytest.raises(ValueError, match="labels"):
        metrics.example_correct(logits[:, :5], labels)
    with pytest.raises(ValueError, match="packed"):
        metrics.example_correct(packed[:3], labels)


def test_accumulator_groups():
    acc = metrics.MetricAccumulator()
    acc.add([True, False, True, True], [True, True, False, False], ["city"] * 3 + ["verb"],
            ["country", "country", "country", "past_tense"])
    s = acc.summary()
    assert s["overall"]["causal"] == 0.5 and s["overall"]["isolation"] == 1.0
    assert s["overall"]["disentangle"] == 0.75
    # no causal example: disentangle is undefined (it had been the isolation score alone,
    # 100 for a model that never intervenes)
    assert s["domains"]["verb"] == {"causal": None, "isolation": 1.0, "n_causal": 0, "n_isolation": 1,
                                     "disentangle": None}
    assert s["attributes"]["city/country"]["n_causal"] == 2


class _Echo(torch.nn.Module):
    """Predicts the label when ``inference_mode`` is "default", garbage otherwise."""

    def forward(self, batch, inference_mode=None, logits_at="all"):
        labels = batch["labels"]
        pred = labels.clamp_min(0) if inference_mode == "default" else torch.zeros_like(labels)
        logits = _logits_for(pred, 50)
        if logits_at == "labels":
            logits = logits[labels != -100]
        return type("O", (), {"logits": logits, "weights": None})()


def test_evaluate_modes_and_batches():
    def collate(records):
        labels = torch.full((len(records), 4), -100)
        labels[:, 1] = torch.tensor([r["tok"] for r in records])
        return {"labels": labels, "is_causal": torch.tensor([r["is_causal"] for r in records])}

    records = [{"tok": i % 7 + 1, "is_causal": i % 2 == 0, "domain": "city", "attribute": "country"} for i in range(10)]
    res = metrics.evaluate(_Echo(), records, collate, modes=("default", "groundtruth"), batch_size=3)
    assert res["default"]["overall"]["disentangle"] == 1.0
    assert res["groundtruth"]["overall"]["disentangle"] == 0.0
    assert res["default"]["overall"]["n_causal"] == 5
    with pytest.raises(ValueError):
        metrics.evaluate(_Echo(), [], collate)


def test_tables_layout_and_atomic(tmp_path):
    results = [
        {"method": "hyperdas", "primary_mode": "default", "metrics": {"default": {"domains": {
            "city": {"disentangle": 0.824}, "nobel_prize_winner": {"disentangle": 0.753},
            "occupation": {"disentangle": 0.748}, "physical_object": {"disentangle": 0.95},
            "verb": {"disentangle": 0.96}}}}},
        {"method": "MDAS", "primary_mode": "groundtruth", "metrics": {"groundtruth": {"domains": {
            "city": {"disentangle": 0.669}}}}},
    ]
    table = tables.build_table(results)
    assert table["HyperDAS"]["Average"] == pytest.approx(84.7, abs=0.05)
    md = tables.markdown_table(table)
    lines = md.splitlines()
    assert lines[0] == "| Method | City | Nobel Laureate | Occupation | Physical Object | Verb | Average |"
    assert lines[2] == "| MDAS | 66.9 | - | - | - | - | 66.9 |"
    assert lines[3] == "| HyperDAS | 82.4 | 75.3 | 74.8 | 95.0 | 96.0 | 84.7 |"
    paths = tables.write_table(results, tmp_path / "out" / "table", title="t")
    assert json.loads(paths["json"].read_text())["table"]["MDAS"]["City"] == pytest.approx(66.9)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["table.json", "table.md"]
    with pytest.raises(ValueError, match="primary mode"):
        tables.build_table([{"method": "x", "primary_mode": "bidding_argmax", "metrics": {"default": {}}}])
    with pytest.raises(FileNotFoundError):
        tables.load_results([tmp_path / "none.json"])
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match="list.json holds a JSON list; expected a JSON object"):
        tables.load_results([listed])


def test_table_names_keep_their_dots(tmp_path):
    """The extension is appended to the whole name: Path.with_suffix turned "t_0.5" into
    "t_0.json", overwriting the table "t_0"."""
    assert tables.with_extension("results/t_0.5", ".json").as_posix() == "results/t_0.5.json"
    assert tables.with_extension("tb/table.v1.5", ".md").as_posix() == "tb/table.v1.5.md"
    assert tables.with_extension("results/t.json", ".json").as_posix() == "results/t.json"
    results = [{"method": "HyperDAS", "primary_mode": "default",
                "metrics": {"default": {"domains": {"city": {"disentangle": 0.5}}}}}]
    for prefix in ("t_0", "t_0.5", "table.v1.5", "named.json"):
        tables.write_table(results, tmp_path / prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "named.json", "named.md", "t_0.5.json", "t_0.5.md", "t_0.json", "t_0.md", "table.v1.5.json", "table.v1.5.md"]


def test_table_keeps_the_whole_domain_result_and_plot_names_keep_their_dots(tmp_path):
    """A result for one attribute of a domain never replaces a whole-domain result in that
    domain's cell, in either file order (it had, when it came later); a heatmap named with
    a dot ("heat_lr0.5") is written as heat_lr0.5.png and leaves no temporary file (".5" was
    taken for the format, the save failed and left one)."""
    from hyperdas_fast.evaluation.plots import plot_position_weights

    def result(attribute, value):
        return {"method": "HyperDAS", "domain": "city", "attribute": attribute, "primary_mode": "default",
                "metrics": {"default": {"domains": {"city": {"disentangle": value}}}}}

    whole, one = result(None, 0.8), result("country", 0.3)
    assert tables.build_table([whole, one])["HyperDAS"]["City"] == tables.build_table([one, whole])["HyperDAS"]["City"] == 80.0
    assert tables.build_table([one])["HyperDAS"]["City"] == 30.0
    # two attributes of one domain and no whole-domain result: pooled over their examples,
    # in either order (the later one had replaced the earlier: 30 or 80 by file order)
    def counted(attribute, causal, n_causal, isolation, n_isolation):
        summary = metrics.summary_from_counts(causal, n_causal, isolation, n_isolation)
        return {"method": "HyperDAS", "domain": "city", "attribute": attribute, "primary_mode": "default",
                "metrics": {"default": {"domains": {"city": summary}}}}

    country, continent = counted("country", 8, 10, 30, 40), counted("continent", 1, 10, 9, 10)
    for order in ([country, continent], [continent, country]):
        assert tables.build_table(order)["HyperDAS"]["City"] == pytest.approx(100 * (9 / 20 + 39 / 50) / 2)
        assert tables.build_table(order, metric="causal")["HyperDAS"]["City"] == pytest.approx(45.0)
    # a later result for the same attribute replaces the earlier one
    assert tables.build_table([country, counted("country", 0, 10, 0, 40)])["HyperDAS"]["City"] == 0.0
    # disentangle undefined (no causal test example): an empty cell and a warning, not 100
    no_causal = counted(None, 0, 0, 10, 10)
    no_causal["domain"] = "verb"
    no_causal["metrics"]["default"]["domains"] = {"verb": no_causal["metrics"]["default"]["domains"]["city"]}
    with pytest.warns(UserWarning, match="HyperDAS, verb .*disentangle is undefined.*0 / 10"):
        table = tables.build_table([whole, no_causal])
    assert "Verb" not in table["HyperDAS"] and table["HyperDAS"]["Average"] == 80.0
    with pytest.raises(ValueError, match="cannot pool"):
        tables.build_table([result("country", 0.3), result("continent", 0.5)])  # no counts to pool with
    weights = torch.rand(3, 4)
    plot_position_weights(weights, ["a", "b", "[SELF]"], ["w", "x", "y", "z"], path=tmp_path / "heat_lr0.5")
    plot_position_weights(weights, ["a", "b", "[SELF]"], ["w", "x", "y", "z"], path=tmp_path / "heat.pdf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.pdf", "heat_lr0.5.png"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_get_ordinary_permissions(tmp_path, umask):
    """Results, tables, plots, data caches, saved models and checkpoints are written to a
    temporary file and renamed into place; mkstemp makes that file 0600, and they had kept
    it (collaborators could not read them). Now each gets what open() would give it."""
    import os

    from hyperdas_fast.atomic import publish
    from hyperdas_fast.data import ravel
    from hyperdas_fast.models.hyperdas import write_checkpoint
    from hyperdas_fast.training.checkpoint import save_checkpoint

    old = os.umask(umask)
    try:
        written = [
            tables.atomic_write_json(tmp_path / "results.json", {"a": 1}),
            *tables.write_table([], tmp_path / "table").values(),
        ]
        ravel._atomic_write_text(tmp_path / "cache.json", "{}")
        written.append(tmp_path / "cache.json")
        saved = write_checkpoint(tmp_path / "model", {"w": torch.zeros(2)}, {"kind": "test"})
        written += [saved / "hyperdas.safetensors", saved / "hyperdas_config.json"]
        written.append(save_checkpoint(tmp_path / "ckpt", 1, torch.nn.Linear(2, 2)))
        folder = tmp_path / "staged"
        folder.mkdir(mode=0o700)
        written_dir = publish(folder, tmp_path / "published")
    finally:
        os.umask(old)
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path.name, oct(path.stat().st_mode))
    assert written_dir.stat().st_mode & 0o777 == 0o777 & ~umask
