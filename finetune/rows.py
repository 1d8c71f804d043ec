"""Reading rows: a JSONL file line by line with each row's `file:line`, a row's conversation and
answer, and prompt files (JSONL or CSV); what the data loaders and the contrast pairs both read with.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rtlocal.errors import RtlocalError
from rtlocal.jsonl import read_objects


def read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`file:line`, row) for every non-blank line; a bad line is an error naming it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise RtlocalError(f"{path}: no such file")
    if path.is_dir():
        raise RtlocalError(f"{path}: is a directory (expected a JSONL file)")
    for n, row in read_objects(path):
        yield f"{path}:{n}", row


def _text(row: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None or value == "":
        if required:
            raise RtlocalError(f"{where}: missing or empty {key!r}")
        return None
    if not isinstance(value, str):
        raise RtlocalError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(row: dict[str, Any], where: str) -> tuple[list[dict[str, str]], str | None]:
    """(conversation up to the answer, answer) from `messages` or `prompt`/`response`."""
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RtlocalError(f"{where}: 'messages' must be a non-empty list")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
                raise RtlocalError(f"{where}: messages[{i}] must be {{'role': system|user|assistant, 'content': str}}")
            clean.append({"role": m["role"], "content": m["content"]})
        answer = None
        if clean[-1]["role"] == "assistant":
            answer = clean.pop()["content"] or None
        elif row.get("response"):  # our own JSONL: the conversation plus a separate answer
            answer = _text(row, "response", where)
        if not clean or clean[-1]["role"] != "user" or not clean[-1]["content"].strip():
            raise RtlocalError(f"{where}: the conversation must end with a non-empty user turn (then, optionally, the answer)")
        return clean, answer
    prompt = _text(row, "prompt", where, required=False) or _text(row, "instruction", where, required=False)
    if prompt is None or not prompt.strip():
        raise RtlocalError(f"{where}: expected 'messages' or a non-empty 'prompt'")
    answer = None
    for key in ("response", "chosen", "output", "completion"):
        if row.get(key):
            answer = _text(row, key, where)
            break
    msgs = []
    if row.get("system"):
        msgs.append({"role": "system", "content": _text(row, "system", where)})
    msgs.append({"role": "user", "content": prompt})
    return msgs, answer


def read_prompts(path: Path | str) -> list[tuple[str, str]]:
    """(`file:line`, prompt) of a prompt file (a validation or test file, or harmful prompts): JSONL with `prompt` (or `messages`), or CSV
    with a `prompt` or `Behavior` column (HarmBench/AdvBench)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RtlocalError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        import csv

        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            cols = {c.strip().lower(): c for c in reader.fieldnames or []}
            col = cols.get("prompt") or cols.get("behavior")
            if col is None:
                raise RtlocalError(f"{path}: no 'prompt' or 'Behavior' column")
            return [(f"{path}:{n}", row[col]) for n, row in enumerate(reader, 2) if row.get(col)]
    out = []
    for where, row in read_jsonl(path):
        msgs, _ = _messages(row, where)
        out.append((where, msgs[-1]["content"]))
    return out
