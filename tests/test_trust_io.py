"""Issue 11, points 7-9: what a hostile plan, model, server or store row can do to the
terminal, to bridge's process, and to its memory and time.

| row | attack | what bridge does now |
|---|---|---|
| terminal-run | ESC/OSC/CSI, BEL, CR, BS, C1 CSI, bidi override, "\\n" in a plan's objective, a step title, a file_output and a model output; run with and without -v | every progress and -v line printable(): `\\x1b]0;…`, `\\r`, `\\u202e`; single-line fields keep one line (`\\n` shown) |
| terminal-list | the same plan, `--list --all` | one line per plan, escapes visible |
| terminal-show | `--show` of that run | one line per field, the output keeps its lines but loses its controls |
| terminal-dry-run | `--dry-run` | the same |
| terminal-diff | `--diff` and `--undo` of that run | the file's name on one line, escaped; the diff keeps its lines, without controls |
| terminal-id | an invalid plan whose id holds those characters | a run, `--list`, `--show ID`, `--dry-run --plan ID` and `--validate` print it escaped |
| terminal-live | the live status line on a terminal | only bridge's own `\r\x1b[2K` redraw is raw |
| terminal-error | the model server's error body holds control sequences | `bridge: error: … \\x1b]0;…` on one line |
| terminal-json | `--json`, `--events` | exact JSON (the same values), no raw ESC, C1 or bidi character |
| surrogate | an objective holding a lone surrogate (`"\\ud800"` in the stored JSON) | `--list` prints `\\ud800`, exit 0 (was: UnicodeEncodeError, exit 70) |
| long-name | a 300-byte file_output name | a plan problem "has a name of 300 bytes; names here hold at most 234 bytes" in --validate, --submit and a run; later plans run |
| long-path | a file_output longer than PATH_MAX | a plan problem "… bytes long …; paths here hold at most N bytes" |
| surrogate-name | a file_output holding a lone surrogate | a plan problem "holds a lone surrogate" (was: valid, then UnicodeEncodeError, exit 70) |
| long-project | a context.project with a 300-byte name | "folder … does not exist" |
| symlink-loop | file_output through a symlink loop | a plan problem "cannot be resolved" (was: RuntimeError, exit 70) |
| deep-store | a plan memory nested 3,000 levels | `--list --all` shows it invalid; a run records it failed ("nests deeper than 64 levels"), later plans run |
| deep-file | the same as a plan file | `--validate` and `--submit` exit 1 with that problem |
| deep-schema | a step's json_schema nested 300 levels (json parses it, check_schema would recurse to death) | "nests 305 levels deep; bridge reads at most 64" |
| deep-result | a forged result memory nested 3,000 levels | `--show` ignores it |
| huge-timeout | timeout_s 1e12 in a step or the defaults (was: OverflowError in the socket, exit 70, plan stale) | a plan problem "greater than the maximum of 86400" (the schema's new maximum) |
| nan-surrogate | `NaN` in a plan (passes the schema's 0..2 for temperature), `"\\ud800"` in a prompt (was: ValueError / UnicodeEncodeError in httpx, exit 70) | plan problems "holds NaN, which is not JSON" and "holds a lone surrogate" |
| server-surrogate | the model server streams `"\\ud800"` in content or an error (was: UnicodeEncodeError, exit 70) | U+FFFD, as for undecodable bytes: the file, the result, the next request carry it |
| schema-refs | a step schema `{"$ref": "0"}` (resolves nowhere; was: exit 70 at the check) or `{"$ref": "#"}`-like loop at its top | plan problems "cannot be applied (…Unresolvable…)" and "refers to itself without end" |
| hostile-schema | json_schema validations with huge numbers, 30-level nesting, a $ref loop or a dangling $ref below the top | the plan runs; those steps fail ("nests too deeply to check", "the step's json_schema cannot be applied"); no crash |
| bad-metadata | a plan row whose metadata is `[1, 2]` or nested 3,000 levels (was: that row stopped the run, exit 2; deep: exit 70 in --list) | that plan is skipped with one error line and its hint; the others run; exit 2 |
| store-locked-finish | the store locked when the result is stored | one error line (and its hint) naming --resume/--rerun; the plan in_progress (stale once bridge is gone), the modified file's backup kept; the plans after it still run; exit 2; --rerun puts the file back and completes |
| interrupt-unstored | Ctrl-C, then the store locked at that plan's finish | the error line, then exit 130; the plans after it are not started |
| endless-body | a non-streamed chat body that never ends (50 MB offered) | cut after --max-output-bytes + 64 KiB: "passed N bytes"; the fake sent a few MB at most |
| endless-error | an HTTP 500 error body that never ends | 64 KiB read for the message |
| endless-models | /v1/models that never ends | --health: server FAIL "passed N bytes", exit 2 |
| low-limit | `--max-output-bytes 100` with a 140 KB model list | the probe still reads it (its bound is at least the default); replies are cut at 100 |
| endless-sse | an SSE stream of keep-alive comments that never ends | cut at the step's timeout_s ("passed its deadline of 0.5 s (the step's timeout_s)"), not retried; with no timeout_s, at DEFAULT_REQUEST_DEADLINE_S |
| claude-endless-line | `claude -p` writes one 100 MB line | read in parts of --max-output-bytes + 64 KiB (peak < 8 MB traced), none of them JSON |
| printable-property | any text (hypothesis), with bidi, separators and lone surrogates mixed in | printable(): no unsafe character left, newlines only where multiline keeps them, always UTF-8-writable; json_text(): the same value back |
| anthropic-endless | the Anthropic executor, endless SSE and body | the same deadline and byte bound |
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

import bridge
from fakes import (
    ENDLESS_CAP_BYTES, FakeAnthropic, check_store, insert_memory, insert_plan, make_plan, plan_state,
    run_bridge, run_json, stored_results, write_fake_claude,
)

# What a terminal would act on, never to reach stdout or stderr raw.
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x1b[32mall good\x1b[0m\r\x08\x9b31m\u202eevil\u2066"
RAW_CONTROLS = ("\x1b", "\x07", "\r", "\x08", "\x9b", "\u202e", "\u2066")
FORGED = "\n  step 9: succeeded"


def assert_no_controls(text: str) -> None:
    found = sorted({repr(c) for c in RAW_CONTROLS if c in text})
    assert not found, f"raw {found} reached the terminal stream: {text!r}"


def hostile_plan(project: Path, plan_id: str = "ctl") -> dict:
    return make_plan(plan_id, [{"id": 1, "title": "title " + HOSTILE + FORGED, "prompt": "say it",
                                "file_output": "out" + FORGED + ".txt", "max_retries": 0}],
                     context={"objective": "objective " + HOSTILE + FORGED, "project": str(project)})


# --------------------------------------------------------------------------------------
# 7. terminals get text, not control
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("verbose", [False, True])
def test_run_progress_and_verbose_lines_escape_controls(capsys, db, project, fake_llm, state_dir, verbose):
    insert_plan(db, hostile_plan(project))
    fake_llm.enqueue("output " + HOSTILE + "\nsecond line")

    rc, _, err = run_bridge(capsys, db, fake_llm, state_dir, *(["-v"] if verbose else []))

    assert rc == 0, err
    assert_no_controls(err)
    assert "\\x1b]0;pwned\\x07" in err and "\\u202e" in err and "\\r" in err
    assert (project / ("out" + FORGED + ".txt")).is_file()      # the name itself is the plan's business
    if not verbose:         # every progress line is one line: the forged one never starts a line
        assert not any(line.startswith("  step 9") for line in err.splitlines()), err
        plan_line = next(line for line in err.splitlines() if line.startswith("plan ctl: objective"))
        assert "\\n  step 9: succeeded · 1 step(s)" in plan_line
    else:                   # -v shows the output with its own lines, without its controls
        assert "second line" in err.splitlines()


def test_list_show_and_dry_run_escape_controls(capsys, db, project, fake_llm, state_dir):
    insert_plan(db, hostile_plan(project))
    fake_llm.enqueue("output " + HOSTILE + "\nsecond line")
    rc, dry, err = run_bridge(capsys, db, fake_llm, state_dir, "--dry-run")
    assert rc == 0, err
    assert_no_controls(dry + err)
    assert any(line.startswith("=== step 1 (title \\x1b]0;pwned") for line in dry.splitlines())

    rc, listed, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--all")
    assert rc == 0, err
    assert_no_controls(listed)
    assert len(listed.splitlines()) == 1 and "objective \\x1b]0;pwned\\x07" in listed

    assert run_bridge(capsys, db, fake_llm, state_dir)[0] == 0
    rc, shown, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "ctl")
    assert rc == 0, err
    assert_no_controls(shown)
    lines = shown.splitlines()
    assert not any(line.lstrip().startswith("step 9") for line in lines), shown
    assert "      file: out\\n  step 9: succeeded.txt" in lines
    assert any(line.strip() == "second line" for line in lines)     # the output keeps its lines

    rc, diff, err = run_bridge(capsys, db, fake_llm, state_dir, "--diff", "ctl")
    assert rc == 0, err
    assert_no_controls(diff)
    assert "=== out\\n  step 9: succeeded.txt: created · as the run left it" in diff.splitlines()
    assert "+second line" in diff.splitlines()
    rc, undone, err = run_bridge(capsys, db, fake_llm, state_dir, "--undo", "ctl")
    assert rc == 0, err
    assert_no_controls(undone)
    assert "  out\\n  step 9: succeeded.txt: removed (the run created it)" in undone.splitlines()


def test_a_hostile_id_of_an_invalid_plan_is_printed_escaped(capsys, db, fake_llm, state_dir, tmp_path):
    plan_id = "id" + HOSTILE + FORGED          # the schema refuses it, so the plan is recorded invalid
    insert_plan(db, make_plan(plan_id))

    rc, _, err = run_bridge(capsys, db, fake_llm, state_dir, "--model", "fake-model")
    assert rc == 1, err
    rc, listed, _ = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--all")
    rc, shown, _ = run_bridge(capsys, db, fake_llm, state_dir, "--show", plan_id)
    rc, dry, _ = run_bridge(capsys, db, fake_llm, state_dir, "--dry-run", "--plan", plan_id)

    for text in (err, listed, shown, dry):
        assert_no_controls(text)
        assert "id\\x1b]0;pwned" in text
        assert not any(line.startswith("  step 9") for line in text.splitlines()), text
    assert len(listed.splitlines()) == 1

    path = tmp_path / "plan.json"
    path.write_text(json.dumps(make_plan(plan_id, [{"id": 1, "prompt": "p", "title": 7}])), encoding="utf-8")
    rc, validated, _ = run_bridge(capsys, db, fake_llm, state_dir, "--validate", str(path))
    assert rc == 1
    assert_no_controls(validated)
    assert len(validated.splitlines()) == 4         # the header and one line per problem


def test_error_line_from_a_hostile_server_is_one_escaped_line(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue(status=400, error_body={"error": {"message": "bad " + HOSTILE + FORGED}})

    rc, _, err = run_bridge(capsys, db, fake_llm, state_dir, "--model", "fake-model", "--retries", "0")

    assert rc == 1, err
    assert_no_controls(err)
    failed = [line for line in err.splitlines() if "answered HTTP 400" in line]
    assert failed and "\\x1b]0;pwned" in failed[0]


def test_main_error_printer_escapes_the_message_and_hint(capsys, monkeypatch):
    def hostile_list(config, show_all):
        raise bridge.StoreError("cannot read " + HOSTILE + FORGED, "hint " + HOSTILE)
    monkeypatch.setattr(bridge, "cmd_list", hostile_list)

    rc = bridge.main(["--list"], environ={})

    err = capsys.readouterr().err
    assert rc == 2
    assert_no_controls(err)
    assert err.splitlines()[0].startswith("bridge: error: cannot read \\x1b]0;pwned")
    assert err.splitlines()[1].startswith("hint: hint \\x1b]0;pwned") and len(err.splitlines()) == 2


def test_json_and_events_stay_exact_json_without_raw_controls(capsys, db, project, fake_llm, state_dir):
    plan = hostile_plan(project)
    insert_plan(db, plan)
    fake_llm.enqueue("output " + HOSTILE)

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--events", "--deltas")
    assert rc == 0, err
    assert_no_controls(out)
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["objective"] == plan["context"]["objective"]
    assert "".join(e["text"] for e in events if e["event"] == "delta") == "output " + HOSTILE

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--all", "--json")
    assert rc == 0, err
    assert_no_controls(out)
    assert json.loads(out)["plans"][0]["objective"] == plan["context"]["objective"]
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "ctl", "--json")
    assert_no_controls(out)
    assert json.loads(out)["steps"][0]["title"] == plan["steps"][0]["title"]


def test_lone_surrogate_in_an_objective_is_printed_escaped(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("sur", context={"objective": "half \ud800 a pair"}))     # json.dumps writes \ud800

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list")
    assert rc == 0, err
    assert "half \\ud800 a pair" in out
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--json")
    assert rc == 0, err
    assert json.loads(out)["plans"][0]["objective"] == "half \ud800 a pair"


def test_the_live_status_line_escapes_all_but_its_own_redraw():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True
    stream = Terminal()
    progress = bridge.Progress(1, stream)

    progress.status("title " + HOSTILE, force=True)
    progress.info("plan " + HOSTILE)

    text = stream.getvalue()
    assert text.startswith("\r\x1b[2K")
    assert_no_controls(text.replace("\r\x1b[2K", ""))


UNSAFE = {*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029,
          *range(0x202A, 0x202F), *range(0x2066, 0x206A), *range(0xD800, 0xE000)}


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2100) | st.sampled_from(
    ["\u202e", "\u2066", "\ud800", "\udfff", "\u2028"]), max_size=60))
def test_printable_leaves_nothing_a_terminal_acts_on(text):
    for multiline in (False, True):
        shown = bridge.printable(text, multiline)
        assert not {ord(c) for c in shown} & UNSAFE
        assert shown.count("\n") == (text.count("\n") if multiline else 0)
        shown.encode("utf-8")                        # always writable
    assert json.loads(bridge.json_text({"t": text})) == {"t": text}
    assert not {ord(c) for c in bridge.json_text({"t": text})} & UNSAFE


def test_printable_escapes_each_kind_and_keeps_text():
    assert bridge.printable("a\x1b[31mb\x07\x08\x7f\x9b\u202a\u2069\u2028") == \
        "a\\x1b[31mb\\x07\\x08\\x7f\\x9b\\u202a\\u2069\\u2028"
    assert bridge.printable("one\ntwo\r\tend") == "one\\ntwo\\r\tend"
    assert bridge.printable("one\ntwo\r", multiline=True) == "one\ntwo\\r"
    assert bridge.printable("héllo wörld · 日本") == "héllo wörld · 日本"
    assert json.loads(bridge.json_text({"k": HOSTILE + "é"})) == {"k": HOSTILE + "é"}


# --------------------------------------------------------------------------------------
# 8. bad input is a recorded failure, never a crash
# --------------------------------------------------------------------------------------

def run_with_a_good_plan(capsys, db, fake_llm, state_dir, *extra):
    """Insert plan "good" after what the test inserted, run everything; return (rc, err,
    {plan id: stored result})."""
    insert_plan(db, make_plan("good", [{"id": 1, "prompt": "good task"}]))
    fake_llm.enqueue("good reply")
    rc, _, err = run_bridge(capsys, db, fake_llm, state_dir, "--model", "fake-model", *extra)
    return rc, err, {r["plan_id"]: r for r in stored_results(db)}


def long_name_plan(project: Path, file_output: str) -> dict:
    return make_plan("long", [{"id": 1, "prompt": "p", "file_output": file_output}],
                     context={"objective": "o", "project": str(project)})


@pytest.mark.parametrize("file_output, expected", [
    ("a" * 300, "has a name of 300 bytes; names here hold at most 234 bytes"),
    ("d/" * 2100 + "f.txt", "bytes long in"),
    ("é" * 150, "has a name of 300 bytes"),
    ("half\ud800.txt", "holds a lone surrogate"),          # was: valid, then UnicodeEncodeError at the write
])
def test_names_the_filesystem_cannot_hold_are_plan_problems(capsys, db, project, fake_llm, state_dir, tmp_path,
                                                             file_output, expected):
    plan = long_name_plan(project, file_output)
    path = tmp_path / "long.json"
    path.write_text(json.dumps(plan), encoding="utf-8")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--validate", str(path))
    assert rc == 1 and expected in out, out + err
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--submit", str(path))
    assert rc == 1 and expected in err, out + err
    assert len(err.splitlines()) == 1

    insert_plan(db, plan)
    rc, err, results = run_with_a_good_plan(capsys, db, fake_llm, state_dir)
    assert rc == 1, err
    assert results["good"]["status"] == "completed"
    assert results["long"]["status"] == "failed"
    assert any(expected in p for p in results["long"]["problems"])
    assert len(fake_llm.chat_requests) == 1 and os.listdir(project) == []


def test_a_name_that_just_fits_is_written(capsys, db, project, fake_llm, state_dir):
    insert_plan(db, long_name_plan(project, "b" * 250 + "/" + "a" * 234))
    fake_llm.enqueue("fits")
    rc, _, err = run_bridge(capsys, db, fake_llm, state_dir, "--model", "fake-model")
    assert rc == 0, err
    assert (project / ("b" * 250) / ("a" * 234)).read_text() == "fits"


def test_project_and_loops_that_cannot_be_looked_up_are_plan_problems(capsys, db, project, fake_llm, state_dir):
    os.symlink("loop", project / "loop")
    insert_plan(db, make_plan("loopy", [{"id": 1, "prompt": "p", "file_output": "loop/x.txt"}],
                              context={"objective": "o", "project": str(project)}))
    insert_plan(db, make_plan("far", [{"id": 1, "prompt": "p", "file_output": "x"}],
                              context={"objective": "o", "project": str(project / ("p" * 300))}))

    rc, err, results = run_with_a_good_plan(capsys, db, fake_llm, state_dir)

    assert rc == 1, err
    assert results["good"]["status"] == "completed"
    assert any("cannot be resolved" in p for p in results["loopy"]["problems"])
    assert any("does not exist" in p for p in results["far"]["problems"])


def deep_json(levels: int) -> str:
    return '{"$schema": "bridge-plan-v1", "id": "deep", "status": "pending", "x": ' + \
        "[" * levels + "]" * levels + "}"


def test_a_plan_nested_3000_levels_is_listed_invalid_and_recorded_failed(capsys, db, fake_llm, state_dir):
    insert_memory(db, deep_json(3000), tags="bridge-plan", memory_type="planning")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--all")
    assert rc == 0, err
    assert "invalid" in out
    rc, err, results = run_with_a_good_plan(capsys, db, fake_llm, state_dir)
    assert rc == 1, err
    assert results["good"]["status"] == "completed"
    deep = next(r for plan_id, r in results.items() if plan_id != "good")
    assert deep["status"] == "failed"
    assert deep["problems"] == ["$: the plan nests deeper than 64 levels (more than json can parse)"]
    check_store(db)
    assert run_bridge(capsys, db, fake_llm, state_dir, "--list", "--all")[0] == 0


def test_a_step_schema_nested_300_levels_is_refused_before_jsonschema_sees_it(capsys, db, fake_llm, state_dir):
    schema: dict = {}
    for _ in range(150):            # json parses it; jsonschema's check_schema would recurse to death
        schema = {"type": "object", "properties": {"n": schema}}
    insert_plan(db, make_plan("deep", [{"id": 1, "prompt": "p", "validation": {"type": "json_schema",
                                                                                "schema": schema}}]))
    rc, err, results = run_with_a_good_plan(capsys, db, fake_llm, state_dir)
    assert rc == 1, err
    deep = next(r for plan_id, r in results.items() if plan_id != "good")
    assert deep["problems"] == ["$: the plan nests 305 levels deep; bridge reads at most 64"]
    assert results["good"]["status"] == "completed"


def test_a_deep_plan_file_is_a_problem_for_validate_and_submit(capsys, db, fake_llm, state_dir, tmp_path):
    path = tmp_path / "deep.json"
    path.write_text(deep_json(3000), encoding="utf-8")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--validate", str(path))
    assert rc == 1 and "nests deeper than 64 levels" in out, out + err
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--submit", str(path))
    assert rc == 1 and "nests deeper than 64 levels" in err and len(err.splitlines()) == 1, err


def test_a_forged_deep_result_memory_is_ignored_by_show(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1"))
    insert_memory(db, '{"type": "bridge_result", "plan_id": "p1", "x": ' + "[" * 3000 + "]" * 3000 + "}",
                  tags="bridge-result,plan:p1", memory_type="tool_outcome")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--show", "p1")
    assert rc == 2 and "has no stored result yet" in err, out + err


def test_a_timeout_no_clock_can_hold_is_a_plan_problem(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("slow", [{"id": 1, "prompt": "p", "timeout_s": 1e12}],
                              defaults={"timeout_s": 1e300}))

    rc, err, results = run_with_a_good_plan(capsys, db, fake_llm, state_dir)

    assert rc == 1, err
    assert results["good"]["status"] == "completed"
    problems = results["slow"]["problems"]
    assert any(p.startswith("$.steps[0].timeout_s:") and "maximum of 86400" in p for p in problems), problems
    assert any(p.startswith("$.defaults.timeout_s:") for p in problems), problems


def test_nan_and_lone_surrogates_in_a_plan_are_plan_problems(capsys, db, fake_llm, state_dir):
    # NaN passes every minimum and maximum of a schema; httpx refuses to send it (allow_nan=False)
    insert_memory(db, json.dumps(make_plan("nan", [{"id": 1, "prompt": "p", "temperature": float("nan")}])),
                  tags="bridge-plan", memory_type="planning")
    # "\ud800" in the stored JSON: no request body (UTF-8) can carry it
    insert_plan(db, make_plan("sur", [{"id": 1, "prompt": "half \ud800 a pair"}]))

    rc, err, results = run_with_a_good_plan(capsys, db, fake_llm, state_dir)

    assert rc == 1, err
    assert results["good"]["status"] == "completed"
    nan = next(r for plan_id, r in results.items() if plan_id.startswith("row-"))
    assert nan["problems"] == ["$: the plan holds NaN, which is not JSON (RFC 8259)"]
    assert results["sur"]["problems"] == ["$: the plan holds a lone surrogate ('\\ud800'), which is not text; "
                                          "write the character whole"]
    assert len(fake_llm.chat_requests) == 1


def test_a_lone_surrogate_from_the_server_becomes_a_replacement_character(capsys, db, project, fake_llm,
                                                                         state_dir):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "p", "file_output": "out.txt"},
                                     {"id": 2, "prompt": "p", "depends_on": [1], "max_retries": 0}],
                              context={"objective": "o", "project": str(project)}))
    fake_llm.enqueue("half \ud800 a pair")          # the fake's JSON carries it as "\ud800"
    fake_llm.enqueue(status=400, error_body={"error": {"message": "bad \udfff"}})

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--model", "fake-model", "--retries", "0")

    assert rc == 1, err
    assert (project / "out.txt").read_text(encoding="utf-8") == "half \ufffd a pair"
    assert "bad \ufffd" in result["steps"][1]["error"]
    assert stored_results(db)[0]["steps"][0]["output"] == "half \ufffd a pair"
    assert "\ufffd" in fake_llm.chat_requests[1]["body"] or "\\ufffd" in fake_llm.chat_requests[1]["body"]


def test_metadata_bridge_will_not_overwrite_is_left_alone_and_its_plan_runs(capsys, db, fake_llm, state_dir):
    rows = {insert_plan(db, make_plan("listy")): "[1, 2]",
            insert_plan(db, make_plan("deepmeta")): '{"a": ' + "[" * 3000 + "]" * 3000 + "}"}
    with sqlite3.connect(db) as conn:       # metadata as another writer left it
        for row_id, metadata in rows.items():
            conn.execute("UPDATE memories SET metadata = ? WHERE id = ?", (metadata, row_id))
    conn.close()
    assert run_bridge(capsys, db, fake_llm, state_dir, "--list")[0] == 0
    fake_llm.enqueue("listy reply").enqueue("deepmeta reply")

    rc, err, results = run_with_a_good_plan(capsys, db, fake_llm, state_dir)

    # a plan's state lives in bridge_plan_state, so odd metadata no longer stops its plan:
    # all three run, and the metadata is left exactly as the other writer left it
    assert rc == 0, err
    assert sorted(results) == ["deepmeta", "good", "listy"]
    assert all(r["status"] == "completed" for r in results.values())
    with sqlite3.connect(db) as conn:
        assert {row_id: conn.execute("SELECT metadata FROM memories WHERE id = ?", (row_id,)).fetchone()[0]
                for row_id in rows} == rows         # neither overwritten
    conn.close()


def nested_schema(levels: int) -> dict:
    schema: dict = {"type": "number", "multipleOf": 1e-308, "maximum": 1e308}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"n": schema}, "minProperties": 1e308}
    return schema


def test_schemas_that_cannot_be_applied_are_plan_problems(capsys, db, fake_llm, state_dir):
    loop = {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}
    insert_plan(db, make_plan("refs", [
        {"id": 1, "prompt": "p", "validation": {"type": "json_schema", "schema": {"$ref": "0"}}},
        {"id": 2, "prompt": "p", "validation": {"type": "json_schema", "schema": loop}}]))

    rc, err, results = run_with_a_good_plan(capsys, db, fake_llm, state_dir)

    assert rc == 1, err
    assert results["good"]["status"] == "completed"
    problems = results["refs"]["problems"]
    assert any(p.startswith("$.steps[0].validation.schema: cannot be applied (") and "Unresolvable" in p
               for p in problems), problems
    assert "$.steps[1].validation.schema: refers to itself without end" in problems


def test_hostile_json_schema_validations_never_crash_a_run(capsys, db, fake_llm, state_dir):
    # reached only by an object with "x": the plan check's probes cannot see them
    loop = {"properties": {"x": {"$ref": "#/properties/x"}}}
    dangling = {"properties": {"x": {"$ref": "nowhere.json"}}}
    insert_plan(db, make_plan("schemas", [
        {"id": 1, "prompt": "p", "max_retries": 0, "validation": {"type": "json_schema", "schema": nested_schema(28)}},
        {"id": 2, "prompt": "p", "max_retries": 0, "validation": {"type": "json_schema", "schema": loop}},
        {"id": 3, "prompt": "p", "max_retries": 0, "validation": {"type": "json", }},
        {"id": 4, "prompt": "p", "max_retries": 0, "validation": {"type": "json_schema", "schema": dangling}}]))
    value: object = 1e308
    for _ in range(28):
        value = {"n": value}
    fake_llm.enqueue(json.dumps(value))
    fake_llm.enqueue('{"x": 1}')
    fake_llm.enqueue("[" * 5000 + "]" * 5000)
    fake_llm.enqueue('{"x": 1}')

    rc, err, results = run_with_a_good_plan(capsys, db, fake_llm, state_dir, "--no-structured")

    assert rc == 1, err
    steps = {s["id"]: s for s in results["schemas"]["steps"]}
    assert steps[1]["status"] == "failed" and "minProperties" not in (steps[1]["error"] or "x")
    assert "nests too deeply to check" in steps[2]["error"]
    assert "nests too deeply to check" in steps[3]["error"]
    assert "the step's json_schema cannot be applied (" in steps[4]["error"]      # was: exit 70
    assert results["good"]["status"] == "completed"


def test_store_locked_at_the_finish_leaves_a_stale_plan_with_its_backups(
        capsys, db, project, fake_llm, state_dir, monkeypatch):
    (project / "a.txt").write_text("original\n", encoding="utf-8")
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "p", "file_output": "a.txt"}],
                              context={"objective": "o", "project": str(project)}))
    insert_plan(db, make_plan("later"))
    fake_llm.enqueue("changed")
    fake_llm.enqueue("later reply")
    monkeypatch.setattr(bridge, "STORE_BUSY_TIMEOUT_S", 0.01)
    monkeypatch.setattr(bridge, "STORE_WRITE_TRIES", 2)
    real_finish = bridge.Store.finish
    holder = sqlite3.connect(db, isolation_level=None)

    def finish_while_locked(self, record, result, *more):    # more: the memory API and its warning
        if record.plan_id != "p1":
            return real_finish(self, record, result, *more)
        holder.execute("BEGIN IMMEDIATE")          # another writer holds the store, for p1's finish
        try:
            return real_finish(self, record, result, *more)
        finally:
            holder.execute("ROLLBACK")
    monkeypatch.setattr(bridge.Store, "finish", finish_while_locked)

    # --keep-runs 0: no backups are kept for --undo, but they must outlive the failed finish
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--model", "fake-model", "--events",
                              "--keep-runs", "0")

    assert rc == 2, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["event"], e["plan_id"]) for e in events if e["event"] in ("error", "plan_end")] == \
        [("error", "p1"), ("plan_end", "later")]
    lines = err.splitlines()
    error = next(n for n, line in enumerate(lines) if line.startswith("bridge: error: plan p1: its result"))
    assert "stayed locked" in lines[error] and "the plan stays in progress" in lines[error]
    assert lines[error + 1].startswith("hint: when the store is free: bridge --plan p1 --resume")
    assert [r["plan_id"] for r in stored_results(db)] == ["later"]        # the plans after it still run
    assert stored_results(db)[0]["status"] == "completed"
    state = plan_state(db, "p1")
    assert state["status"] == "in_progress"
    assert (project / "a.txt").read_text() == "changed"
    backups = list((state_dir / "runs" / state["run_id"] / "backups").iterdir())
    assert [b.read_text() for b in backups] == ["original\n"]       # never a modified file without its backup

    monkeypatch.setattr(bridge.Store, "finish", real_finish)
    monkeypatch.setattr(bridge, "pid_alive", lambda pid: pid != os.getpid())   # this bridge has exited
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--all")
    assert "stale" in out
    fake_llm.enqueue("again")
    rc, _, err = run_bridge(capsys, db, fake_llm, state_dir, "--model", "fake-model", "--plan", "p1", "--rerun")
    assert rc == 0, err
    assert "1 file(s) put back" in err
    assert (project / "a.txt").read_text() == "again"
    assert stored_results(db)[-1]["status"] == "completed"
    check_store(db)


def test_an_interrupt_still_wins_when_its_result_cannot_be_stored(capsys, db, fake_llm, state_dir, monkeypatch):
    insert_plan(db, make_plan("p1"))
    insert_plan(db, make_plan("later"))
    monkeypatch.setattr(bridge, "STORE_BUSY_TIMEOUT_S", 0.01)
    monkeypatch.setattr(bridge, "STORE_WRITE_TRIES", 1)

    def interrupted(self, *args):
        raise KeyboardInterrupt
    monkeypatch.setattr(bridge.PlanRun, "_run_steps", interrupted)
    holder = sqlite3.connect(db, isolation_level=None)
    real_finish = bridge.Store.finish

    def finish_while_locked(self, record, result, *more):    # more: the memory API and its warning
        holder.execute("BEGIN IMMEDIATE")
        try:
            return real_finish(self, record, result, *more)
        finally:
            holder.execute("ROLLBACK")
    monkeypatch.setattr(bridge.Store, "finish", finish_while_locked)

    rc, _, err = run_bridge(capsys, db, fake_llm, state_dir, "--model", "fake-model")

    assert rc == 130, err                   # the interrupt ends the run; "later" is not started
    assert "bridge: error: plan p1: its result was not stored" in err
    assert plan_state(db, "p1")["status"] == "in_progress" and plan_state(db, "later") == {}
    holder.close()


# --------------------------------------------------------------------------------------
# 9. bounded responses
# --------------------------------------------------------------------------------------

# The client stops reading at max_output_bytes + 64 KiB; what the fake got out before it
# saw the hang-up is that plus the loopback socket buffers (a few MB), far from the 50 MB
# it offers.
SENT_BOUND = 16 * 1024 * 1024
ENVELOPE_BYTES = 65_536         # the README's allowance for a non-streamed body's JSON


def test_a_non_streamed_body_that_never_ends_is_cut_at_the_byte_limit(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "p", "max_retries": 0}]))
    fake_llm.enqueue(fault="endless_body")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--model", "fake-model",
                               "--max-output-bytes", "100000")

    assert rc == 1, err
    assert f"passed {100000 + ENVELOPE_BYTES} bytes" in result["steps"][0]["error"]
    sent = fake_llm.wait_endless(1)
    assert sent[0] < SENT_BOUND < ENDLESS_CAP_BYTES


def test_an_error_body_that_never_ends_is_read_for_its_message_only(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "p", "max_retries": 0}]))
    fake_llm.enqueue(fault="endless_error")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--model", "fake-model", "--retries", "0")

    assert rc == 1, err
    assert "answered HTTP 500" in result["steps"][0]["error"]
    assert fake_llm.wait_endless(1)[0] < SENT_BOUND


def test_a_models_list_that_never_ends_fails_health(capsys, db, fake_llm, state_dir):
    fake_llm.endless_models = True
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--health")
    assert rc == 2
    assert "server  FAIL" in out and "passed" in out
    assert fake_llm.wait_endless(1)[0] < SENT_BOUND


def test_a_low_max_output_bytes_cuts_replies_not_the_model_list(capsys, db, fake_llm, state_dir):
    fake_llm.models = [f"model-{n:04d}-" + "x" * 80 for n in range(1000)] + ["fake-model"]   # ~140 KB
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("hi")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--max-output-bytes", "100")

    assert rc == 0, err
    assert result["steps"][0]["output"] == "hi"


def test_an_sse_stream_of_keep_alives_ends_at_the_steps_timeout(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "p", "max_retries": 0, "timeout_s": 0.5}]))
    fake_llm.enqueue(fault="endless_sse")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--model", "fake-model")

    assert rc == 1, err
    assert "passed its deadline of 0.5 s (the step's timeout_s)" in result["steps"][0]["error"]
    assert len(fake_llm.chat_requests) == 1              # not retried: it would run as long again
    fake_llm.wait_endless(1)


def test_without_a_step_timeout_the_default_deadline_ends_the_request(capsys, db, fake_llm, state_dir,
                                                                       monkeypatch):
    monkeypatch.setattr(bridge, "DEFAULT_REQUEST_DEADLINE_S", 0.3, raising=False)
    insert_plan(db, make_plan("p1", [{"id": 1, "prompt": "p", "max_retries": 0}]))
    fake_llm.enqueue(fault="endless_sse")

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--model", "fake-model")

    assert rc == 1, err
    assert "passed its deadline of 0.3 s (bridge's default" in result["steps"][0]["error"]


@pytest.mark.parametrize("fault, expected", [("endless_sse", "passed its deadline of 0.5 s"),
                                             ("endless_body", "longer than")])
def test_the_anthropic_executor_has_the_same_bounds(fault, expected):
    with FakeAnthropic() as fake:
        fake.enqueue(fault=fault)
        config = bridge.Config(db_paths=(), anthropic_base_url=fake.url, anthropic_api_key="k",
                               max_output_bytes=100_000, retries=0)
        with bridge.AnthropicClient(config) as client, pytest.raises(bridge.LLMError) as caught:
            client.chat([{"role": "user", "content": "x"}],
                        bridge.ChatRequest("claude-haiku-4-5", timeout_s=0.5))
        assert expected in str(caught.value)
        assert fake.wait_endless(1)[0] < SENT_BOUND


def test_a_claude_cli_line_that_never_ends_is_read_in_bounded_parts(tmp_path):
    write_fake_claude(tmp_path / "bin")
    env = {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "CLAUDE_FAKE_MODE": "endless_line"}
    config = bridge.Config(db_paths=(), tool_env=tuple(env.items()), max_output_bytes=100_000, state_dir=tmp_path)

    tracemalloc.start()
    try:
        with pytest.raises(bridge.LLMTimeout):       # the 100 MB line ends only when claude is killed
            bridge.ClaudeCLI(config).chat([{"role": "user", "content": "x"}],
                                          bridge.ChatRequest("haiku", timeout_s=1.0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert peak < 8 * 1024 * 1024, f"{peak:,} bytes held while reading claude's output"
