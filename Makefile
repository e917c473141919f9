# The two commands of the README: `make quickstart` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/quickstart

.PHONY: setup quickstart test lint clean

$(BIN)/testbed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $@

setup: $(BIN)/testbed

quickstart: setup
	$(BIN)/testbed campaign run examples/quickstart.yaml --out $(OUT) --overwrite

test: setup
	$(BIN)/python -m pytest -q -rs --durations=15

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
