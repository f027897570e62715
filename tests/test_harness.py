"""Tests of the test harness itself (tests/fakes.py, tests/conftest.py)."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from fakes import (
    DATA, FIXTURE_STORE, LAYOUTS, FakeLLM, check_store, columns, content_hash, insert_memory,
    insert_plan, iso_z, make_plan, make_store, read_rows,
)

# Canaries for _hermetic: set for the whole session, must be invisible inside every test.
os.environ.setdefault("BRIDGE_HARNESS_CANARY", "1")
os.environ.setdefault("MCP_MEMORY_SQLITE_PATH", "/nonexistent/harness-canary.db")
os.environ.setdefault("https_proxy", "http://127.0.0.1:9")

COLS_10 = ["id", "content_hash", "content", "tags", "memory_type", "metadata", "created_at",
           "updated_at", "created_at_iso", "updated_at_iso", "deleted_at"]
COLS_12 = COLS_10 + ["store", "parent_id", "version", "confidence", "last_accessed",
                     "superseded_by", "embedding_pending"]
COLS_ORIGINAL = ["id", "content", "metadata", "created_at"]
EXPECTED_COLS = {"12.x": COLS_12, "12.x-fresh": COLS_12, "10.x": COLS_10, "original": COLS_ORIGINAL}


@pytest.fixture
def httpx():
    return pytest.importorskip("httpx")


@pytest.fixture
def client(httpx):
    with httpx.Client(timeout=httpx.Timeout(3.0)) as c:
        yield c


def chat(fake, client, *, stream=True, include_usage=True, messages=None, model="fake-model", **extra):
    body = {"model": model, "messages": messages or [{"role": "user", "content": "Say hi"}]}
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
    body.update(extra)
    return client.post(fake.url + "/chat/completions", json=body), body


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) pairs of an SSE body; comment lines are dropped."""
    out = []
    for block in text.split("\n\n"):
        name, data = None, []
        for line in block.split("\n"):
            if line.startswith(":") or not line:
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
        if data:
            out.append((name, "\n".join(data)))
    return out


def data_objs(text: str) -> list:
    return [d if d == "[DONE]" else json.loads(d) for _, d in sse_events(text)]


def content_of(objs) -> str:
    return "".join(o["choices"][0]["delta"].get("content") or "" for o in objs
                   if o != "[DONE]" and o.get("choices"))


# ------------------------------------------------------------------ hermetic environment

