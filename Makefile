# bridge: make test (default), make demo, make clean
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: test venv clean

test: $(BIN)/.test-installed
	$(BIN)/python -m pytest -q

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(BIN)/.test-installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
