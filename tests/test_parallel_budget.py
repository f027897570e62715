"""Parallel steps and the context budget, driven through bridge.main() against the fake
LLM server (llama.cpp-like with slots, or LM Studio-like) and a real doobidoo store:
what the server says about itself (LLMClient.probe), how many steps are in flight,
that results and progress come out in step order whatever order steps finish in,
dependencies and shared files under parallelism, halt letting in-flight steps finish,
prompts cut to fit the model's context (and refused when they cannot fit), --health's
report, and the config errors of --parallel / --context-length.

Not covered: LM Studio 0.4's GET /api/v1/models (loaded_instances[].config.parallel):
the fake server does not serve that route and tests/fakes.py is not ours to change."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest

import bridge
import fakes
from fakes import (
    bridge_args, check_store, insert_plan, make_plan, read_rows, steps_by_id, stored_results, user_text,
)

# Literals copied from the contract (bridge-plan-schema.json, the README), never read at run time.
CUT_MARKER = "to fit the model's context"          # build_messages' marker on a cut block
FEEDBACK_CUT = "cut to fit the context"            # fit_feedback's marker on a cut answer
FEEDBACK_LEFT_OUT = "left out"                     # fit_feedback's note when the answer is dropped


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


# bridge --json over the store's one pending plan: (rc, its result, stderr); bridge must print a document.
run_json = functools.partial(fakes.run_json, require_output=True)


def request_messages(request: dict) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in request["json"]["messages"]]


def step_line_ids(stderr: str) -> list[int]:
    """The step id of every progress line about a step, in the order printed."""
    return [int(m.group(1)) for m in re.finditer(r"^\s+step (\d+)\b", stderr, re.MULTILINE)]


def llamacpp(fake_llm, slots: int, context: int = 4096):
    """Make the fake look like llama.cpp's llama-server (GET /props, no LM Studio routes)."""
    fake_llm.lmstudio = False
    fake_llm.slots = slots
    fake_llm.context_length = context
    return fake_llm


def independent_steps(n: int) -> list[dict]:
    return [{"id": i, "prompt": f"Task number {i}", "max_retries": 0} for i in range(1, n + 1)]


def budget_of(context: int, max_tokens: int | None = None, kind: str = "non_empty") -> int:
    """The prompt tokens that fit (ContextFit.budget): context less the answer's share."""
    return context - (max_tokens or min(bridge.VALIDATION_TYPES[kind].max_tokens, context // 4))


def file_plan(project: Path, prompt: str = "Summarise the file.", files: dict | None = None,
              **step_fields) -> dict:
    return make_plan(steps=[{"id": 1, "prompt": prompt, "max_retries": 0, **step_fields}],
                     context={"objective": "budget test", "project": str(project),
                              "files_context": files or {"big.txt": "LOAD"}})


# --------------------------------------------------------------------------------------
# A. probe
# --------------------------------------------------------------------------------------


def _probe(fake_llm) -> "bridge.ServerInfo":
    config = bridge.Config(db_paths=(), base_url=fake_llm.url, retries=0)
    with bridge.LLMClient(config) as client:
        return client.probe()


def test_probe_lmstudio_v0_reports_loaded_model_and_its_context(fake_llm):
    fake_llm.models = ["other-model", "fake-model"]
    fake_llm.context_length = 12345
    info = _probe(fake_llm)
    assert info.kind == "LM Studio"
    assert info.models == ["other-model", "fake-model"]
    assert info.loaded == "fake-model"
    assert info.context_length == 12345
    assert info.parallel is None
    assert any(r["path"] == "/api/v0/models" for r in fake_llm.requests)


def test_probe_lmstudio_with_nothing_loaded_reports_no_model_and_no_context(fake_llm):
    fake_llm.loaded = None
    info = _probe(fake_llm)
    assert (info.kind, info.loaded, info.context_length, info.parallel) == ("LM Studio", None, None, None)


def test_probe_llamacpp_reports_slots_and_n_ctx(fake_llm):
    llamacpp(fake_llm, slots=3, context=8192)
    fake_llm.models = ["first-model", "second-model"]
    info = _probe(fake_llm)
    assert info.kind == "llama.cpp"
    assert info.parallel == 3
    assert info.context_length == 8192
    assert info.loaded == "first-model"
    assert any(r["path"] == "/props" for r in fake_llm.requests)


def test_probe_plain_openai_server_reports_no_parallel_and_no_context(fake_llm):
    fake_llm.lmstudio = False
    fake_llm.slots = None
    info = _probe(fake_llm)
    assert info.kind == "OpenAI-compatible"
    assert info.loaded == "fake-model"
    assert info.parallel is None
    assert info.context_length is None


# --------------------------------------------------------------------------------------
# B. parallel steps
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, environ, expected", [
    ([], {}, 4),                                   # the server's capacity (total_slots)
    (["--parallel", "2"], {}, 2),
    ([], {"BRIDGE_PARALLEL": "3"}, 3),
    (["--parallel", "1"], {}, 1),
    (["--parallel", "2"], {"BRIDGE_PARALLEL": "3"}, 2),    # the flag wins over its variable
], ids=["server-slots", "flag-2", "env-3", "flag-1", "flag-beats-env"])
def test_steps_in_flight_follow_parallel_setting(capsys, db, fake_llm, state_dir, extra, environ, expected):
    """Independent steps run up to --parallel / BRIDGE_PARALLEL at once, else as many as
    the server serves at once (llama.cpp total_slots)."""
    llamacpp(fake_llm, slots=4, context=16384)   # 4 prompts + answers in flight share it (issue 21)
    fake_llm.latency_s = 0.1
    fake_llm.default_reply = "done"
    insert_plan(db, make_plan(steps=independent_steps(8)))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, *extra, environ=environ)

    assert rc == 0, err
    assert result["status"] == "completed"
    assert [s["status"] for s in result["steps"]] == ["succeeded"] * 8
    assert len(fake_llm.chat_requests) == 8
    assert fake_llm.max_in_flight == expected
    check_store(db)


