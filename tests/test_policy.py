"""The decision rule and the strictness/threshold flags, on their own."""

import math

import numpy as np
import pytest

from rtlocal.constants import COCONOT_CATEGORIES
from rtlocal.errors import RtlocalError
from rtlocal.runtime.calibration import strictness_mapper, threshold_for_rate
from rtlocal.runtime.policy import Mode, Policy, build_policy, decide, passes, softmax, strictness_to_threshold

CATS = list(COCONOT_CATEGORIES)
SAFETY, INCOMPLETE, HUMANIZING = "Requests with safety concerns", "Incomplete requests", "Humanizing requests"


def probs(**kw):
    base = dict.fromkeys(CATS, 0.01)
    names = {"safety": SAFETY, "incomplete": INCOMPLETE, "humanizing": HUMANIZING}
    base.update({names[k]: v for k, v in kw.items()})
    return base


def test_threshold_edges():
    assert passes(0.0, 0.0) and passes(1.0, 0.0)
    assert not passes(1.0, 1.0) and not passes(0.99, None)
    assert passes(0.5, 0.5) and not passes(0.4999, 0.5)


def test_highest_passing_category_wins():
    pol = build_policy(CATS, thresholds="all=0.3")
    d = decide(probs(safety=0.4, incomplete=0.45), 0.1, pol)
    assert d.refused and d.category == INCOMPLETE and d.label == "refuse"
    # incomplete switched off: safety is the only one left that passes
    pol = build_policy(CATS, thresholds="all=0.3,incomplete=off")
    assert decide(probs(safety=0.4, incomplete=0.45), 0.1, pol).category == SAFETY


def test_respond_when_nothing_passes():
    d = decide(probs(safety=0.49), 0.5, build_policy(CATS))
    assert not d.refused and d.category is None and d.label == "respond"
    assert math.isclose(d.refusal_score, 0.49 + 0.04)


def test_force_and_off():
    pol = build_policy(CATS, thresholds="humanizing=force,all=off")
    # 'all=off' comes later and wins over the forced humanizing
    assert not decide(probs(humanizing=0.001), 0.9, pol).refused
    pol = build_policy(CATS, thresholds="all=off,humanizing=force")
    d = decide(probs(humanizing=0.001), 0.9, pol)
    assert d.refused and d.category == HUMANIZING


def test_strictness_presets_and_numbers():
    assert strictness_to_threshold("balanced") == 0.5
    assert strictness_to_threshold("strict") == pytest.approx(0.2)
    assert strictness_to_threshold("off") is None
    assert strictness_to_threshold("0.7") == pytest.approx(0.3)
    pol = build_policy(CATS, strictness="strict,safety=off,humanizing=lenient")
    assert pol.thresholds[SAFETY] is None
    assert pol.thresholds[HUMANIZING] == pytest.approx(0.8)
    assert pol.thresholds[INCOMPLETE] == pytest.approx(0.2)
    # --threshold wins over --strictness
    pol = build_policy(CATS, strictness="paranoid", thresholds="safety=0.35")
    assert pol.thresholds[SAFETY] == 0.35 and pol.thresholds[INCOMPLETE] == pytest.approx(0.05)


def test_category_names_resolve_by_alias_name_and_token():
    for spec in ("safety=0.1", "Requests with safety concerns=0.1", "[requests with safety concerns]=0.1", "SAFETY=0.1"):
        assert build_policy(CATS, thresholds=spec).thresholds[SAFETY] == 0.1
    # single-token mode: the aliases all mean [refuse]
    assert build_policy(["refuse"], thresholds="safety=0.2").thresholds["refuse"] == 0.2


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"thresholds": "bogus=0.3"}, "unknown category 'bogus'"),
        ({"thresholds": "safety=1.5"}, "threshold must be in [0,1]"),
        ({"thresholds": "safety=-0.1"}, "threshold must be in [0,1]"),
        ({"thresholds": "safety=abc"}, "threshold must be a number"),
        ({"thresholds": "safety="}, "expected CATEGORY=VALUE"),
        ({"strictness": "extreme"}, "strictness must be one of"),
        ({"strictness": "2"}, "strictness must be in [0,1]"),
        ({"biases": "safety=x"}, "expected a number"),
    ],
)
def test_bad_specs_are_one_line_errors(kw, message):
    with pytest.raises(RtlocalError) as e:
        build_policy(CATS, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_no_refusal_tokens_rejects_flags():
    with pytest.raises(RtlocalError, match="no refusal tokens"):
        build_policy([], thresholds="all=0.5")
    assert build_policy([]).thresholds == {}


def test_softmax_matches_definition():
    x = np.array([1.0, 2.0, 3.0])
    p = softmax(x, 1.0)
    assert p == pytest.approx(np.exp(x) / np.exp(x).sum())
    assert softmax(x, 2.0) == pytest.approx(np.exp(x / 2) / np.exp(x / 2).sum())
    with pytest.raises(RtlocalError):
        softmax(x, 0.0)


def test_calibrated_strictness():
    curve = [
        {"threshold": 0.1, "refusal_rate": 0.95, "over_refusal_rate": 0.4},
        {"threshold": 0.3, "refusal_rate": 0.85, "over_refusal_rate": 0.2},
        {"threshold": 0.6, "refusal_rate": 0.6, "over_refusal_rate": 0.05},
    ]
    assert threshold_for_rate(curve, 0.8) == 0.3
    assert threshold_for_rate(curve, 0.99) == 0.1
    table = {"categories": {SAFETY: curve}, "presets": {"strict": {SAFETY: 0.25}}}
    m = strictness_mapper(table)
    assert m(SAFETY, "0.8") == 0.3
    assert m(SAFETY, "strict") == 0.25
    assert m(SAFETY, "off") is None
    assert m(INCOMPLETE, "0.8") == pytest.approx(0.2)  # no curve: uncalibrated mapping
    pol = build_policy(CATS, strictness="0.8", calibrated=m)
    assert pol.thresholds[SAFETY] == 0.3
    assert strictness_mapper(None) is None


def test_policy_defaults():
    pol = Policy()
    assert pol.mode is Mode.THRESHOLD and pol.threshold("x") == 0.5 and pol.bias("x") == 0.0
