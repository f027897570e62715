"""What a new user stumbled on (issue 16, point 6) and what a run says it wrote (point 5):
--health on a read-only or corrupted store, --show of a stale plan, exit 2 after a claim,
--debug and exit 70, file_output naming a folder, --validate --json of an invalid plan,
long problem lists, how to create a store; file names in progress, summary, --dry-run."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import bridge
from fakes import (bridge_args, check_store, dead_pid, insert_memory, insert_plan, make_plan, plan_state,
                   run_bridge, set_plan_state)

ROOT = Path(__file__).resolve().parent.parent


def corrupt_a_page(path: Path, which: str = "middle") -> None:
    """Fill one page of a store with 0xff bytes (a torn or rotten disk page): page 2
    (SQLite then fails to read it at all) or one in the middle (quick_check names it)."""
    for n in range(3):
        insert_memory(path, f"note {n}")
    conn = sqlite3.connect(path)
    size, count = conn.execute("PRAGMA page_size").fetchone()[0], conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    with open(path, "r+b") as handle:
        handle.seek(size * (1 if which == "second" else count // 2))
        handle.write(b"\xff" * size)


# --------------------------------------------------------------------------------------
# --health: the store must be writable and pass quick_check
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["middle", "second"])
def test_health_reports_a_corrupted_page_as_unusable(capsys, db, fake_llm, which):
    corrupt_a_page(db, which)

    rc = bridge.main(["--health", "--json", "--db", str(db), "--base-url", fake_llm.url], environ={})
    doc = json.loads(capsys.readouterr().out)

    assert rc == 2
    assert doc["ok"] is False and doc["server"]["reachable"] is True
    error = doc["store"]["error"]
    assert "PRAGMA quick_check" in error and ("malformed" in error or "Page" in error)
    assert "\n" not in error
    assert str(db) in doc["store"]["error"]


def test_health_text_says_fail_and_the_hint(capsys, db, fake_llm):
    corrupt_a_page(db)

    rc = bridge.main(["--health", "--db", str(db), "--base-url", fake_llm.url], environ={})
    out = capsys.readouterr().out

    assert rc == 2
    assert re.search(r"^store +FAIL .*not usable: PRAGMA quick_check", out, re.M)
    assert "hint:" in out


def test_health_of_a_good_store_is_ok_and_leaves_it_unchanged(capsys, db, fake_llm):
    before = db.read_bytes()

    rc = bridge.main(["--health", "--json", "--db", str(db), "--base-url", fake_llm.url], environ={})
    doc = json.loads(capsys.readouterr().out)

    assert rc == 0 and doc["ok"] is True
    assert db.read_bytes() == before                   # the write probe was rolled back
    assert not Path(str(db) + "-journal").exists()
    check_store(db)


def test_health_counts_a_store_busy_with_another_writer_as_writable(capsys, db, fake_llm, monkeypatch):
    monkeypatch.setattr(bridge, "STORE_BUSY_TIMEOUT_S", 0.05)      # the lock is held throughout
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        rc = bridge.main(["--health", "--json", "--db", str(db), "--base-url", fake_llm.url],
                         environ={"BRIDGE_DEBUG": "1"})
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert rc == 0, capsys.readouterr()


def _read_only_health(tmp_path: Path, db: Path, url: str) -> subprocess.CompletedProcess:
    """bridge --health --json on a copy of db on a read-only mount (a tmpfs remounted ro in
    a private mount namespace), or on a read-only file when not root."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    cmd = [sys.executable, str(ROOT / "bridge.py"), "--health", "--json", "--db", str(mnt / "s.db"),
           "--base-url", url]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    if os.geteuid() != 0:
        shutil.copyfile(db, mnt / "s.db")
        (mnt / "s.db").chmod(0o444)
        mnt.chmod(0o555)
        try:
            return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        finally:
            mnt.chmod(0o755)
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) to make a read-only mount as root")
    script = (f"mount -t tmpfs tmpfs {mnt} && cp {db} {mnt}/s.db && mount -o remount,ro {mnt} && "
              + " ".join(f"'{part}'" for part in cmd))
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=60)
    if not proc.stdout and re.search(r"^(unshare|mount|sh|cp):", proc.stderr, re.M):
        pytest.skip(f"cannot make a read-only mount here: {proc.stderr.strip()}")
    return proc


def test_health_reports_a_read_only_store_as_unusable(tmp_path, db, fake_llm):
    proc = _read_only_health(tmp_path, db, fake_llm.url)

    assert proc.returncode == 2, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False
    assert "cannot write" in doc["store"]["error"] and "readonly" in doc["store"]["error"]


def test_no_store_hint_says_how_to_create_one(capsys, tmp_path, fake_llm):
    rc = bridge.main(["--health", "--db", str(tmp_path / "new.db"), "--base-url", fake_llm.url], environ={})
    out = capsys.readouterr().out

    assert rc == 2
    assert "bridge --submit PLAN.json --db NEWFILE" in out
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "bridge --submit PLAN.json --db NEWFILE" in readme


