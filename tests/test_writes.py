"""The rooms "File writes inside the project" and "File transactions": FileTransaction, atomic_write, and file handling via main()."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

import bridge
from fakes import check_store, insert_plan, make_plan, make_store, run_json, snapshot, stored_results

ORIGINAL_BIN = b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary \x80\x81 not utf-8 \xc3\x28\n"


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def tree(root: Path) -> set[str]:
    """Every file and folder below root, as relative POSIX paths."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def journal(run_dir: Path) -> list[dict]:
    path = run_dir / "journal.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return tmp_path / "state" / "runs" / "run-1"


@pytest.fixture
def outside(tmp_path) -> Path:
    p = tmp_path / "outside"
    p.mkdir()
    return p


@pytest.fixture
def folder(tmp_path) -> Path:
    p = tmp_path / "atomic"
    p.mkdir()
    return p


@pytest.fixture
def ft(project, run_dir) -> bridge.FileTransaction:
    return bridge.FileTransaction(project, run_dir)


# --------------------------------------------------------------------------------------
# write
# --------------------------------------------------------------------------------------

def test_write_creates_file_and_nested_folders_with_exact_content(project, ft):
    text = "héllo\r\nwörld\n\ttabs and trailing spaces   \n"

    change = ft.write("pkg/sub/mod.py", text)

    assert (project / "pkg" / "sub" / "mod.py").read_bytes() == text.encode("utf-8")
    assert change.action == "created"
    assert change.backup is None
    assert change.created_dirs == [project / "pkg", project / "pkg" / "sub"]
    assert ft.summary() == [{"path": "pkg/sub/mod.py", "action": "created"}]


def test_write_replaces_existing_file_content_exactly(project, ft):
    (project / "README.md").write_bytes(ORIGINAL_BIN)

    change = ft.write("README.md", "new readme\n")

    assert (project / "README.md").read_bytes() == b"new readme\n"
    assert change.action == "modified"
    assert ft.summary() == [{"path": "README.md", "action": "modified"}]


def test_write_keeps_permission_bits_of_modified_file(project, ft):
    script = project / "run.sh"
    script.write_text("#!/bin/sh\necho old\n")
    script.chmod(0o751)

    ft.write("run.sh", "#!/bin/sh\necho new\n")

    assert mode_of(script) == 0o751
    assert script.read_text() == "#!/bin/sh\necho new\n"


def test_created_file_gets_the_usual_umask_mode(project, ft):
    """A new file is created like any other (0o666 minus the umask), not mkstemp's private 0o600."""
    old = os.umask(0o022)
    try:
        ft.write("new.py", "x = 1\n")
    finally:
        os.umask(old)

    assert mode_of(project / "new.py") == 0o644


def test_successful_writes_leave_no_temp_backup_or_other_extra_file_in_project(project, ft):
    """After success the project holds exactly its files plus the outputs (original defect 19)."""
    (project / "README.md").write_bytes(ORIGINAL_BIN)
    (project / "src").mkdir()
    (project / "src" / "app.py").write_text("print('app')\n")
    before = tree(project)

    ft.write("README.md", "first\n")
    ft.write("README.md", "second\n")
    ft.write("src/app.py", "print('new app')\n")
    ft.write("src/new.py", "x = 1\n")
    ft.write("pkg/sub/x.py", "y = 2\n")
    ft.discard()

    after = tree(project)
    assert after == before | {"src/new.py", "pkg", "pkg/sub", "pkg/sub/x.py"}
    assert not [p for p in after if p.endswith((".bridge-tmp", ".bak")) or "~" in p]
    assert (project / "README.md").read_bytes() == b"second\n"


def test_backups_live_under_run_dir_and_discard_removes_them(project, run_dir, ft):
    (project / "a.bin").write_bytes(ORIGINAL_BIN)

    change = ft.write("a.bin", "replaced")

    assert change.backup is not None
    assert change.backup.resolve().is_relative_to(run_dir.resolve())
    assert not change.backup.resolve().is_relative_to(project.resolve())
    assert change.backup.read_bytes() == ORIGINAL_BIN

    ft.discard()

    assert not change.backup.exists()
    assert not (run_dir / "backups").exists()
    assert (project / "a.bin").read_bytes() == b"replaced"     # discard keeps the new content


