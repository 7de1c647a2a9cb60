# kc-keras: one virtual environment, one run folder per dataset.
#   make demo                 teachers, student, TFLite exports and benchmark
#   make test                 the test suite (CI runs exactly this)
# Variables: DATASET (default trio-30), RUN (default runs/$(DATASET)),
# QUICK=1 (a few steps on a data subset, for smoke runs).

DATASET ?= trio-30
RUN ?= runs/$(DATASET)
QUICK ?=
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
KC := $(VENV)/bin/kc
QUICK_FLAG := $(if $(filter 1 true yes,$(QUICK)),--quick,)
STAMP := $(VENV)/.kc-setup-done

# Debian packages: data sets and fonts the loaders read, and the browser
# the web demo tests drive.
APT_PACKAGES := dataset-fashion-mnist fonts-noto-cjk fonts-kouzan-mouhitsu \
	fonts-seto kanjidic-xml chromium

.PHONY: setup demo teachers distill tflite bench test web ablate bench-scale \
	android-assets lint clean-run

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@bash scripts/install_system_packages.sh $(APT_PACKAGES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

teachers: setup
	$(KC) teachers --dataset $(DATASET) --run $(RUN) $(QUICK_FLAG)

distill: teachers
	$(KC) distill --run $(RUN) $(QUICK_FLAG)

tflite: setup
	$(KC) tflite --run $(RUN) $(QUICK_FLAG)

bench: setup
	$(KC) bench --run $(RUN) $(QUICK_FLAG)

demo: distill
	$(MAKE) tflite bench DATASET=$(DATASET) RUN=$(RUN) QUICK=$(QUICK)

# A second, small environment with the tflite-runtime fallback, which
# needs numpy<2: the tests run mobile_demo/benchmark.py in it.
TFLITE_RUNTIME_VENV := .venv-tflite-runtime
TFLITE_RUNTIME_STAMP := $(TFLITE_RUNTIME_VENV)/.kc-setup-done

$(TFLITE_RUNTIME_VENV): $(TFLITE_RUNTIME_STAMP)

$(TFLITE_RUNTIME_STAMP):
	@test -x $(TFLITE_RUNTIME_VENV)/bin/python || \
		$(PYTHON) -m venv $(TFLITE_RUNTIME_VENV)
	$(TFLITE_RUNTIME_VENV)/bin/python -m pip install --quiet \
		"numpy<2" tflite-runtime==2.14.0
	@touch $@

test: setup $(TFLITE_RUNTIME_STAMP)
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

clean-run:
	rm -rf $(RUN)