# --------------------------------------------------------------------------------------
# --show of a stale plan; exit 2 after a claim
# --------------------------------------------------------------------------------------


def test_show_of_a_stale_plan_suggests_resume_and_rerun_not_plan(capsys, db):
    insert_plan(db, make_plan("p-stale"), metadata={"bridge": {
        "status": "in_progress", "run_id": "20260101T000000Z-deadbeef",
        "owner": {"host": socket.gethostname(), "pid": dead_pid()}}})

    rc = bridge.main(["--show", "p-stale", "--db", str(db)], environ={})
    err = capsys.readouterr().err

    assert rc == 2
    assert "stale" in err
    assert "bridge --plan p-stale --resume" in err and "bridge --plan p-stale --rerun" in err
    hint = next(line for line in err.splitlines() if line.startswith("hint:"))
    assert not hint.endswith("bridge --plan p-stale")


def test_show_of_a_stale_plan_with_an_earlier_result_says_it_is_stale_now(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("hi")
    assert run_bridge(capsys, db, fake_llm, state_dir)[0] == 0
    last = plan_state(db, "p1")["result_hash"]
    set_plan_state(db, "p1", status="in_progress", result_hash=None,   # as a claim leaves it
                   owner={"host": socket.gethostname(), "pid": dead_pid()},
                   extra=json.dumps({"last_result_hash": last}))

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "p1")

    assert rc == 0
    assert out.startswith("plan p1: completed")
    assert "now: stale" in out and "bridge --plan p1 --resume" in out


def test_store_locked_at_the_finish_exits_2_after_the_claim_as_documented(
        capsys, db, fake_llm, state_dir, project, monkeypatch):
    """The store is locked by another writer while the step runs: the finish cannot be
    stored, bridge exits 2 although the plan was claimed and its file written; the exit
    table says exactly that."""
    monkeypatch.setattr(bridge, "STORE_BUSY_TIMEOUT_S", 0.05)
    insert_plan(db, make_plan("p1", context={"objective": "t", "project": str(project)},
                              steps=[{"id": 1, "prompt": "x", "file_output": "out.txt"}]))
    fake_llm.latency_s = 0.3
    fake_llm.enqueue("hello")
    locked, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        deadline = time.monotonic() + 10
        while not fake_llm.chat_requests and time.monotonic() < deadline:
            release.wait(0.01)
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(10)
        other.execute("ROLLBACK")
        other.close()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--plan", "p1")
    finally:
        release.set()
        holder.join()

    assert locked.is_set()
    assert rc == 2
    assert "locked" in err
    assert (project / "out.txt").read_text() == "hello"       # written, and kept
    assert plan_state(db, "p1")["status"] == "in_progress"    # claimed; stale once this process is gone
    table_row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| 2 |"))
    assert "claimed" in table_row and "as a run finishes" in table_row and "stale" in table_row
    assert "as a run finishes" in " ".join(bridge.__doc__.split())


# --------------------------------------------------------------------------------------
# --debug keeps exit 70
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_and_still_exits_70(capsys, db, monkeypatch, how):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in --list")
    monkeypatch.setattr(bridge, "cmd_list", broken)
    argv = ["--list", "--db", str(db)] + (["--debug"] if how == "flag" else [])

    rc = bridge.main(argv, environ={"BRIDGE_DEBUG": "1"} if how == "env" else {})
    err = capsys.readouterr().err

    assert rc == 70
    assert "Traceback" in err and "RuntimeError: a bug in --list" in err
    assert "internal error" in err


def test_without_debug_exit_70_shows_no_traceback(capsys, db, monkeypatch):
    monkeypatch.setattr(bridge, "cmd_list", lambda *a: 1 / 0)
    rc = bridge.main(["--list", "--db", str(db)], environ={})
    err = capsys.readouterr().err
    assert rc == 70 and "Traceback" not in err and "--debug" in err


# --------------------------------------------------------------------------------------
# plans: file_output naming a folder, --validate --json, long problem lists
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["newdir/", "newdir\\", "a/b/", "newdir/."])
def test_file_output_naming_a_folder_is_invalid(tmp_path, project, rel):
    plan = make_plan("p1", context={"objective": "t", "project": str(project)},
                     steps=[{"id": 1, "prompt": "x", "file_output": rel}])

    with pytest.raises(bridge.PlanInvalid) as caught:
        bridge.check_plan(plan)

    assert any("file_output" in p for p in caught.value.problems)
    assert list(project.iterdir()) == []


def test_file_output_ending_in_a_slash_fails_the_schema_too():
    from jsonschema import Draft202012Validator

    plan = make_plan("p1", context={"objective": "t", "project": "/tmp"},
                     steps=[{"id": 1, "prompt": "x", "file_output": "newdir/"}])
    errors = list(Draft202012Validator(bridge.load_schema()).iter_errors(plan))
    assert [list(e.absolute_path) for e in errors] == [["steps", 0, "file_output"]]


