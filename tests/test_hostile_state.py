"""Issue 20 (hostile input, round 3), the state and trust rows, each with the attack as
the probe ran it (the real CLI in-process, the fake server on 127.0.0.1, a temporary
HOME) and variants of its class the table did not list:

| # | attack | before | after |
|---|---|---|---|
| 5 | forged state: plan X stale with `run_id` = a real run of plan Y in another project; `--resume` / `--rerun` | Y's journal replayed in X's project (X's files deleted and overwritten), Y's backups taken, `--undo Y` fails | not taken over (`run.json` names Y): refused as forged, X starts from scratch, no file of either touched, `--undo Y` works, `--show X` says forged |
| 6 | forged `in_progress` on another host, heartbeat in year 9999; a plan whose content says `in_progress` | `--plan`, `--rerun`, `--resume`, `--cancel` all exit 2, for ever | stale (heartbeat more than 180 s off, or none): `--cancel`, `--rerun`, `--resume` work |
| 13 | `trusted-projects.json` owned by another user, 0666, in a 0777 folder | honoured silently | exit 2, one line naming the file and the fix |
| 14 | approval of a project given as a symlink, re-pointed before the run | the approved plan wrote into the other folder | the approval pins the real path: the plan waits again, nothing written |
| 15 | `BRIDGE_TRUSTED_PROJECTS=.` | trust followed the folder bridge starts in | exit 2: relative entries refused |
| 19 | a forged result memory (`bridge-result`, `plan:ID`) for a plan that never ran | `--show ID` printed it as completed | not shown: "not recorded by bridge", exit 2 |
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path

import pytest

import bridge
from fakes import (
    check_store, dead_pid, insert_memory, insert_plan, make_plan, plan_row, plan_state, run_bridge,
    run_json, snapshot, stored_results, trust_project,
)


def one_file(project: Path, plan_id: str, rel: str = "notes.md", **fields) -> dict:
    return make_plan(plan_id, [{"id": 1, "prompt": f"write {rel}", "file_output": rel,
                                "max_retries": 0}],
                     context={"objective": "write", "project": str(project)}, **fields)


def forge_state(db: Path, plan_id: str, **state) -> None:
    """Write plan_id's row of bridge_plan_state behind bridge's back (the table exists)."""
    row = plan_row(db, plan_id)
    owner = state.pop("owner", {}) or {}
    values = {"status": "in_progress", "plan_id": plan_id, "owner_host": owner.get("host"),
              "owner_pid": owner.get("pid"), "updated_at": "2026-01-01T00:00:00Z", **state}
    conn = sqlite3.connect(db)
    with conn:
        names = ", ".join(values)
        conn.execute(f"INSERT OR REPLACE INTO bridge_plan_state (content_hash, {names}) "
                     f"VALUES (?, {', '.join('?' for _ in values)})", (row["content_hash"],
                                                                       *values.values()))
    conn.close()


def iso(offset_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + offset_s))


# --------------------------------------------------------------------------------------
# Row 5: a forged state naming another plan's run
# --------------------------------------------------------------------------------------

@pytest.fixture
def ran_y(capsys, db, tmp_path, fake_llm, state_dir):
    """Plan Y ran in project A: created src/app.py, modified settings.py (backups kept).
    Project B holds plan X's own src/app.py and settings.py. Returns (A, B, Y's run id)."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        (folder / "src").mkdir(parents=True)
        trust_project(folder)
    (a / "settings.py").write_text("A = 'original'\n")
    insert_plan(db, make_plan("Y", [
        {"id": 1, "prompt": "app", "file_output": "src/app.py"},
        {"id": 2, "prompt": "settings", "file_output": "settings.py"}],
        context={"objective": "y", "project": str(a)}))
    fake_llm.default_reply = "Y = 'wrote this'"
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--plan", "Y")
    assert rc == 0, err
    (b / "src" / "app.py").write_text("B = 'app, not in any journal'\n")
    (b / "settings.py").write_text("B = 'settings'\n")
    return a, b, plan_state(db, "Y")["run_id"]


