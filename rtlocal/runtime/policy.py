"""The decision rule at the first answer position, and the strictness/threshold flags that set it.

`decide` is pure: probabilities and a policy in, a decision out. generate, chat, the TUI and eval
all call it, so they cannot disagree about when the model refuses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from rtlocal.constants import (
    CATEGORY_ALIASES,
    DEFAULT_STRICTNESS,
    SINGLE_CATEGORY,
    STRICTNESS_PRESETS,
    Category,
    alias_of,
    token_for,
)
from rtlocal.errors import RtlocalError, UsageError

ALL = "all"


class Mode(StrEnum):
    THRESHOLD = "threshold"  # refuse with k when p_k >= tau_k, else force [respond]
    BIAS = "bias"  # add a logit bias to the answer-start tokens, then sample
    FREE = "free"  # no intervention: sample the first token like any other


@dataclass
class Policy:
    """What the user asked for: a threshold per category (None = never refuse), or biases.

    Threshold semantics: 0 always refuses, 1 never refuses, and in between p_k >= tau_k refuses.
    """

    mode: Mode = Mode.THRESHOLD
    thresholds: dict[str, float | None] = field(default_factory=dict)
    biases: dict[str, float] = field(default_factory=dict)
    default_threshold: float | None = 0.5

    def threshold(self, category: str) -> float | None:
        return self.thresholds.get(category, self.default_threshold)

    def bias(self, category: str) -> float:
        return self.biases.get(category, 0.0)


@dataclass(frozen=True)
class Decision:
    """The outcome at the first answer position."""

    refused: bool
    category: str | None  # the refusal category, None when responding
    probs: dict[str, float]  # p_k per category (softmax over the whole vocabulary)
    p_respond: float
    mode: Mode = Mode.THRESHOLD

    @property
    def label(self) -> str:
        return "refuse" if self.refused else "respond"

    @property
    def refusal_score(self) -> float:
        """Total refusal probability mass: the score used for ROC curves."""
        return sum(self.probs.values())


def passes(p: float, threshold: float | None) -> bool:
    """The per-category test. None and 1 never pass; 0 always passes."""
    if threshold is None or threshold >= 1.0:
        return False
    return p >= threshold


def decide(probs: Mapping[str, float], p_respond: float, policy: Policy) -> Decision:
    """Threshold rule: refuse with the most likely category among those that reach their threshold."""
    passing = [(p, c) for c, p in probs.items() if passes(p, policy.threshold(c))]
    if passing:
        _, category = max(passing)
        return Decision(True, category, dict(probs), p_respond, Mode.THRESHOLD)
    return Decision(False, None, dict(probs), p_respond, Mode.THRESHOLD)


def softmax(logits: Sequence[float] | "object", temperature: float = 1.0):
    """Numerically stable softmax over a numpy vector, with a temperature."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    check_decision_temperature(temperature)
    x = x / temperature
    x = x - x.max()
    e = np.exp(x)
    return e / e.sum()


def check_decision_temperature(temperature: float) -> float:
    """The softmax temperature of the refusal decision: a finite number > 0."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise UsageError(f"--decision-temperature must be a number > 0, got {temperature}")
    return temperature


# ---------------------------------------------------------------- flags -> policy


def resolve_category(name: str, categories: Sequence[str]) -> str:
    """Map an alias, a full name or a token (any case) to one of the model's categories."""
    key = name.strip().lower()
    for c in categories:
        if key in {c.lower(), alias_of(c).lower(), token_for(c).lower()}:
            return c
    # CoCoNot aliases also resolve in single-token mode, to [refuse]: they then all mean the same.
    if list(categories) == [SINGLE_CATEGORY] and key in {a for a in CATEGORY_ALIASES.values()}:
        return SINGLE_CATEGORY
    known = ", ".join(alias_of(c) for c in categories) or "none: the model has no refusal tokens"
    raise UsageError(f"unknown category {name!r} (known: {known})")


def _pairs(spec: str, flag: str) -> list[tuple[str | None, str]]:
    """Split 'a=1,b=2' or a bare 'x' into (key, value) pairs; a bare value has key None.

    A key given twice ('safety=strict,safety=off', or two bare values) is an error, not a silent
    'last one wins'; 'all' (or a bare value) followed by single categories is the documented layering.
    """
    out: list[tuple[str | None, str]] = []
    seen: set[str] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            k, v = part.split("=", 1)
            if not k.strip() or not v.strip():
                raise UsageError(f"{flag}: expected CATEGORY=VALUE, got {part!r}")
            key: str | None = k.strip()
            value = v.strip()
        else:
            key, value = None, part
        name = ALL if key is None else key.lower()
        if name in seen:
            raise UsageError(f"{flag}: {'all categories are' if name == ALL else repr(key) + ' is'} given twice in {spec!r}")
        seen.add(name)
        out.append((key, value))
    if not out:
        raise UsageError(f"{flag}: empty value")
    return out


def strictness_to_threshold(value: str) -> float | None:
    """A preset name or a number in [0,1] -> threshold (None = off). Uncalibrated: tau = 1 - s."""
    v = value.strip().lower()
    if v in STRICTNESS_PRESETS:
        s = STRICTNESS_PRESETS[v].strictness
        return None if s is None else round(1.0 - s, 6)
    try:
        s = float(v)
    except ValueError:
        names = ", ".join(STRICTNESS_PRESETS)
        raise UsageError(f"strictness must be one of {names} or a number in [0,1], got {value!r}") from None
    if not 0.0 <= s <= 1.0 or math.isnan(s):
        raise UsageError(f"strictness must be in [0,1], got {value!r}")
    return round(1.0 - s, 6)