def test_journal_gets_one_entry_per_path(project, run_dir, ft):
    (project / "keep.txt").write_bytes(ORIGINAL_BIN)

    ft.write("keep.txt", "one")
    ft.write("dir/new.txt", "two")
    ft.write("keep.txt", "three")
    ft.write("dir/new.txt", "four")

    entries = journal(run_dir)
    assert [(e["path"], e["action"]) for e in entries] == [("keep.txt", "modified"), ("dir/new.txt", "created")]
    assert Path(entries[0]["backup"]).read_bytes() == ORIGINAL_BIN
    assert entries[1]["backup"] == ""
    assert entries[1]["created_dirs"] == [str(project / "dir")]


def test_journal_entry_is_written_before_the_file_changes(project, run_dir, ft, monkeypatch):
    """When the write itself then fails, the journal already names the path."""
    (project / "blocker").write_text("the original")

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(bridge, "_replace_in", refuse)
    with pytest.raises(bridge.PathError, match="No space left"):
        ft.write("blocker", "never written")

    entries = journal(run_dir)
    assert [e["path"] for e in entries] == ["blocker"]
    assert (project / "blocker").read_text() == "the original"


def test_a_file_where_a_folder_is_needed_fails_before_anything_changes(project, run_dir, ft):
    (project / "blocker").write_text("a file where a folder is needed")

    with pytest.raises(bridge.PathError, match="not a folder"):
        ft.write("blocker/inner.txt", "never written")

    assert (project / "blocker").read_text() == "a file where a folder is needed"
    assert not (run_dir / "journal.jsonl").exists()


@pytest.mark.parametrize("rel", ["/ABS", "../outside/escape.txt", "pkg/../../outside/escape.txt",
                                 "..\\outside\\escape.txt", "C:\\outside\\escape.txt", "link/escape.txt",
                                 "link/deeper/escape.txt", "file-link"])
def test_write_refuses_paths_leaving_the_project_and_writes_nothing_outside(project, outside, run_dir, rel):
    """(original defect 18)"""
    (project / "link").symlink_to(outside, target_is_directory=True)
    (project / "file-link").symlink_to(outside / "target.txt")
    if rel == "/ABS":
        rel = str(outside / "escape.txt")
    before = snapshot(project)
    ft = bridge.FileTransaction(project, run_dir)

    with pytest.raises(bridge.PathError) as info:
        ft.write(rel, "pwned")

    assert info.value.exit_code == 1
    assert tree(outside) == set()
    assert snapshot(project) == before
    assert ft.changes == {}
    assert ft.summary() == []
    assert not (run_dir / "journal.jsonl").exists()


def test_write_through_symlink_to_existing_outside_file_leaves_it_untouched(project, outside, run_dir):
    """(original defect 18)"""
    target = outside / "victim.txt"
    target.write_bytes(ORIGINAL_BIN)
    (project / "victim.txt").symlink_to(target)
    ft = bridge.FileTransaction(project, run_dir)

    with pytest.raises(bridge.PathError):
        ft.write("victim.txt", "pwned")

    assert target.read_bytes() == ORIGINAL_BIN
    assert tree(outside) == {"victim.txt"}


# --------------------------------------------------------------------------------------
# rollback
# --------------------------------------------------------------------------------------

def test_rollback_restores_modified_files_byte_for_byte(project, run_dir, ft):
    (project / "data.bin").write_bytes(ORIGINAL_BIN)
    (project / "docs").mkdir()
    (project / "docs" / "a.md").write_bytes(b"line one\r\nline two without newline")
    before = snapshot(project)

    ft.write("data.bin", "text now")
    ft.write("docs/a.md", "changed")
    ft.rollback()

    assert snapshot(project) == before
    assert (project / "data.bin").read_bytes() == ORIGINAL_BIN


