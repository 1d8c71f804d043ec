"""A chat session (history + policy) shared by the line REPL and the TUI, and the REPL itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO

from rtlocal.constants import alias_of
from rtlocal.engine import Engine, Response, SamplingParams
from rtlocal.errors import ContextFull, RtlocalError
from rtlocal.policy import Policy, describe
from rtlocal.prompts import Message

REPL_HELP = """commands:
  /strictness SPEC   e.g. /strictness strict   or   /strictness safety=off,humanizing=0.9
  /threshold SPEC    e.g. /threshold safety=0.3
  /policy            show the current thresholds
  /system TEXT       set the system prompt (empty to clear); clears the history
  /reset             forget the conversation
  /drop [N]          forget the oldest N exchanges (default: as many as the context needs), then ask again
  /help              this text
  /quit              leave (also Ctrl-D)"""


@dataclass
class ChatSession:
    """History and settings of one conversation; each assistant turn decides afresh."""

    engine: Engine
    policy: Policy
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 512
    history: list[Message] = field(default_factory=list)

    def messages(self, user_text: str) -> list[Message]:
        msgs = [Message("system", self.system)] if self.system else []
        return msgs + self.history + [Message("user", user_text)]

    def ask(self, text: str) -> Response:
        """Start an answer; the turn enters the history once the response is fully consumed (see `commit`)."""
        return self.engine.respond(self.messages(text), self.policy, sampling=self.sampling, max_tokens=self.max_tokens)

    def commit(self, user_text: str, response: Response) -> None:
        self.history += [Message("user", user_text), Message("assistant", response.text, response.start_token)]

    def set_strictness(self, strictness: str | None = None, threshold: str | None = None) -> None:
        """Apply a --strictness/--threshold style spec on top of the current thresholds."""
        from rtlocal.calibration import strictness_mapper
        from rtlocal.policy import build_policy

        info = self.engine.refusal
        self.policy = build_policy(
            info.categories,
            strictness=strictness,
            thresholds=threshold,
            biases=",".join(f"{c}={b}" for c, b in self.policy.biases.items()) or None,
            mode=self.policy.mode,
            defaults=self.policy.thresholds,
            calibrated=strictness_mapper(info.calibration),
        )

    def reset(self) -> None:
        self.history.clear()

    @property
    def exchanges(self) -> int:
        return len(self.history) // 2

    def drop_oldest(self, n: int) -> int:
        """Forget the oldest `n` exchanges (a user turn and its answer); returns how many went."""
        n = max(0, min(n, self.exchanges))
        del self.history[: 2 * n]
        return n

    def exchanges_to_drop(self, user_text: str) -> int | None:
        """How many of the oldest exchanges must go for `user_text` to fit with room for an answer; None if none will do."""
        n_ctx = self.engine.n_ctx
        room = min(self.max_tokens, n_ctx // 4)
        for k in range(self.exchanges + 1):
            kept = self.history[2 * k :]
            msgs = ([Message("system", self.system)] if self.system else []) + kept + [Message("user", user_text)]
            if len(self.engine.prompt_ids(msgs)) + room <= n_ctx:
                return k
        return None


def decision_line(response: Response) -> str:
    d = response.decision
    if not d.probs:
        return ""
    top = " ".join(f"{alias_of(c)}={p:.2f}" for c, p in sorted(d.probs.items(), key=lambda x: -x[1]))
    head = f"refused: {alias_of(d.category)}" if d.refused else "respond"
    return f"[{head} · {top}]"


def run_repl(session: ChatSession, stdin: IO, stdout: IO) -> None:
    """A line-mode chat: works in pipes, prints the decision before each answer."""
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
