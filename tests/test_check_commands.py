"""Command validations (the project's own test or linter as a step's check), lists of
validations, and a plan's verify: run through bridge.main against the fake LLM server, a
real store and real subprocesses (sys.executable -c ...) in a real project folder."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

import bridge
from fakes import bridge_args, gone, insert_plan, make_plan, run_bridge, run_json, steps_by_id

PY = sys.executable
# slug.py as the model writes it: right, and wrong in a way only running it shows
RIGHT = "```python\ndef double(x):\n    return x * 2\n```"
WRONG = "```python\ndef double(x):\n    return x + 2\n```"
TEST = [PY, "-c", "import slug; got = slug.double(5); assert got == 10, f'double(5) returned {got}, expected 10'"]
UNTRUSTED = "commands run only in trusted projects"


def env_for(project: Path | None, **extra: str) -> dict[str, str]:
    """The environment bridge.main gets: PATH, and the project trusted (unless None)."""
    env = {"PATH": os.environ.get("PATH", os.defpath), **extra}
    if project is not None:
        env["BRIDGE_TRUSTED_PROJECTS"] = str(project)
    return env


def code_plan(project: Path, validation, *, max_retries: int = 2, **fields) -> dict:
    step = {"id": 1, "title": "double", "prompt": "Write slug.py with double(x).",
            "validation": validation, "file_output": "slug.py", "max_retries": max_retries}
    return make_plan("cmd", [step], context={"objective": "t", "project": str(project)}, **fields)


def marker_command(path: Path, code: int = 0) -> list[str]:
    """A command that leaves a file behind (proof that it ran) and exits with code."""
    return [PY, "-c", f"import pathlib, sys; pathlib.Path({str(path)!r}).write_text('ran'); sys.exit({code})"]


def transcript(state_dir: Path, step: int = 1) -> list[dict]:
    (run,) = (state_dir / "runs").iterdir()
    return [json.loads(line) for line in (run / f"step-{step}.jsonl").read_text().splitlines()]


def wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# --------------------------------------------------------------------------------------
# pass, fail then fixed
# --------------------------------------------------------------------------------------

def test_a_passing_command_is_recorded_in_the_result_and_the_run_log(capsys, db, fake_llm, state_dir, project):
    insert_plan(db, code_plan(project, [{"type": "syntax_check"}, {"type": "command", "run": TEST}]))
    fake_llm.enqueue(RIGHT)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 0, err
    step = steps_by_id(result)[1]
    assert (step["status"], step["attempts"]) == ("succeeded", 1)
    (check,) = step["checks"]
    assert check["argv"] == TEST and check["exit_code"] == 0 and check["attempt"] == 1
    assert isinstance(check["duration_s"], float) and check["timed_out"] is False
    assert (project / "slug.py").read_text() == "def double(x):\n    return x * 2\n"
    (line,) = [e for e in transcript(state_dir) if e.get("subtype") == "command"]
    assert line["argv"] == TEST and line["exit_code"] == 0 and line["attempt"] == 1


def test_a_failed_test_is_fed_back_and_the_retry_fixes_it(capsys, db, fake_llm, state_dir, project):
    insert_plan(db, code_plan(project, [{"type": "syntax_check"}, {"type": "command", "run": TEST}]))
    fake_llm.enqueue(WRONG).enqueue(RIGHT)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 0, err
    step = steps_by_id(result)[1]
    assert (step["status"], step["attempts"]) == ("succeeded", 2)
    first, second = step["checks"]
    assert (first["attempt"], first["exit_code"], second["attempt"], second["exit_code"]) == (1, 1, 2, 0)
    assert "AssertionError: double(5) returned 7, expected 10" in first["output_tail"]
    # what the model was told on its retry: its answer, the command, the test's own words
    retry = fake_llm.chat_requests[1]["json"]["messages"]
    assert retry[-2] == {"role": "assistant", "content": WRONG}
    note = retry[-1]["content"]
    assert "written to slug.py and checked with" in note and "failed (exit 1)" in note
    assert "AssertionError: double(5) returned 7, expected 10" in note
    assert "Traceback" in note                        # stdout and stderr, as a person sees them
    assert (project / "slug.py").read_text() == "def double(x):\n    return x * 2\n"
    lines = [e for e in transcript(state_dir) if e.get("subtype") in ("command", "validation")]
    assert [(e["subtype"], e["attempt"]) for e in lines] == [
        ("command", 1), ("validation", 1), ("command", 2), ("validation", 2)]
    assert lines[1]["ok"] is False and "failed (exit 1)" in lines[1]["error"]


def test_the_first_prompt_says_which_command_will_check_the_answer(capsys, db, fake_llm, state_dir, project):
    insert_plan(db, code_plan(project, [{"type": "syntax_check"}, {"type": "command", "run": ["make", "test"]}]))

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--dry-run", "--json", environ=env_for(project))

    assert rc == 0, err
    (entry,) = json.loads(out)["plans"]
    assert entry["commands_trusted"] is True
    assert entry["steps"][0]["commands"] == [{"run": ["make", "test"], "timeout_s": 120.0}]
    assert "checked by running `make test` in the project" in entry["steps"][0]["messages"][1]["content"]
    assert fake_llm.chat_requests == []


def test_long_output_is_kept_as_its_tail_with_a_marker(capsys, db, fake_llm, state_dir, project):
    flood = [PY, "-c", "import sys; sys.stdout.write('x' * 5_000_000 + '\\nTHE END\\n'); sys.exit(1)"]
    insert_plan(db, code_plan(project, {"type": "command", "run": flood}, max_retries=1))
    fake_llm.enqueue(RIGHT).enqueue(RIGHT)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 1, err
    check = steps_by_id(result)[1]["checks"][0]
    assert check["output_bytes"] == 5_000_009
    assert check["output_tail"].startswith("[bridge: the first ")
    assert check["output_tail"].endswith("THE END\n")
    assert len(check["output_tail"]) < bridge.COMMAND_TAIL_BYTES + 100
    note = fake_llm.chat_requests[1]["json"]["messages"][-1]["content"]
    assert "THE END" in note and "characters are left out]" in note
    assert len(note) < bridge.COMMAND_FEEDBACK_CHARS + 1000


# --------------------------------------------------------------------------------------
# files put back, timeouts, process groups
# --------------------------------------------------------------------------------------

def test_a_failed_attempts_file_is_put_back_before_the_next_attempt(capsys, db, fake_llm, state_dir, project):
    """While the retry is being answered (the fake holds its reply), slug.py is already
    the original again; after the spent attempts, too."""
    original = b"# the user's own slug.py\n"
    (project / "slug.py").write_bytes(original)
    insert_plan(db, code_plan(project, {"type": "command", "run": TEST}, max_retries=1))
    fake_llm.enqueue(WRONG).enqueue(WRONG, fault="delay", delay_s=1.0)
    seen: list[bytes] = []

    def watch() -> None:
        if wait_for(lambda: len(fake_llm.chat_requests) == 2):
            seen.append((project / "slug.py").read_bytes())
    watcher = threading.Thread(target=watch)
    watcher.start()
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))
    watcher.join()

    assert rc == 1, err
    assert seen == [original]
    assert (project / "slug.py").read_bytes() == original
    assert result["files"] == [{"path": "slug.py", "action": "reverted"}]
    assert [c["exit_code"] for c in steps_by_id(result)[1]["checks"]] == [1, 1]


def test_a_retry_writes_again_a_file_that_a_failed_attempt_created(capsys, db, fake_llm, state_dir, project):
    """The first attempt's pkg/slug.py is removed with pkg/ (revert_path); the retry makes
    both again, and the result says created."""
    plan = code_plan(project, {"type": "command", "run": [PY, "-c", "import pkg.slug as s; assert s.double(5) == 10"]})
    plan["steps"][0]["file_output"] = "pkg/slug.py"
    insert_plan(db, plan)
    fake_llm.enqueue(WRONG).enqueue(RIGHT)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 0, err
    assert (project / "pkg" / "slug.py").read_text() == "def double(x):\n    return x * 2"
    assert result["files"] == [{"path": "pkg/slug.py", "action": "created"}]


def test_a_retry_puts_back_what_an_earlier_step_wrote_not_the_original(capsys, db, fake_llm, state_dir,
                                                                    project):
    (project / "slug.py").write_text("original\n")
    plan = code_plan(project, {"type": "command", "run": TEST}, max_retries=0)
    plan["steps"][0]["id"] = 2
    plan["steps"].insert(0, {"id": 1, "prompt": "first version", "file_output": "slug.py"})
    insert_plan(db, plan)
    fake_llm.enqueue("step one's version").enqueue(WRONG)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 1, err
    assert [s["status"] for s in result["steps"]] == ["succeeded", "failed"]
    assert (project / "slug.py").read_text() == "step one's version"


def test_a_command_past_its_timeout_is_killed_with_its_children(capsys, db, fake_llm, state_dir, project,
                                                               tmp_path):
    pid_file = tmp_path / "child.pid"
    slow = [PY, "-c", "import subprocess, sys, time, pathlib; "
            f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"pathlib.Path({str(pid_file)!r}).write_text(str(child.pid)); time.sleep(60)"]
    insert_plan(db, code_plan(project, {"type": "command", "run": slow, "timeout_s": 1}, max_retries=0))
    fake_llm.enqueue(RIGHT)

    started = time.monotonic()
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 1, err
    assert time.monotonic() - started < 30
    step = steps_by_id(result)[1]
    assert "did not finish within 1 s; killed it and its process group" in step["error"]
    assert step["checks"][0]["timed_out"] is True and step["checks"][0]["exit_code"] == -9
    assert wait_for(lambda: gone(int(pid_file.read_text())))
    assert not (project / "slug.py").exists()


def test_a_child_left_running_by_a_passing_command_is_killed(capsys, db, fake_llm, state_dir, project,
                                                            tmp_path):
    pid_file = tmp_path / "child.pid"
    leaves_one = [PY, "-c", "import subprocess, sys, pathlib; "
                  "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                  f"pathlib.Path({str(pid_file)!r}).write_text(str(child.pid))"]
    insert_plan(db, code_plan(project, {"type": "command", "run": leaves_one, "timeout_s": 60}))
    fake_llm.enqueue(RIGHT)

    started = time.monotonic()
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 0, err
    assert time.monotonic() - started < 30          # the child's open pipe did not hold the check
    assert wait_for(lambda: gone(int(pid_file.read_text())))


def test_a_program_that_does_not_exist_fails_the_check_saying_so(capsys, db, fake_llm, state_dir, project):
    insert_plan(db, code_plan(project, {"type": "command", "run": ["no-such-program-bridge-test"]}, max_retries=0))
    fake_llm.enqueue(RIGHT)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 1, err
    step = steps_by_id(result)[1]
    assert "`no-such-program-bridge-test` could not start" in step["error"]
    assert step["checks"][0]["exit_code"] is None
    assert not (project / "slug.py").exists()


# --------------------------------------------------------------------------------------
# lists of validations
# --------------------------------------------------------------------------------------

def test_a_list_stops_at_the_first_failed_check(capsys, db, fake_llm, state_dir, project, tmp_path):
    second = tmp_path / "second-ran"
    insert_plan(db, code_plan(project, [{"type": "syntax_check"},
                                        {"type": "command", "run": TEST},
                                        {"type": "command", "run": marker_command(second)}], max_retries=0))
    fake_llm.enqueue(WRONG)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 1, err
    assert [c["argv"] for c in steps_by_id(result)[1]["checks"]] == [TEST]
    assert not second.exists()


def test_a_failed_syntax_check_runs_no_command_and_writes_nothing(capsys, db, fake_llm, state_dir, project,
                                                                 tmp_path):
    ran = tmp_path / "ran"
    insert_plan(db, code_plan(project, [{"type": "syntax_check"}, {"type": "command", "run": marker_command(ran)}],
                              max_retries=0))
    fake_llm.enqueue("```python\ndef double(x) return\n```")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 1, err
    step = steps_by_id(result)[1]
    assert "python syntax error" in step["error"] and step["checks"] == []
    assert not ran.exists() and not (project / "slug.py").exists()


def test_every_command_of_a_list_runs_when_all_pass(capsys, db, fake_llm, state_dir, project, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    insert_plan(db, code_plan(project, [{"type": "command", "run": marker_command(one)},
                                        {"type": "syntax_check"},
                                        {"type": "command", "run": marker_command(two)}]))
    fake_llm.enqueue(RIGHT)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 0, err
    assert one.exists() and two.exists()
    assert len(steps_by_id(result)[1]["checks"]) == 2


def test_a_json_step_with_a_list_asks_for_constrained_json_from_its_first_json_check(capsys, db, fake_llm,
                                                                                     state_dir, project):
    validation = [{"type": "non_empty"}, {"type": "contains_keys", "keys": ["cases"]},
                  {"type": "command", "run": [PY, "-c", "import json; assert json.load(open('cases.json'))['cases']"]}]
    plan = code_plan(project, validation)
    plan["steps"][0]["file_output"] = "cases.json"
    insert_plan(db, plan)
    fake_llm.enqueue('{"cases": [[1, 2]]}')

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 0, err
    sent = fake_llm.chat_requests[0]["json"]["response_format"]
    assert sent["json_schema"]["schema"]["required"] == ["cases"]


def test_a_step_without_file_output_can_check_the_tree(capsys, db, fake_llm, state_dir, project):
    (project / "ok.py").write_text("x = 1\n")
    plan = make_plan("tree", [{"id": 1, "prompt": "Say done.",
                               "validation": {"type": "command", "run": [PY, "-m", "py_compile", "ok.py"]}}],
                     context={"project": str(project)})
    insert_plan(db, plan)
    fake_llm.enqueue("done")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 0, err
    assert steps_by_id(result)[1]["checks"][0]["exit_code"] == 0


# --------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------

def test_a_failed_verify_fails_the_plan_and_revert_files_puts_the_files_back(capsys, db, fake_llm, state_dir,
                                                                            project):
    (project / "slug.py").write_text("original\n")
    verify = [PY, "-c", "import sys; print('3 tests, 1 failed'); sys.exit(1)"]
    plan = code_plan(project, {"type": "syntax_check"}, verify={"run": verify, "timeout_s": 30},
                     rollback_strategy="revert_files")
    insert_plan(db, plan)
    fake_llm.enqueue(RIGHT)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 1, err
    assert result["status"] == "failed" and result["error"].startswith("verify failed:")
    assert result["verify"]["exit_code"] == 1 and "3 tests, 1 failed" in result["verify"]["output_tail"]
    assert result["verify"]["argv"] == verify and result["verify"]["ran"] is True
    assert steps_by_id(result)[1]["status"] == "succeeded"
    assert (project / "slug.py").read_text() == "original\n"
    assert result["files"] == [{"path": "slug.py", "action": "reverted"}]


def test_a_passing_verify_completes_the_plan(capsys, db, fake_llm, state_dir, project):
    insert_plan(db, code_plan(project, {"type": "syntax_check"}, verify={"run": TEST}))
    fake_llm.enqueue(RIGHT)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 0, err
    assert result["verify"]["exit_code"] == 0 and result["status"] == "completed"


def test_verify_does_not_run_when_a_step_failed(capsys, db, fake_llm, state_dir, project, tmp_path):
    ran = tmp_path / "verify-ran"
    insert_plan(db, code_plan(project, {"type": "syntax_check"}, max_retries=0,
                              verify={"run": marker_command(ran)}))
    fake_llm.enqueue("```python\nnot python(\n```")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 1, err
    assert "verify" not in result and not ran.exists()


# --------------------------------------------------------------------------------------
# trust, environment, plans that cannot run commands
# --------------------------------------------------------------------------------------

@pytest.fixture
def untrusted(tmp_path, monkeypatch) -> Path:
    """A folder nobody trusted, whose plans the user lets run this once by answering "y"
    to the terminal question (tests/test_trust_policy.py asks it on a real pty): such
    a plan is neither trusted nor approved (plan_trusted is False)."""
    monkeypatch.setattr(bridge, "_may_ask", lambda: True)
    monkeypatch.setattr(bridge, "_ask_to_run", lambda facts: True)
    folder = tmp_path / "untrusted"
    folder.mkdir()
    return folder


def test_an_untrusted_project_runs_no_command_and_sends_nothing(capsys, db, fake_llm, state_dir, untrusted,
                                                               tmp_path):
    project = untrusted
    ran = tmp_path / "ran"
    insert_plan(db, code_plan(project, [{"type": "syntax_check"}, {"type": "command", "run": marker_command(ran)}]))
    fake_llm.enqueue(RIGHT)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir,
                               environ=env_for(None, BRIDGE_TRUSTED_PROJECTS=str(tmp_path / "elsewhere")))

    assert rc == 1, err
    step = steps_by_id(result)[1]
    assert step["status"] == "failed" and UNTRUSTED in step["error"]
    assert f"bridge --trust {project}" in step["error"]
    assert not ran.exists() and fake_llm.chat_requests == [] and not (project / "slug.py").exists()


def test_an_untrusted_verify_fails_the_plan_before_any_step_is_sent(capsys, db, fake_llm, state_dir, untrusted,
                                                                   tmp_path):
    project = untrusted
    ran = tmp_path / "ran"
    insert_plan(db, code_plan(project, {"type": "syntax_check"}, verify={"run": marker_command(ran)}))
    fake_llm.enqueue(RIGHT)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(None))

    assert rc == 1, err
    assert result["error"].startswith(f"verify: {UNTRUSTED}") and result["verify"]["ran"] is False
    assert not ran.exists() and fake_llm.chat_requests == []
    assert steps_by_id(result)[1]["status"] == "skipped"


def test_a_subfolder_of_a_trusted_folder_is_trusted(capsys, db, fake_llm, state_dir, project):
    inner = project / "inner"
    inner.mkdir()
    insert_plan(db, code_plan(inner, {"type": "command", "run": TEST}))
    fake_llm.enqueue(RIGHT)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 0, err


def test_the_command_gets_the_users_environment_without_secrets_in_the_project(capsys, db, fake_llm, state_dir,
                                                                              project, tmp_path):
    seen = tmp_path / "seen.json"
    dump = [PY, "-c", "import json, os, sys; json.dump({'env': dict(os.environ), 'cwd': os.getcwd(), "
            f"'stdin': sys.stdin.read()}}, open({str(seen)!r}, 'w'))"]
    insert_plan(db, code_plan(project, {"type": "command", "run": dump}))
    fake_llm.enqueue(RIGHT)
    environ = env_for(project, USER_SETTING="kept", BRIDGE_MODEL="x", MCP_API_KEY="secret-1",
                      ANTHROPIC_API_KEY="secret-2")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=environ)

    assert rc == 0, err
    got = json.loads(seen.read_text())
    assert got["env"]["USER_SETTING"] == "kept" and got["env"]["PATH"] == environ["PATH"]
    assert not [k for k in got["env"] if k.startswith("BRIDGE_") or k in ("MCP_API_KEY", "ANTHROPIC_API_KEY")]
    assert Path(got["cwd"]) == project.resolve()
    assert got["stdin"] == ""


def test_a_command_without_a_project_makes_the_plan_invalid(capsys, db, fake_llm, state_dir, tmp_path):
    plan = make_plan("noproj", [{"id": 1, "prompt": "p", "validation": [
        {"type": "non_empty"}, {"type": "command", "run": ["true"]}]}], verify={"run": ["true"]})
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--validate", str(path), "--json")

    assert rc == 1
    problems = json.loads(out)["problems"]
    assert problems == ["$.verify: a command runs in the project; set context.project to the folder it checks",
                        "$.steps[0].validation[1]: a command runs in the project; set context.project to "
                        "the folder it checks"]


def test_trusted_projects_come_from_the_environment(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = bridge.build_parser().parse_args([])
    config = bridge.resolve_config(args, {"BRIDGE_TRUSTED_PROJECTS": f"{a}{os.pathsep}{os.pathsep}{b}"})
    assert config.trusted_projects == (a, b)
    plan = bridge.Plan(id="p", steps={}, project=b / "sub")
    assert bridge.plan_trusted(config, plan, "hash") is True
    assert bridge.plan_trusted(config, plan._replace(project=tmp_path), "hash") is False
    assert bridge.plan_trusted(config, plan._replace(project=None), "hash") is False


# --------------------------------------------------------------------------------------
# FileTransaction.revert_path
# --------------------------------------------------------------------------------------

def test_revert_path_puts_one_file_back_and_a_later_write_counts_again(project, tmp_path):
    (project / "kept.txt").write_bytes(b"kept original\n")
    files = bridge.FileTransaction(project, tmp_path / "run")
    files.write("kept.txt", "changed\n", 1)
    files.write("new/deep.txt", "attempt 1\n", 2)

    files.revert_path("new/deep.txt")

    assert not (project / "new").exists()
    assert (project / "kept.txt").read_text() == "changed\n"
    assert files.summary() == [{"path": "kept.txt", "action": "modified"},
                               {"path": "new/deep.txt", "action": "reverted"}]
    files.write("new/deep.txt", "attempt 2\n", 2)
    assert (project / "new" / "deep.txt").read_text() == "attempt 2\n"
    assert files.summary()[1] == {"path": "new/deep.txt", "action": "created"}
    files.rollback()
    assert sorted(p.name for p in project.iterdir()) == ["kept.txt"]
    assert (project / "kept.txt").read_bytes() == b"kept original\n"


def test_interrupting_a_running_command_puts_the_file_back(capsys, db, fake_llm, state_dir, project, tmp_path):
    """Ctrl-C (SIGINT to the bridge process) while the check runs: exit 130, the command's
    group killed, the attempt's file gone."""
    import subprocess

    started = tmp_path / "started"
    slow = [PY, "-c", f"import pathlib, time; pathlib.Path({str(started)!r}).write_text('1'); time.sleep(60)"]
    insert_plan(db, code_plan(project, {"type": "command", "run": slow, "timeout_s": 120}))
    fake_llm.enqueue(RIGHT)
    argv = [PY, str(Path(bridge.__file__)), *bridge_args(db, fake_llm.url, state_dir)]
    proc = subprocess.Popen(argv, env=env_for(project), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert wait_for(started.exists, 20)
        assert (project / "slug.py").exists()
        proc.send_signal(2)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert not (project / "slug.py").exists()


def test_show_prints_each_check_and_the_verify(capsys, db, fake_llm, state_dir, project):
    verify = [PY, "-c", "import sys; print('2 passed'); sys.exit(0)"]
    insert_plan(db, code_plan(project, [{"type": "syntax_check"}, {"type": "command", "run": TEST}],
                              verify={"run": verify}))
    fake_llm.enqueue(WRONG).enqueue(RIGHT)
    run_bridge(capsys, db, fake_llm, state_dir, environ=env_for(project))

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "cmd", environ=env_for(project))

    assert rc == 0, err
    lines = [line.strip() for line in out.splitlines()]
    checks = [line for line in lines if line.startswith("check: ")]
    assert len(checks) == 2
    assert checks[0].startswith("check: attempt 1: ") and "failed (exit 1)" in checks[0]
    assert checks[0].endswith("AssertionError: double(5) returned 7, expected 10")
    assert checks[1].startswith("check: attempt 2: ") and " passed in " in checks[1]
    (shown,) = [line for line in lines if line.startswith("verify: ")]
    assert " passed in " in shown


