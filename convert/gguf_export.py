"""Write a merged Hugging Face causal LM as GGUF: tensors, hyperparameters, vocab and rtlocal metadata.

Small and explicit, in the manner of gguf-py's GGUFWriter: one table per architecture, one function
per section. Tensors arrive as numpy arrays under their Hugging Face names.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rtlocal.constants import CONTRACT_VERSION, DEFAULT_THRESHOLD, Keys, TokenType
from rtlocal.errors import RtlocalError

log = logging.getLogger(__name__)

# Hugging Face architecture name -> GGUF architecture name.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
# Output types written directly; anything else goes through llama.cpp's quantizer from f16/f32.
DIRECT_TYPES = ("f32", "f16")

_LAYER_TENSORS: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class Vocab:
    """Everything under `tokenizer.*` in a GGUF, with the refusal tokens already appended."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    token_types: list[int]
    pre: str | None = None
    merges: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/padding/...
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other tokenizer.* keys copied verbatim

    def add_control_tokens(self, new_tokens: list[str]) -> None:
        """Append tokens (or re-type existing ones) as CONTROL, so user text can never produce them."""
        index = {t: i for i, t in enumerate(self.tokens)}
        for tok in new_tokens:
            if tok in index:
                self.token_types[index[tok]] = int(TokenType.CONTROL)
                continue
            index[tok] = len(self.tokens)
            self.tokens.append(tok)
            self.token_types.append(int(TokenType.CONTROL))
            if self.scores is not None:
                self.scores.append(0.0)


@dataclass
class RefusalSpec:
    """The rtlocal.* metadata: which tokens open an answer and what they mean."""

    mode: str
    respond_token: str
    categories: list[str]
    category_tokens: list[str]
    thresholds: list[float] | None = None
    base_model: str = ""
    calibration: dict | None = None


def gguf_arch(config: Mapping[str, Any]) -> str:
    """The GGUF architecture for an HF config, or a clear error."""
    archs = config.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    model_type = config.get("model_type")
    by_type = {"llama": "llama", "qwen2": "qwen2"}
    if model_type in by_type:
        return by_type[model_type]
    supported = ", ".join(ARCHITECTURES)
    raise RtlocalError(f"unsupported architecture {archs or model_type!r} (supported: {supported})")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Llama q/k rows: HF's rotate-half order -> GGML's interleaved rope order (as convert_hf_to_gguf)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(
    tensors: Mapping[str, np.ndarray], config: Mapping[str, Any], arch: str
) -> Iterator[tuple[str, np.ndarray]]:
    """Rename (and for llama, permute) HF tensors to GGUF names, in file order."""
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    tied = bool(config.get("tie_word_embeddings", False))
    for name, arr in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name in _GLOBAL_TENSORS:
            if name == "lm_head.weight" and tied:
                continue  # llama.cpp reuses token_embd when output.weight is absent
            yield _GLOBAL_TENSORS[name], arr
            continue
        m = _LAYER_RE.match(name)
        if not m or m.group(2) not in _LAYER_TENSORS:
            raise RtlocalError(f"unexpected tensor {name!r} for architecture {arch}")
        layer, rest = m.group(1), m.group(2)
        if arch == "llama" and rest == "self_attn.q_proj.weight":
            arr = _permute(arr, n_head)
        elif arch == "llama" and rest == "self_attn.k_proj.weight":
            arr = _permute(arr, n_kv)
        yield f"blk.{layer}.{_LAYER_TENSORS[rest]}", arr


def _rope(config: Mapping[str, Any]) -> dict[str, Any]:
    """Rope settings: transformers 5 keeps them in `rope_parameters`, 4.x in rope_theta/rope_scaling."""
    rope = dict(config.get("rope_scaling") or {})
    rope.update(config.get("rope_parameters") or {})
    if "rope_theta" not in rope and "rope_theta" in config:
        rope["rope_theta"] = config["rope_theta"]
    return rope


