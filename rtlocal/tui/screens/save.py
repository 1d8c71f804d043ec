"""Choose where to save the transcript, and as Markdown or JSON."""

from __future__ import annotations

from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label


class SaveScreen(ModalScreen[tuple[Path, str] | None]):
    """Dismisses with (path, 'markdown'|'json'), or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="save.cancel")]

    DEFAULT_CSS = """
    SaveScreen { align: center middle; }
    SaveScreen > Vertical {
        width: 80; max-width: 95%; height: auto;
        border: round $primary; background: $surface; padding: 0 1;
    }
    SaveScreen .title { text-style: bold; }
    SaveScreen .hint { color: $text-muted; }
    SaveScreen Horizontal { height: auto; align-horizontal: right; margin: 1 0 0 0; }
    SaveScreen Button { margin: 0 0 0 1; }
    """

    def __init__(self, default: Path) -> None:
        super().__init__()
        self.default = default

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Save transcript", classes="title")
            yield Label("Enter saves in the format of the extension (.json: JSON, else Markdown).", classes="hint")
            yield Input(str(self.default), id="path")
            with Horizontal():
                yield Button("Markdown", id="markdown", variant="primary", compact=True)
                yield Button("JSON", id="json", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def _path(self) -> Path | None:
        text = self.query_one("#path", Input).value.strip()
        if not text:
            self.notify("give a file name", severity="error")
            return None
        return Path(text).expanduser()

    @on(Input.Submitted, "#path")
    def _submitted(self) -> None:
        path = self._path()
        if path is not None:
            self.dismiss((path, "json" if path.suffix.lower() == ".json" else "markdown"))

    @on(Button.Pressed)
    def _button(self, event: Button.Pressed) -> None:
        if event.button.id == "cancel":
            self.dismiss(None)
            return
        path = self._path()
        if path is None:
            return
        fmt = event.button.id or "markdown"
        suffix = ".json" if fmt == "json" else ".md"
        if path.suffix.lower() in (".json", ".md", ".markdown", ""):
            path = path.with_suffix(suffix)
        self.dismiss((path, fmt))

    def action_cancel(self) -> None:
        self.dismiss(None)
