"""Issue 20, rows 8 and 9 (hostile input, round 3): what a plan's check commands can take
and leave behind. Every test is an attack driven through bridge.main() against the fake
LLM server of tests/fakes.py (127.0.0.1, port 0), a real store, a real project folder and
real subprocesses, or run_command itself for the variants of a class.

| row | attack | before | after |
|---|---|---|---|
| 8 | a `command` check `["env"]` that passes, bridge started with GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY, ANTHROPIC_AUTH_TOKEN, OPENAI_API_KEY | all four stored in the result (`output_tail`) | the check gets none of them; a passing check keeps no output |
| 8b | the same names and GH_TOKEN, NPM_TOKEN, PGPASSWORD, DATABASE_URL, AZURE_CLIENT_SECRET, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN, SSH_AUTH_SOCK, MY_SERVICE_API_KEY, AWS_REGION | reached the command | none reach it; TOKENIZERS_PARALLELISM, GIT_AUTHOR_NAME, PATH still do |
| 8c | a failing check that prints a token it found another way (a project file holding GITHUB_TOKEN's value) | the value in the result, run log, retry prompt, stderr | `[redacted $GITHUB_TOKEN]` everywhere; the store file holds no copy |
| 8d | a model that echoes a secret of bridge's environment; a LOAD file holding one | in the result, the prompt and --json | redacted in the prompt sent, the result memory, the transcript and stdout |
| 8e | the user names NPM_TOKEN with --pass-env (or BRIDGE_PASS_ENV) | - | the check gets it; its value is still redacted from the output |
| 9 | a check that starts a child with `setsid` and passes | the child outlived the check and bridge | gone when the check ends |
| 9b | a double-fork daemon (fork, setsid, fork, ignore SIGTERM/SIGHUP) from a failing check; from a verify; a setsid child of a check that times out | outlived it | gone when the check ends |
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

import bridge
from fakes import gone, insert_plan, make_plan, read_rows, run_bridge, run_json, steps_by_id

PY = sys.executable
RIGHT = "```python\ndef double(x):\n    return x * 2\n```"
CREDENTIALS = {
    "GITHUB_TOKEN": "ghp_row8GithubTokenValue0123456789",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/row8AwsSecretKey",
    "ANTHROPIC_AUTH_TOKEN": "sk-ant-row8-anthropic-auth-token",
    "OPENAI_API_KEY": "sk-row8-openai-api-key-0123456789",
}
MORE_CREDENTIALS = {
    "GH_TOKEN": "gho_variantGhTokenValue987654321",
    "NPM_TOKEN": "npm_variantNpmTokenValue12345",
    "PGPASSWORD": "variant-pg-password-value",
    "DATABASE_URL": "postgres://app:variant-db-pass@127.0.0.1/app",
    "AZURE_CLIENT_SECRET": "variant-azure-client-secret",
    "GOOGLE_APPLICATION_CREDENTIALS": "/home/me/variant-gcp-sa.json",
    "HF_TOKEN": "hf_variantHuggingFaceToken",
    "SSH_AUTH_SOCK": "/tmp/ssh-variant/agent.4242",
    "MY_SERVICE_API_KEY": "variant-my-service-api-key",
    "AWS_REGION": "eu-west-3",
}
HARMLESS = {"TOKENIZERS_PARALLELISM": "false", "GIT_AUTHOR_NAME": "Row Eight Author"}
DUMP_ENV = [PY, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]


def env_for(project: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath), "BRIDGE_TRUSTED_PROJECTS": str(project),
            **extra}


def command_plan(project: Path, run: list[str], *, max_retries: int = 0, **fields) -> dict:
    step = {"id": 1, "title": "double", "prompt": "Write slug.py with double(x).",
            "file_output": "slug.py", "max_retries": max_retries,
            "validation": [{"type": "syntax_check"}, {"type": "command", "run": run}]}
    return make_plan("cmd", [step], context={"objective": "t", "project": str(project)}, **fields)


def every_byte_written(*roots: Path) -> bytes:
    """The bytes of every file under roots (the store, the state dir): where a secret could hide."""
    found = b""
    for root in roots:
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if path.is_file():
                found += path.read_bytes()
    return found


def kill_left(pid_file: Path) -> None:
    """Kill what a failed defence left running (so a failing test does not leak it)."""
    if pid_file.exists() and pid_file.read_text().strip():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


# --------------------------------------------------------------------------------------
# row 8: no credentials reach a check, a passing check keeps no output, secrets redacted
# --------------------------------------------------------------------------------------

def test_row8_a_passing_env_check_stores_no_credential(capsys, db, fake_llm, state_dir, project):
    insert_plan(db, command_plan(project, ["env"]))
    fake_llm.enqueue(RIGHT)

    environ = env_for(project, **CREDENTIALS)
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=environ)

    assert rc == 0, err
    (check,) = steps_by_id(result)[1]["checks"]
    assert check["exit_code"] == 0 and check["output_tail"] == "" and check["output_bytes"] > 0
    stored = every_byte_written(db, state_dir) + json.dumps(result).encode() + err.encode()
    assert [name for name, value in CREDENTIALS.items() if value.encode() in stored] == []


def test_row8_variants_no_credential_reaches_a_check_but_ordinary_variables_do(
        capsys, db, fake_llm, state_dir, project):
    seen = project.parent / "seen.json"
    dump = [PY, "-c", "import json, os, pathlib; "
                      f"pathlib.Path({str(seen)!r}).write_text(json.dumps(dict(os.environ)))"]
    insert_plan(db, command_plan(project, dump))
    fake_llm.enqueue(RIGHT)
    environ = env_for(project, **CREDENTIALS, **MORE_CREDENTIALS, **HARMLESS,
                      MCP_API_KEY="mcp-key-of-the-memory-server")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=environ)

    assert rc == 0, err
    got = json.loads(seen.read_text())
    kept_out = {*CREDENTIALS, *MORE_CREDENTIALS, "MCP_API_KEY", "BRIDGE_TRUSTED_PROJECTS"}
    assert sorted(set(got) & kept_out) == []
    assert {k: got.get(k) for k in HARMLESS} == HARMLESS
    assert got["PATH"] == os.environ.get("PATH", os.defpath)


def test_row8_a_failing_check_that_prints_a_secret_is_redacted_everywhere(
        capsys, db, fake_llm, state_dir, project):
    token = CREDENTIALS["GITHUB_TOKEN"]
    (project / "ci.cfg").write_text(f"token = {token}\n")     # the check finds it another way
    leak = [PY, "-c", "import sys; print(open('ci.cfg').read()); sys.exit(1)"]
    insert_plan(db, command_plan(project, leak, max_retries=1))
    fake_llm.enqueue(RIGHT).enqueue(RIGHT)

    environ = env_for(project, **CREDENTIALS)
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--json", "-v", environ=environ)

    assert rc == 1, err
    result = json.loads(out)["plans"][0]
    first = steps_by_id(result)[1]["checks"][0]
    assert "token = [redacted $GITHUB_TOKEN]" in first["output_tail"]
    retry = json.dumps(fake_llm.chat_requests[1]["json"]["messages"])
    assert "[redacted $GITHUB_TOKEN]" in retry and token not in retry
    assert token not in out and token not in err
    assert token.encode() not in every_byte_written(db, state_dir)


def test_row8_a_secret_in_a_load_file_or_echoed_by_the_model_is_redacted(
        capsys, db, fake_llm, state_dir, project):
    secret = MORE_CREDENTIALS["MY_SERVICE_API_KEY"]
    (project / "notes.md").write_text(f"the service key is {secret}\n")
    context = {"objective": "t", "project": str(project), "files_context": {"notes.md": "LOAD"}}
    plan = make_plan("echo", [{"id": 1, "prompt": "Repeat the notes."}], context=context)
    insert_plan(db, plan)
    fake_llm.enqueue(f"The key: {secret}")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--json", "-v",
                              environ=env_for(project, MY_SERVICE_API_KEY=secret))

    assert rc == 0, err
    sent = json.dumps(fake_llm.chat_requests[0]["json"])
    assert secret not in sent and "[redacted $MY_SERVICE_API_KEY]" in sent
    result = json.loads(out)["plans"][0]
    assert result["steps"][0]["output"] == "The key: [redacted $MY_SERVICE_API_KEY]"
    assert secret not in out and secret not in err
    assert secret.encode() not in every_byte_written(db, state_dir)
    (memory,) = [r for r in read_rows(db) if "bridge-result" in (r.get("tags") or "")]
    assert "[redacted $MY_SERVICE_API_KEY]" in memory["content"]


def test_row8_a_secret_in_the_input_of_a_grounded_step_is_not_in_its_span_schema(
        capsys, db, fake_llm, state_dir, project):
    secret = MORE_CREDENTIALS["MY_SERVICE_API_KEY"]
    (project / "notes.md").write_text(f"service key {secret} owner Ada\n")
    context = {"objective": "t", "project": str(project), "files_context": {"notes.md": "LOAD"}}
    step = {"id": 1, "prompt": "Who owns it?", "max_retries": 0,
            "validation": {"type": "contains_keys", "keys": ["owner"], "grounded": True}}
    insert_plan(db, make_plan("spans", [step], context=context))
    fake_llm.enqueue('```json\n{"owner": "Ada"}\n```')

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--json",
                              environ=env_for(project, MY_SERVICE_API_KEY=secret))

    assert rc == 0, err
    sent = fake_llm.chat_requests[0]["json"]
    assert "response_format" in sent and "Ada" in json.dumps(sent["response_format"])
    assert secret not in json.dumps(sent)


@pytest.mark.parametrize("how", ["flag", "variable"])
def test_row8_pass_env_lets_a_named_credential_through_still_redacted(
        capsys, db, fake_llm, state_dir, project, how):
    token = MORE_CREDENTIALS["NPM_TOKEN"]
    check = [PY, "-c", "import os, sys; print(os.environ.get('NPM_TOKEN')); "
                       "print(os.environ.get('GITHUB_TOKEN')); sys.exit(1)"]
    insert_plan(db, command_plan(project, check))
    fake_llm.enqueue(RIGHT)
    extra, environ = ((("--pass-env", "NPM_TOKEN"), {}) if how == "flag"
                      else ((), {"BRIDGE_PASS_ENV": "NPM_TOKEN"}))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, *extra,
                               environ=env_for(project, NPM_TOKEN=token, **CREDENTIALS, **environ))

    assert rc == 1, err
    tail = steps_by_id(result)[1]["checks"][0]["output_tail"]
    assert tail.splitlines() == ["[redacted $NPM_TOKEN]", "None"]  # got it, not shown; no other


def test_secret_env_names_table():
    looks = ["GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "OPENAI_API_KEY",
             "PGPASSWORD", "ANTHROPIC_AUTH_TOKEN", "MCP_API_KEY", "DB_PASS", "SLACK_WEBHOOK_SECRET",
             "GHTOKEN", "APIKEY", "SENTRY_DSN", "DATABASE_URL", "github_pat", "SSH_AUTH_SOCK",
             "X_CREDENTIALS"]
    plain = ["PATH", "HOME", "PWD", "OLDPWD", "TOKENIZERS_PARALLELISM", "GIT_AUTHOR_NAME",
             "KEYTIMEOUT", "MONKEY_MODE", "PASSAGE", "LANG", "AWS_REGION", "BRIDGE_PASS_ENV"]
    assert [n for n in looks if not bridge.secret_env_name(n)] == []
    assert [n for n in plain if bridge.secret_env_name(n)] == []
    assert bridge.credential_env_name("AWS_REGION")
    assert bridge.credential_env_name("ANTHROPIC_BASE_URL")
    assert not bridge.credential_env_name("GIT_AUTHOR_NAME")


def test_redaction_skips_short_values_and_values_also_held_by_plain_names():
    bridge.remember_secrets({"SHORT_TOKEN": "1234567", "SAME_SECRET": "/home/me",
                             "HOME": "/home/me", "LONG_TOKEN": "abcdefgh"})
    try:
        shown = bridge.redact("1234567 /home/me abcdefgh")
        assert shown == "1234567 /home/me [redacted $LONG_TOKEN]"
        assert bridge.redact({"k": ["abcdefgh", 3]}) == {"k": ["[redacted $LONG_TOKEN]", 3]}
    finally:
        bridge.remember_secrets({})


# --------------------------------------------------------------------------------------
# row 9: nothing a check starts outlives it
# --------------------------------------------------------------------------------------

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child subreaper is Linux's")
def test_row9_a_setsid_child_of_a_passing_check_is_gone_when_it_ends(
        capsys, db, fake_llm, state_dir, project, tmp_path):
    pid_file = tmp_path / "daemon.pid"
    daemon = (f"import os, pathlib, time; pathlib.Path({str(pid_file)!r})"
              ".write_text(str(os.getpid())); time.sleep(300)")
    check = [PY, "-c", "import pathlib, subprocess, sys, time\n"
                       f"subprocess.Popen(['setsid', sys.executable, '-c', {daemon!r}])\n"
                       f"while not pathlib.Path({str(pid_file)!r}).exists(): time.sleep(0.01)\n"]
    insert_plan(db, command_plan(project, check))
    fake_llm.enqueue(RIGHT)
    try:
        rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

        assert rc == 0, err
        assert gone(int(pid_file.read_text()))
    finally:
        kill_left(pid_file)


# fork, setsid, fork again, ignore SIGTERM and SIGHUP, sleep: the textbook daemon
DAEMON = ("import os, pathlib, signal, sys, time\n"
          "if os.fork() == 0:\n"
          "    os.setsid()\n"
          "    if os.fork() == 0:\n"
          "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
          "        signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
          "        pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))\n"
          "        time.sleep(300)\n"
          "    os._exit(0)\n"
          "os.wait()\n"
          "while not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.01)\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child subreaper is Linux's")
@pytest.mark.parametrize("exit_code", [0, 1])
def test_row9_a_double_fork_daemon_is_gone_when_the_check_ends(tmp_path, exit_code):
    pid_file = tmp_path / "daemon.pid"
    argv = [PY, "-c", DAEMON + f"sys.exit({exit_code})", str(pid_file)]
    try:
        run = bridge.run_command(argv, tmp_path, dict(os.environ), 30)

        assert run.exit_code == exit_code, run
        assert gone(int(pid_file.read_text()))
    finally:
        kill_left(pid_file)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child subreaper is Linux's")
def test_row9_a_daemon_of_a_check_that_times_out_or_is_cancelled_is_gone(tmp_path):
    for stop in ("timeout", "cancel"):
        pid_file = tmp_path / f"{stop}.pid"
        argv = [PY, "-c", DAEMON + "time.sleep(300)", str(pid_file)]
        cancel = threading.Event()
        if stop == "cancel":
            def cancel_once_started(path=pid_file):
                pid_file_ready(path)
                cancel.set()
            threading.Thread(target=cancel_once_started, daemon=True).start()
        try:
            limit_s = 2 if stop == "timeout" else 60
            run = bridge.run_command(argv, tmp_path, dict(os.environ), limit_s, cancel)

            assert run.error and (run.timed_out is (stop == "timeout")), run
            assert gone(int(pid_file.read_text()))
        finally:
            kill_left(pid_file)


def pid_file_ready(path: Path) -> None:
    """Wait (bounded) until a daemon wrote its pid."""
    import time
    deadline = time.monotonic() + 20
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the child subreaper is Linux's")
def test_row9_a_daemon_of_the_verify_is_gone_and_a_missing_program_still_says_so(
        capsys, db, fake_llm, state_dir, project, tmp_path):
    pid_file = tmp_path / "verify.pid"
    plan = make_plan("v", [{"id": 1, "prompt": "hi"}],
                     context={"objective": "t", "project": str(project)},
                     verify={"run": [PY, "-c", DAEMON, str(pid_file)]})
    insert_plan(db, plan)
    fake_llm.enqueue("hello")
    try:
        rc, result, err = run_json(capsys, db, fake_llm, state_dir, environ=env_for(project))

        assert rc == 0, err
        assert result["verify"]["exit_code"] == 0 and gone(int(pid_file.read_text()))
    finally:
        kill_left(pid_file)
    missing = bridge.run_command(["no-such-program-of-row-9"], tmp_path, dict(os.environ), 10)
    assert missing.exit_code is None
    assert missing.error.endswith("could not start: No such file or directory")
