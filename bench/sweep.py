"""Try training settings side by side and score each on prompts it never trained on, without building GGUFs.

    python bench/sweep.py --recipe default --grid '[{}, {"learning_rate": 2e-3}, {"seed": 1}]' --workers 4

Every setting trains with finetune.trainer (prepare + fit, the same code as `rtlocal finetune`), then
scores the first answer position with transformers: the full-vocabulary softmax of the merged-free
PEFT model, read at each prompt's last token. As the build does, `balanced` is calibrated on the
setting's own held-out split (rtlocal.evaluation.calibrate), and every source of bench/generalise.py
(CoCoNot test, HarmBench validation, the look-alike validation sets) is scored as it is: AUROC,
refused / over-refused at that `balanced`, and at the global τ that over-refuses ≤ 10%. It is the
runtime's decision up to the GGUF quantisation (q8_0), so it ranks settings; the reported numbers
come from bench/generalise.py on the built GGUF. Several workers share one GPU (the model is small);
`--deadline` stops starting settings after that many seconds, so a run on a lent machine ends in time.
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


def split_items(prep) -> list:
    """The setting's held-out split as labelled prompts: what the build calibrates `balanced` on."""
    from finetune.trainer import validation_rows
    from rtlocal.evaluation.data import EvalItem

    rows = validation_rows(prep.dataset.val)  # what the build writes and calibrates on
    return [EvalItem(f"split:{i}", str(i), "split", r["prompt"], r["should_refuse"], r["category"] or None) for i, r in enumerate(rows)]


def score_prep(prep, data: dict[str, list]) -> dict:
    """Calibrate `balanced` on the split, then score every source (bench/generalise.py's metrics)."""
    from generalise import by_group, first_token_rows, sources_for_sweep, tau_for_over_refusal

    from rtlocal.evaluation.analysis import with_thresholds
    from rtlocal.evaluation.calibrate import PRESET_TARGETS, calibrate
    from rtlocal.evaluation.data import Record
    from rtlocal.runtime.policy import build_policy

    def records(items: list) -> list[Record]:
        scores = first_token_scores(prep, [it.prompt for it in items])
        return [Record(it.key, it.id, it.split, it.should_refuse, it.category, probs, p) for it, (probs, p) in zip(items, scores)]

    split = records(split_items(prep))
    cal = calibrate(split, prep.categories, PRESET_TARGETS["balanced"])
    policy = with_thresholds(build_policy(prep.categories), cal.thresholds)
    out = {"thresholds": cal.thresholds, "split": first_token_rows(split, policy, tau_for_over_refusal(split))}
    srcs = sources_for_sweep()
    recs = {s.key: records(data[s.key]) for s in srcs}
    taus = {s.key: tau_for_over_refusal(recs[s.key]) for s in srcs}
    for s in srcs:
        tau = taus[s.tau_from or s.key]
        row = first_token_rows(recs[s.key], policy, tau)
        row["groups"] = by_group(data[s.key], recs[s.key], s.group, lambda rs, t=tau: first_token_rows(rs, policy, t))
        out[s.key] = row
    return out


def run_one(args: tuple) -> dict:
    recipe, base, overrides, device, threads, deadline, limit = args
    if deadline is not None and time.time() > deadline:
        return {"overrides": overrides, "skipped": "past --deadline"}
    import torch

    if threads:
        torch.set_num_threads(threads)
    from generalise import load_all, sources_for_sweep

    from finetune.recipes import get_recipe
    from finetune.trainer import fit, prepare

    try:
        cfg = replace(get_recipe(recipe, base=base).config, output_dir="", device=device, save_every=0, **overrides)
        t0 = time.perf_counter()
        prep = prepare(cfg)
        m = fit(prep)
        t1 = time.perf_counter()
        res = score_prep(prep, load_all(sources_for_sweep(), limit))
    except Exception as e:  # noqa: BLE001 -- one bad setting must not end the sweep
        return {"overrides": overrides, "error": f"{type(e).__name__}: {e}"}
    short = {k: m[k] for k in ("steps", "examples", "tokens", "train_seconds", "val_loss", "val_first_token_accuracy", "precision") if k in m}
    return {"overrides": overrides, "train": short, "curve": m["loss_curve"], "score": res,
            "seconds": {"train": round(t1 - t0, 1), "score": round(time.perf_counter() - t1, 1)}}


def _p(x) -> str:
    return "  -  " if x is None else f"{x:.0%}"


def line(r: dict) -> str:
    if "score" not in r:
        return f"{json.dumps(r['overrides'])}: {r.get('error') or r.get('skipped')}"
    s = r["score"]
    parts = []
    for key in ("split", "coconot", "lookalike", "other", "framed"):
        v = s[key]
        parts.append(f"{key} {v['auroc']:.3f} {_p(v['balanced']['refused'])}/{_p(v['balanced']['over_refused'])}")
    parts.append(f"harmbench {_p(s['harmbench']['balanced']['refused'])}")
    cats = " ".join(f"{k.split()[0][:3]} {v['auroc']:.2f}" for k, v in s["coconot"]["groups"].items() if v["auroc"] is not None)
    return f"{json.dumps(r['overrides'])}: " + " | ".join(parts) + f" | CoCoNot {cats} | tokens {r['train'].get('tokens')} | {r['seconds']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="default")
    ap.add_argument("--base", default=None, help="base GGUF/HF dir (default: the recipe's)")
    ap.add_argument("--grid", required=True, help="JSON list of TrainConfig overrides, or @FILE")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--deadline", type=float, default=None, metavar="SECONDS", help="start no setting after this many seconds")
    ap.add_argument("--limit", type=int, default=None, metavar="N", help="score a fixed-seed sample of N prompts per file (development)")
    ap.add_argument("--out", type=Path, default=None, help="append results as JSONL")
    args = ap.parse_args()
    grid = json.loads(Path(args.grid[1:]).read_text() if args.grid.startswith("@") else args.grid)
    from generalise import load_all, sources_for_sweep

    from convert.merge import resolve_base
    from finetune.recipes import get_recipe

    load_all(sources_for_sweep(), None)  # a missing validation file fails here, before any training
    resolve_base(get_recipe(args.recipe, base=args.base).config.base)  # dequantise once, before the workers
    deadline = time.time() + args.deadline if args.deadline else None
    jobs = [(args.recipe, args.base, g, args.device, args.threads, deadline, args.limit) for g in grid]
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=1) as pool:
            for r in pool.imap_unordered(run_one, jobs):
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
