"""bridge-plan-schema.json: it is a valid draft 2020-12 schema, it accepts the
documented plans, rejects the broken ones, and agrees with the first contract's field tables
(copied here as literals: the tests never read the docs)."""

import copy
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

ROOT = Path(__file__).parent.parent
SCHEMA = json.loads((ROOT / "bridge-plan-schema.json").read_text(encoding="utf-8"))
FIXTURE_PLAN = Path(__file__).parent / "data" / "doobidoo-12.2.0-store.plan.json"

VALIDATOR = Draft202012Validator(SCHEMA)

# The first contract's example plan (the original script's format), verbatim.
DOC_EXAMPLE = json.loads(r"""
{
  "$schema": "bridge-plan-v1",
  "id": "add-slugify-2026-11-21",
  "status": "pending",
  "context": {
    "objective": "Add a slugify helper with tests",
    "project": "/home/me/src/blog",
    "files_context": {"blog/text.py": "LOAD", "README.md": "REFERENCE"}
  },
  "steps": [
    {"id": 1, "title": "helper", "prompt": "Write blog/slug.py with slugify(s: str) -> str ...",
     "validation": {"type": "syntax_check"}, "file_output": "blog/slug.py"},
    {"id": 2, "title": "cases", "depends_on": [1],
     "prompt": "List 5 test cases as JSON: {\"cases\": [[input, expected], ...]}",
     "validation": {"type": "contains_keys", "keys": ["cases"]}, "on_failure": "skip"}
  ],
  "rollback_strategy": "revert_files"
}
""")


def errors(instance):
    return list(VALIDATOR.iter_errors(instance))


def test_schema_is_valid_draft_2020_12():
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert SCHEMA["$id"] == "bridge-plan-v1"
    assert SCHEMA["title"] and SCHEMA["description"]


def test_doc_example_validates():
    assert errors(DOC_EXAMPLE) == []


def test_fixture_plan_validates():
    plan = json.loads(FIXTURE_PLAN.read_text(encoding="utf-8"))
    assert errors(plan) == []


def _with(**changes):
    """The doc example with top-level fields replaced (None value: field removed)."""
    plan = copy.deepcopy(DOC_EXAMPLE)
    for key, value in changes.items():
        key = {"schema_": "$schema"}.get(key, key)
        if value is None:
            plan.pop(key)
        else:
            plan[key] = value
    return plan


def _step(**changes):
    """The doc example with its first step changed (None value: field removed)."""
    plan = copy.deepcopy(DOC_EXAMPLE)
    step = plan["steps"][0]
    for key, value in changes.items():
        if value is None:
            step.pop(key)
        else:
            step[key] = value
    return plan


def _step_null(field):
    plan = copy.deepcopy(DOC_EXAMPLE)
    plan["steps"][0][field] = None
    return plan


def _context(**changes):
    plan = copy.deepcopy(DOC_EXAMPLE)
    plan["context"].update(changes)
    return plan


def _steps(n):
    return [{"id": i, "prompt": f"step {i}"} for i in range(1, n + 1)]


