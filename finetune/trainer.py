"""`rtlocal finetune`: teach a base model to open every answer with `[respond]` or a refusal token.

LoRA on all linear layers plus trainable rows for the new tokens (PEFT `trainable_token_indices`;
with tied embeddings the same rows are the output vectors). The loss covers the answer only, and the
first answer token (the decision) can be up-weighted.

The loop is our own rather than transformers' Trainer, for speed on a CPU: the output projection
and the cross-entropy run only on answer positions (about half of all tokens), and the new token
rows are spliced in without copying the whole 49k-row embedding matrix twice per step, as PEFT's
generic forward does. The result is the same function PEFT computes (a test checks the loss).

Training ids follow the runtime token for token: the chat template is rendered and tokenized by
`rtlocal.prompts.PromptBuilder` (template text with special tokens, message text without), then the
answer-start token by id, the answer as plain text, and the template's end-of-turn (`<|im_end|>\\n`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from finetune.data import DataConfig, Dataset, Record, build_dataset
from finetune.progress import LogProgress, Progress
from rtlocal.constants import RESPOND_TOKEN, SINGLE_CATEGORY, TokenMode, token_for
from rtlocal.errors import RtlocalError, require_train_extra
from rtlocal.prompts import CHATML_TEMPLATE, Message, PromptBuilder

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
CHECKPOINT_DIR = "checkpoint"
IGNORE = -100
TOKEN_INITS = ("words", "mean")
SCHEDULERS = ("cosine", "linear", "constant")
# What each new token's row starts from with token_init="words": its meaning in plain words.
_DESCRIPTIONS = {
    RESPOND_TOKEN: "Sure, here is a helpful answer",
    token_for(SINGLE_CATEGORY): "I cannot help with that request",
}
# Model types whose embedding is a plain lookup and whose logits are a plain projection: the fast
# path applies. Others (Gemma scales embeddings, soft-caps logits) use PEFT's own forward.
_FAST_TYPES = {"llama", "qwen2", "mistral"}


PRECISIONS = ("fp32", "bf16")


def autocast(device: str, precision: str) -> Any:
    """The context the forward pass runs in: bf16 autocast, or nothing (fp32). The weights stay fp32."""
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device == "cuda" else "cpu", dtype=torch.bfloat16)


@dataclass
class TrainConfig:
    """Everything a fine-tuning run needs; the CLI flags and recipes fill it."""

    # What
    base: str = field(default="", metadata={"help": "Base model: a Hugging Face id, a local HF dir or a GGUF file."})
    output_dir: str = field(default="", metadata={"help": "Where the adapter, tokenizer and rtlocal.json go."})
    data: list[str] = field(default_factory=lambda: ["builtin"], metadata={"help": "Data sources KIND:WHERE[*WEIGHT] (see `rtlocal finetune --help`)."})
    mode: str = field(default=TokenMode.CATEGORICAL.value, metadata={"help": "Token mode.", "choices": [m.value for m in TokenMode]})
    categories: list[str] | None = field(default=None, metadata={"help": "Custom mode: category names (default: taken from the data)."})
    # Data shaping
    val_fraction: float = field(default=0.05, metadata={"help": "Share held out for validation, per target."})
    balance: float = field(default=1.0, metadata={"help": "Oversample small refusal categories: 0 none, 1 up to the largest."})
    max_length: int = field(default=256, metadata={"help": "Maximum tokens per example (longer prompts are dropped)."})
    max_answer_tokens: int = field(default=64, metadata={"help": "Answer tokens trained per example (the rest is cut)."})
    max_refusal_tokens: int | None = field(
        default=None,
        metadata={"help": "Refusal-text tokens trained per refusal example (default: max_answer_tokens); set it above "
                  "the refusal texts' length to train them whole, with their end of turn."},
    )
    max_prompt_chars: int = field(default=2000, metadata={"help": "Drop prompts longer than this many characters."})
    refusal_templates: str | None = field(default=None, metadata={"help": "JSON of refusal texts per category (default: built-in)."})
    holdout: list[str] = field(default_factory=list, metadata={"help": "Validation/test files no training prompt may repeat (an overlap is an error)."})
    holdout_near: float | None = field(default=None, metadata={"help": "Also drop training prompts whose words mostly repeat a held-out prompt's (0-1; None: exact repeats only)."})
    exclude_types: list[str] = field(default_factory=list, metadata={"help": "Leave these contrast-pair types out (leave-one-type-out runs)."})
    # Optimisation
    epochs: float = field(default=2.0, metadata={"help": "Passes over the training data (fractions allowed)."})
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps (wins over epochs)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per forward pass."})
    grad_accum: int = field(default=1, metadata={"help": "Forward passes per optimizer step."})
    learning_rate: float = field(default=3e-4, metadata={"help": "Peak learning rate of the LoRA weights."})
    token_learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate of the new token rows."})
    scheduler: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warm-up.", "choices": list(SCHEDULERS)})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Share of steps with a linear warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the LoRA weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    token_init: str = field(default="words", metadata={"help": "New rows start from the mean embedding of descriptive words, or of the whole vocabulary.", "choices": list(TOKEN_INITS)})
    first_token_weight: float = field(default=5.0, metadata={"help": "Loss weight of the first answer token (the decision) relative to the others."})
    # Run
    seed: int = field(default=0, metadata={"help": "Seed for data order, templates and initialisation."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA, then MPS, then CPU), cpu, cuda or mps."})
    precision: str = field(default="fp32", metadata={"help": "fp32, or bf16 autocast of the matrix products (CPUs with AVX512-BF16/AMX, recent GPUs).", "choices": list(PRECISIONS)})
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: the idle cores, at least 1)."})
    save_every: int = field(default=50, metadata={"help": "Write a checkpoint every N steps (0: only on Ctrl-C)."})
    log_every: int = field(default=10, metadata={"help": "Record the training loss every N steps."})
    resume: bool = field(default=False, metadata={"help": "Continue from the checkpoint in output_dir."})

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise RtlocalError(f"{name} {what}, got {getattr(self, name)!r}")

        need(self.mode in {m.value for m in TokenMode}, "mode", "must be categorical, single or custom")
        need(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)")
        need(self.balance >= 0, "balance", "must be >= 0")
        need(self.max_length >= 16, "max_length", "must be >= 16")
        need(self.max_answer_tokens >= 1, "max_answer_tokens", "must be >= 1")
        need(self.max_refusal_tokens is None or self.max_refusal_tokens >= 1, "max_refusal_tokens", "must be >= 1")
        need(self.epochs > 0, "epochs", "must be > 0")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.token_learning_rate >= 0, "token_learning_rate", "must be >= 0")
        need(self.scheduler in SCHEDULERS, "scheduler", f"must be one of {', '.join(SCHEDULERS)}")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)")
        need(self.lora_r >= 1, "lora_r", "must be >= 1")
        need(self.token_init in TOKEN_INITS, "token_init", f"must be one of {', '.join(TOKEN_INITS)}")
        need(self.first_token_weight > 0, "first_token_weight", "must be > 0")
        need(self.device in ("auto", "cpu", "cuda", "mps"), "device", "must be auto, cpu, cuda or mps")
        need(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        need(self.threads is None or self.threads >= 1, "threads", "must be >= 1")
        need(self.save_every >= 0, "save_every", "must be >= 0")
        need(self.log_every >= 1, "log_every", "must be >= 1")

    @staticmethod
    def read_file(path: Path) -> dict[str, Any]:
        """TrainConfig fields from a TOML or JSON file (unknown keys are an error)."""
        import tomllib

        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except FileNotFoundError:
            raise RtlocalError(f"{path}: no such file") from None
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise RtlocalError(f"{path}: invalid {'JSON' if path.suffix == '.json' else 'TOML'} ({e})") from None
        if not isinstance(data, dict):
            raise RtlocalError(f"{path}: expected a table of settings")
        unknown = sorted(set(data) - {f.name for f in fields(TrainConfig)})
        if unknown:
            raise RtlocalError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        return data

    def data_config(self) -> DataConfig:
        return DataConfig(
            sources=list(self.data),
            mode=self.mode,
            categories=self.categories,
            val_fraction=self.val_fraction,
            balance=self.balance,
            max_prompt_chars=self.max_prompt_chars,
            refusal_templates=self.refusal_templates,
            holdout=list(self.holdout),
            holdout_near=self.holdout_near,
            exclude_types=list(self.exclude_types),
            seed=self.seed,
        )

    def fingerprint(self, data_hashes: Sequence[str]) -> str:
        """What a checkpoint must match to be resumed: everything that changes the optimisation."""
        skip = {"output_dir", "device", "threads", "save_every", "log_every", "resume"}
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps([d, list(data_hashes)], sort_keys=True).encode()).hexdigest()[:16]


class CheckpointMismatch(RtlocalError):
    """--resume found a checkpoint made with other settings or data."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    seconds: float
    tokens_per_second: float
    trainable_parameters: int
    metrics: dict[str, Any]


