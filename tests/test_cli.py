"""The CLI rooms and "main()": flags, configuration precedence, exit codes, --list,
--health, output streams, logging, internal errors, broken pipes and signals.

Mostly in-process through bridge.main(argv, environ=...); subprocesses only for --help,
import side effects, the broken pipe and Ctrl-C/SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bridge
from fakes import (
    bridge_args, check_store, closed_port, content_hash, dead_pid, insert_plan, iso_z, make_plan, plan_row, plan_state,
    stored_results,
)

ROOT = Path(__file__).resolve().parent.parent      # where bridge.py lives
DEFAULT_BASE_URL = "http://localhost:1234/v1"       # copied from the contract


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def bulk_insert_plans(db: Path, plans: list[dict]) -> None:
    """insert_plan for many plans in one transaction (insert_plan commits, and fsyncs, each)."""
    now = time.time()
    conn = sqlite3.connect(db)
    try:
        with conn:
            for n, plan in enumerate(plans):
                content = json.dumps(plan, indent=2)
                ts = now + n / 1000
                conn.execute(
                    "INSERT INTO memories (content_hash, content, tags, memory_type, metadata, created_at, "
                    "updated_at, created_at_iso, updated_at_iso, store, embedding_pending) "
                    "VALUES (?, ?, 'bridge-plan', 'planning', '{}', ?, ?, ?, ?, 'default', 0)",
                    (content_hash(content), content, ts, ts, iso_z(ts), iso_z(ts)))
    finally:
        conn.close()


def run_python(code: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


FAILING_STEP = {"id": 1, "prompt": "task-one", "max_retries": 0,
                "validation": {"type": "regex", "pattern": "NEVER-MATCHES"}}


# --------------------------------------------------------------------------------------
# --help and imports
# --------------------------------------------------------------------------------------

SETTINGS = [  # flag, metavar-free env var, a piece of the default the help must name
    ("--db", "BRIDGE_DB", "sqlite_vec.db"),
    ("--base-url", "BRIDGE_BASE_URL", DEFAULT_BASE_URL),
    ("--model", "BRIDGE_MODEL", "loaded"),
    ("--timeout", "BRIDGE_TIMEOUT", "300"),
    ("--state-dir", "BRIDGE_STATE_DIR", "XDG_STATE_HOME"),
    ("--memory-url", "BRIDGE_MEMORY_URL", "none"),
]


def test_help_lists_every_flag_with_env_vars_and_defaults():
    """`python bridge.py --help` exits 0, lists every flag, and each setting's help names
    its environment variable and its default."""
    proc = subprocess.run([sys.executable, "bridge.py", "--help"], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for flag in ("--plan", "--list", "--health", "--all", "--rerun", "--json", "-v", "-q",
                 "--db", "--base-url", "--model", "--timeout", "--state-dir"):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"{flag} missing from --help"
    for flag, var, default in SETTINGS:
        # the option's own entry: from its line to the next option line
        match = re.search(rf"^ {{2}}{re.escape(flag)}\b(.*?)(?=^ {{2}}-|\Z)", text, re.M | re.S)
        assert match, f"no help entry for {flag}"
        entry = " ".join(match.group(1).split())
        assert var in entry, f"{flag}: help does not name {var}: {entry!r}"
        assert "default" in entry and default in entry, f"{flag}: help does not give the default: {entry!r}"
    assert proc.stderr == ""


def test_building_help_imports_only_what_it_needs():
    """--help stays fast: building it imports none of httpx, jsonschema, sqlite3,
    typing or shutil (modules the interpreter had loaded before bridge do not count)."""
    proc = run_python("import sys\n"
                      "before = set(sys.modules)\n"
                      "import bridge\n"
                      "bridge.build_parser().format_help()\n"
                      "heavy = ('httpx', 'jsonschema', 'sqlite3', 'typing', 'shutil')\n"
                      "print([m for m in heavy if m in sys.modules and m not in before])")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("columns, width", [("60", 60), ("120", 120), ("0", 80), ("wide", 80), (None, 80)])
def test_help_fits_the_terminal_width(monkeypatch, capsys, columns, width):
    """Help is wrapped to $COLUMNS, else to stdout's terminal, else to 80 columns
    (shutil.get_terminal_size's rule, which terminal_columns follows)."""
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)

    def no_terminal(fd: int = 1):
        raise OSError("not a terminal")
    monkeypatch.setattr(os, "get_terminal_size", no_terminal)
    with pytest.raises(SystemExit) as exited:
        bridge.main(["--help"])
    assert exited.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    entries = lines[lines.index("options:"):]        # the usage lines are written by hand
    assert width - 12 < max(map(len, entries)) <= width - 2


