"""Issue 20, rows 16 (its memory-server part), 17 and 20: the memory server's HTTP API is a
hostile server too.

HostileMemoryAPI is a real HTTP server on 127.0.0.1 (port 0) answering the routes bridge
uses as mcp-memory-service 12.4.0 documents them (web/api/memories.py, web/api/health.py;
the well-behaved fake is tests/fakes.py FakeMemoryAPI), except in the one way each test
names: an answer trickled a byte at a time, JSON nested 32,000 deep, escape sequences in
its version and backend. What must hold: each request ends by its deadline
(MEMORY_API_DEADLINE_S, made short here), the result is then stored directly with one
warning line, nothing exits 70, and --health prints nothing a terminal would act on.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

import pytest

import bridge
from fakes import insert_plan, make_plan, plan_state, run_bridge, stored_results

KEY = "test-key"
TRICKLE_S = 0.02        # seconds between two bytes of a trickled answer (~3 s for a whole answer)


class HostileMemoryAPI:
    """mode: "trickle_body" (status and headers at once, then the body a byte each
    TRICKLE_S), "trickle_head" (the whole answer, status line first, a byte each
    TRICKLE_S), "deep" (every JSON answer is a list nested 32,000 deep: 64,000 bytes,
    under bridge's 65,536-byte cap), "escapes" (version and backend hold terminal escape
    sequences). Answers claim success; nothing is stored (bridge checks and falls back)."""

    def __init__(self, mode: str):
        self.mode, self.requests = mode, []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):  # noqa: D401 - silence
                pass

            def _answer(self, body) -> None:
                data = ("[" * 32_000 + "]" * 32_000).encode() if fake.mode == "deep" else json.dumps(body).encode()
                head = (f"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(data)}\r\n\r\n").encode()
                try:
                    if fake.mode == "trickle_head":
                        self._trickle(head + data)
                    elif fake.mode == "trickle_body":
                        self.wfile.write(head)
                        self.wfile.flush()
                        self._trickle(data)
                    else:
                        self.wfile.write(head + data)
                except OSError:     # bridge hung up: what a trickling server sees
                    pass

            def _trickle(self, data: bytes) -> None:
                for i in range(len(data)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(TRICKLE_S)

            def do_GET(self):  # noqa: N802
                fake.requests.append(("GET", self.path))
                if self.path == "/api/health/detailed":
                    version, backend = ("12.4.0\x1b]0;owned\x07\x1b[2J", "sqlite-vec\r\x1b[31mfake") \
                        if fake.mode == "escapes" else ("12.4.0", "sqlite-vec")
                    self._answer({"status": "healthy", "version": version, "storage": {"backend": backend}})
                else:
                    self._answer({"status": "healthy"})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                fake.requests.append(("POST", self.path))
                self._answer({"success": True, "message": "Memory stored successfully",
                              "content_hash": bridge.content_hash(body["content"])})

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> "HostileMemoryAPI":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def run(capsys, db, fake_llm, state_dir, *extra, environ=None):
    return run_bridge(capsys, db, fake_llm, state_dir, *extra,
                      environ={"MCP_API_KEY": KEY} if environ is None else environ)


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("bridge: warning:")]


# --------------------------------------------------------------------------------------
# row 17: an overall deadline per request
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["trickle_body", "trickle_head"])
def test_a_memory_server_trickling_its_answer_is_cut_at_the_deadline(capsys, db, fake_llm, state_dir,
                                                                     monkeypatch, mode):
    """Row 17 as written, with MEMORY_API_DEADLINE_S at 0.3 s instead of waiting minutes:
    the body trickled (as written) or the status line and headers (a variant): the run
    stops waiting at the deadline, says so in one warning, and stores the result
    directly, once (before: it waited for the whole trickle, ~3 s here, unbounded on a
    server that never ends)."""
    monkeypatch.setattr(bridge, "MEMORY_API_DEADLINE_S", 0.3)
    insert_plan(db, make_plan("p1"))
    insert_plan(db, make_plan("p2"))
    fake_llm.enqueue("hi").enqueue("hi")
    with HostileMemoryAPI(mode) as api:
        rc, out, err = run(capsys, db, fake_llm, state_dir, "--memory-url", api.url)

    assert rc == 0, err
    lines = warnings(err)
    assert len(lines) == 2 and all("no whole answer within 0.3 s" in line for line in lines), err
    assert all("stored it directly" in line for line in lines)
    assert sorted(r["plan_id"] for r in stored_results(db)) == ["p1", "p2"]
    assert plan_state(db, "p1")["status"] == plan_state(db, "p2")["status"] == "completed"


def test_health_is_cut_at_the_deadline_too(capsys, db, fake_llm, state_dir, monkeypatch):
    monkeypatch.setattr(bridge, "MEMORY_API_DEADLINE_S", 0.3)
    with HostileMemoryAPI("trickle_head") as api:
        rc, out, err = run(capsys, db, fake_llm, state_dir, "--health", "--memory-url", api.url)

    assert rc == 2, out
    (memory,) = [line for line in out.splitlines() if line.startswith("memory")]   # one line
    assert memory.startswith("memory  FAIL  ")
    assert f" · HTTP API {api.url}: cannot reach {api.url}: no whole answer within 0.3 s" in memory


def test_the_deadline_is_the_documented_default():
    """The deadline is per request, not per read: longer than the per-read limit, bounded."""
    api = bridge.MemoryAPI("http://127.0.0.1:1", None)
    assert api.deadline_s is None and bridge.MEMORY_API_DEADLINE_S == 4 * bridge.MEMORY_API_TIMEOUT_S


# --------------------------------------------------------------------------------------
# row 16: 32,000-deep JSON from the memory server; the URL's control characters
# --------------------------------------------------------------------------------------


def test_json_nested_32000_deep_from_the_memory_server_is_a_refusal_not_a_crash(capsys, db, fake_llm,
                                                                                 state_dir):
    insert_plan(db, make_plan("p1"))
    insert_plan(db, make_plan("p2"))
    fake_llm.enqueue("hi").enqueue("hi")
    with HostileMemoryAPI("deep") as api:
        rc, out, err = run(capsys, db, fake_llm, state_dir, "--memory-url", api.url)

    assert rc == 0, err
    assert "Traceback" not in err
    assert len(warnings(err)) == 2 and all("stored it directly" in line for line in warnings(err))
    assert sorted(r["plan_id"] for r in stored_results(db)) == ["p1", "p2"]
    assert plan_state(db, "p1")["status"] == plan_state(db, "p2")["status"] == "completed"


def test_health_with_json_nested_32000_deep(capsys, db, fake_llm, state_dir):
    with HostileMemoryAPI("deep") as api:
        rc, out, err = run(capsys, db, fake_llm, state_dir, "--health", "--memory-url", api.url)

    assert rc in (0, 2), err        # the server's answer is no report: whatever it says, no crash
    assert "Traceback" not in err
    assert "memory  " in out


@pytest.mark.parametrize("tail", ["\r", "\n", "\r\n", "\t", " ", "\x1b[2J", "\x00"],
                         ids=["CR (as written)", "LF", "CRLF", "tab", "space", "escape", "NUL"])
def test_a_memory_url_with_a_control_character_is_a_config_error(capsys, db, fake_llm, state_dir, tail):
    """BRIDGE_MEMORY_URL ending in \\r (as written; a Windows-edited .env) and variants: exit
    2 with one line naming the URL, before any plan is claimed (before: exit 70 mid-run,
    the plan left in_progress)."""
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("hi")
    url = "http://127.0.0.1:8000" + tail

    rc, out, err = run(capsys, db, fake_llm, state_dir, environ={"MCP_API_KEY": KEY, "BRIDGE_MEMORY_URL": url})

    assert rc == 2, err
    assert err.splitlines()[0].startswith("bridge: error: memory URL ") and "control character" in err
    assert "\r" not in err and "\x1b" not in err
    assert plan_state(db, "p1") == {}


def test_a_control_character_inside_the_memory_url_is_refused_too(capsys, db, fake_llm, state_dir):
    rc, out, err = run(capsys, db, fake_llm, state_dir, "--memory-url", "http://127.0.0.1:80\n00")
    assert rc == 2 and "control character" in err


# --------------------------------------------------------------------------------------
# row 20: what the memory server says is printed through printable()
# --------------------------------------------------------------------------------------


def test_health_prints_the_servers_version_and_backend_escaped(capsys, db, fake_llm, state_dir):
    with HostileMemoryAPI("escapes") as api:
        rc, out, err = run(capsys, db, fake_llm, state_dir, "--health", "--memory-url", api.url)

    assert rc == 0, out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    line = next(line for line in out.splitlines() if api.url in line)
    assert "12.4.0\\x1b]0;owned\\x07\\x1b[2J" in line and "sqlite-vec\\r\\x1b[31mfake" in line


@pytest.mark.parametrize("value, shown", [({"v": 1}, None), ([1, 2], None), (True, None), (12, "12"),
                                          ("v" * 500, "v" * 80)])
def test_a_version_that_is_not_a_label_is_not_shown_as_one(value, shown):
    """server_label: a str or number as text (clipped), anything else None."""
    label = bridge.server_label(value)
    assert label == shown if shown is None else label.startswith(shown)
    assert label is None or len(label) < 140
