"""What the planner (Claude Code) sees of bridge: the --events stream, the run log
transcripts, usage and what the tokens would have cost on Claude, --show, --dry-run,
--validate, --submit, --cancel and --schema.

Always in-process through bridge.main(argv, environ={}) against the fake LLM server and
real doobidoo stores."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest

import bridge
from fakes import (
    bridge_args, check_store, columns, content_hash, insert_plan, iso_z, make_plan, make_store, plan_rows, read_rows,
    result_document, state_of_row,
)

ROOT = Path(__file__).resolve().parent.parent      # where bridge.py, README.md and the schema live

# Literals copied from the contract (bridge's README), never read at run time.
RESULT_TAG = "bridge-result"
PLAN_TAG = "bridge-plan"
KINDS = ("plan_start", "step_start", "delta", "attempt_failed", "step_end", "plan_end", "error")
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
PLACEHOLDER_1 = "<the output of step 1, once it has run>"
PRICES = {"claude-sonnet-4-5": (3.0, 15.0), "claude-opus-4-1": (15.0, 75.0)}
KNOWN_PRICE_MODELS = ("claude-opus-4-5", "claude-opus-4-1", "claude-sonnet-4-5", "claude-haiku-4-5")
COLUMNS_12 = ["id", "content_hash", "content", "tags", "memory_type", "metadata", "created_at",
              "updated_at", "created_at_iso", "updated_at_iso", "deleted_at", "store", "parent_id",
              "version", "confidence", "last_accessed", "superseded_by", "embedding_pending"]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def live_results(db: Path) -> list[tuple[dict, dict]]:
    """(row, result document) of every live result memory, oldest first."""
    out = []
    for row in read_rows(db):
        if RESULT_TAG in (row["tags"] or "").split(",") and row.get("deleted_at") is None:
            out.append((row, result_document(row["content"])))
    return out


def plan_state(db: Path, plan_id: str) -> dict:
    """The state of the plan's one live row (fakes.plan_state takes the first row, live or
    not; here a replaced plan leaves a deleted row behind)."""
    (row,) = [r for r in plan_rows(db, plan_id) if r.get("deleted_at") is None]
    return state_of_row(db, row)


def prompt_tokens_of(request: dict) -> int:
    """The fake's prompt_tokens for a request: characters of every message // 4 + 1."""
    return sum(len(m["content"]) for m in request["json"]["messages"]) // 4 + 1


def chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def cost(p: int, c: int, model: str = "claude-sonnet-4-5") -> float:
    price_in, price_out = PRICES[model]
    return round(p * price_in / 1e6 + c * price_out / 1e6, 4)


def completion_body(text: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """A whole (non-streamed) chat.completion body with exact usage."""
    return {"id": "x", "object": "chat.completion", "model": "fake-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def parse_events(out: str) -> list[dict]:
    """Every stdout line must be one JSON object; return them."""
    assert out.endswith("\n"), f"stdout does not end with a newline: {out[-80:]!r}"
    events = []
    for line in out.splitlines():
        event = json.loads(line)         # a non-JSON line fails the test here
        assert isinstance(event, dict), line
        events.append(event)
    return events


def compress(events: list[dict]) -> list[tuple]:
    """The event sequence with each run of deltas of one attempt collapsed to one entry."""
    seq: list[tuple] = []
    for e in events:
        key = (e["event"], e.get("step_id"), e.get("attempt") if e["event"] in ("delta", "attempt_failed") else None)
        if e["event"] == "delta" and seq and seq[-1] == key:
            continue
        seq.append(key)
    return seq


# A two-step plan: step 1 wants a JSON object with key "a" (the first answer is not JSON),
# step 2 depends on step 1. Its replies stream 3 characters a chunk.
BAD_1, GOOD_1, TWO = "this is not json", '{"a": 1}', "step two is done"


def two_step_plan(plan_id: str = "p1") -> dict:
    return make_plan(plan_id, [
        {"id": 1, "title": "keys", "prompt": "Give a JSON object with key a",
         "validation": {"type": "contains_keys", "keys": ["a"]}},
        {"id": 2, "prompt": "Use the object", "depends_on": [1]},
    ])


def enqueue_two_step(fake_llm) -> None:
    fake_llm.enqueue(BAD_1, chunk_size=3)
    fake_llm.enqueue(GOOD_1, chunk_size=3)
    fake_llm.enqueue(TWO, chunk_size=3)


def run_two_step(capsys, db, fake_llm, state_dir) -> dict:
    """Run the two-step plan (step 1 fails once, then passes); return its stored result."""
    insert_plan(db, two_step_plan())
    enqueue_two_step(fake_llm)
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir), environ={})
    capsys.readouterr()
    assert rc == 0
    (_, result), = live_results(db)
    return result


# --------------------------------------------------------------------------------------
# 1. --events
# --------------------------------------------------------------------------------------


