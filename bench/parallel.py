"""Independent steps against a server with parallel slots: wall time vs the ideal.

8 independent steps; a fake server with K=4 slots holds each request 0.5 s. The
ideal is ceil(8/4) × 0.5 s = 1.0 s. Prints figures; the last line is the summary.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

from _common import FakeLLM, bridge, store_with_plan

STEPS, SLOTS, LATENCY_S = 8, 4, 0.5


def main() -> int:
    ideal = math.ceil(STEPS / SLOTS) * LATENCY_S
    with FakeLLM() as server, tempfile.TemporaryDirectory() as tmp:
        server.slots, server.latency_s, server.default_reply = SLOTS, LATENCY_S, "done"
        server.lmstudio = False          # a llama.cpp server: /props reports total_slots
        db = store_with_plan(Path(tmp), [{"id": n, "prompt": f"task {n}"} for n in range(1, STEPS + 1)])
        started = time.perf_counter()
        rc = bridge.main(["--db", str(db), "--base-url", server.url, "--state-dir", f"{tmp}/state", "-q"],
                         environ={})
        wall = time.perf_counter() - started
        in_flight = server.max_in_flight
    print(f"exit code {rc}; most requests in flight at once: {in_flight}")
    print(f"parallel: {STEPS} steps, {SLOTS} slots, {LATENCY_S} s each: wall {wall:.2f} s, "
          f"ideal {ideal:.2f} s, ratio {wall / ideal:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
