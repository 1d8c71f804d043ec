"""A chat session: the history and policy of one conversation, shared by the line REPL and the TUI."""

from __future__ import annotations

from dataclasses import dataclass, field

from rtlocal.runtime.engine import Engine, Response, SamplingParams
from rtlocal.runtime.policy import Policy
from rtlocal.runtime.prompts import Message


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
        from rtlocal.runtime.calibration import strictness_mapper
        from rtlocal.runtime.policy import build_policy

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
