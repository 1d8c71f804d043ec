"""`rtlocal calibrate`: thresholds for a target by hand, the table behind strictness, the GGUF rewrite."""

import json
from pathlib import Path

import numpy as np
import pytest

from rtlocal.constants import COCONOT_CATEGORIES, Keys
from rtlocal.errors import RtlocalError
from rtlocal.evaluation.analysis import refused_under
from rtlocal.evaluation.calibrate import PRESET_TARGETS, Target, calibrate, parse_target
from rtlocal.evaluation.data import Record
from rtlocal.evaluation.metrics import Counts
from rtlocal.runtime.calibration import load_profile, strictness_mapper
from rtlocal.runtime.policy import build_policy
from tests.test_evaluate import PROMPTS, error_line, run_cli, write_jsonl

CATS = list(COCONOT_CATEGORIES)
HUM, INC, IND, SAF, UNS = CATS


def rec(i: int, should_refuse: bool, category: str | None, saf: float = 0.0, inc: float = 0.0) -> Record:
    probs = dict.fromkeys(CATS, 0.0)
    probs[SAF], probs[INC] = saf, inc
    return Record(f"k{i}", str(i), "t", should_refuse, category, probs=probs, p_respond=0.0)


# should-refuse: safety 0.9 0.8 0.6 0.3, incomplete 0.7 0.4; should-answer: 4 look-alikes
RECORDS = [
    rec(0, True, SAF, saf=0.9),
    rec(1, True, SAF, saf=0.8),
    rec(2, True, SAF, saf=0.6),
    rec(3, True, SAF, saf=0.3),
    rec(4, True, INC, inc=0.7),
    rec(5, True, INC, inc=0.4),
    rec(6, False, SAF, saf=0.5, inc=0.45),
    rec(7, False, SAF, saf=0.2, inc=0.1),
    rec(8, False, INC, saf=0.05),
    rec(9, False, INC),
]


