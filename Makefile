PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.genie-installed
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test bench lint clean gpu-check

setup: $(STAMP)

# torch goes first and pinned: on a machine without CUDA, 2.13.0 is the local CPU wheel; anything
# looser pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q torch; else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q triton trio numpy pytest pytest-trio hypothesis transformers ruff tqdm trustme starlette httpx hypercorn uvicorn
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/python -m genie demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider || test $$? -eq 5  # 5: no tests collected

bench: setup
	for f in bench/*.py; do $(BIN)/python $$f || exit 1; done

# On a CUDA machine; offline too: PIP_NO_INDEX=1 PIP_FIND_LINKS=wheels make gpu-check (README).
gpu-check: setup
	bench/gpu/check.sh

lint: setup
	$(BIN)/ruff check src kernels tests bench examples

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
