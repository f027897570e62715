"""The hostile-server fault matrix (issue 4), walked end to end through bridge.main().

Every row runs the same plan from a fresh 12.x store against the fake server:
a project folder holding README.md (b"original\\n"), `rollback_strategy: revert_files`,
step 1 (`non_empty`, `file_output: README.md`) always answered "rewritten", and step 2
(`contains_keys` ["a"], `max_retries: 1`, depends on 1) which meets the row's fault.
Flags: `--retries 2 --retry-delay 0 --timeout 0.3`, plus the row's own. A transport
retry (429/5xx/connection) resends the same request up to 2 more times inside one
attempt; an attempt retry (any other failed request, or a failed check) is one of the
step's 2 attempts. A context overflow is neither: it is final at once.

| row | step 2 sees | exit | plan | step 2 requests | README |
|---|---|---|---|---|---|
| refused-model-lookup | closed port, no --model | 2 | pending (never claimed) | 0 | original, no result |
| refused-chat | closed port, --model m | 2 | pending (the start-up probe fails; never claimed) | 0 | original, no result |
| 500-then-ok | 500, ok | 0 | completed | 2 | rewritten |
| 502-then-ok | 502, ok | 0 | completed | 2 | rewritten |
| 503-then-ok | 503, ok | 0 | completed | 2 | rewritten |
| 504-then-ok | 504, ok | 0 | completed | 2 | rewritten |
| 429-then-ok | 429 (no Retry-After), ok | 0 | completed | 2 | rewritten |
| 429-retry-after-0-then-ok | 429 Retry-After: 0, ok | 0 | completed | 2 | rewritten |
| 503-retry-after-0-then-ok | 503 Retry-After: 0, ok | 0 | completed | 2 | rewritten |
| 500-always | 500 x6 (3 tries x 2 attempts) | 1 | failed | 6 | reverted |
| overflow-lmstudio | 400 LM Studio overflow string | 1 | failed | 1 | reverted |
| overflow-llamacpp | 400 exceed_context_size_error | 1 | failed | 1 | reverted |
| overflow-openai | 400 context_length_exceeded | 1 | failed | 1 | reverted |
| sse-error-overflow | 200 then SSE error (overflow) | 1 | failed | 1 | reverted |
| sse-error-crash | 200 then SSE error "model crashed" x2 | 1 | failed | 2 | reverted |
| empty-stream | 200 [DONE] only x2 | 1 | failed | 2 | reverted |
| cut | stream cut mid-way x2 | 1 | failed | 2 | reverted |
| cut-then-ok | cut, ok | 0 | completed | 2 | rewritten |
| stall | stall 1.0 s > --timeout 0.3 x2 | 1 | failed | 2 | reverted |
| stall-then-ok | stall, ok | 0 | completed | 2 | rewritten |
| not-json | 200 HTML body x2 | 1 | failed | 2 | reverted |
| no-choices | chunks without choices x2 | 1 | failed | 2 | reverted |
| too-large | 5000 chars, --max-output-bytes 200, x2 | 1 | failed (stored output bounded) | 2 | reverted |
| wrong-json | '{"b": 1}' x2 | 1 | failed (lacks key "a") | 2 | reverted |
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import bridge
from fakes import (
    bridge_args, check_store, closed_port, first_user, insert_plan, listing, make_plan, read_rows, steps_by_id,
    state_of_row, stored_results, trust_project,
)

# Literals copied from the contract (bridge-plan-schema.json, the README), never read at run time.
PLAN_ID = "fault-matrix"
ORIGINAL = b"original\n"
STEP1_PROMPT = "rewrite"
STEP2_PROMPT = "emit-json-object"
GOOD_STEP2 = '{"a": 1}'
LONG_JSON = '{"a": 1, "padding": "' + "p" * 40 + '"}'   # several 8-char chunks, so cut/stall send part

LMSTUDIO_OVERFLOW = {"error": "Trying to keep the first 15857 tokens when context the overflows. "
                              "However, the model is loaded with context length of only 4096 tokens"}
LLAMACPP_OVERFLOW = {"error": {"code": 400, "message": "request (4390 tokens) exceeds the available context "
                                                       "size (4096 tokens), try increasing it",
                               "type": "exceed_context_size_error"}}
OPENAI_OVERFLOW = {"error": {"message": "This model's maximum context length is 2048 tokens. "
                                        "However, you requested 5000 tokens",
                             "type": "invalid_request_error", "code": "context_length_exceeded"}}


def _ok() -> dict:
    return {"content": GOOD_STEP2}


def _http(status: int, **kw) -> dict:
    return {"status": status, "error": f"upstream trouble {status}", **kw}


def _row(row_id: str, replies: list[dict], *, rc: int, status: str, step2_requests: int,
         step2: tuple[str, int], errors: tuple[str, ...] = (), extra: tuple[str, ...] = (),
         closed: bool = False, step1: tuple[str, int] = ("succeeded", 1),
         step1_errors: tuple[str, ...] = ()):
    return pytest.param(dict(replies=replies, rc=rc, status=status, step2_requests=step2_requests,
                             step2=step2, errors=errors, extra=extra, closed=closed, step1=step1,
                             step1_errors=step1_errors), id=row_id)


def _ok_after(first: dict, row_id: str, extra: tuple[str, ...] = ()):
    return _row(row_id, [first, _ok()], rc=0, status="completed", step2_requests=2,
                step2=("succeeded", 1 if first.get("status", 200) != 200 else 2), extra=extra)


def _failed(row_id: str, replies: list[dict], errors: tuple[str, ...], attempts: int = 2,
            extra: tuple[str, ...] = ()):
    return _row(row_id, replies, rc=1, status="failed", step2_requests=len(replies),
                step2=("failed", attempts), errors=errors, extra=extra)


ROWS = [
    _row("refused-model-lookup", [], rc=2, status="pending", step2_requests=0, step2=("", 0),
         closed=True, errors=("cannot reach the model server",)),
    # with --model too, the start-up probe finds the server gone: nothing is claimed
    _row("refused-chat", [], rc=2, status="pending", step2_requests=0, step2=("", 0),
         closed=True, extra=("--model", "m"), errors=("cannot reach the model server",)),
    _ok_after(_http(500), "500-then-ok"),
    _ok_after(_http(502), "502-then-ok"),
    _ok_after(_http(503), "503-then-ok"),
    _ok_after(_http(504), "504-then-ok"),
    _ok_after(_http(429), "429-then-ok"),
    _ok_after(_http(429, retry_after=0), "429-retry-after-0-then-ok"),
    _ok_after(_http(503, retry_after=0), "503-retry-after-0-then-ok"),
    # 3 tries (1 + --retries 2) per attempt x 2 attempts (1 + max_retries 1)
    _failed("500-always", [_http(500) for _ in range(6)], ("HTTP 500", "upstream trouble 500")),
    _failed("overflow-lmstudio", [{"status": 400, "error_body": LMSTUDIO_OVERFLOW}],
            ("context length of only 4096 tokens", "larger context length"), attempts=1),
    _failed("overflow-llamacpp", [{"status": 400, "error_body": LLAMACPP_OVERFLOW}],
            ("exceeds the available context size", "larger context length"), attempts=1),
    _failed("overflow-openai", [{"status": 400, "error_body": OPENAI_OVERFLOW}],
            ("maximum context length is 2048 tokens", "larger context length"), attempts=1),
    _failed("sse-error-overflow", [{"fault": "sse_error"}],
            ("does not fit in context length", "larger context length"), attempts=1),
    _failed("sse-error-crash", [{"fault": "sse_error", "error": "model crashed"}] * 2, ("model crashed",)),
    _failed("empty-stream", [{"content": GOOD_STEP2, "fault": "empty_stream"}] * 2, ("no output",)),
    _failed("cut", [{"content": LONG_JSON, "fault": "cut"}] * 2, ("ended early",)),
    _ok_after({"content": LONG_JSON, "fault": "cut"}, "cut-then-ok"),
    _failed("stall", [{"content": LONG_JSON, "fault": "stall", "delay_s": 1.0}] * 2, ("stalled after",)),
    _ok_after({"content": LONG_JSON, "fault": "stall", "delay_s": 1.0}, "stall-then-ok"),
    _failed("not-json", [{"content": GOOD_STEP2, "fault": "not_json"}] * 2, ("not a chat completion",)),
    _failed("no-choices", [{"content": GOOD_STEP2, "fault": "no_choices"}] * 2, ("without 'choices'",)),
    _failed("too-large", [{"content": "x" * 5000}] * 2, ("--max-output-bytes", "cut"),
            extra=("--max-output-bytes", "200")),
    _failed("wrong-json", [{"content": '{"b": 1}'}] * 2, ("lacks the keys", "'a'")),
]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def plan_row(db: Path) -> dict:
    [row] = [r for r in read_rows(db) if "bridge-plan" in (r["tags"] or "").split(",")]
    return row


def effective_status(db: Path, row: dict) -> str:
    """The recorded state (bridge_plan_state) when present, else the content's status."""
    state = state_of_row(db, row)
    if state.get("status"):
        return state["status"]
    return json.loads(row["content"])["status"]


