"""`rtlocal build`: fine-tune, convert to GGUF and register the model by name, in one command.

The GGUF type is q8_0: the base is already a Q4_1 GGUF (8-bit embeddings), so f16 would double
the file (271 MB vs 145 MB) and slow CPU inference, which is memory-bound, for no real gain: q8_0's
rounding (1/254 of each 32-weight block's range) is far below the Q4_1 rounding already in the
base's weights. `--type f16` is there for whoever wants the merged weights unrounded.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from finetune.config import TrainConfig
from finetune.progress import Progress, default_progress
from finetune.recipes import get_recipe
from finetune.trainer import VALIDATION_FILE, TrainResult, train
from rtlocal.errors import RtlocalError, require_train_extra
from rtlocal.paths import cache_dir, check_output, discard, models_dir, temp_path_for

log = logging.getLogger(__name__)

DEFAULT_OUT_TYPE = "q8_0"


@dataclass
class BuildResult:
    name: str
    path: Path
    adapter_dir: Path
    train: TrainResult
    seconds: dict[str, float]
    calibration: dict | None = None  # the table written into the model (None: uncalibrated presets)


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith(".") or name.endswith(".gguf"):
        raise RtlocalError(f"model name {name!r}: use a plain name such as smollm2-135m-rt (no path, no .gguf)")


def build(
    config: TrainConfig,
    *,
    name: str,
    out_type: str = DEFAULT_OUT_TYPE,
    work_dir: Path | None = None,
    force: bool = False,
    keep_adapter: bool = True,
    calibrate: bool = False,
    progress: Progress | None = None,
) -> BuildResult:
    """Train `config` into a work dir, convert it and register `models_dir()/NAME.gguf` atomically.

    Args:
        config: the training settings (its output_dir is replaced by the work dir).
        name: the model name to register.
        out_type: GGUF type for convert (q8_0 by default, see the module doc).
        work_dir: where the adapter goes (default: the cache dir's builds/NAME).
        force: replace an existing model of that name.
        keep_adapter: keep the adapter dir after converting (it is small and lets you re-convert).
        calibrate: set the strictness presets and the default thresholds (= `balanced`: at most
            rtlocal.constants.OVER_REFUSAL_BUDGET of the split's should-answer prompts refused) from the
            held-out validation split. A build's refusal probabilities shift from one build to the next
            (at τ 0.5 CoCoNot's look-alikes were over-refused 0.5-8% by builds of one recipe), a measured
            target does not (bench/RESULTS.md).
    """
    require_train_extra("rtlocal build")
    from convert.convert import OUT_TYPES, convert

    progress = progress or default_progress()
    _check_name(name)
    out_type = out_type.lower()
    if out_type not in OUT_TYPES:
        raise RtlocalError(f"unknown output type {out_type!r} (choose from {', '.join(OUT_TYPES)})")
    target = models_dir() / f"{name}.gguf"
    try:
        models_dir().mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RtlocalError(f"cannot create the models dir {models_dir()}: {e.strerror or e}") from None
    check_output(target, kind=None, force=force)  # a model of that name is replaced only with --force
    work = Path(work_dir).expanduser() if work_dir else cache_dir() / "builds" / name
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    result = train(replace(config, output_dir=str(work)), progress=progress, force=force)
    times["train"] = time.perf_counter() - t0
    progress.stage(f"converting to GGUF ({out_type})")
    t0 = time.perf_counter()
    staged = temp_path_for(target)  # beside the model, registered by one rename once complete (and calibrated)
    try:
        convert(config.base, staged, adapter=work, out_type=out_type, name=name, force=True)
        times["convert"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        calibration = _calibrate(staged, work / VALIDATION_FILE, target, threads=config.threads, progress=progress) if calibrate else None
        if calibration is None:
            os.replace(staged, target)
        times["calibrate"] = time.perf_counter() - t0
    finally:
        discard(staged)
    if not keep_adapter:
        shutil.rmtree(work, ignore_errors=True)
    progress.stage(f"registered {name} at {target} ({os.path.getsize(target) / 1e6:.0f} MB)")
    return BuildResult(name, target, work, result, times, calibration)


def _calibrate(model: Path, validation: Path, target: Path, *, threads: int | None, progress: Progress) -> dict | None:
    """Calibrate `model`'s presets on the held-out split and write the result to `target`; None when the
    split cannot calibrate (too small, one class only: a warning says why) and nothing was written."""
    from rtlocal.evaluation.calibrate import calibrate_gguf

    if not validation.is_file() or validation.stat().st_size == 0:  # no held-out split (val_fraction 0)
        return None
    progress.stage("calibrating the strictness presets on the held-out validation split")
    try:
        result = calibrate_gguf(model, validation, out=target, threads=threads)
    except RtlocalError as e:
        log.warning("the model keeps the uncalibrated presets: %s", e)
        return None
    return result.table


def build_recipe(
    recipe: str = "default", *, name: str | None = None, overrides: dict | None = None, calibrate: bool | None = None, **kwargs
) -> BuildResult:
    """Build a named recipe (see finetune.recipes), with optional TrainConfig overrides; `calibrate`
    None: as the recipe says."""
    r = get_recipe(recipe)
    config = replace(r.config, **(overrides or {})) if overrides else r.config
    return build(config, name=name or r.model_name, calibrate=r.calibrate if calibrate is None else calibrate, **kwargs)


def build_default(*, progress: Progress | None = None) -> BuildResult:
    """What `rtlocal chat` runs on first use: the default recipe, registered as the default model name.

    A first run cut short by Ctrl-C left a checkpoint in the work dir: the next run continues from it.
    """
    from finetune.trainer import CHECKPOINT_DIR, CheckpointMismatch

    progress = progress or default_progress()
    work = cache_dir() / "builds" / get_recipe("default").model_name
    if (work / CHECKPOINT_DIR / "state.json").exists():
        try:
            return build_recipe("default", overrides={"resume": True}, progress=progress, force=True)
        except CheckpointMismatch as e:  # a checkpoint of other settings: start afresh
            log.warning("not resuming the default build: %s", e)
    return build_recipe("default", progress=progress, force=True)
