"""Build the GGUF vocabulary: copied verbatim from a base GGUF, or read from a Hugging Face tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from convert.gguf_export import Vocab
from rtlocal.constants import TokenType
from rtlocal.errors import RtlocalError

_SPECIAL_KINDS = ("bos", "eos", "unknown", "padding", "seperator", "cls", "mask", "eot", "eom")
# Pre-tokenizer regexes of well-known byte-level BPE tokenizers -> llama.cpp's pre-tokenizer names.
_PRE_BY_REGEX = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def vocab_from_gguf(path: Path) -> Vocab:
    """All tokenizer.* keys of a GGUF file, typed, ready to extend."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise RtlocalError(f"{path}: cannot read GGUF ({e})") from e
    fields: dict[str, Any] = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    try:
        vocab = Vocab(
            model=fields.pop("tokenizer.ggml.model"),
            tokens=list(fields.pop("tokenizer.ggml.tokens")),
            token_types=[int(t) for t in fields.pop("tokenizer.ggml.token_type")],
        )
    except KeyError as e:
        raise RtlocalError(f"{path}: GGUF has no tokenizer ({e.args[0]} missing)") from None
    vocab.pre = fields.pop("tokenizer.ggml.pre", None)
    vocab.merges = list(fields.pop("tokenizer.ggml.merges", []) or [])
    scores = fields.pop("tokenizer.ggml.scores", None)
    vocab.scores = [float(s) for s in scores] if scores is not None else None
    for kind in _SPECIAL_KINDS:
        key = f"tokenizer.ggml.{kind}_token_id"
        if key in fields:
            vocab.special_ids[kind] = int(fields.pop(key))
    vocab.add_bos = fields.pop("tokenizer.ggml.add_bos_token", None)
    vocab.add_eos = fields.pop("tokenizer.ggml.add_eos_token", None)
    vocab.chat_template = fields.pop("tokenizer.chat_template", None)
    vocab.extra = fields
    return vocab


def _pre_name(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [s.get("type") for s in steps]
    if "Digits" in types and "ByteLevel" in types:
        return "smollm"  # individual digits, then GPT-2 byte-level (SmolLM/StarCoder style)
    for s in steps:
        if s.get("type") == "Split":
            regex = (s.get("pattern") or {}).get("Regex")
            if regex in _PRE_BY_REGEX:
                return _PRE_BY_REGEX[regex]
            raise RtlocalError("unknown pre-tokenizer regex in tokenizer.json: cannot map it for llama.cpp")
    if types == ["ByteLevel"]:
        return "gpt-2"
    raise RtlocalError(f"unsupported pre-tokenizer {types} in tokenizer.json")


def vocab_from_hf(tokenizer: Any) -> Vocab:
    """A byte-level BPE vocab from a transformers fast tokenizer (added tokens included)."""
    raw = json.loads(tokenizer.backend_tokenizer.to_str())
    model = raw.get("model", {})
    if model.get("type") != "BPE":
        raise RtlocalError(f"tokenizer model {model.get('type')!r} is not supported from a Hugging Face dir; use a GGUF base")
    n = len(tokenizer)
    id_to_tok = {i: t for t, i in tokenizer.get_vocab().items()}
    if sorted(id_to_tok) != list(range(n)):
        raise RtlocalError("tokenizer ids are not contiguous: cannot write a GGUF vocabulary")
    added = {a["id"]: a for a in raw.get("added_tokens", [])}
    types = []
    for i in range(n):
        if i in added:
            types.append(int(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab = Vocab(model="gpt2", tokens=[id_to_tok[i] for i in range(n)], token_types=types, merges=merges)
    vocab.pre = _pre_name(raw)
    for kind, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unknown", "unk_token_id"), ("padding", "pad_token_id")):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            vocab.special_ids[kind] = int(tid)
    vocab.add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    template = getattr(tokenizer, "chat_template", None)
    vocab.chat_template = template if isinstance(template, str) else None
    return vocab


def check_vocab_prefix(vocab: Vocab, tokenizer: Any) -> None:
    """A base GGUF's tokens must be the first ids of the adapter's tokenizer: else it is another base."""
    n = len(vocab.tokens)
    if len(tokenizer) < n:
        raise RtlocalError(
            f"the adapter's tokenizer has {len(tokenizer)} tokens, fewer than the base's {n}: trained on another base?"
        )
    probe = [0, n // 3, n // 2, n - 1]
    hf = tokenizer.convert_ids_to_tokens(probe)
    if [vocab.tokens[i] for i in probe] != hf:
        raise RtlocalError("the adapter's tokenizer does not match the base GGUF's vocabulary: trained on another base?")


def added_tokens(tokenizer: Any, start: int) -> list[str]:
    """Tokens of the tokenizer at ids >= start, in id order."""
    return tokenizer.convert_ids_to_tokens(list(range(start, len(tokenizer))))


