"""The rooms "Store layouts", "Store (SQLite)", "Store: plan states and claims" and
"Store: plan and result memories" of bridge.py: the store layouts bridge reads and
writes, plan discovery and lookup, a plan's state, the result memory, claims,
concurrency hygiene and where the store file is looked for.

Original defects 6-10 (the original script's store defects) each have a test here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import bridge
from fakes import (DDL_FTS, DDL_TRIGGERS, bridge_args, check_store, columns, insert_memory, insert_plan, iso_z,
                   content_hash, make_plan, make_store, plan_row, read_rows, result_document, state_of_row)

ROOT = Path(bridge.__file__).resolve().parent
ISO_SERVER = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z$")   # the *_iso columns
ISO_SECONDS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")            # started_at / finished_at
T0 = 1_700_000_000.25   # a fixed creation time; the .25 keeps ISO texts the same length
RESULT_KEYS = {"type", "plan_id", "run_id", "status", "success", "started_at", "finished_at", "model",
               "base_url", "usage", "steps", "files", "error"}
STEP_KEYS = {"id", "status", "attempts", "output", "error", "file_output", "duration_s", "usage"}
FTS_DROP = ("DROP TRIGGER memories_fts_ai", "DROP TRIGGER memories_fts_au", "DROP TRIGGER memories_fts_ad",
            "DROP TABLE memory_content_fts")


# -- helpers ----------------------------------------------------------------------------

def run(db, fake_llm, tmp_path, *args: str, environ: dict | None = None) -> int:
    """bridge.main with the store, server and state folder always given as flags."""
    argv = [*args, *bridge_args(db, fake_llm.url, tmp_path / "st")]
    return bridge.main(argv, environ={} if environ is None else environ)


def config(db, fake_llm, tmp_path) -> bridge.Config:
    return bridge.Config(db_paths=(Path(db),), base_url=fake_llm.url, state_dir=tmp_path / "st")


def plan_with_prompt(plan_id: str) -> dict:
    """A valid one-step plan whose prompt names it, so a request shows which plan was sent."""
    return make_plan(plan_id, steps=[{"id": 1, "prompt": f"PROMPT<{plan_id}>"}])


def sent_plans(fake_llm) -> list[str]:
    """The plan ids named by the PROMPT<...> markers of each chat request, in order."""
    out = []
    for req in fake_llm.chat_requests:
        text = "\n".join(m["content"] for m in req["json"]["messages"] if isinstance(m.get("content"), str))
        out.append(",".join(re.findall(r"PROMPT<([^>]*)>", text)))
    return out


def tags_of(row: dict) -> list[str]:
    """A row's tags: the tags column, or metadata["tags"] on the original layout."""
    if "tags" in row:
        return [t for t in (row["tags"] or "").split(",") if t]
    return list((row["metadata_obj"] or {}).get("tags") or [])


def type_of(row: dict) -> str | None:
    if "memory_type" in row:
        return row["memory_type"]
    return (row["metadata_obj"] or {}).get("type")


def result_rows(db) -> list[dict]:
    return [r for r in read_rows(db) if "bridge-result" in tags_of(r)]


def row_by_id(db, row_id) -> dict:
    return next(r for r in read_rows(db) if r["id"] == row_id)


def state_of(db, row: dict) -> dict:
    """What bridge recorded of a plan row (its row of bridge_plan_state)."""
    return state_of_row(db, row)


def sha(content: str) -> str:
    return hashlib.sha256(content.strip().lower().encode("utf-8")).hexdigest()


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("bridge: error:")]


def assert_result_row(row: dict, *, plan_id: str, state: dict, base_url: str, layout: str) -> dict:
    """Check one result memory against the README (What bridge writes into the store) and
    the store rules; return its document."""
    assert type_of(row) == "tool_outcome"
    assert tags_of(row) == ["bridge-result", f"plan:{plan_id.lower()}"]
    doc = result_document(row["content"])
    assert isinstance(doc, dict)
    assert RESULT_KEYS <= set(doc), RESULT_KEYS - set(doc)
    assert doc["type"] == "bridge_result"
    assert doc["plan_id"] == plan_id
    assert doc["run_id"] == state["run_id"]
    assert (doc["status"], doc["success"], doc["error"]) == ("completed", True, None)
    assert ISO_SECONDS.match(doc["started_at"]) and ISO_SECONDS.match(doc["finished_at"])
    assert doc["started_at"] <= doc["finished_at"] == state["finished_at"]
    assert doc["model"] == "fake-model"
    assert doc["base_url"] == base_url
    assert set(doc["usage"]) >= {"prompt_tokens", "completion_tokens"}
    assert all(isinstance(doc["usage"][k], int) for k in ("prompt_tokens", "completion_tokens"))
    assert doc["usage"]["completion_tokens"] > 0
    assert len(doc["steps"]) == 1
    assert STEP_KEYS <= set(doc["steps"][0])
    assert (doc["steps"][0]["id"], doc["steps"][0]["status"]) == (1, "succeeded")
    assert doc["files"] == []
    assert state["result_hash"] == sha(row["content"])
    if layout == "original":
        assert isinstance(row["id"], str)
        assert ISO_SERVER.match(row["created_at"])
        return doc
    assert row["content_hash"] == sha(row["content"])
    for col in ("created_at", "updated_at"):
        assert isinstance(row[col], float)
        assert abs(row[col] - time.time()) < 60
        assert row[f"{col}_iso"] == iso_z(row[col])
        assert ISO_SERVER.match(row[f"{col}_iso"])
    assert row["deleted_at"] is None
    if "store" in row:
        assert row["store"] == "default"
        assert row["embedding_pending"] == 0
    return doc


