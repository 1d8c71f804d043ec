"""Reading JSON Lines: one object per line, blank lines skipped, bad lines reported as file:line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rtlocal.errors import RtlocalError


def read_lines(path: Path | str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each non-blank line of a file, or of stdin when `path` is '-'."""
    if str(path) == "-":
        f = sys.stdin
    else:
        try:
            f = open(path, encoding="utf-8")
        except OSError as e:
            raise RtlocalError(f"{path}: {e.strerror}") from e
    with f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line


def parse_object(line: str) -> dict[str, Any]:
    """One JSONL line as an object; RtlocalError (without the file:line prefix) otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise RtlocalError(f"invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise RtlocalError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def read_objects(path: Path | str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a malformed line is a one-line RtlocalError."""
    for n, line in read_lines(path):
        try:
            yield n, parse_object(line)
        except RtlocalError as e:
            raise RtlocalError(f"{path}:{n}: {e}") from None
