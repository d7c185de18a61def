"""The op benchmark runner (benchmarks/bench_ops.py) end to end on a tiny shape: every
backend and the forced cpp paths get a row per pass, the JSON is written, and the forced
path does not leak into later calls."""
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_ops  # noqa: E402

pytest.importorskip("hyperdas_fast.ops.cpu")  # the cpp backend must be built


def test_runner_times_both_cpu_paths_side_by_side(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_ops.SHAPES, "tiny", dict(B=4, T=5, S=3, d=16, k=4))
    monkeypatch.delenv("HYPERDAS_FAST_CPU_SOFT", raising=False)
    out = tmp_path / "ops.json"
    bench_ops.main(["--device", "cpu", "--shapes", "tiny", "--backends", "torch", "cpp",
                    "--repeats", "2", "--cpu-paths", "--out", str(out)])
    payload = json.loads(out.read_text())
    soft = {(r["impl"], r["pass_"]): r for r in payload["results"] if r["mode"] == "soft"}
    for impl in ("torch", "cpp", "cpp:per_example", "cpp:batched", "paper"):
        for pass_ in ("forward", "forward+backward"):
            row = soft[(impl, pass_)]
            assert row["median_ms"] > 0 and row["speedup_vs_torch"] > 0, (impl, pass_)
    assert {r["impl"] for r in payload["results"] if r["mode"] == "hard"} == {"torch", "cpp"}
    assert "HYPERDAS_FAST_CPU_SOFT" not in os.environ


def test_runner_keeps_the_shapes_measured_before_a_stop(tmp_path, monkeypatch):
    """A lent GPU's call has a time limit: the shapes measured before the runner is stopped
    are on disk (marked partial), and the complete file has no mark."""
    monkeypatch.setitem(bench_ops.SHAPES, "tiny", dict(B=4, T=5, S=3, d=16, k=4))
    monkeypatch.setitem(bench_ops.SHAPES, "tiny2", dict(B=2, T=3, S=2, d=8, k=2))
    out = tmp_path / "ops.json"
    argv = ["--device", "cpu", "--shapes", "tiny", "tiny2", "--backends", "torch", "--repeats", "2", "--out", str(out)]
    real = bench_ops.bench_shape

    def stop_at_tiny2(name, *a, **kw):
        if name == "tiny2":
            raise KeyboardInterrupt  # as a timeout's signal would stop it
        return real(name, *a, **kw)

    monkeypatch.setattr(bench_ops, "bench_shape", stop_at_tiny2)
    with pytest.raises(KeyboardInterrupt):
        bench_ops.main(argv)
    partial = json.loads(out.read_text())
    assert partial["partial"] is True and list(partial["shapes"]) == ["tiny"]
    assert {r["shape"] for r in partial["results"]} == {"tiny"}
    assert all(r["speedup_vs_torch"] > 0 for r in partial["results"])
    monkeypatch.setattr(bench_ops, "bench_shape", real)
    bench_ops.main(argv)
    complete = json.loads(out.read_text())
    assert "partial" not in complete and list(complete["shapes"]) == ["tiny", "tiny2"]


@pytest.mark.parametrize("backend", sorted(bench_ops.FORCED_PATHS))
def test_plain_backend_clears_a_forced_path(backend, monkeypatch):
    """With --cpu-paths / --triton-paths, the plain backend runs in rounds after a forced
    path: it must not inherit it."""
    variable, paths = bench_ops.FORCED_PATHS[backend]
    seen = []
    monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(bench_ops.ops, "interchange",
                        lambda *a, backend: seen.append((backend, os.environ.get(variable))))
    bench_ops.forced_path(backend, paths[1])()
    bench_ops.forced_path(backend, None)()
    assert seen == [(backend, paths[1]), (backend, None)]
    assert variable not in os.environ


def test_interleaved_timing_rotates_the_order():
    import torch
    from common import interleaved_median_ms

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timing = interleaved_median_ms(fns, torch.device("cpu"), warmup=0, repeats=3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(t["repeats"] == 3 for t in timing.values())


def test_runs_report_the_median_and_range_of_each_runs_ratio(tmp_path, monkeypatch):
    """--runs 3: each row's ratio is the median of the three runs' side-by-side ratios."""
    monkeypatch.setitem(bench_ops.SHAPES, "tiny", dict(B=2, T=3, S=2, d=8, k=2))
    out = tmp_path / "ops.json"
    bench_ops.main(["--device", "cpu", "--shapes", "tiny", "--backends", "torch", "cpp",
                    "--repeats", "2", "--runs", "3", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["runs"] == 3
    rows = payload["results"]
    assert len(rows) == 2 * 3 + 2  # soft: torch, cpp, paper x two passes; hard: torch, cpp
    for row in rows:
        runs = row["runs"]
        assert len(runs) == 3
        assert row["median_ms"] == sorted(r["median_ms"] for r in runs)[1]
        ratios = sorted(r["speedup_vs_torch"] for r in runs)
        assert row["speedup_vs_torch"] == ratios[1]
        assert (row["speedup_vs_torch_min"], row["speedup_vs_torch_max"]) == (ratios[0], ratios[2])
        if row["impl"] == "torch":
            assert ratios == [1.0, 1.0, 1.0]


def test_summary_of_one_run_is_that_run():
    rows = [dict(shape="s", mode="soft", pass_="forward", impl="cpp", median_ms=1.0, min_ms=1.0, max_ms=1.0,
                 gbps=1.0, speedup_vs_torch=2.0)]
    assert bench_ops.summarize_runs([rows]) is rows
