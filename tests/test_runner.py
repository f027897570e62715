"""The rooms "A plan run: its procedure", "A step run" and "Retry policy", always driven
through bridge.main() against the fake LLM server and a real doobidoo store: step order,
prompt context, attempts, failure policies, model choice, usage and <think> stripping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bridge
from fakes import (
    bridge_args, check_store, first_user, insert_plan, make_plan, plan_state, read_rows, run_bridge, run_json,
    steps_by_id, stored_results, user_text,
)


# --------------------------------------------------------------------------------------
# order
# --------------------------------------------------------------------------------------


def test_steps_run_in_dependency_order_not_list_order(capsys, db, fake_llm, state_dir):
    """Steps listed out of order run dependencies first, independent ones by ascending id;
    a dependency on a later-listed step works (original defect 12)."""
    steps = [
        {"id": 3, "prompt": "task-three", "depends_on": [4]},
        {"id": 2, "prompt": "task-two"},
        {"id": 4, "prompt": "task-four", "depends_on": [1]},
        {"id": 1, "prompt": "task-one"},
    ]
    insert_plan(db, make_plan("p1", steps))
    for reply in ("reply-a", "reply-b", "reply-c", "reply-d"):
        fake_llm.enqueue(reply)

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    names = {"task-one": 1, "task-two": 2, "task-three": 3, "task-four": 4}
    order = [next(sid for name, sid in names.items() if name in first_user(r)) for r in fake_llm.chat_requests]
    assert order == [1, 2, 4, 3]
    by_id = steps_by_id(result)
    assert [by_id[i]["output"] for i in (1, 2, 4, 3)] == ["reply-a", "reply-b", "reply-c", "reply-d"]
    assert all(s["status"] == "succeeded" for s in result["steps"])
    # step 3 saw the output of step 4, which ran before it although listed after it
    assert "reply-c" in first_user(fake_llm.chat_requests[3])
    check_store(db)


# --------------------------------------------------------------------------------------
# context
# --------------------------------------------------------------------------------------


def test_prompt_holds_the_artifact_of_every_dependency(capsys, db, fake_llm, state_dir):
    """A step's user message carries each dependency's artifact (fenced code unwrapped)."""
    steps = [{"id": 1, "prompt": "task-one"}, {"id": 2, "prompt": "task-two"},
             {"id": 3, "prompt": "task-three", "depends_on": [1, 2]}]
    insert_plan(db, make_plan("p1", steps))
    fake_llm.enqueue("Here:\n```python\nanswer_one = 1\n```\n").enqueue("second-artifact").enqueue("done")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    assert steps_by_id(result)[1]["output"].strip() == "answer_one = 1"
    third = first_user(fake_llm.chat_requests[2])
    assert "task-three" in third
    assert "answer_one = 1" in third
    assert "second-artifact" in third
    assert "```python" not in third and "Here:" not in third
    # a step that depends on nothing gets no other step's output
    assert "answer_one" not in first_user(fake_llm.chat_requests[1])
    check_store(db)


def test_load_files_are_included_reference_files_only_named_objective_shown(
        capsys, db, fake_llm, state_dir, project):
    """LOAD text goes into the prompt, REFERENCE files are named without their text,
    and the plan's objective appears."""
    (project / "notes.txt").write_text("LOADED-NOTES-TEXT\n")
    (project / "ref.txt").write_text("REFERENCE-SECRET-TEXT\n")
    plan = make_plan("p1", [{"id": 1, "prompt": "task-one"}],
                     context={"objective": "OBJECTIVE-MARKER-42", "project": str(project),
                              "files_context": {"notes.txt": "LOAD", "ref.txt": "REFERENCE"}})
    insert_plan(db, plan)
    fake_llm.enqueue("ok")

    rc, _, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    text = first_user(fake_llm.chat_requests[0])
    assert "LOADED-NOTES-TEXT" in text
    assert "ref.txt" in text
    assert "REFERENCE-SECRET-TEXT" not in text
    assert "OBJECTIVE-MARKER-42" in text
    check_store(db)


