# The two commands of the README: `make chat` (the main job) and `make test`.
.PHONY: setup chat test test-fast bench

setup:
	@scripts/setup.sh

# Chat with the default model; on first run it is built offline (fine-tune SmolLM2-135M with refusal
# tokens on the built-in data, convert to GGUF), with a progress bar.
chat: setup
	.venv/bin/rtlocal chat $(ARGS)

test: setup
	.venv/bin/python -m pytest -q $(ARGS)

# Without the tests that use the real SmolLM2-135M base (a few minutes less).
test-fast: setup
	.venv/bin/python -m pytest -q -m "not smollm" $(ARGS)

bench: setup
	.venv/bin/python bench/bench_convert.py
	.venv/bin/python bench/bench_runtime.py
