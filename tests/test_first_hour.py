"""A new user's first hour (issue 24): what bridge does with a planner's typos, the errors
a user meets first, and whether what bridge prints is true. Each test is one numbered
finding of the issue; each failed on main before the change it covers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fakes import (
    bridge_args,
    child_env,
    closed_port,
    insert_plan,
    make_plan,
    plan_state,
    run_bridge,
    stored_results,
)

import bridge

ROOT = Path(__file__).resolve().parent.parent
BRIDGE_PY = ROOT / "bridge.py"

# Literals copied from the plan contract (bridge-plan-schema.json, README), never read at run time.
PLAN_SCHEMA = "bridge-plan-v1"


def _plan_file(tmp_path: Path, plan: dict, name: str = "plan.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(plan), encoding="utf-8")
    return path


def _typo_plan(project: Path) -> dict:
    """The issue's plan: projct (context), file_ouput, depend_on, on_failur (steps),
    rollback_stratgy (top level)."""
    return {
        "$schema": PLAN_SCHEMA,
        "id": "typos",
        "status": "pending",
        "rollback_stratgy": "revert_files",
        "context": {"objective": "typos", "projct": str(project)},
        "steps": [
            {"id": 1, "prompt": "write it", "file_ouput": "out.txt", "on_failur": "halt"},
            {"id": 2, "prompt": "then this", "depend_on": [1]},
        ],
    }


TYPO_PROBLEMS = [
    "$.rollback_stratgy: unknown key; did you mean 'rollback_strategy'?",
    "$.context.projct: unknown key; did you mean 'project'?",
    "$.steps[0].file_ouput: unknown key; did you mean 'file_output'?",
    "$.steps[0].on_failur: unknown key; did you mean 'on_failure'?",
    "$.steps[1].depend_on: unknown key; did you mean 'depends_on'?",
]


# -- 1. misspelt keys ----------------------------------------------------------------------


def test_validate_names_every_misspelt_key_with_its_path_and_the_closest_known_key(
    tmp_path, capsys
):
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
    tmp_path, db, fake_llm, state_dir, capsys
):
    insert_plan(db, _typo_plan(tmp_path))
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
    assert rc == 1
    assert not [r for r in fake_llm.requests if r["path"].endswith("/chat/completions")]
    assert plan_state(db, "typos")["status"] == "failed"
    problems = stored_results(db)[-1]["problems"]
    assert set(TYPO_PROBLEMS) <= set(problems)


def test_x_keys_are_the_planners_own_everywhere_and_stay_valid(tmp_path, capsys):
    mine = {"x-why": "the planner's note"}
    plan = make_plan(
        id="mine",
        steps=[
            {
                "id": 1,
                "prompt": "p",
                **mine,
                "validation": [{"type": "json", **mine}, {"type": "non_empty"}],
            }
        ],
        defaults={"max_tokens": 50, **mine},
        **mine,
    )
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
    plan = make_plan(
        id="both",
        steps=[
            {"id": 1, "prompt": "a", "depends_on": [2, 9]},
            {"id": 2, "prompt": "b", "depends_on": [1]},
        ],
    )
    with pytest.raises(bridge.PlanInvalid) as info:
        bridge.check_plan(plan)
    problems = info.value.problems
    assert "$.steps[0].depends_on: unknown step 9" in problems
    assert any(p.startswith("$.steps: dependency cycle") for p in problems), problems


# -- 2. one-line errors ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """The python of a real venv made with --without-pip: no httpx, no jsonschema."""
    venv = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120
    )
    python = venv / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import httpx"], capture_output=True, timeout=60)
    assert probe.returncode != 0, "the bare venv can import httpx"
    return str(python)


def run_without_deps(command: list[str], db, tmp_path) -> subprocess.CompletedProcess:
    """Run bridge as command (an interpreter lacking a dependency) on db, its state under
    tmp_path, against a closed port: what a user without httpx would see."""
    return subprocess.run(
        [*command, "--db", str(db), "--state-dir", str(tmp_path / "state"),
         "--base-url", f"http://127.0.0.1:{closed_port()}/v1"],
        capture_output=True, text=True, env=child_env(), timeout=60)


@pytest.mark.parametrize(
    "action", [["--health"], ["--validate", "PLAN"], []], ids=["health", "validate", "run"]
)
def test_python_bridge_py_without_httpx_and_jsonschema_says_what_to_install(
    bare_python, tmp_path, db, action
):
    plan = _plan_file(tmp_path, make_plan(id="p"))
    insert_plan(db, make_plan(id="p"))
    argv = [a.replace("PLAN", str(plan)) for a in action]
    proc = run_without_deps([bare_python, str(BRIDGE_PY), *argv], db, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "internal error" not in proc.stderr
    first, hint = proc.stderr.splitlines()[-2:]
    assert first.startswith("bridge: error: bridge needs ") and "cannot import" in first
    assert hint == (
        "hint: install httpx and jsonschema: pip install httpx jsonschema "
        "(or run bridge from its venv: make test builds .venv)"
    )
    assert plan_state(db, "p") == {}  # nothing claimed


HIDE_HTTPX = """
import importlib.abc, sys
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] == "httpx":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
sys.path.insert(0, sys.argv.pop(1))
import bridge
sys.exit(bridge.main(sys.argv[1:]))
"""


def test_a_run_without_httpx_alone_claims_nothing_and_says_what_to_install(tmp_path, db):
    insert_plan(db, make_plan(id="p"))
    proc = run_without_deps([sys.executable, "-c", HIDE_HTTPX, str(ROOT)], db, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "bridge: error: bridge needs httpx" in proc.stderr
    assert "pip install httpx jsonschema" in proc.stderr
    assert plan_state(db, "p") == {}


def test_a_usage_error_is_one_line_pointing_at_help(capsys):
    with pytest.raises(SystemExit) as info:
        bridge.main(["--lsit"], environ={})
    assert info.value.code == 2
    assert (
        capsys.readouterr().err
        == "bridge: error: unrecognized arguments: --lsit; see bridge --help\n"
    )


def test_help_names_stale_among_what_rerun_takes(capsys):
    with pytest.raises(SystemExit):
        bridge.main(["--help"], environ={})
    text = " ".join(capsys.readouterr().out.split())
    assert "stale" in text.split("--rerun with --plan:", 1)[1].split("--resume", 1)[0]


def test_a_base_url_without_v1_gets_the_fix_in_its_error(db, fake_llm, tmp_path, capsys):
    rc = bridge.main(["--health", "--db", str(db), "--base-url", fake_llm.root], environ={})
    out = capsys.readouterr().out
    assert rc == 2
    assert "HTTP 404" in out and f"try --base-url {fake_llm.root}/v1" in out


HOLD_LOCK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def locked(db):
    """db, held in BEGIN EXCLUSIVE by another process until the test writes a line to it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder
    finally:
        if holder.poll() is None:
            holder.stdin.write("\n")
            holder.stdin.flush()
        holder.wait(timeout=30)


