"""Find a model by path or by name in the models dir, and the user's defaults from config.toml."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomllib

from rtlocal.errors import RtlocalError
from rtlocal.paths import config_file, models_dir

DEFAULT_MODEL_NAME = "smollm2-135m-rt"  # what `rtlocal build` makes with the default recipe
MODEL_ENV = "RTLOCAL_MODEL"


@dataclass
class Settings:
    """Defaults from config.toml; every field can be overridden by a flag."""

    model: str | None = None
    threads: int | None = None
    ctx: int | None = None
    n_gpu_layers: int | None = None
    strictness: str | None = None
    threshold: str | None = None
    calibration: str | None = None  # a profile from `rtlocal calibrate`, used instead of the model's own table
    keymap: dict[str, str] | None = None  # TUI key rebinding by binding id, e.g. {"chat.regenerate": "f5"}


# ------------------------------------------------------------------ the config file's schema: one check per key


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a table", list: "an array"}
    return f"{value!r} ({kind.get(type(value), type(value).__name__)})"


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {_describe(value)}")
    return value


def _integer(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"expected an integer >= {minimum}, got {_describe(value)}")
        return value

    return check


def _policy_spec(flag: str) -> Callable[[Any], str]:
    """A --strictness/--threshold value: a string in the flags' grammar, or a bare number (all categories)."""

    def check(value: Any) -> str:
        from rtlocal.errors import UsageError
        from rtlocal.runtime.policy import check_flags

        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            value = repr(value)
        if not isinstance(value, str):
            raise ValueError(f"expected a string such as \"balanced\" or \"safety=strict\", or a number, got {_describe(value)}")
        try:
            check_flags(**{flag: value})
        except UsageError as e:
            raise ValueError(str(e)) from None
        return value

    return check


def _key_table(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f'expected a table of binding id = "key" strings, got {_describe(value)}')
    return value


SETTINGS_SCHEMA: dict[str, Callable[[Any], Any]] = {
    "model": _string,
    "threads": _integer(1),
    "ctx": _integer(64),
    "n_gpu_layers": _integer(-1),
    "strictness": _policy_spec("strictness"),
    "threshold": _policy_spec("thresholds"),
    "calibration": _string,
    "keymap": _key_table,
}
assert set(SETTINGS_SCHEMA) == {f.name for f in fields(Settings)}


def load_settings(path: Path | None = None) -> Settings:
    """config.toml, every value checked against SETTINGS_SCHEMA: a problem is one `FILE: KEY: problem` error."""
    path = path or config_file()
    if not path.exists():
        return Settings()
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RtlocalError(f"{path}: invalid TOML ({e})") from e
    except OSError as e:
        raise RtlocalError(f"{path}: cannot read ({e.strerror or e})") from e
    unknown = sorted(set(data) - set(SETTINGS_SCHEMA))
    if unknown:
        raise RtlocalError(f"{path}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(SETTINGS_SCHEMA))})")
    values = {}
    for key, value in data.items():
        try:
            values[key] = SETTINGS_SCHEMA[key](value)
        except ValueError as e:
            raise RtlocalError(f"{path}: {key}: {e}") from None
    return Settings(**values)


def list_models() -> list[Path]:
    d = models_dir()
    return sorted(d.glob("*.gguf")) if d.is_dir() else []


def resolve_model(spec: str | None, settings: Settings | None = None) -> Path:
    """A model path from a flag, RTLOCAL_MODEL, config.toml or the default name, in that order."""
    spec = spec or os.environ.get(MODEL_ENV) or (settings.model if settings else None) or DEFAULT_MODEL_NAME
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    named = models_dir() / (spec if spec.endswith(".gguf") else f"{spec}.gguf")
    if "/" not in spec and named.is_file():
        return named
    if spec == DEFAULT_MODEL_NAME:
        raise RtlocalError("the default model is not built yet: run `rtlocal build` (or pass --model FILE.gguf)")
    names = ", ".join(m.stem for m in list_models()) or "none"
    raise RtlocalError(f"model {spec!r} not found (a GGUF path, or a name in {models_dir()}: {names})")