@pytest.mark.parametrize("flag", ["--resume", "--rerun"])
def test_row5_a_forged_state_cannot_replay_another_plans_run(capsys, db, fake_llm, state_dir,
        ran_y, flag):
    a, b, y_run = ran_y
    insert_plan(db, one_file(b, "X"))
    forge_state(db, "X", run_id=y_run, claimed_at=iso(-3600), heartbeat_at=iso(-3600),
                owner={"host": socket.gethostname(), "pid": dead_pid()})
    y_folder = state_dir / "runs" / y_run
    before_y, before_a = snapshot(y_folder), snapshot(a)
    before_b = {p: (b / p).read_bytes() for p in ("src/app.py", "settings.py")}

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--plan", "X", flag,
                               require_output=True)

    assert rc == 0, err
    assert {p: (b / p).read_bytes() for p in before_b} == before_b          # X's files untouched
    assert (b / "notes.md").exists()                                        # X ran from scratch
    # Y's run and files untouched
    assert snapshot(y_folder) == before_y and snapshot(a) == before_a
    assert "resumed_from" not in result
    assert any("forged" in r for r in result["refused"]), result["refused"]
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "Y")
    assert rc == 0, err
    assert (a / "settings.py").read_text() == "A = 'original'\n"
    assert not (a / "src" / "app.py").exists()
    check_store(db)


def test_row5_show_says_the_state_is_forged_and_how_to_leave(capsys, db, fake_llm, state_dir,
                                                             ran_y):
    a, b, y_run = ran_y
    insert_plan(db, one_file(b, "X"))
    forge_state(db, "X", run_id=y_run, claimed_at=iso(-3600), heartbeat_at=iso(-3600),
                owner={"host": socket.gethostname(), "pid": dead_pid()})
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "X")
    assert rc == 2 and "forged" in err, err
    assert "bridge --plan X --rerun" in err and "bridge --cancel X" in err, err
    assert run_bridge(capsys, db, fake_llm, state_dir, "--cancel", "X")[0] == 0
    assert plan_state(db, "X")["status"] == "cancelled"


def test_row5_variant_a_run_of_the_same_id_with_other_content(capsys, db, fake_llm, state_dir,
        ran_y):
    """X replaced (--replace) by new content whose forged state points at the old X's run in
    the same project: another content hash, so not taken over."""
    a, b, _ = ran_y
    insert_plan(db, one_file(b, "X", rel="settings.py"))
    fake_llm.default_reply = "X = 'v1'"
    assert run_bridge(capsys, db, fake_llm, state_dir, "--plan", "X")[0] == 0
    old_run = plan_state(db, "X")["run_id"]
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE memories SET deleted_at = 1 WHERE content_hash = ?",
                     (plan_row(db, "X")["content_hash"],))
    conn.close()
    insert_plan(db, one_file(b, "X", rel="other.md", **{"x-title": "v2"}))
    v2 = [r for r in _plan_rows(db, "X") if r["deleted_at"] is None][0]
    _forge_row(db, v2["content_hash"], "X", run_id=old_run, heartbeat_at=iso(-3600),
               owner_host=socket.gethostname(), owner_pid=dead_pid())
    before = (b / "settings.py").read_bytes()

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--plan", "X", "--rerun",
                               require_output=True)

    assert rc == 0, err
    # the old run's file is not put back
    assert (b / "settings.py").read_bytes() == before
    assert any("not of this plan" in r for r in result["refused"]), result["refused"]


def _plan_rows(db: Path, plan_id: str) -> list[dict]:
    from fakes import plan_rows
    return plan_rows(db, plan_id)


def _forge_row(db: Path, digest: str, plan_id: str, **columns) -> None:
    values = {"status": "in_progress", "plan_id": plan_id, "updated_at": "x", **columns}
    conn = sqlite3.connect(db)
    with conn:
        names = ", ".join(values)
        conn.execute(f"INSERT OR REPLACE INTO bridge_plan_state (content_hash, {names}) "
                     f"VALUES (?, {', '.join('?' for _ in values)})", (digest, *values.values()))
    conn.close()


