PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.genie-installed
export OMP_NUM_THREADS ?= 1

# Everything setup installs (pip and the build backend included) is pinned, transitive packages too, in
# one lock per kind of machine, both made from pyproject.toml by `make lock`. Where nvidia-smi works it
# is the CUDA lock (PyPI's CUDA torch with its exact triton/nvidia pins); anywhere else the CPU lock,
# whose torch is the +cpu wheel, so a CPU machine never pulls a CUDA build. `make setup LOCK=...` forces.
LOCK_CPU := requirements.lock
LOCK_CUDA := requirements-cuda.lock
ifndef LOCK
LOCK := $(if $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 && echo y),$(LOCK_CUDA),$(LOCK_CPU))
endif

.PHONY: setup demo test bench lint clean gpu-check lock lock-upgrade check-latest

setup: $(STAMP)

# --no-deps: exactly the lock, no resolving; pip check then fails on anything the lock lacks, and
# CHECK_LOCK on any version not the locked one (torch 2.13.0+cpu from a wheel folder for a CUDA lock's
# 2.13.0, say). No build isolation: genie builds with the locked setuptools, nothing unpinned comes in.
$(STAMP): pyproject.toml Makefile $(LOCK_CPU) $(LOCK_CUDA)
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) pip
	$(BIN)/pip install -q --no-deps -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check -q
	$(BIN)/python -c "$$CHECK_LOCK" $(LOCK)
	touch $(STAMP)

define CHECK_LOCK
import sys
from importlib import metadata
from packaging.version import Version
def off(name, locked):
    try:
        got = metadata.version(name)
    except metadata.PackageNotFoundError:
        return f"{name} (locked: {locked}) is missing"
    return None if Version(got) == Version(locked) else f"{name} is {got} (locked: {locked})"
pins = [line.split()[0].split("==") for line in open(sys.argv[1]) if line[:1].isalnum()]
wrong = [w for w in (off(*pin) for pin in pins) if w]
sys.exit(f"{sys.argv[1]}: not as locked: {'; '.join(wrong)}" if wrong else None)
endef
export CHECK_LOCK

# Console scripts rather than `python -m`, so the repo root stays off sys.path: its kernels/ folder is
# genie.kernels, and the top-level name `kernels` belongs to the distribution transformers imports.
demo: setup
	$(BIN)/genie demo

test: setup  # make test TESTS="tests/test_graph.py ...": some files only
	$(BIN)/pytest -q -p no:cacheprovider $(TESTS) || test $$? -eq 5  # 5: no tests collected

bench: setup
	for f in bench/*.py; do $(BIN)/python $$f || exit 1; done

# On a CUDA machine; offline too: PIP_NO_INDEX=1 PIP_FIND_LINKS=wheels make gpu-check (README).
gpu-check: setup
	bench/gpu/check.sh

lint: setup
	$(BIN)/ruff check src kernels tests bench examples

# `make lock`: both locks follow pyproject.toml, keeping every pin that still fits; `make lock-upgrade`:
# every package at the newest release its range allows. Resolved for CPython 3.11 on x86_64 Linux from
# PyPI (wheels only), torch at TORCH: the CPU lock's +cpu wheel comes from TORCH_CPU_LINKS.
TORCH := 2.13.0
UV_VERSION := 0.13.10
TOOLS := .venv-tools
UV := $(TOOLS)/bin/uv
TORCH_CPU_LINKS ?= $(if $(wildcard /opt/wheels/torch-$(TORCH)+cpu-*.whl),/opt/wheels,https://download.pytorch.org/whl/cpu/torch/)
COMPILE := pip compile pyproject.toml --all-extras --group setup --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --no-build

# $(call compile,LOCK,TORCH PIN,MORE UV FLAGS,WHERE)
define compile
printf 'torch==%s\n' '$(2)' | $(UV) $(strip $(COMPILE) $(3)) -c - $(if $(filter lock-upgrade,$@),--upgrade) \
  --no-header -q -o $(1)
{ printf '%s\n' '# $(1): every package `make setup` installs $(4), pinned.' \
  '# Made by `make lock` (uv $(UV_VERSION)) from pyproject.toml; edit that, not this. The command:' \
  '#   echo torch==$(2) | uv $(strip $(COMPILE) $(3)) -c -'; cat $(1); } > $(1).tmp
mv $(1).tmp $(1)
endef

lock lock-upgrade: $(TOOLS)/.uv-$(UV_VERSION)
	$(call compile,$(LOCK_CPU),$(TORCH)+cpu,--find-links $(TORCH_CPU_LINKS),without CUDA (torch CPU wheel))
	$(call compile,$(LOCK_CUDA),$(TORCH),,where nvidia-smi works (PyPI CUDA torch))

$(TOOLS)/.uv-$(UV_VERSION):
	test -d $(TOOLS) || $(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q uv==$(UV_VERSION)
	touch $@

# Not in CI: a throwaway venv from the newest releases pyproject.toml allows (torch stays the CPU lock's
# wheel on a machine without CUDA), what moved since the lock, then a quick smoke subset of the tests.
LATEST := .venv-latest
SMOKE := tests/test_setup_lock.py tests/test_graph.py tests/test_transport.py tests/test_capture_api.py \
  tests/test_compile_models.py tests/test_async_fetch.py tests/test_kernels_dispatch.py tests/test_server_cli.py
check-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip setuptools
	extras=$$($(LATEST)/bin/python -c 'import tomllib; \
	  print(",".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]))') && \
	$(LATEST)/bin/pip install -q $(if $(filter $(LOCK_CPU),$(LOCK)),"$$(grep '^torch==' $(LOCK_CPU))") -e ".[$$extras]"
	$(LATEST)/bin/pip check
	grep -E '^[a-z0-9]' $(LOCK) | sort > $(LATEST)/locked.txt
	$(LATEST)/bin/pip list --format=freeze --exclude-editable \
	  | awk -F== '{n = tolower($$1); gsub(/[-_.]+/, "-", n); print n "==" $$2}' | sort > $(LATEST)/newest.txt
	@echo "check-latest: what moved (< $(LOCK), > newest):"; \
	  diff $(LATEST)/locked.txt $(LATEST)/newest.txt && echo "  nothing" || true
	$(LATEST)/bin/pytest -q -p no:cacheprovider $(SMOKE)

clean:
	rm -rf $(VENV) $(LATEST) $(TOOLS) build *.egg-info src/*.egg-info