def test_load_file_written_by_a_step_is_reread_for_the_next_step(capsys, db, fake_llm, state_dir, project):
    """Step 2 sees the LOAD file as step 1 left it, not as it was at start (original defect 14)."""
    (project / "notes.txt").write_text("NOTES-VERSION-ONE\n")
    plan = make_plan("p1", [{"id": 1, "prompt": "task-one", "file_output": "notes.txt"},
                            {"id": 2, "prompt": "task-two"}],
                     context={"objective": "o", "project": str(project),
                              "files_context": {"notes.txt": "LOAD"}})
    insert_plan(db, plan)
    fake_llm.enqueue("NOTES-VERSION-TWO").enqueue("done")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    assert result["status"] == "completed"
    first, second = (first_user(r) for r in fake_llm.chat_requests)
    assert "NOTES-VERSION-ONE" in first
    assert "NOTES-VERSION-TWO" in second          # step 2 does not depend on step 1: only a re-read shows it
    assert "NOTES-VERSION-ONE" not in second
    assert (project / "notes.txt").read_text().strip() == "NOTES-VERSION-TWO"
    check_store(db)


def test_step_system_overrides_the_default_system_message(capsys, db, fake_llm, state_dir):
    """A step's `system` replaces the default system message; other steps keep the default."""
    steps = [{"id": 1, "prompt": "task-one", "system": "SYSTEM-OVERRIDE-X"}, {"id": 2, "prompt": "task-two"}]
    insert_plan(db, make_plan("p1", steps))
    fake_llm.enqueue("a").enqueue("b")

    rc, _, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    first, second = (r["json"]["messages"] for r in fake_llm.chat_requests)
    assert first[0] == {"role": "system", "content": "SYSTEM-OVERRIDE-X"}
    assert [m["role"] for m in first].count("system") == 1
    assert second[0]["role"] == "system"
    assert second[0]["content"].strip() and second[0]["content"] != "SYSTEM-OVERRIDE-X"
    check_store(db)


def test_plan_defaults_reach_the_request_and_step_values_override_them(capsys, db, fake_llm, state_dir):
    """defaults.temperature/max_tokens/model are sent; a step's own values win."""
    steps = [{"id": 1, "prompt": "task-one"},
             {"id": 2, "prompt": "task-two", "temperature": 0.9, "max_tokens": 11, "model": "step-model"}]
    plan = make_plan("p1", steps, defaults={"temperature": 0.25, "max_tokens": 77, "model": "plan-model"})
    insert_plan(db, plan)
    fake_llm.enqueue("a").enqueue("b")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    first, second = (r["json"] for r in fake_llm.chat_requests)
    assert (first["temperature"], first["max_tokens"], first["model"]) == (0.25, 77, "plan-model")
    assert (second["temperature"], second["max_tokens"], second["model"]) == (0.9, 11, "step-model")
    by_id = steps_by_id(result)
    assert by_id[1]["model"] == "plan-model" and by_id[2]["model"] == "step-model"
    check_store(db)


# --------------------------------------------------------------------------------------
# attempts
# --------------------------------------------------------------------------------------


def test_failed_validation_is_retried_with_the_output_and_the_error(capsys, db, fake_llm, state_dir):
    """The retry carries the previous output (assistant) and the validation error (user)
    (original defect 3)."""
    steps = [{"id": 1, "prompt": "task-one", "validation": {"type": "contains_keys", "keys": ["a"]}}]
    insert_plan(db, make_plan("p1", steps))
    fake_llm.enqueue("PREVIOUS-BAD-ANSWER").enqueue('{"a": 1}')

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    step = steps_by_id(result)[1]
    assert (step["status"], step["attempts"]) == ("succeeded", 2)
    assert len(fake_llm.chat_requests) == 2
    first, second = (r["json"]["messages"] for r in fake_llm.chat_requests)
    assert second[: len(first)] == first                      # the original task is still there
    extra = second[len(first):]
    assert [m["role"] for m in extra] == ["assistant", "user"]
    assert "PREVIOUS-BAD-ANSWER" in extra[0]["content"]
    assert "not valid JSON" in extra[1]["content"]
    check_store(db)


def test_request_error_is_retried_with_the_error_in_the_prompt(capsys, db, fake_llm, state_dir):
    """An HTTP 400 costs one attempt; the next prompt names the error (original defect 3)."""
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "task-one"}]))
    fake_llm.enqueue(status=400, error="SERVER-SAID-BAD-THING").enqueue("fine")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    step = steps_by_id(result)[1]
    assert (step["status"], step["attempts"], step["output"]) == ("succeeded", 2, "fine")
    assert len(fake_llm.chat_requests) == 2
    assert "SERVER-SAID-BAD-THING" not in user_text(fake_llm.chat_requests[0])
    assert "SERVER-SAID-BAD-THING" in user_text(fake_llm.chat_requests[1])
    check_store(db)


