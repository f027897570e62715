"""Test doubles for bridge: a real fake OpenAI-compatible HTTP server and real
mcp-memory-service ("doobidoo") SQLite stores; and the helpers the tests share to run
bridge in-process and read what it left (stored results, plan state, requests sent,
folders).

Stdlib only. Nothing here imports bridge at import time (run_bridge and run_json import
it when called).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "DATA", "FIXTURE_STORE", "FIXTURE_STORES", "FIXTURE_PLAN_ID", "LAYOUTS", "FAULTS",
    "FakeLLM", "content_hash", "iso_z",
    "make_store", "insert_memory", "insert_plan", "make_plan", "check_store", "read_rows",
    "columns",
    "FakeAnthropic", "write_fake_claude",
    "bridge_args", "run_bridge", "run_json", "stored_results", "plan_rows", "plan_row", "plan_state",
    "state_of_row", "set_plan_state", "STATE_TABLE", "result_document", "FakeMemoryAPI", "MEMORY_API_MODES",
    "steps_by_id", "first_user", "user_text", "snapshot", "listing", "temp_files", "closed_port",
    "dead_pid", "child_env", "trust_project",
]

DATA = Path(__file__).parent / "data"
FIXTURE_STORE = DATA / "doobidoo-12.2.0-store.db"
# Stores the real server made, by version (how: tests/data/README.md); same 3 memories.
FIXTURE_STORES = {"12.2.0": FIXTURE_STORE, "12.4.0": DATA / "doobidoo-12.4.0-store.db"}
FIXTURE_PLAN_ID = "fixture-hello"

# --------------------------------------------------------------------------------------
# Fake OpenAI-compatible server
# --------------------------------------------------------------------------------------

FAULTS = (
    "drop", "delay", "stall", "cut", "not_json", "no_choices",
    "sse_error", "empty_stream", "no_stream", "comments",
    "endless_body", "endless_sse", "endless_error",
)
ENDLESS_CAP_BYTES = 50 * 1024 * 1024   # an endless reply stops here if the client never hangs up
ENDLESS_CAP_S = 30.0                   # ... or after this long
_DEFAULT_MODELS = ("fake-model",)
_DEFAULT_LOADED = "fake-model"
_CONN_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout)


def _split(text: str, size: int) -> list[str]:
    if not text:
        return []
    return [text[i:i + size] for i in range(0, len(text), size)]


def _half(n: int) -> int:
    """How many of n chunks a stall/cut sends: n // 2, but at least one when n >= 1."""
    return max(1, n // 2) if n else 0


def _prompt_chars(body: Any) -> int:
    total = 0
    if not isinstance(body, dict):
        return 0
    for msg in body.get("messages") or []:
        if not isinstance(msg, dict):
            continue
        c = msg.get("content")
        if isinstance(c, str):
            total += len(c)
        elif isinstance(c, list):
            for part in c:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += len(part["text"])
                elif isinstance(part, str):
                    total += len(part)
    return total


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: "_FakeServer"

    def handle_error(self, request, client_address):  # noqa: D401 - silence, but keep a record
        exc = sys.exc_info()[1]
        if isinstance(exc, _CONN_ERRORS + (OSError,)):
            return
        self.fake.errors.append(repr(exc))


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # like real servers: no Nagle delay between a response's header and body writes
    disable_nagle_algorithm = True
    server_version = "FakeLLM/1.0"
    sys_version = ""
    server: _Server

    # -- plumbing ---------------------------------------------------------------------
    def log_message(self, format, *args):  # noqa: A002 - silence
        pass

    def log_error(self, format, *args):  # noqa: A002
        pass

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = b""
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _record(self, raw: bytes) -> dict:
        parsed = None
        if raw:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
        rec = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "json": parsed,
            "body": raw.decode("utf-8", "replace"),
            "client_port": self.client_address[1],     # one per connection the client opened
        }
        fake = self.server.fake
        with fake._lock:
            fake.requests.append(rec)
        return rec

    def _send(self, status: int, body: bytes | str | dict | list, *,
              content_type: str = "application/json", extra: dict | None = None) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.send_response(status)
        hdrs = {"Content-Type": content_type, "Content-Length": str(len(body))}
        for k, v in (extra or {}).items():
            for existing in list(hdrs):
                if existing.lower() == k.lower():
                    del hdrs[existing]
            hdrs[k] = str(v)
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _start_sse(self, extra: dict | None = None) -> None:
        """Start a text/event-stream reply: chunked on a connection that stays open, as
        llama.cpp and LM Studio send it (fake.keep_alive), else ended by closing."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self._chunked = self.server.fake.keep_alive
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        for k, v in (extra or {}).items():
            self.send_header(k, str(v))
        self.end_headers()
        self.wfile.flush()

    def _write_sse(self, text: str) -> None:
        data = text.encode("utf-8")
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)
        self.wfile.flush()

    def _event(self, data: Any) -> None:
        payload = data if isinstance(data, str) else json.dumps(data)
        self._write_sse(f"data: {payload}\n\n")

    def _guard(self, fn) -> None:
        self._chunked = False
        try:
            fn()
            if self._chunked and not self.close_connection:
                self.wfile.write(b"0\r\n\r\n")     # the stream's end; the connection stays open
                self.wfile.flush()
        except _CONN_ERRORS:
            self.close_connection = True

    # -- routes ------------------------------------------------------------------------
    def do_GET(self):  # noqa: N802
        self._guard(self._get)

    def do_POST(self):  # noqa: N802
        self._guard(self._post)

    def _endless(self, piece: bytes, content_type: str, head: bytes = b"", pause_s: float = 0.0,
                 status: int = 200) -> None:
        """Send a body that never ends (head, then piece again and again) until the
        client hangs up or ENDLESS_CAP_BYTES / ENDLESS_CAP_S pass; record in
        fake.endless_sent how many bytes went out."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        sent, started = 0, time.monotonic()
        try:
            self.wfile.write(head)
            sent += len(head)
            while sent < ENDLESS_CAP_BYTES and time.monotonic() - started < ENDLESS_CAP_S:
                self.wfile.write(piece)
                sent += len(piece)
                if pause_s:
                    time.sleep(pause_s)
            self.wfile.flush()
        except _CONN_ERRORS + (OSError,):
            pass
        finally:
            self.server.fake._ended(sent)

    def _get(self) -> None:
        raw = self._read_body()
        self._record(raw)
        fake = self.server.fake
        path = self.path.split("?", 1)[0].rstrip("/")
        models = list(fake.models)
        if path == "/v1/models" and fake.endless_models:
            self._endless(b" " * 65536, "application/json", b'{"object": "list", "data": [')
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": m, "object": "model", "owned_by": fake.owned_by} for m in models]})
        elif path == "/api/v0/models" and fake.lmstudio:
            data = []
            for m in models:
                item = {"id": m, "object": "model", "type": "llm",
                        "state": "loaded" if m == fake.loaded else "not-loaded",
                        "max_context_length": 4096}
                if m == fake.loaded:
                    item["loaded_context_length"] = fake.context_length
                data.append(item)
            self._send(200, {"object": "list", "data": data})
        elif path == "/props" and fake.slots is not None:
            # llama.cpp llama-server: total_slots (= --parallel) and the per-slot context
            self._send(200, {"total_slots": fake.slots, "model_path": "/models/fake.gguf",
                             "default_generation_settings": {"n_ctx": fake.context_length}})
        else:
            self._not_found()

    def _not_found(self) -> None:
        self._send(404, {"error": {"message": f"fake server: no route {self.command} {self.path}",
                                   "type": "not_found_error"}})

    def _post(self) -> None:
        raw = self._read_body()
        rec = self._record(raw)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/chat/completions":
            self._not_found()
            return
        fake = self.server.fake
        with fake._lock:
            reply = fake._queue.pop(0) if fake._queue else None
        if reply is None and fake.default_reply is not None:
            reply = fake._reply(fake.default_reply)
        if reply is None:
            self._send(400, {"error": {"message": "fake server: no scripted reply queued",
                                       "type": "invalid_request_error"}})
            return
        self._rec = rec
        with fake._slot():
            if fake.latency_s:
                time.sleep(fake.latency_s)
            self._play(reply, rec["json"] if isinstance(rec["json"], dict) else {})

    # -- scripted replies -------------------------------------------------------------
    def _play(self, r: dict, req: dict) -> None:
        fault = r["fault"]
        extra = dict(r["headers"] or {})
        if r["retry_after"] is not None:
            extra["Retry-After"] = str(r["retry_after"])

        if fault == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        if fault == "delay":
            time.sleep(r["delay_s"])

        if r["error_body"] is not None:
            self._send(r["status"], r["error_body"], extra=extra)
            return
        if r["status"] != 200:
            self._send(r["status"], {"error": {"message": r["error"] or "fake error",
                                               "type": "server_error", "code": r["status"]}},
                       extra=extra)
            return
        if fault == "not_json":
            self._send(200, "<html>oops</html>", extra=extra)
            return
        if fault == "endless_body":     # a chat.completion whose content never ends, not streamed
            self._endless(b"a" * 65536, "application/json",
                          b'{"id": "x", "object": "chat.completion", "choices": [{"message": {"content": "')
            return
        if fault == "endless_sse":      # 200, then keep-alive comments and blank lines forever
            self._endless(b": keep-alive\n\n\n", "text/event-stream", pause_s=0.001)
            return
        if fault == "endless_error":    # 500 with an error body that never ends
            self._endless(b"x" * 65536, "application/json", b'{"error": {"message": "', status=500)
            return

        model = req.get("model") or (self.server.fake.models[0] if self.server.fake.models else "fake-model")
        fake = self.server.fake
        garbled = r["garbled"] is not None and "response_format" in req
        content = r["garbled"] if garbled else r["content"]
        pieces = _split(content, r["chunk_size"])
        kwargs = req.get("chat_template_kwargs")
        thinking_off = req.get("reasoning_effort") == "none" or (
            isinstance(kwargs, dict) and kwargs.get("enable_thinking") is False)
        reasoning = _split(r["reasoning"] or "", r["chunk_size"])
        if fake.thinking_off and thinking_off:
            reasoning = []
        finish_reason = r["finish_reason"]
        limit = req.get("max_tokens")
        if fake.cut_at_max_tokens and isinstance(limit, int) and \
                len(reasoning) + len(pieces) > limit:
            reasoning = reasoning[:limit]
            pieces = pieces[:limit - len(reasoning)]
            finish_reason = "length"
        prompt_tokens = _prompt_chars(req) // 4 + 1
        streaming = bool(req.get("stream"))

        if fault == "no_stream" or (not streaming and fault in (None, "delay")):
            self._send(200, self._completion(r, model, len(pieces), prompt_tokens), extra=extra)
            return
        if not streaming and fault in ("stall", "cut"):
            body = json.dumps(self._completion(r, model, len(pieces), prompt_tokens)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in extra.items():
                self.send_header(k, str(v))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            if fault == "stall":
                time.sleep(r["delay_s"])
            return

        # Everything below is a text/event-stream reply.
        self._start_sse(extra)
        if fault == "empty_stream":
            self._event("[DONE]")
            return
        if fault == "sse_error":
            msg = r["error"] or "Input does not fit in context length."
            self._write_sse("event: error\ndata: " + json.dumps({"error": {"message": msg}}) + "\n\n")
            return
        if fault == "no_choices":
            for _ in range(max(1, len(pieces))):
                self._event({"id": "x", "object": "chat.completion.chunk"})
            self._event("[DONE]")
            return

        def chunk(delta: dict, finish=None) -> dict:
            return {"id": "x", "object": "chat.completion.chunk", "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        events: list[Any] = []
        fields = ("reasoning_content", "reasoning") if r["reasoning_field"] == "both" \
            else (r["reasoning_field"],)
        for p in reasoning:
            events.append(chunk({field: p for field in fields}))
        content_events = [chunk({"content": p}) for p in pieces]
        if fault in ("stall", "cut"):
            content_events = content_events[: _half(len(content_events))]
        events.extend(content_events)
        if events:
            events[0]["choices"][0]["delta"] = {"role": "assistant", **events[0]["choices"][0]["delta"]}
        if fault not in ("stall", "cut"):
            events.append(chunk({}, finish_reason))
            so = req.get("stream_options")
            if r["usage"] and isinstance(so, dict) and so.get("include_usage"):
                # completion_tokens counts thinking too (OpenAI's usage: completion_tokens_details.
                # reasoning_tokens is a part of it; llama.cpp counts every token decoded)
                c = len(pieces) + len(reasoning)
                events.append({"id": "x", "object": "chat.completion.chunk", "model": model, "choices": [],
                               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": c,
                                         "total_tokens": prompt_tokens + c}})
            events.append("[DONE]")

        for i, ev in enumerate(events):
            if fault == "comments" and i > 0:
                self._write_sse(": ping\n\n")
            if r["chunk_delay_s"] and i:
                time.sleep(r["chunk_delay_s"])
            self._event(ev)
            self._rec["events_sent"] = i + 1      # how far the stream got before the client left
        if fault in ("stall", "cut"):
            self.close_connection = True        # the stream never ends: no last chunk
        if fault == "stall":
            time.sleep(r["delay_s"])

    @staticmethod
    def _completion(r: dict, model: str, n_chunks: int, prompt_tokens: int) -> dict:
        msg: dict[str, Any] = {"role": "assistant", "content": r["content"]}
        if r["reasoning"] is not None:
            for field in ("reasoning_content", "reasoning"):
                if r["reasoning_field"] in ("both", field):
                    msg[field] = r["reasoning"]
        out: dict[str, Any] = {"id": "x", "object": "chat.completion", "model": model,
                               "choices": [{"index": 0, "message": msg, "finish_reason": r["finish_reason"]}]}
        if r["usage"]:
            out["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": n_chunks,
                            "total_tokens": prompt_tokens + n_chunks}
        return out


class _FakeServer:
    """What FakeLLM and FakeAnthropic share: a real HTTP server on 127.0.0.1:<free port>
    run by `_handler` in a daemon thread, a queue of scripted replies, and the record of
    every request (`requests`) and of unexpected handler errors (`errors`)."""

    _handler: type[http.server.BaseHTTPRequestHandler] = _Handler

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[dict] = []
        self.requests: list[dict] = []
        self.errors: list[str] = []
        self.keep_alive = True
        self.endless_models = False          # GET /v1/models answers a body that never ends
        self.endless_sent: list[int] = []    # bytes each endless reply sent before it ended
        self._endless_done = threading.Condition(self._lock)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------
    def start(self):
        if self._server is not None:
            return self
        srv = _Server(("127.0.0.1", 0), self._handler)
        srv.fake = self  # type: ignore[assignment]
        self._server = srv
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=type(self).__name__, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        srv, self._server = self._server, None
        if srv is None:
            return
        srv.shutdown()
        srv.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._server.server_address[1]

    @property
    def _origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- recording --------------------------------------------------------------------
    def reset(self):
        """Forget the queue, the recorded requests and the errors; streams go back to
        being chunked on a connection that stays open (keep_alive)."""
        with self._lock:
            self._queue.clear()
            self.requests.clear()
            self.errors.clear()
            self.endless_sent.clear()
        self.keep_alive = True
        self.endless_models = False
        return self

    def _ended(self, sent: int) -> None:
        with self._endless_done:
            self.endless_sent.append(sent)
            self._endless_done.notify_all()

    def wait_endless(self, count: int = 1, timeout_s: float = 10.0) -> list[int]:
        """Wait until `count` endless replies have ended (the client hung up); return
        the bytes each sent. Raises AssertionError when they have not within timeout_s."""
        with self._endless_done:
            if not self._endless_done.wait_for(lambda: len(self.endless_sent) >= count, timeout_s):
                raise AssertionError(f"{count} endless replies did not end within {timeout_s} s "
                                     f"(ended: {self.endless_sent})")
            return list(self.endless_sent)

    @property
    def pending(self) -> int:
        """Number of scripted replies not yet played."""
        with self._lock:
            return len(self._queue)

    def _posts_to(self, route: str) -> list[dict]:
        """The recorded POST requests to `route` (query string and trailing slash ignored)."""
        with self._lock:
            return [r for r in self.requests
                    if r["method"] == "POST" and r["path"].split("?", 1)[0].rstrip("/") == route]


class FakeLLM(_FakeServer):
    """A real HTTP server on 127.0.0.1:<free port> speaking the OpenAI chat API."""

    def __init__(self) -> None:
        super().__init__()
        self.models: list[str] = list(_DEFAULT_MODELS)
        self.loaded: str | None = _DEFAULT_LOADED
        self.lmstudio: bool = True
        self.owned_by = "fake"              # /v1/models owned_by ("me": llama-cpp-python's server)
        self.context_length: int = 4096     # LM Studio loaded_context_length, llama.cpp n_ctx
        self.slots: int | None = None       # llama.cpp total_slots: set to serve /props and cap concurrency
        self.latency_s: float = 0.0         # held per chat request, inside a slot
        self.default_reply: str | None = None   # played when the queue is empty
        self.max_in_flight = 0              # the most chat requests seen at once
        self._in_flight = 0
        self._generation = 0                # bumped by reset(): requests of earlier tests don't count
        # Thinking models (sources below). cut_at_max_tokens: a streamed reply stops at the
        # request's max_tokens, one chunk a token, reasoning first, with finish_reason "length"
        # (thinking counts against max_tokens: LM Studio bug tracker #1990, #1602).
        # thinking_off: a reply's reasoning is not sent when the request asks not to think
        # (reasoning_effort "none": LM Studio 0.4.17 #2057, Ollama openai/openai.go, llama.cpp
        # tools/server/README.md; chat_template_kwargs.enable_thinking false: llama.cpp, vLLM).
        self.cut_at_max_tokens = False
        self.thinking_off = False
        self._slots_sem: threading.Semaphore | None = None

    def start(self) -> "FakeLLM":
        return super().start()

    def __enter__(self) -> "FakeLLM":
        return self.start()

    @property
    def root(self) -> str:
        return self._origin

    @property
    def url(self) -> str:
        return self.root + "/v1"

    # -- scripting --------------------------------------------------------------------
    def reset(self) -> "FakeLLM":
        super().reset()
        self.models = list(_DEFAULT_MODELS)
        self.loaded = _DEFAULT_LOADED
        self.lmstudio = True
        self.owned_by = "fake"
        self.context_length = 4096
        self.slots = None
        self.latency_s = 0.0
        self.default_reply = None
        self.cut_at_max_tokens = False
        self.thinking_off = False
        with self._lock:
            self.max_in_flight = 0
            self._in_flight = 0
            self._generation += 1
        self._slots_sem = None
        return self

    @contextlib.contextmanager
    def _slot(self):
        """Hold one of `slots` (when set) for the length of a chat request; count concurrency."""
        with self._lock:
            if self.slots is not None and self._slots_sem is None:
                self._slots_sem = threading.Semaphore(self.slots)
            sem = self._slots_sem
        if sem is not None:
            sem.acquire()
        with self._lock:
            generation = self._generation
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                if generation == self._generation:
                    self._in_flight -= 1
            if sem is not None:
                sem.release()

    def enqueue(self, content: str = "", *, status: int = 200, error: str | None = None,
                error_body: str | dict | None = None, retry_after: Any = None,
                headers: dict | None = None, usage: bool = True, chunk_size: int = 8,
                reasoning: str | None = None, fault: str | None = None,
                delay_s: float = 1.0, finish_reason: str = "stop",
                chunk_delay_s: float = 0.0, reasoning_field: str = "both",
                garbled: str | None = None) -> "FakeLLM":
        """Script one chat reply. reasoning: thinking text, streamed before content in
        reasoning_field: "reasoning_content" (llama.cpp --reasoning-format auto, LM Studio
        for R1), "reasoning" (Ollama, LM Studio for gpt-oss, vLLM since PR #27752) or
        "both". garbled: the content played instead when the request carries
        response_format (grammar-constrained decoding that garbles a model: LM Studio bug
        tracker #1555, gpt-oss's "?" substitutions and cut arrays)."""
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        reply = self._reply(content, status=status, error=error, error_body=error_body,
                            retry_after=retry_after, headers=headers, usage=usage, chunk_size=chunk_size,
                            reasoning=reasoning, fault=fault, delay_s=delay_s, finish_reason=finish_reason,
                            chunk_delay_s=chunk_delay_s)
        reply.update(reasoning_field=reasoning_field, garbled=garbled)
        with self._lock:
            self._queue.append(reply)
        return self

    @staticmethod
    def _reply(content: str, *, status: int = 200, error: str | None = None, error_body: Any = None,
               retry_after: Any = None, headers: dict | None = None, usage: bool = True,
               chunk_size: int = 8, reasoning: str | None = None, fault: str | None = None,
               delay_s: float = 1.0, finish_reason: str = "stop", chunk_delay_s: float = 0.0) -> dict:
        return {"content": content, "status": int(status), "error": error, "error_body": error_body,
                "retry_after": retry_after, "headers": dict(headers or {}), "usage": bool(usage),
                "chunk_size": int(chunk_size), "reasoning": reasoning, "fault": fault,
                "delay_s": float(delay_s), "finish_reason": finish_reason,
                "chunk_delay_s": float(chunk_delay_s), "reasoning_field": "both", "garbled": None}

    @property
    def chat_requests(self) -> list[dict]:
        return self._posts_to("/v1/chat/completions")


# --------------------------------------------------------------------------------------
# doobidoo (mcp-memory-service) stores
# --------------------------------------------------------------------------------------

# DDL copied verbatim from the store mcp-memory-service 12.2.0 made (tests/data).
_DDL_METADATA = """CREATE TABLE metadata (
                key TEXT PRIMARY KEY,
                value TEXT NOT NULL
            )"""

_DDL_MEMORIES_10 = """CREATE TABLE memories (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        content_hash TEXT UNIQUE NOT NULL,
                        content TEXT NOT NULL,
                        tags TEXT,
                        memory_type TEXT,
                        metadata TEXT,
                        created_at REAL,
                        updated_at REAL,
                        created_at_iso TEXT,
                        updated_at_iso TEXT,
                        deleted_at REAL DEFAULT NULL
                    )"""

_DDL_MEMORIES_12 = """CREATE TABLE memories (
                        id INTEGER PRIMARY KEY AUTOINCREMENT,
                        content_hash TEXT UNIQUE NOT NULL,
                        content TEXT NOT NULL,
                        tags TEXT,
                        memory_type TEXT,
                        metadata TEXT,
                        created_at REAL,
                        updated_at REAL,
                        created_at_iso TEXT,
                        updated_at_iso TEXT,
                        deleted_at REAL DEFAULT NULL
                    , store TEXT DEFAULT 'default', parent_id TEXT, version INTEGER DEFAULT 1, confidence REAL DEFAULT 1.0, last_accessed INTEGER, superseded_by TEXT, embedding_pending INTEGER NOT NULL DEFAULT 0)"""

_DDL_INDEXES_10 = [
    "CREATE INDEX idx_content_hash ON memories(content_hash)",
    "CREATE INDEX idx_created_at ON memories(created_at)",
    "CREATE INDEX idx_memory_type ON memories(memory_type)",
    "CREATE INDEX idx_deleted_at ON memories(deleted_at)",
]
_DDL_INDEXES_12 = _DDL_INDEXES_10 + [
    "CREATE INDEX idx_memories_embedding_pending ON memories(embedding_pending)",
]

DDL_FTS = """CREATE VIRTUAL TABLE memory_content_fts USING fts5(
                    content,
                    content='memories',
                    content_rowid='id',
                    tokenize='trigram'
                )"""

DDL_TRIGGERS = [
    """CREATE TRIGGER memories_fts_ai AFTER INSERT ON memories
                BEGIN
                    INSERT INTO memory_content_fts(rowid, content)
                    VALUES (new.id, new.content);
                END""",
    """CREATE TRIGGER memories_fts_au AFTER UPDATE ON memories
                BEGIN
                    DELETE FROM memory_content_fts WHERE rowid = old.id;
                    INSERT INTO memory_content_fts(rowid, content)
                    VALUES (new.id, new.content);
                END""",
    """CREATE TRIGGER memories_fts_ad AFTER DELETE ON memories
                BEGIN
                    DELETE FROM memory_content_fts WHERE rowid = old.id;
                END""",
]

_DDL_ORIGINAL = "CREATE TABLE memories (id TEXT PRIMARY KEY, content TEXT NOT NULL, metadata TEXT, created_at TEXT)"

LAYOUTS = ("12.x", "12.x-fresh", "10.x", "original")


def content_hash(content: str) -> str:
    """The server's hash: sha256 of the stripped, lowercased content."""
    return hashlib.sha256(content.strip().lower().encode("utf-8")).hexdigest()


def iso_z(ts: float) -> str:
    """The server's `_iso` format: naive UTC isoformat + 'Z'."""
    return datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None).isoformat() + "Z"


