"""Runtime speed: rtlocal's decision + decode loop against plain llama-cpp-python, same GGUF, one run.

Prints decode tokens/s for
  - rtlocal (Engine.respond: decision, then llama.cpp's native sampler chain),
  - a bare llama.cpp eval loop (llama_decode + a greedy sampler, nothing else),
  - llama-cpp-python's own create_chat_completion (streaming),
and time to first token with the refusal decision against the same path without it (mode free).
Run it alone: two llama.cpp processes on 2 cores slow each other several-fold.

    .venv/bin/python bench/bench_runtime.py [--model M.gguf] [--tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import threads  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works, step by step.",
    "Describe the rules of chess for a beginner.",
]


def bare_loop(llm, ids: list[int], n: int) -> float:
    """tokens/s of the simplest possible decode loop over the same context (greedy)."""
    import llama_cpp

    ctx = llm._ctx.ctx
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    smpl = llama_cpp.llama_sampler_init_greedy()
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(ids)))
    one = (llama_cpp.llama_token * 1)()
    t0 = time.perf_counter()
    for _ in range(n):
        one[0] = llama_cpp.llama_sampler_sample(smpl, ctx, -1)
        llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1))
    dt = time.perf_counter() - t0
    llama_cpp.llama_sampler_free(smpl)
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    llm.n_tokens = 0
    return n / dt


def chat_completion(llm, prompt: str, n: int) -> tuple[float, int]:
    """tokens/s between the first and the last streamed chunk of create_chat_completion."""
    llm.reset()
    stamps = []
    for _ in llm.create_chat_completion(
        [{"role": "user", "content": prompt}], max_tokens=n, temperature=0.0, repeat_penalty=1.0, stream=True
    ):
        stamps.append(time.perf_counter())
    k = len(stamps) - 2  # role chunk first, finish chunk last
    return (k - 1) / (stamps[-2] - stamps[1]) if k > 1 else 0.0, k


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="a GGUF with refusal tokens (default: the built default model)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from rtlocal.runtime.engine import Engine, SamplingParams
    from rtlocal.runtime.models import resolve_model
    from rtlocal.runtime.policy import Mode, build_policy
    from rtlocal.runtime.prompts import Message

    path = resolve_model(args.model)
    eng = Engine(path, n_ctx=1024, n_threads=threads())
    if not eng.refusal.present:
        raise SystemExit(f"{path} has no refusal tokens: the decision cannot be measured on it")
    greedy = SamplingParams(temperature=0.0, repeat_penalty=1.0)
    # every answer is forced to [respond] so all three loops decode text of similar length
    respond = build_policy(eng.refusal.categories, thresholds="all=1")
    free = build_policy(eng.refusal.categories, mode=Mode.FREE)
    ours, bare, ccc, ttft_dec, ttft_free = [], [], [], [], []
    for _ in range(args.rounds):
        for p in PROMPTS:
            msgs = [Message("user", p)]
            ids = eng.prompt_ids(msgs)
            eng.llm.reset()
            r = eng.respond(msgs, respond, sampling=greedy, max_tokens=args.tokens)
            r.finish()
            ours.append(r.stats.tokens_per_second)
            bare.append(bare_loop(eng.llm, ids + [r.start_token], args.tokens))
            ccc.append(chat_completion(eng.llm, p, args.tokens)[0])
            for policy, sink in ((respond, ttft_dec), (free, ttft_free)):
                eng.llm.reset()
                r = eng.respond(msgs, policy, sampling=greedy, max_tokens=1)
                r.finish()
                sink.append(r.stats.first_token_ms)
    eng.close()
    med = statistics.median
    print(f"model {path.name}, {threads()} threads, {args.tokens} tokens x {len(PROMPTS)} prompts x {args.rounds} rounds (medians)")
    print(f"decode tokens/s: rtlocal {med(ours):.1f} | bare llama.cpp loop {med(bare):.1f} | create_chat_completion {med(ccc):.1f}")
    print(f"ratio rtlocal / bare loop            {med(ours) / med(bare):.3f}  (target >= 0.95)")
    print(f"ratio rtlocal / create_chat_completion {med(ours) / med(ccc):.3f}  (target >= 1.0)")
    print(f"time to first token: with decision {med(ttft_dec):.1f} ms | without (mode free) {med(ttft_free):.1f} ms")
    print(f"ratio TTFT with / without decision   {med(ttft_dec) / med(ttft_free):.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
