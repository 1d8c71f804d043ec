"""`rtlocal eval` and `rtlocal calibrate`: thin Typer commands over rtlocal.evaluation."""

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from rtlocal.cli.flags import CalibOpt, CtxOpt, ForceOpt, GpuOpt, StrictOpt, SystemOpt, ThreadsOpt, ThresholdOpt
from rtlocal.errors import UsageError
from rtlocal.runtime.options import calibration_profile, check_usage, open_engine, policy_from_flags


class _ProgressBar:
    """A progress bar on stderr: redrawn in place on a terminal, a line every 10% in a log."""

    WIDTH = 28

    def __init__(self, label: str, stream=None):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self.start_done: int | None = None
        self.last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        if self.start_done is None:
            self.start_done = done - 1  # prompts found in the cache do not count towards the rate
        elapsed = time.monotonic() - self.t0
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        frac = done / total if total else 1.0
        speed = f"{rate:.1f} prompts/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s/prompt"
        text = f"{self.label} {done}/{total} {speed} eta {eta:.0f}s"
        if self.tty:
            filled = int(frac * self.WIDTH)
            self.stream.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {text}\x1b[K")
            self.stream.flush()
        elif int(frac * 10) > self.last_decile or done == total:
            self.last_decile = int(frac * 10)
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty and self.start_done is not None:
            self.stream.write("\n")
            self.stream.flush()


ModelArg = Annotated[str, typer.Argument(help="GGUF path or model name.")]
DataOpt = Annotated[str, typer.Option("--data", "-d", help="A CoCoNot folder, a hub id (allenai/coconot), an XSTest CSV or a JSONL file (prompt, should_refuse, category).")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="At most N prompts per split (a fixed-seed sample).", min=1)]
RestartOpt = Annotated[bool, typer.Option("--restart", help="Discard cached per-prompt results and start again.")]