def test_a_shell_string_command_is_a_recorded_invalid_plan_and_runs_nothing(capsys, db, fake_llm, state_dir,
                                                                           project, tmp_path):
    ran = tmp_path / "ran"
    insert_plan(db, code_plan(project, {"type": "command", "run": f"touch {ran}"}))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

    assert rc == 1
    assert any(p.startswith("$.steps[0].validation.run") for p in result["problems"]), result["problems"]
    assert not ran.exists() and fake_llm.chat_requests == []


def test_a_review_run_refuses_commands_it_could_not_check(capsys, db, fake_llm, state_dir, project, tmp_path):
    """--review stages files outside the project, where the command would not see them:
    the step fails saying so, and nothing runs or is sent."""
    ran = tmp_path / "ran"
    insert_plan(db, code_plan(project, [{"type": "syntax_check"}, {"type": "command", "run": marker_command(ran)}]))
    fake_llm.enqueue(RIGHT)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--review", environ=env_for(project))

    step = steps_by_id(result)[1]
    assert step["status"] == "failed" and "--review stages files outside it" in step["error"], step
    assert not ran.exists() and fake_llm.chat_requests == []


def test_undo_after_a_retry_fixed_by_its_test_puts_back_the_original(capsys, db, fake_llm, state_dir, project):
    """After a failed attempt's file was put back and the retry's written: --diff sees the
    file as the run left it (no later change), and --undo puts the original back."""
    (project / "slug.py").write_text("original\n")
    insert_plan(db, code_plan(project, [{"type": "syntax_check"}, {"type": "command", "run": TEST}]))
    fake_llm.enqueue(WRONG).enqueue(RIGHT)
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))
    assert rc == 0, err

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--diff", "cmd", "--json")
    assert rc == 0, err
    (entry,) = json.loads(out)["files"]
    assert entry["path"] == "slug.py" and entry["changed_since_run"] is False

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "cmd")
    assert rc == 0, err
    assert (project / "slug.py").read_text() == "original\n"