def test_hermetic_env(tmp_path):
    assert "BRIDGE_HARNESS_CANARY" not in os.environ
    assert not any(k.startswith("BRIDGE_") for k in os.environ)
    for k in ("MCP_MEMORY_SQLITE_PATH", "MCP_MEMORY_BASE_DIR", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        assert k not in os.environ
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        assert k not in os.environ and k.lower() not in os.environ
    assert os.environ["HOME"] == str(tmp_path / "home") and (tmp_path / "home").is_dir()
    assert Path.home() == tmp_path / "home"
    assert os.environ["XDG_STATE_HOME"] == str(tmp_path / "state")


def test_fixtures_paths(tmp_path, project, state_dir, store):
    assert project == tmp_path / "project" and project.is_dir()
    assert state_dir == tmp_path / "state"
    assert store == tmp_path / "store.db" and store.is_file()
    assert os.access(store, os.W_OK)


# ------------------------------------------------------------------ fake LLM server

def test_url_and_root(fake_llm):
    assert fake_llm.url.startswith("http://127.0.0.1:") and fake_llm.url.endswith("/v1")
    assert fake_llm.url == fake_llm.root + "/v1"
    assert fake_llm.port > 0


def test_streaming_reassembles_with_usage(fake_llm, client):
    text = "Hello, streaming world! 0123456789"
    assert fake_llm.enqueue(text, chunk_size=5) is fake_llm
    r, body = chat(fake_llm, client, messages=[{"role": "system", "content": "abcdefgh"},
                                               {"role": "user", "content": "0123456789ab"}])
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["transfer-encoding"] == "chunked" and "connection" not in r.headers
    objs = data_objs(r.text)
    assert objs[-1] == "[DONE]"
    assert content_of(objs) == text
    chunks = [o for o in objs[:-1] if o["choices"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert all(c["model"] == "fake-model" and c["object"] == "chat.completion.chunk" for c in chunks)
    content_chunks = [c for c in chunks if "content" in c["choices"][0]["delta"]]
    assert len(content_chunks) == 7 and all(c["choices"][0]["finish_reason"] is None for c in content_chunks)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    usage = objs[-2]
    assert usage["choices"] == []
    p = (8 + 12) // 4 + 1
    assert usage["usage"] == {"prompt_tokens": p, "completion_tokens": 7, "total_tokens": p + 7}
    assert fake_llm.pending == 0
    assert fake_llm.chat_requests[0]["json"] == body


def test_usage_false_sends_none(fake_llm, client):
    fake_llm.enqueue("abc", usage=False)
    r, _ = chat(fake_llm, client)
    objs = data_objs(r.text)
    assert content_of(objs) == "abc"
    assert not any(isinstance(o, dict) and "usage" in o for o in objs)


def test_usage_only_when_requested(fake_llm, client):
    fake_llm.enqueue("abc")
    r, _ = chat(fake_llm, client, include_usage=False)
    objs = data_objs(r.text)
    assert content_of(objs) == "abc" and objs[-1] == "[DONE]"
    assert not any(isinstance(o, dict) and "usage" in o for o in objs)


def test_non_streaming_request_gets_json(fake_llm, client):
    fake_llm.enqueue("plain answer")
    r, _ = chat(fake_llm, client, stream=False, model="other-model")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    j = r.json()
    assert j["object"] == "chat.completion" and j["model"] == "other-model"
    assert j["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "plain answer"},
                             "finish_reason": "stop"}]
    assert j["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}


def test_fault_no_stream_ignores_stream_flag(fake_llm, client):
    fake_llm.enqueue("x" * 9, fault="no_stream", usage=False)
    r, _ = chat(fake_llm, client, stream=True)
    j = r.json()
    assert j["choices"][0]["message"]["content"] == "x" * 9 and "usage" not in j


def test_reasoning_is_not_content(fake_llm, client):
    fake_llm.enqueue("answer", reasoning="thinking hard about it")
    r, _ = chat(fake_llm, client)
    objs = data_objs(r.text)
    assert content_of(objs) == "answer"
    deltas = [o["choices"][0]["delta"] for o in objs if o != "[DONE]" and o["choices"]]
    assert deltas[0]["role"] == "assistant"
    rc = "".join(d.get("reasoning_content", "") for d in deltas)
    assert rc == "thinking hard about it" == "".join(d.get("reasoning", "") for d in deltas)
    first_content = next(i for i, d in enumerate(deltas) if "content" in d)
    assert all("content" not in d for d in deltas[:first_content])
    assert all("reasoning_content" not in d for d in deltas[first_content:])


def test_empty_queue_is_400(fake_llm, client):
    r, _ = chat(fake_llm, client)
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "fake server: no scripted reply queued",
                                  "type": "invalid_request_error"}}
    assert len(fake_llm.chat_requests) == 1


def test_error_status_retry_after_and_headers(fake_llm, client):
    (fake_llm.enqueue(status=503, error="busy", retry_after=7, headers={"X-Extra": "yes"})
             .enqueue(status=429))
    r, _ = chat(fake_llm, client)
    assert r.status_code == 503 and r.headers["retry-after"] == "7" and r.headers["x-extra"] == "yes"
    assert r.json() == {"error": {"message": "busy", "type": "server_error", "code": 503}}
    r, _ = chat(fake_llm, client)  # same keep-alive connection
    assert r.status_code == 429 and "retry-after" not in r.headers
    assert r.json()["error"]["message"] == "fake error"


def test_error_body_raw(fake_llm, client):
    fake_llm.enqueue(status=400, error_body={"error": "'response_format.type' must be 'json_schema'"})
    fake_llm.enqueue(status=400, error_body='{"error":{"code":400,"type":"exceed_context_size_error"}}')
    r, _ = chat(fake_llm, client)
    assert r.status_code == 400 and r.json() == {"error": "'response_format.type' must be 'json_schema'"}
    r, _ = chat(fake_llm, client)
    assert r.text == '{"error":{"code":400,"type":"exceed_context_size_error"}}'


def test_enqueue_rejects_unknown_fault(fake_llm):
    with pytest.raises(ValueError):
        fake_llm.enqueue("x", fault="bogus")
    with pytest.raises(TypeError):
        fake_llm.enqueue("x", bogus=1)


def test_fault_drop(fake_llm, client, httpx):
    fake_llm.enqueue("never sent", fault="drop")
    with pytest.raises(httpx.TransportError):
        chat(fake_llm, client)
    assert len(fake_llm.chat_requests) == 1


def test_fault_delay_times_out(fake_llm, httpx):
    fake_llm.enqueue("late", fault="delay", delay_s=0.5)
    with httpx.Client(timeout=httpx.Timeout(2.0, read=0.1)) as c:
        t0 = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            chat(fake_llm, c)
        assert time.monotonic() - t0 < 0.45


def test_fault_delay_then_normal(fake_llm, client):
    fake_llm.enqueue("late", fault="delay", delay_s=0.2)
    t0 = time.monotonic()
    r, _ = chat(fake_llm, client)
    assert time.monotonic() - t0 >= 0.2
    assert content_of(data_objs(r.text)) == "late"


def test_fault_stall_times_out_after_half(fake_llm, httpx):
    fake_llm.enqueue("aaaabbbbccccdddd", chunk_size=4, fault="stall", delay_s=0.5)
    got = []
    with httpx.Client(timeout=httpx.Timeout(2.0, read=0.1)) as c:
        with c.stream("POST", fake_llm.url + "/chat/completions",
                      json={"model": "m", "messages": [], "stream": True}) as r:
            assert r.status_code == 200
            with pytest.raises(httpx.ReadTimeout):
                for line in r.iter_lines():
                    got.append(line)
    objs = [json.loads(x[6:]) for x in got if x.startswith("data: ")]
    assert content_of(objs) == "aaaabbbb"


@pytest.mark.parametrize("keep_alive", [True, False])
def test_streams_keep_the_connection_open_like_real_servers(fake_llm, httpx, keep_alive):
    """Streams are chunked and the connection serves the next request, as llama.cpp's and
    LM Studio's do; with keep_alive off, each stream ends by closing its connection."""
    fake_llm.keep_alive = keep_alive
    fake_llm.enqueue("one").enqueue("two")
    with httpx.Client(timeout=3.0) as c:
        first, _ = chat(fake_llm, c)
        second, _ = chat(fake_llm, c)
    assert [content_of(data_objs(r.text)) for r in (first, second)] == ["one", "two"]
    assert ("connection" not in first.headers) is keep_alive
    assert len({r["client_port"] for r in fake_llm.chat_requests}) == (1 if keep_alive else 2)


@pytest.mark.parametrize("keep_alive", [True, False])
def test_fault_cut(fake_llm, httpx, client, keep_alive):
    """A cut stream never ends: chunked, the last chunk is missing (a protocol error at
    the client); else the connection closes before [DONE]."""
    fake_llm.keep_alive = keep_alive
    fake_llm.enqueue("aaaabbbbccccdddd", chunk_size=4, fault="cut")
    body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    lines = []
    with client.stream("POST", fake_llm.url + "/chat/completions", json=body) as r:
        assert r.status_code == 200
        try:
            lines.extend(r.iter_lines())
            ended = "closed"
        except httpx.RemoteProtocolError:
            ended = "incomplete chunked read"
    assert ended == ("incomplete chunked read" if keep_alive else "closed")
    objs = data_objs("\n".join(lines) + "\n\n")
    assert "[DONE]" not in objs
    assert content_of(objs) == "aaaabbbb"
    assert all(o["choices"][0]["finish_reason"] is None for o in objs)


def test_fault_not_json(fake_llm, client):
    fake_llm.enqueue("x", fault="not_json")
    r, _ = chat(fake_llm, client)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.text == "<html>oops</html>"
    with pytest.raises(ValueError):
        r.json()


def test_fault_no_choices(fake_llm, client):
    fake_llm.enqueue("hello", fault="no_choices")
    r, _ = chat(fake_llm, client)
    objs = data_objs(r.text)
    assert objs[-1] == "[DONE]" and len(objs) >= 2
    assert all(o == {"id": "x", "object": "chat.completion.chunk"} for o in objs[:-1])


def test_fault_sse_error(fake_llm, client):
    fake_llm.enqueue(fault="sse_error").enqueue(fault="sse_error", error="boom")
    r, _ = chat(fake_llm, client)
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    assert r.text.startswith("event: error\ndata: ")
    assert sse_events(r.text) == [("error", json.dumps(
        {"error": {"message": "Input does not fit in context length."}}))]
    r, _ = chat(fake_llm, client)
    assert json.loads(sse_events(r.text)[0][1])["error"]["message"] == "boom"


def test_fault_empty_stream(fake_llm, client):
    fake_llm.enqueue("ignored", fault="empty_stream")
    r, _ = chat(fake_llm, client)
    assert r.status_code == 200 and r.text == "data: [DONE]\n\n"


def test_fault_comments(fake_llm, client):
    fake_llm.enqueue("with pings in between", fault="comments")
    r, _ = chat(fake_llm, client)
    assert r.text.count(": ping\n\n") >= 3
    assert not r.text.startswith(":")
    objs = data_objs(r.text)
    assert content_of(objs) == "with pings in between" and objs[-1] == "[DONE]"


def test_requests_recorded(fake_llm, client):
    client.get(fake_llm.url + "/models", headers={"Authorization": "Bearer k"})
    fake_llm.enqueue("ok")
    _, body = chat(fake_llm, client, stream=False, temperature=0.2)
    reqs = fake_llm.requests
    assert [(r["method"], r["path"]) for r in reqs] == [("GET", "/v1/models"),
                                                         ("POST", "/v1/chat/completions")]
    assert reqs[0]["json"] is None and reqs[0]["headers"]["authorization"] == "Bearer k"
    assert all(k == k.lower() for k in reqs[1]["headers"])
    assert reqs[1]["headers"]["content-type"] == "application/json"
    assert fake_llm.chat_requests == [reqs[1]]
    assert reqs[1]["json"] == body and reqs[1]["json"]["temperature"] == 0.2
    fake_llm.enqueue("left over")
    fake_llm.models, fake_llm.loaded, fake_llm.lmstudio = ["zzz"], None, False
    fake_llm.reset()
    assert fake_llm.requests == [] and fake_llm.pending == 0
    assert (fake_llm.models, fake_llm.loaded, fake_llm.lmstudio) == (["fake-model"], "fake-model", True)


def test_models_routes(fake_llm, client):
    r = client.get(fake_llm.url + "/models")
    assert r.json() == {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]}
    fake_llm.models = ["a", "b"]
    fake_llm.loaded = "b"
    data = client.get(fake_llm.root + "/api/v0/models").json()["data"]
    assert data == [
        {"id": "a", "object": "model", "type": "llm", "state": "not-loaded", "max_context_length": 4096},
        {"id": "b", "object": "model", "type": "llm", "state": "loaded", "max_context_length": 4096,
         "loaded_context_length": 4096},
    ]
    fake_llm.loaded = None
    data = client.get(fake_llm.root + "/api/v0/models").json()["data"]
    assert [d["state"] for d in data] == ["not-loaded", "not-loaded"]
    assert all("loaded_context_length" not in d for d in data)
    fake_llm.lmstudio = False
    assert client.get(fake_llm.root + "/api/v0/models").status_code == 404
    assert client.get(fake_llm.url + "/models").status_code == 200