def test_list_imports_neither_httpx_nor_jsonschema(db):
    """--list reads the store without importing httpx or jsonschema."""
    insert_plan(db, make_plan("p1"))
    proc = run_python("import sys, bridge\n"
                      f"rc = bridge.main(['--list', '--db', {str(db)!r}], environ={{}})\n"
                      "print('MODULES', 'httpx' in sys.modules, 'jsonschema' in sys.modules, rc)")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "MODULES False False 0"
    assert any(line.startswith("p1 ") for line in lines[:-1])
    check_store(db)


def test_importing_bridge_configures_no_logging():
    """Importing (and re-importing) bridge leaves the root logger alone (original defect 20).
    Run in a subprocess: reloading bridge in the test session would swap its classes
    under the other test modules."""
    proc = run_python(
        "import importlib, logging\n"
        "root = logging.getLogger()\n"
        "def snap():\n"
        "    return (list(root.handlers), root.level, logging.getLogger('httpx').level,\n"
        "            list(logging.getLogger('httpx').handlers))\n"
        "before = snap()\n"
        "import bridge\n"
        "after_import = snap()\n"
        "importlib.reload(bridge)\n"
        "after_reload = snap()\n"
        "print(before == after_import, before == after_reload, root.handlers)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True True []"


# --------------------------------------------------------------------------------------
# action flags
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["--list", "--health"],
    ["--plan", "x", "--list"],
    ["--health", "--plan", "x"],
    ["-v", "-q"],
    ["--all"],
    ["--rerun"],
], ids=["list+health", "plan+list", "health+plan", "v+q", "all-without-list", "rerun-without-plan"])
def test_conflicting_or_orphan_flags_are_usage_errors(capsys, db, fake_llm, state_dir, argv):
    """Action flags exclude each other; --all and --rerun need their action; -v and -q
    exclude each other: argparse's usage error, on one line, exit 2, nothing done (original
    defect 21; issue 24: one line plus "see bridge --help")."""
    insert_plan(db, make_plan("x"))
    with pytest.raises(SystemExit) as excinfo:
        bridge.main(argv + bridge_args(db, fake_llm.url, state_dir), environ={})
    assert excinfo.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("bridge: error: ") and err.endswith("; see bridge --help\n")
    assert err.count("\n") == 1
    assert fake_llm.requests == []
    assert plan_state(db, "x") == {}
    check_store(db)


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------

BASE_ENV = {"HOME": "/home/someone", "XDG_STATE_HOME": "/xdg/state"}

# flag, env var, flag value, env value, getter, expected from flag, from env, default
PRECEDENCE = [
    ("--base-url", "BRIDGE_BASE_URL", "http://flag-host:1/v1", "http://env-host:2/v1",
     lambda c: c.base_url, "http://flag-host:1/v1", "http://env-host:2/v1", DEFAULT_BASE_URL),
    ("--model", "BRIDGE_MODEL", "flag-model", "env-model",
     lambda c: c.model, "flag-model", "env-model", None),
    ("--timeout", "BRIDGE_TIMEOUT", "12.5", "7",
     lambda c: c.timeout_s, 12.5, 7.0, 300.0),
    ("--state-dir", "BRIDGE_STATE_DIR", "/flag/state", "/env/state",
     lambda c: c.state_dir, Path("/flag/state"), Path("/env/state"), Path("/xdg/state/bridge")),
    ("--db", "BRIDGE_DB", "/flag/store.db", "/env/store.db",
     lambda c: c.db_paths[0], Path("/flag/store.db"), Path("/env/store.db"),
     Path("/home/someone/.local/share/mcp-memory/sqlite_vec.db") if sys.platform.startswith("linux") else None),
]


