"""`rtlocal calibrate`: per-category thresholds for a measured target, and the table that gives strictness a meaning.

From first-token probabilities on labelled validation prompts, each category k gets a curve
threshold -> (share of its should-refuse prompts with p_k >= t, share of should-answer prompts with
p_k >= t). A target picks thresholds on those curves:
- `recall=R`: per category, the largest threshold that still refuses R of its should-refuse prompts;
- `over-refusal=O`: thresholds such that the whole policy refuses at most O of should-answer prompts,
  that budget spent where it refuses the most should-refuse prompts;
- `f1`: per category, the threshold with the best F1 (its should-refuse prompts vs should-answer ones).
The strictness presets are calibrated the same way (PRESET_TARGETS), so `--strictness strict` means
a measured refusal rate, not a raw number.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rtlocal.constants import CONTRACT_VERSION, DEFAULT_THRESHOLD, OVER_REFUSAL_BUDGET, Keys, alias_of
from rtlocal.errors import RtlocalError, UsageError
from rtlocal.evaluation.analysis import (
    Outcomes,
    category_curves,
    finite_or_none,
    operating_point,
    outcomes,
    refused_under,
    with_thresholds,
)
from rtlocal.evaluation.data import FIRST_TOKEN, Record, positives_for
from rtlocal.evaluation.metrics import rates_at
from rtlocal.runtime.calibration import CALIBRATION_VERSION
from rtlocal.runtime.policy import Policy

log = logging.getLogger(__name__)

RECALL, OVER_REFUSAL, F1 = "recall", "over-refusal", "f1"
TARGET_KINDS = (RECALL, OVER_REFUSAL, F1)


@dataclass(frozen=True)
class Target:
    """What the thresholds should achieve on the validation prompts."""

    kind: str
    value: float | None = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}={self.value:g}"


# What each strictness preset means once a model is calibrated ('off' needs no calibration).
PRESET_TARGETS: dict[str, Target] = {
    "lenient": Target(OVER_REFUSAL, OVER_REFUSAL_BUDGET["lenient"]),  # refuse only when sure
    # a budget of should-answer prompts refused, spent where it refuses the most. Not F1: calibrated on a build's own held-out split, the
    # F1 point refused 8-20% of CoCoNot's look-alikes; this target 2.6-12.9% on five builds (bench/RESULTS.md)
    "balanced": Target(OVER_REFUSAL, OVER_REFUSAL_BUDGET["balanced"]),
    "strict": Target(RECALL, 0.90),  # at least 90% of each category's should-refuse prompts refused
    "paranoid": Target(RECALL, 0.98),  # at least 98%
}


def parse_target(spec: str) -> Target:
    """'recall=0.9', 'over-refusal=0.05' or 'f1'."""
    key, _, value = spec.strip().lower().partition("=")
    key = key.strip().replace("_", "-")
    if key == "max-over-refusal":
        key = OVER_REFUSAL
    if key not in TARGET_KINDS:
        raise UsageError(f"--target must be recall=R, over-refusal=O or f1, got {spec!r}")
    if key == F1:
        if value:
            raise UsageError(f"--target f1 takes no value, got {spec!r}")
        return Target(F1)
    try:
        v = float(value)
    except ValueError:
        raise UsageError(f"--target {key} needs a number in [0,1]: {key}=0.9, got {spec!r}") from None
    if math.isnan(v) or not (0.0 < v <= 1.0 if key == RECALL else 0.0 <= v <= 1.0):
        raise UsageError(f"--target {key} must be in {'(0,1]' if key == RECALL else '[0,1]'}, got {value}")
    return Target(key, v)


@dataclass
class Scores:
    """First-token probabilities of the validation prompts."""

    records: list[Record]
    o: Outcomes

    @classmethod
    def of(cls, records: Sequence[Record], categories: Sequence[str], base: Policy) -> "Scores":
        if not categories:
            raise RtlocalError("calibration needs a model with refusal tokens")
        if not records or not all(r.probs for r in records):
            raise RtlocalError("calibration needs first-token probabilities for every prompt")
        o = outcomes(records, base, categories, FIRST_TOKEN)
        y = o.should_refuse
        if y.all() or not y.any():
            raise RtlocalError(
                f"calibration needs both should-refuse and should-answer prompts (got {int(y.sum())} and {int((~y).sum())}); "
                "with CoCoNot use a split pair such as --split train"
            )
        return cls(list(records), o)

    def own(self, k: int) -> np.ndarray:
        """Which prompts category k's refusals answer for (a mask; see positives_for)."""
        o = self.o
        return positives_for(o.categories[k], o.categories, o.gold, o.should_refuse)

    def positives(self, k: int) -> np.ndarray:
        return self.o.probs[self.own(k), k]

    def negatives(self, k: int) -> np.ndarray:
        return self.o.probs[~self.o.should_refuse, k]

    def point(self, policy: Policy) -> dict[str, float | None]:
        return operating_point(refused_under(self.records, policy), self.o.should_refuse)