def test_server_parallel_not_applied_to_a_model_it_has_not_loaded(capsys, db, fake_llm, state_dir):
    """The server's slots describe its loaded model only: with --model naming another,
    steps run one at a time unless --parallel says otherwise."""
    llamacpp(fake_llm, slots=4)
    fake_llm.latency_s = 0.05
    fake_llm.default_reply = "done"
    insert_plan(db, make_plan(steps=independent_steps(4)))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--model", "other")

    assert rc == 0, err
    assert result["status"] == "completed"
    assert fake_llm.max_in_flight == 1
    assert {r["json"]["model"] for r in fake_llm.chat_requests} == {"other"}
    check_store(db)


def test_results_and_progress_in_step_order_when_steps_finish_out_of_order(capsys, db, fake_llm, state_dir):
    """With 4 in flight, the first request answered slowly (0.4 s) and the rest fast, step 5
    (started when a fast one freed a slot) finishes before the slow one; still the stored
    result, the --json summary and the progress lines list steps in id order."""
    fake_llm.context_length = 16384     # 4 prompts + answers in flight share it (issue 21)
    fake_llm.enqueue("slow reply", fault="delay", delay_s=0.4)
    for i in range(4):
        fake_llm.enqueue(f"fast reply {i}", fault="delay", delay_s=0.05)
    steps = independent_steps(5)
    insert_plan(db, make_plan(steps=[steps[i] for i in (2, 4, 0, 3, 1)]))   # listed out of order

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--parallel", "4")

    assert rc == 0, err
    assert [s["id"] for s in result["steps"]] == [1, 2, 3, 4, 5]
    assert [s["status"] for s in result["steps"]] == ["succeeded"] * 5
    # the slow reply went to one of the first four, so steps did finish out of id order
    slow = [s["id"] for s in result["steps"] if s["output"] == "slow reply"]
    assert len(slow) == 1 and slow[0] < 5
    assert fake_llm.max_in_flight == 4
    ids = step_line_ids(err)
    assert set(ids) == {1, 2, 3, 4, 5}
    assert ids == sorted(ids), err                 # every line of step N before any of step N+1
    stored = stored_results(db)
    assert len(stored) == 1
    assert [s["id"] for s in stored[0]["steps"]] == [1, 2, 3, 4, 5]
    assert [s["output"] for s in stored[0]["steps"]] == [s["output"] for s in result["steps"]]
    check_store(db)


