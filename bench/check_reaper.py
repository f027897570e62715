"""What the child subreaper costs a check command on Linux: bridge.run_command of `true`
under the reaper (REAPER_SOURCE: a `python -I -S` that sweeps what the command left),
and without it (reaped_argv patched to None: the command alone in its process group),
in turns, 5 rounds of 40 runs each. Prints figures; the last line is the summary.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import bridge

RUNS, ROUNDS = 40, 5


def per_run_ms(folder: Path) -> float:
    started = time.perf_counter()
    for _ in range(RUNS):
        run = bridge.run_command(["true"], folder, dict(os.environ), 30)
        assert run.error is None, run
    return (time.perf_counter() - started) / RUNS * 1000


def main() -> int:
    if not sys.platform.startswith("linux"):
        print("summary: no child subreaper here (Linux only); nothing to measure")
        return 0
    reaped, plain = [], []
    real = bridge.reaped_argv
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(ROUNDS):     # in turns, as the machine's speed drifts
            reaped.append(per_run_ms(Path(tmp)))
            bridge.reaped_argv = lambda argv, fd: None
            try:
                plain.append(per_run_ms(Path(tmp)))
            finally:
                bridge.reaped_argv = real
    print(f"under the reaper, each round: {', '.join(f'{ms:.1f}' for ms in reaped)} ms a check")
    print(f"alone, each round: {', '.join(f'{ms:.1f}' for ms in plain)} ms a check")
    print(f"summary: the reaper costs {statistics.median(reaped) - statistics.median(plain):.1f} ms "
          f"a check (median {statistics.median(reaped):.1f} ms vs {statistics.median(plain):.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