def _add_hparams(w: Any, config: Mapping[str, Any], arch: str, n_vocab: int, name: str) -> None:
    n_embd = int(config["hidden_size"])
    n_head = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    w.add_name(name)
    w.add_context_length(int(config.get("max_position_embeddings", 2048)))
    w.add_embedding_length(n_embd)
    w.add_block_count(int(config["num_hidden_layers"]))
    w.add_feed_forward_length(int(config["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
    w.add_rope_dimension_count(head_dim)
    rope = _rope(config)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(n_vocab)
    if head_dim != n_embd // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise RtlocalError(f"rope scaling {rope!r} is not supported by rtlocal convert yet")


def _add_vocab(w: Any, vocab: Vocab) -> None:
    w.add_tokenizer_model(vocab.model)
    if vocab.pre:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    for kind, tid in vocab.special_ids.items():
        w.add_uint32(f"tokenizer.ggml.{kind}_token_id", int(tid))
    if vocab.add_bos is not None:
        w.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
    for key, value in vocab.extra.items():
        _add_any(w, key, value)


def _add_any(w: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value) if value >= 0 else w.add_int32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list):
        w.add_array(key, value)
    else:
        raise RtlocalError(f"cannot write metadata {key!r} of type {type(value).__name__}")


def add_refusal_metadata(w: Any, spec: RefusalSpec, vocab: Vocab) -> None:
    """The rtlocal.* keys, with token ids looked up in the final vocab."""
    index = {t: i for i, t in enumerate(vocab.tokens)}
    missing = [t for t in [spec.respond_token, *spec.category_tokens] if t not in index]
    if missing:
        raise RtlocalError(f"refusal tokens missing from the vocabulary: {', '.join(missing)}")
    thresholds = spec.thresholds or [DEFAULT_THRESHOLD] * len(spec.categories)
    cats = [
        {"name": c, "token": t, "id": index[t], "threshold": float(th)}
        for c, t, th in zip(spec.categories, spec.category_tokens, thresholds)
    ]
    w.add_uint32(Keys.VERSION, CONTRACT_VERSION)
    w.add_string(Keys.MODE, spec.mode)
    w.add_string(Keys.RESPOND_TOKEN, spec.respond_token)
    w.add_uint32(Keys.RESPOND_TOKEN_ID, index[spec.respond_token])
    w.add_string(Keys.CATEGORIES, json.dumps(cats, ensure_ascii=False))
    if spec.base_model:
        w.add_string(Keys.BASE_MODEL, spec.base_model)
    if spec.calibration:
        w.add_string(Keys.CALIBRATION, json.dumps(spec.calibration, sort_keys=True))


def write_gguf(
    path: Path,
    *,
    tensors: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    vocab: Vocab,
    refusal: RefusalSpec | None,
    out_type: str = "f16",
    name: str = "rtlocal model",
) -> None:
    """Write an f32/f16 GGUF to `path` (the caller handles the temporary name and the rename)."""
    import gguf

    if out_type not in DIRECT_TYPES:
        raise ValueError(f"write_gguf writes f32 or f16, got {out_type!r}")
    arch = gguf_arch(config)
    n_vocab = len(vocab.tokens)
    emb = tensors.get("model.embed_tokens.weight")
    if emb is None:
        raise RtlocalError("the model has no model.embed_tokens.weight tensor")
    if emb.shape[0] != n_vocab:
        raise RtlocalError(
            f"embedding has {emb.shape[0]} rows but the vocabulary has {n_vocab} tokens "
            "(was the adapter trained with other added tokens?)"
        )
    w = gguf.GGUFWriter(str(path), arch)
    _add_hparams(w, config, arch, n_vocab, name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if out_type == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    _add_vocab(w, vocab)
    if refusal is not None:
        add_refusal_metadata(w, refusal, vocab)
    for gname, arr in gguf_tensors(tensors, config, arch):
        arr = np.ascontiguousarray(arr)
        # llama.cpp keeps norms and biases in f32; matrices follow the output type.
        dtype = np.float16 if out_type == "f16" and arr.ndim == 2 else np.float32
        w.add_tensor(gname, arr.astype(dtype, copy=False))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
