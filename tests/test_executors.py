"""The room "Other executors" and the escalation (room "Retry policy"): anthropic: (the Messages API,
against a real fake HTTP server), claude-cli: (a fake `claude` script on PATH), model
references, the usage ledger and --escalate-to. Always driven through bridge.main()."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import bridge
from fakes import (
    bridge_args, check_store, insert_plan, make_plan, plan_state, read_rows, run_bridge, run_json,
    stored_results, write_fake_claude,
)

# Literals copied from the contract (the README) and the Messages API, never read at run time.
ANTHROPIC_VERSION = "2023-06-01"
HAIKU = "anthropic:claude-haiku-4-5"
HAIKU_PRICE = (1.00, 5.00)          # US dollars per million tokens, input and output
FAKE_CLAUDE_COST = 0.0123           # total_cost_usd of the fake claude's result line


# --------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------


@pytest.fixture
def claude_bin(tmp_path) -> Path:
    """A folder holding the fake `claude` script."""
    bin_dir = tmp_path / "bin"
    write_fake_claude(bin_dir)
    return bin_dir


@pytest.fixture
def claude_log(tmp_path) -> Path:
    return tmp_path / "claude-log.jsonl"


def claude_env(bin_dir: Path, log: Path, mode: str = "ok", **extra: str) -> dict:
    """The environ passed to main for a claude-cli: run: the fake's folder first on PATH,
    and secrets claude must not get (BRIDGE_*, MCP_API_KEY, GITHUB_TOKEN, AWS_*)."""
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CLAUDE_FAKE_MODE": mode, "CLAUDE_FAKE_LOG": str(log),
            "ANTHROPIC_API_KEY": "sk-test", "BRIDGE_SECRET": "x", "MCP_API_KEY": "y", "GITHUB_TOKEN": "ghp_x",
            "AWS_SECRET_ACCESS_KEY": "aws", **extra}


def claude_calls(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]


def approve(capsys, db, fake_llm, state_dir, plan_id: str) -> None:
    """`bridge --approve ID`, as the user would (into the test's hermetic home)."""
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--approve", plan_id)
    assert rc == 0, err


def step1(result: dict) -> dict:
    return next(s for s in result["steps"] if s["id"] == 1)


def haiku_cost(prompt_tokens: int, completion_tokens: int) -> float:
    return round((prompt_tokens * HAIKU_PRICE[0] + completion_tokens * HAIKU_PRICE[1]) / 1e6, 6)


def keys_step(**fields) -> dict:
    return {"id": 1, "prompt": "Reply with a JSON object holding key a.",
            "validation": {"type": "contains_keys", "keys": ["a"]}, **fields}


def rejection(output: str) -> str:
    """What bridge's own check says about an output that fails contains_keys ["a"]."""
    with pytest.raises(bridge.OutputInvalid) as info:
        bridge.check_output(output, {"type": "contains_keys", "keys": ["a"]})
    return str(info.value)


# --------------------------------------------------------------------------------------
# model references and prices
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref, expected", [
    ("anthropic:claude-haiku-4-5", ("anthropic", "claude-haiku-4-5")),
    ("claude-cli:haiku", ("claude-cli", "haiku")),
    ("openai:qwen", ("openai", "qwen")),
    ("qwen2.5-7b", ("openai", "qwen2.5-7b")),
    ("lmstudio-community/x:Q4", ("openai", "lmstudio-community/x:Q4")),
    ("qwen3:8b", ("openai", "qwen3:8b")),
    ("anthropic:", ("openai", "anthropic:")),
])
def test_parse_model_ref_splits_executor_prefixes_only(ref, expected):
    """Only a known executor prefix is split off; a colon inside an LM Studio or Ollama
    key stays part of the model name, and a bare name is an openai: model."""
    assert bridge.parse_model_ref(ref) == expected


def test_claude_price_knows_dated_ids_and_not_others():
    """A dated model id is priced as its family; a local model has no Claude price."""
    assert bridge.claude_price("claude-haiku-4-5-20251001") == HAIKU_PRICE
    assert bridge.claude_price("claude-haiku-4-5") == HAIKU_PRICE
    assert bridge.claude_price("claude-sonnet-4-5-20250929") == (3.00, 15.00)
    assert bridge.claude_price("claude-opus-4-1-20250805") == (15.00, 75.00)
    assert bridge.claude_price("qwen2.5-7b") is None


