"""The scrollable conversation: a prompt, then its answer (decision, streamed Markdown, a footer line)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from rtlocal.runtime.engine import Stats
from rtlocal.runtime.policy import Decision
from rtlocal.tui.transcript import Turn, TurnStatus, printable
from rtlocal.tui.widgets.decision import DecisionView

WELCOME = (
    "Type a prompt and press Enter. Each answer shows the model's refusal probabilities against the "
    "thresholds of the panel on the right; panel changes apply to the next answer (ctrl+r regenerates the last one)."
)


class UserMessage(Static):
    DEFAULT_CSS = """
    UserMessage {
        height: auto;
        margin: 1 0 0 0;
        padding: 0 1;
        background: $boost;
        border-left: wide $primary;
    }
    """

    def __init__(self, prompt: str, **kwargs) -> None:
        super().__init__(Text.assemble(("You  ", "bold"), printable(prompt)), **kwargs)


class AnswerView(Vertical):
    """One answer; the chat screen feeds it the decision, the text chunks and the end."""

    DEFAULT_CSS = """
    AnswerView {
        height: auto;
        margin: 0 0 0 0;
        padding: 0 0 0 1;
        border-left: wide $panel;
        &.-respond { border-left: wide $success; }
        &.-refused { border-left: wide $error; }
        & > Markdown {
            margin: 0;
            padding: 0 1;
            background: transparent;
        }
        & > .meta {
            height: auto;
            padding: 0 1;
            color: $text-muted;
        }
    }
    """

    def __init__(self, turn: Turn, **kwargs) -> None:
        super().__init__(**kwargs)
        self.turn_id = turn.id
        self._stream: MarkdownStream | None = None

    def compose(self) -> ComposeResult:
        yield DecisionView()
        yield Markdown()
        yield Static("waiting for the model…", classes="meta")

    def show_decision(self, decision: Decision, thresholds: dict[str, float | None], mode: str) -> None:
        self.query_one(DecisionView).show(decision, thresholds, mode)
        self.set_class(decision.refused, "-refused")
        self.set_class(not decision.refused, "-respond")
        self.query_one(".meta", Static).update("…")

    async def append(self, text: str) -> None:
        if self._stream is None:
            self._stream = Markdown.get_stream(self.query_one(Markdown))
        await self._stream.write(printable(text))

    async def finish(self, turn: Turn, *, show_timings: bool) -> None:
        """Flush the stream, make the Markdown exactly the final text, and write the footer line."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None
        md = self.query_one(Markdown)
        if md.source != printable(turn.answer):
            await md.update(printable(turn.answer))
        self.query_one(".meta", Static).update(answer_footer(turn, show_timings=show_timings))

    def fail(self, error: str) -> None:
        self.query_one(".meta", Static).update(Text(f"failed: {error}", style="red"))


def answer_footer(turn: Turn, *, show_timings: bool) -> Text:
    s: Stats | None = turn.stats
    if turn.status is TurnStatus.STOPPED and s is None:
        return Text("cancelled before it started", style="italic")
    if s is None:
        return Text(str(turn.status))
    parts = [f"{s.completion_tokens} tokens", {"eos": "end", "length": "max tokens"}.get(s.stop_reason, s.stop_reason)]
    if show_timings:
        parts += [f"{s.tokens_per_second:.1f} tok/s", f"first token {s.first_token_ms:.0f} ms"]
    if turn.status is TurnStatus.STOPPED:
        parts[1] = "stopped"
    if not turn.answer.strip():
        parts.append("no text")
    return Text(" · ".join(parts))


class ChatLog(VerticalScroll):
    """The conversation; it follows new text while scrolled to the bottom."""

    DEFAULT_CSS = """
    ChatLog {
        height: 1fr;
        padding: 0 1;
        & > #welcome { color: $text-muted; padding: 1 1; }
    }
    """

    def compose(self) -> ComposeResult:
        yield Static(WELCOME, id="welcome")

    def on_mount(self) -> None:
        self.anchor()

    async def add_turn(self, turn: Turn) -> AnswerView:
        self.query_one("#welcome").display = False
        view = AnswerView(turn, id=f"answer-{turn.id}")
        await self.mount_all([UserMessage(turn.prompt, id=f"prompt-{turn.id}"), view])
        self.anchor()
        return view

    def answer(self, turn_id: int) -> AnswerView | None:
        try:
            return self.query_one(f"#answer-{turn_id}", AnswerView)
        except NoMatches:
            return None

    async def remove_turn(self, turn_id: int) -> None:
        await self.query(f"#prompt-{turn_id}, #answer-{turn_id}").remove()

    async def clear(self) -> None:
        await self.query("UserMessage, AnswerView").remove()
        self.query_one("#welcome").display = True
