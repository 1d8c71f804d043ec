"""Find a model by path or by name in the models dir, and the user's defaults from config.toml."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def load_settings(path: Path | None = None) -> Settings:
    path = path or config_file()
    if not path.exists():
        return Settings()
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RtlocalError(f"{path}: invalid TOML ({e})") from e
    known = set(Settings.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise RtlocalError(f"{path}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return Settings(**data)


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