def test_fresh_server_defaults():
    with FakeLLM() as f:
        assert (f.models, f.loaded, f.lmstudio) == (["fake-model"], "fake-model", True)
        assert f.url.startswith("http://127.0.0.1:")
    assert f._server is None


# ------------------------------------------------------------------ stores

def _sql(path, *names):
    conn = sqlite3.connect(path)
    try:
        return {n: conn.execute("SELECT sql FROM sqlite_master WHERE name=?", (n,)).fetchone()
                for n in names}
    finally:
        conn.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_make_store_layouts(tmp_path, layout):
    path = make_store(tmp_path / f"{layout}.db", layout)
    assert columns(path) == EXPECTED_COLS[layout]
    check_store(path)
    rows = read_rows(path)
    assert len(rows) == (3 if layout == "12.x" else 0)
    conn = sqlite3.connect(path)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert ("memory_content_fts" in names) == (layout != "original")
    assert ("memory_embeddings" in names) == (layout == "12.x")
    # rows written like the server's keep the store valid
    rid = insert_memory(path, "A note\n", tags="a,b")
    insert_plan(path, make_plan("p-" + layout))
    insert_plan(path, make_plan("q-" + layout), compact=True)
    check_store(path)
    assert len(read_rows(path)) == len(rows) + 3
    if layout == "original":
        assert isinstance(rid, str) and len(rid) == 32
    else:
        assert isinstance(rid, int)
    with pytest.raises(FileExistsError):
        make_store(path, layout)