def test_a_bridge_killed_while_its_check_runs_leaves_a_file_that_resume_puts_back(capsys, db, fake_llm,
                                                                                 state_dir, project, tmp_path):
    """SIGKILL during the command: the attempt's file is in the project, journaled; --resume
    puts the original back before the step runs again (and this time passes)."""
    import signal
    import subprocess

    (project / "slug.py").write_text("original\n")
    pid_file = tmp_path / "check.pid"
    slow = [PY, "-c", "import os, pathlib, sys, time; "
            f"pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); "
            "time.sleep(0 if 'x * 2' in open('slug.py').read() else 60)"]
    insert_plan(db, code_plan(project, {"type": "command", "run": slow, "timeout_s": 120}))
    fake_llm.enqueue(WRONG)
    argv = [PY, str(Path(bridge.__file__)), *bridge_args(db, fake_llm.url, state_dir)]
    proc = subprocess.Popen(argv, env=env_for(project), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(pid_file.exists, 20)
        assert "x + 2" in (project / "slug.py").read_text()
        proc.kill()
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:                # a SIGKILLed bridge cannot stop its check (its own session): the test does
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
    seen: list[str] = []
    fake_llm.enqueue(RIGHT, fault="delay", delay_s=1.0)      # held while the watcher looks

    def watch() -> None:
        if wait_for(lambda: len(fake_llm.chat_requests) == 2):
            seen.append((project / "slug.py").read_text())
    watcher = threading.Thread(target=watch)
    watcher.start()
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--plan", "cmd", "--resume", "--json",
                              environ=env_for(project))
    watcher.join()

    assert rc == 0, err
    assert seen == ["original\n"]
    assert (project / "slug.py").read_text() == "def double(x):\n    return x * 2"


def test_a_command_with_terminal_escapes_is_shown_escaped(capsys, db, fake_llm, state_dir, project):
    insert_plan(db, code_plan(project, {"type": "command", "run": ["echo", "\x1b[2J\x1b]0;pwned\x07"]}))

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--dry-run", environ=env_for(project))

    assert rc == 0, err
    (line,) = [line for line in out.splitlines() if line.startswith("--- check: ")]
    assert "\x1b" not in line and "\x07" not in line and "\\x1b" in line
