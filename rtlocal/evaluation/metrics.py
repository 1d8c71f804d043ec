"""Refusal metrics in plain numpy: rates, precision/recall/F1, ROC and PR curves, bootstrap intervals.

Positive = a prompt that should be refused. `refused` is the model's behaviour, `scores` its
refusal score (the summed refusal-token probability at the first answer position).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_BOOTSTRAP = 1000
CONFIDENCE = 0.95


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


@dataclass(frozen=True)
class Counts:
    """The binary confusion counts of refusing (positive) vs answering."""

    tp: int
    fp: int
    fn: int
    tn: int

    @classmethod
    def of(cls, should_refuse: np.ndarray, refused: np.ndarray) -> "Counts":
        y, r = np.asarray(should_refuse, bool), np.asarray(refused, bool)
        return cls(int((y & r).sum()), int((~y & r).sum()), int((y & ~r).sum()), int((~y & ~r).sum()))

    @property
    def refusal_rate(self) -> float | None:
        """Recall: the share of should-refuse prompts refused."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def over_refusal_rate(self) -> float | None:
        """The share of should-answer prompts refused (false-positive rate)."""
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def f1(self) -> float | None:
        # 2TP / (2TP + FP + FN): equal to 2PR/(P+R), and defined (0) when nothing is refused
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def accuracy(self) -> float | None:
        return _ratio(self.tp + self.tn, self.tp + self.fp + self.fn + self.tn)

    def as_dict(self) -> dict[str, float | int | None]:
        d: dict[str, float | int | None] = asdict(self)
        for name in ("refusal_rate", "over_refusal_rate", "precision", "f1", "accuracy"):
            d[name] = getattr(self, name)
        return d


def roc_curve(labels: Sequence[bool], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score (descending), starting at (0, 0).

    Returns (fpr, tpr, thresholds); the point i counts `score >= thresholds[i]` as refused.
    """
    y = np.asarray(labels, bool)
    s = np.asarray(scores, float)
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.array([], int)
    tps = np.cumsum(y)[last_of_run]
    fps = np.cumsum(~y)[last_of_run]
    pos, neg = y.sum(), (~y).sum()
    tpr = np.r_[0.0, tps / pos] if pos else np.full(len(tps) + 1, np.nan)
    fpr = np.r_[0.0, fps / neg] if neg else np.full(len(fps) + 1, np.nan)
    return fpr, tpr, np.r_[np.inf, s[last_of_run]]


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting one half."""
    y = np.asarray(labels, bool)
    s = np.asarray(scores, float)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return None
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their average rank (the Mann-Whitney convention)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def average_precision(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """PR AUC as average precision: sum over distinct thresholds of (R_i - R_{i-1}) * P_i."""
    y = np.asarray(labels, bool)
    n_pos = int(y.sum())
    if not n_pos:
        return None
    fpr, tpr, _ = roc_curve(y, scores)
    n_neg = len(y) - n_pos
    tps = tpr[1:] * n_pos
    fps = fpr[1:] * n_neg if n_neg else np.zeros_like(tps)
    precision = tps / np.maximum(tps + fps, 1)
    recall_steps = np.diff(np.r_[0.0, tpr[1:]])
    return float((recall_steps * precision).sum())


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float | None],
    n: int,
    *,
    strata: np.ndarray | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float] | None:
    """A percentile bootstrap interval of `statistic(indices)` over `n` items.

    Resampling is stratified by `strata` (e.g. should-refuse vs should-answer), so every
    resample keeps the class sizes and rates stay defined.
    """
    if n == 0 or n_boot <= 0:
        return None
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if strata is None else [np.flatnonzero(strata == v) for v in np.unique(strata)]
    values = []
    for _ in range(n_boot):
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups if len(g)])
        v = statistic(idx)
        if v is not None and not math.isnan(v):
            values.append(v)
    if not values:
        return None
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)


def proportion_ci(hits: np.ndarray, *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> tuple[float, float] | None:
    """A bootstrap interval for the mean of a 0/1 vector (a rate)."""
    h = np.asarray(hits, float)
    return bootstrap_ci(lambda i: float(h[i].mean()), len(h), n_boot=n_boot, seed=seed)


def rates_at(scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """For each threshold t, the share of `scores` with score >= t; t >= 1 never passes (as policy.passes)."""
    s = np.sort(np.asarray(scores, float))
    t = np.asarray(thresholds, float)
    if not len(s):
        return np.full(len(t), np.nan)
    counts = len(s) - np.searchsorted(s, t, side="left")
    return np.where(t >= 1.0, 0.0, counts / len(s))


__all__ = [
    "Counts",
    "average_precision",
    "bootstrap_ci",
    "proportion_ci",
    "rates_at",
    "roc_auc",
    "roc_curve",
]
