"""The planner's loop as Claude Code runs it (issue 23): an --events stream a Monitor can
watch (a line per step and plan event; deltas only with --deltas), result memories the
memory server's hooks find (tagged with the project's name as they detect it), the
hooks' HTTP endpoint used without flags, --stats from bridge's own runs, and savings
said in the result.

In-process through bridge.main(argv, environ) against the fake LLM server, the fake
Anthropic API and real doobidoo stores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from pathlib import Path
from statistics import median

import pytest

import bridge
from fakes import (
    FakeMemoryAPI,
    bridge_args,
    insert_plan,
    make_plan,
    read_rows,
    result_document,
    run_bridge,
)

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
HAIKU = "anthropic:claude-haiku-4-5"
COMMON = {"event", "ts", "plan_id"}
STEP_EVENTS = {"step_start", "delta", "attempt_failed", "step_end"}


def keys_step(sid: int, **extra) -> dict:
    return {
        "id": sid,
        "title": f"keys {sid}",
        "prompt": "Reply with a JSON object holding key a.",
        "validation": {"type": "contains_keys", "keys": ["a"]},
        **extra,
    }


def events_of(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def readme_event_table() -> dict[str, set[str]]:
    """{event: its fields} from the README's events table (| `event` | fields | when |)."""
    section = README[README.index("**Events** (`--events`)") : README.index("**Run logs**")]
    rows = [
        line
        for line in section.splitlines()
        if line.startswith("| `") and not line.startswith("| `event`")
    ]
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        table[cells[0].strip("`")] = set(re.findall(r"`([a-z_]+)`", cells[1]))
    return table


def three_step_run(capsys, db, fake_llm, state_dir, *extra) -> tuple[int, list[dict], str]:
    """A 3-step plan: step 1 fails once then passes, steps 2 and 3 pass at once."""
    insert_plan(
        db,
        make_plan(
            "p3",
            [
                keys_step(1),
                keys_step(2, depends_on=[1]),
                {"id": 3, "prompt": "Say hi", "depends_on": [2]},
            ],
        ),
    )
    fake_llm.enqueue("not json", chunk_size=2).enqueue('{"a": 1}', chunk_size=2)
    fake_llm.enqueue('{"a": 2}', chunk_size=2).enqueue("hi there, planner", chunk_size=2)
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--events", *extra)
    return rc, events_of(out), err


# --------------------------------------------------------------------------------------
# 1. the events stream
# --------------------------------------------------------------------------------------


def test_events_are_a_few_lines_per_step_and_carry_every_outcome(capsys, db, fake_llm, state_dir):
    rc, events, err = three_step_run(capsys, db, fake_llm, state_dir)
    assert rc == 0, err
    kinds = [e["event"] for e in events]
    assert "delta" not in kinds
    # 2 + 2 per step + 1 per failed attempt: 9 lines for the 3 steps
    assert kinds == [
        "plan_start",
        "step_start",
        "attempt_failed",
        "step_end",
        "step_start",
        "step_end",
        "step_start",
        "step_end",
        "plan_end",
    ]
    ends = {e["step_id"]: e for e in events if e["event"] == "step_end"}
    assert {sid: (e["status"], e["attempts"]) for sid, e in ends.items()} == {
        1: ("succeeded", 2),
        2: ("succeeded", 1),
        3: ("succeeded", 1),
    }
    assert events[-1]["status"] == "completed" and events[-1]["success"] is True


def test_deltas_come_only_when_asked_for_and_hold_every_piece(capsys, db, fake_llm, state_dir):
    rc, events, err = three_step_run(capsys, db, fake_llm, state_dir, "--deltas")
    assert rc == 0, err
    texts = {}
    for e in events:
        if e["event"] == "delta":
            texts.setdefault((e["step_id"], e["attempt"]), []).append(e["text"])
    assert texts == {
        (1, 1): ["no", "t ", "js", "on"],
        (1, 2): ['{"', 'a"', ": ", "1}"],
        (2, 1): ['{"', 'a"', ": ", "2}"],
        (3, 1): ["hi", " t", "he", "re", ", ", "pl", "an", "ne", "r"],
    }