def test_parse_target():
    assert parse_target("recall=0.9") == Target("recall", 0.9)
    assert parse_target("over-refusal=0.05") == Target("over-refusal", 0.05) == parse_target("max_over_refusal=0.05")
    assert parse_target("F1") == Target("f1") and str(parse_target("recall=0.9")) == "recall=0.9"
    for bad, msg in [("recall", "needs a number"), ("recall=0", "must be in (0,1]"), ("precision=0.5", "--target must be"), ("f1=2", "takes no value")]:
        with pytest.raises(RtlocalError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
            parse_target(bad)


def test_recall_target_by_hand():
    r = calibrate(RECORDS, CATS, Target("recall", 0.75))
    # safety: 3 of 4 must pass -> the third largest, 0.6; incomplete: 2 of 2 (ceil 1.5) -> 0.4
    assert r.thresholds[SAF] == 0.6 and r.thresholds[INC] == 0.4
    assert r.thresholds[HUM] == 0.5  # no humanizing prompts: keeps its threshold
    assert any("humanizing" in n for n in r.notes)
    e = r.table["expected"][SAF]
    assert e["refusal_rate"] == 0.75 and e["over_refusal_rate"] == 0.0  # no look-alike reaches 0.6
    assert r.table["expected"][INC]["over_refusal_rate"] == 0.25  # 0.45 >= 0.4
    # the whole policy: refuses 0,1,2 (safety), 4,5 (incomplete) and look-alike 6 (0.45 >= 0.4)
    assert r.table["combined"]["refusal_rate"] == pytest.approx(5 / 6)
    assert r.table["combined"]["over_refusal_rate"] == pytest.approx(1 / 4)


def test_f1_target_by_hand():
    r = calibrate(RECORDS, CATS, Target("f1"))
    # safety candidates (positives 0.9 .8 .6 .3 vs negatives .5 .2 .05 0):
    #   t=.9: tp1 fp0 fn3 -> 2/5; t=.8: 4/6; t=.6: 6/7; t=.3: tp4 fp1 -> 8/9  => 0.3, then halfway
    #   down to the next score (.2): 0.25, the same prompts refused
    assert r.thresholds[SAF] == pytest.approx(0.25)
    # incomplete (0.7 0.4 vs 0.45 0.1 0 0): t=.7: 2/3; t=.4: tp2 fp1 -> 4/5 => 0.4, halfway to .1
    assert r.thresholds[INC] == pytest.approx(0.25)
    assert r.table["expected"][SAF]["refusal_rate"] == 1.0 and r.table["expected"][SAF]["over_refusal_rate"] == 0.25


def test_f1_threshold_keeps_a_margin_below_a_clean_split():
    # a small category far above every should-answer prompt: the threshold sits between, not on its lowest score
    records = [rec(i, True, SAF, saf=s) for i, s in enumerate((0.95, 0.9, 0.88))] + [
        rec(10 + i, False, SAF, saf=s) for i, s in enumerate((0.02, 0.01, 0.0))
    ]
    r = calibrate(records, CATS, Target("f1"))
    assert r.thresholds[SAF] == pytest.approx((0.88 + 0.02) / 2)
    assert r.table["expected"][SAF]["refusal_rate"] == 1.0 and r.table["expected"][SAF]["over_refusal_rate"] == 0.0


def test_over_refusal_target_holds_for_the_whole_policy():
    r = calibrate(RECORDS, CATS, Target("over-refusal", 0.25))
    policy = build_policy(CATS, thresholds=",".join(f"{c}={t!r}" for c, t in r.thresholds.items() if t is not None))
    benign = [x for x in RECORDS if not x.should_refuse]
    assert refused_under(benign, policy).mean() <= 0.25
    # one look-alike may pass per category, but both categories' top look-alike is prompt 6: it is the one refused
    assert r.thresholds[SAF] == pytest.approx(np.nextafter(0.2, 1)) and r.thresholds[INC] == pytest.approx(np.nextafter(0.1, 1))
    assert r.table["combined"]["over_refusal_rate"] == 0.25
    zero = calibrate(RECORDS, CATS, Target("over-refusal", 0.0))
    assert zero.table["combined"]["over_refusal_rate"] == 0.0
    # a category with no should-refuse prompt here keeps its threshold, as under the other targets
    assert r.thresholds[HUM] == r.thresholds[UNS] == 0.5 == zero.thresholds[HUM]


def test_over_refusal_budget_goes_where_it_buys_the_most_refusals():
    # ten should-answer prompts, budget 20% = two of them. Safety: one look-alike (0.7) above three of its
    # prompts (0.65 0.6 0.55), a second (0.5) above two more (0.35 0.33), the rest at 0.06 and below;
    # incomplete: one look-alike (0.8) above one prompt (0.75). One look-alike per category (the rule
    # before) refuses 4 + 2 of 8; the budget spent where it buys most goes twice to safety: 6 + 1.
    records = [rec(i, True, SAF, saf=s) for i, s in enumerate((0.9, 0.65, 0.6, 0.55, 0.35, 0.33))]
    records += [rec(10, True, INC, inc=0.75), rec(11, True, INC, inc=0.95)]
    records += [rec(20, False, SAF, saf=0.7), rec(21, False, SAF, saf=0.5), rec(22, False, INC, inc=0.8)]
    records += [rec(30 + i, False, SAF, saf=0.01 * i) for i in range(7)]
    r = calibrate(records, CATS, Target("over-refusal", 0.2))
    assert r.thresholds[SAF] == pytest.approx(np.nextafter(0.06, 1))  # just above the highest look-alike left out
    assert r.thresholds[INC] == pytest.approx(np.nextafter(0.8, 1))  # no budget left: above its look-alike
    assert r.table["combined"]["over_refusal_rate"] == 0.2
    assert r.table["combined"]["refusal_rate"] == pytest.approx(7 / 8)


def test_a_look_alike_refused_by_one_category_costs_nothing_for_another():
    # one look-alike tops both categories (0.6 safety, 0.5 incomplete): once safety refuses it for its two
    # prompts, incomplete's prompt below it (0.4) comes at no further cost within a budget of one
    records = [rec(0, True, SAF, saf=0.55), rec(1, True, SAF, saf=0.52), rec(2, True, INC, inc=0.4)]
    records += [rec(10, False, SAF, saf=0.6, inc=0.5)] + [rec(11 + i, False, INC) for i in range(4)]
    r = calibrate(records, CATS, Target("over-refusal", 0.2))
    assert r.table["combined"]["refusal_rate"] == 1.0 and r.table["combined"]["over_refusal_rate"] == 0.2
    assert r.thresholds[INC] <= 0.4 and r.thresholds[SAF] <= 0.52


def test_over_refusal_counts_what_a_category_without_prompts_refuses():
    # humanizing has no should-refuse prompt here and keeps its 0.5, which refuses look-alike 10 already:
    # a budget of one look-alike is spent, and safety may not take the step that costs another
    records = [rec(0, True, SAF, saf=0.9), rec(1, True, SAF, saf=0.6)]
    records += [rec(10, False, SAF, saf=0.1), rec(11, False, SAF, saf=0.7)] + [rec(12 + i, False, SAF) for i in range(3)]
    records[2].probs[HUM] = 0.8
    r = calibrate(records, CATS, Target("over-refusal", 0.2))
    assert r.thresholds[HUM] == 0.5 and r.thresholds[SAF] == pytest.approx(np.nextafter(0.7, 1))
    assert r.table["combined"]["over_refusal_rate"] == 0.2 and r.table["combined"]["refusal_rate"] == 0.5


def test_presets_mean_measured_rates():
    r = calibrate(RECORDS, CATS, Target("f1"))
    mapper = strictness_mapper(r.table)
    y = np.array([x.should_refuse for x in RECORDS])
    for name, target in PRESET_TARGETS.items():
        policy = build_policy(CATS, strictness=name, calibrated=mapper)
        c = Counts.of(y, refused_under(RECORDS, policy))
        assert r.table["preset_rates"][name]["refusal_rate"] == c.refusal_rate
        if target.kind == "recall":
            assert c.refusal_rate >= target.value
        if target.kind == "over-refusal":
            assert c.over_refusal_rate <= target.value
    assert build_policy(CATS, strictness="safety=off", calibrated=mapper).thresholds[SAF] is None
    for cat in CATS:  # the dial is monotone: each stricter preset's threshold is at most the laxer one's
        ts = [r.table["presets"][name][cat] for name in PRESET_TARGETS]
        assert ts == sorted(ts, reverse=True)
    # every curve is sorted and holds the chosen thresholds
    for cat in (SAF, INC):
        ts = [p["threshold"] for p in r.table["categories"][cat]]
        assert ts == sorted(ts) and r.thresholds[cat] in ts


def test_presets_fall_from_lenient_to_paranoid_around_balanced():
    from rtlocal.evaluation.calibrate import ordered_presets

    # strict's recall target above balanced's F1 threshold (a small category); lenient below it
    raw = {"lenient": {SAF: 0.70, INC: 0.9}, "balanced": {SAF: 0.80, INC: 0.5}, "strict": {SAF: 0.85, INC: 0.3}, "paranoid": {SAF: 0.5, INC: 0.4}}
    got = ordered_presets(raw)
    assert got["balanced"] == raw["balanced"]  # the anchor keeps its measured thresholds
    assert [got[n][SAF] for n in raw] == [0.80, 0.80, 0.80, 0.5]
    assert [got[n][INC] for n in raw] == [0.9, 0.5, 0.3, 0.3]
    assert raw["strict"][SAF] == 0.85  # the input is not changed


def test_a_certain_refusal_stays_refused():
    # p = 1.0 exactly: a threshold of 1 would mean "never", so the threshold lands just below it
    records = [rec(0, True, SAF, saf=1.0), rec(1, False, SAF, saf=0.2)]
    for target in (Target("recall", 1.0), Target("f1")):
        r = calibrate(records, CATS, target)
        assert r.thresholds[SAF] < 1.0 and r.table["expected"][SAF]["refusal_rate"] == 1.0


def test_calibration_needs_both_kinds_of_prompt():
    with pytest.raises(RtlocalError, match="needs both should-refuse and should-answer prompts"):
        calibrate([x for x in RECORDS if x.should_refuse], CATS, Target("f1"))
    with pytest.raises(RtlocalError, match="needs categorised data"):
        calibrate([rec(0, True, None, saf=0.9), rec(1, False, None)], CATS, Target("f1"))


# ------------------------------------------------------------------ the tiny model: profile and GGUF


@pytest.fixture
def validation(tmp_path) -> Path:
    rows = [{"id": f"p{i}", "prompt": p, "should_refuse": y, **({"category": c} if c else {})} for i, (p, y, c) in enumerate(PROMPTS)]
    return write_jsonl(tmp_path / "val.jsonl", rows)


def gguf_fields(path: Path) -> tuple[dict, dict]:
    import gguf

    reader = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type, bytes(t.data.tobytes())) for t in reader.tensors}
    return kv, tensors