# ------------------------------------------------------------------ encoding


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


# ------------------------------------------------------------------ model


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


class Forward:
    """The training forward pass: loss over answer tokens, first answer token weighted."""

    def __init__(self, peft_model: Any, first_token_weight: float):
        self.model = peft_model
        self.w_first = first_token_weight
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

    def logits_and_targets(self, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        """Logits at the positions that predict an answer token, their targets, and first-token flags."""
        import torch
        import torch.nn.functional as F

        ids, mask, labels, first = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["first"]
        tgt = labels[:, 1:]
        sel = tgt != IGNORE
        if not self.fast:
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            return logits[sel].float(), tgt[sel], first[:, 1:][sel]
        j = self.lookup[ids]
        x = F.embedding(ids, self.W_in)
        x = torch.where((j >= 0).unsqueeze(-1), self.delta_in[j.clamp(min=0)].to(x.dtype), x)
        h = self.body(inputs_embeds=x, attention_mask=mask, use_cache=False).last_hidden_state[:, :-1]
        hs = h[sel]
        logits = F.linear(hs, self.W_out)
        logits = logits.index_copy(1, self.idx_out, F.linear(hs, self.delta_out.to(hs.dtype)))
        return logits.float(), tgt[sel], first[:, 1:][sel]

    def loss(self, batch: dict[str, Any]) -> tuple[Any, dict[str, float]]:
        import torch.nn.functional as F

        logits, tgt, is_first = self.logits_and_targets(batch)
        ce = F.cross_entropy(logits, tgt, reduction="none")
        w = 1.0 + (self.w_first - 1.0) * is_first.float()
        loss = (ce * w).sum() / w.sum()
        first_ce = ce[is_first].mean().item() if is_first.any() else float("nan")
        return loss, {"first_ce": first_ce, "tokens": int(tgt.numel())}


# ------------------------------------------------------------------ training


def _trainable(peft_model: Any) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]


