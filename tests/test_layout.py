"""The package's shape: no import circles, each layer imports only the layers below it, and no command
module pulls in torch, transformers, peft, matplotlib or the server stack when it is imported.

The imports are read from the source (every `import` statement, also those inside functions and under
TYPE_CHECKING), so a lazy import counts as a dependency: laziness is for start-up time, not for
hiding a cycle.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import rtlocal

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rtlocal", "finetune", "convert")

# rtlocal's layers, bottom to top, and what each may import from rtlocal. The front ends (cli, tui,
# server) sit on the runtime; only the commands, at the top, reach everything.
FOUNDATION = {"rtlocal.constants", "rtlocal.errors", "rtlocal.paths", "rtlocal.jsonl"}
MAY_IMPORT = {
    "foundation": {"foundation"},
    "runtime": {"foundation", "runtime"},
    "evaluation": {"foundation", "runtime", "evaluation"},
    "tui": {"foundation", "runtime", "tui"},
    "server": {"foundation", "runtime", "server"},
    "cli": {"foundation", "runtime", "evaluation", "tui", "server", "cli", "finetune", "convert"},
    # the training side uses the token contract, the prompt renderer and the judge, never a front end
    "finetune": {"foundation", "runtime", "evaluation", "finetune", "convert"},
    "convert": {"foundation", "convert"},
}
HEAVY = {"torch", "transformers", "peft", "accelerate", "datasets", "matplotlib"}
SERVER_STACK = {"starlette", "uvicorn", "fastapi", "anyio"}


def module_files() -> dict[str, Path]:
    """Every module of the three packages by dotted name (a package by its __init__)."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules that `path` imports anywhere in its body."""
    out = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the submodule pkg.mod when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a non-module name: its nearest module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(path, name, known) for name, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> str:
    if module in FOUNDATION or module == "rtlocal":
        return "foundation"
    top, _, rest = module.partition(".")
    if top in ("finetune", "convert"):
        return top
    return rest.split(".")[0]


def test_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    found = circles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_module_has_a_layer():
    layers = {m: layer_of(m) for m in import_graph()}
    unknown = sorted(m for m, layer in layers.items() if layer not in MAY_IMPORT)
    assert not unknown, f"modules outside the known layers (add them to MAY_IMPORT): {unknown}"


def test_layers_import_only_downwards():
    bad = []
    for module, deps in import_graph().items():
        allowed = MAY_IMPORT[layer_of(module)]
        bad += [f"{module} -> {d}" for d in sorted(deps) if layer_of(d) not in allowed]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_analysis_apart_from_presentation():
    graph = import_graph()
    assert "rtlocal.evaluation.report" not in graph["rtlocal.evaluation.calibrate"]
    assert "rtlocal.evaluation.report" not in graph["rtlocal.evaluation.analysis"]


def _loaded_after_import(module: str) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout))


COMMAND_MODULES = sorted(
    f"rtlocal.cli.{m.name}" for m in pkgutil.iter_modules([str(Path(rtlocal.__file__).parent / "cli")]) if m.name != "__main__"
)


def test_the_commands_are_found():
    assert {"rtlocal.cli.app", "rtlocal.cli.generate", "rtlocal.cli.chat", "rtlocal.cli.serve"} <= set(COMMAND_MODULES)


@pytest.mark.parametrize("module", ["rtlocal", "rtlocal.cli", *COMMAND_MODULES, "rtlocal.tui.app"])
def test_command_modules_import_light(module):
    """A clean interpreter: importing a command loads no training, plotting or server stack."""
    loaded = _loaded_after_import(module)
    assert not (loaded & (HEAVY | SERVER_STACK)), f"{module} loads {sorted(loaded & (HEAVY | SERVER_STACK))}"


def test_runtime_and_evaluation_import_light():
    """Everything below the front ends together, in one clean interpreter: still no torch or plots."""
    names = [m for m in import_graph() if layer_of(m) in ("foundation", "runtime", "evaluation")]
    code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
    code += "import json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert not (loaded & (HEAVY | SERVER_STACK)), sorted(loaded & (HEAVY | SERVER_STACK))


def test_server_loads_no_training_stack():
    loaded = _loaded_after_import("rtlocal.server")
    assert not (loaded & HEAVY), sorted(loaded & HEAVY)
