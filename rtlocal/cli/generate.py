"""`rtlocal generate`: answer prompts for scripts, as text or JSON with the refusal decision."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from rtlocal.cli.flags import (
    BiasOpt,
    CalibOpt,
    CtxOpt,
    GpuOpt,
    MaxTokOpt,
    ModelOpt,
    ModeOpt,
    SeedOpt,
    StrictOpt,
    SystemOpt,
    TempOpt,
    ThreadsOpt,
    ThresholdOpt,
)
from rtlocal.constants import ExitCode
from rtlocal.errors import RtlocalError, UsageError
from rtlocal.runtime.options import check_usage, open_engine, policy_from_flags


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
    from rtlocal.runtime import generation as gen
    from rtlocal.runtime.engine import SamplingParams

    if json_out and jsonl_out:
        raise UsageError("choose one of --json and --jsonl")
    if input is not None and prompt:
        raise UsageError("give a prompt or --input, not both")
    check_usage(strictness=strictness, threshold=threshold, bias=bias, mode=mode, decision_temperature=decision_temperature)
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
    engine = open_engine(model, threads, ctx, n_gpu_layers)
    try:
        policy = policy_from_flags(engine, strictness, threshold, bias, mode, calibration)
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
