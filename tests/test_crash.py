"""Crash recovery: a REAL `python bridge.py` subprocess is killed with SIGKILL (by the
BRIDGE_CRASH_AT test hook, or by the test mid-stream), then the store, the project and
the state folder are checked, and `bridge --plan ID --resume` (in-process) takes the
plan over. Also: which statuses --resume and --plan accept, staleness by heartbeat,
and two resumes racing for one stale plan."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import bridge
from fakes import (
    bridge_args, check_store, child_env, dead_pid, first_user, insert_plan, make_plan, plan_state, read_rows,
    run_bridge, steps_by_id, stored_results, temp_files,
)

BRIDGE_PY = Path(bridge.__file__).resolve()
PLAN_ID = "crash"
ORIGINAL = b"original keep\n"
STEP1_REPLY = "step one text"
STEP2_REPLY = "```python\nx = 1\n```"
STEP3_REPLY = '{"a": 1}'
STEP1_BYTES = b"step one text"      # non_empty writes the stripped reply
STEP2_BYTES = b"x = 1\n"            # syntax_check writes the fenced code
MADE = "new/dir/made.py"
KILL_TIMEOUT_S = 20


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


@pytest.fixture
def proj(project) -> Path:
    """The project folder holding keep.txt with its original bytes."""
    (project / "keep.txt").write_bytes(ORIGINAL)
    return project


def crash_plan(project: Path, step3_retries: int | None = None) -> dict:
    """The plan every scenario uses: step 1 writes keep.txt, step 2 writes new/dir/made.py,
    step 3 answers JSON; revert_files. step3_retries: max_retries of step 3 (the variant
    whose step 3 fails on its first bad answer)."""
    step3 = {"id": 3, "prompt": "task-three", "validation": {"type": "contains_keys", "keys": ["a"]},
             "depends_on": [2]}
    if step3_retries is not None:
        step3["max_retries"] = step3_retries
    return make_plan(PLAN_ID, [
        {"id": 1, "prompt": "task-one", "file_output": "keep.txt", "validation": {"type": "non_empty"}},
        {"id": 2, "prompt": "task-two", "file_output": MADE,
         "validation": {"type": "syntax_check", "language": "python"}, "depends_on": [1]},
        step3,
    ], context={"objective": "crash test", "project": str(project)}, rollback_strategy="revert_files")


def child_cmd(db: Path, fake_llm, state_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(BRIDGE_PY), *bridge_args(db, fake_llm.url, state_dir), "--plan", PLAN_ID, *extra]


def run_killed(db: Path, fake_llm, state_dir: Path, crash_at: str, *extra: str) -> subprocess.Popen:
    """Run `python bridge.py --plan crash` with the crash hook; it must die by SIGKILL."""
    proc = subprocess.Popen(child_cmd(db, fake_llm, state_dir, *extra), cwd=BRIDGE_PY.parent,
                            env=child_env(BRIDGE_CRASH_AT=crash_at), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=KILL_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err)
    return proc


def kill_during_step_two(db: Path, fake_llm, state_dir: Path) -> subprocess.Popen:
    """Start a real run whose step 2 reply stalls mid-stream; SIGKILL it once step 2's
    request has arrived (step 1 has then written keep.txt and been checkpointed)."""
    fake_llm.enqueue(STEP1_REPLY)
    fake_llm.enqueue(STEP2_REPLY, fault="stall", delay_s=5)
    proc = subprocess.Popen(child_cmd(db, fake_llm, state_dir), cwd=BRIDGE_PY.parent, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 5
        while len(fake_llm.chat_requests) < 2:
            assert proc.poll() is None, f"bridge exited early: {proc.returncode}"
            assert time.monotonic() < deadline, "step 2's request never arrived"
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.communicate(timeout=KILL_TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL
    return proc


def resume(capsys, db: Path, fake_llm, state_dir: Path, *extra: str) -> tuple[int, dict | None, str]:
    """In-process `bridge --json --plan crash --resume` (no crash hook): (rc, result, stderr)."""
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--json", "--plan", PLAN_ID, "--resume", *extra)
    doc = json.loads(out) if out.strip() else None
    result = None
    if doc is not None and doc["plans"]:
        assert len(doc["plans"]) == 1
        result = doc["plans"][0]
    return rc, result, err


def listed_status(capsys, db: Path, fake_llm, state_dir: Path, plan_id: str = PLAN_ID) -> str:
    """The status `bridge --list --all --json` shows for a plan."""
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--all", "--json")
    assert rc == 0, err
    rows = [p for p in json.loads(out)["plans"] if p["id"] == plan_id]
    assert len(rows) == 1
    return rows[0]["status"]


def prompts_sent(fake_llm) -> list[str]:
    """Which step each chat request was for ("task-one", ...), in order."""
    names = ("task-one", "task-two", "task-three")
    return [next(n for n in names if f"Task:\n{n}" in first_user(r)) for r in fake_llm.chat_requests]


def backup_dirs(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "runs").glob("*/backups"))


def assert_backups_private(state_dir: Path) -> None:
    """A completed run keeps its backups for --undo, readable by this user only."""
    files = [p for folder in backup_dirs(state_dir) for p in folder.iterdir()]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in files), files
    assert all((p.parent.parent.stat().st_mode & 0o777) == 0o700 for p in files), files


def journal(state_dir: Path, run_id: str) -> list[dict]:
    return bridge.read_jsonl(state_dir / "runs" / run_id / "journal.jsonl")


def checkpoint(state_dir: Path, run_id: str) -> list[dict]:
    return bridge.read_jsonl(state_dir / "runs" / run_id / "steps.jsonl")


def assert_final_files(project: Path) -> None:
    assert (project / "keep.txt").read_bytes() == STEP1_BYTES
    assert (project / MADE).read_bytes() == STEP2_BYTES
    assert temp_files(project) == []


def assert_untouched(project: Path) -> None:
    """Only keep.txt, with its original bytes (no new/, no temp file)."""
    assert sorted(p.relative_to(project).as_posix() for p in project.rglob("*")) == ["keep.txt"]
    assert (project / "keep.txt").read_bytes() == ORIGINAL


def enqueue_all(fake_llm, step3: str = STEP3_REPLY) -> None:
    for reply in (STEP1_REPLY, STEP2_REPLY, step3):
        fake_llm.enqueue(reply)


def utc_iso(seconds_ago: float) -> str:
    when = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def in_progress_state(host: str, pid: int, heartbeat_age_s: float, run_id: str = "20000101T000000Z-deadbeef") -> dict:
    stamp = utc_iso(heartbeat_age_s)
    return {"status": "in_progress", "run_id": run_id, "claimed_at": stamp, "heartbeat_at": stamp,
            "owner": {"host": host, "pid": pid}, "finished_at": None, "error": None, "resumed_from": None}


# --------------------------------------------------------------------------------------
# killed at a hook point, then resumed
# --------------------------------------------------------------------------------------


def test_crash_inside_the_claim_leaves_the_plan_pending_and_a_plain_run_completes_it(
        capsys, db, proj, fake_llm, state_dir):
    """SIGKILL inside the claim transaction (before COMMIT): the claim never happened —
    the plan is still pending, nothing was sent or written, and a plain run (no --resume)
    runs it to completion."""
    insert_plan(db, crash_plan(proj))
    enqueue_all(fake_llm)

    run_killed(db, fake_llm, state_dir, "claim")

    assert fake_llm.chat_requests == []
    assert fake_llm.pending == 3
    assert listed_status(capsys, db, fake_llm, state_dir) == "pending"
    assert plan_state(db, PLAN_ID) == {}
    assert stored_results(db) == []
    assert_untouched(proj)
    assert not (state_dir / "runs").exists()
    check_store(db)

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir) + ["--json"], environ={})
    out, err = capsys.readouterr()

    assert rc == 0, err
    result = json.loads(out)["plans"][0]
    assert result["status"] == "completed"
    assert "resumed_from" not in result
    assert "Traceback" not in err
    assert prompts_sent(fake_llm) == ["task-one", "task-two", "task-three"]
    assert_final_files(proj)
    assert plan_state(db, PLAN_ID)["status"] == "completed"
    assert len(stored_results(db)) == 1
    check_store(db)


@pytest.mark.parametrize("point", ["journal", "replace"], ids=["journal-before-write", "replace-temp-written"])
def test_crash_during_the_first_file_write_is_undone_and_resume_reruns_every_step(
        capsys, db, proj, fake_llm, state_dir, point):
    """SIGKILL during step 1's write of keep.txt — after its journal entry and backup
    (journal), or with the temp file written but not yet renamed (replace): keep.txt still
    holds its original bytes, the plan shows stale, and --resume puts back what the
    dead run left (the stray temp file too), sends steps 1-3 again (step 1 never
    succeeded) and completes with the final files and no backups left."""
    insert_plan(db, crash_plan(proj))
    enqueue_all(fake_llm)

    killed = run_killed(db, fake_llm, state_dir, point)

    assert prompts_sent(fake_llm) == ["task-one"]
    assert listed_status(capsys, db, fake_llm, state_dir) == "stale"
    state = plan_state(db, PLAN_ID)
    assert state["status"] == "in_progress"
    assert state["owner"] == {"host": socket.gethostname(), "pid": killed.pid}
    assert stored_results(db) == []
    old_run = state["run_id"]
    entries = journal(state_dir, old_run)
    assert [(e["step"], e["path"], e["action"]) for e in entries] == [(1, "keep.txt", "modified")]
    assert Path(entries[0]["backup"]).read_bytes() == ORIGINAL
    assert (proj / "keep.txt").read_bytes() == ORIGINAL
    assert checkpoint(state_dir, old_run) == []
    strays = temp_files(proj)
    if point == "replace":
        assert len(strays) == 1
        assert strays[0].parent == proj and strays[0].name.startswith(".keep.txt.")
        assert strays[0].read_bytes() == STEP1_BYTES
    else:
        assert strays == []
    check_store(db)

    fake_llm.reset()
    enqueue_all(fake_llm)
    rc, result, err = resume(capsys, db, fake_llm, state_dir)

    assert rc == 0, err
    assert result["status"] == "completed"
    assert result["resumed_from"] == old_run
    assert [s["resumed"] for s in result["steps"]] == [False, False, False]
    assert "Traceback" not in err
    assert prompts_sent(fake_llm) == ["task-one", "task-two", "task-three"]
    assert_final_files(proj)
    assert_backups_private(state_dir)
    assert plan_state(db, PLAN_ID)["status"] == "completed"
    assert [r["run_id"] for r in stored_results(db)] == [result["run_id"]]
    check_store(db)


def test_crash_inside_the_result_transaction_resumes_without_sending_anything(
        capsys, db, proj, fake_llm, state_dir):
    """SIGKILL after every step ran, inside the transaction that stores the result: no
    result memory (rolled back), the plan is stale, the files are written. --resume
    sends no request (every step succeeded in the checkpoint), stores the result."""
    insert_plan(db, crash_plan(proj))
    enqueue_all(fake_llm)

    run_killed(db, fake_llm, state_dir, "finish")

    assert prompts_sent(fake_llm) == ["task-one", "task-two", "task-three"]
    assert listed_status(capsys, db, fake_llm, state_dir) == "stale"
    assert stored_results(db) == []
    old_run = plan_state(db, PLAN_ID)["run_id"]
    assert [e["status"] for e in checkpoint(state_dir, old_run)] == ["succeeded"] * 3
    assert_final_files(proj)
    check_store(db)

    fake_llm.reset()
    rc, result, err = resume(capsys, db, fake_llm, state_dir)

    assert rc == 0, err
    assert result["status"] == "completed"
    assert result["resumed_from"] == old_run
    assert fake_llm.chat_requests == []
    assert [s["resumed"] for s in result["steps"]] == [True, True, True]
    outputs = [s["output"] for s in result["steps"]]
    assert outputs[:2] == [STEP1_BYTES.decode(), STEP2_BYTES.decode()]
    assert json.loads(outputs[2]) == {"a": 1}
    assert result["files"] == [{"path": "keep.txt", "action": "modified"}, {"path": MADE, "action": "created"}]
    assert "Traceback" not in err
    assert_final_files(proj)
    assert plan_state(db, PLAN_ID)["status"] == "completed"
    assert len(stored_results(db)) == 1
    check_store(db)


def test_resume_after_a_crash_while_storing_a_reverted_failure_does_not_trust_reverted_files(
        capsys, db, proj, fake_llm, state_dir):
    """A run whose step 3 fails reverts its files (revert_files), then is killed while
    storing the failed result. Steps 1 and 2 are in its checkpoint as succeeded, but their
    files were put back. A --resume that completes must leave the files those steps
    wrote (so it has to run them again), not report them while the disk holds the originals."""
    insert_plan(db, crash_plan(proj, step3_retries=0))
    enqueue_all(fake_llm, step3="not json at all")

    run_killed(db, fake_llm, state_dir, "finish")

    assert listed_status(capsys, db, fake_llm, state_dir) == "stale"
    assert stored_results(db) == []
    assert_untouched(proj)          # the failed run reverted before it was killed
    old_run = plan_state(db, PLAN_ID)["run_id"]
    assert [e["status"] for e in checkpoint(state_dir, old_run)] == ["succeeded", "succeeded", "failed"]
    check_store(db)

    fake_llm.reset()
    enqueue_all(fake_llm)
    rc, result, err = resume(capsys, db, fake_llm, state_dir)

    assert rc == 0, (rc, err, fake_llm.chat_requests and prompts_sent(fake_llm))
    assert result["status"] == "completed"
    assert "Traceback" not in err
    assert_final_files(proj)
    check_store(db)


# --------------------------------------------------------------------------------------
# killed mid-stream, then resumed
# --------------------------------------------------------------------------------------


def test_run_killed_mid_stream_resumes_after_its_succeeded_step(capsys, db, proj, fake_llm, state_dir):
    """SIGKILL while step 2's reply streams: step 1's file and checkpoint survive, the
    plan is stale. --resume sends steps 2 and 3 only (step 1's output from the checkpoint
    reaches step 2's prompt), marks step 1 resumed, names the killed run, completes."""
    insert_plan(db, crash_plan(proj))

    kill_during_step_two(db, fake_llm, state_dir)

    assert (proj / "keep.txt").read_bytes() == STEP1_BYTES
    assert listed_status(capsys, db, fake_llm, state_dir) == "stale"
    assert stored_results(db) == []
    old_run = plan_state(db, PLAN_ID)["run_id"]
    done = checkpoint(state_dir, old_run)
    assert [(e["id"], e["status"], e["output"]) for e in done] == [(1, "succeeded", STEP1_BYTES.decode())]
    check_store(db)

    fake_llm.reset()
    fake_llm.enqueue(STEP2_REPLY)
    fake_llm.enqueue(STEP3_REPLY)
    rc, result, err = resume(capsys, db, fake_llm, state_dir)

    assert rc == 0, err
    assert result["status"] == "completed"
    assert result["resumed_from"] == old_run
    assert plan_state(db, PLAN_ID)["resumed_from"] == old_run
    assert prompts_sent(fake_llm) == ["task-two", "task-three"]
    assert f"```\n{STEP1_BYTES.decode()}\n```" in first_user(fake_llm.chat_requests[0])
    steps = steps_by_id(result)
    assert steps[1]["resumed"] is True
    assert steps[1]["status"] == "succeeded"
    assert steps[1]["output"] == STEP1_BYTES.decode()
    assert (steps[2]["resumed"], steps[3]["resumed"]) == (False, False)
    assert result["files"] == [{"path": "keep.txt", "action": "modified"}, {"path": MADE, "action": "created"}]
    assert "Traceback" not in err
    assert_final_files(proj)
    assert_backups_private(state_dir)
    assert plan_state(db, PLAN_ID)["status"] == "completed"
    assert len(stored_results(db)) == 1
    check_store(db)


def test_rerun_of_a_stale_plan_puts_back_the_dead_runs_files_and_starts_over(
        capsys, db, proj, fake_llm, state_dir):
    """--rerun on a stale plan: the files the killed run wrote are put back first, then
    every step runs again (nothing reused), and the run names the run it took over."""
    insert_plan(db, crash_plan(proj))
    kill_during_step_two(db, fake_llm, state_dir)
    assert (proj / "keep.txt").read_bytes() == STEP1_BYTES
    old_run = plan_state(db, PLAN_ID)["run_id"]

    fake_llm.reset()
    enqueue_all(fake_llm)
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir) + ["--json", "--plan", PLAN_ID, "--rerun"], environ={})
    out, err = capsys.readouterr()
    result = json.loads(out)["plans"][0]

    assert rc == 0, err
    assert prompts_sent(fake_llm) == ["task-one", "task-two", "task-three"]
    assert result["resumed_from"] == old_run
    assert [s["resumed"] for s in result["steps"]] == [False, False, False]
    # keep.txt was put back before step 1 rewrote it, so its original is what a revert would restore
    assert result["files"][0] == {"path": "keep.txt", "action": "modified"}
    assert_final_files(proj)
    assert_backups_private(state_dir)
    check_store(db)


