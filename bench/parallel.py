"""Independent steps against a server with parallel slots: wall time vs the ideal.

8 independent steps; a fake server with K=4 slots holds each request 0.5 s. The
ideal is ceil(8/4) × 0.5 s = 1.0 s. The plan runs three times in one process: the
first run is cold (it also imports httpx and jsonschema, which bench/startup.py
does not cover), the other two show the steady state. Prints figures; the last line
is the summary.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

from _common import FakeLLM, bridge, store_with_plan

STEPS, SLOTS, LATENCY_S = 8, 4, 0.5


def run_once(server: FakeLLM) -> tuple[float, int, int]:
    """Run the plan once in a fresh store; return (wall seconds, exit code, most in flight)."""
    with tempfile.TemporaryDirectory() as tmp:
        server.reset()
        server.slots, server.latency_s, server.default_reply = SLOTS, LATENCY_S, "done"
        server.lmstudio = False          # a llama.cpp server: /props reports total_slots
        server.context_length = 16384    # its slots share one pool: 4 prompts + answers fit
        db = store_with_plan(Path(tmp), [{"id": n, "prompt": f"task {n}"} for n in range(1, STEPS + 1)])
        started = time.perf_counter()
        rc = bridge.main(["--db", str(db), "--base-url", server.url, "--state-dir", f"{tmp}/state", "-q"],
                         environ={})
        return time.perf_counter() - started, rc, server.max_in_flight


def main() -> int:
    ideal = math.ceil(STEPS / SLOTS) * LATENCY_S
    with FakeLLM() as server:
        runs = [run_once(server) for _ in range(3)]
    cold, warm = runs[0][0], min(r[0] for r in runs[1:])
    print(f"exit codes {[r[1] for r in runs]}; most requests in flight at once: {[r[2] for r in runs]}")
    print(f"parallel: {STEPS} steps, {SLOTS} slots, {LATENCY_S} s each, ideal {ideal:.2f} s: "
          f"steady {warm:.2f} s (ratio {warm / ideal:.2f}), cold first run {cold:.2f} s (ratio {cold / ideal:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
