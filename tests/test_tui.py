"""The Textual chat, driven with Pilot on the real tiny GGUF (llama.cpp, no mocks)."""

from __future__ import annotations

import json
import math

import pytest

from rtlocal.constants import alias_of
from rtlocal.tui.app import RtlocalApp
from rtlocal.tui.screens import HelpScreen, ModelInfoScreen, SaveScreen, SystemPromptScreen
from rtlocal.tui.transcript import Turn, TurnStatus, fmt_prob, fmt_threshold, printable, save_transcript
from rtlocal.tui.widgets import AnswerView, ChatLog, ControlPanel, ThresholdRow
from rtlocal.tui.widgets.control_panel import step_threshold
from rtlocal.tui.widgets.decision import render_decision
from tests.tui_helpers import (
    SAFETY,
    SIZE,
    GatedSession,
    make_session,
    open_engine,
    send,
    settle,
    type_threshold,
    wait_for,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def engine(tiny_gguf):
    e = open_engine(tiny_gguf)
    yield e
    e.close()


def badge(app: RtlocalApp, turn_id: int) -> str:
    return str(app.chat.query_one(f"#answer-{turn_id} DecisionView").render()).splitlines()[0]


# ------------------------------------------------------------------ streaming and the decision


async def test_prompt_streams_an_answer_with_its_decision(engine):
    session = make_session(engine)
    app = RtlocalApp(session, show_timings=False)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello there", type_it=True)
        [turn] = app.chat.turns
        assert turn.status is TurnStatus.DONE and turn.answer
        assert turn.stats is not None and turn.stats.completion_tokens > 0
        view = app.chat.query_one(AnswerView)
        assert view.query_one("Markdown").source == printable(turn.answer)
        assert "RESPOND" in badge(app, turn.id)
        assert set(turn.decision.probs) == set(engine.refusal.categories)
        # the turn is in the model's history, so the next prompt sees it
        assert [m.role for m in session.history] == ["user", "assistant"]
        assert session.history[1].content == turn.answer
        assert "answer tokens" in str(app.chat.query_one("#state").render())
        assert app.query_one("#prompt").value == ""


async def test_threshold_zero_then_one_flips_the_decision(engine):
    app = RtlocalApp(make_session(engine), show_timings=False)
    async with app.run_test(size=SIZE) as pilot:
        await type_threshold(pilot, "safety", "0")
        assert app.session.policy.thresholds[SAFETY] == 0.0
        await send(pilot, "tell me a story")
        first = app.chat.turns[-1]
        assert first.decision.refused and first.decision.category == SAFETY
        assert "REFUSED · safety" in badge(app, first.id)
        assert app.chat.query_one(f"#answer-{first.id}").has_class("-refused")

        await type_threshold(pilot, "safety", "1")
        assert app.session.policy.thresholds[SAFETY] == 1.0
        await pilot.press("ctrl+r")  # regenerate the last prompt with these settings
        await settle(pilot)
        [turn] = app.chat.turns  # replaced, not appended
        assert turn.prompt == "tell me a story" and turn.id != first.id
        assert not turn.decision.refused
        assert "RESPOND" in badge(app, turn.id)
        assert len(app.session.history) == 2  # the refused turn was dropped from the history


async def test_all_thresholds_zero_refuse_with_the_most_likely_category(engine):
    app = RtlocalApp(make_session(engine), show_timings=False)
    async with app.run_test(size=SIZE) as pilot:
        for c in engine.refusal.categories:
            await type_threshold(pilot, alias_of(c), "0")
        assert set(app.session.policy.thresholds.values()) == {0.0}
        await send(pilot, "what is the capital of France?")
        d = app.chat.turns[-1].decision
        assert d.refused and d.category == max(d.probs, key=d.probs.get)


# ------------------------------------------------------------------ the panel


async def test_flags_set_the_starting_panel(engine):
    app = RtlocalApp(make_session(engine, strictness="strict", thresholds="safety=off"))
    async with app.run_test(size=SIZE) as pilot:
        panel = app.chat.panel
        assert panel.query_one("#preset").value is panel.query_one("#preset").NULL  # custom: no preset matches
        assert panel.query_one("#switch-safety").value is False
        assert panel.query_one("#value-safety").value == "off"
        assert panel.query_one("#value-incomplete").value == "0.20"
        await pilot.pause()


async def test_preset_buttons_and_switch_change_the_policy(engine):
    app = RtlocalApp(make_session(engine))
    async with app.run_test(size=SIZE) as pilot:
        panel = app.chat.panel
        assert panel.query_one("#preset").value == "balanced"
        select = panel.query_one("#preset")
        select.value = "strict"
        await pilot.pause()
        assert set(app.session.policy.thresholds.values()) == {0.2}
        assert panel.query_one("#value-humanizing").value == "0.20"

        await pilot.click("#raise-safety")
        await pilot.press("plus")  # the button keeps focus; + and - step the row it is in
        await pilot.click("#lower-incomplete")
        assert app.session.policy.thresholds[SAFETY] == pytest.approx(0.3)
        assert app.session.policy.thresholds["Incomplete requests"] == pytest.approx(0.15)
        assert select.value is select.NULL  # no longer a preset

        await pilot.click("#switch-safety")
        assert app.session.policy.thresholds[SAFETY] is None
        assert panel.query_one("#value-safety").value == "off"
        await pilot.click("#switch-safety")  # back on at its last value
        assert app.session.policy.thresholds[SAFETY] == pytest.approx(0.3)

        # keys on a focused row: - and + step by 0.05
        panel.query_one("#lower-humanizing").focus()
        await pilot.press("plus", "plus", "minus")
        assert app.session.policy.thresholds["Humanizing requests"] == pytest.approx(0.25)

        await type_threshold(pilot, "safety", "nonsense")  # refused with a notification, value kept
        assert app.session.policy.thresholds[SAFETY] == pytest.approx(0.3)
        assert panel.query_one("#value-safety").value == "0.30"
        await type_threshold(pilot, "unsupported", "force")
        assert app.session.policy.thresholds["Unsupported requests"] == 0.0


def test_step_threshold_snaps_to_the_grid():
    assert step_threshold(0.5, 1) == 0.55
    assert step_threshold(0.52, 1) == 0.55
    assert step_threshold(0.52, -1) == 0.5
    assert step_threshold(0.0, -1) == 0.0
    assert step_threshold(0.98, 1) == 1.0


# ------------------------------------------------------------------ while generating


async def test_keys_are_handled_while_an_answer_is_generating(engine):
    session = make_session(engine, cls=GatedSession, max_tokens=12)
    app = RtlocalApp(session, show_timings=False)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "tell me a story", wait=False)
        await wait_for(pilot, session.paused.is_set, what="the answer to start")
        turn = app.chat.turns[-1]
        await wait_for(pilot, lambda: turn.answer, what="streamed text")
        assert app.chat.generating == turn.id and turn.status is TurnStatus.STREAMING
        partial = turn.answer

        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert app.screen is app.chat
        await type_threshold(pilot, "safety", "0.35")  # applies to the next answer
        assert session.policy.thresholds[SAFETY] == 0.35
        assert turn.thresholds[SAFETY] == 0.5
        assert app.chat.generating == turn.id and turn.answer == partial  # still waiting on the model

        await pilot.press("escape")  # stop
        await settle(pilot)
        assert turn.status is TurnStatus.STOPPED
        assert turn.stats.stop_reason == "cancelled"  # the engine's generator was closed
        assert session.history[-1].content == turn.answer  # the partial answer stays in the conversation
        assert "stopped" in str(app.chat.query_one("#state").render())

        session.gate.set()  # the model is fast again: the next answer completes
        await send(pilot, "and another")
        assert app.chat.turns[-1].status is TurnStatus.DONE
        assert app.chat.turns[-1].thresholds[SAFETY] == 0.35