def _connect(path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=5.0)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def columns(path: str | Path, table: str = "memories") -> list[str]:
    """Column names of `table` (PRAGMA table_info order)."""
    conn = _connect(path)
    try:
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    finally:
        conn.close()


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone() is not None


def make_store(path: str | Path, layout: str = "12.x", version: str = "12.2.0") -> Path:
    """Create a store at `path` in one of LAYOUTS and return its Path.

    12.x        copy of the real store of that server version (FIXTURE_STORES; 3 memories,
                plan "fixture-hello" at row 2)
    12.x-fresh  empty; memories/metadata/FTS/triggers/indexes DDL of 12.2.0, no vec0 table
    10.x        empty; memories up to deleted_at, same FTS table and triggers
    original    empty; the original script's memories(id TEXT PK, content, metadata, created_at TEXT)
    """
    path = Path(path)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")
    if path.exists():
        raise FileExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "12.x":
        shutil.copyfile(FIXTURE_STORES[version], path)  # copyfile: the copy is writable
        return path
    conn = _connect(path)
    try:
        with conn:
            if layout == "original":
                conn.execute(_DDL_ORIGINAL)
            else:
                fresh12 = layout == "12.x-fresh"
                conn.execute(_DDL_METADATA)
                conn.execute(_DDL_MEMORIES_12 if fresh12 else _DDL_MEMORIES_10)
                for ddl in (_DDL_INDEXES_12 if fresh12 else _DDL_INDEXES_10):
                    conn.execute(ddl)
                conn.execute(DDL_FTS)
                for ddl in DDL_TRIGGERS:
                    conn.execute(ddl)
    finally:
        conn.close()
    return path


