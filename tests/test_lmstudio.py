"""Issue 21 (e): LM Studio 0.4 done right, on tests/fake_servers.py's FakeLMStudio (an
embedding model loaded first, as RAG users keep it; JIT loading on).

| test | what must hold |
|---|---|
| embedding loaded first | the loaded LLM is used; the embedding model is refused, said why |
| --model an instance id | matched through loaded_instances[].id as well as the key |
| nothing loaded, one LLM | that LLM is used; after its JIT load the context is read again and later steps fit it |
| nothing loaded, several | exit 2 before any claim, naming the LLMs and `lms load` |
"""

from __future__ import annotations

import json

import pytest

import bridge
from fake_servers import FakeLMStudio
from fakes import bridge_args, insert_plan, make_plan, plan_state, stored_results


@pytest.fixture
def lmstudio():
    with FakeLMStudio() as server:
        yield server


def run(capsys, db, url, state_dir, *extra):
    rc = bridge.main(bridge_args(db, url, state_dir, *extra), environ={})
    out, err = capsys.readouterr()
    return rc, out, err


def test_an_embedding_model_loaded_first_is_never_sent_chat(capsys, db, lmstudio, state_dir):
    lmstudio.instances["qwen3-8b"] = [("qwen3-8b", {"context_length": 16384, "parallel": 2})]
    insert_plan(db, make_plan("e"))
    lmstudio.enqueue("hi")
    rc, _, err = run(capsys, db, lmstudio.url, state_dir)
    assert rc == 0, err
    assert lmstudio.chat_requests[0]["json"]["model"] == "qwen3-8b"
    rc, out, _ = run(capsys, db, lmstudio.url, state_dir, "--health", "--json")
    server = json.loads(out)["server"]
    assert (server["model"], server["context_length"], server["slots"]) == ("qwen3-8b", 16384, 2)
    assert server["refused"] == [{"model": "text-embedding-nomic-embed-text-v1.5",
                                  "reason": "not a chat model (type 'embedding')"}]


def test_model_matches_a_loaded_instance_id(capsys, db, lmstudio, state_dir):
    lmstudio.instances["qwen3-8b"] = [("qwen3-8b", {"context_length": 8192, "parallel": 1}),
                                      ("qwen3-8b:2", {"context_length": 32768, "parallel": 3})]
    rc, out, err = run(capsys, db, lmstudio.url, state_dir, "--health", "--json",
                       "--model", "qwen3-8b:2")
    assert rc == 0, err
    server = json.loads(out)["server"]
    assert (server["model"], server["context_length"], server["slots"]) == ("qwen3-8b:2", 32768, 3)


def test_nothing_loaded_one_llm_is_used_and_its_jit_context_fits_the_later_steps(
        capsys, db, lmstudio, state_dir):
    lmstudio.catalog = {"text-embedding-nomic-embed-text-v1.5": "embedding", "qwen3-8b": "llm"}
    big = "word " * 6000                            # ~8,600 tokens by bridge's estimate
    insert_plan(db, make_plan("j", [{"id": 1, "prompt": "first"},
                                    {"id": 2, "prompt": f"Summarise: {big}", "depends_on": [1]}]))
    lmstudio.enqueue("one").enqueue("two")
    rc, out, err = run(capsys, db, lmstudio.url, state_dir, "--json")
    assert rc == 1, err
    assert "model qwen3-8b is loaded now: context 4096, 4 slot(s)" in err
    [result] = json.loads(out)["plans"]
    step2 = result["steps"][1]
    # fitted to the 4,096 tokens it was loaded with: the prompt cannot shrink, so nothing is sent
    assert step2["status"] == "failed" and "more than the 3072 that fit" in step2["error"]
    assert len(lmstudio.chat_requests) == 1


def test_nothing_loaded_several_llms_stops_naming_them(capsys, db, lmstudio, state_dir):
    insert_plan(db, make_plan("n"))
    rc, _, err = run(capsys, db, lmstudio.url, state_dir)
    assert rc == 2
    assert "no model loaded and 2 LLMs downloaded (qwen3-8b, gemma-3-4b)" in err
    assert "lms load" in err
    assert lmstudio.chat_requests == [] and plan_state(db, "n") == {} and stored_results(db) == []
