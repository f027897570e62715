"""Reasoning models (issue 22): thinking asked off for bounded steps and bounded when it
happens anyway, reasoning deltas counted and recorded, every reasoning shape taken out of
the answer before its check and its file, and a constraint that garbles dropped.

The fake server answers as the real ones document (tests/fakes.py FakeLLM: reasoning in
reasoning_content or reasoning, cut at max_tokens with thinking counted, the thinking-off
fields honoured or ignored, a grammar that garbles), with the sources cited there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bridge
from fakes import check_store, insert_plan, make_plan, run_json, steps_by_id

# Literals copied from the issue and the servers' docs, never read from bridge at run time.
JSON_DEFAULT_MAX_TOKENS = 256
RESERVE_AT_4096 = 1024          # the thinking reserve: 2048, at most a quarter of the 4,096 context
NAME = '{"name": "Ada"}'


def _transcript(result: dict, step: int = 1) -> list[dict]:
    path = Path(result["run_log"]) / f"step-{step}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _answers(result: dict, step: int = 1) -> list[dict]:
    return [line for line in _transcript(result, step) if line["type"] == "assistant" and "model" in
            line["message"]]


# --------------------------------------------------------------------------------------
# 3. every reasoning shape is taken out (the issue's table, and Gemma 4's thought channel)
# --------------------------------------------------------------------------------------

SHAPES = [
    # (shape, content as the model sends it, the answer left)
    ("<think> block", '<think>they want {"name": "x"}</think>{"name": "Ada"}', NAME),
    ("orphan </think> (R1 distills, QwQ, Qwen3)",
     'reasoning {"name": "x"}…\n</think>\n\n{"name": "Ada"}', NAME),
    ("gpt-oss Harmony unparsed",
     '<|channel|>analysis<|message|>They want {"nome": 1}.<|end|><|start|>assistant'
     '<|channel|>final<|message|>{"name": "Ada"}<|return|>', NAME),
    ("<thinking> block", '<thinking>maybe {"nome": "x"}</thinking>{"name": "Ada"}', NAME),
    ("[THINK] (Magistral)", '[THINK]the name is Ada[/THINK]{"name": "Ada"}', NAME),
    ("prose with an orphan </think>",
     "The user wants a greeting. I will write one.\n</think>\nHello, Ada.", "Hello, Ada."),
    ("Gemma 4 thought channel",
     '<|channel>thought\nthe key is {"nome"}<channel|>{"name": "Ada"}', NAME),
]


@pytest.mark.parametrize("content, answer", [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_split_reasoning_takes_every_shape_out(content, answer):
    got, reasoning = bridge.split_reasoning(content)
    assert got == answer
    assert reasoning and reasoning not in got
    assert content.replace(reasoning, "", 1).startswith(got)


@pytest.mark.parametrize("content, answer", [s[1:] for s in SHAPES], ids=[s[0] for s in SHAPES])
def test_every_shape_passes_its_check_and_no_reasoning_reaches_the_file(
        capsys, db, fake_llm, state_dir, project, content, answer):
    """End to end: each shape passes on its first attempt, and the file written holds the
    answer only (on main: 1 of these 6 shapes passed, and prose kept its reasoning in the file)."""
    validation = {"type": "contains_keys", "keys": ["name"]} if answer == NAME \
        else {"type": "non_empty"}
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "task", "validation": validation,
                                      "file_output": "out.txt"}],
                              context={"objective": "o", "project": str(project)}))
    fake_llm.enqueue(content)

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    step = steps_by_id(result)[1]
    assert (rc, step["status"], step["attempts"]) == (0, "succeeded", 1), step["error"]
    written = (project / "out.txt").read_text()
    for word in ("think", "THINK", "channel", "reasoning", "nome", "wants"):
        assert word not in written
    assert json.loads(written) == {"name": "Ada"} if answer == NAME else written == answer
    check_store(db)


def test_a_tag_inside_an_answer_that_opened_with_none_stays():
    text = "Use the <think>tag</think> in your prompt."
    assert bridge.split_reasoning(text) == (text, "")


def test_harmony_cut_while_analysing_has_no_answer():
    assert bridge.split_reasoning("<|channel|>analysis<|message|>Let me think about") == \
        ("", "<|channel|>analysis<|message|>Let me think about")


def test_every_shape_in_the_table_names_its_source():
    assert all(name and source and needle for name, source, needle, _, _ in bridge.REASONING_SHAPES)


# --------------------------------------------------------------------------------------
# 2. reasoning deltas are read, counted, bounded, recorded
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_in_either_field_is_read_apart_from_the_text(fake_llm, field):
    fake_llm.enqueue("the answer", reasoning="step one. step two.", chunk_size=4,
                     reasoning_field=field)
    seen: list[str] = []
    with bridge.LLMClient(bridge.Config(db_paths=(), base_url=fake_llm.url)) as client:
        reply = client.chat([{"role": "user", "content": "q"}],
                            bridge.ChatRequest("fake-model", on_reasoning=seen.append))
    assert reply.text == "the answer"
    assert reply.reasoning == "step one. step two." == "".join(seen)
    assert reply.reasoning_pieces == len(seen) == 5


def test_a_delta_with_both_fields_counts_once():
    assert bridge.reasoning_delta({"reasoning_content": "a", "reasoning": "a"}) == "a"
    assert bridge.reasoning_delta({"content": "x"}) == "" == bridge.reasoning_delta(None)


def test_output_tally_counts_thinking_against_the_same_bound():
    tally = bridge.OutputTally(10)
    tally.add_reasoning("12345")
    tally.add_answer("1234")
    with pytest.raises(bridge.LLMProtocolError, match="while the model was thinking"):
        tally.add_reasoning("xx")
    with pytest.raises(bridge.LLMProtocolError, match="passed --max-output-bytes"):
        tally.add_answer("xx")
    assert (tally.reasoning_bytes, tally.answer_bytes, tally.reasoning_pieces) == (5, 4, 1)


def test_24_mb_of_reasoning_is_cut_at_max_output_bytes(capsys, db, fake_llm, state_dir):
    """On main the 24 MB were read, dropped, and the step passed."""
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "task", "max_retries": 0}]))
    fake_llm.enqueue("fine", reasoning="x" * (24 * 1024 * 1024), chunk_size=65536,
                     reasoning_field="reasoning_content")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir, "--max-output-bytes", "100000")

    step = steps_by_id(result)[1]
    assert (rc, step["status"]) == (1, "failed")
    assert "passed --max-output-bytes (100000 bytes) while the model was thinking" in step["error"]
    assert step["attempt_log"][0]["reasoning_bytes"] <= 100_000 + 65_536
    check_store(db)


def test_reasoning_that_repeats_itself_is_stopped_while_it_streams(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "task", "max_retries": 0}]))
    fake_llm.enqueue("fine", reasoning="wait, let me check again. " * 10_000, chunk_size=5,
                     reasoning_field="reasoning")         # 52,000 chunks

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    step = steps_by_id(result)[1]
    assert step["status"] == "failed"
    assert step["error"].startswith("stopped while thinking: the same")
    assert step["attempt_log"][0]["reasoning_tokens"] > 0
    assert fake_llm.chat_requests[0]["events_sent"] < 26_000    # cut while it streamed


def test_thinking_is_recorded_per_attempt_in_the_result_and_the_run_log(
        capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "task"}]))
    fake_llm.enqueue("the answer", reasoning="I should answer briefly.", chunk_size=4,
                     reasoning_field="reasoning_content")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    entry = steps_by_id(result)[1]["attempt_log"][0]
    assert (entry["reasoning_tokens"], entry["reasoning_bytes"]) == (6, 24)
    assert steps_by_id(result)[1]["output"] == "the answer"
    content = _answers(result)[0]["message"]["content"]
    assert content == [{"type": "thinking", "thinking": "I should answer briefly."},
                       {"type": "text", "text": "the answer"}]


# --------------------------------------------------------------------------------------
# 1. thinking is a choice per step kind, with a reserve that is bounded and said
# --------------------------------------------------------------------------------------

THINK_300 = "t" * 300           # 300 chunks of one character: 300 tokens of reasoning_content


def _json_plan(db, **step):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Who? Ada.", "max_retries": 1,
                                      "validation": {"type": "contains_keys", "keys": ["name"]},
                                      **step}]))


def test_a_json_step_asks_the_server_not_to_think(capsys, db, fake_llm, state_dir):
    """LM Studio 0.4.17+ honours reasoning_effort "none": the 300 tokens of thinking never come."""
    fake_llm.cut_at_max_tokens = fake_llm.thinking_off = True
    _json_plan(db)
    fake_llm.enqueue(NAME, reasoning=THINK_300, chunk_size=1, reasoning_field="reasoning_content")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    step = steps_by_id(result)[1]
    assert (rc, step["status"], step["attempts"]) == (0, "succeeded", 1)
    sent = fake_llm.chat_requests[0]["json"]
    assert sent["reasoning_effort"] == "none"           # LM Studio's field (the fake is LM Studio)
    assert "chat_template_kwargs" not in sent
    assert step["attempt_log"][0]["thinking"] == "off"


def test_thinking_anyway_names_thinking_and_the_retry_has_the_reserve(
        capsys, db, fake_llm, state_dir):
    """A model that thinks although asked not to: the cut attempt says thinking spent the
    budget (on main: "stopped at max_tokens=256: the answer was cut before it ended"), and
    the retry gets max_tokens 256 + the reserve, said on the progress line."""
    fake_llm.cut_at_max_tokens = True
    _json_plan(db)
    for _ in range(2):
        fake_llm.enqueue(NAME, reasoning=THINK_300, chunk_size=1,
                         reasoning_field="reasoning_content")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir)

    step = steps_by_id(result)[1]
    assert (rc, step["status"], step["attempts"]) == (0, "succeeded", 2)
    first, second = step["attempt_log"]
    budget = JSON_DEFAULT_MAX_TOKENS
    assert first["error"].startswith(
        f"stopped at max_tokens={budget}: spent {budget} of {budget} tokens thinking; no answer "
        "(asked not to think, the model thought anyway")
    assert "the answer was cut" not in first["error"]
    assert (first["reasoning_tokens"], first["thinking_reserve_tokens"]) == (256, 0)
    maxes = [r["json"]["max_tokens"] for r in fake_llm.chat_requests]
    assert maxes == [JSON_DEFAULT_MAX_TOKENS, JSON_DEFAULT_MAX_TOKENS + RESERVE_AT_4096]
    assert (second["thinking_reserve_tokens"], second["reasoning_tokens"]) == (RESERVE_AT_4096, 300)
    assert all(r["json"]["reasoning_effort"] == "none" for r in fake_llm.chat_requests)
    assert f"keeps up to {RESERVE_AT_4096} for thinking" in err
    assert json.loads(step["output"]) == {"name": "Ada"}


def test_a_model_seen_thinking_keeps_the_reserve_for_later_steps(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "one"}, {"id": 2, "prompt": "two"}]))
    fake_llm.enqueue("one", reasoning="hm", reasoning_field="reasoning").enqueue("two")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir, "--parallel", "1")

    maxes = [r["json"]["max_tokens"] for r in fake_llm.chat_requests]
    assert maxes[1] == maxes[0] + RESERVE_AT_4096
    assert steps_by_id(result)[2]["attempt_log"][0]["thinking_reserve_tokens"] == RESERVE_AT_4096


def test_a_plan_asks_for_thinking(capsys, db, fake_llm, state_dir):
    """"thinking": "on" (here in defaults): nothing asks the server not to think, and the
    first request already keeps the reserve."""
    fake_llm.cut_at_max_tokens = True
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Who? Ada.",
                                      "validation": {"type": "contains_keys", "keys": ["name"]}}],
                              defaults={"thinking": "on"}))
    fake_llm.enqueue(NAME, reasoning=THINK_300, chunk_size=1, reasoning_field="reasoning")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    step = steps_by_id(result)[1]
    assert (rc, step["status"], step["attempts"]) == (0, "succeeded", 1)
    sent = fake_llm.chat_requests[0]["json"]
    assert "reasoning_effort" not in sent and "chat_template_kwargs" not in sent
    assert sent["max_tokens"] == JSON_DEFAULT_MAX_TOKENS + RESERVE_AT_4096
    assert step["attempt_log"][0]["thinking"] == "on"


def test_a_prose_step_sends_no_thinking_field(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Describe it."}]))
    fake_llm.enqueue("A description.")
    run_json(capsys, db, fake_llm, state_dir)
    sent = fake_llm.chat_requests[0]["json"]
    assert "reasoning_effort" not in sent and "chat_template_kwargs" not in sent


def test_thinking_must_be_on_or_off():
    plan = make_plan("p1", [{"id": 1, "prompt": "x", "thinking": "maybe"}])
    with pytest.raises(bridge.PlanInvalid, match="thinking"):
        bridge.check_plan(plan)
    plan = bridge.check_plan(make_plan("p1", [{"id": 1, "prompt": "x", "thinking": "off"}]))
    assert plan.steps[1].thinking == "off"


def test_a_refused_thinking_field_is_dropped_and_the_other_kept(capsys, db, fake_llm, state_dir):
    """A server bridge cannot name gets both fields; an OpenAI-strict one refuses the
    unknown chat_template_kwargs (HTTP 400 naming it): resent at once without it, and
    never sent again."""
    fake_llm.lmstudio = False
    insert_plan(db, make_plan("p1", [
        {"id": n, "prompt": "Who? Ada.", "max_retries": 0,
         "validation": {"type": "contains_keys", "keys": ["name"]}} for n in (1, 2)]))
    fake_llm.enqueue(status=400,
                     error="Unrecognized request argument supplied: chat_template_kwargs")
    fake_llm.enqueue(NAME).enqueue(NAME)

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir, "--parallel", "1")

    assert rc == 0 and [s["attempts"] for s in result["steps"]] == [1, 1]
    sent = [r["json"] for r in fake_llm.chat_requests]
    assert [("chat_template_kwargs" in s, s.get("reasoning_effort")) for s in sent] == \
        [(True, "none"), (False, "none"), (False, "none")]


def test_llama_cpp_python_gets_no_thinking_field(fake_llm):
    """llama-cpp-python has no reasoning parser (thinking arrives in content): nothing is sent."""
    fake_llm.enqueue(NAME)
    with bridge.LLMClient(bridge.Config(db_paths=(), base_url=fake_llm.url)) as client:
        client.server_kind = "llama-cpp-python"
        client.chat([{"role": "user", "content": "q"}], bridge.ChatRequest("m", thinking="off"))
    sent = fake_llm.chat_requests[0]["json"]
    assert "reasoning_effort" not in sent and "chat_template_kwargs" not in sent


# --------------------------------------------------------------------------------------
# 4. a constraint that garbles is dropped for that model
# --------------------------------------------------------------------------------------

GARBLED = '{"name": "A?a", "tags": ["x", "'          # cut array: not JSON (LM Studio #1555)


def test_a_garbling_constraint_is_dropped_for_the_rest_of_the_run(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1", [
        {"id": n, "prompt": "Who? Ada.", "validation": {"type": "contains_keys", "keys": ["name"]}}
        for n in (1, 2)]))
    for _ in range(3):
        fake_llm.enqueue(NAME, garbled=GARBLED)

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--parallel", "1")

    steps = steps_by_id(result)
    assert rc == 0
    assert [(s["status"], s["attempts"]) for s in result["steps"]] == \
        [("succeeded", 2), ("succeeded", 1)]
    constrained = ["response_format" in r["json"] for r in fake_llm.chat_requests]
    assert constrained == [True, False, False]
    assert [e["response_format"] for e in steps[1]["attempt_log"]] == ["json_schema", None]
    assert [e["response_format"] for e in steps[2]["attempt_log"]] == [None]
    assert [a["response_format"] for a in _answers(result, 1)] == ["json_schema", None]
    assert "looks garbled by the grammar (it is not valid JSON)" in err
    assert json.loads(steps[2]["output"]) == {"name": "Ada"}


def test_an_unconstrained_answer_is_still_checked(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Who? Ada.", "max_retries": 1,
                                      "validation": {"type": "contains_keys", "keys": ["name"]}}]))
    fake_llm.enqueue(NAME, garbled=GARBLED).enqueue('{"nom": "Ada"}')

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    step = steps_by_id(result)[1]
    assert (rc, step["status"]) == (1, "failed")
    assert "lacks the keys ['name']" in step["error"]


def test_a_wrong_but_well_formed_answer_keeps_the_constraint(capsys, db, fake_llm, state_dir):
    """A value the check refuses, inside the schema sent, is the model's error, not the
    grammar's: the constraint stays."""
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "n?", "max_retries": 1,
                                      "validation": [{"type": "json_schema", "schema": schema},
                                                     {"type": "regex", "pattern": "7"}]}]))
    fake_llm.enqueue('{"n": 3}').enqueue('{"n": 7}')

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    assert ["response_format" in r["json"] for r in fake_llm.chat_requests] == [True, True]