def server_tag_search(db, tag: str) -> list:
    """The memory server's own tag query (storage/sqlite_vec.py)."""
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute(
            "SELECT id FROM memories WHERE (',' || tags || ',') LIKE ? AND deleted_at IS NULL",
            (f"%,{tag},%",))]
    finally:
        conn.close()


# -- layouts (original defect 6) ----------------------------------------------------------


def test_fixture_plan_of_real_12x_store_is_found_and_completed_without_touching_content(
        store, fake_llm, tmp_path, capsys):
    """The real server-made store: its plan is listed, a plain run completes it, its content
    and hash stay byte-identical and one server-shaped result memory is added (original defect 6)."""
    before = {r["id"]: r for r in read_rows(store)}

    rc = run(store, fake_llm, tmp_path, "--list", "--json")
    assert rc == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["layout"] == bridge.LAYOUT_12
    assert [(p["id"], p["status"], p["row"], p["steps"], p["objective"]) for p in listed["plans"]] == [
        ("fixture-hello", "pending", 2, 1, "Greet in JSON")]

    fake_llm.enqueue('{"greeting": "hello"}')
    rc = run(store, fake_llm, tmp_path, "--json")
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["plan_id"] for p in out["plans"]] == ["fixture-hello"]
    assert len(fake_llm.chat_requests) == 1

    after = {r["id"]: r for r in read_rows(store)}
    plan = after[2]
    assert plan["content"].encode() == before[2]["content"].encode()
    assert plan["content_hash"] == before[2]["content_hash"] == sha(plan["content"])
    for col in ("tags", "memory_type", "created_at", "created_at_iso", "deleted_at", "store"):
        assert plan[col] == before[2][col], col
    state = state_of(store, plan)
    assert state["status"] == "completed"
    assert state["owner"] == {"host": socket.gethostname(), "pid": os.getpid()}
    assert state["run_id"] == out["plans"][0]["run_id"]
    for other in (1, 2, 3):
        assert after[other] == before[other]      # the plan row too: its state is in bridge's table
    new = [r for r in after.values() if r["id"] not in before]
    assert len(new) == 1
    assert_result_row(new[0], plan_id="fixture-hello", state=state, base_url=fake_llm.url, layout="12.x")
    assert server_tag_search(store, "plan:fixture-hello") == [new[0]["id"]]
    assert server_tag_search(store, "bridge-result") == [new[0]["id"]]
    check_store(store)


@pytest.mark.parametrize("layout", ["12.x", "12.x-fresh", "10.x", "original"])
def test_run_keeps_plan_content_and_metadata_and_stores_one_result_on_each_layout(
        new_store, layout, fake_llm, tmp_path, capsys):
    """On every supported layout a run records its state in bridge's own table (the plan's
    metadata is left exactly as it was), never rewrites the plan's content, and stores one
    result memory (original defect 6)."""
    db = new_store(tmp_path / "store.db", layout)
    plan_id = "Release-Notes.V2"
    row_id = insert_plan(db, plan_with_prompt(plan_id), metadata={"keep": 1, "source": "claude"})
    before = {r["id"]: r for r in read_rows(db)}
    fake_llm.enqueue("Here are the release notes.")

    rc = run(db, fake_llm, tmp_path, "--plan", plan_id)

    assert rc == 0
    assert sent_plans(fake_llm) == [plan_id]
    after = {r["id"]: r for r in read_rows(db)}
    plan = after[row_id]
    assert plan["content"].encode() == before[row_id]["content"].encode()
    assert plan["created_at"] == before[row_id]["created_at"]
    meta = plan["metadata_obj"]
    assert plan["metadata"] == before[row_id]["metadata"]
    assert meta["keep"] == 1 and meta["source"] == "claude" and "bridge" not in meta
    if layout == "original":
        assert (meta["tags"], meta["type"]) == (["bridge-plan"], "planning")
    else:
        assert plan["content_hash"] == before[row_id]["content_hash"]
        assert (plan["tags"], plan["memory_type"]) == ("bridge-plan", "planning")
    state = state_of(db, plan)
    assert state["status"] == "completed"
    assert {"run_id", "result_hash", "owner", "finished_at"} <= set(state)
    assert state["owner"] == {"host": socket.gethostname(), "pid": os.getpid()}
    for rid, row in before.items():
        assert after[rid] == row      # the plan row too: bridge's state is in its own table
    new = [r for r in after.values() if r["id"] not in before]
    assert len(new) == 1
    assert_result_row(new[0], plan_id=plan_id, state=state, base_url=fake_llm.url, layout=layout)
    if layout != "original":
        assert server_tag_search(db, "plan:release-notes.v2") == [new[0]["id"]]
    check_store(db)


