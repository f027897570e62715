"""bridge --diff and --undo (issue 16, points 1-3): what a run changed, taking it back,
and the backups kept for that; against the fake model server and real stores."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import stat
from pathlib import Path

import pytest

import bridge
from fakes import (bridge_args, check_store, dead_pid, insert_plan, make_plan, plan_row, plan_state,
                   run_bridge, set_plan_state, snapshot)

ROOT = Path(__file__).resolve().parent.parent
ORIGINAL_BIN = b"\x89PNG\r\n\x1a\n\x00\xff binary \x80 not utf-8\n"
HELPER = "```python\ndef greet(name):\n    return f'Hello, {name}!'\n```"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def proj(project) -> Path:
    """A project with a text file, a binary file with unusual mode, and a folder."""
    (project / "greet.py").write_text("def greet(name):\n    return 'hi ' + name\n")
    (project / "logo.bin").write_bytes(ORIGINAL_BIN)
    (project / "logo.bin").chmod(0o751)
    (project / "src").mkdir()
    return project


def greet_plan(proj: Path, plan_id: str = "p1", **fields) -> dict:
    return make_plan(plan_id, context={"objective": "t", "project": str(proj)}, steps=[
        {"id": 1, "prompt": "helper", "file_output": "greet.py", "validation": {"type": "syntax_check"}},
        {"id": 2, "prompt": "logo", "file_output": "logo.bin"},
        {"id": 3, "prompt": "docs", "file_output": "docs/new/greet.txt"},
        {"id": 4, "prompt": "src", "file_output": "src/made.txt"}], **fields)


def run_greet(capsys, db, fake_llm, state_dir, *extra: str) -> tuple[int, str, str]:
    for reply in (HELPER, "logo as text", "greet(name) greets.", "made\n"):
        fake_llm.enqueue(reply)
    return run_bridge(capsys, db, fake_llm, state_dir, *extra)


@pytest.fixture
def ran(capsys, db, fake_llm, state_dir, proj) -> dict:
    """Plan p1 has run once and completed; returns the project's snapshot before it."""
    before = snapshot(proj)
    insert_plan(db, greet_plan(proj))
    rc, out, err = run_greet(capsys, db, fake_llm, state_dir)
    assert rc == 0, err
    return before


def diff_json(capsys, db, fake_llm, state_dir, *extra: str) -> dict:
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--diff", "p1", "--json", *extra)
    assert rc == 0, err
    return json.loads(out)


# --------------------------------------------------------------------------------------
# --diff
# --------------------------------------------------------------------------------------


def test_diff_shows_every_file_the_run_changed_as_a_unified_diff(capsys, db, fake_llm, state_dir, proj, ran):
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--diff", "p1")

    assert rc == 0, err
    run_id = plan_state(db, "p1")["run_id"]
    assert out.startswith(f"run {run_id} of plan p1 · project {proj} · 4 file(s)")
    assert "=== greet.py: modified · as the run left it\n--- a/greet.py\n+++ b/greet.py\n" in out
    assert "-    return 'hi ' + name\n+    return f'Hello, {name}!'\n" in out
    assert "Binary files a/logo.bin and b/logo.bin differ" in out
    assert "=== docs/new/greet.txt: created · as the run left it\n--- /dev/null\n+++ b/docs/new/greet.txt\n" in out
    assert "+greet(name) greets.\n\\ No newline at end of file\n" in out
    assert str(proj) not in out.split("\n", 1)[1]          # paths relative to the project


def test_diff_json_gives_files_actions_and_hashes(capsys, db, fake_llm, state_dir, proj, ran):
    doc = diff_json(capsys, db, fake_llm, state_dir)

    assert doc["plan_id"] == "p1" and doc["run_id"] == plan_state(db, "p1")["run_id"]
    files = {f["path"]: f for f in doc["files"]}
    assert [f["path"] for f in doc["files"]] == ["greet.py", "logo.bin", "docs/new/greet.txt", "src/made.txt"]
    assert files["logo.bin"]["action"] == "modified"
    assert files["logo.bin"]["original_sha256"] == sha(ORIGINAL_BIN)
    assert files["logo.bin"]["written_sha256"] == sha(b"logo as text")
    assert files["docs/new/greet.txt"]["action"] == "created"
    assert files["docs/new/greet.txt"]["original_sha256"] is None
    for entry in doc["files"]:
        assert entry["current_sha256"] == entry["written_sha256"] == sha((proj / entry["path"]).read_bytes())
        assert entry["changed_since_run"] is False