def test_bridge_waits_at_least_30_s_on_a_locked_store_by_default():
    assert bridge.STORE_BUSY_TIMEOUT_S >= 30


@pytest.mark.parametrize("action", [["--list"], ["--submit", "PLAN"]], ids=["list", "submit"])
def test_a_store_locked_past_the_wait_is_said_to_be_locked(
    locked, db, tmp_path, monkeypatch, capsys, action
):
    monkeypatch.setattr(bridge, "STORE_BUSY_TIMEOUT_S", 0.2)
    plan = _plan_file(tmp_path, make_plan(id="p"))
    rc = bridge.main(["--db", str(db), *[a.replace("PLAN", str(plan)) for a in action]], environ={})
    err = capsys.readouterr().err
    assert rc == 2
    assert (
        f"bridge: error: the store {db} stayed locked for 0.2 s (another process holds it)" in err
    )
    assert "memory server's SQLite file" not in err


def test_a_store_locked_for_a_moment_is_waited_for(locked, db, tmp_path, capsys):
    import threading

    insert_done = threading.Timer(0.5, lambda: (locked.stdin.write("\n"), locked.stdin.flush()))
    insert_done.start()
    try:
        rc = bridge.main(["--db", str(db), "--list"], environ={})
    finally:
        insert_done.join()
    assert rc == 0, capsys.readouterr().err


def test_a_read_only_store_is_said_to_be_read_only_not_broken(tmp_path, db, fake_llm):
    from test_stumbles import _read_only_health

    doc = json.loads(_read_only_health(tmp_path, db, fake_llm.url).stdout)
    assert doc["ok"] is False
    assert "read-only" in doc["store"]["hint"] and "backup" not in doc["store"]["hint"]


