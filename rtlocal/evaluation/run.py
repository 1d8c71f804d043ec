"""`rtlocal eval`: score labelled prompts (first-token probabilities or full answers + a judge), then report.

Per-prompt results are cached in the output folder, one JSON line each, so an interrupted run resumes
where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rtlocal.errors import RtlocalError, UsageError
from rtlocal.paths import atomic_write_text

log = logging.getLogger(__name__)

from rtlocal.evaluation.data import (
    FIRST_TOKEN,
    GENERATE,
    MODES,
    Dataset,
    EvalItem,
    Record,
)

DEFAULT_MAX_TOKENS = 64  # enough for the judge, which reads only the opening of an answer
RECORDS_FILE = "records.jsonl"
CACHE_SCHEMA = 1


class ResultCache:
    """Per-prompt records in OUT/records.jsonl: a header line naming the run, then one record a line."""

    def __init__(self, out_dir: Path, header: dict[str, Any], *, restart: bool = False):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.path = Path(out_dir) / RECORDS_FILE
        self.header = header
        self.records: dict[str, Record] = {}
        if self.path.exists() and not restart:
            self._load()
        lines = [json.dumps({"header": header}, sort_keys=True)] + [json.dumps(asdict(r)) for r in self.records.values()]
        atomic_write_text(self.path, "\n".join(lines) + "\n")  # drops a torn last line of an interrupted run
        try:
            self._file = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise RtlocalError(f"cannot write {self.path}: {e.strerror or e}") from e
        self._last_sync = time.monotonic()

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        try:
            old = json.loads(lines[0])["header"] if lines else None
        except (json.JSONDecodeError, KeyError, TypeError):
            old = None
        if old != self.header:
            what = ", ".join(k for k in sorted(set(self.header) | set(old or {})) if (old or {}).get(k) != self.header.get(k))
            raise RtlocalError(
                f"{self.path.parent} holds results of another run (differs in: {what or 'format'}); "
                "pass --restart to discard them, or choose another --out"
            )
        for line in lines[1:]:
            try:
                rec = Record(**json.loads(line))
            except (json.JSONDecodeError, TypeError):
                continue  # a line cut short when the run was interrupted: that prompt is redone
            self.records[rec.key] = rec

    def add(self, record: Record) -> None:
        self.records[record.key] = record
        try:
            self._file.write(json.dumps(asdict(record)) + "\n")
            self._file.flush()
            if time.monotonic() - self._last_sync > 2.0:  # bound the loss on power failure without an fsync per prompt
                os.fsync(self._file.fileno())
                self._last_sync = time.monotonic()
        except OSError as e:  # a full disk: the lines written so far stay, and resume from there
            raise RtlocalError(f"cannot write {self.path}: {e.strerror or e}") from e

    def close(self) -> None:
        if not self._file.closed:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError as e:
                raise RtlocalError(f"cannot write {self.path}: {e.strerror or e}") from e
            finally:
                try:
                    self._file.close()
                except OSError:
                    pass


def _judge(rec: Record, item: EvalItem, judge: Any) -> None:
    """The judge's verdict on a generated answer; a refusal token counts as a refusal in any case."""
    rec.judge_refused, rec.judge_reason = judge(item.prompt, rec.text or "")
    rec.judge = judge.fingerprint
    rec.refused = bool(rec.token_category is not None or rec.judge_refused)


