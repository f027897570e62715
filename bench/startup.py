"""Start-up: `bridge --help`, and `bridge --list` on a store of 100,000 memories.

The store (12.x layout, FTS index and triggers, as the memory server keeps it)
holds 20 plans and 99,980 notes of 40-300 words. Each command runs 10 times; the
medians are given as a ratio to `python -c "import sqlite3"` measured in the same
run. bridge is started the way the installed console script starts it (import
bridge; main_entry()), with its bytecode cached, as after `pip install`; after one
warm-up run of each command. `--list` on an empty store is timed too, and so are
floors that involve no bridge code: importing argparse (and sqlite3), and a bare
argparse program with as many options as bridge's printing its help. Prints
figures; the last line is the summary.

Run it in a clean virtual environment, as `make bench` does: a Python whose
site-packages pre-import modules at start (a .pth file, say) makes the bare
interpreter slower and these ratios look better than they are.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, bridge

MEMORIES, PLANS, RUNS = 100_000, 20, 10
WORDS = ("plan step model server store memory file test python json local claude deploy build cache "
         "index query result error retry token context review change commit branch merge release note").split()


def build_store(db: Path) -> float:
    """Fill a fresh 12.x store with the benchmark's memories; return seconds taken."""
    started = time.perf_counter()
    bridge.Store.create(db)
    rng = random.Random(0)
    plan_at = set(rng.sample(range(MEMORIES), PLANS))
    conn = sqlite3.connect(db)
    rows = []
    for n in range(MEMORIES):
        ts = 1_790_000_000 + n
        if n in plan_at:
            content = json.dumps({"$schema": bridge.SCHEMA_ID, "id": f"plan-{n}", "status": "pending",
                                  "context": {"objective": f"objective {n}"},
                                  "steps": [{"id": 1, "prompt": "do it"}]})
            tags, kind = "bridge-plan", "planning"
        else:
            content = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 300)))
            tags, kind = "note", "note"
        rows.append((bridge.content_hash(content), content, tags, kind, "{}", ts, ts,
                     bridge.iso_from_ts(ts), bridge.iso_from_ts(ts)))
    conn.executemany("INSERT OR IGNORE INTO memories (content_hash, content, tags, memory_type, metadata, "
                     "created_at, updated_at, created_at_iso, updated_at_iso) VALUES (?,?,?,?,?,?,?,?,?)", rows)
    conn.commit()
    conn.close()
    return time.perf_counter() - started


# Some shells export PYTHONDONTWRITEBYTECODE; an installed bridge has its bytecode
# compiled by pip anyway, so measure with the cache allowed.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
BRIDGE = [sys.executable, "-c", "import bridge; bridge.main_entry()"]   # what the console script does


def medians_s(commands: dict[str, list[str]]) -> dict[str, float]:
    """Return the median wall time of RUNS runs of each command (seconds), after one
    warm-up each. The commands take turns, so a machine that speeds up or slows
    down meanwhile moves every figure alike."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(RUNS + 1):
        for name, command in commands.items():
            started = time.perf_counter()
            subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=ENV)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(runs[1:]) for name, runs in times.items()}


def floor_commands() -> dict[str, list[str]]:
    """What no bridge can go below, with argparse on this Python: the imports
    alone, and a bare argparse program with as many options as bridge's printing
    its help."""
    options = len(bridge.build_parser()._actions)
    cli = ("import argparse; p = argparse.ArgumentParser(prog='bridge', usage='bridge [options]', "
           "formatter_class=lambda prog: argparse.HelpFormatter(prog, width=100)); "
           f"[p.add_argument(f'--option-{{n}}', help='what this option does, in a few words ' * 3) "
           f"for n in range({options})]; p.parse_args(['--help'])")
    return {"import argparse": [sys.executable, "-c", "import argparse"],
            f"an argparse CLI of {options} options printing its help": [sys.executable, "-c", cli],
            "import sqlite3, argparse": [sys.executable, "-c", "import sqlite3, argparse"]}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        db, empty = Path(tmp) / "store.db", Path(tmp) / "empty.db"
        built = build_store(db)
        bridge.Store.create(empty)
        count = sqlite3.connect(db).execute("SELECT count(*) FROM memories").fetchone()[0]
        floors = floor_commands()
        medians = medians_s({"bare": [sys.executable, "-c", "import sqlite3"], "help": [*BRIDGE, "--help"],
                       "empty": [*BRIDGE, "--list", "--db", str(empty)],
                       "list": [*BRIDGE, "--list", "--db", str(db)], **floors})
    bare, help_s, empty_s, list_s = (medians[k] for k in ("bare", "help", "empty", "list"))
    print(f"store: {count} memories ({PLANS} plans), built in {built:.1f} s")
    print(f"bare interpreter {bare * 1000:.1f} ms; --help {help_s * 1000:.1f} ms; --list {list_s * 1000:.1f} ms "
          f"({empty_s * 1000:.1f} ms on an empty store)")
    print("floors, without bridge: " + "; ".join(f"{name} {medians[name] / bare:.2f}x" for name in floors))
    print(f"startup: --help {help_s / bare:.2f}x, --list on {count} memories {list_s / bare:.2f}x "
          f"(empty store {empty_s / bare:.2f}x) the bare interpreter (medians of {RUNS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