def test_events_stream_is_json_lines_in_run_order_with_deltas_and_totals(capsys, db, fake_llm, state_dir):
    """--events: stdout holds only JSON lines; plan_start, step_start, deltas, attempt_failed,
    step_end, plan_end come in run order with the fields a planner needs; progress stays on
    stderr."""
    insert_plan(db, two_step_plan())
    enqueue_two_step(fake_llm)

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--events"), environ={})
    out, err = capsys.readouterr()

    assert rc == 0
    events = parse_events(out)
    assert compress(events) == [
        ("plan_start", None, None),
        ("step_start", 1, None), ("delta", 1, 1), ("attempt_failed", 1, 1), ("delta", 1, 2),
        ("step_end", 1, None),
        ("step_start", 2, None), ("delta", 2, 1), ("step_end", 2, None),
        ("plan_end", None, None),
    ]
    for e in events:
        assert e["event"] in KINDS
        assert TS_RE.match(e["ts"]), e["ts"]
        assert e["plan_id"] == "p1"
        if e["event"] in ("step_start", "delta", "attempt_failed", "step_end"):
            assert isinstance(e["step_id"], int)
    # the deltas of each attempt are the streamed content, one per chunk
    for (sid, attempt), content in {(1, 1): BAD_1, (1, 2): GOOD_1, (2, 1): TWO}.items():
        texts = [e["text"] for e in events
                 if e["event"] == "delta" and e["step_id"] == sid and e["attempt"] == attempt]
        assert texts == chunks(content, 3)
        assert "".join(texts) == content
    failed = next(e for e in events if e["event"] == "attempt_failed")
    assert failed["attempt"] == 1 and "JSON" in failed["error"] and failed["retrying"] is True

    (row, stored), = live_results(db)
    ends = {e["step_id"]: e for e in events if e["event"] == "step_end"}
    for sid, want_attempts in ((1, 2), (2, 1)):
        end = ends[sid]
        assert end["status"] == "succeeded"
        assert end["attempts"] == want_attempts
        step = next(s for s in stored["steps"] if s["id"] == sid)
        assert end["usage"] == step["usage"]
        assert end["usage"]["completion_tokens"] > 0
        assert isinstance(end["duration_s"], (int, float))
        assert end["tokens_per_s"] is not None and end["tokens_per_s"] > 0
        assert end["would_have_cost_usd"] == cost(end["usage"]["prompt_tokens"], end["usage"]["completion_tokens"])

    start = events[0]
    assert start["run_id"] == stored["run_id"]
    end = events[-1]
    assert end["status"] == "completed" and end["success"] is True
    assert end["usage"] == stored["usage"]
    assert end["cost_usd"] == 0
    assert end["would_have_cost_usd"] == stored["would_have_cost_usd"]
    assert end["result_hash"] == row["content_hash"]
    assert end["run_log"] == str(state_dir / "runs" / stored["run_id"])

    assert "step 1" in err
    assert "{" not in err.splitlines()[0]        # human text, not events
    check_store(db)


def test_event_kinds_are_exactly_the_documented_vocabulary():
    """The event vocabulary is pinned: adding or renaming a kind breaks planners that read it."""
    assert bridge.EVENT_KINDS == KINDS


