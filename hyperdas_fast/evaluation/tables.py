"""Results files and the paper's table (rows: methods; columns: the five domains + Average).

A *result* is the dict ``hyperdas-evaluate`` writes::

    {"method": "HyperDAS", "model": "...", "domain": "city", "attribute": null,
     "primary_mode": "default", "metrics": {mode: {"overall": ..., "domains": {...}, ...}}, ...}

``build_table(results)`` takes the disentangle accuracy (%) of each result's primary mode
per domain; ``markdown_table`` renders it in the paper's layout. All files are written
atomically.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

from ..atomic import publish
from ..data.ravel import DOMAIN_TITLES, DOMAINS
from .metrics import pool_summaries

COLUMNS = [DOMAIN_TITLES[d] for d in DOMAINS] + ["Average"]
METHOD_ORDER = ("MDAS", "HyperDAS")


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def with_extension(path: Union[str, os.PathLike], extension: str) -> Path:
    """``path`` with ``extension`` (".json") appended to its whole name, unless the name already
    ends with it. ``Path.with_suffix`` would replace what follows the last dot instead:
    "table.v1.5" -> "table.v1.json", "t_0.5" -> "t_0.json" (another table's file)."""
    path = Path(path)
    return path if path.name.endswith(extension) else path.with_name(path.name + extension)


def method_title(method: str) -> str:
    return {"hyperdas": "HyperDAS", "mdas": "MDAS"}.get(str(method).lower(), str(method))


def build_table(results: Iterable[Mapping], metric: str = "disentangle",
                mode: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """{method: {column: percent}} from results. A domain's cell comes from a result over
    the whole domain (no ``attribute``) when there is one, whatever the order of the files
    (a later one for the same method and domain replaces an earlier one). Otherwise the
    results for single attributes of that domain are pooled: one cell over all their test
    examples (a later result for the same attribute replaces an earlier one; they had
    replaced each other whatever the attribute, so a domain showed one attribute's score,
    which one depending on the file order). A cell whose metric is undefined (disentangle
    with no causal or no isolation test example) is left empty ("-"), with a warning.

    ``mode``: report this inference mode for the results that evaluated it (e.g.
    "global_argmax" for HyperDAS); the others keep their primary mode (MDAS:
    groundtruth). Default: every result's primary mode."""
    whole: Dict[tuple, Mapping] = {}  # (method, domain) -> summary over the whole domain
    by_attribute: Dict[tuple, Dict[str, Mapping]] = {}  # (method, domain) -> {attribute: summary}
    for res in results:
        method = method_title(res.get("method", "?"))
        attribute = res.get("attribute")
        metrics = res.get("metrics") or {}
        if mode is not None and mode in metrics:
            mode_used = mode
        else:
            mode_used = res.get("primary_mode") or (next(iter(metrics)) if metrics else None)
        if mode_used not in metrics:
            raise ValueError(f"result for {method} has no metrics for its primary mode {mode_used!r}")
        for domain, summary in metrics[mode_used].get("domains", {}).items():
            if domain not in DOMAIN_TITLES:
                continue
            if attribute:
                by_attribute.setdefault((method, domain), {})[str(attribute)] = summary
            else:
                whole[(method, domain)] = summary
    table: Dict[str, Dict[str, float]] = {}
    for key in list(whole) + [k for k in by_attribute if k not in whole]:
        method, domain = key
        if key in whole:
            summary, what = whole[key], "the whole domain"
        else:
            parts = by_attribute[key]
            summary = next(iter(parts.values())) if len(parts) == 1 else pool_summaries(list(parts.values()))
            what = "attribute(s) " + ", ".join(sorted(parts))
        value = summary.get(metric)
        if value is None:
            warnings.warn(f"{method}, {domain} ({what}): {metric} is undefined (causal / isolation test examples: "
                          f"{summary.get('n_causal')} / {summary.get('n_isolation')}); its cell is left empty")
            continue
        table.setdefault(method, {})[DOMAIN_TITLES[domain]] = 100.0 * float(value)
    for row in table.values():
        present = [row[c] for c in COLUMNS[:-1] if c in row]
        if present:
            row["Average"] = sum(present) / len(present)
    return table


def markdown_table(table: Mapping[str, Mapping[str, float]], title: Optional[str] = None, digits: int = 1) -> str:
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines.append("| Method | " + " | ".join(COLUMNS) + " |")
    lines.append("|---|" + "---|" * len(COLUMNS))
    order = [m for m in METHOD_ORDER if m in table] + sorted(m for m in table if m not in METHOD_ORDER)
    for method in order:
        row = table[method]
        cells = [f"{row[c]:.{digits}f}" if c in row else "-" for c in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_results(paths: Sequence[Union[str, os.PathLike]]) -> List[dict]:
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"results file not found: {p}")
        try:
            result = json.loads(p.read_text())
        except ValueError as exc:
            raise ValueError(f"results file {p} is not valid JSON: {exc}") from exc
        if not isinstance(result, dict):
            raise ValueError(f"results file {p} holds a JSON {type(result).__name__}; expected a JSON object: one "
                             "result as train.py / hyperdas-evaluate write it (results.json, eval_*.json)")
        out.append(result)
    return out


def write_table(results: Iterable[Mapping], out_prefix: Union[str, os.PathLike], title: Optional[str] = None,
                metric: str = "disentangle", mode: Optional[str] = None) -> Dict[str, Path]:
    """Write ``<out_prefix>.json`` (the table and its inputs' summary) and ``<out_prefix>.md``.
    ``mode``: see ``build_table``."""
    results = list(results)
    table = build_table(results, metric, mode)
    out_prefix = Path(out_prefix)
    for extension in (".json", ".md"):  # "--out results/table.json" still names the pair table.json / table.md
        if out_prefix.name.endswith(extension):
            out_prefix = out_prefix.with_name(out_prefix.name[: -len(extension)])

    def used(r):
        metrics = r.get("metrics") or {}
        return mode if mode is not None and mode in metrics else r.get("primary_mode")

    j = atomic_write_json(with_extension(out_prefix, ".json"), {
        "metric": metric,
        "mode": mode,
        "columns": COLUMNS,
        "table": table,
        "sources": [{**{k: r.get(k) for k in ("method", "model", "domain", "attribute", "primary_mode", "layer",
                                            "feature_dim", "train_examples", "test_examples")}, "mode_used": used(r)}
                    for r in results],
    })
    md = atomic_write_text(with_extension(out_prefix, ".md"), markdown_table(table, title))
    return {"json": j, "markdown": md}


__all__ = ["COLUMNS", "atomic_write_text", "atomic_write_json", "build_table", "markdown_table", "load_results",
           "write_table", "method_title", "with_extension"]