@pytest.mark.parametrize("max_retries, expected", [(0, 1), (3, 4), (None, 3)])
def test_a_step_gets_exactly_one_plus_max_retries_attempts(capsys, db, fake_llm, state_dir, max_retries, expected):
    """attempts = 1 + max_retries (default 2), counted as requests the server saw."""
    step = {"id": 1, "prompt": "task-one", "validation": {"type": "regex", "pattern": "NEVER-MATCHES"}}
    if max_retries is not None:
        step["max_retries"] = max_retries
    insert_plan(db, make_plan("p1", [step]))
    for n in range(12):
        fake_llm.enqueue(f"wrong answer {n}")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 1
    assert len(fake_llm.chat_requests) == expected
    got = steps_by_id(result)[1]
    assert (got["status"], got["attempts"]) == ("failed", expected)
    check_store(db)


@pytest.mark.parametrize("how", ["http_400", "sse_error"])
def test_context_overflow_is_not_retried(capsys, db, fake_llm, state_dir, how):
    """A prompt that does not fit the context gets one request, and the error says so."""
    message = "Trying to keep 9000 tokens, but the model is loaded with context length of 4096"
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "task-one", "max_retries": 3}]))
    if how == "http_400":
        fake_llm.enqueue(status=400, error=message)
    else:
        fake_llm.enqueue("x", fault="sse_error", error=message)
    for _ in range(4):
        fake_llm.enqueue("would have passed")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 1
    assert len(fake_llm.chat_requests) == 1
    step = steps_by_id(result)[1]
    assert (step["status"], step["attempts"]) == ("failed", 1)
    assert "context length of 4096" in step["error"]
    assert "context" in step["error"].split("context length of 4096", 1)[1]   # plus bridge's own hint
    check_store(db)


# --------------------------------------------------------------------------------------
# failure policies (README: on_failure)
# --------------------------------------------------------------------------------------

FAILING = {"validation": {"type": "regex", "pattern": "NEVER-MATCHES"}, "max_retries": 1}


def test_retry_with_context_fails_step_skips_dependents_runs_the_rest(capsys, db, fake_llm, state_dir):
    """retry_with_context: step failed, dependents skipped ("dependency N failed"),
    independent steps still run, plan failed, rc 1 (original defect 13)."""
    steps = [{"id": 1, "prompt": "task-one", "on_failure": "retry_with_context", **FAILING},
             {"id": 2, "prompt": "task-two", "depends_on": [1]},
             {"id": 3, "prompt": "task-three"}]
    insert_plan(db, make_plan("p1", steps))
    fake_llm.enqueue("bad 1").enqueue("bad 2").enqueue("three-ok")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 1
    by_id = steps_by_id(result)
    assert (by_id[1]["status"], by_id[1]["attempts"]) == ("failed", 2)
    assert by_id[2]["status"] == "skipped" and by_id[2]["attempts"] == 0
    assert "dependency 1 failed" in by_id[2]["error"]
    assert (by_id[3]["status"], by_id[3]["output"]) == ("succeeded", "three-ok")
    assert result["status"] == "failed" and result["success"] is False
    assert len(fake_llm.chat_requests) == 3
    assert plan_state(db, "p1")["status"] == "failed"
    assert [r["status"] for r in stored_results(db)] == ["failed"]
    check_store(db)


def test_skip_policy_skips_step_and_dependents_plan_completes(capsys, db, fake_llm, state_dir):
    """skip: the step is skipped, its dependents too, the plan still completes, rc 0
    (original defect 13)."""
    steps = [{"id": 1, "prompt": "task-one", "on_failure": "skip", **FAILING},
             {"id": 2, "prompt": "task-two", "depends_on": [1]},
             {"id": 3, "prompt": "task-three"}]
    insert_plan(db, make_plan("p1", steps))
    fake_llm.enqueue("bad 1").enqueue("bad 2").enqueue("three-ok")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    by_id = steps_by_id(result)
    assert (by_id[1]["status"], by_id[1]["attempts"]) == ("skipped", 2)
    assert by_id[2]["status"] == "skipped" and "dependency 1" in by_id[2]["error"]
    assert by_id[3]["status"] == "succeeded"
    assert result["status"] == "completed" and result["success"] is True
    assert plan_state(db, "p1")["status"] == "completed"
    check_store(db)


