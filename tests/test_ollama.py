"""Issue 21 (d): Ollama as a first-class server, on tests/fake_servers.py's FakeOllama
(Ollama 0.33 as documented: ollama/ollama docs/api.md, docs/api/openai-compatibility.mdx).

| test | what must hold |
|---|---|
| 29 KB LOAD, native | steps go to /api/chat with one options.num_ctx that fits the prompt; the model sees all of it; usage from prompt_eval_count/eval_count |
| model picked | the loaded chat model, never the embedding model listed first, never a cloud model; each refusal said with its reason |
| nothing usable | exit 2 before any claim: several chat models pulled (listed), none local, --model not pulled (`ollama pull`), --model an embedding model |
| cloud model | a plan naming one waits for --allow-executor ollama-cloud (your own --model counts) |
| structured output | a JSON step sends `format` with its schema |
| stream bounds | NDJSON through the degeneration guard and --max-output-bytes |
"""

from __future__ import annotations

import json

import pytest

import bridge
from fake_servers import FakeOllama
from fakes import (bridge_args, insert_plan, make_plan, plan_state, steps_by_id, stored_results,
                   trust_project)
from test_server_errors import big_load_plan


@pytest.fixture
def ollama():
    with FakeOllama() as server:
        yield server


def run(capsys, db, url, state_dir, *extra):
    rc = bridge.main(bridge_args(db, url, state_dir, *extra), environ={})
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_29kb_load_step_reaches_the_model_whole_through_num_ctx(
        capsys, db, ollama, state_dir, project):
    insert_plan(db, big_load_plan(project))
    ollama.enqueue("a summary of all 900 rows")
    rc, out, err = run(capsys, db, ollama.url, state_dir, "--json")
    assert rc == 0, err
    [request] = ollama.chat_requests
    assert request["path"] == "/api/chat"
    sent = request["json"]
    assert sent["model"] == "llama3.1:8b"
    prompt = "".join(m["content"] for m in sent["messages"])
    assert "row 899: value 6293" in prompt and "row 0: value 0" in prompt     # nothing cut
    estimate = bridge.estimate_tokens(sent["messages"])
    num_ctx = sent["options"]["num_ctx"]
    assert estimate + 1024 <= num_ctx <= 131072 and num_ctx % bridge.OLLAMA_NUM_CTX_STEP == 0
    assert request["seen_tokens"] == len(prompt) // 4                          # nor by the server
    [result] = json.loads(out)["plans"]
    assert result["status"] == "completed"
    assert result["usage"]["prompt_tokens"] == request["seen_tokens"]
    assert steps_by_id(result)[1]["output"] == "a summary of all 900 rows"