def test_grammar_damage_kinds():
    schema = bridge.output_schema({"type": "contains_keys", "keys": ["name"]})
    assert bridge.grammar_damage(GARBLED, schema) == "it is not valid JSON"
    assert "U+FFFD" in bridge.grammar_damage('{"nam\ufffd": 1}', schema)
    assert bridge.grammar_damage('{"na?e": "Ada"}', schema) == \
        "it has the garbled key 'na?e'"
    assert bridge.grammar_damage('{"other": 1}', schema) is None   # the model's mistake
    assert bridge.grammar_damage(NAME, schema) is None
    # nested past what json parses (a model's answer): not valid JSON, not a RecursionError
    assert bridge.grammar_damage("[" * 5000 + "]" * 5000, schema) == "it is not valid JSON"


def test_a_stream_cut_while_thinking_is_not_resent(fake_llm):
    """Thinking that streamed is output: a stream cut after it is not sent again (its
    pieces already reached the guard), as for answer text."""
    fake_llm.enqueue("", reasoning="let me see " * 20, fault="cut", reasoning_field="reasoning")
    fake_llm.enqueue("the answer")
    config = bridge.Config(db_paths=(), base_url=fake_llm.url, retry_delay_s=0)
    with bridge.LLMClient(config, sleep=lambda s: None) as client, pytest.raises(bridge.LLMError):
        client.chat([{"role": "user", "content": "q"}], bridge.ChatRequest("fake-model"))
    assert len(fake_llm.chat_requests) == 1


