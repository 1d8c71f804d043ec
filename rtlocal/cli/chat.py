"""`rtlocal chat`: the full-screen UI on a terminal, the line REPL otherwise; builds the default model on first run."""

from __future__ import annotations

import os
import sys
from typing import IO, TYPE_CHECKING, Annotated

import typer

from rtlocal.cli.flags import (
    BiasOpt,
    CalibOpt,
    CtxOpt,
    GpuOpt,
    MaxTokOpt,
    ModelOpt,
    ModeOpt,
    SeedOpt,
    StrictOpt,
    SystemOpt,
    TempOpt,
    ThreadsOpt,
    ThresholdOpt,
)
from rtlocal.constants import alias_of
from rtlocal.errors import ContextFull, RtlocalError
from rtlocal.runtime.options import check_usage, open_engine, policy_from_flags

if TYPE_CHECKING:  # the engine (and numpy) load when a chat starts, not for `rtlocal --help`
    from rtlocal.runtime.engine import Response
    from rtlocal.runtime.session import ChatSession

REPL_HELP = """commands:
  /strictness SPEC   e.g. /strictness strict   or   /strictness safety=off,humanizing=0.9
  /threshold SPEC    e.g. /threshold safety=0.3
  /policy            show the current thresholds
  /system TEXT       set the system prompt (empty to clear); clears the history
  /reset             forget the conversation
  /drop [N]          forget the oldest N exchanges (default: as many as the context needs), then ask again
  /help              this text
  /quit              leave (also Ctrl-D)"""


def chat(
    model: ModelOpt = None,
    strictness: StrictOpt = None,
    threshold: ThresholdOpt = None,
    bias: BiasOpt = None,
    mode: ModeOpt = "threshold",
    system: SystemOpt = None,
    calibration: CalibOpt = None,
    plain: Annotated[bool, typer.Option("--plain", help="Line-mode REPL instead of the full-screen UI.")] = False,
    max_tokens: MaxTokOpt = 512,
    temperature: TempOpt = 0.7,
    seed: SeedOpt = None,
    threads: ThreadsOpt = None,
    ctx: CtxOpt = None,
    n_gpu_layers: GpuOpt = None,
    no_build: Annotated[bool, typer.Option("--no-build", help="Fail instead of building the default model when it is missing.")] = False,
) -> None:
    """Chat with a model, deciding afresh on every turn whether to refuse."""
    from rtlocal.runtime.engine import SamplingParams
    from rtlocal.runtime.session import ChatSession

    check_usage(strictness=strictness, threshold=threshold, bias=bias, mode=mode)
    sampling = SamplingParams(temperature=temperature, seed=seed)
    if model is None and not no_build:
        _ensure_default_model()
    engine = open_engine(model, threads, ctx, n_gpu_layers)
    try:
        policy = policy_from_flags(engine, strictness, threshold, bias, mode, calibration)
        session = ChatSession(engine, policy, system=system, sampling=sampling, max_tokens=max_tokens)
        if plain or not (sys.stdin.isatty() and sys.stdout.isatty()):
            run_repl(session, sys.stdin, sys.stdout)
        else:
            from rtlocal.runtime.models import load_settings
            from rtlocal.tui.app import run_tui

            run_tui(session, keymap=load_settings().keymap)
    finally:
        engine.close()


def _ensure_default_model() -> None:
    """The main job: build the default model on first run (offline, with a progress bar)."""
    from rtlocal.runtime.models import DEFAULT_MODEL_NAME, MODEL_ENV, list_models, load_settings

    if os.environ.get(MODEL_ENV) or load_settings().model:
        return
    if any(m.stem == DEFAULT_MODEL_NAME for m in list_models()):
        return
    try:
        from finetune.build import build_default
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RtlocalError(f"the default model is not built and building it needs the 'train' extra ({e.name} missing)") from e
    print(f"The default model {DEFAULT_MODEL_NAME!r} is not built yet: building it now (offline, once).", file=sys.stderr)
    build_default()


def decision_line(response: Response) -> str:
    d = response.decision
    if not d.probs:
        return ""
    top = " ".join(f"{alias_of(c)}={p:.2f}" for c, p in sorted(d.probs.items(), key=lambda x: -x[1]))
    head = f"refused: {alias_of(d.category)}" if d.refused else "respond"
    return f"[{head} · {top}]"