# --------------------------------------------------------------------------------------
# the registry: adding an executor is one class and its registry line
# --------------------------------------------------------------------------------------


class EchoExecutor(bridge.Executor):
    """A throwaway executor, registered by the echo_executor fixture: it answers each chat
    with "ok", streamed, and keeps what it was asked."""

    NAME = PREFIX = "echo-test"
    AGENTIC = True                  # so it needs --allow-executor echo-test
    asked: list = []

    def __init__(self, config, on_retry=None):
        self.config = config

    def chat(self, messages, request):
        EchoExecutor.asked.append((messages, request))
        request.on_delta("ok")
        return bridge.Completion("ok", {"prompt_tokens": 7, "completion_tokens": 1},
                                 request.model, "stop", 0.01, 0.0)


@pytest.fixture
def echo_executor():
    EchoExecutor.asked = []
    bridge.register_executor(EchoExecutor)
    try:
        yield EchoExecutor
    finally:
        bridge.EXECUTORS.pop(EchoExecutor.NAME)


def test_a_registered_executor_is_allowed_by_flag_and_runs_a_plans_step(capsys, db, fake_llm,
                                                                         state_dir, echo_executor):
    """One class plus register_executor: the approval facts name its executor, the plan
    waits for --allow-executor echo-test (an AGENTIC one), and once allowed its step runs on
    it through chat(messages, ChatRequest), the other on the local server."""
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Say ok.", "model": "echo-test:m1"},
                                     {"id": 2, "prompt": "Say hi.", "depends_on": [1]}]))
    fake_llm.enqueue("hi")
    approve(capsys, db, fake_llm, state_dir, "p1")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--json")
    [listed] = json.loads(out)["plans"]
    assert listed["approval"]["executors"] == ["echo-test", "openai"], listed
    assert "bridge --allow-executor echo-test" in listed["approval"]["commands"]
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--json")
    [waiting] = json.loads(out)["awaiting_approval"]
    assert waiting["reasons"] == ["its steps run on echo-test: models, which you have not allowed"]
    assert echo_executor.asked == [] and "status" not in plan_state(db, "p1")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--allow-executor", "echo-test")

    assert rc == 0, err
    assert result["status"] == "completed"
    by_id = {s["id"]: s for s in result["steps"]}
    assert by_id[1]["output"] == "ok" and by_id[1]["model"] == "echo-test:m1"
    assert by_id[2]["output"] == "hi"
    [(messages, request)] = echo_executor.asked
    assert request.model == "m1" and "Say ok." in messages[-1]["content"]
    assert isinstance(request, bridge.ChatRequest)
    assert len(fake_llm.chat_requests) == 1
    check_store(db)


def test_the_help_of_allow_executor_names_every_registered_executor(echo_executor, capsys,
                                                                   monkeypatch):
    """--allow-executor's help lists the registry's names, a registered one included: adding
    an executor needs no edit of the settings table."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        bridge.main(["--help"])
    entry = " ".join(capsys.readouterr().out.split("--allow-executor NAME", 1)[1].split())
    assert entry.startswith("let steps run on a paid, agentic or remote executor "
                            "(ollama-cloud, anthropic, claude-cli, echo-test); repeatable"), entry


def test_an_executor_not_registered_is_no_name_to_allow(capsys, db, fake_llm, state_dir):
    """--allow-executor takes the registry's names only (argparse choices, exit 2)."""
    assert "echo-test" not in bridge.allowable_executors()
    assert bridge.allowable_executors() == ("ollama-cloud", "anthropic", "claude-cli")
    with pytest.raises(SystemExit) as info:
        run_bridge(capsys, db, fake_llm, state_dir, "--allow-executor", "echo-test", "--list")
    assert info.value.code == 2
    assert bridge.parse_model_ref("echo-test:m1") == ("openai", "echo-test:m1")


def test_registering_a_taken_name_or_prefix_is_refused():
    class Twin(bridge.Executor):
        NAME, PREFIX = "twin", "anthropic"
    with pytest.raises(ValueError, match="already registered"):
        bridge.register_executor(Twin)
    assert "twin" not in bridge.EXECUTORS


# --------------------------------------------------------------------------------------
# anthropic: executor
# --------------------------------------------------------------------------------------


