"""Bad input is found before any work: flag values (exit 2, before a model loads), the config file
against its schema (`FILE: KEY: problem`), empty prompts alike from every source, and the GGUF's
refusal contract when the model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rtlocal.constants import Keys
from tests.test_cli_generate import run
from tests.test_evaluate import error_line

# A model that does not exist: if the flags were checked only after loading it, the error would be
# "not found" (exit 1); checked first, it is the flag's own error (exit 2).
NO_MODEL = "/nonexistent/model.gguf"
BAD_FLAGS = {
    "generate": [
        (["-s", "1.5"], "strictness must be in [0,1]"),
        (["-t", "2"], "threshold must be in [0,1]"),
        (["-t", "nan"], "threshold must be in [0,1]"),
        (["-t", "safety=0.3,all=0.2,safety=off"], "'safety' is given twice"),
        (["-s", "safety=strict,safety=off"], "'safety' is given twice"),
        (["-s", "strict,lenient"], "all categories are given twice"),
        (["--top-p", "0"], "--top-p"),
        (["--decision-temperature", "0"], "--decision-temperature must be a number > 0"),
        (["--bias", "safety=2"], "--bias applies only to --mode bias"),
        (["--mode", "free", "-s", "strict"], "apply only to --mode threshold"),
        (["--mode", "sideways"], "--mode must be"),
        (["--seed", "-1"], "--seed must be in"),
        (["--repeat-penalty", "0"], "--repeat-penalty"),
    ],
    "chat": [
        (["-s", "1.5"], "strictness must be in [0,1]"),
        (["--bias", "all=1"], "--bias applies only to --mode bias"),
        (["--seed", "-1"], "--seed must be in"),
    ],
    "eval": [
        (["-t", "2"], "threshold must be in [0,1]"),
        (["-s", "safety=strict,safety=off"], "'safety' is given twice"),
        (["--seed", "-1"], "--seed must be in"),
        (["--mode", "judge"], "--mode must be"),
    ],
    "calibrate": [
        (["--target", "recall=2"], "--target recall must be in (0,1]"),
        (["--target", "precision=0.9"], "--target must be"),
    ],
}
CASES = [(cmd, flags, msg) for cmd, cases in BAD_FLAGS.items() for flags, msg in cases]


def _argv(command: str, flags: list[str], data: Path) -> list[str]:
    if command in ("eval", "calibrate"):
        return [command, NO_MODEL, "--data", str(data), *flags]
    if command == "chat":
        return ["chat", "-m", NO_MODEL, "--plain", *flags]
    return ["generate", "-m", NO_MODEL, *flags, "hello"]


@pytest.mark.parametrize("command, flags, message", CASES, ids=[f"{c} {' '.join(f)}" for c, f, _ in CASES])
def test_bad_values_exit_2_before_any_model_loads(command, flags, message, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "hi", "should_refuse": True}) + "\n")
    rc, _, err = run(_argv(command, flags, data), capsys)
    assert rc == 2, err
    line = error_line(err)
    assert message in line and "not found" not in line


def test_an_unknown_category_is_bad_usage(tiny_gguf, capsys):
    rc, _, err = run(["generate", "-m", str(tiny_gguf), "-s", "safety=strict,nonsense=off", "hi"], capsys)
    assert rc == 2 and "unknown category 'nonsense'" in error_line(err)
    rc, _, err = run(["generate", "-m", str(tiny_gguf), "-t", "safety=0.3,[Requests with safety concerns]=0.2", "hi"], capsys)
    assert rc == 2 and "name the same category" in error_line(err)


# ------------------------------------------------------------------ the config file


@pytest.mark.parametrize(
    "line, key, problem",
    [
        ('threads = "four"', "threads", "expected an integer >= 1, got 'four' (a string)"),
        ("threads = 0", "threads", "expected an integer >= 1"),
        ("ctx = 10", "ctx", "expected an integer >= 64"),
        ("ctx = true", "ctx", "(a boolean)"),
        ("n_gpu_layers = 1.5", "n_gpu_layers", "expected an integer >= -1"),
        ("model = 3", "model", "expected a non-empty string"),
        ('strictness = "1.5"', "strictness", "strictness must be in [0,1]"),
        ("strictness = [1]", "strictness", "expected a string"),
        ('threshold = "safety=0.3,safety=off"', "threshold", "given twice"),
        ("calibration = 1", "calibration", "expected a non-empty string"),
        ("keymap = 3", "keymap", "expected a table"),
        ('keymap = { "chat.regenerate" = 5 }', "keymap", "expected a table"),
    ],
)
def test_the_config_file_is_checked_against_its_schema(line, key, problem, tiny_gguf, rtlocal_home, capsys):
    cfg = rtlocal_home / "config.toml"
    cfg.write_text(line + "\n")
    rc, _, err = run(["generate", "-m", str(tiny_gguf), "-n", "1", "hi"], capsys)
    assert rc == 1
    assert error_line(err).startswith(f"Error: {cfg}: {key}: ") and problem in error_line(err)


@pytest.mark.parametrize("line, threshold", [("strictness = 0.7", 0.3), ("threshold = 0.25", 0.25), ('strictness = "strict"', 0.2)])
def test_config_numbers_mean_what_the_flags_mean(line, threshold, tiny_gguf, rtlocal_home, capsys):
    (rtlocal_home / "config.toml").write_text(line + "\n")
    rc, out, err = run(["generate", "-m", str(tiny_gguf), "-n", "1", "--json", "hi"], capsys)
    assert rc == 0, err
    assert list(json.loads(out)["thresholds"].values()) == [pytest.approx(threshold)] * 5


# ------------------------------------------------------------------ empty prompts


@pytest.mark.parametrize("source", ["argument", "stdin", "jsonl"])
def test_an_empty_prompt_is_refused_from_every_source(source, tiny_gguf, tmp_path, capsys, monkeypatch):
    args, stdin = ["generate", "-m", str(tiny_gguf), "-n", "1"], None
    if source == "argument":
        args.append("   ")
    elif source == "stdin":
        stdin = "  \n\t\n"
    else:
        f = tmp_path / "in.jsonl"
        f.write_text(json.dumps({"prompt": " \n "}) + "\n")
        args += ["-i", str(f)]
    rc, out, err = run(args, capsys, stdin=stdin, monkeypatch=monkeypatch)
    assert rc == 1 and out == ""
    line = error_line(err)
    assert "no prompt" in line and "empty" in line
    if source == "jsonl":
        assert f"{f}:1:" in line


# ------------------------------------------------------------------ the GGUF's refusal contract


def _bad_model(tiny_gguf: Path, tmp_path: Path, case: str) -> Path:
    import gguf

    from rtlocal.runtime.gguf_edit import set_metadata

    cats = json.loads(gguf.GGUFReader(str(tiny_gguf)).fields[Keys.CATEGORIES].contents())
    values: dict = {}
    if case == "id outside the vocabulary":
        cats[0]["id"] = 99999
    elif case == "negative id":
        cats[2]["id"] = -4
    elif case == "shared id":
        cats[1]["id"] = cats[0]["id"]
    elif case == "threshold 7":
        cats[1]["threshold"] = 7
    elif case == "not a list":
        cats = {"name": "x"}
    elif case == "malformed calibration":
        values[Keys.CALIBRATION] = json.dumps({"categories": {cats[0]["name"]: [{"threshold": "high"}]}})
    elif case == "calibration out of range":
        values[Keys.CALIBRATION] = json.dumps({"categories": {cats[0]["name"]: [{"threshold": 0.5, "refusal_rate": 3}]}})
    elif case == "calibration of another model":
        values[Keys.CALIBRATION] = json.dumps({"categories": {}, "presets": {"strict": {"Elsewhere": 0.2}}})
    values.setdefault(Keys.CATEGORIES, json.dumps(cats))
    out = tmp_path / "bad.gguf"
    set_metadata(tiny_gguf, values, out=out)
    return out


@pytest.mark.parametrize(
    "case, key, message",
    [
        ("id outside the vocabulary", Keys.CATEGORIES, "token id 99999 of 'Humanizing requests' is outside the vocabulary"),
        ("negative id", Keys.CATEGORIES, "token id -4"),
        ("shared id", Keys.CATEGORIES, "share an id"),
        ("threshold 7", Keys.CATEGORIES, "the threshold of 'Incomplete requests' is 7"),
        ("not a list", Keys.CATEGORIES, "expected a JSON list"),
        ("malformed calibration", Keys.CALIBRATION, "the curve of 'Humanizing requests'"),
        ("calibration out of range", Keys.CALIBRATION, "values in [0,1]"),
        ("calibration of another model", Keys.CALIBRATION, "categories the model lacks (Elsewhere)"),
    ],
)
def test_the_refusal_contract_is_checked_when_the_model_loads(case, key, message, tiny_gguf, tmp_path, capsys):
    bad = _bad_model(tiny_gguf, tmp_path, case)
    # no flag uses the bad value: the model must be refused at load, not when a value is first read
    rc, out, err = run(["generate", "-m", str(bad), "-n", "1", "--json", "hi"], capsys)
    assert rc == 1 and out == ""
    line = error_line(err)
    assert line.startswith(f"Error: {bad.name}: malformed GGUF metadata {key}: ") and message in line


def test_a_good_model_still_loads(tiny_gguf, tmp_path, capsys):
    model = tmp_path / "good.gguf"
    shutil.copy(tiny_gguf, model)
    rc, _, err = run(["generate", "-m", str(model), "-n", "1", "hi"], capsys)
    assert rc == 0, err
