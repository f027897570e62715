"""What --show, --undo and errors say must be true (issue 19, round 2): no run log named
that was never made, no staged file shown as written after --reject, no undo recorded for
a run that changed no file, the --base-url the user gave named as the server (the
route only beside it); against the fake model server and real stores."""

from __future__ import annotations

import json

import bridge
from fakes import bridge_args, closed_port, insert_plan, make_plan, plan_state, run_bridge


def test_undo_of_a_run_that_changed_no_file_says_so_and_records_nothing(
        capsys, db, fake_llm, state_dir, project):
    insert_plan(db, make_plan("p1", context={"objective": "t", "project": str(project)},
                              steps=[{"id": 1, "prompt": "answer only"}]))
    fake_llm.enqueue("an answer, no file")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
    assert rc == 0, err

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1")
    assert rc == 0, err
    assert "changed no file: nothing to undo" in out
    assert "undone_at" not in plan_state(db, "p1")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "p1", "--json")
    doc = json.loads(out)
    assert rc == 0 and doc["restored"] == [] and doc["undone_at"] is None
    assert doc["nothing_to_do"] == "the run changed no file"
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "p1")
    assert "undone" not in out


def test_show_of_a_plan_invalid_before_it_ran_names_no_run_log(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1", steps=[{"id": 1, "prompt": "a", "depends_on": [7]}]))
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
    assert rc == 1 and "invalid" in err
    run_id = plan_state(db, "p1")["run_id"]
    assert not (state_dir / "runs" / run_id).exists()      # nothing ran: no run folder

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "p1")
    assert rc == 0, err
    assert "problem:" in out and "run log" not in out
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "p1", "--json")
    assert json.loads(out)["run_log"] is None


def test_show_after_reject_says_the_staged_files_were_not_written(
        capsys, db, fake_llm, state_dir, project):
    (project / "greet.py").write_text("old\n")
    insert_plan(db, make_plan("p1", context={"objective": "t", "project": str(project)},
                              steps=[{"id": 1, "prompt": "a", "file_output": "greet.py"},
                                     {"id": 2, "prompt": "b", "file_output": "new.txt"}]))
    fake_llm.enqueue("new greet")
    fake_llm.enqueue("new text")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--review")
    assert rc == 0, err
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--reject", "p1")
    assert rc == 0, err

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "p1")
    assert rc == 0, err
    files = [line.strip() for line in out.splitlines() if line.strip().startswith("file ")]
    assert files == ["file greet.py: modified (staged, dropped at --reject: not written)",
                     "file new.txt: created (staged, dropped at --reject: not written)"]
    assert not (project / "new.txt").exists()


def test_cannot_reach_names_the_base_url_the_user_gave(capsys, db, state_dir):
    insert_plan(db, make_plan("p1"))
    base = f"http://127.0.0.1:{closed_port()}/v1"
    for extra in ((), ("--health",)):
        rc = bridge.main(bridge_args(db, base, state_dir, "--retries", "0", *extra), environ={})
        out, err = capsys.readouterr()
        assert rc == 2
        assert f"cannot reach the model server at {base} (" in out + err
    assert plan_state(db, "p1") == {}           # not claimed: the server's failure stops first