def test_halt_policy_uses_its_retries_then_stops_the_plan(capsys, db, fake_llm, state_dir):
    """halt: max_retries is honoured, then no further step starts; plan failed
    (original defect 13)."""
    steps = [{"id": 1, "prompt": "task-one", "on_failure": "halt",
              "validation": {"type": "regex", "pattern": "NEVER-MATCHES"}, "max_retries": 2},
             {"id": 2, "prompt": "task-two"},
             {"id": 3, "prompt": "task-three", "depends_on": [2]}]
    insert_plan(db, make_plan("p1", steps))
    for n in range(6):
        fake_llm.enqueue(f"bad {n}")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 1
    assert len(fake_llm.chat_requests) == 3
    assert all("task-one" in first_user(r) for r in fake_llm.chat_requests)
    by_id = steps_by_id(result)
    assert (by_id[1]["status"], by_id[1]["attempts"]) == ("failed", 3)
    for sid in (2, 3):
        assert by_id[sid]["status"] == "skipped" and by_id[sid]["attempts"] == 0
        assert "halted" in by_id[sid]["error"]
    assert result["status"] == "failed"
    assert plan_state(db, "p1")["status"] == "failed"
    check_store(db)


def test_failed_step_keeps_its_last_output(capsys, db, fake_llm, state_dir):
    """A failed step's last output is in the result, not "" (original defect 13)."""
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "task-one", **FAILING}]))
    fake_llm.enqueue("first try").enqueue("LAST-TRY-OUTPUT")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 1
    step = steps_by_id(result)[1]
    assert step["status"] == "failed"
    assert step["output"] == "LAST-TRY-OUTPUT"
    assert steps_by_id(stored_results(db)[0])[1]["output"] == "LAST-TRY-OUTPUT"
    check_store(db)


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------


def test_without_model_flag_the_loaded_model_is_sent(capsys, db, fake_llm, state_dir):
    """No --model: the model LM Studio reports loaded is used, not "default" or the first
    listed (original defect 5)."""
    fake_llm.models = ["a", "loaded-one"]
    fake_llm.loaded = "loaded-one"
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("hi")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    assert fake_llm.chat_requests[0]["json"]["model"] == "loaded-one"
    assert result["model"] == "loaded-one"
    assert steps_by_id(result)[1]["model"] == "loaded-one"
    check_store(db)


@pytest.mark.parametrize("flag, env, expected", [
    ("flag-model", {}, "flag-model"),
    ("flag-model", {"BRIDGE_MODEL": "env-model"}, "flag-model"),
    (None, {"BRIDGE_MODEL": "env-model"}, "env-model"),
])
def test_model_flag_wins_then_bridge_model_env(capsys, db, fake_llm, state_dir, flag, env, expected):
    """--model beats BRIDGE_MODEL, which beats the loaded model (original defect 5)."""
    fake_llm.models = ["a", "loaded-one"]
    fake_llm.loaded = "loaded-one"
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("hi")

    extra = ["--model", flag] if flag else []
    rc, result, _ = run_json(capsys, db, fake_llm, state_dir, *extra, environ=env)

    assert rc == 0
    assert fake_llm.chat_requests[0]["json"]["model"] == expected
    assert result["model"] == expected
    check_store(db)


def test_step_result_records_the_model_that_actually_answered(capsys, db, fake_llm, state_dir):
    """When the reply names another model than requested, the step records the answerer
    (original defect 5)."""
    insert_plan(db, make_plan("p1"))
    # a complete (non-streamed) chat completion body, scripted whole
    fake_llm.enqueue(status=200, error_body={
        "id": "x", "object": "chat.completion", "model": "answering-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir, "--model", "asked-model")

    assert rc == 0
    assert fake_llm.chat_requests[0]["json"]["model"] == "asked-model"
    step = steps_by_id(result)[1]
    assert (step["status"], step["output"]) == ("succeeded", "hi")
    assert step["model"] == "answering-model"
    check_store(db)


def test_no_loaded_model_and_no_flag_exits_2_without_claiming(capsys, db, fake_llm, state_dir):
    """No model loaded and none named: rc 2 with a hint; the plan stays pending."""
    fake_llm.loaded = None
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("never sent")

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir), environ={})
    out, err = capsys.readouterr()

    assert rc == 2
    assert out == ""
    assert "bridge: error:" in err and "no model loaded" in err
    assert "hint:" in err and "--model" in err
    assert fake_llm.chat_requests == []
    assert plan_state(db, "p1").get("status", "pending") == "pending"
    assert stored_results(db) == []
    check_store(db)


# --------------------------------------------------------------------------------------
# usage
# --------------------------------------------------------------------------------------