def eval_cmd(
    model: ModelArg,
    data: DataOpt,
    split: Annotated[Optional[str], typer.Option("--split", help="CoCoNot: test (default), train, or names joined by commas: refusal_test,contrast_test.")] = None,
    mode: Annotated[str, typer.Option("--mode", help="first-token (refusal-token probabilities only) or generate (full answers + a refusal judge).")] = "first-token",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder for report.md, report.json, plots and the resumable cache (default: eval-MODEL-MODE).")] = None,
    limit: LimitOpt = None,
    strictness: StrictOpt = None,
    threshold: ThresholdOpt = None,
    calibration: CalibOpt = None,
    system: SystemOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="generate: answer tokens per prompt.", min=1)] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="generate: sampling temperature (0 = greedy, reproducible).", min=0.0)] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="generate: sampling seed.")] = 0,
    judge: Annotated[Optional[str], typer.Option("--judge", help="generate: a judge model (GGUF path or name) instead of the string-match rules.")] = None,
    compare: Annotated[Optional[list[Path]], typer.Option("--compare", help="Another run's --out folder, shown side by side (repeatable).")] = None,
    bootstrap: Annotated[int, typer.Option("--bootstrap", help="Bootstrap resamples for the 95% intervals (0: none).", min=0)] = 1000,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots (needs matplotlib: the 'plots' extra).")] = True,
    restart: RestartOpt = False,
    label: Annotated[Optional[str], typer.Option("--label", help="The run's name in reports and comparisons (default: model, mode and policy flags).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into an --out folder that holds other files.")] = False,
    threads: ThreadsOpt = None,
    ctx: CtxOpt = None,
    n_gpu_layers: GpuOpt = None,
) -> None:
    """Measure how a model refuses on labelled prompts: rates, ROC/PR AUC, sweeps, the per-category control check."""
    from rtlocal.evaluation import run as evaluate
    from rtlocal.evaluation.data import GENERATE, load_data
    from rtlocal.evaluation.judge import load_judge
    from rtlocal.evaluation.report import load_report
    from rtlocal.paths import LOCK_FILE, check_output_folder, lock_folder
    from rtlocal.runtime.models import load_settings, resolve_model

    check_usage(strictness=strictness, threshold=threshold)
    options = evaluate.RunOptions(mode=mode, system=system, max_tokens=max_tokens, temperature=temperature, seed=seed)
    if judge and mode != GENERATE:
        raise UsageError("--judge applies to --mode generate")
    out_dir = check_output_folder(
        out or Path(f"eval-{resolve_model(model, load_settings()).stem}-{mode}"),
        markers=(evaluate.RECORDS_FILE, "report.json", LOCK_FILE), force=force,
    )
    others = [load_report(p) for p in compare or []]
    dataset = load_data(data, split=split, limit=limit)
    with lock_folder(out_dir, "rtlocal eval"):  # a second run on this folder stops here, before its model loads
        engine = open_engine(model, threads, ctx, n_gpu_layers)
        judge_obj = None
        try:
            policy = policy_from_flags(engine, strictness, threshold, None, "threshold", calibration)
            if mode == GENERATE:
                judge_obj = load_judge(judge, n_ctx=ctx, n_threads=threads)
            if label is None:
                flags = [mode] + [f"{n} {v}" for n, v in (("strictness", strictness), ("threshold", threshold)) if v]
                calibrated = calibration_profile(calibration, load_settings(), engine.refusal.present) is not None
                label = f"{engine.path.name} ({', '.join(flags + (['calibrated'] if calibrated else []))})"
            print(f"eval: {engine.path.name}, {len(dataset.items)} prompts ({', '.join(dataset.splits)}), {mode} -> {out_dir}", file=sys.stderr)
            bar = _ProgressBar("eval")
            try:
                report, files = evaluate.run(
                    engine, dataset, policy, options=options, out_dir=out_dir, judge=judge_obj, restart=restart,
                    progress=bar, n_boot=bootstrap, plots=plots, compare=others, limit=limit, label=label,
                )
            finally:
                bar.close()
        finally:
            if judge_obj is not None:
                judge_obj.close()
            engine.close()
    _print_eval_summary(report, files)


