# Two entry points: `make demo` runs the default job, `make test` the test suite.
# Each builds .venv on first use; the stamp file reinstalls when pyproject.toml changes.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/defuse demo

test: $(BIN)/.installed
	$(BIN)/pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; rc=0; fi; exit $$rc

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:  # the stage outputs and .venv; each folder's README.md stays
	rm -rf $(VENV)
	find cache reports -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
