# kc-keras: one virtual environment, one run folder per dataset.
#   make demo                 teachers, student, TFLite exports and benchmark
#   make test                 the test suite (CI runs exactly this)
# Variables: DATASET (default trio-30), RUN (default runs/$(DATASET)),
# QUICK=1 (a few steps on a data subset, for smoke runs), OVERWRITE=1
# (replace a run folder of other dataset settings), TEACHER_ARGS and
# DISTILL_ARGS (more `kc teachers` and `kc distill` options, for example
# --specialist-steps 40 and --epochs 30).

DATASET ?= trio-30
RUN ?= runs/$(DATASET)
QUICK ?=
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
KC := $(VENV)/bin/kc
QUICK_FLAG := $(if $(filter 1 true yes,$(QUICK)),--quick,)
# OVERWRITE=1 lets `make teachers` replace a run folder that holds a run
# with other dataset settings (for example a QUICK=1 run).
OVERWRITE ?=
OVERWRITE_FLAG := $(if $(filter 1 true yes,$(OVERWRITE)),--overwrite,)
TEACHER_ARGS ?=
DISTILL_ARGS ?=
STAMP := $(VENV)/.kc-setup-done

# Debian packages: data sets and fonts the loaders read, the browser the
# web demo tests drive, and the Kotlin compiler and JUnit that run the
# Android app's plain-JVM processing tests.
APT_PACKAGES := dataset-fashion-mnist fonts-noto-cjk fonts-kouzan-mouhitsu \
	fonts-seto kanjidic-xml chromium kotlin junit4 libandroid-json-java

.PHONY: setup demo teachers distill tflite bench test web web-deps ablate \
	bench-scale android-assets lint clean-run

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@bash scripts/install_system_packages.sh $(APT_PACKAGES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

teachers: setup
	$(KC) teachers --dataset $(DATASET) --run $(RUN) $(QUICK_FLAG) \
		$(OVERWRITE_FLAG) $(TEACHER_ARGS)

distill: teachers
	$(KC) distill --run $(RUN) --baselines $(QUICK_FLAG) $(DISTILL_ARGS)

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

# Web demo: LiteRT.js page built around the student export. npm ci
# installs the exact versions of package-lock.json (LiteRT.js with its
# WebAssembly files, and playwright-core, which drives the Debian Chromium
# in the tests and never downloads a browser).
WEB_DIR := mobile_demo/web
WEB_DEPS := $(WEB_DIR)/node_modules/.package-lock.json
WEB_MODEL ?= $(RUN)/tflite/student_qat-int8.tflite

web-deps: $(WEB_DEPS)

$(WEB_DEPS): $(WEB_DIR)/package.json $(WEB_DIR)/package-lock.json
	cd $(WEB_DIR) && npm ci --no-audit --no-fund
	@touch $@

web: $(WEB_DEPS)
	node $(WEB_DIR)/build.mjs --model $(WEB_MODEL) --out $(WEB_DIR)/dist
	@echo "serve it: python3 -m http.server --bind 127.0.0.1 -d $(WEB_DIR)/dist 8000"

# Android demo: copy the student export, its metadata sidecar, the labels
# and the golden vectors of the unit tests into the app (the Gradle task
# copyKcAssets does the same from inside Android Studio).
ANDROID_APP := mobile_demo/android/app
ANDROID_MODEL ?= student_qat-int8

android-assets:
	@test -f $(RUN)/tflite/$(ANDROID_MODEL).tflite || { echo \
		"error: $(RUN)/tflite/$(ANDROID_MODEL).tflite not found; run make tflite first" >&2; exit 2; }
	mkdir -p $(ANDROID_APP)/src/main/assets $(ANDROID_APP)/src/test/resources
	cp $(RUN)/tflite/$(ANDROID_MODEL).tflite $(ANDROID_APP)/src/main/assets/model.tflite
	cp $(RUN)/tflite/$(ANDROID_MODEL).json $(ANDROID_APP)/src/main/assets/model.json
	cp $(RUN)/tflite/labels.txt $(ANDROID_APP)/src/main/assets/labels.txt
	cp $(RUN)/tflite/golden.json $(ANDROID_APP)/src/test/resources/golden.json

test: setup $(TFLITE_RUNTIME_STAMP) $(WEB_DEPS)
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

clean-run:
	rm -rf $(RUN)

# Ablation grid: students that differ from the default in one factor,
# three seeds each, on trio-30 and kanji-2136 (hours on 2 CPU cores; a
# rerun skips finished cells). A run without teachers gets them first.
# Reports: benchmarks/results/ablation-<dataset>.{json,md,png}.
# QUICK=1: quick teachers in runs/ablate-quick/, one seed, a few steps,
# reports in runs/ablate-quick/results/. ABLATE_ARGS passes more options
# to benchmarks/ablate.py (--epochs, --deadline, ...).
ABLATE_DATASETS ?= trio-30 kanji-2136
ABLATE_RUNS := $(if $(QUICK_FLAG),runs/ablate-quick,runs)
ABLATE_RESULTS := $(if $(QUICK_FLAG),$(ABLATE_RUNS)/results,benchmarks/results)
ABLATE_ARGS ?=

ablate: setup
	@for dataset in $(ABLATE_DATASETS); do \
		test -f $(ABLATE_RUNS)/$$dataset/teachers/teachers.json || \
		$(KC) teachers --dataset $$dataset --run $(ABLATE_RUNS)/$$dataset \
			$(QUICK_FLAG) $(TEACHER_ARGS) || exit $$?; \
	done
	$(PY) benchmarks/ablate.py --datasets "$(ABLATE_DATASETS)" \
		--runs-root $(ABLATE_RUNS) --results $(ABLATE_RESULTS) \
		$(if $(QUICK_FLAG),--quick --seeds 0,) $(ABLATE_ARGS)

# Scale benchmark: the student pipeline at N = 1,000, 10,000 and 100,000
# synthetic classes, one child process per N (a rerun skips finished N).
# Reports: benchmarks/results/scale.{json,md,png}. QUICK=1: N = 1,000 with
# tiny models, reports in runs/scale-quick/results/.
bench-scale: setup
	$(PY) -m benchmarks.scale $(QUICK_FLAG)