def test_every_event_kind_is_documented_in_the_readme():
    """Each event kind appears in backticks in README.md, where planners learn the stream."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [kind for kind in bridge.EVENT_KINDS if f"`{kind}`" not in readme]
    assert missing == [], f"README.md does not document these event kinds: {missing}"


def test_events_error_event_when_the_store_is_missing(capsys, tmp_path, fake_llm, state_dir):
    """A run that cannot start still speaks JSON on stdout: one error event with the
    message and exit code."""
    missing = tmp_path / "nowhere" / "store.db"

    rc = bridge.main(bridge_args(missing, fake_llm.url, state_dir, "--events"), environ={})
    out, err = capsys.readouterr()

    assert rc == 2
    (event,) = parse_events(out)
    assert event["event"] == "error"
    assert TS_RE.match(event["ts"])
    assert "plan_id" in event
    assert str(missing) in event["message"]
    assert event["exit_code"] == 2
    assert "bridge: error:" in err
    assert fake_llm.requests == []


def test_events_skipped_step_has_step_end_but_no_step_start(capsys, db, fake_llm, state_dir):
    """A step skipped because its dependency failed ends with status skipped and never starts."""
    insert_plan(db, make_plan("p1", [
        {"id": 1, "prompt": "say yes", "validation": {"type": "regex", "pattern": "^yes$"}, "max_retries": 0},
        {"id": 2, "prompt": "after", "depends_on": [1]},
    ]))
    fake_llm.enqueue("no", chunk_size=3)

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--events"), environ={})
    out, _ = capsys.readouterr()

    assert rc == 1
    events = parse_events(out)
    assert not [e for e in events if e["event"] == "step_start" and e["step_id"] == 2]
    (end2,) = [e for e in events if e["event"] == "step_end" and e["step_id"] == 2]
    assert end2["status"] == "skipped"
    assert end2["attempts"] == 0
    assert "dependency 1" in end2["error"]
    (end1,) = [e for e in events if e["event"] == "step_end" and e["step_id"] == 1]
    assert end1["status"] == "failed"
    assert events[-1]["event"] == "plan_end" and events[-1]["success"] is False
    assert len(fake_llm.chat_requests) == 1
    check_store(db)


@pytest.mark.parametrize("extra", [["--json"], ["--list"]], ids=["json", "list"])
def test_events_with_json_or_an_action_is_a_usage_error(capsys, db, fake_llm, state_dir, extra):
    """--events goes with a run only, and never with --json (both write stdout)."""
    with pytest.raises(SystemExit) as exc:
        bridge.main(bridge_args(db, fake_llm.url, state_dir, "--events", *extra), environ={})
    assert exc.value.code == 2
    assert "--events" in capsys.readouterr().err
    assert fake_llm.requests == []


# --------------------------------------------------------------------------------------
# 2. run log
# --------------------------------------------------------------------------------------


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def sent_messages(lines: list[dict]) -> list[dict]:
    """The chat messages that transcript lines record as sent."""
    out = []
    for line in lines:
        if line["type"] == "system" and line.get("subtype") == "system_prompt":
            out.append({"role": "system", "content": line["text"]})
        else:
            (part,) = line["message"]["content"]
            out.append({"role": line["message"]["role"], "content": part["text"]})
    return out


def test_run_log_records_every_attempt_in_stream_json_lines(capsys, db, fake_llm, state_dir):
    """runs/<run_id>/step-N.jsonl: init line, per attempt the exact messages sent, the raw
    answer with the server's usage, the validation outcome, then a result line."""
    result = run_two_step(capsys, db, fake_llm, state_dir)
    run_id = result["run_id"]
    run_dir = state_dir / "runs" / run_id
    assert result["run_log"] == str(run_dir)
    requests = fake_llm.chat_requests
    assert len(requests) == 3
    per_step = {1: [(requests[0], BAD_1), (requests[1], GOOD_1)], 2: [(requests[2], TWO)]}

    for sid, attempts in per_step.items():
        lines = read_log(run_dir / f"step-{sid}.jsonl")
        for line in lines:
            assert line["type"] in {"system", "user", "assistant", "result"}, line
        init = lines[0]
        assert (init["type"], init["subtype"], init["session_id"]) == ("system", "init", run_id)
        body = lines[1:-1]
        total_p = total_c = 0
        for n, (request, raw) in enumerate(attempts, start=1):
            mine = [line for line in body if line.get("attempt") == n]
            sent = request["json"]["messages"]
            assert sent_messages(mine[:len(sent)]) == sent
            answer, check = mine[len(sent):]
            assert answer["type"] == "assistant"
            assert answer["message"]["content"] == [{"type": "text", "text": raw}]
            p, c = prompt_tokens_of(request), len(chunks(raw, 3))
            assert answer["message"]["usage"] == {"input_tokens": p, "output_tokens": c}
            total_p, total_c = total_p + p, total_c + c
            assert (check["type"], check["subtype"]) == ("system", "validation")
            last = n == len(attempts)
            assert check["ok"] is last
            assert (check["error"] is None) is last
        assert len(body) == sum(len(r["json"]["messages"]) + 2 for r, _ in attempts)
        end = lines[-1]
        assert end["type"] == "result"
        assert (end["subtype"], end["is_error"]) == ("success", False)
        assert end["usage"] == {"input_tokens": total_p, "output_tokens": total_c}
        assert isinstance(end["duration_ms"], int) and end["duration_ms"] >= 0
        assert end["total_cost_usd"] == 0
        assert end["num_turns"] == len(attempts)
        assert end["session_id"] == run_id
    # the step-1 retry carried the rejected answer back
    assert requests[1]["json"]["messages"][2] == {"role": "assistant", "content": BAD_1}
    check_store(db)


def test_run_log_shows_the_messages_while_the_model_is_answering(capsys, db, fake_llm, state_dir):
    """A step's transcript holds its prompt while the request is still in flight (it is
    flushed when the messages are sent, not only when the step ends)."""
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "take your time"}]))
    fake_llm.latency_s = 0.5
    fake_llm.enqueue("done")
    runner = threading.Thread(target=lambda: codes.append(
        bridge.main(bridge_args(db, fake_llm.url, state_dir), environ={})))
    codes: list[int] = []
    runner.start()
    seen: list[str] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "user" not in seen:
        logs = list((state_dir / "runs").glob("*/step-1.jsonl")) if (state_dir / "runs").exists() else []
        seen = [line.get("type") for line in read_log(logs[0])] if logs else []
        time.sleep(0.01)                            # poll; the request takes 0.5 s
    runner.join(timeout=10)
    capsys.readouterr()

    assert seen == ["system", "system", "user"]      # init, the system prompt, the task: no answer yet
    assert codes == [0]