def test_result_usage_sums_the_usage_the_server_reported(capsys, db, fake_llm, state_dir):
    """Each step keeps the server's usage, summed over its attempts; the result's usage
    is the sum over the steps."""
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "task-one"},
                                     {"id": 2, "prompt": "task-two",
                                      "validation": {"type": "regex", "pattern": "^two$"}}]))
    for model, usage, text in (("m", (11, 5), "one"), ("m", (3, 1), "not it"), ("m", (4, 2), "two")):
        fake_llm.enqueue(status=200, error_body={
            "id": "x", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}})

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir, "--model", "m")

    assert rc == 0
    by_id = steps_by_id(result)
    assert by_id[1]["usage"] == {"prompt_tokens": 11, "completion_tokens": 5}
    assert by_id[2]["attempts"] == 2
    assert by_id[2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3}      # 3+4, 1+2
    assert by_id[1]["usage_reported"] is True and by_id[2]["usage_reported"] is True
    assert result["usage"] == {"prompt_tokens": 18, "completion_tokens": 8}
    assert stored_results(db)[0]["usage"] == {"prompt_tokens": 18, "completion_tokens": 8}
    check_store(db)


def test_streamed_usage_is_taken_from_the_final_chunk(capsys, db, fake_llm, state_dir):
    """A streamed reply's usage chunk is what the step records."""
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("abcdefghijklmnopqr", chunk_size=8)     # 3 chunks: the fake counts 3 tokens

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    messages = fake_llm.chat_requests[0]["json"]["messages"]
    prompt_tokens = sum(len(m["content"]) for m in messages) // 4 + 1   # the fake's count
    step = steps_by_id(result)[1]
    assert step["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 3}
    assert step["usage_reported"] is True
    assert result["usage"] == step["usage"]
    check_store(db)


def test_missing_usage_is_estimated_and_flagged(capsys, db, fake_llm, state_dir):
    """A server that sends no usage: usage_reported false, estimated non-negative integers."""
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("some reply text here", usage=False)

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    step = steps_by_id(result)[1]
    assert step["usage_reported"] is False
    for key in ("prompt_tokens", "completion_tokens"):
        assert isinstance(step["usage"][key], int) and not isinstance(step["usage"][key], bool)
        assert step["usage"][key] >= 0
    assert step["usage"]["prompt_tokens"] > 0          # the prompt was not empty
    assert result["usage"] == step["usage"]
    check_store(db)


def test_missing_usage_is_estimated_like_the_prompt_budget(capsys, db, fake_llm, state_dir):
    """No usage from the server: the prompt is estimated by estimate_tokens (the rule
    the prompt budget uses, CHARS_PER_TOKEN), the answer by its streamed pieces, or
    by CHARS_PER_TOKEN when it did not stream (35 characters: 10 tokens)."""
    insert_plan(db, make_plan("p1", steps=[{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}]))
    fake_llm.enqueue("some reply text here", usage=False, chunk_size=5)     # 4 pieces
    fake_llm.enqueue("z" * 35, fault="no_stream", usage=False)

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    first, second = ([{"role": m["role"], "content": m["content"]} for m in r["json"]["messages"]]
                     for r in fake_llm.chat_requests)
    steps = steps_by_id(result)
    assert steps[1]["usage"] == {"prompt_tokens": bridge.estimate_tokens(first), "completion_tokens": 4}
    assert steps[2]["usage"] == {"prompt_tokens": bridge.estimate_tokens(second), "completion_tokens": 10}
    assert not steps[1]["usage_reported"] and not steps[2]["usage_reported"]


# --------------------------------------------------------------------------------------
# <think> and reasoning
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply, validation, output", [
    ('<think>hmm</think>{"a":1}', {"type": "contains_keys", "keys": ["a"]}, '{\n  "a": 1\n}'),
    ('<think>maybe {"b": 2}?</think>\n{"a": 1}', {"type": "contains_keys", "keys": ["a"]}, '{\n  "a": 1\n}'),
    ("<think>hmm\nlet me see</think>\nFINAL", {"type": "regex", "pattern": "^FINAL$"}, "FINAL"),
    ("<think>hmm</think>plain answer", {"type": "non_empty"}, "plain answer"),
], ids=["brief", "json-inside-think", "regex-anchored", "non-empty"])
def test_think_block_is_stripped_before_validation(capsys, db, fake_llm, state_dir, reply, validation, output):
    """A leading <think>…</think> is removed before the check: "<think>hmm</think>{"a":1}"
    passes contains_keys ["a"] on the first attempt, and the output holds no thinking."""
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "task-one", "validation": validation}]))
    fake_llm.enqueue(reply)

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    assert len(fake_llm.chat_requests) == 1
    step = steps_by_id(result)[1]
    assert (step["status"], step["attempts"]) == ("succeeded", 1)
    assert step["output"] == output
    assert "hmm" not in step["output"] and "think" not in step["output"]
    check_store(db)