def test_anthropic_model_sends_a_messages_request_and_records_its_cost(capsys, db, fake_llm, fake_anthropic,
                                                                        state_dir):
    """--model anthropic:… posts /v1/messages with the key, the API version, a top-level
    system and no system message; nothing reaches the local server; the streamed text is
    validated and stored; usage and cost come from message_start/message_delta."""
    steps = [keys_step(system="Be terse.", temperature=0.3),
             {"id": 2, "prompt": "Say ok.", "max_tokens": 777}]
    insert_plan(db, make_plan("p1", steps))
    fake_anthropic.enqueue('{"a": 1, "b": "two"}', input_tokens=1200, output_tokens=300)
    fake_anthropic.enqueue("ok", input_tokens=40, output_tokens=2)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--anthropic-base-url", fake_anthropic.url,
                               "--model", HAIKU,
                               environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 0, err
    assert result["status"] == "completed"
    by_id = {s["id"]: s for s in result["steps"]}
    assert by_id[1]["status"] == "succeeded" and by_id[1]["attempts"] == 1
    assert json.loads(by_id[1]["output"]) == {"a": 1, "b": "two"}          # ping and future_thing events ignored
    assert by_id[1]["usage"] == {"prompt_tokens": 1200, "completion_tokens": 300}
    assert by_id[1]["cost_usd"] == haiku_cost(1200, 300) == 0.0027
    assert by_id[1]["model"] == "claude-haiku-4-5-20251001"
    assert by_id[2]["output"] == "ok"
    assert result["cost_usd"] == round(haiku_cost(1200, 300) + haiku_cost(40, 2), 6)
    assert result["ledger"] == {HAIKU: {"requests": 2, "prompt_tokens": 1240, "completion_tokens": 302,
                                        "cost_usd": round(haiku_cost(1200, 300) + haiku_cost(40, 2), 6)}}
    assert fake_llm.requests == []                               # no probe of the local server

    reqs = fake_anthropic.requests
    assert [(r["method"], r["path"]) for r in reqs] == [("POST", "/v1/messages")] * 2
    first, second = reqs[0], reqs[1]
    assert first["headers"]["x-api-key"] == "sk-test"
    assert first["headers"]["anthropic-version"] == ANTHROPIC_VERSION
    body = first["json"]
    assert body["model"] == "claude-haiku-4-5"
    assert body["max_tokens"] == 4096
    assert body["stream"] is True
    assert body["system"] == "Be terse."
    assert body["temperature"] == 0.3
    assert all(m["role"] != "system" for m in body["messages"])
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert "Reply with a JSON object holding key a." in body["messages"][0]["content"]
    assert second["json"]["max_tokens"] == 777
    assert second["json"]["system"] == bridge.DEFAULT_SYSTEM_PROMPT
    assert "temperature" not in second["json"]

    stored = stored_results(db)
    assert len(stored) == 1
    assert stored[0]["cost_usd"] == result["cost_usd"]
    assert json.loads({s["id"]: s["output"] for s in stored[0]["steps"]}[1]) == {"a": 1, "b": "two"}
    assert plan_state(db, "p1")["status"] == "completed"
    check_store(db)


def test_anthropic_error_event_after_200_fails_the_attempt_and_the_next_attempt_runs(
        capsys, db, fake_llm, fake_anthropic, state_dir):
    """An `error` event inside a 200 stream fails that attempt with the API's message;
    the step's next attempt carries it and succeeds."""
    insert_plan(db, make_plan("p1", [keys_step(max_retries=1)]))
    fake_anthropic.enqueue(fault="error_event")
    fake_anthropic.enqueue('{"a": 1}', input_tokens=10, output_tokens=4)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--anthropic-base-url", fake_anthropic.url,
                               "--model", HAIKU,
                               environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 0, err
    step = step1(result)
    assert step["status"] == "succeeded"
    assert step["attempts"] == 2
    assert len(fake_anthropic.requests) == 2
    retry_prompt = "\n".join(m["content"] for m in fake_anthropic.requests[1]["json"]["messages"])
    assert "Overloaded" in retry_prompt
    assert "Overloaded" in err
    check_store(db)


