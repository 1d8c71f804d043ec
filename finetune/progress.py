"""Progress reporting for long jobs (training, conversion, distillation), decoupled from how it is shown.

Library functions take a `Progress`; the CLI passes `BarProgress` (a live bar with ETA on stderr),
everything else gets `LogProgress`, which only logs. `default_progress()` picks the bar when stderr
is a terminal: `build_default()` is called from the CLI's first-run path without arguments.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Protocol, TextIO

log = logging.getLogger(__name__)


class Progress(Protocol):
    def start(self, description: str, total: int | None, initial: int = 0) -> None: ...
    def update(self, done: int, **info: float | str) -> None: ...
    def stage(self, message: str) -> None: ...
    def finish(self) -> None: ...


def format_seconds(s: float) -> str:
    s = max(0, int(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def eta_seconds(elapsed: float, done: int, initial: int, total: int | None) -> float:
    """Time left at this run's pace: steps done before a resume (`initial`) took no time in this run."""
    if not total or done <= initial:
        return 0.0
    return elapsed / (done - initial) * (total - done)


def _info_text(info: dict) -> str:
    parts = []
    for k, v in info.items():
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " ".join(parts)


class _Timed:
    """What both reporters keep of the job: its name, size, starting point and start time."""

    def __init__(self) -> None:
        self.description = ""
        self.total: int | None = None
        self.initial = 0
        self.t0 = time.perf_counter()
        self.next_mark = 0.0

    def start(self, description: str, total: int | None, initial: int = 0) -> None:
        self.description, self.total, self.initial = description, total, initial
        self.t0, self.next_mark = time.perf_counter(), (initial / total + 0.1 if total else 0.1)


class LogProgress(_Timed):
    """Logs a line about every 10% (and every stage); shows nothing by itself."""

    def __init__(self, logger: logging.Logger | None = None):
        super().__init__()
        self.log = logger or log

    def update(self, done: int, **info: float | str) -> None:
        if not self.total or done / self.total < self.next_mark and done != self.total:
            return
        self.next_mark = done / self.total + 0.1
        elapsed = time.perf_counter() - self.t0
        eta = eta_seconds(elapsed, done, self.initial, self.total)
        self.log.info("%s %d/%d (%s elapsed, ETA %s) %s", self.description, done, self.total, format_seconds(elapsed), format_seconds(eta), _info_text(info))

    def stage(self, message: str) -> None:
        self.log.info("%s", message)

    def finish(self) -> None:
        pass


class BarProgress(_Timed):
    """A one-line bar with ETA, redrawn in place on a terminal (plain lines every 10% otherwise)."""

    def __init__(self, stream: TextIO | None = None, width: int = 28):
        super().__init__()
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last_draw = 0.0
        self.open_line = False

    def update(self, done: int, **info: float | str) -> None:
        now = time.perf_counter()
        total = self.total or 0
        final = total and done >= total
        if self.tty and not final and now - self.last_draw < 0.2:
            return
        if not self.tty and not final and (not total or done / total < self.next_mark):
            return
        self.last_draw = now
        if total:
            self.next_mark = done / total + 0.1
        elapsed = now - self.t0
        eta = eta_seconds(elapsed, done, self.initial, total)
        frac = min(1.0, done / total) if total else 0.0
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        text = f"{self.description} [{bar}] {done}/{total or '?'} {format_seconds(elapsed)} ETA {format_seconds(eta)} {_info_text(info)}"
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self.open_line = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def stage(self, message: str) -> None:
        self._close_line()
        self.stream.write(message + "\n")
        self.stream.flush()

    def _close_line(self) -> None:
        if self.open_line:
            self.stream.write("\n")
            self.open_line = False

    def finish(self) -> None:
        self._close_line()
        self.stream.flush()


def default_progress() -> Progress:
    """The bar when stderr is a terminal, else logging only."""
    return BarProgress() if sys.stderr.isatty() else LogProgress()
