"""What the chat log holds (one `Turn` per prompt) and how it is saved as Markdown or JSON."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from pathlib import Path
from typing import Any

from rtlocal.constants import alias_of
from rtlocal.errors import RtlocalError
from rtlocal.paths import TRANSCRIPT_FILE, atomic_write_text, check_output
from rtlocal.runtime.engine import Stats
from rtlocal.runtime.policy import Decision

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Model text made safe for a terminal: control characters become U+FFFD."""
    return _CONTROL.sub("\ufffd", text)


def fmt_prob(p: float) -> str:
    """A probability in at most 7 cells: '0.42', '1.1e-03', 'n/a'."""
    if math.isnan(p):
        return "n/a"
    if p == 0 or p >= 0.01:
        return f"{p:.2f}"
    return f"{p:.1e}"


def fmt_threshold(t: float | None) -> str:
    """'off', '0.50', or more digits for a threshold typed off the 0.01 grid."""
    if t is None:
        return "off"
    if abs(t * 100 - round(t * 100)) < 1e-9:
        return f"{t:.2f}"
    return f"{t:.4g}"


class TurnStatus(StrEnum):
    PENDING = "pending"  # waiting for the engine
    STREAMING = "streaming"
    DONE = "done"
    STOPPED = "stopped"  # cancelled by the user or by a newer request
    FAILED = "failed"


@dataclass
class Turn:
    """One prompt and its answer, with the decision and the thresholds it was made with."""

    id: int
    prompt: str
    answer: str = ""
    decision: Decision | None = None
    thresholds: dict[str, float | None] | None = None
    mode: str = ""
    stats: Stats | None = None
    status: TurnStatus = TurnStatus.PENDING
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prompt": self.prompt, "answer": self.answer, "status": str(self.status)}
        if self.decision is not None:
            dec = self.decision
            d["decision"] = {
                "label": dec.label,
                "refused": dec.refused,
                "category": dec.category,
                "alias": alias_of(dec.category) if dec.category else None,
                "mode": str(dec.mode),
                "probs": dict(dec.probs),
                "p_respond": None if math.isnan(dec.p_respond) else dec.p_respond,
            }
        if self.thresholds is not None:
            d["thresholds"] = dict(self.thresholds)
        if self.stats is not None:
            s = self.stats
            d["stats"] = {
                "prompt_tokens": s.prompt_tokens,
                "completion_tokens": s.completion_tokens,
                "first_token_ms": round(s.first_token_ms, 1),
                "tokens_per_second": round(s.tokens_per_second, 1),
                "stop_reason": s.stop_reason,
            }
        if self.error:
            d["error"] = self.error
        return d


def decision_summary(turn: Turn) -> str:
    """One line: 'refused: safety (p 0.42 ≥ τ 0.30)' or 'respond (top: incomplete p 0.01 < τ 0.50)'."""
    dec = turn.decision
    if dec is None:
        return str(turn.status)
    if not dec.probs:
        return "plain model (no refusal tokens)"
    th = turn.thresholds or {}
    if dec.refused and dec.category is not None:
        p = dec.probs.get(dec.category, math.nan)
        rule = f" (p {fmt_prob(p)} ≥ τ {fmt_threshold(th.get(dec.category))})" if dec.mode == "threshold" else ""
        return f"refused: {alias_of(dec.category)}{rule}"
    c, p = max(dec.probs.items(), key=lambda kv: kv[1])
    rule = f" < τ {fmt_threshold(th.get(c))}" if dec.mode == "threshold" else ""
    return f"respond (top: {alias_of(c)} p {fmt_prob(p)}{rule})"


def transcript_json(turns: list[Turn], *, model: str, system: str | None, saved_at: datetime | None = None) -> str:
    saved_at = saved_at or datetime.now(timezone.utc)
    doc = {
        "model": model,
        "system": system,
        "saved_at": saved_at.isoformat(timespec="seconds"),
        "turns": [t.to_dict() for t in turns],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def transcript_markdown(turns: list[Turn], *, model: str, system: str | None, saved_at: datetime | None = None) -> str:
    saved_at = saved_at or datetime.now(timezone.utc)
    out = ["# rtlocal chat", "", f"- model: `{model}`", f"- saved: {saved_at.isoformat(timespec='seconds')}"]
    if system:
        out.append(f"- system prompt: {system}")
    for n, t in enumerate(turns, 1):
        out += ["", f"## {n}. You", "", t.prompt, "", f"### Assistant · {decision_summary(t)}", ""]
        if t.decision is not None and t.decision.probs:
            th = t.thresholds or {}
            probs = " · ".join(
                f"{alias_of(c)} {fmt_prob(p)}/{fmt_threshold(th.get(c))}" for c, p in t.decision.probs.items()
            )
            out += [f"> p/τ: {probs}", ""]
        out.append(t.answer if t.answer else f"_({t.status})_")
        if t.status is TurnStatus.STOPPED and t.answer:
            out += ["", "_(stopped)_"]
    return "\n".join(out) + "\n"


def save_transcript(
    path: str | Path, turns: list[Turn], *, model: str, system: str | None, fmt: str | None = None, force: bool = False
) -> Path:
    """Write the transcript atomically; the format follows `fmt` or else the file extension. An existing
    file is replaced only when it is an rtlocal transcript, or with `force`.

    Returns:
        The path written (with '.md' or '.json' added when it had no extension).
    """
    p = Path(path).expanduser()
    fmt = fmt or ("json" if p.suffix.lower() == ".json" else "markdown")
    if fmt not in ("markdown", "json"):
        raise RtlocalError(f"transcript format must be markdown or json, got {fmt!r}")
    if not p.suffix:
        p = p.with_suffix(".json" if fmt == "json" else ".md")
    # an earlier transcript is replaced; any other file only when forced
    p = check_output(p, kind=TRANSCRIPT_FILE, force=force, hint="choose another name")
    render = transcript_json if fmt == "json" else transcript_markdown
    try:
        atomic_write_text(p, render(turns, model=model, system=system))
    except OSError as e:
        raise RtlocalError(f"cannot write {p}: {e.strerror or e}") from e
    return p


def default_transcript_path(now: datetime | None = None, *, directory: Path | None = None) -> Path:
    """'rtlocal-chat-20250101-120000.md' in the current directory."""
    now = now or datetime.now()
    return (directory or Path.cwd()) / f"rtlocal-chat-{now:%Y%m%d-%H%M%S}.md"
