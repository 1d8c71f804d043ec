"""The chat screen: the conversation, the prompt, the control panel and the status bar.

Generation runs in one exclusive thread worker: a new request cancels the previous one, which stops
consuming its Response at the next chunk. The engine lock keeps llama.cpp to one thread at a time;
the history lock and the epoch keep a cancelled answer from landing in a cleared conversation.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Input
from textual.worker import get_current_worker

from rtlocal.errors import RtlocalError
from rtlocal.runtime.calibration import strictness_mapper
from rtlocal.runtime.engine import Response
from rtlocal.runtime.policy import Mode, Policy, build_policy
from rtlocal.runtime.session import ChatSession
from rtlocal.tui.messages import AnswerFinished, DecisionMade, GenerationFailed, RefusalTriggered, TokenReceived
from rtlocal.tui.transcript import Turn, TurnStatus, default_transcript_path, save_transcript
from rtlocal.tui.widgets.chat_log import ChatLog
from rtlocal.tui.widgets.control_panel import ControlPanel, ThresholdRow
from rtlocal.tui.widgets.status_bar import StatusBar, device_label

log = logging.getLogger(__name__)


def matching_preset(session: ChatSession) -> str | None:
    """The strictness preset that gives exactly the session's thresholds, if any."""
    from rtlocal.constants import STRICTNESS_PRESETS

    info = session.engine.refusal
    if not info.categories or session.policy.mode is not Mode.THRESHOLD:
        return None
    mapper = strictness_mapper(info.calibration)
    for name in STRICTNESS_PRESETS:
        if build_policy(info.categories, strictness=name, calibrated=mapper).thresholds == session.policy.thresholds:
            return name
    return None


def close_response(response: Response) -> None:
    """Stop a Response's token stream now, in the thread that owns the engine."""
    response.close()


