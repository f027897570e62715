"""bridge's own cost per step: a 200-step plan on a zero-latency fake server.

bridge runs as a subprocess (python bridge.py), so its CPU time and peak memory
are read from getrusage(RUSAGE_CHILDREN) apart from the fake server's. The CPU of
a bare `python -c "import bridge, httpx, jsonschema"` is measured too and
subtracted, so the figure per step is the run's own work. The plan runs 5 times
(CPU time as the kernel counts it moves by a few tenths of a millisecond per step
from run to run); the median run is the figure. Prints figures; the last line is
the summary.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, FakeLLM, store_with_plan

STEPS, RUNS = 200, 5


def child_cpu_s(command: list[str]) -> tuple[float, float, float]:
    """Run command; return (user CPU seconds, system CPU seconds, peak RSS in MiB of
    all children so far)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, after.ru_maxrss / 1024


def run_plan(server: FakeLLM) -> tuple[float, float, float, int]:
    """Run the 200-step plan once in a fresh store; return (user CPU seconds, system
    CPU seconds, peak RSS in MiB, requests the server saw)."""
    with tempfile.TemporaryDirectory() as tmp:
        server.reset()
        server.default_reply = "done"
        steps = [{"id": n, "prompt": f"task {n}: say done"} for n in range(1, STEPS + 1)]
        db = store_with_plan(Path(tmp), steps)
        user, system, peak_mib = child_cpu_s([sys.executable, "bridge.py", "--db", str(db), "--base-url",
                                              server.url, "--state-dir", f"{tmp}/state", "-q"])
        return user, system, peak_mib, len(server.chat_requests)


def main() -> int:
    with FakeLLM() as server:
        runs = []
        for _ in range(RUNS):      # the baseline and the plan take turns, as the machine's speed drifts
            base_user, base_sys, _ = child_cpu_s([sys.executable, "-c", "import bridge, httpx, jsonschema"])
            user, system, peak_mib, sent = run_plan(server)
            runs.append(((user + system - base_user - base_sys) / STEPS * 1000,
                         (user - base_user) / STEPS * 1000, (system - base_sys) / STEPS * 1000,
                         base_user + base_sys, peak_mib, sent))
    per_step_ms, user_ms, system_ms, baseline_s, peak_mib, sent = sorted(runs)[len(runs) // 2]
    print(f"per step, each run: {', '.join(f'{r[0]:.2f}' for r in runs)} ms CPU")
    print(f"median run: {sent} requests; per step user {user_ms:.2f} ms, system {system_ms:.2f} ms, "
          f"after {baseline_s:.2f} s of start-up and imports")
    print(f"overhead: {per_step_ms:.2f} ms CPU per step (median of {RUNS} runs), peak memory {peak_mib:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
