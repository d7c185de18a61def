"""Evaluation: RAVEL metrics (metrics.py), results tables (tables.py), position heatmaps (plots.py)."""


def __getattr__(name):
    if name in ("evaluate", "example_correct", "MetricAccumulator"):
        from . import metrics

        return getattr(metrics, name)
    if name in ("build_table", "markdown_table", "write_table"):
        from . import tables

        return getattr(tables, name)
    raise AttributeError(f"module 'hyperdas_fast.evaluation' has no attribute {name!r}")


__all__ = ["evaluate", "example_correct", "MetricAccumulator", "build_table", "markdown_table", "write_table"]
