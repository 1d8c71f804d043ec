"""The Textual app behind `rtlocal chat` on a terminal, and `run_tui`, its entry point from the CLI."""

from __future__ import annotations

import threading

from textual.app import App
from textual.binding import Binding
from textual.screen import Screen

from rtlocal.runtime.session import ChatSession
from rtlocal.tui.screens.chat import ChatScreen


class RtlocalApp(App[None]):
    """Chat with a refusal-token model and tune its per-category thresholds while looking at the decisions.

    `keymap` rebinds actions by binding id (e.g. {"chat.regenerate": "f5"}); `show_timings=False`
    hides tokens/s and latencies (snapshots, reproducible screenshots).
    """

    TITLE = "rtlocal chat"
    ENABLE_COMMAND_PALETTE = False

    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True, id="app.quit"),
        Binding("f1", "help", "Help", id="app.help"),
    ]

    def __init__(
        self, session: ChatSession, *, keymap: dict[str, str] | None = None, show_timings: bool = True
    ) -> None:
        super().__init__()
        self.session = session
        self.show_timings = show_timings
        # llama.cpp contexts are single-threaded: whoever generates holds this (see ChatScreen._generate).
        self.engine_lock = threading.Lock()
        if keymap:
            self.set_keymap(keymap)

    def get_default_screen(self) -> Screen:
        return ChatScreen(self.session, engine_lock=self.engine_lock, show_timings=self.show_timings)

    @property
    def chat(self) -> ChatScreen:
        return next(s for s in self.screen_stack if isinstance(s, ChatScreen))

    def key_rows(self) -> list[tuple[str, str]]:
        """(key, description) for every binding of the chat screen and the app, as currently mapped."""
        rows: dict[str, tuple[str, str]] = {}
        for active in self.chat.active_bindings.values():
            b = active.binding
            if not (b.show and b.description):
                continue
            if b.action in rows:
                shown, what = rows[b.action]
                rows[b.action] = (f"{shown}, {self.get_key_display(b)}", what)
            else:
                rows[b.action] = (self.get_key_display(b), b.description)
        return list(rows.values())

    def action_help(self) -> None:
        from rtlocal.tui.screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.key_rows()))

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no thread is using the engine (the caller may close it). False on timeout."""
        if not self.engine_lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self.engine_lock.release()
        return True


def run_tui(session: ChatSession, *, keymap: dict[str, str] | None = None) -> None:
    """Run the full-screen chat until the user quits; returns once generation has stopped."""
    app = RtlocalApp(session, keymap=keymap)
    try:
        app.run()
    finally:
        # A cancelled worker stops at its next token; the engine must not be closed before that.
        app.wait_idle()