def test_rollback_restores_permission_bits_of_modified_files(project, ft):
    script = project / "run.sh"
    script.write_text("echo old\n")
    script.chmod(0o750)

    ft.write("run.sh", "echo new\n")
    ft.rollback()

    assert script.read_text() == "echo old\n"
    assert mode_of(script) == 0o750


def test_rollback_removes_created_files_and_the_folders_the_run_made(project, ft):
    (project / "src").mkdir()
    (project / "src" / "keep.py").write_text("keep\n")
    (project / "empty-existing").mkdir()
    before = snapshot(project)

    ft.write("src/new.py", "new\n")
    ft.write("pkg/sub/deep/x.py", "x\n")
    ft.write("pkg/y.py", "y\n")
    ft.write("empty-existing/z.py", "z\n")
    ft.rollback()

    assert snapshot(project) == before          # src and empty-existing stay; pkg is gone
    assert (project / "empty-existing").is_dir()
    assert not (project / "pkg").exists()


def test_rollback_keeps_a_created_folder_in_which_something_else_was_placed(project, ft):
    ft.write("gen/out.txt", "generated")
    (project / "gen" / "user-file.txt").write_text("placed meanwhile")

    ft.rollback()

    assert not (project / "gen" / "out.txt").exists()
    assert (project / "gen" / "user-file.txt").read_text() == "placed meanwhile"
    assert tree(project) == {"gen", "gen/user-file.txt"}


def test_rollback_after_two_writes_to_one_file_restores_the_original(project, run_dir, ft):
    """Two writes to one file: rollback brings back the ORIGINAL, not the first write (original defect 19)."""
    (project / "same.txt").write_bytes(ORIGINAL_BIN)

    ft.write("same.txt", "first write")
    ft.write("same.txt", "second write")
    assert len(journal(run_dir)) == 1
    ft.rollback()

    assert (project / "same.txt").read_bytes() == ORIGINAL_BIN
    assert ft.summary() == [{"path": "same.txt", "action": "reverted"}]


def test_rollback_after_two_writes_to_a_created_file_removes_it(project, ft):
    """(original defect 19)"""
    ft.write("made/twice.txt", "first")
    ft.write("made/twice.txt", "second")

    ft.rollback()

    assert tree(project) == set()


def test_rollback_marks_every_action_reverted_and_drops_backups(project, run_dir, ft):
    (project / "old.txt").write_text("old")

    ft.write("old.txt", "new")
    ft.write("fresh.txt", "fresh")
    assert ft.summary() == [{"path": "old.txt", "action": "modified"},
                            {"path": "fresh.txt", "action": "created"}]
    ft.rollback()

    assert ft.summary() == [{"path": "old.txt", "action": "reverted"},
                            {"path": "fresh.txt", "action": "reverted"}]
    assert not (run_dir / "backups").exists()
    assert not [p for p in tree(project) if p.endswith((".bridge-tmp", ".bak"))]


def test_rollback_error_names_every_file_it_could_not_restore(project, run_dir, ft):
    (project / "a.txt").write_bytes(b"original a")
    (project / "b.txt").write_bytes(b"original b")
    (project / "c.txt").write_bytes(b"original c")

    ft.write("a.txt", "new a")
    ft.write("b.txt", "new b")
    ft.write("c.txt", "new c")
    ft.write("created.txt", "created")
    ft.changes["a.txt"].backup.unlink()
    ft.changes["c.txt"].backup.unlink()

    with pytest.raises(bridge.RollbackError) as info:
        ft.rollback()

    message = str(info.value)
    assert "a.txt" in message
    assert "c.txt" in message
    assert "b.txt" not in message
    assert isinstance(info.value, bridge.PathError)
    assert info.value.exit_code == 1
    # what could be restored was restored, the rest is left as it is
    assert (project / "b.txt").read_bytes() == b"original b"
    assert not (project / "created.txt").exists()
    assert (project / "a.txt").read_bytes() == b"new a"
    actions = {c["path"]: c["action"] for c in ft.summary()}
    assert actions == {"a.txt": "modified", "b.txt": "reverted", "c.txt": "modified",
                       "created.txt": "reverted"}
    # the backups that remain are kept for a manual restore
    assert ft.changes["b.txt"].backup.read_bytes() == b"original b"


