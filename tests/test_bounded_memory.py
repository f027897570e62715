"""Issue 20, row 18: memory is bounded by bridge's limits, not by the sizes of files or rows.

Each test runs the real CLI (python bridge.py, a subprocess) twice, on a small input and on
one many times a limit (LOAD_FILE_MAX_BYTES, DIFF_MAX_BYTES, PLAN_MAX_BYTES), and compares
the peak resident set size of the two: a process that reads the big input whole peaks at
least its size higher. The peak is the child's own, read with getrusage(RUSAGE_CHILDREN)
in a fresh wrapper process that runs only that one child.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import bridge
from fakes import bridge_args, child_env, insert_memory, make_plan, plan_state

ROOT = Path(bridge.__file__).resolve().parent
MB = 1 << 20
BIG = 48 * MB           # 24 x DIFF_MAX_BYTES, 190 x LOAD_FILE_MAX_BYTES
GROWTH_ALLOWED = BIG // 4       # a whole read costs BIG at least; pieces cost a few MB
PLAN_MAX_BYTES = 4_000_000      # bridge.PLAN_MAX_BYTES, as the README says it (checked below)

_MEASURE = """
import json, resource, subprocess, sys
child = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
print(json.dumps({"rc": child.returncode, "out": child.stdout[-20000:].decode("utf-8", "replace"),
                  "err": child.stderr[-20000:].decode("utf-8", "replace"),
                  "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def measured(db, fake_llm, state_dir, *extra: str) -> dict:
    """Run bridge.py with bridge_args and extra in a subprocess; return {rc, out, err
    (their last 20,000 characters), peak (bytes of resident memory at most)}."""
    argv = [sys.executable, "-c", _MEASURE, sys.executable, str(ROOT / "bridge.py"),
            *bridge_args(db, fake_llm.url, state_dir), *extra]
    done = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(done.stdout)
    report["peak"] = report.pop("peak_kib") * 1024     # Linux: kibibytes
    return report


def big_text(size: int) -> bytes:
    """size bytes of text in 1 MiB lines (difflib takes a few long lines quickly)."""
    line = b"x" * (MB - 1) + b"\n"
    return line * (size // MB)


def grew(small: dict, big: dict) -> int:
    return big["peak"] - small["peak"]


@pytest.fixture
def figures(request):
    """Print each test's peaks (pytest -s shows them; the report quotes them)."""
    found: list[str] = []
    yield found
    print(f"\n{request.node.name}: " + "; ".join(found))


# --------------------------------------------------------------------------------------
# --review and --apply with a huge LOAD file
# --------------------------------------------------------------------------------------


def review_plan(project: Path, plan_id: str) -> dict:
    return make_plan(plan_id, context={"objective": "t", "project": str(project),
                                       "files_context": {"input.txt": "LOAD"}},
                     steps=[{"id": 1, "prompt": "Sum it up.", "file_output": "summary.txt"}])


@pytest.mark.parametrize("size", [BIG])
def test_review_and_apply_with_a_huge_load_file_read_it_in_pieces(db, fake_llm, state_dir, tmp_path,
                                                                  figures, size):
    from fakes import insert_plan, trust_project

    peaks = {}
    for label, data in (("small", b"tiny\n"), ("big", big_text(size))):
        project = tmp_path / f"project-{label}"
        project.mkdir()
        trust_project(project)
        (project / "input.txt").write_bytes(data)
        insert_plan(db, review_plan(project, f"p-{label}"))
        fake_llm.enqueue("a summary")
        review = measured(db, fake_llm, state_dir, "--review", "--plan", f"p-{label}")
        assert review["rc"] == 0, review["err"]
        apply = measured(db, fake_llm, state_dir, "--apply", f"p-{label}")
        assert apply["rc"] == 0, apply["err"]
        assert (project / "summary.txt").read_text() == "a summary"
        peaks[label] = (review, apply)
    for step, name in ((0, "--review"), (1, "--apply")):
        figures.append(f"{name}: {peaks['small'][step]['peak'] / MB:.1f} MiB with a 5-byte LOAD file, "
                       f"{peaks['big'][step]['peak'] / MB:.1f} MiB with {size // MB} MiB")
        assert grew(peaks["small"][step], peaks["big"][step]) < GROWTH_ALLOWED, figures


# --------------------------------------------------------------------------------------
# --diff and --undo of a run that replaced a huge file
# --------------------------------------------------------------------------------------


def test_diff_and_undo_of_a_run_that_replaced_a_huge_file(db, fake_llm, state_dir, tmp_path, figures):
    from fakes import insert_plan, trust_project

    peaks = {}
    for label, data in (("small", b"old\n"), ("big", big_text(BIG))):
        project = tmp_path / f"project-{label}"
        project.mkdir()
        trust_project(project)
        (project / "data.txt").write_bytes(data)
        insert_plan(db, make_plan(f"p-{label}", context={"objective": "t", "project": str(project)},
                                  steps=[{"id": 1, "prompt": "Rewrite it.", "file_output": "data.txt"}]))
        fake_llm.enqueue("new\n")
        run = measured(db, fake_llm, state_dir, "--plan", f"p-{label}")
        assert run["rc"] == 0, run["err"]
        diff = measured(db, fake_llm, state_dir, "--diff", f"p-{label}")
        assert diff["rc"] == 0, diff["err"]
        undo = measured(db, fake_llm, state_dir, "--undo", f"p-{label}")
        assert undo["rc"] == 0, undo["err"]
        assert (project / "data.txt").read_bytes() == data          # put back whole
        peaks[label] = (run, diff, undo)
    for step, name in ((0, "the run"), (1, "--diff"), (2, "--undo")):
        figures.append(f"{name}: {peaks['small'][step]['peak'] / MB:.1f} MiB replacing 4 bytes, "
                       f"{peaks['big'][step]['peak'] / MB:.1f} MiB replacing {BIG // MB} MiB")
    for step in (0, 1, 2):
        assert grew(peaks["small"][step], peaks["big"][step]) < GROWTH_ALLOWED, figures
    assert "over bridge's diff limit of 2,000,000 bytes" in peaks["big"][1]["out"]
    assert "-old" in peaks["small"][1]["out"] and "+new" in peaks["small"][1]["out"]   # small files: a diff


def test_diff_json_still_gives_the_hashes_of_a_huge_file(capsys, db, fake_llm, state_dir, project):
    """Past DIFF_MAX_BYTES the diff is one line; the sha256 values are computed in pieces."""
    import hashlib

    from fakes import insert_plan, run_bridge

    data = big_text(4 * MB)
    (project / "data.txt").write_bytes(data)
    insert_plan(db, make_plan("p1", context={"objective": "t", "project": str(project)},
                              steps=[{"id": 1, "prompt": "Rewrite it.", "file_output": "data.txt"}]))
    fake_llm.enqueue("new\n")
    assert run_bridge(capsys, db, fake_llm, state_dir)[0] == 0

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--diff", "p1", "--json")

    assert rc == 0, err
    (entry,) = json.loads(out)["files"]
    assert entry["original_sha256"] == hashlib.sha256(data).hexdigest()
    now = (project / "data.txt").read_bytes()
    assert entry["current_sha256"] == entry["written_sha256"] == hashlib.sha256(now).hexdigest()
    assert entry["diff"].startswith(f"(no diff of data.txt: 4,194,304 bytes and {len(now)} bytes, over")


# --------------------------------------------------------------------------------------
# --list with two huge plan rows
# --------------------------------------------------------------------------------------


def huge_plan_row(db, plan_id: str, size: int, tags: str = "bridge-plan") -> None:
    plan = make_plan(plan_id, steps=[{"id": 1, "prompt": "x" * size}])
    insert_memory(db, json.dumps(plan), tags=tags, memory_type="plan")


def test_list_never_loads_a_plan_row_over_the_plan_size_limit(db, fake_llm, state_dir, figures):
    size = 5 * PLAN_MAX_BYTES        # 20 MB each: two of them, as written
    small = measured(db, fake_llm, state_dir, "--list", "--all")
    huge_plan_row(db, "huge-1", size)
    huge_plan_row(db, "huge-2", size)
    huge_plan_row(db, "not-a-plan", size, tags="bridge-result")      # a big memory naming the marker
    big = measured(db, fake_llm, state_dir, "--list", "--all")

    assert big["rc"] == 0, big["err"]
    figures.append(f"--list: {small['peak'] / MB:.1f} MiB on an empty store, {big['peak'] / MB:.1f} MiB "
                   f"with two {size // MB} MiB plan rows and a {size // MB} MiB result")
    assert grew(small, big) < 2 * PLAN_MAX_BYTES, figures
    limit = f"over bridge's limit of {PLAN_MAX_BYTES:,} (PLAN_MAX_BYTES)"
    assert big["out"].count(limit) == 2, big["out"]         # each tagged row said, the untagged skipped


def test_a_plan_row_over_the_limit_is_reported_invalid_and_never_run(capsys, db, fake_llm, state_dir):
    from fakes import insert_plan, run_bridge

    huge_plan_row(db, "huge", bridge.PLAN_MAX_BYTES + 1)
    insert_plan(db, make_plan("ok", steps=[{"id": 1, "prompt": "Say ok."}]))
    fake_llm.enqueue("ok")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--json")

    plans = {p["plan_id"]: p for p in json.loads(out)["plans"]}
    assert rc == 1, err
    assert plans["ok"]["status"] == "completed"
    (huge,) = [p for pid, p in plans.items() if pid != "ok"]
    assert huge["status"] == "failed" and "PLAN_MAX_BYTES" in json.dumps(huge), huge
    assert f"over bridge's limit of {bridge.PLAN_MAX_BYTES:,} (PLAN_MAX_BYTES)" in err
    assert fake_llm.chat_requests and len(fake_llm.chat_requests) == 1
    assert plan_state(db, "ok")["status"] == "completed"


def test_a_plan_row_at_the_limit_is_read(capsys, db, fake_llm, state_dir):
    from fakes import run_bridge

    plan = make_plan("edge", steps=[{"id": 1, "prompt": "Say ok."}])
    text = json.dumps(plan)
    plan["context"]["notes"] = "y" * (bridge.PLAN_MAX_BYTES - len(text) - len(', "notes": ""'))
    text = json.dumps(plan)
    assert len(text.encode()) <= bridge.PLAN_MAX_BYTES
    insert_memory(db, text, tags="bridge-plan", memory_type="plan")

    rc, out, err = run_bridge(capsys, db, fake_llm, state_dir, "--list", "--all", "--json")

    assert rc == 0, err
    assert [p["id"] for p in json.loads(out)["plans"]] == ["edge"]


def test_the_limits_are_the_documented_ones():
    assert bridge.PLAN_MAX_BYTES == PLAN_MAX_BYTES and bridge.DIFF_MAX_BYTES == 2_000_000
