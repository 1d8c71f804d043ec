"""`rtlocal finetune`: teach a base model to open every answer with `[respond]` or a refusal token.
This module holds the loop: prepare, fit with checkpoints, validation, and the output writer.

LoRA on all linear layers plus trainable rows for the new tokens (PEFT `trainable_token_indices`;
with tied embeddings the same rows are the output vectors). The loss covers the answer only, and the
first answer token (the decision) can be up-weighted.

The loop is our own rather than transformers' Trainer, for speed on a CPU: the output projection
and the cross-entropy run only on answer positions (about half of all tokens), the new token rows
are spliced in without copying the whole 49k-row embedding matrix twice per step, as PEFT's generic
forward does, and the batch's common opening (the system prompt and the user turn's header: a third
of the default recipe's tokens) runs once, its keys and values shared by every row
(`finetune.model.Forward`). The result is the same function PEFT computes (tests check the loss and
the gradients).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune.config import TrainConfig
from finetune.data import Dataset, build_dataset
from finetune.encoding import ChatEncoder, Example, collate, encode_dataset, make_batches
from finetune.model import (
    BF16_PARITY_TOLERANCE,
    Forward,
    _trainable,
    add_refusal_tokens,
    autocast,
    bf16_native,
    bf16_parity,
    count_trainable,
    idle_cores,
    load_base,
    pick_device,
    wrap_peft,
)
from finetune.progress import LogProgress, Progress
from rtlocal.constants import RESPOND_TOKEN, token_for
from rtlocal.errors import RtlocalError, require_train_extra

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
CHECKPOINT_DIR = "checkpoint"
VALIDATION_FILE = "validation.jsonl"  # the held-out split as labelled prompts (`rtlocal eval`/`calibrate` read it)


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


def check_output_dir(path: Path, *, force: bool = False, base: str | None = None) -> None:
    """Fail before any heavy work when the output dir must not or cannot be written: a folder holding
    other files (unless forced), the base model's own folder, or one that cannot be created or written."""
    from convert.merge import MANIFEST
    from rtlocal.paths import check_output_folder

    path = Path(path).expanduser()
    check_output_folder(path, markers=(MANIFEST, CHECKPOINT_DIR, "adapter_config.json"), force=force, inputs=[base])
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
            logits, tgt, is_first = fwd.logits_and_targets(batch)  # in fp32, whatever the training ran in
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


def train(config: TrainConfig, *, progress: Progress | None = None, force: bool = False) -> TrainResult:
    """Fine-tune `config.base` on `config.data` and write adapter + tokenizer + rtlocal.json to `config.output_dir`.

    Ctrl-C writes a checkpoint first (continue with `resume=True`), then re-raises KeyboardInterrupt.
    An output dir holding other files is written into only with `force`.
    """
    progress = progress or LogProgress()
    if not config.output_dir:
        raise RtlocalError("no output directory given")
    out = Path(config.output_dir).expanduser()
    check_output_dir(out, force=force, base=config.base)
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
    if "precision" not in state:  # a resumed run keeps the precision it started with
        first = _to(collate([prep.train[i] for i in make_batches(prep.train, config.batch_size, config.seed, 0)[0]], pad), prep.device)
        state["precision"], parity = choose_precision(config.precision, fwd, first, prep.device)
        state["bf16_parity"] = None if parity is None else round(parity, 5)
    precision = state["precision"]
    n_train = count_trainable(prep.model)
    log.info("trainable parameters: %d; %d examples, %d steps on %s (%d threads, %s)", n_train, len(prep.train), total, prep.device, torch.get_num_threads(), precision)
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
            with autocast(prep.device, precision):
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
        "precision": precision,
        "bf16_parity": state.get("bf16_parity"),
    }


def validation_rows(records: list[Any]) -> list[dict[str, Any]]:
    """The split's single-turn records as labelled prompts: the prompt is all a calibration run puts to the model."""
    return [
        {"prompt": r.prompt, "should_refuse": r.category is not None, "category": r.category or "", "source": r.source}
        for r in records
        if len(r.messages) == 1 and r.messages[0].get("role") == "user"
    ]


def write_validation(records: list[Any], path: Path) -> int:
    """The validation split's `validation_rows` as JSONL, atomically. Returns the count."""
    from rtlocal.paths import atomic_write_text

    rows = validation_rows(records)
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return len(rows)


def choose_precision(requested: str, fwd: Forward, batch: dict[str, Any], device: str) -> tuple[str, float | None]:
    """The precision to train in, and the bf16/fp32 loss difference when it was measured.

    `auto` takes bf16 autocast only where the hardware runs it natively (elsewhere it is emulated
    and slower) and the first batch's bf16 loss is within BF16_PARITY_TOLERANCE of fp32's.
    """
    if requested != "auto":
        return requested, None
    if not bf16_native(device):
        return "fp32", None
    parity = bf16_parity(fwd, batch, device)
    if parity > BF16_PARITY_TOLERANCE:
        log.warning("bf16 autocast changes the first batch's loss by %.1f%% (over %.0f%%): training in fp32", 100 * parity, 100 * BF16_PARITY_TOLERANCE)
        return "fp32", parity
    return "bf16", parity


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
        write_validation(prep.dataset.val, out / VALIDATION_FILE)
        atomic_write_text(out / MANIFEST, json.dumps(manifest_for(prep, metrics), indent=2, ensure_ascii=False) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["VALIDATION_FILE", "TrainResult", "choose_precision", "fit", "prepare", "train", "write_validation"]