def test_failed_resume_reverts_the_files_the_killed_run_wrote(capsys, db, proj, fake_llm, state_dir):
    """A resume that fails (step 3: no JSON, no retries) with revert_files puts back
    keep.txt, which the killed run wrote and the resume adopted, and removes new/."""
    insert_plan(db, crash_plan(proj, step3_retries=0))

    kill_during_step_two(db, fake_llm, state_dir)
    assert (proj / "keep.txt").read_bytes() == STEP1_BYTES
    old_run = plan_state(db, PLAN_ID)["run_id"]

    fake_llm.reset()
    fake_llm.enqueue(STEP2_REPLY)
    fake_llm.enqueue("not json at all")
    rc, result, err = resume(capsys, db, fake_llm, state_dir)

    assert rc == 1, err
    assert result["status"] == "failed"
    assert result["resumed_from"] == old_run
    assert [s["status"] for s in result["steps"]] == ["succeeded", "succeeded", "failed"]
    assert result["files"] == [{"path": "keep.txt", "action": "reverted"}, {"path": MADE, "action": "reverted"}]
    assert prompts_sent(fake_llm) == ["task-two", "task-three"]
    assert "Traceback" not in err
    assert_untouched(proj)
    assert backup_dirs(state_dir) == []
    assert plan_state(db, PLAN_ID)["status"] == "failed"
    check_store(db)