def test_diamond_dependencies_respected_under_parallelism(capsys, db, fake_llm, state_dir):
    """1 -> (2, 3) -> 4 with 4 in flight: 2 and 3 run together, only after 1; 4 runs last
    and its prompt holds the outputs of both 2 and 3."""
    fake_llm.enqueue("one-output", fault="delay", delay_s=0.05)
    fake_llm.enqueue("middle-output-A", fault="delay", delay_s=0.25)
    fake_llm.enqueue("middle-output-B", fault="delay", delay_s=0.25)
    fake_llm.enqueue("four-output")
    insert_plan(db, make_plan(steps=[
        {"id": 4, "prompt": "TASK-FOUR join", "depends_on": [2, 3]},
        {"id": 2, "prompt": "TASK-TWO left", "depends_on": [1]},
        {"id": 3, "prompt": "TASK-THREE right", "depends_on": [1]},
        {"id": 1, "prompt": "TASK-ONE root"},
    ]))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--parallel", "4")

    assert rc == 0, err
    assert result["status"] == "completed"
    by_id = steps_by_id(result)
    assert by_id[1]["output"] == "one-output"
    assert {by_id[2]["output"], by_id[3]["output"]} == {"middle-output-A", "middle-output-B"}
    assert by_id[4]["output"] == "four-output"
    requests = fake_llm.chat_requests
    assert len(requests) == 4
    assert "TASK-ONE" in user_text(requests[0])
    assert "TASK-FOUR" in user_text(requests[-1])
    assert {("TASK-TWO" in user_text(r)) + 2 * ("TASK-THREE" in user_text(r)) for r in requests[1:3]} == {1, 2}
    four = user_text(requests[-1])
    assert "middle-output-A" in four and "middle-output-B" in four
    assert "one-output" in user_text(requests[1]) and "one-output" in user_text(requests[2])
    assert fake_llm.max_in_flight >= 2            # 2 and 3 overlapped
    check_store(db)


def test_steps_writing_same_file_run_in_id_order_under_parallelism(capsys, db, fake_llm, state_dir, project):
    """Two independent steps with the same file_output never run at once: step 1 then
    step 2, and the file ends with step 2's output."""
    (project / "out.txt").write_text("original\n")
    fake_llm.enqueue("first writer", fault="delay", delay_s=0.15)
    fake_llm.enqueue("second writer", fault="delay", delay_s=0.15)
    insert_plan(db, make_plan(
        steps=[{"id": 2, "prompt": "TASK-TWO write", "file_output": "out.txt"},
               {"id": 1, "prompt": "TASK-ONE write", "file_output": "out.txt"}],
        context={"objective": "shared file", "project": str(project)}))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--parallel", "4")

    assert rc == 0, err
    assert result["status"] == "completed"
    assert fake_llm.max_in_flight == 1
    requests = fake_llm.chat_requests
    assert len(requests) == 2
    assert "TASK-ONE" in user_text(requests[0]) and "TASK-TWO" in user_text(requests[1])
    assert steps_by_id(result)[1]["output"] == "first writer"
    assert steps_by_id(result)[2]["output"] == "second writer"
    assert (project / "out.txt").read_text().rstrip("\n") == "second writer"
    check_store(db)


def test_revert_files_restores_shared_file_after_parallel_failure(capsys, db, fake_llm, state_dir, project):
    """Under parallelism, two steps write the same file and an independent step fails:
    revert_files puts the file back byte for byte."""
    original = b"original content\n\xc3\xa9\n"
    (project / "out.txt").write_bytes(original)
    for i in range(3):     # plain text for all: steps 1, 2 pass non_empty, step 3 fails contains_keys
        fake_llm.enqueue(f"plain text {i}", fault="delay", delay_s=0.05)
    insert_plan(db, make_plan(
        steps=[{"id": 1, "prompt": "write one", "file_output": "out.txt"},
               {"id": 2, "prompt": "write two", "file_output": "out.txt"},
               {"id": 3, "prompt": "give JSON", "max_retries": 0,
                "validation": {"type": "contains_keys", "keys": ["k"]}}],
        context={"objective": "shared file", "project": str(project)},
        rollback_strategy="revert_files"))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--parallel", "4")

    assert rc == 1
    assert result["status"] == "failed"
    by_id = steps_by_id(result)
    assert (by_id[1]["status"], by_id[2]["status"], by_id[3]["status"]) == ("succeeded", "succeeded", "failed")
    assert len(fake_llm.chat_requests) == 3
    assert (project / "out.txt").read_bytes() == original
    assert any(f["path"] == "out.txt" and f["action"] == "reverted" for f in result["files"]), result["files"]
    check_store(db)