def test_fresh_ddl_matches_fixture(tmp_path):
    names = ["memories", "metadata", "memory_content_fts", "memories_fts_ai", "memories_fts_au",
             "memories_fts_ad", "idx_content_hash", "idx_created_at", "idx_memory_type",
             "idx_deleted_at", "idx_memories_embedding_pending"]
    fresh = make_store(tmp_path / "f.db", "12.x-fresh")
    assert _sql(fresh, *names) == _sql(FIXTURE_STORE, *names)
    ten = _sql(make_store(tmp_path / "t.db", "10.x"), *names)
    assert ten["idx_memories_embedding_pending"] is None
    assert "embedding_pending" not in ten["memories"][0]
    assert ten["memory_content_fts"] == _sql(FIXTURE_STORE, "memory_content_fts")["memory_content_fts"]


def test_fixture_store_contents(store):
    rows = read_rows(store)
    assert [r["id"] for r in rows] == [1, 2, 3]
    plan_row = rows[1]
    assert plan_row["memory_type"] == "planning" and plan_row["tags"] == "bridge-plan"
    plan = json.loads(plan_row["content"])
    assert plan["id"] == "fixture-hello" and plan["$schema"] == "bridge-plan-v1"
    assert plan == json.loads((DATA / "doobidoo-12.2.0-store.plan.json").read_text())
    assert plan_row["metadata_obj"] == {}
    check_store(store)


