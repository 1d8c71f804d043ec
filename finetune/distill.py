"""`rtlocal data distill`: write the missing answers of prompts with the base model itself (llama.cpp).

Self-distillation keeps the fine-tuned model's answers in the base model's own voice, so training
teaches the refusal tokens rather than a new style. Only prompts to be answered are distilled;
refusals without a text get a category template at training time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from finetune.data import load_source, parse_source, write_records
from finetune.progress import LogProgress, Progress
from rtlocal.errors import RtlocalError
from rtlocal.evaluation.judge import StringMatchJudge
from rtlocal.paths import JSONL_FILE, check_output

log = logging.getLogger(__name__)


@dataclass
class DistillResult:
    path: Path
    answered: int
    kept: int  # records written unchanged (already answered, or refusals)
    dropped: int = 0  # answers the judge called refusals (with drop_refusals)


def distill(
    source: str,
    out: Path,
    *,
    model: str | None = None,
    max_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    limit: int | None = None,
    overwrite: bool = False,
    threads: int | None = None,
    n_ctx: int = 2048,
    system: str | None = None,
    drop_refusals: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> DistillResult:
    """Answer every unanswered, to-be-answered prompt of `source` with `model` (default: the default base GGUF).

    Args:
        source: a data source spec (see finetune.data) or a JSONL path.
        out: the JSONL to write (record schema), written atomically.
        model: a GGUF file; the default is the offline base (SmolLM2-135M-Instruct).
        max_tokens: answer length cap.
        temperature: 0 = greedy (reproducible).
        limit: answer at most this many prompts (the rest are written unchanged).
        overwrite: also re-answer prompts that already have an answer.
        system: a system prompt used while answering only (it is not written with the record).
        drop_refusals: leave out records whose new answer the string-match judge calls a refusal
            (an answer to train after `[respond]` must not be one).
        force: replace an existing `out` that is not a JSONL file (`out` is never the source itself).
    """
    from rtlocal.runtime.engine import Engine, SamplingParams
    from rtlocal.runtime.policy import Mode, Policy
    from rtlocal.runtime.prompts import Message

    progress = progress or LogProgress()
    if max_tokens < 1:
        raise RtlocalError(f"max_tokens must be >= 1, got {max_tokens}")
    spec = parse_source(source)
    out = check_output(out, kind=JSONL_FILE, force=force, inputs=[spec.where], flag="--out")
    records = load_source(spec)
    if not records:
        raise RtlocalError(f"{source}: no records (an empty dataset)")
    todo = [r for r in records if r.category is None and (overwrite or not r.answer)]
    if limit is not None:
        todo = todo[:limit]
    if model is None:
        from finetune.recipes import smollm2_gguf

        model = str(smollm2_gguf())
    engine = Engine(model, n_ctx=n_ctx, n_threads=threads)
    policy = Policy(mode=Mode.FREE)  # the base has no refusal tokens: plain generation
    sampling = SamplingParams(temperature=temperature, seed=seed)
    judge = StringMatchJudge() if drop_refusals else None
    dropped: set[int] = set()
    head = [Message("system", system)] if system else []
    progress.start("distilling", len(todo))
    try:
        for i, r in enumerate(todo, 1):
            msgs = head + [Message(m["role"], m["content"]) for m in r.messages]
            r.answer = _answer(engine, msgs, policy, sampling, max_tokens)
            if judge is not None and (not r.answer or judge(r.prompt, r.answer)[0]):
                dropped.add(id(r))
            progress.update(i)
    finally:
        progress.finish()
        engine.close()
    n = write_records([r for r in records if id(r) not in dropped], out)
    return DistillResult(out, len(todo) - len(dropped), n - len(todo) + len(dropped), len(dropped))


def _answer(engine, messages, policy, sampling, max_tokens: int) -> str:
    try:
        return engine.respond(messages, policy, sampling=sampling, max_tokens=max_tokens).finish().strip()
    except RtlocalError as e:
        raise RtlocalError(f"distill: {e}") from e


__all__ = ["distill", "DistillResult"]
