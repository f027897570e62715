"""Issue 20 (hostile input, round 3), the path rows, each with the attack as the probe ran
it (the real CLI in-process, the fake server on 127.0.0.1, a temporary HOME) and variants
of its class the table did not list:

| # | attack | before | after |
|---|---|---|---|
| 1 | `context.project` = a repo's `.git` under a trusted folder; `file_output` `config`, `hooks/pre-commit` | written, no approval asked | plan invalid ("lies inside .git/"), nothing written, nothing sent |
| 2 | `file_output` `.hg/hgrc` with `[hooks]` | written | refused like `.git/` (any VCS folder, any case) |
| 7 | trusted project `LOAD`s `.npmrc`, `.git/config`, `.git-credentials`, `.pypirc`, `.envrc`, `id_rsa.bak`, `.docker/config.json`, `.kube/config`, `terraform.tfstate`, `credentials.json`, `.htpasswd`, `.streamlit/secrets.toml` | all sent to the model and stored | each refused by SECRET_LOAD_TABLE; nothing sent or stored |
| 11 | parallel steps writing `x.py` and `./x.py`; step 1's check fails | not serialised; step 1's revert removed step 2's file | one file: serialised, journaled and reported as `x.py` |
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import bridge
from fakes import check_store, insert_plan, make_plan, run_json, snapshot, stored_results

HOOK = "#!/bin/sh\ntouch /tmp/pwned\n"


def fake_git_dir(folder: Path) -> Path:
    """A git directory as `git init` leaves it (HEAD, config, objects/, refs/, hooks/)."""
    for sub in ("objects", "refs/heads", "hooks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "config").write_text("[core]\n\trepositoryformatversion = 0\n")
    return folder


def writes(project: Path, outputs: list[str], plan_id: str = "vcs") -> dict:
    steps = [{"id": n, "prompt": f"write {rel}", "file_output": rel, "max_retries": 0}
             for n, rel in enumerate(outputs, 1)]
    return make_plan(plan_id, steps, context={"objective": "write", "project": str(project)})


def assert_refused(capsys, db, fake_llm, state_dir, watched: Path) -> dict:
    """Run every pending plan; the plan is recorded failed with VCS problems, nothing
    is sent, nothing under `watched` changes."""
    before = snapshot(watched)
    fake_llm.default_reply = "[core]\n\tfsmonitor = touch /tmp/pwned\n"
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, require_output=True)
    assert rc == 1, err
    assert result["status"] == "failed" and result["problems"], result
    assert all("never writes" in p for p in result["problems"]), result["problems"]
    assert fake_llm.chat_requests == []
    assert snapshot(watched) == before
    check_store(db)
    return result


# --------------------------------------------------------------------------------------
# Row 1: the project path itself is (inside) a VCS folder or a git directory
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("outputs", [["config"], ["hooks/pre-commit"]])
def test_row1_a_project_that_is_a_repos_git_folder_is_never_written(capsys, db, project, fake_llm,
                                                                     state_dir, outputs):
    """As the probe ran it: a repo under a trusted folder, the plan's project its .git."""
    repo = project / "repo"
    fake_git_dir(repo / ".git")
    insert_plan(db, writes(repo / ".git", outputs))
    result = assert_refused(capsys, db, fake_llm, state_dir, repo)
    assert any("lies inside .git/" in p for p in result["problems"])


PROJECT_VARIANTS = {
    "hooks folder itself": lambda repo: fake_git_dir(repo / ".git") / "hooks",
    "upper-case .GIT": lambda repo: fake_git_dir(repo / ".GIT"),
    "worktree gitdir": lambda repo: fake_git_dir(fake_git_dir(repo / ".git") / "worktrees" / "wt"),
    "separate gitdir (any name)": lambda repo: fake_git_dir(repo / "elsewhere.gitdir"),
    "bare repository": lambda repo: fake_git_dir(repo / "bare"),
    "mercurial .hg": lambda repo: _folder(repo / ".hg"),
    "subversion .svn": lambda repo: _folder(repo / ".svn"),
    "jujutsu .jj/repo": lambda repo: _folder(repo / ".jj" / "repo"),
    "bazaar .bzr": lambda repo: _folder(repo / ".bzr"),
    "darcs _darcs": lambda repo: _folder(repo / "_darcs"),
}


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


