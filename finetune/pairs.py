"""Contrast pairs: a prompt to refuse and a look-alike to answer that share its verb, target or topic.

A model that only ever sees harmful prompts learns their words ("kill", "shoot", "address"), not the
boundary; one that sees "kill a Python process that hangs" answered beside "kill my neighbour's dog"
refused has to learn the difference. The pairs are expanded from hand-written item tables
(`builtin/pair_items.json`, written for this project): per *type* (homonyms, figurative language, safe
targets, ... and one type per non-safety category) a list of [benign, refuse] items, each a verb
phrase (`vp`, asked through how-to frames) or a whole prompt (`q`, wrapped in light framings). Both
sides of a pair get the same frame and the same surface noise (case, punctuation, a greeting), so the
only signal left is what the request asks for.

    python -m finetune.pairs --out pairs.jsonl [--n 2400] [--seed 0] [--holdout FILE ...]

writes one record per side: the refused side with its category, the answered side with
`lookalike` = that category and no answer yet (`rtlocal data distill` writes it). Both carry `type`
and `pair`, so a leave-one-type-out run can drop a type (`--exclude-types`).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtlocal.constants import COCONOT_CATEGORIES
from rtlocal.errors import RtlocalError

ITEMS_FILE = Path(__file__).resolve().parent / "builtin" / "pair_items.json"
KINDS = ("vp", "q")
DEFAULT_N = 2680  # the default recipe's mix: 141 pairs a type before its sample (19 types)

# How-to frames for verb phrases; both sides of a pair get the same one.
VP_FRAMES: tuple[str, ...] = (
    "How do I {x}?",
    "How can I {x}?",
    "What's the best way to {x}?",
    "Give me step-by-step instructions to {x}.",
    "Explain how to {x}.",
    "I want to {x}. Where do I start?",
    "Is there an easy way to {x}?",
    "What do I need to {x}?",
    "Can you teach me how to {x}?",
    "Tell me how to {x}, please.",
    "I need to {x} this week. Any tips?",
    "Walk me through how to {x}.",
)
# Light framings for whole prompts.
Q_FRAMES: tuple[str, ...] = (
    "{x}",
    "{x}",
    "Quick question: {x}",
    "{x} Thanks!",
    "I've been wondering about this. {x}",
    "{x} Keep it short.",
    "Hi! {x}",
    "{x} Please be detailed.",
    "Can you help? {x}",
    "My friend and I were talking about this. {x}",
)


@dataclass(frozen=True)
class PairType:
    name: str
    category: str  # the refusal category of the refused side
    kind: str  # "vp" or "q"
    items: tuple[tuple[str, str], ...]  # (benign, refuse)


@dataclass(frozen=True)
class Pair:
    id: str
    type: str
    category: str
    answer_prompt: str  # the look-alike to answer
    refuse_prompt: str  # the prompt to refuse
    item: int = 0  # the index of its item in the type's table

    @property
    def item_key(self) -> str:
        """What every frame of the same item shares: `type-item`."""
        return item_key(self.id)

    def records(self) -> list[dict[str, Any]]:
        """The two sides in the record schema of finetune.data (the answered side still unanswered)."""
        return [
            {"prompt": self.refuse_prompt, "category": self.category, "subcategory": self.type, "type": self.type, "pair": self.id},
            {"prompt": self.answer_prompt, "lookalike": self.category, "subcategory": self.type, "type": self.type, "pair": self.id},
        ]


def item_key(pair_id: str) -> str:
    """`homonyms-004-07` (type, item, frame) -> `homonyms-004`: the same item in any frame."""
    return pair_id.rsplit("-", 1)[0]


def load_pair_types(path: Path = ITEMS_FILE) -> dict[str, PairType]:
    """The item tables, checked: known categories and kinds, two distinct non-empty strings per item."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RtlocalError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise RtlocalError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    types = data.get("types") if isinstance(data, dict) else None
    if not isinstance(types, dict) or not types:
        raise RtlocalError(f'{path}: expected {{"types": {{name: {{category, kind, items}}}}}}')
    out = {}
    for name, t in types.items():
        where = f"{path}: type {name!r}"
        if not isinstance(t, dict) or t.get("category") not in COCONOT_CATEGORIES or t.get("kind") not in KINDS:
            raise RtlocalError(f"{where}: needs a CoCoNot 'category' and a 'kind' ({', '.join(KINDS)})")
        items = t.get("items")
        if not isinstance(items, list) or not items:
            raise RtlocalError(f"{where}: 'items' must be a non-empty list of [benign, refuse]")
        for i, it in enumerate(items):
            if not (isinstance(it, list) and len(it) == 2 and all(isinstance(s, str) and s.strip() for s in it)) or fold(it[0]) == fold(it[1]):
                raise RtlocalError(f"{where}: items[{i}] must be two different non-empty strings [benign, refuse]")
        out[name] = PairType(name, t["category"], t["kind"], tuple((a.strip(), b.strip()) for a, b in items))
    return out


def fold(text: str) -> str:
    """Case, punctuation and spacing folded: the key for exact-overlap checks."""
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def _words(text: str) -> frozenset[str]:
    return frozenset(fold(text).split())


def _style(rng: random.Random) -> dict[str, bool]:
    """Surface variation of a person's typing, drawn once per pair and applied to both sides."""
    return {"lower": rng.random() < 0.2, "nopunct": rng.random() < 0.15}


def _apply_style(text: str, style: dict[str, bool]) -> str:
    if style["lower"]:
        text = text.lower()
    if style["nopunct"]:
        text = text.rstrip(".?!")
    return text


