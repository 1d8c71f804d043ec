"""`rtlocal convert` on the tiny fixture: control tokens, logits parity, metadata, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from convert.convert import convert
from rtlocal.cli import main
from rtlocal.constants import COCONOT_CATEGORIES, Keys, TokenType
from tests.tinymodel import assert_logits_close

LLAMA_TOKEN_ATTR_CONTROL = 1 << 3  # llama.cpp's LLAMA_TOKEN_ATTR_CONTROL


def _token_types(path: Path) -> tuple[list[str], list[int], dict]:
    r = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.merges")}
    return fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"], fields


def _no_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".partial" in p.name or ".tmp" in p.name]


@pytest.fixture(scope="module")
def converted(tiny_base, tiny_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv")
    results = {}
    for t in ("f32", "f16", "q8_0"):
        results[t] = convert(str(tiny_base), out / f"m-{t}.gguf", adapter=tiny_adapter, out_type=t, verify=True)
    return results


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_added_tokens_are_control_in_gguf_and_llama_cpp(converted, refusal_tokens, out_type):
    from llama_cpp import Llama

    path = converted[out_type].path
    tokens, types, fields = _token_types(path)
    assert len(tokens) == 384 + 6 == len(types)
    for t in refusal_tokens:
        assert types[tokens.index(t)] == TokenType.CONTROL
    llm = Llama(str(path), n_ctx=128, verbose=False)
    try:
        for t in refusal_tokens:
            with_special = llm.tokenize(t.encode(), add_bos=False, special=True)
            plain = llm.tokenize(t.encode(), add_bos=False, special=False)
            assert with_special == [tokens.index(t)]
            assert len(plain) > 1 and tokens.index(t) not in plain
            assert llm.detokenize(with_special) == b""  # control tokens are hidden by default
            assert llm.detokenize(with_special, special=True) == t.encode()
            assert llm._model.token_get_attr(with_special[0]) & LLAMA_TOKEN_ATTR_CONTROL
    finally:
        llm.close()


def test_logits_match_transformers(converted, capsys):
    f32, f16 = converted["f32"].verify, converted["f16"].verify
    with capsys.disabled():
        print(f"\n  {f32.summary()}\n  {f16.summary()}\n  {converted['q8_0'].verify.summary()}")
    assert f32.positions >= 20 and f16.positions >= 20
    assert_logits_close(f32, 1e-3)
    assert_logits_close(f16, 1e-2)
    assert converted["q8_0"].verify.top1_agreement >= 0.9


def test_rtlocal_metadata(converted):
    _, _, fields = _token_types(converted["f16"].path)
    assert fields[Keys.MODE] == "categorical"
    assert fields[Keys.RESPOND_TOKEN] == "[respond]"
    assert fields[Keys.RESPOND_TOKEN_ID] == 384
    cats = json.loads(fields[Keys.CATEGORIES])
    assert [c["name"] for c in cats] == list(COCONOT_CATEGORIES)
    assert [c["id"] for c in cats] == [385, 386, 387, 388, 389]
    assert all(c["token"] == f"[{c['name']}]" and c["threshold"] == 0.5 for c in cats)
    # the tokenizer carried over from the HF base
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert "<|im_start|>" in fields["tokenizer.chat_template"]
    assert fields["general.architecture"] == "llama"
    # quantization through llama.cpp keeps our keys
    _, _, q = _token_types(converted["q8_0"].path)
    assert q[Keys.CATEGORIES] == fields[Keys.CATEGORIES]
    assert q["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_qwen2_architecture(tmp_path, refusal_tokens):
    """Qwen2: q/k/v biases, no q/k permutation, an untied lm_head, plus the six tokens."""
    from tests.tinymodel import build_qwen2_base, build_random_adapter

    build_qwen2_base(tmp_path / "qwen2")
    adapter = build_random_adapter(tmp_path / "qwen2", tmp_path / "qwen2-adapter", refusal_tokens)
    r = convert(str(tmp_path / "qwen2"), tmp_path / "qwen2.gguf", adapter=adapter, out_type="f32", verify=True)
    assert r.arch == "qwen2" and r.n_vocab == 390
    assert_logits_close(r.verify, 1e-3)
    tokens, types, fields = _token_types(r.path)
    assert fields["general.architecture"] == "qwen2"
    assert all(types[tokens.index(t)] == TokenType.CONTROL for t in refusal_tokens)


def test_plain_base_has_no_refusal_metadata(tiny_plain_gguf):
    tokens, _, fields = _token_types(tiny_plain_gguf)
    assert len(tokens) == 384 and not any(k.startswith("rtlocal.") for k in fields)


def test_cli_convert_and_inspect(tiny_base, tiny_adapter, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["convert", str(tiny_base), "--adapter", str(tiny_adapter), "--out", str(out), "--type", "f16"]) == 0
    assert "wrote" in capsys.readouterr().out and out.exists()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama" and info["file_type"] == "f16"
    assert [t["type"] for t in info["refusal_tokens"]] == ["CONTROL"] * 6
    assert [t["token"] for t in info["refusal_tokens"]][0] == "[respond]"
    assert info["parameters"] > 0 and info["size_bytes"] == out.stat().st_size
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[Requests with safety concerns]" in text and "CONTROL" in text and "refusal mode   categorical" in text


# ------------------------------------------------------------------ bad input


def _unsupported_dir(tmp_path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.tinymodel import train_tokenizer

    d = tmp_path / "gpt2"
    d.mkdir()
    tok = train_tokenizer(d)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).save_pretrained(d)
    return d


def _other_base_adapter(tmp_path: Path, refusal_tokens) -> Path:
    """An adapter trained on a differently shaped base (hidden 32 instead of 64)."""
    from tests.tinymodel import build_base, build_random_adapter

    other = tmp_path / "other"
    build_base(other, hidden=32)
    return build_random_adapter(other, tmp_path / "other-adapter", refusal_tokens)


@pytest.mark.parametrize(
    "case",
    ["missing", "not_gguf", "unsupported_arch", "other_base", "unwritable", "no_parent", "bad_type", "missing_adapter"],
)
def test_bad_input_one_line_error_no_partial(case, tiny_base, tiny_adapter, tmp_path, capsys, refusal_tokens):
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    base, adapter, extra = str(tiny_base), str(tiny_adapter), []
    expect = {
        "missing": "no such file or directory",
        "not_gguf": "not a GGUF file",
        "unsupported_arch": "unsupported architecture",
        "other_base": "trained on another base",
        "unwritable": "cannot write",
        "no_parent": "does not exist",
        "bad_type": "unknown output type",
        "missing_adapter": "no such adapter",
    }[case]
    if case == "missing":
        base = str(tmp_path / "nope.gguf")
    elif case == "not_gguf":
        base = str(tmp_path / "fake.gguf")
        Path(base).write_text("hello")
    elif case == "unsupported_arch":
        base, adapter = str(_unsupported_dir(tmp_path)), None
    elif case == "other_base":
        adapter = str(_other_base_adapter(tmp_path, refusal_tokens))
    elif case == "unwritable":
        out = Path("/proc/rtlocal-test.gguf")  # not writable, even for root
    elif case == "no_parent":
        out = tmp_path / "missing-dir" / "m.gguf"
    elif case == "bad_type":
        extra = ["--type", "q9_z"]
    elif case == "missing_adapter":
        adapter = str(tmp_path / "no-adapter")
    args = ["convert", base, "--out", str(out), *extra] + (["--adapter", adapter] if adapter else [])
    capsys.readouterr()  # drop what building the bad inputs printed
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and "\n" not in err and "Traceback" not in err
    assert expect in err
    assert not out.exists()
    if out.parent.exists() and out.parent != Path("/proc"):
        assert _no_leftovers(out.parent) == []