def test_diff_marks_a_file_changed_since_the_run(capsys, db, fake_llm, state_dir, proj, ran):
    (proj / "greet.py").write_text("edited by hand\n")
    (proj / "src" / "made.txt").unlink()

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--diff", "p1")
    assert "=== greet.py: modified · changed since the run" in out
    assert "+edited by hand" in out
    assert "=== src/made.txt: created · missing now" in out
    assert "=== logo.bin: modified · as the run left it" in out

    files = {f["path"]: f for f in diff_json(capsys, db, fake_llm, state_dir)["files"]}
    assert files["greet.py"]["changed_since_run"] is True
    assert files["greet.py"]["current_sha256"] == sha(b"edited by hand\n")
    assert files["src/made.txt"]["current_sha256"] is None and files["src/made.txt"]["changed_since_run"]
    assert files["logo.bin"]["changed_since_run"] is False


def test_diff_of_an_earlier_run_with_run(capsys, db, fake_llm, state_dir, proj, ran):
    first = plan_state(db, "p1")["run_id"]
    rc, out, err = run_greet(capsys, db, fake_llm, state_dir, "--plan", "p1", "--rerun")
    assert rc == 0, err
    assert plan_state(db, "p1")["run_id"] != first

    doc = diff_json(capsys, db, fake_llm, state_dir, "--run", first)

    assert doc["run_id"] == first
    files = {f["path"]: f for f in doc["files"]}
    assert files["logo.bin"]["original_sha256"] == sha(ORIGINAL_BIN)
    # the rerun wrote the same bytes, so nothing changed since the first run either
    assert not any(f["changed_since_run"] for f in doc["files"])


# --------------------------------------------------------------------------------------
# run ids are checked: from --run and from the store alike
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["../../etc", "20261204T192316Z-1a2b3c4d/../x", "latest", "",
                                    "20261204T192316Z-1A2B3C4D", "/tmp"])
def test_a_malformed_run_id_is_refused(capsys, db, fake_llm, state_dir, proj, ran, run_id):
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--diff", "p1", "--run", run_id)
    assert rc == 2
    assert out == ""
    assert "is not a bridge run id" in err and err.count("\n") <= 2


def test_a_run_id_from_the_store_is_checked_like_one_from_the_flag(capsys, db, fake_llm, state_dir, proj, ran):
    """A poisoned plan state pointing its run id out of the runs folder is refused."""
    set_plan_state(db, "p1", run_id="../../../" + str(proj))
    before = snapshot(proj)

    for action in ("--diff", "--undo"):
        rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, action, "p1")
        assert rc == 2 and "is not a bridge run id" in err
    assert snapshot(proj) == before


def test_a_run_id_that_is_a_symlink_or_missing_is_refused(capsys, db, fake_llm, state_dir, proj, ran, tmp_path):
    real = plan_state(db, "p1")["run_id"]
    fake_id = "20200101T000000Z-00000000"
    (state_dir / "runs" / fake_id).symlink_to(state_dir / "runs" / real)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1", "--run", fake_id)
    assert rc == 2 and "is not a folder" in err
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1", "--run", "20200101T000000Z-11111111")
    assert rc == 2 and "no run 20200101T000000Z-11111111" in err
    assert (proj / "greet.py").read_text().startswith("def greet(name):\n    return f'Hello")


def test_a_run_of_another_plan_is_refused(capsys, db, fake_llm, state_dir, proj, ran):
    insert_plan(db, make_plan("other"))
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "other", "--run",
                              plan_state(db, "p1")["run_id"])
    assert rc == 2 and "is a run of plan 'p1', not 'other'" in err
    assert (proj / "logo.bin").read_bytes() == b"logo as text"


