"""Every command that writes a file goes through one output guard (rtlocal.paths.check_output):
nothing the user did not ask to replace is lost, an output is never an input, and the destination
is checked before any work. Failures are one `Error:` line naming the path."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from rtlocal.errors import RtlocalError
from rtlocal.paths import atomic_write_text
from tests.test_evaluate import PROMPTS, error_line, run_cli, write_jsonl
from tests.test_finetune import tiny_data  # noqa: F401 (a fixture)


@pytest.fixture
def files(tmp_path, tiny_base, tiny_adapter, tiny_gguf, tiny_plain_gguf) -> dict[str, Path]:
    model = tmp_path / "model.gguf"
    shutil.copy(tiny_gguf, model)
    plain = tmp_path / "plain.gguf"
    shutil.copy(tiny_plain_gguf, plain)
    rows = [{"id": f"p{i}", "prompt": p, "should_refuse": y, **({"category": c} if c else {})} for i, (p, y, c) in enumerate(PROMPTS)]
    return {
        "base": tiny_base,
        "adapter": tiny_adapter,
        "model": model,
        "plain": plain,
        "data": write_jsonl(tmp_path / "val.jsonl", rows),
        "prompts": write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Tell me a story about a robot."}]),
        "profile": tmp_path / "p.calibration.json",
    }


# Each command that writes a file, with its output at OUT.
WRITERS = {
    "convert": lambda f: ["convert", str(f["base"]), "-a", str(f["adapter"]), "-o", "OUT", "--type", "f16"],
    "calibrate --profile": lambda f: ["calibrate", str(f["model"]), "-d", str(f["data"]), "--profile", "OUT", "--ctx", "256"],
    "calibrate --gguf-out": lambda f: [
        "calibrate", str(f["model"]), "-d", str(f["data"]), "--profile", str(f["profile"]), "--gguf-out", "OUT", "--ctx", "256",
    ],
    "data distill": lambda f: ["data", "distill", str(f["prompts"]), "-o", "OUT", "--model", str(f["plain"]), "-n", "2", "--threads", "1"],
}
# The same commands with their output set to one of their inputs.
SELF_OVERWRITES = {
    "convert -o BASE": lambda f: ["convert", str(f["plain"]), "-o", str(f["plain"]), "--type", "f16"],
    "calibrate --profile MODEL": lambda f: ["calibrate", str(f["model"]), "-d", str(f["data"]), "--profile", str(f["model"]), "--ctx", "256"],
    "calibrate --profile DATA": lambda f: ["calibrate", str(f["model"]), "-d", str(f["data"]), "--profile", str(f["data"]), "--ctx", "256"],
    "calibrate --gguf-out MODEL": lambda f: [
        "calibrate", str(f["model"]), "-d", str(f["data"]), "--profile", str(f["profile"]), "--gguf-out", str(f["model"]), "--ctx", "256",
    ],
    "data distill -o SOURCE": lambda f: [
        "data", "distill", str(f["prompts"]), "-o", str(f["prompts"]), "--model", str(f["plain"]), "-n", "2", "--threads", "1",
    ],
}


def _args(command: str, f: dict, out: Path) -> list[str]:
    return [str(out) if a == "OUT" else a for a in WRITERS[command](f)]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("command", list(WRITERS))
def test_an_unrelated_file_is_kept_unless_forced(command, files, tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("my notes, not a model\n")
    rc, stdout, err = run_cli(_args(command, files, out), capsys)
    assert rc == 1
    line = error_line(err)
    assert f"{out} exists and is not a" in line and "--force" in line
    assert out.read_text() == "my notes, not a model\n" and _leftovers(tmp_path) == []
    assert "wrote" not in stdout
    rc, stdout, err = run_cli(_args(command, files, out) + ["--force"], capsys)
    assert rc == 0, err
    assert out.read_text(errors="replace") != "my notes, not a model\n"


@pytest.mark.parametrize("command", list(SELF_OVERWRITES))
def test_an_output_is_never_an_input(command, files, tmp_path, capsys):
    before = {k: _digest(p) for k, p in files.items() if isinstance(p, Path) and p.is_file()}
    for extra in ([], ["--force"]):
        rc, _, err = run_cli(SELF_OVERWRITES[command](files) + extra, capsys)
        assert rc == 1
        assert "is also an input of this command" in error_line(err)
    assert {k: _digest(p) for k, p in files.items() if isinstance(p, Path) and p.is_file()} == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("command", list(WRITERS))
def test_the_destination_is_checked_before_any_work(command, files, tmp_path, capsys):
    out = tmp_path / "missing-dir" / "out.file"
    rc, _, err = run_cli(_args(command, files, out), capsys)
    assert rc == 1 and "does not exist" in error_line(err)
    # nothing was scored, loaded or answered: those commands report their start on stderr
    assert not any(w in err for w in ("calibrate:", "scoring", "distilling", "converting"))


def test_the_same_kind_is_replaced_without_force(files, tmp_path, capsys):
    out = tmp_path / "again.gguf"
    shutil.copy(files["plain"], out)  # a GGUF: what convert writes
    rc, _, err = run_cli(_args("convert", files, out), capsys)
    assert rc == 0, err
    prof = tmp_path / "again.json"
    for _ in range(2):
        rc, _, err = run_cli(_args("calibrate --profile", files, prof), capsys)
        assert rc == 0, err


def test_a_named_model_is_replaced_only_with_force(tmp_path):
    from rtlocal.paths import GGUF_FILE, check_output

    target = tmp_path / "m.gguf"
    target.write_bytes(b"GGUF....")
    with pytest.raises(RtlocalError, match="exists: pass --force"):
        check_output(target, kind=None)  # what `rtlocal build` asks for its models-dir name
    assert check_output(target, kind=None, force=True) == target
    assert check_output(target, kind=GGUF_FILE) == target


def test_finetune_writes_only_into_its_own_folder(files, tiny_data, tmp_path, capsys):
    """`finetune --out DIR`: a folder holding other files, or the base model's own folder, is refused before
    any data or model loads; --force writes into the first (the other files stay)."""
    out = tmp_path / "my-project"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    args = ["finetune", str(files["base"]), "--data", str(tiny_data), "--max-steps", "1", "--lora-r", "2", "--val-fraction", "0", "--threads", "1"]
    rc, _, err = run_cli([*args, "--out", str(out)], capsys)
    assert rc == 1 and "a folder with other files in it" in error_line(err) and "--force" in error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    rc, _, err = run_cli([*args, "--out", str(files["base"])], capsys)
    assert rc == 1 and "is also an input" in error_line(err)
    rc, _, err = run_cli([*args, "--out", str(out), "--force"], capsys)
    assert rc == 0, err
    assert (out / "rtlocal.json").is_file() and (out / "notes.txt").read_text() == "mine\n"
    rc, _, err = run_cli([*args, "--out", str(out)], capsys)  # its own folder again: no --force needed
    assert rc == 0, err


def test_a_transcript_replaces_only_a_transcript(tmp_path):
    """The TUI's save dialog writes through the same guard: an earlier transcript is replaced, any other
    file is kept and the dialog says to choose another name."""
    from rtlocal.tui.transcript import Turn, save_transcript

    turns = [Turn(1, "hi", "hello")]
    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    with pytest.raises(RtlocalError, match="exists and is not a chat transcript \(saved by rtlocal\): choose another name"):
        save_transcript(notes, turns, model="m.gguf", system=None)
    assert notes.read_text() == "# my notes\n"
    for fmt, name in (("markdown", "chat.md"), ("json", "chat.json")):
        for _ in range(2):  # the second save replaces the first
            assert save_transcript(tmp_path / name, turns, model="m.gguf", system=None, fmt=fmt) == tmp_path / name
    assert save_transcript(notes, turns, model="m.gguf", system=None, force=True) == notes
    assert notes.read_text().startswith("# rtlocal chat")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_failed_write_names_its_path_and_leaves_nothing(code, tmp_path, monkeypatch):
    """A full disk or a read-only file system: the error says which file, and the clean-up does not hide it."""
    import os

    target = tmp_path / "report.json"
    target.write_text("old\n")
    real_unlink = os.unlink

    def no_space(fd):
        raise OSError(code, os.strerror(code))

    def unlink(path, *a, **k):  # on a read-only file system even removing a missing file fails
        if code == errno.EROFS:
            raise OSError(code, os.strerror(code))
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "fsync", no_space)
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(RtlocalError) as e:
        atomic_write_text(target, json.dumps({"new": 1}))
    assert str(e.value) == f"cannot write {target}: {os.strerror(code)}"
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    if code == errno.ENOSPC:
        assert _leftovers(tmp_path) == []