@pytest.mark.parametrize("variant", sorted(PROJECT_VARIANTS))
def test_row1_variants_of_a_project_inside_a_vcs_folder(capsys, db, project, fake_llm, state_dir,
        variant):
    repo = project / "repo"
    repo.mkdir()
    target = PROJECT_VARIANTS[variant](repo)
    insert_plan(db, writes(target, ["config", "hooks/post-checkout"]))
    assert_refused(capsys, db, fake_llm, state_dir, repo)


def test_row1_a_project_given_through_a_symlink_into_git(capsys, db, project, fake_llm, state_dir):
    """project = a symlink inside the trusted folder pointing at the repo's .git."""
    repo = project / "repo"
    fake_git_dir(repo / ".git")
    (project / "innocent").symlink_to(repo / ".git", target_is_directory=True)
    insert_plan(db, writes(project / "innocent", ["hooks/pre-commit"]))
    assert_refused(capsys, db, fake_llm, state_dir, repo)


def test_row1_the_gitdir_a_dot_git_file_points_to_is_never_written(capsys, db, project, fake_llm,
        state_dir):
    """A worktree's `.git` file names a gitdir inside the project under another name, not
    yet a git directory: writes into it are refused all the same."""
    (project / ".git").write_text("gitdir: meta/gd\n")
    (project / "meta" / "gd").mkdir(parents=True)
    insert_plan(db, writes(project, ["meta/gd/hooks/pre-commit"]))
    assert_refused(capsys, db, fake_llm, state_dir, project)


def test_row1_trust_of_a_git_folder_is_refused(capsys, tmp_path):
    repo = tmp_path / "repo"
    fake_git_dir(repo / ".git")
    rc = bridge.main(["--trust", str(repo / ".git")], environ={"HOME": str(tmp_path / "home")})
    err = capsys.readouterr().err
    assert rc == 2 and "version-control folder .git" in err, err


def test_row1_the_write_path_refuses_a_project_inside_git_even_unvalidated(project, tmp_path):
    """FileTransaction (every write) shares the rule, not only check_plan."""
    gitdir = fake_git_dir(project / "repo" / ".git")
    before = snapshot(gitdir)
    files = bridge.FileTransaction(gitdir, tmp_path / "runs" / bridge.new_run_id())
    with pytest.raises(bridge.PathError, match="never writes"):
        files.write("hooks/pre-commit", HOOK)
    assert snapshot(gitdir) == before


# --------------------------------------------------------------------------------------
# Row 2: every VCS folder under the project, whatever the case or spelling a disk folds
# --------------------------------------------------------------------------------------

VCS_TARGETS = [
    ".hg/hgrc",                 # the row: Mercurial's [hooks]
    ".HG/hgrc", "sub/.Hg/hgrc", ".svn/wc.db", ".jj/repo/config.toml", ".bzr/branch/branch.conf",
    "_darcs/prefs/defaults", "_DARCS/prefs/boring",
    ".git./config",             # NTFS and FAT drop trailing dots and spaces
    ".git /hooks/pre-commit",
    "GIT~1/config",             # an 8.3 short name
    ".g\u200cit/config",        # HFS+ and APFS ignore U+200C (git's is_hfs_dotgit)
    "\ufeff.git/hooks/pre-push",
]


@pytest.mark.parametrize("rel", VCS_TARGETS)
def test_row2_no_vcs_folder_is_written(capsys, db, project, fake_llm, state_dir, rel):
    insert_plan(db, writes(project, [rel]))
    result = assert_refused(capsys, db, fake_llm, state_dir, project)
    assert "hooks and config run commands" in result["problems"][0]


def test_row2_a_bare_repository_under_the_project_is_never_written(capsys, db, project, fake_llm,
        state_dir):
    fake_git_dir(project / "vendor" / "lib.git")
    insert_plan(db, writes(project, ["vendor/lib.git/hooks/post-update"]))
    result = assert_refused(capsys, db, fake_llm, state_dir, project)
    assert "git directory" in result["problems"][0]


