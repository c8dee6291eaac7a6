# styleray: the two commands.
#   make test   set up .venv (once) and run the test suite
#   make demo   set up .venv (once) and run the end-to-end demo on a local Ray cluster
PYTHON ?= python3
TORCH_INDEX ?=  # a pip index for torch's build (e.g. https://download.pytorch.org/whl/cpu); empty: pip's own
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-fast demo venv bench clean browser

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first. The pin fixes the version, not the build: pip takes the CPU build where one is offered
	# (here pip's find-links holds torch-2.13.0+cpu, which sorts above PyPI's CUDA build of 2.13.0); elsewhere
	# name the build's index: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian's chromium for the web-page test (driven by Playwright; never `playwright install`). Idempotent.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "make browser: could not install chromium; the web-page test will be skipped"

test: $(STAMP) browser
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q tests

test-fast: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	RAY_USAGE_STATS_ENABLED=0 $(VENV)/bin/styleray demo $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
