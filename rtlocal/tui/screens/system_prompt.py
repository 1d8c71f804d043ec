"""Edit the system prompt (a modal; saving it starts a new conversation)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, TextArea


class SystemPromptScreen(ModalScreen[str | None]):
    """Dismisses with the new text, or None when cancelled."""

    BINDINGS = [
        Binding("ctrl+s", "save", "Save", id="system.save"),
        Binding("escape", "cancel", "Cancel", id="system.cancel"),
    ]

    DEFAULT_CSS = """
    SystemPromptScreen { align: center middle; }
    SystemPromptScreen > Vertical {
        width: 80; max-width: 95%; height: 20;
        border: round $primary; background: $surface; padding: 0 1;
    }
    SystemPromptScreen .title { text-style: bold; }
    SystemPromptScreen .hint { color: $text-muted; }
    SystemPromptScreen TextArea { height: 1fr; }
    SystemPromptScreen Horizontal { height: auto; align-horizontal: right; }
    SystemPromptScreen Button { margin: 0 0 0 1; }
    """

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("System prompt", classes="title")
            yield Label("Saving it clears the conversation. Empty: no system prompt.", classes="hint")
            yield TextArea(self.text, id="system-text", soft_wrap=True)
            with Horizontal():
                yield Button("Save (ctrl+s)", id="save", variant="primary", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()

    def action_save(self) -> None:
        self.dismiss(self.query_one(TextArea).text)

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed)
    def _button(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()
