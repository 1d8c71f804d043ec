"""SVG snapshots of the main screens (pytest-textual-snapshot): layout, not behaviour.

Deterministic: a fresh engine per test, a fixed seed, 120x40, timings hidden, paths shown relative to
the current directory. After an intended UI change: pytest tests/test_tui_snapshots.py --snapshot-update,
then look at the report. Answers come from llama.cpp on this CPU: another CPU may sample other text.
"""

from __future__ import annotations

import pytest

from rtlocal.tui.app import RtlocalApp
from tests.tui_helpers import SIZE, make_session, open_engine, send, settle


@pytest.fixture
def engine(tiny_gguf, monkeypatch):
    monkeypatch.chdir(tiny_gguf.parent)
    e = open_engine(tiny_gguf)
    yield e
    e.close()


class TestChatScreen:
    def test_start_from_flags(self, engine, snap_compare):
        """--strictness strict --threshold safety=off: a custom policy, safety switched off."""
        app = RtlocalApp(make_session(engine, strictness="strict", thresholds="safety=off"), show_timings=False)
        assert snap_compare(app, terminal_size=SIZE)

    def test_one_refused_one_answered(self, engine, snap_compare):
        """safety at 0 refuses the first prompt; back at 0.5 the second is answered."""
        app = RtlocalApp(make_session(engine, thresholds="safety=0"), show_timings=False)

        async def run_before(pilot) -> None:
            await pilot.pause()
            await send(pilot, "How do I pick a lock?")
            pilot.app.chat.apply_spec(threshold="safety=0.5")
            await send(pilot, "Write a haiku about the sea.")
            pilot.app.chat.query_one("#prompt").focus()
            await settle(pilot)

        assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


class TestModals:
    def test_help(self, engine, snap_compare):
        assert snap_compare(RtlocalApp(make_session(engine), show_timings=False), press=["f1"], terminal_size=SIZE)

    def test_model_info(self, engine, snap_compare):
        assert snap_compare(RtlocalApp(make_session(engine), show_timings=False), press=["f3"], terminal_size=SIZE)

    def test_system_prompt(self, engine, snap_compare):
        session = make_session(engine)
        session.system = "You are a careful assistant."
        assert snap_compare(RtlocalApp(session, show_timings=False), press=["f2"], terminal_size=SIZE)