def test_a_journal_path_leaving_the_project_is_refused(capsys, db, fake_llm, state_dir, proj, ran, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    journal = state_dir / "runs" / plan_state(db, "p1")["run_id"] / "journal.jsonl"
    with open(journal, "a") as handle:
        handle.write(json.dumps({"step": 9, "path": "../victim.txt", "action": "created", "backup": "",
                                 "mode": None, "created_dirs": []}) + "\n")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1", "--force")

    assert rc == 1 and "climbs out" in err
    assert victim.read_text() == "keep me\n"
    assert (proj / "logo.bin").read_bytes() == b"logo as text"     # nothing was undone


def test_a_journal_naming_another_runs_backup_is_refused(capsys, db, fake_llm, state_dir, proj, ran):
    """--diff takes a journal's backups only from that run's own backups folder
    (journalled_paths, as a take-over does): another run's copy is not this run's original."""
    other = state_dir / "runs" / "20260101T000000Z-0000000a" / "backups"
    other.mkdir(parents=True)
    (other / "0000-greet.py").write_text("another run's original\n")
    journal = state_dir / "runs" / plan_state(db, "p1")["run_id"] / "journal.jsonl"
    with open(journal, "a") as handle:
        handle.write(json.dumps({"step": 9, "path": "greet.py", "action": "modified",
                                 "backup": str(other / "0000-greet.py"), "mode": 0o644,
                                 "created_dirs": []}) + "\n")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--diff", "p1")

    assert rc == 1 and "is not in" in err, err
    assert "another run's original" not in out


# --------------------------------------------------------------------------------------
# --undo
# --------------------------------------------------------------------------------------


def test_undo_puts_back_every_file_byte_for_byte_with_its_mode(capsys, db, fake_llm, state_dir, proj, ran):
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1")

    assert rc == 0, err
    run_id = plan_state(db, "p1")["run_id"]
    assert out.startswith(f"undid run {run_id} of plan p1: 4 file(s) put back\n")
    assert "  docs/new/greet.txt: removed (the run created it)" in out
    assert "  logo.bin: restored" in out
    assert snapshot(proj) == ran                    # bytes, modes, no docs/ folder, src/ kept
    assert mode_of(proj / "logo.bin") == 0o751
    check_store(db)


def test_undo_is_recorded_and_shown_and_a_second_undo_is_a_no_op(capsys, db, fake_llm, state_dir, proj, ran):
    run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1")
    state = plan_state(db, "p1")
    assert state["undone_run"] == state["run_id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", state["undone_at"])
    assert state["status"] == "completed"

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "p1")
    assert f"undone at {state['undone_at']}" in out
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "p1", "--json")
    assert json.loads(out)["undone_at"] == state["undone_at"]
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--diff", "p1")
    assert f"undone at {state['undone_at']}" in out.splitlines()[0]

    (proj / "greet.py").write_text("the user's new work\n")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1")
    assert rc == 0, err
    assert f"was undone at {state['undone_at']}: nothing to undo" in out
    assert (proj / "greet.py").read_text() == "the user's new work\n"
    check_store(db)


def test_undo_refuses_naming_each_file_changed_after_the_run(capsys, db, fake_llm, state_dir, proj, ran):
    (proj / "greet.py").write_text("edited by hand\n")
    (proj / "docs" / "new" / "greet.txt").write_text("me too\n")
    after_edit = snapshot(proj)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1")

    assert rc == 2
    assert "2 file(s) changed after the run: greet.py, docs/new/greet.txt" in err
    assert "--force" in err
    assert snapshot(proj) == after_edit
    assert "undone_at" not in plan_state(db, "p1")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1", "--force")
    assert rc == 0, err
    assert snapshot(proj) == ran


def test_undo_json(capsys, db, fake_llm, state_dir, proj, ran):
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1", "--json")
    doc = json.loads(out)
    assert rc == 0
    assert doc["run_id"] == plan_state(db, "p1")["run_id"] and doc["undone_at"] == plan_state(db, "p1")["undone_at"]
    assert sorted(doc["restored"]) == sorted(["greet.py", "logo.bin", "docs/new/greet.txt", "src/made.txt"])
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1", "--json")
    again = json.loads(out)
    assert rc == 0 and again["restored"] == [] and "was undone at" in again["nothing_to_do"]


