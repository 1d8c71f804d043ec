"""The refusal-token contract: every token string, category alias, GGUF key and default lives here.

`finetune/`, `convert/` and `rtlocal/` import these names; nothing else spells them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum

RESPOND_TOKEN = "[respond]"
REFUSE_TOKEN = "[refuse]"


class Category(StrEnum):
    """The five CoCoNot refusal categories, spelled as in the paper (Jain et al., 2024)."""

    HUMANIZING = "Humanizing requests"
    INCOMPLETE = "Incomplete requests"
    INDETERMINATE = "Indeterminate requests"
    SAFETY = "Requests with safety concerns"
    UNSUPPORTED = "Unsupported requests"

    @property
    def token(self) -> str:
        return token_for(self.value)

    @property
    def alias(self) -> str:
        return CATEGORY_ALIASES[self]


# Short names people type on the command line. One alias per category.
CATEGORY_ALIASES: dict[Category, str] = {
    Category.HUMANIZING: "humanizing",
    Category.INCOMPLETE: "incomplete",
    Category.INDETERMINATE: "indeterminate",
    Category.SAFETY: "safety",
    Category.UNSUPPORTED: "unsupported",
}
COCONOT_CATEGORIES: tuple[str, ...] = tuple(c.value for c in Category)
SINGLE_CATEGORY = "refuse"  # the category name of single-token mode; its token is REFUSE_TOKEN


class TokenMode(StrEnum):
    """How refusals are spelled during training."""

    CATEGORICAL = "categorical"  # one token per CoCoNot category (the paper's default)
    SINGLE = "single"  # one [refuse] token
    CUSTOM = "custom"  # categories taken from the training data


def token_for(category: str) -> str:
    """The refusal token of a category name: `Incomplete requests` -> `[Incomplete requests]`."""
    if category == SINGLE_CATEGORY:
        return REFUSE_TOKEN
    return f"[{category}]"


def category_of(token: str) -> str:
    """Inverse of `token_for`."""
    if token == REFUSE_TOKEN:
        return SINGLE_CATEGORY
    if not (token.startswith("[") and token.endswith("]")) or len(token) < 3:
        raise ValueError(f"not a refusal token: {token!r}")
    return token[1:-1]


def alias_of(category: str) -> str:
    """The short name of a category (the alias for CoCoNot ones, a slug for custom ones)."""
    try:
        return CATEGORY_ALIASES[Category(category)]
    except ValueError:
        return category.lower().replace(" requests", "").replace(" ", "_")


def categories_for_mode(mode: TokenMode | str, custom: list[str] | None = None) -> list[str]:
    """Category names (in id order) for a token mode."""
    mode = TokenMode(mode)
    if mode is TokenMode.CATEGORICAL:
        return list(COCONOT_CATEGORIES)
    if mode is TokenMode.SINGLE:
        return [SINGLE_CATEGORY]
    if not custom:
        raise ValueError("custom token mode needs at least one category")
    return list(dict.fromkeys(custom))


def tokens_for_mode(mode: TokenMode | str, custom: list[str] | None = None) -> list[str]:
    """All added tokens for a mode, `[respond]` first."""
    return [RESPOND_TOKEN] + [token_for(c) for c in categories_for_mode(mode, custom)]


class Keys:
    """GGUF metadata keys written by `convert` and read by the runtime.

    Structured values are JSON strings: llama.cpp's metadata API hands arrays back only as
    strings (or not at all), while a JSON string survives every reader unchanged.
    """

    VERSION = "rtlocal.version"  # uint32, CONTRACT_VERSION
    MODE = "rtlocal.mode"  # string, a TokenMode value
    RESPOND_TOKEN = "rtlocal.respond_token"  # string
    RESPOND_TOKEN_ID = "rtlocal.respond_token_id"  # uint32
    # JSON: [{"name": "Incomplete requests", "token": "[Incomplete requests]", "id": 49153, "threshold": 0.5}, ...]
    CATEGORIES = "rtlocal.categories"
    BASE_MODEL = "rtlocal.base_model"  # string: what the model was trained from
    CALIBRATION = "rtlocal.calibration"  # JSON: the calibration table written by `rtlocal calibrate`


CONTRACT_VERSION = 1

# p_k >= threshold refuses with category k. 0.5 is "more likely refuse than not" for that reason.
DEFAULT_THRESHOLD = 0.5
# What `lenient` and `balanced` promise once a model is calibrated: at most this share of the validation
# split's should-answer prompts refused (rtlocal.evaluation.calibrate.PRESET_TARGETS).
OVER_REFUSAL_BUDGET = {"lenient": 0.01, "balanced": 0.05}


class TokenType(IntEnum):
    """llama.cpp's token types (llama_token_type), as stored in `tokenizer.ggml.token_type`."""

    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


class ExitCode(IntEnum):
    """Process exit codes of the `rtlocal` command (documented in the README)."""

    OK = 0
    ERROR = 1  # a user error: bad input, missing file, ...
    USAGE = 2  # a bad flag or argument (Typer/Click's own code)
    REFUSED = 3  # `generate --fail-on-refusal`: the model refused at least one prompt
    INTERRUPTED = 130


@dataclass(frozen=True)
class StrictnessPreset:
    """A named point on the strictness scale. Without calibration, threshold = 1 - strictness."""

    name: str
    strictness: float | None  # None: the category is switched off (never refuses)
    help: str


STRICTNESS_PRESETS: dict[str, StrictnessPreset] = {
    p.name: p
    for p in (
        StrictnessPreset("off", None, "never refuse for this category"),
        StrictnessPreset("lenient", 0.2, "refuse only when the model is sure (threshold 0.8)"),
        StrictnessPreset("balanced", 0.5, "refuse when refusing is more likely than not (threshold 0.5)"),
        StrictnessPreset("strict", 0.8, "refuse on a fair chance of refusal (threshold 0.2)"),
        StrictnessPreset("paranoid", 0.95, "refuse on any sign of a refusal (threshold 0.05)"),
    )
}
DEFAULT_STRICTNESS = "balanced"