# --------------------------------------------------------------------------------------
# atomic_write
# --------------------------------------------------------------------------------------

def test_atomic_write_replaces_the_file_so_an_open_handle_still_reads_the_old_bytes(folder):
    target = folder / "f.txt"
    target.write_bytes(b"old bytes")
    old_inode = target.stat().st_ino

    with open(target, "rb") as handle:
        bridge.atomic_write(target, b"new bytes, longer than before")
        assert handle.read() == b"old bytes"

    assert target.read_bytes() == b"new bytes, longer than before"
    assert target.stat().st_ino != old_inode
    assert {p.name for p in folder.iterdir()} == {"f.txt"}


def test_atomic_write_sets_the_given_mode(folder):
    target = folder / "tool.sh"

    bridge.atomic_write(target, b"#!/bin/sh\n", 0o755)

    assert mode_of(target) == 0o755
    assert target.read_bytes() == b"#!/bin/sh\n"


def test_atomic_write_into_missing_folder_raises_and_leaves_nothing(folder):
    (folder / "existing.txt").write_bytes(b"x")
    before = snapshot(folder)

    with pytest.raises(OSError):
        bridge.atomic_write(folder / "no-such-dir" / "f.txt", b"data")

    assert snapshot(folder) == before


def test_atomic_write_failing_after_the_temp_file_removes_it(folder):
    """os.replace onto a folder fails after the temp file exists: the temp file is removed."""
    (folder / "a-dir").mkdir()
    (folder / "a-dir" / "inside.txt").write_text("x")
    before = snapshot(folder)

    with pytest.raises(OSError):
        bridge.atomic_write(folder / "a-dir", b"data")

    assert snapshot(folder) == before


# --------------------------------------------------------------------------------------
# via main(): runner + files
# --------------------------------------------------------------------------------------

README_BEFORE = b"# Project\r\nOriginal readme \xe2\x9c\x93\n\x00trailing"


def run_plan(capsys, tmp_path, fake_llm, state_dir, plan: dict) -> tuple[int, dict, str, Path]:
    db = make_store(tmp_path / "store.db", "12.x-fresh")
    insert_plan(db, plan)
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, require_output=True)
    return rc, result, err, db


def stored_result(db: Path) -> dict:
    results = stored_results(db)
    assert len(results) == 1
    return results[0]


def failing_plan(project: Path, strategy: str) -> dict:
    return make_plan(id=f"files-{strategy.replace('_', '-')}", rollback_strategy=strategy,
                     context={"objective": "write then fail", "project": str(project)},
                     steps=[
                         {"id": 1, "prompt": "write the module", "file_output": "pkg/new.py",
                          "validation": {"type": "syntax_check"}},
                         {"id": 2, "prompt": "rewrite the readme", "file_output": "README.md"},
                         {"id": 3, "prompt": "give JSON", "depends_on": [1, 2], "max_retries": 0,
                          "validation": {"type": "contains_keys", "keys": ["ok"]}},
                     ])


def enqueue_failing_replies(fake_llm) -> None:
    fake_llm.enqueue("```python\nprint('new')\n```")
    fake_llm.enqueue("# New readme\n")
    fake_llm.enqueue("sorry, no JSON today")


def test_failed_plan_with_revert_files_puts_every_file_back(project, tmp_path, fake_llm, state_dir, capsys):
    """(original defect 19)"""
    (project / "README.md").write_bytes(README_BEFORE)
    before = snapshot(project)
    enqueue_failing_replies(fake_llm)

    rc, result, err, db = run_plan(capsys, tmp_path, fake_llm, state_dir, failing_plan(project, "revert_files"))

    assert rc == 1
    assert result["status"] == "failed"
    assert [s["status"] for s in result["steps"]] == ["succeeded", "succeeded", "failed"]
    assert result["steps"][2]["attempts"] == 1
    assert result["files"] == [{"path": "pkg/new.py", "action": "reverted"},
                               {"path": "README.md", "action": "reverted"}]
    assert "reverted" in err
    check_store(db)
    assert stored_result(db)["files"] == result["files"]
    assert snapshot(project) == before
    assert (project / "README.md").read_bytes() == README_BEFORE
    assert not (project / "pkg").exists()
    assert len(fake_llm.chat_requests) == 3
    assert not list(state_dir.rglob("backups/*"))