def _unknown_layout(path: Path) -> Path:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE memories (id INTEGER PRIMARY KEY, text TEXT)")
        conn.execute("INSERT INTO memories (text) VALUES ('hello')")
    conn.close()
    return path


def _no_memories_table(path: Path) -> Path:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.close()
    return path


def _not_sqlite(path: Path) -> Path:
    path.write_bytes(b"this is a plain text file, not an SQLite database\n" * 40)
    return path


def _missing(path: Path) -> Path:
    return path.parent / "nowhere" / "sqlite_vec.db"


@pytest.mark.parametrize("make", [_unknown_layout, _no_memories_table, _not_sqlite, _missing],
                         ids=["unknown-layout", "no-memories-table", "not-sqlite", "missing"])
@pytest.mark.parametrize("action", [[], ["--list"], ["--plan", "p1"], ["--list", "--all", "--json"]],
                         ids=["run-all", "list", "plan", "list-json"])
def test_unusable_store_exits_2_with_one_error_line_naming_the_path(make, action, fake_llm, tmp_path, capsys):
    """An unknown layout, a non-SQLite file or a missing file is a clear one-line error naming
    the path, exit 2, no traceback, nothing written (original defect 6)."""
    db = make(tmp_path / "store.db")
    data = db.read_bytes() if db.exists() else None

    rc = run(db, fake_llm, tmp_path, *action)

    assert rc == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err
    assert captured.err.startswith("bridge: error:")
    assert str(db) in lines[0]
    if make in (_unknown_layout, _no_memories_table):
        assert "layout" in lines[0]     # refused as a layout, not by a failing query later
    assert "Traceback" not in captured.err
    assert fake_llm.requests == []
    if data is None:
        assert not db.exists() and not db.parent.exists()
    else:
        assert db.read_bytes() == data


# -- discovery (original defects 7 and 9) -------------------------------------------------

DISCOVERY_MODES = {"fts-12.x": "12.x-fresh", "fts-10.x": "10.x", "scan-dropped-fts": "12.x-fresh",
                   "scan-word-fts": "12.x-fresh", "scan-original": "original"}


def discovery_store(new_store, tmp_path: Path, mode: str) -> tuple[Path, dict]:
    """A store holding plans inserted out of date order, plus rows that are not live plans."""
    db = new_store(tmp_path / "store.db", DISCOVERY_MODES[mode])
    if mode in ("scan-dropped-fts", "scan-word-fts"):
        conn = sqlite3.connect(db)
        with conn:
            for sql in FTS_DROP:
                conn.execute(sql)
            if mode == "scan-word-fts":     # an index of words, not the server's trigrams: not used
                conn.execute(DDL_FTS.replace("tokenize='trigram'", "tokenize='unicode61'"))
                for sql in DDL_TRIGGERS:
                    conn.execute(sql)
                conn.execute("INSERT INTO memory_content_fts(memory_content_fts) VALUES ('rebuild')")
        conn.close()
    cols = set(columns(db))
    rows = {}
    rows["newest"] = insert_plan(db, plan_with_prompt("newest"), created_at=T0 + 30)
    rows["oldest"] = insert_plan(db, plan_with_prompt("oldest"), compact=True, created_at=T0)
    rows["prose"] = insert_memory(
        db, 'Reminder: plans are JSON with "$schema": "bridge-plan-v1" and an "id" like "prose-plan".',
        tags="note", created_at=T0 - 10)
    rows["json-note"] = insert_memory(
        db, json.dumps({"note": "bridge-plan-v1 is the plan format", "id": "json-note"}),
        tags="note", created_at=T0 - 5)
    rows["middle"] = insert_plan(db, plan_with_prompt("middle"), created_at=T0 + 20)
    if "deleted_at" in cols:
        rows["deleted"] = insert_plan(db, plan_with_prompt("deleted"), created_at=T0 + 1, deleted_at=T0 + 2)
    if "superseded_by" in cols:
        rows["superseded"] = insert_plan(db, plan_with_prompt("superseded"), created_at=T0 + 3,
                                         superseded_by="f" * 64)
    rows["list"] = insert_memory(db, json.dumps([plan_with_prompt("in-a-list")], indent=2),
                                 tags="bridge-plan", memory_type="planning", created_at=T0 + 40)
    return db, rows