@pytest.mark.parametrize("reader", ["stdout", "stderr"])
def test_a_reader_that_left_ends_the_output_quietly_and_the_plan_keeps_its_own_outcome(
    tmp_path, db, fake_llm, reader
):
    """bridge --events | head -1 (stdout), bridge 2>&1 | head -1 (stderr, the progress)."""
    insert_plan(db, make_plan(id="p", steps=[{"id": n, "prompt": f"step {n}"} for n in (1, 2, 3)]))
    fake_llm.default_reply = "done"
    fake_llm.latency_s = 0.2
    proc = subprocess.Popen(
        [
            sys.executable,
            str(BRIDGE_PY),
            "--events",
            *bridge_args(db, fake_llm.url, tmp_path / "state"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    left, other = (proc.stdout, proc.stderr) if reader == "stdout" else (proc.stderr, proc.stdout)
    assert left.readline()  # the first line, then gone, as `head -1` is
    left.close()
    rest = other.read()
    assert proc.wait(timeout=60) == 0, rest
    assert "Broken pipe" not in rest and "Exception ignored" not in rest
    assert plan_state(db, "p")["status"] == "completed"
    assert stored_results(db)[-1]["status"] == "completed"


# -- 3. a step's timeout_s ------------------------------------------------------------------


def test_a_steps_timeout_s_is_named_when_it_fires_and_is_not_retried(
    db, fake_llm, state_dir, capsys
):
    insert_plan(
        db,
        make_plan(id="slow", steps=[{"id": 1, "prompt": "p", "timeout_s": 0.3, "max_retries": 0}]),
    )
    fake_llm.enqueue("late", fault="delay", delay_s=1.5).enqueue("never asked for")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--retries", "3", "--timeout", "300")
    assert rc == 1
    assert len(fake_llm.chat_requests) == 1, err
    assert "retry 1/" not in err
    assert "within 0.3 s (the step's timeout_s)" in err and "not retried" in err
    assert "300 s" not in err
    (step,) = stored_results(db)[-1]["steps"]
    assert "within 0.3 s (the step's timeout_s)" in step["error"]


def test_the_timeout_flag_is_named_when_it_fires_and_is_retried(db, fake_llm, state_dir, capsys):
    insert_plan(db, make_plan(id="slow", steps=[{"id": 1, "prompt": "p"}]))
    fake_llm.enqueue("late", fault="delay", delay_s=1.5).enqueue("on time")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--timeout", "0.3")
    assert rc == 0, err
    assert "within 0.3 s (--timeout, for each chunk) (ReadTimeout); retry 1/" in err


# -- 5. --dry-run of a plan that would wait for approval -------------------------------------


def test_dry_run_of_an_untrusted_plan_says_it_would_wait_for_approval_and_why(
    tmp_path, db, fake_llm, state_dir, capsys
):
    folder = tmp_path / "untrusted"
    folder.mkdir()
    insert_plan(
        db,
        make_plan(
            id="u",
            context={"objective": "o", "project": str(folder)},
            steps=[{"id": 1, "prompt": "a", "file_output": "a.txt"}, {"id": 2, "prompt": "b"}],
        ),
    )
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--dry-run")
    assert rc == 0, err
    head = out.splitlines()[0]
    assert "awaiting approval: a run sends nothing until you let it" in head
    assert "would be sent" not in head
    assert f"waits: project {folder} is not a trusted project" in out
    assert "bridge --approve u or bridge --trust" in out
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--dry-run", "--json")
    (entry,) = json.loads(out)["plans"]
    assert entry["approval"]["may_run"] is False and entry["approval"]["reasons"]


def test_dry_run_of_a_plan_that_may_run_says_it_would_be_sent(db, fake_llm, state_dir, capsys):
    insert_plan(db, make_plan(id="ok"))
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--dry-run", "--json")
    assert rc == 0, err
    assert json.loads(out)["plans"][0]["approval"]["may_run"] is True
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--dry-run")
    assert "step(s) would be sent" in out.splitlines()[0]


# -- 6. --show tells the current state ------------------------------------------------------


def _review_run(capsys, db, fake_llm, state_dir, project) -> str:
    insert_plan(
        db,
        make_plan(
            id="r",
            context={"objective": "first", "project": str(project)},
            steps=[{"id": 1, "prompt": "a", "file_output": "a.txt"}],
        ),
    )
    fake_llm.enqueue("text")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--review", "--json")
    assert rc == 0, err
    return json.loads(out)["plans"][0]["run_id"]


@pytest.mark.parametrize("decision, now", [("--apply", "completed"), ("--reject", "cancelled")])
def test_show_after_apply_or_reject_heads_with_the_real_status(
    capsys, db, fake_llm, state_dir, project, decision, now
):
    run_id = _review_run(capsys, db, fake_llm, state_dir, project)
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, decision, "r")
    assert rc == 0, err
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "r")
    assert rc == 0, err
    assert out.splitlines()[0] == f"plan r: {now} (run {run_id}, which ended awaiting_review)"


def _rejected_then_replaced(capsys, tmp_path, db, fake_llm, state_dir, project) -> str:
    """Plan r runs under --review and is rejected, then --submit --replace gives it new
    content; return the old content's run id."""
    run_id = _review_run(capsys, db, fake_llm, state_dir, project)
    assert run_bridge(capsys, db, fake_llm, state_dir, "--reject", "r")[0] == 0
    plan = make_plan(id="r", context={"objective": "second", "project": str(project)})
    argv = ["--db", str(db), "--submit", str(_plan_file(tmp_path, plan)), "--replace"]
    assert bridge.main(argv, environ={}) == 0
    return run_id


def test_show_of_a_replaced_plan_says_its_current_content_has_not_run(
    capsys, tmp_path, db, fake_llm, state_dir, project
):
    run_id = _rejected_then_replaced(capsys, tmp_path, db, fake_llm, state_dir, project)
    capsys.readouterr()
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "r")
    assert rc == 2
    assert "first" not in out
    assert (
        f"plan 'r' has no stored result of its current content yet (it is pending); its replaced "
        f"content's last run was {run_id} (now cancelled)"
    ) in err
    assert "bridge --plan r" in err


