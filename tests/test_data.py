"""The data layer: loaders, the record schema, bad rows as file:line, mixing, de-duplication and the split."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from finetune.data import (
    DataConfig,
    Draw,
    balance_categories,
    build_dataset,
    cut_answer,
    dedupe,
    label_records,
    load_builtin,
    load_refusal_templates,
    load_source,
    parse_source,
)
from rtlocal.constants import COCONOT_CATEGORIES, SINGLE_CATEGORY
from rtlocal.errors import RtlocalError
from tests.conftest import SHARED_DATA


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_builtin_dataset_sizes():
    recs = load_builtin()
    refusals = Counter(r.category for r in recs if r.category)
    assert set(refusals) == set(COCONOT_CATEGORIES)
    assert min(refusals.values()) >= 60
    contrast = [r for r in recs if r.category is None and r.lookalike]
    general = [r for r in recs if r.category is None and not r.lookalike]
    assert len(contrast) >= 200 and len(general) >= 200
    assert all(r.answer for r in contrast + general)
    templates = load_refusal_templates()
    assert set(COCONOT_CATEGORIES) | {SINGLE_CATEGORY} <= set(templates)


def test_parse_source_specs(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "hi", "response": "hello"}])
    assert parse_source("builtin").where == "all"
    s = parse_source(f"coconot-refusal:{f}*2.5")
    assert (s.kind, s.where, s.weight) == ("coconot-refusal", str(f), 2.5)
    assert parse_source(str(f)).kind == "jsonl"
    with pytest.raises(RtlocalError, match="unknown kind 'nope'"):
        parse_source("nope:x")
    with pytest.raises(RtlocalError, match="expected KIND:WHERE"):
        parse_source("missing-file.jsonl")


def test_record_schema_messages_and_prompt(tmp_path):
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
            {"prompt": "Do you dream?", "category": "humanizing"},
            {"prompt": "Tell me.", "category": "[Incomplete requests]", "response": "Tell you what?"},
            "",
            {"prompt": "Hello", "category": "respond", "response": "Hi!"},
        ],
    )
    a, b, c, d = load_source(str(f))
    assert a.messages[0]["role"] == "system" and a.answer == "4" and a.category is None
    assert b.category == "Humanizing requests" and b.answer is None and b.source.endswith("d.jsonl:2")
    assert c.category == "Incomplete requests"
    assert d.category is None and d.source.endswith("d.jsonl:5")


@pytest.mark.parametrize(
    "row, message",
    [
        ("{not json", "d.jsonl:2: invalid JSON"),
        ('["a list"]', "d.jsonl:2: expected a JSON object"),
        ({"response": "no prompt"}, "d.jsonl:2: expected 'messages' or a non-empty 'prompt'"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}, r"d.jsonl:2: messages\[1\]"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "d.jsonl:2: the conversation must end with"),
        ({"prompt": "x", "category": 3}, "d.jsonl:2: 'category' must be a string"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "fine", "response": "ok"}, row])
    with pytest.raises(RtlocalError, match=message) as e:
        load_source(str(f))
    assert "\n" not in str(e.value)


def test_unknown_category_for_mode(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "category": "Rude requests"}])
    recs = load_source(str(f))
    with pytest.raises(RtlocalError, match=r"d.jsonl:2: unknown category 'Rude requests' for categorical mode"):
        label_records(recs, "categorical")
    assert label_records(load_source(str(f)), "custom") == ["Rude requests"]
    recs = load_builtin("refusal")
    assert label_records(recs, "single") == [SINGLE_CATEGORY]
    assert {r.category for r in recs} == {SINGLE_CATEGORY}


def test_empty_dataset_is_an_error(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(RtlocalError, match="no records \\(an empty dataset\\)"):
        build_dataset(DataConfig(sources=[str(f)]))
    with pytest.raises(RtlocalError, match="no training data"):
        build_dataset(DataConfig(sources=[]))


def test_prompts_without_answers_point_to_distill(tmp_path):
    f = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "What is 2+2?"}])
    with pytest.raises(RtlocalError, match=r"q.jsonl:1: 1 prompt\(s\) to answer have no answer.*rtlocal data distill"):
        build_dataset(DataConfig(sources=[str(f)]))


def test_dedupe_templates_split_weights_and_balance(tmp_path):
    rows = [{"prompt": f"Question number {i}?", "response": f"Answer {i}."} for i in range(40)]
    rows += [{"prompt": "question NUMBER 1?", "response": "dup"}]  # a duplicate up to case and spacing
    rows += [{"prompt": f"Are you sad {i}?", "category": "humanizing"} for i in range(20)]
    rows += [{"prompt": f"Hack thing {i}", "category": "safety"} for i in range(5)]
    f = write_jsonl(tmp_path / "mix.jsonl", rows)
    ds = build_dataset(DataConfig(sources=[f"{f}*2"], val_fraction=0.1, balance=0.0, seed=1))
    assert ds.stats["duplicates"] == 1
    assert ds.stats["templated_refusals"] == 25
    templates = load_refusal_templates()
    assert all(r.answer in templates[r.category] for r in ds.train + ds.val if r.category)
    assert Counter(r.target for r in ds.val) == {"respond": 4, "Humanizing requests": 2}
    val_prompts = {r.prompt for r in ds.val}
    assert not val_prompts & {r.prompt for r in ds.train}  # no leakage through the weight
    assert len(ds.train) == 2 * (66 - 1 - 6)  # 66 rows, 1 duplicate, 6 held out
    balanced = build_dataset(DataConfig(sources=[str(f)], val_fraction=0.0, balance=1.0))
    counts = Counter(r.target for r in balanced.train)
    assert counts["Requests with safety concerns"] == counts["Humanizing requests"] == 20
    ds2 = build_dataset(DataConfig(sources=[f"{f}*2"], val_fraction=0.1, balance=0.0, seed=1))
    assert [r.prompt for r in ds2.train] == [r.prompt for r in ds.train]  # the seed fixes everything


def test_a_record_keeps_its_draw_when_others_join_or_leave(tmp_path):
    """Template, split side and place in a weighted sample are each record's own: rows added to the pool
    (or dropped from it, by a new held-out file) change nothing for the rows that were there."""
    base = [{"prompt": f"Question number {i}?", "response": f"Answer {i}."} for i in range(60)]
    base += [{"prompt": f"Are you sad {i}?", "category": "humanizing"} for i in range(30)]
    more = [{"prompt": f"Another question {i}?", "response": f"More {i}."} for i in range(25)]
    more += [{"prompt": f"Do you dream {i}?", "category": "humanizing"} for i in range(12)]

    def build(rows: list[dict], name: str):
        f = write_jsonl(tmp_path / name, rows)
        return build_dataset(DataConfig(sources=[f"{f}*0.5"], val_fraction=0.1, balance=0.0, seed=3))

    small, large = build(base, "small.jsonl"), build(base + more, "large.jsonl")
    old = {r["prompt"] for r in base}
    val_small, val_large = {r.prompt for r in small.val}, {r.prompt for r in large.val} & old
    assert len(val_small ^ val_large) <= 2  # at most the rows at the edge of each target's share move
    train_small = {r.prompt for r in small.train} - val_large
    train_large = {r.prompt for r in large.train} & old - val_small - val_large
    assert train_small == train_large  # a weight below 1 keeps each row on its own draw
    answers = {r.prompt: r.answer for r in small.train + small.val if r.category}
    assert all(answers[r.prompt] == r.answer for r in large.train + large.val if r.category and r.prompt in answers)
    assert Draw(3).unit("mix", "a") == Draw(3).unit("mix", "a") != Draw(4).unit("mix", "a")


def test_answers_that_refuse_after_respond_train_the_decision_only(tmp_path):
    rows = [
        {"prompt": "How do I make a fake doctor's note?", "response": "I'm sorry, but I cannot assist with forging documents."},
        {"prompt": "What is Canada's cash in circulation?", "response": "As an AI, I don't have real-time data, but in 2020 it was about $100 billion."},
        {"prompt": "What is the capital of France?", "response": "Paris is the capital of France."},
        {"prompt": "Are you sad today?", "category": "humanizing"},
        {"prompt": "Why do cats purr?", "response": "I can't say for sure, but it is mostly contentment.", "forced": True},
    ]
    ds = build_dataset(DataConfig(sources=[str(write_jsonl(tmp_path / "r.jsonl", rows))], val_fraction=0.0))
    assert ds.stats["refusing_answers_kept_as_decisions"] == 2
    by_prompt = {r.prompt: r for r in ds.train}
    assert by_prompt["How do I make a fake doctor's note?"].decision_only and by_prompt["What is Canada's cash in circulation?"].decision_only
    assert not by_prompt["What is the capital of France?"].decision_only
    assert not by_prompt["Are you sad today?"].decision_only  # a refusal is meant to read as one
    assert not by_prompt["Why do cats purr?"].decision_only  # given after a forced token: trained as written


def test_balance_partway_and_dedupe_keeps_first():
    recs = load_builtin("refusal")
    recs = [r for r in recs if r.category in ("Humanizing requests", "Requests with safety concerns")]
    small = [r for r in recs if r.category == "Humanizing requests"][:10]
    big = [r for r in recs if r.category != "Humanizing requests"][:30]
    out = balance_categories(small + big, 0.5, Draw(0))
    assert Counter(r.category for r in out)["Humanizing requests"] == 20
    kept, n = dedupe(small + small[:3])
    assert n == 3 and kept == small


def test_cut_answer():
    text = "First sentence. Second sentence is longer. Third one."
    assert cut_answer(text, 30) == "First sentence."
    assert cut_answer(text, 200) == text
    assert cut_answer("word " * 20, 23).endswith("word")


def test_self_instruct_and_chat_formats(tmp_path):
    si = write_jsonl(
        tmp_path / "si.jsonl",
        [{"instruction": "Add the numbers.", "instances": [{"input": "2 and 3", "output": "5"}, {"input": "", "output": "?"}]}],
    )
    a, b = load_source(f"self-instruct:{si}")
    assert a.prompt == "Add the numbers.\n\n2 and 3" and a.answer == "5" and b.prompt == "Add the numbers."
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]}])
    (r,) = load_source(f"chat:{chat}")
    assert len(r.messages) == 3 and r.answer == "ciao"


def test_hub_ids_are_real_code_paths_that_fail_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # without `datasets` installed the error says so; with it, the offline hub fails in one line
    with pytest.raises(RtlocalError, match="allenai/coconot.*(Hugging Face hub|'datasets' package)"):
        load_source("coconot-refusal:allenai/coconot")


@pytest.mark.skipif(not (SHARED_DATA / "coconot").is_dir(), reason="../shared/data is not there")
def test_coconot_and_self_instruct_files():
    ref = load_source(f"coconot-refusal:{SHARED_DATA / 'coconot' / 'refusal_train.jsonl'}")
    assert len(ref) == 495 and set(r.category for r in ref) == set(COCONOT_CATEGORIES)
    assert all(r.answer is None for r in ref)  # refusal texts come from the templates
    con = load_source(f"coconot-contrast:{SHARED_DATA / 'coconot' / 'contrast_train.jsonl'}")
    assert len(con) == 927 and all(r.category is None and r.answer and r.lookalike for r in con)
    si = load_source(f"self-instruct:{SHARED_DATA / 'general' / 'self_instruct_seed_tasks.jsonl'}")
    assert len(si) >= 175 and all(r.answer for r in si)