@pytest.mark.parametrize("mode", list(DISCOVERY_MODES))
def test_plans_are_found_compact_or_pretty_oldest_first_and_only_when_live(new_store, mode, fake_llm, tmp_path,
                                                                          capsys):
    """Compact and pretty plans are found, oldest first whatever the insertion order; deleted,
    superseded and prose rows are not plans; a tagged JSON list is an invalid plan. The FTS
    path and the scan path agree, in find_plans, --list, --list --all --json and a plain run,
    which sends the oldest plan first (original defects 7 and 9)."""
    db, rows = discovery_store(new_store, tmp_path, mode)
    untouched = {name: row_by_id(db, rows[name]) for name in rows if name not in ("oldest", "middle", "newest")}

    with bridge.Store.open(config(db, fake_llm, tmp_path)) as s:
        assert s.has_fts is mode.startswith("fts")
        found = s.find_plans()

    assert [r.plan_id for r in found] == ["oldest", "middle", "newest", f"row-{rows['list']}"]
    assert [r.row_id for r in found] == [rows["oldest"], rows["middle"], rows["newest"], rows["list"]]
    assert [r.status for r in found] == ["pending", "pending", "pending", "invalid"]

    rc = run(db, fake_llm, tmp_path, "--list", "--all", "--json")
    assert rc == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(p["id"], p["status"], p["row"]) for p in listed["plans"]] == [
        ("oldest", "pending", rows["oldest"]), ("middle", "pending", rows["middle"]),
        ("newest", "pending", rows["newest"]), (f"row-{rows['list']}", "invalid", rows["list"])]

    rc = run(db, fake_llm, tmp_path, "--list", "--json")
    assert rc == 0
    assert [p["id"] for p in json.loads(capsys.readouterr().out)["plans"]] == ["oldest", "middle", "newest"]
    assert fake_llm.requests == []

    for _ in range(3):
        fake_llm.enqueue("done")
    fake_llm.enqueue("spare")
    rc = run(db, fake_llm, tmp_path, "--json")

    # the tagged JSON list is no plan object: it is recorded as failed, with the reason (exit 1)
    assert rc == 1
    list_id = f"row-{rows['list']}"
    out = json.loads(capsys.readouterr().out)["plans"]
    assert [p["plan_id"] for p in out] == ["oldest", "middle", "newest", list_id]
    assert out[3]["status"] == "failed" and "not a JSON list" in out[3]["problems"][0]
    assert sent_plans(fake_llm) == ["oldest", "middle", "newest"]
    assert fake_llm.pending == 1
    assert sorted(result_document(r["content"])["plan_id"] for r in result_rows(db)) == \
        sorted(["middle", "newest", "oldest", list_id])
    for name in ("oldest", "middle", "newest"):
        assert state_of(db, row_by_id(db, rows[name]))["status"] == "completed"
    assert state_of(db, row_by_id(db, rows["list"]))["status"] == "failed"
    untouched.pop("list", None)
    for name, row in untouched.items():
        assert row_by_id(db, rows[name]) == row, name
    check_store(db)


# -- lookup (original defect 7) -------------------------------------------------------------


@pytest.fixture
def lookalikes(new_store, tmp_path) -> tuple[Path, dict]:
    """Plans whose ids a LIKE pattern or a regex would confuse, the exact target last."""
    db = new_store(tmp_path / "store.db", "12.x-fresh")
    rows = {"prose": insert_memory(db, 'Draft, not stored yet: {"$schema": "bridge-plan-v1", "id": "a_c"}',
                                   tags="note", created_at=T0 - 10)}
    for n, pid in enumerate(["abc", "a%c", "axc", "a.c", "a_c", "ABC-2"]):
        rows[pid] = insert_plan(db, plan_with_prompt(pid), created_at=T0 + n)
    return db, rows


@pytest.mark.parametrize("target", ["a_c", "a.c"])
def test_plan_id_with_wildcard_characters_matches_only_that_exact_plan(target, lookalikes, fake_llm, tmp_path):
    """--plan a_c and --plan a.c run only the plan with that exact id, not a LIKE or regex
    match, and not the older prose note that quotes the id (original defect 7)."""
    db, rows = lookalikes
    before = {r["id"]: r for r in read_rows(db)}
    fake_llm.enqueue("done").enqueue("spare")

    rc = run(db, fake_llm, tmp_path, "--plan", target)

    assert rc == 0
    assert sent_plans(fake_llm) == [target]
    assert len(fake_llm.chat_requests) == 1
    assert [result_document(r["content"])["plan_id"] for r in result_rows(db)] == [target]
    assert state_of(db, row_by_id(db, rows[target]))["status"] == "completed"
    for rid, row in before.items():
        if rid != rows[target]:
            assert row_by_id(db, rid) == row
    check_store(db)


def test_plan_id_with_percent_picks_only_that_plan(lookalikes, fake_llm, tmp_path, capsys):
    """--plan a%c reaches the plan "a%c" only (its id breaks the schema's id pattern, so it
    is recorded as invalid without a request); abc and axc stay untouched (original defect 7)."""
    db, rows = lookalikes
    before = {r["id"]: r for r in read_rows(db)}
    fake_llm.enqueue("spare")

    rc = run(db, fake_llm, tmp_path, "--plan", "a%c")

    assert rc == 1
    assert "a%c" in capsys.readouterr().err
    assert fake_llm.chat_requests == []
    results = result_rows(db)
    assert [result_document(r["content"])["plan_id"] for r in results] == ["a%c"]
    # an id outside the schema's pattern is made tag-safe: a comma in it would split the tag list
    assert tags_of(results[0]) == ["bridge-result", "plan:a-c"]
    assert state_of(db, row_by_id(db, rows["a%c"]))["status"] == "failed"
    for rid, row in before.items():
        if rid != rows["a%c"]:
            assert row_by_id(db, rid) == row
    check_store(db)