# -- 7. progress lines in step order ---------------------------------------------------------


@pytest.mark.parametrize("parallel", ["1", "2"])
def test_progress_lines_keep_step_order_when_a_dependent_step_comes_before_an_independent_one(
    db, fake_llm, state_dir, capsys, parallel
):
    """example-python-helper's shape: 2 depends on 1, 3 on nothing (it printed 1, 3, 2)."""
    insert_plan(
        db,
        make_plan(
            id="order",
            steps=[
                {"id": 1, "prompt": "one"},
                {"id": 2, "prompt": "two", "depends_on": [1]},
                {"id": 3, "prompt": "three"},
            ],
        ),
    )
    fake_llm.default_reply = "ok"
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--parallel", parallel)
    assert rc == 0, err
    started = [line.split(":")[0].strip() for line in err.splitlines() if "attempt 1/" in line]
    assert started == ["step 1", "step 2", "step 3"], err


# -- 4. what --schema and the docstrings cite ships -------------------------------------------


# The design notes the project was started from; none of them ships with bridge.
UNSHIPPED = [
    name + ".md"
    for name in (
        "plan-format",
        "doobidoo-store",
        "original-defects",
        "llm-servers",
        "memory-server-offline",
        "style",
        "style-anchors",
    )
]


def test_schema_cites_no_document_that_does_not_ship(capsys):
    assert bridge.main(["--schema"], environ={}) == 0
    text = capsys.readouterr().out
    assert not [name for name in UNSHIPPED if name in text]
    assert "docs/" not in text


def test_no_shipped_file_cites_a_document_that_does_not_ship():
    files = [
        ROOT / "bridge.py",
        ROOT / "bridge-plan-schema.json",
        ROOT / "README.md",
        *sorted((ROOT / "tests").glob("*.py")),
        *sorted((ROOT / "examples").rglob("*.*")),
    ]
    texts = {
        path.name: path.read_text(encoding="utf-8", errors="replace")
        for path in files
        if path.is_file() and path.suffix in (".py", ".json", ".md")
    }
    cited = {(file, name) for file, text in texts.items() for name in UNSHIPPED if name in text}
    assert cited == set()


# -- 13. papercuts -------------------------------------------------------------------------