def test_deltas_without_events_is_a_usage_error(capsys, db, fake_llm, state_dir):
    with pytest.raises(SystemExit) as exit_:
        bridge.main(bridge_args(db, fake_llm.url, state_dir, "--deltas"), environ={})
    assert exit_.value.code == 2
    assert "--deltas goes with --events" in capsys.readouterr().err


def test_every_event_has_exactly_the_fields_the_readme_table_names(
    capsys, db, fake_llm, state_dir, tmp_path
):
    """The README's table is the vocabulary: each event bridge prints has the common
    fields, step_id on step events, and exactly the fields its row names."""
    table = readme_event_table()
    assert set(table) == set(bridge.EVENT_KINDS)
    rc, events, err = three_step_run(capsys, db, fake_llm, state_dir, "--deltas")
    assert rc == 0, err
    rc, out, err = run_bridge(
        capsys, tmp_path / "missing" / "x.db", fake_llm, state_dir, "--events"
    )
    assert rc == 2
    events += events_of(out)
    assert {e["event"] for e in events} == set(bridge.EVENT_KINDS)
    for e in events:
        want = COMMON | table[e["event"]] | ({"step_id"} if e["event"] in STEP_EVENTS else set())
        assert set(e) == want, (e["event"], set(e) ^ want)


# --------------------------------------------------------------------------------------
# 2. results a later session finds: the project's name as the hooks detect it
# --------------------------------------------------------------------------------------


def git(folder: Path, *argv: str) -> None:
    subprocess.run(["git", "-C", str(folder), *argv], check=True, capture_output=True)


@pytest.mark.parametrize(
    "layout, expected",
    [
        (
            {
                "package.json": '{"name": "web-shop", "version": "1.0.0"}',
                "pyproject.toml": 'name = "other"',
            },
            "web-shop",
        ),
        ({"package.json": '{"version": "1.0.0"}'}, "node-project"),
        (
            {"pyproject.toml": '[build-system]\nrequires = []\n\n[project]\nname = "slugkit"\n'},
            "slugkit",
        ),
        ({"pyproject.toml": "[tool.ruff]\nline-length = 100\n"}, "python-project"),
        ({}, "Folder Name"),
    ],
)
def test_project_name_is_the_one_the_hooks_detect(tmp_path, layout, expected):
    folder = tmp_path / "Folder Name"
    folder.mkdir()
    for name, text in layout.items():
        (folder / name).write_text(text)
    assert bridge.project_name(folder) == expected


def test_project_name_of_a_git_repository_is_its_remote_name_else_the_folder(tmp_path):
    folder = tmp_path / "checkout"
    folder.mkdir()
    git(folder, "init", "-q")
    assert bridge.project_name(folder) == "checkout"  # no remote: the hooks fall to the folder
    git(folder, "remote", "add", "origin", "git@github.com:someone/widget-lib.git")
    assert bridge.project_name(folder) == "widget-lib"


def test_a_hostile_package_name_stays_one_short_printable_line(tmp_path):
    (tmp_path / "package.json").write_text(json.dumps({"name": "evil\n\x1b[2Jname," + "x" * 500}))
    name = bridge.project_name(tmp_path)
    assert "\n" not in name and "\x1b" not in name and len(name) == bridge.PROJECT_NAME_MAX_CHARS


def test_the_result_names_and_tags_the_project(capsys, db, fake_llm, state_dir, project):
    (project / "pyproject.toml").write_text('[project]\nname = "slugkit"\n')
    insert_plan(
        db,
        make_plan(
            "p1",
            [{"id": 1, "prompt": "Say hi"}],
            context={"objective": "greet", "project": str(project)},
        ),
    )
    fake_llm.enqueue("hello")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
    assert rc == 0, err
    (row,) = [r for r in read_rows(db) if r["memory_type"] == "tool_outcome"]
    assert row["tags"].split(",") == ["bridge-result", "plan:p1", "slugkit"]
    first = row["content"].splitlines()[0]
    assert first.startswith("bridge result: plan p1 completed in project slugkit (run ")
    assert result_document(row["content"])["project"] == "slugkit"