def test_plan_id_that_is_only_a_pattern_or_another_case_finds_nothing(lookalikes, fake_llm, tmp_path, capsys):
    """LIKE patterns and other letter cases of existing ids find no plan: exit 2, nothing sent
    or written (original defect 7: LIKE matched them, case-insensitively)."""
    db, _ = lookalikes
    before = read_rows(db)
    fake_llm.enqueue("spare")

    for pattern in ("%", "a%", "_bc", "a_", "ABC", "Abc", "A_C", "a"):
        rc = run(db, fake_llm, tmp_path, "--plan", pattern)

        assert rc == 2, pattern
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = error_lines(captured.err)
        assert len(lines) == 1 and repr(pattern) in lines[0] and "no plan" in lines[0], captured.err
    assert fake_llm.chat_requests == []
    assert read_rows(db) == before


def test_two_live_plans_with_one_id_are_refused_naming_both_rows(store, fake_llm, tmp_path, capsys):
    """--plan ID with two live plans of that id exits 2 naming both rows; neither runs
    (original defect 7: LIMIT 1 picked one at random)."""
    first = insert_plan(store, make_plan("dup", steps=[{"id": 1, "prompt": "first copy"}]))
    second = insert_plan(store, make_plan("dup", steps=[{"id": 1, "prompt": "second copy"}]))
    before = read_rows(store)
    fake_llm.enqueue("spare")

    rc = run(store, fake_llm, tmp_path, "--plan", "dup")

    assert rc == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = error_lines(captured.err)
    assert len(lines) == 1 and "'dup'" in lines[0]
    assert re.search(rf"\b{first}\b", lines[0]) and re.search(rf"\b{second}\b", lines[0])
    assert fake_llm.chat_requests == []
    assert fake_llm.pending == 1
    assert read_rows(store) == before
    check_store(store)


# -- re-runs (original defect 8) ------------------------------------------------------------


def test_completed_plan_is_not_rerun_without_flag_and_each_rerun_stores_its_own_result(
        new_store, fake_llm, tmp_path, capsys):
    """--plan on a completed plan exits 2 hinting at --rerun and sends nothing; --rerun runs
    it again, twice within moments, each run with its own result memory (original defect 8)."""
    db = new_store(tmp_path / "store.db", "12.x-fresh")
    row_id = insert_plan(db, plan_with_prompt("again"))
    fake_llm.enqueue("first answer")
    assert run(db, fake_llm, tmp_path, "--plan", "again") == 0
    capsys.readouterr()
    done = read_rows(db)

    rc = run(db, fake_llm, tmp_path, "--plan", "again")

    assert rc == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "completed" in error_lines(captured.err)[0]
    assert "--rerun" in captured.err
    assert len(fake_llm.chat_requests) == 1
    assert read_rows(db) == done

    fake_llm.enqueue("second answer").enqueue("third answer")
    started = time.monotonic()
    assert run(db, fake_llm, tmp_path, "--plan", "again", "--rerun") == 0
    assert run(db, fake_llm, tmp_path, "--plan", "again", "--rerun") == 0
    elapsed = time.monotonic() - started

    assert len(fake_llm.chat_requests) == 3
    results = sorted(result_rows(db), key=lambda r: r["id"])
    assert len(results) == 3, f"3 runs in {elapsed:.2f} s"
    docs = [result_document(r["content"]) for r in results]
    assert len({d["run_id"] for d in docs}) == 3
    assert len({r["content_hash"] for r in results}) == 3
    assert [d["steps"][0]["output"] for d in docs] == ["first answer", "second answer", "third answer"]
    state = state_of(db, row_by_id(db, row_id))
    assert state["status"] == "completed"
    assert state["run_id"] == docs[-1]["run_id"]
    assert state["result_hash"] == results[-1]["content_hash"]
    check_store(db)


def test_plan_state_and_result_memory_are_written_in_one_transaction(new_store, fake_llm, tmp_path, capsys):
    """When the result memory cannot be stored, the plan is not marked completed either: the
    status is never written before (or without) its result (original defect 8)."""
    db = new_store(tmp_path / "store.db", "12.x-fresh")
    row_id = insert_plan(db, plan_with_prompt("txn"))
    conn = sqlite3.connect(db)
    with conn:   # a test-only trigger standing in for any failure of the result INSERT
        conn.execute("CREATE TRIGGER test_refuse_results BEFORE INSERT ON memories "
                     "WHEN NEW.memory_type = 'tool_outcome' "
                     "BEGIN SELECT RAISE(ABORT, 'results refused by the test'); END")
    conn.close()
    fake_llm.enqueue("an answer")

    rc = run(db, fake_llm, tmp_path, "--plan", "txn")

    assert rc == 2
    captured = capsys.readouterr()
    assert len(error_lines(captured.err)) == 1
    assert "Traceback" not in captured.err
    assert len(fake_llm.chat_requests) == 1
    assert result_rows(db) == []
    state = state_of(db, row_by_id(db, row_id))
    assert state.get("status") != "completed"
    assert state.get("result_hash") is None
    assert state.get("finished_at") is None
    check_store(db)