# --------------------------------------------------------------------------------------
# Row 6: no state makes a plan impossible to leave
# --------------------------------------------------------------------------------------

FOREVER = {"status": "in_progress", "run_id": None, "claimed_at": "9999-12-31T23:59:59Z",
           "heartbeat_at": "9999-12-31T23:59:59Z", "owner": {"host": "another-host", "pid": 1}}
HEARTBEATS = {
    "year 9999 (the row)": "9999-12-31T23:59:59Z",
    "an hour ahead": iso(3600),
    "not a time": "soon",
    "no zone": "2026-01-01T00:00:00",
    "an offset past year 1": "0001-01-01T00:00:00+23:59",
    "none": None,
}


@pytest.mark.parametrize("beat", sorted(HEARTBEATS))
@pytest.mark.parametrize("action", [("--cancel",), ("--rerun",), ("--resume",)])
def test_row6_a_forged_in_progress_state_can_be_left(capsys, db, fake_llm, state_dir, beat, action):
    insert_plan(db, make_plan("stuck"), metadata={"bridge": {**FOREVER,
                                                             "heartbeat_at": HEARTBEATS[beat]}})
    fake_llm.default_reply = "hi"
    args = ("--cancel", "stuck") if action == ("--cancel",) else ("--plan", "stuck", *action)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, *args)

    assert rc == 0, err
    assert "Traceback" not in err
    wanted = "cancelled" if action == ("--cancel",) else "completed"
    assert plan_state(db, "stuck")["status"] == wanted
    check_store(db)


@pytest.mark.parametrize("content_status", ["in_progress"])       # the schema's only unfinished one
@pytest.mark.parametrize("action", ["--cancel", "--rerun", "--resume"])
def test_row6_a_plans_own_status_does_not_block(capsys, db, fake_llm, state_dir, content_status,
        action):
    insert_plan(db, {**make_plan("own"), "status": content_status})
    fake_llm.default_reply = "hi"
    args = ("--cancel", "own") if action == "--cancel" else ("--plan", "own", action)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, *args)

    assert rc == 0, err
    assert plan_state(db, "own")["status"] == ("cancelled" if action == "--cancel" else "completed")


def test_row6_a_live_heartbeat_on_another_host_still_counts(capsys, db, fake_llm, state_dir):
    """Within the window (a minute ahead: clocks differ) it is another bridge's run."""
    insert_plan(db, make_plan("live"), metadata={"bridge": {**FOREVER, "heartbeat_at": iso(60)}})
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--cancel", "live")
    assert rc == 2 and "in_progress" in err, err
    assert fake_llm.chat_requests == []


# --------------------------------------------------------------------------------------
# Row 13: trust files someone else could have written
# --------------------------------------------------------------------------------------

def config_dir() -> Path:
    return Path(os.environ["HOME"]) / ".config" / "bridge"


@pytest.fixture
def trusted_by_file(db, tmp_path) -> Path:
    project = tmp_path / "p"
    project.mkdir()
    trust_project(project)
    insert_plan(db, one_file(project, "p1"))
    return project


def _other_uid() -> int:
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    return 54321


def assert_refused_config(capsys, db, fake_llm, state_dir, project: Path, name: str,
                          fix: str) -> None:
    fake_llm.default_reply = "x"
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("bridge: error:")]
    assert len(errors) == 1 and name in errors[0], err
    assert fix in err, err
    assert fake_llm.chat_requests == []
    assert not (project / "notes.md").exists()


def test_row13_a_trust_file_of_another_user_writable_by_all_in_an_open_folder(
        capsys, db, fake_llm, state_dir, trusted_by_file):
    path = config_dir() / bridge.TRUST_FILENAME
    os.chown(path, _other_uid(), -1)
    path.chmod(0o666)
    config_dir().chmod(0o777)
    assert_refused_config(capsys, db, fake_llm, state_dir, trusted_by_file,
                          "owned by another user", "chown")