def test_list_all_keeps_its_columns_with_a_plan_awaiting_approval(
    tmp_path, db, fake_llm, state_dir, capsys
):
    folder = tmp_path / "untrusted"
    folder.mkdir()
    insert_plan(
        db,
        make_plan(id="waits", context={"objective": "held", "project": str(folder)}),
        created_at=1.0,
    )
    insert_plan(db, make_plan(id="runs", context={"objective": "free"}), created_at=2.0)
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--all")
    assert rc == 0, err
    rows = [line for line in out.splitlines() if line.split()[:1] in (["waits"], ["runs"])]
    assert [row.split()[1] for row in rows] == ["awaiting_approval", "pending"]
    assert len({row.index("step(s)") for row in rows}) == 1, rows  # the columns line up


def test_diff_of_a_plan_without_a_project_says_no_project(db, fake_llm, state_dir, capsys):
    insert_plan(db, make_plan(id="np"))
    fake_llm.enqueue("answer")
    assert run_bridge(capsys, db, fake_llm, state_dir)[0] == 0
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--diff", "np")
    assert rc == 0, err
    assert "project None" not in out and " · no project · " in out.splitlines()[0]


# -- 10, 11. --submit says what it made ------------------------------------------------------


def test_submit_into_a_missing_folder_makes_nothing_and_says_so(tmp_path, capsys):
    db = tmp_path / "typo" / "store.db"
    rc = bridge.main(
        ["--db", str(db), "--submit", str(_plan_file(tmp_path, make_plan(id="p")))], environ={}
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert f"cannot create a store at {db}: folder {db.parent} does not exist" in err
    assert "check --db for a typo" in err
    assert not db.parent.exists()


def test_submit_into_a_new_file_says_it_created_an_empty_store(tmp_path, capsys):
    db = tmp_path / "store.db"
    rc = bridge.main(
        ["--db", str(db), "--submit", str(_plan_file(tmp_path, make_plan(id="p")))], environ={}
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines()[0].startswith(f"created a new, empty store at {db}")
    rc = bridge.main(
        ["--db", str(db), "--submit", str(_plan_file(tmp_path, make_plan(id="q"))), "--json"],
        environ={},
    )
    assert rc == 0 and json.loads(capsys.readouterr().out)["created_store"] is False


@pytest.mark.parametrize("replace", [[], ["--replace"]], ids=["plain", "replace"])
def test_resubmitting_a_plan_that_ran_points_to_rerun(
    db, fake_llm, state_dir, tmp_path, capsys, replace
):
    path = _plan_file(tmp_path, make_plan(id="again"))
    assert bridge.main(["--db", str(db), "--submit", str(path)], environ={}) == 0
    fake_llm.enqueue("done")
    assert run_bridge(capsys, db, fake_llm, state_dir)[0] == 0
    rc = bridge.main(["--db", str(db), "--submit", str(path), *replace], environ={})
    err = capsys.readouterr().err
    assert rc == 2
    assert "this very plan 'again' is already in" in err and "completed" in err
    assert "hint: to run it again: bridge --plan again --rerun" in err


# -- 16. a plan the memory server split ------------------------------------------------------


def test_a_split_plan_says_so_with_the_fix_in_list_and_list_json(db, fake_llm, state_dir, capsys):
    """memory_store cut a long plan into 800-character chunks and kept only the first (the
    others refused as near-duplicates): --list --all and --list --all --json say why."""
    from fakes import insert_memory

    content = json.dumps(
        make_plan(id="long", steps=[{"id": n, "prompt": "x" * 150} for n in range(1, 9)]), indent=2
    )
    insert_memory(
        db,
        content[:800],
        tags="bridge-plan",
        memory_type="planning",
        metadata={
            "chunk_index": 0,
            "total_chunks": 3,
            "original_hash": bridge.content_hash(content),
        },
    )
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--all")
    assert rc == 0, err
    row, reason = out.splitlines()[:2]
    assert row.split()[1] == "invalid"
    assert reason.startswith("  invalid: plan split into 3 chunks by the memory server")
    assert reason.endswith("store it with bridge --submit")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--all", "--json")
    (entry,) = json.loads(out)["plans"]
    assert entry["status"] == "invalid"
    assert "split into 3 chunks" in entry["error"] and "bridge --submit" in entry["error"]


# -- 15. the demo's server gets the response form it takes ----------------------------------


def test_llama_cpp_python_is_sent_its_own_response_form_first(db, fake_llm, state_dir, capsys):
    """llama-cpp-python (owned_by "me" in /v1/models, llama_cpp/server/app.py) takes
    response_format json_object with a schema and answers json_schema with HTTP 500
    (llama_cpp/llama_types.py): bridge knows the server and sends json_object at once."""
    fake_llm.owned_by = "me"
    fake_llm.lmstudio = False
    insert_plan(
        db,
        make_plan(
            id="j",
            steps=[
                {"id": 1, "prompt": "p", "validation": {"type": "contains_keys", "keys": ["a"]}}
            ],
        ),
    )
    fake_llm.enqueue('{"a": 1}')
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
    assert rc == 0, err
    (request,) = fake_llm.chat_requests
    assert request["json"]["response_format"]["type"] == "json_object"
    assert "refused response_format" not in err


def test_a_plan_in_the_original_scripts_format_stays_valid(tmp_path):
    """The original script's schema (the Claude Code Ultimate Guide's
    examples/scripts/bridge-plan-schema.json) required a type and a description on
    every step and allowed context.constraints: a plan written to it is still valid
    to strict bridge; those fields are kept and never interpreted."""
    plan = {
        "$schema": PLAN_SCHEMA,
        "id": "plan_add_cache",
        "status": "pending",
        "context": {
            "project": str(tmp_path),
            "objective": "Cache the lookups",
            "constraints": ["no new dependencies"],
            "files_context": {},
        },
        "steps": [
            {
                "id": 1,
                "type": "analysis",
                "description": "Find the slow lookups",
                "prompt": "List the lookups worth caching.",
                "validation": {"type": "non_empty"},
            },
            {
                "id": 2,
                "type": "code_generation",
                "description": "Write the cache",
                "prompt": "Write cache.py.",
                "depends_on": [1],
                "validation": {"type": "syntax_check"},
                "file_output": "cache.py",
                "on_failure": "halt",
                "max_retries": 2,
            },
        ],
        "rollback_strategy": "revert_files",
    }
    checked = bridge.check_plan(plan)
    assert checked.steps[1].title == ""  # description is not the title: never interpreted


def test_show_of_a_replaced_plan_that_ran_again_names_the_old_contents_run(
    capsys, tmp_path, db, fake_llm, state_dir, project
):
    old_run = _rejected_then_replaced(capsys, tmp_path, db, fake_llm, state_dir, project)
    fake_llm.enqueue("second answer")
    assert run_bridge(capsys, db, fake_llm, state_dir)[0] == 0
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "r")
    assert rc == 0, err
    assert out.startswith("plan r: completed")
    assert (
        f"  replaced content: run {old_run} (cancelled) ran an earlier content of this plan" in out
    )
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "r", "--json")
    assert json.loads(out)["replaced_runs"] == [{"run_id": old_run, "status": "cancelled"}]