# A threshold of 1 means "never" (policy.passes), so a score of exactly 1.0 gets the largest float below it.
_BELOW_ONE = float(np.nextafter(1.0, 0.0))


def _recall_threshold(pos: np.ndarray, recall: float) -> float:
    """The largest t with share(pos >= t) >= recall: the ceil(recall * m)-th largest score."""
    desc = np.sort(pos)[::-1]
    need = max(1, math.ceil(recall * len(desc) - 1e-9))
    return min(float(desc[need - 1]), _BELOW_ONE)


def _just_above(neg: np.ndarray) -> float:
    """The smallest t that none of `neg` reaches (0.0 for none; 1.0 = never refuse)."""
    return min(float(np.nextafter(neg.max(), np.inf)), 1.0) if len(neg) else 0.0


def _f1_threshold(pos: np.ndarray, neg: np.ndarray) -> float:
    """A threshold with the best F1: the best positive score (ties go to the higher one), then halfway
    down to the next score below it, which refuses the same prompts here with a margin on both sides.

    Without the margin the threshold sits on the lowest positive it keeps: on a small validation set
    (14 humanizing prompts, all above 0.88) that is a threshold of 0.88, and a new prompt of that
    category scoring 0.8 is answered.
    """
    cands = np.unique(pos)
    ps, ns = np.sort(pos), np.sort(neg)
    tp = len(ps) - np.searchsorted(ps, cands, side="left")
    fp = len(ns) - np.searchsorted(ns, cands, side="left")
    f1 = 2 * tp / (2 * tp + fp + (len(ps) - tp))
    best = float(cands[np.flatnonzero(f1 == f1.max())[-1]])
    below = np.concatenate([ps[ps < best], ns[ns < best]])
    if len(below):
        best = (best + float(below.max())) / 2
    return min(best, _BELOW_ONE)


def thresholds_for(scores: Scores, target: Target, base: Policy) -> dict[str, float]:
    """Per-category thresholds that meet `target` on these scores (see the module docstring)."""
    cats = scores.o.categories
    if target.kind in (RECALL, F1):
        # a category without should-refuse prompts in the data keeps the threshold it has
        out: dict[str, float] = {}
        for k, c in enumerate(cats):
            pos = scores.positives(k)
            if not len(pos):
                out[c] = base.threshold(c)
            elif target.kind == RECALL:
                out[c] = _recall_threshold(pos, target.value)
            else:
                out[c] = _f1_threshold(pos, scores.negatives(k))
        return out
    # over-refusal: the whole policy's budget, spent where it buys the most refusals (`_spend_budget`);
    # a category without should-refuse prompts keeps its threshold, as above: with no refusal to weigh,
    # the budget alone would set it just above the noise of its negatives
    o = scores.o
    benign = ~o.should_refuse
    allowed = math.floor(target.value * int(benign.sum()) + 1e-9)
    own = [scores.own(k) for k in range(len(cats))]
    kept = {k: base.threshold(c) for k, c in enumerate(cats) if not own[k].any()}
    spent = _spend_budget(o.probs, benign, own, allowed, kept)
    return {c: kept[k] if k in kept else spent[k] for k, c in enumerate(cats)}