@pytest.mark.parametrize("flag, var, flag_value, env_value, get, want_flag, want_env, want_default",
                         PRECEDENCE, ids=[p[0] for p in PRECEDENCE])
def test_flag_beats_env_beats_default(flag, var, flag_value, env_value, get, want_flag, want_env, want_default):
    """resolve_config: a flag wins over its BRIDGE_* variable, which wins over the default."""
    parser = bridge.build_parser()
    both = bridge.resolve_config(parser.parse_args([flag, flag_value]), {**BASE_ENV, var: env_value})
    env_only = bridge.resolve_config(parser.parse_args([]), {**BASE_ENV, var: env_value})
    neither = bridge.resolve_config(parser.parse_args([]), dict(BASE_ENV))
    assert get(both) == want_flag
    assert get(env_only) == want_env
    if want_default is not None or flag == "--model":
        assert get(neither) == want_default
    assert get(neither) not in (want_flag, want_env)


def test_state_dir_defaults_to_home_without_xdg_state_home():
    """No XDG_STATE_HOME: the state folder is ~/.local/state/bridge, from HOME in the environ."""
    config = bridge.resolve_config(bridge.build_parser().parse_args([]), {"HOME": "/home/someone"})
    assert config.state_dir == Path("/home/someone/.local/state/bridge")


BAD_VALUES = [
    ([], {"BRIDGE_TIMEOUT": "abc"}, "abc"),
    ([], {"BRIDGE_TIMEOUT": "-1"}, "-1"),
    (["--retries", "x"], {}, "x"),
    (["--base-url", "localhost:1234"], {}, "localhost:1234"),
    ([], {"BRIDGE_BASE_URL": "localhost:1234"}, "localhost:1234"),
]
BAD_IDS = ["timeout-abc", "timeout-negative", "retries-x", "base-url-flag", "base-url-env"]


@pytest.mark.parametrize("argv, env, value", BAD_VALUES, ids=BAD_IDS)
def test_bad_setting_raises_config_error(argv, env, value):
    """A value that cannot be used is a ConfigError naming it."""
    with pytest.raises(bridge.ConfigError) as excinfo:
        bridge.resolve_config(bridge.build_parser().parse_args(argv), {**BASE_ENV, **env})
    assert f"'{value}'" in str(excinfo.value)


@pytest.mark.parametrize("argv, env, value", BAD_VALUES, ids=BAD_IDS)
def test_bad_setting_via_main_is_one_error_line_and_a_hint(capsys, db, argv, env, value):
    """Through main: exit 2, "bridge: error: …" naming the value, a "hint:" line, no traceback."""
    rc = bridge.main(["--list", "--db", str(db), *argv], environ=env)
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("bridge: error:") and f"'{value}'" in lines[0]
    assert lines[1].startswith("hint:")
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------
# exit codes
# --------------------------------------------------------------------------------------


def _case_nothing_pending(db, fake_llm):
    return fake_llm.url


def _case_success(db, fake_llm):
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("hello")
    return fake_llm.url


def _case_plan_failed(db, fake_llm):
    insert_plan(db, make_plan("p1", [FAILING_STEP]))
    fake_llm.enqueue("wrong")
    return fake_llm.url


def _case_store_missing(db, fake_llm):
    db.unlink()
    return fake_llm.url


def _case_server_unreachable(db, fake_llm):
    insert_plan(db, make_plan("p1"))
    return f"http://127.0.0.1:{closed_port()}/v1"


EXIT_CASES = [  # setup, rc, stderr piece, plan p1's status afterwards (None: no plan)
    (_case_nothing_pending, 0, "no pending plans", None),
    (_case_success, 0, "completed", "completed"),
    (_case_plan_failed, 1, "failed", "failed"),
    (_case_store_missing, 2, "no memory store found", None),
    (_case_server_unreachable, 2, "cannot reach", "pending"),
]


