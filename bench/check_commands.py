"""Code steps checked by the project's own test, on a real model: how many pass with
`syntax_check` alone, and with `syntax_check` + the test command (its output fed back
to the retries), and the time the commands add. Prints figures, never pass/fail.

Drives the bridge CLI as a user would: `bridge --submit` into a fresh store, then
`bridge --plan ID --json` against llama.cpp's server (examples/llama_server.py)
serving SmolLM2-135M-Instruct, in a project folder trusted through
BRIDGE_TRUSTED_PROJECTS. Each of the 12 steps writes one small module; its test is a
file of the project. With syntax_check alone the bench runs the same tests itself
after the run, to count the modules that are right. Needs the demo extra:
`make bench-real`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "examples")]
import llama_server  # noqa: E402

MAX_RETRIES = 2
# (module, what the prompt asks, the test's call, the expected value)
TASKS = [
    ("half", "half(n) that returns half of n", "half(7)", 3.5),
    ("add", "add(a, b) that returns the sum of a and b", "add(2, 3)", 5),
    ("area", "area(width, height) that returns the area of a rectangle", "area(2, 3)", 6),
    ("is_even", "is_even(n) that tells whether n is even", "is_even(7)", False),
    ("shout", "shout(text) that returns text in capital letters followed by '!'", "shout('hi')", "HI!"),
    ("square", "square(x) that returns x squared", "square(4)", 16),
    ("last", "last(items) that returns the last item of a list", "last([1, 2, 3])", 3),
    ("celsius", "celsius(f) that converts degrees Fahrenheit to Celsius", "celsius(212)", 100),
    ("count_vowels", "count_vowels(text) that counts the vowels in text", "count_vowels('banana')", 3),
    ("reverse", "reverse(text) that returns text backwards", "reverse('abc')", "cba"),
    ("maximum", "maximum(numbers) that returns the largest number of a list", "maximum([3, 9, 2])", 9),
    ("initials", "initials(name) that returns the initials of a full name", "initials('Ada Lovelace')", "AL"),
]


def test_file(module: str, call: str, expected: object) -> str:
    """The project's test of one module: one assert whose message says what went wrong."""
    return (f"from {module} import *\n\ngot = {call}\n"
            f"assert got == {expected!r}, f\"{call} returned {{got!r}}, expected {expected!r}\"\n"
            f"print('ok')\n")


def make_plan(plan_id: str, project: Path, with_test: bool) -> dict:
    steps = []
    for n, (module, asked, _, _) in enumerate(TASKS, 1):
        validation: list[dict] = [{"type": "syntax_check", "language": "python"}]
        if with_test:
            validation.append({"type": "command", "run": ["python", f"test_{module}.py"], "timeout_s": 60})
        steps.append({"id": n, "title": module, "prompt": f"Write {module}.py with a function {asked}.",
                      "validation": validation, "file_output": f"{module}.py", "max_retries": MAX_RETRIES,
                      "on_failure": "skip"})
    return {"$schema": "bridge-plan-v1", "id": plan_id, "status": "pending",
            "context": {"objective": "Write small helpers", "project": str(project)},
            "defaults": {"temperature": 0, "max_tokens": 150}, "steps": steps}


def user_env(project: Path) -> dict[str, str]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    return {**env, "PATH": path, "BRIDGE_TRUSTED_PROJECTS": str(project)}


def run_variant(base_url: str, work: Path, with_test: bool) -> dict:
    """Submit and run one plan through the CLI; return its figures."""
    name = "with-test" if with_test else "syntax-only"
    project = work / name
    project.mkdir()
    for module, _, call, expected in TASKS:
        (project / f"test_{module}.py").write_text(test_file(module, call, expected), encoding="utf-8")
    plan_file = work / f"{name}.json"
    plan_file.write_text(json.dumps(make_plan(name, project, with_test)), encoding="utf-8")
    env = user_env(project)
    cli = [sys.executable, str(ROOT / "bridge.py"), "--db", str(work / f"{name}.db"),
           "--state-dir", str(work / "state")]
    subprocess.run([*cli, "--submit", str(plan_file)], env=env, check=True, stdout=subprocess.DEVNULL)
    started = time.monotonic()
    run = subprocess.run([*cli, "--base-url", base_url, "--timeout", "120", "--plan", name, "--json", "-q"],
                         env=env, capture_output=True, text=True)
    wall_s = time.monotonic() - started
    (result,) = json.loads(run.stdout)["plans"]
    written = [module for module, *_ in TASKS if (project / f"{module}.py").exists()]
    passing = sum(1 for module in written if subprocess.run(
        ["python", f"test_{module}.py"], cwd=project, env=env, capture_output=True).returncode == 0)
    checks = [c for step in result["steps"] for c in step.get("checks", [])]
    return {"passing": passing, "wrong_kept": len(written) - passing, "succeeded": result["counts"]["succeeded"],
            "wall_s": wall_s,
            "attempts": sum(s["attempts"] for s in result["steps"]), "commands": len(checks),
            "commands_s": sum(c["duration_s"] for c in checks),
            "fixed_by_retry": sum(1 for s in result["steps"] if s["status"] == "succeeded" and s["attempts"] > 1)}


def main() -> int:
    problem = llama_server.missing_parts()
    if problem:
        print(f"bench: {problem}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="bridge-bench-check-"))
    with llama_server.running_server(work / "server.log") as base_url:
        plain = run_variant(base_url, work, with_test=False)
        tested = run_variant(base_url, work, with_test=True)
    n = len(TASKS)
    print(f"steps: {n} code steps, each with a one-assert test file; up to {MAX_RETRIES + 1} attempts, "
          "temperature 0, SmolLM2-135M-Instruct (llama.cpp), through the bridge CLI")
    for label, figures in (("syntax_check alone", plain), ("syntax_check + test, fed back", tested)):
        print(f"{label + ':':<31} {figures['succeeded']:>2}/{n} steps succeeded ({figures['fixed_by_retry']} after "
              f"a retry), {figures['passing']:>2}/{n} modules pass their test, {figures['wrong_kept']} wrong modules "
              f"left in the project; {figures['attempts']} attempts, {figures['wall_s']:.1f} s")
    print(f"commands: {tested['commands']} runs, {tested['commands_s']:.1f} s in all")
    print(f"pass rate: syntax_check alone {plain['passing'] / n:.2f}, with the test {tested['passing'] / n:.2f}; "
          f"wrong modules kept {plain['wrong_kept']} vs {tested['wrong_kept']}; "
          f"commands added {tested['commands_s']:.1f} s ({tested['commands_s'] / max(tested['commands'], 1):.3f} s "
          f"a run), retries {tested['wall_s'] - plain['wall_s']:+.1f} s of wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
