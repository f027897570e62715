"""Result memories through the memory server's HTTP API (--memory-url), the readable
summary they begin with, and --health's memory side.

FakeMemoryAPI (tests/fakes.py) answers as mcp-memory-service 12.4.0's HTTP API does
and writes into the same store file; tests/test_real_server.py runs the real one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import bridge
from fakes import (FakeMemoryAPI, bridge_args, check_store, child_env, closed_port, insert_memory, insert_plan,
                   make_plan, plan_state, read_rows, result_document, stored_results)

BRIDGE_PY = Path(bridge.__file__).resolve()
KEY = "test-key"


def run(capsys, db, fake_llm, state_dir, *extra, environ=None):
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, *extra),
                     environ={"MCP_API_KEY": KEY} if environ is None else environ)
    return rc, capsys.readouterr()


def warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("bridge: warning:")]


def two_step_plan(plan_id: str = "p1") -> dict:
    return make_plan(plan_id, steps=[{"id": 1, "title": "greeting", "prompt": "Say hi"},
                                     {"id": 2, "title": "never\nmatches", "prompt": "x", "max_retries": 0,
                                      "validation": {"type": "regex", "pattern": "^NEVER$"},
                                      "on_failure": "skip"}])


def test_result_goes_through_the_http_api_once_with_the_run_id_and_key(capsys, db, fake_llm, state_dir):
    """--memory-url: one POST /api/memories (X-API-Key from MCP_API_KEY, conversation_id =
    the run id, tags and type of a result), stored once (by the server), no warning; the
    plan's state points at it and --show reads it."""
    insert_plan(db, two_step_plan())
    fake_llm.enqueue("hi").enqueue("no")
    with FakeMemoryAPI(db, KEY) as api:
        rc, captured = run(capsys, db, fake_llm, state_dir, "--memory-url", api.url, "--json")

    assert rc == 0, captured.err
    assert warnings(captured.err) == []
    (result,) = json.loads(captured.out)["plans"]
    (post,) = api.posts
    assert post["path"] == "/api/memories"
    assert post["headers"]["X-API-Key"] == KEY
    body = post["json"]
    assert body["conversation_id"] == result["run_id"]
    assert (body["tags"], body["memory_type"]) == (["bridge-result", "plan:p1"], "tool_outcome")
    assert body["metadata"] == {"plan_id": "p1", "run_id": result["run_id"]}
    (row,) = [r for r in read_rows(db) if r["memory_type"] == "tool_outcome"]
    assert row["content"] == body["content"]
    assert row["metadata_obj"]["conversation_id"] == result["run_id"]     # the server's row, not bridge's
    assert plan_state(db, "p1")["result_hash"] == row["content_hash"] == result["result_hash"]
    rc, shown = run(capsys, db, fake_llm, state_dir, "--show", "p1", "--json")
    assert rc == 0 and json.loads(shown.out) == {**result_document(row["content"]), "result_hash": row["content_hash"]}
    check_store(db)


def test_the_result_begins_with_a_readable_summary_then_the_whole_document(capsys, db, fake_llm, state_dir):
    """The content's first lines say plan, outcome, run id, each step's status, files; a
    plan's newline cannot forge a line; the last line is the whole document (--json)."""
    insert_plan(db, two_step_plan())
    fake_llm.enqueue("hi").enqueue("no")
    rc, captured = run(capsys, db, fake_llm, state_dir, "--json")
    assert rc == 0
    (result,) = json.loads(captured.out)["plans"]
    (row,) = [r for r in read_rows(db) if r["memory_type"] == "tool_outcome"]

    summary, _, last = row["content"].rpartition("\n\n")
    lines = summary.splitlines()
    assert lines[:4] == [f"bridge result: plan p1 completed (run {result['run_id']})", "objective: test plan",
                         "steps: 1 succeeded, 0 failed, 1 skipped", "step 1 (greeting): succeeded"]
    assert lines[4] == f"step 2 (never matches): skipped: {' '.join(result['steps'][1]['error'].split())}"
    assert len(lines) == 5
    del result["result_hash"]       # added to the printed summary after the result was stored
    assert json.loads(last) == result


