"""Tests of the rooms "LLM client: OpenAI-compatible servers" and "HTTP executors", and
of original defects 1-5 where they are client behaviour.

The model server is tests/fakes.py's FakeLLM, a real HTTP server on 127.0.0.1.
Backoff is observed through LLMClient's injectable `sleep`, so nothing waits.
"""

from __future__ import annotations

import inspect
import json
import re
import time
from email.utils import formatdate

import httpx
import pytest

import bridge
from fakes import check_store, closed_port, insert_plan, make_plan, read_rows, result_document, state_of_row

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello in three words."}]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def config(url: str, **kw) -> bridge.Config:
    kw.setdefault("timeout_s", 5.0)
    kw.setdefault("retries", 2)
    kw.setdefault("retry_delay_s", 0.1)
    return bridge.Config(db_paths=(), base_url=url, **kw)


def chat(url: str, sleeps: list | None = None, messages=None, **kw):
    """One chat call with a fresh client; returns the Completion."""
    call_kw = {k: kw.pop(k) for k in ("max_tokens", "timeout_s", "on_delta") if k in kw}
    if "temperature" in kw:
        call_kw["sampling"] = {"temperature": kw.pop("temperature")}
    recorder = sleeps.append if sleeps is not None else (lambda s: None)
    with bridge.LLMClient(config(url, **kw), sleep=recorder) as c:
        return c.chat(messages or MESSAGES, bridge.ChatRequest("m", **call_kw))


def expected_prompt_tokens(messages) -> int:
    """What the fake reports as prompt_tokens: characters of the messages // 4 + 1."""
    return sum(len(m["content"]) for m in messages) // 4 + 1


# --------------------------------------------------------------------------------------
# the request sent
# --------------------------------------------------------------------------------------

def test_request_is_streamed_with_usage_model_and_messages(fake_llm):
    """The request asks for a stream with usage, and names the model passed, not
    "default" (original defect 5); temperature/max_tokens are absent when not given."""
    fake_llm.enqueue("hi")
    reply = chat(fake_llm.url)
    assert reply.text == "hi"
    [req] = fake_llm.chat_requests
    body = req["json"]
    assert req["path"] == "/v1/chat/completions"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == "m"
    assert body["messages"] == MESSAGES
    assert "temperature" not in body
    assert "max_tokens" not in body


def test_request_carries_temperature_and_max_tokens_when_given(fake_llm):
    fake_llm.enqueue("hi")
    chat(fake_llm.url, temperature=0.2, max_tokens=50)
    body = fake_llm.chat_requests[0]["json"]
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 50


def test_completion_names_the_model_that_answered(fake_llm):
    """Completion.model is the model the server says answered (original defect 5)."""
    fake_llm.enqueue("hi")
    reply = chat(fake_llm.url)
    assert reply.model == "m"


# --------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------