# --------------------------------------------------------------------------------------
# C. halt under parallelism
# --------------------------------------------------------------------------------------


def test_halt_lets_in_flight_steps_finish_and_starts_no_new_step(capsys, db, fake_llm, state_dir):
    """A failed `halt` step stops new steps from starting, but steps already in flight
    finish and their results count.

    With 2 in flight, steps 1 and 2 start together; step 1 (halt) fails at once (its prompt
    cannot fit the server's 4096-token context, so it sends nothing: the only request is
    step 2's, and no race decides which step gets which reply); step 2, still in flight
    (0.4 s), finishes and is recorded succeeded; step 3 (independent, waiting for a free
    slot) is skipped as halted; the plan fails."""
    fake_llm.enqueue("step two done", fault="delay", delay_s=0.4)
    insert_plan(db, make_plan(steps=[
        {"id": 1, "prompt": "x" * 20_000, "on_failure": "halt", "max_retries": 0},
        {"id": 2, "prompt": "TASK-TWO slow"},
        {"id": 3, "prompt": "TASK-THREE never"},
    ]))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--parallel", "2")

    assert rc == 1
    assert result["status"] == "failed"
    by_id = steps_by_id(result)
    assert by_id[1]["status"] == "failed"
    assert by_id[2]["status"] == "succeeded"
    assert by_id[2]["output"] == "step two done"
    assert by_id[3]["status"] == "skipped"
    assert by_id[3]["attempts"] == 0
    assert "halted" in by_id[3]["error"]
    assert "step 1" in result["error"] and "halted" in result["error"]
    requests = fake_llm.chat_requests
    assert len(requests) == 1 and "TASK-TWO" in user_text(requests[0])
    stored = stored_results(db)
    assert [s["status"] for s in stored[0]["steps"]] == ["failed", "succeeded", "skipped"]
    check_store(db)


def test_halt_after_a_failed_request_lets_the_other_in_flight_step_finish(capsys, db, fake_llm, state_dir):
    """The same with a request that fails validation. Both steps 1 and 2 are `halt`
    contains_keys steps and start together; which of them gets the fast, invalid reply is
    up to the network, so the test names them by outcome: the one that failed (fast)
    halted the plan, the other was in flight, finished and is recorded succeeded, and
    step 3 (waiting for a slot) never started."""
    fake_llm.enqueue("not json at all", fault="delay", delay_s=0.05)
    fake_llm.enqueue('{"k": 1}', fault="delay", delay_s=0.4)
    halt_step = {"on_failure": "halt", "max_retries": 0, "validation": {"type": "contains_keys", "keys": ["k"]}}
    insert_plan(db, make_plan(steps=[
        {"id": 1, "prompt": "give k", **halt_step},
        {"id": 2, "prompt": "give k too", **halt_step},
        {"id": 3, "prompt": "TASK-THREE never"},
    ]))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--parallel", "2")

    assert rc == 1
    assert result["status"] == "failed"
    by_id = steps_by_id(result)
    statuses = {by_id[1]["status"], by_id[2]["status"]}
    assert statuses == {"failed", "succeeded"}
    failer = 1 if by_id[1]["status"] == "failed" else 2
    survivor = 3 - failer
    assert json.loads(by_id[survivor]["output"]) == {"k": 1}
    assert by_id[3]["status"] == "skipped" and "halted" in by_id[3]["error"]
    assert f"step {failer}" in result["error"] and "halted" in result["error"]
    assert len(fake_llm.chat_requests) == 2
    assert fake_llm.max_in_flight == 2
    check_store(db)