def _tags_list(tags: Any) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str):
        return [t for t in tags.split(",") if t]
    return [str(t) for t in tags]


def insert_memory(path: str | Path, content: str, *, tags: Any = "", memory_type: str = "note",
                  metadata: dict | str | None = None, created_at: float | None = None,
                  deleted_at: float | None = None, superseded_by: str | None = None) -> int | str:
    """Insert one memory the way the server writes it; return its row id.

    `tags` is a comma-joined string (stored verbatim) or a list (joined with ',').
    On the "original" layout the id is a uuid4 hex string (returned), `created_at` an
    ISO string, and tags/type go into metadata as {"tags": [...], "type": memory_type}.
    Only columns the layout has are written; asking for deleted_at/superseded_by on a
    layout without that column raises ValueError.
    """
    ts = time.time() if created_at is None else float(created_at)
    cols = set(columns(path))
    if not cols:
        raise ValueError(f"{path}: no memories table")
    if isinstance(metadata, str):
        meta_obj = json.loads(metadata)
    else:
        meta_obj = dict(metadata or {})
    conn = _connect(path)
    try:
        if "content_hash" not in cols:  # the original script's layout
            if deleted_at is not None or superseded_by is not None:
                raise ValueError("the original layout has no deleted_at/superseded_by column")
            meta_obj = {**meta_obj, "tags": _tags_list(tags), "type": memory_type}
            row_id = uuid.uuid4().hex
            with conn:
                conn.execute("INSERT INTO memories (id, content, metadata, created_at) VALUES (?, ?, ?, ?)",
                             (row_id, content, json.dumps(meta_obj), iso_z(ts)))
            return row_id
        tag_str = tags if isinstance(tags, str) else ",".join(_tags_list(tags))
        row: dict[str, Any] = {
            "content_hash": content_hash(content),
            "content": content,
            "tags": tag_str,
            "memory_type": memory_type,
            "metadata": metadata if isinstance(metadata, str) else json.dumps(meta_obj),
            "created_at": ts,
            "updated_at": ts,
            "created_at_iso": iso_z(ts),
            "updated_at_iso": iso_z(ts),
        }
        for name, value in (("deleted_at", deleted_at), ("superseded_by", superseded_by)):
            if value is not None:
                if name not in cols:
                    raise ValueError(f"this layout has no {name} column")
                row[name] = value
        if "store" in cols:
            row["store"] = "default"
        if "embedding_pending" in cols:
            row["embedding_pending"] = 0
        names = [k for k in row if k in cols]
        sql = f"INSERT INTO memories ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})"
        with conn:
            cur = conn.execute(sql, [row[k] for k in names])
        return cur.lastrowid
    finally:
        conn.close()