def test_a_misspelt_value_of_a_closed_list_gets_the_closest_one():
    plan = make_plan(id="v", steps=[{"id": 1, "prompt": "p", "on_failure": "skp",
                                     "validation": {"type": "jsn"}}])
    with pytest.raises(bridge.PlanInvalid) as info:
        bridge.check_plan(plan)
    problems = info.value.problems
    assert any(p.startswith("$.steps[0].on_failure: ") and p.endswith("; did you mean 'skip'?")
               for p in problems), problems
    assert any(p.startswith("$.steps[0].validation.type: ") and p.endswith("; did you mean 'json'?")
               for p in problems), problems


def test_a_steps_timeout_s_above_the_timeout_flag_leaves_the_flag_to_fire_and_retry(
    db, fake_llm, state_dir, capsys
):
    """A plan only narrows (issue 20): timeout_s 600 under --timeout 0.3 reads with 0.3 s;
    that is --timeout firing, named so and retried, not the step's deadline."""
    insert_plan(db, make_plan(id="slow", steps=[{"id": 1, "prompt": "p", "timeout_s": 600}]))
    fake_llm.enqueue("late", fault="delay", delay_s=1.5).enqueue("on time")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--timeout", "0.3")
    assert rc == 0, err
    assert "within 0.3 s (--timeout, for each chunk) (ReadTimeout); retry 1/" in err
    assert "deadline" not in err
