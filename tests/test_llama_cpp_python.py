"""Issue 21 (b, g): llama-cpp-python as it behaves, on tests/fake_servers.py's
FakeLlamaCppPython (and on the real server in tests/test_real_model.py).

| test | what must hold |
|---|---|
| stream cut for another request | sent again after a wait, said once, the step's attempts untouched |
| cut past the waits | the attempt fails as the server's error |
| prompt over n_ctx | one failure naming the tokens and the context (not "ended early"), not retried; later steps fitted to the context learnt |
"""

from __future__ import annotations

import json

import pytest

import bridge
from fake_servers import FakeLlamaCppPython
from fakes import bridge_args, insert_plan, make_plan, steps_by_id


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(bridge, "CONTENTION_WAITS_S", (0.01, 0.01, 0.01))
    with FakeLlamaCppPython() as fake:
        yield fake


def run(capsys, db, url, state_dir, *extra):
    rc = bridge.main(bridge_args(db, url, state_dir, "--json", *extra), environ={})
    out, err = capsys.readouterr()
    doc = json.loads(out) if out.strip() else None
    return rc, doc["plans"][0] if doc else None, err


def test_a_stream_cut_for_another_request_is_sent_again_and_said_once(
        capsys, db, server, state_dir):
    insert_plan(db, make_plan("c", [{"id": 1, "prompt": "a", "max_retries": 0},
                                    {"id": 2, "prompt": "b"}]))
    server.interrupt = 3
    server.enqueue("first answer").enqueue("second answer")
    rc, result, err = run(capsys, db, server.url, state_dir)
    assert rc == 0, err
    assert [s["output"] for s in result["steps"]] == ["first answer", "second answer"]
    assert [s["attempts"] for s in result["steps"]] == [1, 1]
    assert err.count("ended the stream") == 1 and "--interrupt_requests False" in err
    assert len(server.chat_requests) == 5


def test_a_stream_cut_past_every_wait_fails_the_attempt(capsys, db, server, state_dir):
    insert_plan(db, make_plan("c", [{"id": 1, "prompt": "a", "max_retries": 0}]))
    server.interrupt = 10
    server.enqueue("never")
    rc, result, err = run(capsys, db, server.url, state_dir)
    assert rc == 1, err
    assert "to serve another request" in result["steps"][0]["error"]
    assert len(server.chat_requests) == 4          # the first and one after each of the 3 waits


def test_a_prompt_over_n_ctx_is_one_failure_naming_tokens_and_context(
        capsys, db, server, state_dir):
    big = "number 12345 " * 800                    # ~2,600 fake tokens, over n_ctx 2048
    insert_plan(db, make_plan("o", [{"id": 1, "prompt": f"Sum: {big}", "max_retries": 2},
                                    {"id": 2, "prompt": f"Again: {big}", "max_retries": 2}]))
    server.enqueue("never played")
    rc, result, err = run(capsys, db, server.url, state_dir)
    assert rc == 1, err
    step1, step2 = steps_by_id(result)[1], steps_by_id(result)[2]
    assert step1["attempts"] == 1
    assert "maximum context length is 2048 tokens" in step1["error"]
    assert "in the messages" in step1["error"]
    assert "ended early" not in step1["error"]
    # the context learnt from that error fits step 2 before anything is sent
    assert "the server's context is 2048 tokens" in err
    assert step2["attempts"] == 0 and "fit the model's context" in step2["error"]
    assert len(server.chat_requests) == 2          # step 1: the stream, and the unstreamed check


def test_prompts_are_fitted_with_the_servers_own_token_count(
        capsys, db, server, state_dir, project):
    """A number-dense LOAD file: 3.5 characters a token by bridge's estimate, 1.85 by
    the server's tokenizer; the prompt sent is cut to what fits by the server's count."""
    numbers = " ".join(str(n) for n in range(1000, 2500))      # 7,499 characters
    (project / "numbers.txt").write_text(numbers)
    insert_plan(db, make_plan("n", [{"id": 1, "prompt": "Sum them.", "max_tokens": 64}],
                              context={"objective": "o", "project": str(project),
                                       "files_context": {"numbers.txt": "LOAD"}}))
    server.enqueue("a sum")
    rc, result, err = run(capsys, db, server.url, state_dir, "--context-length", "4096")
    assert rc == 0, err
    counts = [r for r in server.requests if r["path"] == "/extras/tokenize/count"]
    assert counts
    [chat] = server.chat_requests
    text = "\n".join(m["content"] for m in chat["json"]["messages"])
    assert len(text) / 1.85 + 64 <= 4096                # fits by the server's count
    assert "cut" in text                               # the LOAD file was cut to fit, saying so
