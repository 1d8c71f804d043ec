"""Chat prompts as token ids, with user text kept out of the control-token space.

This is the one place where message text is tokenized. The chat template (from the GGUF) is
rendered with a sentinel in place of each message's content; the template's own text is
tokenized with special=True (it holds <|im_start|> and friends), every message's content with
special=False, so a user who types "[respond]" or "<|im_end|>" gets those characters, never the
token. An assistant turn's answer-start token (`[respond]`, a refusal token) is inserted by id.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from rtlocal.errors import RtlocalError

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
ROLES = ("system", "user", "assistant")


@dataclass
class Message:
    role: str
    content: str
    start_token: int | None = None  # assistant turns: the answer-start token the model chose

    def to_dict(self) -> dict:
        return {"role": self.role, "content": self.content}


Tokenize = Callable[[str, bool], list[int]]  # (text, special) -> ids


def messages_from_dicts(items: Sequence[dict], where: str = "messages") -> list[Message]:
    """Validate a JSON messages list (role/content strings)."""
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise RtlocalError(f"{where}[{i}]: expected {{'role': system|user|assistant, 'content': str}}")
        out.append(Message(m["role"], m["content"]))
    if not out or out[-1].role != "user":
        raise RtlocalError(f"{where}: the last message must be from the user")
    return out


class PromptBuilder:
    """Renders a GGUF's chat template into token ids."""

    def __init__(self, template: str | None, tokenize: Tokenize, *, bos_token: str = "", eos_token: str = "", add_bos_id: int | None = None):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.template_source = template or CHATML_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)

        def raise_exception(msg: str) -> None:
            raise RtlocalError(f"chat template: {msg}")

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.template_source)
        except jinja2.TemplateError as e:
            raise RtlocalError(f"the model's chat template does not parse: {e}") from e
        self._tokenize = tokenize
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._add_bos_id = add_bos_id

    def render_text(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The template as plain text (for display and tests)."""
        return self._template.render(
            messages=[m.to_dict() for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=self._bos_token,
            eos_token=self._eos_token,
        )

    def build(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the whole conversation, ready for the first answer token."""
        marks = [f"\x1e{secrets.token_hex(6)}{i}\x1e" for i in range(len(messages))]
        proxies = [Message(m.role, marks[i]) for i, m in enumerate(messages)]
        text = self.render_text(proxies, add_generation_prompt=add_generation_prompt)
        ids: list[int] = []
        if self._add_bos_id is not None and not (self._bos_token and text.startswith(self._bos_token)):
            ids.append(self._add_bos_id)
        rest = text
        for mark, msg in zip(marks, messages):
            head, sep, rest = rest.partition(mark)
            if not sep:
                raise RtlocalError("the chat template dropped a message (system prompts unsupported by this model?)")
            ids += self._tokenize(head, True)
            if msg.role == "assistant" and msg.start_token is not None:
                ids.append(msg.start_token)
            ids += self._tokenize(msg.content, False)
        ids += self._tokenize(rest, True)
        return ids