# --------------------------------------------------------------------------------------
# D. context budget
# --------------------------------------------------------------------------------------


def test_large_load_file_cut_to_fit_reported_context(capsys, db, fake_llm, state_dir, project):
    """LM Studio reports a 1000-token context: a 20,000-character LOAD file is cut, with a
    marker, so the prompt plus the answer's reserve fits; the step still runs."""
    fake_llm.context_length = 1000
    (project / "big.txt").write_text("L" * 19_990 + "END-OF-LOAD")
    fake_llm.enqueue("summary")
    insert_plan(db, file_plan(project))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0, err
    assert steps_by_id(result)[1]["status"] == "succeeded"
    requests = fake_llm.chat_requests
    assert len(requests) == 1
    text = user_text(requests[0])
    assert len(text) < 20_000
    assert CUT_MARKER in text
    assert "END-OF-LOAD" not in text
    assert "Summarise the file." in text            # the task is never cut
    messages = request_messages(requests[0])
    assert bridge.estimate_tokens(messages) + min(bridge.ANSWER_RESERVE_TOKENS, 1000 // 4) <= 1000
    check_store(db)


def test_largest_block_cut_first(capsys, db, fake_llm, state_dir, project):
    """With a 12,000-character LOAD file and a 3,000-character dependency output, the LOAD
    file (the largest) is cut first; once that fits, the dependency output stays whole."""
    fake_llm.context_length = 2000
    (project / "big.txt").write_text("L" * 11_989 + "END-OF-LOAD")
    dep_output = "D" * 2_990 + "END-OF-DEP"
    fake_llm.enqueue(dep_output, chunk_size=500)
    fake_llm.enqueue("final")
    insert_plan(db, make_plan(
        steps=[{"id": 1, "prompt": "produce the data", "max_retries": 0},
               {"id": 2, "prompt": "TASK-TWO use it", "depends_on": [1], "max_retries": 0}],
        context={"objective": "cut order", "project": str(project), "files_context": {"big.txt": "LOAD"}}))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0, err
    assert steps_by_id(result)[1]["output"] == dep_output
    second = user_text(fake_llm.chat_requests[1])
    assert "TASK-TWO" in second
    assert dep_output in second                     # the smaller block is whole
    assert "END-OF-LOAD" not in second              # the larger one was cut
    assert second.count(CUT_MARKER) == 1
    assert re.search(r"cut to \d+ of 11,?989|cut to \d+ of 12,?000", second), second[-2000:]
    assert bridge.estimate_tokens(request_messages(fake_llm.chat_requests[1])) <= budget_of(2000)
    check_store(db)


def test_both_blocks_cut_when_cutting_the_largest_is_not_enough(capsys, db, fake_llm, state_dir, project):
    """At 1000 tokens, both the LOAD file and the dependency output are cut, and the prompt fits."""
    fake_llm.context_length = 1000
    (project / "big.txt").write_text("L" * 11_989 + "END-OF-LOAD")
    fake_llm.enqueue("D" * 2_990 + "END-OF-DEP", chunk_size=500)
    fake_llm.enqueue("final")
    insert_plan(db, make_plan(
        steps=[{"id": 1, "prompt": "produce the data", "max_retries": 0},
               {"id": 2, "prompt": "TASK-TWO use it", "depends_on": [1], "max_retries": 0}],
        context={"objective": "cut order", "project": str(project), "files_context": {"big.txt": "LOAD"}}))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0, err
    second = fake_llm.chat_requests[1]
    text = user_text(second)
    assert "END-OF-DEP" not in text and "END-OF-LOAD" not in text
    assert text.count(CUT_MARKER) == 2
    assert "TASK-TWO" in text
    assert bridge.estimate_tokens(request_messages(second)) <= budget_of(1000)
    check_store(db)


def test_reference_files_are_only_named(capsys, db, fake_llm, state_dir, project):
    """A REFERENCE file's path is in the prompt, its text never, even with room to spare."""
    (project / "ref.txt").write_text("REFERENCE-BODY-SECRET\n" * 50)
    fake_llm.enqueue("ok")
    insert_plan(db, file_plan(project, files={"ref.txt": "REFERENCE"}))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--context-length", "100000")

    assert rc == 0, err
    text = user_text(fake_llm.chat_requests[0])
    assert "ref.txt" in text
    assert "REFERENCE-BODY-SECRET" not in text
    check_store(db)


def test_prompt_that_cannot_fit_fails_without_a_request(capsys, db, fake_llm, state_dir):
    """A step whose own prompt (8,000 characters, nothing cuttable) cannot fit 1000 tokens
    fails at once: nothing is sent, and its error has the numbers and the hint."""
    fake_llm.context_length = 1000
    insert_plan(db, make_plan(steps=[{"id": 1, "prompt": "p" * 8_000}]))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 1
    assert result["status"] == "failed"
    step = steps_by_id(result)[1]
    assert step["status"] == "failed"
    m = re.search(r"about (\d+) tokens, more than the (\d+) that fit", step["error"])
    assert m, step["error"]
    assert int(m.group(1)) > int(m.group(2)) == budget_of(1000)
    assert "--context-length" in step["error"]      # the hint
    assert fake_llm.chat_requests == []
    check_store(db)


def test_prompt_that_cannot_fit_with_skip_is_skipped_and_plan_completes(capsys, db, fake_llm, state_dir):
    fake_llm.context_length = 1000
    fake_llm.enqueue("fine")
    insert_plan(db, make_plan(steps=[{"id": 1, "prompt": "p" * 8_000, "on_failure": "skip"},
                                     {"id": 2, "prompt": "TASK-TWO small"}]))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0, err
    assert result["status"] == "completed"
    by_id = steps_by_id(result)
    assert by_id[1]["status"] == "skipped"
    assert "tokens" in by_id[1]["error"]
    assert by_id[2]["status"] == "succeeded"
    assert len(fake_llm.chat_requests) == 1 and "TASK-TWO" in user_text(fake_llm.chat_requests[0])
    check_store(db)


@pytest.mark.parametrize("extra, environ", [
    (["--context-length", "100000"], {}),
    ([], {"BRIDGE_CONTEXT_LENGTH": "100000"}),
], ids=["flag", "env"])
def test_context_length_setting_overrides_the_servers(capsys, db, fake_llm, state_dir, project, extra, environ):
    """--context-length / BRIDGE_CONTEXT_LENGTH win over the server's 1000: nothing is cut."""
    fake_llm.context_length = 1000
    (project / "big.txt").write_text("L" * 19_990 + "END-OF-LOAD")
    fake_llm.enqueue("summary")
    insert_plan(db, file_plan(project))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, *extra, environ=environ)

    assert rc == 0, err
    text = user_text(fake_llm.chat_requests[0])
    assert "L" * 19_990 + "END-OF-LOAD" in text
    assert CUT_MARKER not in text
    check_store(db)


