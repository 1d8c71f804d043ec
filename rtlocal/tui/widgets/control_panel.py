"""The control panel: a strictness preset, and per category an on/off switch and a threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Button, Input, Label, Select, Static, Switch

from rtlocal.constants import DEFAULT_THRESHOLD, STRICTNESS_PRESETS, alias_of
from rtlocal.errors import RtlocalError
from rtlocal.runtime.policy import Mode, Policy, parse_threshold_value
from rtlocal.tui.transcript import fmt_threshold

STEP = 0.05


def step_threshold(value: float, steps: int) -> float:
    """Move along the 0.05 grid; an off-grid value first snaps to the grid point in that direction."""
    grid = value / STEP
    k = (math.floor(grid + 1e-9) if steps > 0 else math.ceil(grid - 1e-9)) + steps
    return round(min(1.0, max(0.0, k * STEP)), 6)


class ThresholdRow(Horizontal):
    """`safety  [on] − 0.50 +`: Enter in the value applies it; - and + (or ←/→) step by 0.05."""

    BINDINGS = [
        Binding("minus,left", "step(-1)", "Lower τ", show=False, id="panel.lower"),
        Binding("plus,equals_sign,right", "step(1)", "Raise τ", show=False, id="panel.raise"),
    ]

    DEFAULT_CSS = """
    ThresholdRow {
        height: 1;
        margin: 0 0 1 0;
        & > .name { width: 14; }
        & > Switch { border: none; padding: 0; height: 1; width: 4; margin: 0 1 0 0; }
        & > Switch:focus { border: none; background-tint: $foreground 15%; }
        & > Button { min-width: 3; width: 3; }
        & > Input { width: 7; padding: 0 1; }
    }
    """

    @dataclass
    class Changed(Message):
        """The user set a category's threshold (None: off)."""

        row: ThresholdRow
        category: str
        threshold: float | None

    def __init__(self, category: str, threshold: float | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.category = category
        self.threshold = threshold
        self._last_on = threshold if threshold is not None else DEFAULT_THRESHOLD

    def compose(self) -> ComposeResult:
        alias = alias_of(self.category)
        yield Label(alias, classes="name")
        yield Switch(value=self.threshold is not None, id=f"switch-{alias}", tooltip=f"{alias}: on/off")
        yield Button("−", id=f"lower-{alias}", compact=True, tooltip="lower the threshold (refuse more)")
        yield Input(fmt_threshold(self.threshold), id=f"value-{alias}", compact=True, select_on_focus=True)
        yield Button("+", id=f"raise-{alias}", compact=True, tooltip="raise the threshold (refuse less)")

    def show(self, threshold: float | None) -> None:
        """Display a threshold without announcing a change."""
        self.threshold = threshold
        if threshold is not None:
            self._last_on = threshold
        switch = self.query_one(Switch)
        with switch.prevent(Switch.Changed):
            switch.value = threshold is not None
        self.query_one(Input).value = fmt_threshold(threshold)

    def set_threshold(self, threshold: float | None) -> None:
        self.show(threshold)
        self.post_message(self.Changed(self, self.category, threshold))

    def action_step(self, steps: int) -> None:
        base = self.threshold if self.threshold is not None else self._last_on
        self.set_threshold(step_threshold(base, steps))

    @on(Switch.Changed)
    def _switched(self, event: Switch.Changed) -> None:
        event.stop()
        self.set_threshold(self._last_on if event.value else None)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.action_step(-1 if (event.button.id or "").startswith("lower-") else 1)

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._apply_typed(event.value)

    @on(Input.Blurred)
    def _blurred(self, event: Input.Blurred) -> None:
        event.stop()
        if event.value.strip() != fmt_threshold(self.threshold):
            self._apply_typed(event.value)

    def _apply_typed(self, text: str) -> None:
        try:
            value = parse_threshold_value(text, alias_of(self.category))
        except RtlocalError as e:
            self.notify(str(e), severity="error")
            self.show(self.threshold)
            return
        self.set_threshold(value)


class ControlPanel(VerticalScroll):
    """Strictness preset and per-category thresholds; the chat screen applies changes to the session."""

    DEFAULT_CSS = """
    ControlPanel {
        width: 38;
        height: 1fr;
        padding: 0 1;
        border-left: vkey $panel;
        & > .title { text-style: bold; margin: 1 0 0 0; }
        & > Select { margin: 0 0 1 0; }
        & > .note { color: $text-muted; margin: 0 0 1 0; }
        & > .head { color: $text-muted; }
    }
    """

    @dataclass
    class PresetSelected(Message):
        panel: ControlPanel
        preset: str

    def __init__(self, categories: list[str], policy: Policy, preset: str | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.categories = categories
        self._policy = policy
        self._preset = preset

    def compose(self) -> ComposeResult:
        yield Label("Strictness", classes="title")
        options = [(f"{name}", name) for name in STRICTNESS_PRESETS]
        yield Select(options, prompt="custom", value=self._preset or Select.NULL, id="preset", compact=True)
        if not self.categories:
            yield Static("This model has no refusal tokens: it always answers.", classes="note")
            return
        if self._policy.mode is not Mode.THRESHOLD:
            yield Static(f"mode {self._policy.mode}: thresholds apply only in threshold mode.", classes="note")
        yield Label(f"{'category':<14}{'on':<5}threshold τ", classes="head")
        for c in self.categories:
            yield ThresholdRow(c, self._policy.threshold(c), id=f"row-{alias_of(c)}")
        yield Static(
            "refuse with k when p_k ≥ τ_k.\nτ 0 always refuses, 1 never.\nChanges apply to the next answer.",
            classes="note",
        )

    def on_mount(self) -> None:
        if not self.categories or self._policy.mode is not Mode.THRESHOLD:
            self.query_one("#preset", Select).disabled = not self.categories
            for row in self.query(ThresholdRow):
                row.disabled = True

    def show_policy(self, policy: Policy, preset: str | None) -> None:
        """Reflect a policy (after a preset) without announcing changes."""
        self._policy = policy
        for row in self.query(ThresholdRow):
            row.show(policy.threshold(row.category))
        self.show_preset(preset)

    def show_preset(self, preset: str | None) -> None:
        self._preset = preset
        select = self.query_one("#preset", Select)
        with select.prevent(Select.Changed):
            select.value = preset if preset is not None else Select.NULL

    def row(self, category: str) -> ThresholdRow:
        return self.query_one(f"#row-{alias_of(category)}", ThresholdRow)

    @on(Select.Changed, "#preset")
    def _preset_changed(self, event: Select.Changed) -> None:
        event.stop()
        if isinstance(event.value, str) and event.value != self._preset:
            self.post_message(self.PresetSelected(self, event.value))
