"""The hostile-plan fault matrix (issue 4), walked end to end through a plain run
`bridge.main(["--db", db, "--base-url", url, "--state-dir", st, "--json"], environ={})`.

Every row: a fresh 12.x store holding the row's hostile plan(s) and, inserted after
them, one good plan ("good", one step, its reply enqueued); a project folder holding
`inside.txt`; a sibling "outside" folder holding `x.txt` (the target of the escapes).
Every row expects: exit 1; the good plan completed with exactly its one request; the
hostile plan sent nothing, its effective status is `failed`, and its result memory
(status failed, tags exactly `bridge-result` and one `plan:` tag) lists `problems` of
which one holds every expected piece; stderr shows that problem on one line, with no
traceback; the project, the outside folder and the store's plan content are
unchanged; check_store passes.

| row | hostile plan | expected in one problem (exit 1, plan failed, 0 requests) |
|---|---|---|
| cycle | steps 1 -> 2 -> 1 | `dependency cycle` |
| unknown-dependency | depends_on [9] (no step 9) | `$.steps[0].depends_on`, `unknown step 9` |
| self-dependency | step 1 depends_on [1] | `depends on itself` |
| null-validation | `"validation": null` | `$.steps[0].validation`, `None is not of type 'object'` |
| null-depends-on | `"depends_on": null` | `$.steps[0].depends_on`, `None is not of type 'array'` |
| null-max-retries | `"max_retries": null` | `$.steps[0].max_retries`, `None is not of type 'integer'` |
| string-max-retries | `"max_retries": "2"` | `$.steps[0].max_retries`, `'2' is not of type 'integer'` |
| steps-object | `"steps": {}` | `$.steps`, `is not of type 'array'` |
| json-list | content `[{...plan...}]`, tagged bridge-plan | `a plan is a JSON object, not a JSON list` |
| json-string | content `"bridge-plan-v1 ..."`, tagged bridge-plan | `not a JSON str` |
| unknown-validation-type | `{"type": "bogus"}` | `$.steps[0].validation.type`, `'bogus' is not one of` |
| duplicate-step-ids | two steps with id 1 | `step id 1 is used more than once` |
| 201-steps | 201 steps (schema allows 200) | `$.steps`, `too long` |
| 2-MB-prompt | prompt of 2 * 1024 * 1024 chars (a larger plan row is over PLAN_MAX_BYTES: tests/test_bounded_memory.py) | `$.steps[0].prompt`, `characters; bridge takes at most` |
| load-missing | LOAD `missing.txt` (absent, no step writes it) | `'missing.txt'`, `does not exist` |
| load-binary | LOAD `blob.bin` holding a NUL byte | `'blob.bin'`, `binary` |
| load-not-utf8 | LOAD `latin.txt` = b"\\xff\\xfe caf\\xe9" | `'latin.txt'`, `not UTF-8` |
| load-outside | LOAD `../outside/x.txt` | `../outside/x.txt`, `climbs out` |
| output-absolute | file_output = absolute path into the outside folder | `$.steps[0].file_output`, `absolute` |
| output-dotdot | file_output `../outside/x.txt` | `$.steps[0].file_output`, `climbs out` |
| output-symlink | file_output `link/x.txt`, project/link -> outside | `$.steps[0].file_output`, `symlink` |
| output-symlink-inside | file_output `alias/x.txt`, project/alias -> project/real | `$.steps[0].file_output`, `symlink 'alias'` |
| output-git-hook | file_output `.git/hooks/pre-commit` (an existing hook) | `$.steps[0].file_output`, `under .git/` |
| output-store | project = the store's folder, file_output = the store file | `$.steps[0].file_output`, `is the memory store` |
| output-state-dir | project = the state dir's parent, file_output `state/x.txt` | `$.steps[0].file_output`, `in bridge's state dir` |
| load-ssh-key | LOAD `.ssh/id_ed25519` | `'.ssh/id_ed25519'`, `does not send it to a model` |
| load-env | LOAD `.env` | `'.env'`, `does not send it to a model` |
| project-missing | context.project names no folder | `$.context.project`, `does not exist` |
| id-percent | id `a%b` | `$.id`, `does not match` |
| id-quote | id `a"b` | `$.id`, `does not match` |
| id-comma | id `a,b` (result tags: exactly 2, no comma) | `$.id`, `does not match` |
| twin | two pending plans with id "twin" (both hostile) | `is used by 2 live memories (rows R1, R2)` |

Also: a LOAD file of 3 x LOAD_FILE_MAX_BYTES is no fault: the plan runs (exit 0) and
the prompt carries the file cut at LOAD_FILE_MAX_BYTES with the marker
"[bridge: big.txt cut at N bytes]"; and `--plan twin` exits 2 naming both rows,
sending and changing nothing.

The absolute file_output row uses an absolute path inside the outside folder (not
"/tmp/x"), so the outside snapshot proves nothing was written there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

import bridge
from fakes import (
    bridge_args, check_store, insert_memory, insert_plan, make_plan, read_rows, result_document, snapshot,
    state_of_row, trust_project, user_text,
)

# Literals copied from the contract (bridge-plan-schema.json, the README), never read at run time.
RESULT_TAG = "bridge-result"
PLAN_TAG = "bridge-plan"
SCHEMA_ID = "bridge-plan-v1"

GOOD_PROMPT = "good-task"
GOOD_REPLY = "good-reply"
HOSTILE_PROMPT = "hostile-task"
T0 = 1_700_000_000.0


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


@dataclass
class Ctx:
    project: Path       # exists, holds inside.txt
    outside: Path       # sibling of project, holds x.txt
    missing: Path       # a folder that does not exist


@pytest.fixture
def ctx(tmp_path) -> Ctx:
    project = tmp_path / "project"
    project.mkdir()
    (project / "inside.txt").write_text("inside\n", encoding="utf-8")
    trust_project(project)          # hostile plans in a trusted project: the defences below still hold
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.txt").write_text("outside original\n", encoding="utf-8")
    return Ctx(project, outside, tmp_path / "no-such-project")


def effective_statuses(db: Path) -> dict[Any, str]:
    """{row id: effective status} as bridge itself computes it."""
    config = bridge.Config(db_paths=(db,))
    with bridge.Store.open(config) as store:
        return {r.row_id: r.status for r in store.find_plans()}


def with_project(plan: dict, project: Path, **context: Any) -> dict:
    plan["context"] = {"objective": "hostile", "project": str(project), **context}
    return plan


def hostile(steps: list | dict | None = None, id: str = "hostile", **fields: Any) -> dict:  # noqa: A002
    plan = make_plan(id, steps if steps is not None else [{"id": 1, "prompt": HOSTILE_PROMPT}], **fields)
    if steps is not None and not isinstance(steps, list):
        plan["steps"] = steps      # make_plan replaces a falsy value such as {}
    return plan


def step(**fields: Any) -> dict:
    return {"id": 1, "prompt": HOSTILE_PROMPT, **fields}


# A row's build(ctx) returns the hostile memories to insert, oldest first: a plan dict
# (stored by insert_plan) or raw content (stored tagged bridge-plan, type planning).
Build = Callable[[Ctx], list]


def _load(name: str, data: bytes) -> Build:
    def build(c: Ctx) -> list:
        (c.project / name).write_bytes(data)
        return [with_project(hostile(), c.project, files_context={name: "LOAD"})]
    return build


def _output(rel: Callable[[Ctx], str], symlink: bool = False) -> Build:
    def build(c: Ctx) -> list:
        if symlink:
            (c.project / "link").symlink_to(c.outside, target_is_directory=True)
        return [with_project(hostile([step(file_output=rel(c))]), c.project)]
    return build


def _output_symlink_inside(c: Ctx) -> list:
    (c.project / "real").mkdir()
    (c.project / "alias").symlink_to(c.project / "real", target_is_directory=True)
    return [with_project(hostile([step(file_output="alias/x.txt")]), c.project)]


def _git_hook(c: Ctx) -> list:
    (c.project / ".git" / "hooks").mkdir(parents=True)
    (c.project / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\n")
    return [with_project(hostile([step(file_output=".git/hooks/pre-commit")]), c.project)]


def _secret(rel: str) -> Build:
    def build(c: Ctx) -> list:
        (c.project / rel).parent.mkdir(parents=True, exist_ok=True)
        (c.project / rel).write_text("secret\n")
        return [with_project(hostile(), c.project, files_context={rel: "LOAD"})]
    return build


def _twin(c: Ctx) -> list:
    return [hostile([step(prompt="twin-task-one")], id="twin"),
            hostile([step(prompt="twin-task-two")], id="twin")]


ROWS = [
    pytest.param(lambda c: [hostile([step(depends_on=[2]), {"id": 2, "prompt": "b", "depends_on": [1]}])],
                 ("$.steps", "dependency cycle"), id="cycle"),
    pytest.param(lambda c: [hostile([step(depends_on=[9])])],
                 ("$.steps[0].depends_on", "unknown step 9"), id="unknown-dependency"),
    pytest.param(lambda c: [hostile([step(depends_on=[1])])],
                 ("$.steps[0].depends_on", "depends on itself"), id="self-dependency"),
    pytest.param(lambda c: [hostile([step(validation=None)])],
                 ("$.steps[0].validation", "None is not of type 'object'"), id="null-validation"),
    pytest.param(lambda c: [hostile([step(depends_on=None)])],
                 ("$.steps[0].depends_on", "None is not of type 'array'"), id="null-depends-on"),
    pytest.param(lambda c: [hostile([step(max_retries=None)])],
                 ("$.steps[0].max_retries", "None is not of type 'integer'"), id="null-max-retries"),
    pytest.param(lambda c: [hostile([step(max_retries="2")])],
                 ("$.steps[0].max_retries", "'2' is not of type 'integer'"), id="string-max-retries"),
    pytest.param(lambda c: [hostile({})],
                 ("$.steps", "is not of type 'array'"), id="steps-object"),
    pytest.param(lambda c: [json.dumps([hostile(id="listed")], indent=2)],
                 ("a plan is a JSON object, not a JSON list",), id="json-list"),
    pytest.param(lambda c: [json.dumps(f"{SCHEMA_ID} please run the plan")],
                 ("not a JSON str",), id="json-string"),
    pytest.param(lambda c: [hostile([step(validation={"type": "bogus"})])],
                 ("$.steps[0].validation.type", "'bogus' is not one of"), id="unknown-validation-type"),
    pytest.param(lambda c: [hostile([step(), {"id": 1, "prompt": "again"}])],
                 ("step id 1 is used more than once",), id="duplicate-step-ids"),
    pytest.param(lambda c: [hostile([{"id": i, "prompt": f"s{i}"} for i in range(1, 202)])],
                 ("$.steps", "too long"), id="201-steps"),
    pytest.param(lambda c: [hostile([step(prompt="x" * (2 * 1024 * 1024))])],
                 ("$.steps[0].prompt", "characters; bridge takes at most"), id="2-MB-prompt"),
    pytest.param(lambda c: [with_project(hostile(), c.project, files_context={"missing.txt": "LOAD"})],
                 ("'missing.txt'", "does not exist"), id="load-missing"),
    pytest.param(_load("blob.bin", b"text\x00more"),
                 ("'blob.bin'", "binary"), id="load-binary"),
    pytest.param(_load("latin.txt", b"\xff\xfe caf\xe9"),
                 ("'latin.txt'", "not UTF-8"), id="load-not-utf8"),
    pytest.param(lambda c: [with_project(hostile(), c.project, files_context={"../outside/x.txt": "LOAD"})],
                 ("'../outside/x.txt'", "climbs out"), id="load-outside"),
    pytest.param(_output(lambda c: str(c.outside / "abs.txt")),
                 ("$.steps[0].file_output", "absolute"), id="output-absolute"),
    pytest.param(_output(lambda c: "../outside/x.txt"),
                 ("$.steps[0].file_output", "climbs out"), id="output-dotdot"),
    pytest.param(_output(lambda c: "link/x.txt", symlink=True),
                 ("$.steps[0].file_output", "symlink"), id="output-symlink"),
    pytest.param(_output_symlink_inside, ("$.steps[0].file_output", "symlink 'alias'"), id="output-symlink-inside"),
    pytest.param(_git_hook, ("$.steps[0].file_output", "under .git/"), id="output-git-hook"),
    pytest.param(lambda c: [with_project(hostile([step(file_output="fresh.db")]), c.project.parent)],
                 ("$.steps[0].file_output", "is the memory store"), id="output-store"),
    pytest.param(lambda c: [with_project(hostile([step(file_output="state/x.txt")]), c.project.parent)],
                 ("$.steps[0].file_output", "in bridge's state dir"), id="output-state-dir"),
    pytest.param(_secret(".ssh/id_ed25519"), ("'.ssh/id_ed25519'", "does not send it to a model"),
                 id="load-ssh-key"),
    pytest.param(_secret(".env"), ("'.env'", "does not send it to a model"), id="load-env"),
    pytest.param(lambda c: [with_project(hostile([step(file_output="out.txt")]), c.missing)],
                 ("$.context.project", "does not exist"), id="project-missing"),
    pytest.param(lambda c: [hostile(id="a%b")], ("$.id", "does not match"), id="id-percent"),
    pytest.param(lambda c: [hostile(id='a"b')], ("$.id", "does not match"), id="id-quote"),
    pytest.param(lambda c: [hostile(id="a,b")], ("$.id", "does not match"), id="id-comma"),
    pytest.param(_twin, ("$.id", "is used by 2 live memories"), id="twin"),
]


def insert_hostile(db: Path, items: list) -> list[tuple[Any, str]]:
    """Insert the hostile memories; return [(row id, content as stored)]."""
    out = []
    for n, item in enumerate(items):
        if isinstance(item, dict):
            row = insert_plan(db, item, created_at=T0 + n)
        else:
            row = insert_memory(db, item, tags=PLAN_TAG, memory_type="planning", created_at=T0 + n)
        content = next(r["content"] for r in read_rows(db) if r["id"] == row)
        out.append((row, content))
    return out


def expected_plan_id(content: str, row_id: Any) -> str:
    """The id bridge reports: the plan's own id when it is an object with a string id."""
    parsed = json.loads(content)
    if isinstance(parsed, dict) and isinstance(parsed.get("id"), str):
        return parsed["id"]
    return f"row-{row_id}"


