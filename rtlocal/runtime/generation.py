"""`rtlocal generate`: prompts in (arguments, stdin or JSONL), answers out (text, JSON or JSONL)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rtlocal.constants import alias_of
from rtlocal.errors import RtlocalError
from rtlocal.jsonl import parse_object, read_lines
from rtlocal.runtime.engine import Engine, Response, SamplingParams
from rtlocal.runtime.policy import Decision, Policy
from rtlocal.runtime.prompts import Message, messages_from_dicts

SCHEMA_VERSION = 1


@dataclass
class Item:
    """One prompt to answer: an id (from the JSONL or its line number) and its messages."""

    id: Any
    messages: list[Message]
    line: int | None = None
    source: str | None = None  # the JSONL file (or '-') the item came from

    @property
    def where(self) -> str:
        """'FILE:LINE: ' for an item from a JSONL file, '' otherwise: the prefix of its errors."""
        return f"{self.source}:{self.line}: " if self.line is not None else ""


def read_jsonl(path: Path | str, *, system: str | None = None, skip_bad: bool = False, warn: IO | None = None) -> Iterator[Item]:
    """Items from JSONL: {"prompt": str} or {"messages": [...]}, optional "id"; bad lines report file:line."""
    for n, line in read_lines(path):
        try:
            item = _item(parse_object(line), n, system)
            item.source = str(path)
            yield item
        except RtlocalError as e:
            msg = f"{path}:{n}: {e}"
            if not skip_bad:
                raise RtlocalError(msg + " (use --skip-bad to skip such lines)") from None
            if warn is not None:
                print(f"warning: skipped {msg}", file=warn)


def check_prompt(text: str, where: str) -> str:
    """A prompt with no text but whitespace is refused wherever it comes from (argument, stdin, JSONL)."""
    if not text.strip():
        raise RtlocalError(f"no prompt: {where} is empty")
    return text


def _item(obj: dict[str, Any], n: int, system: str | None) -> Item:
    if isinstance(obj.get("prompt"), str):
        msgs = [Message("user", check_prompt(obj["prompt"], '"prompt"'))]
    elif isinstance(obj.get("messages"), list):
        msgs = messages_from_dicts(obj["messages"], "messages")
    else:
        raise RtlocalError('expected a "prompt" string or a "messages" list')
    if system and msgs[0].role != "system":
        msgs.insert(0, Message("system", system))
    return Item(obj.get("id", n), msgs, n)


def single_item(prompt: str, system: str | None) -> Item:
    msgs = [Message("user", prompt)]
    if system:
        msgs.insert(0, Message("system", system))
    return Item(None, msgs)


def decision_fields(d: Decision, policy: Policy) -> dict[str, Any]:
    """The decision as JSON: in generate's records and in the server's `rtlocal` object."""
    return {
        "decision": d.label,
        "category": d.category,
        "category_alias": alias_of(d.category) if d.category else None,
        "probabilities": {c: round(p, 6) for c, p in d.probs.items()},
        "p_respond": None if d.p_respond != d.p_respond else round(d.p_respond, 6),
        "mode": d.mode.value,
        "thresholds": {c: t for c, t in policy.thresholds.items()},
    }


def result_record(item: Item, response: Response, policy: Policy) -> dict[str, Any]:
    """The pinned JSON schema of one answer (see README, 'JSON output')."""
    s = response.stats
    return {
        "id": item.id,
        "text": response.text,
        **decision_fields(response.decision, policy),
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "stop_reason": s.stop_reason,
        "timings": {
            "prompt_ms": round(s.prompt_ms, 2),
            "decision_ms": round(s.decision_ms, 3),
            "first_token_ms": round(s.first_token_ms, 2),
            "decode_ms": round(s.decode_ms, 2),
            "tokens_per_second": round(s.tokens_per_second, 2),
        },
    }


def run(
    engine: Engine,
    items: Iterator[Item],
    policy: Policy,
    *,
    sampling: SamplingParams,
    max_tokens: int,
    fmt: str,
    out: IO,
    err: IO,
    decision_temperature: float = 1.0,
    show_decision: bool = False,
    skip_bad: bool = False,
) -> tuple[int, int]:
    """Answer every item; stream text (fmt 'text') or write JSON/JSONL. Returns (answered, refused).

    Nothing answered is lost when the run stops early: on Ctrl-C the answer in progress is kept with
    stop_reason 'cancelled', and --json still prints the records so far, as on any other error.
    An item the engine cannot answer (a prompt longer than the context) is an error naming its
    `file:line`, or with `skip_bad` a warning, and the batch goes on.
    """
    answered = refused = 0
    records = []
    finished = False
    try:
        for item in items:
            try:
                response = engine.respond(
                    item.messages, policy, sampling=sampling, max_tokens=max_tokens, decision_temperature=decision_temperature
                )
            except RtlocalError as e:
                if skip_bad and item.line is not None:
                    print(f"warning: skipped {item.where}{e}", file=err, flush=True)
                    continue
                hint = " (use --skip-bad to skip such lines)" if item.line is not None else ""
                raise RtlocalError(f"{item.where}{e}{hint}") from None
            d = response.decision
            try:
                if fmt == "text":
                    if show_decision and d.refused:
                        print(f"[refused: {alias_of(d.category)} p={d.probs[d.category]:.2f}]", file=err, flush=True)
                    for chunk in response:
                        out.write(chunk)
                        out.flush()
                else:
                    response.finish()
            finally:  # also on Ctrl-C: the answer so far is part of the output
                if fmt == "text":
                    out.write("\n")
                    out.flush()
                else:
                    rec = result_record(item, response, policy)
                    if fmt == "jsonl":
                        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        out.flush()
                    else:
                        records.append(rec)
            answered += 1
            refused += int(d.refused)
        finished = True
    finally:
        if fmt == "json" and (records or finished):
            doc = records[0] if len(records) == 1 and records[0]["id"] is None else records
            out.write(json.dumps(doc, ensure_ascii=False, indent=2) + "\n")
            out.flush()
    return answered, refused