def test_run_log_of_a_failed_step_ends_with_an_error_result(capsys, db, fake_llm, state_dir):
    """A failed step's transcript ends error_during_execution; a skipped step has none."""
    insert_plan(db, make_plan("p1", [
        {"id": 1, "prompt": "say yes", "validation": {"type": "regex", "pattern": "^yes$"}, "max_retries": 1},
        {"id": 2, "prompt": "after", "depends_on": [1]},
    ]))
    fake_llm.enqueue("no", chunk_size=3)
    fake_llm.enqueue("still no", chunk_size=3)

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir), environ={})
    capsys.readouterr()

    assert rc == 1
    (_, result), = live_results(db)
    run_dir = Path(result["run_log"])
    assert run_dir == state_dir / "runs" / result["run_id"]
    lines = read_log(run_dir / "step-1.jsonl")
    end = lines[-1]
    assert end["type"] == "result"
    assert (end["subtype"], end["is_error"]) == ("error_during_execution", True)
    assert end["num_turns"] == 2
    assert end["total_cost_usd"] == 0
    assert [l["ok"] for l in lines if l.get("subtype") == "validation"] == [False, False]
    assert not (run_dir / "step-2.jsonl").exists()
    check_store(db)


# --------------------------------------------------------------------------------------
# 3. usage and what it would have cost
# --------------------------------------------------------------------------------------


USAGES = ((120_000, 30_000), (7_000, 1_234))


def usage_plan_run(capsys, db, fake_llm, state_dir, *extra, environ=None):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "one"}, {"id": 2, "prompt": "two"}]))
    for n, (p, c) in enumerate(USAGES, start=1):
        fake_llm.enqueue(status=200, error_body=completion_body(f"answer {n}", p, c))
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, *extra), environ=environ or {})
    out, err = capsys.readouterr()
    return rc, err


def test_usage_sums_steps_and_would_have_cost_uses_sonnet_by_default(capsys, db, fake_llm, state_dir):
    """The result sums the steps' usage; cost_usd is 0; would_have_cost_usd prices the
    tokens at claude-sonnet-4-5 ($3 in, $15 out a million); stderr says both."""
    rc, err = usage_plan_run(capsys, db, fake_llm, state_dir)

    assert rc == 0
    (_, result), = live_results(db)
    p = sum(u[0] for u in USAGES)
    c = sum(u[1] for u in USAGES)
    assert result["usage"] == {"prompt_tokens": p, "completion_tokens": c}
    assert result["cost_usd"] == 0
    assert result["price_model"] == "claude-sonnet-4-5"
    assert result["would_have_cost_usd"] == cost(p, c) == round(p * 3 / 1e6 + c * 15 / 1e6, 4)
    for step, (sp, sc) in zip(result["steps"], USAGES):
        assert step["usage"] == {"prompt_tokens": sp, "completion_tokens": sc}
        assert step["would_have_cost_usd"] == cost(sp, sc)
    assert "$0 here" in err
    assert f"${cost(p, c):.4f}" in err
    assert "claude-sonnet-4-5" in err
    check_store(db)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_price_model_opus_prices_the_same_tokens_at_15_and_75(capsys, db, fake_llm, state_dir, how):
    """--price-model (or BRIDGE_PRICE_MODEL) picks the Claude price row."""
    if how == "flag":
        rc, err = usage_plan_run(capsys, db, fake_llm, state_dir, "--price-model", "claude-opus-4-1")
    else:
        rc, err = usage_plan_run(capsys, db, fake_llm, state_dir,
                                 environ={"BRIDGE_PRICE_MODEL": "claude-opus-4-1"})

    assert rc == 0
    (_, result), = live_results(db)
    p = sum(u[0] for u in USAGES)
    c = sum(u[1] for u in USAGES)
    assert result["price_model"] == "claude-opus-4-1"
    assert result["would_have_cost_usd"] == round(p * 15 / 1e6 + c * 75 / 1e6, 4)
    assert result["cost_usd"] == 0
    for step, (sp, sc) in zip(result["steps"], USAGES):
        assert step["would_have_cost_usd"] == cost(sp, sc, "claude-opus-4-1")
    assert f"${cost(p, c, 'claude-opus-4-1'):.4f} on claude-opus-4-1" in err
    check_store(db)


def test_unknown_price_model_exits_2_naming_the_known_ones(capsys, db, fake_llm, state_dir):
    """A price model bridge has no prices for is a usage error before anything runs."""
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("never sent")

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--price-model", "gpt-9"), environ={})
    out, err = capsys.readouterr()

    assert rc == 2
    assert out == ""
    assert "gpt-9" in err
    for name in KNOWN_PRICE_MODELS:
        assert name in err
    assert fake_llm.requests == []
    assert plan_state(db, "p1") == {}
    check_store(db)


def test_streamed_steps_report_usage_from_the_server_and_tokens_per_second(capsys, db, fake_llm, state_dir):
    """Streamed replies: each step's usage is what the server reported (prompt and chunk
    counts) and tokens_per_s is positive for steps and the plan."""
    result = run_two_step(capsys, db, fake_llm, state_dir)
    req = fake_llm.chat_requests
    want = {1: (prompt_tokens_of(req[0]) + prompt_tokens_of(req[1]), len(chunks(BAD_1, 3)) + len(chunks(GOOD_1, 3))),
            2: (prompt_tokens_of(req[2]), len(chunks(TWO, 3)))}
    for step in result["steps"]:
        p, c = want[step["id"]]
        assert step["usage"] == {"prompt_tokens": p, "completion_tokens": c}
        assert step["usage_reported"] is True
        assert step["tokens_per_s"] is not None and step["tokens_per_s"] > 0
        assert step["would_have_cost_usd"] == cost(p, c)
    total_p = sum(v[0] for v in want.values())
    total_c = sum(v[1] for v in want.values())
    assert result["usage"] == {"prompt_tokens": total_p, "completion_tokens": total_c}
    assert result["tokens_per_s"] is not None and result["tokens_per_s"] > 0
    assert result["would_have_cost_usd"] == cost(total_p, total_c)
    assert result["cost_usd"] == 0
    check_store(db)


