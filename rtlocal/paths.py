"""Where rtlocal keeps models, caches and its config file (one place, via platformdirs), and how it writes files."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from rtlocal.errors import RtlocalError

APP = "rtlocal"


def data_dir() -> Path:
    """User data dir; `RTLOCAL_HOME` overrides it (tests point it at a tmp dir)."""
    home = os.environ.get("RTLOCAL_HOME")
    return Path(home) if home else Path(platformdirs.user_data_dir(APP))


def models_dir() -> Path:
    return data_dir() / "models"


def cache_dir() -> Path:
    """Dequantised bases and other rebuildable files; `RTLOCAL_CACHE`, else under RTLOCAL_HOME."""
    if os.environ.get("RTLOCAL_CACHE"):
        return Path(os.environ["RTLOCAL_CACHE"])
    home = os.environ.get("RTLOCAL_HOME")
    return Path(home) / "cache" if home else Path(platformdirs.user_cache_dir(APP))


def config_file() -> Path:
    home = os.environ.get("RTLOCAL_HOME")
    return Path(home) / "config.toml" if home else Path(platformdirs.user_config_dir(APP)) / "config.toml"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a part.

    Any failure (a full disk, a read-only folder) is one `cannot write PATH: reason` error.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise RtlocalError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        discard(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


_TEMP_SERIAL = itertools.count()


def temp_path_for(path: Path) -> Path:
    """A sibling temporary path for a file that is written in several steps and then renamed; a new one
    on every call, so that two steps of one process never share it (a build stages its model at a
    temporary path and the calibration then writes the final file through one of its own: with one name
    per process, the writer truncated the staged file it was still reading)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial-{os.getpid()}-{next(_TEMP_SERIAL)}")


def discard(path: Path) -> None:
    """Remove a temporary file if it is there, never raising: a clean-up must not hide the error it cleans up after.

    (On a read-only file system even removing a file that does not exist fails, with EROFS.)
    """
    try:
        Path(path).unlink()
    except OSError:
        pass


# ------------------------------------------------------------------ output guard


@dataclass(frozen=True)
class OutputKind:
    """What a command writes: an existing file of this kind may be replaced, any other file only with --force."""

    name: str
    matches: Callable[[Path], bool]


def _starts_with(magic: bytes) -> Callable[[Path], bool]:
    def check(path: Path) -> bool:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic

    return check


def _first_line_is_object(path: Path) -> bool:
    with open(path, "rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    return isinstance(json.loads(raw), dict)
                except ValueError:
                    return False
    return True


def _json_object_with(key: str) -> Callable[[Path], bool]:
    def check(path: Path) -> bool:
        if path.stat().st_size > 64 << 20:
            return False
        try:
            obj = json.loads(path.read_bytes())
        except ValueError:
            return False
        return isinstance(obj, dict) and key in obj

    return check


GGUF_FILE = OutputKind("GGUF file", _starts_with(b"GGUF"))
JSONL_FILE = OutputKind("JSONL file", _first_line_is_object)
CALIBRATION_PROFILE = OutputKind("calibration profile", _json_object_with("categories"))


_has_turns = _json_object_with("turns")


def _transcript(path: Path) -> bool:
    """A transcript the TUI saved: its Markdown heading, or JSON with turns."""
    return _starts_with(b"# rtlocal chat")(path) or _has_turns(path)


TRANSCRIPT_FILE = OutputKind("chat transcript (saved by rtlocal)", _transcript)
FORCE_HINT = "pass --force to replace it"


def _same_file(a: Path, b: Path | str) -> bool:
    try:
        return os.path.samefile(a, Path(b).expanduser())
    except OSError:
        return False


def _check_not_an_input(p: Path, inputs: Iterable[Path | str | None], flag: str, what: str) -> None:
    for src in inputs:
        if src is not None and _same_file(p, src):
            raise RtlocalError(f"{flag} {p} is also an input of this command: choose another {what}")


def check_output(
    path: Path | str, *, kind: OutputKind | None, force: bool = False, inputs: Iterable[Path | str | None] = (), flag: str = "--out",
    hint: str = FORCE_HINT,
) -> Path:
    """Fail before any work when `path` cannot, or must not, be written; return it expanded.

    Every command that writes a file calls this first, so that nothing the user did not ask to
    replace is lost: an output is never one of the command's inputs, and an existing file is
    replaced only when it is of the `kind` the command writes (`kind=None`: never), or with --force
    (`hint` says how to force it where there is no flag, as in the TUI).
    """
    p = Path(path).expanduser()
    _check_not_an_input(p, inputs, flag, "file")
    if p.is_dir():
        raise RtlocalError(f"cannot write {p}: it is a directory")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise RtlocalError(f"cannot write {p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise RtlocalError(f"cannot write {p}: permission denied")
    if p.exists() and not force:
        if kind is None:
            raise RtlocalError(f"{p} exists: {hint}")
        try:
            same_kind = p.stat().st_size == 0 or kind.matches(p)
        except OSError:
            same_kind = False
        if not same_kind:
            raise RtlocalError(f"{p} exists and is not a {kind.name}: {hint}")
    return p


def check_output_folder(
    path: Path | str, *, markers: Iterable[str], force: bool = False, flag: str = "--out", inputs: Iterable[Path | str | None] = ()
) -> Path:
    """The folder form of `check_output`: an existing folder is written into only when it is empty or
    holds one of `markers` (files this command writes there), or with --force; never an input folder."""
    p = Path(path).expanduser()
    _check_not_an_input(p, inputs, flag, "folder")
    if p.exists() and not p.is_dir():
        raise RtlocalError(f"{flag} {p}: exists and is not a folder")
    if p.is_dir() and not force:
        names = {c.name for c in p.iterdir()}
        if names and not names & set(markers):
            raise RtlocalError(f"{flag} {p}: a folder with other files in it; choose another, or pass --force to write into it")
    return p


LOCK_FILE = ".rtlocal.lock"
_held: dict[Path, int] = {}  # folders this process holds, with how many holders (nested runs)


@contextmanager
def lock_folder(folder: Path | str, what: str) -> Iterator[Path]:
    """Hold FOLDER/.rtlocal.lock for one run: a second run on the same folder (another process) fails
    at once with a clear error instead of both writing and one losing its results.

    An OS lock (flock), so a crashed run never leaves the folder locked. Re-entrant within a process.
    A folder this call created is removed again when the run ends having written nothing into it.
    """
    folder = Path(folder).expanduser()
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RtlocalError(f"cannot write {folder}: {e.strerror or e}") from e
    key = folder.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield folder
        finally:
            _held[key] -= 1
        return
    path = folder / LOCK_FILE
    empty = False
    try:
        f = open(path, "a+", encoding="utf-8")
    except OSError as e:
        raise RtlocalError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        if not _try_lock(f):
            f.seek(0)
            holder = f.read().strip()
            raise RtlocalError(f"{folder} is in use by another {what}{f' (pid {holder})' if holder else ''}: wait for it to finish, or choose another --out")
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        _held[key] = 1
        try:
            yield folder
        finally:
            del _held[key]
            empty = created and [c.name for c in folder.iterdir()] == [LOCK_FILE]
            if empty:
                discard(path)  # still holding the lock: no other run can have taken it
            _unlock(f)
    finally:
        f.close()
        if empty:
            try:
                folder.rmdir()
            except OSError:
                pass


try:
    import fcntl

    def _try_lock(f) -> bool:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def _unlock(f) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)

except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(f) -> bool:
        try:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

    def _unlock(f) -> None:
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
