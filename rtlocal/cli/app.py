"""The `rtlocal` command. Each command is a thin layer over a typed function in its own module.

Errors: an RtlocalError prints one `Error: ...` line on stderr and exits 1; bad flags exit 2
(Click's usage errors, and UsageError: values out of range, repeated or contradictory flags, all
checked before any model loads); `--debug` shows tracebacks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from rtlocal.constants import STRICTNESS_PRESETS, ExitCode
from rtlocal.errors import Interrupted, RtlocalError, UsageError
from rtlocal.options import calibration_profile, check_usage, open_engine, policy_from_flags

app = typer.Typer(
    name="rtlocal",
    help="Dial how often a local language model refuses, per kind of request (refusal tokens).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Prepare training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

_DEBUG = False

STRICTNESS_HELP = (
    "Preset (" + ", ".join(STRICTNESS_PRESETS) + ") or a number in [0,1], for all categories or per category: "
    "'strict', '0.7', 'safety=strict,humanizing=off'."
)
THRESHOLD_HELP = "Raw thresholds in [0,1] per category, 'off' or 'force': 'safety=0.35', 'all=0.5'. Wins over --strictness."


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False) -> None:
    global _DEBUG
    _DEBUG = debug


# ------------------------------------------------------------------ shared runtime options

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="GGUF path or model name (default: RTLOCAL_MODEL, config, or the built default).")]
StrictOpt = Annotated[Optional[str], typer.Option("--strictness", "-s", help=STRICTNESS_HELP)]
ThresholdOpt = Annotated[Optional[str], typer.Option("--threshold", "-t", help=THRESHOLD_HELP)]
BiasOpt = Annotated[Optional[str], typer.Option("--bias", help="Logit biases for --mode bias: 'safety=2,all=-1'.")]
ModeOpt = Annotated[str, typer.Option("--mode", help="threshold (default), bias, or free (no intervention).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: all cores).", min=1)]
CtxOpt = Annotated[Optional[int], typer.Option("--ctx", help="Context length in tokens (default 4096).", min=64)]
GpuOpt = Annotated[Optional[int], typer.Option("--n-gpu-layers", help="Layers to offload to Metal/CUDA (-1: all). Default 0 (CPU).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Sampling seed (default: random).")]
TempOpt = Annotated[float, typer.Option("--temperature", help="Sampling temperature for the answer (0 = greedy).", min=0.0)]
MaxTokOpt = Annotated[int, typer.Option("--max-tokens", "-n", help="Maximum answer tokens.", min=1)]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System prompt.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output file even when it is not of the kind this command writes.")]
CalibOpt = Annotated[
    Optional[Path],
    typer.Option("--calibration", help="A profile from `rtlocal calibrate`: --strictness then means its measured rates (instead of the model's own table)."),
]


# One home for flags -> engine and policy (rtlocal/options.py); the short names stay for the commands here
# and for cli_eval, which reaches them through this module.
_engine = open_engine
_calibration_profile = calibration_profile
_policy = policy_from_flags
_check_usage = check_usage


# ------------------------------------------------------------------ commands


@app.command()
def generate(
    prompt: Annotated[Optional[list[str]], typer.Argument(help="The prompt (words are joined). Read from stdin when absent.")] = None,
    model: ModelOpt = None,
    input: Annotated[Optional[Path], typer.Option("--input", "-i", help="JSONL file ('-' for stdin): {\"prompt\": ...} or {\"messages\": [...]} per line.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document (an array with --input).")] = False,
    jsonl_out: Annotated[bool, typer.Option("--jsonl", help="Print one JSON object per line.")] = False,
    strictness: StrictOpt = None,
    threshold: ThresholdOpt = None,
    bias: BiasOpt = None,
    mode: ModeOpt = "threshold",
    system: SystemOpt = None,
    calibration: CalibOpt = None,
    max_tokens: MaxTokOpt = 256,
    temperature: TempOpt = 0.7,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 40,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    min_p: Annotated[float, typer.Option("--min-p", min=0.0, max=1.0)] = 0.05,
    repeat_penalty: Annotated[float, typer.Option("--repeat-penalty", min=0.0)] = 1.1,
    seed: SeedOpt = None,
    decision_temperature: Annotated[float, typer.Option("--decision-temperature", help="Softmax temperature for the refusal probabilities.", min=0.0)] = 1.0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip malformed JSONL lines (reported on stderr) instead of stopping.")] = False,
    fail_on_refusal: Annotated[bool, typer.Option("--fail-on-refusal", help=f"Exit {int(ExitCode.REFUSED)} when any prompt was refused.")] = False,
    threads: ThreadsOpt = None,
    ctx: CtxOpt = None,
    n_gpu_layers: GpuOpt = None,
) -> None:
    """Answer prompts for scripts: text by default, or --json/--jsonl with the refusal decision."""
    from rtlocal import generate as gen
    from rtlocal.engine import SamplingParams

    if json_out and jsonl_out:
        raise UsageError("choose one of --json and --jsonl")
    if input is not None and prompt:
        raise UsageError("give a prompt or --input, not both")
    _check_usage(strictness=strictness, threshold=threshold, bias=bias, mode=mode, decision_temperature=decision_temperature)
    sampling = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed)
    if input is None:
        if prompt:
            text = gen.check_prompt(" ".join(prompt), "the prompt argument")
        else:
            if sys.stdin is None or sys.stdin.isatty():
                raise RtlocalError("no prompt: pass one as an argument, on stdin, or with --input FILE.jsonl")
            text = gen.check_prompt(sys.stdin.read(), "stdin").strip()
    if input is not None and str(input) != "-" and not input.exists():
        raise RtlocalError(f"{input}: no such file")
    engine = _engine(model, threads, ctx, n_gpu_layers)
    try:
        policy = _policy(engine, strictness, threshold, bias, mode, calibration)
        if not engine.refusal.present:
            print(f"note: {engine.path.name} has no refusal tokens; running it as a plain model", file=sys.stderr)
        items = (
            gen.read_jsonl(input, system=system, skip_bad=skip_bad, warn=sys.stderr)
            if input is not None
            else iter([gen.single_item(text, system)])
        )
        fmt = "json" if json_out else "jsonl" if jsonl_out else "text"
        _, refused = gen.run(
            engine, items, policy, sampling=sampling, max_tokens=max_tokens, fmt=fmt, out=sys.stdout,
            err=sys.stderr, decision_temperature=decision_temperature, show_decision=sys.stderr.isatty(), skip_bad=skip_bad,
        )
    finally:
        engine.close()
    if fail_on_refusal and refused:
        raise typer.Exit(int(ExitCode.REFUSED))


@app.command()
def chat(
    model: ModelOpt = None,
    strictness: StrictOpt = None,
    threshold: ThresholdOpt = None,
    bias: BiasOpt = None,
    mode: ModeOpt = "threshold",
    system: SystemOpt = None,
    calibration: CalibOpt = None,
    plain: Annotated[bool, typer.Option("--plain", help="Line-mode REPL instead of the full-screen UI.")] = False,
    max_tokens: MaxTokOpt = 512,
    temperature: TempOpt = 0.7,
    seed: SeedOpt = None,
    threads: ThreadsOpt = None,
    ctx: CtxOpt = None,
    n_gpu_layers: GpuOpt = None,
    no_build: Annotated[bool, typer.Option("--no-build", help="Fail instead of building the default model when it is missing.")] = False,
) -> None:
    """Chat with a model, deciding afresh on every turn whether to refuse."""
    from rtlocal.chat import ChatSession, run_repl
    from rtlocal.engine import SamplingParams

    _check_usage(strictness=strictness, threshold=threshold, bias=bias, mode=mode)
    sampling = SamplingParams(temperature=temperature, seed=seed)
    if model is None and not no_build:
        _ensure_default_model()
    engine = _engine(model, threads, ctx, n_gpu_layers)
    try:
        policy = _policy(engine, strictness, threshold, bias, mode, calibration)
        session = ChatSession(engine, policy, system=system, sampling=sampling, max_tokens=max_tokens)
        if plain or not (sys.stdin.isatty() and sys.stdout.isatty()):
            run_repl(session, sys.stdin, sys.stdout)
        else:
            from rtlocal.models import load_settings
            from rtlocal.tui.app import run_tui

            run_tui(session, keymap=load_settings().keymap)
    finally:
        engine.close()


def _ensure_default_model() -> None:
    """The main job: build the default model on first run (offline, with a progress bar)."""
    from rtlocal.models import DEFAULT_MODEL_NAME, MODEL_ENV, list_models, load_settings

    if os.environ.get(MODEL_ENV) or load_settings().model:
        return
    if any(m.stem == DEFAULT_MODEL_NAME for m in list_models()):
        return
    try:
        from finetune.build import build_default
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RtlocalError(f"the default model is not built and building it needs the 'train' extra ({e.name} missing)") from e
    print(f"The default model {DEFAULT_MODEL_NAME!r} is not built yet: building it now (offline, once).", file=sys.stderr)
    build_default()


@app.command()
def convert(
    base: Annotated[str, typer.Argument(help="Base model: a Hugging Face id, a local HF dir, or a GGUF file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output GGUF file.")],
    adapter: Annotated[Optional[Path], typer.Option("--adapter", "-a", help="PEFT adapter dir (or an already merged HF dir).")] = None,
    out_type: Annotated[str, typer.Option("--type", help="f32, f16, q8_0, q4_k_m, ... (quantized types via llama.cpp).")] = "f16",
    name: Annotated[Optional[str], typer.Option("--name", help="general.name in the GGUF.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Compare llama.cpp's logits with the merged model's; fail on mismatch.")] = False,
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
) -> None:
    """Merge an adapter into its base and export GGUF with the refusal tokens as control tokens."""
    from rtlocal.errors import require_train_extra

    require_train_extra("rtlocal convert")
    from convert.convert import convert as do_convert

    r = do_convert(base, out, adapter=adapter, out_type=out_type, name=name, verify=verify, threads=threads, force=force)
    size = r.path.stat().st_size / 1e6
    toks = f"{len(r.refusal.categories)} refusal categories ({r.refusal.mode})" if r.refusal else "no refusal tokens"
    secs = " ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items())
    print(f"wrote {r.path} ({r.arch}, {r.out_type}, {size:.1f} MB, {r.n_vocab} tokens, {toks}; {secs})")
    if r.verify is not None:
        print(f"verify: {r.verify.summary()}")


@app.command("inspect")
def inspect_cmd(
    model: Annotated[str, typer.Argument(help="GGUF path or model name.")],
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show what a GGUF holds: architecture, size, refusal tokens and rtlocal metadata."""
    from rtlocal.info import format_report, inspect_gguf
    from rtlocal.models import resolve_model

    info = inspect_gguf(resolve_model(model))
    print(json.dumps(info, indent=2, ensure_ascii=False) if json_out else format_report(info))