def insert_plan(path: str | Path, plan: dict, *, compact: bool = False,
                created_at: float | None = None, **kw: Any) -> int | str:
    """Store `plan` as JSON content (indent=2, or compact) tagged bridge-plan / planning."""
    content = json.dumps(plan, separators=(",", ":") if compact else None, indent=None if compact else 2)
    kw.setdefault("tags", "bridge-plan")
    kw.setdefault("memory_type", "planning")
    return insert_memory(path, content, created_at=created_at, **kw)


def make_plan(id: str = "p1", steps: list | None = None, **fields: Any) -> dict:  # noqa: A002
    """A valid bridge-plan-v1 dict; extra keyword fields are merged in (and may override)."""
    return {"$schema": "bridge-plan-v1", "id": id, "status": "pending",
            "context": {"objective": "test plan"},
            "steps": steps or [{"id": 1, "prompt": "Say hi"}], **fields}


def check_store(path: str | Path) -> None:
    """Assert the store is still valid (raises AssertionError otherwise):
    integrity_check ok; FTS integrity-check passes (when the FTS table exists); every live
    row's content_hash matches its content (not on the original layout); every metadata
    is NULL or a JSON object."""
    path = Path(path)
    assert path.exists(), f"store {path} does not exist"
    conn = _connect(path)
    try:
        res = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        assert res == ["ok"], f"PRAGMA integrity_check: {res}"
        if _has_table(conn, "memory_content_fts"):
            try:
                conn.execute("INSERT INTO memory_content_fts(memory_content_fts, rank) VALUES('integrity-check', 1)")
            except sqlite3.DatabaseError as e:
                raise AssertionError(f"FTS integrity-check failed: {e}") from None
            finally:
                conn.rollback()
        cols = [r[1] for r in conn.execute("PRAGMA table_info(memories)")]
        assert cols, "no memories table"
        if "content_hash" in cols:
            where = " WHERE deleted_at IS NULL" if "deleted_at" in cols else ""
            for rid, h, content in conn.execute(f"SELECT id, content_hash, content FROM memories{where}"):
                assert h == content_hash(content), f"row {rid}: content_hash does not match content"
        for rid, meta in conn.execute("SELECT id, metadata FROM memories"):
            if meta is None:
                continue
            try:
                obj = json.loads(meta)
            except ValueError:
                raise AssertionError(f"row {rid}: metadata is not JSON: {meta!r}") from None
            assert isinstance(obj, dict), f"row {rid}: metadata is not a JSON object: {meta!r}"
    finally:
        conn.close()