@pytest.mark.parametrize("setup, rc_expected, says, status", EXIT_CASES,
                         ids=["nothing-pending", "success", "plan-failed", "store-missing", "server-unreachable"])
def test_exit_codes(capsys, db, fake_llm, state_dir, setup, rc_expected, says, status):
    """0 nothing to do or success, 1 a plan failed, 2 store missing or server unreachable
    (then nothing is claimed)."""
    url = setup(db, fake_llm)
    rc = bridge.main(bridge_args(db, url, state_dir), environ={})
    out, err = capsys.readouterr()
    assert rc == rc_expected
    assert out == ""
    assert says in err
    assert "Traceback" not in err
    if rc_expected == 2:
        assert "bridge: error:" in err and "hint:" in err
    if status is not None:
        assert plan_state(db, "p1").get("status", "pending") == status
        assert len(stored_results(db)) == (0 if status == "pending" else 1)
    if db.exists():
        check_store(db)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_a_step_exits_130_and_records_the_interruption(db, fake_llm, state_dir, signum):
    """Ctrl-C or SIGTERM mid-stream: exit 130 at once, plan failed "interrupted at step 1",
    a result memory stored."""
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "task-one"}, {"id": 2, "prompt": "task-two"}]))
    fake_llm.enqueue("partial answer that never finishes " * 4, fault="stall", delay_s=5)
    proc = subprocess.Popen([sys.executable, "bridge.py", *bridge_args(db, fake_llm.url, state_dir, "--timeout", "30")],
                            cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 5
        while not fake_llm.chat_requests and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert fake_llm.chat_requests, "bridge never sent the chat request"
        time.sleep(0.1)                      # let the first half of the stream arrive
        sent = time.monotonic()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=4)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert elapsed < 4
    assert "Traceback" not in err
    state = plan_state(db, "p1")
    assert state["status"] == "failed"
    assert "interrupted at step 1" in state["error"]
    results = stored_results(db)
    assert len(results) == 1
    assert results[0]["status"] == "failed" and "interrupted at step 1" in results[0]["error"]
    assert len(fake_llm.chat_requests) == 1          # step 2 never started
    check_store(db)


# --------------------------------------------------------------------------------------
# --list
# --------------------------------------------------------------------------------------

CREATED = 1_700_000_000.0          # 2023-11-14 22:13:20 UTC


def _three_plans(db):
    insert_plan(db, make_plan("p-pending", [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}],
                              context={"objective": "the pending objective"}), created_at=CREATED)
    insert_plan(db, make_plan("p-done", context={"objective": "the done objective"}),
                created_at=CREATED + 1, metadata={"bridge": {"status": "completed"}})
    insert_plan(db, make_plan("p-failed", status="failed", context={"objective": "the failed objective"}),
                created_at=CREATED + 2)


def test_list_shows_pending_plans_only(capsys, db):
    """--list: the pending plans with id, objective, step count and creation date."""
    _three_plans(db)
    rc = bridge.main(["--list", "--db", str(db)], environ={})
    out, err = capsys.readouterr()
    assert rc == 0
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("p-pending")
    assert "the pending objective" in line
    assert re.search(r"(?<!\d)2(?!\d)", line.replace("2023-11-14", "").replace("22:13:20", ""))
    assert "2023-11-14" in line
    assert "p-done" not in out and "p-failed" not in out
    check_store(db)


def test_list_all_shows_every_plan_with_its_status(capsys, db):
    """--list --all: completed and failed plans too, each with its status."""
    _three_plans(db)
    rc = bridge.main(["--list", "--all", "--db", str(db)], environ={})
    out, _ = capsys.readouterr()
    assert rc == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert set(lines) == {"p-pending", "p-done", "p-failed"}
    assert "pending" in lines["p-pending"].split()
    assert "completed" in lines["p-done"].split()
    assert "failed" in lines["p-failed"].split()