INVALID = {
    "missing $schema": _with(schema_=None),
    "wrong $schema": _with(schema_="bridge-plan-v2"),
    "bad id: space": _with(id="add slugify"),
    "bad id: comma": _with(id="add,slugify"),
    "bad id: leading dot": _with(id=".add-slugify"),
    "bad id: 129 chars": _with(id="a" * 129),
    "bad id: trailing newline": _with(id="add-slugify\n"),
    "missing status": _with(status=None),
    "unknown status": _with(status="running"),
    "empty steps": _with(steps=[]),
    "201 steps": _with(steps=_steps(201)),
    "step id 0": _step(id=0),
    'step id "1" (string)': _step(id="1"),
    "empty prompt": _step(prompt=""),
    "whitespace-only prompt": _step(prompt=" \n\t "),
    "null validation": _step_null("validation"),
    "null depends_on": _step_null("depends_on"),
    "null max_retries": _step_null("max_retries"),
    "max_retries 11": _step(max_retries=11),
    "unknown validation type": _step(validation={"type": "always_pass"}),
    "contains_keys without keys": _step(validation={"type": "contains_keys"}),
    "json_schema without schema": _step(validation={"type": "json_schema"}),
    "regex without pattern": _step(validation={"type": "regex"}),
    "unknown key in validation": _step(validation={"type": "json", "strict": True}),
    "unknown on_failure": _step(on_failure="retry"),
    "relative project": _context(project="home/me/src/blog"),
    'files_context value "READ"': _context(files_context={"README.md": "READ"}),
    "plan that is a JSON list": [DOC_EXAMPLE],
    "plan that is a string": json.dumps(DOC_EXAMPLE),
    "unknown key in defaults": _with(defaults={"model": "qwen", "top_p": 0.9}),
    "command without run": _step(validation={"type": "command"}),
    "command run as a shell string": _step(validation={"type": "command", "run": "pytest -q"}),
    "command run empty": _step(validation={"type": "command", "run": []}),
    "command program empty": _step(validation={"type": "command", "run": ["", "-q"]}),
    "command argument with NUL": _step(validation={"type": "command", "run": ["pytest", "a\u0000b"]}),
    "command argument too long": _step(validation={"type": "command", "run": ["echo", "x" * 4097]}),
    "command of 257 items": _step(validation={"type": "command", "run": ["echo"] * 257}),
    "command timeout 0": _step(validation={"type": "command", "run": ["true"], "timeout_s": 0}),
    "command timeout past the maximum": _step(validation={"type": "command", "run": ["true"],
                                                          "timeout_s": 3601}),
    "empty validation list": _step(validation=[]),
    "validation list with a bad item": _step(validation=[{"type": "syntax_check"}, {"type": "bogus"}]),
    "validation list of 11": _step(validation=[{"type": "non_empty"}] * 11),
    "verify without run": _with(verify={"timeout_s": 5}),
    "verify with an unknown key": _with(verify={"run": ["true"], "shell": True}),
    "verify run as a string": _with(verify={"run": "make test"}),
    # strict by default (issue 24): a misspelt key is an error, not silently dropped
    "unknown top-level key": _with(rollback_stratgy="revert_files"),
    "unknown key in context": _context(projct="/home/me/src/blog"),
    "unknown key in step": _step(file_ouput="blog/slug.py"),
    "x_ key (underscore) in step": _step(x_note="the prefix is x-"),
}


@pytest.mark.parametrize("plan", list(INVALID.values()), ids=list(INVALID))
def test_invalid_plan_is_rejected(plan):
    assert errors(plan), "the schema accepted an invalid plan"


VALID = {
    "200 steps": _with(steps=_steps(200)),
    "id of 128 chars": _with(id="a" * 128),
    "id with . _ : -": _with(id="A1.b_c:d-e"),
    "x- key at the top level": _with(**{"x-original-script-field": {"anything": 1}}),
    "x- key in context": _context(**{"x-notes": "kept for the planner"}),
    "x- key in step": _step(**{"x-note": "ignored"}),
    "windows drive project": _context(project="C:\\src\\blog"),
    "windows drive project, slash": _context(project="c:/src/blog"),
    "UNC project": _context(project="\\\\server\\share\\blog"),
    "all new fields": _with(
        created_by="claude-opus-4",
        rollback_strategy="none",
        defaults={"model": "qwen2.5-coder", "temperature": 0.2, "max_tokens": 2048,
                  "system": "Be terse.", "timeout_s": 120},
        steps=[
            {"id": 1, "prompt": "p", "title": "t", "max_retries": 0, "on_failure": "halt",
             "system": "", "temperature": 2, "max_tokens": 1, "model": "m",
             "timeout_s": 0.5, "validation": {"type": "json_schema", "schema": True}},
            {"id": 2, "prompt": "p", "depends_on": [], "max_retries": 10,
             "validation": {"type": "regex", "pattern": "^def "}},
            {"id": 3, "prompt": "p", "depends_on": [1, 2],
             "validation": {"type": "syntax_check", "language": "toml"}},
            {"id": 4, "prompt": "p", "validation": {"type": "json_schema",
                                                   "schema": {"type": "object"}}},
            {"id": 5, "prompt": "p", "validation": {"type": "non_empty"}},
            {"id": 6, "prompt": "p", "validation": {"type": "json"}},
        ],
    ),
}


VALID["validation list: syntax_check then a command"] = _step(validation=[
    {"type": "syntax_check"}, {"type": "command", "run": ["python", "-m", "pytest", "-q"], "timeout_s": 120}])
