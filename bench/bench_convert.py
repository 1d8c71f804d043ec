"""Convert SmolLM2-135M (offline base GGUF) to several types; print times, sizes, and a round trip.

Round trip: the base converted with no adapter and no new tokens to q8_0 must give the same greedy
continuation as the original Q4_1 file; differences are printed with where they start.

    .venv/bin/python bench/bench_convert.py [--tokens 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import smollm2_gguf, threads  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a binary search does.",
    "Give me three tips for sleeping better.",
    "How many legs does a spider have?",
]


def greedy(path: Path, n: int) -> list[list[int]]:
    """Greedy continuations (token ids) of every prompt, through the runtime with no refusal decision."""
    from rtlocal.runtime.engine import Engine, SamplingParams
    from rtlocal.runtime.policy import build_policy
    from rtlocal.runtime.prompts import Message

    with Engine(path, n_ctx=512, n_threads=threads()) as e:
        pol = build_policy(e.refusal.categories)
        outs = []
        for p in PROMPTS:
            ids = e.prompt_ids([Message("user", p)])
            r = e.respond([Message("user", p)], pol, sampling=SamplingParams(temperature=0, repeat_penalty=1.0), max_tokens=n)
            r.finish()
            outs.append(list(e.llm.input_ids[len(ids) : e.llm.n_tokens]))
        return outs


def forced_logits(path: Path, prompt: str, continuation: list[int]):
    """Logits at every position of prompt + continuation (teacher forcing), f32 KV cache."""
    import numpy as np
    from llama_cpp import Llama

    from rtlocal.runtime.engine import Engine
    from rtlocal.runtime.prompts import Message

    with Engine(path, n_ctx=512, n_threads=threads()) as e:
        ids = e.prompt_ids([Message("user", prompt)])
    llm = Llama(str(path), n_ctx=512, logits_all=True, type_k=0, type_v=0, n_threads=threads(), verbose=False)
    llm.eval(ids + continuation)
    x = np.array(llm.scores[len(ids) - 1 : len(ids) + len(continuation) - 1])
    llm.close()
    return x


def compare(base: Path, other: Path, label: str, n: int) -> None:
    a, b = greedy(base, n), greedy(other, n)
    same = 0
    for p, x, y in zip(PROMPTS, a, b):
        if x == y:
            same += 1
            print(f"  same     {p!r} ({len(x)} tokens)")
            continue
        i = next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        la, lb = forced_logits(base, p, x), forced_logits(other, p, x)
        agree = float((la.argmax(-1) == lb.argmax(-1)).mean())
        top2 = sorted(la[min(i, len(la) - 1)])[-2:]
        print(
            f"  differs  {p!r} from token {i}: base top-2 margin there {top2[1] - top2[0]:.3f} logits; "
            f"teacher-forced top-1 agreement {agree:.1%} over {len(x)} positions"
        )
    print(f"round trip {label}: {same}/{len(PROMPTS)} greedy {n}-token continuations identical to the original Q4_1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--types", default="f16,q8_0,q4_k_m,q4_1")
    args = ap.parse_args()

    import os

    os.environ.setdefault("RTLOCAL_CACHE", str(Path(tempfile.gettempdir()) / "rtlocal-bench-cache"))
    from convert.convert import convert
    from convert.merge import resolve_base

    base = smollm2_gguf()
    print(f"base {base.name}: {base.stat().st_size / 1e6:.1f} MB")
    t0 = time.perf_counter()
    resolve_base(str(base))
    print(f"dequantise base (cached after the first run): {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory() as d:
        out = {}
        for t in args.types.split(","):
            t0 = time.perf_counter()
            r = convert(str(base), Path(d) / f"smollm2-{t}.gguf", out_type=t, threads=threads())
            dt = time.perf_counter() - t0
            out[t] = r.path
            parts = ", ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items())
            print(f"convert -> {t:<7} {dt:6.1f} s  ({parts})  {r.path.stat().st_size / 1e6:7.1f} MB")
        for t in ("q8_0", "q4_1"):
            if t in out:
                compare(base, out[t], f"Q4_1 -> {t}", args.tokens)


if __name__ == "__main__":
    main()
