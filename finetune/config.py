"""`rtlocal finetune`'s settings: TrainConfig (filled by the CLI flags, recipes or a TOML/JSON file,
validated on creation) and the choices it allows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from finetune.data import DataConfig
from rtlocal.constants import TokenMode
from rtlocal.errors import RtlocalError, UsageError

TOKEN_INITS = ("words", "mean")
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16")


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
    precision: str = field(
        default="auto",
        metadata={"help": "auto: bf16 autocast of the matrix products where the hardware has them (x86 CPUs with "
                  "AVX512-BF16/AMX, recent GPUs) and the first batch's loss matches fp32's, else fp32; or fp32, bf16.",
                  "choices": list(PRECISIONS)},
    )
    threads: int | None = field(default=None, metadata={"help": "CPU threads for torch (default: the idle cores, at least 1)."})
    save_every: int = field(default=50, metadata={"help": "Write a checkpoint every N steps (0: only on Ctrl-C)."})
    log_every: int = field(default=10, metadata={"help": "Record the training loss every N steps."})
    resume: bool = field(default=False, metadata={"help": "Continue from the checkpoint in output_dir."})

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise UsageError(f"{name} {what}, got {getattr(self, name)!r}")

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


__all__ = ["TrainConfig"]