class ChatScreen(Screen):
    BINDINGS = [
        Binding("ctrl+r", "regenerate", "Regenerate", id="chat.regenerate"),
        Binding("escape", "stop", "Stop", id="chat.stop"),
        Binding("ctrl+s", "save", "Save", id="chat.save"),
        Binding("ctrl+l", "clear", "Clear", id="chat.clear"),
        Binding("f2", "edit_system", "System", id="chat.system"),
        Binding("f3", "model_info", "Model", id="chat.model_info"),
        Binding("ctrl+t", "toggle_panel_focus", "Panel", id="chat.panel"),
    ]

    DEFAULT_CSS = """
    ChatScreen #conversation { width: 1fr; }
    ChatScreen #prompt { margin: 0 1; }
    """

    AUTO_FOCUS = "#prompt"

    def __init__(self, session: ChatSession, *, engine_lock: threading.Lock, show_timings: bool = True) -> None:
        super().__init__()
        self.session = session
        self.engine_lock = engine_lock
        self.show_timings = show_timings
        self.turns: list[Turn] = []
        self.generating: int | None = None  # the turn being answered
        self._next_id = 1
        self._epoch = 0  # bumped by clear: older workers must not commit
        self._committed: list[int] = []  # turn ids in the session history, in order
        self._history_lock = threading.Lock()

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            with Vertical(id="conversation"):
                yield ChatLog(id="log")
                yield Input(
                    placeholder="Ask something… (Enter sends; a new prompt stops the current answer)", id="prompt"
                )
            info = self.session.engine.refusal
            yield ControlPanel(info.categories, self.session.policy, matching_preset(self.session), id="panel")
        yield StatusBar(device_label(self.session.engine), show_timings=self.show_timings, id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.title = "rtlocal chat"
        self.sub_title = self.session.engine.path.name

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return True if self.generating is not None else None
        if action == "regenerate":
            return True if self.turns else None
        return True

    @property
    def chat_log(self) -> ChatLog:
        return self.query_one("#log", ChatLog)

    @property
    def panel(self) -> ControlPanel:
        return self.query_one("#panel", ControlPanel)

    def _set_generating(self, turn_id: int | None, state: str) -> None:
        self.generating = turn_id
        self.query_one(StatusBar).state = state
        self.refresh_bindings()

    def _turn(self, turn_id: int) -> Turn | None:
        return next((t for t in self.turns if t.id == turn_id), None)

    # ------------------------------------------------------------------ asking

    @on(Input.Submitted, "#prompt")
    async def _prompt_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        event.input.clear()
        await self.ask(text)

    async def ask(self, text: str, *, replaces: int | None = None) -> Turn:
        """Show the prompt and start answering it (cancelling any answer in progress)."""
        turn = Turn(self._next_id, text)
        self._next_id += 1
        self.turns.append(turn)
        await self.chat_log.add_turn(turn)
        self._set_generating(turn.id, "generating…")
        self._generate(turn.id, text, self._epoch, replaces)
        return turn

    def _post(self, message: Message) -> None:
        try:
            self.post_message(message)
        except RuntimeError:  # the app's loop is gone (quitting): nobody is listening
            pass

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def _generate(self, turn_id: int, text: str, epoch: int, replaces: int | None) -> None:
        worker = get_current_worker()
        while not self.engine_lock.acquire(timeout=0.05):
            if worker.is_cancelled:
                self._post(AnswerFinished(turn_id, "", None, cancelled=True))
                return
        try:
            with self._history_lock:
                if worker.is_cancelled or epoch != self._epoch:
                    self._post(AnswerFinished(turn_id, "", None, cancelled=True))
                    return
                if replaces is not None and self._committed and self._committed[-1] == replaces:
                    del self.session.history[-2:]  # regenerate: drop the turn being replaced
                    self._committed.pop()
            policy = self.session.policy  # what ask() uses; the panel replaces, never mutates, it
            response = self.session.ask(text)
            d = response.decision
            self._post(DecisionMade(turn_id, d, dict(policy.thresholds), str(d.mode)))
            if d.refused and d.category is not None:
                self._post(RefusalTriggered(turn_id, d.category, d.probs.get(d.category, float("nan"))))
            cancelled = False
            chunks = iter(response)
            try:
                for chunk in chunks:
                    self._post(TokenReceived(turn_id, chunk))
                    if worker.is_cancelled:
                        cancelled = True
                        break
            finally:
                chunks.close()
                close_response(response)
            with self._history_lock:
                if epoch == self._epoch:
                    self.session.commit(text, response)
                    self._committed.append(turn_id)
            self._post(AnswerFinished(turn_id, response.text, response.stats, cancelled))
        except Exception as e:
            if not isinstance(e, RtlocalError):
                log.exception("generation failed")
            self._post(GenerationFailed(turn_id, str(e) or type(e).__name__))
        finally:
            self.engine_lock.release()

    # ------------------------------------------------------------------ worker messages

    @on(DecisionMade)
    def _decision_made(self, message: DecisionMade) -> None:
        turn = self._turn(message.turn_id)
        view = self.chat_log.answer(message.turn_id)
        if turn is None or view is None:
            return
        turn.decision, turn.thresholds, turn.mode = message.decision, message.thresholds, message.mode
        turn.status = TurnStatus.STREAMING
        view.show_decision(message.decision, message.thresholds, message.mode)

    @on(RefusalTriggered)
    def _refused(self, message: RefusalTriggered) -> None:
        if message.turn_id == self.generating:
            self.query_one(StatusBar).state = "refusing…"

    @on(TokenReceived)
    async def _token(self, message: TokenReceived) -> None:
        turn = self._turn(message.turn_id)
        view = self.chat_log.answer(message.turn_id)
        if turn is None or view is None:
            return
        turn.answer += message.text
        await view.append(message.text)

    @on(AnswerFinished)
    async def _finished(self, message: AnswerFinished) -> None:
        turn = self._turn(message.turn_id)
        view = self.chat_log.answer(message.turn_id)
        if turn is not None and view is not None:
            turn.answer = message.text
            turn.stats = message.stats
            turn.status = TurnStatus.STOPPED if message.cancelled or message.stats is None else TurnStatus.DONE
            await view.finish(turn, show_timings=self.show_timings)
            if message.stats is not None:
                self.query_one(StatusBar).stats = message.stats
        if message.turn_id == self.generating:
            self._set_generating(None, "stopped" if message.cancelled else "ready")

    @on(GenerationFailed)
    def _failed(self, message: GenerationFailed) -> None:
        turn = self._turn(message.turn_id)
        view = self.chat_log.answer(message.turn_id)
        if turn is not None and view is not None:
            turn.status, turn.error = TurnStatus.FAILED, message.error
            view.fail(message.error)
        self.notify(message.error, title="generation failed", severity="error")
        if message.turn_id == self.generating:
            self._set_generating(None, "failed")

    # ------------------------------------------------------------------ the panel

    @on(ControlPanel.PresetSelected)
    def _preset(self, message: ControlPanel.PresetSelected) -> None:
        try:
            self.apply_spec(strictness=message.preset)
        except RtlocalError as e:
            self.notify(str(e), severity="error")

    def apply_spec(self, *, strictness: str | None = None, threshold: str | None = None) -> Policy:
        """Apply --strictness/--threshold style specs (as the REPL's /strictness and /threshold do)."""
        self.session.set_strictness(strictness, threshold)
        self.panel.show_policy(self.session.policy, matching_preset(self.session))
        return self.session.policy

    @on(ThresholdRow.Changed)
    def _threshold(self, message: ThresholdRow.Changed) -> None:
        self.set_threshold(message.category, message.threshold)

    def set_threshold(self, category: str, threshold: float | None) -> Policy:
        """Replace (never mutate: a worker may be reading it) the session policy with one changed threshold."""
        policy = self.session.policy
        self.session.policy = dataclasses.replace(policy, thresholds={**policy.thresholds, category: threshold})
        self.panel.show_preset(matching_preset(self.session))
        return self.session.policy

    # ------------------------------------------------------------------ actions

    def action_stop(self) -> None:
        if self.generating is not None:
            self.workers.cancel_group(self, "generate")
            self.query_one(StatusBar).state = "stopping…"

    async def action_regenerate(self) -> None:
        if not self.turns:
            self.notify("nothing to regenerate yet", severity="warning")
            return
        last = self.turns.pop()
        await self.chat_log.remove_turn(last.id)
        await self.ask(last.prompt, replaces=last.id)

    async def action_clear(self) -> None:
        self.workers.cancel_group(self, "generate")
        with self._history_lock:
            self._epoch += 1
            self.session.reset()
            self._committed.clear()
        self.turns.clear()
        await self.chat_log.clear()
        self.query_one(StatusBar).stats = None
        self._set_generating(None, "ready")

    def action_save(self) -> None:
        if not self.turns:
            self.notify("nothing to save yet", severity="warning")
            return
        from rtlocal.tui.screens.save import SaveScreen

        self.app.push_screen(SaveScreen(default_transcript_path()), self._save)

    def _save(self, result: tuple | None) -> None:
        if result is None:
            return
        path, fmt = result
        try:
            written = self.save_transcript(path, fmt)
        except RtlocalError as e:
            self.notify(str(e), title="not saved", severity="error")
            return
        self.notify(f"saved {len(self.turns)} turns to {written}", title="transcript")

    def save_transcript(self, path, fmt: str | None = None):
        return save_transcript(
            path, self.turns, model=self.session.engine.path.name, system=self.session.system, fmt=fmt
        )

    def action_edit_system(self) -> None:
        from rtlocal.tui.screens.system_prompt import SystemPromptScreen

        self.app.push_screen(SystemPromptScreen(self.session.system or ""), self._system_edited)

    async def _system_edited(self, text: str | None) -> None:
        if text is None:
            return
        new = text.strip() or None
        if new == self.session.system:
            return
        self.session.system = new
        await self.action_clear()
        self.notify("system prompt set; conversation cleared" if new else "system prompt removed; conversation cleared")

    def action_model_info(self) -> None:
        from rtlocal.tui.screens.model_info import ModelInfoScreen

        self.app.push_screen(ModelInfoScreen(self.session.engine, self.session.policy))

    def action_toggle_panel_focus(self) -> None:
        focused = self.focused
        if focused is not None and self.panel in focused.ancestors_with_self:
            self.query_one("#prompt", Input).focus()
        else:
            self.panel.query_one("#preset").focus()