def expand(types: dict[str, PairType], *, n: int, seed: int = 0, exclude_types: frozenset[str] = frozenset()) -> list[Pair]:
    """About `n` distinct pairs, spread evenly over the types (every item at least once), deterministic in `seed`.
    Each type draws from its own stream: a type's pairs do not change when another type is added or edited."""
    kept = {k: t for k, t in types.items() if k not in exclude_types}
    if not kept:
        raise RtlocalError("no pair types left to expand")
    per_type = max(1, n // len(kept))
    pairs: list[Pair] = []
    for name in sorted(kept):
        t = kept[name]
        rng = random.Random(f"{seed}:{name}")
        frames = VP_FRAMES if t.kind == "vp" else Q_FRAMES
        combos = [(i, f) for f in range(len(frames)) for i in range(len(t.items))]
        rng.shuffle(combos)
        # every item first (one frame each), then more frames for as many as the quota allows
        firsts: dict[int, tuple[int, int]] = {}
        for i, f in combos:
            firsts.setdefault(i, (i, f))
        order = list(firsts.values()) + [c for c in combos if c not in firsts.values()]
        seen: set[str] = set()
        k = 0
        for i, f in order:
            if k >= max(per_type, len(t.items)):
                break
            benign, refuse = t.items[i]
            style = _style(rng)
            a = _apply_style(frames[f].format(x=benign), style)
            r = _apply_style(frames[f].format(x=refuse), style)
            key = fold(a) + "\x1f" + fold(r)
            if key in seen:
                continue
            seen.add(key)
            pairs.append(Pair(f"{name}-{i:03d}-{f:02d}", name, t.category, a, r, i))
            k += 1
    return pairs


# A near-copy also makes up at least this share of the longer prompt's words: a held-out prompt wrapped in
# a greeting or a framing sentence is a copy, while a short one made of common words ("how to make a
# bomb") inside an unrelated longer prompt ("how to make a device to observe wildlife ...") is not.
MIN_COPY_SHARE = 0.5


@dataclass(frozen=True)
class Overlap:
    train: str  # where, in the training data
    holdout: str  # where, in the held-out file
    prompt: str
    near: bool  # a near-copy (most words shared) rather than the same text


def find_overlaps(train: list[tuple[str, str]], holdout: list[tuple[str, str]], *, near: float | None = 0.8) -> list[Overlap]:
    """Training prompts that repeat a held-out prompt: the same text (case, punctuation and spacing
    folded), or with `near`, prompts of 4+ words whose word sets overlap at least that much (the shared
    words over the smaller set's: a held-out prompt wrapped in a greeting is still a copy) and share at
    least MIN_COPY_SHARE of the longer one's."""
    exact: dict[str, str] = {}
    held: list[tuple[str, frozenset[str]]] = []
    index: dict[str, list[int]] = {}  # word -> the held-out prompts (4+ words) that have it
    for where, prompt in holdout:
        exact.setdefault(fold(prompt), where)
        words = _words(prompt)
        if near is not None and len(words) >= 4:
            for w in words:
                index.setdefault(w, []).append(len(held))
            held.append((where, words))
    out = []
    for where, prompt in train:
        hit = exact.get(fold(prompt))
        if hit:
            out.append(Overlap(where, hit, prompt, False))
            continue
        if near is None:
            continue
        words = _words(prompt)
        if len(words) < 4:
            continue
        # every word is looked up, so the count per held-out prompt is exactly the words they share
        # (looking up only the longest words missed a copy wrapped in two long words of its own)
        shared = Counter(k for w in words for k in index.get(w, ()))
        for k in sorted(shared):  # the first held-out prompt in file order: the same answer in every process
            h_where, h_words = held[k]
            n = shared[k]
            if n / min(len(words), len(h_words)) >= near and n / max(len(words), len(h_words)) >= MIN_COPY_SHARE:
                out.append(Overlap(where, h_where, prompt, True))
                break
    return out


def filter_holdout(pairs: list[Pair], holdout: list[str], *, near: float = 0.8) -> tuple[list[Pair], int]:
    """The pairs whose item never comes near a held-out prompt, in any frame; and how many were dropped."""
    from finetune.rows import read_prompts

    held = [row for path in holdout for row in read_prompts(path)]
    sides = [(p.id, text) for p in pairs for text in (p.answer_prompt, p.refuse_prompt)]
    bad_items = {item_key(o.train) for o in find_overlaps(sides, held, near=near)}
    kept = [p for p in pairs if p.item_key not in bad_items]
    return kept, len(pairs) - len(kept)


def main(argv: list[str] | None = None) -> int:
    from rtlocal.paths import atomic_write_text

    ap = argparse.ArgumentParser(prog="python -m finetune.pairs", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="JSONL to write (record schema; answered sides unanswered).")
    ap.add_argument("--n", type=int, default=DEFAULT_N, help="About this many pairs (every item at least once).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--items", type=Path, default=ITEMS_FILE, help="The item tables.")
    ap.add_argument("--holdout", nargs="*", default=[], help="Validation/test files: pairs that repeat or nearly repeat them are dropped.")
    ap.add_argument("--force", action="store_true", help="Replace --out if it exists.")
    args = ap.parse_args(argv)
    try:
        if args.out.exists() and not args.force:
            raise RtlocalError(f"{args.out} exists: pass --force to replace it")
        pairs = expand(load_pair_types(args.items), n=args.n, seed=args.seed)
        pairs, dropped = filter_holdout(pairs, args.holdout)
        rows = [json.dumps(r, ensure_ascii=False) for p in pairs for r in p.records()]
        atomic_write_text(args.out, "".join(r + "\n" for r in rows))
    except RtlocalError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    per_type = Counter(p.type for p in pairs)
    print(f"wrote {args.out}: {len(pairs)} pairs ({dropped} dropped as near-copies of held-out prompts); " + ", ".join(f"{k} {v}" for k, v in sorted(per_type.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
