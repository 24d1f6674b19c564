"""The ``jiaozifuse`` command line, run for real in subprocesses.

Every test here runs the installed console script (``.venv/bin/jiaozifuse``,
or ``python -m jiaozifuse.cli`` when the script is absent) the way a user
would, parses its ``--json`` output, and checks the exit-code contract:
0 ok, 1 a user error with exactly one line on stderr and no traceback,
2 usage.  No FUSE mount is needed here; finding the repository from inside a
mounted branch directory is tested in ``tests/mount/test_quickstart.py``.

A few tests need root (to mount a small tmpfs, or to drop capabilities so that
file permissions apply): they are skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_SCRIPT = Path(sys.executable).with_name("jiaozifuse")
JZ = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "jiaozifuse.cli"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount, setpriv)")

MiB = 1 << 20


# ------------------------------------------------------------------ helpers


@dataclass
class Result:
    args: tuple[str, ...]
    code: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode()

    def json(self) -> Any:
        return json.loads(self.out)

    def __str__(self) -> str:
        return (f"jiaozifuse {' '.join(self.args)} -> {self.code}\n"
                f"stdout: {self.out[:2000]!r}\nstderr: {self.err}")


def run(*args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None,
        wrap: tuple[str, ...] = ()) -> Result:
    """Run the CLI with JIAOZIFUSE_REPO removed from the environment (unless *env* sets it)."""
    e = dict(os.environ)
    e.pop("JIAOZIFUSE_REPO", None)
    e["JIAOZIFUSE_AUTHOR"] = "tester <t@example.org>"
    if env:
        e.update(env)
    p = subprocess.run([*wrap, *JZ, *args], capture_output=True, env=e, cwd=cwd,
                       timeout=300)
    return Result(args, p.returncode, p.stdout, p.stderr.decode(errors="replace"))


def ok(*args: str, **kw: Any) -> Result:
    r = run(*args, **kw)
    assert r.code == 0, str(r)
    assert "Traceback" not in r.err, str(r)
    return r


def user_error(r: Result, *needles: str) -> str:
    """Assert the user-error contract: exit 1, one line on stderr, no traceback."""
    assert r.code == 1, str(r)
    assert "Traceback" not in r.err and b"Traceback" not in r.out, str(r)
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), str(r)
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in {lines[0]!r}"
    return lines[0]


def usage_error(r: Result) -> None:
    assert r.code == 2, str(r)
    assert "Traceback" not in r.err, str(r)


class Repo:
    """A repository driven through the CLI with ``--repo``."""

    def __init__(self, path: Path, work: Path) -> None:
        self.path = path
        self.work = work  # scratch space for source trees
        self._n = 0

    def run(self, *args: str, **kw: Any) -> Result:
        return run("--repo", str(self.path), *args, **kw)

    def ok(self, *args: str, **kw: Any) -> Result:
        return ok("--repo", str(self.path), *args, **kw)

    def json(self, *args: str, **kw: Any) -> Any:
        return self.ok(*args, "--json", **kw).json()

    def head(self, branch: str = "main") -> str:
        return self.json("log", branch, "-n", "1")[0]["id"]

    def put(self, files: dict[str, bytes | str], branch: str | None = None,
            prefix: str = "") -> None:
        """Write *files* into the branch's worktree (through ``import``)."""
        self._n += 1
        src = self.work / f"src{self._n}"
        make_files(src, files)
        args = ["import", str(src), "--prefix", prefix]
        if branch:
            args += ["--branch", branch]
        self.ok(*args)

    def commit(self, files: dict[str, bytes | str], message: str,
               branch: str | None = None, *meta: str) -> str:
        self.put(files, branch)
        args = ["commit", "-m", message]
        for m in meta:
            args += ["--meta", m]
        if branch:
            args += ["--branch", branch]
        return self.json(*args)["id"]

    def cat(self, spec: str) -> bytes:
        return self.ok("show", spec).out


def make_files(base: Path, files: dict[str, bytes | str]) -> None:
    base.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        p = base / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            data = data.encode()
        p.write_bytes(data)


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    path = tmp_path / "repo"
    ok("init", str(path))
    work = tmp_path / "work"
    work.mkdir()
    return Repo(path, work)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at *path*, unmounted however the block ends."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        r = subprocess.run(["umount", str(path)], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --------------------------------------------------------------------- init


