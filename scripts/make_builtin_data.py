"""Regenerate the generated part of rtlocal's built-in training data (run once; the output is committed).

    .venv/bin/python scripts/make_builtin_data.py [--n 2400] [--work DIR] [--force]

1. `finetune/builtin/pairs.jsonl`: contrast pairs expanded from `finetune/builtin/pair_items.json`
   (`finetune.pairs`), dropping pairs that repeat or nearly repeat a held-out prompt; the answered
   sides are answered by the base model itself (self-distillation, greedy, 24 tokens: training keeps
   the first 16), and a side whose answer the judge calls a refusal is left out.
2. `finetune/builtin/forced.jsonl`: prompts of the four non-safety refusal categories (built-in,
   CoCoNot refusal_train, the pairs' refused sides) with a best-effort answer by the base model, to be
   trained after a *forced* `[respond]` (the start token is given, not learned): when a user turns a
   category off, the answer that follows reads as an answer, not as a refusal. Answers the judge calls
   refusals are left out.

Distillation is resumable: answers are cached in --work by prompt.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.data import load_builtin, load_source, read_jsonl  # noqa: E402
from finetune.distill import distill  # noqa: E402
from finetune.pairs import expand, filter_holdout, load_pair_types  # noqa: E402
from finetune.recipes import THIRDPARTY, holdout_files  # noqa: E402
from rtlocal.constants import Category  # noqa: E402
from rtlocal.paths import atomic_write_text  # noqa: E402

BUILTIN = ROOT / "finetune" / "builtin"
# Said only while the base writes forced answers; never trained on.
FORCED_SYSTEM = (
    "Always give a direct, helpful best-effort answer. Never refuse and never say you are an AI. "
    "If something is missing, assume a reasonable example. If the answer is unknown, give your best "
    "guess and why. If asked about yourself, answer briefly as a friendly person would."
)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _distilled(raw: list[dict], work: Path, name: str, *, system: str | None) -> list[dict]:
    """Rows with answers written by the base model (refusals left out); cached in work/NAME.jsonl."""
    src, out = work / f"{name}.in.jsonl", work / f"{name}.out.jsonl"
    if not out.exists():
        _write_jsonl(src, raw)
        r = distill(f"jsonl:{src}", out, max_tokens=24, system=system, drop_refusals=True)
        print(f"{name}: {r.answered} answered, {r.dropped} dropped as refusals, {r.kept} unchanged", file=sys.stderr)
    return [row for _, row in read_jsonl(out)]


def make_pairs(n: int, work: Path) -> list[dict]:
    """All pairs are answered (and cached) first, then those near a held-out prompt are left out, so a
    new validation file never invalidates the cache."""
    pairs = expand(load_pair_types(), n=n, seed=0)
    rows = _distilled([r for p in pairs for r in p.records()], work, f"pairs-{n}", system=None)
    kept, dropped = filter_holdout(pairs, holdout_files())
    print(f"pairs: {len(kept)} kept, {dropped} dropped as near-copies of held-out prompts", file=sys.stderr)
    ids = {p.id for p in kept}
    return [r for r in rows if r["pair"] in ids]


def make_forced(pair_rows: list[dict], work: Path) -> list[dict]:
    non_safety = {c.value for c in Category} - {Category.SAFETY.value}
    prompts: dict[str, tuple[str, str | None]] = {}
    sources = load_builtin("refusal") + load_source(f"coconot-refusal:{THIRDPARTY / 'coconot' / 'refusal_train.jsonl'}")
    for r in sources:
        if r.category in non_safety:
            prompts.setdefault(r.prompt, (r.category, r.subcategory))
    for row in pair_rows:
        if row.get("category") in non_safety:
            prompts.setdefault(row["prompt"], (row["category"], row.get("type")))
    raw = [{"prompt": p, "forced": True, "lookalike": c, "subcategory": s} for p, (c, s) in prompts.items()]
    return _distilled(raw, work, "forced", system=FORCED_SYSTEM)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2400, help="About this many contrast pairs.")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "builtin-data", help="Cache of distilled answers.")
    ap.add_argument("--force", action="store_true", help="Replace the committed files.")
    args = ap.parse_args()
    targets = [BUILTIN / "pairs.jsonl", BUILTIN / "forced.jsonl"]
    if any(t.exists() for t in targets) and not args.force:
        print(f"Error: {targets[0]} exists: pass --force to regenerate", file=sys.stderr)
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(args.n, args.work)
    forced = make_forced(pairs, args.work)
    random.Random(0).shuffle(forced)
    _write_jsonl(targets[0], pairs)
    _write_jsonl(targets[1], forced)
    print(f"wrote {targets[0]} ({len(pairs)} rows) and {targets[1]} ({len(forced)} rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