def count_trainable(peft_model: Any) -> int:
    return sum(p.numel() for _, p in _trainable(peft_model))


def _optimizer(peft_model: Any, config: TrainConfig) -> Any:
    import torch

    lora, rows = [], []
    for name, p in _trainable(peft_model):
        (rows if "trainable_tokens" in name else lora).append(p)
    groups = [{"params": lora, "lr": config.learning_rate, "weight_decay": config.weight_decay}]
    if rows:
        groups.append({"params": rows, "lr": config.token_learning_rate, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


def _schedule(config: TrainConfig, total: int):
    warm = int(total * config.warmup_ratio)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if config.scheduler == "constant":
            return 1.0
        t = (step - warm) / max(1, total - warm)
        return max(0.0, 1.0 - t) if config.scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return factor


def check_output_dir(path: Path) -> None:
    """Fail before any heavy work when the output dir cannot be created or written."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise RtlocalError(f"cannot write to {path}: it exists and is not a directory") from None
    except NotADirectoryError:
        raise RtlocalError(f"cannot write to {path}: a parent is not a directory") from None
    except PermissionError:
        raise RtlocalError(f"cannot write to {path}: permission denied") from None
    except OSError as e:
        raise RtlocalError(f"cannot write to {path}: {e.strerror or e}") from None


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


@dataclass
class Prepared:
    """A model ready to train, with its data: what `train` and the benchmark share."""

    config: TrainConfig
    base: Any
    model: Any  # the PEFT model
    tokenizer: Any
    token_ids: dict[str, int]
    categories: list[str]
    dataset: Dataset
    train: list[Example]
    val: list[Example]
    device: str


def prepare(config: TrainConfig, progress: Progress | None = None) -> Prepared:
    """Validate, load data and base, add the tokens, wrap with PEFT: everything before the first step."""
    require_train_extra("rtlocal finetune")
    import torch

    progress = progress or LogProgress()
    if not config.base:
        raise RtlocalError("no base model given")
    dataset = build_dataset(config.data_config())  # data errors before the slow model load
    device = pick_device(config.device)
    if device == "cpu":
        torch.set_num_threads(config.threads or idle_cores())
    progress.stage(f"loading base {config.base}")
    base, model, tok = load_base(config.base)
    torch.manual_seed(config.seed)
    from rtlocal.constants import tokens_for_mode

    tokens = tokens_for_mode(dataset.mode, dataset.categories)
    ids = add_refusal_tokens(model, tok, tokens, init=config.token_init)
    token_ids = dict(zip(tokens, ids))
    encoder = ChatEncoder(tok)
    train_ex, dropped = encode_dataset(encoder, dataset.train, token_ids, config)
    val_ex, _ = encode_dataset(encoder, dataset.val, token_ids, config)
    if dropped:
        log.warning("%d training records dropped: their prompt is longer than max_length=%d tokens", dropped, config.max_length)
    if not train_ex:
        raise RtlocalError(f"no training example fits max_length={config.max_length} tokens")
    peft_model = wrap_peft(model, config, ids).to(device)
    return Prepared(config, base, peft_model, tok, token_ids, dataset.categories, dataset, train_ex, val_ex, device)


def _to(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


def evaluate(prep: Prepared, fwd: Forward, batch_size: int = 16) -> dict[str, Any]:
    """Validation loss, and the first-token decision: accuracy of the argmax over the start tokens."""
    import torch

    if not prep.val:
        return {}
    ids_by_token = prep.token_ids
    start_ids = torch.tensor(list(ids_by_token.values()))
    start_names = [RESPOND_TOKEN, *[token_for(c) for c in prep.categories]]
    target_ix = {("respond" if t == RESPOND_TOKEN else t[1:-1]): i for i, t in enumerate(start_names)}
    total, n, hits, p_sum = 0.0, 0, 0, 0.0
    prep.model.eval()
    with torch.no_grad():
        for k in range(0, len(prep.val), batch_size):
            chunk = prep.val[k : k + batch_size]
            batch = _to(collate(chunk, prep.tokenizer.pad_token_id or 0), prep.device)
            with autocast(prep.device, prep.config.precision):
                logits, tgt, is_first = fwd.logits_and_targets(batch)
            total += torch.nn.functional.cross_entropy(logits, tgt, reduction="sum").item()
            n += tgt.numel()
            probs = torch.softmax(logits[is_first], -1)[:, start_ids.to(logits.device)].cpu()
            for row, ex in zip(probs, chunk):
                want = target_ix.get(ex.target, 0)
                hits += int(row.argmax().item() == want)
                p_sum += row[want].item()
    prep.model.train()
    return {"val_loss": total / max(1, n), "val_first_token_accuracy": hits / len(prep.val), "val_p_target": p_sum / len(prep.val)}


def _save_checkpoint(prep: Prepared, path: Path, opt: Any, sched: Any, state: dict[str, Any]) -> None:
    import torch

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({n: p.detach().cpu() for n, p in _trainable(prep.model)}, tmp / "trainable.pt")
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(prep: Prepared, path: Path, opt: Any, sched: Any, fingerprint: str) -> dict[str, Any]:
    import torch

    state_file = path / "state.json"
    if not state_file.exists():
        raise RtlocalError(f"--resume: no checkpoint in {path.parent} (train without --resume to start afresh)")
    state = json.loads(state_file.read_text())
    if state.get("fingerprint") != fingerprint:
        raise CheckpointMismatch(f"--resume: the checkpoint in {path.parent} was made with other settings or data (remove it, or train with the same ones)")
    saved = torch.load(path / "trainable.pt", map_location=prep.device)
    params = dict(_trainable(prep.model))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    opt_state = torch.load(path / "optimizer.pt", map_location=prep.device)
    opt.load_state_dict(opt_state["optimizer"])
    sched.load_state_dict(opt_state["scheduler"])
    return state


def train(config: TrainConfig, *, progress: Progress | None = None) -> TrainResult:
    """Fine-tune `config.base` on `config.data` and write adapter + tokenizer + rtlocal.json to `config.output_dir`.

    Ctrl-C writes a checkpoint first (continue with `resume=True`), then re-raises KeyboardInterrupt.
    """
    progress = progress or LogProgress()
    if not config.output_dir:
        raise RtlocalError("no output directory given")
    out = Path(config.output_dir).expanduser()
    check_output_dir(out)
    prep = prepare(config, progress)
    metrics = fit(prep, progress=progress, checkpoint_dir=out / CHECKPOINT_DIR)
    save_output(prep, out, metrics)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return TrainResult(out, metrics["steps"], metrics["train_seconds"], metrics["tokens_per_second"], metrics["trainable_parameters"], metrics)


def fit(prep: Prepared, *, progress: Progress | None = None, checkpoint_dir: Path | None = None) -> dict[str, Any]:
    """The optimisation loop (with checkpoints in `checkpoint_dir` when given), then validation. Returns metrics."""
    import torch

    config = prep.config
    progress = progress or LogProgress()
    fwd = Forward(prep.model, config.first_token_weight)
    pad = prep.tokenizer.pad_token_id if prep.tokenizer.pad_token_id is not None else 0
    per_epoch = len(make_batches(prep.train, config.batch_size, config.seed, 0))
    total = config.max_steps or max(1, math.ceil(per_epoch * config.epochs / config.grad_accum))
    opt = _optimizer(prep.model, config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(config, total))
    fingerprint = config.fingerprint([s["sha256"] for s in prep.dataset.sources])
    state: dict[str, Any] = {"step": 0, "tokens": 0, "seconds": 0.0, "curve": [], "fingerprint": fingerprint}
    if config.resume:
        if checkpoint_dir is None:
            raise RtlocalError("--resume needs an output dir with a checkpoint")
        state = _load_checkpoint(prep, checkpoint_dir, opt, sched, fingerprint)
        progress.stage(f"resuming at step {state['step']}/{total}")
    n_train = count_trainable(prep.model)
    log.info("trainable parameters: %d; %d examples, %d steps on %s (%d threads)", n_train, len(prep.train), total, prep.device, torch.get_num_threads())
    prep.model.train()
    progress.start("training", total, initial=state["step"])
    t0 = time.perf_counter() - state["seconds"]
    run_t0, run_tokens = time.perf_counter(), state["tokens"]  # this run's pace, for the bar
    step = state["step"]
    window: list[float] = []
    micro = step * config.grad_accum  # micro-batches already done
    try:
        while step < total:
            epoch, k = divmod(micro, per_epoch)
            batch_ix = make_batches(prep.train, config.batch_size, config.seed, epoch)[k]
            batch = _to(collate([prep.train[i] for i in batch_ix], pad), prep.device)
            with autocast(prep.device, config.precision):
                loss, info = fwd.loss(batch)
            (loss / config.grad_accum).backward()
            micro += 1
            state["tokens"] += int(batch["attention_mask"].sum())
            window.append(loss.item())
            if micro % config.grad_accum:
                continue
            torch.nn.utils.clip_grad_norm_([p for _, p in _trainable(prep.model)], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            state["step"] = step
            mean = sum(window) / len(window)
            if step % config.log_every == 0 or step == total:
                state["curve"].append([step, round(mean, 4)])
                window = []
            state["seconds"] = time.perf_counter() - t0
            progress.update(step, loss=mean, first_ce=info["first_ce"], tok_s=(state["tokens"] - run_tokens) / max(1e-9, time.perf_counter() - run_t0))
            if prep.device == "cpu" and not config.threads and step % 25 == 0:  # follow the machine's load
                torch.set_num_threads(idle_cores(own=torch.get_num_threads()))
            if checkpoint_dir is not None and config.save_every and step % config.save_every == 0 and step < total:
                _save_checkpoint(prep, checkpoint_dir, opt, sched, state)
    except KeyboardInterrupt:
        progress.finish()
        if checkpoint_dir is not None:
            state["seconds"] = time.perf_counter() - t0
            with _no_interrupts():
                _save_checkpoint(prep, checkpoint_dir, opt, sched, state)
            log.warning("interrupted at step %d/%d: checkpoint saved in %s; continue with --resume", step, total, checkpoint_dir)
        raise
    progress.finish()
    seconds = time.perf_counter() - t0
    progress.stage("evaluating on the validation set")
    return {
        **evaluate(prep, fwd),
        "steps": step,
        "examples": len(prep.train),
        "train_seconds": round(seconds, 1),
        "tokens": state["tokens"],
        "tokens_per_second": round(state["tokens"] / max(1e-9, seconds), 1),
        "loss_curve": state["curve"],
        "trainable_parameters": n_train,
    }


class _no_interrupts:
    """Hold a second Ctrl-C while the checkpoint is written (the main thread only)."""

    def __enter__(self) -> None:
        try:
            self.old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            self.old = None

    def __exit__(self, *exc: object) -> None:
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)


def manifest_for(prep: Prepared, metrics: dict[str, Any]) -> dict[str, Any]:
    """rtlocal.json: what convert and the runtime need, and how the adapter was made."""
    import peft
    import torch
    import transformers

    from convert.convert import fingerprint
    from rtlocal.constants import DEFAULT_THRESHOLD

    cats = prep.categories
    return {
        "rtlocal_manifest": MANIFEST_VERSION,
        "mode": prep.dataset.mode,
        "respond_token": RESPOND_TOKEN,
        "categories": cats,
        "category_tokens": [token_for(c) for c in cats],
        "token_ids": prep.token_ids,
        "thresholds": [DEFAULT_THRESHOLD] * len(cats),  # in category order, as convert reads them
        "base": prep.config.base,
        "base_fingerprint": fingerprint(prep.base),
        "data": {"sources": prep.dataset.sources, "stats": prep.dataset.stats},
        "config": asdict(prep.config),
        "metrics": metrics,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_output(prep: Prepared, out: Path, metrics: dict[str, Any]) -> None:
    """Adapter, tokenizer, then the manifest last: each file replaced atomically, so a reader never
    sees a half-written file and a dir with rtlocal.json is complete."""
    from convert.merge import MANIFEST
    from rtlocal.paths import atomic_write_text

    tmp = out / f".save-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        prep.model.save_pretrained(str(tmp), save_embedding_layers=False)
        prep.tokenizer.save_pretrained(str(tmp))
        (out / MANIFEST).unlink(missing_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
        atomic_write_text(out / MANIFEST, json.dumps(manifest_for(prep, metrics), indent=2, ensure_ascii=False) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["TrainConfig", "TrainResult", "train", "prepare", "fit", "Forward", "ChatEncoder", "count_trainable", "add_refusal_tokens"]
