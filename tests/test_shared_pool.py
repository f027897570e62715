"""Issue 21 (g): parallel steps on a server whose slots share one KV pool (llama.cpp's
auto slots with unified KV, LM Studio's parallel predictions), on tests/fake_servers.py's
FakeLlamaServer (4 slots, 4,096 tokens in all, 500 when the requests in flight pass it).

- the prompts and answers in flight together fit the context: no 500, and the peak
  the server saw stays within it;
- a 500 "Context size has been exceeded" is not resent unchanged.
"""

from __future__ import annotations

import json

import pytest

import bridge
from fake_servers import FakeLlamaServer
from fakes import bridge_args, insert_plan, make_plan


@pytest.fixture
def server():
    with FakeLlamaServer() as fake:
        yield fake


def run(capsys, db, url, state_dir, *extra):
    rc = bridge.main(bridge_args(db, url, state_dir, "--json", *extra), environ={})
    out, err = capsys.readouterr()
    return rc, json.loads(out)["plans"][0] if out.strip() else None, err


def test_steps_in_flight_together_fit_the_shared_context(capsys, db, server, state_dir):
    text = "word " * 1000                       # ~1,450 tokens by bridge's estimate each
    insert_plan(db, make_plan("pool", [{"id": i, "prompt": f"Count: {text}", "max_tokens": 200}
                                       for i in range(1, 5)]))
    for i in range(4):
        server.enqueue(f"answer {i}")
    rc, result, err = run(capsys, db, server.url, state_dir)
    assert rc == 0, err
    assert server.overflows == 0
    assert 0 < server.pool_peak <= 4096
    assert 1 < server.max_in_flight < 4            # parallel, as far as the pool goes


def test_a_500_context_exceeded_is_not_resent_unchanged(capsys, db, fake_llm, state_dir):
    fake_llm.lmstudio = False
    insert_plan(db, make_plan("o", [{"id": 1, "prompt": "a", "max_retries": 2}]))
    fake_llm.enqueue(status=500, error_body={"error": {
        "code": 500, "message": "Context size has been exceeded.", "type": "server_error"}})
    rc, result, err = run(capsys, db, fake_llm.url, state_dir, "--retries", "3")
    assert rc == 1, err
    assert len(fake_llm.chat_requests) == 1
    assert "Context size has been exceeded" in result["steps"][0]["error"]