def test_anthropic_error_event_names_the_error_when_attempts_run_out(capsys, db, fake_llm, fake_anthropic,
                                                                     state_dir):
    """A step whose only attempt meets an error event fails with "Overloaded" in its error."""
    insert_plan(db, make_plan("p1", [keys_step(max_retries=0)]))
    fake_anthropic.enqueue(fault="error_event")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--anthropic-base-url", fake_anthropic.url,
                               "--model", HAIKU,
                               environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 1
    step = step1(result)
    assert step["status"] == "failed"
    assert step["attempts"] == 1
    assert "Overloaded" in step["error"]
    assert len(fake_anthropic.requests) == 1
    assert plan_state(db, "p1")["status"] == "failed"
    check_store(db)


@pytest.mark.parametrize("status, retry_delay", [(529, "0"), (429, "5")])
def test_anthropic_overloaded_and_rate_limited_are_retried_honouring_retry_after(
        capsys, db, fake_llm, fake_anthropic, state_dir, status, retry_delay):
    """529 (overloaded) and 429 with retry-after: 0 are retried at once within the same
    attempt; with --retry-delay 5 the run still takes no time, so retry-after was honoured."""
    insert_plan(db, make_plan("p1", [keys_step(max_retries=0)]))
    fake_anthropic.enqueue(status=status, retry_after=0)
    fake_anthropic.enqueue('{"a": 1}', input_tokens=10, output_tokens=4)
    extra = ["--anthropic-base-url", fake_anthropic.url, "--model", HAIKU, "--retry-delay", retry_delay]

    started = time.monotonic()
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, *extra, environ={"ANTHROPIC_API_KEY": "sk-test"})
    elapsed = time.monotonic() - started

    assert rc == 0, err
    assert elapsed < 2.0
    step = step1(result)
    assert step["status"] == "succeeded"
    assert step["attempts"] == 1
    assert json.loads(step["output"]) == {"a": 1}
    assert len(fake_anthropic.requests) == 2
    check_store(db)


def test_anthropic_retries_are_reported_like_local_ones(capsys, db, fake_llm, fake_anthropic, state_dir):
    """A retried Messages request is said on stderr ("retrying: … Overloaded"), as a
    retried local request is; a backoff of up to RETRY_BUDGET_S must not be silent."""
    insert_plan(db, make_plan("p1", [keys_step(max_retries=0)]))
    fake_anthropic.enqueue(status=529, retry_after=0)
    fake_anthropic.enqueue('{"a": 1}')

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--anthropic-base-url", fake_anthropic.url,
                               "--model", HAIKU,
                               environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 0, err
    assert len(fake_anthropic.requests) == 2
    assert "retrying:" in err
    assert "Overloaded" in err
    check_store(db)


def test_anthropic_without_api_key_exits_2_before_claiming(capsys, db, fake_llm, fake_anthropic, state_dir):
    """No ANTHROPIC_API_KEY for an anthropic: model: exit 2 with a hint, nothing sent,
    the plan still pending and no result stored."""
    insert_plan(db, make_plan("p1", [keys_step()]))
    before = read_rows(db)

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--anthropic-base-url", fake_anthropic.url,
                                 "--model", HAIKU), environ={})
    out, err = capsys.readouterr()

    assert rc == 2
    assert out == ""
    assert "Anthropic API key" in err
    assert "hint:" in err and "ANTHROPIC_API_KEY" in err
    assert fake_anthropic.requests == []
    assert fake_llm.requests == []
    assert plan_state(db, "p1") == {}
    assert read_rows(db) == before
    assert stored_results(db) == []
    check_store(db)


def test_anthropic_error_body_message_appears_in_the_failure(capsys, db, fake_llm, fake_anthropic, state_dir):
    """A 400 with the API's error body fails the step with error.message in its error
    (and is not retried within the attempt)."""
    message = "max_tokens: 999999 > 64000, which is the maximum allowed number of output tokens"
    insert_plan(db, make_plan("p1", [keys_step(max_retries=0)]))
    fake_anthropic.enqueue(status=400, error_body={"type": "error", "error": {
        "type": "invalid_request_error", "message": message}})

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--anthropic-base-url", fake_anthropic.url,
                               "--model", HAIKU,
                               environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 1
    step = step1(result)
    assert step["status"] == "failed"
    assert message in step["error"]
    assert "400" in step["error"]
    assert len(fake_anthropic.requests) == 1
    check_store(db)


