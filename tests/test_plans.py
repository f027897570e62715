"""The rooms "Plans" and "Path rules": check_plan, resolve_inside, and how main() treats invalid plans."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import bridge
from fakes import check_store, insert_plan, listing, make_plan, make_store, read_rows, result_document, run_bridge, state_of_row


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def problems_of(plan) -> list[str]:
    """The problems check_plan reports for plan (fails the test when it is accepted)."""
    with pytest.raises(bridge.PlanInvalid) as info:
        bridge.check_plan(plan)
    problems = info.value.problems
    assert problems, "PlanInvalid without problems"
    assert all(isinstance(p, str) and p.startswith("$") for p in problems), problems
    return problems


def with_project(project: Path, steps: list, **context) -> dict:
    return make_plan(steps=steps, context={"objective": "files", "project": str(project), **context})


@pytest.fixture
def outside(tmp_path) -> Path:
    """An existing folder beside the project, which no plan may reach."""
    p = tmp_path / "outside"
    p.mkdir()
    return p


# --------------------------------------------------------------------------------------
# valid plans and defaults
# --------------------------------------------------------------------------------------

def test_valid_plan_gets_the_documented_step_defaults():
    plan = bridge.check_plan(make_plan(id="defaults-1", steps=[{"id": 1, "prompt": "Say hi"}]))

    assert isinstance(plan, bridge.Plan)
    assert plan.id == "defaults-1"
    assert plan.objective == "test plan"
    assert plan.project is None
    assert plan.rollback_strategy == "none"
    step = plan.steps[1]
    assert step.prompt == "Say hi"
    assert step.max_retries == 2
    assert step.on_failure == "retry_with_context"
    assert step.validation == {"type": "non_empty"}
    assert step.depends_on == ()
    assert step.file_output is None
    assert (step.model, step.temperature, step.max_tokens, step.system, step.timeout_s) == (None,) * 5


def test_plan_defaults_flow_into_steps_and_step_values_override_them():
    defaults = {"model": "plan-model", "temperature": 0.3, "max_tokens": 111,
                "system": "plan system", "timeout_s": 7.5}
    overrides = {"model": "step-model", "temperature": 1.1, "max_tokens": 222,
                 "system": "step system", "timeout_s": 2}
    plan = bridge.check_plan(make_plan(defaults=defaults, steps=[
        {"id": 1, "prompt": "uses the plan defaults"},
        {"id": 2, "prompt": "overrides every one", **overrides},
        {"id": 3, "prompt": "overrides one", "temperature": 0},
    ]))

    s1, s2, s3 = plan.steps[1], plan.steps[2], plan.steps[3]
    assert (s1.model, s1.temperature, s1.max_tokens, s1.system, s1.timeout_s) == \
        ("plan-model", 0.3, 111, "plan system", 7.5)
    assert (s2.model, s2.temperature, s2.max_tokens, s2.system, s2.timeout_s) == \
        ("step-model", 1.1, 222, "step system", 2)
    # a falsy override (0) still wins over the plan default
    assert s3.temperature == 0
    assert (s3.model, s3.max_tokens, s3.system, s3.timeout_s) == ("plan-model", 111, "plan system", 7.5)


def test_explicit_step_fields_are_kept():
    plan = bridge.check_plan(make_plan(rollback_strategy="revert_files", steps=[
        {"id": 1, "prompt": "p", "title": "first", "max_retries": 0, "on_failure": "halt",
         "validation": {"type": "contains_keys", "keys": ["a"]}},
        {"id": 2, "prompt": "q", "depends_on": [1], "on_failure": "skip", "max_retries": 10},
    ]))

    assert plan.rollback_strategy == "revert_files"
    assert plan.steps[1].title == "first"
    assert plan.steps[1].max_retries == 0
    assert plan.steps[1].on_failure == "halt"
    assert plan.steps[1].validation == {"type": "contains_keys", "keys": ["a"]}
    assert plan.steps[2].depends_on == (1,)
    assert plan.steps[2].on_failure == "skip"
    assert plan.steps[2].max_retries == 10


def test_steps_listed_in_any_order_are_accepted():
    """A dependency on a later-listed step is fine (original defect 12)."""
    plan = bridge.check_plan(make_plan(steps=[
        {"id": 3, "prompt": "third", "depends_on": [2]},
        {"id": 1, "prompt": "first"},
        {"id": 2, "prompt": "second", "depends_on": [1]},
    ]))

    assert sorted(plan.steps) == [1, 2, 3]
    assert plan.steps[3].depends_on == (2,)
    assert plan.steps[2].depends_on == (1,)
    assert plan.steps[1].prompt == "first"


def test_missing_context_is_accepted_with_empty_objective():
    """context is optional in bridge-plan-v1: no crash, no project (original defect 11)."""
    raw = make_plan(id="no-context")
    del raw["context"]

    plan = bridge.check_plan(raw)

    assert plan.objective == ""
    assert plan.project is None
    assert plan.files_context == {}


# --------------------------------------------------------------------------------------
# dependency problems
# --------------------------------------------------------------------------------------

def test_duplicate_step_ids_are_invalid():
    problems = problems_of(make_plan(steps=[{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"},
                                            {"id": 2, "prompt": "c"}]))

    assert problems == ["$.steps: step id 1 is used more than once"]


def test_unknown_depends_on_is_invalid():
    """(original defect 12)"""
    problems = problems_of(make_plan(steps=[{"id": 1, "prompt": "a"},
                                            {"id": 2, "prompt": "b", "depends_on": [1, 9]}]))

    assert len(problems) == 1
    assert problems[0].startswith("$.steps[1].depends_on")
    assert "unknown step 9" in problems[0]


def test_self_dependency_is_invalid():
    problems = problems_of(make_plan(steps=[{"id": 1, "prompt": "a"},
                                            {"id": 2, "prompt": "b", "depends_on": [2]}]))

    assert len(problems) == 1
    assert problems[0].startswith("$.steps[1].depends_on")
    assert "itself" in problems[0]


def test_cycle_is_invalid_and_its_message_names_the_cycle():
    """(original defect 12)"""
    problems = problems_of(make_plan(steps=[
        {"id": 1, "prompt": "independent"},
        {"id": 2, "prompt": "b", "depends_on": [4]},
        {"id": 3, "prompt": "c", "depends_on": [2]},
        {"id": 4, "prompt": "d", "depends_on": [3]},
    ]))

    assert len(problems) == 1
    assert problems[0].startswith("$.steps")
    assert "cycle" in problems[0]
    named = [int(n) for n in re.findall(r"\d+", problems[0].split("cycle", 1)[1])]
    assert set(named) == {2, 3, 4}, problems[0]


def test_every_problem_is_listed_at_once():
    problems = problems_of(make_plan(steps=[
        {"id": 1, "prompt": "a", "depends_on": [7]},
        {"id": 2, "prompt": "b", "depends_on": [8]},
        {"id": 2, "prompt": "c"},
    ]))

    assert len(problems) >= 3
    text = "\n".join(problems)
    assert "unknown step 7" in text
    assert "unknown step 8" in text
    assert "step id 2 is used more than once" in text
    assert any(p.startswith("$.steps[0].depends_on") for p in problems)
    assert any(p.startswith("$.steps[1].depends_on") for p in problems)
    # the exception message carries them all too
    with pytest.raises(bridge.PlanInvalid) as info:
        bridge.check_plan(make_plan(id="many", steps=[
            {"id": 1, "prompt": "a", "depends_on": [7]}, {"id": 2, "prompt": "b", "depends_on": [8]},
            {"id": 2, "prompt": "c"}]))
    assert "many" in str(info.value)
    assert "7" in str(info.value) and "8" in str(info.value)


def test_plan_invalid_exits_with_plan_failed_code():
    assert bridge.PlanInvalid("x", ["$: bad"]).exit_code == 1
    assert issubclass(bridge.PlanInvalid, bridge.BridgeError)


# --------------------------------------------------------------------------------------
# schema problems: nulls, wrong shapes, validation objects
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["validation", "depends_on", "max_retries"])
def test_null_step_field_is_invalid_not_a_crash(field):
    """null validation / depends_on / max_retries: invalid with a JSON path, no crash (original defect 11)."""
    problems = problems_of(make_plan(steps=[{"id": 1, "prompt": "a", field: None}]))

    assert any(p.startswith(f"$.steps[0].{field}") for p in problems), problems


def test_all_null_fields_are_reported_together():
    """(original defect 11)"""
    problems = problems_of(make_plan(steps=[
        {"id": 1, "prompt": "a", "validation": None},
        {"id": 2, "prompt": "b", "depends_on": None, "max_retries": None},
    ]))

    paths = {p.split(":", 1)[0] for p in problems}
    assert {"$.steps[0].validation", "$.steps[1].depends_on", "$.steps[1].max_retries"} <= paths


@pytest.mark.parametrize("value", [[make_plan()], "a plan", 42, 4.5, None, True],
                         ids=["list", "string", "int", "float", "null", "bool"])
def test_non_object_plan_is_invalid_not_a_crash(value):
    """(original defect 11)"""
    problems = problems_of(value)

    assert len(problems) == 1
    assert problems[0].startswith("$:")
    assert "object" in problems[0]


def test_missing_steps_is_invalid():
    """(original defect 11)"""
    raw = make_plan()
    del raw["steps"]

    problems = problems_of(raw)

    assert any("steps" in p for p in problems), problems


def test_empty_steps_is_invalid():
    raw = make_plan()
    raw["steps"] = []

    problems = problems_of(raw)

    assert any(p.startswith("$.steps") for p in problems), problems


def test_missing_context_and_steps_is_invalid_for_steps_only():
    """(original defect 11)"""
    raw = {"$schema": "bridge-plan-v1", "id": "bare", "status": "pending"}

    problems = problems_of(raw)

    assert len(problems) == 1
    assert "steps" in problems[0]


def test_unknown_validation_type_is_invalid_never_passes():
    """(original defect 11)"""
    problems = problems_of(make_plan(steps=[{"id": 1, "prompt": "a",
                                             "validation": {"type": "looks_good"}}]))

    assert any(p.startswith("$.steps[0].validation") for p in problems), problems
    assert "looks_good" in "\n".join(problems)


def test_validation_without_type_is_invalid():
    problems = problems_of(make_plan(steps=[{"id": 1, "prompt": "a", "validation": {}}]))

    assert any(p.startswith("$.steps[0].validation") for p in problems), problems


def test_invalid_regex_pattern_is_invalid():
    problems = problems_of(make_plan(steps=[
        {"id": 1, "prompt": "a"},
        {"id": 2, "prompt": "b", "validation": {"type": "regex", "pattern": "([a-z"}}]))

    assert len(problems) == 1
    assert problems[0].startswith("$.steps[1].validation.pattern")
    assert "regular expression" in problems[0]


def test_valid_regex_pattern_is_accepted():
    plan = bridge.check_plan(make_plan(steps=[
        {"id": 1, "prompt": "a", "validation": {"type": "regex", "pattern": r"^def \w+\("}}]))

    assert plan.steps[1].validation == {"type": "regex", "pattern": r"^def \w+\("}


def test_invalid_json_schema_schema_is_invalid():
    problems = problems_of(make_plan(steps=[
        {"id": 1, "prompt": "a", "validation": {"type": "json_schema", "schema": {"type": 12}}}]))

    assert len(problems) == 1
    assert problems[0].startswith("$.steps[0].validation.schema")
    assert "JSON Schema" in problems[0]


def test_valid_json_schema_is_accepted():
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    plan = bridge.check_plan(make_plan(steps=[
        {"id": 1, "prompt": "a", "validation": {"type": "json_schema", "schema": schema}}]))

    assert plan.steps[1].validation["schema"] == schema


# --------------------------------------------------------------------------------------
# project and paths
# --------------------------------------------------------------------------------------

def test_project_that_does_not_exist_is_invalid(tmp_path):
    """A missing project folder is reported, not silently ignored (original defect 15)."""
    missing = tmp_path / "no-such-project"
    problems = problems_of(with_project(missing, [{"id": 1, "prompt": "a", "file_output": "out.py"}]))

    assert len(problems) == 1
    assert problems[0].startswith("$.context.project")
    assert "does not exist" in problems[0]
    assert not missing.exists()


def test_project_without_files_that_does_not_exist_is_invalid(tmp_path):
    """(original defect 15)"""
    problems = problems_of(with_project(tmp_path / "gone", [{"id": 1, "prompt": "a"}]))

    assert problems[0].startswith("$.context.project")


def test_existing_project_is_accepted(project):
    plan = bridge.check_plan(with_project(project, [{"id": 1, "prompt": "a", "file_output": "pkg/out.py"}],
                                          files_context={"README.md": "REFERENCE"}))

    assert plan.project == project
    assert plan.steps[1].file_output == "pkg/out.py"
    assert plan.files_context == {"README.md": "REFERENCE"}


def test_file_output_without_project_is_invalid():
    problems = problems_of(make_plan(steps=[{"id": 1, "prompt": "a", "file_output": "out.py"}]))

    assert len(problems) == 1
    assert problems[0].startswith("$.context.project")
    assert "required" in problems[0]


def test_files_context_without_project_is_invalid():
    problems = problems_of(make_plan(context={"objective": "x", "files_context": {"a.py": "REFERENCE"}}))

    assert len(problems) == 1
    assert problems[0].startswith("$.context.project")


def test_relative_project_is_invalid():
    problems = problems_of(make_plan(context={"project": "relative/dir"}))

    assert any(p.startswith("$.context.project") for p in problems), problems


@pytest.mark.parametrize("rel", ["/etc/passwd", "../escape.py", "pkg/../../escape.py", "C:\\x",
                                 "C:/x", "\\\\server\\share\\x", "..\\escape.py"],
                         ids=["posix-abs", "dotdot", "nested-dotdot", "win-abs", "win-abs-slash",
                              "unc", "win-dotdot"])
def test_file_output_leaving_the_project_is_invalid(project, outside, rel):
    """(original defect 18)"""
    problems = problems_of(with_project(project, [{"id": 1, "prompt": "a", "file_output": rel}]))

    assert len(problems) == 1
    assert problems[0].startswith("$.steps[0].file_output:")
    assert len(problems[0].split(":", 1)[1].strip()) > 10     # says why
    assert listing(outside) == []
    assert listing(project) == []


@pytest.mark.parametrize("rel", ["../x", "C:\\x", "/abs/x", "a/../../x"])
def test_files_context_key_leaving_the_project_is_invalid(project, rel):
    """(original defect 18)"""
    problems = problems_of(with_project(project, [{"id": 1, "prompt": "a"}],
                                        files_context={rel: "REFERENCE"}))

    assert len(problems) == 1
    assert problems[0].startswith("$.context.files_context")
    assert rel in problems[0] or repr(rel) in problems[0]


def test_symlink_folder_escaping_the_project_is_invalid_in_file_output(project, outside):
    """A symlink inside the project pointing outside cannot be written through (original defect 18)."""
    (project / "link").symlink_to(outside, target_is_directory=True)

    problems = problems_of(with_project(project, [{"id": 1, "prompt": "a", "file_output": "link/evil.py"}]))

    assert len(problems) == 1
    assert problems[0].startswith("$.steps[0].file_output")
    assert "symlink" in problems[0]
    assert listing(outside) == []


def test_symlink_escaping_the_project_is_invalid_in_files_context(project, outside):
    """(original defect 18)"""
    (outside / "secret.txt").write_text("secret")
    (project / "link").symlink_to(outside, target_is_directory=True)

    problems = problems_of(with_project(project, [{"id": 1, "prompt": "a"}],
                                        files_context={"link/secret.txt": "LOAD"}))

    assert len(problems) == 1
    assert problems[0].startswith("$.context.files_context")


def test_file_output_through_a_symlink_staying_inside_the_project_is_refused(project):
    """Writes go through real folders only (a symlink could be swapped mid-run), so
    --validate says so up front rather than the run failing."""
    (project / "real").mkdir()
    (project / "alias").symlink_to(project / "real", target_is_directory=True)

    problems = problems_of(with_project(project, [{"id": 1, "prompt": "a", "file_output": "alias/x.py"}]))

    assert len(problems) == 1
    assert problems[0].startswith("$.steps[0].file_output") and "symlink 'alias'" in problems[0]
    plan = bridge.check_plan(with_project(project, [{"id": 1, "prompt": "a", "file_output": "real/x.py"}]))
    assert plan.steps[1].file_output == "real/x.py"


def test_file_output_naming_a_folder_is_invalid(project):
    (project / "pkg").mkdir()

    problems = problems_of(with_project(project, [{"id": 1, "prompt": "a", "file_output": "pkg"}]))

    assert problems[0].startswith("$.steps[0].file_output")


def test_load_file_missing_and_written_by_no_step_is_invalid(project):
    problems = problems_of(with_project(project, [{"id": 1, "prompt": "a"}],
                                        files_context={"notes.md": "LOAD"}))

    assert len(problems) == 1
    assert problems[0].startswith("$.context.files_context")
    assert "notes.md" in problems[0]
    assert "LOAD" in problems[0]


def test_load_file_written_by_a_step_is_accepted(project):
    plan = bridge.check_plan(with_project(project, [
        {"id": 1, "prompt": "write notes", "file_output": "docs/notes.md"},
        {"id": 2, "prompt": "use notes", "depends_on": [1]}],
        files_context={"docs/notes.md": "LOAD"}))

    assert plan.files_context == {"docs/notes.md": "LOAD"}


def test_existing_load_file_and_missing_reference_file_are_accepted(project):
    (project / "main.py").write_text("print(1)\n")

    plan = bridge.check_plan(with_project(project, [{"id": 1, "prompt": "a"}],
                                          files_context={"main.py": "LOAD", "later.md": "REFERENCE"}))

    assert plan.files_context == {"main.py": "LOAD", "later.md": "REFERENCE"}


def test_path_problems_and_dependency_problems_are_listed_together(project):
    problems = problems_of(with_project(project, [
        {"id": 1, "prompt": "a", "file_output": "../out.py", "depends_on": [5]},
        {"id": 2, "prompt": "b", "file_output": "/abs.py"}]))

    paths = {p.split(":", 1)[0] for p in problems}
    assert {"$.steps[0].depends_on", "$.steps[0].file_output", "$.steps[1].file_output"} <= paths


# --------------------------------------------------------------------------------------
# resolve_inside
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("rel", ["a.py", "pkg/sub/deep/mod.py", "./pkg/x.txt", "new/folder/file"])
def test_resolve_inside_accepts_nested_relative_paths(project, rel):
    path = bridge.resolve_inside(project, rel)

    assert path == project / rel
    assert path.resolve().is_relative_to(project.resolve())


@pytest.mark.parametrize("rel", ["", "/etc/passwd", "../x", "a/../../x", "a/../b", "..", "C:\\x", "C:x",
                                 "C:/x", "\\\\server\\share\\x", "..\\x", "a\\..\\..\\x", "bad\x00name"],
                         ids=["empty", "posix-abs", "dotdot", "nested-dotdot", "inner-dotdot", "bare-dotdot",
                              "win-abs", "win-drive-relative", "win-abs-slash", "unc", "win-dotdot",
                              "win-nested-dotdot", "nul"])
def test_resolve_inside_refuses_paths_that_could_leave(project, rel):
    """(original defect 18)"""
    with pytest.raises(bridge.PathError) as info:
        bridge.resolve_inside(project, rel)

    assert str(info.value)
    assert info.value.exit_code == 1


def test_resolve_inside_refuses_symlink_escape(project, outside):
    """(original defect 18)"""
    (project / "link").symlink_to(outside, target_is_directory=True)
    (project / "file-link").symlink_to(outside / "target.txt")

    for rel in ("link", "link/x.py", "link/deeper/x.py", "file-link"):
        with pytest.raises(bridge.PathError, match="symlink"):
            bridge.resolve_inside(project, rel)


# --------------------------------------------------------------------------------------
# via main()
# --------------------------------------------------------------------------------------

def results_by_plan(db: Path) -> dict[str, dict]:
    out = {}
    for row in read_rows(db):
        if "bridge-result" in (row["tags"] or "").split(","):
            doc = result_document(row["content"])
            out[doc["plan_id"]] = doc
    return out


def plan_states(db: Path) -> dict[str, dict]:
    out = {}
    for row in read_rows(db):
        if "bridge-plan" in (row["tags"] or "").split(","):
            plan_id = json.loads(row["content"])["id"]
            out[plan_id] = state_of_row(db, row)
    return out


def test_invalid_plan_is_marked_failed_with_every_problem_and_other_plans_still_run(
        tmp_path, fake_llm, state_dir, capsys):
    """An invalid plan is marked failed with every problem listed in its result; the other plans still run."""
    db = make_store(tmp_path / "store.db", "12.x-fresh")
    insert_plan(db, make_plan(id="plan-a", steps=[{"id": 1, "prompt": "Task of plan A"}]), created_at=1000.0)
    insert_plan(db, make_plan(id="plan-cycle", steps=[
        {"id": 1, "prompt": "x", "depends_on": [2]},
        {"id": 2, "prompt": "y", "depends_on": [1]}]), created_at=2000.0)
    insert_plan(db, make_plan(id="plan-c", steps=[{"id": 1, "prompt": "Task of plan C"}]), created_at=3000.0)
    fake_llm.enqueue("answer A")
    fake_llm.enqueue("answer C")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--json")

    assert rc == 1
    doc = json.loads(out)
    assert [r["plan_id"] for r in doc["plans"]] == ["plan-a", "plan-cycle", "plan-c"]
    assert [r["status"] for r in doc["plans"]] == ["completed", "failed", "completed"]
    assert "plan-cycle" in err and "cycle" in err
    check_store(db)

    states = plan_states(db)
    assert states["plan-cycle"]["status"] == "failed"
    assert states["plan-a"]["status"] == "completed"
    assert states["plan-c"]["status"] == "completed"

    results = results_by_plan(db)
    bad = results["plan-cycle"]
    assert bad["success"] is False
    assert bad["status"] == "failed"
    assert bad["steps"] == []
    assert isinstance(bad["problems"], list) and len(bad["problems"]) == 1
    assert "cycle" in bad["problems"][0]
    assert set(int(n) for n in re.findall(r"\d+", bad["problems"][0].split("cycle", 1)[1])) == {1, 2}
    assert results["plan-a"]["success"] is True
    assert results["plan-a"]["steps"][0]["output"] == "answer A"
    assert results["plan-c"]["success"] is True
    assert results["plan-c"]["steps"][0]["output"] == "answer C"

    # each valid plan got its own request; the invalid one none
    chats = fake_llm.chat_requests
    assert len(chats) == 2
    assert "Task of plan A" in json.dumps(chats[0]["json"]["messages"])
    assert "Task of plan C" in json.dumps(chats[1]["json"]["messages"])
    assert fake_llm.pending == 0


def test_invalid_plan_with_null_fields_fails_with_paths_and_is_not_retried(tmp_path, fake_llm, state_dir, capsys):
    """A plan with null validation is recorded failed with its JSON path, no crash (original defect 11)."""
    db = make_store(tmp_path / "store.db", "12.x-fresh")
    insert_plan(db, make_plan(id="plan-null", steps=[{"id": 1, "prompt": "x", "validation": None,
                                                     "max_retries": None}]))

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)

    assert rc == 1
    assert "internal error" not in err
    check_store(db)
    assert plan_states(db)["plan-null"]["status"] == "failed"
    problems = results_by_plan(db)["plan-null"]["problems"]
    assert any(p.startswith("$.steps[0].validation") for p in problems)
    assert any(p.startswith("$.steps[0].max_retries") for p in problems)
    assert fake_llm.chat_requests == []

    # a second run finds nothing pending: the plan is not stuck in_progress
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
    assert rc == 0
    assert fake_llm.chat_requests == []
    check_store(db)


def test_list_shows_plan_without_context_and_steps_with_zero_steps(tmp_path, fake_llm, state_dir, capsys):
    """--list must not crash on a plan lacking context and steps (original defect 11)."""
    db = make_store(tmp_path / "store.db", "12.x-fresh")
    insert_plan(db, {"$schema": "bridge-plan-v1", "id": "bare-plan", "status": "pending"})

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--json")

    assert rc == 0
    doc = json.loads(out)
    assert len(doc["plans"]) == 1
    row = doc["plans"][0]
    assert row["id"] == "bare-plan"
    assert row["steps"] == 0
    assert row["objective"] == ""
    assert "internal error" not in err

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list")

    assert rc == 0
    assert "bare-plan" in out
    assert re.search(r"\b0 step\(s\)", out), out
    assert "internal error" not in err
    check_store(db)
    assert fake_llm.chat_requests == []


def test_a_schema_valid_plan_a_rule_cannot_check_is_refused_not_run_unchecked(monkeypatch):
    """A semantic rule that breaks on a plan the schema passed (a bug, or input no rule
    foresaw) makes the plan invalid, saying so; it is never run with its paths unchecked."""
    def broken(plan, guard=None):
        raise TypeError("unforeseen")
    monkeypatch.setattr(bridge, "_semantic_problems", broken)
    with pytest.raises(bridge.PlanInvalid) as caught:
        bridge.check_plan(make_plan("p1"))
    assert caught.value.problems == ["$: the plan could not be checked (TypeError: unforeseen); "
                                     "it is refused rather than run unchecked"]
