"""Reading JSON Lines: one object per line, blank lines skipped, bad lines reported as file:line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rtlocal.errors import RtlocalError


def read_objects(path: Path | str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a malformed line is a one-line RtlocalError."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise RtlocalError(f"{path}: {e.strerror}") from e
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RtlocalError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise RtlocalError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj
