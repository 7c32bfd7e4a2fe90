# latent-lab — `make demo` runs the main job on the bundled model, `make test` runs the tests.
# Both create or refresh .venv and install what they need.
#
# torch: on a machine without an NVIDIA GPU we install the CPU build pinned below first (these
# machines carry it on local disk); with `nvidia-smi` present, pip resolves torch from pyproject.toml
# and gets the CUDA build. Override with `make test TORCH=...` (empty to let pip choose).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo torch==2.13.0)
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1

.PHONY: setup browser-deps demo test test-fast lab clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(strip $(TORCH)),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[test,widgets]"
	touch $(STAMP)

# Debian's Chromium for the real-browser widget tests (apt-get; skipped when one is installed)
browser-deps:
	@scripts/install_chromium.sh

demo: $(STAMP)
	$(PY) -m lab demo --out runs/demo

test: $(STAMP) browser-deps
	$(PY) -m pytest -q -W ignore::DeprecationWarning

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not browser" -W ignore::DeprecationWarning

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf runs .pytest_cache test-output