def test_a_plan_without_a_project_gets_no_project_tag(capsys, db, fake_llm, state_dir):
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("hello")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
    assert rc == 0, err
    (row,) = [r for r in read_rows(db) if r["memory_type"] == "tool_outcome"]
    assert row["tags"] == "bridge-result,plan:p1"
    assert " in project " not in row["content"].splitlines()[0]


# --------------------------------------------------------------------------------------
# 3. the hooks' HTTP endpoint without flags
# --------------------------------------------------------------------------------------


def write_hooks_config(home: Path, service: dict) -> None:
    """~/.claude/hooks/config.json as the memory server's hooks installer writes it
    (claude-hooks/config.json: memoryService.http.endpoint, apiKey)."""
    folder = home / ".claude" / "hooks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"memoryService": service, "projectDetection": {}})
    )


def test_results_go_through_the_endpoint_in_the_hooks_config(
    capsys, db, fake_llm, state_dir, tmp_path
):
    with FakeMemoryAPI(db, key="hooks-key") as api:
        write_hooks_config(
            tmp_path / "home",
            {"protocol": "auto", "http": {"endpoint": api.url, "apiKey": "hooks-key"}},
        )
        insert_plan(db, make_plan("p1"))
        fake_llm.enqueue("hello")
        rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
        assert rc == 0, err
        assert "warning" not in err
        (post,) = api.posts
        assert post["headers"]["X-API-Key"] == "hooks-key"
        assert post["json"]["tags"] == ["bridge-result", "plan:p1"]

        rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--health", "--json")
        report = json.loads(out)
        assert report["memory_setting"] == {
            "url": api.url,
            "source": "~/.claude/hooks/config.json",
            "note": None,
        }
        assert report["memory_api"]["key_accepted"] is True
        rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--health")
        assert f"HTTP API {api.url} answers" in out
        assert "key accepted (set by ~/.claude/hooks/config.json)" in out

        rc, out, err = run_bridge(
            capsys, db, fake_llm, state_dir, "--health", "--json", "--memory-url", "off"
        )
        assert json.loads(out)["memory_setting"]["url"] is None and "memory_api" not in json.loads(
            out
        )
        insert_plan(db, make_plan("p2"))
        fake_llm.enqueue("hello")
        rc, out, err = run_bridge(
            capsys, db, fake_llm, state_dir, environ={"BRIDGE_MEMORY_URL": "off"}
        )
        assert rc == 0, err
        assert len(api.posts) == 1  # told otherwise: written directly


def test_the_older_flat_layout_and_a_flag_that_wins(capsys, db, fake_llm, state_dir, tmp_path):
    with FakeMemoryAPI(db, key="k") as api, FakeMemoryAPI(db, key="k") as other:
        write_hooks_config(tmp_path / "home", {"endpoint": api.url, "apiKey": "k"})
        rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--health", "--json")
        assert json.loads(out)["memory_setting"]["url"] == api.url
        rc, out, err = run_bridge(
            capsys,
            db,
            fake_llm,
            state_dir,
            "--health",
            "--json",
            "--memory-url",
            other.url,
            environ={"MCP_API_KEY": "k"},
        )
        assert json.loads(out)["memory_setting"] == {
            "url": other.url,
            "source": "--memory-url",
            "note": None,
        }


@pytest.mark.parametrize(
    "endpoint",
    ["https://memory.example.com:8443", "http://10.0.0.5:8000", "https://localhost:8443"],
)
def test_an_endpoint_off_this_machine_is_not_used_and_health_says_so(
    capsys, db, fake_llm, state_dir, tmp_path, endpoint
):
    write_hooks_config(tmp_path / "home", {"http": {"endpoint": endpoint, "apiKey": "secret-key"}})
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--health", "--json")
    setting = json.loads(out)["memory_setting"]
    assert setting["url"] is None and "not an http URL on this machine" in setting["note"]
    assert "secret-key" not in out
    insert_plan(db, make_plan("p1"))
    fake_llm.enqueue("hello")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir)
    assert rc == 0 and "warning" not in err