def _spend_budget(probs: np.ndarray, benign: np.ndarray, own: Sequence[np.ndarray], allowed: int, kept: Mapping[int, float | None]) -> list[float]:
    """Thresholds that refuse at most `allowed` of the `benign` rows (a row is refused when any category
    passes, those in `kept` at their thresholds too) and, greedily, as many of each category's `own` rows
    as that allows.

    Every category starts just above its highest benign score. Each step lowers one category's
    threshold to one of its own scores below it: the step with the most newly refused own rows per newly
    refused benign row (a benign row another category already refuses costs nothing; a longer step at
    the same rate wins), while the whole policy stays within `allowed`. Each threshold then sits just
    above the highest benign score it still leaves out: as low as it goes without another refusal of a
    should-answer prompt here.

    The rule before gave every category the same allowance (k benign rows each, k as large as the
    budget allowed): on a 360-prompt split that left half the budget unspent (five categories move one
    step at a time) and put each threshold on about the third-highest benign score of its category, so
    one build's safety threshold was 0.12 and another's 0.99 (bench/RESULTS.md, Round 6). The thresholds
    of categories in `kept` (no own rows to weigh) are not moved, but what they refuse counts.
    """
    n_cat = probs.shape[1]
    t = [_just_above(probs[benign, k]) for k in range(n_cat)]
    live = [k for k in range(n_cat) if own[k].any()]
    refused = np.zeros(len(probs), bool)
    for k, tk in [*((k, t[k]) for k in live), *kept.items()]:
        if tk is not None and tk < 1.0:  # as policy.passes: None and 1 never pass
            refused |= probs[:, k] >= tk
    while True:
        over = int((refused & benign).sum())
        best: tuple[float, int, int, float] | None = None
        for k in live:
            p = probs[:, k]
            steps = np.unique(p[own[k] & ~refused & (p < t[k])])  # where the next threshold may go
            if not len(steps):
                continue
            cost = np.sort(p[benign & ~refused])
            gain = np.sort(p[own[k] & ~refused])
            costs = len(cost) - np.searchsorted(cost, steps, side="left")
            gains = len(gain) - np.searchsorted(gain, steps, side="left")
            ok = over + costs <= allowed
            if not ok.any():
                continue
            rates = np.where(costs > 0, gains / np.maximum(costs, 1), np.inf)
            i = np.flatnonzero(ok)[np.lexsort((gains[ok], rates[ok]))[-1]]  # the best rate, then the longest step
            cand = (float(rates[i]), int(gains[i]), k, float(steps[i]))
            if best is None or cand[:2] > best[:2]:
                best = cand
        if best is None:
            break
        _, _, k, step = best
        t[k] = step
        refused |= probs[:, k] >= step
    out = []
    for k in range(n_cat):
        neg = probs[benign, k]
        out.append(min(_just_above(neg[neg < t[k]]), t[k], _BELOW_ONE) if t[k] < 1.0 else t[k])
    return out


def ordered_presets(presets: dict[str, dict[str, float]], anchor: str = "balanced") -> dict[str, dict[str, float]]:
    """Each category's thresholds made to fall from lenient to paranoid, holding `anchor` fixed.

    Each preset's own target can disagree with the order on a small category (14 prompts: strict's
    recall 0.9 needs the 13th largest score, which may sit above balanced's F1 threshold), and a dial
    that refuses less when turned up is not a dial. Presets before the anchor are raised to it, those
    after lowered to it: a higher threshold only refuses less and a lower one only more, so lenient's
    over-refusal bound and strict's and paranoid's recall still hold.
    """
    names = list(presets)
    if anchor not in presets:
        return presets
    out = {n: dict(t) for n, t in presets.items()}
    i = names.index(anchor)
    for k in range(i - 1, -1, -1):  # towards lenient: at least the next stricter preset's threshold
        for c, t in out[names[k]].items():
            out[names[k]][c] = max(t, out[names[k + 1]][c])
    for k in range(i + 1, len(names)):  # towards paranoid: at most the next laxer one's
        for c, t in out[names[k]].items():
            out[names[k]][c] = min(t, out[names[k - 1]][c])
    return out


@dataclass
class CalibrationResult:
    target: Target
    thresholds: dict[str, float]
    table: dict[str, Any]  # the calibration table (profile file and GGUF metadata)
    notes: list[str] = field(default_factory=list)


def calibrate(
    records: Sequence[Record],
    categories: Sequence[str],
    target: Target,
    *,
    base: Policy | None = None,
    model: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
) -> CalibrationResult:
    """Thresholds for `target`, presets for every strictness name, and the measured table behind them.

    Args:
        records: first-token records of the validation prompts (from `evaluate.score_items`).
        categories: the model's refusal categories.
        target: what the returned thresholds should achieve.
        base: the policy whose other settings (mode, default) the calibrated ones extend.
    """
    base = base or Policy(thresholds=dict.fromkeys(categories, DEFAULT_THRESHOLD))
    scores = Scores.of(records, categories, base)
    missing = [c for k, c in enumerate(categories) if not len(scores.positives(k))]
    if len(missing) == len(categories):
        raise RtlocalError(
            "no should-refuse prompt carries one of this model's categories "
            f"({', '.join(alias_of(c) for c in categories)}): per-category calibration needs categorised data"
        )
    notes = [
        f"{alias_of(c)}: no should-refuse prompt of this category; recall and F1 presets keep its threshold "
        f"({base.threshold(c)})"
        for c in missing
    ]
    chosen = thresholds_for(scores, target, base)
    presets = ordered_presets({name: thresholds_for(scores, t, base) for name, t in PRESET_TARGETS.items()})
    extra = {c: [chosen[c], *(p[c] for p in presets.values())] for c in categories}
    curves = category_curves(scores.o, extra)
    curves = {c: pts for c, pts in curves.items() if c not in missing}  # no refusal rate measured for those
    expected = {}
    for k, c in enumerate(categories):
        pos, neg = scores.positives(k), scores.negatives(k)
        t = chosen[c]
        expected[c] = {
            "threshold": t,
            "refusal_rate": finite_or_none(rates_at(pos, [2.0 if t is None else t])[0]),
            "over_refusal_rate": finite_or_none(rates_at(neg, [2.0 if t is None else t])[0]),
            "n_should_refuse": int(len(pos)),
            "n_should_answer": int(len(neg)),
        }
    table = {
        "version": CALIBRATION_VERSION,
        "target": str(target),
        "thresholds": chosen,
        "expected": expected,
        "combined": scores.point(with_thresholds(base, chosen)),
        "categories": curves,
        "presets": presets,
        "preset_targets": {n: str(t) for n, t in PRESET_TARGETS.items()},
        "preset_rates": {n: scores.point(with_thresholds(base, p)) for n, p in presets.items()},
        "uncalibrated": missing,
        "model": dict(model or {}),
        "data": dict(data or {}),
    }
    return CalibrationResult(target, chosen, table, notes)


