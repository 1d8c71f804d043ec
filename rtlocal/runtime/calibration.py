"""Calibration tables: measured threshold <-> refusal-rate curves that give strictness a meaning.

Format (stored as JSON in the GGUF key rtlocal.calibration and in profile files):
{
  "version": 1,
  "categories": {
     "<category>": [{"threshold": t, "refusal_rate": r, "over_refusal_rate": o}, ...]   # t ascending
  },
  "presets": {"<preset>": {"<category>": threshold, ...}, ...}   # optional, written by calibrate
  # written by `rtlocal calibrate` as well (informative; the runtime reads only the two keys above):
  "target": "recall=0.9", "thresholds": {"<category>": t}, "expected": {...}, "combined": {...},
  "preset_targets": {"<preset>": "<target>"}, "preset_rates": {...}, "model": {...}, "data": {...}
}
Without a table, strictness s means threshold 1 - s (see policy.strictness_to_threshold).
With one, a preset name maps to its calibrated threshold and a number s in [0,1] to the largest
threshold whose measured refusal rate on should-refuse prompts is at least s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rtlocal.errors import RtlocalError
from rtlocal.runtime.policy import strictness_to_threshold


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
            value = presets[key][category]
            return None if value is None else float(value)
        curve = curves.get(category)
        if not curve:
            return base
        try:
            s = float(key)
        except ValueError:
            return base  # a preset the table does not cover: the uncalibrated mapping
        return threshold_for_rate(curve, s)

    return mapped


CALIBRATION_VERSION = 1


def _unit(x: Any, *, optional: bool = False) -> bool:
    """A number in [0,1] (None too when `optional`: a preset that switches a category off)."""
    if x is None:
        return optional
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0.0 <= x <= 1.0


def validate(calibration: Any, *, categories: Sequence[str] | None = None) -> dict[str, Any]:
    """The parts of a table the runtime reads, checked in full: every threshold and rate in [0,1].

    With `categories` (a model's), every calibrated category must be one of them.
    """
    if not isinstance(calibration, dict) or not isinstance(calibration.get("categories", {}), dict):
        raise RtlocalError("calibration table: expected an object with a 'categories' mapping")
    for category, curve in calibration.get("categories", {}).items():
        if not isinstance(curve, list) or not all(
            isinstance(p, dict) and _unit(p.get("threshold")) and _unit(p.get("refusal_rate")) for p in curve
        ):
            raise RtlocalError(
                f"calibration table: the curve of {category!r} must be a list of {{threshold, refusal_rate, ...}} with values in [0,1]"
            )
    presets = calibration.get("presets", {})
    if not isinstance(presets, dict) or not all(
        isinstance(p, dict) and all(_unit(t, optional=True) for t in p.values()) for p in presets.values()
    ):
        raise RtlocalError("calibration table: 'presets' must map preset names to {category: threshold in [0,1]}")
    if categories is not None:
        named = set(calibration.get("categories", {})) | {c for p in presets.values() for c in p}
        unknown = sorted(named - set(categories))
        if unknown:
            raise RtlocalError(f"calibration table: categories the model lacks ({', '.join(unknown)})")
    return calibration


def save_profile(path: str | Path, calibration: Mapping[str, Any]) -> Path:
    """Write a calibration table as a profile file (JSON, atomically)."""
    from rtlocal.paths import atomic_write_text

    p = Path(path).expanduser()
    if not p.parent.is_dir():
        raise RtlocalError(f"cannot write {p}: directory {p.parent} does not exist")
    atomic_write_text(p, json.dumps(calibration, indent=2, sort_keys=True) + "\n")
    return p


def load_profile(path: str | Path) -> dict[str, Any]:
    """A calibration table from a profile file written by `rtlocal calibrate`."""
    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RtlocalError(f"{path}: no such calibration profile") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RtlocalError(f"{path}: not a calibration profile ({e})") from None
    try:
        return validate(data)
    except RtlocalError as e:
        raise RtlocalError(f"{path}: {e}") from None


def apply_profile(info: Any, path: str | Path, *, model_name: str = "the model") -> dict[str, Any]:
    """Load a profile and make it `info`'s strictness mapping for this session (a RefusalInfo).

    The flags that read strictness (--strictness, the chat panel, /strictness) all look it up there.
    """
    if not info.present:
        raise RtlocalError(f"{model_name} has no refusal tokens: a calibration profile does not apply")
    table = load_profile(path)
    unknown = sorted(set(table.get("categories", {})) - set(info.categories))
    if unknown:
        raise RtlocalError(f"{path}: calibrated for categories {model_name} lacks ({', '.join(unknown)})")
    info.calibration = table
    return table
