"""Issue 21 (f): with no base URL set, the default local ports are tried in order on
127.0.0.1 (DEFAULT_SERVER_PORTS: LM Studio, Ollama, llama-server's two, vLLM and
llama-cpp-python), and a port that is the memory server is never taken for a model
server. The ports are this test's fakes (port 0), put in DEFAULT_SERVER_PORTS's place.
"""

from __future__ import annotations

import json

import pytest

import bridge
from fake_servers import FakeOllama
from fakes import FakeMemoryAPI, closed_port, insert_plan, make_plan


@pytest.fixture
def ollama():
    with FakeOllama() as server:
        yield server


def test_health_tries_the_default_ports_skips_the_memory_server_and_says_so(
        capsys, db, ollama, state_dir, monkeypatch):
    with FakeMemoryAPI(db) as memory:
        memory_port = int(memory.url.rsplit(":", 1)[1])
        nothing = closed_port()
        monkeypatch.setattr(bridge, "DEFAULT_SERVER_PORTS",
                            ((nothing, "/v1"), (memory_port, "/v1"), (ollama.port, "")))
        rc = bridge.main(["--health", "--json", "--db", str(db), "--state-dir", str(state_dir)],
                         environ={})
        out, err = capsys.readouterr()
    assert rc == 0, out + err
    server = json.loads(out)["server"]
    assert server["base_url"] == ollama.root and server["kind"] == "Ollama"
    assert [t["result"] for t in server["tried"]] == [
        "nothing answers", "the memory server (its /api/health), skipped", "a model server: used"]
    assert all(t["url"].startswith("http://127.0.0.1:") for t in server["tried"])
    assert memory.posts == []


def test_a_run_with_no_base_url_finds_the_server_and_says_where(
        capsys, db, ollama, state_dir, monkeypatch):
    monkeypatch.setattr(bridge, "DEFAULT_SERVER_PORTS", ((closed_port(), "/v1"), (ollama.port, "")))
    insert_plan(db, make_plan("d"))
    ollama.enqueue("hi")
    rc = bridge.main(["--db", str(db), "--state-dir", str(state_dir)], environ={})
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert f"model server: found at {ollama.root}" in err
    assert ollama.chat_requests[0]["path"] == "/api/chat"


def test_memory_url_port_is_never_tried(capsys, db, fake_llm, state_dir, monkeypatch):
    port = fake_llm.port
    monkeypatch.setattr(bridge, "DEFAULT_SERVER_PORTS", ((port, "/v1"),))
    rc = bridge.main(["--health", "--json", "--db", str(db), "--state-dir", str(state_dir),
                      "--memory-url", f"http://127.0.0.1:{port}"], environ={})
    out, _ = capsys.readouterr()
    assert rc == 2
    assert json.loads(out)["server"]["tried"][0]["result"].startswith("--memory-url's port")
    assert all(r["path"].startswith("/api/health") for r in fake_llm.requests)


def test_a_keyed_server_is_found_and_the_key_is_not_sent_while_looking(
        capsys, db, state_dir, monkeypatch):
    from fake_servers import FakeKeyed

    with FakeKeyed("sk-look") as keyed:
        monkeypatch.setattr(bridge, "DEFAULT_SERVER_PORTS", ((keyed.port, "/v1"),))
        rc = bridge.main(["--health", "--json", "--db", str(db), "--state-dir", str(state_dir)],
                         environ={"BRIDGE_API_KEY": "sk-look"})
        out, err = capsys.readouterr()
        assert rc == 0, out + err
        assert json.loads(out)["server"]["base_url"] == keyed.url
        # discovery's GET / and its first GET /api/version; the probe after it sends the key
        looking = [keyed.requests[0], next(r for r in keyed.requests if r["path"] == "/api/version")]
        assert looking[0]["path"] == "/"
        assert all("authorization" not in r["headers"] for r in looking)
        assert keyed.requests[-1]["headers"]["authorization"] == "Bearer sk-look"