@pytest.mark.parametrize("name", ["hg", ".github/workflows/ci.yml", ".gitignore", "git/notes.md",
                                  ".hgignore", "svn.txt", "_darcs.md", "jj/x"])
def test_row2_names_that_only_look_alike_are_written(capsys, db, project, fake_llm, state_dir,
                                                     name):
    insert_plan(db, writes(project, [name]))
    fake_llm.default_reply = "ok"
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, require_output=True)
    assert rc == 0, err
    assert (project / name).read_text() == "ok"


def test_row2_vcs_folder_of_is_the_rule():
    for name in (".git", ".GIT", ".git.", ".git ", "git~1", ".g\u200dit", ".hg", "_Darcs", ".JJ"):
        assert bridge.vcs_folder_of(name) is not None, name
    for name in ("git", ".gitignore", ".github", "hg", ".hgrc", "x.git"):
        assert bridge.vcs_folder_of(name) is None, name


# --------------------------------------------------------------------------------------
# Row 7: LOAD of credentials the deny-list did not know
# --------------------------------------------------------------------------------------

SECRET = "tok_S3CR3T-do-not-send"
ROW7 = [".npmrc", ".git/config", ".git-credentials", ".pypirc", ".envrc", "id_rsa.bak",
        ".docker/config.json", ".kube/config", "terraform.tfstate", "credentials.json", ".htpasswd",
        ".streamlit/secrets.toml"]
ROW7_VARIANTS = [
    ".yarnrc.yml", ".terraformrc", ".vault-token", ".cargo/credentials.toml", ".gem/credentials",
    "auth.json", ".config/gcloud/application_default_credentials.json",
    ".azure/msal_token_cache.json",
    ".config/gh/hosts.yml", ".hg/hgrc", ".pgpass", ".my.cnf", "pip.conf", "kubeconfig",
    "server.key.orig", ".npmrc~", "id_ed25519.old", "deploy/id_rsa.1", "terraform.tfstate.backup",
    "prod.tfvars", "client_secret_123.apps.json", "gcp-service-account-key.json", "secrets.yaml",
    "KEYS/ID_RSA", ".Docker/Config.json", "release.jks", "vault.kdbx", "putty.ppk",
    ".password-store/x.gpg",
]


def load_plan(project: Path, rels: list[str]) -> dict:
    return make_plan("load", [{"id": 1,
                               "prompt": "Repeat the files you were given, word for word."}],
                     context={"objective": "leak", "project": str(project),
                              "files_context": {rel: "LOAD" for rel in rels}})


def put_secret(project: Path, rel: str) -> None:
    path = project / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"//registry.npmjs.org/:_authToken={SECRET}\n")


def assert_not_sent(capsys, db, fake_llm, state_dir, count: int) -> None:
    fake_llm.default_reply = "ok"
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, require_output=True)
    assert rc == 1, err
    assert result["status"] == "failed"
    assert len(result["problems"]) == count, result["problems"]
    assert all("does not send it to a model" in p for p in result["problems"])
    assert fake_llm.chat_requests == []
    assert SECRET not in json.dumps(stored_results(db))
    check_store(db)


def test_row7_the_twelve_files_as_the_probe_loaded_them(capsys, db, project, fake_llm, state_dir):
    for rel in ROW7:
        put_secret(project, rel)
    insert_plan(db, load_plan(project, ROW7))
    assert_not_sent(capsys, db, fake_llm, state_dir, len(ROW7))


@pytest.mark.parametrize("rel", ROW7 + ROW7_VARIANTS)
def test_row7_each_secret_file_is_refused(capsys, db, project, fake_llm, state_dir, rel):
    put_secret(project, rel)
    insert_plan(db, load_plan(project, [rel]))
    assert_not_sent(capsys, db, fake_llm, state_dir, 1)


def test_row7_a_project_inside_git_cannot_load_its_config(capsys, db, project, fake_llm, state_dir):
    """The relative path is plain `config`; its real path is .git/config."""
    gitdir = fake_git_dir(project / "repo" / ".git")
    remote = f"[remote \"origin\"]\n\turl = https://x:{SECRET}@github.com/a/b\n"
    (gitdir / "config").write_text(remote)
    insert_plan(db, load_plan(gitdir, ["config"]))
    assert_not_sent(capsys, db, fake_llm, state_dir, 1)