def test_check_store_catches_content_update_in_place(store):
    conn = sqlite3.connect(store)
    with conn:
        conn.execute("UPDATE memories SET content = ? WHERE id = 2", ('{"changed": true}',))
    conn.close()
    with pytest.raises(AssertionError):
        check_store(store)


def test_check_store_fts_check_alone(store):
    # content and hash kept consistent: only the FTS index is corrupt
    new = "Totally different words now"
    conn = sqlite3.connect(store)
    with conn:
        conn.execute("UPDATE memories SET content = ?, content_hash = ? WHERE id = 1", (new, content_hash(new)))
    conn.close()
    with pytest.raises(AssertionError, match="FTS"):
        check_store(store)


def test_check_store_hash_check_alone(store):
    conn = sqlite3.connect(store)
    with conn:
        conn.execute("UPDATE memories SET content_hash = ? WHERE id = 3", ("0" * 64,))
    conn.close()
    with pytest.raises(AssertionError, match="content_hash"):
        check_store(store)
    conn = sqlite3.connect(store)
    with conn:  # a soft-deleted row is not checked
        conn.execute("UPDATE memories SET deleted_at = 1.0 WHERE id = 3")
    conn.close()
    check_store(store)


@pytest.mark.parametrize("bad", ["[1, 2]", "not json", '"str"'])
def test_check_store_metadata_must_be_object(store, bad):
    conn = sqlite3.connect(store)
    with conn:
        conn.execute("UPDATE memories SET metadata = ? WHERE id = 2", (bad,))
    conn.close()
    with pytest.raises(AssertionError, match="metadata"):
        check_store(store)


def test_check_store_safe_updates_pass(store):
    conn = sqlite3.connect(store)
    with conn:
        conn.execute("UPDATE memories SET metadata = ?, updated_at = ?, tags = ? WHERE id = 2",
                     (json.dumps({"bridge": {"status": "running"}}), time.time(), "bridge-plan,x"))
    conn.close()
    check_store(store)
    assert read_rows(store)[1]["metadata_obj"] == {"bridge": {"status": "running"}}