@pytest.mark.parametrize("mode, reason", [
    ("duplicate", "HTTP 200: Duplicate content detected"),
    ("error", "HTTP 500"),
    ("drop", "cannot reach it"),
    ("other_file", "writes another store file than"),
    ("chunked", "stored the result as another memory"),
])
def test_a_refusing_or_broken_memory_server_gets_the_result_stored_directly_once(
        capsys, db, fake_llm, state_dir, mode, reason):
    """The server refuses, fails, drops the connection, writes another file or splits the
    result: one warning line naming why, and the result is stored directly, once; the
    plan is completed and points at it."""
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("hi")
    with FakeMemoryAPI(db, KEY) as api:
        api.mode = mode
        rc, captured = run(capsys, db, fake_llm, state_dir, "--memory-url", api.url)

    assert rc == 0, captured.err
    (line,) = warnings(captured.err)
    assert reason in line and api.url in line and "stored it directly" in line
    # whole results (the "chunked" server also left its 800-character fragment)
    results = [r for r in read_rows(db) if r["memory_type"] == "tool_outcome"
               and bridge.parse_result_content(r["content"]) is not None]
    assert len(results) == 1
    assert plan_state(db, "p1")["status"] == "completed"
    assert plan_state(db, "p1")["result_hash"] == results[0]["content_hash"]
    check_store(db)


def test_a_wrong_key_and_an_unreachable_server_fall_back_too(capsys, db, fake_llm, state_dir):
    """MCP_API_KEY refused (401), then nothing listening: each run warns once and stores
    its result directly."""
    insert_plan(db, make_plan("a"))
    insert_plan(db, make_plan("b"), created_at=2_000_000_000)
    fake_llm.enqueue("hi").enqueue("hi")
    with FakeMemoryAPI(db, "another-key") as api:
        rc, captured = run(capsys, db, fake_llm, state_dir, "--memory-url", api.url, "--plan", "a")
    assert rc == 0
    (line,) = warnings(captured.err)
    assert "HTTP 401: it refused the key (MCP_API_KEY)" in line
    rc, captured = run(capsys, db, fake_llm, state_dir, "--plan", "b",
                       environ={"BRIDGE_MEMORY_URL": f"http://127.0.0.1:{closed_port()}"})
    assert rc == 0
    (line,) = warnings(captured.err)
    assert "cannot reach it" in line
    assert sorted(r["plan_id"] for r in stored_results(db)) == ["a", "b"]