# --------------------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("build", "expect"), ROWS)
def test_plan_fault_matrix(capsys, db, ctx, fake_llm, state_dir, build, expect):
    """A hostile plan is recorded as failed with its reason, sends nothing, touches no
    file, and does not stop the good plan after it from running."""
    hostile_rows = insert_hostile(db, build(ctx))
    good_row = insert_plan(db, make_plan("good", [{"id": 1, "prompt": GOOD_PROMPT}]), created_at=T0 + 100)
    fake_llm.enqueue(GOOD_REPLY)
    before_project, before_outside = snapshot(ctx.project), snapshot(ctx.outside)
    before_missing = snapshot(ctx.missing)
    contents = {r["id"]: r["content"] for r in read_rows(db)}
    hostile_ids = [expected_plan_id(content, row) for row, content in hostile_rows]
    if len(hostile_rows) > 1:   # the twins: the problem names both rows
        expect = expect + (f"(rows {', '.join(str(row) for row, _ in hostile_rows)})",)

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--json", retry_delay=None), environ={})
    out, err = capsys.readouterr()

    assert rc == 1
    doc = json.loads(out)
    assert [r["plan_id"] for r in doc["plans"]] == hostile_ids + ["good"]
    good = doc["plans"][-1]
    assert good["status"] == "completed" and good["success"] is True
    assert [s["output"] for s in good["steps"]] == [GOOD_REPLY]
    # exactly one request, the good plan's: the hostile plan sent nothing
    requests = fake_llm.chat_requests
    assert len(requests) == 1
    assert GOOD_PROMPT in user_text(requests[0])
    assert HOSTILE_PROMPT not in user_text(requests[0])
    for reported in doc["plans"][:-1]:
        assert reported["status"] == "failed" and reported["success"] is False
        assert reported["steps"] == []
        assert any(all(piece in p for piece in expect) for p in reported["problems"]), reported["problems"]

    # stderr: the problem on one line, no traceback, nothing huge echoed
    assert "Traceback" not in err
    assert len(err) < 20_000
    lines = err.splitlines()
    for plan_id in hostile_ids:
        assert any(line.startswith("bridge: error: ") and f"plan {plan_id}: invalid: " in line
                   and all(piece in line for piece in expect) for line in lines), err

    # the store: effective status, result memories, untouched plan content
    statuses = effective_statuses(db)
    rows = read_rows(db)
    by_id = {r["id"]: r for r in rows}
    results = [r for r in rows if RESULT_TAG in (r["tags"] or "").split(",")]
    assert len(results) == len(hostile_rows) + 1
    for (row, content), plan_id in zip(hostile_rows, hostile_ids):
        assert statuses[row] == "failed"
        assert by_id[row]["content"] == content
        state = state_of_row(db, by_id[row])
        mine = [r for r in results if result_document(r["content"])["plan_id"] == plan_id]
        if plan_id == "twin":
            mine = [r for r in mine if r["content_hash"] == state["result_hash"]]
        assert len(mine) == 1
        result_row = mine[0]
        assert result_row["content_hash"] == state["result_hash"]
        result = result_document(result_row["content"])
        assert result["status"] == "failed" and result["success"] is False
        assert isinstance(result["problems"], list) and result["problems"]
        assert any(all(piece in p for piece in expect) for p in result["problems"]), result["problems"]
        tags = result_row["tags"].split(",")
        assert len(tags) == 2 and tags[0] == RESULT_TAG
        assert tags[1].startswith("plan:") and "," not in tags[1]
        assert tags[1] == "plan:" + bridge.tag_safe(plan_id)
    assert statuses[good_row] == "completed"
    assert {r["id"]: r["content"] for r in rows if r["id"] in contents} == contents

    # the files: nothing written in the project, outside it, or where a project was named
    assert snapshot(ctx.project) == before_project
    assert snapshot(ctx.outside) == before_outside
    assert snapshot(ctx.missing) == before_missing is None
    check_store(db)


