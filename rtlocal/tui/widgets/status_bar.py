"""One line under the chat: state, speed of the last answer, and where the model runs."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.css.query import NoMatches
from textual.reactive import reactive
from textual.widgets import Label

from rtlocal.runtime.engine import Engine, Stats


def device_label(engine: Engine) -> str:
    """'CPU', 'GPU (all layers)' or 'GPU (12 layers)': what llama.cpp was asked to offload, if it can."""
    layers = getattr(engine, "n_gpu_layers", None)
    if layers is None:  # Engine does not keep it (yet): llama-cpp-python's model params do
        params = getattr(getattr(engine, "llm", None), "model_params", None)
        layers = int(getattr(params, "n_gpu_layers", 0) or 0)
    if layers == 0:
        return "CPU"
    try:
        import llama_cpp

        offload = bool(llama_cpp.llama_supports_gpu_offload())
    except (ImportError, AttributeError):
        offload = True
    if not offload:
        return "CPU (this llama.cpp build has no GPU offload)"
    return "GPU (all layers)" if layers < 0 or layers >= 2**24 else f"GPU ({layers} layers)"


class StatusBar(Horizontal):
    DEFAULT_CSS = """
    StatusBar {
        height: 1;
        padding: 0 1;
        background: $panel;
        & > #state { width: 1fr; }
        & > #device { width: auto; }
    }
    """

    state: reactive[str] = reactive("ready")
    stats: reactive[Stats | None] = reactive(None, always_update=True)

    def __init__(self, device: str, *, show_timings: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.device = device
        self.show_timings = show_timings

    def compose(self) -> ComposeResult:
        yield Label(id="state")
        yield Label(self.device, id="device")

    def on_mount(self) -> None:
        self._refresh_state()

    def watch_state(self) -> None:
        self._refresh_state()

    def watch_stats(self) -> None:
        self._refresh_state()

    def _refresh_state(self) -> None:
        try:
            label = self.query_one("#state", Label)
        except NoMatches:  # not composed yet
            return
        s = self.stats
        parts = []
        if s is not None:
            if self.show_timings:
                parts.append(f"{s.tokens_per_second:.1f} tok/s · first token {s.first_token_ms:.0f} ms")
            parts.append(f"{s.prompt_tokens} prompt + {s.completion_tokens} answer tokens")
        label.update(Text.assemble((self.state, "bold"), *(f" · {p}" for p in parts)))
