"""A chat session (history + policy) shared by the line REPL and the TUI, and the REPL itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO

from rtlocal.constants import alias_of
from rtlocal.engine import Engine, Response, SamplingParams
from rtlocal.errors import RtlocalError
from rtlocal.policy import Policy, describe
from rtlocal.prompts import Message

REPL_HELP = """commands:
  /strictness SPEC   e.g. /strictness strict   or   /strictness safety=off,humanizing=0.9
  /threshold SPEC    e.g. /threshold safety=0.3
  /policy            show the current thresholds
  /system TEXT       set the system prompt (empty to clear); clears the history
  /reset             forget the conversation
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
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
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
                    print("history cleared", file=stdout)
                else:
                    print(f"unknown command {cmd} (try /help)", file=stdout)
            except RtlocalError as e:
                print(f"error: {e}", file=stdout)
            stdout.flush()
            continue
        response = session.ask(text)
        line = decision_line(response)
        if line:
            print(line, file=stdout)
        for chunk in response:
            stdout.write(chunk)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
        session.commit(text, response)