def test_context_length_setting_below_prompt_cuts_even_when_server_reports_more(
        capsys, db, fake_llm, state_dir, project):
    """--context-length 1000 applies although the server reports 4096."""
    (project / "big.txt").write_text("L" * 19_990 + "END-OF-LOAD")
    fake_llm.enqueue("summary")
    insert_plan(db, file_plan(project))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--context-length", "1000")

    assert rc == 0, err
    req = fake_llm.chat_requests[0]
    assert CUT_MARKER in user_text(req)
    assert bridge.estimate_tokens(request_messages(req)) <= budget_of(1000)
    check_store(db)


def test_large_max_tokens_leaves_too_little_room_for_the_prompt(capsys, db, fake_llm, state_dir):
    """max_tokens 900 of a 1000-token context leaves 100 tokens: an ordinary prompt of a
    few sentences (plus the system prompt) does not fit, and nothing is sent."""
    fake_llm.context_length = 1000
    prompt = ("Write a Python function slugify(s) that lowercases s, replaces every run of "
              "characters other than a-z and 0-9 with one hyphen, and strips hyphens at both ends. "
              "Include a docstring and type hints.")
    insert_plan(db, make_plan(steps=[{"id": 1, "prompt": prompt, "max_tokens": 900, "max_retries": 0}]))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 1
    step = steps_by_id(result)[1]
    assert step["status"] == "failed"
    m = re.search(r"more than the (\d+) that fit", step["error"])
    assert m and int(m.group(1)) == 100, step["error"]
    assert fake_llm.chat_requests == []
    check_store(db)


