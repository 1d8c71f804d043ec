"""The training commands: `rtlocal finetune`, `rtlocal build` and `rtlocal data distill`.

Thin: parse flags, build a TrainConfig, call the typed functions in finetune/. Nothing here imports
torch; finetune/ does, inside its functions, after `require_train_extra` has checked the install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from rtlocal.constants import OVER_REFUSAL_BUDGET
from rtlocal.errors import Interrupted, RtlocalError, require_train_extra

DATA_HELP = (
    "Data source, repeatable: builtin, coconot-refusal:FILE|allenai/coconot, coconot-contrast:FILE|allenai/coconot, "
    "chat:FILE|HF-ID, self-instruct:FILE, jsonl:FILE (or just FILE.jsonl); add *W to weight a source, e.g. FILE*2."
)


def _train_options(**flags: Any) -> dict[str, Any]:
    """The flags that were given (not None), under TrainConfig's field names."""
    return {k: v for k, v in flags.items() if v is not None}


def _config(recipe: str | None, config_file: Path | None, flags: dict[str, Any]) -> Any:
    """Recipe < config file < flags."""
    from dataclasses import replace

    from finetune.config import TrainConfig

    if recipe:
        from finetune.recipes import get_recipe

        cfg = get_recipe(recipe).config
    else:
        cfg = TrainConfig()
    if config_file is not None:
        cfg = replace(cfg, **TrainConfig.read_file(config_file))
    return replace(cfg, **flags)


def _interrupted(what: str) -> None:
    raise Interrupted(f"{what} interrupted: a checkpoint was saved; run the same command with --resume to continue")


def finetune(
    base: Annotated[Optional[str], typer.Argument(help="Base: a Hugging Face id, a local HF dir or a GGUF file (default: the recipe's).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output dir: adapter, tokenizer and rtlocal.json.")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", "-d", help=DATA_HELP)] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="Start from a recipe: default, builtin-only or benchmark.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML/JSON file of TrainConfig fields (flags win).")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="categorical (5 CoCoNot tokens), single ([refuse]) or custom (categories from the data).")] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over the data.")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after N optimizer steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Examples per step.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Forward passes per optimizer step.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="LoRA learning rate.")] = None,
    token_lr: Annotated[Optional[float], typer.Option("--token-lr", help="Learning rate of the new token rows.")] = None,
    lora_r: Annotated[Optional[int], typer.Option("--lora-r", help="LoRA rank.")] = None,
    first_token_weight: Annotated[Optional[float], typer.Option("--first-token-weight", help="Loss weight of the first answer token.")] = None,
    balance: Annotated[Optional[float], typer.Option("--balance", help="Oversample small refusal categories: 0 none .. 1 equal.")] = None,
    token_init: Annotated[Optional[str], typer.Option("--token-init", help="words or mean.")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Max tokens per example.")] = None,
    max_answer_tokens: Annotated[Optional[int], typer.Option("--max-answer-tokens", help="Answer tokens trained per example.")] = None,
    max_refusal_tokens: Annotated[Optional[int], typer.Option("--max-refusal-tokens", help="Refusal-text tokens trained per refusal example (default: --max-answer-tokens).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Share held out for validation.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or mps.")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="auto (default: bf16 autocast where the hardware has it and the first batch matches fp32), fp32 or bf16.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for torch.", min=1)] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Checkpoint every N steps (0: only on Ctrl-C).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --out.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Write into an --out folder that holds other files.")] = False,
) -> None:
    """Fine-tune a base model with refusal tokens (LoRA + new token rows) into an adapter dir."""
    require_train_extra("rtlocal finetune")
    from finetune.progress import BarProgress
    from finetune.trainer import train

    if out is None:
        raise RtlocalError("--out DIR is required (where the adapter goes)")
    flags = _train_options(
        base=base, output_dir=str(out), data=data or None, mode=mode, epochs=epochs, max_steps=max_steps,
        batch_size=batch_size, grad_accum=grad_accum, learning_rate=lr, token_learning_rate=token_lr, lora_r=lora_r,
        first_token_weight=first_token_weight, balance=balance, token_init=token_init, max_length=max_length,
        max_answer_tokens=max_answer_tokens, max_refusal_tokens=max_refusal_tokens, val_fraction=val_fraction, seed=seed, device=device, precision=precision,
        threads=threads, save_every=save_every, resume=resume or None,
    )
    cfg = _config(recipe, config, flags)
    if not cfg.base:
        raise RtlocalError("no base model: give BASE (a HF id, HF dir or GGUF file) or --recipe default")
    try:
        r = train(cfg, progress=BarProgress(), force=force)
    except KeyboardInterrupt:
        _interrupted("training")
    m = r.metrics
    acc = m.get("val_first_token_accuracy")
    extra = f", validation first-token accuracy {acc:.1%}" if acc is not None else ""
    print(f"wrote {r.output_dir} ({r.steps} steps in {r.seconds / 60:.1f} min, {r.tokens_per_second:.0f} tokens/s{extra})")
    print(f"next: rtlocal convert {cfg.base} --adapter {r.output_dir} --out MODEL.gguf")

