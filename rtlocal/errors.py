"""The one error type users see. The CLI prints it as a single `Error: ...` line and exits 1 (2 for bad usage)."""

from __future__ import annotations


class RtlocalError(Exception):
    """A problem the user can fix: bad input, a missing file, an unsupported model."""


class UsageError(RtlocalError):
    """A flag value out of range, a repeated or contradictory flag: found before any model loads, exit 2."""


class ContextFull(RtlocalError):
    """A prompt (a whole conversation, in chat) longer than the model's context."""

    def __init__(self, n_tokens: int, n_ctx: int):
        self.n_tokens, self.n_ctx = n_tokens, n_ctx
        super().__init__(f"the prompt is {n_tokens} tokens, longer than the context ({n_ctx}); use --ctx")


class Interrupted(Exception):
    """Ctrl-C, with what was kept: the CLI prints the message (default 'interrupted') and exits 130."""

    def __init__(self, message: str = "interrupted"):
        super().__init__(message)


class MissingExtraError(RtlocalError):
    """A command needs the optional `train` extra (torch, transformers, peft)."""

    def __init__(self, what: str, module: str):
        super().__init__(
            f"{what} needs the 'train' extra ({module} is not installed): pip install 'rtlocal[train]'"
        )


def require_train_extra(what: str) -> None:
    """Fail with one clear line when torch/transformers/peft are missing."""
    import importlib.util

    for module in ("torch", "transformers", "peft"):
        if importlib.util.find_spec(module) is None:
            raise MissingExtraError(what, module)