def test_a_refusal_that_names_no_field_drops_the_thinking_fields(capsys, db, fake_llm, state_dir):
    fake_llm.lmstudio = False
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Who? Ada.", "max_retries": 0,
                                      "validation": {"type": "contains_keys", "keys": ["name"]}}]))
    fake_llm.enqueue(status=422, error="Invalid request").enqueue(NAME)

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0
    sent = [r["json"] for r in fake_llm.chat_requests]
    assert ["reasoning_effort" in s for s in sent] == [True, False]


def test_harmony_final_channel_with_a_constrain_header():
    text = ('<|start|>assistant<|channel|>analysis<|message|>JSON it is.<|end|><|start|>assistant'
            '<|channel|>final <|constrain|>json<|message|>{"name": "Ada"}<|return|>')
    assert bridge.split_reasoning(text)[0] == NAME


def test_reasoning_of_a_reply_that_is_not_streamed_counts_too(fake_llm):
    """A server that ignores "stream" sends message.reasoning_content in one body."""
    fake_llm.enqueue("ok", reasoning="y" * 120_000, fault="no_stream",
                     reasoning_field="reasoning_content")
    config = bridge.Config(db_paths=(), base_url=fake_llm.url, max_output_bytes=100_000)
    with bridge.LLMClient(config) as client, \
            pytest.raises(bridge.LLMProtocolError, match="while the model was thinking"):
        client.chat([{"role": "user", "content": "q"}], bridge.ChatRequest("fake-model"))


