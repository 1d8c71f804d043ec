"""The refusal-token contract: spellings, aliases and modes."""

import pytest

from rtlocal.constants import (
    CATEGORY_ALIASES,
    COCONOT_CATEGORIES,
    REFUSE_TOKEN,
    RESPOND_TOKEN,
    Category,
    alias_of,
    categories_for_mode,
    category_of,
    token_for,
    tokens_for_mode,
)


def test_paper_spellings():
    assert tokens_for_mode("categorical") == [
        "[respond]",
        "[Humanizing requests]",
        "[Incomplete requests]",
        "[Indeterminate requests]",
        "[Requests with safety concerns]",
        "[Unsupported requests]",
    ]
    assert tokens_for_mode("single") == [RESPOND_TOKEN, REFUSE_TOKEN] == ["[respond]", "[refuse]"]


def test_aliases_round_trip():
    assert sorted(CATEGORY_ALIASES.values()) == ["humanizing", "incomplete", "indeterminate", "safety", "unsupported"]
    for c in Category:
        assert category_of(token_for(c.value)) == c.value
        assert c.token == token_for(c.value)
        assert alias_of(c.value) == c.alias
    assert alias_of("Medical advice requests") == "medical_advice"


def test_custom_mode_dedupes_and_requires_categories():
    assert categories_for_mode("custom", ["A", "B", "A"]) == ["A", "B"]
    with pytest.raises(ValueError):
        categories_for_mode("custom", [])
    assert categories_for_mode("categorical") == list(COCONOT_CATEGORIES)
    with pytest.raises(ValueError):
        category_of("respond")
