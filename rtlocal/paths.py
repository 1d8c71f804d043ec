"""Where rtlocal keeps models, caches and its config file (one place, via platformdirs)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "rtlocal"


def data_dir() -> Path:
    """User data dir; `RTLOCAL_HOME` overrides it (tests point it at a tmp dir)."""
    home = os.environ.get("RTLOCAL_HOME")
    return Path(home) if home else Path(platformdirs.user_data_dir(APP))


def models_dir() -> Path:
    return data_dir() / "models"


def cache_dir() -> Path:
    """Dequantised bases and other rebuildable files; `RTLOCAL_CACHE`, else under RTLOCAL_HOME."""
    if os.environ.get("RTLOCAL_CACHE"):
        return Path(os.environ["RTLOCAL_CACHE"])
    home = os.environ.get("RTLOCAL_HOME")
    return Path(home) / "cache" if home else Path(platformdirs.user_cache_dir(APP))


def config_file() -> Path:
    home = os.environ.get("RTLOCAL_HOME")
    return Path(home) / "config.toml" if home else Path(platformdirs.user_config_dir(APP)) / "config.toml"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def temp_path_for(path: Path) -> Path:
    """A sibling temporary path for a file that is written in several steps and then renamed."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial-{os.getpid()}")