def test_one_num_ctx_for_every_request_of_a_run(capsys, db, ollama, state_dir):
    insert_plan(db, make_plan("two", [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b" * 40_000}]))
    ollama.enqueue("x").enqueue("y")
    rc, _, err = run(capsys, db, ollama.url, state_dir)
    assert rc == 0, err
    sizes = {r["json"]["options"]["num_ctx"] for r in ollama.chat_requests}
    assert len(sizes) == 1 and sizes.pop() >= 40_000 / 3.5


def test_the_loaded_chat_model_is_picked_and_the_others_refused_with_the_reason(
        capsys, db, ollama, state_dir):
    rc, out, err = run(capsys, db, ollama.url, state_dir, "--health", "--json")
    assert rc == 0, err
    server = json.loads(out)["server"]
    assert server["kind"] == "Ollama" and server["version"] == "0.33.0"
    assert server["model"] == "llama3.1:8b" and "loaded" in server["model_why"]
    refused = {r["model"]: r["reason"] for r in server["refused"]}
    assert "not a chat model" in refused["nomic-embed-text:latest"]
    assert "cloud model" in refused["gpt-oss:120b-cloud"]
    assert server["context_length"] is not None and server["trained_context"] == 131072


@pytest.mark.parametrize("case,extra,said", [
    ("several", (), "2 chat models are pulled: gpt-oss:20b, llama3.1:8b"),
    ("none local", (), "no local chat model"),
    ("not pulled", ("--model", "qwen3:4b"), "ollama pull qwen3:4b"),
    ("embedding", ("--model", "nomic-embed-text"), "not a chat model"),
])
def test_no_usable_model_stops_before_any_claim(capsys, db, ollama, state_dir, case, extra, said):
    insert_plan(db, make_plan("p"))
    ollama.running = ["nomic-embed-text:latest"]
    if case == "several":
        ollama.pulled = {"gpt-oss:20b": {"capabilities": ["completion"], "trained_ctx": 131072},
                         **ollama.pulled}
    if case == "none local":
        del ollama.pulled["llama3.1:8b"]
    rc, _, err = run(capsys, db, ollama.url, state_dir, *extra)
    assert rc == 2, err
    assert said in err
    assert ollama.chat_requests == []
    assert plan_state(db, "p") == {} and stored_results(db) == []


def test_the_only_chat_model_pulled_is_used_when_none_is_loaded(capsys, db, ollama, state_dir):
    insert_plan(db, make_plan("p"))
    ollama.running = []
    ollama.enqueue("hi")
    rc, _, err = run(capsys, db, ollama.url, state_dir)
    assert rc == 0, err
    assert ollama.chat_requests[0]["json"]["model"] == "llama3.1:8b"


def test_a_json_step_sends_its_schema_as_format(capsys, db, ollama, state_dir):
    validation = {"type": "contains_keys", "keys": ["a"]}
    insert_plan(db, make_plan("j", [{"id": 1, "prompt": "emit", "validation": validation}]))
    ollama.enqueue('{"a": 1}')
    rc, _, err = run(capsys, db, ollama.url, state_dir)
    assert rc == 0, err
    sent = ollama.chat_requests[0]["json"]
    assert sent["format"]["required"] == ["a"] and "response_format" not in sent
    assert sent["think"] is False           # a JSON step asks a thinking model not to (docs/api.md)


def test_the_ndjson_stream_goes_through_the_degeneration_guard_and_the_size_bound(
        capsys, db, ollama, state_dir):
    insert_plan(db, make_plan("d", [{"id": 1, "prompt": "a", "max_retries": 1}]))
    ollama.enqueue("ok\n" + "\n" * 300, chunk_size=1).enqueue("x" * 5000)
    rc, out, err = run(capsys, db, ollama.url, state_dir, "--json", "--max-output-bytes", "1000")
    assert rc == 1, err
    step = steps_by_id(json.loads(out)["plans"][0])[1]
    log = [a["error"] for a in step["attempt_log"]]
    assert "newlines in a row" in log[0] and "--max-output-bytes" in log[1]


def test_the_openai_endpoint_stays_usable(capsys, db, ollama, state_dir):
    insert_plan(db, make_plan("o"))
    ollama.enqueue("hi")
    rc, _, err = run(capsys, db, ollama.root + "/v1", state_dir, "--ollama-api", "openai")
    assert rc == 0, err
    [request] = ollama.chat_requests
    assert request["path"] == "/v1/chat/completions" and request["json"]["model"] == "llama3.1:8b"


def test_a_plan_naming_a_cloud_model_waits_until_it_is_allowed(
        capsys, db, ollama, state_dir, project):
    step = {"id": 1, "prompt": "hi", "model": "gpt-oss:120b-cloud"}
    insert_plan(db, make_plan("cloud", [step], context={"objective": "o", "project": str(project)}))
    rc, _, err = run(capsys, db, ollama.url, state_dir)
    assert rc == 0, err
    assert "--allow-executor ollama-cloud" in err and ollama.chat_requests == []
    assert plan_state(db, "cloud") == {}
    ollama.enqueue("from the cloud")
    rc, out, err = run(capsys, db, ollama.url, state_dir, "--allow-executor", "ollama-cloud",
                       "--json")
    assert rc == 0, err
    assert ollama.chat_requests[0]["json"]["model"] == "gpt-oss:120b-cloud"


def test_thinking_on_the_native_api_is_counted_and_a_stream_cut_while_thinking_not_resent(
        capsys, db, ollama, state_dir):
    """Ollama streams thinking in message.thinking (docs/api.md). It counts against
    --max-output-bytes as the answer does, and a stream cut once thinking has streamed is
    not resent by the request's retries (the step's own retry sends it again)."""
    insert_plan(db, make_plan("t", [{"id": 1, "prompt": "think", "max_retries": 1,
                                     "thinking": "on"}]))
    ollama.enqueue("", reasoning="hmm " * 20, fault="cut").enqueue("done", reasoning="ok")
    rc, out, err = run(capsys, db, ollama.url, state_dir, "--json")
    assert rc == 0, err
    assert len(ollama.chat_requests) == 2        # one per attempt: the cut one not resent
    step = steps_by_id(json.loads(out)["plans"][0])[1]
    assert step["output"] == "done"
    assert "ended early" in step["attempt_log"][0]["error"]

    insert_plan(db, make_plan("big", [{"id": 1, "prompt": "think", "max_retries": 0,
                                       "thinking": "on"}]))
    ollama.enqueue("short", reasoning="x" * 5000)
    rc, out, err = run(capsys, db, ollama.url, state_dir, "--json", "--max-output-bytes", "1000")
    assert rc == 1, err
    step = steps_by_id(json.loads(out)["plans"][0])[1]
    assert "while the model was thinking" in step["attempt_log"][0]["error"]


def test_a_model_whose_constraint_was_dropped_gets_no_format(ollama):
    """drop_constraint holds on the native API as on the OpenAI one: no `format` is sent."""
    config = bridge.Config(db_paths=(), base_url=ollama.url, timeout_s=5)
    client = bridge.LLMClient(config)
    try:
        client.probe()
        ollama.enqueue('{"a": 1}').enqueue('{"a": 1}')
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
        client.chat([{"role": "user", "content": "x"}],
                    bridge.ChatRequest("llama3.1:8b", json_schema=schema))
        client.drop_constraint("llama3.1:8b", "garbled")
        reply = client.chat([{"role": "user", "content": "x"}],
                            bridge.ChatRequest("llama3.1:8b", json_schema=schema))
    finally:
        client.close()
    first, second = (r["json"] for r in ollama.chat_requests)
    assert "format" in first and "format" not in second
    assert reply.response_format is None


@pytest.mark.parametrize("server", ["ollama", "fake_llm"])
def test_each_plan_is_checked_and_its_trust_decided_once_per_run(
        capsys, db, state_dir, project, monkeypatch, request, server):
    """The gate hands each run its checked plan and its trust facts (CheckedPlan, in the
    room "A plan run"): check_plan and plan_trusted run once per plan run, also on
    Ollama's native API, whose num_ctx is fitted to the checked plans' prompts."""
    url = request.getfixturevalue(server).url
    fake = request.getfixturevalue(server)
    trust_project(project)
    insert_plan(db, make_plan("files", [{"id": 1, "prompt": "a", "file_output": "a.txt"}],
                              context={"objective": "o", "project": str(project)}))
    insert_plan(db, make_plan("plain", [{"id": 1, "prompt": "b"}]))
    fake.enqueue("x").enqueue("y")
    calls = {"check_plan": 0, "plan_trusted": 0}
    for name in calls:
        def counted(*args, _real=getattr(bridge, name), _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(bridge, name, counted)
    rc, _, err = run(capsys, db, url, state_dir, *(["--model", "fake-model"]
                                                    if server == "fake_llm" else []))
    assert rc == 0, err
    assert [plan_state(db, p)["status"] for p in ("files", "plain")] == ["completed"] * 2
    assert calls == {"check_plan": 2, "plan_trusted": 2}