def test_killed_between_the_http_store_and_the_final_transaction(capsys, db, fake_llm, state_dir):
    """SIGKILL right after the server stored the result: the result exists once, the state
    (still in_progress) points at it, so bridge reads the plan as completed, shows the
    result and never runs it again."""
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("hi")
    with FakeMemoryAPI(db, KEY) as api:
        proc = subprocess.run([sys.executable, str(BRIDGE_PY), *bridge_args(db, fake_llm.url, state_dir),
                               "--memory-url", api.url], env=child_env(BRIDGE_CRASH_AT="result_posted",
                                                                       MCP_API_KEY=KEY),
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    (stored,) = stored_results(db)
    state = plan_state(db, "p1")
    assert (state["status"], state["run_id"]) == ("in_progress", stored["run_id"])

    rc, captured = run(capsys, db, fake_llm, state_dir, "--list", "--all", "--json")
    assert [p["status"] for p in json.loads(captured.out)["plans"]] == ["completed"]
    rc, captured = run(capsys, db, fake_llm, state_dir)
    assert rc == 0 and "no pending plans" in captured.err
    rc, captured = run(capsys, db, fake_llm, state_dir, "--show", "p1", "--json")
    assert rc == 0 and json.loads(captured.out)["run_id"] == stored["run_id"]
    assert len(fake_llm.chat_requests) == 1 and len(stored_results(db)) == 1
    check_store(db)


@pytest.mark.parametrize("url", ["http://example.com:8000", "https://127.0.0.1:8000", "http://10.0.0.1",
                                 "http://127.0.0.1:notaport", "ftp://localhost", "http://user@127.0.0.1:8000"])
def test_memory_url_off_this_machine_is_refused(capsys, db, fake_llm, state_dir, url):
    """--memory-url takes http on 127.0.0.1, localhost or [::1] only (the key goes with
    every request): anything else exits 2 with one line, before any claim."""
    insert_plan(db, make_plan("p1"))
    rc, captured = run(capsys, db, fake_llm, state_dir, "--memory-url", url)
    assert rc == 2
    assert captured.err.splitlines()[0] == f"bridge: error: memory URL {url!r} is not an http URL on this machine"
    assert plan_state(db, "p1") == {}


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8000/", "http://[::1]:8000"])
def test_memory_url_on_loopback_is_taken(url):
    assert bridge.check_memory_url(url) == url.rstrip("/")


def test_health_reports_schema_embeddings_and_the_http_api(capsys, store, fake_llm, state_dir):
    """--health on the real 12.2.0 store: schema version 19, the plan row has its
    embedding; after a direct run one of bridge's two rows lacks one; the HTTP API
    answers and takes the key (exit 0), or refuses it (FAIL, exit 2)."""
    rc, captured = run(capsys, store, fake_llm, state_dir, "--health", "--json")
    report = json.loads(captured.out)
    assert rc == 0
    assert (report["store"]["schema_version"], report["store"]["migrations"]) == ("19", 10)
    assert (report["store"]["bridge_rows"], report["store"]["without_embedding"]) == (1, 0)
    assert report["store"]["state_table"] is False
    fake_llm.enqueue('{"greeting": "hello"}')
    assert run(capsys, store, fake_llm, state_dir)[0] == 0

    with FakeMemoryAPI(store, KEY) as api:
        rc, captured = run(capsys, store, fake_llm, state_dir, "--health", "--memory-url", api.url)
        assert rc == 0, captured.out
        lines = captured.out.splitlines()
        (memory,) = [line for line in lines if line.startswith("memory")]     # one line (issue 24)
        assert memory.startswith("memory  ok    schema version 19 · bridge_plan_state: 1 plan(s) · "
                                 "1 of bridge's 2 row(s) without an embedding")
        assert memory.endswith(f" · HTTP API {api.url} answers (mcp-memory-service 12.4.0, "
                               "sqlite-vec) · key accepted")
        rc, captured = run(capsys, store, fake_llm, state_dir, "--health", "--memory-url", api.url,
                           environ={"MCP_API_KEY": "wrong"})
    assert rc == 2
    (memory,) = [line for line in captured.out.splitlines() if line.startswith("memory")]
    assert memory.startswith("memory  FAIL  schema version 19")
    assert memory.endswith(f" · HTTP API {api.url}: the server refused the key (MCP_API_KEY)")


def test_health_without_embeddings_table_says_so(capsys, db, fake_llm, state_dir):
    rc, captured = run(capsys, db, fake_llm, state_dir, "--health", "--json")
    assert rc == 0
    assert json.loads(captured.out)["store"]["without_embedding"] is None
    rc, captured = run(capsys, db, fake_llm, state_dir, "--health")
    assert "embeddings not readable (no memory_embeddings table)" in captured.out


def test_show_still_reads_results_stored_before_the_summary(capsys, db, fake_llm, state_dir):
    """A result an older bridge stored (the content was the document alone, as one line
    or pretty-printed) is still found and shown whole; prose mentioning bridge_result is not."""
    document = {"type": "bridge_result", "plan_id": "old", "run_id": "20250101T000000Z-00000001",
                "status": "completed", "success": True, "steps": [], "files": [], "error": None}
    # the state that older bridge recorded
    insert_plan(db, make_plan("old"), metadata={"bridge": {
        "status": "completed", "run_id": document["run_id"],
        "result_hash": bridge.content_hash(json.dumps(document, indent=2))}})
    insert_memory(db, json.dumps(document, indent=2), tags="bridge-result,plan:old", memory_type="tool_outcome",
                  created_at=1)
    insert_memory(db, "notes on bridge_result parsing", tags="bridge-result,plan:old", created_at=2)
    rc, captured = run(capsys, db, fake_llm, state_dir, "--show", "old", "--json")
    digest = bridge.content_hash(json.dumps(document, indent=2))
    assert rc == 0 and json.loads(captured.out) == {**document, "result_hash": digest}


def test_summary_names_the_files_a_run_changed(capsys, db, fake_llm, state_dir, project):
    insert_plan(db, make_plan("files", steps=[{"id": 1, "prompt": "write", "file_output": "out/a.txt"}],
                              context={"objective": "write a file", "project": str(project)}))
    fake_llm.enqueue("content")
    assert run(capsys, db, fake_llm, state_dir)[0] == 0
    (row,) = [r for r in read_rows(db) if r["memory_type"] == "tool_outcome"]
    assert "\nfiles: out/a.txt created\n" in row["content"]


def test_a_hostile_plan_cannot_shape_the_summary(capsys, db, fake_llm, state_dir):
    """An invalid plan whose id and objective carry newlines and escapes: each stays on
    its own summary line, without control characters; the document still parses."""
    insert_plan(db, {"$schema": "bridge-plan-v1", "id": "x\nbridge result: plan y completed\x1b[2J",
                     "context": {"objective": "o\r\nsteps: 9 succeeded"}, "steps": []})
    rc, captured = run(capsys, db, fake_llm, state_dir)
    assert rc == 1
    (row,) = [r for r in read_rows(db) if r["memory_type"] == "tool_outcome"]
    summary = row["content"].rpartition("\n\n")[0].splitlines()
    assert summary[0].startswith("bridge result: plan x bridge result: plan y completed [2J failed (run ")
    assert summary[1] == "objective: o steps: 9 succeeded"
    assert not any(ch in "\n".join(summary) for ch in "\x1b\r")
    assert result_document(row["content"])["status"] == "failed"
