"""Training throughput: our trainer's step vs a plain transformers + PEFT loop, on the same batches.

    python bench/bench_train.py [--base GGUF|HF-DIR] [--steps 8] [--threads 2]

Both loops train the same PEFT model (LoRA on all linear layers + trainable rows for the six
refusal tokens) on the same padded batches of the default recipe's data, with the same AdamW
optimizer. The plain loop is what a transformers user writes: `model(input_ids, attention_mask,
labels).loss.backward()`. Ours is `finetune.model.Forward`: the output projection and the loss only
on answer positions, the new token rows spliced in without materialising a merged copy of the
embedding matrix, and the batch's common opening run once (`shared_prefix`); also timed with every
row whole, to show what the shared opening buys. Steps alternate (plain, ours, rows whole; then
rotated) so that a busy machine slows all alike. Prints tokens/s of each and the ratios (target >= 1.0x).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=None, help="base model (default: the default recipe's SmolLM2-135M GGUF)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per loop")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-answer-tokens", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    from finetune.encoding import collate, make_batches
    from finetune.model import Forward, _trainable
    from finetune.recipes import get_recipe
    from finetune.trainer import _optimizer, prepare

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_recipe("default", base=args.base).config
    cfg = replace(cfg, output_dir="", batch_size=args.batch_size, **({"max_answer_tokens": args.max_answer_tokens} if args.max_answer_tokens else {}))
    prep = prepare(cfg)
    model = prep.model
    model.train()
    ours = Forward(model, cfg.first_token_weight)
    opt = _optimizer(model, cfg)
    params = [p for _, p in _trainable(model)]
    batches = make_batches(prep.train, cfg.batch_size, cfg.seed, 0)[: args.warmup + args.steps]

    def plain_step(b: dict) -> None:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def our_step(b: dict) -> None:
        loss, _ = ours.loss(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def whole_rows_step(b: dict) -> None:
        ours.share_prefix = False
        try:
            our_step(b)
        finally:
            ours.share_prefix = True

    secs = {"plain": 0.0, "ours": 0.0, "whole": 0.0}
    steps = [("plain", plain_step), ("ours", our_step), ("whole", whole_rows_step)]
    tokens = 0
    for i, ix in enumerate(batches):
        b = collate([prep.train[j] for j in ix], prep.tokenizer.pad_token_id or 0)
        n = int(b["attention_mask"].sum())
        for name, step in steps[i % 3 :] + steps[: i % 3]:
            t0 = time.perf_counter()
            step(b)
            if i >= args.warmup:
                secs[name] += time.perf_counter() - t0
        if i >= args.warmup:
            tokens += n
    plain, mine, whole = (tokens / secs[k] for k in ("plain", "ours", "whole"))
    print(f"{args.steps} steps of {cfg.batch_size} examples ({tokens} tokens each loop) on {prep.device}, {torch.get_num_threads()} threads")
    print(f"plain transformers+PEFT loop:         {plain:8.1f} tokens/s")
    print(f"rtlocal trainer, every row whole:     {whole:8.1f} tokens/s")
    print(f"rtlocal trainer (shared opening):     {mine:8.1f} tokens/s")
    print(f"ratio vs plain: {mine / plain:.2f}x; the shared opening alone: {mine / whole:.2f}x")


if __name__ == "__main__":
    main()
