"""Shared by the TUI tests: a real session on the tiny GGUF, a gated one, and waiting for answers."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rtlocal.runtime.engine import Engine, Response, SamplingParams
from rtlocal.runtime.policy import build_policy
from rtlocal.runtime.session import ChatSession

SAFETY = "Requests with safety concerns"
SIZE = (120, 40)
SAMPLING = SamplingParams(temperature=0.0, repeat_penalty=1.0)


def make_session(
    engine: Engine, *, strictness: str | None = None, thresholds: str | None = None, cls=ChatSession, **kw
):
    """Short greedy answers, so they are quick and the same on every run.

    The engine bans the answer-start tokens after the first position, so even the random fixture
    model (whose top logit after `[respond]` is `[respond]` again) writes text.
    """
    policy = build_policy(
        engine.refusal.categories, strictness=strictness, thresholds=thresholds, defaults=engine.refusal.thresholds
    )
    return cls(engine, policy, sampling=SAMPLING, max_tokens=kw.pop("max_tokens", 16), **kw)


def open_engine(path: Path) -> Engine:
    return Engine(path, n_ctx=512, n_threads=1)


@dataclass
class GatedSession(ChatSession):
    """The real engine, but each answer pauses after `free` chunks until `gate` is set: a slow model, on cue.

    The pause ends early when the worker is cancelled, as a real model would reach its next token.
    """

    free: int = 2
    gate: threading.Event = field(default_factory=threading.Event)
    paused: threading.Event = field(default_factory=threading.Event)

    def ask(self, text: str) -> Response:
        from textual.worker import get_current_worker

        response = super().ask(text)
        inner = response._chunks

        def gated():
            try:
                for i, chunk in enumerate(inner):
                    if i == self.free:
                        self.paused.set()
                        worker = get_current_worker()
                        while not self.gate.wait(0.01) and not worker.is_cancelled:
                            pass
                    yield chunk
            finally:
                inner.close()

        response._chunks = gated()
        return response


async def settle(pilot, timeout: float = 20.0) -> None:
    """Wait until no answer is being generated and the UI has caught up."""
    app = pilot.app
    deadline = time.monotonic() + timeout
    while app.chat.generating is not None or not app.engine_lock.acquire(blocking=False):
        assert time.monotonic() < deadline, "the answer did not finish"
        await pilot.pause(0.02)
    app.engine_lock.release()
    await pilot.pause()


async def wait_for(pilot, condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.02)


async def send(pilot, text: str, *, wait: bool = True, type_it: bool = False) -> None:
    """Submit a prompt (typed key by key with `type_it`, else pasted) and wait for the answer."""
    prompt = pilot.app.chat.query_one("#prompt")
    prompt.focus()
    if type_it:
        await pilot.press(*text)
    else:
        prompt.value = text
    await pilot.press("enter")
    if wait:
        await settle(pilot)


async def type_threshold(pilot, alias: str, value: str) -> None:
    """Click a row's value, type over it, press Enter: what a person does."""
    await pilot.click(f"#value-{alias}")
    await pilot.press("end", "ctrl+u", *value, "enter")
    await pilot.pause()
