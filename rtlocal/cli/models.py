"""`rtlocal inspect` and `rtlocal models`: what a GGUF holds, and which models are installed."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def inspect_cmd(
    model: Annotated[str, typer.Argument(help="GGUF path or model name.")],
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show what a GGUF holds: architecture, size, refusal tokens and rtlocal metadata."""
    from rtlocal.runtime.gguf_info import format_report, inspect_gguf
    from rtlocal.runtime.models import resolve_model

    info = inspect_gguf(resolve_model(model))
    print(json.dumps(info, indent=2, ensure_ascii=False) if json_out else format_report(info))


def models_cmd() -> None:
    """List the models in the rtlocal models dir."""
    from rtlocal.paths import models_dir
    from rtlocal.runtime.models import list_models

    found = list_models()
    if not found:
        print(f"no models in {models_dir()} (run `rtlocal build`)")
    for m in found:
        print(f"{m.stem}\t{m.stat().st_size / 1e6:.1f} MB\t{m}")