def read_rows(path: str | Path) -> list[dict]:
    """All memories rows (ordered by rowid) as dicts; parsed metadata under "metadata_obj"."""
    conn = _connect(path)
    conn.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in conn.execute("SELECT * FROM memories ORDER BY rowid")]
    finally:
        conn.close()
    for r in rows:
        meta = r.get("metadata")
        try:
            r["metadata_obj"] = json.loads(meta) if meta is not None else None
        except (ValueError, RecursionError):       # a hostile row may nest past json's limit
            r["metadata_obj"] = None
    return rows


# --------------------------------------------------------------------------------------
# Running bridge in-process, and reading what it left
# --------------------------------------------------------------------------------------

_RESULT_TAG = "bridge-result"      # literals copied from the contract (the README)
_PLAN_SCHEMA = "bridge-plan-v1"
_TEMP_SUFFIX = ".bridge-tmp"


def bridge_args(db: str | Path, url: str, state_dir: str | Path, *extra: str,
                retry_delay: str | None = "0") -> list[str]:
    """The flags of a test run: --db, --base-url, --state-dir and (unless retry_delay is
    None) --retry-delay, then `extra` (so a flag repeated in extra wins)."""
    argv = ["--db", str(db), "--base-url", url, "--state-dir", str(state_dir)]
    if retry_delay is not None:
        argv += ["--retry-delay", retry_delay]
    return [*argv, *extra]


