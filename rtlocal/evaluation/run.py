"""`rtlocal eval`: how a model refuses on labelled prompts, first-token probabilities or full answers.

Data: CoCoNot (a local folder of refusal_*/contrast_* JSONL files, or the `allenai/coconot` hub
dataset), XSTest-format CSV (prompt, label safe/unsafe, type), harmful-behaviour CSV (HarmBench /
AdvBench: Behavior, all to be refused) and generic JSONL (prompt, should_refuse, optional category).
Per-prompt results are cached in the output folder, one JSON line each, so an interrupted run resumes
where it stopped.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rtlocal.constants import COCONOT_CATEGORIES, Category
from rtlocal.errors import RtlocalError, UsageError
from rtlocal.jsonl import read_objects
from rtlocal.paths import atomic_write_text

log = logging.getLogger(__name__)

FIRST_TOKEN = "first-token"
GENERATE = "generate"
MODES = (FIRST_TOKEN, GENERATE)
DEFAULT_MAX_TOKENS = 64  # enough for the judge, which reads only the opening of an answer
RECORDS_FILE = "records.jsonl"
CACHE_SCHEMA = 1

# CoCoNot splits: name -> (should the prompts be refused?, (hub config, hub split)).
COCONOT_SPLITS: dict[str, tuple[bool, tuple[str, str]]] = {
    "refusal_train": (True, ("original", "train")),
    "refusal_test": (True, ("original", "test")),
    "contrast_train": (False, ("pref", "train")),
    "contrast_test": (False, ("contrast", "test")),
}
SPLIT_GROUPS: dict[str, tuple[str, ...]] = {
    "test": ("refusal_test", "contrast_test"),
    "train": ("refusal_train", "contrast_train"),
}
DEFAULT_SPLIT = "test"
_HUB_ID = re.compile(r"^(hf:)?[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class EvalItem:
    """One labelled prompt."""

    key: str  # cache key: split, id and a hash of the prompt
    id: str
    split: str
    prompt: str
    should_refuse: bool
    category: str | None = None  # CoCoNot category (of the refusal, or of the contrast set), XSTest type
    subcategory: str | None = None


@dataclass
class Dataset:
    spec: str
    kind: str  # "coconot", "coconot-hub", "xstest", "behaviors", "jsonl"
    splits: list[str]
    items: list[EvalItem]

    def describe(self) -> dict[str, Any]:
        n_refuse = sum(i.should_refuse for i in self.items)
        return {
            "spec": self.spec,
            "kind": self.kind,
            "splits": self.splits,
            "n": len(self.items),
            "n_should_refuse": n_refuse,
            "n_should_answer": len(self.items) - n_refuse,
        }


# ------------------------------------------------------------------ loading


def load_data(
    spec: str | Path, *, split: str | None = None, limit: int | None = None, seed: int = 0, default_split: str = DEFAULT_SPLIT
) -> Dataset:
    """Labelled prompts from a CoCoNot folder or hub id, an XSTest or behaviours CSV, or a generic JSONL file.

    Args:
        spec: a folder, a .csv/.jsonl file, or a hub id (`allenai/coconot`, `hf:owner/name`).
        split: CoCoNot only: `test`, `train`, or split names joined by commas (default: `default_split`).
        limit: at most this many prompts per split, a fixed-seed sample (stable across runs).
    """
    spec = str(spec)
    path = Path(spec).expanduser()
    if limit is not None and limit < 1:
        raise RtlocalError(f"--limit must be at least 1, got {limit}")
    if path.is_dir():
        names = _split_names(split or default_split)
        missing = [n for n in names if not (path / f"{n}.jsonl").is_file()]
        if missing:
            raise RtlocalError(f"{spec}: no {missing[0]}.jsonl (a CoCoNot folder holds refusal_*/contrast_* JSONL files)")
        parts = [(n, _coconot_rows(path / f"{n}.jsonl", n)) for n in names]
        kind = "coconot"
    elif path.is_file():
        if split:
            raise RtlocalError(f"--split applies to CoCoNot data (a folder or a hub id); {spec} is a single file")
        name = path.stem
        if path.suffix.lower() == ".csv":
            kind, rows = _csv_rows(path)
            parts = [(name, rows)]
        elif path.suffix.lower() in {".jsonl", ".json"}:
            parts, kind = [(name, _jsonl_rows(path))], "jsonl"
        else:
            raise RtlocalError(f"{spec}: unknown data format (expected .jsonl, .csv or a CoCoNot folder)")
    elif _HUB_ID.match(spec):
        names = _split_names(split or default_split)
        parts, kind = [(n, _hub_rows(spec.removeprefix("hf:"), n)) for n in names], "coconot-hub"
    else:
        raise RtlocalError(f"{spec}: no such file or folder")
    items: list[EvalItem] = []
    for name, rows in parts:
        if not rows:
            raise RtlocalError(f"{spec}: split {name} has no prompts (empty file?)")
        if limit is not None and len(rows) > limit:
            keep = sorted(random.Random(f"{seed}:{name}").sample(range(len(rows)), limit))
            rows = [rows[i] for i in keep]
        items += rows
    return Dataset(spec, kind, [n for n, _ in parts], items)


def _split_names(split: str) -> list[str]:
    names: list[str] = []
    for part in split.split(","):
        part = part.strip()
        if part in SPLIT_GROUPS:
            names += SPLIT_GROUPS[part]
        elif part in COCONOT_SPLITS:
            names.append(part)
        else:
            known = ", ".join([*SPLIT_GROUPS, *COCONOT_SPLITS])
            raise RtlocalError(f"unknown split {part!r} (known: {known})")
    return list(dict.fromkeys(names))


def _item(split: str, row_id: Any, prompt: Any, should_refuse: bool, category: Any, subcategory: Any, where: str) -> EvalItem:
    if not isinstance(prompt, str) or not prompt.strip():
        raise RtlocalError(f"{where}: no prompt (expected a non-empty 'prompt' string)")
    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:10]
    return EvalItem(
        key=f"{split}:{row_id}:{digest}",
        id=str(row_id),
        split=split,
        prompt=prompt,
        should_refuse=should_refuse,
        category=_category(category),
        subcategory=str(subcategory) if subcategory not in (None, "") else None,
    )


def _category(value: Any) -> str | None:
    """A CoCoNot category from its name, alias or token; anything else is kept as written."""
    if value in (None, ""):
        return None
    from rtlocal.policy import resolve_category

    try:
        return resolve_category(str(value), COCONOT_CATEGORIES)
    except RtlocalError:
        return str(value)


def _coconot_rows(path: Path, split: str) -> list[EvalItem]:
    should_refuse = COCONOT_SPLITS[split][0]
    return [
        _item(split, obj.get("id", n), obj.get("prompt"), should_refuse, obj.get("category"), obj.get("subcategory"), f"{path}:{n}")
        for n, obj in read_objects(path)
    ]


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in {"true", "false"}:
        return value.strip().lower() == "true"
    raise RtlocalError(f"{where}: should_refuse must be true or false, got {value!r}")


def _jsonl_rows(path: Path) -> list[EvalItem]:
    """Generic JSONL (prompt, should_refuse); files named like CoCoNot splits take their label from the name."""
    coconot = path.stem in COCONOT_SPLITS
    items = []
    for n, obj in read_objects(path):
        where = f"{path}:{n}"
        if "should_refuse" in obj:
            label = _label(obj["should_refuse"], where)
        elif coconot:
            label = COCONOT_SPLITS[path.stem][0]
        else:
            raise RtlocalError(
                f"{where}: no 'should_refuse' label (generic JSONL needs prompt and should_refuse; "
                "CoCoNot files are named refusal_*.jsonl / contrast_*.jsonl)"
            )
        items.append(_item(path.stem, obj.get("id", n), obj.get("prompt"), label, obj.get("category"), obj.get("subcategory"), where))
    return items


def _csv_rows(path: Path) -> tuple[str, list[EvalItem]]:
    """A CSV by its header: harmful behaviours (a `Behavior` column, no label) or XSTest (prompt, label)."""
    try:
        f = open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise RtlocalError(f"{path}: {e.strerror}") from e
    with f:
        reader = csv.DictReader(f)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        if "behavior" in columns and "label" not in columns:
            return "behaviors", _behavior_rows(path, reader, columns)
        return "xstest", _xstest_rows(path, reader, columns)


def _behavior_rows(path: Path, reader: csv.DictReader, columns: dict[str, str]) -> list[EvalItem]:
    """HarmBench / AdvBench behaviours CSV: every `Behavior` should be refused, as a safety request.

    The subcategory is HarmBench's `SemanticCategory` (or a `Category` column); the id is `BehaviorID`.
    """
    kind_col = columns.get("semanticcategory") or columns.get("category")
    items = []
    for n, row in enumerate(reader, 2):
        row_id = (row.get(columns["behaviorid"]) or "").strip() if "behaviorid" in columns else ""
        items.append(_item(
            path.stem, row_id or n - 1, row.get(columns["behavior"]), True, Category.SAFETY,
            row.get(kind_col) if kind_col else None, f"{path}:{n}",
        ))
    return items


def _xstest_rows(path: Path, reader: csv.DictReader, columns: dict[str, str]) -> list[EvalItem]:
    """XSTest CSV: prompt, label (safe = should answer, unsafe = should refuse), type."""
    if not columns:
        return []
    for needed in ("prompt", "label"):
        if needed not in columns:
            raise RtlocalError(f"{path}: no '{needed}' column (XSTest CSV needs prompt, label safe/unsafe, type)")
    items = []
    for n, row in enumerate(reader, 2):
        label = (row.get(columns["label"]) or "").strip().lower()
        if label not in {"safe", "unsafe"}:
            raise RtlocalError(f"{path}:{n}: label must be safe or unsafe, got {label!r}")
        kind = row.get(columns["type"]) if "type" in columns else None
        row_id = row.get(columns["id"]) if "id" in columns else n - 1
        items.append(_item(path.stem, row_id, row.get(columns["prompt"]), label == "unsafe", kind, None, f"{path}:{n}"))
    return items


def _hub_rows(repo: str, split: str) -> list[EvalItem]:
    """A CoCoNot-layout dataset from the Hugging Face hub (configs original / contrast / pref)."""
    try:
        import datasets
    except ImportError:
        raise RtlocalError(f"loading {repo} from the hub needs the 'datasets' package: pip install datasets") from None
    config, hub_split = COCONOT_SPLITS[split][1]
    log.info("loading %s (%s, %s) from the hub", repo, config, hub_split)
    try:
        ds = datasets.load_dataset(repo, config, split=hub_split)
    except Exception as e:  # the datasets library raises many types (network, missing config, ...)
        raise RtlocalError(f"cannot load {repo} ({config}/{hub_split}) from the hub: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    should_refuse = COCONOT_SPLITS[split][0]
    return [
        _item(split, row.get("id", n), row.get("prompt"), should_refuse, row.get("category"), row.get("subcategory"), f"{repo}:{split}:{n}")
        for n, row in enumerate(ds)
    ]


# ------------------------------------------------------------------ per-prompt results


@dataclass
class Record:
    """What the model did on one prompt. `probs` is None for a model without refusal tokens."""

    key: str
    id: str
    split: str
    should_refuse: bool
    category: str | None
    probs: dict[str, float] | None = None
    p_respond: float | None = None
    seconds: float = 0.0
    # generate mode
    text: str | None = None
    token_category: str | None = None  # the refusal token chosen at the first answer position
    judge: str | None = None  # the fingerprint of the judge that gave the verdict
    judge_refused: bool | None = None
    judge_reason: str | None = None
    refused: bool | None = None  # token refusal or judged refusal
    stop_reason: str | None = None

    @property
    def refusal_score(self) -> float | None:
        return sum(self.probs.values()) if self.probs else None


def positives_for(category: str, categories: Sequence[str], gold: Sequence[str | None], should_refuse: np.ndarray) -> np.ndarray:
    """The should-refuse prompts a refusal category answers for: those of its gold category.

    A single-token model's one category (`refuse`) answers for all of them.
    """
    y = np.asarray(should_refuse, bool)
    if len(categories) == 1:
        return y
    return y & np.array([g == category for g in gold], bool)


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
        from rtlocal.engine import SamplingParams
        from rtlocal.policy import check_decision_temperature

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
    from rtlocal.engine import SamplingParams
    from rtlocal.generate import single_item

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
    from rtlocal.calibration import strictness_mapper
    from rtlocal.constants import STRICTNESS_PRESETS
    from rtlocal.policy import build_policy

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
    from rtlocal.eval_report import build_report, write_report
    from rtlocal.metrics import DEFAULT_BOOTSTRAP

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


__all__ = [
    "COCONOT_SPLITS",
    "DEFAULT_SPLIT",
    "Dataset",
    "EvalItem",
    "FIRST_TOKEN",
    "GENERATE",
    "MODES",
    "Record",
    "ResultCache",
    "RunOptions",
    "load_data",
    "model_info",
    "positives_for",
    "preset_policies",
    "run",
    "score_items",
]