def test_undo_of_a_run_that_reverted_itself_is_a_no_op(capsys, db, fake_llm, state_dir, proj):
    before = snapshot(proj)
    insert_plan(db, make_plan("p1", context={"objective": "t", "project": str(proj)},
                              rollback_strategy="revert_files",
                              steps=[{"id": 1, "prompt": "a", "file_output": "greet.py"},
                                     {"id": 2, "prompt": "b", "depends_on": [1], "max_retries": 0,
                                      "validation": {"type": "json"}}]))
    fake_llm.enqueue("new greet")
    fake_llm.enqueue("not json")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
    assert rc == 1 and snapshot(proj) == before

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1")
    assert rc == 0, err
    assert "put its files back itself: nothing to undo" in out


def test_undo_of_a_failed_run_that_kept_its_files(capsys, db, fake_llm, state_dir, proj):
    before = snapshot(proj)
    insert_plan(db, make_plan("p1", context={"objective": "t", "project": str(proj)},
                              steps=[{"id": 1, "prompt": "a", "file_output": "greet.py"},
                                     {"id": 2, "prompt": "b", "max_retries": 0, "validation": {"type": "json"}}]))
    fake_llm.enqueue("new greet")
    fake_llm.enqueue("not json")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
    assert rc == 1 and (proj / "greet.py").read_text() == "new greet"

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1")
    assert rc == 0, err
    assert snapshot(proj) == before


def test_undo_refuses_a_plan_in_progress_or_stale(capsys, db, fake_llm, state_dir, proj, ran):
    set_plan_state(db, "p1", status="in_progress", result_hash=None,   # as a claim leaves it
                   owner={"host": socket.gethostname(), "pid": dead_pid()})

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1")

    assert rc == 2 and "is stale" in err and "--resume" in err
    assert (proj / "logo.bin").read_bytes() == b"logo as text"


def test_undo_of_a_plan_that_never_ran(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1"))
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1")
    assert rc == 2 and "has not run yet" in err and "bridge --plan p1" in err


# --------------------------------------------------------------------------------------
# backups kept, private, pruned; --health shows their space
# --------------------------------------------------------------------------------------


def test_backups_are_kept_private_after_a_successful_run(db, state_dir, ran):
    run_dir = state_dir / "runs" / plan_state(db, "p1")["run_id"]
    backups = list((run_dir / "backups").iterdir())
    assert len(backups) == 2                                     # greet.py and logo.bin
    assert {b.read_bytes() for b in backups} >= {ORIGINAL_BIN}
    assert all(mode_of(b) == 0o600 for b in backups)
    assert mode_of(run_dir) == 0o700 and mode_of(run_dir / "backups") == 0o700


@pytest.mark.parametrize("how", ["flag", "env"])
def test_only_the_last_n_runs_of_a_plan_keep_their_backups(capsys, db, fake_llm, state_dir, proj, how):
    insert_plan(db, greet_plan(proj))
    insert_plan(db, greet_plan(proj, "other"))
    keep = ["--keep-runs", "2"] if how == "flag" else []
    environ = {"BRIDGE_KEEP_RUNS": "2"} if how == "env" else {}
    runs = []
    for n in range(3):
        extra = ["--plan", "p1"] + (["--rerun"] if n else [])
        for reply in (HELPER, f"logo {n}", "greet(name) greets.", "made\n"):
            fake_llm.enqueue(reply)
        rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, *extra, *keep), environ=environ)
        assert rc == 0, capsys.readouterr().err
        runs.append(plan_state(db, "p1")["run_id"])
    other_runs = sorted(p.name for p in (state_dir / "runs").iterdir() if p.name not in runs)
    assert other_runs == []                                     # "other" never ran

    kept = [r for r in runs if (state_dir / "runs" / r / "backups").is_dir()]
    assert kept == runs[1:]
    assert (state_dir / "runs" / runs[0] / "journal.jsonl").exists()    # its record stays
    capsys.readouterr()
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1", "--run", runs[0], "--force")
    assert rc == 2 and "no longer kept" in err and "logo.bin" in err and "--keep-runs" in err


def test_keep_runs_0_keeps_no_backups(capsys, db, fake_llm, state_dir, proj):
    insert_plan(db, greet_plan(proj))
    rc, out, err = run_greet(capsys, db, fake_llm, state_dir, "--keep-runs", "0")
    assert rc == 0, err
    assert list(state_dir.rglob("backups")) == []