def run_bridge(capsys, db: str | Path, fake_llm, state_dir: str | Path, *extra: str,
               environ: dict | None = None) -> tuple[int, str, str]:
    """bridge.main(bridge_args(db, fake_llm.url, state_dir, *extra)) in-process with
    `environ` (default: empty); return (rc, stdout, stderr)."""
    import bridge
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, *extra), environ={} if environ is None else environ)
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys, db: str | Path, fake_llm, state_dir: str | Path, *extra: str,
             environ: dict | None = None, require_output: bool = False) -> tuple[int, dict | None, str]:
    """run_bridge with --json; return (rc, the one plan result, stderr). The document must be
    {"plans": [one result]}; result is None when bridge printed nothing (a failure when
    require_output)."""
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--json", *extra, environ=environ)
    if require_output:
        assert out.strip(), f"bridge printed no JSON document (rc {rc}): {err}"
    doc = json.loads(out) if out.strip() else None
    result = None
    if doc is not None:
        assert list(doc) == ["plans"], doc
        assert len(doc["plans"]) == 1, doc
        result = doc["plans"][0]
    return rc, result, err


def result_document(content: str) -> dict:
    """The result document of a result memory's content: a plain-text summary, a blank
    line, then the document as one line of JSON (its last line)."""
    summary, blank, document = content.rpartition("\n")
    assert summary and blank == "\n" and summary.endswith("\n"), f"no summary before the JSON: {content[:200]!r}"
    return json.loads(document)


def stored_results(db: str | Path) -> list[dict]:
    """The result document of every result memory (tagged bridge-result), oldest first."""
    return [result_document(r["content"]) for r in read_rows(db) if _RESULT_TAG in (r["tags"] or "").split(",")]


def plan_rows(db: str | Path, plan_id: str) -> list[dict]:
    """Every row (live or deleted) whose content is bridge-plan-v1 plan `plan_id`, oldest first."""
    rows = []
    for row in read_rows(db):
        try:
            content = json.loads(row["content"])
        except (ValueError, RecursionError):
            continue
        if isinstance(content, dict) and content.get("$schema") == _PLAN_SCHEMA and content.get("id") == plan_id:
            rows.append(row)
    return rows


def plan_row(db: str | Path, plan_id: str) -> dict:
    """The first row holding plan `plan_id`."""
    rows = plan_rows(db, plan_id)
    if not rows:
        raise AssertionError(f"plan {plan_id} not in {db}")
    return rows[0]


STATE_TABLE = "bridge_plan_state"     # bridge's own table in the store (README)


def state_of_row(db: str | Path, row: dict) -> dict:
    """What bridge recorded of the plan memory `row` (a read_rows dict): its row of
    bridge_plan_state, keyed by the row's content_hash (computed on the original
    layout), as {status, run_id, claimed_at, heartbeat_at, owner: {host, pid} or None,
    finished_at, error, result_hash, resumed_from, and the fields of its extra column};
    {} when none (or no table yet)."""
    digest = row.get("content_hash") or content_hash(row["content"])
    conn = _connect(db)
    conn.row_factory = sqlite3.Row
    try:
        if not _has_table(conn, STATE_TABLE):
            return {}
        found = conn.execute(f"SELECT * FROM {STATE_TABLE} WHERE content_hash = ?", (digest,)).fetchone()
    finally:
        conn.close()
    if found is None:
        return {}
    state = {k: found[k] for k in found.keys() if k not in ("content_hash", "plan_id", "updated_at", "extra")}
    host, pid = state.pop("owner_host"), state.pop("owner_pid")
    state["owner"] = {"host": host, "pid": pid} if host is not None or pid is not None else None
    return {**json.loads(found["extra"] or "{}"), **state}


def set_plan_state(db: str | Path, plan_id: str, **changes: Any) -> None:
    """Change what bridge recorded of plan `plan_id` behind its back (a poisoned or
    stale state): columns of its bridge_plan_state row; owner={"host", "pid"} sets
    owner_host and owner_pid. The row must exist (bridge has run the plan)."""
    digest = plan_row(db, plan_id).get("content_hash") or content_hash(plan_row(db, plan_id)["content"])
    owner = changes.pop("owner", None)
    if owner is not None:
        changes.update(owner_host=owner.get("host"), owner_pid=owner.get("pid"))
    conn = _connect(db)
    try:
        with conn:
            cur = conn.execute(f"UPDATE {STATE_TABLE} SET {', '.join(f'{k} = ?' for k in changes)} "
                               "WHERE content_hash = ?", (*changes.values(), digest))
        assert cur.rowcount == 1, f"no {STATE_TABLE} row for plan {plan_id}"
    finally:
        conn.close()


def plan_state(db: str | Path, plan_id: str) -> dict:
    """What bridge recorded of plan `plan_id` (see state_of_row; {} when none)."""
    return state_of_row(db, plan_row(db, plan_id))


def steps_by_id(result: dict) -> dict[int, dict]:
    return {s["id"]: s for s in result["steps"]}


def first_user(request: dict) -> str:
    """The first user message of a recorded chat request."""
    return next(m["content"] for m in request["json"]["messages"] if m["role"] == "user")


def user_text(request: dict) -> str:
    """All non-system message text of a recorded chat request, joined."""
    return "\n".join(m["content"] for m in request["json"]["messages"] if m["role"] != "system")


