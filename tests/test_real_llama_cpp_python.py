"""Issue 21 on the real llama-cpp-python server (SmolLM2-135M, n_ctx 2048, started as
examples/llama_server.py starts it: --interrupt_requests left at its default, True).
`make test-real` runs it; `make test` skips it (marker real_model).

- a prompt over the server's context fails once, naming the tokens and the context;
- two bridges started at once on one server both finish their plans: each stream the
  other cut is sent again after a wait (the figures are printed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import llama_server  # noqa: E402

import bridge  # noqa: E402
from fakes import child_env, insert_plan, make_plan, make_store, steps_by_id  # noqa: E402

pytestmark = pytest.mark.real_model


def test_a_prompt_over_the_context_fails_once_naming_tokens_and_context(
        real_server, tmp_path, capsys):
    db = make_store(tmp_path / "s.db", "12.x-fresh")
    big = " ".join(f"{n}" for n in range(3000))            # number-dense: ~1.85 characters a token
    insert_plan(db, make_plan("over", [{"id": 1, "prompt": f"Add these: {big}", "max_retries": 2}]))
    rc = bridge.main(["--db", str(db), "--base-url", real_server, "--json", "--retry-delay", "0",
                      "--state-dir", str(tmp_path / "st")], environ={"HOME": str(tmp_path)})
    out, err = capsys.readouterr()
    assert rc == 1, err
    step = steps_by_id(json.loads(out)["plans"][0])[1]
    assert step["attempts"] == 1, err
    said = f"maximum context length is {llama_server.CONTEXT_TOKENS} tokens"
    assert said in step["error"], step["error"]
    assert "in the messages" in step["error"]


def test_two_bridges_at_once_on_one_server_both_finish(real_server, tmp_path, capsys):
    runs = []
    for name in ("a", "b"):
        db = make_store(tmp_path / f"{name}.db", "12.x-fresh")
        insert_plan(db, make_plan(f"two-{name}", [
            {"id": i, "prompt": f"Write one short sentence about the number {i}.", "max_tokens": 48,
             "max_retries": 0} for i in range(1, 5)]))
        argv = [sys.executable, str(ROOT / "bridge.py"), "--db", str(db), "--base-url", real_server,
                "--state-dir", str(tmp_path / f"st-{name}"), "--json"]
        runs.append((name, argv))
    started = time.monotonic()
    env = child_env(HOME=str(tmp_path))
    procs = [(name, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env), time.monotonic())
             for name, argv in runs]
    figures = []
    for name, proc, began in procs:
        out, err = proc.communicate(timeout=600)
        elapsed = time.monotonic() - began
        assert proc.returncode == 0, err
        [result] = json.loads(out)["plans"]
        assert result["status"] == "completed", err
        cuts = err.count("ended the stream")
        figures.append(f"bridge {name}: {elapsed:.1f} s, {cuts} cut(s) said")
    with capsys.disabled():
        print(f"\n[two bridges] {'; '.join(figures)}; {time.monotonic() - started:.1f} s in all")