def model_identity(path: Path) -> dict[str, Any]:
    st = Path(path).stat()
    return {"name": Path(path).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


Progress = Callable[[int, int], None]  # (done, total)


@dataclass
class RunOptions:
    """How prompts are put to the model."""

    mode: str = FIRST_TOKEN
    system: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0  # greedy answers: a report that can be reproduced
    seed: int = 0
    decision_temperature: float = 1.0

    def __post_init__(self) -> None:
        """Bad values are bad usage (exit 2), found before a model loads."""
        from rtlocal.runtime.engine import SamplingParams
        from rtlocal.runtime.policy import check_decision_temperature

        if self.mode not in MODES:
            raise UsageError(f"--mode must be {' or '.join(MODES)}, got {self.mode!r}")
        if self.max_tokens < 1:
            raise UsageError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        SamplingParams(temperature=self.temperature, seed=self.seed)
        check_decision_temperature(self.decision_temperature)


def score_items(
    engine: Any,
    items: Sequence[EvalItem],
    policy: Any,
    *,
    options: RunOptions,
    judge: Any = None,
    out_dir: Path | None = None,
    restart: bool = False,
    progress: Progress | None = None,
) -> tuple[list[Record], dict[str, Any]]:
    """Run every prompt not already cached in `out_dir`; return the records (in item order) and timing.

    first-token: one prompt evaluation, p_k for every refusal category, no generation.
    generate: the full answer (decided by `policy` on refusal-token models) and the judge's verdict.
    """
    from rtlocal.paths import lock_folder

    _check_run(engine, options, judge)
    if out_dir is None:
        return _score_items(engine, items, policy, options=options, judge=judge, out_dir=None, restart=restart, progress=progress)
    with lock_folder(out_dir, "rtlocal eval or calibrate run"):
        return _score_items(engine, items, policy, options=options, judge=judge, out_dir=out_dir, restart=restart, progress=progress)


def _check_run(engine: Any, options: RunOptions, judge: Any) -> None:
    if options.mode == FIRST_TOKEN and not engine.refusal.present:
        raise RtlocalError(f"{engine.path.name} has no refusal tokens: first-token mode needs them (use --mode generate)")
    if options.mode == GENERATE and judge is None:
        raise ValueError("generate mode needs a judge")


def _score_items(
    engine: Any,
    items: Sequence[EvalItem],
    policy: Any,
    *,
    options: RunOptions,
    judge: Any,
    out_dir: Path | None,
    restart: bool,
    progress: Progress | None,
) -> tuple[list[Record], dict[str, Any]]:
    from rtlocal.runtime.engine import SamplingParams
    from rtlocal.runtime.generation import single_item

    header: dict[str, Any] = {
        "schema": CACHE_SCHEMA,
        "mode": options.mode,
        "model": model_identity(engine.path),
        "system": options.system,
        "decision_temperature": options.decision_temperature,
    }
    if options.mode == GENERATE:  # answers depend on these; first-token probabilities do not
        header.update(
            thresholds=policy.thresholds, policy_mode=policy.mode.value, max_tokens=options.max_tokens,
            temperature=options.temperature, seed=options.seed,
        )
    cache = ResultCache(out_dir, header, restart=restart) if out_dir is not None else None
    done: dict[str, Record] = dict(cache.records) if cache else {}
    sampling = SamplingParams(temperature=options.temperature, seed=options.seed)
    todo = [it for it in items if it.key not in done]
    if done:
        log.info("resuming: %d of %d prompts already done", len(items) - len(todo), len(items))
    if options.mode == GENERATE:  # the answers are cached; a changed judge (new rules, say) judges them again
        for item in items:
            rec = done.get(item.key)
            if rec is not None and rec.judge != judge.fingerprint:
                _judge(rec, item, judge)
                if cache:
                    cache.add(rec)
    errors: list[str] = []
    t_start = time.perf_counter()
    n_new = 0
    try:
        for i, item in enumerate(todo):
            messages = single_item(item.prompt, options.system).messages
            rec = Record(item.key, item.id, item.split, item.should_refuse, item.category)
            t0 = time.perf_counter()
            try:
                if options.mode == FIRST_TOKEN:
                    d = engine.decide(messages, policy, decision_temperature=options.decision_temperature)
                else:
                    response = engine.respond(
                        messages, policy, sampling=sampling, max_tokens=options.max_tokens,
                        decision_temperature=options.decision_temperature,
                    )
                    rec.text = response.finish()
                    d = response.decision
                    rec.stop_reason = response.stats.stop_reason
                    rec.token_category = d.category
                    _judge(rec, item, judge)
            except RtlocalError as e:  # e.g. a prompt longer than the context: skip it, not the run
                errors.append(f"{item.key}: {e}")
                log.warning("skipped %s: %s", item.key, e)
                if progress:
                    progress(len(items) - len(todo) + i + 1, len(items))
                continue
            rec.seconds = time.perf_counter() - t0
            if d.probs:
                rec.probs = dict(d.probs)
                rec.p_respond = None if math.isnan(d.p_respond) else d.p_respond
            done[item.key] = rec
            n_new += 1
            if cache:
                cache.add(rec)
            if progress:
                progress(len(items) - len(todo) + i + 1, len(items))
    finally:
        if cache:
            cache.close()
    if errors and not n_new and not any(it.key in done for it in items):
        raise RtlocalError(errors[0])
    elapsed = time.perf_counter() - t_start
    records = [done[it.key] for it in items if it.key in done]
    timing = {
        "new_prompts": n_new,
        "cached_prompts": len(records) - n_new,
        "skipped": errors,
        "seconds": round(elapsed, 3),
        "prompts_per_second": round(n_new / elapsed, 3) if n_new and elapsed > 0 else None,
    }
    return records, timing


def model_info(engine: Any) -> dict[str, Any]:
    """What a report says about the model."""
    info = engine.refusal
    return {
        "path": str(engine.path),
        "name": engine.path.name,
        "refusal_tokens": info.present,
        "mode": info.mode,
        "categories": list(info.categories),
        "default_thresholds": dict(info.thresholds),
        "calibration": bool(info.calibration),
    }


def preset_policies(engine: Any) -> dict[str, Any]:
    """The policy of every strictness preset but 'off', calibrated when the model carries a table."""
    from rtlocal.constants import STRICTNESS_PRESETS
    from rtlocal.runtime.calibration import strictness_mapper
    from rtlocal.runtime.policy import build_policy

    info = engine.refusal
    if not info.present:
        return {}
    mapper = strictness_mapper(info.calibration)
    return {
        name: build_policy(info.categories, strictness=name, defaults=info.thresholds, calibrated=mapper)
        for name, preset in STRICTNESS_PRESETS.items()
        if preset.strictness is not None
    }


def run(
    engine: Any,
    dataset: Dataset,
    policy: Any,
    *,
    options: RunOptions,
    out_dir: Path,
    judge: Any = None,
    restart: bool = False,
    progress: Progress | None = None,
    n_boot: int | None = None,
    plots: bool = True,
    compare: Sequence[dict[str, Any]] = (),
    limit: int | None = None,
    label: str | None = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Score `dataset`, then write report.json, report.md and the plots to `out_dir`.

    Returns:
        The report and the written files by kind.
    """
    from rtlocal.paths import lock_folder

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RtlocalError(f"--out {out_dir}: exists and is not a folder")
    _check_run(engine, options, judge)
    with lock_folder(out_dir, "rtlocal eval"):  # from the first cached result to the last report file
        return _run(engine, dataset, policy, options=options, out_dir=out_dir, judge=judge, restart=restart, progress=progress,
                    n_boot=n_boot, plots=plots, compare=compare, limit=limit, label=label)


def _run(engine, dataset, policy, *, options, out_dir, judge, restart, progress, n_boot, plots, compare, limit, label):
    from rtlocal.evaluation.metrics import DEFAULT_BOOTSTRAP
    from rtlocal.evaluation.report import build_report, write_report

    records, timing = score_items(
        engine, dataset.items, policy, options=options, judge=judge, out_dir=out_dir, restart=restart, progress=progress
    )
    judge_info = None
    if options.mode == GENERATE:
        judge_info = {"name": judge.name, "fingerprint": judge.fingerprint}
        if hasattr(judge, "describe"):
            judge_info["rules"] = judge.describe()
    report = build_report(
        records,
        items=dataset.items,
        policy=policy,
        model=model_info(engine),
        data={**dataset.describe(), "limit": limit},
        mode=options.mode,
        judge=judge_info,
        timing=timing,
        presets=preset_policies(engine),
        n_boot=DEFAULT_BOOTSTRAP if n_boot is None else n_boot,
        label=label,
    )
    files = write_report(report, out_dir, plots=plots, compare=compare)
    return report, files