def test_anthropic_base_url_comes_from_the_environment(capsys, db, fake_llm, fake_anthropic, state_dir):
    """ANTHROPIC_BASE_URL in the environ passed to main points the anthropic: executor."""
    insert_plan(db, make_plan("p1", [keys_step()]))
    fake_anthropic.enqueue('{"a": 1}')

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--model", HAIKU,
                               environ={"ANTHROPIC_API_KEY": "sk-env", "ANTHROPIC_BASE_URL": fake_anthropic.url})

    assert rc == 0, err
    assert step1(result)["status"] == "succeeded"
    assert len(fake_anthropic.requests) == 1
    assert fake_anthropic.requests[0]["headers"]["x-api-key"] == "sk-env"
    check_store(db)


# --------------------------------------------------------------------------------------
# claude-cli: executor
# --------------------------------------------------------------------------------------


def test_claude_cli_runs_claude_p_in_the_project_with_a_clean_environment(
        capsys, db, fake_llm, state_dir, project, claude_bin, claude_log):
    """--model claude-cli:haiku runs `claude -p --output-format stream-json --verbose
    --model haiku --no-session-persistence --append-system-prompt S` (argv list), the
    prompt on stdin, in the plan's project folder, without BRIDGE_* or MCP_API_KEY in its
    environment; garbage lines are skipped; the result is validated; usage and cost kept."""
    plan = make_plan("p1", [keys_step(system="Be terse.")],
                     context={"objective": "cli test", "project": str(project)})
    insert_plan(db, plan)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--model", "claude-cli:haiku",
                               environ=claude_env(claude_bin, claude_log))

    assert rc == 0, err
    step = step1(result)
    assert step["status"] == "succeeded"
    assert step["attempts"] == 1
    assert json.loads(step["output"]) == {"a": 1}
    assert step["usage"] == {"prompt_tokens": 100, "completion_tokens": 20}
    assert step["cost_usd"] == FAKE_CLAUDE_COST
    assert result["cost_usd"] == FAKE_CLAUDE_COST
    assert result["ledger"] == {"claude-cli:haiku": {"requests": 1, "prompt_tokens": 100, "completion_tokens": 20,
                                                     "cost_usd": FAKE_CLAUDE_COST}}
    assert fake_llm.requests == []

    calls = claude_calls(claude_log)
    assert len(calls) == 1
    call = calls[0]
    assert Path(call["argv"][0]) == claude_bin / "claude"
    assert call["argv"][1:] == ["-p", "--output-format", "stream-json", "--verbose", "--model", "haiku",
                                "--no-session-persistence", "--tools", "", "--strict-mcp-config",
                                "--setting-sources", "user", "--permission-mode", "default",
                                "--append-system-prompt", "Be terse."]
    assert "Reply with a JSON object holding key a." in call["stdin"]
    assert "Objective of the whole plan: cli test" in call["stdin"]
    assert "Be terse." not in call["stdin"]
    assert os.path.realpath(call["cwd"]) == os.path.realpath(project)
    env = set(call["env"])
    assert not [name for name in env if name.startswith("BRIDGE_")]
    assert "MCP_API_KEY" not in env
    assert {"PATH", "ANTHROPIC_API_KEY", "CLAUDE_FAKE_MODE"} <= env
    assert "GITHUB_TOKEN" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert plan_state(db, "p1")["status"] == "completed"
    check_store(db)


@pytest.mark.parametrize("mode", ["error_result", "error_result_exit1"])
def test_claude_cli_error_result_fails_the_attempt_with_its_text(
        capsys, db, fake_llm, state_dir, claude_bin, claude_log, mode):
    """A result line with is_error (exit 0 or 1) fails the attempt with the result text."""
    insert_plan(db, make_plan("p1", [keys_step(max_retries=0)]))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--model", "claude-cli:haiku",
                               environ=claude_env(claude_bin, claude_log, mode))

    assert rc == 1
    step = step1(result)
    assert step["status"] == "failed"
    assert step["attempts"] == 1
    assert "Invalid API key" in step["error"]
    assert len(claude_calls(claude_log)) == 1
    check_store(db)


@pytest.mark.parametrize("mode, words", [
    ("nonzero", "requires --verbose"),
    ("garbage", "without a result"),
])
def test_claude_cli_without_a_result_fails_saying_why(capsys, db, fake_llm, state_dir, claude_bin, claude_log,
                                                      mode, words):
    """No result line: a non-zero exit fails with claude's last stderr line; only
    garbage fails "without a result". Each attempt is a new process."""
    insert_plan(db, make_plan("p1", [keys_step(max_retries=1)]))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--model", "claude-cli:haiku",
                               environ=claude_env(claude_bin, claude_log, mode))

    assert rc == 1
    step = step1(result)
    assert step["status"] == "failed"
    assert step["attempts"] == 2
    assert words in step["error"]
    assert len(claude_calls(claude_log)) == 2
    check_store(db)


