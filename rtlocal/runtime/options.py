"""Runtime options shared by every command that runs a model (generate, chat, eval, serve).

Flags in, an `Engine` and a `Policy` out: the one place where --model/--threads/--ctx/--n-gpu-layers,
config.toml and RTLOCAL_MODEL become a loaded model, and --strictness/--threshold/--bias/--mode and a
calibration profile become the decision rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rtlocal.errors import RtlocalError

if TYPE_CHECKING:
    from rtlocal.runtime.engine import Engine
    from rtlocal.runtime.models import Settings
    from rtlocal.runtime.policy import Policy


def open_engine(model: str | None, threads: int | None, ctx: int | None, gpu: int | None) -> "Engine":
    """Load the model named by the flag, RTLOCAL_MODEL, config.toml or the default, with the runtime flags."""
    from rtlocal.runtime.engine import DEFAULT_CTX, Engine
    from rtlocal.runtime.models import load_settings, resolve_model

    settings = load_settings()
    path = resolve_model(model, settings)
    return Engine(
        path,
        n_ctx=ctx or settings.ctx or DEFAULT_CTX,
        n_threads=threads or settings.threads,
        n_gpu_layers=gpu if gpu is not None else (settings.n_gpu_layers or 0),
    )


def calibration_profile(flag: Path | None, settings: "Settings", has_tokens: bool) -> Path | None:
    """The profile in effect: --calibration, else config.toml's (which, like its strictness, a plain model ignores)."""
    if flag is not None:
        return flag
    return Path(settings.calibration).expanduser() if settings.calibration and has_tokens else None


def check_usage(
    *, strictness: str | None = None, threshold: str | None = None, bias: str | None = None, mode: str = "threshold",
    decision_temperature: float = 1.0,
) -> None:
    """Every flag value a command takes, checked before any model loads or data is read (UsageError: exit 2)."""
    from rtlocal.runtime.policy import check_decision_temperature, check_flags

    check_flags(strictness=strictness, thresholds=threshold, biases=bias, mode=mode)
    check_decision_temperature(decision_temperature)


def policy_from_flags(
    engine: "Engine",
    strictness: str | None,
    threshold: str | None,
    bias: str | None,
    mode: str,
    calibration: Path | None = None,
) -> "Policy":
    """The decision rule from the flags over config.toml over the model's defaults; applies a calibration profile."""
    from rtlocal.runtime.calibration import apply_profile, strictness_mapper
    from rtlocal.runtime.models import load_settings
    from rtlocal.runtime.policy import Mode, build_policy

    try:
        mode_v = Mode(mode)
    except ValueError:
        raise RtlocalError(f"--mode must be threshold, bias or free, got {mode!r}") from None
    settings = load_settings()
    info = engine.refusal
    if not info.present and (strictness or threshold or bias):
        raise RtlocalError(f"{engine.path.name} has no refusal tokens: --strictness/--threshold/--bias do not apply")
    profile = calibration_profile(calibration, settings, info.present)
    if profile is not None:
        apply_profile(info, profile, model_name=engine.path.name)
    return build_policy(
        info.categories,
        strictness=strictness or settings.strictness,
        thresholds=threshold or settings.threshold,
        biases=bias,
        mode=mode_v,
        defaults=info.thresholds,
        calibrated=strictness_mapper(info.calibration),
    )
