"""What a run does on a real small model, measured as a user runs it. Prints
figures, never pass/fail.

Every configuration runs the same plan of TASKS (36 steps: extraction of people,
orders, events, versions, measurements and flights with contains_keys, lists with
json_schema, short code with syntax_check; max_retries 2, no temperature set, as a
planner writes them) through the `bridge` CLI itself: `bridge --submit PLAN --db
NEWFILE`, then `bridge --db NEWFILE --base-url URL --context-length 2048`, against
SmolLM2-135M-Instruct behind llama-cpp-python's server (examples/llama_server.py,
n_ctx 2048). Needs the demo extra: `make bench-real`.

Per configuration (one line each): JSON steps valid at the first attempt and after
retries, extraction and list steps whose every value is found in the task's
sentence ("faithful"), code steps valid, wall seconds of the bridge run, completion
tokens (llama-cpp-python streams no usage: bridge counts one token a chunk) and
those spent on failed attempts (from each step's attempt_log), and the slowest step.
The second line of a row counts the extractions (lists aside) that are faithful, and
the JSON steps that passed yet hold a made-up value (a string or number that is not in
the sentence; a null is counted apart: it is no value, but not faithful either).

Configurations (--only NAME,NAME picks some; the default runs all):
    hotter, plain, penalty   this checkout with --retry-sampling hotter / plain / penalty
    grounded                 hotter with "grounded": true on every JSON step (issue 25):
                             values checked against the step's input, span-constrained
                             schema sent
    grounded-check           the same with the span constraint off (only the check)
    no-guard                 hotter with the degeneration guard off (before point 2)
    open-values              hotter with the schema's values left open (before point 4)
    bridge@REV               with --before REV: bridge.py of a git revision of this
                             repository (e.g. main), run the same way
    original                 the original script, when BRIDGE_BENCH_ORIGINAL (or
                             --original) names the folder holding its run_original.py
                             and make_original_db.py; skipped with a note otherwise.
                             It stores only each step's success, output and retries:
                             its tokens are not known.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]
import bridge  # noqa: E402
import llama_server  # noqa: E402
from demo import from_text as faithful  # noqa: E402  (what the demo counts too)

RETRIES = 2
PEOPLE = [("Ada Lovelace", "London", 36), ("Alan Turing", "Manchester", 41), ("Grace Hopper", "Arlington", 85),
          ("Linus Torvalds", "Portland", 56), ("Margaret Hamilton", "Boston", 90), ("Guido van Rossum", "Belmont", 70)]
ORDERS = [("A-1001", "desk lamp", 2, "19.90"), ("B-2002", "office chair", 1, "149.00"),
          ("C-3003", "notebook", 12, "2.50"), ("D-4004", "monitor", 3, "210.00"), ("E-5005", "keyboard", 5, "45.00")]
EVENTS = [("PyCon", "Pittsburgh", "2026-05-14"), ("FOSDEM", "Brussels", "2026-02-01"),
          ("JSConf", "Berlin", "2026-06-20"), ("RustConf", "Montreal", "2026-09-10"), ("KubeCon", "Paris", "2026-03-19")]
VERSIONS = [("httpx", "0.28.1", "2024-12-06"), ("jsonschema", "4.23.0", "2024-07-08"), ("numpy", "2.2.1", "2024-12-21"),
            ("pytest", "8.3.4", "2024-12-01"), ("django", "5.1.4", "2024-12-04")]
MEASUREMENTS = [("temperature", "21.5", "C", "kitchen"), ("pressure", "1013", "hPa", "roof"),
                ("humidity", "48", "%", "cellar"), ("voltage", "3.3", "V", "board"), ("speed", "88", "km/h", "road")]
FLIGHTS = [("TP1234", "LIS", "OPO", "09:10", "10:05", "14"), ("BA0456", "LHR", "CDG", "13:40", "15:55", "B7")]
LISTS = [("The basket holds apples, pears and plums.", "the fruits"),
         ("Our team uses Python, Go and Rust.", "the programming languages"),
         ("She visited Rome, Vienna and Prague last year.", "the cities"),
         ("The flag is red, white and green.", "the colours")]
CODE = ["Write a Python function is_even(n) that returns True when n is even.",
        "Write a Python function square(x) that returns x times x.",
        "Write a Python function greet(name) that returns 'Hello, ' followed by the name.",
        "Write a Python function total(numbers) that returns the sum of a list of numbers.",
        "Write a Python function first(items) that returns the first item of a list, or None when it is empty.",
        "Write a Python function shout(text) that returns the text in upper case."]


def _extract(sentence: str, keys: list[str]) -> dict:
    quoted = ", ".join(json.dumps(k) for k in keys)
    return {"prompt": f'Read this sentence: "{sentence}" Return a JSON object with the keys {quoted}, '
                      "taken from the sentence.",
            "validation": {"type": "contains_keys", "keys": keys}}


def tasks() -> list[dict]:
    """Return the benchmark's steps (without ids), each with "sentence" and "kind" for scoring."""
    out = []
    for name, city, age in PEOPLE:
        out.append(("people", f"{name} lives in {city} and is {age} years old.", ["name", "city", "age"]))
    for order, item, qty, price in ORDERS:
        out.append(("orders", f"Order {order} is for {qty} x {item} at {price} EUR each.",
                    ["order_id", "item", "quantity", "price"]))
    for name, city, date in EVENTS:
        out.append(("events", f"{name} takes place in {city} on {date}.", ["event", "city", "date"]))
    for package, version, date in VERSIONS:
        out.append(("versions", f"{package} {version} was released on {date}.", ["package", "version", "released"]))
    for quantity, value, unit, place in MEASUREMENTS:
        out.append(("measurements", f"The {quantity} in the {place} reads {value} {unit}.",
                    ["quantity", "value", "unit", "place"]))
    for flight, src, dst, dep, arr, gate in FLIGHTS:
        out.append(("flights", f"Flight {flight} departs {src} {dep} and arrives {dst} {arr}, gate {gate}.",
                    ["flight", "from", "to", "departs", "arrives", "gate"]))
    steps = [{**_extract(sentence, keys), "kind": kind, "sentence": sentence} for kind, sentence, keys in out]
    list_schema = {"type": "object", "required": ["items"],
                   "properties": {"items": {"type": "array", "items": {"type": "string"}}}}
    for sentence, what in LISTS:
        steps.append({"prompt": f'Read this sentence: "{sentence}" Return a JSON object with the key "items": '
                                f"{what} the sentence names, as a list of strings.",
                      "validation": {"type": "json_schema", "schema": list_schema},
                      "kind": "lists", "sentence": sentence})
    for prompt in CODE:
        steps.append({"prompt": prompt, "validation": {"type": "syntax_check", "language": "python"},
                      "kind": "code", "sentence": None})
    return steps