# --------------------------------------------------------------------------------------
# 4. --show
# --------------------------------------------------------------------------------------


def show_plan(project: Path) -> dict:
    return make_plan("p1", [
        {"id": 1, "title": "make", "prompt": "write it", "file_output": "out.txt"},
        {"id": 2, "prompt": "say yes", "validation": {"type": "regex", "pattern": "^yes$"}, "max_retries": 1},
    ], context={"objective": "show me", "project": str(project)})


def test_show_prints_the_last_result_for_a_person(capsys, db, fake_llm, state_dir, project):
    """--show ID: plan, status, each step with status and attempts, outputs, errors,
    files and the run log path."""
    insert_plan(db, show_plan(project))
    fake_llm.enqueue("hello file")
    fake_llm.enqueue("nope")
    fake_llm.enqueue("nope again")
    assert bridge.main(bridge_args(db, fake_llm.url, state_dir), environ={}) == 1
    capsys.readouterr()
    (_, result), = live_results(db)
    requests_before = len(fake_llm.requests)

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--show", "p1"), environ={})
    out, err = capsys.readouterr()

    assert rc == 0
    assert err == ""
    assert "plan p1: failed" in out
    assert result["run_id"] in out
    assert "show me" in out
    assert "step 1 (make): succeeded · 1 attempt(s)" in out
    assert "step 2: failed · 2 attempt(s)" in out
    assert "output: hello file" in out
    assert "output: nope again" in out
    step2_error = next(s for s in result["steps"] if s["id"] == 2)["error"]
    assert step2_error and f"error: {step2_error}" in out
    assert "file: out.txt" in out
    assert "file out.txt: created" in out
    assert f"run log: {state_dir / 'runs' / result['run_id']}" in out
    assert "$0 here" in out
    assert len(fake_llm.requests) == requests_before       # --show never calls the server
    check_store(db)


def test_show_json_is_exactly_the_stored_result_document(capsys, db, fake_llm, state_dir, project):
    """--show ID --json prints the result memory's content, parsed, with its content_hash
    as result_hash (as the run's --json does), and nothing else."""
    insert_plan(db, show_plan(project))
    for text in ("hello file", "yes"):
        fake_llm.enqueue(text)
    assert bridge.main(bridge_args(db, fake_llm.url, state_dir), environ={}) == 0
    capsys.readouterr()

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--show", "p1", "--json"), environ={})
    out, _ = capsys.readouterr()

    assert rc == 0
    (row, _), = live_results(db)
    assert json.loads(out) == {**result_document(row["content"]), "result_hash": row["content_hash"]}
    check_store(db)


def test_show_of_a_plan_without_result_exits_2_with_a_hint(capsys, db, fake_llm, state_dir):
    """A plan never run has nothing to show: exit 2 and how to run it."""
    insert_plan(db, make_plan("p1"))

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--show", "p1"), environ={})
    out, err = capsys.readouterr()

    assert rc == 2
    assert out == ""
    assert "no stored result" in err
    assert "hint:" in err and "--plan p1" in err
    check_store(db)


def test_show_of_an_unknown_plan_exits_2(capsys, db, fake_llm, state_dir):
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--show", "ghost"), environ={})
    out, err = capsys.readouterr()

    assert rc == 2
    assert out == ""
    assert "ghost" in err and "bridge: error:" in err


def test_show_after_a_rerun_gives_the_newest_result(capsys, db, fake_llm, state_dir):
    """Two runs (the second with --rerun) leave two results; --show gives the second."""
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("first answer")
    assert bridge.main(bridge_args(db, fake_llm.url, state_dir), environ={}) == 0
    fake_llm.enqueue("second answer")
    assert bridge.main(bridge_args(db, fake_llm.url, state_dir, "--plan", "p1", "--rerun"), environ={}) == 0
    capsys.readouterr()
    results = [doc for _, doc in live_results(db)]
    assert len(results) == 2

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--show", "p1", "--json"), environ={})
    out, _ = capsys.readouterr()

    assert rc == 0
    shown = json.loads(out)
    assert shown["run_id"] == results[1]["run_id"] != results[0]["run_id"]
    assert shown["steps"][0]["output"] == "second answer"

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--show", "p1"), environ={})
    out, _ = capsys.readouterr()
    assert rc == 0
    assert "second answer" in out and "first answer" not in out
    check_store(db)


# --------------------------------------------------------------------------------------
# 5. --dry-run
# --------------------------------------------------------------------------------------


NOTES = "NOTES-CONTENT: the cache lives in cache.py\n"