@pytest.mark.parametrize("what,mode,fix", [
    ("file", 0o666, "chmod 600"), ("file", 0o620, "chmod 600"),
    ("folder", 0o777, "chmod 700"), ("folder", 0o770, "chmod 700")])
def test_row13_variants_writable_by_others(capsys, db, fake_llm, state_dir, trusted_by_file, what,
        mode, fix):
    target = config_dir() / bridge.TRUST_FILENAME if what == "file" else config_dir()
    target.chmod(mode)
    assert_refused_config(capsys, db, fake_llm, state_dir, trusted_by_file,
                          "writable by other users", fix)


def test_row13_variant_a_folder_of_another_user(capsys, db, fake_llm, state_dir, trusted_by_file):
    os.chown(config_dir(), _other_uid(), -1)
    assert_refused_config(capsys, db, fake_llm, state_dir, trusted_by_file,
                          "owned by another user", "chown")


def test_row13_variant_a_trust_file_linked_to_a_file_anyone_writes(capsys, db, fake_llm, state_dir,
                                                                   trusted_by_file, tmp_path):
    path = config_dir() / bridge.TRUST_FILENAME
    shared = tmp_path / "shared.json"
    shared.write_text(path.read_text())
    shared.chmod(0o666)
    path.unlink()
    path.symlink_to(shared)
    assert_refused_config(capsys, db, fake_llm, state_dir, trusted_by_file,
                          "writable by other users", "chmod 600")


def test_row13_variant_an_approvals_file_anyone_writes(capsys, db, fake_llm, state_dir, tmp_path):
    project = tmp_path / "untrusted"
    project.mkdir()
    insert_plan(db, one_file(project, "p1"))
    assert run_bridge(capsys, db, fake_llm, state_dir, "--approve", "p1")[0] == 0
    (config_dir() / bridge.APPROVALS_FILENAME).chmod(0o666)
    assert_refused_config(capsys, db, fake_llm, state_dir, project, "approvals.json", "chmod 600")


def test_row13_own_private_files_are_honoured(capsys, db, fake_llm, state_dir, trusted_by_file):
    fake_llm.default_reply = "x"
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, require_output=True)
    assert rc == 0, err
    assert (trusted_by_file / "notes.md").read_text() == "x"


# --------------------------------------------------------------------------------------
# Row 14: an approval pins the project's real path
# --------------------------------------------------------------------------------------

@pytest.fixture
def linked(tmp_path) -> tuple[Path, Path, Path]:
    real1, real2 = tmp_path / "real1", tmp_path / "real2"
    real1.mkdir()
    real2.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real1, target_is_directory=True)
    return link, real1, real2


def run_waiting(capsys, db, fake_llm, state_dir) -> tuple[int, dict, str]:
    fake_llm.default_reply = "written"
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--json")
    return rc, json.loads(out), err


def test_row14_an_approved_symlinked_project_re_pointed_waits_again(capsys, db, fake_llm,
        state_dir, linked):
    link, real1, real2 = linked
    insert_plan(db, one_file(link, "sym"))
    assert run_bridge(capsys, db, fake_llm, state_dir, "--approve", "sym")[0] == 0
    link.unlink()
    link.symlink_to(real2, target_is_directory=True)

    rc, doc, err = run_waiting(capsys, db, fake_llm, state_dir)

    assert rc == 0, err
    assert doc["plans"] == [] and [w["plan_id"] for w in doc["awaiting_approval"]] == ["sym"], doc
    assert not (real2 / "notes.md").exists() and not (real1 / "notes.md").exists()
    assert fake_llm.chat_requests == []


