"""Calibration tables: measured threshold <-> refusal-rate curves that give strictness a meaning.

Format (stored as JSON in the GGUF key rtlocal.calibration and in profile files):
{
  "version": 1,
  "categories": {
     "<category>": [{"threshold": t, "refusal_rate": r, "over_refusal_rate": o}, ...]   # t ascending
  },
  "presets": {"<preset>": {"<category>": threshold, ...}, ...}   # optional, written by calibrate
}
Without a table, strictness s means threshold 1 - s (see policy.strictness_to_threshold).
With one, a preset name maps to its calibrated threshold and a number s in [0,1] to the largest
threshold whose measured refusal rate on should-refuse prompts is at least s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rtlocal.errors import RtlocalError
from rtlocal.policy import strictness_to_threshold


def threshold_for_rate(curve: list[Mapping[str, float]], rate: float) -> float:
    """The largest threshold whose measured refusal rate reaches `rate` (the curve falls as t grows)."""
    best = None
    for point in curve:
        if point["refusal_rate"] >= rate:
            best = point["threshold"] if best is None else max(best, point["threshold"])
    if best is None:
        return min(p["threshold"] for p in curve)
    return float(best)


def strictness_mapper(calibration: Mapping[str, Any] | None) -> Callable[[str, str], float | None] | None:
    """A (category, strictness) -> threshold function backed by a calibration table, or None."""
    if not calibration:
        return None
    curves = calibration.get("categories") or {}
    presets = calibration.get("presets") or {}

    def mapped(category: str, spec: str) -> float | None:
        key = spec.strip().lower()
        base = strictness_to_threshold(key)  # validates the spec; None for 'off'
        if base is None:
            return None
        if key in presets and category in presets[key]:
            return float(presets[key][category])
        curve = curves.get(category)
        if not curve:
            return base
        try:
            s = float(key)
        except ValueError:
            return base  # a preset the table does not cover: the uncalibrated mapping
        return threshold_for_rate(curve, s)

    return mapped


def validate(calibration: Any) -> dict[str, Any]:
    if not isinstance(calibration, dict) or not isinstance(calibration.get("categories", {}), dict):
        raise RtlocalError("calibration table: expected an object with a 'categories' mapping")
    return calibration