def dry_run_store(db: Path, project: Path) -> None:
    (project / "notes.txt").write_text(NOTES, encoding="utf-8")
    (project / "ref.md").write_text("# reference\n", encoding="utf-8")
    insert_plan(db, make_plan("good", [
        {"id": 1, "title": "keys", "prompt": "List the keys",
         "validation": {"type": "contains_keys", "keys": ["k"]}},
        {"id": 2, "prompt": "Summarise the keys", "depends_on": [1]},
    ], context={"objective": "dry", "project": str(project),
                "files_context": {"notes.txt": "LOAD", "ref.md": "REFERENCE"}}), created_at=1_700_000_000.0)
    insert_plan(db, make_plan("bad", [
        {"id": 1, "prompt": "a", "depends_on": [2]},
        {"id": 2, "prompt": "b", "depends_on": [1]},
    ]), created_at=1_700_000_001.0)


def test_dry_run_prints_exact_messages_and_problems_and_touches_nothing(capsys, db, fake_llm, state_dir, project):
    """--dry-run: each valid step's messages (LOAD text, REFERENCE name, dependency
    placeholder), the invalid plan's problems, exit 1; no request at all; the store is
    byte-identical."""
    dry_run_store(db, project)
    before = db.read_bytes()
    fake_llm.enqueue("never sent")

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--dry-run"), environ={})
    out, _ = capsys.readouterr()

    assert rc == 1
    assert "plan good: valid" in out
    assert "=== step 1 (keys)" in out and "=== step 2" in out
    assert out.index("=== step 1") < out.index("=== step 2")
    assert NOTES.strip() in out
    assert "Files you may refer to by name (not included): ref.md" in out
    assert PLACEHOLDER_1 in out
    assert "--- system ---" in out and "--- user ---" in out
    assert "--- response_format ---" in out
    assert "plan bad: invalid" in out
    assert "$.steps: dependency cycle" in out
    assert fake_llm.requests == []
    assert db.read_bytes() == before
    assert fake_llm.pending == 1
    check_store(db)


def test_dry_run_json_messages_are_what_a_real_run_sends(capsys, db, fake_llm, state_dir, project):
    """--dry-run --json: {"plans": [...]} whose step-1 messages and response_format equal
    the request a real run then sends; step 2's equal it once the placeholder is the output."""
    dry_run_store(db, project)

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--dry-run", "--json"), environ={})
    out, _ = capsys.readouterr()

    assert rc == 1
    doc = json.loads(out)
    assert list(doc) == ["plans"]
    good, bad = doc["plans"]
    assert {"plan_id", "valid", "problems", "steps"} <= set(good)
    assert (good["plan_id"], good["valid"], good["problems"]) == ("good", True, [])
    assert (bad["plan_id"], bad["valid"], bad["steps"]) == ("bad", False, [])
    assert any(p.startswith("$.steps: dependency cycle") for p in bad["problems"])
    assert [s["id"] for s in good["steps"]] == [1, 2]
    for step in good["steps"]:
        assert {"id", "messages", "response_format"} <= set(step)
    step1, step2 = good["steps"]
    assert step1["response_format"] is not None
    assert step2["response_format"] is None
    assert NOTES.strip() in step1["messages"][1]["content"]
    assert PLACEHOLDER_1 in step2["messages"][1]["content"]
    assert fake_llm.requests == []

    fake_llm.enqueue('{"k": 1}')
    fake_llm.enqueue("summary")
    assert bridge.main(bridge_args(db, fake_llm.url, state_dir, "--plan", "good"), environ={}) == 0
    capsys.readouterr()
    sent1, sent2 = (r["json"] for r in fake_llm.chat_requests)
    assert sent1["messages"] == step1["messages"]
    assert sent1["response_format"] == step1["response_format"]
    artifact = json.dumps({"k": 1}, indent=2)
    want2 = [dict(m, content=m["content"].replace(PLACEHOLDER_1, artifact)) for m in step2["messages"]]
    assert sent2["messages"] == want2
    assert "response_format" not in sent2
    check_store(db)


def test_dry_run_plan_shows_only_that_plan(capsys, db, fake_llm, state_dir, project):
    dry_run_store(db, project)

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--dry-run", "--plan", "good", "--json"), environ={})
    out, _ = capsys.readouterr()

    assert rc == 0
    doc = json.loads(out)
    assert [p["plan_id"] for p in doc["plans"]] == ["good"]
    assert fake_llm.requests == []


def test_dry_run_with_an_action_is_a_usage_error(capsys, db, fake_llm, state_dir):
    with pytest.raises(SystemExit) as exc:
        bridge.main(bridge_args(db, fake_llm.url, state_dir, "--dry-run", "--list"), environ={})
    assert exc.value.code == 2
    assert "--dry-run" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# 6. --validate
# --------------------------------------------------------------------------------------


def write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return path


def test_validate_a_valid_file_exits_0(capsys, tmp_path):
    path = write_json(tmp_path / "plan.json", make_plan("p1", [{"id": 1, "prompt": "a"}, {"id": 2, "prompt": "b"}]))

    rc = bridge.main(["--validate", str(path)], environ={})
    out, err = capsys.readouterr()

    assert rc == 0
    assert "valid plan 'p1'" in out and "2 step(s)" in out
    assert err == ""


