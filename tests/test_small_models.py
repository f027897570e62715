"""Real small models (issue 14): every request bounded, degenerate streams stopped while
they stream, retries that sample differently, and schemas that bound each value. All on
the fake server (a real HTTP server on 127.0.0.1) with scripted streams."""

from __future__ import annotations

import json
import re

import pytest

import bridge
from fakes import check_store, insert_plan, make_plan, run_bridge, run_json, steps_by_id

KEYS = {"type": "contains_keys", "keys": ["name", "city"]}
FLAT = {"type": "json_schema", "schema": {"type": "object", "required": ["name", "city"], "properties": {
    "name": {"type": "string"}, "city": {"type": "string"}}, "additionalProperties": False}}
CODE = {"type": "syntax_check", "language": "python"}


def step(validation: dict | None = None, **fields) -> dict:
    out = {"id": 1, "prompt": 'Read "Ada lives in London." Give name and city.', "max_retries": 1, **fields}
    if validation is not None:
        out["validation"] = validation
    return out


def last_user(request: dict) -> str:
    return [m["content"] for m in request["json"]["messages"] if m["role"] == "user"][-1]


# -- 1. every request bounded -----------------------------------------------------------

@pytest.mark.parametrize("validation, expected", [
    (KEYS, 256), ({"type": "json"}, 256), ({"type": "json_schema", "schema": {"type": "object"}}, 512),
    (CODE, 1024), (None, 1024), ({**KEYS, "context": 1000}, 1000 // 4)])
def test_max_tokens_default_per_validation_type(capsys, db, fake_llm, state_dir, validation, expected):
    """A step without max_tokens sends its validation type's default, at most a quarter of
    the context the server reports (4096, or 1000 in the last case)."""
    validation = dict(validation) if validation else None
    fake_llm.context_length = validation.pop("context", 4096) if validation else 4096
    json_step = validation is not None and validation["type"] != "syntax_check"
    fake_llm.enqueue('{"name": "Ada", "city": "London"}' if json_step else "```python\nx = 1\n```")
    insert_plan(db, make_plan(steps=[step(validation, max_retries=0)]))
    rc, result, err = run_json(capsys, db, fake_llm, state_dir)
    assert rc == 0, err
    assert fake_llm.chat_requests[0]["json"]["max_tokens"] == expected
    assert steps_by_id(result)[1]["attempt_log"][0]["sampling"]["max_tokens"] == expected


def test_max_tokens_of_a_list_of_validations():
    step = bridge.Step(id=1, prompt="p", validation=[KEYS, {"type": "command", "run": ["true"]}])
    assert bridge.answer_tokens(step, None) == 256
    assert bridge.answer_tokens(step._replace(validation=[KEYS, CODE]), 4096) == 1024
    assert bridge.answer_tokens(step._replace(validation=[{"type": "command", "run": ["true"]}]), 4096) == 1024


def test_step_max_tokens_wins_and_unknown_context_keeps_the_default(capsys, db, fake_llm, state_dir):
    fake_llm.lmstudio = False          # a server that reports no context length
    fake_llm.enqueue('{"name": "Ada", "city": "London"}').enqueue('{"name": "Ada", "city": "London"}')
    insert_plan(db, make_plan(steps=[step(KEYS, max_retries=0), {**step(KEYS, max_retries=0), "id": 2,
                                                                  "max_tokens": 40}]))
    rc, _, err = run_json(capsys, db, fake_llm, state_dir, "--model", "fake-model")
    assert rc == 0, err
    assert [r["json"]["max_tokens"] for r in fake_llm.chat_requests] == [256, 40]


def test_finish_reason_length_fails_the_attempt_naming_the_limit(capsys, db, fake_llm, state_dir):
    """An answer cut at max_tokens fails even when it would pass the check; the retry is told."""
    fake_llm.enqueue("```python\nx = [1, 2,\n", finish_reason="length").enqueue("```python\nx = 1\n```")
    insert_plan(db, make_plan(steps=[step(CODE, max_tokens=64)]))
    rc, result, err = run_json(capsys, db, fake_llm, state_dir)
    assert rc == 0, err
    entry = steps_by_id(result)[1]
    assert entry["attempts"] == 2
    first = entry["attempt_log"][0]["error"]
    assert first.startswith("stopped at max_tokens=64")
    assert "stopped at max_tokens=64" in last_user(fake_llm.chat_requests[1])


def test_cut_answer_that_passes_the_check_still_fails(capsys, db, fake_llm, state_dir):
    fake_llm.enqueue("Hello there", finish_reason="length")
    insert_plan(db, make_plan(steps=[step(None, max_retries=0, max_tokens=3)]))
    rc, result, err = run_json(capsys, db, fake_llm, state_dir)
    assert rc == 1
    assert "stopped at max_tokens=3" in steps_by_id(result)[1]["error"]


# -- 2. degenerate output stopped while it streams -------------------------------------

@pytest.mark.parametrize("stream, seen", [
    ('{"name": "Ada",' + "\n" * 2000, r"(9|10) newlines in a row"),       # one more than the limit of 8
    ("def f():" + " " * 4000, r"16[12] whitespace characters in a row"),   # ... of 160
    ("The answer is " + "the same line again\n" * 400, r"the same 4 word\(s\) repeated 10 times in a row"),
    ('{"name": {"first": {"x": ' * 50, "JSON nested 2 deep, deeper than the 1 its schema allows"),
])
def test_degenerate_stream_is_cancelled_and_the_retry_told(capsys, db, fake_llm, state_dir, stream, seen):
    """The attempt ends as soon as the text degenerates: the client closes the stream (the
    server gets no further than a fraction of it), the attempt fails saying what was seen,
    and that message is what the retry's prompt carries."""
    fake_llm.enqueue(stream, chunk_size=2, chunk_delay_s=0.002)
    fake_llm.enqueue('{"name": "Ada", "city": "London"}')
    insert_plan(db, make_plan(steps=[step(FLAT)]))
    rc, result, err = run_json(capsys, db, fake_llm, state_dir)
    assert rc == 0, err
    entry = steps_by_id(result)[1]
    assert (entry["status"], entry["attempts"]) == ("succeeded", 2)
    error = entry["attempt_log"][0]["error"]
    assert re.match(f"stopped: {seen}", error), error
    assert error in last_user(fake_llm.chat_requests[1])
    chunks = len(stream) // 2 + 2
    assert fake_llm.chat_requests[0]["events_sent"] < chunks // 4      # the server stopped sending early
    assert entry["attempt_log"][0]["completion_tokens"] > 0            # its tokens still count
    check_store(db)


@pytest.mark.parametrize("text", [
    "```python\nimport os\n\n\nclass A:\n    def f(self):\n" + "                return 1\n" + "\n\n" + "x = 2\n```",
    "```python\n" + "".join(f"value_{n} = compute({n})\n" for n in range(60)) + "```",
    "```python\nzeros = [" + "0, " * 30 + "0]\n```",
])
def test_sound_output_is_not_stopped(capsys, db, fake_llm, state_dir, text):
    fake_llm.enqueue(text, chunk_size=3)
    insert_plan(db, make_plan(steps=[step(CODE, max_retries=0)]))
    rc, result, err = run_json(capsys, db, fake_llm, state_dir)
    assert rc == 0, err
    assert steps_by_id(result)[1]["attempts"] == 1


def test_guard_units():
    guard = bridge.DegenerationGuard(max_depth=None)
    guard.feed('{"a": {"b": {"c": {"d": 1}}}}')            # no schema depth: not checked
    with pytest.raises(bridge.OutputDegenerate, match="newlines"):
        bridge.DegenerationGuard().feed("x" + "\n \n" * 20)
    braces_in_strings = bridge.DegenerationGuard(max_depth=1)
    braces_in_strings.feed('{"a": "{[{[ \\" {[", "b": "]]"}')  # braces inside strings do not nest
    assert braces_in_strings.text.startswith('{"a"')


# -- 3. retries that can succeed -------------------------------------------------------

def test_hotter_schedule_samples_each_attempt_differently(capsys, db, fake_llm, state_dir):
    fake_llm.enqueue("no json").enqueue("still none").enqueue('{"name": "Ada", "city": "London"}')
    insert_plan(db, make_plan(steps=[step(KEYS, max_retries=2)]))
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--retry-sampling", "hotter")
    assert rc == 0, err
    sent = [{k: r["json"].get(k) for k in ("temperature", "seed")} for r in fake_llm.chat_requests]
    assert sent == [{"temperature": 0.0, "seed": None}, {"temperature": 0.5, "seed": 2},
                    {"temperature": 0.8, "seed": 3}]
    log = steps_by_id(result)[1]["attempt_log"]
    assert [e["sampling"].get("temperature") for e in log] == [0.0, 0.5, 0.8]
    assert [e["error"] is None for e in log] == [False, False, True]
    lines = [json.loads(line) for line in (state_dir / "runs" / result["run_id"] / "step-1.jsonl").open()]
    sampled = [line["sampling"] for line in lines if line.get("subtype") == "system_prompt"]
    assert [s.get("seed") for s in sampled] == [None, 2, 3]


def test_plain_schedule_keeps_the_steps_sampling(capsys, db, fake_llm, state_dir):
    fake_llm.enqueue("no json").enqueue('{"name": "Ada", "city": "London"}')
    insert_plan(db, make_plan(steps=[step(KEYS, temperature=0.3)]))
    rc, _, err = run_json(capsys, db, fake_llm, state_dir, "--retry-sampling", "plain")
    assert rc == 0, err
    assert [(r["json"]["temperature"], "seed" in r["json"]) for r in fake_llm.chat_requests] == [(0.3, False)] * 2


def test_step_temperature_above_the_schedule_is_kept(capsys, db, fake_llm, state_dir):
    fake_llm.enqueue("no json").enqueue('{"name": "Ada", "city": "London"}')
    insert_plan(db, make_plan(steps=[step(KEYS, temperature=0.9)]))
    rc, _, err = run_json(capsys, db, fake_llm, state_dir, "--retry-sampling", "hotter")
    assert rc == 0, err
    assert [r["json"]["temperature"] for r in fake_llm.chat_requests] == [0.9, 0.9]


@pytest.mark.parametrize("server, extras", [
    ("llama.cpp", {"repeat_penalty", "dry_multiplier"}), ("LM Studio", {"repeat_penalty"}),
    ("llama-cpp-python", {"repeat_penalty"}), ("OpenAI-compatible", set())])
def test_penalty_fields_only_where_the_server_takes_them(capsys, db, fake_llm, state_dir, server, extras):
    fake_llm.lmstudio = server == "LM Studio"
    fake_llm.slots = 1 if server == "llama.cpp" else None
    fake_llm.owned_by = "me" if server == "llama-cpp-python" else "fake"     # llama_cpp/server/app.py
    fake_llm.enqueue("no json").enqueue('{"name": "Ada", "city": "London"}')
    insert_plan(db, make_plan(steps=[step(KEYS)]))
    rc, _, err = run_json(capsys, db, fake_llm, state_dir, "--retry-sampling", "penalty", "--model", "fake-model")
    assert rc == 0, err
    first, second = (set(r["json"]) & {"repeat_penalty", "dry_multiplier"} for r in fake_llm.chat_requests)
    assert (first, second) == (set(), extras)


def test_probe_tells_llama_cpp_python(capsys, db, fake_llm, state_dir):
    fake_llm.lmstudio, fake_llm.owned_by = False, "me"
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--health", "--json")
    assert json.loads(out)["server"]["kind"] == "llama-cpp-python", err


def test_server_refusing_an_extra_field_gets_none_and_no_attempt_is_spent(capsys, db, fake_llm, state_dir):
    fake_llm.enqueue("no json")
    fake_llm.enqueue(status=400, error="Unrecognized request argument supplied: repeat_penalty")
    fake_llm.enqueue('{"name": "Ada", "city": "London"}')
    insert_plan(db, make_plan(steps=[step(KEYS)]))
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--retry-sampling", "penalty")
    assert rc == 0, err
    assert steps_by_id(result)[1]["attempts"] == 2
    assert "repeat_penalty" in fake_llm.chat_requests[1]["json"]
    assert "repeat_penalty" not in fake_llm.chat_requests[2]["json"]
    assert "seed" in fake_llm.chat_requests[2]["json"]


def test_unknown_retry_sampling_is_a_one_line_usage_error(capsys, db, fake_llm, state_dir):
    rc, _, err = run_bridge(capsys, db, fake_llm, state_dir, environ={"BRIDGE_RETRY_SAMPLING": "warmer"})
    assert rc == 2
    assert "unknown retry sampling 'warmer'" in err and "Traceback" not in err


# -- 4. schemas that bound each value --------------------------------------------------

def test_contains_keys_schema_bounds_each_value():
    schema = bridge.output_schema(KEYS)
    assert schema["additionalProperties"] is False
    assert schema["properties"]["name"] == bridge.bounded_value()
    assert bridge.schema_depth(schema) == 2
    string = bridge.bounded_value()["anyOf"][0]
    assert (string["minLength"], string["maxLength"]) == (1, bridge.JSON_VALUE_MAX_LENGTH)


def test_json_schema_keeps_the_plans_bounds_and_adds_missing_ones():
    plan = {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "notes": {"type": "array"}, "title": {"type": "string"}, "blob": {},
        "proof": {"type": "string", "minLength": 2000}}}
    sent = bridge.output_schema({"type": "json_schema", "schema": plan})
    props = sent["properties"]
    assert props["tags"] == plan["properties"]["tags"]
    assert props["notes"]["maxItems"] == bridge.JSON_LIST_MAX_ITEMS and "anyOf" in props["notes"]["items"]
    assert props["title"]["maxLength"] == bridge.JSON_VALUE_MAX_LENGTH
    assert props["blob"] == bridge.bounded_value()
    assert props["proof"] == {"type": "string", "minLength": 2000}       # the plan asks for more
    assert sent["additionalProperties"] is False
    assert plan["properties"]["notes"] == {"type": "array"}             # the plan's own is not changed
    assert bridge.schema_depth(sent) == 2
    assert bridge.schema_depth(plan) is None


def test_the_check_still_takes_nested_values(capsys, db, fake_llm, state_dir):
    """Unconstrained, a contains_keys value may nest as deep as it likes: nothing stops it."""
    assert bridge.checked_depth(KEYS) is None and bridge.checked_depth(FLAT) == 1
    fake_llm.enqueue('{"name": {"first": {"given": ["Ada"]}}, "city": "London"}')
    insert_plan(db, make_plan(steps=[step(KEYS, max_retries=0)]))
    rc, _, err = run_json(capsys, db, fake_llm, state_dir, "--no-structured")
    assert rc == 0, err


def test_the_task_is_the_last_thing_the_model_reads(tmp_path):
    """The task comes after the objective, the outputs it depends on and the form of
    answer wanted (measured: more values taken from the text on SmolLM2-135M)."""
    plan = bridge.check_plan(make_plan(steps=[
        {"id": 1, "prompt": "first"},
        {"id": 2, "prompt": 'Read this sentence: "Ada lives in London." Give name and city.', "depends_on": [1],
         "validation": {"type": "contains_keys", "keys": ["name", "city"]}}],
        context={"objective": "the objective"}))
    user = bridge.build_messages(plan, plan.steps[2], {1: "the first output"})[-1]["content"]
    assert user.index("the objective") < user.index("the first output") < user.index('"name", "city"')
    assert user.rstrip().endswith('Read this sentence: "Ada lives in London." Give name and city.')