def gguf_values(info: Any, table: Mapping[str, Any], *, set_defaults: bool = True) -> dict[str, str | int]:
    """The rtlocal.* metadata to write: the table, and the refusal contract with the calibrated default thresholds."""
    def default(c: str) -> float:
        t = table["thresholds"].get(c) if set_defaults else None
        return float(t if t is not None else info.thresholds.get(c, DEFAULT_THRESHOLD))

    cats = [
        {"name": c, "token": t, "id": int(i), "threshold": default(c)}
        for c, t, i in zip(info.categories, info.category_tokens, info.category_ids)
    ]
    values: dict[str, str | int] = {
        Keys.CALIBRATION: json.dumps(table, sort_keys=True, ensure_ascii=False),
        Keys.CATEGORIES: json.dumps(cats, ensure_ascii=False),
    }
    if info.source != "metadata":  # refusal tokens found in the vocab only: write the whole contract
        values.update({
            Keys.VERSION: CONTRACT_VERSION,
            Keys.MODE: info.mode,
            Keys.RESPOND_TOKEN: info.respond_token,
            Keys.RESPOND_TOKEN_ID: int(info.respond_id),
        })
    return values


def refusal_info(engine: Any) -> Any:
    """The engine's refusal metadata; an error for a model without refusal tokens (nothing to calibrate)."""
    info = engine.refusal
    if not info.present:
        raise RtlocalError(f"{engine.path.name} has no refusal tokens: there is nothing to calibrate")
    return info


def calibrate_model(
    engine: Any,
    dataset: Any,
    target: Target,
    *,
    policy: Policy | None = None,
    options: Any = None,
    cache: Path | None = None,
    restart: bool = False,
    progress: Any = None,
    data: Mapping[str, Any] | None = None,
) -> CalibrationResult:
    """Score `dataset`'s prompts with an open engine (resumably in `cache`) and calibrate for `target`.

    `policy` is the base the calibrated thresholds extend (default: the model's own defaults); `data`
    adds to the dataset's description in the table. What `rtlocal calibrate` and `calibrate_gguf` share.
    """
    from rtlocal.evaluation.run import RunOptions, model_identity, score_items
    from rtlocal.runtime.policy import build_policy

    info = refusal_info(engine)
    policy = policy or build_policy(info.categories, defaults=info.thresholds)
    records, _ = score_items(engine, dataset.items, policy, options=options or RunOptions(), out_dir=cache, restart=restart, progress=progress)
    return calibrate(
        records, info.categories, target, base=policy, model=model_identity(engine.path), data={**dataset.describe(), **(data or {})}
    )


def calibrate_gguf(
    model: str | Path, data: str | Path, *, out: str | Path | None = None, target: Target = PRESET_TARGETS["balanced"], threads: int | None = None
) -> CalibrationResult:
    """Score `data`'s prompts with the model, calibrate, and store the table and the calibrated default
    thresholds in the GGUF (`out`, written atomically; default: the model file itself). The default
    target is `balanced`'s, so the model's default thresholds are its `balanced` preset.

    What `rtlocal build` runs on the held-out split of its own training data (the default recipe).
    """
    from rtlocal.evaluation.data import load_data
    from rtlocal.runtime.engine import Engine
    from rtlocal.runtime.gguf_edit import set_metadata

    dataset = load_data(data)
    engine = Engine(model, n_ctx=2048, n_threads=threads)
    try:
        info = engine.refusal
        result = calibrate_model(engine, dataset, target)
    finally:
        engine.close()
    set_metadata(model, gguf_values(info, result.table), out=out)
    return result


__all__ = ["PRESET_TARGETS", "CalibrationResult", "Target", "calibrate", "calibrate_gguf", "calibrate_model", "gguf_values", "parse_target", "refusal_info", "thresholds_for"]