def test_list_json_document(capsys, db):
    """--list --json: {"db", "layout", "plans": [{"id", "status", "objective", "steps", "created", …}]}."""
    _three_plans(db)
    rc = bridge.main(["--list", "--json", "--db", str(db)], environ={})
    out, _ = capsys.readouterr()
    assert rc == 0
    doc = json.loads(out)
    assert doc["db"] == str(db)
    assert doc["layout"] == "doobidoo 12.x"
    assert [p["id"] for p in doc["plans"]] == ["p-pending"]
    plan = doc["plans"][0]
    assert {"id", "status", "objective", "steps", "created"} <= set(plan)
    assert (plan["status"], plan["objective"], plan["steps"]) == ("pending", "the pending objective", 2)
    assert plan["created"].startswith("2023-11-14")

    rc = bridge.main(["--list", "--all", "--json", "--db", str(db)], environ={})
    out, _ = capsys.readouterr()
    assert rc == 0
    statuses = {p["id"]: p["status"] for p in json.loads(out)["plans"]}
    assert statuses == {"p-pending": "pending", "p-done": "completed", "p-failed": "failed"}


def _now_z() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def test_in_progress_plan_with_dead_owner_is_listed_as_stale(capsys, db):
    """--list --all: in_progress with an owner pid gone from this host shows "stale";
    a live owner still shows in_progress."""
    host = socket.gethostname()
    insert_plan(db, make_plan("p-stale"), metadata={"bridge": {
        "status": "in_progress", "owner": {"host": host, "pid": dead_pid()}}})
    insert_plan(db, make_plan("p-live"), metadata={"bridge": {     # a live run beats (issue 20)
        "status": "in_progress", "owner": {"host": host, "pid": os.getpid()},
        "heartbeat_at": _now_z()}})

    rc = bridge.main(["--list", "--all", "--json", "--db", str(db)], environ={})
    out, _ = capsys.readouterr()
    assert rc == 0
    assert {p["id"]: p["status"] for p in json.loads(out)["plans"]} == {"p-stale": "stale",
                                                                       "p-live": "in_progress"}
    rc = bridge.main(["--list", "--all", "--db", str(db)], environ={})
    out, _ = capsys.readouterr()
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert "stale" in lines["p-stale"] and "in_progress" in lines["p-live"]
    check_store(db)


def test_plan_flag_refuses_a_plan_in_progress(capsys, db, fake_llm, state_dir):
    """--plan on a plan a live process owns: exit 2, says it is in progress, changes nothing."""
    owner = {"host": socket.gethostname(), "pid": os.getpid()}
    insert_plan(db, make_plan("p1"), metadata={"bridge": {"status": "in_progress", "owner": owner,
                                                          "heartbeat_at": _now_z()}})
    fake_llm.enqueue("never")
    before = plan_row(db, "p1")["metadata"]

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--plan", "p1"), environ={})
    out, err = capsys.readouterr()

    assert rc == 2
    assert out == ""
    assert "bridge: error:" in err and "in progress" in err
    assert fake_llm.chat_requests == []
    assert plan_row(db, "p1")["metadata"] == before
    check_store(db)


# --------------------------------------------------------------------------------------
# --health
# --------------------------------------------------------------------------------------


def test_health_ok_names_the_loaded_model_and_pending_count(capsys, store, fake_llm):
    """Server up and store usable: exit 0; the text names the loaded model and the pending count."""
    fake_llm.models = ["a", "loaded-one"]
    fake_llm.loaded = "loaded-one"
    rc = bridge.main(["--health", "--db", str(store), "--base-url", fake_llm.url], environ={})
    out, _ = capsys.readouterr()
    assert rc == 0
    assert "loaded-one" in out
    assert re.search(r"(?<!\d)1 pending", out)        # the fixture store holds one pending plan
    check_store(store)