# --------------------------------------------------------------------------------------
# not faults, and the --plan side of shared ids
# --------------------------------------------------------------------------------------


def test_huge_load_file_is_cut_with_a_marker(capsys, db, ctx, fake_llm, state_dir):
    """A LOAD file three times LOAD_FILE_MAX_BYTES is no fault: the plan runs, and its
    prompt carries the file's first LOAD_FILE_MAX_BYTES bytes and a marker saying so."""
    limit = bridge.LOAD_FILE_MAX_BYTES
    fake_llm.context_length = 10_000_000    # so the context budget cuts nothing here
    line = "0123456789 lorem ipsum dolor sit amet\n"
    text = (line * (limit * 3 // len(line) + 1))[: limit * 3]
    (ctx.project / "big.txt").write_text(text, encoding="utf-8")
    insert_plan(db, with_project(make_plan("big", [{"id": 1, "prompt": "big-task"}]), ctx.project,
                                 files_context={"big.txt": "LOAD"}), created_at=T0)
    insert_plan(db, make_plan("good", [{"id": 1, "prompt": GOOD_PROMPT}]), created_at=T0 + 100)
    fake_llm.enqueue("big-reply").enqueue(GOOD_REPLY)
    before = snapshot(ctx.project)

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--json", retry_delay=None), environ={})
    out, err = capsys.readouterr()

    assert rc == 0
    doc = json.loads(out)
    assert [(r["plan_id"], r["status"]) for r in doc["plans"]] == [("big", "completed"), ("good", "completed")]
    assert "Traceback" not in err
    requests = fake_llm.chat_requests
    assert len(requests) == 2
    prompt = user_text(requests[0])
    marker = f"[bridge: big.txt cut at {limit} bytes]"
    assert marker in prompt
    assert text[:limit] + "\n" + marker in prompt          # the head, whole, then the marker
    assert text[: limit + 1] not in prompt                 # and not one byte more
    assert len(prompt) < limit + 5_000
    assert GOOD_PROMPT in user_text(requests[1])
    assert snapshot(ctx.project) == before
    check_store(db)


def test_plan_flag_refuses_a_shared_id_naming_both_rows(capsys, db, fake_llm, state_dir):
    """`--plan twin` with two live plans of that id exits 2 naming both rows, and
    neither is claimed, sent or changed."""
    rows = [insert_plan(db, plan, created_at=T0 + n) for n, plan in enumerate(_twin(None))]
    fake_llm.enqueue("never")
    before = read_rows(db)

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--json", "--plan", "twin", retry_delay=None),
                     environ={})
    out, err = capsys.readouterr()

    assert rc == 2
    assert out == ""
    assert "Traceback" not in err
    assert f"is used by 2 live memories (rows {rows[0]}, {rows[1]})" in err.splitlines()[0]
    assert fake_llm.chat_requests == []
    assert read_rows(db) == before
    check_store(db)