def test_row14_variant_the_approval_still_holds_while_the_link_is_unchanged(capsys, db, fake_llm,
                                                                            state_dir,
                                                                          linked):
    link, real1, _ = linked
    insert_plan(db, one_file(link, "sym"))
    assert run_bridge(capsys, db, fake_llm, state_dir, "--approve", "sym")[0] == 0
    rc, doc, err = run_waiting(capsys, db, fake_llm, state_dir)
    assert rc == 0 and doc["plans"][0]["status"] == "completed", err
    assert (real1 / "notes.md").read_text() == "written"


def test_row14_variant_an_approval_without_a_pinned_project_is_no_approval(capsys, db, fake_llm,
                                                                           state_dir,
                                                                         linked):
    """An approvals.json entry naming only the content hash (as written before issue 20,
    or by hand) approves nothing: approve again."""
    link, real1, _ = linked
    insert_plan(db, one_file(link, "sym"))
    bridge.write_config_file(config_dir() / bridge.APPROVALS_FILENAME, {"approvals": {
        "sym": {"content_hash": plan_row(db, "sym")["content_hash"], "approved_at": "x"}}})
    rc, doc, err = run_waiting(capsys, db, fake_llm, state_dir)
    assert rc == 0 and doc["awaiting_approval"], doc
    assert not (real1 / "notes.md").exists()


# --------------------------------------------------------------------------------------
# Row 15: relative trusted folders
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [".", "./", "src/..", "p", f"/nowhere{os.pathsep}."])
def test_row15_a_relative_trusted_folder_is_refused(capsys, db, fake_llm, state_dir, tmp_path,
                                                    monkeypatch,
                                                    value):
    project = tmp_path / "p"
    project.mkdir()
    insert_plan(db, one_file(project, "p1"))
    monkeypatch.chdir(project if value != "p" else tmp_path)
    fake_llm.default_reply = "x"

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir,
                              environ={"BRIDGE_TRUSTED_PROJECTS": value})

    assert rc == 2, err
    assert "BRIDGE_TRUSTED_PROJECTS" in err and "relative" in err and "absolute" in err, err
    assert not (project / "notes.md").exists()
    assert fake_llm.chat_requests == []


def test_row15_variant_a_relative_entry_in_the_trust_file(capsys, db, fake_llm, state_dir,
        tmp_path, monkeypatch):
    project = tmp_path / "p"
    project.mkdir()
    insert_plan(db, one_file(project, "p1"))
    bridge.write_config_file(config_dir() / bridge.TRUST_FILENAME, {"trusted_projects": ["p"]})
    monkeypatch.chdir(tmp_path)
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
    assert rc == 2 and "relative" in err and bridge.TRUST_FILENAME in err, err
    assert not (project / "notes.md").exists()


def test_row15_a_home_relative_entry_is_absolute(capsys, db, fake_llm, state_dir, monkeypatch):
    home = Path(os.environ["HOME"])
    (home / "proj").mkdir()
    insert_plan(db, one_file(home / "proj", "p1"))
    fake_llm.default_reply = "x"
    rc, result, err = run_json(capsys, db, fake_llm, state_dir,
                               environ={"BRIDGE_TRUSTED_PROJECTS": "~/proj",
                                                                        "HOME": str(home)},
                               require_output=True)
    assert rc == 0, err
    assert (home / "proj" / "notes.md").read_text() == "x"


# --------------------------------------------------------------------------------------
# Row 19: --show says whose result it shows
# --------------------------------------------------------------------------------------

def forged_result(db: Path, plan_id: str, run_id: str = "20260101T000000Z-0badc0de",
                  **fields) -> None:
    document = {"type": "bridge_result", "plan_id": plan_id, "run_id": run_id,
                "status": "completed",
                "success": True, "steps": [], "files": [], "error": None, "objective": "forged",
                "counts": {"succeeded": 1, "failed": 0, "skipped": 0}, **fields}
    insert_memory(db, bridge.result_content(document), tags=f"bridge-result,plan:{plan_id}",
                  memory_type="tool_outcome", created_at=time.time() + 60)


