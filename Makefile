# Two entry points, each doing all of its set-up on a fresh machine:
#   make demo   -> the main job on the embedded default (tiny local model)
#   make test   -> the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test lint clean

$(BIN)/harvest: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev]"
	./scripts/install-redis.sh  # a no-op where redis-server >= 6.2 is installed
	touch $(BIN)/harvest

setup: $(BIN)/harvest

demo: setup
	$(BIN)/harvest demo

test: setup
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) bench-results .pytest_cache