def test_claude_cli_hang_is_killed_at_the_step_timeout(capsys, db, fake_llm, state_dir, claude_bin, claude_log):
    """A claude that never finishes is killed (its process gone) when the step's
    timeout_s runs out, and the attempt fails as a timeout."""
    insert_plan(db, make_plan("p1", [keys_step(max_retries=0, timeout_s=0.5)]))

    started = time.monotonic()
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--model", "claude-cli:haiku",
                               environ=claude_env(claude_bin, claude_log, "hang"))
    elapsed = time.monotonic() - started

    assert rc == 1
    assert elapsed < 3.0
    step = step1(result)
    assert step["status"] == "failed"
    assert "0.5 s" in step["error"]
    assert "did not finish" in step["error"]
    calls = claude_calls(claude_log)
    assert len(calls) == 1
    with pytest.raises(ProcessLookupError):
        os.kill(calls[0]["pid"], 0)
    check_store(db)


def test_claude_cli_missing_binary_exits_2_before_claiming(capsys, db, fake_llm, state_dir, tmp_path, claude_log):
    """No claude on PATH for a claude-cli: model: exit 2 naming it; nothing claimed."""
    insert_plan(db, make_plan("p1", [keys_step()]))
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    before = read_rows(db)

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--model", "claude-cli:haiku"),
                     environ={"PATH": str(empty), "ANTHROPIC_API_KEY": "sk-test"})
    out, err = capsys.readouterr()

    assert rc == 2
    assert out == ""
    assert "claude CLI was not found" in err
    assert "hint:" in err
    assert plan_state(db, "p1") == {}
    assert read_rows(db) == before
    assert fake_llm.requests == []
    check_store(db)


# --------------------------------------------------------------------------------------
# escalation
# --------------------------------------------------------------------------------------

BAD_1, BAD_2 = "no json here, sorry", "still no json at all"


def test_escalation_to_anthropic_saves_a_failed_step(capsys, db, fake_llm, fake_anthropic, state_dir):
    """A step whose local attempts are spent gets one more attempt on --escalate-to, with
    both failed answers and why they were rejected; it succeeds: the plan completes, the
    result lists the escalation and a ledger line per model, and stderr shows them."""
    insert_plan(db, make_plan("p1", [keys_step(max_retries=1)]))
    fake_llm.enqueue(BAD_1).enqueue(BAD_2)
    fake_anthropic.enqueue('{"a": 42}', input_tokens=1200, output_tokens=300)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--anthropic-base-url", fake_anthropic.url,
                               "--escalate-to", HAIKU,
                               environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 0, err
    assert result["status"] == "completed"
    step = step1(result)
    assert step["status"] == "succeeded"
    assert step["attempts"] == 3
    assert json.loads(step["output"]) == {"a": 42}
    assert step["escalated_to"] == HAIKU
    assert step["escalation_saved"] is True
    assert step["error"] is None
    assert result["escalations"] == [{"step": 1, "model": HAIKU, "saved": True}]
    assert result["model"] == "fake-model"
    assert set(result["ledger"]) == {"fake-model", HAIKU}
    assert result["ledger"]["fake-model"]["requests"] == 2
    assert result["ledger"]["fake-model"]["cost_usd"] == 0.0
    assert result["ledger"][HAIKU] == {"requests": 1, "prompt_tokens": 1200, "completion_tokens": 300,
                                       "cost_usd": haiku_cost(1200, 300)}
    assert result["cost_usd"] == haiku_cost(1200, 300)

    assert len(fake_llm.chat_requests) == 2
    for request in fake_llm.requests:                    # the Anthropic key never goes to the local server
        assert "x-api-key" not in request["headers"]
        assert "sk-test" not in request["headers"].get("authorization", "")
    assert len(fake_anthropic.requests) == 1
    sent = fake_anthropic.requests[0]["json"]
    assert sent["model"] == "claude-haiku-4-5"
    prompt = "\n".join(m["content"] for m in sent["messages"])
    assert "Reply with a JSON object holding key a." in prompt
    assert BAD_1 in prompt and BAD_2 in prompt
    assert rejection(BAD_1) in prompt and rejection(BAD_2) in prompt
    assert "ledger:" in err
    assert f"escalated to {HAIKU}: saved it" in err
    assert plan_state(db, "p1")["status"] == "completed"
    assert stored_results(db)[0]["escalations"] == result["escalations"]
    check_store(db)