async def test_a_new_prompt_cancels_the_running_answer(engine):
    session = make_session(engine, cls=GatedSession, max_tokens=12)
    app = RtlocalApp(session, show_timings=False)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "first", wait=False)
        await wait_for(pilot, session.paused.is_set, what="the first answer")
        session.paused.clear()
        await send(pilot, "second", wait=False)
        await wait_for(pilot, session.paused.is_set, what="the second answer")
        first, second = app.chat.turns
        await wait_for(pilot, lambda: first.status is TurnStatus.STOPPED, what="the first to stop")
        assert app.chat.generating == second.id
        session.gate.set()
        await settle(pilot)
        assert second.status is TurnStatus.DONE
        assert [m.content for m in session.history if m.role == "user"] == ["first", "second"]


async def test_clear_while_generating_empties_everything(engine):
    session = make_session(engine, cls=GatedSession)
    app = RtlocalApp(session, show_timings=False)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "first", wait=False)
        await wait_for(pilot, session.paused.is_set, what="the answer")
        await pilot.press("ctrl+l")
        await settle(pilot)
        assert app.chat.turns == [] and session.history == []
        assert not app.chat.query(AnswerView)
        assert app.chat.query_one("#welcome").display


# ------------------------------------------------------------------ screens and files


async def test_save_transcript_as_markdown_and_json(engine, tmp_path):
    app = RtlocalApp(make_session(engine, thresholds="safety=force"), show_timings=False)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello there")
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, SaveScreen)
        path_input = app.screen.query_one("#path")
        path_input.value = str(tmp_path / "chat.md")
        await pilot.press("enter")
        await pilot.pause()
        md = (tmp_path / "chat.md").read_text()
        assert "## 1. You" in md and "hello there" in md and "refused: safety" in md

        await pilot.press("ctrl+s")
        app.screen.query_one("#path").value = str(tmp_path / "chat")
        await pilot.click("#json")
        await pilot.pause()
        doc = json.loads((tmp_path / "chat.json").read_text())
        [turn] = doc["turns"]
        assert turn["decision"]["refused"] and turn["decision"]["alias"] == "safety"
        assert turn["thresholds"][SAFETY] == 0.0
        assert turn["answer"] == app.chat.turns[0].answer
        assert doc["model"] == engine.path.name
        assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind


async def test_system_prompt_edit_starts_a_new_conversation(engine):
    session = make_session(engine)
    app = RtlocalApp(session, show_timings=False)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hello")
        await pilot.press("f2")
        assert isinstance(app.screen, SystemPromptScreen)
        await pilot.press(*"Be brief.", "ctrl+s")
        await pilot.pause()
        assert session.system == "Be brief."
        assert session.history == [] and app.chat.turns == []
        await send(pilot, "hi")
        assert session.history[0].content == "hi"
        await pilot.press("f2", "escape")  # cancel keeps it
        assert session.system == "Be brief."


async def test_model_info_and_help_screens(engine):
    app = RtlocalApp(make_session(engine), keymap={"chat.regenerate": "f5"})
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3")
        assert isinstance(app.screen, ModelInfoScreen)
        report = str(app.screen.query_one("#report").render())
        assert (
            "refusal mode" in report and "[Requests with safety concerns]" in report and "device         CPU" in report
        )
        await pilot.press("escape")
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        keys = {what: key for key, what in app.key_rows()}
        assert keys["Regenerate"] == "f5"  # the keymap rebinds by binding id
        await pilot.press("escape")
        await send(pilot, "hello")
        await pilot.press("f5")
        await settle(pilot)
        assert len(app.chat.turns) == 1 and app.chat.turns[0].id == 2


async def test_plain_model_runs_without_a_panel(tiny_plain_gguf):
    engine = open_engine(tiny_plain_gguf)
    try:
        app = RtlocalApp(make_session(engine), show_timings=False)
        async with app.run_test(size=SIZE) as pilot:
            assert not app.chat.query(ThresholdRow)
            await send(pilot, "hello")
            assert "PLAIN" in badge(app, 1)
    finally:
        engine.close()


# ------------------------------------------------------------------ pure helpers


def test_transcript_helpers(tmp_path):
    assert printable("a\x04b\nc\td") == "a\ufffdb\nc\td"
    assert fmt_prob(0.4213) == "0.42" and fmt_prob(0.00114) == "1.1e-03" and fmt_prob(math.nan) == "n/a"
    assert fmt_threshold(None) == "off" and fmt_threshold(0.5) == "0.50" and fmt_threshold(0.0011) == "0.0011"
    turn = Turn(1, "hi", "hello", status=TurnStatus.STOPPED)
    path = save_transcript(tmp_path / "t", [turn], model="m.gguf", system=None, fmt="json")
    assert path.suffix == ".json" and json.loads(path.read_text())["turns"][0]["status"] == "stopped"
    with pytest.raises(Exception, match="does not exist"):
        save_transcript(tmp_path / "missing" / "t.md", [turn], model="m", system=None)


def test_decision_rendering_names_the_threshold_that_would_flip_it():
    from rtlocal.runtime.policy import Decision

    d = Decision(True, SAFETY, {SAFETY: 0.42, "Incomplete requests": 0.1}, 0.4)
    text = str(render_decision(d, {SAFETY: 0.3, "Incomplete requests": 0.5}, "threshold"))
    assert "REFUSED · safety" in text and "raise τ above 0.42 for safety" in text
    d = Decision(False, None, {SAFETY: 0.2, "Incomplete requests": 0.1}, 0.7)
    text = str(render_decision(d, {SAFETY: 0.3, "Incomplete requests": 0.5}, "threshold"))
    assert "RESPOND" in text and "set τ ≤ 0.20 for safety" in text


def test_widgets_are_importable_without_an_app():
    assert ChatLog and ControlPanel