def calibrate_cmd(
    model: ModelArg,
    data: DataOpt,
    split: Annotated[Optional[str], typer.Option("--split", help="CoCoNot split(s) to calibrate on (default: train; never calibrate on the test split you report).")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="recall=R (per category), over-refusal=O (whole policy) or f1 (per category). Default: the balanced preset's (over-refusal=0.05).")] = None,
    profile: Annotated[Optional[Path], typer.Option("--profile", help="Where to write the calibration profile (default: MODEL.calibration.json here).")] = None,
    write_gguf: Annotated[bool, typer.Option("--write-gguf", help="Also store the table (and the calibrated default thresholds) in the model file, rewritten atomically.")] = False,
    gguf_out: Annotated[Optional[Path], typer.Option("--gguf-out", help="Write a calibrated copy of the model here instead of rewriting it.")] = None,
    keep_defaults: Annotated[bool, typer.Option("--keep-defaults", help="With --write-gguf or --gguf-out: keep the model's default thresholds; store only the table.")] = False,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="A folder for resumable per-prompt results (e.g. an eval --out folder of the same model).")] = None,
    limit: LimitOpt = None,
    system: SystemOpt = None,
    restart: RestartOpt = False,
    force: ForceOpt = False,
    threads: ThreadsOpt = None,
    ctx: CtxOpt = None,
    n_gpu_layers: GpuOpt = None,
) -> None:
    """Pick per-category thresholds for a measured target; save the calibration table (profile, optionally the GGUF)."""
    from rtlocal.evaluation import run as evaluate
    from rtlocal.evaluation.calibrate import PRESET_TARGETS, calibrate_model, gguf_values, parse_target, refusal_info
    from rtlocal.evaluation.data import load_data
    from rtlocal.paths import CALIBRATION_PROFILE, GGUF_FILE, check_output
    from rtlocal.runtime.calibration import save_profile
    from rtlocal.runtime.gguf_edit import set_metadata
    from rtlocal.runtime.models import load_settings, resolve_model

    goal = parse_target(target) if target is not None else PRESET_TARGETS["balanced"]
    # every destination is checked before any prompt is scored
    model_file = resolve_model(model, load_settings())
    profile_path = check_output(
        profile or Path(f"{model_file.stem}.calibration.json"), kind=CALIBRATION_PROFILE, force=force,
        inputs=[model_file, data], flag="--profile",
    )
    if gguf_out is not None:
        check_output(gguf_out, kind=GGUF_FILE, force=force, inputs=[model_file, data, profile_path], flag="--gguf-out")
    elif write_gguf:
        check_output(model_file, kind=GGUF_FILE, force=True, flag="--write-gguf")  # rewritten in place
    dataset = load_data(data, split=split, limit=limit, default_split="train")
    engine = open_engine(model, threads, ctx, n_gpu_layers)
    try:
        info = refusal_info(engine)
        policy = policy_from_flags(engine, None, None, None, "threshold")
        print(f"calibrate: {engine.path.name} on {len(dataset.items)} prompts ({', '.join(dataset.splits)}), target {goal}", file=sys.stderr)
        bar = _ProgressBar("scoring")
        try:
            result = calibrate_model(
                engine, dataset, goal, policy=policy, options=evaluate.RunOptions(system=system), cache=cache, restart=restart,
                progress=bar, data={"limit": limit},
            )
        finally:
            bar.close()
        model_path = engine.path
    finally:
        engine.close()
    profile_path = save_profile(profile_path, result.table)
    _print_calibration(result, profile_path)
    if write_gguf or gguf_out is not None:
        written = set_metadata(model_path, gguf_values(info, result.table, set_defaults=not keep_defaults), out=gguf_out)
        print(f"wrote the calibration into {written}")


def _print_eval_summary(report: dict, files: dict) -> None:
    from rtlocal.evaluation.report import num, pct

    s = report["summary"]
    auc = f", ROC AUC {s['roc_auc']:.3f}" if s.get("roc_auc") is not None else ""
    print(f"{report['label']}: refusal rate {pct(s['refusal_rate'])}, over-refusal {pct(s['over_refusal_rate'])}, F1 {num(s['f1'])}{auc} (n={report['n']})")
    if s.get("note"):
        print(f"  not measured: {s['note']}")
    for row in (report.get("control") or {}).get("rows", []):
        print(f"  control: {row['category']} off -> its rate {pct(row['after'][row['category']])}, max other shift "
              f"{100 * row['max_other_shift']:.1f} pts: {'pass' if row['passed'] else 'FAIL'}")
    if report.get("plots_note"):
        print(f"plots {report['plots_note']}", file=sys.stderr)
    print(f"report: {files['markdown']} (and {files['json'].name}{', ' + ', '.join(report['plots']) if report.get('plots') else ''})")


def _print_calibration(result, profile_path: Path) -> None:
    from rtlocal.constants import alias_of
    from rtlocal.evaluation.report import pct

    t = result.table
    print(f"target {t['target']}:")
    for cat, e in t["expected"].items():
        print(f"  {alias_of(cat):<14} threshold {e['threshold']:.4g}  refusal {pct(e['refusal_rate'])} of {e['n_should_refuse']}, "
              f"over-refusal {pct(e['over_refusal_rate'])} of {e['n_should_answer']}")
    comb = t["combined"]
    print(f"  all categories: refusal {pct(comb['refusal_rate'])}, over-refusal {pct(comb['over_refusal_rate'])}, F1 {comb['f1']:.3f}")
    for name, rates in t["preset_rates"].items():
        print(f"  preset {name:<9} ({t['preset_targets'][name]}): refusal {pct(rates['refusal_rate'])}, over-refusal {pct(rates['over_refusal_rate'])}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {profile_path}")
