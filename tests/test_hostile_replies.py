"""Issue 20, rows 12, 16 and 20: numbers and shapes from model servers are hostile input.

Every reply below is sent by a real HTTP server on 127.0.0.1 (FakeLLM / FakeAnthropic with
a handler that plays raw bytes), through the real CLI, into a temporary HOME. What a
well-behaved server sends is documented beside the fakes in tests/fakes.py (OpenAI's
chat.completion.chunk, Anthropic's Messages stream); here each reply breaks one rule of
that shape. What must hold: a shape that is not the documented one is a recorded attempt
failure (exit 1, the plan "failed", the next plan still runs, never exit 70); a usage count
that is not an int from 0 to bridge.USAGE_MAX_TOKENS is unknown and estimated
(usage_reported false), and a paid request with such a count still counts against
--max-cost-usd.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import bridge
from fakes import (FakeAnthropic, FakeLLM, _AnthropicHandler, _Handler, insert_plan, make_plan, plan_state,
                   run_bridge)

HAIKU = "anthropic:claude-haiku-4-5"
OK = '{"a": 1}'


# --------------------------------------------------------------------------------------
# servers that play raw replies
# --------------------------------------------------------------------------------------


class _RawHandler(_Handler):
    """FakeLLM's handler; a queued {"raw": (kind, payload)} is sent as it is: kind "sse"
    (payload: the event texts, each sent as `data: TEXT` and a blank line) or "body" (a
    200 application/json body of that text)."""

    def _play(self, r: dict, req: dict) -> None:
        if "raw" not in r:
            return super()._play(r, req)
        kind, payload = r["raw"]
        if kind == "body":
            self._send(200, payload)
            return
        self._start_sse()
        for text in payload:
            self._write_sse(f"data: {text}\n\n")


    def _get(self) -> None:
        body = self.server.fake.raw_routes.get(self.path.split("?", 1)[0])
        if body is None:
            return super()._get()
        self._record(self._read_body())
        self._send(200, body)


class RawLLM(FakeLLM):
    """FakeLLM, plus raw replies: enqueue_raw for chat, raw_routes {path: body text} for GETs."""

    _handler = _RawHandler

    def reset(self) -> "RawLLM":
        super().reset()
        self.raw_routes: dict[str, str] = {}
        return self

    def enqueue_raw(self, kind: str, payload) -> "RawLLM":
        with self._lock:
            self._queue.append({"raw": (kind, payload)})
        return self


class _RawAnthropicHandler(_AnthropicHandler):
    """FakeAnthropic's handler; a queued {"raw": [(event, data text), ...]} is streamed as
    those SSE events, as the Messages API frames them (event: NAME, data: JSON)."""

    def _post(self) -> None:
        fake = self.server.fake
        with fake._lock:
            raw = fake._queue[0].get("raw") if fake._queue else None
            if raw is not None:
                fake._queue.pop(0)
        if raw is None:
            return super()._post()
        self._record(self._read_body())
        self._start_sse({"request-id": "req_fake"})
        for event, data in raw:
            self._write_sse(f"event: {event}\ndata: {data}\n\n")


class RawAnthropic(FakeAnthropic):
    _handler = _RawAnthropicHandler

    def enqueue_raw(self, events: list[tuple[str, str]]) -> "RawAnthropic":
        with self._lock:
            self._queue.append({"raw": events})
        return self


@pytest.fixture(scope="module")
def _raw_llm():
    server = RawLLM().start()
    yield server
    server.stop()


@pytest.fixture
def raw_llm(_raw_llm) -> RawLLM:
    return _raw_llm.reset()


@pytest.fixture(scope="module")
def _raw_anthropic():
    server = RawAnthropic().start()
    yield server
    server.stop()


@pytest.fixture
def raw_anthropic(_raw_anthropic) -> RawAnthropic:
    return _raw_anthropic.reset()


def chunk(delta, finish=None, **extra) -> str:
    """One chat.completion.chunk as text (OpenAI's documented shape)."""
    return json.dumps({"id": "x", "object": "chat.completion.chunk", "model": "fake-model",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})


def usage_chunk(usage_text: str) -> str:
    """The last chunk of a stream with include_usage: no choices, the usage (as raw JSON text)."""
    return '{"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": ' + usage_text + "}"


def good_stream(usage_text: str | None = None) -> list[str]:
    events = [chunk({"role": "assistant", "content": OK}), chunk({}, "stop")]
    if usage_text is not None:
        events.append(usage_chunk(usage_text))
    return events + ["[DONE]"]


def run_all(capsys, db, fake, state_dir, *extra, environ=None) -> tuple[int, dict, str]:
    """A plain run of every pending plan with --json; return (rc, {plan id: result}, stderr)."""
    rc, out, err = run_bridge(capsys, db, fake, state_dir, "--json", "--model", "fake-model", *extra,
                              environ=environ)
    doc = json.loads(out) if out.strip() else {"plans": []}
    return rc, {p["plan_id"]: p for p in doc["plans"]}, err


def two_plans(db) -> None:
    """Plan "hostile" (one JSON step, one attempt), then plan "next" (the same)."""
    step = {"id": 1, "prompt": "Give a.", "validation": {"type": "json"}, "max_retries": 0}
    insert_plan(db, make_plan("hostile", [dict(step)]))
    insert_plan(db, make_plan("next", [dict(step)]))


def no_negative_tokens(result: dict) -> None:
    counts = [result["usage"]["prompt_tokens"], result["usage"]["completion_tokens"]]
    for step in result["steps"]:
        counts += [step["usage"]["prompt_tokens"], step["usage"]["completion_tokens"]]
    assert all(isinstance(n, int) and 0 <= n <= bridge.USAGE_MAX_TOKENS for n in counts), counts
    assert result["cost_usd"] >= 0 and result["would_have_cost_usd"] >= 0


# --------------------------------------------------------------------------------------
# row 16: shapes of a stream (OpenAI-compatible), and the non-streamed body
# --------------------------------------------------------------------------------------

STREAM_SHAPES = {
    # row 16 as written
    "choices of a string": ['{"id": "x", "choices": ["x"]}', "[DONE]"],
    "delta a string": ['{"id": "x", "choices": [{"index": 0, "delta": "x"}]}', "[DONE]"],
    "content a number": [chunk({"content": 5}), chunk({}, "stop"), "[DONE]"],
    "content a list": [chunk({"content": [{"type": "text", "text": "x"}]}), chunk({}, "stop"), "[DONE]"],
    "content an object": [chunk({"content": {"text": "x"}}), chunk({}, "stop"), "[DONE]"],
    # variants
    "choices a string": ['{"id": "x", "choices": "x"}', "[DONE]"],
    "choice null": ['{"id": "x", "choices": [null]}', "[DONE]"],
    "choice a number": ['{"id": "x", "choices": [7]}', "[DONE]"],
    "delta a list": ['{"id": "x", "choices": [{"index": 0, "delta": ["x"]}]}', "[DONE]"],
    "content true": [chunk({"content": True}), chunk({}, "stop"), "[DONE]"],
    "chunk a list": ['[1, 2]', "[DONE]"],
    "chunk nested 32,000 deep": ["[" * 32_000 + "]" * 32_000, "[DONE]"],
}


@pytest.mark.parametrize("events", STREAM_SHAPES.values(), ids=STREAM_SHAPES.keys())
def test_a_stream_chunk_of_the_wrong_shape_is_a_recorded_failure_and_the_next_plan_runs(
        capsys, db, raw_llm, state_dir, events):
    two_plans(db)
    raw_llm.enqueue_raw("sse", events)
    raw_llm.enqueue(OK)

    rc, results, err = run_all(capsys, db, raw_llm, state_dir)

    assert rc == 1, err
    assert "Traceback" not in err
    step = results["hostile"]["steps"][0]
    assert results["hostile"]["status"] == "failed" and step["status"] == "failed"
    assert str(raw_llm.url) in step["error"]             # says which server sent what
    assert plan_state(db, "hostile")["status"] == "failed"     # not left in_progress (stale)
    assert results["next"]["status"] == "completed"


# Variants of row 16 for a server that ignores "stream" and answers one chat.completion.
BODY_SHAPES = {
    "choices of a string": '{"id": "x", "object": "chat.completion", "choices": ["x"]}',
    "message a string": '{"object": "chat.completion", "choices": [{"message": "x"}]}',
    "content a number": '{"object": "chat.completion", "choices": [{"message": {"content": 5}}]}',
    "content a list": '{"object": "chat.completion", "choices": [{"message": {"content": ["x"]}}]}',
    "body a list": '[{"choices": []}]',
    "body a string": '"chat.completion"',
    "no choices": '{"object": "chat.completion", "choices": []}',
}


@pytest.mark.parametrize("body", BODY_SHAPES.values(), ids=BODY_SHAPES.keys())
def test_a_whole_body_of_the_wrong_shape_is_a_recorded_failure(capsys, db, raw_llm, state_dir, body):
    two_plans(db)
    raw_llm.enqueue_raw("body", body)
    raw_llm.enqueue(OK)

    rc, results, err = run_all(capsys, db, raw_llm, state_dir)

    assert rc == 1, err
    assert results["hostile"]["status"] == "failed"
    assert "not a chat completion" in results["hostile"]["steps"][0]["error"]
    assert plan_state(db, "hostile")["status"] == "failed"
    assert results["next"]["status"] == "completed"


def test_labels_of_the_wrong_type_are_ignored_not_kept(capsys, db, raw_llm, state_dir):
    """model a list and finish_reason an object (variants): the answer is taken, and what
    the result names as the model is a string or nothing."""
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Give a.", "validation": {"type": "json"}}]))
    raw_llm.enqueue_raw("sse", [json.dumps({"id": "x", "model": ["m"], "choices": [
        {"index": 0, "delta": {"content": OK}, "finish_reason": {"why": "stop"}}]}), "[DONE]"])

    rc, results, err = run_all(capsys, db, raw_llm, state_dir)

    assert rc == 0, err
    assert results["p1"]["steps"][0]["model"] == "fake-model"


# --------------------------------------------------------------------------------------
# rows 16 and 20: usage counts from a local server
# --------------------------------------------------------------------------------------

BAD_USAGE = {
    # rows 16 and 20 as written
    "10**400": '{"prompt_tokens": 1' + "0" * 400 + ', "completion_tokens": 3}',
    "a string usage": '"12 prompt, 3 completion"',
    "negative": '{"prompt_tokens": -1000000000000000, "completion_tokens": -5}',
    # variants
    "counts as strings": '{"prompt_tokens": "12", "completion_tokens": "3"}',
    "a float count": '{"prompt_tokens": 1e300, "completion_tokens": 3}',
    "a bool count": '{"prompt_tokens": true, "completion_tokens": 3}',
    "one count negative": '{"prompt_tokens": 12, "completion_tokens": -1}',
    "past the bound": '{"prompt_tokens": 100000001, "completion_tokens": 3}',
    "a usage list": '[12, 3]',
}


@pytest.mark.parametrize("usage", BAD_USAGE.values(), ids=BAD_USAGE.keys())
def test_a_usage_count_that_cannot_be_true_never_reaches_the_summary(capsys, db, raw_llm, state_dir, usage):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Give a.", "validation": {"type": "json"}}]))
    raw_llm.enqueue_raw("sse", good_stream(usage))

    rc, out, err = run_bridge(capsys, db, raw_llm, state_dir, "--model", "fake-model")

    assert rc == 0, err
    assert "Traceback" not in err
    summary = [line for line in (out + err).splitlines() if "tokens" in line]     # what row 20 read
    assert summary, out + err
    assert not any(re.search(r"(^|[\s$(])-\d", line) for line in summary), summary
    assert "1" + "0" * 20 not in out + err


@pytest.mark.parametrize("usage", BAD_USAGE.values(), ids=BAD_USAGE.keys())
def test_a_usage_count_that_cannot_be_true_is_reported_as_estimated(capsys, db, raw_llm, state_dir, usage):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Give a.", "validation": {"type": "json"}}]))
    raw_llm.enqueue_raw("sse", good_stream(usage))

    rc, results, err = run_all(capsys, db, raw_llm, state_dir)

    assert rc == 0, err
    result = results["p1"]
    assert result["steps"][0]["usage_reported"] is False
    no_negative_tokens(result)


def test_a_true_usage_is_kept_as_sent(capsys, db, raw_llm, state_dir):
    """The bound is not the fault: 0 and USAGE_MAX_TOKENS are believed."""
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Give a.", "validation": {"type": "json"}}]))
    raw_llm.enqueue_raw("sse", good_stream('{"prompt_tokens": %d, "completion_tokens": 0}'
                                           % bridge.USAGE_MAX_TOKENS))

    rc, results, err = run_all(capsys, db, raw_llm, state_dir)

    assert rc == 0, err
    step = results["p1"]["steps"][0]
    assert step["usage_reported"] is True
    assert step["usage"] == {"prompt_tokens": bridge.USAGE_MAX_TOKENS, "completion_tokens": 0}


# --------------------------------------------------------------------------------------
# row 12: the Anthropic executor's numbers, and its stream's shapes
# --------------------------------------------------------------------------------------


def message_start(usage_text: str = '{"input_tokens": 12, "output_tokens": 1}',
                  model: str = '"claude-haiku-4-5-20251001"') -> tuple[str, str]:
    return ("message_start", '{"type": "message_start", "message": {"id": "msg_x", "type": "message", '
                             '"role": "assistant", "model": ' + model + ', "content": [], "usage": '
            + usage_text + "}}")


def text_delta(text_json: str = json.dumps(OK)) -> tuple[str, str]:
    return ("content_block_delta", '{"type": "content_block_delta", "index": 0, '
                                   '"delta": {"type": "text_delta", "text": ' + text_json + "}}")


def message_end(usage_text: str = '{"output_tokens": 3}') -> list[tuple[str, str]]:
    return [("message_delta", '{"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": '
             + usage_text + "}"), ("message_stop", '{"type": "message_stop"}')]


def anthropic_args(fake) -> tuple[str, ...]:
    return ("--anthropic-base-url", fake.url, "--model", HAIKU, "--max-cost-usd", "1")


def test_a_negative_input_tokens_once_does_not_defeat_the_spend_cap(capsys, db, raw_llm, raw_anthropic,
                                                                    state_dir):
    """Row 12 as written: a gateway reports input_tokens -15,000,000,000 once, then two
    million a request ($2 on Haiku). Six steps under --max-cost-usd 1: the first reply's
    usage is unknown (estimated, and priced), the second request trips the cap, and no
    more paid requests are sent (before: all six, "$-14988.75 spent")."""
    steps = [{"id": i, "prompt": f"Say {i}.", "max_retries": 0} for i in range(1, 7)]
    insert_plan(db, make_plan("p1", steps))
    raw_anthropic.enqueue_raw([message_start('{"input_tokens": -15000000000, "output_tokens": 1}'),
                               text_delta('"one"'), *message_end()])
    for _ in range(5):
        raw_anthropic.enqueue_raw([message_start('{"input_tokens": 2000000, "output_tokens": 1}'),
                                   text_delta('"ok"'), *message_end()])

    rc, out, err = run_bridge(capsys, db, raw_llm, state_dir, *anthropic_args(raw_anthropic),
                              environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 1, err
    assert len(raw_anthropic.messages_requests) == 2, out + err
    assert "spend cap reached" in out + err
    assert "$-" not in out + err
    spent = [line for line in (out + err).splitlines() if "spent" in line]
    assert spent and all("-" not in line.split("spent")[0].rsplit("$", 1)[-1] for line in spent), spent


ANTHROPIC_BAD_COUNTS = {
    "negative input_tokens": ('{"input_tokens": -15000000000, "output_tokens": 1}', '{"output_tokens": 3}'),
    "input_tokens 10**400": ('{"input_tokens": 1' + "0" * 400 + "}", '{"output_tokens": 3}'),
    "input_tokens a string": ('{"input_tokens": "12"}', '{"output_tokens": 3}'),
    "output_tokens negative": ('{"input_tokens": 12}', '{"output_tokens": -3000000000}'),
    "output_tokens a float": ('{"input_tokens": 12}', '{"output_tokens": 1e308}'),
    "no usage at all": ("null", "null"),
}


@pytest.mark.parametrize("start, end", ANTHROPIC_BAD_COUNTS.values(), ids=ANTHROPIC_BAD_COUNTS.keys())
def test_an_anthropic_count_that_cannot_be_true_is_estimated_and_priced(
        capsys, db, raw_llm, raw_anthropic, state_dir, start, end):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Say ok.", "max_retries": 0}]))
    raw_anthropic.enqueue_raw([message_start(start), text_delta('"ok"'), *message_end(end)])

    rc, results, err = run_all(capsys, db, raw_llm, state_dir, *anthropic_args(raw_anthropic),
                               environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 0, err
    result = results["p1"]
    step = result["steps"][0]
    assert step["usage_reported"] is False
    assert step["cost_usd"] > 0                  # the estimate is priced: it counts against the cap
    no_negative_tokens(result)


ANTHROPIC_SHAPES = {
    "message a string": [("message_start", '{"type": "message_start", "message": "x"}'),
                         text_delta(), *message_end()],
    "usage a list": [message_start("[1]"), text_delta(), *message_end()],
    "delta a string": [message_start(), ("content_block_delta", '{"type": "content_block_delta", "delta": "x"}'),
                       *message_end()],
    "text a number": [message_start(), text_delta("5"), *message_end()],
    "text an object": [message_start(), text_delta('{"t": "x"}'), *message_end()],
    "event a list": [message_start(), ("content_block_delta", "[1, 2]"), *message_end()],
    "message_delta usage a string": [message_start(), text_delta(), *message_end('"lots"')],
    "event nested 32,000 deep": [message_start(), ("content_block_delta", "[" * 32_000 + "]" * 32_000),
                                 *message_end()],
}


@pytest.mark.parametrize("events", ANTHROPIC_SHAPES.values(), ids=ANTHROPIC_SHAPES.keys())
def test_an_anthropic_event_of_the_wrong_shape_is_a_recorded_failure(capsys, db, raw_llm, raw_anthropic,
                                                                    state_dir, events):
    insert_plan(db, make_plan("hostile", [{"id": 1, "prompt": "Say ok.", "max_retries": 0}]))
    insert_plan(db, make_plan("next", [{"id": 1, "prompt": "Say ok."}]))
    raw_anthropic.enqueue_raw(events)
    raw_anthropic.enqueue_raw([message_start(), text_delta('"ok"'), *message_end()])

    rc, results, err = run_all(capsys, db, raw_llm, state_dir, *anthropic_args(raw_anthropic),
                               environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 1, err
    assert "Traceback" not in err
    assert results["hostile"]["status"] == "failed"
    assert plan_state(db, "hostile")["status"] == "failed"
    assert results["next"]["status"] == "completed"


def test_a_model_label_of_the_wrong_type_is_ignored(capsys, db, raw_llm, raw_anthropic, state_dir):
    """message_start's model a list (a variant): the answer is taken; the cost is priced
    by the model asked for, so it still counts."""
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Say ok.", "max_retries": 0}]))
    raw_anthropic.enqueue_raw([message_start(model='["m"]'), text_delta('"ok"'), *message_end()])

    rc, results, err = run_all(capsys, db, raw_llm, state_dir, *anthropic_args(raw_anthropic),
                               environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 0, err
    assert results["p1"]["steps"][0]["model"] == HAIKU          # the model asked for, not the list


# --------------------------------------------------------------------------------------
# the claude CLI's figures
# --------------------------------------------------------------------------------------

_CLAUDE = '''
import os, sys
sys.stdin.read()
sys.stdout.write(open(os.environ["CLAUDE_FAKE_LINES"], encoding="utf-8").read())
'''


def fake_claude(tmp_path: Path, lines: list[str]) -> dict:
    """A `claude` that prints these NDJSON lines (the documented stream-json events,
    code.claude.com/docs/en/headless, with one figure broken); the environ to run it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "claude"
    script.write_text(f"#!{os.sys.executable}\n{_CLAUDE}", encoding="utf-8")
    script.chmod(0o755)
    (tmp_path / "lines.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "CLAUDE_FAKE_LINES": str(tmp_path / "lines.jsonl")}


def claude_result(usage: str, cost: str, result: str = json.dumps("ok")) -> list[str]:
    return ['{"type": "system", "subtype": "init", "model": "claude-haiku-4-5", "session_id": "s1"}',
            '{"type": "assistant", "message": {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}}',
            '{"type": "result", "subtype": "success", "is_error": false, "result": ' + result + ', "usage": '
            + usage + ', "total_cost_usd": ' + cost + ', "duration_ms": 10, "session_id": "s1"}']


CLAUDE_BAD = {
    "negative tokens and cost": ('{"input_tokens": -1000000000, "output_tokens": 20}', "-14988.75"),
    "tokens as strings": ('{"input_tokens": "many", "output_tokens": "20"}', '"0.01"'),
    "10**400 tokens, cost an object": ('{"input_tokens": 1' + "0" * 400 + ', "output_tokens": 1}', '{"usd": 1}'),
    "usage a list, cost huge": ("[1, 2]", "1e300"),
}


@pytest.mark.parametrize("usage, cost", CLAUDE_BAD.values(), ids=CLAUDE_BAD.keys())
def test_the_claude_cli_figures_that_cannot_be_true_are_estimated_and_priced(
        capsys, db, raw_llm, state_dir, tmp_path, usage, cost):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Say ok.", "max_retries": 0}]))
    environ = fake_claude(tmp_path, claude_result(usage, cost))

    rc, results, err = run_all(capsys, db, raw_llm, state_dir, "--model", "claude-cli:claude-haiku-4-5",
                               environ=environ)

    assert rc == 0, err
    result = results["p1"]
    assert result["steps"][0]["usage_reported"] is False
    assert 0 < result["cost_usd"] < 1
    no_negative_tokens(result)


def test_a_claude_result_of_the_wrong_shape_is_not_a_crash(capsys, db, raw_llm, state_dir, tmp_path):
    """result a list, errors a number, message a string (variants): the streamed text is
    the answer; nothing crashes."""
    lines = claude_result('{"input_tokens": 10, "output_tokens": 2}', "0.001", result="[1]")
    lines.insert(1, '{"type": "assistant", "message": "x"}')
    lines.insert(1, '{"type": "assistant", "message": {"content": 7}}')
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Say ok.", "max_retries": 0}]))

    rc, results, err = run_all(capsys, db, raw_llm, state_dir, "--model", "claude-cli:claude-haiku-4-5",
                               environ=fake_claude(tmp_path, lines))

    assert rc == 0, err
    assert results["p1"]["steps"][0]["output"] == "ok"


@pytest.mark.parametrize("usage", [BAD_USAGE["10**400"], BAD_USAGE["negative"], BAD_USAGE["a string usage"]],
                         ids=["10**400", "negative", "a string usage"])
def test_a_whole_body_usage_that_cannot_be_true_is_estimated(capsys, db, raw_llm, state_dir, usage):
    """The same counts in a server's non-streamed chat.completion body."""
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "Give a.", "validation": {"type": "json"}}]))
    raw_llm.enqueue_raw("body", '{"object": "chat.completion", "model": "fake-model", "choices": [{"index": 0, '
                                '"message": {"role": "assistant", "content": ' + json.dumps(OK) + '}, '
                                '"finish_reason": "stop"}], "usage": ' + usage + "}")

    rc, results, err = run_all(capsys, db, raw_llm, state_dir)

    assert rc == 0, err
    assert results["p1"]["steps"][0]["usage_reported"] is False
    no_negative_tokens(results["p1"])


@pytest.mark.parametrize("context", [10**400, -4096, "4096", 4096.5])
def test_a_context_length_that_cannot_be_true_is_not_reported(capsys, db, raw_llm, state_dir,
                                                              context):
    """A variant of row 20 in the probe: LM Studio's loaded_context_length of 10**400 (or
    negative, a string, a float) is "not reported", never a limit bridge computes with."""
    raw_llm.context_length = context
    rc, out, err = run_bridge(capsys, db, raw_llm, state_dir, "--health", "--json")

    assert rc == 0, err
    assert json.loads(out)["server"]["context_length"] is None


@pytest.mark.parametrize("model", ["null", '"gpt-4o"', '""'],
                         ids=["no model", "another model", "empty"])
def test_a_gateway_naming_no_priced_model_still_pays_for_what_it_counts(
        capsys, db, raw_llm, raw_anthropic, state_dir, model):
    """A variant of row 12: message_start names no Claude model (or none), so the price
    table has no line for it; the request is priced as the model asked for, and the cap
    trips after the first $2 request (before: $0 each, all six sent)."""
    steps = [{"id": i, "prompt": f"Say {i}.", "max_retries": 0} for i in range(1, 7)]
    insert_plan(db, make_plan("p1", steps))
    for _ in range(6):
        start = message_start('{"input_tokens": 2000000, "output_tokens": 1}', model=model)
        raw_anthropic.enqueue_raw([start, text_delta('"ok"'), *message_end()])

    rc, out, err = run_bridge(capsys, db, raw_llm, state_dir, *anthropic_args(raw_anthropic),
                              environ={"ANTHROPIC_API_KEY": "sk-test"})

    assert rc == 1, err
    assert len(raw_anthropic.messages_requests) == 1, out + err
    assert "spend cap reached" in out + err


PROBE_SHAPES = {
    "loaded_instances an object": ("/api/v1/models",
                                   '{"models": [{"key": "m", "loaded_instances": {"a": 1}}]}'),
    "config a string": ("/api/v1/models",
                        '{"models": [{"key": "m", "loaded_instances": [{"config": "x"}]}]}'),
    "key a list": ("/api/v1/models",
                   '{"models": [{"key": ["m"], "loaded_instances": [{"id": 5}]}]}'),
    "v0 id an object": ("/api/v0/models", '{"data": [{"id": {"x": 1}, "state": "loaded"}]}'),
    "props settings a list": ("/props", '{"total_slots": 2, "default_generation_settings": [1]}'),
}


@pytest.mark.parametrize("path, body", PROBE_SHAPES.values(), ids=PROBE_SHAPES.keys())
def test_a_probe_answer_of_the_wrong_shape_is_not_a_crash(capsys, db, raw_llm, state_dir, path,
                                                          body):
    """Variants of row 16 in what a server says of itself (LM Studio's /api/v1/models and
    /api/v0/models, llama.cpp's /props): --health and a run still work; a loaded model
    id that is not a string is not taken."""
    raw_llm.raw_routes[path] = body
    raw_llm.lmstudio = path != "/props"         # llama.cpp's server answers /props, not LM Studio's
    step = {"id": 1, "prompt": "Give a.", "validation": {"type": "json"}}
    insert_plan(db, make_plan("p1", [step]))
    raw_llm.enqueue(OK)

    rc, out, err = run_bridge(capsys, db, raw_llm, state_dir, "--health", "--json")
    assert rc == 0, err
    loaded = json.loads(out)["server"]["loaded"]
    assert loaded is None or isinstance(loaded, str)
    rc, results, err = run_all(capsys, db, raw_llm, state_dir)
    assert rc == 0, err
    assert results["p1"]["status"] == "completed"
