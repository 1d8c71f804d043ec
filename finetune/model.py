"""Model surgery: device and thread choice, loading the base, the new token rows, the PEFT wrapper,
and `Forward`, the fast training forward pass (why it is fast: `finetune.trainer`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.config import TrainConfig
from finetune.encoding import IGNORE
from rtlocal.constants import RESPOND_TOKEN, SINGLE_CATEGORY, token_for
from rtlocal.errors import RtlocalError

# What each new token's row starts from with token_init="words": its meaning in plain words.
_DESCRIPTIONS = {
    RESPOND_TOKEN: "Sure, here is a helpful answer",
    token_for(SINGLE_CATEGORY): "I cannot help with that request",
}
# Model types whose embedding is a plain lookup and whose logits are a plain projection: the fast
# path applies. Others (Gemma scales embeddings, soft-caps logits) use PEFT's own forward.
_FAST_TYPES = {"llama", "qwen2", "mistral"}


# How far the bf16 loss of the first batch may stray from fp32's before `auto` keeps fp32.
BF16_PARITY_TOLERANCE = 0.02


def autocast(device: str, precision: str) -> Any:
    """The context the forward pass runs in: bf16 autocast, or nothing (fp32). The weights stay fp32."""
    import contextlib

    import torch

    if precision not in ("fp32", "bf16"):
        raise ValueError(f"autocast: precision must be fp32 or bf16 (auto is resolved first), got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo text (Linux; elsewhere none are known)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.split(":", 1)[0].strip() == "flags":
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_native(device: str, flags: set[str] | None = None) -> bool:
    """Whether bf16 matrix products run in hardware: a CUDA GPU that has them, or an x86 CPU with
    AVX512-BF16 or AMX (measured here with avx512_bf16: 1.25x fp32's tokens/s over a whole build).
    Elsewhere bf16 autocast is emulated and slower than fp32."""
    if device == "cuda":
        import torch

        return bool(torch.cuda.is_bf16_supported())
    if device != "cpu":
        return False
    return bool((cpu_flags() if flags is None else flags) & {"avx512_bf16", "amx_bf16"})


def bf16_parity(fwd: Forward, batch: dict[str, Any], device: str) -> float:
    """The relative difference between the bf16-autocast and the fp32 loss of one batch (no gradients)."""
    import torch

    with torch.no_grad():
        with autocast(device, "fp32"):
            full = fwd.loss(batch)[0].item()
        with autocast(device, "bf16"):
            half = fwd.loss(batch)[0].item()
    return abs(half - full) / max(abs(full), 1e-6)


def idle_cores(own: int = 0) -> int:
    """Cores not busy with other work (1-minute load average less `own` busy threads), at least 1.

    On a shared machine more threads than idle cores is far worse than fewer: every one of the
    thousands of small ops per step waits at an OpenMP barrier for a descheduled thread (measured
    here: 8 tokens/s with 2 threads against 112 with 1, while another job held the second core).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        busy = max(0, int(os.getloadavg()[0] - own + 0.5))
    except OSError:
        busy = 0
    return max(1, min(cores, cores - busy))


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RtlocalError("device cuda: no CUDA device is available (use --device cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RtlocalError("device mps: Metal is not available (use --device cpu)")
    return name


def load_base(spec: str) -> tuple[Any, Any, Any]:
    """(Base, model, tokenizer) for a HF id, an HF dir or a GGUF file (dequantised once, cached)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.merge import quiet_transformers, resolve_base

    quiet_transformers()
    base = resolve_base(spec)
    try:
        tok = AutoTokenizer.from_pretrained(base.hf_dir)
        model = AutoModelForCausalLM.from_pretrained(base.hf_dir, dtype=torch.float32)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RtlocalError(f"cannot load base {spec!r}: {first}") from e
    return base, model, tok


def add_refusal_tokens(model: Any, tokenizer: Any, tokens: Sequence[str], *, init: str) -> list[int]:
    """Add `tokens` as special tokens, resize the embeddings and initialise the new rows. Returns their ids."""
    import torch

    before = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = model.get_input_embeddings()
    new = [(t, i) for t, i in zip(tokens, ids) if i >= before]
    with torch.no_grad():
        W = emb.weight
        mean = W[:before].mean(0)
        for tok, i in new:
            if init == "words":
                words = _DESCRIPTIONS.get(tok) or tok.strip("[]")
                wid = [j for j in tokenizer(words, add_special_tokens=False).input_ids if j < before]
                W[i] = W[wid].mean(0) if wid else mean
            else:
                W[i] = mean
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != W.data_ptr():  # untied: the output rows start the same way
            for _, i in new:
                out.weight[i] = W[i]
    return ids


def _embed_module_name(model: Any) -> str:
    emb = model.get_input_embeddings()
    for name, module in model.named_modules():
        if module is emb:
            return name.rsplit(".", 1)[-1]
    raise RtlocalError("cannot find the input embedding layer of this model")


def wrap_peft(model: Any, config: TrainConfig, token_ids: Sequence[int]) -> Any:
    """LoRA on every linear layer plus trainable rows for the new tokens (also the output rows if untied)."""
    from peft import LoraConfig, get_peft_model

    indices = {_embed_module_name(model): list(token_ids)}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if not tied and model.get_output_embeddings() is not None:
        indices["lm_head"] = list(token_ids)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear",
        trainable_token_indices=indices,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def shared_prefix(ids: Any, mask: Any, labels: Any) -> int:
    """How many leading tokens every row of a right-padded batch shares and can run once for all: the
    common opening of the rows' ids, ending before the first position whose next token is a label (so
    every logit the loss needs comes from the rest). 0 when there is nothing to share.

    The default recipe's rows all open with the same 24 tokens (SmolLM2's system prompt and the user
    turn's header) of 67 on average: a third of each step's tokens.
    """
    import torch

    rows, n = ids.shape
    if rows < 2:
        return 0
    same = (ids == ids[:1]).all(0).long().cumprod(0).sum().item()
    labelled = labels != IGNORE
    first_label = torch.where(labelled.any(1), labelled.long().argmax(1), torch.full_like(labelled[:, 0], n, dtype=torch.long))
    p = min(same, int(first_label.min()) - 1, int(mask.sum(1).min()) - 1)
    return p if p >= 2 else 0


class Forward:
    """The training forward pass: loss over answer tokens, first answer token weighted."""

    def __init__(self, peft_model: Any, first_token_weight: float):
        self.model = peft_model
        self.w_first = first_token_weight
        self.share_prefix = True  # run the batch's common opening once (`shared_prefix`); off: every row whole
        inner = peft_model.get_base_model()
        self.fast = getattr(inner.config, "model_type", "") in _FAST_TYPES and hasattr(inner, "model") and hasattr(inner, "lm_head")
        if self.fast:
            self._setup_fast(inner)

    def _setup_fast(self, inner: Any) -> None:
        import torch

        emb = inner.get_input_embeddings()  # a TrainableTokensWrapper/Layer around the Embedding
        layer = emb if hasattr(emb, "trainable_tokens_delta") else getattr(emb, "token_adapter", emb)
        if not hasattr(layer, "trainable_tokens_delta") or getattr(inner.lm_head, "bias", None) is not None:
            self.fast = False
            return
        name = layer.active_adapters[0] if hasattr(layer, "active_adapters") else "default"
        self.delta_in = layer.trainable_tokens_delta[name]
        self.W_in = layer.get_base_layer().weight
        self.idx_in = torch.tensor(layer.token_indices[name], device=self.W_in.device)
        head = inner.lm_head
        head_layer = getattr(head, "token_adapter", head)
        if hasattr(head_layer, "trainable_tokens_delta") and not getattr(head_layer, "tied_adapter", None):
            self.delta_out = head_layer.trainable_tokens_delta[name]
            self.W_out = head_layer.get_base_layer().weight
            self.idx_out = torch.tensor(head_layer.token_indices[name], device=self.W_out.device)
        else:  # tied: the output rows are the input rows
            base_head = head_layer.get_base_layer() if hasattr(head_layer, "get_base_layer") else head
            self.W_out, self.delta_out, self.idx_out = base_head.weight, self.delta_in, self.idx_in
        lookup = torch.full((self.W_in.shape[0],), -1, dtype=torch.long, device=self.W_in.device)
        lookup[self.idx_in] = torch.arange(len(self.idx_in), device=self.W_in.device)
        self.lookup = lookup
        self.body = inner.model
        # transformers 5 names the key/value cache `cache` (`past_key_values` before, and its outputs so)
        self.cache_arg = "cache" if "cache" in inspect.signature(self.body.forward).parameters else "past_key_values"

    def logits_and_targets(self, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        """Logits at the positions that predict an answer token, their targets, and first-token flags."""
        import torch
        import torch.nn.functional as F

        ids, mask, labels, first = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["first"]
        if not self.fast:
            tgt = labels[:, 1:]
            sel = tgt != IGNORE
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            return logits[sel].float(), tgt[sel], first[:, 1:][sel]
        j = self.lookup[ids]
        x = F.embedding(ids, self.W_in)
        x = torch.where((j >= 0).unsqueeze(-1), self.delta_in[j.clamp(min=0)].to(x.dtype), x)
        p = shared_prefix(ids, mask, labels) if self.share_prefix else 0
        if p:  # the rows' common opening (system prompt, template) runs once, its keys and values shared
            pre = self.body(inputs_embeds=x[:1, :p], attention_mask=mask[:1, :p], use_cache=True)
            cache = getattr(pre, self.cache_arg)
            cache.batch_repeat_interleave(ids.shape[0])
            h = self.body(inputs_embeds=x[:, p:], attention_mask=mask, use_cache=True, **{self.cache_arg: cache}).last_hidden_state
        else:
            h = self.body(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state
        # h holds positions p.., so the logit at p + t predicts token p + t + 1 (no label before p + 1)
        tgt, is_first = labels[:, p + 1 :], first[:, p + 1 :]
        sel = tgt != IGNORE
        hs = h[:, :-1][sel]
        logits = F.linear(hs, self.W_out)
        logits = logits.index_copy(1, self.idx_out, F.linear(hs, self.delta_out.to(hs.dtype)))
        return logits.float(), tgt[sel], is_first[sel]

    def loss(self, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        import torch.nn.functional as F

        logits, tgt, is_first = self.logits_and_targets(batch)
        ce = F.cross_entropy(logits, tgt, reduction="none")
        w = 1.0 + (self.w_first - 1.0) * is_first.float()
        loss = (ce * w).sum() / w.sum()
        first_ce = ce[is_first].mean().item() if is_first.any() else float("nan")
        return loss, {"first_ce": first_ce, "tokens": int(tgt.numel())}


def _trainable(peft_model: Any) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]


def count_trainable(peft_model: Any) -> int:
    return sum(p.numel() for _, p in _trainable(peft_model))


__all__ = ["Forward", "add_refusal_tokens", "bf16_native", "bf16_parity", "count_trainable", "cpu_flags"]