def test_keep_runs_must_be_a_whole_number(capsys, db, fake_llm, state_dir):
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--keep-runs", "-1")
    assert rc == 2 and "--keep-runs" in err


def test_health_shows_the_space_backups_use(capsys, db, fake_llm, state_dir, ran):
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--health", "--json")
    backups = json.loads(out)["backups"]
    size = sum(p.stat().st_size for p in state_dir.rglob("backups/*"))
    assert backups["runs"] == 1 and backups["bytes"] == size > 0
    assert backups["keep_runs"] == bridge.DEFAULT_KEEP_RUNS
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--health")
    assert re.search(rf"^backups +{size:,} bytes in 1 run\(s\) under {re.escape(str(state_dir))}", out, re.M)


# --------------------------------------------------------------------------------------
# flags and documentation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, says", [
    (["--run", "20261204T192316Z-1a2b3c4d"], "--run RUN_ID goes with"),
    (["--force"], "--force goes with --undo"),
    (["--diff", "p1", "--undo", "p1"], "not allowed with"),
    (["--diff", "p1", "--dry-run"], "--dry-run goes with a run"),
    (["--undo", "p1", "--events"], "--events goes with a run"),
    (["--diff", "p1", "--force"], "--force goes with --undo"),
    (["--review", "--dry-run"], "--review goes with a run"),
    (["--review", "--plan", "p1", "--resume"], "--review goes with a run"),
    (["--review", "--list"], "--review goes with a run"),
    (["--apply", "p1", "--force"], "--force goes with --undo"),
    (["--apply", "p1", "--reject", "p1"], "not allowed with"),
])
def test_new_flags_out_of_place_are_usage_errors(capsys, db, fake_llm, state_dir, argv, says):
    with pytest.raises(SystemExit) as caught:
        bridge.main(argv + bridge_args(db, fake_llm.url, state_dir), environ={})
    assert caught.value.code == 2
    assert says in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# --review, --apply, --reject
# --------------------------------------------------------------------------------------


def review_plan(proj: Path) -> dict:
    """Step 1 rewrites greet.py; step 2 (LOAD greet.py) must see step 1's staged version."""
    return make_plan("p1", context={"objective": "t", "project": str(proj),
                                    "files_context": {"greet.py": "LOAD", "logo.bin": "REFERENCE"}}, steps=[
        {"id": 1, "prompt": "helper", "file_output": "greet.py", "validation": {"type": "syntax_check"}},
        {"id": 2, "prompt": "docs", "file_output": "docs/new/greet.txt", "depends_on": [1]}])


@pytest.fixture
def reviewed(capsys, db, fake_llm, state_dir, proj) -> dict:
    """Plan p1 ran with --review; returns the project's snapshot (untouched)."""
    before = snapshot(proj)
    insert_plan(db, review_plan(proj))
    fake_llm.enqueue(HELPER)
    fake_llm.enqueue("greet(name) greets.")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--review", "--json")
    assert rc == 0, err
    result = json.loads(out)["plans"][0]
    assert result["status"] == "awaiting_review" and result["success"] is True
    assert "staged greet.py (modified) for review" in err and "bridge --apply p1" in err
    return before


def test_review_writes_nothing_into_the_project_and_the_plan_waits(db, state_dir, proj, reviewed):
    assert snapshot(proj) == reviewed
    assert plan_state(db, "p1")["status"] == "awaiting_review"
    staged = state_dir / "runs" / plan_state(db, "p1")["run_id"] / "staged"
    assert (staged / "greet.py").read_text() == "def greet(name):\n    return f'Hello, {name}!'\n"
    assert mode_of(staged / "greet.py") == 0o600
    check_store(db)


def test_a_later_step_reads_the_staged_version_of_a_load_file(fake_llm, reviewed):
    second = fake_llm.chat_requests[1]["json"]["messages"][-1]["content"]
    assert "return f'Hello, {name}!'" in second
    assert "'hi ' + name" not in second


