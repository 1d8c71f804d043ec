"""`rtlocal generate` and the line-mode `rtlocal chat` through the real CLI entry point."""

from __future__ import annotations

import io
import json

import pytest

from rtlocal.cli import main
from rtlocal.constants import COCONOT_CATEGORIES, ExitCode

RECORD_SCHEMA = {
    "id": (int, str, type(None)),
    "text": str,
    "decision": str,
    "category": (str, type(None)),
    "category_alias": (str, type(None)),
    "probabilities": dict,
    "p_respond": (float, type(None)),
    "mode": str,
    "thresholds": dict,
    "prompt_tokens": int,
    "completion_tokens": int,
    "stop_reason": str,
    "timings": dict,
}
TIMING_KEYS = {"prompt_ms", "decision_ms", "first_token_ms", "decode_ms", "tokens_per_second"}


def run(args, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = main(args)
    out, err = capsys.readouterr()
    return rc, out, err


def check_record(rec: dict) -> None:
    assert set(rec) == set(RECORD_SCHEMA)
    for k, types in RECORD_SCHEMA.items():
        assert isinstance(rec[k], types), k
    assert set(rec["timings"]) == TIMING_KEYS
    assert rec["decision"] in ("respond", "refuse")
    assert list(rec["probabilities"]) == list(COCONOT_CATEGORIES)
    assert (rec["category"] is None) == (rec["decision"] == "respond")


def test_json_schema_is_pinned(tiny_gguf, capsys):
    rc, out, _ = run(["generate", "-m", str(tiny_gguf), "--json", "-n", "5", "--temperature", "0", "Hello", "there"], capsys)
    assert rc == 0
    rec = json.loads(out)
    check_record(rec)
    assert rec["id"] is None and rec["completion_tokens"] <= 5 and rec["mode"] == "threshold"
    assert all(v == 0.5 for v in rec["thresholds"].values())


def test_threshold_flags_force_refuse_and_respond(tiny_gguf, capsys):
    rc, out, _ = run(["generate", "-m", str(tiny_gguf), "--json", "-n", "3", "-t", "all=0", "hi"], capsys)
    rec = json.loads(out)
    assert rc == 0 and rec["decision"] == "refuse" and rec["category"] in COCONOT_CATEGORIES
    assert rec["probabilities"][rec["category"]] == max(rec["probabilities"].values())
    rc, out, _ = run(["generate", "-m", str(tiny_gguf), "--json", "-n", "3", "--strictness", "off", "hi"], capsys)
    assert json.loads(out)["decision"] == "respond"
    rc, _, _ = run(["generate", "-m", str(tiny_gguf), "-n", "3", "-t", "all=0", "--fail-on-refusal", "hi"], capsys)
    assert rc == ExitCode.REFUSED


def test_jsonl_batch_from_file(tiny_gguf, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"id": "a", "prompt": "one"}) + "\n\n"
        + json.dumps({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two"}]}) + "\n"
    )
    rc, out, _ = run(["generate", "-m", str(tiny_gguf), "-i", str(src), "--jsonl", "-n", "2", "-t", "safety=force"], capsys)
    lines = [json.loads(x) for x in out.splitlines()]
    assert rc == 0 and [r["id"] for r in lines] == ["a", 3]
    for r in lines:
        check_record(r)
        assert r["category"] == "Requests with safety concerns" and r["category_alias"] == "safety"
    rc, out, _ = run(["generate", "-m", str(tiny_gguf), "-i", str(src), "--json", "-n", "2"], capsys)
    assert rc == 0 and isinstance(json.loads(out), list) and len(json.loads(out)) == 2


def test_prompt_from_stdin_plain_text(tiny_gguf, capsys, monkeypatch):
    rc, out, err = run(["generate", "-m", str(tiny_gguf), "-n", "4", "--seed", "1"], capsys, "What is 2+2?\n", monkeypatch)
    assert rc == 0 and out.endswith("\n") and "[respond]" not in out and err == ""


def test_plain_model_notes_once(tiny_plain_gguf, capsys):
    rc, out, err = run(["generate", "-m", str(tiny_plain_gguf), "--jsonl", "-n", "2", "hi"], capsys)
    assert rc == 0 and "no refusal tokens" in err and json.loads(out)["probabilities"] == {}


def test_model_by_name_and_env(tiny_gguf, rtlocal_home, capsys, monkeypatch):
    models = rtlocal_home / "models"
    models.mkdir()
    (models / "tiny.gguf").symlink_to(tiny_gguf)
    assert run(["generate", "-m", "tiny", "-n", "1", "hi"], capsys)[0] == 0
    monkeypatch.setenv("RTLOCAL_MODEL", "tiny")
    assert run(["generate", "-n", "1", "hi"], capsys)[0] == 0
    rc, out, _ = run(["models"], capsys)
    assert rc == 0 and out.startswith("tiny\t")


def test_config_file_sets_defaults(tiny_gguf, rtlocal_home, capsys):
    (rtlocal_home / "config.toml").write_text(f'model = "{tiny_gguf}"\nthreshold = "all=0"\n')
    rc, out, _ = run(["generate", "--json", "-n", "1", "hi"], capsys)
    assert rc == 0 and json.loads(out)["decision"] == "refuse"
    (rtlocal_home / "config.toml").write_text("colour = 'blue'\n")
    rc, _, err = run(["generate", "-n", "1", "hi"], capsys)
    assert rc == 1 and "unknown setting(s) colour" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["-t", "bogus=0.5"], "unknown category 'bogus'"),
        (["-t", "safety=1.5"], "threshold must be in [0,1]"),
        (["-s", "extreme"], "strictness must be one of"),
        (["--mode", "wild"], "--mode must be threshold, bias or free"),
        (["--json", "--jsonl"], "choose one of --json and --jsonl"),
    ],
)
def test_bad_flags_one_line_error(tiny_gguf, capsys, args, message):
    rc, out, err = run(["generate", "-m", str(tiny_gguf), *args, "hi"], capsys)
    assert rc == 2 and out == ""  # bad usage (README: exit codes)
    assert err.startswith("Error: ") and message in err and err.count("\n") == 1