def test_failed_plan_with_rollback_none_keeps_its_files(project, tmp_path, fake_llm, state_dir, capsys):
    (project / "README.md").write_bytes(README_BEFORE)
    before = tree(project)
    enqueue_failing_replies(fake_llm)

    rc, result, err, db = run_plan(capsys, tmp_path, fake_llm, state_dir, failing_plan(project, "none"))

    assert rc == 1
    assert result["status"] == "failed"
    assert result["files"] == [{"path": "pkg/new.py", "action": "created"},
                               {"path": "README.md", "action": "modified"}]
    check_store(db)
    assert stored_result(db)["files"] == result["files"]
    assert (project / "pkg" / "new.py").read_text() == "print('new')\n"
    assert (project / "README.md").read_text() == "# New readme"
    assert tree(project) == before | {"pkg", "pkg/new.py"}


def test_successful_run_leaves_exactly_its_outputs_in_the_project(project, tmp_path, fake_llm, state_dir, capsys):
    """No .bak, temp or other stray file after success (original defect 19)."""
    (project / "README.md").write_bytes(README_BEFORE)
    (project / "src").mkdir()
    (project / "src" / "old.py").write_text("old = True\n")
    before = tree(project)
    fake_llm.enqueue("```python\ndef helper():\n    return 42\n```")
    fake_llm.enqueue("# Better readme\n")
    fake_llm.enqueue("```python\nold = False\n```")
    plan = make_plan(id="files-ok", rollback_strategy="revert_files",
                     context={"objective": "ok", "project": str(project)},
                     steps=[{"id": 1, "prompt": "helper", "file_output": "lib/util/helper.py",
                             "validation": {"type": "syntax_check"}},
                            {"id": 2, "prompt": "readme", "file_output": "README.md"},
                            {"id": 3, "prompt": "old", "file_output": "src/old.py",
                             "validation": {"type": "syntax_check", "language": "python"}}])

    rc, result, err, db = run_plan(capsys, tmp_path, fake_llm, state_dir, plan)

    assert rc == 0
    assert result["status"] == "completed"
    assert result["files"] == [{"path": "lib/util/helper.py", "action": "created"},
                               {"path": "README.md", "action": "modified"},
                               {"path": "src/old.py", "action": "modified"}]
    check_store(db)
    assert tree(project) == before | {"lib", "lib/util", "lib/util/helper.py"}
    assert (project / "README.md").read_text() == "# Better readme"
    assert (project / "src" / "old.py").read_text() == "old = False\n"
    kept = list(state_dir.rglob("backups/*"))           # kept for --undo, private
    assert len(kept) == 2 and all(p.stat().st_mode & 0o777 == 0o600 for p in kept)


@pytest.mark.parametrize("reply", [
    "Here is the code:\n```python\ndef f():\n    return 1\n```\nThat's all.",
    "```py\ndef f():\n    return 1\n```",
    "Sure! ```python\ndef f():\n    return 1\n```",
], ids=["python-fence-with-prose", "py-tag", "fence-after-text"])
def test_syntax_checked_python_file_holds_the_code_without_the_fence(project, tmp_path, fake_llm, state_dir,
                                                                     capsys, reply):
    """The file gets the fenced code only, never the fence or the prose (original defect 17)."""
    fake_llm.enqueue(reply)
    plan = make_plan(id="files-fence", context={"project": str(project)},
                     steps=[{"id": 1, "prompt": "write f", "file_output": "mod/f.py",
                             "validation": {"type": "syntax_check"}}])

    rc, result, err, db = run_plan(capsys, tmp_path, fake_llm, state_dir, plan)

    assert rc == 0
    check_store(db)
    assert (project / "mod" / "f.py").read_text() == "def f():\n    return 1\n"
    assert result["steps"][0]["output"] == "def f():\n    return 1\n"
    assert tree(project) == {"mod", "mod/f.py"}
