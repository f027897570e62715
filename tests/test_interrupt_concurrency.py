"""The store, file-transaction, plan-run and main() rooms under real processes: Ctrl-C / SIGTERM in the middle of a plan
(exit 130, the in-flight request dropped, the result stored, files reverted or kept as the
plan asks, a second Ctrl-C unable to cut the cleanup short), and several bridge processes
sharing one store with a memory-server-like writer (every plan claimed and run exactly
once, no "database is locked").

Everything here runs `python bridge.py` in subprocesses (cwd: the project root) with an
environment free of BRIDGE_* and explicit --db/--base-url/--state-dir."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fakes import (
    bridge_args, check_store, child_env, insert_plan, make_plan, plan_state, read_rows, stored_results, temp_files,
)

ROOT = Path(__file__).resolve().parent.parent      # where bridge.py lives
TESTS = Path(__file__).resolve().parent
# Literals copied from the contract (the README, tests/data/README.md), never read at run time.
RESULT_TAG = "bridge-result"
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def start_bridge(db: Path, url: str, state_dir: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "bridge.py", *bridge_args(db, url, state_dir, *extra)]
    return subprocess.Popen(argv, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_chat_requests(fake_llm, n: int, proc: subprocess.Popen, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while len(fake_llm.chat_requests) < n and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    if len(fake_llm.chat_requests) < n:
        out, err = (proc.communicate(timeout=5) if proc.poll() is not None else ("", ""))
        raise AssertionError(f"bridge sent {len(fake_llm.chat_requests)} chat request(s), not {n}; "
                             f"rc={proc.poll()} stderr={err!r}")


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def interrupted_plan(project: Path, rollback: str) -> dict:
    """Step 1 modifies a.txt, step 2 creates sub/b.txt, step 3 is the one in flight when the
    signal comes, step 4 depends on 3 (one file_output per step, so the two files need
    two steps)."""
    return make_plan("p-int", [
        {"id": 1, "prompt": "rewrite a", "file_output": "a.txt"},
        {"id": 2, "prompt": "create b", "file_output": "sub/b.txt"},
        {"id": 3, "prompt": "the slow one", "depends_on": [1, 2]},
        {"id": 4, "prompt": "after the slow one", "depends_on": [3]},
    ], context={"objective": "interrupt me", "project": str(project)}, rollback_strategy=rollback)


def run_and_interrupt(db, fake_llm, state_dir, signum, in_flight: int, extra=(), repeats=0, gap=0.02):
    """Start bridge, wait until request number in_flight is being streamed, send signum (and
    then `repeats` more, `gap` seconds apart); return (rc, stdout, stderr, seconds to exit)."""
    proc = start_bridge(db, fake_llm.url, state_dir, "--timeout", "30", *extra)
    try:
        wait_for_chat_requests(fake_llm, in_flight, proc)
        time.sleep(0.15)                      # let the first half of the stalled stream arrive
        assert proc.poll() is None, proc.communicate()[1]
        sent = time.monotonic()
        proc.send_signal(signum)
        for _ in range(repeats):
            time.sleep(gap)
            if proc.poll() is None:           # send_signal ignores a reaped process
                proc.send_signal(signum)
        out, err = proc.communicate(timeout=8)
        elapsed = time.monotonic() - sent
    finally:
        kill(proc)
    return proc.returncode, out, err, elapsed


# --------------------------------------------------------------------------------------
# Part A: interrupts
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_mid_plan_reverts_files_and_stores_the_result(db, fake_llm, state_dir, project, signum):
    """Ctrl-C or SIGTERM while step 3 streams, with rollback_strategy revert_files: exit 130
    at once (the stalled request is dropped, not waited out), plan failed "interrupted at
    step 3", one result memory (step 3 failed "interrupted", step 4 "not run"), a.txt back
    byte for byte and sub/ removed."""
    (project / "a.txt").write_bytes(b"A0\n")
    insert_plan(db, interrupted_plan(project, "revert_files"))
    fake_llm.enqueue("A1 rewritten\n").enqueue("B1 created\n")
    fake_llm.enqueue("partial answer that never finishes " * 4, fault="stall", delay_s=5)

    rc, out, err, elapsed = run_and_interrupt(db, fake_llm, state_dir, signum, in_flight=3)

    assert rc == EXIT_INTERRUPTED, err
    assert elapsed < 4, f"took {elapsed:.1f} s: the 5 s stall was waited out"
    assert out == ""
    assert "Traceback" not in err
    assert "interrupted" in err
    assert len(fake_llm.chat_requests) == 3          # step 4 never sent
    state = plan_state(db, "p-int")
    assert state["status"] == "failed"
    assert "interrupted at step 3" in state["error"]
    results = stored_results(db)
    assert len(results) == 1
    result = results[0]
    assert result["status"] == "failed" and result["success"] is False
    assert "interrupted at step 3" in result["error"]
    steps = {s["id"]: s for s in result["steps"]}
    assert steps[1]["status"] == steps[2]["status"] == "succeeded"
    assert steps[3]["status"] == "failed" and steps[3]["error"] == "interrupted"
    assert steps[4]["status"] != "succeeded" and steps[4]["attempts"] == 0
    assert "not run" in steps[4]["error"]
    assert result["files"] == [{"path": "a.txt", "action": "reverted"},
                               {"path": "sub/b.txt", "action": "reverted"}]
    assert state["result_hash"] == [r for r in read_rows(db)
                                    if RESULT_TAG in (r["tags"] or "")][0]["content_hash"]
    assert (project / "a.txt").read_bytes() == b"A0\n"
    assert not (project / "sub").exists()
    assert sorted(p.name for p in project.iterdir()) == ["a.txt"]
    check_store(db)


def test_interrupt_with_rollback_none_keeps_and_lists_the_files(db, fake_llm, state_dir, project):
    """Ctrl-C with rollback_strategy none: exit 130, the files written stay, the result lists
    them (modified / created) and stderr names them."""
    (project / "a.txt").write_bytes(b"A0\n")
    insert_plan(db, interrupted_plan(project, "none"))
    fake_llm.enqueue("A1 rewritten\n").enqueue("B1 created\n")
    fake_llm.enqueue("partial answer that never finishes " * 4, fault="stall", delay_s=5)

    rc, out, err, elapsed = run_and_interrupt(db, fake_llm, state_dir, signal.SIGINT, in_flight=3)

    assert rc == EXIT_INTERRUPTED, err
    assert elapsed < 4
    assert out == ""
    assert "Traceback" not in err
    assert "a.txt" in err and "sub/b.txt" in err and "kept" in err
    state = plan_state(db, "p-int")
    assert state["status"] == "failed" and "interrupted at step 3" in state["error"]
    results = stored_results(db)
    assert len(results) == 1
    assert "interrupted at step 3" in results[0]["error"]
    assert results[0]["files"] == [{"path": "a.txt", "action": "modified"},
                                   {"path": "sub/b.txt", "action": "created"}]
    assert (project / "a.txt").read_text().startswith("A1 rewritten")
    assert (project / "sub" / "b.txt").read_text().startswith("B1 created")
    assert temp_files(project) == []
    check_store(db)


BIG = 2 * 1024 * 1024


def _big(letter: str) -> bytes:
    # numbered lines: the same line over and over is stopped as degenerate output
    return b"".join(f"{letter * 56} {n:06d}\n".encode() for n in range(BIG // 64))


@pytest.mark.parametrize("gap", [0.001, 0.01, 0.02], ids=["gap1ms", "gap10ms", "gap20ms"])
def test_repeated_ctrl_c_cannot_cut_the_cleanup_short(db, fake_llm, state_dir, project, gap):
    """Ctrl-C, then five more Ctrl-C `gap` apart while two 2 MB files are being put back:
    still exit 130, the result memory stored (plan failed), every file either fully restored
    byte for byte (never partial, never missing), the created file gone, no temp file left."""
    originals = {"big.txt": _big("o"), "big2.txt": _big("p"), "a.txt": b"A0\n"}
    for name, data in originals.items():
        (project / name).write_bytes(data)
    plan = make_plan("p-big", [
        {"id": 1, "prompt": "rewrite big", "file_output": "big.txt"},
        {"id": 2, "prompt": "rewrite big2", "file_output": "big2.txt"},
        {"id": 3, "prompt": "rewrite a", "file_output": "a.txt"},
        {"id": 4, "prompt": "create c", "file_output": "new/c.txt"},
        {"id": 5, "prompt": "the slow one", "depends_on": [4]},
    ], context={"objective": "interrupt the cleanup", "project": str(project)}, rollback_strategy="revert_files")
    insert_plan(db, plan)
    fake_llm.enqueue(_big("n").decode(), chunk_size=65536)
    fake_llm.enqueue(_big("m").decode(), chunk_size=65536)
    fake_llm.enqueue("A1\n").enqueue("C1\n")
    fake_llm.enqueue("partial answer that never finishes " * 4, fault="stall", delay_s=5)

    rc, out, err, elapsed = run_and_interrupt(db, fake_llm, state_dir, signal.SIGINT, in_flight=5,
                                              extra=("--max-output-bytes", str(8 * BIG)), repeats=5, gap=gap)
    restored = {name: (project / name).is_file() and (project / name).read_bytes() == data
                for name, data in originals.items()}

    # -SIGINT (killed by a late Ctrl-C while exiting) is not 130: the signals must stay
    # refused until the process is gone. `restored` tells whether the cleanup itself held.
    assert rc == EXIT_INTERRUPTED, f"rc={rc} restored={restored} stderr:\n{err}"
    assert elapsed < 4
    assert "Traceback" not in err, err
    state = plan_state(db, "p-big")
    assert state["status"] == "failed" and "interrupted at step 5" in state["error"]
    results = stored_results(db)
    assert len(results) == 1 and results[0]["status"] == "failed"
    assert all(restored.values()), f"not restored byte for byte: {restored}"
    assert not (project / "new").exists()
    assert temp_files(project) == []
    check_store(db)


# --------------------------------------------------------------------------------------
# Part B: three bridges and a memory-server-like writer on one store
# --------------------------------------------------------------------------------------

INSERTER = textwrap.dedent("""\
    # A stand-in for the memory server: one connection of its own, busy_timeout 5000,
    # BEGIN IMMEDIATE / INSERT a note / COMMIT every ~5 ms until a stop file appears.
    import json, os, sqlite3, sys, time, uuid
    sys.path.insert(0, sys.argv[1])
    from fakes import content_hash, iso_z

    db, ready, stop = sys.argv[2], sys.argv[3], sys.argv[4]
    conn = sqlite3.connect(db, timeout=5.0, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=5000")
    inserted, errors = 0, []
    deadline = time.monotonic() + 15
    while not os.path.exists(stop) and time.monotonic() < deadline:
        content = f"concurrency note {inserted} {uuid.uuid4().hex}"
        ts = time.time()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT INTO memories (content_hash, content, tags, memory_type, metadata, created_at, "
                    "updated_at, created_at_iso, updated_at_iso, store, embedding_pending) "
                    "VALUES (?, ?, 'note,concurrency', 'note', '{}', ?, ?, ?, ?, 'default', 0)",
                    (content_hash(content), content, ts, ts, iso_z(ts), iso_z(ts)))
                conn.execute("COMMIT")
                inserted += 1
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            errors.append(repr(exc))
        if inserted == 1 and not os.path.exists(ready):
            open(ready, "w").close()
        time.sleep(0.005)
    conn.close()
    print(json.dumps({"inserted": inserted, "errors": errors}))
""")


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_three_bridges_and_a_writer_run_every_plan_exactly_once(tmp_path, db, fake_llm, state_dir, journal_mode):
    """Three `bridge` processes started together on 12 pending plans while another process
    keeps inserting memories the way the memory server does: every plan is claimed and run
    exactly once (12 chat requests, each plan's prompt once, one result per plan), every
    bridge exits 0, nobody sees "database is locked", the writer meets no error, and the
    store stays valid. In the rollback journal mode and in WAL (the memory server's)."""
    now = time.time()
    plan_ids = [f"plan-{n:02d}" for n in range(12)]
    for n, plan_id in enumerate(plan_ids):
        insert_plan(db, make_plan(plan_id, [{"id": 1, "prompt": f"task for {plan_id}"}]),
                    created_at=now + n / 1000)
    conn = sqlite3.connect(db)
    try:
        mode = conn.execute(f"PRAGMA journal_mode={journal_mode}").fetchone()[0]
    finally:
        conn.close()
    assert mode == journal_mode
    for n in range(12 + 3):
        fake_llm.enqueue(f"answer number {n}")

    script = tmp_path / "inserter.py"
    script.write_text(INSERTER)
    ready, stop = tmp_path / "inserter.ready", tmp_path / "inserter.stop"
    inserter = subprocess.Popen([sys.executable, str(script), str(TESTS), str(db), str(ready), str(stop)],
                                env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bridges: list[subprocess.Popen] = []
    try:
        deadline = time.monotonic() + 5
        while not ready.exists() and time.monotonic() < deadline and inserter.poll() is None:
            time.sleep(0.005)
        assert ready.exists(), f"the inserter never committed: {inserter.communicate(timeout=5)}"
        bridges = [start_bridge(db, fake_llm.url, state_dir, "--timeout", "10") for _ in range(3)]
        outputs = [b.communicate(timeout=15) for b in bridges]
        stop.touch()
        ins_out, ins_err = inserter.communicate(timeout=5)
    finally:
        stop.touch()
        for proc in (*bridges, inserter):
            kill(proc)

    for proc, (out, err) in zip(bridges, outputs):
        assert proc.returncode == 0, err
        assert "database is locked" not in err.lower()
        assert "Traceback" not in err
        assert "bridge: error" not in err
    assert inserter.returncode == 0, ins_err
    report = json.loads(ins_out)
    assert report["errors"] == []
    assert report["inserted"] > 0

    chats = fake_llm.chat_requests
    assert len(chats) == 12
    assert fake_llm.pending == 3
    seen = []
    for req in chats:
        text = "\n".join(m["content"] for m in req["json"]["messages"] if m["role"] == "user")
        seen += [p for p in plan_ids if f"task for {p}" in text]
    assert sorted(seen) == plan_ids                     # each plan's prompt exactly once

    results = stored_results(db)
    assert sorted(r["plan_id"] for r in results) == plan_ids
    assert all(r["status"] == "completed" for r in results)
    assert len({r["run_id"] for r in results}) == 12
    for plan_id in plan_ids:
        assert plan_state(db, plan_id)["status"] == "completed"
    notes = [r for r in read_rows(db) if r["memory_type"] == "note"]
    assert len(notes) == report["inserted"]
    check_store(db)