# -- claims ------------------------------------------------------------------------------------


def test_two_store_connections_claiming_one_plan_exactly_one_wins(new_store, fake_llm, tmp_path):
    """Two Store connections holding the same pending record: exactly one claim() succeeds
    and the loser changes nothing."""
    db = new_store(tmp_path / "store.db", "12.x-fresh")
    insert_plan(db, plan_with_prompt("race"))
    cfg = config(db, fake_llm, tmp_path)

    with bridge.Store.open(cfg) as one, bridge.Store.open(cfg) as two:
        rec_one, rec_two = one.get_plan("race"), two.get_plan("race")
        won = [one.claim(rec_one, "run-one"), two.claim(rec_two, "run-two")]

    assert won == [True, False]
    (plan,) = [r for r in read_rows(db) if r["memory_type"] == "planning"]
    assert state_of(db, plan)["status"] == "in_progress"
    assert state_of(db, plan)["run_id"] == "run-one"
    check_store(db)


def test_concurrent_claims_from_threads_give_each_plan_one_owner(new_store, fake_llm, tmp_path):
    """Claims racing from threads (one Store each): every plan is claimed by exactly one."""
    db = new_store(tmp_path / "store.db", "12.x-fresh")
    ids = [f"plan-{n}" for n in range(5)]
    for n, pid in enumerate(ids):
        insert_plan(db, plan_with_prompt(pid), created_at=T0 + n)
    cfg = config(db, fake_llm, tmp_path)
    barrier = threading.Barrier(2)
    wins: dict[str, list[str]] = {pid: [] for pid in ids}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            with bridge.Store.open(cfg) as s:
                records = s.find_plans()
                barrier.wait(timeout=5)
                for record in records:
                    if s.claim(record, f"run-{name}"):
                        wins[record.plan_id].append(name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)

    assert errors == []
    assert all(len(w) == 1 for w in wins.values()), wins
    for row in read_rows(db):
        assert state_of(db, row)["run_id"] == f"run-{wins[json.loads(row['content'])['id']][0]}"
    check_store(db)


def test_two_bridge_processes_started_together_run_each_plan_once(new_store, fake_llm, tmp_path):
    """Two real `python bridge.py` processes on one store: each plan runs exactly once."""
    db = new_store(tmp_path / "store.db", "12.x-fresh")
    ids = [f"proc-{n}" for n in range(6)]
    for n, pid in enumerate(ids):
        insert_plan(db, plan_with_prompt(pid), created_at=T0 + n)
    for _ in range(6 + 3):
        fake_llm.enqueue("done")
    cmd = [sys.executable, "bridge.py", "--db", str(db), "--base-url", fake_llm.url,
           "--state-dir", str(tmp_path / "st"), "--retry-delay", "0", "-q"]
    env = dict(os.environ)

    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]

    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(fake_llm.chat_requests) == 6
    assert sorted(sent_plans(fake_llm)) == sorted(ids)
    assert fake_llm.pending == 3
    per_plan = [result_document(r["content"])["plan_id"] for r in result_rows(db)]
    assert sorted(per_plan) == sorted(ids)
    for row in read_rows(db):
        if row["memory_type"] == "planning":
            assert state_of(db, row)["status"] == "completed"
    check_store(db)


# -- concurrency hygiene (original defect 10) -------------------------------------------------


def test_run_waits_for_a_brief_write_lock_held_by_another_connection(new_store, fake_llm, tmp_path):
    """While another connection holds the write lock for ~0.3 s, the run waits (busy timeout)
    and then succeeds (original defect 10)."""
    db = new_store(tmp_path / "store.db", "12.x-fresh")
    row_id = insert_plan(db, plan_with_prompt("locked"))
    fake_llm.enqueue("done")
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    released_at: list[float] = []

    def release() -> None:
        time.sleep(0.3)
        released_at.append(time.monotonic())
        holder.execute("COMMIT")

    releaser = threading.Thread(target=release)
    try:
        releaser.start()
        rc = run(db, fake_llm, tmp_path, "--plan", "locked")
        finished = time.monotonic()
    finally:
        releaser.join(timeout=5)
        holder.close()

    assert rc == 0
    assert released_at and finished > released_at[0]
    assert state_of(db, row_by_id(db, row_id))["status"] == "completed"
    assert len(result_rows(db)) == 1
    check_store(db)


def test_store_closes_its_connection_when_the_with_block_ends(store, fake_llm, tmp_path):
    """`with Store.open(cfg) as s:` closes s.conn on exit, also when the block raises
    (original defect 10)."""
    cfg = config(store, fake_llm, tmp_path)
    with bridge.Store.open(cfg) as s:
        assert s.conn.execute("SELECT count(*) FROM memories").fetchone() == (3,)
    with pytest.raises(sqlite3.ProgrammingError):
        s.conn.execute("SELECT 1")

    with pytest.raises(RuntimeError):
        with bridge.Store.open(cfg) as t:
            raise RuntimeError("boom")
    with pytest.raises(sqlite3.ProgrammingError):
        t.conn.execute("SELECT 1")


