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
from fakes import (bridge_args, check_store, content_hash, insert_plan, make_plan, plan_row, plan_state,
                   read_rows, stored_results)

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