def test_resume_killed_in_turn_still_reverts_the_first_runs_files(capsys, db, proj, fake_llm, state_dir):
    """Run A is killed mid-stream after step 1 wrote keep.txt; resume B adopts that file
    and is killed in turn (hook `journal`, on step 2's write); resume C fails at step 3.
    revert_files must still give keep.txt its original bytes: the original lives in A's
    backups, which B took over and C must get from B."""
    insert_plan(db, crash_plan(proj, step3_retries=0))
    kill_during_step_two(db, fake_llm, state_dir)
    run_a = plan_state(db, PLAN_ID)["run_id"]

    fake_llm.reset()
    fake_llm.enqueue(STEP2_REPLY)
    run_killed(db, fake_llm, state_dir, "journal", "--resume")
    state = plan_state(db, PLAN_ID)
    run_b = state["run_id"]
    assert run_b != run_a and state["resumed_from"] == run_a
    assert prompts_sent(fake_llm) == ["task-two"]
    assert listed_status(capsys, db, fake_llm, state_dir) == "stale"
    assert (proj / "keep.txt").read_bytes() == STEP1_BYTES
    check_store(db)

    fake_llm.reset()
    fake_llm.enqueue(STEP2_REPLY)
    fake_llm.enqueue("not json at all")
    rc, result, err = resume(capsys, db, fake_llm, state_dir)

    assert rc == 1, err
    assert result["resumed_from"] == run_b
    assert [s["status"] for s in result["steps"]] == ["succeeded", "succeeded", "failed"]
    assert "Traceback" not in err
    assert_untouched(proj)
    assert backup_dirs(state_dir) == []
    check_store(db)