def test_validate_lists_every_problem_with_its_json_path(capsys, tmp_path):
    """A plan with a null validation and a dependency cycle: exit 1, both problems, each
    with its JSON path."""
    plan = make_plan("p1", [{"id": 1, "prompt": "a", "depends_on": [2], "validation": None},
                            {"id": 2, "prompt": "b", "depends_on": [1]}])
    path = write_json(tmp_path / "plan.json", plan)

    rc = bridge.main(["--validate", str(path)], environ={})
    out, _ = capsys.readouterr()

    assert rc == 1
    assert "invalid plan" in out
    assert "$.steps[0].validation" in out
    assert "$.steps: dependency cycle" in out


def test_validate_not_json_exits_1(capsys, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{not json", encoding="utf-8")

    rc = bridge.main(["--validate", str(path)], environ={})
    out, _ = capsys.readouterr()

    assert rc == 1
    assert "$: not JSON" in out


def test_validate_missing_file_exits_2(capsys, tmp_path):
    path = tmp_path / "missing.json"

    rc = bridge.main(["--validate", str(path)], environ={})
    out, err = capsys.readouterr()

    assert rc == 2
    assert out == ""
    assert str(path) in err


def test_validate_json_form(capsys, tmp_path):
    good = write_json(tmp_path / "good.json", make_plan("p1"))
    bad = write_json(tmp_path / "bad.json", make_plan("p2", [{"id": 1, "prompt": "a", "depends_on": [9]}]))

    assert bridge.main(["--validate", str(good), "--json"], environ={}) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == {"file": str(good), "valid": True, "plan_id": "p1", "problems": []}

    assert bridge.main(["--validate", str(bad), "--json"], environ={}) == 1
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"file", "valid", "plan_id", "problems"}
    assert doc["file"] == str(bad) and doc["valid"] is False
    assert doc["problems"] == ["$.steps[0].depends_on: unknown step 9"]


# --------------------------------------------------------------------------------------
# 7. --submit
# --------------------------------------------------------------------------------------


def submit(db: Path, path: Path, *extra: str) -> int:
    return bridge.main(["--db", str(db), "--submit", str(path), *extra], environ={})


def test_submit_to_a_new_file_creates_a_12x_store_with_the_plan_as_the_server_would(capsys, tmp_path):
    """--submit with --db naming a new file: a 12.x store (columns, FTS) holding the plan
    as the memory server stores one."""
    db = tmp_path / "new" / "store.db"
    db.parent.mkdir()               # a missing folder is refused (tests/test_first_hour.py)
    plan = make_plan("sub-1", context={"objective": "submitted"})
    path = write_json(tmp_path / "plan.json", plan)

    rc = submit(db, path)
    out, err = capsys.readouterr()

    assert rc == 0
    assert "sub-1" in out
    assert out.startswith(f"created a new, empty store at {db}")
    assert columns(db) == COLUMNS_12
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'memory_content_fts'").fetchone()
        triggers = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    finally:
        conn.close()
    assert {"memories_fts_ai", "memories_fts_au", "memories_fts_ad"} <= triggers
    (row,) = read_rows(db)
    assert json.loads(row["content"]) == plan
    assert row["memory_type"] == "planning"
    assert row["tags"] == PLAN_TAG
    assert row["content_hash"] == hashlib.sha256(row["content"].strip().lower().encode()).hexdigest()
    assert isinstance(row["created_at"], float) and isinstance(row["updated_at"], float)
    assert row["created_at_iso"] == iso_z(row["created_at"])
    assert row["updated_at_iso"] == iso_z(row["updated_at"])
    assert row["store"] == "default"
    assert row["embedding_pending"] == 0
    assert row["deleted_at"] is None
    check_store(db)

    assert bridge.main(["--db", str(db), "--list"], environ={}) == 0
    assert "sub-1" in capsys.readouterr().out


def test_submit_an_invalid_file_exits_1_and_creates_no_store(capsys, tmp_path):
    db = tmp_path / "new.db"
    path = write_json(tmp_path / "plan.json", make_plan("p1", [{"id": 1, "prompt": "a", "depends_on": [1]}]))

    rc = submit(db, path)
    out, err = capsys.readouterr()

    assert rc == 1
    assert "$.steps[0].depends_on: step 1 depends on itself" in out + err
    assert not db.exists()


def test_submit_same_id_twice_exits_2_pointing_at_replace(capsys, tmp_path):
    db = tmp_path / "store.db"
    assert submit(db, write_json(tmp_path / "a.json", make_plan("p1"))) == 0
    before = db.read_bytes()
    capsys.readouterr()

    rc = submit(db, write_json(tmp_path / "b.json", make_plan("p1", context={"objective": "other"})))
    out, err = capsys.readouterr()

    assert rc == 2
    assert "p1" in err and "--replace" in err
    assert db.read_bytes() == before
    check_store(db)


def test_submit_replace_soft_deletes_the_old_plan(capsys, tmp_path):
    """--replace: the old row gets deleted_at and updated_at (content untouched); the new
    row is live; --list --all shows one plan with that id."""
    db = tmp_path / "store.db"
    assert submit(db, write_json(tmp_path / "a.json", make_plan("p1"))) == 0
    (old,) = read_rows(db)
    new_plan = make_plan("p1", context={"objective": "second version"})

    rc = submit(db, write_json(tmp_path / "b.json", new_plan), "--replace")
    out, err = capsys.readouterr()

    assert rc == 0
    old_now, new = read_rows(db)
    assert old_now["id"] == old["id"]
    assert old_now["content"] == old["content"] and old_now["content_hash"] == old["content_hash"]
    assert old_now["deleted_at"] is not None and old_now["deleted_at"] >= old["created_at"]
    assert old_now["updated_at"] >= old["updated_at"] and old_now["updated_at"] == old_now["deleted_at"]
    assert old_now["updated_at_iso"] == iso_z(old_now["updated_at"])
    assert new["deleted_at"] is None
    assert json.loads(new["content"]) == new_plan
    check_store(db)

    assert bridge.main(["--db", str(db), "--list", "--all"], environ={}) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["p1"]]
    assert len(listed) == 1 and "second version" in listed[0]


