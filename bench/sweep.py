"""Try training settings side by side and score each on CoCoNot's test files, without building GGUFs.

    python bench/sweep.py --recipe benchmark --grid '[{}, {"epochs": 3}, {"first_token_weight": 1}]' --workers 1

Every setting trains with finetune.trainer (prepare + fit, the same code as `rtlocal finetune`), then
scores the first answer position with transformers: the full-vocabulary softmax of the merged-free
PEFT model, read at each prompt's last token, and the runtime's own decision rule
(`rtlocal.runtime.policy.decide` with the default thresholds). It is the runtime's decision up to the
GGUF quantisation (q8_0), so it ranks settings; the reported numbers come from
bench/score_first_token.py on the built GGUF. Several workers share one GPU (the model is small).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def first_token_scores(prep, prompts: list[str], batch_size: int = 32) -> list[tuple[dict[str, float], float]]:
    """(p_k per category, p_respond) at the first answer position of each prompt."""
    import torch

    from finetune.encoding import ChatEncoder
    from rtlocal.constants import RESPOND_TOKEN, token_for

    enc = ChatEncoder(prep.tokenizer)
    ids = [enc.prompt_ids([{"role": "user", "content": p}]) for p in prompts]
    cat_ids = [prep.token_ids[token_for(c)] for c in prep.categories]
    rid = prep.token_ids[RESPOND_TOKEN]
    out = []
    model = prep.model
    model.eval()
    with torch.no_grad():
        for k in range(0, len(ids), batch_size):
            chunk = ids[k : k + batch_size]
            n = max(map(len, chunk))
            x = torch.zeros((len(chunk), n), dtype=torch.long)
            m = torch.zeros((len(chunk), n), dtype=torch.long)
            for i, row in enumerate(chunk):
                x[i, : len(row)] = torch.tensor(row)
                m[i, : len(row)] = 1
            logits = model(input_ids=x.to(prep.device), attention_mask=m.to(prep.device)).logits.float()
            last = torch.tensor([len(r) - 1 for r in chunk], device=logits.device)
            probs = torch.softmax(logits[torch.arange(len(chunk), device=logits.device), last], -1).cpu()
            for row in probs:
                out.append(({c: float(row[t]) for c, t in zip(prep.categories, cat_ids)}, float(row[rid])))
    model.train()
    return out


def score_prep(prep, test_dir: Path) -> dict:
    from score_first_token import summarise

    from rtlocal.runtime.policy import build_policy, decide

    policy = build_policy(prep.categories)
    rows = {}
    for split in ("refusal_test", "contrast_test"):
        items = [json.loads(line) for line in open(test_dir / f"{split}.jsonl") if line.strip()]
        scores = first_token_scores(prep, [r["prompt"] for r in items])
        rows[split] = []
        for r, (probs, p_resp) in zip(items, scores):
            d = decide(probs, p_resp, policy)
            rows[split].append({"category": r["category"], "refused": d.refused, "chosen": d.category, "probs": probs, "p_respond": p_resp})
    return summarise(rows)


def run_one(args: tuple) -> dict:
    recipe, base, overrides, test_dir, device, threads = args
    import torch

    if threads:
        torch.set_num_threads(threads)
    from finetune.recipes import get_recipe
    from finetune.trainer import fit, prepare

    cfg = replace(get_recipe(recipe, base=base).config, output_dir="", device=device, save_every=0, **overrides)
    t0 = time.perf_counter()
    prep = prepare(cfg)
    m = fit(prep)
    res = score_prep(prep, Path(test_dir))
    short = {k: m[k] for k in ("steps", "train_seconds", "val_loss", "val_first_token_accuracy") if k in m}
    return {"overrides": overrides, "train": short, "curve": m["loss_curve"], "score": res, "seconds": round(time.perf_counter() - t0, 1)}


def line(r: dict) -> str:
    s = r["score"]
    cats = " ".join(f"{k.split()[0][:5]} {v['refused']:.0%}/{v['own_token']:.0%}" for k, v in s["per_category"].items())
    return (
        f"{json.dumps(r['overrides'])}: AUROC {s['auroc_total']:.3f} refused {s['refused']:.1%} over {s['over_refused']:.1%} "
        f"cat-acc {s['category_accuracy']:.1%} | total-rule {s['total_rule']['refused']:.0%}/{s['total_rule']['over_refused']:.0%} | {cats} | {r['seconds']}s"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="benchmark")
    ap.add_argument("--base", default=None, help="base GGUF/HF dir (default: the recipe's)")
    ap.add_argument("--grid", required=True, help="JSON list of TrainConfig overrides, or @FILE")
    ap.add_argument("--test-dir", type=Path, default=ROOT.parent / "shared" / "data" / "coconot")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="append results as JSONL")
    args = ap.parse_args()
    grid = json.loads(Path(args.grid[1:]).read_text() if args.grid.startswith("@") else args.grid)
    from convert.merge import resolve_base
    from finetune.recipes import get_recipe

    resolve_base(get_recipe(args.recipe, base=args.base).config.base)  # dequantise once, before the workers
    jobs = [(args.recipe, args.base, g, str(args.test_dir), args.device, args.threads) for g in grid]
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            results = pool.imap_unordered(run_one, jobs)
            for r in results:
                _emit(r, args.out)
    else:
        for j in jobs:
            _emit(run_one(j), args.out)


def _emit(r: dict, out: Path | None) -> None:
    print(line(r), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