@pytest.mark.parametrize("on_failure, rc_expected, step_status, plan_status", [
    ("skip", 0, "skipped", "completed"),
    (None, 1, "failed", "failed"),
])
def test_escalation_that_fails_too_lets_on_failure_apply(capsys, db, fake_llm, fake_anthropic, state_dir,
                                                        on_failure, rc_expected, step_status, plan_status):
    """When the escalated attempt fails as well, the step's on_failure applies (skip:
    skipped, plan completed; default: failed), escalation_saved is false and the error
    says the escalation was tried."""
    fields = {"max_retries": 1} | ({"on_failure": on_failure} if on_failure else {})
    insert_plan(db, make_plan("p1", [keys_step(**fields)]))
    fake_llm.enqueue(BAD_1).enqueue(BAD_2)
    fake_anthropic.enqueue("nope, no JSON from me either")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--anthropic-base-url", fake_anthropic.url,
                               "--escalate-to", HAIKU,
                               environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == rc_expected
    assert result["status"] == plan_status
    step = step1(result)
    assert step["status"] == step_status
    assert step["attempts"] == 3
    assert step["escalated_to"] == HAIKU
    assert step["escalation_saved"] is False
    assert f"after escalating to {HAIKU}" in step["error"]
    assert result["escalations"] == [{"step": 1, "model": HAIKU, "saved": False}]
    assert len(fake_anthropic.requests) == 1
    assert f"escalated to {HAIKU}: did not save it" in err
    assert plan_state(db, "p1")["status"] == plan_status
    check_store(db)


def test_plan_default_escalate_to_works_without_the_flag(capsys, db, fake_llm, fake_anthropic, state_dir):
    """defaults.escalate_to in the plan escalates with no --escalate-to, once the user
    allowed the executor and approved the plan (it names a paid model)."""
    insert_plan(db, make_plan("p1", [keys_step(max_retries=0)], defaults={"escalate_to": HAIKU}))
    fake_llm.enqueue(BAD_1)
    fake_anthropic.enqueue('{"a": 1}')
    approve(capsys, db, fake_llm, state_dir, "p1")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--anthropic-base-url", fake_anthropic.url,
                               "--allow-executor", "anthropic", environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 0, err
    step = step1(result)
    assert step["status"] == "succeeded"
    assert step["attempts"] == 2
    assert step["escalated_to"] == HAIKU
    assert step["escalation_saved"] is True
    assert len(fake_anthropic.requests) == 1
    check_store(db)


def test_escalate_to_flag_wins_over_the_plan_default(capsys, db, fake_llm, fake_anthropic, state_dir):
    """--escalate-to beats the plan's defaults.escalate_to."""
    insert_plan(db, make_plan("p1", [keys_step(max_retries=0)],
                              defaults={"escalate_to": "anthropic:claude-sonnet-4-5"}))
    fake_llm.enqueue(BAD_1)
    fake_anthropic.enqueue('{"a": 1}')

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--anthropic-base-url", fake_anthropic.url,
                               "--escalate-to", HAIKU,
                               environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 0, err
    step = step1(result)
    assert step["escalated_to"] == HAIKU
    assert [r["json"]["model"] for r in fake_anthropic.requests] == ["claude-haiku-4-5"]
    check_store(db)


def test_bridge_escalate_to_environment_variable_escalates(capsys, db, fake_llm, fake_anthropic, state_dir):
    """BRIDGE_ESCALATE_TO in the environ works like --escalate-to."""
    insert_plan(db, make_plan("p1", [keys_step(max_retries=0)]))
    fake_llm.enqueue(BAD_1)
    fake_anthropic.enqueue('{"a": 1}')

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--anthropic-base-url", fake_anthropic.url,
                               environ={"ANTHROPIC_API_KEY": "sk-test", "BRIDGE_ESCALATE_TO": HAIKU})

    assert rc == 0, err
    step = step1(result)
    assert step["status"] == "succeeded"
    assert step["escalated_to"] == HAIKU
    assert step["escalation_saved"] is True
    assert len(fake_anthropic.requests) == 1
    check_store(db)


