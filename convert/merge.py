"""Load a base (HF id, HF dir or GGUF file), apply a PEFT adapter, and merge it.

A GGUF base is dequantised by transformers once and cached as a safetensors HF dir, keyed by the
file's size, mtime and name, because that load takes 20-90 s and every finetune/convert needs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtlocal.errors import RtlocalError, require_train_extra
from rtlocal.paths import cache_dir

log = logging.getLogger(__name__)

MANIFEST = "rtlocal.json"  # written by finetune next to the adapter


@dataclass
class Base:
    """A resolved base model reference."""

    spec: str  # what the user typed
    hf_dir: str  # something transformers.from_pretrained accepts (dir or hub id)
    gguf_path: Path | None  # the base GGUF, when the base is one (its vocab is copied verbatim)


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{h[:16]}"


def dequantised_base_dir(gguf_path: Path, *, progress: bool = False) -> Path:
    """The cached HF dir of a GGUF base, building it on first use (atomically)."""
    require_train_extra("loading a GGUF base")
    target = cache_dir() / "bases" / _gguf_cache_key(gguf_path)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    log.info("dequantising %s (once; cached in %s)", gguf_path.name, target)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        raise RtlocalError(f"cannot load GGUF base {gguf_path}: {str(e).splitlines()[0]}") from e
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_plain(model, tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _save_plain(model: Any, out: Path) -> None:
    """Save a GGUF-loaded model as a plain safetensors HF dir (transformers refuses save_pretrained on it)."""
    from safetensors.torch import save_file

    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)


def resolve_base(spec: str) -> Base:
    """Classify a base reference; a GGUF file is checked for the magic bytes."""
    p = Path(spec).expanduser()
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise RtlocalError(f"{spec}: not a GGUF file (and not a Hugging Face model dir)")
        return Base(spec, str(dequantised_base_dir(p)), p)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise RtlocalError(f"{spec}: directory has no config.json (not a Hugging Face model dir)")
        return Base(spec, str(p), None)
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise RtlocalError(f"{spec}: no such file or directory")
    return Base(spec, spec, None)  # a hub id: loaded by transformers (needs network or its cache)


def read_manifest(adapter_dir: Path | None) -> dict[str, Any]:
    if adapter_dir is None:
        return {}
    m = Path(adapter_dir) / MANIFEST
    if not m.exists():
        return {}
    try:
        return json.loads(m.read_text())
    except json.JSONDecodeError as e:
        raise RtlocalError(f"{m}: invalid JSON ({e})") from e


def quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers: rtlocal reports progress itself."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # PEFT reads transformers' deprecated alias when wrapping a model: not the user's concern
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def check_architecture(base: Base, adapter: Path | None) -> None:
    """Fail before loading weights when the architecture is not one convert can write."""
    from convert.gguf_export import gguf_arch

    src = Path(adapter) if adapter is not None and (Path(adapter) / "config.json").exists() else Path(base.hf_dir)
    if (src / "config.json").exists():
        gguf_arch(json.loads((src / "config.json").read_text()))


def load_merged(base: Base, adapter: Path | None, *, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer): the base with the adapter merged in, embeddings resized to the tokenizer."""
    require_train_extra("rtlocal convert")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    check_architecture(base, adapter)

    torch_dtype = getattr(torch, dtype)
    if adapter is not None and (adapter / "config.json").exists() and not (adapter / "adapter_config.json").exists():
        src = str(adapter)  # an already merged model dir
        adapter = None
    else:
        src = base.hf_dir
    tok_src = str(adapter) if adapter is not None and (adapter / "tokenizer_config.json").exists() else src
    try:
        tok = AutoTokenizer.from_pretrained(tok_src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise RtlocalError(f"cannot load base {base.spec!r}: {str(e).splitlines()[0]}") from e
    if adapter is None:
        return model, tok
    if not (adapter / "adapter_config.json").exists():
        raise RtlocalError(f"{adapter}: not a PEFT adapter dir (no adapter_config.json) nor a merged model")
    if len(tok) != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RtlocalError(f"adapter {adapter} does not fit base {base.spec!r} (trained on another base?): {first}") from e
    return peft_model.merge_and_unload(), tok
