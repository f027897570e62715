"""The README's "Model servers" table, one row per server, each row checked here on
that server's fake (tests/fake_servers.py, tests/fakes.py): `bridge --health --json`
says how bridge found it, which model a run uses and why, the context prompts are
fitted to, and how output is constrained; then a JSON step runs on it.
"""

from __future__ import annotations

import json

import pytest

import bridge
from fake_servers import FakeLlamaCppPython, FakeLMStudio, FakeOllama, FakeVLLM
from fakes import FakeLLM, bridge_args, insert_plan, make_plan


def lmstudio():
    fake = FakeLMStudio().start()
    fake.instances["qwen3-8b"] = [("qwen3-8b", {"context_length": 16384, "parallel": 4})]
    return fake, fake.url


def ollama():
    fake = FakeOllama().start()
    return fake, fake.url


def llama_server():
    fake = FakeLLM().start()
    fake.lmstudio, fake.slots, fake.context_length, fake.models = False, 4, 8192, ["model.gguf"]
    return fake, fake.url


def llama_cpp_python():
    fake = FakeLlamaCppPython().start()
    fake.models = ["smollm2-135m"]
    return fake, fake.url


def vllm():
    fake = FakeVLLM().start()
    return fake, fake.url


# server, (kind, model, context, slots, what constrains JSON)
ROWS = {
    "LM Studio": (lmstudio, ("LM Studio", "qwen3-8b", 16384, 4, "response_format")),
    "Ollama": (ollama, ("Ollama", "llama3.1:8b", 8192, 1, "format")),
    "llama-server": (llama_server, ("llama.cpp", "model.gguf", 8192, 4, "response_format")),
    "llama-cpp-python": (llama_cpp_python,
                         ("llama-cpp-python", "smollm2-135m", None, 1, "response_format")),
    "vLLM": (vllm, ("OpenAI-compatible", "Qwen/Qwen3-8B", 32768, 1, "response_format")),
}


@pytest.mark.parametrize("name", list(ROWS))
def test_each_row_of_the_model_servers_table(capsys, db, state_dir, name):
    make, (kind, model, context, slots, constraint) = ROWS[name]
    fake, url = make()
    with fake:
        rc = bridge.main(["--health", "--json", "--db", str(db), "--base-url", url,
                          "--state-dir", str(state_dir)], environ={})
        out, err = capsys.readouterr()
        assert rc == 0, out + err
        server = json.loads(out)["server"]
        assert (server["kind"], server["model"], server["context_length"], server["slots"]) == \
            (kind, model, context, slots)
        assert constraint in server["structured_output"]
        validation = {"type": "contains_keys", "keys": ["a"]}
        insert_plan(db, make_plan("t", [{"id": 1, "prompt": "emit", "validation": validation}]))
        fake.enqueue('{"a": 1}')
        rc = bridge.main(bridge_args(db, url, state_dir), environ={})
        _, err = capsys.readouterr()
        assert rc == 0, err
        sent = fake.chat_requests[-1]["json"]
        assert sent["model"] == model
        assert ("format" in sent) if constraint == "format" else ("response_format" in sent)
