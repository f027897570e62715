"""The first page stays true: every action flag, every flag and every environment
variable bridge reads is named in the module docstring and in the README."""

import re
from pathlib import Path

import bridge

ROOT = Path(bridge.__file__).resolve().parent
SOURCE = (ROOT / "bridge.py").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")

# every way bridge.py reads a variable: environ.get("X"), environ["X"], "X" in environ,
# and the variable of each row of the settings table (bridge.SETTINGS)
_READS = (r'environ(?:\.get)?[(\[]\s*"([A-Z][A-Z0-9_]+)"', r'"([A-Z][A-Z0-9_]+)"\s+(?:not\s+)?in\s+environ')


def env_vars_read() -> set[str]:
    return {name for pattern in _READS for name in re.findall(pattern, SOURCE)} | \
        {row.env for row in bridge.SETTINGS}


def test_the_scan_finds_variables_bridge_is_known_to_read():
    # the scan itself must work, or the tests below pass on nothing
    assert {"BRIDGE_DB", "BRIDGE_BASE_URL", "MCP_MEMORY_SQLITE_PATH", "BRIDGE_DEBUG"} <= env_vars_read()


def test_every_environment_variable_read_is_documented():
    doc = bridge.__doc__
    assert [v for v in sorted(env_vars_read()) if v not in doc] == []
    assert [v for v in sorted(env_vars_read()) if v not in README] == []


def _long_flags(group_title: str | None = None) -> list[str]:
    parser = bridge.build_parser()
    actions = parser._actions
    if group_title == "actions":
        actions = [a for g in parser._mutually_exclusive_groups for a in g._group_actions
                   if any(o in ("--plan", "--list") for o in g._group_actions[0].option_strings)]
    return sorted(o for a in actions for o in a.option_strings if o.startswith("--") and o != "--help")


def test_every_action_is_on_the_first_page():
    actions = _long_flags("actions")
    assert "--list" in actions and "--health" in actions
    assert [a for a in actions if not re.search(re.escape(a) + r"\b", bridge.__doc__)] == []


def test_every_flag_is_on_the_first_page_and_in_a_readme_table():
    flags = _long_flags()
    assert "--db" in flags and "--plan" in flags
    assert [f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", bridge.__doc__)] == []
    tables = "\n".join(line for line in README.splitlines() if line.startswith("|"))
    assert [f for f in flags if f != "--version" and not re.search(re.escape(f) + r"(?![\w-])", tables)] == []


def _readme_tables() -> str:
    return "\n".join(line for line in README.splitlines() if line.startswith("|"))


def test_every_setting_row_is_on_the_first_page_and_in_the_readme_configuration_table():
    """The settings table builds --help, resolve_config and Config; each row's flag and
    variable are named on the first page and in the README's Configuration table."""
    rows = bridge.SETTINGS
    assert len(rows) > 20 and {"--db", "--keep-runs"} <= {row.flag for row in rows}
    assert set(bridge.Config._fields) >= {row.field for row in rows}
    doc = bridge.__doc__
    config = README[README.index("### Configuration"):README.index("### Model servers")]
    table = "\n".join(line for line in config.splitlines() if line.startswith("|"))
    for row in rows:
        for name in (row.flag, row.env):
            assert re.search(re.escape(name) + r"(?![\w-])", doc), f"{name} not on the first page"
            assert re.search(re.escape(name) + r"(?![\w-])", table), f"{name} not in README's table"


def test_every_action_and_modifier_row_is_on_the_first_page_and_in_the_readme():
    """The actions table builds the action group, main's dispatch and the flag checks:
    each action and modifier is on the first page and in a README table, and each
    handler it names is a function of bridge."""
    assert [row.flag for row in bridge.ACTIONS][:2] == ["--plan", "--list"]
    flags = [row.flag for row in (*bridge.ACTIONS, *bridge.MODIFIERS)]
    assert [f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", bridge.__doc__)] == []
    assert [f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", _readme_tables())] == []
    assert [row.handler for row in bridge.ACTIONS if not callable(getattr(bridge, row.handler, None))] == []
    modifiers = {row.flag for row in bridge.MODIFIERS}
    assert [f for row in bridge.ACTIONS for f in row.modifiers if f not in modifiers] == []


def test_every_action_is_in_the_readme_usage_block():
    usage = README[README.index("## Usage"):README.index("### Configuration")]
    block = "\n".join(line for line in usage.splitlines() if line.startswith("bridge"))
    assert [a for a in _long_flags("actions") if not re.search(re.escape(a) + r"(?![\w-])", block)] == []


def _rooms() -> list[tuple[int, int, str]]:
    """(first line, number, title) of every room banner, in file order."""
    lines = SOURCE.split("\n")
    return [(n + 1, int(m.group(1)), m.group(2)) for n, line in enumerate(lines)
            if (m := re.match(r"# (\d+)\. (.*)", line)) and lines[n - 1] == "#" * 79]


def test_the_rooms_on_the_first_page_are_the_rooms_in_the_file():
    rooms = _rooms()
    assert [number for _, number, _ in rooms] == list(range(1, len(rooms) + 1))
    listed = " ".join(bridge.__doc__.split("the command line:", 1)[1].split())
    assert listed == " · ".join(f"{number} {title}" for _, number, title in rooms)


def test_each_room_uses_only_names_from_the_rooms_above_it():
    import ast

    starts = [(line, number) for line, number, _ in _rooms()]

    def room_of(line: int) -> int:
        return max((number for start, number in starts if start <= line), default=0)

    tree = ast.parse(SOURCE)
    defined = {}
    for node in tree.body:
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        for name in names:
            defined[name] = room_of(node.lineno)
    later = sorted({(room_of(node.lineno), getattr(node, "name", "?"), sub.id)
                    for node in tree.body for sub in ast.walk(node)
                    if isinstance(sub, ast.Name) and defined.get(sub.id, 0) > room_of(node.lineno)})
    assert later == []
