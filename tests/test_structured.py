"""Structured output: bridge asks for constrained JSON on json, contains_keys and
json_schema steps, falls back form by form when a server refuses, remembers what
worked, and never spends a step attempt on the negotiation (issue 3)."""

from __future__ import annotations

import json

import pytest

import bridge
from fakes import bridge_args, check_store, insert_plan, make_plan, make_store, result_document

# The body llama-cpp-python 0.3.36 sends (HTTP 500) for response_format json_schema,
# recorded from the real server.
LLAMA_CPP_PYTHON_REFUSAL = {"error": {
    "message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), "
               "'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
               "'ctx': {'expected': \"'text' or 'json_object'\"}}\n\n  File \"llama_cpp/server/app.py\", "
               "line 376, in create_chat_completion\n    POST /v1/chat/completions",
    "type": "internal_server_error", "param": None, "code": None}}
# LM Studio's 400 for json_object (lmstudio-bug-tracker#189).
LM_STUDIO_REFUSAL = {"error": "'response_format.type' must be 'json_schema' or 'text'"}

KEYS_STEP = {"id": 1, "prompt": "Give JSON", "validation": {"type": "contains_keys", "keys": ["a", "b"]}}


@pytest.fixture
def db(tmp_path):
    return make_store(tmp_path / "store.db", "12.x-fresh")


def run(db, fake_llm, tmp_path, *extra, environ=None):
    return bridge.main(bridge_args(db, fake_llm.url, tmp_path / "st", "-q", *extra), environ=environ or {})


def formats(fake_llm):
    return [r["json"].get("response_format") for r in fake_llm.chat_requests]


def stored_step(db, plan_id="p1"):
    import sqlite3
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT content FROM memories WHERE memory_type = 'tool_outcome'").fetchall()
    results = [result_document(c) for (c,) in rows if result_document(c)["plan_id"] == plan_id]
    return results[-1]["steps"]


def test_json_schema_form_first_with_the_step_schema(db, fake_llm, tmp_path):
    insert_plan(db, make_plan("p1", steps=[KEYS_STEP]))
    fake_llm.enqueue('{"a": 1, "b": 2}')
    assert run(db, fake_llm, tmp_path) == 0
    value = bridge.bounded_value()
    assert formats(fake_llm) == [{"type": "json_schema", "json_schema": {"name": "step_output", "schema": {
        "type": "object", "properties": {"a": value, "b": value}, "required": ["a", "b"],
        "additionalProperties": False}}}]
    check_store(db)


def test_json_schema_step_sends_its_own_schema_and_json_step_any_json(db, fake_llm, tmp_path):
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    insert_plan(db, make_plan("p1", steps=[
        {"id": 1, "prompt": "n", "validation": {"type": "json_schema", "schema": schema}},
        {"id": 2, "prompt": "any", "validation": {"type": "json"}}]))
    fake_llm.enqueue('{"n": 3}').enqueue("[1, 2]")
    assert run(db, fake_llm, tmp_path) == 0
    sent = formats(fake_llm)
    assert sent[0]["json_schema"]["schema"] == {**schema, "additionalProperties": False}   # bounds added
    assert sent[1]["json_schema"]["schema"] == {}
    check_store(db)


@pytest.mark.parametrize("validation", [{"type": "non_empty"}, {"type": "syntax_check"},
                                        {"type": "regex", "pattern": "x"}])
def test_text_steps_never_ask_for_json(db, fake_llm, tmp_path, validation):
    insert_plan(db, make_plan("p1", steps=[{"id": 1, "prompt": "x", "validation": validation}]))
    fake_llm.enqueue("x = 1")
    assert run(db, fake_llm, tmp_path) == 0
    assert formats(fake_llm) == [None]


def test_llama_cpp_python_refusal_falls_back_to_json_object_without_spending_an_attempt(db, fake_llm, tmp_path):
    """The 500 refusal is neither retried with backoff nor counted as an attempt;
    the second step starts directly with the form that worked."""
    insert_plan(db, make_plan("p1", steps=[KEYS_STEP, {**KEYS_STEP, "id": 2}]))
    fake_llm.enqueue(status=500, error_body=LLAMA_CPP_PYTHON_REFUSAL)
    fake_llm.enqueue('{"a": 1, "b": 2}').enqueue('{"a": 3, "b": 4}')
    assert run(db, fake_llm, tmp_path, "--max-output-bytes", "100000") == 0
    assert [f and f["type"] for f in formats(fake_llm)] == ["json_schema", "json_object", "json_object"]
    assert formats(fake_llm)[1]["schema"] == bridge.output_schema(KEYS_STEP["validation"])
    assert [s["attempts"] for s in stored_step(db)] == [1, 1]
    check_store(db)


def test_server_refusing_both_forms_gets_plain_text(db, fake_llm, tmp_path):
    insert_plan(db, make_plan("p1", steps=[KEYS_STEP]))
    fake_llm.enqueue(status=500, error_body=LLAMA_CPP_PYTHON_REFUSAL)
    fake_llm.enqueue(status=400, error_body=LM_STUDIO_REFUSAL)
    fake_llm.enqueue('```json\n{"a": 1, "b": 2}\n```')
    assert run(db, fake_llm, tmp_path) == 0
    assert [f and f["type"] for f in formats(fake_llm)] == ["json_schema", "json_object", None]
    assert stored_step(db)[0]["attempts"] == 1


def test_output_is_still_validated_client_side(db, fake_llm, tmp_path):
    """A server that ignores the constraint (llama.cpp#10732) cannot slip bad JSON through."""
    insert_plan(db, make_plan("p1", steps=[{**KEYS_STEP, "max_retries": 1}]))
    fake_llm.enqueue('{"a": 1}').enqueue('{"a": 1, "b": 2}')
    assert run(db, fake_llm, tmp_path) == 0
    step = stored_step(db)[0]
    assert step["attempts"] == 2


def test_other_errors_are_not_taken_for_a_refusal(db, fake_llm, tmp_path):
    """A context overflow 400 fails the step; it does not downgrade the form."""
    insert_plan(db, make_plan("p1", steps=[KEYS_STEP]))
    fake_llm.enqueue(status=400, error_body={"error": {"message": "request (4390 tokens) exceeds the available "
                                                       "context size (4096 tokens)", "type": "exceed_context_size_error"}})
    assert run(db, fake_llm, tmp_path) == 1
    assert [f and f["type"] for f in formats(fake_llm)] == ["json_schema"]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_no_structured_turns_it_off(db, fake_llm, tmp_path, how):
    insert_plan(db, make_plan("p1", steps=[KEYS_STEP]))
    fake_llm.enqueue('{"a": 1, "b": 2}')
    if how == "flag":
        rc = run(db, fake_llm, tmp_path, "--no-structured", environ={"BRIDGE_STRUCTURED": "1"})
    else:
        rc = run(db, fake_llm, tmp_path, environ={"BRIDGE_STRUCTURED": "0"})
    assert rc == 0
    assert formats(fake_llm) == [None]


def test_client_remembers_the_form_per_server(fake_llm):
    config = bridge.Config(db_paths=(), base_url=fake_llm.url, retries=0)
    fake_llm.enqueue(status=500, error_body=LLAMA_CPP_PYTHON_REFUSAL).enqueue("{}").enqueue("{}")
    with bridge.LLMClient(config) as client:
        client.chat([{"role": "user", "content": "x"}], bridge.ChatRequest("m", json_schema={}))
        assert client.structured_level == 1
        client.chat([{"role": "user", "content": "x"}], bridge.ChatRequest("m", json_schema={}))
    assert len(fake_llm.chat_requests) == 3
