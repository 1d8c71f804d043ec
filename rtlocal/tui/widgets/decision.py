"""The decision badge and the per-category probability bars against their thresholds."""

from __future__ import annotations

import math

from rich.text import Text
from textual.widgets import Static

from rtlocal.constants import alias_of
from rtlocal.runtime.policy import Decision, passes
from rtlocal.tui.transcript import fmt_prob, fmt_threshold

BAR_WIDTH = 20


def probability_bar(p: float, threshold: float | None, *, width: int = BAR_WIDTH, style: str = "blue") -> Text:
    """`━━━━━┃───`: p filled from the left, the threshold as a marker (none when off)."""
    filled = 0 if math.isnan(p) else max(0, min(width, round(p * width)))
    marker = None if threshold is None else min(width - 1, int(threshold * width))
    bar = Text()
    for i in range(width):
        if i == marker:
            bar.append("┃", "bold yellow")
        elif i < filled:
            bar.append("━", style)
        else:
            bar.append("─", "bright_black")
    return bar


def render_decision(decision: Decision | None, thresholds: dict[str, float | None], mode: str) -> Text:
    """Badge, one bar per category (model order, so answers compare row by row) and a one-line why."""
    if decision is None:
        return Text("deciding…", style="italic bright_black")
    if not decision.probs:
        return Text.assemble((" PLAIN ", "bold black on bright_black"), "  no refusal tokens: the model answers freely")
    out = Text()
    if decision.refused and decision.category is not None:
        out.append(f" REFUSED · {alias_of(decision.category)} ", style="bold white on red")
    else:
        out.append(" RESPOND ", style="bold black on green")
    if mode != "threshold":
        out.append(f"  mode {mode}: sampled, thresholds not applied", style="italic")
    if not math.isnan(decision.p_respond):
        out.append(f"  p(respond) {fmt_prob(decision.p_respond)}", style="bright_black")
    width = max(len(alias_of(c)) for c in decision.probs)
    for c, p in decision.probs.items():
        t = thresholds.get(c)
        chosen = decision.refused and c == decision.category
        reached = mode == "threshold" and passes(p, t)
        style = "red" if chosen else "yellow" if reached else "blue"
        out.append("\n")
        out.append(f"{alias_of(c):<{width}} ", style="bold red" if chosen else "")
        out.append_text(probability_bar(p, t if mode == "threshold" else None, style=style))
        out.append(f" {fmt_prob(p):>7}")
        if mode == "threshold":
            out.append(f"  τ {fmt_threshold(t):<5}", style="bright_black")
            if chosen:
                out.append(" ◀ refuses", style="bold red")
            elif reached:
                out.append(" ≥ τ", style="yellow")
    if mode == "threshold":
        out.append("\n")
        out.append(_why(decision, thresholds), style="italic bright_black")
    return out


def _why(decision: Decision, thresholds: dict[str, float | None]) -> str:
    """Which threshold would have changed the outcome."""
    if decision.refused and decision.category is not None:
        passing = [c for c, p in decision.probs.items() if passes(p, thresholds.get(c))]
        top = max(decision.probs[c] for c in passing)
        names = ", ".join(alias_of(c) for c in passing)
        return f"to answer: raise τ above {fmt_prob(top)} for {names} (or switch {'it' if len(passing) == 1 else 'them'} off)"
    active = [(p, c) for c, p in decision.probs.items() if thresholds.get(c) is not None]
    if not active:
        return "every category is off: the model always answers"
    p, c = max(active)
    return f"to refuse: set τ ≤ {fmt_prob(p)} for {alias_of(c)} (the most likely refusal)"


class DecisionView(Static):
    """The decision of one answer; empty until the worker reports it."""

    DEFAULT_CSS = """
    DecisionView {
        height: auto;
        padding: 0 1;
    }
    """

    def show(self, decision: Decision | None, thresholds: dict[str, float | None], mode: str) -> None:
        self.update(render_decision(decision, thresholds, mode))