def requests_for(fake_llm, prompt: str) -> list[dict]:
    return [r for r in fake_llm.chat_requests if f"Task:\n{prompt}" in first_user(r)]


# --------------------------------------------------------------------------------------
# the matrix
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", ROWS)
def test_server_fault_matrix(row, capsys, db, fake_llm, state_dir, tmp_path):
    """Each hostile-server behaviour ends with the right exit code and plan status, a
    result memory that says what happened, the retries the behaviour deserves (and no
    more), and the project's files as they were whenever the plan failed."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_bytes(ORIGINAL)
    trust_project(project)
    steps = [
        {"id": 1, "prompt": STEP1_PROMPT, "validation": {"type": "non_empty"}, "file_output": "README.md"},
        {"id": 2, "prompt": STEP2_PROMPT, "validation": {"type": "contains_keys", "keys": ["a"]},
         "max_retries": 1, "depends_on": [1]},
    ]
    insert_plan(db, make_plan(PLAN_ID, steps, context={"objective": "fault matrix", "project": str(project)},
                              rollback_strategy="revert_files"))
    if not row["closed"]:
        fake_llm.enqueue("rewritten")
        for reply in row["replies"]:
            reply = dict(reply)
            fake_llm.enqueue(reply.pop("content", ""), **reply)
    base_url = f"http://127.0.0.1:{closed_port()}/v1" if row["closed"] else fake_llm.url
    argv = bridge_args(db, base_url, state_dir, "--json", "--retries", "2", "--timeout", "0.3", *row["extra"])

    clock = time.monotonic()
    rc = bridge.main(argv, environ={})
    elapsed = time.monotonic() - clock
    out, err = capsys.readouterr()

    assert rc == row["rc"], err
    assert elapsed < 5.0
    # stdout
    if row["rc"] == 2:
        assert out == ""
    else:
        [printed] = json.loads(out)["plans"]
        assert printed["plan_id"] == PLAN_ID
        assert printed["status"] == row["status"]
    # stderr
    assert "Traceback" not in err
    assert "internal error" not in err
    if row["rc"] == 2:
        assert "bridge: error: cannot reach the model server" in err
    # the requests the server saw: exactly the scripted replies were used
    assert fake_llm.pending == 0
    assert fake_llm.errors == []
    if row["closed"]:
        assert fake_llm.requests == []
    else:
        assert len(requests_for(fake_llm, STEP1_PROMPT)) == 1
        assert len(requests_for(fake_llm, STEP2_PROMPT)) == row["step2_requests"]
        assert len(fake_llm.chat_requests) == 1 + row["step2_requests"]
    # the store
    plan = plan_row(db)
    assert effective_status(db, plan) == row["status"]
    results = stored_results(db)
    if row["rc"] == 2:
        assert results == []
        assert state_of_row(db, plan) == {}   # never claimed
    else:
        [result] = results
        assert result["plan_id"] == PLAN_ID
        assert result["status"] == row["status"]
        assert result["success"] is (row["status"] == "completed")
        assert result["run_id"] == printed["run_id"]
        assert state_of_row(db, plan)["run_id"] == result["run_id"]
        by_id = steps_by_id(result)
        step1, step2 = by_id[1], by_id[2]
        assert (step1["status"], step1["attempts"]) == row["step1"]
        for text in row["step1_errors"]:
            assert text in step1["error"]
        assert (step2["status"], step2["attempts"]) == row["step2"]
        if row["status"] == "completed":
            assert step2["error"] is None
            assert json.loads(step2["output"]) == {"a": 1}
            assert result["error"] is None
        else:
            assert result["error"]
            for text in row["errors"]:
                assert text in step2["error"], step2["error"]
        assert len(step2["output"]) < 1000                       # memory stays bounded
        if step1["status"] == "succeeded":
            assert step1["output"] == "rewritten"
            action = "modified" if row["status"] == "completed" else "reverted"
            assert result["files"] == [{"path": "README.md", "action": action}]
        else:
            assert result["files"] == []
    check_store(db)
    # the project
    if row["status"] == "completed":
        assert (project / "README.md").read_bytes() == step1["output"].encode("utf-8") == b"rewritten"
    else:
        assert (project / "README.md").read_bytes() == ORIGINAL
    assert listing(project) == ["README.md"]