def test_server_context_not_applied_to_a_model_it_has_not_loaded(capsys, db, fake_llm, state_dir, project):
    """The server's 1000 tokens describe its loaded model: with --model other nothing is
    cut, unless --context-length is given."""
    fake_llm.context_length = 1000
    (project / "big.txt").write_text("L" * 19_990 + "END-OF-LOAD")
    fake_llm.enqueue("summary")
    insert_plan(db, file_plan(project))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--model", "other")

    assert rc == 0, err
    text = user_text(fake_llm.chat_requests[0])
    assert "END-OF-LOAD" in text and CUT_MARKER not in text
    check_store(db)


def test_context_length_flag_applies_to_a_model_named_with_model(capsys, db, fake_llm, state_dir, project):
    fake_llm.context_length = 100_000
    (project / "big.txt").write_text("L" * 19_990 + "END-OF-LOAD")
    fake_llm.enqueue("summary")
    insert_plan(db, file_plan(project))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--model", "other", "--context-length", "1000")

    assert rc == 0, err
    req = fake_llm.chat_requests[0]
    assert req["json"]["model"] == "other"
    assert CUT_MARKER in user_text(req)
    assert bridge.estimate_tokens(request_messages(req)) <= budget_of(1000)
    check_store(db)


def test_retry_feedback_cut_to_fit_the_context(capsys, db, fake_llm, state_dir):
    """A 20,000-character invalid answer is fed back on the retry cut (or left out), so the
    second request still fits the 2000-token context; the error itself is kept."""
    fake_llm.context_length = 2000
    fake_llm.enqueue("n" * 20_000, chunk_size=2000)
    fake_llm.enqueue('{"k": 1}')
    insert_plan(db, make_plan(steps=[{"id": 1, "prompt": "Give k", "max_retries": 1,
                                      "validation": {"type": "contains_keys", "keys": ["k"]}}]))

    rc, result, err = run_json(capsys, db, fake_llm, state_dir)

    assert rc == 0, err
    step = steps_by_id(result)[1]
    assert (step["status"], step["attempts"]) == ("succeeded", 2)
    requests = fake_llm.chat_requests
    assert len(requests) == 2
    second = request_messages(requests[1])
    assert bridge.estimate_tokens(second) <= budget_of(2000, kind="contains_keys")
    joined = "\n".join(m["content"] for m in second)
    assert FEEDBACK_CUT in joined or FEEDBACK_LEFT_OUT in joined
    assert "rejected" in joined                      # the validation error is kept
    check_store(db)


def test_fit_feedback_keeps_error_and_fits_budget():
    """fit_feedback, called directly: the answer is cut first, then left out; the note stays."""
    messages = [{"role": "system", "content": "s" * 350}, {"role": "user", "content": "u" * 700}]
    note = {"role": "user", "content": "Your answer was rejected: not JSON."}
    small = [{"role": "assistant", "content": "a" * 100}, note]
    assert bridge.fit_feedback(messages, small, 10_000) == small
    assert bridge.fit_feedback(messages, small, None) == small
    big = [{"role": "assistant", "content": "a" * 20_000}, note]
    cut = bridge.fit_feedback(messages, big, 1500)
    assert len(cut) == 2 and FEEDBACK_CUT in cut[0]["content"] and cut[1] == note
    assert bridge.estimate_tokens(messages + cut) <= 1500
    dropped = bridge.fit_feedback(messages, big, 400)
    assert len(dropped) == 1 and dropped[0]["role"] == "user"
    assert note["content"] in dropped[0]["content"] and FEEDBACK_LEFT_OUT in dropped[0]["content"]


def test_build_messages_raises_prompt_too_large_with_numbers():
    """build_messages, called directly: an uncuttable prompt over budget raises PromptTooLarge."""
    plan = bridge.check_plan(make_plan(steps=[{"id": 1, "prompt": "p" * 8_000}]))
    with pytest.raises(bridge.PromptTooLarge) as info:
        bridge.build_messages(plan, plan.steps[1], {}, 750)
    assert "750" in str(info.value) and "tokens" in str(info.value)
    assert info.value.exit_code == 1
    messages = bridge.build_messages(plan, plan.steps[1], {}, None)
    assert "p" * 8_000 in messages[1]["content"]