def test_store_sets_a_busy_timeout(store, fake_llm, tmp_path):
    """The store connection waits for a lock instead of failing at once (original defect 10)."""
    with bridge.Store.open(config(store, fake_llm, tmp_path)) as s:
        (ms,) = s.conn.execute("PRAGMA busy_timeout").fetchone()
    assert ms >= 1000


# -- where the store file is ------------------------------------------------------------------


def test_default_db_candidates_memory_sqlite_path_alone(tmp_path):
    """MCP_MEMORY_SQLITE_PATH is the only candidate when set, on any platform."""
    env = {"HOME": str(tmp_path / "h"), "MCP_MEMORY_SQLITE_PATH": str(tmp_path / "m.db"),
           "MCP_MEMORY_BASE_DIR": str(tmp_path / "base")}
    assert bridge.default_db_candidates(env, "linux") == [tmp_path / "m.db"]
    assert bridge.default_db_candidates(env, "darwin") == [tmp_path / "m.db"]


@pytest.mark.parametrize("platform", ["linux", "darwin", "win32"])
def test_default_db_candidates_base_dir_then_legacy_path(platform, tmp_path):
    """MCP_MEMORY_BASE_DIR/sqlite_vec.db first, then ~/.mcp-memory-service/memories.db."""
    home = tmp_path / "h"
    env = {"HOME": str(home), "MCP_MEMORY_BASE_DIR": str(tmp_path / "base"), "LOCALAPPDATA": str(tmp_path / "lad")}
    assert bridge.default_db_candidates(env, platform) == [
        tmp_path / "base" / "sqlite_vec.db", home / ".mcp-memory-service" / "memories.db"]


def test_default_db_candidates_platform_defaults(tmp_path):
    """The server's platform data folder (Linux, macOS, Windows with LOCALAPPDATA), then the legacy path."""
    home = tmp_path / "h"
    legacy = home / ".mcp-memory-service" / "memories.db"
    env = {"HOME": str(home)}
    assert bridge.default_db_candidates(env, "linux") == [
        home / ".local" / "share" / "mcp-memory" / "sqlite_vec.db", legacy]
    assert bridge.default_db_candidates(env, "darwin") == [
        home / "Library" / "Application Support" / "mcp-memory" / "sqlite_vec.db", legacy]
    local = str(tmp_path / "LocalAppData")
    assert bridge.default_db_candidates({**env, "LOCALAPPDATA": local}, "win32") == [
        Path(local) / "mcp-memory" / "sqlite_vec.db", legacy]


def list_json(fake_llm, tmp_path, capsys, environ: dict, *extra: str) -> tuple[int, dict | None, str]:
    rc = bridge.main(["--list", "--json", "--base-url", fake_llm.url, "--state-dir", str(tmp_path / "st"),
                      *extra], environ=environ)
    captured = capsys.readouterr()
    return rc, (json.loads(captured.out) if captured.out else None), captured.err


def test_bridge_db_variable_is_used_when_no_db_flag(store, fake_llm, tmp_path, capsys):
    """BRIDGE_DB names the store when --db is absent."""
    rc, out, _ = list_json(fake_llm, tmp_path, capsys, {"BRIDGE_DB": str(store), "HOME": str(tmp_path / "h")})
    assert rc == 0
    assert out["db"] == str(store)
    assert [p["id"] for p in out["plans"]] == ["fixture-hello"]


def test_db_flag_wins_over_bridge_db_and_bridge_db_over_server_variables(new_store, store, fake_llm, tmp_path,
                                                                         capsys):
    """--db beats BRIDGE_DB (here a broken file), and BRIDGE_DB beats the server's variables."""
    other = new_store(tmp_path / "other.db", "12.x-fresh")
    insert_plan(other, make_plan("other-plan"))
    broken = _not_sqlite(tmp_path / "broken.db")

    rc, out, _ = list_json(fake_llm, tmp_path, capsys, {"BRIDGE_DB": str(broken)}, "--db", str(store))
    assert rc == 0
    assert out["db"] == str(store)

    rc, out, _ = list_json(fake_llm, tmp_path, capsys,
                           {"BRIDGE_DB": str(other), "MCP_MEMORY_SQLITE_PATH": str(store),
                            "MCP_MEMORY_BASE_DIR": str(tmp_path)})
    assert rc == 0
    assert out["db"] == str(other)
    assert [p["id"] for p in out["plans"]] == ["other-plan"]