def test_a_broken_hooks_config_costs_nothing_but_a_note(capsys, db, fake_llm, state_dir, tmp_path):
    folder = tmp_path / "home" / ".claude" / "hooks"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{not json")
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--health")
    assert rc == 0, err
    assert "no memoryService object" in out


def test_a_fifo_for_the_hooks_config_is_refused_not_waited_on(tmp_path):
    """A FIFO at ~/.claude/hooks/config.json: a plain open() waits for a writer forever, so
    bridge (every invocation reads the file) would hang; it says one line instead."""
    folder = tmp_path / ".claude" / "hooks"
    folder.mkdir(parents=True)
    os.mkfifo(folder / "config.json")
    found: list = []
    worker = threading.Thread(
        target=lambda: found.append(bridge.hooks_memory_endpoint(tmp_path)), daemon=True
    )
    worker.start()
    worker.join(10)
    if worker.is_alive():  # waiting on the FIFO: give it a writer so the thread ends, then fail
        with open(folder / "config.json", "wb"):
            pass
        worker.join(10)
        pytest.fail("hooks_memory_endpoint waited on a FIFO")
    assert found == [
        (None, None, "~/.claude/hooks/config.json cannot be read (not a regular file)")
    ]


# --------------------------------------------------------------------------------------
# 4. --stats from bridge's own runs
# --------------------------------------------------------------------------------------


def run_escalating(capsys, db, fake_llm, fake_anthropic, state_dir,
                   *extra: str) -> tuple[dict, str]:
    """Run the pending plans with --json, escalating failed steps to Haiku on the fake
    Anthropic API; assert exit 0 and return the first plan's result document and stderr."""
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--json", "--anthropic-base-url",
                              fake_anthropic.url, "--escalate-to", HAIKU, *extra,
                              environ={"ANTHROPIC_API_KEY": "sk-test"})
    assert rc == 0, err
    return json.loads(out)["plans"][0], err


def test_stats_count_what_each_step_did_per_model_and_validation(
    capsys, db, fake_llm, fake_anthropic, state_dir, project
):
    """Plans with known outcomes: contains_keys first time, after a retry, only on
    escalation, and failed; a non_empty step first time; a syntax_check + command step
    after a retry. The counts and medians are those of the runs' own step entries."""
    insert_plan(
        db,
        make_plan(
            "a",
            [
                keys_step(1),
                keys_step(2, max_retries=1),
                keys_step(3, max_retries=0),
                {"id": 4, "prompt": "Say hi"},
                {
                    "id": 5,
                    "prompt": "Write ok.py",
                    "file_output": "ok.py",
                    "validation": [
                        {"type": "syntax_check", "language": "python"},
                        {"type": "command", "run": ["python3", "-c", "import ok"]},
                    ],
                },
            ],
            context={"objective": "known outcomes", "project": str(project)},
        ),
    )
    fake_llm.enqueue('{"a": 1}')  # 1: first attempt
    fake_llm.enqueue("nope").enqueue('{"a": 2}')  # 2: after a retry
    fake_llm.enqueue("nope")  # 3: escalated
    fake_llm.enqueue("hello")  # 4: first attempt
    fake_llm.enqueue("```python\nimport nothing_here\n```")  # 5: the command fails once
    fake_llm.enqueue("```python\nX = 1\n```")
    fake_anthropic.enqueue('{"a": 3}', input_tokens=100, output_tokens=10)
    result, _ = run_escalating(capsys, db, fake_llm, fake_anthropic, state_dir)
    insert_plan(db, make_plan("b", [keys_step(1, max_retries=0)]))
    fake_llm.enqueue("never json")  # failed
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--json")
    assert rc == 1, err
    failed = json.loads(out)["plans"][0]

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--stats", "--json")
    assert rc == 0, err
    report = json.loads(out)
    assert report["steps"] == 6 and report["skipped_lines"] == 0
    (model,) = report["models"]
    assert model == "fake-model"
    rows = report["models"][model]
    steps = {s["id"]: s for s in result["steps"]}
    tokens = {
        sid: s["usage"]["prompt_tokens"] + s["usage"]["completion_tokens"]
        for sid, s in steps.items()
    }
    failed_tokens = sum(failed["steps"][0]["usage"].values())
    assert rows["contains_keys"] == {
        "steps": 4,
        "first_attempt": 1,
        "after_retries": 1,
        "on_escalation": 1,
        "failed": 1,
        "median_tokens": median([tokens[1], tokens[2], tokens[3], failed_tokens]),
        "median_s": round(
            median(
                [
                    steps[1]["duration_s"],
                    steps[2]["duration_s"],
                    steps[3]["duration_s"],
                    failed["steps"][0]["duration_s"],
                ]
            ),
            3,
        ),
    }
    assert rows["non_empty"] == {
        "steps": 1,
        "first_attempt": 1,
        "after_retries": 0,
        "on_escalation": 0,
        "failed": 0,
        "median_tokens": tokens[4],
        "median_s": steps[4]["duration_s"],
    }
    for kind in ("syntax_check", "command"):
        assert (
            rows[kind]["steps"] == 1
            and rows[kind]["after_retries"] == 1
            and rows[kind]["first_attempt"] == 0
        )

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--stats")
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.strip().startswith("contains_keys"))
    assert line.split()[:6] == ["contains_keys", "4", "1", "1", "1", "1"]