VALID["verify with a timeout"] = _with(verify={"run": ["make", "test"], "timeout_s": 3600})


@pytest.mark.parametrize("plan", list(VALID.values()), ids=list(VALID))
def test_valid_plan_is_accepted(plan):
    assert errors(plan) == []


# The first contract's field tables, copied (the README lists the same fields).
DOC_PLAN_FIELDS = {"$schema", "id", "status", "context", "steps", "rollback_strategy",
                   "defaults", "created_by", "verify"}
DOC_VERIFY_FIELDS = {"run", "timeout_s"}
DOC_CONTEXT_FIELDS = {"objective", "project", "files_context"}
# thinking: new with issue 22 (README "Small local models": thinking models)
DOC_DEFAULTS_FIELDS = {"model", "temperature", "max_tokens", "system", "timeout_s", "thinking"}
# Fields of the original script's own schema (examples/scripts/bridge-plan-schema.json of the
# Claude Code Ultimate Guide: steps required type and description; context had constraints),
# which bridge accepts and never interprets, so the plans written for it stay valid.
ORIGINAL_STEP_FIELDS = {"type", "description"}
ORIGINAL_CONTEXT_FIELDS = {"constraints"}
DOC_STEP_FIELDS = {"id", "prompt", "title", "depends_on", "validation", "max_retries",
                   "on_failure", "file_output", "system", "temperature", "max_tokens",
                   "model", "timeout_s", "thinking"}
DOC_VALIDATION_TYPES = {"non_empty", "json", "contains_keys", "syntax_check",
                        "json_schema", "regex", "command"}
DOC_VALIDATION_FIELDS = {"type", "keys", "language", "schema", "pattern", "run", "timeout_s",
                         "grounded"}     # grounded: issue 25, after the first contract
DOC_COMMAND_MAX_TIMEOUT_S = 3600
DOC_SYNTAX_LANGUAGES = {"python", "json", "toml"}
DOC_ON_FAILURE = {"retry_with_context", "skip", "halt"}
DOC_STATUS = {"pending", "in_progress", "completed", "failed", "cancelled"}
DOC_ROLLBACK = {"revert_files", "none"}


def test_schema_agrees_with_doc_tables():
    defs = SCHEMA["$defs"]
    plan_props = SCHEMA["properties"]
    step_props = defs["step"]["properties"]
    validation_props = defs["validation"]["properties"]

    assert set(plan_props) == DOC_PLAN_FIELDS
    assert set(SCHEMA["required"]) == {"$schema", "id", "status", "steps"}
    assert set(defs["context"]["properties"]) == DOC_CONTEXT_FIELDS | ORIGINAL_CONTEXT_FIELDS
    assert set(defs["model_params"]["properties"]) == DOC_DEFAULTS_FIELDS
    assert set(step_props) == DOC_STEP_FIELDS | ORIGINAL_STEP_FIELDS
    assert set(defs["step"]["required"]) == {"id", "prompt"}
    assert set(validation_props) == DOC_VALIDATION_FIELDS
    assert set(validation_props["type"]["enum"]) == DOC_VALIDATION_TYPES
    assert set(validation_props["language"]["enum"]) == DOC_SYNTAX_LANGUAGES
    assert set(step_props["on_failure"]["enum"]) == DOC_ON_FAILURE
    assert set(plan_props["status"]["enum"]) == DOC_STATUS
    assert set(plan_props["rollback_strategy"]["enum"]) == DOC_ROLLBACK
    assert plan_props["$schema"]["const"] == "bridge-plan-v1"
    assert set(defs["verify"]["properties"]) == DOC_VERIFY_FIELDS
    assert defs["command_timeout"]["maximum"] == DOC_COMMAND_MAX_TIMEOUT_S
    # the per-step overrides are the defaults' fields
    assert DOC_DEFAULTS_FIELDS <= set(step_props)


@pytest.mark.parametrize("vtype", sorted(DOC_VALIDATION_TYPES))
def test_every_documented_validation_type_is_accepted(vtype):
    extra = {"contains_keys": {"keys": ["k"]}, "json_schema": {"schema": {}},
             "regex": {"pattern": "x"}, "command": {"run": ["true"]}}.get(vtype, {})
    assert errors(_step(validation={"type": vtype, **extra})) == []