def test_submit_replace_with_identical_content_is_a_clear_error(capsys, tmp_path):
    """Identical content cannot be stored twice (content_hash is unique): exit 2 saying so
    and how to run it (issue 24: was a bare "content hash" error), no traceback, and the
    live plan stays live."""
    db = tmp_path / "store.db"
    path = write_json(tmp_path / "a.json", make_plan("p1"))
    assert submit(db, path) == 0
    before = db.read_bytes()
    capsys.readouterr()

    rc = submit(db, path, "--replace")
    out, err = capsys.readouterr()

    assert rc == 2
    assert "this very plan 'p1' is already in" in err and "bridge --plan p1" in err
    assert "Traceback" not in err and "internal error" not in err
    assert db.read_bytes() == before
    assert read_rows(db)[0]["deleted_at"] is None
    check_store(db)


def test_submit_into_the_real_12x_fixture_store(capsys, tmp_path):
    db = make_store(tmp_path / "real.db", "12.x")
    plan = make_plan("sub-2")

    rc = submit(db, write_json(tmp_path / "plan.json", plan))
    capsys.readouterr()

    assert rc == 0
    rows = read_rows(db)
    assert len(rows) == 4
    assert json.loads(rows[-1]["content"]) == plan
    assert rows[-1]["content_hash"] == content_hash(rows[-1]["content"])
    check_store(db)
    assert bridge.main(["--db", str(db), "--list"], environ={}) == 0
    out = capsys.readouterr().out
    assert "sub-2" in out and "fixture-hello" in out


def test_submit_replace_into_the_original_layout_exits_2_no_soft_delete(capsys, tmp_path):
    db = make_store(tmp_path / "orig.db", "original")
    insert_plan(db, make_plan("p1"))
    before = db.read_bytes()

    rc = submit(db, write_json(tmp_path / "plan.json", make_plan("p1", context={"objective": "v2"})), "--replace")
    out, err = capsys.readouterr()

    assert rc == 2
    assert "no soft delete" in err
    assert db.read_bytes() == before
    check_store(db)


# --------------------------------------------------------------------------------------
# 8. --cancel
# --------------------------------------------------------------------------------------


def test_cancel_a_pending_plan_then_a_run_sends_nothing(capsys, db, fake_llm, state_dir):
    """--cancel ID: status cancelled in metadata, content untouched; a plain run skips it;
    --list --all says cancelled."""
    insert_plan(db, make_plan("p1"))
    (before,) = plan_rows(db, "p1")

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--cancel", "p1"), environ={})
    out, _ = capsys.readouterr()

    assert rc == 0
    assert "cancelled plan 'p1'" in out
    (after,) = plan_rows(db, "p1")
    assert after["content"] == before["content"] and after["content_hash"] == before["content_hash"]
    assert after["metadata"] == before["metadata"]
    assert state_of_row(db, after)["status"] == "cancelled"
    check_store(db)

    fake_llm.enqueue("never sent")
    assert bridge.main(bridge_args(db, fake_llm.url, state_dir), environ={}) == 0
    capsys.readouterr()
    assert fake_llm.chat_requests == []
    assert live_results(db) == []

    assert bridge.main(bridge_args(db, fake_llm.url, state_dir, "--list", "--all"), environ={}) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("p1"))
    assert "cancelled" in line
    check_store(db)


def test_cancel_a_completed_plan_exits_2(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("done")
    assert bridge.main(bridge_args(db, fake_llm.url, state_dir), environ={}) == 0
    capsys.readouterr()

    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir, "--cancel", "p1"), environ={})
    out, err = capsys.readouterr()

    assert rc == 2
    assert out == ""
    assert "completed" in err
    assert plan_state(db, "p1")["status"] == "completed"
    check_store(db)


# --------------------------------------------------------------------------------------
# 9. --schema
# --------------------------------------------------------------------------------------


def test_schema_prints_the_schema_file(capsys):
    rc = bridge.main(["--schema"], environ={})
    out, _ = capsys.readouterr()

    assert rc == 0
    with open(ROOT / "bridge-plan-schema.json", encoding="utf-8") as handle:
        assert json.loads(out) == json.load(handle)
