"""The model screen: what `rtlocal inspect` shows, plus how this session runs it."""

from __future__ import annotations

import os
from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from rtlocal.constants import Keys
from rtlocal.errors import RtlocalError
from rtlocal.runtime.engine import Engine
from rtlocal.runtime.gguf_info import format_report, inspect_gguf
from rtlocal.runtime.policy import Policy, describe
from rtlocal.tui.widgets.status_bar import device_label


def display_path(path: Path) -> str:
    """Relative to the current directory when under it, else with ~ for the home directory."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        home = Path.home()
        try:
            return os.path.join("~", path.relative_to(home))
        except ValueError:
            return str(path)


def model_report(engine: Engine, policy: Policy) -> str:
    info = inspect_gguf(engine.path)
    info["path"] = display_path(engine.path)
    base = info["rtlocal"].get(Keys.BASE_MODEL)
    if isinstance(base, str) and Path(base).exists():  # a local directory, not a hub id
        info["rtlocal"][Keys.BASE_MODEL] = display_path(Path(base))
    runtime = [
        "",
        "",
        "this session",
        f"  context        {engine.n_ctx} tokens",
        f"  device         {device_label(engine)}",
        f"  policy         {describe(policy)}",
    ]
    return format_report(info) + "\n".join(runtime)


class ModelInfoScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f3,q", "dismiss", "Close", id="model.close")]

    DEFAULT_CSS = """
    ModelInfoScreen { align: center middle; }
    ModelInfoScreen > VerticalScroll {
        width: 100; max-width: 95%; height: auto; max-height: 90%;
        border: round $primary; background: $surface; padding: 0 1;
    }
    ModelInfoScreen .title { text-style: bold; margin: 0 0 1 0; }
    ModelInfoScreen .hint { color: $text-muted; margin: 1 0 0 0; }
    """

    def __init__(self, engine: Engine, policy: Policy) -> None:
        super().__init__()
        self.engine = engine
        self.policy = policy

    def compose(self) -> ComposeResult:
        try:
            report = Text(model_report(self.engine, self.policy))
        except RtlocalError as e:
            report = Text(f"cannot read the model: {e}", style="red")
        with VerticalScroll():
            yield Label("Model", classes="title")
            yield Static(report, id="report")
            yield Label("Escape to close", classes="hint")
