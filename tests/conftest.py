"""Shared pytest fixtures for bridge's tests. Nothing here imports bridge (fakes does, lazily)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for _p in (str(TESTS), str(ROOT)):  # `import fakes` and `import bridge` work under any import mode
    if _p not in sys.path:
        sys.path.insert(0, _p)

from fakes import (  # noqa: E402  (re-exported for tests that import from conftest)
    DATA, FIXTURE_PLAN_ID, FIXTURE_STORE, FakeAnthropic, FakeLLM, check_store, content_hash, insert_memory,
    insert_plan, iso_z, make_plan, make_store, read_rows, trust_project,
)

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
_OTHER_VARS = ("SSL_CERT_FILE", "SSL_CERT_DIR", "MCP_MEMORY_SQLITE_PATH", "MCP_MEMORY_BASE_DIR",
               "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_reaches_children():
    """The bridge processes the tests start get Ctrl-C as they would in a terminal.

    A test run started with SIGINT ignored (a background job of a script, `make test &`)
    would hand that on to every child, and the interrupt tests would wait in vain.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, tmp_path):
    """No test sees the real user's proxies, certificates, bridge/memory settings or home."""
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name in _OTHER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("BRIDGE_"):
            monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture(scope="session")
def _fake_llm_server():
    server = FakeLLM().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake_llm(_fake_llm_server) -> FakeLLM:
    """The session's FakeLLM, reset: empty queue, no recorded requests, default models."""
    return _fake_llm_server.reset()


@pytest.fixture(scope="session")
def _fake_anthropic_server():
    server = FakeAnthropic().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake_anthropic(_fake_anthropic_server) -> FakeAnthropic:
    """The session's FakeAnthropic, reset: empty queue, no recorded requests."""
    return _fake_anthropic_server.reset()


@pytest.fixture(scope="session")
def _store_templates(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store-templates")


@pytest.fixture
def new_store(_store_templates):
    """make_store(path, layout), but each layout is made once per session and copied after
    that (making one costs ~0.15-0.2 s of fsyncs)."""
    def make(path: Path, layout: str) -> Path:
        template = _store_templates / f"{layout}.db"
        if not template.exists():
            make_store(template, layout)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
        return path
    return make


@pytest.fixture
def db(tmp_path, new_store) -> Path:
    """An empty 12.x store (layout 12.x-fresh, no fixture plan) at tmp_path/"fresh.db", so a
    plain run runs only what a test inserts."""
    return new_store(tmp_path / "fresh.db", "12.x-fresh")


@pytest.fixture(params=["12.2.0", "12.4.0"])
def store(tmp_path, request) -> Path:
    """A copy of a store the real server made, once per version in tests/data (3 memories;
    row 2 is plan "fixture-hello")."""
    return make_store(tmp_path / "store.db", "12.x", version=request.param)


@pytest.fixture
def project(tmp_path) -> Path:
    """An existing, empty project folder, trusted the documented way (`bridge --trust`,
    into this test's $HOME/.config/bridge). A test of untrusted plans makes its own folder."""
    p = tmp_path / "project"
    p.mkdir()
    trust_project(p)
    return p


@pytest.fixture
def state_dir(tmp_path) -> Path:
    """$XDG_STATE_HOME as set by _hermetic (tmp_path/"state"); not created."""
    return tmp_path / "state"


@pytest.fixture(scope="session")
def real_server(tmp_path_factory):
    """The base URL (…/v1) of one real llama-cpp-python server serving SmolLM2-135M
    (examples/llama_server.py), shared by the real_model tests; they skip, saying what
    is missing, where llama-cpp-python or the model is not installed (make test-real)."""
    sys.path.insert(0, str(ROOT / "examples"))
    import llama_server

    missing = llama_server.missing_parts()
    if missing:
        pytest.skip(f"real model not available: {missing}")
    with llama_server.running_server(tmp_path_factory.mktemp("llama") / "server.log") as base_url:
        yield base_url
