"""Shared set-up for the benchmarks: a store with plans, and the fake server of the tests."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import bridge  # noqa: E402
from fakes import FakeLLM  # noqa: E402  (a real HTTP server on 127.0.0.1)

__all__ = ["ROOT", "bridge", "FakeLLM", "store_with_plan"]


def store_with_plan(folder: Path, steps: list[dict], plan_id: str = "bench") -> Path:
    """Create a fresh 12.x store in folder holding one pending plan; return its path."""
    db = folder / "store.db"
    bridge.Store.create(db)
    plan = {"$schema": bridge.SCHEMA_ID, "id": plan_id, "status": "pending",
            "context": {"objective": "benchmark"}, "steps": steps}
    with bridge.Store.open(bridge.Config(db_paths=(db,))) as store:
        store.submit(plan)
    return db
