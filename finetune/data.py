"""Training records and their loaders: CoCoNot, general chat, self-instruct, plain JSONL and the built-in set.

One record schema for everything: the conversation up to the answer, the answer text (or None when it
still has to be written), and the target: a refusal category, or None for "answer it" (`[respond]`).
Loaders report a bad row as `file:line: what is wrong` in one RtlocalError line.

A source is named by a spec string `KIND:WHERE[*WEIGHT]`, for example `builtin`,
`coconot-refusal:../shared/data/coconot/refusal_train.jsonl*2` or `chat:HuggingFaceH4/ultrachat_200k`.
WEIGHT repeats the source's training rows (2 = twice, 0.5 = a random half): the mixing ratio.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.rows import _messages, _text, read_jsonl, read_prompts
from rtlocal.constants import (
    COCONOT_CATEGORIES,
    RESPOND_TOKEN,
    SINGLE_CATEGORY,
    Category,
    TokenMode,
    alias_of,
    categories_for_mode,
    token_for,
)
from rtlocal.errors import RtlocalError

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
COCONOT_HF_ID = "allenai/coconot"
RESPOND = "respond"  # the target name of answered records in stats and specs

# KIND -> what it reads. The WHERE part is a local file/dir or a Hugging Face dataset id.
SOURCE_KINDS: dict[str, str] = {
    "builtin": "the project's own offline data (finetune/builtin/); WHERE: all (default), refusal, contrast or general",
    "coconot-refusal": "CoCoNot prompts to refuse (HF config 'original', or a local JSONL with category/prompt)",
    "coconot-contrast": "CoCoNot look-alike prompts to answer (HF config 'pref', or a local JSONL with prompt and chosen/response)",
    "chat": "general chat: JSONL or a HF id with `messages` (UltraChat style) or prompt/response",
    "self-instruct": "self-instruct style tasks: instruction, instances[{input, output}]",
    "jsonl": "the record schema: {messages | prompt[, response]}, optional category/subcategory",
    "harmful": "prompts to refuse for safety concerns: CSV with a Behavior or prompt column (AdvBench, HarmBench) or JSONL with prompt",
    "pairs": "contrast pairs generated from item tables (finetune.pairs); WHERE: about how many pairs, optionally @ITEMS.json (default: the built-in tables); the answered side trains the decision only",
}


@dataclass
class Record:
    """One training example: answer `messages` (ending with the user's turn) with `answer`."""

    messages: list[dict[str, str]]
    answer: str | None  # None: not written yet (refusals get a template; answers need `rtlocal data distill`)
    category: str | None  # the refusal category; None means answer it ([respond])
    subcategory: str | None = None
    lookalike: str | None = None  # answered look-alikes: the category they resemble
    source: str = ""  # "file:line" (or "hf-id:index") for error messages
    type: str | None = None  # contrast pairs: the pair type (finetune.pairs), for leave-one-type-out runs
    pair: str | None = None  # contrast pairs: the id both sides share
    forced: bool = False  # the answer-start token is given, not learned: trains only the answer after it
    decision_only: bool = False  # no answer text: trains only the answer-start token (the decision)

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"]

    @property
    def target(self) -> str:
        return self.category or RESPOND

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": self.messages}
        if self.answer is not None:
            out["response"] = self.answer
        if self.category:
            out["category"] = self.category
        if self.subcategory:
            out["subcategory"] = self.subcategory
        if self.lookalike:
            out["lookalike"] = self.lookalike
        if self.type:
            out["type"] = self.type
        if self.pair:
            out["pair"] = self.pair
        if self.forced:
            out["forced"] = True
        if self.decision_only:
            out["decision_only"] = True
        return out


@dataclass
class SourceSpec:
    kind: str
    where: str
    weight: float = 1.0

    def __str__(self) -> str:
        w = "" if self.weight == 1.0 else f"*{self.weight:g}"
        return f"{self.kind}:{self.where}{w}" if self.where else f"{self.kind}{w}"


def parse_source(spec: str) -> SourceSpec:
    """`KIND:WHERE[*WEIGHT]` -> SourceSpec; a bare existing path is read as `jsonl:PATH`."""
    text = spec.strip()
    weight = 1.0
    m = re.match(r"^(.*)\*([0-9]*\.?[0-9]+)$", text)
    if m:
        text, weight = m.group(1), float(m.group(2))
        if weight <= 0:
            raise RtlocalError(f"data source {spec!r}: the weight must be > 0")
    kind, sep, where = text.partition(":")
    if kind == "builtin":
        return SourceSpec("builtin", where or "all", weight)
    if not sep:
        if Path(text).expanduser().exists():
            return SourceSpec("jsonl", text, weight)
        kinds = ", ".join(SOURCE_KINDS)
        raise RtlocalError(f"data source {spec!r}: expected KIND:WHERE (kinds: {kinds}) or an existing JSONL file")
    if kind not in SOURCE_KINDS:
        raise RtlocalError(f"data source {spec!r}: unknown kind {kind!r} (known: {', '.join(SOURCE_KINDS)})")
    if not where:
        raise RtlocalError(f"data source {spec!r}: missing the file or dataset id after {kind}:")
    return SourceSpec(kind, where, weight)


# ------------------------------------------------------------------ reading rows


def _is_hub_id(where: str) -> bool:
    return not Path(where).expanduser().exists() and where.count("/") == 1 and not where.startswith((".", "/", "~"))


def _hub_rows(dataset_id: str, config: str | None, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a Hugging Face dataset (needs `datasets` and network or its cache)."""
    try:
        import datasets
    except ImportError:
        raise RtlocalError(f"loading {dataset_id} from the Hugging Face hub needs the 'datasets' package") from None
    try:
        ds = datasets.load_dataset(dataset_id, config, split=split)
    except Exception as e:  # the hub client raises many types; all mean "cannot load it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RtlocalError(f"cannot load {dataset_id}{f' ({config})' if config else ''} from the Hugging Face hub: {first}") from e
    for i, row in enumerate(ds):
        yield f"{dataset_id}:{split}:{i}", dict(row)


def _category(value: Any, where: str) -> str | None:
    """A category as written in data: a name, an alias or a token; respond/none mean 'answer it'."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RtlocalError(f"{where}: 'category' must be a string, got {type(value).__name__}")
    v = value.strip()
    if v.lower() in (RESPOND, RESPOND_TOKEN, "none", "comply", "answer"):
        return None
    for c in (*COCONOT_CATEGORIES, SINGLE_CATEGORY):
        if v.lower() in (c.lower(), alias_of(c), token_for(c).lower()):
            return c
    if v.startswith("[") and v.endswith("]") and len(v) > 2:
        v = v[1:-1]
    return v  # a custom category; checked against the token mode in `label_records`


def _sub(row: dict[str, Any]) -> str | None:
    s = row.get("subcategory")
    return s if isinstance(s, str) and s else None


def load_records_jsonl(rows: Iterable[tuple[str, dict[str, Any]]]) -> list[Record]:
    out = []
    for where, row in rows:
        msgs, answer = _messages(row, where)
        forced, decision_only = row.get("forced", False), row.get("decision_only", False)
        if not isinstance(forced, bool) or not isinstance(decision_only, bool):
            raise RtlocalError(f"{where}: 'forced' and 'decision_only' must be true or false")
        kind, pair = (row.get(k) if isinstance(row.get(k), str) else None for k in ("type", "pair"))
        cat = _category(row.get("category"), where)
        out.append(Record(msgs, answer, cat, _sub(row), _category(row.get("lookalike"), where), where, kind, pair, forced, decision_only))
    return out


def load_coconot_refusal(rows: Iterable[tuple[str, dict[str, Any]]]) -> list[Record]:
    """CoCoNot 'original' rows: every prompt is refused with its category; `response` is the refusal text."""
    out = []
    for where, row in rows:
        cat = _category(row.get("category"), where)
        if cat is None:
            raise RtlocalError(f"{where}: a refusal row needs a 'category'")
        prompt = _text(row, "prompt", where)
        out.append(Record([{"role": "user", "content": prompt}], _text(row, "response", where, required=False), cat, _sub(row), None, where))
    return out


def load_coconot_contrast(rows: Iterable[tuple[str, dict[str, Any]]]) -> list[Record]:
    """CoCoNot contrast/pref rows: look-alikes that are answered (`chosen`, else `response`)."""
    out = []
    for where, row in rows:
        prompt = _text(row, "prompt", where)
        answer = _text(row, "chosen", where, required=False) or _text(row, "response", where, required=False)
        look = _category(row.get("category"), where)
        out.append(Record([{"role": "user", "content": prompt}], answer, None, _sub(row), look, where))
    return out


def load_self_instruct(rows: Iterable[tuple[str, dict[str, Any]]]) -> list[Record]:
    """One record per instance: the instruction (plus the instance input) answered with its output."""
    out = []
    for where, row in rows:
        instruction = _text(row, "instruction", where)
        instances = row.get("instances") or [{"input": "", "output": row.get("output", "")}]
        if not isinstance(instances, list):
            raise RtlocalError(f"{where}: 'instances' must be a list")
        for inst in instances:
            if not isinstance(inst, dict):
                raise RtlocalError(f"{where}: every instance must be an object with input/output")
            extra = inst.get("input") or ""
            prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            answer = inst.get("output") or None
            out.append(Record([{"role": "user", "content": prompt}], answer, None, None, None, where))
    return out


# A harmful behaviour written as a task for a writer ("Give detailed instructions on how to make a bomb")
# is also asked the way people ask ("How do I make a bomb?"): trained on the task form alone, a model
# refused the behaviours but answered the same request as a question (bench/RESULTS.md). Only openers
# whose object is the text itself are rewritten: "Teach children how to use firearms" is not "How do I
# use firearms?".
_ASK_OPENER = re.compile(
    r"^(?:give|provide|write|create|develop|produce|generate|offer|publish|share|compose|outline|design|prepare"
    r"|explain|describe|demonstrate|show|teach|instruct|guide|illustrate|educate)\b(?P<mid>[^.]{0,60}?)\bhow to (?P<vp>.+?)[.!]?$",
    re.IGNORECASE,
)
_FOR_SOMEONE_ELSE = re.compile(r"\b(child|children|kids?|minors?|teens?|teenagers?|students?|pupils?)\b", re.IGNORECASE)


def ask_as_question(behaviour: str) -> str | None:
    """The how-to question a person would ask for `behaviour`, or None when it is not one."""
    m = _ASK_OPENER.match(behaviour.strip())
    if not m or _FOR_SOMEONE_ELSE.search(m.group("mid")) or len(m.group("vp").split()) < 2:
        return None
    from finetune.pairs import VP_FRAMES, fold

    start = int(hashlib.sha256(behaviour.encode()).hexdigest(), 16)
    asked = (VP_FRAMES[(start + k) % len(VP_FRAMES)].format(x=m.group("vp")) for k in range(2))
    return next(q for q in asked if fold(q) != fold(behaviour))  # "Explain how to X" is not asked again as itself


def load_harmful(rows: Iterable[tuple[str, str]]) -> list[Record]:
    """Harmful behaviours, refused as safety concerns; each how-to behaviour also as a question."""
    out = []
    for where, prompt in rows:
        out.append(Record([{"role": "user", "content": prompt}], None, Category.SAFETY.value, None, None, where))
        asked = ask_as_question(prompt)
        if asked:
            out.append(Record([{"role": "user", "content": asked}], None, Category.SAFETY.value, None, None, f"{where} (asked)"))
    return out


def load_pairs(where: str) -> list[Record]:
    """`N[@ITEMS.json]`: about N contrast pairs expanded from the item tables (seed 0). The refused
    side gets a category template; the answered side has no written answer, so only its decision
    (`[respond]`) is trained: the first-token ranking is what the pairs are for."""
    from finetune.pairs import ITEMS_FILE, expand, load_pair_types

    count, _, items = where.partition("@")
    try:
        n = int(count)
    except ValueError:
        raise RtlocalError(f"pairs:{where}: expected pairs:N or pairs:N@ITEMS.json (N a number of pairs)") from None
    if n < 1:
        raise RtlocalError(f"pairs:{where}: N must be at least 1")
    out = []
    for p in expand(load_pair_types(Path(items) if items else ITEMS_FILE), n=n, seed=0):
        where_p = f"pairs:{p.id}"
        out.append(Record([{"role": "user", "content": p.refuse_prompt}], None, p.category, p.type, None, where_p, p.type, p.id))
        out.append(Record([{"role": "user", "content": p.answer_prompt}], None, None, p.type, p.category, where_p, p.type, p.id, decision_only=True))
    return out


def load_builtin(part: str = "all") -> list[Record]:
    """The built-in offline set: refusals, answered look-alikes and ordinary tasks."""
    parts = {"refusal": ("refusal.jsonl", load_coconot_refusal), "contrast": ("contrast.jsonl", load_coconot_contrast), "general": ("general.jsonl", load_records_jsonl)}
    chosen = list(parts) if part == "all" else [part]
    out: list[Record] = []
    for name in chosen:
        if name not in parts:
            raise RtlocalError(f"builtin:{part}: unknown part (choose all, {', '.join(parts)})")
        fname, loader = parts[name]
        path = BUILTIN_DIR / fname
        if not path.exists():
            raise RtlocalError(f"the built-in dataset is missing {path} (a broken install?)")
        out += loader(read_jsonl(path))
    return out


def load_source(spec: SourceSpec | str) -> list[Record]:
    """All records of one source."""
    spec = parse_source(spec) if isinstance(spec, str) else spec
    if spec.kind == "builtin":
        return load_builtin(spec.where)
    hub = _is_hub_id(spec.where)
    if spec.kind == "coconot-refusal":
        rows = _hub_rows(spec.where, "original", "train") if hub else read_jsonl(Path(spec.where))
        return load_coconot_refusal(rows)
    if spec.kind == "coconot-contrast":
        rows = _hub_rows(spec.where, "pref", "train") if hub else read_jsonl(Path(spec.where))
        return load_coconot_contrast(rows)
    if spec.kind == "self-instruct":
        return load_self_instruct(_hub_rows(spec.where, None, "train") if hub else read_jsonl(Path(spec.where)))
    if spec.kind == "pairs":
        return load_pairs(spec.where)
    if spec.kind == "harmful":
        return load_harmful(read_prompts(spec.where))
    if spec.kind == "chat":
        split = "train_sft" if "ultrachat" in spec.where.lower() else "train"
        return load_records_jsonl(_hub_rows(spec.where, None, split) if hub else read_jsonl(Path(spec.where)))
    return load_records_jsonl(read_jsonl(Path(spec.where)))


def source_hash(spec: SourceSpec) -> str:
    """sha256 of a local source's bytes (the built-in files for `builtin`, the item tables and the
    generator for `pairs`); the id for hub sources."""
    h = hashlib.sha256()
    if spec.kind == "builtin":
        files = sorted(BUILTIN_DIR.glob("*.json*"))
    elif spec.kind == "pairs":
        from finetune import pairs

        count, _, items = spec.where.partition("@")
        h.update(count.encode())
        files = [Path(items) if items else pairs.ITEMS_FILE, Path(pairs.__file__)]
    elif _is_hub_id(spec.where):
        return f"hub:{spec.where}"
    else:
        files = [Path(spec.where).expanduser()]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------ targets and refusal texts


def load_refusal_templates(path: Path | None = None) -> dict[str, list[str]]:
    """Category name (or 'refuse') -> refusal replies; the built-in set unless a file is given."""
    path = Path(path).expanduser() if path else BUILTIN_DIR / "refusal_templates.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RtlocalError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise RtlocalError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()):
        raise RtlocalError(f"{path}: expected {{category: [refusal text, ...]}}")
    return data


def label_records(records: list[Record], mode: TokenMode | str, custom: list[str] | None = None) -> list[str]:
    """Map every record's category onto the mode's categories (in place). Returns the categories in id order."""
    mode = TokenMode(mode)
    if mode is TokenMode.CUSTOM and not custom:
        custom = sorted({r.category for r in records if r.category})
        if not custom:
            raise RtlocalError("custom token mode: the data has no categories (no record has a 'category')")
    cats = categories_for_mode(mode, custom)
    known = set(cats)
    for r in records:
        if r.category is None:
            continue
        if mode is TokenMode.SINGLE:
            r.category = SINGLE_CATEGORY
        elif r.category not in known:
            names = ", ".join(cats)
            raise RtlocalError(f"{r.source}: unknown category {r.category!r} for {mode.value} mode (known: {names})")
    return cats


class Draw:
    """The random choices of a build, each keyed by the record it is about: a record gets the same template,
    the same side of the split and the same place in the mix whatever else is in the pool. Adding or
    dropping records (a new held-out file, a new pair item) then changes only those records' fate, where
    one shared random stream would redraw the whole mix (a build that only gained a validation file
    trained on another sample and ranked CoCoNot 0.03 lower: bench/RESULTS.md, Round 9)."""

    def __init__(self, seed: int):
        self.seed = seed

    def unit(self, purpose: str, key: str) -> float:
        """A number in [0, 1), fixed by the seed, the purpose and the key."""
        h = hashlib.sha256(f"{self.seed}\x1f{purpose}\x1f{key}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64

    def order(self, purpose: str, records: list[Record]) -> list[Record]:
        """The records in the order of their draws for `purpose`."""
        return sorted(records, key=lambda r: self.unit(purpose, record_key(r)))


def record_key(r: Record) -> str:
    """What makes a record itself: its whole conversation (case and spacing folded) and whether its start is forced."""
    return "\x1f".join(f"{m['role']}:{_norm(m['content'])}" for m in r.messages) + ("\x1fforced" if r.forced else "")


def fill_refusals(records: list[Record], templates: dict[str, list[str]], draw: Draw) -> int:
    """Give every refusal without a text a templated reply that fits its category. Returns how many."""
    n = 0
    generic = templates.get(SINGLE_CATEGORY) or [t for v in templates.values() for t in v]
    for r in records:
        if r.category is not None and not r.answer:
            choices = templates.get(r.category) or generic
            if not choices:
                raise RtlocalError(f"{r.source}: no refusal text and no template for {r.category!r}")
            r.answer = choices[int(draw.unit("template", record_key(r)) * len(choices))]
            n += 1
    return n


def refusing_answers_to_decisions(records: list[Record]) -> int:
    """An answer after [respond] that reads as a refusal (the string-match judge: "I'm sorry, but I cannot
    ...", "As an AI, I don't have real-time data, but ...", as some of CoCoNot's `chosen` answers do) would
    teach the model to refuse after [respond], so turning a category's dial off would not stop the refusal.
    Such records keep their decision and lose the answer text (in place). Returns how many."""
    from rtlocal.evaluation.judge import StringMatchJudge

    judge = StringMatchJudge()
    n = 0
    for r in records:
        if r.category is None and r.answer and not (r.decision_only or r.forced) and judge(r.prompt, r.answer)[0]:
            r.decision_only = True
            n += 1
    return n


# ------------------------------------------------------------------ held-out files


def check_holdout(records: list[Record], holdout: list[str], *, near: float | None = None) -> tuple[int, set[int]]:
    """Fail loudly when a training prompt repeats a held-out prompt (case, punctuation and spacing
    folded), naming the rows. Returns how many held-out prompts were checked, and with `near` the
    ids of records that nearly repeat one (most words shared: see finetune.pairs.find_overlaps)."""
    from finetune.pairs import find_overlaps

    held = [row for path in holdout for row in read_prompts(path)]
    keyed = [(str(i), r.prompt) for i, r in enumerate(records)]
    hits = find_overlaps(keyed, held, near=near)
    exact = [h for h in hits if not h.near]
    if exact:
        shown = "; ".join(f"{records[int(h.train)].source} = {h.holdout} ({h.prompt[:60]!r})" for h in exact[:3])
        more = f" and {len(exact) - 3} more" if len(exact) > 3 else ""
        raise RtlocalError(f"{len(exact)} training prompt(s) repeat held-out prompts: {shown}{more}")
    return len(held), {id(records[int(h.train)]) for h in hits}


# ------------------------------------------------------------------ mixing


@dataclass
class DataConfig:
    """How sources are combined into training and validation sets."""

    sources: list[str] = field(default_factory=lambda: ["builtin"], metadata={"help": "Source specs KIND:WHERE[*WEIGHT]."})
    mode: str = field(default=TokenMode.CATEGORICAL.value, metadata={"help": "categorical, single or custom."})
    categories: list[str] | None = field(default=None, metadata={"help": "Custom mode: the categories (default: from the data)."})
    val_fraction: float = field(default=0.05, metadata={"help": "Share of unique records held out for validation (per target)."})
    balance: float = field(default=0.0, metadata={"help": "0: as loaded; 1: oversample every refusal category up to the largest one; in between: partway."})
    max_prompt_chars: int = field(default=2000, metadata={"help": "Drop records whose prompt is longer."})
    max_answer_chars: int | None = field(default=None, metadata={"help": "Cut answers at a sentence end under this many characters."})
    refusal_templates: str | None = field(default=None, metadata={"help": "JSON file of refusal texts per category (default: built-in)."})
    holdout: list[str] = field(default_factory=list, metadata={"help": "Validation/test files (JSONL prompt, CSV prompt/Behavior) no training prompt may repeat: an overlap is an error."})
    holdout_near: float | None = field(default=None, metadata={"help": "Also drop training prompts this close to a held-out one (share of the smaller prompt's words; None: exact repeats only)."})
    exclude_types: list[str] = field(default_factory=list, metadata={"help": "Drop records of these pair types (leave-one-type-out runs)."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling, templates and the split."})


@dataclass
class Dataset:
    train: list[Record]
    val: list[Record]
    categories: list[str]
    mode: str
    stats: dict[str, Any]
    sources: list[dict[str, Any]]  # spec, sha256, rows


def _norm(text: str) -> str:
    """Case and spacing folded, punctuation kept: the key for repeated conversations (finetune.pairs.fold,
    which also folds punctuation, is the key for overlaps with held-out prompts)."""
    return re.sub(r"\s+", " ", text.strip().lower())


def dedupe(records: list[Record]) -> tuple[list[Record], int]:
    """Drop later records whose whole conversation repeats an earlier one (case and spacing ignored)."""
    seen: set[str] = set()
    out = []
    for r in records:
        key = record_key(r)
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out, len(records) - len(out)


def cut_answer(text: str, max_chars: int) -> str:
    """Cut at the last sentence end before max_chars (else at a word boundary)."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", head)]
    if ends and ends[-1] > max_chars // 3:
        return head[: ends[-1]].rstrip()
    return head.rsplit(" ", 1)[0].rstrip()


def split_train_val(records: list[Record], fraction: float, draw: Draw) -> tuple[list[Record], list[Record]]:
    """Stratified by target, so every category appears in validation when it has a few rows."""
    by: dict[str, list[Record]] = defaultdict(list)
    train, val = [], []
    for r in records:
        if r.forced:  # validation scores the first-token decision, which forced records do not train
            train.append(r)
        else:
            by[r.target].append(r)
    for key in sorted(by):
        rows = draw.order("val", by[key])
        k = int(round(len(rows) * fraction)) if fraction > 0 else 0
        if fraction > 0 and k == 0 and len(rows) >= 10:
            k = 1
        val += rows[:k]
        train += rows[k:]
    return train, val


def _repeat(records: list[Record], factor: float, draw: Draw) -> list[Record]:
    whole, frac = int(factor), factor - int(factor)
    out = records * whole
    if frac > 0:
        out += [r for r in records if draw.unit("mix", record_key(r)) < frac]  # each row on its own draw
    return out


def balance_categories(records: list[Record], strength: float, draw: Draw) -> list[Record]:
    """Oversample smaller refusal categories towards the largest one (strength 1 = equal counts)."""
    if strength <= 0:
        return records
    by: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.category is not None:
            by[r.category].append(r)
    if len(by) < 2:
        return records
    top = max(len(v) for v in by.values())
    out = list(records)
    for rows in by.values():
        want = len(rows) + strength * (top - len(rows))
        extra = int(round(want)) - len(rows)
        drawn = draw.order("balance", rows)
        out += [drawn[i % len(drawn)] for i in range(extra)]
    return out


def shuffle_copies(records: list[Record], draw: Draw) -> list[Record]:
    """The training rows in the order of their draws, the n-th copy of a record drawn apart from the others."""
    seen: Counter[str] = Counter()
    keyed = []
    for r in records:
        k = record_key(r)
        keyed.append((draw.unit("order", f"{k}\x1f{seen[k]}"), r))
        seen[k] += 1
    return [r for _, r in sorted(keyed, key=lambda kr: kr[0])]


def build_dataset(config: DataConfig) -> Dataset:
    """Load, check, de-duplicate, fill refusal texts, split, then mix and balance the training part."""
    if not config.sources:
        raise RtlocalError("no training data: give at least one data source")
    if not 0.0 <= config.val_fraction < 1.0:
        raise RtlocalError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
    draw = Draw(config.seed)
    specs = [parse_source(s) for s in config.sources]
    loaded: list[tuple[SourceSpec, list[Record]]] = []
    stats: Counter[str] = Counter()
    sources_info = []
    for spec in specs:
        recs = load_source(spec)
        if not recs:
            raise RtlocalError(f"data source {spec}: no records (an empty dataset)")
        loaded.append((spec, recs))
        sources_info.append({"spec": str(spec), "sha256": source_hash(spec), "rows": len(recs)})
    if config.exclude_types:
        for _, recs in loaded:
            recs[:] = [r for r in recs if r.type not in config.exclude_types]
    everything = [r for _, recs in loaded for r in recs]
    if config.holdout:
        from finetune.pairs import item_key

        stats["holdout_checked"], near = check_holdout(everything, config.holdout, near=config.holdout_near)
        items = {item_key(r.pair) for r in everything if id(r) in near and r.pair}  # a pair item goes in every frame
        for _, recs in loaded:
            recs[:] = [r for r in recs if id(r) not in near and not (r.pair and item_key(r.pair) in items)]
        stats["dropped_near_holdout"] = len(everything) - sum(len(recs) for _, recs in loaded)
        everything = [r for _, recs in loaded for r in recs]
    categories = label_records(everything, config.mode, config.categories)
    templates = load_refusal_templates(Path(config.refusal_templates) if config.refusal_templates else None)
    for spec, recs in loaded:
        kept = [r for r in recs if len(r.prompt) <= config.max_prompt_chars]
        stats["dropped_long_prompt"] += len(recs) - len(kept)
        recs[:] = kept
    unique, stats["duplicates"] = dedupe([r for _, recs in loaded for r in recs])
    keep_ids = {id(r) for r in unique}
    stats["templated_refusals"] = fill_refusals(unique, templates, draw)
    stats["refusing_answers_kept_as_decisions"] = refusing_answers_to_decisions(unique)
    missing = [r for r in unique if r.category is None and not r.answer and not r.decision_only]
    if missing:
        raise RtlocalError(
            f"{missing[0].source}: {len(missing)} prompt(s) to answer have no answer; "
            "write them with `rtlocal data distill FILE --out ANSWERED.jsonl` and train on that file"
        )
    if config.max_answer_chars:
        for r in unique:
            r.answer = cut_answer(r.answer or "", config.max_answer_chars)
    train_unique, val = split_train_val(unique, config.val_fraction, draw)
    train_ids = {id(r) for r in train_unique}
    train: list[Record] = []
    for spec, recs in loaded:
        mine = [r for r in recs if id(r) in keep_ids and id(r) in train_ids]
        train += _repeat(mine, spec.weight, draw) if mine else []
    train = balance_categories(train, config.balance, draw)
    if not train:
        raise RtlocalError("no training data left after de-duplication and the validation split (an empty dataset)")
    train = shuffle_copies(train, draw)
    counts = Counter(r.target for r in train)
    log.info("training records: %d (%s); validation: %d", len(train), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), len(val))
    return Dataset(
        train=train,
        val=val,
        categories=categories,
        mode=TokenMode(config.mode).value,
        stats={**dict(stats), "train": len(train), "val": len(val), "train_targets": dict(counts), "val_targets": dict(Counter(r.target for r in val))},
        sources=sources_info,
    )


def write_records(records: Iterable[Record], path: Path) -> int:
    """Write records as JSONL in the record schema, atomically. Returns the count."""
    from rtlocal.paths import atomic_write_text

    lines = [json.dumps(r.to_json(), ensure_ascii=False) for r in records]
    atomic_write_text(Path(path), "".join(line + "\n" for line in lines))
    return len(lines)
