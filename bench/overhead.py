"""bridge's own cost per step: a 200-step plan on a zero-latency fake server.

bridge runs as a subprocess (python bridge.py), so its CPU time and peak memory
are read from getrusage(RUSAGE_CHILDREN) apart from the fake server's. The CPU of
a bare `python -c "import bridge"` is measured too and subtracted, so the figure
per step is the run's own work. Prints figures; the last line is the summary.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import ROOT, FakeLLM, store_with_plan

STEPS = 200


def child_cpu_s(command: list[str]) -> tuple[float, float, float]:
    """Run command; return (user CPU seconds, system CPU seconds, peak RSS in MiB of
    all children so far)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, after.ru_maxrss / 1024


def main() -> int:
    base_user, base_sys, _ = child_cpu_s([sys.executable, "-c", "import bridge, httpx, jsonschema"])
    with FakeLLM() as server, tempfile.TemporaryDirectory() as tmp:
        server.default_reply = "done"
        steps = [{"id": n, "prompt": f"task {n}: say done"} for n in range(1, STEPS + 1)]
        db = store_with_plan(Path(tmp), steps)
        user, system, peak_mib = child_cpu_s([sys.executable, "bridge.py", "--db", str(db), "--base-url",
                                              server.url, "--state-dir", f"{tmp}/state", "-q"])
        sent = len(server.chat_requests)
    cpu, baseline = user + system, base_user + base_sys
    per_step_ms = (cpu - baseline) / STEPS * 1000
    print(f"{sent} requests; run CPU {cpu:.2f} s (user {user:.2f}, system {system:.2f}), of which start-up "
          f"and imports {baseline:.2f} s; per step user {(user - base_user) / STEPS * 1000:.2f} ms, "
          f"system {(system - base_sys) / STEPS * 1000:.2f} ms")
    print(f"overhead: {per_step_ms:.2f} ms CPU per step, peak memory {peak_mib:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