# --------------------------------------------------------------------------------------
# E. estimate_tokens
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "",
    "Hello, world!",
    "def slugify(s: str) -> str:\n    return re.sub(r'[^a-z0-9]+', '-', s.lower()).strip('-')\n" * 20,
    "The quick brown fox jumps over the lazy dog. " * 200,
    '{"cases": [["Hello World", "hello-world"], ["  A  b ", "a-b"]]}' * 50,
    "x" * 10_001,
])
def test_estimate_tokens_errs_large(text):
    """The estimate is never below one token per 4 characters (real tokenizers: 3.5-4.5)."""
    assert bridge.estimate_tokens([{"role": "user", "content": text}]) >= len(text) / 4
    two = [{"role": "system", "content": text}, {"role": "user", "content": text}]
    assert bridge.estimate_tokens(two) >= 2 * len(text) / 4


def test_the_estimate_is_pinned():
    """One token per 3.5 characters (CHARS_PER_TOKEN), plus 5 a message and 3 for the
    reply: 700 characters are 200 tokens, 35 are 10; any other divisor changes this."""
    messages = [{"role": "system", "content": "x" * 700}, {"role": "user", "content": "y" * 35}]
    assert bridge.estimate_tokens(messages) == 200 + 5 + 10 + 5 + 3


# --------------------------------------------------------------------------------------
# F. --health
# --------------------------------------------------------------------------------------


def test_health_text_shows_kind_context_and_parallel(capsys, db, fake_llm, state_dir):
    llamacpp(fake_llm, slots=3, context=8192)
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir) + ["--health"], environ={})
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    server = next(line for line in out.splitlines() if line.startswith("server"))
    assert "ok" in server
    assert "llama.cpp" in server
    assert "context 8192" in server
    assert "parallel 3" in server
    assert fake_llm.chat_requests == []


def test_health_json_shows_kind_context_and_parallel(capsys, db, fake_llm, state_dir):
    llamacpp(fake_llm, slots=3, context=8192)
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir) + ["--health", "--json"], environ={})
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    report = json.loads(out)
    assert report["ok"] is True
    server = report["server"]
    assert server["reachable"] is True
    assert server["kind"] == "llama.cpp"
    assert server["context_length"] == 8192
    assert server["parallel"] == 3
    assert server["loaded"] == "fake-model"


def test_health_json_lmstudio_reports_context_and_no_parallel(capsys, db, fake_llm, state_dir):
    fake_llm.context_length = 32768
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir) + ["--health", "--json"], environ={})
    out, err = capsys.readouterr()
    assert rc == 0, out + err
    server = json.loads(out)["server"]
    assert (server["kind"], server["context_length"], server["parallel"]) == ("LM Studio", 32768, None)


# --------------------------------------------------------------------------------------
# G. config errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, environ, names", [
    (["--parallel", "0"], {}, "parallel"),
    (["--parallel", "x"], {}, "parallel"),
    (["--parallel", "1.5"], {}, "parallel"),
    ([], {"BRIDGE_PARALLEL": "0"}, "parallel"),
    (["--context-length", "10"], {}, "context length"),
    (["--context-length", "lots"], {}, "context length"),
    ([], {"BRIDGE_CONTEXT_LENGTH": "10"}, "context length"),
], ids=["parallel-0", "parallel-x", "parallel-float", "env-parallel-0", "context-10", "context-word",
        "env-context-10"])
def test_bad_parallel_or_context_length_is_a_config_error(capsys, db, fake_llm, state_dir, extra, environ, names):
    insert_plan(db, make_plan())
    before = read_rows(db)
    rc = bridge.main(bridge_args(db, fake_llm.url, state_dir) + extra, environ=environ)
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    errors = [line for line in err.splitlines() if line.startswith("bridge: error:")]
    assert len(errors) == 1, err
    assert names in errors[0]
    assert "Traceback" not in err
    assert fake_llm.requests == []                  # nothing was asked of the server
    assert read_rows(db) == before                  # nothing was claimed
    check_store(db)
