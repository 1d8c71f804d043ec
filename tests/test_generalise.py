"""bench/generalise.py: its operating point and per-group rows, checked by hand (no model needed)."""

import pytest

from bench.generalise import by_group, first_token_rows, judged_rows, main, slugs, tau_for_over_refusal
from rtlocal.constants import COCONOT_CATEGORIES
from rtlocal.evaluation.data import EvalItem, Record
from rtlocal.runtime.policy import build_policy

CATS = list(COCONOT_CATEGORIES)
SAF, HUM = CATS[3], CATS[0]


def rec(i: int, should_refuse: bool, saf: float, hum: float = 0.0, group: str = "g") -> tuple[EvalItem, Record]:
    probs = dict.fromkeys(CATS, 0.0) | {SAF: saf, HUM: hum}
    item = EvalItem(f"k{i}", str(i), "t", f"prompt {i}", should_refuse, subcategory=group)
    return item, Record(f"k{i}", str(i), "t", should_refuse, None, probs=probs, p_respond=1 - saf - hum)


def test_tau_is_the_lowest_global_threshold_within_the_over_refusal_budget():
    # ten safe prompts: safety 0.0 .. 0.8 and one humanizing 0.9; with <= 10% over-refusal only that one may pass
    safe = [rec(i, False, i / 10) for i in range(9)] + [rec(9, False, 0.0, hum=0.9)]
    harmful = [rec(10, True, 0.95), rec(11, True, 0.85), rec(12, True, 0.3)]
    records = [r for _, r in safe + harmful]
    tau = tau_for_over_refusal(records)
    assert tau == pytest.approx(0.85)  # 0.85 is a harmful score: every t in (0.8, 0.85] refuses the same prompts
    row = first_token_rows(records, build_policy(CATS), tau)
    assert row["at_tau"] == {"refused": pytest.approx(2 / 3), "over_refused": pytest.approx(0.1)}
    # balanced (0.5 each): safety 0.5, 0.6, 0.7, 0.8 and humanizing 0.9 pass
    assert row["balanced"] == {"refused": pytest.approx(2 / 3), "over_refused": pytest.approx(0.5)}
    assert row["n_should_refuse"] == 3 and row["n_should_answer"] == 10 and 0.5 < row["auroc"] < 1
    assert tau_for_over_refusal([r for _, r in harmful]) is None  # no should-answer prompts: no τ of its own


def test_rows_per_group_and_one_class_sources():
    pairs = [rec(0, True, 0.9, group="homonyms"), rec(1, False, 0.1, group="homonyms"), rec(2, True, 0.2, group="definitions")]
    items, records = zip(*pairs)
    groups = by_group(items, records, "subcategory", lambda rs: first_token_rows(rs, build_policy(CATS), None))
    assert list(groups) == ["definitions", "homonyms"]
    assert groups["homonyms"]["auroc"] == 1.0 and groups["definitions"]["auroc"] is None  # one class: n/a
    assert groups["definitions"]["balanced"] == {"refused": 0.0, "over_refused": None}
    judged = [Record("a", "a", "t", True, None, judge_refused=True), Record("b", "b", "t", False, None, judge_refused=False)]
    assert judged_rows(judged) == {"n": 2, "n_should_refuse": 1, "n_should_answer": 1, "judged_refusal": 0.5,
                                   "refused": 1.0, "over_refused": 0.0}


def test_model_folders_and_bad_input(tmp_path, capsys):
    from pathlib import Path

    assert slugs([Path("a/m.gguf"), Path("b/m.gguf"), Path("x.gguf")]) == ["m", "m-2", "x"]
    assert main([str(tmp_path / "missing.gguf")]) == 1
    assert capsys.readouterr().err.strip() == f"Error: {tmp_path / 'missing.gguf'}: no such model file"
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    assert main([str(model), "--lookalike", str(tmp_path / "none.jsonl")]) == 1
    assert "none.jsonl: no such file (a look-alike validation set; --lookalike PATH names another)" in capsys.readouterr().err
    assert main([str(model), "--lookalike-other", str(tmp_path / "none.jsonl")]) == 1
    assert "none.jsonl: no such file (a look-alike validation set; --lookalike-other PATH names another)" in capsys.readouterr().err
    assert main([str(model), "--framed", str(tmp_path / "none.jsonl")]) == 1
    assert "none.jsonl: no such file (a look-alike validation set; --framed PATH names another)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--generate", "0", str(model)])
    assert e.value.code == 2


def test_framed_validation_is_what_its_script_writes():
    import json

    from bench.generalise import DEFAULT_FRAMED, DEFAULT_LOOKALIKE
    from bench.validation.make_framed import FRAMINGS, framed_rows

    rows = [json.loads(line) for line in DEFAULT_LOOKALIKE.read_text().splitlines() if line.strip()]
    written = [json.loads(line) for line in DEFAULT_FRAMED.read_text().splitlines()]
    assert written == framed_rows(rows) and len(written) == 100 * 2 * (len(FRAMINGS) + 1)
    # each framed prompt keeps its look-alike's label, and carries the look-alike inside it (typos aside)
    source = {r["id"]: r for r in rows}
    for r in written:
        orig = source[r["id"].rsplit("-", 1)[0]]
        assert r["should_refuse"] == orig["should_refuse"] and r["category"] == orig["category"]
        if r["framing"] not in ("typos", "hypothetical"):
            assert orig["prompt"] in r["prompt"]
