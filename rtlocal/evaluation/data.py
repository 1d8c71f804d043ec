"""The labelled prompts an evaluation scores and the per-prompt record it keeps.

Data: CoCoNot (a local folder of refusal_*/contrast_* JSONL files, or the `allenai/coconot` hub
dataset), XSTest-format CSV (prompt, label safe/unsafe, type), harmful-behaviour CSV (HarmBench /
AdvBench: Behavior, all to be refused) and generic JSONL (prompt, should_refuse, optional category).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rtlocal.constants import COCONOT_CATEGORIES, Category
from rtlocal.errors import RtlocalError
from rtlocal.jsonl import read_objects

log = logging.getLogger(__name__)

FIRST_TOKEN = "first-token"
GENERATE = "generate"
MODES = (FIRST_TOKEN, GENERATE)

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
    from rtlocal.runtime.policy import resolve_category

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