def snapshot(root: Path) -> dict | None:
    """Every entry under root (symlinks not followed): kind, bytes, mode, link target;
    None when root does not exist."""
    if not root.exists() and not root.is_symlink():
        return None
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", path.read_bytes(), path.stat().st_mode)
    return out


def listing(folder: Path) -> list[str]:
    """Every file and folder below `folder`, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def temp_files(folder: Path) -> list[Path]:
    """bridge's temporary files (*.bridge-tmp) left below `folder`."""
    return sorted(p for p in folder.rglob("*") if p.name.endswith(_TEMP_SUFFIX))


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def dead_pid() -> int:
    """The pid of a process that has finished (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def trust_project(folder: str | Path) -> None:
    """Trust a project folder as a user would: `bridge --trust FOLDER`, written under this
    process's $HOME/.config/bridge (the tests' hermetic home), which every later bridge run
    of the test reads (in-process with an environ lacking HOME, or a child with child_env())."""
    import contextlib
    import io

    import bridge
    with contextlib.redirect_stdout(io.StringIO()):
        rc = bridge.main(["--trust", str(folder)], environ={"HOME": os.environ["HOME"]})
    assert rc == 0, f"bridge --trust {folder} exited {rc}"


def gone(pid: int) -> bool:
    """True when pid no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without BRIDGE_* variables, plus `extra`: for a bridge subprocess."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}, **extra}


# --------------------------------------------------------------------------------------
# Fake Anthropic Messages API server, and a fake `claude` CLI
# --------------------------------------------------------------------------------------

ANTHROPIC_FAULTS = ("error_event", "endless_body", "endless_sse")
_OVERLOADED = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