@app.command("models")
def models_cmd() -> None:
    """List the models in the rtlocal models dir."""
    from rtlocal.models import list_models
    from rtlocal.paths import models_dir

    found = list_models()
    if not found:
        print(f"no models in {models_dir()} (run `rtlocal build`)")
    for m in found:
        print(f"{m.stem}\t{m.stat().st_size / 1e6:.1f} MB\t{m}")


def _not_built(command: str, issue: str) -> None:
    raise RtlocalError(f"`rtlocal {command}` is not built yet ({issue})")


try:  # commands that live with their own modules register themselves here
    from rtlocal.cli_train import register as _register_train

    _register_train(app, data_app)
except ImportError:  # pragma: no cover
    pass
try:
    from rtlocal.cli_eval import register as _register_eval

    _register_eval(app)
except ImportError:  # pragma: no cover
    pass
from rtlocal.cli_serve import register as _register_serve  # noqa: E402 (imports no server stack)

_register_serve(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the Typer app, turning RtlocalError into one line and an exit code."""
    try:
        rc = app(args=argv, prog_name="rtlocal", standalone_mode=False)
    except RtlocalError as e:
        if _DEBUG:
            raise
        print(f"Error: {e}", file=sys.stderr)
        return int(ExitCode.USAGE if isinstance(e, UsageError) else ExitCode.ERROR)
    except Interrupted as e:
        print(e, file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except typer.Exit as e:
        return int(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except typer.Abort:
        print("interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    except Exception as e:  # Click's usage errors arrive here in non-standalone mode
        show, code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):  # a ClickException (Typer bundles its own Click)
            show()
            return code
        if _DEBUG:
            raise
        print(f"Error: {type(e).__name__}: {e} (run with --debug for a traceback)", file=sys.stderr)
        return int(ExitCode.ERROR)
    if rc == ExitCode.INTERRUPTED:  # Typer turns Ctrl-C in a command into a silent return of 130
        print("interrupted", file=sys.stderr)
    return rc if isinstance(rc, int) else int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
