#!/usr/bin/env bash
# Create .venv and install rtlocal with everything the tests and the default model build need.
# Idempotent: does nothing when pyproject.toml has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.rtlocal-installed
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first, pinned: a CPU build (it lies on disk on this project's machines). An unpinned torch
# would pull a multi-GB CUDA build. Elsewhere choose your own, e.g.
#   TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu" make test
echo "setup: installing torch (${TORCH_SPEC:-torch==2.13.0})" >&2
$PIP install -q ${TORCH_SPEC:-torch==2.13.0}
# llama-cpp-python compiles llama.cpp from source on first install (~13 min on 2 cores; pip caches the
# wheel afterwards). For Metal/CUDA set CMAKE_ARGS, e.g. CMAKE_ARGS="-DGGML_CUDA=on".
# Without Intel AMX: llama.cpp builds for the CPU it compiles on, and on AMX machines (Sapphire Rapids
# and later) its AMX matrix product segfaults at the first decode (ggml-org/llama.cpp#20824; seen here
# with every GGUF, the base's too). The AVX-512 path it falls back to is the one measured in bench/.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if echo | ${CC:-cc} $NO_AMX -x c -c - -o /dev/null 2>/dev/null; then
  export CFLAGS="${CFLAGS:-} $NO_AMX" CXXFLAGS="${CXXFLAGS:-} $NO_AMX"
fi
echo "setup: installing rtlocal[train,plots,dev,serve] (the first install compiles llama.cpp: ~13 min)" >&2
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}
$PIP install -q -e ".[train,plots,dev,serve]"
# pip reuses a wheel it compiled before, whatever the flags were then: rebuild one that has AMX in it
if "$VENV/bin/python" -c "import sys, llama_cpp; sys.exit('AMX_INT8 = 1' not in llama_cpp.llama_print_system_info().decode())" 2>/dev/null; then
  echo "setup: recompiling llama-cpp-python without AMX (the cached wheel has it)" >&2
  $PIP cache remove llama_cpp_python >/dev/null 2>&1 || true  # the new wheel takes its place
  $PIP install -q --force-reinstall --no-deps \
    "llama-cpp-python==$("$VENV/bin/python" -c "from importlib.metadata import version; print(version('llama-cpp-python'))")"
fi
echo "$WANT" > "$STAMP"
echo "setup: done" >&2