def plan_document(plan_id: str, grounded: bool = False) -> dict:
    """Return the benchmark plan: one step per task, independent of each other; with
    grounded, every JSON step's validation has "grounded": true."""
    steps = [{"id": n, "title": t["kind"], "prompt": t["prompt"], "max_retries": RETRIES,
              "validation": {**t["validation"], "grounded": True}
              if grounded and t["kind"] != "code" else t["validation"]}
             for n, t in enumerate(tasks(), 1)]
    return {"$schema": bridge.SCHEMA_ID, "id": plan_id, "status": "pending",
            "context": {"objective": "bench: real small model"}, "steps": steps}


def values_faithful(task: dict, output: str) -> bool:
    """Tell whether every required value of a JSON task's output comes from its sentence."""
    try:
        data = bridge.parse_json_output(output)
    except bridge.OutputInvalid:
        return False
    if not isinstance(data, dict):
        return False
    keys = task["validation"].get("keys") or task["validation"]["schema"]["required"]
    return all(key in data and faithful(data[key], task["sentence"]) for key in keys)


def made_up(task: dict, output: str) -> str | None:
    """Return "made-up" when a required value of a JSON task's output is a string or
    number (or holds one) that is not in its sentence, "null" when it holds none but
    a null, else None."""
    try:
        data = bridge.parse_json_output(output)
    except bridge.OutputInvalid:
        return None
    keys = task["validation"].get("keys") or task["validation"]["schema"]["required"]
    values = [data.get(key) for key in keys] if isinstance(data, dict) else []
    flat = [item for value in values for item in (value if isinstance(value, list) else [value])]
    if any(not isinstance(v, bool) and v is not None and not faithful(v, task["sentence"])
           for v in flat):
        return "made-up"
    return "null" if None in flat else None


# -- running the configurations ------------------------------------------------------

