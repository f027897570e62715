"""The Claude Code skill (examples/claude/skills/bridge/) stays true to Claude Code and to
bridge: its frontmatter uses only the keys Claude Code documents; every command it tells
Claude to run (its ```sh lines, its `bridge …` spans and its !`…` injections) runs, as a
subprocess against the fake LLM server and a temporary store, and exits as the skill
says; its flags, statuses, events, price rows and JSON fields are bridge's.

Claude Code's skill frontmatter, per code.claude.com/docs/en/skills (its frontmatter
reference, as public copies of it list the fields): name, description, when_to_use,
argument-hint, arguments, disable-model-invocation, user-invocable, allowed-tools,
disallowed-tools, model, effort, context, agent, hooks, paths, shell."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import bridge
from fakes import closed_port, read_rows

ROOT = Path(__file__).resolve().parent.parent
SKILL_DIR = ROOT / "examples" / "claude" / "skills" / "bridge"
SKILL = (SKILL_DIR / "SKILL.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCUMENTED_KEYS = {
    "name",
    "description",
    "when_to_use",
    "argument-hint",
    "arguments",
    "disable-model-invocation",
    "user-invocable",
    "allowed-tools",
    "disallowed-tools",
    "model",
    "effort",
    "context",
    "agent",
    "hooks",
    "paths",
    "shell",
}
PLAN_ID = "slug-run-1"


def frontmatter() -> tuple[dict[str, str], str]:
    """(the frontmatter's key: value pairs, the body). The skill keeps its frontmatter
    flat: one `key: value` a line, so this small reader is the whole of YAML it uses."""
    assert SKILL.startswith("---\n")
    head, _, body = SKILL[4:].partition("\n---\n")
    pairs = {}
    for line in head.splitlines():
        match = re.fullmatch(r"([a-z][a-z_-]*): (.+)", line)
        assert match, f"not a flat `key: value` line: {line!r}"
        key, value = match.groups()
        assert key not in pairs, f"{key} twice"
        pairs[key] = value[1:-1] if value.startswith('"') and value.endswith('"') else value
    return pairs, body


def skill_commands() -> list[str]:
    """Every command the skill tells Claude to run: lines of ```sh blocks, the !`…`
    injections and each `bridge …` code span of the prose, in order, deduplicated."""
    _, body = frontmatter()
    found = re.findall(r"!`([^`]+)`", body)
    for block in re.findall(r"```sh\n(.*?)```", body, re.S):
        found += [line.strip() for line in block.splitlines() if line.strip()]
    found += re.findall(r"(?<![!`])`(bridge [^`]+)`", body)
    return list(dict.fromkeys(found))


# --------------------------------------------------------------------------------------
# the frontmatter
# --------------------------------------------------------------------------------------


def test_the_frontmatter_uses_only_documented_keys_and_guards_side_effects():
    pairs, _ = frontmatter()
    assert set(pairs) <= DOCUMENTED_KEYS, set(pairs) - DOCUMENTED_KEYS
    assert pairs["name"] == SKILL_DIR.name and re.fullmatch(r"[a-z0-9-]{1,64}", pairs["name"])
    assert (
        pairs["disable-model-invocation"] == "true"
    )  # it writes a shared store: the user invokes it
    assert pairs["argument-hint"] and len(pairs["description"]) <= 1024


def test_allowed_tools_are_scoped_to_what_the_skill_runs():
    pairs, _ = frontmatter()
    tools = re.findall(r"\S+\([^)]*\)|\S+", pairs["allowed-tools"])
    assert "Write" not in tools and "Bash" not in tools and "Edit" not in tools  # nothing unscoped
    assert [t for t in tools if t.startswith("Edit(")] == ["Edit(.bridge/plans/**)"]
    bash = [t[5:-1] for t in tools if t.startswith("Bash(")]
    assert all(re.fullmatch(r"bridge --[a-z-]+ \*", rule) for rule in bash), bash
    granted = {rule.split()[1] for rule in bash}
    assert not granted & {"--approve", "--trust", "--untrust", "--cancel"}  # the user's decisions
    used = {cmd.split()[1] for cmd in skill_commands()} - {"--approve"}
    assert used == granted, used ^ granted
    assert {t for t in tools if t.startswith("mcp__")} <= {
        "mcp__memory__memory_search",
        "mcp__memory__memory_list",
    }


def test_the_supporting_files_are_bridges_own():
    assert (SKILL_DIR / "bridge-plan-schema.json").read_bytes() == (
        ROOT / "bridge-plan-schema.json"
    ).read_bytes()
    example = json.loads((SKILL_DIR / "example-plan.json").read_text())
    assert (
        "${CLAUDE_SKILL_DIR}/bridge-plan-schema.json" in SKILL
        and "${CLAUDE_SKILL_DIR}/example-plan.json" in SKILL
    )
    for part in [example.get("defaults") or {}, *example["steps"]]:
        assert not {"temperature", "top_p", "seed"} & set(part)  # sampling is left to bridge


def test_the_skills_claims_about_bridge_are_true():
    _, body = frontmatter()
    flags = {o for a in bridge.build_parser()._actions for o in a.option_strings}
    assert {f for f in re.findall(r"(?<![\w-])--[a-z][a-z-]+", body)} <= flags
    for status in ("pending", "awaiting_approval", "awaiting_review"):
        assert status in body
    assert set(re.findall(r"`(claude-(?:opus|sonnet|haiku)-[0-9-]+)`", body)) == set(
        bridge.CLAUDE_PRICES_USD_PER_MTOK
    )
    for event in ("plan_start", "step_start", "attempt_failed", "step_end", "plan_end", "error"):
        assert f"`{event}`" in body and event in bridge.EVENT_KINDS
    assert "`delta`" not in body  # the Monitor stream has none
    assert "temperature" in body and "Leave sampling to bridge" in body


def test_the_readme_installs_the_skill_in_one_line():
    assert "cp -r examples/claude/skills/bridge ~/.claude/skills/" in README


# --------------------------------------------------------------------------------------
# every command the skill runs, in the order of its procedure
# --------------------------------------------------------------------------------------


@pytest.fixture
def loop(tmp_path, fake_llm):
    """A user's machine: a HOME with no store yet, a project, `bridge` on PATH (this
    checkout's bridge.py), BRIDGE_BASE_URL at the fake server."""
    home, project, bin_dir = tmp_path / "home", tmp_path / "shop", tmp_path / "bin"
    for folder in (home, project, bin_dir):
        folder.mkdir(exist_ok=True)
    (bin_dir / "bridge").write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "bridge.py"}" "$@"\n'
    )
    (bin_dir / "bridge").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "MCP_"))}
    env.update(
        HOME=str(home),
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        BRIDGE_BASE_URL=fake_llm.url,
        BRIDGE_RETRY_DELAY="0",
        XDG_STATE_HOME=str(tmp_path / "state"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
    )
    (project / "pyproject.toml").write_text('[project]\nname = "shop"\n')
    plans = project / ".bridge" / "plans"
    plans.mkdir(parents=True)

    def write_plan(plan_id: str, commands: bool = True) -> Path:
        plan = json.loads((SKILL_DIR / "example-plan.json").read_text())
        plan["id"], plan["context"]["project"] = plan_id, str(project)
        plan["steps"][1]["validation"][1]["run"][0] = sys.executable  # pytest is in the test venv
        if not commands:  # what --review can run
            plan["steps"][1]["validation"].pop(1)
        path = plans / f"{plan_id}.json"
        path.write_text(json.dumps(plan, indent=2))
        return path

    def run(command: str, plan_id: str = PLAN_ID, extra: tuple = ()) -> subprocess.CompletedProcess:
        text = (
            command.replace("${CLAUDE_PROJECT_DIR}", str(project))
            .replace("${CLAUDE_SKILL_DIR}", str(SKILL_DIR))
            .replace("PLAN_ID", plan_id)
        )
        argv = shlex.split(text) + list(extra)
        assert argv[0] == "bridge", command
        return subprocess.run(
            argv, env=env, cwd=project, capture_output=True, text=True, timeout=60
        )

    def enqueue_slug_run() -> None:
        fake_llm.enqueue(
            "```python\nfrom slug import slugify\n\n\ndef test_slugify():\n"
            "    assert slugify('Hello, World!') == 'hello-world'\n"
            "    assert slugify('  a  b ') == 'a-b'\n```"
        )
        fake_llm.enqueue(
            "```python\nimport re\n\n\ndef slugify(s: str) -> str:\n"
            "    return re.sub(r'[^a-z0-9]+', '-', s.lower()).strip('-')\n```"
        )
        fake_llm.enqueue("It turns text into a lowercase, dash-separated slug.")

    return {
        "home": home,
        "project": project,
        "write_plan": write_plan,
        "run": run,
        "env": env,
        "enqueue": enqueue_slug_run,
    }


def test_every_command_of_the_skill_runs_and_exits_as_it_says(loop, fake_llm):
    commands = skill_commands()
    ran: set[str] = set()
    run = loop["run"]

    def step(
        command: str, rc: int, plan_id: str = PLAN_ID, extra: tuple = ()
    ) -> subprocess.CompletedProcess:
        done = run(command, plan_id, extra)
        assert done.returncode == rc, (
            command,
            done.returncode,
            done.stdout[-2000:],
            done.stderr[-2000:],
        )
        ran.add(command)
        return done

    def the(prefix: str) -> str:
        (command,) = [c for c in commands if c.startswith(prefix)]
        return command

    # the injections: no store yet, so --health exits 2 and names the default to make
    health = json.loads(step(the("bridge --health"), 2).stdout)
    assert health["server"]["reachable"] is True
    server = health["server"]
    assert (server["model"], server["context_length"], server["slots"]) == ("fake-model", 4096, 1)
    assert "no memory store found" in health["store"]["error"]
    default_store = re.search(r"tried (\S+?)[,)]", health["store"]["error"]).group(1)
    assert json.loads(step(the("bridge --stats"), 0).stdout)["models"] == {}

    # 2. check and store (the first submit makes the store where the server looks)
    loop["write_plan"](PLAN_ID)
    assert "valid" in step(the("bridge --validate"), 0).stdout
    refused = run(the("bridge --submit"), extra=("--db", default_store))
    assert refused.returncode == 2 and "does not exist" in refused.stderr  # the skill asks the user
    Path(default_store).parent.mkdir(parents=True)                             # the user: mkdir -p
    submitted = json.loads(step(the("bridge --submit"), 0, extra=("--db", default_store)).stdout)
    assert submitted["plan_id"] == PLAN_ID and submitted["db"] == default_store
    missing_store, health = health, json.loads(run(the("bridge --health")).stdout)
    down = json.loads(
        run(
            the("bridge --health"),
            extra=("--base-url", f"http://127.0.0.1:{closed_port()}/v1", "--retries", "0"),
        ).stdout
    )
    assert health["ok"] is True and health["store"]["path"] == default_store
    # every --health field the skill reads is there (in a good or a failing report)
    _, body = frontmatter()
    for part, key in re.findall(r"`(server|store)\.([a-z_]+)`", body):
        assert any(key in doc[part] for doc in (health, missing_store, down)), f"{part}.{key}"
    assert "`memory_setting`" in body and "memory_setting" in health
    (row,) = json.loads(step(the("bridge --list"), 0).stdout)["plans"]
    assert row["id"] == PLAN_ID and row["status"] == "awaiting_approval"
    assert row["approval"]["project"] == str(loop["project"])
    assert f"bridge --approve {PLAN_ID}" in row["approval"]["commands"]
    waiting = run(the("bridge --plan"))  # unapproved: it waits, nothing runs
    assert (
        waiting.returncode == 0 and waiting.stdout == "" and "awaiting approval" in waiting.stderr
    )
    step(the("bridge --approve"), 0)  # the user's yes

    # 3. run and watch: a line per step and plan event
    loop["enqueue"]()
    done = step(the("bridge --plan"), 0)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [e["event"] for e in events] == ["plan_start"] + ["step_start", "step_end"] * 3 + [
        "plan_end"
    ]
    assert events[-1]["status"] == "completed"
    assert (loop["project"] / "slug.py").exists()

    # 4. review
    shown = json.loads(step(the("bridge --show"), 0).stdout)
    report = body[body.index("## 6. Report") :]
    for key in (
        "local_tokens",
        "would_have_cost_usd",
        "price_model",
        "retries",
        "escalations",
        "paid_usd",
    ):
        assert f"`{key}`" in report and key in shown["savings"], key
    assert [s["status"] for s in shown["steps"]] == ["succeeded"] * 3
    assert (
        shown["savings"]["price_model"] == "claude-opus-4-5"
        and shown["savings"]["local_tokens"] > 0
    )
    assert "+def slugify" in step(the("bridge --diff"), 0).stdout

    # 5. take back
    step(the("bridge --undo"), 0)
    assert not (loop["project"] / "slug.py").exists() and not (loop["project"] / "tests").exists()

    # a --review run: staged, then applied; another staged, then rejected
    for plan_id, verdict in (("slug-run-2", "bridge --apply"), ("slug-run-3", "bridge --reject")):
        loop["write_plan"](plan_id, commands=False)
        step(the("bridge --submit"), 0, plan_id)
        run(the("bridge --approve"), plan_id)
        loop["enqueue"]()
        staged = run(the("bridge --plan"), plan_id, ("--review",))
        assert staged.returncode == 0, staged.stderr
        assert json.loads(staged.stdout.splitlines()[-1])["status"] == "awaiting_review"
        assert not (loop["project"] / "slug.py").exists()
        step(the(verdict), 0, plan_id)
        assert (loop["project"] / "slug.py").exists() == (verdict == "bridge --apply")
        if verdict == "bridge --apply":  # an applied run is undone like any other
            step(the("bridge --undo"), 0, plan_id)

    # 6. what the report reads: the result memory names and tags the project
    results = [r for r in read_rows(default_store) if r["memory_type"] == "tool_outcome"]
    assert all("shop" in r["tags"].split(",") for r in results) and len(results) == 3
    stats = json.loads(run(the("bridge --stats")).stdout)["models"]["fake-model"]
    assert stats["non_empty"]["first_attempt"] == 3 and stats["command"]["first_attempt"] == 1

    assert set(commands) == ran, set(commands) ^ ran


def test_validate_exits_1_with_every_problem_as_the_skill_says(loop):
    path = loop["write_plan"](PLAN_ID)
    plan = json.loads(path.read_text())
    plan["steps"][0]["depends_on"] = [9]
    plan["steps"][1]["on_failure"] = "retry"
    path.write_text(json.dumps(plan))
    (command,) = [c for c in skill_commands() if c.startswith("bridge --validate")]
    done = loop["run"](command)
    assert done.returncode == 1
    assert "$.steps[0].depends_on" in done.stdout and "$.steps[1].on_failure" in done.stdout


def test_the_skill_carries_the_schema_bridge_checks_plans_with():
    """The skill's copy of the schema (installed with it by cp -r) is bridge's own, byte for
    byte: a plan the planner writes to it is checked against the same rules."""
    shipped = (ROOT / "bridge-plan-schema.json").read_bytes()
    assert (ROOT / "examples" / "claude" / "skills" / "bridge" / "bridge-plan-schema.json").read_bytes() \
        == shipped
