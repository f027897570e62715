"""A new user's first hour (issue 24): what bridge does with a planner's typos, the errors
a user meets first, and whether what bridge prints is true. Each test is one numbered
finding of the issue; each failed on main before the change it covers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fakes import insert_plan, make_plan, plan_state, run_bridge, stored_results

import bridge

# Literals copied from the plan contract (bridge-plan-schema.json, README), never read at run time.
PLAN_SCHEMA = "bridge-plan-v1"


def _plan_file(tmp_path: Path, plan: dict, name: str = "plan.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(plan), encoding="utf-8")
    return path


def _typo_plan(project: Path) -> dict:
    """The issue's plan: projct (context), file_ouput, depend_on, on_failur (steps),
    rollback_stratgy (top level)."""
    return {"$schema": PLAN_SCHEMA, "id": "typos", "status": "pending",
            "rollback_stratgy": "revert_files",
            "context": {"objective": "typos", "projct": str(project)},
            "steps": [{"id": 1, "prompt": "write it", "file_ouput": "out.txt", "on_failur": "halt"},
                      {"id": 2, "prompt": "then this", "depend_on": [1]}]}


TYPO_PROBLEMS = [
    "$.rollback_stratgy: unknown key; did you mean 'rollback_strategy'?",
    "$.context.projct: unknown key; did you mean 'project'?",
    "$.steps[0].file_ouput: unknown key; did you mean 'file_output'?",
    "$.steps[0].on_failur: unknown key; did you mean 'on_failure'?",
    "$.steps[1].depend_on: unknown key; did you mean 'depends_on'?",
]


# -- 1. misspelt keys ----------------------------------------------------------------------


def test_validate_names_every_misspelt_key_with_its_path_and_the_closest_known_key(
        tmp_path, capsys):
    path = _plan_file(tmp_path, _typo_plan(tmp_path))
    rc = bridge.main(["--validate", str(path)], environ={})
    out, err = capsys.readouterr()
    assert rc == 1
    for problem in TYPO_PROBLEMS:
        assert problem in out + err


def test_submit_refuses_a_plan_with_a_misspelt_key_and_stores_nothing(tmp_path, db, capsys):
    path = _plan_file(tmp_path, _typo_plan(tmp_path))
    before = db.read_bytes()
    rc = bridge.main(["--db", str(db), "--submit", str(path)], environ={})
    out, err = capsys.readouterr()
    assert rc == 1
    assert TYPO_PROBLEMS[2] in out + err
    assert db.read_bytes() == before


def test_a_run_of_a_stored_plan_with_a_misspelt_key_sends_nothing_and_fails_saying_why(
        tmp_path, db, fake_llm, state_dir, capsys):
    insert_plan(db, _typo_plan(tmp_path))
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
    assert rc == 1
    assert not [r for r in fake_llm.requests if r["path"].endswith("/chat/completions")]
    assert plan_state(db, "typos")["status"] == "failed"
    problems = stored_results(db)[-1]["problems"]
    assert set(TYPO_PROBLEMS) <= set(problems)


def test_x_keys_are_the_planners_own_everywhere_and_stay_valid(tmp_path, capsys):
    mine = {"x-why": "the planner's note"}
    plan = make_plan(id="mine", steps=[
        {"id": 1, "prompt": "p", **mine,
         "validation": [{"type": "json", **mine}, {"type": "non_empty"}]}],
        defaults={"max_tokens": 50, **mine}, **mine)
    plan["context"] = {"objective": "o", **mine}
    rc = bridge.main(["--validate", str(_plan_file(tmp_path, plan))], environ={})
    out, err = capsys.readouterr()
    assert rc == 0, out + err


def test_an_unknown_key_with_no_close_match_lists_the_known_keys_and_the_x_prefix(tmp_path):
    plan = make_plan(id="far", steps=[{"id": 1, "prompt": "p", "zzzzzz": 1}])
    with pytest.raises(bridge.PlanInvalid) as info:
        bridge.check_plan(plan)
    (problem,) = info.value.problems
    assert problem.startswith("$.steps[0].zzzzzz: unknown key; known here: ")
    assert "depends_on" in problem and "x-" in problem


def test_the_known_keys_come_from_the_schema_so_a_key_added_there_is_known(monkeypatch):
    schema = json.loads(json.dumps(bridge.load_schema()))
    schema["$defs"]["step"]["properties"]["thinking"] = {"type": "boolean"}
    monkeypatch.setattr(bridge, "load_schema", lambda: schema)
    plan = make_plan(id="new", steps=[{"id": 1, "prompt": "p", "thinkin": True}])
    with pytest.raises(bridge.PlanInvalid) as info:
        bridge.check_plan(plan)
    assert info.value.problems == ["$.steps[0].thinkin: unknown key; did you mean 'thinking'?"]
    plan["steps"][0] = {"id": 1, "prompt": "p", "thinking": True}
    bridge.check_plan(plan)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "plans"


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_the_shipped_example_plans_have_no_unknown_key(name, tmp_path):
    plan = json.loads((EXAMPLES / name).read_text(encoding="utf-8"))
    if "project" in plan.get("context", {}):
        plan["context"]["project"] = str(tmp_path)
    try:
        bridge.check_plan(plan)
    except bridge.PlanInvalid as exc:
        assert not [p for p in exc.problems if "unknown key" in p], exc.problems


# -- 14. every problem at once ---------------------------------------------------------------


def test_validate_lists_an_unknown_dependency_and_a_cycle_at_once():
    plan = make_plan(id="both", steps=[
        {"id": 1, "prompt": "a", "depends_on": [2, 9]},
        {"id": 2, "prompt": "b", "depends_on": [1]}])
    with pytest.raises(bridge.PlanInvalid) as info:
        bridge.check_plan(plan)
    problems = info.value.problems
    assert "$.steps[0].depends_on: unknown step 9" in problems
    assert any(p.startswith("$.steps: dependency cycle") for p in problems), problems
