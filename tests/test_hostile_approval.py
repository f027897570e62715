"""Issue 20, rows 3, 4 and 10 (hostile input, round 3): approval shows everything it lets
happen, and a plan only narrows the user's limits. Every test is the attack as a new user
meets it: the real CLI (bridge.main, or a bridge process on a pseudo-terminal) against the
fake LLM server of tests/fakes.py on 127.0.0.1, a real store and a temporary HOME.

| row | attack | before | after |
|---|---|---|---|
| 3 | an untrusted plan with a `command` check and a `verify`; the user runs `--list`, then `--approve` | `--list`, `--list --json`, the waiting line and `--approve` never showed the argv; both ran after approval | each names every argv, its folder and timeout (`runs`); so does the terminal question |
| 3b | the same plan in a trusted project, seen with `--dry-run` | commands shown, but not the facts approval shows | the same facts block (`approval` in `--json`) |
| 4 | an approved plan that `LOAD`s `.npmrc` | approval never named the files a plan reads | `reads` names each LOAD file, and a refused one with why (`.env`) |
| 4b | a plan naming `anthropic:` and `claude-cli:` models | models shown, executors not | `executors` lists them |
| 10 | a plan with no project, step `timeout_s: 86400`, the user's `--timeout 1`, a silent server | waited for the server as long as the plan said | the user's 1 s holds; the step fails on it |
| 10b | the same through `defaults.timeout_s`; the approval facts of such a plan | - | narrowed the same; `limits` says what the plan asked and what is used |
| 10c | a step's `timeout_s` lower than the user's `--timeout` | used | still used (a plan may narrow) |
| 10d | a step's `max_retries: 10`, the user's `--max-retries 1` (or BRIDGE_MAX_RETRIES) | no such limit: 11 attempts | 2 attempts |
| 10e | a step's `max_tokens: 10**9`, the user's `--max-output-bytes 1000` | held already | still holds: the reply is cut, the attempt fails |
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bridge
from fakes import bridge_args, child_env, insert_plan, make_plan, plan_state, run_bridge, run_json

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CHECK = [PY, "-m", "pytest", "-q", "tests/test_slug.py"]
VERIFY = ["make", "test", "--keep-going"]


@pytest.fixture
def untrusted(tmp_path) -> Path:
    folder = tmp_path / "untrusted"
    folder.mkdir()
    return folder


def command_plan(project: Path, plan_id: str = "cmds", **fields) -> dict:
    (project / "notes.md").write_text("notes\n")
    step = {"id": 1, "prompt": "Write slug.py.", "file_output": "slug.py",
            "validation": {"type": "command", "run": CHECK, "timeout_s": 30}}
    context = {"objective": "t", "project": str(project), "files_context": {"notes.md": "LOAD"}}
    return make_plan(plan_id, [step], verify={"run": VERIFY, "timeout_s": 600}, context=context,
                     **fields)


def argv_shown(text: str, argv: list[str]) -> bool:
    return bridge.shell_words(argv) in text


# --------------------------------------------------------------------------------------
# row 3: every command and verify argv, with its folder, in every view of approval
# --------------------------------------------------------------------------------------

def test_row3_list_and_list_json_show_every_command_with_its_folder(capsys, db, fake_llm, state_dir,
                                                                    untrusted):
    insert_plan(db, command_plan(untrusted))

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list")
    assert rc == 0, err
    assert argv_shown(out, CHECK) and argv_shown(out, VERIFY)
    assert f"step 1 check: `{bridge.shell_words(CHECK)}` in {untrusted}, timeout 30 s" in out
    assert f"verify: `{bridge.shell_words(VERIFY)}` in {untrusted}, timeout 600 s" in out

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--json")
    (row,) = json.loads(out)["plans"]
    assert row["approval"]["runs"] == [
        {"what": "step 1 check", "run": CHECK, "cwd": str(untrusted), "timeout_s": 30},
        {"what": "verify", "run": VERIFY, "cwd": str(untrusted), "timeout_s": 600}]


def test_row3_the_waiting_line_and_approve_show_the_commands(capsys, db, fake_llm, state_dir,
                                                             untrusted):
    insert_plan(db, command_plan(untrusted))

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)          # the waiting line
    assert rc == 0 and "awaiting approval" in err
    assert argv_shown(err, CHECK) and argv_shown(err, VERIFY) and f"in {untrusted}" in err
    assert fake_llm.chat_requests == [] and plan_state(db, "cmds") == {}

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--approve", "cmds")
    assert rc == 0, err
    assert out.startswith("approved plan 'cmds'")
    assert argv_shown(out, CHECK) and argv_shown(out, VERIFY) and f"in {untrusted}" in out
    assert "writes: slug.py" in out and "reads (sent to the model): notes.md" in out


def test_row3_the_terminal_question_shows_the_commands(db, fake_llm, state_dir, untrusted):
    import pty
    insert_plan(db, command_plan(untrusted))
    master, slave = pty.openpty()
    argv = [PY, str(ROOT / "bridge.py"), *bridge_args(db, fake_llm.url, state_dir)]
    proc = subprocess.Popen(argv, stdin=slave, stderr=slave, stdout=subprocess.DEVNULL,
                            env=child_env())
    os.close(slave)
    seen, deadline = b"", time.monotonic() + 20
    try:
        while b"[y/N]" not in seen and time.monotonic() < deadline and proc.poll() is None:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 4096)
        os.write(master, b"\n")                   # No
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    question = seen.decode("utf-8", "replace")
    assert "[y/N]" in question
    assert argv_shown(question, CHECK) and argv_shown(question, VERIFY)
    assert str(untrusted) in question


def test_row3b_a_trusted_projects_dry_run_shows_the_same_facts(capsys, db, fake_llm, state_dir,
                                                               project):
    insert_plan(db, command_plan(project))

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--dry-run")
    assert rc == 0, err
    assert f"step 1 check: `{bridge.shell_words(CHECK)}` in {project}, timeout 30 s" in out
    assert "reads (sent to the model): notes.md" in out and "writes: slug.py" in out

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--dry-run", "--json")
    (entry,) = json.loads(out)["plans"]
    assert entry["approval"]["may_run"] is True
    assert [r["what"] for r in entry["approval"]["runs"]] == ["step 1 check", "verify"]


# --------------------------------------------------------------------------------------
# row 4: the files a plan reads and sends to the model, refused ones with why
# --------------------------------------------------------------------------------------

def test_row4_approval_names_the_files_a_plan_loads(capsys, db, fake_llm, state_dir, untrusted):
    (untrusted / ".npmrc").write_text("//registry.npmjs.org/:_authToken=npm_row4\n")
    (untrusted / ".env").write_text("SECRET=1\n")
    (untrusted / "settings.txt").symlink_to(untrusted / ".env")         # a variant: by a link
    (untrusted.parent / "outside.txt").write_text("not the project's\n")
    files = {".npmrc": "LOAD", ".env": "LOAD", "README.md": "REFERENCE", "settings.txt": "LOAD",
             "../outside.txt": "LOAD"}
    plan = make_plan("reads", [{"id": 1, "prompt": "Repeat the files."}],
                     context={"objective": "t", "project": str(untrusted), "files_context": files})
    insert_plan(db, plan)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list")
    assert rc == 0, err
    assert ".npmrc" in out and ".env (refused: LOAD file '.env' " in out

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--json")
    reads = {r["path"]: r["refused"] for r in json.loads(out)["plans"][0]["approval"]["reads"]}
    assert set(reads) == {".npmrc", ".env", "settings.txt", "../outside.txt"}  # REFERENCE: no text
    assert reads[".env"] == bridge.secret_file_reason(".env")        # the deny-list's own words
    assert reads["settings.txt"] == bridge.secret_file_reason(".env")
    assert reads["../outside.txt"] and "'..'" in reads["../outside.txt"]


def test_row4_approve_prints_the_files_it_lets_the_model_read(capsys, db, fake_llm, state_dir,
                                                              untrusted):
    (untrusted / "config").mkdir()
    (untrusted / "config" / "settings.toml").write_text("[db]\nhost = 'x'\n")
    plan = make_plan("reads", [{"id": 1, "prompt": "Summarise."}],
                     context={"objective": "t", "project": str(untrusted),
                              "files_context": {"config/settings.toml": "LOAD"}})
    insert_plan(db, plan)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--approve", "reads")

    assert rc == 0, err
    assert "reads (sent to the model): config/settings.toml" in out


def test_row4b_approval_names_the_executors(capsys, db, fake_llm, state_dir, untrusted):
    steps = [{"id": 1, "prompt": "a", "model": "anthropic:claude-haiku-4-5"},
             {"id": 2, "prompt": "b", "model": "claude-cli:haiku"}, {"id": 3, "prompt": "c"}]
    plan = make_plan("paid", steps, context={"objective": "t", "project": str(untrusted)})
    insert_plan(db, plan)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--json")

    executors = json.loads(out)["plans"][0]["approval"]["executors"]
    assert executors == ["anthropic", "claude-cli", "openai"]
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list")
    assert "(executors: anthropic, claude-cli, openai)" in out


# --------------------------------------------------------------------------------------
# row 10: a plan only narrows the user's limits
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["step", "defaults"])
def test_row10_a_plans_timeout_does_not_replace_the_users(capsys, db, fake_llm, state_dir, where):
    step = {"id": 1, "prompt": "hi", "max_retries": 0}
    fields = {}
    if where == "step":
        step["timeout_s"] = 86400
    else:
        fields["defaults"] = {"timeout_s": 86400}
    insert_plan(db, make_plan("slow", [step], **fields))
    fake_llm.enqueue("late answer", fault="delay", delay_s=4)       # silent for 4 s, then answers

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--timeout", "1", "--retries", "0")

    assert rc == 1, err
    (step,) = result["steps"]
    assert step["status"] == "failed" and step["output"] != "late answer"


def test_row10c_a_lower_step_timeout_still_narrows(capsys, db, fake_llm, state_dir):
    step = {"id": 1, "prompt": "hi", "max_retries": 0, "timeout_s": 0.5}
    insert_plan(db, make_plan("quick", [step]))
    fake_llm.enqueue("late answer", fault="delay", delay_s=3)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--retries", "0")   # --timeout 300

    assert rc == 1, err
    assert result["steps"][0]["status"] == "failed"


def test_row10b_approval_names_the_limits_a_plan_asks_above_the_users(capsys, db, fake_llm,
                                                                     state_dir, untrusted):
    steps = [{"id": 1, "prompt": "hi", "timeout_s": 86400, "max_retries": 10},
             {"id": 2, "prompt": "ok", "timeout_s": 1}]
    plan = make_plan("slow", steps, context={"objective": "t", "project": str(untrusted)})
    insert_plan(db, plan)

    limited = ("--timeout", "2", "--max-retries", "3")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--json", *limited)

    limits = json.loads(out)["plans"][0]["approval"]["limits"]
    deadline = bridge.DEFAULT_REQUEST_DEADLINE_S
    assert [(x["step"], x["field"], x["asked"], x["limit"], x["used"]) for x in limits] == [
        (1, "max_retries", 10, 3, 3), (1, "timeout_s", 86400, 2, 2),
        (1, "timeout_s", 86400, deadline, deadline)]
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", *limited)
    assert "step 1 asks timeout_s 86400 s, above --timeout (per read) 2 s; 2 s is used" in out
    assert "limit: step 1 asks max_retries 10, above --max-retries 3; 3 is used" in out


@pytest.mark.parametrize("flag", [True, False])
def test_row10d_a_plans_max_retries_is_cut_to_the_users(capsys, db, fake_llm, state_dir, flag):
    never = {"type": "regex", "pattern": "^THIS NEVER MATCHES$"}
    insert_plan(db, make_plan("many", [{"id": 1, "prompt": "hi", "max_retries": 10,
                                        "validation": never}]))
    for _ in range(11):
        fake_llm.enqueue("no")
    extra, environ = (("--max-retries", "1"), {}) if flag else ((), {"BRIDGE_MAX_RETRIES": "1"})

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, *extra, environ=environ)

    assert rc == 1, err
    assert result["steps"][0]["attempts"] == 2 and len(fake_llm.chat_requests) == 2


def test_row10e_a_plans_max_tokens_does_not_raise_the_output_limit(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("big", [{"id": 1, "prompt": "hi", "max_retries": 0,
                                       "max_tokens": 10**9}]))
    fake_llm.enqueue("x" * 5000)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--max-output-bytes", "1000")

    assert rc == 1, err
    assert result["steps"][0]["status"] == "failed"


def test_narrowed():
    assert (bridge.narrowed(None, 5), bridge.narrowed(9, 5), bridge.narrowed(2, 5)) == (5, 5, 2)


def test_list_shows_the_facts_of_a_plan_it_does_not_check(capsys, db, fake_llm, state_dir,
                                                          untrusted):
    """--list reads plans without the schema: odd shapes in what it shows are still shown."""
    step = {"id": 1, "prompt": "x", "timeout_s": "soon", "max_retries": "many",
            "validation": {"type": "command", "run": ["make", 7], "timeout_s": "later"}}
    plan = make_plan("odd", [step], context={"objective": "t", "project": str(untrusted)},
                     verify={"run": ["true"], "timeout_s": None})
    insert_plan(db, plan)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list")

    assert rc == 0, err
    assert "runs: step 1 check: `make 7` in" in out and "timeout 'later'" in out


def test_approval_refuses_a_load_as_validation_does_when_the_project_lies_in_a_secret_folder(
        capsys, db, fake_llm, state_dir, tmp_path):
    """A project inside ~/.aws: its LOAD files are secrets by their absolute real path.
    --list (which reads plans unchecked) shows the LOAD refused, with the reason
    --validate gives (one rule: load_secret_reason)."""
    project = tmp_path / ".aws" / "proj"
    project.mkdir(parents=True)
    (project / "notes.txt").write_text("aws_secret_access_key = x\n")
    plan = make_plan("aws", [{"id": 1, "prompt": "Repeat it."}],
                     context={"objective": "t", "project": str(project),
                              "files_context": {"notes.txt": "LOAD"}})
    insert_plan(db, plan)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--json")
    assert rc == 0, err
    (read,) = json.loads(out)["plans"][0]["approval"]["reads"]
    with pytest.raises(bridge.PlanInvalid) as refused:
        bridge.check_plan(plan)
    assert read["refused"] and read["refused"] in str(refused.value)
