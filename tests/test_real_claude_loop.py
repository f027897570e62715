"""Results a later Claude Code session finds, on the real memory server (make test-real):
with only ~/.claude/hooks/config.json naming `memory server --http` (as the server's
Claude Code hooks write it), bridge stores a plan's result through that API; the
server's own MCP tools then return it by the project's tag (memory_list, what the
hooks' session start asks for) and by meaning (memory_search "did the plan complete
in PROJECT"). Fixtures and the server driver are test_real_server.py's."""

from __future__ import annotations

import json

import pytest

import bridge
from fakes import insert_plan, make_plan, read_rows, trust_project
from test_real_server import KEY, driver, http_server, offline  # noqa: F401  (fixtures)

pytestmark = pytest.mark.real_server
PLAN_ID = "shop-greeting"


def test_a_result_stored_through_the_hooks_endpoint_is_found_by_project_tag_and_by_meaning(
    capsys, tmp_path, offline, http_server, fake_llm, state_dir
):  # noqa: F811
    url, db = http_server
    hooks = tmp_path / "home" / ".claude" / "hooks"
    hooks.mkdir(parents=True)
    (hooks / "config.json").write_text(
        json.dumps(
            {
                "memoryService": {
                    "protocol": "auto",
                    "preferredProtocol": "http",
                    "http": {"endpoint": url, "apiKey": KEY},
                }
            }
        )
    )
    project = tmp_path / "checkout"
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "shopkit"\n')
    trust_project(project)
    insert_plan(
        db,
        make_plan(
            PLAN_ID,
            [{"id": 1, "title": "greeting", "prompt": "Greet the team"}],
            context={"objective": "Greet the team in one short sentence", "project": str(project)},
        ),
    )
    fake_llm.enqueue("Hi team, the shop is open!")

    rc = bridge.main(
        ["--db", str(db), "--base-url", fake_llm.url, "--state-dir", str(state_dir), "--json"],
        environ={},
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "bridge: warning" not in err  # the server stored it (with its embedding)
    (result,) = json.loads(out)["plans"]
    (row,) = [r for r in read_rows(db) if r["content_hash"] == result["result_hash"]]
    assert row["tags"].split(",") == ["bridge-result", f"plan:{PLAN_ID}", "shopkit"]
    assert row["metadata_obj"].get("conversation_id") == result["run_id"]  # written by the server
    first = f"bridge result: plan {PLAN_ID} completed in project shopkit (run {result['run_id']})"

    listed = driver(offline, db, "mcp", "memory_list", json.dumps({"tags": ["shopkit"]}))
    assert first in listed["text"], listed
    found = driver(
        offline,
        db,
        "mcp",
        "memory_search",
        json.dumps({"query": "did the plan complete in shopkit"}),
    )
    assert first in found["text"], found["text"][:2000]
    assert "mode: semantic" in found["text"] or "semantic" in found["text"].lower()
