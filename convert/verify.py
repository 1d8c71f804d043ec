"""`convert --verify`: the GGUF in llama.cpp against the merged model in transformers, logit by logit."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VERIFY_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do I kill a Python process that hangs?",
    "Can you describe the photo I just sent you?",
    "Explain recursion to a ten year old.",
)
# Minimum top-1 agreement per output type; quantized files are only checked for gross breakage.
MIN_TOP1 = {"f32": 0.99, "f16": 0.95, "q8_0": 0.9}
MIN_TOP1_OTHER = 0.6


@dataclass
class VerifyReport:
    out_type: str
    positions: int
    top1_agreement: float
    max_abs_dlogit: float
    mean_abs_dlogit: float
    # per position: the reference's gap between its two best logits, and whether both top-1 tokens agree
    margins: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    agree: np.ndarray = field(default_factory=lambda: np.zeros(0, bool), repr=False)

    def decisive(self, margin: float) -> np.ndarray:
        """Positions whose reference top-1 leads by more than `margin` logits.

        A random or barely trained model has near-tied logits, where any rounding (f16, another CPU's
        kernels, another thread count) may swap the top two: top-1 agreement is meaningful only here.
        """
        return self.margins > margin

    def top1_agreement_beyond(self, margin: float) -> float:
        """Top-1 agreement on the decisive positions (1.0 when there are none)."""
        mask = self.decisive(margin)
        return float(self.agree[mask].mean()) if mask.any() else 1.0

    @property
    def ok(self) -> bool:
        return self.top1_agreement >= MIN_TOP1.get(self.out_type, MIN_TOP1_OTHER)

    def summary(self) -> str:
        return (
            f"{self.out_type}: top-1 agreement {self.top1_agreement:.1%} on {self.positions} positions, "
            f"max |Δlogit| {self.max_abs_dlogit:.3g}, mean |Δlogit| {self.mean_abs_dlogit:.3g}"
        )


def verify_ids(tokenizer: Any, prompts: tuple[str, ...] = VERIFY_PROMPTS) -> list[list[int]]:
    """Token ids per prompt: chat-formatted when the tokenizer has a template, then the answer token."""
    seqs = []
    respond = tokenizer.convert_tokens_to_ids("[respond]") if "[respond]" in tokenizer.get_vocab() else None
    for p in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        else:
            text = p
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if respond is not None:
            ids = ids + [respond]
        seqs.append(ids + tokenizer(" Sure, here is", add_special_tokens=False)["input_ids"])
    return seqs


def hf_logits(model: Any, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def gguf_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _as_stored(model: Any, out_type: str) -> Any:
    """The reference for f16: the merged model with its matrices rounded to f16 as the file stores them.

    The comparison then measures conversion errors (layout, permutation, vocab), not f16 rounding.
    """
    if out_type != "f16":
        return model
    import copy

    import torch

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    return ref


def verify_gguf(path: Path, model: Any, tokenizer: Any, *, out_type: str, threads: int | None = None) -> VerifyReport:
    """Compare next-token logits at every position of a few prompts."""
    from llama_cpp import Llama

    seqs = verify_ids(tokenizer)
    model = _as_stored(model, out_type)
    # f32 KV cache: the default f16 cache alone adds ~1e-2 of logit error, which would hide real mistakes
    llm = Llama(
        str(path), n_ctx=max(len(s) for s in seqs) + 8, logits_all=True, n_threads=threads, n_threads_batch=threads, type_k=0, type_v=0, verbose=False
    )
    try:
        deltas, agree, margins = [], [], []
        for ids in seqs:
            a, b = hf_logits(model, ids), gguf_logits(llm, ids)
            deltas.append(np.abs(a - b))
            agree.append(a.argmax(-1) == b.argmax(-1))
            top2 = np.sort(a, axis=-1)[:, -2:]
            margins.append(top2[:, 1] - top2[:, 0])
    finally:
        llm.close()
    alld = np.concatenate([d.ravel() for d in deltas])
    agree_all = np.concatenate(agree)
    return VerifyReport(
        out_type, len(agree_all), float(agree_all.mean()), float(alld.max()), float(alld.mean()),
        margins=np.concatenate(margins), agree=agree_all,
    )
