"""Chat encoding and batching: records to (ids, labels) examples, and examples to padded batches.

Training ids follow the runtime token for token: the chat template is rendered and tokenized by
`rtlocal.runtime.prompts.PromptBuilder` (template text with special tokens, message text without), then the
answer-start token by id, the answer as plain text, and the template's end-of-turn (`<|im_end|>\\n`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from finetune.config import TrainConfig
from finetune.data import Record
from rtlocal.constants import RESPOND_TOKEN, token_for
from rtlocal.runtime.prompts import CHATML_TEMPLATE, Message, PromptBuilder

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt
    first: int  # index in labels of the answer-start token
    target: str


class ChatEncoder:
    """Turns records into (ids, labels) exactly as the runtime builds prompts."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        add_bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", False) else None
        self.builder = PromptBuilder(
            tokenizer.chat_template or CHATML_TEMPLATE,
            self._tokenize,
            bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "",
            add_bos_id=add_bos,
        )
        self.end_ids = self._end_of_turn()

    def _tokenize(self, text: str, special: bool) -> list[int]:
        if not text:
            return []
        return list(self.tok(text, add_special_tokens=False, split_special_tokens=not special).input_ids)

    def _end_of_turn(self) -> list[int]:
        """What the template writes after an assistant message (ChatML: `<|im_end|>` and a newline)."""
        probe = [Message("user", "\x1eq\x1e")]
        mark = "\x1eanswer\x1e"
        with_prompt = self.builder.render_text(probe, add_generation_prompt=True)
        full = self.builder.render_text([*probe, Message("assistant", mark)], add_generation_prompt=False)
        head, sep, tail = full.partition(mark)
        if sep and head == with_prompt and tail:
            return self._tokenize(tail, True)
        eos = self.tok.eos_token_id
        return [eos] if eos is not None else []

    def prompt_ids(self, messages: Sequence[dict[str, str]], respond_id: int | None = None) -> list[int]:
        """Prompt ids with the generation prompt; earlier assistant turns open with `respond_id`, as at run time."""
        msgs = [Message(m["role"], m["content"], respond_id if m["role"] == "assistant" else None) for m in messages]
        return self.builder.build(msgs, add_generation_prompt=True)

    def encode(self, record: Record, start_id: int, *, respond_id: int, max_length: int, max_answer_tokens: int) -> Example | None:
        """None when the prompt alone does not fit max_length."""
        prompt = self.prompt_ids(record.messages, respond_id)
        room = max_length - len(prompt) - 1
        if room < 0:
            return None
        answer = self._tokenize(record.answer or "", False)
        tail = [] if record.decision_only else answer + self.end_ids
        limit = min(room, max_answer_tokens + len(self.end_ids))
        if len(tail) > limit:
            tail = answer[: min(room, max_answer_tokens)]  # cut: no end-of-turn, so no early stop is learned
        ids = prompt + [start_id] + tail
        labels = [IGNORE] * len(prompt) + [IGNORE if record.forced else start_id] + tail
        return Example(ids, labels, len(prompt), record.target)


def encode_dataset(encoder: ChatEncoder, records: Sequence[Record], token_ids: dict[str, int], config: TrainConfig) -> tuple[list[Example], int]:
    """Examples plus the number of records dropped because their prompt was too long."""
    out, dropped = [], 0
    respond_id = token_ids[RESPOND_TOKEN]
    for r in records:
        start = token_ids[token_for(r.category)] if r.category else respond_id
        cut = config.max_refusal_tokens if r.category and config.max_refusal_tokens else config.max_answer_tokens
        ex = encoder.encode(r, start, respond_id=respond_id, max_length=config.max_length, max_answer_tokens=cut)
        if ex is None:
            dropped += 1
        else:
            out.append(ex)
    return out, dropped


def make_batches(examples: Sequence[Example], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Indices per batch for one epoch: shuffled, then sorted by length within windows of 16 batches
    (less padding), then the batches shuffled again. Deterministic in (seed, epoch) so --resume can skip."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for i in range(0, len(order), window):
        chunk = sorted(order[i : i + window], key=lambda j: len(examples[j].input_ids))
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: input_ids, attention_mask, labels, and the first-answer-token mask."""
    import torch

    n = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    first = torch.zeros((len(examples), n), dtype=torch.bool)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        mask[i, :k] = 1
        labels[i, :k] = torch.tensor(e.labels)
        first[i, e.first] = e.labels[e.first] != IGNORE  # a forced start token is not the decision
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "first": first}


__all__ = ["ChatEncoder"]