def test_stream_is_reassembled_with_usage_from_final_chunk(fake_llm):
    content = "héllo wörld — ✓ 日本語 and a long tail of ordinary ASCII text"
    fake_llm.enqueue(content, chunk_size=3)
    deltas: list[str] = []
    reply = chat(fake_llm.url, on_delta=deltas.append)
    n_chunks = -(-len(content) // 3)
    assert reply.text == content
    assert "".join(deltas) == content
    assert len(deltas) == n_chunks
    assert reply.usage == {"prompt_tokens": expected_prompt_tokens(MESSAGES), "completion_tokens": n_chunks}
    assert reply.finish_reason == "stop"
    assert reply.duration_s >= 0


def test_stream_without_usage_gives_usage_none(fake_llm):
    fake_llm.enqueue("no usage here", usage=False)
    reply = chat(fake_llm.url)
    assert reply.text == "no usage here"
    assert reply.usage is None


def test_reasoning_deltas_are_never_part_of_the_text(fake_llm):
    fake_llm.enqueue("the answer", reasoning="SECRET chain of thought", chunk_size=4)
    deltas: list[str] = []
    reply = chat(fake_llm.url, on_delta=deltas.append)
    assert reply.text == "the answer"
    assert "SECRET" not in reply.text
    assert "SECRET" not in "".join(deltas)


def test_reasoning_field_of_a_non_streamed_reply_is_not_part_of_the_text(fake_llm):
    fake_llm.enqueue("the answer", reasoning="SECRET chain of thought", fault="no_stream")
    reply = chat(fake_llm.url)
    assert reply.text == "the answer"


def test_sse_comment_lines_are_ignored(fake_llm):
    fake_llm.enqueue("pinged but whole", fault="comments", chunk_size=2)
    reply = chat(fake_llm.url)
    assert reply.text == "pinged but whole"
    assert reply.usage is not None


def test_non_streaming_json_answer_is_accepted(fake_llm):
    fake_llm.enqueue("whole body reply", fault="no_stream")
    reply = chat(fake_llm.url)
    assert reply.text == "whole body reply"
    assert reply.usage == {"prompt_tokens": expected_prompt_tokens(MESSAGES),
                           "completion_tokens": -(-len("whole body reply") // 8)}
    assert reply.finish_reason == "stop"
    assert reply.model == "m"


# --------------------------------------------------------------------------------------
# transient failures: retried with backoff
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_transient_status_is_retried_with_backoff_then_succeeds(fake_llm, status):
    """A transient status is retried after a growing, jittered delay (original defect 3)."""
    fake_llm.enqueue(status=status, error="busy").enqueue(status=status, error="busy").enqueue("ok")
    sleeps: list[float] = []
    reply = chat(fake_llm.url, sleeps, retries=3, retry_delay_s=0.1)
    assert reply.text == "ok"
    assert len(fake_llm.chat_requests) == 3
    assert len(sleeps) == 2
    for n, s in enumerate(sleeps):
        bound = 0.1 * 2 ** n
        assert 0.5 * bound <= s <= bound, (n, s)
    assert sleeps[1] >= sleeps[0]


def test_backoff_delays_grow_exponentially_with_jitter(fake_llm):
    """Four 503s without Retry-After: each delay within [0.5, 1.0] of retry_delay_s * 2**n,
    never shrinking (original defect 3)."""
    for _ in range(4):
        fake_llm.enqueue(status=503)
    fake_llm.enqueue("finally")
    sleeps: list[float] = []
    retries_seen: list[str] = []
    with bridge.LLMClient(config(fake_llm.url, retries=4, retry_delay_s=1.0), sleep=sleeps.append,
                          on_retry=retries_seen.append) as c:
        reply = c.chat(MESSAGES, bridge.ChatRequest("m"))
    assert reply.text == "finally"
    assert len(fake_llm.chat_requests) == 5
    assert len(sleeps) == 4
    for n, s in enumerate(sleeps):
        assert 0.5 * 2 ** n <= s <= 1.0 * 2 ** n, (n, s)
    assert sleeps == sorted(sleeps)
    assert sleeps[-1] > sleeps[0]
    assert len(retries_seen) == 4
    assert "retry 1/4" in retries_seen[0] and "retry 4/4" in retries_seen[3]


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_is_honoured_exactly(fake_llm, status):
    fake_llm.enqueue(status=status, retry_after=3).enqueue("ok")
    sleeps: list[float] = []
    reply = chat(fake_llm.url, sleeps, retry_delay_s=0.1)
    assert reply.text == "ok"
    assert sleeps == [3.0]
    assert len(fake_llm.chat_requests) == 2


def test_retry_after_http_date_is_parsed(fake_llm):
    fake_llm.enqueue(status=503, retry_after=formatdate(time.time() + 30, usegmt=True)).enqueue("ok")
    sleeps: list[float] = []
    reply = chat(fake_llm.url, sleeps, retry_delay_s=0.1)
    assert reply.text == "ok"
    assert len(sleeps) == 1
    assert 20.0 < sleeps[0] <= 30.5


def test_retries_are_bounded(fake_llm):
    """retries=2 and three 503s: LLMHTTPError 503 after exactly 3 requests, naming the
    real URL (original defects 1, 4)."""
    for _ in range(3):
        fake_llm.enqueue(status=503, error="still overloaded")
    fake_llm.enqueue("never reached")
    sleeps: list[float] = []
    with pytest.raises(bridge.LLMHTTPError) as info:
        chat(fake_llm.url, sleeps, retries=2)
    assert info.value.status == 503
    assert "still overloaded" in str(info.value)
    assert fake_llm.url in str(info.value)
    assert len(fake_llm.chat_requests) == 3
    assert len(sleeps) == 2
    assert fake_llm.pending == 1


def test_retry_after_beyond_budget_gives_up_at_once(fake_llm):
    fake_llm.enqueue(status=429, retry_after="3600").enqueue("never reached")
    sleeps: list[float] = []
    with pytest.raises(bridge.LLMError) as info:
        chat(fake_llm.url, sleeps, retries=4)
    assert "budget" in str(info.value)
    assert "120" in str(info.value)
    assert sleeps == []
    assert len(fake_llm.chat_requests) == 1


def test_connection_refused_raises_unavailable_naming_the_real_url():
    """A closed port: retried, then LLMServerUnusable (the server is gone for the run:
    issue 21) whose message names the URL used, not localhost:1234 (original defect 4)."""
    url = f"http://127.0.0.1:{closed_port()}/v1"
    sleeps: list[float] = []
    retries_seen: list[str] = []
    with bridge.LLMClient(config(url, retries=2), sleep=sleeps.append, on_retry=retries_seen.append) as c:
        with pytest.raises(bridge.LLMServerUnusable) as info:
            c.chat(MESSAGES, bridge.ChatRequest("m"))
    message = str(info.value)
    assert "stopped answering" in message and "over 2 retries" in message
    assert url in message
    assert "localhost:1234" not in message
    # retries + 1 tries: one sleep and one retry notice between each two
    assert len(sleeps) == 2
    assert len(retries_seen) == 2


def test_dropped_connection_is_retried_then_succeeds(fake_llm):
    fake_llm.enqueue(fault="drop").enqueue("after the drop")
    sleeps: list[float] = []
    reply = chat(fake_llm.url, sleeps)
    assert reply.text == "after the drop"
    assert len(fake_llm.chat_requests) == 2
    assert len(sleeps) == 1


# --------------------------------------------------------------------------------------
# non-transient errors: raised at once with the server's message
# --------------------------------------------------------------------------------------

ERROR_BODIES = {
    "openai": lambda msg: {"error": {"message": msg, "type": "invalid_request_error"}},
    "lmstudio": lambda msg: {"error": msg},
    "vllm": lambda msg: {"object": "error", "message": msg, "type": "BadRequestError", "code": 400},
}


@pytest.mark.parametrize("shape", sorted(ERROR_BODIES))
@pytest.mark.parametrize("status", [400, 401, 404])
def test_non_transient_status_raises_at_once_with_server_message(fake_llm, status, shape):
    """Not retried, and the server's own message is in the error (original defect 1);
    a 401 is the server's (a key), so it stops the run (issue 21)."""
    msg = f"the server says no ({shape} {status})"
    fake_llm.enqueue(status=status, error_body=ERROR_BODIES[shape](msg)).enqueue("never reached")
    sleeps: list[float] = []
    with pytest.raises(bridge.LLMServerUnusable if status == 401 else bridge.LLMHTTPError) as info:
        chat(fake_llm.url, sleeps, retries=3)
    assert info.value.status == status
    assert msg in str(info.value)
    assert fake_llm.url in str(info.value)
    assert info.value.context_overflow is False
    assert len(fake_llm.chat_requests) == 1
    assert sleeps == []


OVERFLOW_BODIES = {
    "lmstudio": {"error": "Trying to keep the first 15857 tokens when context the overflows. However, "
                          "the model is loaded with context length of only 4096 tokens"},
    "llamacpp": {"error": {"code": 400, "message": "request (4390 tokens) exceeds the available context "
                                                   "size (4096 tokens), try increasing it",
                           "type": "exceed_context_size_error"}},
    "openai": {"error": {"message": "This model's maximum context length is 2048 tokens. However, you "
                                    "requested 5000 tokens. Please reduce the length of the messages.",
                         "code": "context_length_exceeded"}},
}


@pytest.mark.parametrize("wording", sorted(OVERFLOW_BODIES))
def test_context_overflow_400_is_flagged(fake_llm, wording):
    fake_llm.enqueue(status=400, error_body=OVERFLOW_BODIES[wording])
    with pytest.raises(bridge.LLMHTTPError) as info:
        chat(fake_llm.url)
    assert info.value.status == 400
    assert info.value.context_overflow is True
    assert "4096" in str(info.value) or "2048" in str(info.value)
    assert len(fake_llm.chat_requests) == 1


# --------------------------------------------------------------------------------------
# malformed replies
# --------------------------------------------------------------------------------------

def test_body_that_is_not_json_raises_protocol_error(fake_llm):
    """A 200 whose body is not JSON is an LLMProtocolError, not a crash (original defect 2)."""
    fake_llm.enqueue("x", fault="not_json").enqueue("never reached")
    with pytest.raises(bridge.LLMProtocolError) as info:
        chat(fake_llm.url)
    assert "oops" in str(info.value)
    assert len(fake_llm.chat_requests) == 1


def test_stream_without_choices_raises_protocol_error(fake_llm):
    """Chunks with no `choices` are an LLMProtocolError, not a crash (original defect 2)."""
    fake_llm.enqueue("some content", fault="no_choices").enqueue("never reached")
    with pytest.raises(bridge.LLMProtocolError) as info:
        chat(fake_llm.url)
    assert "choices" in str(info.value)
    assert len(fake_llm.chat_requests) == 1


def test_sse_error_event_carries_the_server_message_and_overflow(fake_llm):
    fake_llm.enqueue("x", fault="sse_error")
    with pytest.raises(bridge.LLMError) as info:
        chat(fake_llm.url)
    assert "Input does not fit in context length." in str(info.value)
    assert info.value.context_overflow is True


def test_sse_error_event_with_another_message_is_not_an_overflow(fake_llm):
    fake_llm.enqueue("x", fault="sse_error", error="model crashed while sampling")
    with pytest.raises(bridge.LLMError) as info:
        chat(fake_llm.url)
    assert "model crashed while sampling" in str(info.value)
    assert info.value.context_overflow is False


def test_empty_stream_raises_protocol_error(fake_llm):
    fake_llm.enqueue("x", fault="empty_stream")
    with pytest.raises(bridge.LLMProtocolError):
        chat(fake_llm.url)


@pytest.mark.parametrize("keep_alive", [True, False], ids=["chunked", "closed"])
def test_cut_stream_raises_protocol_error_ended_early(fake_llm, keep_alive):
    """A stream cut mid-way is the same error whether it was chunked (the last chunk
    never comes) or ended by closing the connection (no finish_reason, no [DONE])."""
    fake_llm.keep_alive = keep_alive
    fake_llm.enqueue("a reply that will be cut in half", fault="cut", chunk_size=4).enqueue("never reached")
    with pytest.raises(bridge.LLMProtocolError) as info:
        chat(fake_llm.url)
    assert "ended early" in str(info.value)
    assert len(fake_llm.chat_requests) == 1


def test_stall_after_output_raises_without_hanging_or_retrying(fake_llm):
    fake_llm.enqueue("a reply that stalls half way", fault="stall", chunk_size=4, delay_s=0.6)
    fake_llm.enqueue("never reached")
    sleeps: list[float] = []
    started = time.monotonic()
    with pytest.raises(bridge.LLMError):
        chat(fake_llm.url, sleeps, timeout_s=0.2, retries=3)
    assert time.monotonic() - started < 0.55
    assert len(fake_llm.chat_requests) == 1
    assert sleeps == []


def test_delay_past_timeout_is_a_timeout(fake_llm):
    fake_llm.enqueue("late", fault="delay", delay_s=0.6)
    with pytest.raises(bridge.LLMTimeout) as info:
        chat(fake_llm.url, timeout_s=0.2, retries=0)
    assert fake_llm.url in str(info.value)


def test_delay_past_timeout_is_retried_then_succeeds(fake_llm):
    """--timeout (per chunk) passed: retried. (A step's timeout_s is its deadline, never
    retried: tests/test_first_hour.py.)"""
    fake_llm.enqueue("late", fault="delay", delay_s=0.6).enqueue("on time")
    sleeps: list[float] = []
    with bridge.LLMClient(config(fake_llm.url, timeout_s=0.2, retries=2), sleep=sleeps.append) as c:
        reply = c.chat(MESSAGES, bridge.ChatRequest("m"))
    assert reply.text == "on time"
    assert len(fake_llm.chat_requests) == 2
    assert len(sleeps) == 1


def test_streamed_output_past_max_output_bytes_is_cut(fake_llm):
    fake_llm.enqueue("x" * 1000, chunk_size=50)
    with pytest.raises(bridge.LLMProtocolError) as info:
        chat(fake_llm.url, max_output_bytes=100)
    assert "--max-output-bytes" in str(info.value)
    assert len(fake_llm.chat_requests) == 1


def test_whole_body_past_max_output_bytes_is_cut(fake_llm):
    fake_llm.enqueue("x" * 1000, fault="no_stream")
    with pytest.raises(bridge.LLMProtocolError) as info:
        chat(fake_llm.url, max_output_bytes=100)
    assert "--max-output-bytes" in str(info.value)


# --------------------------------------------------------------------------------------
# probe().loaded: which model the server has loaded
# --------------------------------------------------------------------------------------

def test_loaded_model_prefers_lm_studio_loaded_state(fake_llm):
    """The model actually loaded is found, not assumed "default" (original defect 5)."""
    fake_llm.models = ["first", "second", "third"]
    fake_llm.loaded = "second"
    with bridge.LLMClient(config(fake_llm.url)) as c:
        assert c.probe().loaded == "second"
    assert any(r["path"] == "/api/v0/models" for r in fake_llm.requests)


def test_loaded_model_without_lm_studio_route_is_first_listed(fake_llm):
    fake_llm.models = ["first", "second"]
    fake_llm.loaded = "second"
    fake_llm.lmstudio = False
    with bridge.LLMClient(config(fake_llm.url)) as c:
        assert c.probe().loaded == "first"


def test_loaded_model_is_none_when_lm_studio_has_none_loaded(fake_llm):
    fake_llm.models = ["first", "second"]
    fake_llm.loaded = None
    with bridge.LLMClient(config(fake_llm.url)) as c:
        assert c.probe().loaded is None


def test_loaded_model_against_closed_port_raises_unavailable():
    """The message names the address really used (original defect 4)."""
    port = closed_port()
    with bridge.LLMClient(config(f"http://127.0.0.1:{port}/v1")) as c:
        with pytest.raises(bridge.LLMUnavailable) as info:
            c.probe().loaded
    assert f"http://127.0.0.1:{port}/" in str(info.value)
    assert "localhost:1234" not in str(info.value)


# --------------------------------------------------------------------------------------
# exhaustiveness (style X4)
# --------------------------------------------------------------------------------------

def _httpx_transport_errors() -> list[type]:
    return [cls for name, cls in inspect.getmembers(httpx, inspect.isclass)
            if not name.startswith("_") and issubclass(cls, httpx.TransportError)]


def test_every_httpx_transport_error_maps_to_an_llm_error():
    classes = _httpx_transport_errors()
    assert len(classes) >= 10  # the collection itself works
    url = "http://127.0.0.1:9/v1/chat/completions"
    request = httpx.Request("POST", url)
    with bridge.LLMClient(config("http://127.0.0.1:9/v1")) as c:
        for cls in classes:
            exc = cls("boom", request=request)
            mapped = c._transport_error(exc, url)
            assert isinstance(mapped, bridge.LLMError), cls
            assert url in str(mapped), cls
            if issubclass(cls, httpx.TimeoutException):
                assert isinstance(mapped, bridge.LLMTimeout) and mapped.transient, cls
            if issubclass(cls, (httpx.ConnectError, httpx.ReadError, httpx.WriteError)):
                assert isinstance(mapped, bridge.LLMUnavailable) and mapped.transient, cls


def _bridge_errors() -> list[type]:
    return [cls for _, cls in inspect.getmembers(bridge, inspect.isclass)
            if issubclass(cls, bridge.BridgeError)]


def test_every_bridge_error_has_a_documented_exit_code():
    classes = _bridge_errors()
    assert bridge.LLMError in classes and bridge.LLMProtocolError in classes
    doc = bridge.__doc__
    section = doc.split("Exit codes:", 1)[1].split("\n\n", 1)[0]
    documented = {int(n) for n in re.findall(r"^\s+(\d+)\s{2,}\S", section, re.M)}
    assert {0, 1, 2, 70, 130} <= documented
    for code in (0, 1, 2, 70, 130):
        assert re.search(rf"\b{code}\b", doc)
    for cls in classes:
        assert cls.exit_code in {1, 2}, cls
        assert cls.exit_code in documented, cls


# --------------------------------------------------------------------------------------
# via the CLI: a failed request fails the plan, cleanly (original defect 1)
# --------------------------------------------------------------------------------------

def _run_failing_plan(fake_llm, store, state_dir, capsys, plan_id):
    insert_plan(store, make_plan(id=plan_id, steps=[{"id": 1, "prompt": "Say hi", "max_retries": 1}]))
    rc = bridge.main(["--plan", plan_id, "--json", "--db", str(store), "--base-url", fake_llm.url,
                      "--state-dir", str(state_dir), "--model", "m",
                      "--retries", "1", "--retry-delay", "0", "--timeout", "5"], environ={})
    out, err = capsys.readouterr()
    return rc, out, err


def _plan_and_result(store, plan_id):
    rows = read_rows(store)
    plan_rows = [r for r in rows if "bridge-plan" in (r["tags"] or "")
                 and json.loads(r["content"]).get("id") == plan_id]
    result_rows = [r for r in rows if "bridge-result" in (r["tags"] or "")
                   and (r["metadata_obj"] or {}).get("plan_id") == plan_id]
    assert len(plan_rows) == 1 and len(result_rows) == 1
    return plan_rows[0], result_document(result_rows[0]["content"])


def test_cli_http_500_on_every_request_fails_the_plan_cleanly(fake_llm, store, state_dir, capsys):
    """Every request answered 500: rc 1, plan "failed" (not in_progress), no traceback,
    the server's message in the step's error (original defect 1)."""
    for _ in range(10):
        fake_llm.enqueue(status=500, error="upstream exploded")
    rc, out, err = _run_failing_plan(fake_llm, store, state_dir, capsys, "p-http-500")
    assert rc == 1
    doc = json.loads(out)
    [result] = doc["plans"]
    assert result["status"] == "failed" and result["success"] is False
    assert "Traceback" not in err
    # 2 attempts (max_retries 1) x 2 requests (--retries 1)
    assert len(fake_llm.chat_requests) == 4
    plan_row, stored = _plan_and_result(store, "p-http-500")
    assert state_of_row(store, plan_row)["status"] == "failed"
    assert stored["status"] == "failed"
    [step] = stored["steps"]
    assert step["status"] == "failed"
    assert "upstream exploded" in step["error"]
    assert fake_llm.url in step["error"]
    check_store(store)


def test_cli_http_400_fails_the_plan_cleanly(fake_llm, store, state_dir, capsys):
    """A 400 (not transient): rc 1, plan "failed", no traceback, the server's message in
    the step's error (original defect 1)."""
    for _ in range(10):
        fake_llm.enqueue(status=400, error_body={"error": "bad request: unknown field 'frobnicate'"})
    rc, out, err = _run_failing_plan(fake_llm, store, state_dir, capsys, "p-http-400")
    assert rc == 1
    [result] = json.loads(out)["plans"]
    assert result["status"] == "failed"
    assert "Traceback" not in err
    # 2 attempts, one request each: a 400 is not retried by the client
    assert len(fake_llm.chat_requests) == 2
    plan_row, stored = _plan_and_result(store, "p-http-400")
    assert state_of_row(store, plan_row)["status"] == "failed"
    [step] = stored["steps"]
    assert step["status"] == "failed"
    assert "unknown field 'frobnicate'" in step["error"]
    check_store(store)


def test_consecutive_requests_share_one_connection(fake_llm):
    """A client keeps its connection to the server between requests (the server streams
    chunked and keeps it open, as llama.cpp and LM Studio do), so a plan's steps do not
    each pay for a new connection; after a cut stream the next request opens a new one."""
    fake_llm.enqueue("one").enqueue("two").enqueue("cut here and there", fault="cut", chunk_size=4) \
        .enqueue("three")
    with bridge.LLMClient(config(fake_llm.url, retries=0)) as client:
        replies = [client.chat([{"role": "user", "content": "x"}], bridge.ChatRequest("m")).text for _ in range(2)]
        with pytest.raises(bridge.LLMProtocolError, match="ended early"):
            client.chat([{"role": "user", "content": "x"}], bridge.ChatRequest("m"))
        replies.append(client.chat([{"role": "user", "content": "x"}], bridge.ChatRequest("m")).text)
    assert replies == ["one", "two", "three"]
    ports = [r["client_port"] for r in fake_llm.chat_requests]
    assert ports[0] == ports[1] == ports[2] != ports[3]


def test_an_error_event_mid_stream_is_scrubbed_of_the_key(fake_llm):
    """An SSE error event is built as every server error is (HTTPExecutor._stream_error):
    a server echoing the bearer key does not put it in bridge's message (it was shown
    as sent before the executor contract)."""
    key = "sk-local-9f3c2a"
    fake_llm.enqueue(fault="sse_error", error=f"invalid token {key} for this slot")
    with pytest.raises(bridge.LLMHTTPError) as info:
        chat(fake_llm.url, api_key=key, retries=0)
    assert "reported an error mid-stream" in str(info.value)
    assert key not in str(info.value) and "[the key]" in str(info.value)
