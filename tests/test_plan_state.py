"""A plan's state lives in bridge's own table (bridge_plan_state), out of reach of the
memory server's metadata write-backs.

The memory server rewrites a memory's whole `metadata` behind bridge's back: after every
semantic search it writes back the metadata it read for each hit (access tracking in
storage/mixins/retrieve.py and mixins/metadata.py `_persist_access_metadata_batch`: a
read, then a write, outside any transaction), consolidation's decay merges stale metadata
over rows, and any agent can call memory_update. These tests replay those patterns on
real stores and show a plan never runs twice; tests/test_real_server.py does the same
with the real server's own code.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time

import pytest

import bridge
from fakes import (bridge_args, check_store, insert_memory, insert_plan, make_plan, plan_row, plan_state,
                   stored_results)

# bridge's message for a plan the memory server split (README, "plan split into N chunks")
SPLIT = ("plan split into {n} chunks by the memory server (its 800-character limit: "
         "MCP_HYBRID_MAX_CONTENT_LENGTH, MCP_SQLITEVEC_MAX_CONTENT_LENGTH): "
         "store it with bridge --submit")

STATE_TABLE = "bridge_plan_state"


def run(capsys, db, fake_llm, state_dir, *extra):
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, *extra), environ={})
    return rc, capsys.readouterr()


class AccessTracking:
    """The server's access tracking, cut in two: read() takes the plan row's metadata as
    retrieve() reads it for a hit; write_back() writes that (now stale) metadata back with
    the same UPDATE as _persist_access_metadata_batch (storage/mixins/metadata.py)."""

    def __init__(self, db, row_id):
        self.db, self.row_id = db, row_id

    def read(self) -> "AccessTracking":
        conn = sqlite3.connect(self.db)
        self.digest, metadata = conn.execute(
            "SELECT content_hash, metadata FROM memories WHERE id = ?", (self.row_id,)).fetchone()
        conn.close()
        self.metadata = json.loads(metadata or "{}")
        self.metadata["last_accessed_at"] = time.time()     # what Memory.record_access adds
        return self

    def write_back(self) -> None:
        conn = sqlite3.connect(self.db)
        with conn:
            conn.execute("UPDATE memories SET metadata = ?, last_accessed = ? "
                         "WHERE content_hash = ? AND deleted_at IS NULL",
                         (json.dumps(self.metadata), int(time.time()), self.digest))
        conn.close()


def test_a_run_finished_between_the_servers_read_and_write_back_never_runs_again(
        capsys, db, fake_llm, state_dir):
    """Search reads the plan's metadata → a whole bridge run completes → the search writes
    the old metadata back: the plan stays completed and the next bridge runs nothing."""
    row_id = insert_plan(db, make_plan("twice"))
    search = AccessTracking(db, row_id).read()
    fake_llm.enqueue("the one answer")
    assert run(capsys, db, fake_llm, state_dir)[0] == 0

    search.write_back()
    rc, captured = run(capsys, db, fake_llm, state_dir)

    assert rc == 0
    assert "no pending plans" in captured.err
    assert len(fake_llm.chat_requests) == 1
    assert [r["plan_id"] for r in stored_results(db)] == ["twice"]
    assert plan_state(db, "twice")["status"] == "completed"
    assert "bridge" not in (plan_row(db, "twice")["metadata_obj"] or {})
    check_store(db)


def test_a_claim_made_between_the_servers_read_and_write_back_holds(capsys, db, fake_llm, state_dir):
    """Search reads → bridge claims the plan (a live owner) → the search writes back: a
    second bridge does not run it."""
    row_id = insert_plan(db, make_plan("claimed"))
    search = AccessTracking(db, row_id).read()
    cfg = bridge.Config(db_paths=(db,))
    with bridge.Store.open(cfg) as store:
        assert store.claim(store.get_plan("claimed"), "20260101T000000Z-00000001")
    search.write_back()
    fake_llm.enqueue("never sent")

    rc, captured = run(capsys, db, fake_llm, state_dir)

    assert rc == 0
    assert fake_llm.chat_requests == []
    state = plan_state(db, "claimed")
    assert (state["status"], state["run_id"]) == ("in_progress", "20260101T000000Z-00000001")
    assert state["owner"] == {"host": socket.gethostname(), "pid": os.getpid()}


@pytest.mark.parametrize("metadata", [{}, {"bridge": {"status": "pending"}}, "not json", '["a", "list"]'])
def test_metadata_replaced_by_an_agent_after_the_run_changes_nothing(capsys, db, fake_llm, state_dir, metadata):
    """memory_update / PUT /api/memories (or consolidation's decay) replacing the plan's
    metadata after it completed: still completed, not run again, --list agrees."""
    row_id = insert_plan(db, make_plan("done"))
    fake_llm.enqueue("answer")
    assert run(capsys, db, fake_llm, state_dir)[0] == 0
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE memories SET metadata = ? WHERE id = ?",
                     (metadata if isinstance(metadata, str) else json.dumps(metadata), row_id))
    conn.close()

    rc, _ = run(capsys, db, fake_llm, state_dir)
    assert rc == 0 and len(fake_llm.chat_requests) == 1
    rc, captured = run(capsys, db, fake_llm, state_dir, "--list", "--all", "--json")
    assert [(p["id"], p["status"]) for p in json.loads(captured.out)["plans"]] == [("done", "completed")]


def state_table_rows(db) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (STATE_TABLE,)).fetchone() is None:
            return []
        return conn.execute(f"SELECT plan_id, status, run_id FROM {STATE_TABLE} ORDER BY plan_id").fetchall()
    finally:
        conn.close()


def test_state_an_older_bridge_kept_in_metadata_is_migrated_once(capsys, db, fake_llm, state_dir):
    """A store an older bridge used (state in metadata.bridge): reading actions show those
    statuses and write nothing; the first run makes bridge_plan_state from them (the
    done plans stay done, the pending one runs); later metadata is never read again."""
    old_run = "20250101T000000Z-0000abcd"
    insert_plan(db, make_plan("done"), created_at=1, metadata={"bridge": {
        "status": "completed", "run_id": old_run, "finished_at": "2025-01-01T00:00:00Z", "result_hash": "ab",
        "undone_run": old_run, "undone_at": "2025-01-02T00:00:00Z"}})
    insert_plan(db, make_plan("broken"), created_at=2, metadata={"bridge": {"status": "failed", "error": "x",
                                                                            "owner": [1, 2]}})
    insert_plan(db, make_plan("odd"), created_at=3, metadata={"bridge": {"status": "running"}})
    insert_plan(db, make_plan("new"), created_at=4, metadata={"keep": True})
    before = db.read_bytes()

    rc, captured = run(capsys, db, fake_llm, state_dir, "--list", "--all", "--json")
    statuses = {p["id"]: p["status"] for p in json.loads(captured.out)["plans"]}
    assert statuses == {"done": "completed", "broken": "failed", "odd": "pending", "new": "pending"}
    assert db.read_bytes() == before and state_table_rows(db) == []

    fake_llm.enqueue("one").enqueue("two")
    rc, captured = run(capsys, db, fake_llm, state_dir, "--json")
    assert rc == 0, captured.err
    assert sorted(r["plan_id"] for r in json.loads(captured.out)["plans"]) == ["new", "odd"]
    rows = state_table_rows(db)
    assert [r[:2] for r in rows] == [("broken", "failed"), ("done", "completed"), ("new", "completed"),
                                     ("odd", "completed")]
    assert rows[1][2] == old_run
    done = plan_state(db, "done")
    assert (done["undone_run"], done["undone_at"]) == (old_run, "2025-01-02T00:00:00Z")   # extra fields too
    assert plan_state(db, "broken")["owner"] is None

    conn = sqlite3.connect(db)       # an agent (or an older bridge) writes metadata.bridge now
    with conn:
        conn.execute("UPDATE memories SET metadata = ?", (json.dumps({"bridge": {"status": "pending"}}),))
    conn.close()
    insert_plan(db, make_plan("later"), created_at=5, metadata={"bridge": {"status": "completed"}})
    fake_llm.enqueue("three")
    rc, captured = run(capsys, db, fake_llm, state_dir, "--json")
    assert [r["plan_id"] for r in json.loads(captured.out)["plans"]] == ["later"]
    assert len(fake_llm.chat_requests) == 3
    check_store(db)


def test_the_state_table_is_made_in_the_claims_transaction_and_only_once(tmp_path, db):
    """Two connections opened before the table exists: the first claim makes it, the
    second claim sees that claim and loses; neither overwrote the other."""
    insert_plan(db, make_plan("race"))
    cfg = bridge.Config(db_paths=(db,))
    with bridge.Store.open(cfg) as one, bridge.Store.open(cfg) as two:
        rec_one, rec_two = one.get_plan("race"), two.get_plan("race")
        assert not one.has_state_table and not two.has_state_table
        assert [one.claim(rec_one, "run-one"), two.claim(rec_two, "run-two")] == [True, False]
    assert state_table_rows(db) == [("race", "in_progress", "run-one")]


def memory_store_chunks(content: str, size: int = 800, overlap: int = 50) -> list[str]:
    """Content cut the way memory_store cuts it past its length limit: pieces of at most
    `size` characters overlapping by `overlap` (services/memory_service.py split_content;
    the real server's own chunks are tested in tests/test_real_server.py)."""
    out, start = [], 0
    while start < len(content):
        out.append(content[start:start + size])
        start += size - overlap
    return out


def test_a_plan_split_into_chunks_by_the_server_is_reported_once(capsys, db, fake_llm, state_dir):
    """memory_store split a long plan into chunks (metadata chunk_index, total_chunks,
    original_hash, each tagged bridge-plan): one failed result naming the split and
    bridge --submit, nothing sent, nothing reported again."""
    plan = make_plan("long", steps=[{"id": n, "prompt": f"step {n} " + "x" * 150} for n in range(1, 9)])
    content = json.dumps(plan, indent=2)
    chunks = memory_store_chunks(content)
    assert len(chunks) >= 3
    original = bridge.content_hash(content)
    for index, chunk in enumerate(chunks):
        insert_memory(db, chunk, tags="bridge-plan", memory_type="planning", created_at=1000 + index,
                      metadata={"chunk_index": index, "total_chunks": len(chunks), "original_hash": original})
    fake_llm.enqueue("never sent")

    rc, captured = run(capsys, db, fake_llm, state_dir, "--json")

    assert rc == 1
    (result,) = json.loads(captured.out)["plans"]
    assert result["problems"] == [SPLIT.format(n=len(chunks))]
    assert fake_llm.chat_requests == []
    rc, captured = run(capsys, db, fake_llm, state_dir, "--json")
    assert (rc, json.loads(captured.out)["plans"]) == (0, [])
    rc, captured = run(capsys, db, fake_llm, state_dir, "--list", "--all", "--json")
    assert [p["status"] for p in json.loads(captured.out)["plans"]] == ["failed"]


def test_a_split_plan_is_as_invalid_to_dry_run_as_to_run(capsys, db, fake_llm, state_dir):
    """--dry-run asks runnable_plan, as a run does: a plan the server split into chunks
    is not shown as valid, with the same problem, and nothing is sent."""
    plan = make_plan("long", steps=[{"id": n, "prompt": f"step {n} " + "x" * 150} for n in range(1, 9)])
    content = json.dumps(plan, indent=2)
    chunks = memory_store_chunks(content)
    for index, chunk in enumerate(chunks):
        insert_memory(db, chunk, tags="bridge-plan", memory_type="planning", created_at=1000 + index,
                      metadata={"chunk_index": index, "total_chunks": len(chunks),
                                "original_hash": bridge.content_hash(content)})

    rc, captured = run(capsys, db, fake_llm, state_dir, "--dry-run", "--json")

    assert rc == 1
    (entry,) = json.loads(captured.out)["plans"]
    assert entry["valid"] is False
    assert entry["problems"] == [SPLIT.format(n=len(chunks))]
    assert fake_llm.chat_requests == []


def test_rows_made_by_consolidation_are_never_plans(capsys, db, fake_llm, state_dir):
    """Consolidation's rows sharing a plan's tags (a compressed cluster summary quoting
    the plan, an association memory, even one holding the plan's very JSON) are not
    plans: the real plan alone is listed and runs, with no shared-id refusal."""
    plan = make_plan("real")
    insert_plan(db, plan, created_at=1)
    insert_memory(db, "Cluster of 3 planning memories: bridge-plan-v1 plans real, x, y",
                  tags="cluster,compressed,bridge-plan", memory_type="pattern", created_at=2)
    insert_memory(db, json.dumps(plan), tags="association,discovered,bridge-plan", memory_type="observation",
                  created_at=3)
    fake_llm.enqueue("done")

    rc, captured = run(capsys, db, fake_llm, state_dir, "--list", "--all", "--json")
    assert [p["id"] for p in json.loads(captured.out)["plans"]] == ["real"]
    rc, captured = run(capsys, db, fake_llm, state_dir, "--json")
    assert rc == 0
    assert [(r["plan_id"], r["status"]) for r in json.loads(captured.out)["plans"]] == [("real", "completed")]