def build(
    recipe: Annotated[str, typer.Option("--recipe", help="default (offline, all bundled data), builtin-only (the previous default) or benchmark (built-in + CoCoNot train from ../shared/data).")] = "default",
    name: Annotated[Optional[str], typer.Option("--name", help="Register as NAME (default: the recipe's model name).")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Another base (HF id, HF dir or GGUF).")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", "-d", help=DATA_HELP + " Replaces the recipe's data.")] = None,
    out_type: Annotated[str, typer.Option("--type", help="GGUF type (q8_0 default; f16, q4_k_m, ...).")] = "q8_0",
    epochs: Annotated[Optional[float], typer.Option("--epochs")] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="auto (default: bf16 autocast where the hardware has it and the first batch matches fp32), fp32 or bf16.")] = None,
    exclude_types: Annotated[Optional[list[str]], typer.Option("--exclude-types", help="Leave these contrast-pair types out (leave-one-type-out runs).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1)] = None,
    work_dir: Annotated[Optional[Path], typer.Option("--work-dir", help="Where the adapter goes (default: the cache dir).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model of that name (and write into a --work-dir that holds other files).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted build.")] = False,
    calibrate: Annotated[Optional[bool], typer.Option("--calibrate/--no-calibrate", help=f"Set the strictness presets and the default thresholds (balanced: at most {OVER_REFUSAL_BUDGET['balanced']:.0%} of should-answer prompts refused) on the held-out validation split, as `rtlocal calibrate --write-gguf` does (default: as the recipe says; the default recipe calibrates).")] = None,
) -> None:
    """Fine-tune, convert and register a model in the models dir, in one command."""
    require_train_extra("rtlocal build")
    from finetune.build import build_recipe
    from finetune.progress import BarProgress

    overrides = _train_options(
        base=base, data=data or None, epochs=epochs, max_steps=max_steps, seed=seed, precision=precision,
        exclude_types=exclude_types or None, threads=threads, resume=resume or None,
    )
    try:
        r = build_recipe(recipe, name=name, overrides=overrides, out_type=out_type, work_dir=work_dir, force=force, calibrate=calibrate, progress=BarProgress())
    except KeyboardInterrupt:
        _interrupted("build")
    secs = " ".join(f"{k} {v / 60:.1f} min" for k, v in r.seconds.items())
    print(f"built {r.name}: {r.path} ({secs}); try: rtlocal chat --model {r.name}")
    if r.calibration:
        rates = r.calibration["preset_rates"]["balanced"]
        print(f"balanced, calibrated on {r.calibration['data'].get('n', '?')} held-out prompts: refuses {rates['refusal_rate']:.0%} "
              f"of those to refuse, {rates['over_refusal_rate']:.0%} of those to answer")

def distill_cmd(
    source: Annotated[str, typer.Argument(help="JSONL file or source spec with prompts to answer.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL to write (record schema).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="GGUF that answers (default: the base SmolLM2-135M).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Answer length cap.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")] = 0.0,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Answer at most N prompts.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Re-answer prompts that have an answer.")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1)] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt while answering (not written to the records).")] = None,
    drop_refusals: Annotated[bool, typer.Option("--drop-refusals", help="Leave out records whose answer the string-match judge calls a refusal.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out file even when it is not a JSONL file.")] = False,
) -> None:
    """Answer prompts that have no answer with the base model itself (self-distillation, via llama.cpp)."""
    from finetune.distill import distill
    from finetune.progress import BarProgress

    r = distill(
        source, out, model=model, max_tokens=max_tokens, temperature=temperature, limit=limit, overwrite=overwrite,
        threads=threads, system=system, drop_refusals=drop_refusals, force=force, progress=BarProgress(),
    )
    dropped = f", {r.dropped} dropped as refusals" if drop_refusals else ""
    print(f"wrote {r.path}: {r.answered} answered, {r.kept} unchanged{dropped}")


