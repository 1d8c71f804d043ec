"""First-token eval throughput vs the bare llama.cpp prompt-evaluation rate on the same prompts.

    .venv/bin/python bench/bench_eval.py [--model smollm2-135m-rt] [--prompts 200] [--rounds 3]

The model: the given one, else the built default (smollm2-135m-rt), else a stand-in: the SmolLM2
base GGUF with six of its own special tokens declared as refusal tokens in rtlocal metadata (the
same network and vocabulary size, so the same work per prompt; its probabilities mean nothing).

Three timings over the same CoCoNot test prompts:
- ours: `evaluate.score_items` in first-token mode (chat template, tokenising, prompt evaluation,
  full-vocabulary softmax, the decision and the per-prompt cache write);
- bare: token ids prepared beforehand, `Llama.eval` of each prompt from an empty KV cache;
- bare+prefix: the same, reusing the KV cache of the common prefix with the previous prompt
  (what the engine does too: the chat template's system prompt is shared).
The prompts are taken in chunks and the three methods alternate chunk by chunk (in rotating
order), so that load from other processes falls on all three alike. On a shared machine the load
comes in bursts, so the headline ratio is the median over chunks of the ratio measured within each
chunk (the three timings of a chunk are seconds apart); the ratio of the summed times is printed too.
The ratio that counts is ours / bare+prefix, the like-for-like one; ours / bare is printed too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SHARED_DATA, smollm2_gguf, threads  # noqa: E402

TARGET = 0.9


def stand_in(dst: Path) -> Path:
    """The SmolLM2 base with ids 3..8 (<repo_name> ... <gh_stars>) declared as [respond] + 5 refusal tokens."""
    from rtlocal.constants import COCONOT_CATEGORIES, CONTRACT_VERSION, RESPOND_TOKEN, Keys, TokenMode, token_for
    from rtlocal.runtime.gguf_edit import set_metadata

    cats = [{"name": c, "token": token_for(c), "id": 4 + i, "threshold": 0.5} for i, c in enumerate(COCONOT_CATEGORIES)]
    return set_metadata(smollm2_gguf(), {
        Keys.VERSION: CONTRACT_VERSION, Keys.MODE: TokenMode.CATEGORICAL.value, Keys.RESPOND_TOKEN: RESPOND_TOKEN,
        Keys.RESPOND_TOKEN_ID: 3, Keys.CATEGORIES: json.dumps(cats),
    }, out=dst)


def bare(engine, prompts: list[list[int]], *, reuse_prefix: bool) -> float:
    """Seconds to evaluate every prompt with llama-cpp-python alone and touch its last logits."""
    llm = engine.llm
    t0 = time.perf_counter()
    for ids in prompts:
        keep = 0
        if reuse_prefix:
            for a, b in zip(llm.input_ids[: llm.n_tokens], ids):
                if a != b:
                    break
                keep += 1
            keep = min(keep, len(ids) - 1)
        llm.n_tokens = keep
        llm.eval(ids[keep:])
        engine.last_logits()[0]  # noqa: B018 - the logits are read, as any use of them would
    return time.perf_counter() - t0


def ours(engine, items, policy, cache_dir: Path) -> float:
    from rtlocal.evaluation.run import RunOptions, score_items

    t0 = time.perf_counter()
    records, _ = score_items(engine, items, policy, options=RunOptions(), out_dir=cache_dir, restart=True)
    assert len(records) == len(items)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a refusal-token GGUF (default: the built default, else the stand-in)")
    ap.add_argument("--prompts", type=int, default=200, help="prompts (half refusal_test, half contrast_test)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=5, help="prompts per alternation")
    args = ap.parse_args()

    from rtlocal.errors import RtlocalError
    from rtlocal.evaluation.data import load_data
    from rtlocal.runtime.engine import Engine
    from rtlocal.runtime.models import DEFAULT_MODEL_NAME, resolve_model
    from rtlocal.runtime.policy import build_policy
    from rtlocal.runtime.prompts import Message

    with tempfile.TemporaryDirectory() as tmp:
        try:
            model = resolve_model(args.model or DEFAULT_MODEL_NAME)
            what = str(model)
        except RtlocalError:
            if args.model:
                raise
            model = stand_in(Path(tmp) / "smollm2-standin.gguf")
            what = f"stand-in ({smollm2_gguf().name} with rtlocal metadata; {DEFAULT_MODEL_NAME} is not built)"
        items = load_data(SHARED_DATA / "coconot", limit=args.prompts // 2).items
        with Engine(model, n_ctx=2048, n_threads=threads()) as engine:
            if not engine.refusal.present:
                raise SystemExit(f"{model} has no refusal tokens")
            policy = build_policy(engine.refusal.categories)
            prompts = [engine.prompt_ids([Message("user", it.prompt)]) for it in items]
            n_tok = sum(map(len, prompts))
            bare(engine, prompts[:5], reuse_prefix=False)  # warm-up: llama.cpp allocates its buffers
            total = {"bare": 0.0, "bare+prefix": 0.0, "ours": 0.0}
            per_chunk: list[dict[str, float]] = []
            chunks = [range(i, min(i + args.chunk, len(items))) for i in range(0, len(items), args.chunk)]
            for r in range(args.rounds):
                t_round = dict(total)
                for j, ch in enumerate(chunks):
                    runs = {
                        "bare": lambda: bare(engine, [prompts[i] for i in ch], reuse_prefix=False),
                        "bare+prefix": lambda: bare(engine, [prompts[i] for i in ch], reuse_prefix=True),
                        "ours": lambda: ours(engine, [items[i] for i in ch], policy, Path(tmp) / f"cache-{r}-{j}"),
                    }
                    names = list(runs)
                    t = {name: runs[name]() for name in names[j % 3:] + names[: j % 3]}
                    per_chunk.append(t)
                    total = {k: total[k] + t[k] for k in total}
                print(f"round {r + 1}: " + "  ".join(f"{k} {len(items) / (total[k] - t_round[k]):.1f} prompts/s" for k in total), flush=True)
    n_all = len(items) * args.rounds
    rate = {k: n_all / v for k, v in total.items()}
    print(f"model: {what}")
    print(f"prompts: {len(items)} CoCoNot test prompts, {n_tok} tokens ({n_tok / len(items):.1f} per prompt), threads {threads()}")
    print(f"bare llama.cpp, fresh KV per prompt: {rate['bare']:.1f} prompts/s ({n_tok * args.rounds / total['bare']:.0f} tokens/s)")
    print(f"bare llama.cpp, prefix reuse:        {rate['bare+prefix']:.1f} prompts/s")
    print(f"rtlocal eval first-token:            {rate['ours']:.1f} prompts/s")
    median = {k: float(statistics.median(t[k] / t["ours"] for t in per_chunk)) for k in ("bare", "bare+prefix")}
    print(f"ratio ours / bare (fresh KV): median over chunks {median['bare']:.2f}, summed times {rate['ours'] / rate['bare']:.2f}")
    ratio = median["bare+prefix"]
    print(f"ratio ours / bare (prefix reuse, like for like): median over chunks {ratio:.2f}, summed times "
          f"{rate['ours'] / rate['bare+prefix']:.2f} (target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