def test_diff_of_a_run_awaiting_review_shows_what_apply_would_change(capsys, db, fake_llm, state_dir, proj,
                                                                     reviewed):
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--diff", "p1")
    assert rc == 0, err
    assert "staged for review: what bridge --apply p1 would change" in out.splitlines()[0]
    assert "=== greet.py: would be modified\n--- a/greet.py\n+++ b/greet.py\n" in out
    assert "=== docs/new/greet.txt: would be created\n--- /dev/null\n" in out

    doc = diff_json(capsys, db, fake_llm, state_dir)
    assert doc["awaiting_review"] is True
    files = {f["path"]: f for f in doc["files"]}
    assert files["greet.py"]["original_sha256"] == sha((proj / "greet.py").read_bytes())
    assert files["greet.py"]["changed_since_run"] is False


def test_apply_writes_the_staged_files_and_undo_takes_them_back(capsys, db, fake_llm, state_dir, proj, reviewed):
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--apply", "p1")

    assert rc == 0, err
    assert "applied run" in out and "2 file(s) written" in out
    assert (proj / "greet.py").read_text() == "def greet(name):\n    return f'Hello, {name}!'\n"
    assert (proj / "docs" / "new" / "greet.txt").read_text() == "greet(name) greets."
    state = plan_state(db, "p1")
    assert state["status"] == "completed" and state["applied_at"]
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "p1")
    assert f"applied at {state['applied_at']}" in out
    doc = diff_json(capsys, db, fake_llm, state_dir)
    assert "awaiting_review" not in doc and len(doc["files"]) == 2

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1")
    assert rc == 0, err
    assert snapshot(proj) == reviewed
    check_store(db)


def test_apply_refuses_naming_files_replaced_or_read_that_changed(capsys, db, fake_llm, state_dir, proj, reviewed):
    (proj / "greet.py").write_text("edited meanwhile\n")
    after_edit = snapshot(proj)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--apply", "p1")

    assert rc == 2
    assert "1 file(s) changed since the run: greet.py (to be replaced; changed since the run)" in err
    assert snapshot(proj) == after_edit
    assert plan_state(db, "p1")["status"] == "awaiting_review"
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--diff", "p1")
    assert "=== greet.py: would be modified · changed since the run: --apply will refuse" in out


def test_apply_refuses_when_a_file_the_run_only_read_changed(capsys, db, fake_llm, state_dir, proj):
    insert_plan(db, make_plan("p1", context={"objective": "t", "project": str(proj),
                                             "files_context": {"logo.bin": "LOAD"}},
                              steps=[{"id": 1, "prompt": "x", "file_output": "out.txt"}]))
    (proj / "logo.bin").write_text("text now\n")
    fake_llm.enqueue("out")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--review")
    assert rc == 0, err
    (proj / "logo.bin").write_text("changed after the run\n")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--apply", "p1")

    assert rc == 2 and "logo.bin (read by the run; changed since)" in err
    assert not (proj / "out.txt").exists()


def test_reject_drops_the_staged_files(capsys, db, fake_llm, state_dir, proj, reviewed):
    run_id = plan_state(db, "p1")["run_id"]
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--reject", "p1")

    assert rc == 0, err
    assert "2 staged file(s) dropped, nothing written" in out
    assert snapshot(proj) == reviewed
    assert not (state_dir / "runs" / run_id / "staged").exists()
    state = plan_state(db, "p1")
    assert state["status"] == "cancelled" and state["rejected_at"]
    for action in ("--apply", "--reject"):
        rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, action, "p1")
        assert rc == 2 and "is cancelled, not awaiting review" in err
    check_store(db)


def test_a_plan_awaiting_review_says_how_to_leave_that_state(capsys, db, fake_llm, state_dir, proj, reviewed):
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--plan", "p1")
    assert rc == 2 and "awaiting review" in err and "bridge --apply p1" in err and "bridge --reject p1" in err
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1")
    assert rc == 2 and "bridge --reject p1" in err
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "p1")
    assert out.startswith("plan p1: awaiting_review") and "now: awaiting_review;" in out
    assert "file greet.py: modified" in out
    assert snapshot(proj) == reviewed