def test_health_json_document(capsys, store, fake_llm):
    """--health --json: server.reachable/models/loaded, store.path/layout/pending, ok."""
    fake_llm.models = ["a", "loaded-one"]
    fake_llm.loaded = "loaded-one"
    rc = bridge.main(["--health", "--json", "--db", str(store), "--base-url", fake_llm.url], environ={})
    out, _ = capsys.readouterr()
    assert rc == 0
    doc = json.loads(out)
    assert doc["server"]["reachable"] is True
    assert doc["server"]["models"] == ["a", "loaded-one"]
    assert doc["server"]["loaded"] == "loaded-one"
    assert doc["store"]["path"] == str(store)
    assert doc["store"]["layout"] == "doobidoo 12.x"
    assert doc["store"]["pending"] == 1
    assert doc["ok"] is True


def test_health_server_down_exits_2(capsys, store):
    """--health with nothing listening: exit 2, ok false, reachable false."""
    rc = bridge.main(["--health", "--json", "--db", str(store), "--base-url", f"http://127.0.0.1:{closed_port()}/v1"],
                     environ={})
    out, _ = capsys.readouterr()
    assert rc == 2
    doc = json.loads(out)
    assert doc["ok"] is False
    assert doc["server"]["reachable"] is False
    assert doc["store"]["pending"] == 1               # the store part still reports


def test_health_store_missing_exits_2(capsys, tmp_path, fake_llm):
    """--health with no store file: exit 2, ok false, the store part says why."""
    missing = tmp_path / "nowhere.db"
    rc = bridge.main(["--health", "--json", "--db", str(missing), "--base-url", fake_llm.url], environ={})
    out, _ = capsys.readouterr()
    assert rc == 2
    doc = json.loads(out)
    assert doc["ok"] is False
    assert doc["server"]["reachable"] is True
    assert "error" in doc["store"] and str(missing) in doc["store"]["error"]
    assert not missing.exists()


# --------------------------------------------------------------------------------------
# output streams and logging
# --------------------------------------------------------------------------------------


def test_json_run_prints_one_document_on_stdout_progress_on_stderr(capsys, db, fake_llm, state_dir):
    """--json on a run: stdout is exactly {"plans": [result]}; progress goes to stderr."""
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("hello")
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--json"), environ={})
    out, err = capsys.readouterr()
    assert rc == 0
    doc = json.loads(out)                          # one document, nothing else on stdout
    assert list(doc) == ["plans"]
    assert [r["plan_id"] for r in doc["plans"]] == ["p1"]
    assert doc["plans"][0]["status"] == "completed"
    assert "p1" in err and "step 1" in err
    check_store(db)


def test_quiet_run_prints_nothing_on_success(capsys, db, fake_llm, state_dir):
    """-q: a successful run writes nothing to stderr (or stdout)."""
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("hello")
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "-q"), environ={})
    out, err = capsys.readouterr()
    assert rc == 0
    assert out == "" and err == ""
    assert plan_state(db, "p1")["status"] == "completed"
    check_store(db)


def test_verbose_shows_prompt_and_output_default_does_not(capsys, db, fake_llm, state_dir):
    """-v prints the prompt sent and the output on stderr; without -v neither appears
    (original defect 20)."""
    insert_plan(db, make_plan("p-plain", [{"id": 1, "prompt": "PROMPT-MARKER-PLAIN"}]))
    insert_plan(db, make_plan("p-verbose", [{"id": 1, "prompt": "PROMPT-MARKER-VERBOSE"}]))
    fake_llm.enqueue("OUTPUT-MARKER-PLAIN").enqueue("OUTPUT-MARKER-VERBOSE")

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--plan", "p-plain"), environ={})
    out, plain_err = capsys.readouterr()
    assert rc == 0
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--plan", "p-verbose", "-v"), environ={})
    out, verbose_err = capsys.readouterr()
    assert rc == 0

    assert "PROMPT-MARKER-VERBOSE" in verbose_err and "OUTPUT-MARKER-VERBOSE" in verbose_err
    assert "PROMPT-MARKER-PLAIN" not in plain_err and "OUTPUT-MARKER-PLAIN" not in plain_err
    check_store(db)