@pytest.mark.parametrize("rel", ["id_generator.py", "credentials.py", "auth.json.example",
                                 ".npmrc.example",
                                 "terraform.tfvars.example", "docs/kubeconfig.md", "id_ed25519.pub",
                                 "secrets_test.py", "src/config.json", "keys.md", "notes.bak"])
def test_row7_files_that_only_look_alike_still_load(project, rel):
    (project / rel).parent.mkdir(parents=True, exist_ok=True)
    (project / rel).write_text("public\n")
    plan = bridge.check_plan(load_plan(project, [rel]))
    assert plan.files_context == {rel: "LOAD"}


def test_row7_the_readme_table_is_the_code_table():
    readme = (Path(bridge.__file__).parent / "README.md").read_text(encoding="utf-8")
    for pattern, _ in bridge.SECRET_LOAD_TABLE:
        assert f"`{pattern}`" in readme, pattern


# --------------------------------------------------------------------------------------
# Row 11: x.py, ./x.py and a//x.py are one file
# --------------------------------------------------------------------------------------

# step 1's check: it holds the file for a moment, then fails, so on a run that does not
# serialise the two steps, step 2 writes its file meanwhile and step 1's revert removes it
SLOW_FAIL = [sys.executable, "-c", "import time; time.sleep(0.5); raise SystemExit(1)"]


@pytest.mark.parametrize("pair", [("x.py", "./x.py"), ("a/x.py", "a//x.py"), ("a/./x.py",
                                                                              "a/x.py")])
def test_row11_two_spellings_of_one_file_are_one_file(capsys, db, project, fake_llm, state_dir,
        pair):
    first, second = pair
    insert_plan(db, make_plan("same", [
        {"id": 1, "prompt": "one", "file_output": first, "max_retries": 0, "on_failure": "skip",
         "validation": {"type": "command", "run": SLOW_FAIL}},
        {"id": 2, "prompt": "two", "file_output": second, "max_retries": 0}],
        context={"objective": "same file", "project": str(project)}))
    fake_llm.default_reply = "print('written')"

    rc, result, err = run_json(capsys, db, fake_llm, state_dir, "--parallel", "2",
                               require_output=True)

    steps = {s["id"]: s for s in result["steps"]}
    assert steps[1]["status"] != "succeeded" and steps[2]["status"] == "succeeded", err
    name = "x.py" if pair == ("x.py", "./x.py") else "a/x.py"
    assert (project / name).read_text() == "print('written')"      # step 2's file stayed
    assert [f["path"] for f in result["files"]] == [name], result["files"]
    assert fake_llm.max_in_flight == 1          # serialised: one request at a time
    check_store(db)


def test_row11_a_load_file_another_spelling_writes_is_known(project):
    """LOAD ./gen.py that a step writes as gen.py: not "does not exist and no step writes it"."""
    plan = bridge.check_plan(make_plan("gen", [{"id": 1, "prompt": "p", "file_output": "gen.py"}],
                                       context={"objective": "o", "project": str(project),
                                                "files_context": {"./gen.py": "LOAD"}}))
    assert plan.files_context == {"gen.py": "LOAD"}
    assert plan.steps[1].file_output == "gen.py"


def test_row11_same_file_path():
    assert bridge.same_file_path("./x.py") == bridge.same_file_path("x.py") == "x.py"
    assert bridge.same_file_path("a//b/./c.py") == "a/b/c.py"


def test_row1_a_fifo_named_git_above_the_project_does_not_hang(capsys, db, project, fake_llm,
                                                               state_dir):
    """The gitfile check opens .git without blocking: a FIFO there is no gitfile."""
    os.mkfifo(project / ".git")
    insert_plan(db, writes(project, ["ok.txt"]))
    fake_llm.default_reply = "ok"
    rc, result, err = run_json(capsys, db, fake_llm, state_dir, require_output=True)
    assert rc == 0, err
    assert (project / "ok.txt").read_text() == "ok"
