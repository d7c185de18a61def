"""Plots: the HyperDAS token-position heatmap (counterfactual tokens + [SELF] x base tokens)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from ..atomic import publish


def _clean(token: str) -> str:
    return token.replace("\u0120", " ").replace("\u010a", "\\n").replace("\u2581", " ")


def plot_position_weights(weights, source_tokens: Sequence[str], base_tokens: Sequence[str],
                          path: Optional[os.PathLike] = None, title: Optional[str] = None):
    """Heatmap of weights [S+1, T]: rows = counterfactual tokens then [SELF], columns = base tokens.

    Returns the matplotlib Figure; with ``path`` it is also saved (atomically; the format
    follows an image suffix such as .pdf or .svg, else ".png" is appended to the name).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    w = np.asarray(weights, dtype=float)
    if w.ndim != 2 or w.shape != (len(source_tokens), len(base_tokens)):
        raise ValueError(f"weights must be [S+1, T] = [{len(source_tokens)}, {len(base_tokens)}], got {list(w.shape)}")
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * w.shape[1] + 2), max(3.0, 0.35 * w.shape[0] + 1.5)))
    image = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=max(1e-6, float(w.max())), aspect="auto")
    ax.set_xticks(range(len(base_tokens)))
    ax.set_xticklabels([_clean(t) for t in base_tokens], rotation=90, fontsize=8)
    ax.set_yticks(range(len(source_tokens)))
    ax.set_yticklabels([_clean(t) for t in source_tokens], fontsize=8)
    ax.set_xlabel("base tokens")
    ax.set_ylabel("counterfactual tokens")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    if path is not None:
        path = Path(path)
        # an image format's extension is kept; any other name gets ".png" appended
        # ("heat_lr0.5" -> "heat_lr0.5.png", where ".5" was taken for the format)
        fmt = path.suffix.lstrip(".").lower()
        if fmt not in fig.canvas.get_supported_filetypes():
            path, fmt = path.with_name(path.name + ".png"), "png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".plot.", suffix="." + fmt, dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, format=fmt, dpi=120)
            publish(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return fig


__all__ = ["plot_position_weights"]