# --------------------------------------------------------------------------------------
# which statuses --resume / --plan / --rerun accept
# --------------------------------------------------------------------------------------


def _state_for(kind: str) -> dict | None:
    host = socket.gethostname()
    if kind == "pending":
        return None
    if kind == "completed":
        return {"status": "completed", "run_id": "20000101T000000Z-00000001", "finished_at": utc_iso(60),
                "error": None}
    if kind == "live":
        return in_progress_state(host, os.getpid(), 0)
    if kind == "stale":
        return in_progress_state(host, dead_pid(), 0)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, flags, shown, needles", [
    ("pending", ["--resume"], "pending", ["is pending, not stale", "--resume"]),
    ("completed", ["--resume"], "completed", ["is completed, not stale", "--resume"]),
    ("live", ["--resume"], "in_progress", ["is in progress, not stale", "wait for this one"]),
    ("stale", [], "stale", ["is stale", "--resume", "--rerun"]),
], ids=["resume-pending", "resume-completed", "resume-live-in-progress", "plain-plan-on-stale"])
def test_plan_flags_refuse_statuses_they_do_not_take(capsys, db, proj, fake_llm, state_dir,
                                                      kind, flags, shown, needles):
    """--resume takes only a stale plan; a bare --plan refuses a stale plan naming
    --resume and --rerun. A refusal exits 2 with an error and a hint, before any
    request, and changes nothing."""
    state = _state_for(kind)
    insert_plan(db, crash_plan(proj), metadata={"bridge": state} if state else {})
    assert listed_status(capsys, db, fake_llm, state_dir) == shown
    before = read_rows(db)
    fake_llm.enqueue(STEP1_REPLY)

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir) + ["--plan", PLAN_ID, *flags], environ={})
    out, err = capsys.readouterr()

    assert rc == 2
    assert out == ""
    assert err.startswith(f"bridge: error: plan '{PLAN_ID}' ")
    assert "\nhint: " in err
    for needle in needles:
        assert needle in err
    assert "Traceback" not in err
    assert fake_llm.requests == []
    assert read_rows(db) == before
    assert_untouched(proj)
    check_store(db)


