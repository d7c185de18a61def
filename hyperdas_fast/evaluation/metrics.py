"""RAVEL metrics: causal, isolation and disentangle accuracy.

An example is correct when its first (up to ``max_label_tokens`` = 3) label tokens are
all predicted correctly (argmax of the teacher-forced logits). Causal accuracy is over
causal examples, isolation accuracy over isolation examples, disentangle is their mean,
undefined (None) when either group is empty: a model that never intervenes scores 100 %
isolation, and a domain with no causal test example would otherwise report that as its
disentangle (the paper's no-op baseline is 50). Reported overall, per domain and per
(domain, attribute), for each inference mode.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100


def example_correct(logits: Tensor, labels: Tensor, max_label_tokens: int = 3) -> Tensor:
    """[B] bool: the first up-to-``max_label_tokens`` label tokens are predicted correctly.

    ``logits`` [B, T, V] or packed [P, V] (rows at ``labels != -100``, row-major);
    ``labels`` [B, T] (already shifted: logits[b, t] predicts labels[b, t]).
    An example without label tokens counts as incorrect.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got {list(labels.shape)}")
    valid = labels != IGNORE_INDEX
    if logits.dim() == 3:
        if logits.shape[:2] != labels.shape:
            raise ValueError(f"logits [B, T, V] must match labels [B, T]; got {list(logits.shape)} and {list(labels.shape)}")
        pred = logits.argmax(dim=-1)[valid.to(logits.device)].to(labels.device)
    elif logits.dim() == 2:
        if logits.shape[0] != int(valid.sum()):
            raise ValueError(f"packed logits need one row per label token ({int(valid.sum())}); got {logits.shape[0]}")
        pred = logits.argmax(dim=-1).to(labels.device)
    else:
        raise ValueError(f"logits must be [B, T, V] or [P, V], got {list(logits.shape)}")
    targets = labels[valid]
    example = valid.nonzero(as_tuple=True)[0]
    # rank of each label token within its example
    counts = valid.sum(dim=1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(example.numel(), device=labels.device) - starts[example]
    consider = rank < max_label_tokens
    wrong = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
    wrong.index_add_(0, example[consider], (pred[consider] != targets[consider]).long())
    return (wrong == 0) & (counts > 0)


def summary_from_counts(causal_correct: int, n_causal: int, isolation_correct: int,
                        n_isolation: int) -> Dict[str, Optional[float]]:
    """{"causal", "isolation", "n_causal", "n_isolation", "disentangle"} from counts; an
    accuracy is None for an empty group, and disentangle is None unless both groups have
    examples (see the module docstring)."""
    causal = causal_correct / n_causal if n_causal else None
    isolation = isolation_correct / n_isolation if n_isolation else None
    return {"causal": causal, "isolation": isolation, "n_causal": int(n_causal), "n_isolation": int(n_isolation),
            "disentangle": (causal + isolation) / 2 if causal is not None and isolation is not None else None}


def pool_summaries(summaries: Sequence[Dict[str, object]]) -> Dict[str, Optional[float]]:
    """One summary over the union of the examples behind ``summaries`` (e.g. a domain's
    attributes, evaluated separately): correct counts recovered from each accuracy and its
    count, then summed. ValueError when a summary lacks its counts."""
    totals = {"causal": [0, 0], "isolation": [0, 0]}
    for summary in summaries:
        for group, total in totals.items():
            n = summary.get(f"n_{group}")
            if n is None or (n and summary.get(group) is None):
                raise ValueError(f"cannot pool summaries without n_{group} and {group}: {summary}")
            if n:
                total[0] += round(float(summary[group]) * int(n))
                total[1] += int(n)
    return summary_from_counts(totals["causal"][0], totals["causal"][1], totals["isolation"][0],
                               totals["isolation"][1])


class MetricAccumulator:
    """Collects per-example correctness with its domain / attribute / causal flag."""

    def __init__(self):
        self.rows: List[tuple] = []  # (domain, attribute, is_causal, correct)

    def add(self, correct: Sequence[bool], is_causal: Sequence[bool], domains: Sequence[str], attributes: Sequence[str]):
        for c, k, d, a in zip(correct, is_causal, domains, attributes):
            self.rows.append((str(d), str(a), bool(k), bool(c)))

    @staticmethod
    def _summary(rows: Iterable[tuple]) -> Dict[str, float]:
        causal = [c for _, _, k, c in rows if k]
        iso = [c for _, _, k, c in rows if not k]
        return summary_from_counts(sum(causal), len(causal), sum(iso), len(iso))

    def summary(self) -> Dict[str, object]:
        by_domain, by_attr = defaultdict(list), defaultdict(list)
        for row in self.rows:
            by_domain[row[0]].append(row)
            by_attr[f"{row[0]}/{row[1]}"].append(row)
        return {
            "overall": self._summary(self.rows),
            "domains": {k: self._summary(v) for k, v in sorted(by_domain.items())},
            "attributes": {k: self._summary(v) for k, v in sorted(by_attr.items())},
        }


@torch.no_grad()
def evaluate(
    model,
    records: Sequence[dict],
    collator,
    modes: Sequence[str] = ("default",),
    batch_size: int = 32,
    max_label_tokens: int = 3,
    progress: bool = False,
) -> Dict[str, Dict[str, object]]:
    """{mode: {"overall": {...}, "domains": {...}, "attributes": {...}}} for ``model``
    (a HyperDASModel / MDASModel, or a wrapper with ``.model``) on collator ``records``."""
    net = model.model if not isinstance(model, torch.nn.Module) and hasattr(model, "model") else model
    if not records:
        raise ValueError("records must be a non-empty list of RAVEL records")
    was_training = net.training
    net.eval()
    results = {}
    try:
        for mode in modes:
            acc = MetricAccumulator()
            starts = range(0, len(records), batch_size)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc=f"eval {mode}", unit="batch", leave=False)
            for start in starts:
                chunk = records[start : start + batch_size]
                batch = collator(chunk)
                out = net(batch, inference_mode=mode, logits_at="labels")
                correct = example_correct(out.logits, batch["labels"], max_label_tokens)
                acc.add(
                    correct.tolist(),
                    batch["is_causal"].tolist(),
                    [r.get("domain", "unknown") for r in chunk],
                    [r.get("attribute", "unknown") for r in chunk],
                )
            results[mode] = acc.summary()
    finally:
        net.train(was_training)
    return results


__all__ = ["example_correct", "MetricAccumulator", "evaluate", "pool_summaries", "summary_from_counts"]