def test_stats_skip_lines_that_are_not_records_and_say_when_there_are_none(
    capsys, db, fake_llm, state_dir
):
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--stats")
    assert rc == 0 and "no step records yet" in out
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "stats.jsonl").write_text(
        'not json\n{"model": 1}\n[]\n'
        + json.dumps(
            {
                "model": "m",
                "validation": ["json"],
                "outcome": "first_attempt",
                "tokens": 10,
                "seconds": 1.5,
            }
        )
        + "\n"
    )
    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--stats", "--json")
    report = json.loads(out)
    assert report["skipped_lines"] == 3 and report["steps"] == 1
    assert report["models"]["m"]["json"]["first_attempt"] == 1


# --------------------------------------------------------------------------------------
# 5. savings said honestly
# --------------------------------------------------------------------------------------


def test_savings_count_local_tokens_apart_from_paid_ones(
    capsys, db, fake_llm, fake_anthropic, state_dir
):
    insert_plan(db, make_plan("p1", [keys_step(1, max_retries=1), {"id": 2, "prompt": "Say hi"}]))
    fake_llm.enqueue("no").enqueue("still no").enqueue("hello")
    fake_anthropic.enqueue('{"a": 1}', input_tokens=1000, output_tokens=100)
    result, err = run_escalating(capsys, db, fake_llm, fake_anthropic, state_dir,
                                 "--price-model", "claude-opus-4-5")
    local = result["ledger"]["fake-model"]
    savings = result["savings"]
    assert savings["local_usage"] == {
        "prompt_tokens": local["prompt_tokens"],
        "completion_tokens": local["completion_tokens"],
    }
    assert savings["local_tokens"] == local["prompt_tokens"] + local["completion_tokens"]
    assert savings["would_have_cost_usd"] == round(
        local["prompt_tokens"] * 5.00 / 1e6 + local["completion_tokens"] * 25.00 / 1e6, 4
    )
    assert savings["price_model"] == "claude-opus-4-5"
    assert savings["paid_usd"] == result["cost_usd"] > 0
    assert (savings["retries"], savings["escalations"], savings["escalations_saved"]) == (1, 1, 1)
    (row,) = [r for r in read_rows(db) if r["memory_type"] == "tool_outcome"]
    summary = row["content"].split("\n\n")[0]
    assert (
        f"savings: {savings['local_tokens']} tokens ran on the local model, "
        f"${savings['would_have_cost_usd']:.4f} at claude-opus-4-5's prices"
    ) in summary
    assert "1 retry, 1 escalated (1 saved by it)" in summary
    assert "  savings: " in err


def test_project_files_that_are_not_regular_files_are_passed_over(tmp_path):
    """A FIFO would hang the read, a symlink would quote a file from elsewhere in a tag:
    both are passed over, as if absent."""
    folder = tmp_path / "proj"
    folder.mkdir()
    os.mkfifo(folder / "package.json")
    secret = tmp_path / "secret.toml"
    secret.write_text('name = "a-secret-name"\n')
    (folder / "pyproject.toml").symlink_to(secret)
    assert bridge.project_name(folder) == "proj"