def test_server_variables_and_legacy_path_are_found_without_flag_or_bridge_db(new_store, store, fake_llm, tmp_path,
                                                                              capsys):
    """Without --db or BRIDGE_DB: MCP_MEMORY_SQLITE_PATH, then MCP_MEMORY_BASE_DIR/sqlite_vec.db, then the
    original script's ~/.mcp-memory-service/memories.db when it exists."""
    home = tmp_path / "h"
    rc, out, _ = list_json(fake_llm, tmp_path, capsys, {"HOME": str(home), "MCP_MEMORY_SQLITE_PATH": str(store)})
    assert (rc, out["db"]) == (0, str(store))

    base = tmp_path / "base"
    served = new_store(base / "sqlite_vec.db", "12.x-fresh")
    rc, out, _ = list_json(fake_llm, tmp_path, capsys, {"HOME": str(home), "MCP_MEMORY_BASE_DIR": str(base)})
    assert (rc, out["db"]) == (0, str(served))

    legacy = new_store(home / ".mcp-memory-service" / "memories.db", "original")
    insert_plan(legacy, make_plan("legacy-plan"))
    rc, out, _ = list_json(fake_llm, tmp_path, capsys, {"HOME": str(home)})
    assert rc == 0
    assert (out["db"], out["layout"]) == (str(legacy), bridge.LAYOUT_ORIGINAL)
    assert [p["id"] for p in out["plans"]] == ["legacy-plan"]


@pytest.mark.parametrize("with_base_dir", [False, True], ids=["platform-default", "base-dir"])
def test_no_store_anywhere_names_every_path_tried(with_base_dir, fake_llm, tmp_path, capsys):
    """With no store file anywhere: exit 2, one error line naming every path tried, nothing created."""
    home = tmp_path / "h"
    env = {"HOME": str(home)}
    first = home / ".local" / "share" / "mcp-memory" / "sqlite_vec.db"
    if with_base_dir:
        env["MCP_MEMORY_BASE_DIR"] = str(tmp_path / "base")
        first = tmp_path / "base" / "sqlite_vec.db"

    rc, out, err = list_json(fake_llm, tmp_path, capsys, env)

    assert rc == 2
    assert out is None
    lines = error_lines(err)
    assert len(lines) == 1
    assert str(first) in lines[0]
    assert str(home / ".mcp-memory-service" / "memories.db") in lines[0]
    assert "Traceback" not in err
    assert not first.exists()


# -- the result memory, byte for byte --------------------------------------------------

def _pinned_result() -> dict:
    """A result document with every part the summary shows: a project, control characters
    in titles and problems, a failed step, files, savings with an escalation."""
    def step(sid: int, status: str, error: str | None = None) -> dict:
        return {"id": sid, "title": f"t\x1b{sid}\nx", "status": status, "attempts": 2, "output": "out",
                "error": error, "file_output": None, "duration_s": 1.5,
                "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    savings = {"local_tokens": 14, "local_usage": {"prompt_tokens": 6, "completion_tokens": 8},
               "would_have_cost_usd": 0.25, "price_model": "claude-opus-4", "paid_usd": 0.5,
               "retries": 1, "escalations": 1, "escalations_saved": 0}
    return {"type": "bridge_result", "plan_id": "pin", "run_id": "20260101T000000Z-abc123",
            "objective": "pin\nthe  layout", "status": "failed", "project": "proj one", "success": False,
            "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:01:00Z",
            "usage": {"prompt_tokens": 6, "completion_tokens": 8}, "savings": savings,
            "counts": {"succeeded": 1, "failed": 1, "skipped": 0},
            "steps": [step(1, "succeeded"), step(2, "failed", "bad answer")],
            "files": [{"path": "a.py", "action": "created"}], "error": "step 2 failed",
            "problems": ["p\x07roblem"], "run_log": "/x/runs/20260101T000000Z-abc123"}


def test_a_result_memory_is_stored_byte_for_byte_as_before(tmp_path):
    """The result memory's content, tags, type and metadata, and the final state, pinned:
    a restructure of how the result is built or stored must not change one byte."""
    db = make_store(tmp_path / "pin.db", "12.x-fresh")
    insert_plan(db, make_plan("pin"))
    document = _pinned_result()
    with bridge.Store.open(bridge.Config(db_paths=(db,))) as store:
        digest = store.finish(store.get_plan("pin"), bridge.result_memory(document))
    [row] = [r for r in read_rows(db) if "bridge-result" in r["tags"].split(",")]
    summary = ["bridge result: plan pin failed in project proj one (run 20260101T000000Z-abc123)",
               "objective: pin the layout", "steps: 1 succeeded, 1 failed, 0 skipped",
               "step 1 (t 1 x): succeeded", "step 2 (t 2 x): failed: bad answer", "files: a.py created",
               "error: step 2 failed",
               "savings: 14 tokens ran on the local model, $0.2500 at claude-opus-4's prices (the "
               "planner's own tokens not counted); 1 retry, 1 escalated (0 saved by it); $0.5000 paid",
               "problem: p roblem"]
    assert row["content"] == "\n".join(summary) + "\n\n" + json.dumps(document, ensure_ascii=False)
    assert digest == row["content_hash"] == content_hash(row["content"])
    assert (row["tags"], row["memory_type"]) == ("bridge-result,plan:pin,proj-one", "tool_outcome")
    assert json.loads(row["metadata"]) == {"plan_id": "pin", "run_id": "20260101T000000Z-abc123"}
    state = state_of_row(db, plan_row(db, "pin"))
    assert (state["status"], state["finished_at"], state["error"], state["result_hash"]) == \
        ("failed", "2026-01-01T00:01:00Z", "step 2 failed", digest)
