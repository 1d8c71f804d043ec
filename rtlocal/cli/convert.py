"""`rtlocal convert`: merge an adapter into its base and export GGUF (needs the 'train' extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rtlocal.cli.flags import ForceOpt, ThreadsOpt


def convert(
    base: Annotated[str, typer.Argument(help="Base model: a Hugging Face id, a local HF dir, or a GGUF file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output GGUF file.")],
    adapter: Annotated[Optional[Path], typer.Option("--adapter", "-a", help="PEFT adapter dir (or an already merged HF dir).")] = None,
    out_type: Annotated[str, typer.Option("--type", help="f32, f16, q8_0, q4_k_m, ... (quantized types via llama.cpp).")] = "f16",
    name: Annotated[Optional[str], typer.Option("--name", help="general.name in the GGUF.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Compare llama.cpp's logits with the merged model's; fail on mismatch.")] = False,
    threads: ThreadsOpt = None,
    force: ForceOpt = False,
) -> None:
    """Merge an adapter into its base and export GGUF with the refusal tokens as control tokens."""
    from rtlocal.errors import require_train_extra

    require_train_extra("rtlocal convert")
    from convert.convert import convert as do_convert

    r = do_convert(base, out, adapter=adapter, out_type=out_type, name=name, verify=verify, threads=threads, force=force)
    size = r.path.stat().st_size / 1e6
    toks = f"{len(r.refusal.categories)} refusal categories ({r.refusal.mode})" if r.refusal else "no refusal tokens"
    secs = " ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items())
    print(f"wrote {r.path} ({r.arch}, {r.out_type}, {size:.1f} MB, {r.n_vocab} tokens, {toks}; {secs})")
    if r.verify is not None:
        print(f"verify: {r.verify.summary()}")
