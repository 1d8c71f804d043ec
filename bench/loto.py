"""Leave one type out: train the default recipe without one contrast-pair type, score that type.

    python bench/loto.py --types homonyms,cyber [--together] [--max-steps N] [--full MODEL.gguf]

For each type T the default recipe is built without T's contrast pairs (`exclude_types`), as
`smollm2-135m-rt-loto-T` in the models dir (RTLOCAL_HOME), and scored by its first-token refusal
probability on the look-alike validation rows of type T (bench/validation/lookalike.jsonl): AUROC,
refused and over-refused at `balanced`. With --full, the model trained on every type is scored beside
it: the gap is what seeing the type in training buys. A built model is reused on a rerun.

--together leaves all the listed types out of one build (`smollm2-135m-rt-lgo-T1-T2-...`) and scores
each of them on it: a stricter test than one type out (the model has not seen any of the group's
pairs), at the cost of one build for the group.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VALIDATION = ROOT / "bench" / "validation" / "lookalike.jsonl"


def score_type(model: Path, items: list, threads: int | None) -> dict:
    from rtlocal.evaluation.metrics import roc_auc
    from rtlocal.runtime.engine import Engine
    from rtlocal.runtime.policy import build_policy
    from rtlocal.runtime.prompts import Message

    engine = Engine(model, n_ctx=1024, n_threads=threads)
    policy = build_policy(engine.refusal.categories)
    try:
        decisions = [engine.decide([Message("user", it.prompt)], policy) for it in items]
    finally:
        engine.close()
    y = [it.should_refuse for it in items]
    p = [sum(d.probs.values()) for d in decisions]
    pos = [d.refused for d, t in zip(decisions, y) if t]
    neg = [d.refused for d, t in zip(decisions, y) if not t]
    return {"n": len(items), "auroc": roc_auc(y, p), "refused": sum(pos) / len(pos), "over_refused": sum(neg) / len(neg)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", required=True, help="Comma-separated pair types (see finetune/builtin/pair_items.json).")
    ap.add_argument("--together", action="store_true", help="Leave every listed type out of one build (leave-group-out).")
    ap.add_argument("--max-steps", type=int, default=None, help="Cap the training steps (a quicker, weaker run).")
    ap.add_argument("--full", type=Path, default=None, help="The default model, trained on every type, for comparison.")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = ap.parse_args()

    from finetune.build import build
    from finetune.pairs import load_pair_types
    from finetune.recipes import get_recipe
    from rtlocal.evaluation.data import load_data
    from rtlocal.paths import models_dir

    known = load_pair_types()
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in known]
    if unknown:
        print(f"Error: unknown type(s) {', '.join(unknown)} (known: {', '.join(known)})", file=sys.stderr)
        return 2
    items = load_data(VALIDATION).items
    recipe = get_recipe("default")
    results = {}
    for t in types:
        rows = [it for it in items if it.subcategory == t]
        if not rows:
            print(f"{t}: no validation rows of this type; skipped", file=sys.stderr)
            continue
        left_out = types if args.together else [t]
        name = f"{recipe.model_name}-lgo-{'-'.join(types)}" if args.together else f"{recipe.model_name}-loto-{t}"
        path = models_dir() / f"{name}.gguf"
        if not path.exists():
            cfg = replace(recipe.config, exclude_types=left_out, max_steps=args.max_steps)
            build(cfg, name=name)
        results[t] = {"without": score_type(path, rows, args.threads)}
        if args.full:
            results[t]["full"] = score_type(args.full, rows, args.threads)
        r = results[t]
        full = f"  | trained on it: AUROC {r['full']['auroc']:.3f}" if args.full else ""
        w = r["without"]
        print(f"{t:20s} n={w['n']:3d}  left out: AUROC {w['auroc']:.3f}, refused {w['refused']:.0%}, over-refused {w['over_refused']:.0%}{full}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
