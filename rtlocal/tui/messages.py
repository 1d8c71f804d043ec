"""Messages the generation worker posts to the chat screen (from its thread; Textual queues them safely)."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from rtlocal.runtime.engine import Stats
from rtlocal.runtime.policy import Decision


@dataclass
class DecisionMade(Message):
    """The first-answer-token decision, known before any text streams."""

    turn_id: int
    decision: Decision
    thresholds: dict[str, float | None]
    mode: str


@dataclass
class RefusalTriggered(Message):
    """Posted after `DecisionMade` when the model refuses."""

    turn_id: int
    category: str
    probability: float


@dataclass
class TokenReceived(Message):
    """A chunk of answer text."""

    turn_id: int
    text: str


@dataclass
class AnswerFinished(Message):
    """The answer ended: at EOS or max tokens, or stopped (`cancelled`); `stats` is None if it never started."""

    turn_id: int
    text: str
    stats: Stats | None
    cancelled: bool = False


@dataclass
class GenerationFailed(Message):
    turn_id: int
    error: str
