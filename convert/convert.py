"""`rtlocal convert`: base + PEFT adapter -> merged model -> GGUF, refusal tokens as CONTROL tokens."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.gguf_export import DIRECT_TYPES, RefusalSpec, Vocab, gguf_arch, write_gguf
from convert.merge import MANIFEST, Base, load_merged, read_manifest, resolve_base
from convert.vocab import added_tokens, check_vocab_prefix, vocab_from_gguf, vocab_from_hf
from rtlocal.constants import COCONOT_CATEGORIES, RESPOND_TOKEN, TokenMode, category_of
from rtlocal.errors import RtlocalError
from rtlocal.paths import GGUF_FILE, check_output, discard, temp_path_for

log = logging.getLogger(__name__)

QUANT_TYPES = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0", "q4_1", "q3_k_m", "q2_k")
OUT_TYPES = DIRECT_TYPES + QUANT_TYPES
_TOKEN_RE = re.compile(r"^\[[^\[\]]+\]$")


@dataclass
class ConvertResult:
    path: Path
    out_type: str
    arch: str
    n_vocab: int
    refusal: RefusalSpec | None
    seconds: dict[str, float] = field(default_factory=dict)
    verify: Any = None  # convert.verify.VerifyReport when --verify


def refusal_spec(vocab: Vocab, manifest: dict[str, Any], base_spec: str) -> RefusalSpec | None:
    """The refusal metadata: from finetune's manifest, else found among the CONTROL tokens."""
    if manifest.get("categories"):
        cats = list(manifest["categories"])
        return RefusalSpec(
            mode=manifest.get("mode", TokenMode.CATEGORICAL.value),
            respond_token=manifest.get("respond_token", RESPOND_TOKEN),
            categories=cats,
            category_tokens=list(manifest.get("category_tokens") or [f"[{c}]" for c in cats]),
            thresholds=manifest.get("thresholds"),
            base_model=manifest.get("base", base_spec),
        )
    if RESPOND_TOKEN not in vocab.tokens:
        return None
    candidates = [
        t for t, ty in zip(vocab.tokens, vocab.token_types) if ty == 3 and _TOKEN_RE.match(t) and t != RESPOND_TOKEN
    ]
    if not candidates:
        return None
    cats = [category_of(t) for t in candidates]
    if cats == ["refuse"]:
        mode = TokenMode.SINGLE
    elif sorted(cats) == sorted(COCONOT_CATEGORIES):
        mode = TokenMode.CATEGORICAL
    else:
        mode = TokenMode.CUSTOM
    return RefusalSpec(mode=mode.value, respond_token=RESPOND_TOKEN, categories=cats, category_tokens=candidates, base_model=base_spec)


def build_vocab(base: Base, tokenizer: Any) -> Vocab:
    if base.gguf_path is not None:
        vocab = vocab_from_gguf(base.gguf_path)
        check_vocab_prefix(vocab, tokenizer)
        vocab.add_control_tokens(added_tokens(tokenizer, len(vocab.tokens)))
        return vocab
    return vocab_from_hf(tokenizer)


def quantize(src: Path, dst: Path, out_type: str, threads: int | None = None) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), metadata copied from src."""
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp logs each tensor otherwise
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{out_type.upper()}", None)
    if ftype is None:
        raise RtlocalError(f"llama.cpp in this install has no quant type {out_type}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=log.isEnabledFor(logging.DEBUG)):  # per-tensor fallback warnings
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RtlocalError(f"llama.cpp failed to quantize to {out_type} (code {rc})")


def convert(
    base: str,
    out: Path,
    *,
    adapter: Path | None = None,
    out_type: str = "f16",
    name: str | None = None,
    verify: bool = False,
    threads: int | None = None,
    force: bool = False,
) -> ConvertResult:
    """Merge `adapter` into `base` and write `out` as GGUF (written under a temporary name, then renamed).

    An existing `out` that is not a GGUF file is replaced only with `force`; `out` is never the base.
    """
    out = Path(out).expanduser()
    out_type = out_type.lower()
    if out_type not in OUT_TYPES:
        raise RtlocalError(f"unknown output type {out_type!r} (choose from {', '.join(OUT_TYPES)})")
    if adapter is not None and not Path(adapter).exists():
        raise RtlocalError(f"{adapter}: no such adapter directory")
    if adapter is not None and not Path(adapter).is_dir():
        raise RtlocalError(f"{adapter}: not a directory (expected a PEFT adapter dir or a merged model dir)")
    check_output(out, kind=GGUF_FILE, force=force, inputs=[base], flag="--out")
    adapter = Path(adapter) if adapter is not None else None
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    resolved = resolve_base(base)
    manifest = read_manifest(adapter)
    expected = manifest.get("base_fingerprint")
    if expected and resolved.gguf_path is not None and expected != fingerprint(resolved):
        raise RtlocalError(f"adapter {adapter} was trained on {manifest.get('base')!r}, not on {base!r}")
    times["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model, tokenizer = load_merged(resolved, adapter)
    config = model.config.to_dict()
    arch = gguf_arch(config)
    vocab = build_vocab(resolved, tokenizer)
    spec = refusal_spec(vocab, manifest, base)
    if spec is not None:
        vocab.add_control_tokens([spec.respond_token, *spec.category_tokens])
    tensors = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    times["merge"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tmp = temp_path_for(out)
    stage = tmp.with_name(tmp.name + ".f32")
    try:
        direct = out_type in DIRECT_TYPES
        write_gguf(
            tmp if direct else stage,
            tensors=tensors,
            config=config,
            vocab=vocab,
            refusal=spec,
            out_type=out_type if direct else "f32",
            name=name or out.stem,
        )
        if not direct:
            quantize(stage, tmp, out_type, threads)
        times["write"] = time.perf_counter() - t0
        result = ConvertResult(tmp, out_type, arch, len(vocab.tokens), spec, times)
        if verify:
            from convert.verify import verify_gguf

            t0 = time.perf_counter()
            result.verify = verify_gguf(tmp, model, tokenizer, out_type=out_type, threads=threads)
            times["verify"] = time.perf_counter() - t0
            if not result.verify.ok:
                raise RtlocalError(f"verification failed: {result.verify.summary()}")
        os.replace(tmp, out)
        result.path = out
        return result
    except OSError as e:
        raise RtlocalError(f"cannot write {out}: {e.strerror or e}") from e
    finally:
        discard(tmp)
        discard(stage)


def fingerprint(base: Base) -> str:
    """A stable identity of a base for the finetune manifest: the GGUF cache key or the HF spec."""
    if base.gguf_path is not None:
        from convert.merge import _gguf_cache_key

        return _gguf_cache_key(base.gguf_path).rsplit("-", 1)[-1]
    return base.spec


__all__ = ["MANIFEST", "OUT_TYPES", "ConvertResult", "convert", "fingerprint"]
