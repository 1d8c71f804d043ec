"""Reading JSON Lines: one object per line, blank lines skipped, bad lines reported as file:line."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rtlocal.errors import RtlocalError


def read_lines(path: Path | str) -> Iterator[tuple[int, str | bytes]]:
    """(line number, text) for each non-blank line of a file, or of stdin when `path` is '-'.

    Lines are decoded one by one: a line that is not UTF-8 comes back as its bytes, so that
    `parse_object` reports it with its line number (and --skip-bad can skip it) instead of the
    whole read failing at an unknown place.
    """
    if str(path) == "-":
        f = getattr(sys.stdin, "buffer", None) or sys.stdin
    else:
        try:
            f = open(path, "rb")
        except OSError as e:
            raise RtlocalError(f"{path}: {e.strerror}") from e
    with f:
        for n, raw in enumerate(f, 1):
            line: str | bytes = raw
            if isinstance(raw, bytes):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    yield n, raw
                    continue
            if line.strip():
                yield n, line


def parse_object(line: str | bytes) -> dict[str, Any]:
    """One JSONL line as an object; RtlocalError (without the file:line prefix) otherwise."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RtlocalError(f"not valid UTF-8 (byte {e.start + 1} of the line)") from None
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