def test_missing_model_and_not_gguf(tmp_path, capsys):
    rc, _, err = run(["generate", "-m", str(tmp_path / "nope.gguf"), "hi"], capsys)
    assert rc == 1 and "not found" in err and err.count("\n") == 1
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a model")
    rc, _, err = run(["generate", "-m", str(bad), "hi"], capsys)
    assert rc == 1 and "not a GGUF file" in err
    rc, _, err = run(["generate", "hi"], capsys)
    assert rc == 1 and "rtlocal build" in err


def test_threshold_on_plain_model_is_an_error(tiny_plain_gguf, capsys):
    rc, _, err = run(["generate", "-m", str(tiny_plain_gguf), "-t", "safety=0.3", "hi"], capsys)
    assert rc == 1 and "has no refusal tokens" in err and err.count("\n") == 1


def test_malformed_jsonl_line_stops_or_skips(tiny_gguf, tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "ok"}\n{"prompt": \n{"nothing": 1}\n{"prompt": "fine"}\n')
    rc, out, err = run(["generate", "-m", str(tiny_gguf), "-i", str(src), "--jsonl", "-n", "1"], capsys)
    assert rc == 1 and f"{src}:2:" in err and "--skip-bad" in err and err.count("\n") == 1
    assert len(out.splitlines()) == 1  # the line before the bad one was answered and written
    rc, out, err = run(["generate", "-m", str(tiny_gguf), "-i", str(src), "--jsonl", "-n", "1", "--skip-bad"], capsys)
    assert rc == 0 and len(out.splitlines()) == 2
    assert f"{src}:2:" in err and f"{src}:3:" in err


def test_usage_errors_exit_2(capsys):
    assert main(["generate", "--max-tokens", "0", "hi"]) == 2
    assert main(["no-such-command"]) == 2


def test_chat_repl_commands(tiny_gguf, capsys, monkeypatch):
    script = "\n".join(
        ["/strictness paranoid,safety=off", "/policy", "Hello", "/threshold all=0", "again", "/system be kind", "/reset", "/bogus", "/threshold", "/quit"]
    )
    rc, out, err = run(["chat", "-m", str(tiny_gguf), "--plain", "-n", "3", "--seed", "2"], capsys, script + "\n", monkeypatch)
    assert rc == 0, err
    assert "safety off" in out and "incomplete 0.05" in out
    assert out.count("[refused: ") >= 1  # the turn after /threshold all=0
    assert "system prompt set" in out and "history cleared" in out
    assert "unknown command /bogus" in out and "usage: /threshold" in out


@pytest.mark.parametrize("ctx", ["64", "100"])
def test_small_context_ends_the_answer_instead_of_crashing(tiny_gguf, capsys, ctx):
    rc, out, err = run(
        ["generate", "-m", str(tiny_gguf), "--json", "-n", "300", "--temperature", "0", "--ctx", ctx, "Write a long story about a dragon"],
        capsys,
    )
    assert rc == 0, err
    rec = json.loads(out)
    check_record(rec)
    assert rec["stop_reason"] in ("context", "eos") and rec["completion_tokens"] > 0


# ------------------------------------------------------------------ batches: bad items, Ctrl-C


def _batch(tmp_path, middle: bytes) -> "Path":
    src = tmp_path / "batch.jsonl"
    src.write_bytes(b'{"id": "a", "prompt": "hello"}\n' + middle + b'\n{"id": "c", "prompt": "bye"}\n')
    return src


BAD_ITEMS = {
    "longer than the context": b'{"id": "long", "prompt": "' + b"word " * 400 + b'"}',
    "not valid UTF-8": b'{"id": "b", "prompt": "caf\xe9 \xff"}',
}


@pytest.mark.parametrize("problem", list(BAD_ITEMS))
def test_a_bad_item_is_named_by_file_and_line_and_can_be_skipped(problem, tiny_gguf, tmp_path, capsys):
    src = _batch(tmp_path, BAD_ITEMS[problem])
    args = ["generate", "-m", str(tiny_gguf), "-i", str(src), "--jsonl", "-n", "1", "--ctx", "256"]
    rc, out, err = run(args, capsys)
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith(f"Error: {src}:2: ") and problem in err and "--skip-bad" in err
    assert [json.loads(x)["id"] for x in out.splitlines()] == ["a"]  # what came before was answered and kept
    rc, out, err = run(args + ["--skip-bad"], capsys)
    assert rc == 0 and [json.loads(x)["id"] for x in out.splitlines()] == ["a", "c"]
    assert f"warning: skipped {src}:2: " in err and problem in err


def test_json_keeps_the_answers_before_an_error(tiny_gguf, tmp_path, capsys):
    src = _batch(tmp_path, BAD_ITEMS["longer than the context"])
    rc, out, err = run(["generate", "-m", str(tiny_gguf), "-i", str(src), "--json", "-n", "1", "--ctx", "256"], capsys)
    assert rc == 1 and f"{src}:2:" in err
    assert [r["id"] for r in json.loads(out)] == ["a"]


def test_ctrl_c_between_prompts_keeps_the_json_so_far(tiny_gguf, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the next prompt is read: the answers so far are printed, then 'interrupted', exit 130."""
    import rtlocal.runtime.generation as gen

    src = _batch(tmp_path, b"")
    real = gen.read_jsonl

    def interrupted_after_two(*a, **k):
        items = real(*a, **k)
        yield next(items)
        yield next(items)
        raise KeyboardInterrupt

    monkeypatch.setattr(gen, "read_jsonl", interrupted_after_two)
    rc, out, err = run(["generate", "-m", str(tiny_gguf), "-i", str(src), "--json", "-n", "2"], capsys)
    assert rc == ExitCode.INTERRUPTED and err.strip().endswith("interrupted")
    assert [r["id"] for r in json.loads(out)] == ["a", "c"]


def test_ctrl_c_mid_answer_keeps_the_answer_so_far(tiny_gguf, capsys, monkeypatch):
    from rtlocal.runtime.engine import Engine

    calls = {"n": 0}

    def eog_then_ctrl_c(self, token):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(Engine, "is_eog", eog_then_ctrl_c)
    rc, out, err = run(["generate", "-m", str(tiny_gguf), "--json", "-n", "50", "-t", "all=1", "hi"], capsys)
    assert rc == ExitCode.INTERRUPTED and "interrupted" in err
    rec = json.loads(out)
    check_record(rec)
    assert rec["stop_reason"] == "cancelled" and rec["completion_tokens"] == 3


def test_a_real_ctrl_c_exits_130_with_the_lines_so_far(tiny_gguf, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    src = tmp_path / "many.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": f"Tell me a long story number {i}"}) + "\n" for i in range(500)))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtlocal.cli", "generate", "-m", str(tiny_gguf), "-i", str(src), "--jsonl", "-n", "64", "--ctx", "256", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell may have ignored it
    )
    first = proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == ExitCode.INTERRUPTED, err
    assert err.strip().splitlines()[-1] == "interrupted"
    lines = [first, *rest.splitlines()]
    assert json.loads(lines[0])["id"] == 0 and all(json.loads(x) for x in lines if x.strip())


# ------------------------------------------------------------------ the chat REPL carries on


def _repl(args, capsys, monkeypatch, script: bytes):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(script), encoding="utf-8"))
    rc = main(["chat", "--plain", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def _answers(out: str) -> int:
    return out.count("[respond") + out.count("[refused")


def test_chat_repl_survives_a_line_that_is_not_utf8(tiny_gguf, capsys, monkeypatch):
    rc, out, err = _repl(["-m", str(tiny_gguf), "-n", "2", "--seed", "1"], capsys, monkeypatch, b"Hello\ncaf\xe9 \xff\nagain\n/quit\n")
    assert rc == 0, err
    assert "error: that line is not valid UTF-8 (byte 4); it was ignored" in out
    assert _answers(out) == 2  # the turns before and after it


def test_chat_repl_offers_to_drop_the_oldest_turns(tiny_gguf, capsys, monkeypatch):
    long = b"Tell me a story about the sea and the boats that come home at night " * 3
    script = b"\n".join([long] * 8 + [b"/drop", b"short one", b"/quit"]) + b"\n"
    rc, out, err = _repl(["-m", str(tiny_gguf), "-n", "4", "--ctx", "256", "--seed", "1"], capsys, monkeypatch, script)
    assert rc == 0, err
    assert "no longer fits the context" in out and "/drop forgets the oldest" in out
    assert "forgot the oldest" in out
    # every message was answered, the one that did not fit after /drop; nothing ended the session
    assert _answers(out) == 8 - out.count("no longer fits the context") + 1 + 1
