"""Issue 21 (a)-(c): the model server's key, failures of the server that stop a run
once, and a prompt the server cut that never passes as success.

| test | server | what must hold |
|---|---|---|
| key sent | FakeKeyed, BRIDGE_API_KEY / --api-key | every request carries the bearer token; it is in no output, store row or run file |
| key missing | FakeKeyed, no key | exit 2 before any claim, one error line naming BRIDGE_API_KEY |
| server faults | FakeLLM answering "No models loaded", Ollama's not-found and no-chat, "Failed to load model", a 401 mid-run | exit 2 after one request, no result stored, every plan still pending |
| plan cut mid-run | step 1 done, step 2 meets the fault | the plan is left in_progress (stale once bridge exits) and --resume finishes it, keeping step 1 |
| server gone | connections dropped past --retries | exit 2 once, the wait said; the plan pending |
| prompt cut | FakeOllama's OpenAI endpoint, a 29 KB LOAD file | the attempt fails naming both token counts and the fix; not retried |
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

import bridge
from fake_servers import FakeKeyed, FakeOllama, ollama_kept_tokens
from fakes import (
    FakeMemoryAPI, bridge_args, dead_pid, insert_plan, make_plan, plan_state, read_rows,
    set_plan_state, steps_by_id, stored_results,
)

KEY = "sk-fake-secret-7f3a"


@pytest.fixture
def keyed():
    with FakeKeyed(KEY) as server:
        yield server


@pytest.fixture
def ollama():
    with FakeOllama() as server:
        yield server


def _files_text(folder: Path) -> str:
    return "".join(p.read_text("utf-8", "replace") for p in folder.rglob("*") if p.is_file()) \
        if folder.exists() else ""


def run(capsys, db, url, state_dir, *extra, environ=None):
    rc = bridge.main(bridge_args(db, url, state_dir, *extra), environ=environ or {})
    out, err = capsys.readouterr()
    return rc, out, err


# -- the key -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["env", "flag"])
def test_key_goes_to_every_request_of_the_model_server_and_nowhere_else(
        capsys, db, keyed, state_dir, how):
    insert_plan(db, make_plan("k1"))
    keyed.enqueue("hello")
    environ = {"BRIDGE_API_KEY": KEY} if how == "env" else {}
    extra = ("--api-key", KEY) if how == "flag" else ()
    rc, out, err = run(capsys, db, keyed.url, state_dir, "--json", "-v", *extra, environ=environ)
    assert rc == 0, err
    assert keyed.requests
    assert all(r["headers"].get("authorization") == f"Bearer {KEY}" for r in keyed.requests)
    assert KEY not in out + err
    assert all(KEY not in json.dumps(row) for row in read_rows(db))
    assert KEY not in _files_text(state_dir)
    # a step's commands never get it: bridge's own variables stay out of their environment
    args = bridge.build_parser().parse_args(["--api-key", KEY])
    config = bridge.resolve_config(args, {"BRIDGE_API_KEY": KEY})
    assert all(KEY not in value for _, value in config.tool_env)


def test_the_key_never_reaches_the_memory_server(capsys, db, keyed, state_dir):
    insert_plan(db, make_plan("m"))
    keyed.enqueue("hello")
    with FakeMemoryAPI(db) as memory:
        rc, _, err = run(capsys, db, keyed.url, state_dir, "--memory-url", memory.url,
                         environ={"BRIDGE_API_KEY": KEY, "MCP_API_KEY": "test-key"})
        assert rc == 0, err
        assert memory.posts                         # the result went through it
        assert all(KEY not in json.dumps(r["headers"]) for r in memory.requests)


def test_health_with_the_key_and_without(capsys, db, keyed, state_dir):
    rc, _, err = run(capsys, db, keyed.url, state_dir, "--health", environ={"BRIDGE_API_KEY": KEY})
    assert rc == 0, err
    rc, out, err = run(capsys, db, keyed.url, state_dir, "--health")
    assert rc == 2
    assert "401" in out and "BRIDGE_API_KEY" in out


def test_no_key_stops_before_any_plan_is_claimed_naming_the_setting(capsys, db, keyed, state_dir):
    insert_plan(db, make_plan("k1"))
    insert_plan(db, make_plan("k2"))
    rc, out, err = run(capsys, db, keyed.url, state_dir)
    assert rc == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("bridge: error: the model server wants a key")
    assert "HTTP 401" in lines[0]
    assert lines[1].startswith("hint:") and "BRIDGE_API_KEY" in lines[1] and "--api-key" in lines[1]
    assert len(lines) == 2
    assert stored_results(db) == []
    assert len(keyed.requests) == 1                 # the probe: nothing retried
    rc, _, err = run(capsys, db, keyed.url, state_dir, environ={"BRIDGE_API_KEY": "wrong"})
    assert rc == 2 and "refused the key" in err and "wrong" not in err


# -- failures of the server stop the run once --------------------------------------------

FAULTS = {
    # LM Studio with JIT off or failing (lmstudio-ai/lms#107; bug tracker #1730)
    "no-models-loaded": (404, {"error": "No models loaded. Please load a model in the developer "
                                        "page or use the 'lms load' command."}, "lms load"),
    # Ollama server/routes.go
    "ollama-not-pulled": (404, {"error": {
        "message": 'model "qwen3:4b" not found, try pulling it first', "type": "not_found_error"}},
        "ollama pull qwen3:4b"),
    "no-chat": (400, {"error": {"message": '"nomic-embed-text:latest" does not support chat',
                                "type": "invalid_request_error"}}, "not a chat model"),
    # LM Studio load failure (agent-zero#215)
    "failed-to-load": (404, {"error": 'Failed to load model "big-model". Error: Model loading '
                                      "aborted due to insufficient system resources"},
                       "lms load big-model --context-length"),
    # a key revoked mid-run (LM Studio 0.4 Require Authentication: opencode-lmstudio#41)
    "key-refused": (401, {"error": {"message": "Invalid API key", "type": "invalid_request",
                                    "code": "invalid_api_key"}}, "BRIDGE_API_KEY"),
}


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_a_failure_of_the_server_stops_the_run_once_and_no_plan_fails(
        capsys, db, fake_llm, state_dir, name):
    status, body, fix = FAULTS[name]
    for plan_id in ("s1", "s2", "s3"):
        insert_plan(db, make_plan(plan_id, [{"id": 1, "prompt": "a", "max_retries": 3},
                                            {"id": 2, "prompt": "b"}]))
    fake_llm.enqueue(status=status, error_body=body)
    rc, out, err = run(capsys, db, fake_llm.url, state_dir, "--model", "fake-model")
    assert rc == 2, err
    assert len(fake_llm.chat_requests) == 1         # not per attempt, not per step, not per plan
    [line] = [x for x in err.splitlines() if x.startswith("bridge: error:")]
    assert "the run stops (plan s1 stays pending)" in line
    assert fix in err
    assert "Traceback" not in err
    assert stored_results(db) == []
    for plan_id in ("s1", "s2", "s3"):
        assert plan_state(db, plan_id).get("status", "pending") == "pending"


def test_a_plan_cut_mid_run_is_left_to_resume_and_resume_keeps_its_done_steps(
        capsys, db, fake_llm, state_dir, project):
    steps = [{"id": 1, "prompt": "write it", "file_output": "a.txt"},
             {"id": 2, "prompt": "then this", "depends_on": [1]}]
    insert_plan(db, make_plan("cut", steps, context={"objective": "o", "project": str(project)},
                              rollback_strategy="revert_files"))
    fake_llm.enqueue("first file").enqueue(status=404, error_body=FAULTS["no-models-loaded"][1])
    rc, _, err = run(capsys, db, fake_llm.url, state_dir)
    assert rc == 2, err
    assert "plan cut is left to resume: bridge --plan cut --resume" in err
    assert stored_results(db) == []
    state = plan_state(db, "cut")
    assert state["status"] == "in_progress"          # not failed: stale once this bridge exits
    assert (project / "a.txt").read_text() == "first file"
    # bridge has exited
    set_plan_state(db, "cut", owner={"host": socket.gethostname(), "pid": dead_pid()})
    fake_llm.reset().enqueue("second")
    rc, out, err = run(capsys, db, fake_llm.url, state_dir, "--plan", "cut", "--resume", "--json")
    assert rc == 0, err
    [result] = json.loads(out)["plans"]
    assert result["status"] == "completed"
    assert len(fake_llm.chat_requests) == 1          # step 1 kept, only step 2 sent
    assert steps_by_id(result)[1]["output"] == "first file"


def test_a_server_gone_mid_run_is_waited_for_then_stops_the_run_once(
        capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("g1", [{"id": 1, "prompt": "a", "max_retries": 2},
                                     {"id": 2, "prompt": "b"}]))
    insert_plan(db, make_plan("g2"))
    for _ in range(3):                              # 1 + --retries 2, all dropped
        fake_llm.enqueue(fault="drop")
    rc, _, err = run(capsys, db, fake_llm.url, state_dir, "--retries", "2")
    assert rc == 2, err
    assert len(fake_llm.chat_requests) == 3         # one request's retries, not every attempt's
    [line] = [x for x in err.splitlines() if x.startswith("bridge: error:")]
    assert "stopped answering" in line and "over 2 retries" in line and "stays pending" in line
    assert stored_results(db) == []
    assert plan_state(db, "g1").get("status") == "pending"


# -- a prompt the server cut ---------------------------------------------------------------


def big_load_plan(project: Path) -> dict:
    """A step with a 29 KB LOAD file (~8,300 tokens by bridge's estimate): issue 21's case."""
    rows = "".join(f"row {i}: value {i * 7} of the table\n" for i in range(900))
    (project / "data.txt").write_text(rows)
    assert 28_000 < (project / "data.txt").stat().st_size < 31_000
    step = {"id": 1, "prompt": "Summarise data.txt in one line.", "max_retries": 2}
    return make_plan("big", [step],
                     context={"objective": "summarise", "project": str(project),
                              "files_context": {"data.txt": "LOAD"}})


def test_a_prompt_the_server_cut_fails_naming_both_numbers(capsys, db, ollama, state_dir, project):
    insert_plan(db, big_load_plan(project))
    ollama.running = []         # loaded by this first request (the context it gets is not said)
    ollama.enqueue("a summary of the last rows only")
    rc, out, err = run(capsys, db, ollama.root + "/v1", state_dir, "--model", "llama3.1:8b",
                       "--json", "--ollama-api", "openai")
    assert rc == 1, err
    [result] = json.loads(out)["plans"]
    step = steps_by_id(result)[1]
    assert step["status"] == "failed" and step["attempts"] == 1      # the same prompt is cut again
    seen = ollama.chat_requests[0]["seen_tokens"]
    assert seen == ollama_kept_tokens(4096)
    assert f"counted {seen + 1} prompt tokens of the ~" in step["error"]
    assert "larger context" in step["error"] and "--context-length" in step["error"]


def test_a_prompt_counted_whole_passes(capsys, db, fake_llm, state_dir, project):
    """FakeLLM counts 4 characters a token, bridge estimates 3.5: no false alarm."""
    insert_plan(db, big_load_plan(project))
    fake_llm.enqueue("summary")
    rc, _, err = run(capsys, db, fake_llm.url, state_dir, "--context-length", "32768")
    assert rc == 0, err
