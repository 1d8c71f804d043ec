"""The help screen: what the panel means, and the key bindings as currently mapped."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown, Static

HELP = """\
# rtlocal chat

The model starts every answer with a token: `[respond]` or one refusal category.
rtlocal reads the probability **p** of each refusal token at that first position and
refuses with category *k* when **p_k ≥ τ_k** (the most likely such category wins);
otherwise it forces `[respond]`.

Under each answer: a badge with the decision, one bar per category (the bar is p,
the yellow marker is τ), and a line saying which threshold would have changed it.

**The panel** (right): a strictness preset for all categories, and per category a
switch (off = never refuse for it), − / + (steps of 0.05, also ← → or - +) and the
value (type a number, `off` or `force`, then Enter). τ 0 always refuses, 1 never.
Changes apply to the **next** answer; regenerate to re-ask the last prompt with them.

## Keys
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close", id="help.close")]

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 84; max-width: 95%; height: auto; max-height: 90%;
        border: round $primary; background: $surface; padding: 0 1;
    }
    HelpScreen #keys { padding: 0 2; }
    HelpScreen .hint { color: $text-muted; padding: 1 2 0 2; }
    """

    def __init__(self, keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        keys = Table.grid(padding=(0, 2))
        keys.add_column(style="bold yellow", no_wrap=True)
        keys.add_column()
        for key, what in self.keys:
            keys.add_row(key, what)
        with VerticalScroll():
            yield Markdown(HELP)
            yield Static(keys, id="keys")
            yield Static("Press Escape to close.", classes="hint")