def test_init_creates_an_empty_repository(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "new-repo"
    r = ok("init", str(path))
    assert str(path) in r.text
    assert (path / "config.json").is_file()
    branches = ok("--repo", str(path), "branch", "list", "--json").json()
    assert [(b["name"], b["default"]) for b in branches] == [("main", True)]
    log = ok("--repo", str(path), "log", "--json").json()
    assert len(log) == 1 and log[0]["parents"] == []
    assert ok("--repo", str(path), "fsck", "--json").json()["ok"] is True


def test_init_with_other_default_branch(tmp_path: Path) -> None:
    ok("init", str(tmp_path / "r"), "--default-branch", "trunk")
    rows = ok("--repo", str(tmp_path / "r"), "branch", "list", "--json").json()
    assert [(b["name"], b["default"]) for b in rows] == [("trunk", True)]
    st = ok("--repo", str(tmp_path / "r"), "status", "--json").json()
    assert st["branch"] == "trunk"
    user_error(run("init", str(tmp_path / "r2"), "--default-branch", "bad name"), "bad name")
    assert not (tmp_path / "r2" / "config.json").exists()


def test_init_over_an_existing_repository_is_refused(repo: Repo) -> None:
    cid = repo.commit({"a": "1"}, "first")
    user_error(run("init", str(repo.path)), "already")
    # and nothing was touched
    assert repo.head() == cid
    assert repo.cat("main:a") == b"1"


def test_init_on_a_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    user_error(run("init", str(f)))
    assert f.read_text() == "x"


# ----------------------------------------------------------------- branches


def test_branch_create_list_delete(repo: Repo) -> None:
    first = repo.commit({"a": "1"}, "first")
    second = repo.commit({"a": "2"}, "second")
    r = repo.json("branch", "create", "dev")
    assert r == {"branch": "dev", "head": second}
    r = repo.json("branch", "create", "old", "--from", first)
    assert r["head"] == first
    r = repo.json("branch", "create", "old2", "--from", "main~1")
    assert r["head"] == first
    r = repo.json("branch", "create", "from-dev", "--from", "dev")
    assert r["head"] == second
    rows = repo.json("branch", "list")
    assert [(b["name"], b["head"], b["default"]) for b in rows] == [
        ("dev", second, False), ("from-dev", second, False), ("main", second, True),
        ("old", first, False), ("old2", first, False),
    ]
    # human output names every branch and marks the default
    human = repo.ok("branch", "list").text
    assert all(n in human for n in ("dev", "from-dev", "old", "old2"))
    assert any(line.startswith("*") and "main" in line for line in human.splitlines())
    # a branch starts with its start point's content
    assert repo.cat("old:a") == b"1"

    repo.ok("branch", "delete", "old2")
    assert "old2" not in [b["name"] for b in repo.json("branch", "list")]
    user_error(repo.run("branch", "delete", "old2"), "old2")
    user_error(repo.run("branch", "delete", "main"), "main")
    user_error(repo.run("branch", "create", "dev"), "dev")
    assert [b["name"] for b in repo.json("branch", "list")] == [
        "dev", "from-dev", "main", "old"]


@pytest.mark.parametrize("name", [
    "bad name", "-x", ".hidden", "_x", "a/b", "a:b", "a~1", "a^", "x" * 256, "ü", "a*",
])
def test_bad_branch_name(repo: Repo, name: str) -> None:
    msg = user_error(repo.run("branch", "create", "--", name))
    assert "name" in msg
    assert [b["name"] for b in repo.json("branch", "list")] == ["main"]


def test_longest_branch_name_is_accepted(repo: Repo) -> None:
    name = "b" * 255
    repo.ok("branch", "create", name)
    assert name in [b["name"] for b in repo.json("branch", "list")]


# ------------------------------------------------------------------- status


def test_status_lists_uncommitted_changes(repo: Repo) -> None:
    st = repo.json("status")
    assert st["branch"] == "main" and st["changes"] == []
    assert "nothing to commit" in repo.ok("status").text
    repo.put({"data/a.csv": "x\n1\n", "b.bin": b"\0\1"})
    st = repo.json("status")
    assert st["head"] == repo.head()
    assert sorted((c["change"], c["path"]) for c in st["changes"]) == [
        ("added", "b.bin"), ("added", "data/a.csv")]
    human = repo.ok("status").text
    assert "data/a.csv" in human and "b.bin" in human
    repo.ok("commit", "-m", "c")
    assert repo.json("status")["changes"] == []
    repo.put({"data/a.csv": "x\n2\n"})
    assert [(c["change"], c["path"]) for c in repo.json("status")["changes"]] == [
        ("modified", "data/a.csv")]
    # --branch picks another branch, which has its own worktree
    repo.ok("branch", "create", "dev")
    st = repo.json("status", "--branch", "dev")
    assert st["branch"] == "dev" and st["changes"] == []
    user_error(repo.run("status", "--branch", "nope"), "nope")


# ------------------------------------------------------------------- commit


def test_commit_with_meta_shows_in_log_and_show(repo: Repo) -> None:
    repo.put({"m.bin": b"weights"})
    c = repo.json("commit", "-m", "train run", "--meta", "run=42", "--meta",
                  "acc=0.93", "--meta", "note=a=b")
    assert c["branch"] == "main" and c["message"] == "train run"
    assert c["meta"] == {"run": "42", "acc": "0.93", "note": "a=b"}
    assert c["author"] == "tester <t@example.org>"
    log = repo.json("log")
    assert log[0]["id"] == c["id"] and log[0]["meta"] == c["meta"]
    assert log[0]["message"] == "train run"
    shown = repo.json("show", c["id"])
    assert shown["type"] == "commit" and shown["meta"] == c["meta"]
    assert shown["parents"] == c["parents"] and shown["tree"] == c["tree"]
    human = repo.ok("log", "-n", "1").text
    assert "run=42" in human and "acc=0.93" in human and "train run" in human
    human = repo.ok("show", "main").text
    assert c["id"] in human and "run=42" in human


def test_commit_errors(repo: Repo) -> None:
    user_error(repo.run("commit", "-m", "empty"), "nothing to commit")
    c = repo.json("commit", "-m", "empty", "--allow-empty")
    assert c["tree"] == repo.json("show", c["parents"][0])["tree"]
    usage_error(repo.run("commit", "-m", "x", "--meta", "novalue"))
    usage_error(repo.run("commit"))  # -m is required
    user_error(repo.run("commit", "-m", "x", "--branch", "nope"), "nope")


def test_commit_on_another_branch(repo: Repo) -> None:
    base = repo.commit({"a": "1"}, "base")
    repo.ok("branch", "create", "dev")
    dev = repo.commit({"b": "2"}, "on dev", "dev")
    assert repo.head("dev") == dev
    assert repo.head("main") == base
    user_error(repo.run("show", "main:b"), "b")
    assert repo.cat("dev:b") == b"2"


# ---------------------------------------------------------------------- log


def test_log_ref_and_max_count(repo: Repo) -> None:
    ids = [repo.commit({"f": str(i)}, f"c{i}") for i in range(4)]
    log = repo.json("log")
    assert [c["id"] for c in log[:4]] == ids[::-1]
    assert log[-1]["message"] == "Repository created"
    assert len(log) == 5
    assert [c["id"] for c in repo.json("log", "-n", "2")] == ids[:1:-1]
    assert [c["id"] for c in repo.json("log", "--max-count", "1")] == ids[-1:]
    assert [c["id"] for c in repo.json("log", ids[1], "-n", "2")] == [ids[1], ids[0]]
    assert repo.json("log", ids[1][:10])[0]["id"] == ids[1]
    assert repo.json("log", "main~2", "-n", "1")[0]["id"] == ids[1]
    repo.ok("tag", "create", "t1", ids[0])
    assert repo.json("log", "t1", "-n", "1")[0]["id"] == ids[0]
    for c in log[:4]:
        assert c["parents"] and len(c["parents"]) == 1
    human = repo.ok("log", "-n", "2").text
    assert human.count("commit ") == 2 and "c3" in human and "c2" in human
    usage_error(repo.run("log", "-n", "two"))
    user_error(repo.run("log", "nope"), "nope")


def test_log_max_count_zero_prints_nothing(repo: Repo) -> None:
    repo.commit({"a": "1"}, "one")
    assert repo.json("log", "-n", "0") == []


# --------------------------------------------------------------------- show


def test_show_file_prints_exact_bytes(repo: Repo) -> None:
    rnd = os.urandom(700_000)  # several chunks
    every_byte = bytes(range(256)) * 4 + b"\r\n\n\r\x00\x1a"
    files = {
        "data/model.bin": rnd,
        "data/bytes.bin": every_byte,
        "data/empty": b"",
        "data/no-newline.txt": "no newline at the end",
        "data/utf8.txt": "naïve, 中文 \u2013\n",
        "big/zeros": b"\0" * (3 * MiB + 17),
    }
    cid = repo.commit(files, "binary")
    for rel, data in files.items():
        want = data.encode() if isinstance(data, str) else data
        assert repo.cat(f"main:{rel}") == want, rel
        assert repo.cat(f"{cid}:{rel}") == want, rel
    assert repo.cat(f"{cid[:9]}:data/bytes.bin") == every_byte
    assert repo.cat("main:/data/bytes.bin") == every_byte
    info = repo.json("show", "main:data/model.bin")
    assert info["type"] == "file" and info["size"] == len(rnd)
    assert info["commit"] == cid and info["path"] == "data/model.bin"
    assert stat.S_ISREG(info["mode"])
    user_error(repo.run("show", "main:data/missing"), "missing")
    user_error(repo.run("show", "main:data/model.bin/x"))
    user_error(repo.run("show", "nope:data/model.bin"), "nope")


def test_show_dir_json_and_symlink(repo: Repo) -> None:
    src = repo.work / "tree"
    make_files(src, {"d/a.csv": "a\n", "d/sub/b.csv": "bb\n", "d/big": b"x" * 1000})
    os.symlink("a.csv", src / "d" / "link")
    repo.ok("import", str(src))
    cid = repo.json("commit", "-m", "tree")["id"]
    info = repo.json("show", "main:d")
    assert info["type"] == "tree" and info["commit"] == cid and info["path"] == "d"
    entries = {e["name"]: e for e in info["entries"]}
    assert sorted(entries) == ["a.csv", "big", "link", "sub"]
    assert entries["a.csv"]["type"] == "file" and entries["a.csv"]["size"] == 2
    assert entries["big"]["size"] == 1000
    assert entries["sub"]["type"] == "tree"
    assert entries["link"]["type"] == "symlink"
    human = repo.ok("show", "main:d").text
    assert "sub/" in human and "a.csv" in human
    sub = repo.json("show", "main:d/sub")
    assert [e["name"] for e in sub["entries"]] == ["b.csv"]
    link = repo.json("show", "main:d/link")
    assert link["type"] == "symlink" and link["target"] == "a.csv"
    commit = repo.json("show", "main")
    assert commit["type"] == "commit" and commit["id"] == cid


def test_show_root_directory(repo: Repo) -> None:
    repo.commit({"top.csv": "1", "d/x": "2"}, "one")
    info = repo.json("show", "main:/")
    assert info["type"] == "tree"
    assert [e["name"] for e in info["entries"]] == ["d", "top.csv"]


# --------------------------------------------------------------------- diff


def test_diff_added_deleted_modified(repo: Repo) -> None:
    repo.commit({"keep": "same", "mod": "v1"}, "base")
    a = repo.commit({"gone/x": "x", "d/old": "o"}, "a")
    repo.put({"mod": "v2", "new": "n", "d/sub/deep": "deep"})
    b = repo.json("commit", "-m", "b")["id"]
    # delete through a revert of the commit that added them
    repo.ok("revert", a)
    c = repo.head()

    def changes(x: str, y: str) -> list[tuple[str, str]]:
        return [(r["change"], r["path"]) for r in repo.json("diff", x, y)]

    assert changes(a, b) == [("added", "d/sub/deep"), ("modified", "mod"), ("added", "new")]
    assert changes(b, a) == [("deleted", "d/sub/deep"), ("modified", "mod"),
                             ("deleted", "new")]
    assert changes(b, c) == [("deleted", "d/old"), ("deleted", "gone/x")]
    assert changes(a, a) == []
    assert changes("main", c) == []
    rows = repo.json("diff", a, b)
    assert {r["path"]: r["size"] for r in rows}["mod"] == 2
    human = repo.ok("diff", b, c).text.splitlines()
    assert human == ["D\td/old", "D\tgone/x"]
    user_error(repo.run("diff", a, "nope"), "nope")
    user_error(repo.run("diff", "nope", a), "nope")


def test_rewriting_identical_bytes_is_no_change(repo: Repo) -> None:
    data = os.urandom(300_000)
    src = repo.work / "same"
    make_files(src, {"m.bin": data, "t.txt": "text\n"})
    repo.ok("import", str(src))
    first = repo.json("commit", "-m", "first")["id"]
    # rewrite the same bytes (new mtime) and import again
    make_files(src, {"m.bin": data, "t.txt": "text\n"})
    os.utime(src / "m.bin", ns=(1_000_000_000, 1_000_000_000))
    repo.ok("import", str(src))
    assert repo.json("status")["changes"] == []
    second = repo.json("commit", "-m", "same again", "--allow-empty")["id"]
    assert second != first
    assert repo.json("diff", first, second) == []
    assert repo.ok("diff", first, second).out == b""


def test_status_and_commit_agree_after_identical_rewrite(repo: Repo) -> None:
    src = repo.work / "same"
    make_files(src, {"t.txt": "text\n"})
    repo.ok("import", str(src))
    first = repo.json("commit", "-m", "first")["id"]
    os.utime(src / "t.txt", ns=(1_000_000_000, 1_000_000_000))
    repo.ok("import", str(src))
    clean = repo.json("status")["changes"] == []
    res = repo.run("commit", "-m", "again")
    if clean:
        user_error(res, "nothing to commit")
        assert repo.head() == first
    else:
        assert res.code == 0, str(res)


# --------------------------------------------------------------------- tags


def test_tag_create_list_delete(repo: Repo) -> None:
    first = repo.commit({"a": "1"}, "first")
    second = repo.commit({"a": "2"}, "second")
    assert repo.json("tag", "create", "v2") == {"tag": "v2", "commit": second}
    assert repo.json("tag", "create", "v1", first)["commit"] == first
    assert repo.json("tag", "create", "v1.0-rc_1", "main~1")["commit"] == first
    assert repo.json("tag", "list") == [
        {"name": "v1", "commit": first}, {"name": "v1.0-rc_1", "commit": first},
        {"name": "v2", "commit": second}]
    assert "v1.0-rc_1" in repo.ok("tag", "list").text
    assert repo.cat("v1:a") == b"1"
    assert repo.json("show", "v2")["id"] == second
    user_error(repo.run("tag", "create", "v1"), "v1")
    user_error(repo.run("tag", "create", "v9", "nope"), "nope")
    repo.ok("tag", "delete", "v1.0-rc_1")
    assert [t["name"] for t in repo.json("tag", "list")] == ["v1", "v2"]
    user_error(repo.run("tag", "delete", "v1.0-rc_1"), "v1.0-rc_1")
    # a tag does not move when its branch does
    repo.commit({"a": "3"}, "third")
    assert repo.json("show", "v2")["id"] == second


@pytest.mark.parametrize("name", ["bad tag", "-v1", ".v1", "v1/x", "v:1", "x" * 256, ""])
def test_bad_tag_name(repo: Repo, name: str) -> None:
    user_error(repo.run("tag", "create", "--", name))
    assert repo.json("tag", "list") == []


# -------------------------------------------------------------------- merge


def test_merge_fast_forward(repo: Repo) -> None:
    base = repo.commit({"a": "1"}, "base")
    repo.ok("branch", "create", "dev")
    d1 = repo.commit({"b": "2"}, "dev 1", "dev")
    d2 = repo.commit({"a": "changed"}, "dev 2", "dev")
    r = repo.json("merge", "dev", "--into", "main")
    assert r["fast_forward"] is True and r["id"] == d2 and r["branch"] == "main"
    assert repo.head("main") == d2
    assert [c["id"] for c in repo.json("log", "-n", "3")] == [d2, d1, base]
    assert repo.cat("main:a") == b"changed" and repo.cat("main:b") == b"2"
    # the worktree follows: nothing uncommitted after the merge
    assert repo.json("status")["changes"] == []
    # merging again: nothing to do, a clear error
    user_error(repo.run("merge", "dev", "--into", "main"), "up to date")


def test_merge_three_way(repo: Repo) -> None:
    repo.commit({"shared.csv": "s\n", "ours.csv": "o1\n", "theirs.csv": "t1\n",
                 "dir/x": "x"}, "base")
    repo.ok("branch", "create", "dev")
    dev = repo.commit({"theirs.csv": "t2\n", "dir/new-on-dev": "d"}, "dev work", "dev")
    main = repo.commit({"ours.csv": "o2\n", "dir/new-on-main": "m"}, "main work")
    r = repo.json("merge", "dev", "--into", "main", "-m", "merge dev")
    assert r["fast_forward"] is False
    assert sorted(r["parents"]) == sorted([main, dev])
    assert r["message"] == "merge dev"
    assert repo.head("main") == r["id"]
    assert repo.head("dev") == dev
    assert repo.cat("main:ours.csv") == b"o2\n"
    assert repo.cat("main:theirs.csv") == b"t2\n"
    assert repo.cat("main:shared.csv") == b"s\n"
    names = [e["name"] for e in repo.json("show", "main:dir")["entries"]]
    assert names == ["new-on-dev", "new-on-main", "x"]
    assert repo.json("status")["changes"] == []
    assert repo.json("fsck")["ok"] is True
    # a merge commit shows both parents in the human log
    assert "Merge:" in repo.ok("log", "-n", "1").text


def test_merge_conflict_leaves_destination_unchanged(repo: Repo) -> None:
    repo.commit({"data/params.yaml": "lr: 1\n", "other": "o"}, "base")
    repo.ok("branch", "create", "dev")
    repo.commit({"data/params.yaml": "lr: 2\n"}, "dev", "dev")
    main = repo.commit({"data/params.yaml": "lr: 3\n", "ok": "1"}, "main")
    msg = user_error(repo.run("merge", "dev", "--into", "main"), "data/params.yaml")
    assert "conflict" in msg.lower()
    assert repo.head("main") == main
    assert repo.cat("main:data/params.yaml") == b"lr: 3\n"
    assert repo.json("status")["changes"] == []
    assert [c["id"] for c in repo.json("log", "-n", "1")] == [main]


def test_merge_refuses_dirty_destination_and_unknown_refs(repo: Repo) -> None:
    repo.commit({"a": "1"}, "base")
    repo.ok("branch", "create", "dev")
    repo.commit({"b": "1"}, "dev", "dev")
    repo.put({"a": "dirty"})
    user_error(repo.run("merge", "dev", "--into", "main"), "main")
    user_error(repo.run("merge", "nope", "--into", "main"), "nope")
    user_error(repo.run("merge", "dev", "--into", "nope"), "nope")


# ------------------------------------------------------------ revert, reset


def test_revert(repo: Repo) -> None:
    repo.commit({"a": "1", "b": "1"}, "base")
    bad = repo.commit({"a": "broken", "junk": "j"}, "bad change")
    after = repo.commit({"b": "2"}, "later")
    r = repo.json("revert", bad)
    assert r["parents"] == [after] and r["branch"] == "main"
    assert "bad change" in r["message"]
    assert repo.cat("main:a") == b"1"
    assert repo.cat("main:b") == b"2"
    user_error(repo.run("show", "main:junk"), "junk")
    assert repo.json("status")["changes"] == []
    user_error(repo.run("revert", "nope"), "nope")


def test_revert_refuses_a_merge_commit(repo: Repo) -> None:
    repo.commit({"a": "1"}, "base")
    repo.ok("branch", "create", "dev")
    repo.commit({"b": "1"}, "dev", "dev")
    repo.commit({"c": "1"}, "main")
    m = repo.json("merge", "dev", "--into", "main")["id"]
    user_error(repo.run("revert", m))
    assert repo.head() == m


def test_reset_soft_and_hard(repo: Repo) -> None:
    first = repo.commit({"a": "1"}, "first")
    second = repo.commit({"a": "2", "b": "new"}, "second")
    # soft: the branch moves, the worktree stays (so it differs from the new head)
    r = repo.json("reset", first)
    assert r == {"branch": "main", "head": first, "hard": False}
    assert repo.head() == first
    assert sorted((c["change"], c["path"]) for c in repo.json("status")["changes"]) == [
        ("added", "b"), ("modified", "a")]
    # committing now gives the second commit's content again
    third = repo.json("commit", "-m", "again")["id"]
    assert repo.json("diff", second, third) == []
    # hard: both move
    assert repo.json("reset", "--hard", first)["hard"] is True
    assert repo.head() == first
    assert repo.json("status")["changes"] == []
    assert repo.cat("main:a") == b"1"
    # reset --hard without REF discards uncommitted changes
    repo.put({"a": "scratch", "tmp": "t"})
    assert repo.json("status")["changes"]
    repo.ok("reset", "--hard")
    assert repo.json("status")["changes"] == []
    assert repo.head() == first
    # the commits are still there
    assert repo.cat(f"{second}:b") == b"new"
    user_error(repo.run("reset", "--hard", "nope"), "nope")
    assert repo.head() == first


# ----------------------------------------------------------- import, export


def test_import_export_roundtrip_keeps_mode_mtime_symlinks(repo: Repo, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_files(src, {
        "train/a.csv": "a,b\n1,2\n", "train/run.sh": "#!/bin/sh\necho hi\n",
        "secret.key": "k", "deep/er/est/f.bin": os.urandom(200_000), "empty": b"",
    })
    os.chmod(src / "train" / "run.sh", 0o755)
    os.chmod(src / "secret.key", 0o600)
    os.chmod(src / "deep" / "er", 0o750)
    os.symlink("a.csv", src / "train" / "rel-link")
    os.symlink("../deep/er", src / "train" / "dir-link")
    os.symlink("/nonexistent/target", src / "dangling")
    if os.geteuid() == 0:
        os.chown(src / "secret.key", 1234, 5678)
    times: dict[str, int] = {}
    for i, p in enumerate(sorted(src.rglob("*"), key=lambda p: -len(p.parts))):
        t = 1_600_000_000_123_456_789 + i * 1_000_000_007
        os.utime(p, ns=(t, t), follow_symlinks=False)
        times[str(p.relative_to(src))] = t

    r = repo.json("import", str(src), "--prefix", "in/here")
    assert r["files"] == 8 and r["prefix"] == "in/here"
    cid = repo.json("commit", "-m", "import")["id"]
    out = tmp_path / "out"
    r = repo.json("export", cid, str(out))
    assert r["files"] == 8
    got = out / "in" / "here"
    want_paths = sorted(str(p.relative_to(src)) for p in src.rglob("*"))
    assert sorted(str(p.relative_to(got)) for p in got.rglob("*")) == want_paths
    for rel in want_paths:
        a, b = src / rel, got / rel
        sa, sb = a.lstat(), b.lstat()
        assert stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode), rel
        if stat.S_ISLNK(sa.st_mode):
            assert os.readlink(a) == os.readlink(b), rel
        else:
            assert stat.S_IMODE(sa.st_mode) == stat.S_IMODE(sb.st_mode), rel
        assert sb.st_mtime_ns == times[rel], rel
        if stat.S_ISREG(sa.st_mode):
            assert a.read_bytes() == b.read_bytes(), rel
    if os.geteuid() == 0:
        st = (got / "secret.key").stat()
        assert (st.st_uid, st.st_gid) == (1234, 5678)
    # export a branch name too, and refuse a non-empty destination
    repo.ok("export", "main", str(tmp_path / "out2"))
    assert (tmp_path / "out2" / "in" / "here" / "train" / "a.csv").read_text() == "a,b\n1,2\n"
    user_error(repo.run("export", "main", str(out)), str(out))
    user_error(repo.run("export", "nope", str(tmp_path / "out3")), "nope")


def test_import_errors(repo: Repo, tmp_path: Path) -> None:
    usage_error(repo.run("import", str(tmp_path / "missing")))
    f = tmp_path / "file"
    f.write_text("x")
    usage_error(repo.run("import", str(f)))
    user_error(repo.run("import", str(repo.work), "--branch", "nope"), "nope")


def test_import_replaces_and_merges(repo: Repo) -> None:
    repo.put({"d/a": "1", "d/b": "1"})
    repo.put({"d/a": "2", "d/c": "3"})
    repo.ok("commit", "-m", "x")
    assert repo.cat("main:d/a") == b"2"
    assert repo.cat("main:d/b") == b"1"
    assert repo.cat("main:d/c") == b"3"


# -------------------------------------------------------------- stats, fsck


def test_stats_dedup_of_identical_files(repo: Repo, tmp_path: Path) -> None:
    blob = os.urandom(4 * MiB)
    src = tmp_path / "copies"
    make_files(src, {f"copy-{i:02d}/weights-{i}.bin": blob for i in range(10)})
    repo.ok("import", str(src))
    repo.ok("commit", "-m", "ten copies")
    s = repo.json("stats")
    assert s["logical_bytes_all_commits"] >= 40 * MiB, s
    assert s["stored_bytes"] < 1.2 * 4 * MiB, s
    assert s["refs"]["branch/main"] >= 40 * MiB, s
    human = repo.ok("stats").text
    assert "dedup" in human


def test_fsck_clean_repository(repo: Repo) -> None:
    repo.commit({"a": os.urandom(200_000), "b/c": "c"}, "one")
    repo.ok("tag", "create", "v1")
    repo.ok("branch", "create", "dev")
    repo.commit({"a": "small now"}, "two", "dev")
    r = repo.ok("fsck")
    assert r.text.strip().splitlines()[-1] == "ok"
    j = repo.json("fsck")
    assert j["ok"] is True and j["problems"] == []
    assert j["commits"] >= 3 and j["refs"] == 3


# ---------------------------------------------------------- repo discovery


def test_repo_option_env_and_precedence(repo: Repo, tmp_path: Path) -> None:
    cid = repo.commit({"a": "1"}, "first")
    other = tmp_path / "other"
    ok("init", str(other))
    p = str(repo.path)
    assert ok("--repo", p, "log", "-n", "1", "--json").json()[0]["id"] == cid
    assert ok("log", "--repo", p, "-n", "1", "--json").json()[0]["id"] == cid
    assert ok("log", "-n", "1", "--json", env={"JIAOZIFUSE_REPO": p}).json()[0]["id"] == cid
    # a relative path, from another working directory
    rel = os.path.relpath(p, tmp_path)
    assert ok("--repo", rel, "log", "-n", "1", "--json",
              cwd=tmp_path).json()[0]["id"] == cid
    # --repo beats the environment
    got = ok("--repo", p, "log", "-n", "1", "--json",
             env={"JIAOZIFUSE_REPO": str(other)}).json()
    assert got[0]["id"] == cid
    # commands other than log find it the same way
    assert ok("status", "--json", env={"JIAOZIFUSE_REPO": p}).json()["branch"] == "main"
    assert ok("tag", "create", "t", env={"JIAOZIFUSE_REPO": p}).code == 0
    assert [t["name"] for t in repo.json("tag", "list")] == ["t"]


def test_no_repository_anywhere(tmp_path: Path) -> None:
    user_error(run("log", cwd=tmp_path), "repo")
    user_error(run("status", cwd=tmp_path), "repo")


@pytest.mark.parametrize("kind", ["empty-dir", "missing", "file", "store-only"])
def test_repo_option_at_a_non_repository(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "target"
    if kind == "empty-dir":
        target.mkdir()
    elif kind == "file":
        target.write_text("not a repo")
    elif kind == "store-only":
        (target / "store").mkdir(parents=True)
    user_error(run("--repo", str(target), "log"))
    user_error(run("log", env={"JIAOZIFUSE_REPO": str(target)}))
    user_error(run("--repo", str(target), "commit", "-m", "x"))
    if kind == "missing":
        assert not target.exists()


# -------------------------------------------------------------- bad input


@pytest.mark.parametrize("args", [
    ("show", "nope"), ("show", "nope:file"), ("log", "nope"), ("diff", "main", "nope"),
    ("branch", "create", "x", "--from", "nope"), ("tag", "create", "t", "nope"),
    ("merge", "nope", "--into", "main"), ("reset", "nope"), ("revert", "nope"),
    ("export", "nope", "OUT"), ("show", "deadbeef"), ("show", "main~5"),
    ("log", "0" * 64),
])
def test_unknown_ref(repo: Repo, tmp_path: Path, args: tuple[str, ...]) -> None:
    args = tuple(str(tmp_path / "out") if a == "OUT" else a for a in args)
    user_error(repo.run(*args))
    assert [b["name"] for b in repo.json("branch", "list")] == ["main"]
    assert repo.json("tag", "list") == []


def test_store_from_a_future_version(repo: Repo) -> None:
    import lmdb

    repo.commit({"a": "1"}, "one")
    env = lmdb.open(str(repo.path / "store"), max_dbs=16)
    try:
        db = env.open_db(b"meta")
        with env.begin(write=True) as t:
            t.put(b"format", b"999", db=db)
    finally:
        env.close()
    for args in (("log",), ("status",), ("commit", "-m", "x", "--allow-empty"), ("fsck",)):
        msg = user_error(repo.run(*args))
        assert "999" in msg or "version" in msg.lower() or "format" in msg.lower(), msg


@pytest.mark.parametrize("content", [
    b"{not json", b"", b"[]", b'{"format": 1}', b'{"default_branch": 5}', b"\xff\xfe\x00",
    b"null",
])
def test_corrupt_config(repo: Repo, content: bytes) -> None:
    (repo.path / "config.json").write_bytes(content)
    msg = user_error(repo.run("log"), "config.json")
    assert "corrupt" in msg.lower() or "invalid" in msg.lower(), msg
    user_error(repo.run("commit", "-m", "x", "--allow-empty"), "config.json")


def test_usage_errors_exit_2(repo: Repo) -> None:
    usage_error(run("--bogus"))
    usage_error(repo.run("log", "--bogus"))
    usage_error(repo.run("branch", "create"))
    usage_error(repo.run("branch", "frobnicate"))
    usage_error(repo.run("no-such-command"))
    usage_error(repo.run("show"))
    usage_error(repo.run("diff", "main"))
    usage_error(run("init"))
    # --help and --version are not errors
    assert "Usage" in ok("--help").text
    assert ok("--version").text.strip()


@needs_root
def test_read_only_filesystem(tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    with tmpfs(mnt, "64m"):
        r = Repo(mnt / "repo", tmp_path)
        ok("init", str(r.path))
        cid = r.commit({"a": "1"}, "one")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        for args in (("commit", "-m", "x", "--allow-empty"), ("branch", "create", "b"),
                     ("tag", "create", "t"), ("import", str(tmp_path / "src1")),
                     ("reset", "--hard")):
            user_error(r.run(*args))
        user_error(run("init", str(mnt / "repo2")))
        # reading either works or fails cleanly
        res = r.run("log", "-n", "1", "--json")
        if res.code == 0:
            assert res.json()[0]["id"] == cid
        else:
            user_error(res)
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        assert r.head() == cid
        assert r.json("fsck")["ok"] is True


def _drop_caps() -> tuple[str, ...]:
    """Run as root without the capabilities that bypass file permissions."""
    return ("setpriv", "--inh-caps=-all", "--bounding-set=-all", "--")


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_read_only_repository_directory(repo: Repo) -> None:
    cid = repo.commit({"a": "1"}, "one")
    subprocess.run(["chmod", "-R", "a-w", str(repo.path)], check=True)
    try:
        assert run("--version", wrap=_drop_caps()).code == 0
        for args in (("commit", "-m", "x", "--allow-empty"), ("branch", "create", "b"),
                     ("tag", "create", "t"), ("reset", "--hard")):
            user_error(repo.run(*args, wrap=_drop_caps()))
        res = repo.run("log", "-n", "1", "--json", wrap=_drop_caps())
        if res.code == 0:
            assert res.json()[0]["id"] == cid
        else:
            user_error(res)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(repo.path)], check=True)
    assert repo.head() == cid
    assert repo.json("fsck")["ok"] is True


def _fill_disk(tmp_path: Path) -> tuple[Repo, str, Result]:
    """Inside an 8 MiB tmpfs: a repo with one commit, then a 20 MiB import."""
    r = Repo(tmp_path / "small" / "repo", tmp_path)
    ok("init", str(r.path))
    cid = r.commit({"a.csv": "x,y\n1,2\n"}, "before the disk filled")
    big = tmp_path / "big"
    make_files(big, {"big.bin": os.urandom(20 * MiB)})
    res = r.run("import", str(big), "--prefix", "big")
    return r, cid, res


@needs_root
def test_full_disk_fails_cleanly_and_keeps_earlier_commits(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "8m"):
        r, cid, res = _fill_disk(tmp_path)
        user_error(res)
        # the repository still opens and is consistent
        assert r.head() == cid
        assert r.cat("main:a.csv") == b"x,y\n1,2\n"
        assert [c["message"] for c in r.json("log")] == [
            "before the disk filled", "Repository created"]
        fsck = r.ok("fsck", "--json").json()
        assert fsck["ok"] is True, fsck


@needs_root
def test_full_disk_message_says_no_space(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "8m"):
        _r, _cid, res = _fill_disk(tmp_path)
        msg = user_error(res).replace(str(tmp_path), "TMP").lower()
        assert "no space" in msg or re.search(r"\bfull\b", msg), msg


@needs_root
def test_full_disk_leaves_no_dangling_file_in_the_worktree(tmp_path: Path) -> None:
    # Regression: Worktree.spill used to drop chunks from pending before its
    # write transaction committed, so after ENOSPC the worktree kept a file
    # naming chunks the store never got, and committing it broke fsck.
    with tmpfs(tmp_path / "small", "8m"):
        r, cid, res = _fill_disk(tmp_path)
        user_error(res)
        # whatever the worktree kept must be whole: committing it (or being
        # refused) leaves a repository that fsck finds clean
        res = r.run("commit", "-m", "after the failure")
        if res.code != 0:
            user_error(res)
        assert cid in [c["id"] for c in r.json("log")]
        fsck = r.run("fsck", "--json").json()
        assert fsck["ok"] is True, fsck["problems"][:3]