# --------------------------------------------------------------------------------------
# stale by heartbeat
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pid, age_s, shown", [
    (1, bridge.STALE_AFTER_S + 60, "stale"),
    (1, 0, "in_progress"),
    ("dead", 0, "in_progress"),
], ids=["old-heartbeat", "fresh-heartbeat", "fresh-heartbeat-pid-not-checked-elsewhere"])
def test_plan_owned_by_another_host_is_stale_only_by_its_heartbeat(capsys, db, proj, fake_llm, state_dir,
                                                                    pid, age_s, shown):
    """An in_progress plan owned by a process on another host ("elsewhere") shows stale
    when its heartbeat is older than STALE_AFTER_S, in_progress while it is fresh — a pid
    of another host is never looked up here."""
    owner_pid = dead_pid() if pid == "dead" else pid
    insert_plan(db, crash_plan(proj), metadata={"bridge": in_progress_state("elsewhere", owner_pid, age_s)})

    assert listed_status(capsys, db, fake_llm, state_dir) == shown
    check_store(db)


# --------------------------------------------------------------------------------------
# two resumes at once
# --------------------------------------------------------------------------------------


def test_two_resumes_at_once_run_the_stale_plan_once(capsys, db, proj, fake_llm, state_dir):
    """Two `--resume` of one stale plan (its owner elsewhere, heartbeat old) started
    together: exactly one claims it and runs it (3 requests, one result); the other
    either loses the claim (exit 0, nothing run) or finds it in progress (exit 2)."""
    insert_plan(db, crash_plan(proj),
                metadata={"bridge": in_progress_state("elsewhere", 1, bridge.STALE_AFTER_S + 60)})
    enqueue_all(fake_llm)
    start = threading.Barrier(2)
    codes: list[int] = []
    errors: list[BaseException] = []

    def go() -> None:
        try:
            start.wait(timeout=5)
            codes.append(bridge.main(bridge_args(db, fake_llm.url, state_dir) + ["--plan", PLAN_ID, "--resume"],
                                     environ={}))
        except BaseException as exc:    # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    _, err = capsys.readouterr()

    assert errors == []
    assert sorted(codes) == [0, 2], (codes, err)
    if "claimed by another bridge process first" in err:     # the loser read "stale", then lost the claim
        assert f"plan '{PLAN_ID}' was claimed by another bridge process first" in err
    else:                           # the loser read the plan after the winner's claim
        assert f"plan '{PLAN_ID}' is in progress, not stale" in err
    assert "Traceback" not in err
    assert prompts_sent(fake_llm) == ["task-one", "task-two", "task-three"]
    results = stored_results(db)
    assert len(results) == 1
    assert results[0]["status"] == "completed"
    assert results[0]["resumed_from"] == "20000101T000000Z-deadbeef"
    assert plan_state(db, PLAN_ID)["status"] == "completed"
    assert_final_files(proj)
    check_store(db)