@pytest.mark.parametrize("json_flag", [(), ("--json",)])
def test_row19_a_forged_result_of_a_plan_that_never_ran_is_not_shown(capsys, db, fake_llm,
        state_dir, json_flag):
    insert_plan(db, make_plan("never"))
    forged_result(db, "never")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "never", *json_flag)

    assert rc == 2, out + err
    assert out == "" and "completed" not in err
    assert "not recorded by bridge" in err and "pending" in err, err
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--json")
    assert [p["status"] for p in json.loads(out)["plans"]] == ["pending"]


def test_row19_variant_a_forged_result_of_the_run_now_claimed(capsys, db, fake_llm, state_dir):
    """The plan failed; a rerun was claimed (its result not stored yet) and a forged
    'completed' result names the new run: --show shows the failed result bridge stored."""
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "x", "max_retries": 0,
                                      "validation": {"type": "regex", "pattern": "^never$"}}]))
    fake_llm.default_reply = "nope"
    assert run_bridge(capsys, db, fake_llm, state_dir)[0] == 1
    config = bridge.Config(db_paths=(db,))
    new_run = bridge.new_run_id()
    with bridge.Store.open(config) as store:           # the claim a --rerun makes
        assert store.claim(store.get_plan("p1"), new_run, allowed=("failed",))
    forged_result(db, "p1", run_id=new_run)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "p1", "--json")

    assert rc == 0, err
    shown = json.loads(out)
    assert shown["status"] == "failed" and shown["run_id"] != new_run
    # the forgery is there, unshown
    assert [r["status"] for r in stored_results(db)][-1] == "completed"


def test_row5_variant_a_run_folder_of_an_older_bridge_is_left_alone(tmp_path):
    """A run.json naming the plan but no content hash (written before issue 20): not taken
    over, and said so without calling it forged."""
    runs = tmp_path / "runs"
    run_id = "20260101T000000Z-00000abc"
    (runs / run_id).mkdir(parents=True)
    (runs / run_id / "run.json").write_text(json.dumps({"plan_id": "p1", "run_id": run_id,
                                                        "project": str(tmp_path)}))
    content = json.dumps(make_plan("p1", context={"objective": "o", "project": str(tmp_path)}))
    record = bridge.PlanRecord(1, content, json.loads(content), {}, 0)
    why = bridge.foreign_run_reason(runs, run_id, record)
    assert why is not None and "did not record" in why and "forged" not in why
    (runs / run_id / "run.json").write_text(json.dumps({
        "plan_id": "p1", "run_id": run_id, "project": str(tmp_path),
        "content_hash": record.content_hash}))
    assert bridge.foreign_run_reason(runs, run_id, record) is None


def test_row6_variant_a_forged_awaiting_review_with_no_run_can_be_cancelled(capsys, db, fake_llm,
                                                                           state_dir):
    """awaiting_review naming a run that staged nothing: --apply and --reject cannot find
    it; --cancel still leaves it, and --rerun runs it."""
    insert_plan(db, make_plan("review"), metadata={"bridge": {
        "status": "awaiting_review", "run_id": "20260101T000000Z-0000beef"}})
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--cancel", "review")
    assert rc == 0, err
    assert plan_state(db, "review")["status"] == "cancelled"


@pytest.mark.parametrize("action", [("--list", "--all"), ("--show", "deep"), ("--plan", "deep")])
def test_a_state_row_whose_extra_nests_past_json_is_read_as_no_extra(capsys, db, fake_llm,
                                                                     state_dir, action):
    """bridge_plan_state's extra column is anyone's to write: 100,000 levels of JSON in it
    are ignored (load_json), not a RecursionError that exits 70."""
    insert_plan(db, make_plan("deep"))
    fake_llm.default_reply = "hi"
    assert run_bridge(capsys, db, fake_llm, state_dir, "--plan", "deep")[0] == 0
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE bridge_plan_state SET extra = ?", ("[" * 100_000 + "]" * 100_000,))
    conn.close()

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, *action)

    assert rc in (0, 2), err
    assert "internal error" not in err and "Traceback" not in err