def parse_threshold_value(value: str, flag: str = "--threshold") -> float | None:
    v = value.strip().lower()
    if v in {"off", "never", "none"}:
        return None
    if v in {"force", "forced", "always"}:
        return 0.0
    try:
        t = float(v)
    except ValueError:
        raise UsageError(f"{flag}: threshold must be a number in [0,1], 'off' or 'force', got {value!r}") from None
    if not 0.0 <= t <= 1.0 or math.isnan(t):
        raise UsageError(f"{flag}: threshold must be in [0,1], got {value!r}")
    return t


def parse_bias_value(value: str) -> float:
    try:
        b = float(value)
    except ValueError:
        raise UsageError(f"--bias: expected a number, got {value!r}") from None
    if math.isnan(b) or math.isinf(b):
        raise UsageError(f"--bias: expected a finite number, got {value!r}")
    return b


def check_flags(
    *, strictness: str | None = None, thresholds: str | None = None, biases: str | None = None, mode: Mode | str = Mode.THRESHOLD
) -> Mode:
    """Validate the policy flags before any model loads: values, repeats and combinations (UsageError, exit 2).

    Category names are checked later, against the model's own categories (`build_policy`).
    """
    try:
        mode = Mode(mode)
    except ValueError:
        raise UsageError(f"--mode must be threshold, bias or free, got {mode!r}") from None
    if biases and mode is not Mode.BIAS:
        raise UsageError("--bias applies only to --mode bias")
    if mode is not Mode.THRESHOLD and (strictness or thresholds):
        raise UsageError(f"--strictness and --threshold apply only to --mode threshold, not {mode.value}")
    for spec, flag, value_of in (
        (strictness, "--strictness", strictness_to_threshold),
        (thresholds, "--threshold", parse_threshold_value),
        (biases, "--bias", parse_bias_value),
    ):
        for _, value in _pairs(spec, flag) if spec else ():
            value_of(value)
    return mode


StrictnessMap = Callable[[str, str], float | None]  # (category, strictness spec) -> threshold


def build_policy(
    categories: Sequence[str],
    *,
    strictness: str | None = None,
    thresholds: str | None = None,
    biases: str | None = None,
    mode: Mode | str = Mode.THRESHOLD,
    defaults: Mapping[str, float] | None = None,
    calibrated: StrictnessMap | None = None,
) -> Policy:
    """Turn CLI-style specs into a Policy. Later flags win: model defaults < strictness < thresholds.

    `strictness`: 'balanced', '0.7', 'safety=strict,humanizing=off', 'strict,safety=off'.
    `thresholds`: 'safety=0.35', 'all=0.5', 'humanizing=off', 'safety=force'.
    `biases` (bias mode): 'safety=2,all=-1'.
    `calibrated`: maps a strictness to a measured threshold when the model carries a calibration table.
    """
    mode = Mode(mode)
    if not categories and (strictness or thresholds or biases):
        raise RtlocalError("this model has no refusal tokens: --strictness/--threshold/--bias do not apply")
    policy = Policy(mode=mode)
    policy.thresholds = {c: (defaults or {}).get(c, policy.default_threshold) for c in categories}

    def apply(spec: str | None, flag: str, value_of: Callable[[str, str], float | None], target: dict) -> None:
        if not spec:
            return
        named: dict[str, str] = {}
        for key, value in _pairs(spec, flag):
            chosen = categories if key is None or key.lower() == ALL else [resolve_category(key, categories)]
            if key is not None and key.lower() != ALL:
                if chosen[0] in named:  # two spellings of one category: 'safety=...,[Requests with safety concerns]=...'
                    raise UsageError(f"{flag}: {named[chosen[0]]!r} and {key!r} name the same category")
                named[chosen[0]] = key
            for c in chosen:
                target[c] = value_of(c, value)

    def strict_value(category: str, value: str) -> float | None:
        if calibrated is not None:
            return calibrated(category, value)
        return strictness_to_threshold(value)

    apply(strictness, "--strictness", strict_value, policy.thresholds)
    apply(thresholds, "--threshold", lambda c, v: parse_threshold_value(v), policy.thresholds)
    if biases:
        apply(biases, "--bias", lambda c, v: parse_bias_value(v), policy.biases)
    return policy


def describe(policy: Policy) -> str:
    """One line for humans: 'safety 0.50 · incomplete off · ...'."""
    if policy.mode is Mode.FREE:
        return "free (no intervention)"
    if policy.mode is Mode.BIAS:
        return "bias " + " · ".join(f"{alias_of(c)} {b:+g}" for c, b in policy.biases.items()) if policy.biases else "bias (none)"
    parts = []
    for c, t in policy.thresholds.items():
        parts.append(f"{alias_of(c)} {'off' if t is None or t >= 1 else f'{t:.2f}'}")
    return " · ".join(parts)


__all__ = [
    "ALL",
    "Category",
    "DEFAULT_STRICTNESS",
    "Decision",
    "Mode",
    "Policy",
    "build_policy",
    "check_decision_temperature",
    "check_flags",
    "decide",
    "describe",
    "parse_threshold_value",
    "resolve_category",
    "softmax",
    "strictness_to_threshold",
]