def test_run_of_a_plan_whose_file_output_ends_in_a_slash_writes_nothing(capsys, db, fake_llm, state_dir, project):
    insert_plan(db, make_plan("p1", context={"objective": "t", "project": str(project)},
                              steps=[{"id": 1, "prompt": "x", "file_output": "newdir/"}]))
    fake_llm.enqueue("never sent")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)

    assert rc == 1
    assert fake_llm.chat_requests == []
    assert list(project.iterdir()) == []
    assert "file_output" in err


def _many_problems_plan(project: Path, n: int) -> dict:
    return make_plan("p-bad", context={"objective": "t", "project": str(project)},
                     steps=[{"id": i, "prompt": "x", "depends_on": [1000 + i]} for i in range(1, n + 1)])


def test_validate_json_names_the_id_of_an_invalid_plan(capsys, tmp_path, project):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_many_problems_plan(project, 2)))

    rc = bridge.main(["--validate", str(path), "--json"], environ={})
    doc = json.loads(capsys.readouterr().out)

    assert rc == 1
    assert doc["valid"] is False and doc["plan_id"] == "p-bad"
    assert len(doc["problems"]) == 2


def test_validate_json_of_a_plan_without_an_id_says_null(capsys, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"$schema": "bridge-plan-v1", "steps": []}))
    assert bridge.main(["--validate", str(path), "--json"], environ={}) == 1
    assert json.loads(capsys.readouterr().out)["plan_id"] is None


def test_many_problems_show_the_first_five_and_how_many_more(capsys, db, fake_llm, state_dir, project):
    """One stderr line names 5 problems and "and N more"; the stored result and --json keep all."""
    insert_plan(db, _many_problems_plan(project, 40))

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--json")

    assert rc == 1
    line = next(line for line in err.splitlines() if "p-bad: invalid" in line)
    assert line.count("unknown step") == 5
    assert "and 35 more" in line
    result = json.loads(out)["plans"][0]
    assert len(result["problems"]) == 40


def test_submit_of_a_plan_with_many_problems_cuts_the_error_line(capsys, tmp_path, project):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_many_problems_plan(project, 12)))

    rc = bridge.main(["--submit", str(path), "--db", str(tmp_path / "new.db")], environ={})
    err = capsys.readouterr().err

    assert rc == 1
    first = err.splitlines()[0]
    assert first.count("unknown step") == 5 and "and 7 more" in first


# --------------------------------------------------------------------------------------
# point 5: say what was written
# --------------------------------------------------------------------------------------


def test_progress_and_summary_name_each_file_and_whether_it_was_created_or_modified(
        capsys, db, fake_llm, state_dir, project):
    (project / "old.txt").write_text("old\n")
    insert_plan(db, make_plan("p1", context={"objective": "t", "project": str(project)}, steps=[
        {"id": 1, "prompt": "a", "file_output": "docs/new.txt"},
        {"id": 2, "prompt": "b", "file_output": "old.txt"},
        {"id": 3, "prompt": "c"}]))
    for text in ("new", "changed", "no file"):
        fake_llm.enqueue(text)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)

    assert rc == 0, err
    assert "step 1: wrote docs/new.txt (created)" in err
    assert "step 2: wrote old.txt (modified)" in err
    assert "step 3: wrote" not in err
    summary = err[err.index("plan p1: completed"):]
    assert "file docs/new.txt: created" in summary and "file old.txt: modified" in summary


def test_dry_run_shows_the_absolute_target_and_create_or_overwrite(capsys, db, fake_llm, state_dir, project):
    (project / "old.txt").write_text("old\n")
    insert_plan(db, make_plan("p1", context={"objective": "t", "project": str(project)}, steps=[
        {"id": 1, "prompt": "a", "file_output": "docs/new.txt"},
        {"id": 2, "prompt": "b", "file_output": "old.txt"},
        {"id": 3, "prompt": "c", "file_output": "docs/new.txt", "depends_on": [1]}]))

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--dry-run")
    assert rc == 0, err
    assert f"would create {project / 'docs' / 'new.txt'}" in out
    assert f"would overwrite {project / 'old.txt'}" in out
    assert out.count(f"would overwrite {project / 'docs' / 'new.txt'}") == 1   # step 3: step 1 wrote it

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--dry-run", "--json")
    steps = {s["id"]: s for s in json.loads(out)["plans"][0]["steps"]}
    assert steps[1]["file_output"] == {"path": "docs/new.txt", "target": str(project / "docs" / "new.txt"),
                                       "action": "create"}
    assert steps[2]["file_output"]["action"] == "overwrite"
    assert list(project.iterdir()) == [project / "old.txt"]