def test_reasoning_deltas_never_reach_the_output(capsys, db, fake_llm, state_dir, project):
    """reasoning_content deltas are not part of the step's output or its file."""
    plan = make_plan("p1", [{"id": 1, "prompt": "task-one", "file_output": "out.txt"},
                            {"id": 2, "prompt": "task-two", "depends_on": [1]}],
                     context={"objective": "o", "project": str(project)})
    insert_plan(db, plan)
    fake_llm.enqueue("the visible answer", reasoning="SECRET-REASONING-TRACE").enqueue("done")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    step = steps_by_id(result)[1]
    assert step["output"] == "the visible answer"
    assert "SECRET-REASONING-TRACE" not in (project / "out.txt").read_text()
    assert "SECRET-REASONING-TRACE" not in user_text(fake_llm.chat_requests[1])
    assert "SECRET-REASONING-TRACE" not in json.dumps(stored_results(db))
    check_store(db)


# -- progress on a terminal and off it -------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def _run_with_stderr(stderr_fd, db, fake_llm, state_dir):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    return subprocess.run([sys.executable, "bridge.py", "--db", str(db), "--base-url", fake_llm.url,
                           "--state-dir", str(state_dir)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=stderr_fd, timeout=30)


def test_terminal_shows_a_live_line_per_step_and_a_summary(db, fake_llm, state_dir):
    """On a real terminal (a pty), each step redraws one live line: plan, step k/n,
    title, attempt, elapsed, tokens/s; the run ends with the summary."""
    import os
    import pty

    insert_plan(db, make_plan("live", steps=[{"id": 1, "title": "say hi", "prompt": "hi"}]))
    fake_llm.enqueue("hello there, this is a longer answer", chunk_size=2)
    master, slave = pty.openpty()
    try:
        proc = _run_with_stderr(slave, db, fake_llm, state_dir)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:          # EIO: the child side is closed and drained
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, screen
    assert "\r\x1b[2K" in screen                       # the line is redrawn in place
    live = [part for part in screen.split("\r\x1b[2K") if "tok/s" in part]
    assert live, screen
    assert "plan live" in live[0] and "step 1/1" in live[0] and "say hi" in live[0]
    assert "attempt 1" in live[0] and " s · " in live[0]
    assert "plan live: completed · 1 succeeded, 0 failed, 0 skipped" in screen
    check_store(db)


def test_no_terminal_gets_plain_lines_only(db, fake_llm, state_dir, tmp_path):
    """Off a terminal, progress is plain lines: no carriage returns or escape codes."""
    insert_plan(db, make_plan("plain", steps=[{"id": 1, "title": "say hi", "prompt": "hi"}]))
    fake_llm.enqueue("hello there", chunk_size=2)
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as handle:
        proc = _run_with_stderr(handle, db, fake_llm, state_dir)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text and "\x1b" not in text
    assert "step 1 (say hi): succeeded" in text
    assert "plan plain: completed" in text
    check_store(db)


def test_the_result_is_the_same_document_in_the_run_json_the_show_json_and_the_store(capsys, db, fake_llm,
                                                                                     state_dir):
    """One document, three places: `bridge --json` of the run, `--show --json`, and the
    result memory (parsed by bridge's own parse_result_content, with its content_hash
    as result_hash) are equal, field for field (shown_result builds what is printed)."""
    insert_plan(db, make_plan("p1", steps=[{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b",
                                                                         "on_failure": "skip"}]))
    fake_llm.enqueue("first answer")
    fake_llm.enqueue("", usage=False)           # an empty answer: step 2 fails and is skipped

    rc, ran, _ = run_json(capsys, db, fake_llm, state_dir)
    rc_show, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "p1", "--json")

    assert rc == 0 and rc_show == 0, err
    shown = json.loads(out)
    [row] = [r for r in read_rows(db) if "bridge-result" in r["tags"].split(",")]
    stored = {**bridge.parse_result_content(row["content"]), "result_hash": row["content_hash"]}
    assert ran == shown == stored
    assert ran["counts"] == {"succeeded": 1, "failed": 0, "skipped": 1}