# What the ablations change in this checkout's bridge, before main() runs.
PATCHES = {
    "no-guard": "bridge.DegenerationGuard.feed = lambda self, piece: self.pieces.append(piece)\n",
    "open-values": "bridge.bounded_value = lambda: {}\nbridge.bounded_schema = lambda schema: schema\n",
    "grounded": "",
    "grounded-check": "bridge.GROUNDED_MAX_SPANS = 0\n",
}
GROUNDED = {"grounded", "grounded-check"}      # the configurations whose plan has grounded steps


def bridge_command(source: Path, patch: str = "") -> list[str]:
    """Return the argv prefix running the bridge.py in source (with a patch applied first)."""
    code = (f"import sys; sys.path.insert(0, {str(source)!r}); import bridge\n{patch}"
            "sys.exit(bridge.main(sys.argv[1:]))")
    return [sys.executable, "-c", code]


def run_bridge(name: str, command: list[str], base_url: str, work: Path, extra: list[str]) -> dict:
    """Submit the plan into a new store, run it with the bridge CLI; return the row."""
    folder = work / name.replace("@", "-")
    folder.mkdir()
    plan_file, db = folder / "plan.json", folder / "store.db"
    plan_file.write_text(json.dumps(plan_document("bench", name in GROUNDED)), encoding="utf-8")
    subprocess.run([*command, "--submit", str(plan_file), "--db", str(db)], check=True, capture_output=True)
    started = time.monotonic()
    run = subprocess.run([*command, "--db", str(db), "--base-url", base_url, "--state-dir", str(folder / "state"),
                          "--context-length", str(llama_server.CONTEXT_TOKENS), "--timeout", "120", "--json",
                          "-q", *extra], capture_output=True, text=True)
    wall = time.monotonic() - started
    try:
        result = json.loads(run.stdout)["plans"][0]
    except (ValueError, KeyError, IndexError):
        return {"name": name, "error": f"bridge exited {run.returncode}: {run.stderr.strip()[-300:]}"}
    return score(name, wall, [{"ok": s["status"] == "succeeded", "attempts": s["attempts"], "output": s["output"],
                               "seconds": s["duration_s"], "tokens": s["usage"]["completion_tokens"],
                               "failed_tokens": sum(a.get("completion_tokens", 0) for a in s.get("attempt_log", [])
                                                    if a.get("error")) if "attempt_log" in s else None}
                              for s in sorted(result["steps"], key=lambda s: s["id"])])


def run_original(folder: Path, base_url: str, work: Path) -> dict:
    """Run the original script on the same plan in a store of its own layout; return the row."""
    here = work / "original"
    here.mkdir()
    plan_file, db = here / "plan.json", here / "store.db"
    plan_file.write_text(json.dumps(plan_document("bench")), encoding="utf-8")
    subprocess.run([sys.executable, str(folder / "make_original_db.py"), str(db), str(plan_file)],
                   check=True, capture_output=True)
    env = {**os.environ, "SEED_DB": str(db), "SEED_URL": f"{base_url}/chat/completions"}
    started = time.monotonic()
    run = subprocess.run([sys.executable, str(folder / "run_original.py"), "--plan", "bench"], env=env,
                         capture_output=True, text=True)
    wall = time.monotonic() - started
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT content FROM memories WHERE id LIKE 'result_bench_%'").fetchall()
    if not rows:
        return {"name": "original", "error": f"stored no result (exit {run.returncode}): {run.stderr.strip()[-300:]}"}
    steps = json.loads(rows[-1][0])["steps"]
    return score("original", wall, [{"ok": s["success"], "attempts": s["retries"] + 1, "output": s["output"],
                                     "seconds": None, "tokens": None, "failed_tokens": None}
                                    for s in sorted(steps, key=lambda s: s["id"])])


def score(name: str, wall: float, steps: list[dict]) -> dict:
    """Return a configuration's figures from its steps (in task order)."""
    all_tasks = tasks()
    json_steps = [(t, s) for t, s in zip(all_tasks, steps) if t["kind"] != "code"]
    code_steps = [(t, s) for t, s in zip(all_tasks, steps) if t["kind"] == "code"]
    slowest = max(((s["seconds"], n) for n, s in enumerate(steps, 1) if s["seconds"] is not None), default=None)
    known = [s["tokens"] for s in steps if s["tokens"] is not None]
    failed = [s["failed_tokens"] for s in steps if s["failed_tokens"] is not None]
    return {"name": name, "steps": len(steps), "json": len(json_steps),
            "first": sum(1 for _, s in json_steps if s["ok"] and s["attempts"] == 1),
            "after": sum(1 for _, s in json_steps if s["ok"]),
            "faithful": sum(1 for t, s in json_steps if s["ok"] and values_faithful(t, s["output"])),
            "extractions": sum(1 for t, _ in json_steps if t["kind"] != "lists"),
            "extractions_faithful": sum(1 for t, s in json_steps if t["kind"] != "lists" and s["ok"]
                                        and values_faithful(t, s["output"])),
            "made_up": sum(1 for t, s in json_steps
                           if s["ok"] and made_up(t, s["output"]) == "made-up"),
            "nulls": sum(1 for t, s in json_steps if s["ok"] and made_up(t, s["output"]) == "null"),
            "code": f"{sum(1 for _, s in code_steps if s['ok'])}/{len(code_steps)}", "wall": wall,
            "tokens": sum(known) if known else None, "failed_tokens": sum(failed) if failed else None,
            "slowest": slowest}