class _AnthropicHandler(_Handler):
    """POST /v1/messages streamed as the Messages API does (platform.claude.com/docs/en/
    api/messages-streaming); reuses _Handler's body reading, recording and sending."""

    server_version = "FakeAnthropic/1.0"

    def _get(self) -> None:
        self._record(self._read_body())
        self._anthropic_error(404, "not_found_error", f"fake anthropic: no route GET {self.path}")

    def _anthropic_error(self, status: int, kind: str, message: str, extra: dict | None = None) -> None:
        self._send(status, {"type": "error", "error": {"type": kind, "message": message}}, extra=extra)

    def _sse(self, event: str, data: dict) -> None:
        self._write_sse(f"event: {event}\ndata: {json.dumps(data)}\n\n")

    def _post(self) -> None:
        raw = self._read_body()
        self._record(raw)
        if self.path.split("?", 1)[0].rstrip("/") != "/v1/messages":
            self._anthropic_error(404, "not_found_error", f"fake anthropic: no route POST {self.path}")
            return
        fake = self.server.fake
        with fake._lock:
            reply = fake._queue.pop(0) if fake._queue else None
        if reply is None:
            self._anthropic_error(400, "invalid_request_error", "fake anthropic: no scripted reply queued")
            return
        extra = {"request-id": "req_fake"}
        if reply["retry_after"] is not None:
            extra["retry-after"] = str(reply["retry_after"])
        if reply["status"] != 200:
            self._send(reply["status"], reply["error_body"] if reply["error_body"] is not None else _OVERLOADED,
                       extra=extra)
            return
        if reply["fault"] == "endless_body":
            self._endless(b"a" * 65536, "application/json", b'{"type": "message", "content": [{"text": "')
            return
        if reply["fault"] == "endless_sse":
            self._endless(b": keep-alive\n\n\n", "text/event-stream", pause_s=0.001)
            return
        pieces = _split(reply["text"], 4)
        output_tokens = reply["output_tokens"] if reply["output_tokens"] is not None else max(1, len(pieces))
        self._start_sse(extra)
        self._sse("message_start", {"type": "message_start", "message": {
            "id": "msg_x", "type": "message", "role": "assistant", "model": reply["model"], "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": reply["input_tokens"], "output_tokens": 1}}})
        if reply["fault"] == "error_event":
            self._sse("error", _OVERLOADED)
            return
        self._sse("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}})
        self._sse("ping", {"type": "ping"})
        for i, piece in enumerate(pieces):
            self._sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                              "delta": {"type": "text_delta", "text": piece}})
            if i == 0:   # an event type this client does not know yet: must be ignored
                self._sse("future_thing", {"type": "future_thing", "note": "ignore me"})
        if not pieces:
            self._sse("future_thing", {"type": "future_thing", "note": "ignore me"})
        self._sse("content_block_stop", {"type": "content_block_stop", "index": 0})
        self._sse("message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                    "usage": {"output_tokens": output_tokens}})
        self._sse("message_stop", {"type": "message_stop"})


class FakeAnthropic(_FakeServer):
    """A real HTTP server on 127.0.0.1:<free port> speaking the Anthropic Messages API
    (POST /v1/messages, streamed). `.url` has no /v1 (bridge posts to {url}/v1/messages)."""

    _handler = _AnthropicHandler

    def start(self) -> "FakeAnthropic":
        return super().start()

    def __enter__(self) -> "FakeAnthropic":
        return self.start()

    @property
    def url(self) -> str:
        return self._origin

    def reset(self) -> "FakeAnthropic":
        return super().reset()

    def enqueue(self, text: str = "", *, status: int = 200, error_body: dict | str | None = None,
                retry_after: Any = None, fault: str | None = None,
                model: str = "claude-haiku-4-5-20251001", input_tokens: int = 12,
                output_tokens: int | None = None) -> "FakeAnthropic":
        """Queue one reply: a streamed message with `text` (status 200), or an error
        status with `error_body` (default: the API's overloaded_error body). fault
        "error_event": 200, message_start, then an `error` event. output_tokens
        defaults to the number of text deltas."""
        if fault is not None and fault not in ANTHROPIC_FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {ANTHROPIC_FAULTS}")
        reply = {"text": text, "status": int(status), "error_body": error_body, "retry_after": retry_after,
                 "fault": fault, "model": model, "input_tokens": int(input_tokens),
                 "output_tokens": output_tokens}
        with self._lock:
            self._queue.append(reply)
        return self

    @property
    def messages_requests(self) -> list[dict]:
        return self._posts_to("/v1/messages")


_FAKE_CLAUDE = r'''
"""A fake `claude` (Claude Code) CLI for bridge's tests; see tests/fakes.py write_fake_claude."""
import json
import os
import sys
import time

stdin = sys.stdin.read()
log = os.environ.get("CLAUDE_FAKE_LOG")
if log:
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "stdin": stdin,
                             "env": sorted(os.environ), "pid": os.getpid()}) + "\n")
mode = os.environ.get("CLAUDE_FAKE_MODE", "ok")
text = os.environ.get("CLAUDE_FAKE_TEXT", '{"a": 1}')


def out(obj):
    sys.stdout.write((obj if isinstance(obj, str) else json.dumps(obj)) + "\n")
    sys.stdout.flush()


init = {"type": "system", "subtype": "init", "model": "claude-haiku-4-5", "session_id": "s1",
        "cwd": os.getcwd(), "tools": ["Read", "Write"], "permissionMode": "default"}
if mode == "ok":
    out(init)
    out("not json at all")
    out({"type": "assistant", "message": {"role": "assistant", "content": [{"type": "text", "text": text}]},
         "session_id": "s1"})
    out({"type": "result", "subtype": "success", "is_error": False, "result": text,
         "usage": {"input_tokens": 100, "output_tokens": 20}, "total_cost_usd": 0.0123,
         "duration_ms": 900, "session_id": "s1"})
    sys.exit(0)
if mode in ("error_result", "error_result_exit1"):
    out(init)
    out({"type": "result", "subtype": "error_during_execution", "is_error": True,
         "result": "Invalid API key \u00b7 Please run /login", "usage": {"input_tokens": 0, "output_tokens": 0},
         "total_cost_usd": 0, "duration_ms": 10, "session_id": "s1"})
    sys.exit(1 if mode == "error_result_exit1" else 0)
if mode == "nonzero":
    sys.stderr.write("Error: When using --print, --output-format=stream-json requires --verbose\n")
    sys.stderr.flush()
    sys.exit(1)
if mode == "hang":
    out(init)
    time.sleep(60)
    sys.exit(0)
if mode == "endless_line":      # one line that never ends (stops at 100 MB or a closed pipe)
    out(init)
    piece = "a" * 65536
    try:
        for _ in range(1600):
            sys.stdout.write(piece)
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    time.sleep(60)
    sys.exit(0)
if mode == "garbage":
    out("not json at all")
    out("[1, 2, 3]")
    out("{broken")
    sys.exit(0)
sys.stderr.write(f"fake claude: unknown CLAUDE_FAKE_MODE {mode!r}\n")
sys.exit(3)
'''


def write_fake_claude(bin_dir: str | Path) -> Path:
    """Write an executable fake `claude` into bin_dir and return its path.

    It appends {"argv", "cwd", "stdin", "env" (names), "pid"} as one JSON line to the
    file named by $CLAUDE_FAKE_LOG, then acts by $CLAUDE_FAKE_MODE: ok (init, a garbage
    line, an assistant message and a success result with usage 100/20 and
    total_cost_usd 0.0123, exit 0), error_result (is_error result "Invalid API key ·
    Please run /login", exit 0; error_result_exit1: the same, exit 1), nonzero (one
    stderr line, exit 1, no result), hang (init, then sleep 60), endless_line (init, then
    one line of 100 MB without a newline, then sleep 60), garbage (only non-event lines,
    exit 0). The text is $CLAUDE_FAKE_TEXT, default {"a": 1}. (CLAUDE_*: bridge passes
    claude only an allow-list of its environment, and CLAUDE_* is on it.)
    """
    import os
    import sys

    bin_dir = Path(bin_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "claude"
    path.write_text(f"#!{sys.executable}\n" + _FAKE_CLAUDE.lstrip("\n"), encoding="utf-8")
    os.chmod(path, 0o755)
    return path


__all__ += ["ANTHROPIC_FAULTS", "FakeAnthropic", "write_fake_claude"]


# --------------------------------------------------------------------------------------
# Fake memory server HTTP API (mcp-memory-service `memory server --http`)
# --------------------------------------------------------------------------------------

MEMORY_API_MODES = ("store", "duplicate", "error", "other_file", "chunked", "drop")


class FakeMemoryAPI:
    """A real HTTP server on 127.0.0.1 (port 0) answering the memory server's routes as
    mcp-memory-service 12.4.0 does (web/api/memories.py, web/api/health.py; checked
    against the real one in tests/test_real_server.py): POST /api/memories stores the
    memory into `db` the way the server writes rows (insert_memory; no embedding here)
    and answers {success, message, content_hash}; GET /api/health needs no key, GET
    /api/health/detailed and POST /api/memories need X-API-Key == key (else 401).

    mode: "store" (default); "duplicate" (HTTP 200, success false, nothing stored);
    "error" (HTTP 500); "other_file" (success, but stored in no file bridge sees);
    "chunked" (stores only the first 800 characters, answers that chunk's hash);
    "drop" (closes the connection without an answer). .requests records each
    request as {"method", "path", "headers", "json"}.
    """

    def __init__(self, db: str | Path, key: str = "test-key"):
        self.db, self.key, self.mode = Path(db), key, "store"
        self.requests: list[dict] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # noqa: D401 - silence
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if self.headers.get("X-API-Key") == fake.key:
                    return True
                self._answer(401, {"detail": {"error": "authorization_required"}})
                return False

            def do_GET(self):  # noqa: N802 - http.server's name
                fake.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers),
                                      "json": None})
                if self.path == "/api/health":
                    self._answer(200, {"status": "healthy"})
                elif self.path == "/api/health/detailed" and self._authorized():
                    self._answer(200, {"status": "healthy", "version": "12.4.0",
                                       "storage": {"backend": "sqlite-vec"}})
                elif self.path != "/api/health/detailed":
                    self._answer(404, {"detail": "Not Found"})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                fake.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers),
                                      "json": body})
                if fake.mode == "drop":
                    self.close_connection = True
                    return
                if not self._authorized():
                    return
                fake._store(self, body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def _store(self, handler, body: dict) -> None:
        if self.mode == "error":
            return handler._answer(500, {"detail": "Internal Server Error"})
        if self.mode == "duplicate":
            return handler._answer(200, {"success": False, "message": "Duplicate content detected",
                                         "content_hash": None})
        content = body["content"][:800] if self.mode == "chunked" else body["content"]
        if self.mode != "other_file":
            metadata = {**body.get("metadata", {}), "conversation_id": body.get("conversation_id")}
            insert_memory(self.db, content, tags=body["tags"], memory_type=body["memory_type"], metadata=metadata)
        handler._answer(200, {"success": True, "message": "Memory stored successfully",
                              "content_hash": content_hash(content)})

    @property
    def posts(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST"]

    def __enter__(self) -> "FakeMemoryAPI":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
