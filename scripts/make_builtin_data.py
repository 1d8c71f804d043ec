"""Regenerate the distilled part of rtlocal's built-in training data (run once; the output is committed).

    .venv/bin/python scripts/make_builtin_data.py [--n 480] [--work DIR] [--force]

`finetune/builtin/forced.jsonl`: a fixed-seed sample of prompts of the four non-safety refusal
categories (built-in refusals, CoCoNot refusal_train, the contrast pairs' refused sides) with a
best-effort answer written by the base model itself (self-distillation, greedy, 24 tokens: training
keeps the first 16), to be trained after a *forced* `[respond]` (the start token is given, not
learned): when a user turns a category off, what follows reads as an answer, not as a refusal.
Answers the string-match judge calls refusals are left out (checked again with the judge's current
rules when the file is written), and so are answers that drift into violence or slurs. Prompts near a held-out prompt are not
sampled. The contrast pairs themselves are generated at build time (`pairs:N` data source).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finetune.data import check_holdout, load_builtin, load_source  # noqa: E402
from finetune.distill import distill  # noqa: E402
from finetune.recipes import THIRDPARTY, holdout_files  # noqa: E402
from finetune.rows import read_jsonl  # noqa: E402
from rtlocal.constants import Category  # noqa: E402
from rtlocal.paths import atomic_write_text  # noqa: E402

BUILTIN = ROOT / "finetune" / "builtin"
# Said only while the base writes forced answers; never trained on.
FORCED_SYSTEM = (
    "Always give a direct, helpful best-effort answer. Never refuse and never say you are an AI. "
    "If something is missing, assume a reasonable example. If the answer is unknown, give your best "
    "guess and why. If asked about yourself, answer briefly as a friendly person would."
)


# A non-safety prompt's answer has no business with these: a small model's hallucination, left out.
UNFIT_WORDS = ("murder", "kill", "bitch", "rape", "suicide", "terror")


def _fit(row: dict) -> bool:
    from rtlocal.evaluation.judge import StringMatchJudge

    answer = row.get("response") or ""
    return not StringMatchJudge()(row["messages"][-1]["content"], answer)[0] and not any(w in answer.lower() for w in UNFIT_WORDS)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _distilled(raw: list[dict], work: Path, name: str, *, system: str | None) -> list[dict]:
    """Rows with answers written by the base model (refusals left out); cached in work/NAME.jsonl."""
    src, out = work / f"{name}.in.jsonl", work / f"{name}.out.jsonl"
    if not out.exists():
        _write_jsonl(src, raw)
        r = distill(f"jsonl:{src}", out, max_tokens=24, system=system, drop_refusals=True, threads=1)
        print(f"{name}: {r.answered} answered, {r.dropped} dropped as refusals, {r.kept} unchanged", file=sys.stderr)
    return [row for _, row in read_jsonl(out)]


def make_forced(n: int, work: Path) -> list[dict]:
    non_safety = {c.value for c in Category} - {Category.SAFETY.value}
    records = load_builtin("refusal") + load_source(f"coconot-refusal:{THIRDPARTY / 'coconot' / 'refusal_train.jsonl'}") + load_source("pairs:2400")
    records = [r for r in records if r.category in non_safety]
    _, near = check_holdout(records, holdout_files(), near=0.8)
    prompts: dict[str, tuple[str, str | None]] = {}
    for r in records:
        if id(r) not in near:
            prompts.setdefault(r.prompt, (r.category, r.subcategory))
    chosen = random.Random(0).sample(sorted(prompts), min(n, len(prompts)))
    raw = [{"prompt": p, "forced": True, "lookalike": prompts[p][0], "subcategory": prompts[p][1]} for p in chosen]
    print(f"forced: {len(raw)} of {len(prompts)} non-safety prompts ({len(near)} near held-out prompts left out)", file=sys.stderr)
    return _distilled(raw, work, f"forced-{n}", system=FORCED_SYSTEM)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=480, help="How many prompts to answer.")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "builtin-data", help="Cache of distilled answers.")
    ap.add_argument("--force", action="store_true", help="Replace the committed files.")
    args = ap.parse_args()
    target = BUILTIN / "forced.jsonl"
    if target.exists() and not args.force:
        print(f"Error: {target} exists: pass --force to regenerate", file=sys.stderr)
        return 1
    args.work.mkdir(parents=True, exist_ok=True)
    forced = make_forced(args.n, args.work)
    fit = [r for r in forced if _fit(r)]
    print(f"forced: {len(forced) - len(fit)} more left out by the judge's current rules or as unfit", file=sys.stderr)
    _write_jsonl(target, fit)
    print(f"wrote {target} ({len(forced)} rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