def print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['name']:<14} failed to run: {row['error']}")
        return
    slowest = f"{row['slowest'][0]:.1f} s (step {row['slowest'][1]})" if row["slowest"] else "n/a"
    tokens = row["tokens"] if row["tokens"] is not None else "n/a"
    failed = row["failed_tokens"] if row["failed_tokens"] is not None else "n/a"
    print(f"{row['name']:<14} {row['first']:>2}/{row['json']} {row['after']:>5}/{row['json']} "
          f"{row['faithful']:>8}/{row['json']} {row['code']:>5} {row['wall']:>7.1f} s {tokens!s:>7} {failed!s:>7}  {slowest}",
          flush=True)
    print(f"{'':<14} faithful extractions (lists aside): "
          f"{row['extractions_faithful']}/{row['extractions']}; passed with a made-up value: "
          f"{row['made_up']}/{row['json']}, with a null: {row['nulls']}", flush=True)


def git_bridge(rev: str, work: Path) -> Path:
    """Write bridge.py and its schema file of a git revision of this repository into a folder."""
    folder = work / f"src-{rev.replace('/', '_')}"
    folder.mkdir()
    for name in ("bridge.py", bridge.SCHEMA_FILENAME):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], check=True,
                              capture_output=True, text=True).stdout
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated configurations to run (default: all)")
    parser.add_argument("--before", metavar="REV", help="also run bridge.py of this git revision (e.g. main)")
    parser.add_argument("--original", metavar="DIR", default=os.environ.get("BRIDGE_BENCH_ORIGINAL"),
                        help="folder of the original script's run_original.py (env BRIDGE_BENCH_ORIGINAL)")
    args = parser.parse_args()
    problem = llama_server.missing_parts()
    if problem:
        print(f"bench: {problem}")
        return 2
    work = Path(tempfile.mkdtemp(prefix="bridge-bench-"))
    configs: list[tuple[str, object]] = [(name, ["--retry-sampling", name]) for name in bridge.RETRY_SAMPLING]
    configs += [(name, "patch") for name in PATCHES]
    if args.before:
        configs.append((f"bridge@{args.before}", "rev"))
    configs.append(("original", "original"))
    wanted = set(args.only.split(",")) if args.only else None
    configs = [(n, how) for n, how in configs if wanted is None or n in wanted or (how == "rev" and "before" in wanted)]
    print(f"bench: {len(tasks())} tasks, max_retries {RETRIES}, SmolLM2-135M-Instruct on llama-cpp-python "
          f"(n_ctx {llama_server.CONTEXT_TOKENS}), {os.cpu_count()} CPU(s); work folder {work}")
    print(f"{'configuration':<14} {'JSON first':>10} {'after':>5} {'faithful':>9} {'code':>5} {'wall':>9} "
          f"{'tokens':>7} {'failed':>7}  slowest step")
    with llama_server.running_server(work / "server.log") as base_url:
        for name, how in configs:
            if how == "original":
                if not args.original or not (Path(args.original) / "run_original.py").is_file():
                    print("original       skipped: set BRIDGE_BENCH_ORIGINAL to the folder of run_original.py")
                    continue
                row = run_original(Path(args.original), base_url, work)
            elif how == "rev":
                row = run_bridge(name, bridge_command(git_bridge(args.before, work)), base_url, work, [])
            elif how == "patch":
                row = run_bridge(name, bridge_command(ROOT, PATCHES[name]), base_url, work, ["--retry-sampling", "hotter"])
            else:
                row = run_bridge(name, bridge_command(ROOT), base_url, work, how)   # type: ignore[arg-type]
            print_row(row)
    print("figures on a shared machine: other processes' load slows every row alike only roughly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