def run_repl(session: ChatSession, stdin: IO, stdout: IO) -> None:
    """A line-mode chat: works in pipes, prints the decision before each answer."""
    from rtlocal.runtime.policy import describe

    interactive = stdin.isatty()
    if interactive:
        print(f"rtlocal chat · {session.engine.path.name} · {describe(session.policy)}", file=stdout)
        print("type /help for commands, /quit to leave", file=stdout)
    pending: str | None = None  # a message that did not fit the context, asked again after /drop
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        try:
            line = _read_line(stdin)
        except UnicodeDecodeError as e:  # one bad line: say so and carry on, the conversation is kept
            print(f"error: that line is not valid UTF-8 (byte {e.start + 1}); it was ignored", file=stdout)
            continue
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            try:
                if cmd in ("/quit", "/exit"):
                    break
                if cmd == "/drop":
                    if arg and not arg.isdigit():
                        raise RtlocalError("usage: /drop [N]")
                    need = session.exchanges_to_drop(pending) if pending else None
                    n = session.drop_oldest(int(arg) if arg else (need if need is not None else 1))
                    print(f"forgot the oldest {n} exchange(s); {session.exchanges} left", file=stdout)
                    if pending is not None:
                        text, pending = pending, None
                        _answer(session, text, stdout)
                    continue
                if cmd == "/help":
                    print(REPL_HELP, file=stdout)
                elif cmd == "/strictness":
                    if not arg:
                        raise RtlocalError("usage: /strictness PRESET|NUMBER|CATEGORY=VALUE[,...]")
                    session.set_strictness(arg, None)
                    print(f"policy: {describe(session.policy)}", file=stdout)
                elif cmd == "/threshold":
                    if not arg:
                        raise RtlocalError("usage: /threshold CATEGORY=VALUE[,...]")
                    session.set_strictness(None, arg)
                    print(f"policy: {describe(session.policy)}", file=stdout)
                elif cmd == "/policy":
                    print(f"policy: {describe(session.policy)}", file=stdout)
                elif cmd == "/system":
                    session.system = arg or None
                    session.reset()
                    print("system prompt set; history cleared" if arg else "system prompt cleared; history cleared", file=stdout)
                elif cmd == "/reset":
                    session.reset()
                    pending = None
                    print("history cleared", file=stdout)
                else:
                    print(f"unknown command {cmd} (try /help)", file=stdout)
            except RtlocalError as e:
                print(f"error: {e}", file=stdout)
            stdout.flush()
            continue
        pending = None if _answer(session, text, stdout) else text


def _read_line(stdin: IO) -> str | None:
    """The next line (None at the end); UnicodeDecodeError for a line that is not UTF-8, the stream still usable."""
    raw = stdin.buffer.readline() if getattr(stdin, "buffer", None) is not None else stdin.readline()
    if not raw:
        return None
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def _answer(session: ChatSession, text: str, stdout: IO) -> bool:
    """One turn of the REPL. A recoverable error is said and the conversation kept; False when `text`
    did not fit the context (then /drop forgets the oldest exchanges and asks it again)."""
    try:
        response = session.ask(text)
    except ContextFull as e:
        need = session.exchanges_to_drop(text)
        if need is None or need == 0:
            print(f"error: this message does not fit the context ({e.n_ctx} tokens) even without the earlier conversation: "
                  "shorten it, or start the chat with a larger --ctx", file=stdout)
            stdout.flush()
            return True
        print(f"error: the conversation no longer fits the context ({e.n_tokens} tokens of {e.n_ctx}); "
              f"/drop forgets the oldest {need} exchange(s) and asks again, /reset forgets everything", file=stdout)
        stdout.flush()
        return False
    except RtlocalError as e:
        print(f"error: {e}", file=stdout)
        stdout.flush()
        return True
    line = decision_line(response)
    if line:
        print(line, file=stdout)
    for chunk in response:
        stdout.write(chunk)
        stdout.flush()
    stdout.write("\n")
    if response.stats.stop_reason == "context":
        stdout.write("[the answer stopped: the context is full; /drop or /reset makes room]\n")
    stdout.flush()
    session.commit(text, response)
    return True