def test_thinking_inside_content_that_runs_out_names_thinking(capsys, db, fake_llm, state_dir):
    """llama-cpp-python has no reasoning parser: a thinking model's <think> arrives in
    content. Cut at max_tokens inside it, the attempt says thinking spent the budget."""
    fake_llm.cut_at_max_tokens = True
    fake_llm.lmstudio, fake_llm.owned_by = False, "me"          # llama-cpp-python's /v1/models
    _json_plan(db, max_retries=0)
    fake_llm.enqueue("<think>" + "h" * 400 + "</think>" + NAME, chunk_size=1)

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    step = steps_by_id(result)[1]
    assert step["error"].startswith("stopped at max_tokens=256: spent 256 of 256 tokens thinking; "
                                    "no answer")
    assert "reasoning_effort" not in fake_llm.chat_requests[0]["json"]
    assert step["attempt_log"][0]["reasoning_bytes"] == 256


def test_an_answer_cut_after_thinking_says_both(capsys, db, fake_llm, state_dir):
    fake_llm.cut_at_max_tokens = True
    _json_plan(db, max_retries=0)
    fake_llm.enqueue('{"name": "Ada Lovelace"}', reasoning="t" * 250, chunk_size=1,
                     reasoning_field="reasoning")

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert steps_by_id(result)[1]["error"].startswith(
        "stopped at max_tokens=256: spent 250 of 256 tokens thinking; "
        "the answer was cut after 6 tokens")


def test_a_grounded_step_whose_constraint_garbles_goes_without_its_spans(capsys, db, fake_llm,
                                                                        state_dir):
    """Beside issue 25's grounded spans: once dropped, the run log says no schema was sent
    ("none"), and the grounded check still applies to the unconstrained answer."""
    prompt = 'Read this sentence: "Ada lives in London." Return name.'
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": prompt, "validation": {
        "type": "contains_keys", "keys": ["name"], "grounded": True}}]))
    fake_llm.enqueue(NAME, garbled=GARBLED).enqueue(NAME)

    rc, result, _ = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0 and steps_by_id(result)[1]["attempts"] == 2
    forms = [line["form"] for line in _transcript(result)
             if line.get("subtype") == "constrained_output"]
    assert forms == ["spans", "none"]
    assert ["response_format" in r["json"] for r in fake_llm.chat_requests] == [True, False]