def test_check_store_10x_update_in_place(tmp_path):
    path = make_store(tmp_path / "t.db", "10.x")
    insert_memory(path, "first content")
    insert_memory(path, "second content")
    conn = sqlite3.connect(path)
    with conn:  # every trigram of the new text is indexed (row 2), so the UPDATE itself succeeds
        conn.execute("UPDATE memories SET content = 'second conten', content_hash = ? WHERE id = 1",
                     (content_hash("second conten"),))
    conn.close()
    with pytest.raises(AssertionError):
        check_store(path)


@pytest.fixture
def far_timezone(monkeypatch):
    """A local time zone far from UTC, so local-time mistakes show."""
    if not hasattr(time, "tzset"):
        pytest.skip("no time.tzset")
    monkeypatch.setenv("TZ", "Etc/GMT-9")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_insert_memory_hash_and_iso(store, far_timezone):
    ts = 1795299327.3844597
    assert iso_z(ts) == "2026-11-21T22:15:27.384460Z"  # as the real server wrote row 1
    assert iso_z(0.0) == "1970-01-01T00:00:00Z"
    rid = insert_memory(store, "  Hello World \n", tags="x,y", memory_type="note",
                        metadata={"k": 1}, created_at=ts)
    row = read_rows(store)[-1]
    assert row["id"] == rid == 4
    assert row["content"] == "  Hello World \n"
    assert row["content_hash"] == hashlib.sha256(b"hello world").hexdigest()
    assert (row["created_at"], row["updated_at"]) == (ts, ts)
    assert row["created_at_iso"] == row["updated_at_iso"] == "2026-11-21T22:15:27.384460Z"
    assert (row["store"], row["embedding_pending"], row["deleted_at"], row["superseded_by"]) == ("default", 0, None, None)
    assert (row["tags"], row["memory_type"], row["metadata"]) == ("x,y", "note", '{"k": 1}')
    before = time.time()
    insert_memory(store, "now", deleted_at=5.0, superseded_by="abc")
    row = read_rows(store)[-1]
    assert before <= row["created_at"] <= time.time()
    assert row["created_at_iso"] == iso_z(row["created_at"]) and row["created_at_iso"].endswith("Z")
    assert (row["deleted_at"], row["superseded_by"], row["metadata"]) == (5.0, "abc", "{}")
    with pytest.raises(sqlite3.IntegrityError):  # same hash as row 1 of the fixture
        insert_memory(store, "the team prefers pytest over unittest for new tests.")
    check_store(store)


def test_insert_memory_10x_and_original(tmp_path):
    ten = make_store(tmp_path / "t.db", "10.x")
    insert_memory(ten, "hi", created_at=100.0)
    row = read_rows(ten)[0]
    assert row["created_at_iso"] == "1970-01-01T00:01:40Z" and "store" not in row
    with pytest.raises(ValueError):
        insert_memory(ten, "other", superseded_by="x")
    orig = make_store(tmp_path / "o.db", "original")
    rid = insert_memory(orig, "hello", tags="a,b", memory_type="planning", metadata={"m": 1}, created_at=100.0)
    row = read_rows(orig)[0]
    assert row["id"] == rid and int(rid, 16) >= 0 and len(rid) == 32
    assert row["created_at"] == "1970-01-01T00:01:40Z"
    assert row["metadata_obj"] == {"m": 1, "tags": ["a", "b"], "type": "planning"}
    check_store(orig)


def test_insert_plan_and_make_plan(tmp_path):
    plan = make_plan("p9", steps=[{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}], status="running")
    assert plan == {"$schema": "bridge-plan-v1", "id": "p9", "status": "running",
                    "context": {"objective": "test plan"},
                    "steps": [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}]}
    assert make_plan()["steps"] == [{"id": 1, "prompt": "Say hi"}]
    path = make_store(tmp_path / "s.db", "12.x-fresh")
    insert_plan(path, plan)
    insert_plan(path, make_plan("c"), compact=True, metadata={"bridge": {"status": "done"}})
    a, b = read_rows(path)
    assert a["content"] == json.dumps(plan, indent=2) and "\n  " in a["content"]
    assert b["content"] == json.dumps(make_plan("c"), separators=(",", ":"))
    assert (a["tags"], a["memory_type"]) == ("bridge-plan", "planning")
    assert b["metadata_obj"] == {"bridge": {"status": "done"}}
    check_store(path)