def test_escalation_to_claude_cli_uses_the_fake_claude(capsys, db, fake_llm, state_dir, claude_bin, claude_log):
    """--escalate-to claude-cli:haiku hands the failed step to `claude -p` with the failed
    answers in its prompt; its cost lands in the ledger."""
    insert_plan(db, make_plan("p1", [keys_step(max_retries=1)]))
    fake_llm.enqueue(BAD_1).enqueue(BAD_2)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--escalate-to", "claude-cli:haiku",
                               environ=claude_env(claude_bin, claude_log))

    assert rc == 0, err
    step = step1(result)
    assert step["status"] == "succeeded"
    assert step["attempts"] == 3
    assert json.loads(step["output"]) == {"a": 1}
    assert step["escalated_to"] == "claude-cli:haiku"
    assert step["escalation_saved"] is True
    assert result["ledger"]["claude-cli:haiku"] == {"requests": 1, "prompt_tokens": 100, "completion_tokens": 20,
                                                    "cost_usd": FAKE_CLAUDE_COST}
    assert result["ledger"]["fake-model"]["requests"] == 2
    assert result["cost_usd"] == FAKE_CLAUDE_COST
    calls = claude_calls(claude_log)
    assert len(calls) == 1
    assert BAD_1 in calls[0]["stdin"] and BAD_2 in calls[0]["stdin"]
    assert rejection(BAD_1) in calls[0]["stdin"]
    assert "escalated to claude-cli:haiku: saved it" in err
    check_store(db)


def test_no_escalation_configured_means_exactly_the_planned_attempts(capsys, db, fake_llm, fake_anthropic,
                                                                     state_dir):
    """Without --escalate-to, BRIDGE_ESCALATE_TO or defaults.escalate_to a step gets
    exactly max_retries + 1 attempts and nothing more, even with an API key set."""
    insert_plan(db, make_plan("p1", [keys_step(max_retries=1)]))
    fake_llm.enqueue(BAD_1).enqueue(BAD_2)
    fake_anthropic.enqueue('{"a": 1}')

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--anthropic-base-url", fake_anthropic.url,
                               environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 1
    step = step1(result)
    assert step["status"] == "failed"
    assert step["attempts"] == 2
    assert step["escalated_to"] is None
    assert step["escalation_saved"] is None
    assert result["escalations"] == []
    assert len(fake_llm.chat_requests) == 2
    assert fake_anthropic.requests == []
    assert fake_anthropic.pending == 1
    assert "escalat" not in err
    check_store(db)


# --------------------------------------------------------------------------------------
# mixed executors in one plan
# --------------------------------------------------------------------------------------


def test_step_model_anthropic_goes_to_anthropic_while_others_stay_local(capsys, db, fake_llm, fake_anthropic,
                                                                        state_dir):
    """A step naming an anthropic: model goes to the Messages API; the plan's other steps
    go to the local server; the dependent step sees the local step's output."""
    steps = [{"id": 1, "prompt": "local task"},
             {"id": 2, "prompt": "remote task", "depends_on": [1], "model": HAIKU}]
    insert_plan(db, make_plan("p1", steps))
    fake_llm.enqueue("local-output-123")
    fake_anthropic.enqueue("remote-output", input_tokens=50, output_tokens=10)
    approve(capsys, db, fake_llm, state_dir, "p1")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--anthropic-base-url", fake_anthropic.url,
                               "--allow-executor", "anthropic", environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 0, err
    by_id = {s["id"]: s for s in result["steps"]}
    assert by_id[1]["output"] == "local-output-123"
    assert by_id[2]["output"] == "remote-output"
    assert by_id[1]["cost_usd"] == 0.0
    assert by_id[2]["cost_usd"] == haiku_cost(50, 10)
    assert result["model"] == "fake-model"
    assert set(result["ledger"]) == {"fake-model", HAIKU}
    chat = fake_llm.chat_requests
    assert len(chat) == 1
    assert "local task" in "\n".join(m["content"] for m in chat[0]["json"]["messages"])
    assert len(fake_anthropic.requests) == 1
    sent = fake_anthropic.requests[0]["json"]
    assert sent["model"] == "claude-haiku-4-5"
    prompt = "\n".join(m["content"] for m in sent["messages"])
    assert "remote task" in prompt and "local-output-123" in prompt
    check_store(db)