def test_a_failed_review_run_drops_its_staged_files(capsys, db, fake_llm, state_dir, proj):
    before = snapshot(proj)
    insert_plan(db, make_plan("p1", context={"objective": "t", "project": str(proj)},
                              steps=[{"id": 1, "prompt": "a", "file_output": "greet.py"},
                                     {"id": 2, "prompt": "b", "max_retries": 0, "validation": {"type": "json"}}]))
    fake_llm.enqueue("new greet")
    fake_llm.enqueue("not json")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--review")

    assert rc == 1
    assert plan_state(db, "p1")["status"] == "failed"
    assert snapshot(proj) == before
    assert not (state_dir / "runs" / plan_state(db, "p1")["run_id"] / "staged").exists()


def test_a_staged_path_leaving_the_project_is_refused(capsys, db, fake_llm, state_dir, proj, reviewed, tmp_path):
    run_dir = state_dir / "runs" / plan_state(db, "p1")["run_id"]
    with open(run_dir / "staged.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 1, "path": "../victim.txt", "action": "created", "sha256": "0",
                                 "base_sha256": None}) + "\n")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--apply", "p1")

    assert rc == 1 and "climbs out" in err
    assert not (tmp_path / "victim.txt").exists() and snapshot(proj) == reviewed


def test_undo_of_a_resumed_run_puts_back_what_the_killed_run_wrote_too(capsys, db, project, fake_llm, state_dir):
    """Run A is killed after step 1 wrote keep.txt; resume B adopts it and completes.
    Undoing B puts back keep.txt (its original is in A's backups) and B's own files."""
    import test_crash as crash

    (project / "keep.txt").write_bytes(crash.ORIGINAL)          # as test_crash's proj fixture
    insert_plan(db, crash.crash_plan(project))
    crash.kill_during_step_two(db, fake_llm, state_dir)
    fake_llm.reset()
    fake_llm.enqueue(crash.STEP2_REPLY)
    fake_llm.enqueue(crash.STEP3_REPLY)
    rc, result, err = crash.resume(capsys, db, fake_llm, state_dir)
    assert rc == 0 and result["status"] == "completed", err
    crash.assert_final_files(project)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", crash.PLAN_ID)

    assert rc == 0, err
    crash.assert_untouched(project)


def test_a_bridge_killed_during_apply_leaves_a_stale_plan_that_resume_completes(
        capsys, db, fake_llm, state_dir, proj, reviewed):
    """SIGKILL while --apply writes (hook `journal`, at its first file): the plan is stale;
    --resume puts back what the apply had begun and runs the steps again, writing for real."""
    import signal
    import subprocess
    import sys

    from fakes import child_env
    proc = subprocess.run([sys.executable, str(ROOT / "bridge.py"), *bridge_args(db, fake_llm.url, state_dir),
                           "--apply", "p1"], env=child_env(BRIDGE_CRASH_AT="journal"), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--all", "--json")
    assert [p["status"] for p in json.loads(out)["plans"]] == ["stale"]

    fake_llm.reset()
    fake_llm.enqueue(HELPER)
    fake_llm.enqueue("greet(name) greets.")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--plan", "p1", "--resume")

    assert rc == 0, err
    assert "staged its files for review; starting its steps over" in err
    assert len(fake_llm.chat_requests) == 2
    assert (proj / "greet.py").read_text() == "def greet(name):\n    return f'Hello, {name}!'\n"
    assert (proj / "docs" / "new" / "greet.txt").read_text() == "greet(name) greets."
    assert plan_state(db, "p1")["status"] == "completed"
    check_store(db)


def test_review_rerun_of_a_stale_plan_puts_back_the_dead_runs_files_first(capsys, db, project, fake_llm, state_dir):
    import test_crash as crash

    (project / "keep.txt").write_bytes(crash.ORIGINAL)
    insert_plan(db, crash.crash_plan(project))
    crash.kill_during_step_two(db, fake_llm, state_dir)
    assert (project / "keep.txt").read_bytes() == crash.STEP1_BYTES
    fake_llm.reset()
    crash.enqueue_all(fake_llm)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--plan", crash.PLAN_ID, "--rerun", "--review")

    assert rc == 0, err
    crash.assert_untouched(project)                  # put back, and nothing new written
    assert plan_state(db, crash.PLAN_ID)["status"] == "awaiting_review"
