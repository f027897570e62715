# bridge — make test (default), make demo, make test-real, make bench, make bench-real, make clean
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: test demo test-real bench bench-real clean

test: $(BIN)/.test-installed
	$(BIN)/python -m pytest -q -m "not real_model"

demo: $(BIN)/.demo-installed
	$(BIN)/python examples/demo.py

test-real: $(BIN)/.demo-installed $(BIN)/.test-installed
	$(BIN)/python -m pytest -q -m real_model -rs

# Figures, never pass/fail; each script prints its summary on its last line.
bench: $(BIN)/.test-installed
	$(BIN)/python bench/parallel.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/startup.py

bench-real: $(BIN)/.demo-installed
	$(BIN)/python bench/real_model.py
	$(BIN)/python bench/check_commands.py

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(BIN)/.test-installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The first time, pip compiles llama.cpp (llama-cpp-python): several minutes.
$(BIN)/.demo-installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $@

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