class _CurrentStderrHandler(logging.StreamHandler):
    """A StreamHandler that writes to whatever sys.stderr is when a record is emitted
    (capsys swaps sys.stderr between fixture setup and the test call)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


@pytest.fixture
def debug_logging():
    """What logging.basicConfig(level=DEBUG) does (a stderr handler on the root logger at
    DEBUG), applied even though pytest's own handlers make basicConfig a no-op; undone after."""
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    quiet = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers),
                    logging.getLogger(name).propagate) for name in ("httpx", "httpcore")}
    handler = _CurrentStderrHandler()
    handler.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, (level, handlers, propagate) in quiet.items():
            logger = logging.getLogger(name)
            logger.setLevel(level)
            logger.handlers[:] = handlers
            logger.propagate = propagate


def test_httpx_request_log_never_reaches_stderr(capsys, db, fake_llm, state_dir, debug_logging):
    """With the root logger at DEBUG on stderr, httpx's "HTTP Request:" lines still do not
    appear (original defect 20)."""
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("hello")
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "-v"), environ={})
    out, err = capsys.readouterr()
    assert rc == 0
    assert "p1" in err                       # stderr was captured
    assert "HTTP Request:" not in err
    check_store(db)


# --------------------------------------------------------------------------------------
# internal errors and broken pipes
# --------------------------------------------------------------------------------------


def _store_with_malformed_owner(db: Path) -> None:
    # metadata.bridge.owner should be an object; a list makes the stale check blow up
    insert_plan(db, make_plan("p1"), metadata={"bridge": {"status": "in_progress", "owner": [1, 2]}})


def _simulate_a_bug(monkeypatch):
    """There is no known bug to trigger, so stand one in for the error boundary test."""
    def cmd_list(config, show_all):
        raise RuntimeError("a bug")
    monkeypatch.setattr(bridge, "cmd_list", cmd_list)


def test_malformed_owner_in_metadata_is_not_a_crash(capsys, db):
    """Someone else's odd metadata (owner not an object) still lists cleanly; with no
    heartbeat it counts as stale (issue 20: no state may keep a plan in_progress for good)."""
    _store_with_malformed_owner(db)
    rc = bridge.main(["--list", "--all", "--db", str(db)], environ={})
    assert rc == 0
    assert "stale" in capsys.readouterr().out


def test_internal_error_exits_70_without_traceback(capsys, db, monkeypatch):
    """An unexpected exception: exit 70, "internal error", no traceback."""
    _simulate_a_bug(monkeypatch)
    rc = bridge.main(["--list", "--all", "--db", str(db)], environ={})
    out, err = capsys.readouterr()
    assert rc == 70
    assert "internal error" in err
    assert "Traceback" not in err
    assert "--debug" in err
    check_store(db)


def test_internal_error_with_debug_prints_the_traceback_and_still_exits_70(capsys, db, monkeypatch):
    """--debug (or BRIDGE_DEBUG=1) prints the unexpected exception's traceback; the exit stays 70."""
    _simulate_a_bug(monkeypatch)
    for argv, environ in ((["--debug"], {}), ([], {"BRIDGE_DEBUG": "1"})):
        rc = bridge.main(["--list", "--all", "--db", str(db), *argv], environ=environ)
        err = capsys.readouterr().err
        assert rc == 70
        assert "Traceback" in err and "RuntimeError: a bug" in err


def test_stdout_closed_early_exits_0_without_traceback(db):
    """`bridge --list | head -c 1`: a broken pipe ends quietly with exit 0."""
    bulk_insert_plans(db, [make_plan(f"plan-{n:03d}", context={"objective": f"objective {n} " + "x" * 1000})
                           for n in range(200)])
    proc = subprocess.Popen([sys.executable, "bridge.py", "--list", "--db", str(db)], cwd=ROOT,
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.read(1)
        proc.stdout.close()                 # ~200 KB still to write: the pipe breaks
        err = proc.stderr.read().decode("utf-8", "replace")
        rc = proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert first == b"p"
    assert rc == 0, err
    assert "Traceback" not in err
    assert "Exception ignored" not in err and "BrokenPipe" not in err
    check_store(db)