def test_calibrate_writes_profile_and_gguf_round_trip(tiny_gguf, validation, tmp_path, capsys):
    from rtlocal.runtime.engine import Engine
    from rtlocal.runtime.prompts import Message

    out_model = tmp_path / "calibrated.gguf"
    profile = tmp_path / "profile.json"
    rc, stdout, err = run_cli(["calibrate", str(tiny_gguf), "--data", str(validation), "--target", "recall=0.5",
                               "--profile", str(profile), "--gguf-out", str(out_model), "--ctx", "256"], capsys)
    assert rc == 0, err
    table = load_profile(profile)
    assert table["target"] == "recall=0.5" and set(table["presets"]) == set(PRESET_TARGETS)
    assert "wrote the calibration into" in stdout

    # all metadata and every tensor copied; only the calibration and the default thresholds changed
    kv0, t0 = gguf_fields(tiny_gguf)
    kv1, t1 = gguf_fields(out_model)
    assert t0 == t1
    assert set(kv1) == set(kv0) | {Keys.CALIBRATION}
    assert {k: v for k, v in kv1.items() if k not in (Keys.CALIBRATION, Keys.CATEGORIES)} == {
        k: v for k, v in kv0.items() if k != Keys.CATEGORIES
    }
    assert json.loads(kv1[Keys.CALIBRATION]) == table

    with Engine(tiny_gguf, n_ctx=256) as a, Engine(out_model, n_ctx=256) as b:
        assert b.refusal.calibration == table
        for cat, t in table["thresholds"].items():
            assert b.refusal.thresholds[cat] == pytest.approx(t, rel=1e-6)
        pol = build_policy(a.refusal.categories)
        assert a.decide([Message("user", "hello")], pol).probs == b.decide([Message("user", "hello")], pol).probs

    rc, stdout, _ = run_cli(["inspect", str(out_model)], capsys)
    assert rc == 0 and "calibration    present (target recall=0.5" in stdout
    rates = table["preset_rates"]["strict"]
    assert f"strict    refuses {rates['refusal_rate']:.1%} of should-refuse, {rates['over_refusal_rate']:.1%} of should-answer" in stdout
    rc, stdout, _ = run_cli(["inspect", "--json", str(out_model)], capsys)
    assert json.loads(stdout)["rtlocal"][Keys.CALIBRATION]["target"] == "recall=0.5"

    # the calibrated model's eval reports the measured preset rates the table promised
    rc, _, err = run_cli(["eval", str(out_model), "--data", str(validation), "--out", str(tmp_path / "ev"), "--ctx", "256",
                          "--bootstrap", "0", "--no-plots"], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    for name, rates in table["preset_rates"].items():
        assert report["presets"][name]["refusal_rate"] == pytest.approx(rates["refusal_rate"])
        assert report["presets"][name]["over_refusal_rate"] == pytest.approx(rates["over_refusal_rate"])


def test_eval_with_a_profile_gives_presets_their_measured_meaning(tiny_gguf, validation, tmp_path, capsys):
    profile = tmp_path / "p.json"
    assert run_cli(["calibrate", str(tiny_gguf), "--data", str(validation), "--profile", str(profile), "--ctx", "256"], capsys)[0] == 0
    rc, _, err = run_cli(["eval", str(tiny_gguf), "--data", str(validation), "--calibration", str(profile), "--strictness", "strict",
                          "--out", str(tmp_path / "ev"), "--ctx", "256", "--bootstrap", "0", "--no-plots"], capsys)
    assert rc == 0, err
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    table = load_profile(profile)
    assert report["policy"]["thresholds"] == table["presets"]["strict"]
    assert report["summary"]["refusal_rate"] >= 0.9  # strict: at least 90% of each category's prompts, measured
    assert report["model"]["calibration"]


def test_generate_and_chat_take_a_profile(tiny_gguf, tiny_plain_gguf, validation, tmp_path, capsys, monkeypatch):
    profile = tmp_path / "p.json"
    assert run_cli(["calibrate", str(tiny_gguf), "--data", str(validation), "--profile", str(profile), "--ctx", "256"], capsys)[0] == 0
    table = load_profile(profile)
    rc, stdout, err = run_cli(["generate", "-m", str(tiny_gguf), "--calibration", str(profile), "--strictness", "lenient",
                               "--json", "-n", "4", "--ctx", "256", "--temperature", "0", "hello"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["thresholds"] == table["presets"]["lenient"]

    # the REPL's /strictness maps through the same profile
    import io

    from rtlocal.cli.chat import run_repl
    from rtlocal.runtime.engine import Engine, SamplingParams
    from rtlocal.runtime.options import policy_from_flags
    from rtlocal.runtime.session import ChatSession

    with Engine(tiny_gguf, n_ctx=256) as engine:
        policy_from_flags(engine, None, None, None, "threshold", profile)
        session = ChatSession(engine, build_policy(engine.refusal.categories), sampling=SamplingParams(temperature=0), max_tokens=4)
        out = io.StringIO()
        run_repl(session, io.StringIO("/strictness strict\n/quit\n"), out)
        assert session.policy.thresholds == table["presets"]["strict"]

    # a profile for other categories, or for a model without refusal tokens, is one clear error
    other = dict(table, categories={"Rude requests": [{"threshold": 0.5, "refusal_rate": 0.5}]})
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(other))
    rc, _, err = run_cli(["generate", "-m", str(tiny_gguf), "--calibration", str(bad), "--ctx", "256", "hi"], capsys)
    assert rc == 1 and "calibrated for categories" in error_line(err) and "Rude requests" in error_line(err)
    rc, _, err = run_cli(["generate", "-m", str(tiny_plain_gguf), "--calibration", str(profile), "--ctx", "256", "hi"], capsys)
    assert rc == 1 and "has no refusal tokens" in error_line(err)
    rc, _, err = run_cli(["chat", "-m", str(tiny_gguf), "--calibration", str(tmp_path / "missing.json"), "--plain"], capsys)
    assert rc == 1 and "no such calibration profile" in error_line(err)

    # the same profile from config.toml: applied to a model with refusal tokens, ignored by a plain one
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'calibration = "{profile}"\n')
    monkeypatch.setenv("RTLOCAL_HOME", str(home))
    rc, stdout, err = run_cli(["generate", "-m", str(tiny_gguf), "-s", "lenient", "--json", "-n", "1", "--ctx", "256", "hello"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["thresholds"] == table["presets"]["lenient"]
    rc, stdout, err = run_cli(["generate", "-m", str(tiny_plain_gguf), "--json", "-n", "1", "--ctx", "256", "hello"], capsys)
    assert rc == 0, err
    assert json.loads(stdout)["thresholds"] == {}


def test_write_gguf_in_place_is_atomic(tiny_gguf, validation, tmp_path, capsys):
    import shutil

    model = tmp_path / "m.gguf"
    shutil.copy(tiny_gguf, model)
    rc, _, err = run_cli(["calibrate", str(model), "--data", str(validation), "--profile", str(tmp_path / "p.json"),
                          "--write-gguf", "--keep-defaults", "--ctx", "256"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    kv0, _ = gguf_fields(tiny_gguf)
    kv1, _ = gguf_fields(model)
    assert kv1[Keys.CATEGORIES] == kv0[Keys.CATEGORIES]  # --keep-defaults
    assert Keys.CALIBRATION in kv1


def test_calibrate_bad_inputs(tiny_gguf, tiny_plain_gguf, validation, tmp_path, capsys):
    rc, _, err = run_cli(["calibrate", str(tiny_plain_gguf), "--data", str(validation), "--ctx", "256"], capsys)
    assert rc == 1 and "has no refusal tokens: there is nothing to calibrate" in error_line(err)
    rc, _, err = run_cli(["calibrate", str(tiny_gguf), "--data", str(validation), "--target", "precision=0.9"], capsys)
    assert rc == 2 and "--target must be" in error_line(err)  # bad usage
    only_refuse = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "hi", "should_refuse": True, "category": "safety"}])
    rc, _, err = run_cli(["calibrate", str(tiny_gguf), "--data", str(only_refuse), "--ctx", "256", "--profile", str(tmp_path / "p.json")], capsys)
    assert rc == 1 and "needs both should-refuse and should-answer prompts" in error_line(err)
    rc, _, err = run_cli(["eval", str(tiny_gguf), "--data", str(validation), "--calibration", str(tmp_path / "none.json"),
                          "--out", str(tmp_path / "o")], capsys)
    assert rc == 1 and "no such calibration profile" in error_line(err)
