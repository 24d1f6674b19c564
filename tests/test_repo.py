"""Repository behaviour (jiaozifuse/repo.py): refs, commits, merges, resets, import/export,
dedup, and the costs the design promises (O(1) branches, commits that grow with the change).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import blake3
import pytest

from jiaozifuse.errors import (
    BadName,
    Conflict,
    Exists,
    FormatError,
    JiaoziError,
    NotFound,
)
from jiaozifuse.repo import Repository
from jiaozifuse.worktree import Worktree

KiB = 1024
MiB = 1024 * KiB
FILE = stat.S_IFREG | 0o644


def pseudo(seed: bytes, n: int) -> bytes:
    return blake3.blake3(seed).digest(length=n)


def write(repo: Repository, path: str, data: bytes, branch: str = "main") -> None:
    """Create or replace the file at *path* in *branch*'s worktree (parents made)."""
    wt: Worktree = repo.worktree
    root = repo.root_ino(branch)
    parent_path, _, name = path.rpartition("/")
    parent = wt.makedirs(root, parent_path) if parent_path else wt.getattr(root)
    try:
        node = wt.lookup(parent.ino, name.encode())
    except NotFound:
        node = wt.create(parent.ino, name.encode(), FILE)
    wt.open(node.ino)
    try:
        wt.truncate(node.ino, 0)
        wt.write(node.ino, 0, data)
    finally:
        wt.release(node.ino)


def read(repo: Repository, path: str, branch: str = "main") -> bytes:
    node = repo.worktree.resolve(repo.root_ino(branch), path)
    return repo.worktree.read(node.ino, 0, node.size + 1)


def remove(repo: Repository, path: str, branch: str = "main") -> None:
    parent, name = repo.worktree.resolve_parent(repo.root_ino(branch), path)
    repo.worktree.unlink(parent.ino, name)


def files_at(repo: Repository, ref: str) -> dict[str, bytes]:
    """Every file of a commit, by path, through the object store."""
    out = {}
    tree = repo.get_commit(repo.resolve(ref)).tree
    for path, e in repo.walk(tree):
        if e.is_file:
            out[path.decode()] = repo.file_content(e.ref).read(0, e.size)
    return out


def entries(repo: Repository, db: str) -> int:
    with repo.store.read() as r:
        return r.txn.stat(r._dbs[db])["entries"]


def changes(lst) -> list[tuple[str, str]]:
    return sorted((c.kind, c.path) for c in lst)


# -------------------------------------------------------------- lifecycle


def test_init_and_reopen(tmp_path):
    path = tmp_path / "repo"
    with Repository.init(path) as repo:
        assert repo.default_branch == "main"
        assert list(repo.branches()) == ["main"]
        assert repo.tags() == {}
        head = repo.head("main")
        [(cid, c)] = list(repo.log("main"))
        assert cid == head and c.parents == ()
        write(repo, "a.txt", b"hello")
        repo.commit("main", "first")
    with Repository.open(path) as repo:
        assert files_at(repo, "main") == {"a.txt": b"hello"}
        assert read(repo, "a.txt") == b"hello"


def test_init_with_another_default_branch(tmp_path):
    with Repository.init(tmp_path / "r", default_branch="trunk") as repo:
        assert list(repo.branches()) == ["trunk"]
    with Repository.open(tmp_path / "r") as repo:
        assert repo.default_branch == "trunk"


def test_init_over_existing_repo_is_exists(tmp_repo):
    with pytest.raises(Exists):
        Repository.init(tmp_repo.path)
    assert tmp_repo.branches()  # the existing repository is untouched


def test_init_over_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(JiaoziError):
        Repository.init(tmp_path / "f")


def test_open_nothing_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        Repository.open(tmp_path / "nothing")
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(NotFound):
        Repository.open(tmp_path / "empty")


@pytest.mark.parametrize("fmt", [b"999", b"3"])
def test_store_from_a_future_version_is_format_error(tmp_path, fmt):
    path = tmp_path / "repo"
    with Repository.init(path) as repo, repo.store.write() as w:
        w.put("meta", b"format", fmt)
    with pytest.raises(FormatError) as ei:
        Repository.open(path)
    assert "upgrade" in str(ei.value)
    assert isinstance(ei.value, JiaoziError)


def test_store_with_garbage_format_is_format_error(tmp_path):
    path = tmp_path / "repo"
    with Repository.init(path) as repo, repo.store.write() as w:
        w.put("meta", b"format", b"one")
    with pytest.raises(FormatError):
        Repository.open(path)


@pytest.mark.parametrize("text", [
    "{not json", "", "[1, 2]", "{}", '{"default_branch": 7}', "\udcff",
])
def test_corrupt_config_is_a_user_error(tmp_path, text):
    path = tmp_path / "repo"
    Repository.init(path).close()
    (path / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(JiaoziError) as ei:
        Repository.open(path)
    assert "config.json" in str(ei.value)


def test_read_only_open(tmp_path):
    path = tmp_path / "repo"
    with Repository.init(path) as repo:
        write(repo, "a/f", b"x")
        repo.commit("main", "c")
    with Repository.open(path, readonly=True) as ro:
        assert [c.message for _, c in ro.log("main")] == ["c", "Repository created"]
        assert changes(ro.diff("main~1", "main")) == [("added", "a/f")]
        assert files_at(ro, "main") == {"a/f": b"x"}
        ro.export("main", tmp_path / "out")
        assert (tmp_path / "out" / "a" / "f").read_bytes() == b"x"
        with pytest.raises(JiaoziError):
            ro.create_branch("x")


def test_config_is_json_with_the_default_branch(tmp_repo):
    cfg = json.loads((tmp_repo.path / "config.json").read_text())
    assert cfg["default_branch"] == "main"


# ------------------------------------------------------------ branches, tags

BAD_NAMES = ["-x", "a b", "a/b", "", "x" * 256, "x.lock", ".hidden", "a\0b", "é", "a:b",
             "a~1", "a^"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_branch_and_tag_names(tmp_repo, name):
    with pytest.raises(BadName):
        tmp_repo.create_branch(name)
    with pytest.raises(BadName):
        tmp_repo.create_tag(name)
    assert list(tmp_repo.branches()) == ["main"]
    assert tmp_repo.tags() == {}


def test_bad_default_branch_name(tmp_path):
    with pytest.raises(BadName):
        Repository.init(tmp_path / "r", default_branch="a b")


@pytest.mark.parametrize("name", ["x" * 255, "a", "A.b_c-1", "0", "v1.0"])
def test_good_names(tmp_repo, name):
    tmp_repo.create_branch(name)
    tmp_repo.create_tag(name)
    assert name in tmp_repo.branches() and name in tmp_repo.tags()


def test_branch_lifecycle(tmp_repo):
    write(tmp_repo, "f", b"1")
    c1 = tmp_repo.commit("main", "one")
    assert tmp_repo.create_branch("dev") == c1
    assert tmp_repo.branches() == {"main": c1, "dev": c1}
    with pytest.raises(Exists):
        tmp_repo.create_branch("dev")
    assert read(tmp_repo, "f", "dev") == b"1"
    write(tmp_repo, "f", b"2", "dev")
    c2 = tmp_repo.commit("dev", "two")
    tmp_repo.create_branch("from-dev", "dev")
    assert tmp_repo.head("from-dev") == c2
    tmp_repo.create_branch("old", c1.hex()[:10])
    assert read(tmp_repo, "f", "old") == b"1"
    tmp_repo.delete_branch("dev")
    assert "dev" not in tmp_repo.branches()
    with pytest.raises(NotFound):
        tmp_repo.root_ino("dev")
    with pytest.raises(NotFound):
        tmp_repo.delete_branch("dev")
    with pytest.raises(JiaoziError):
        tmp_repo.delete_branch("main")
    # the commit is still there, and a branch of the same name starts afresh
    tmp_repo.create_branch("dev", c2.hex())
    assert read(tmp_repo, "f", "dev") == b"2"


def test_deleting_a_branch_frees_its_inodes(tmp_repo):
    for i in range(5):
        write(tmp_repo, f"d/f{i}", b"x")
    tmp_repo.commit("main", "c")
    before = entries(tmp_repo, "inodes")
    tmp_repo.create_branch("tmp")
    write(tmp_repo, "d/new", b"y", "tmp")
    assert entries(tmp_repo, "inodes") > before
    tmp_repo.delete_branch("tmp")
    assert entries(tmp_repo, "inodes") == before


def test_tags(tmp_repo):
    write(tmp_repo, "f", b"1")
    c1 = tmp_repo.commit("main", "one")
    assert tmp_repo.create_tag("v1") == c1
    write(tmp_repo, "f", b"2")
    tmp_repo.commit("main", "two")
    assert tmp_repo.tags() == {"v1": c1}
    assert tmp_repo.resolve("v1") == c1
    assert files_at(tmp_repo, "v1") == {"f": b"1"}
    with pytest.raises(Exists):
        tmp_repo.create_tag("v1")
    tmp_repo.delete_tag("v1")
    assert tmp_repo.tags() == {}
    with pytest.raises(NotFound):
        tmp_repo.delete_tag("v1")
    with pytest.raises(NotFound):
        tmp_repo.resolve("v1")


def test_unknown_refs_are_not_found(tmp_repo):
    for ref in ("nope", "deadbeef", "0" * 64, "main~1", "main^", "nope~2"):
        with pytest.raises(NotFound):
            tmp_repo.resolve(ref)
    with pytest.raises(NotFound):
        tmp_repo.create_branch("x", "nope")
    with pytest.raises(NotFound):
        tmp_repo.create_tag("x", "nope")
    with pytest.raises(NotFound):
        tmp_repo.commit("nope", "m")
    with pytest.raises(NotFound):
        list(tmp_repo.log("nope"))
    with pytest.raises(NotFound):
        tmp_repo.diff("main", "nope")
    with pytest.raises(NotFound):
        tmp_repo.merge("nope")
    assert "branches" not in tmp_repo.branches()


def test_resolve_forms(tmp_repo):
    ids = [tmp_repo.head("main")]
    for i in range(3):
        write(tmp_repo, "f", b"%d" % i)
        ids.append(tmp_repo.commit("main", f"c{i}"))
    c0, c1, c2, c3 = ids
    assert tmp_repo.resolve("main") == c3
    assert tmp_repo.resolve(c2.hex()) == c2
    assert tmp_repo.resolve(c2.hex().upper()) == c2
    assert tmp_repo.resolve(c2.hex()[:7]) == c2
    assert tmp_repo.resolve("main~1") == c2
    assert tmp_repo.resolve("main^") == c2
    assert tmp_repo.resolve("main~") == c2
    assert tmp_repo.resolve("main^^") == c1
    assert tmp_repo.resolve("main~2^") == c0
    assert tmp_repo.resolve("main~3") == c0
    assert tmp_repo.resolve(c3.hex()[:8] + "~2") == c1
    tmp_repo.create_tag("t", "main~1")
    assert tmp_repo.resolve("t^") == c1
    # a tree id (not a commit) does not resolve as a commit
    tree = tmp_repo.get_commit(c3).tree
    with pytest.raises(NotFound):
        tmp_repo.resolve(tree.hex())


# ---------------------------------------------------------------- commits


def test_commit_records_message_meta_author_and_changes(tmp_repo):
    events = []
    tmp_repo.listeners.append(lambda kind, **f: events.append((kind, f)))
    write(tmp_repo, "data/a.bin", b"aaa")
    write(tmp_repo, "b.txt", b"bb")
    head = tmp_repo.head("main")
    cid = tmp_repo.commit("main", "add data", {"run": "42", "loss": "0.1"}, author="me@x")
    c = tmp_repo.get_commit(cid)
    assert c.parents == (head,)
    assert c.message == "add data"
    assert c.author == "me@x"
    assert c.meta_dict == {"run": "42", "loss": "0.1"}
    assert tmp_repo.head("main") == cid
    assert files_at(tmp_repo, "main") == {"data/a.bin": b"aaa", "b.txt": b"bb"}
    assert events[-1][0] == "commit"
    assert sorted(events[-1][1]["paths"]) == ["b.txt", "data/a.bin"]
    assert tmp_repo.status("main") == []
    assert tmp_repo.is_clean("main")


def test_commit_with_nothing_changed_is_an_error(tmp_repo):
    with pytest.raises(JiaoziError) as ei:
        tmp_repo.commit("main", "nothing")
    assert "nothing to commit" in str(ei.value)
    write(tmp_repo, "f", b"x")
    cid = tmp_repo.commit("main", "one")
    with pytest.raises(JiaoziError):
        tmp_repo.commit("main", "again")
    assert tmp_repo.head("main") == cid
    empty = tmp_repo.commit("main", "empty", allow_empty=True)
    assert tmp_repo.get_commit(empty).parents == (cid,)


def test_log_diff_status(tmp_repo):
    write(tmp_repo, "keep", b"k")
    write(tmp_repo, "mod", b"1")
    write(tmp_repo, "gone/x", b"x")
    write(tmp_repo, "gone/y", b"y")
    c1 = tmp_repo.commit("main", "one")
    write(tmp_repo, "mod", b"22")
    write(tmp_repo, "new/deep/z", b"z")
    remove(tmp_repo, "gone/x")
    remove(tmp_repo, "gone/y")
    parent, name = tmp_repo.worktree.resolve_parent(tmp_repo.root_ino("main"), "gone")
    tmp_repo.worktree.unlink(parent.ino, name, rmdir=True)
    expected = [("added", "new/deep/z"), ("deleted", "gone/x"), ("deleted", "gone/y"),
                ("modified", "mod")]
    assert changes(tmp_repo.status("main")) == expected
    c2 = tmp_repo.commit("main", "two")
    assert changes(tmp_repo.diff(c1.hex(), "main")) == expected
    back = changes(tmp_repo.diff("main", c1.hex()))
    assert back == [("added", "gone/x"), ("added", "gone/y"), ("deleted", "new/deep/z"),
                    ("modified", "mod")]
    assert tmp_repo.diff("main", "main") == []
    sizes = {c.path: c.size for c in tmp_repo.diff(c1.hex(), "main")}
    assert sizes["mod"] == 2
    log = list(tmp_repo.log("main"))
    assert [cid for cid, _ in log] == [c2, c1, tmp_repo.resolve("main~2")]
    assert [c.message for _, c in log[:2]] == ["two", "one"]
    assert [cid for cid, _ in tmp_repo.log("main", limit=1)] == [c2]


def test_tree_entry_and_walk(tmp_repo):
    write(tmp_repo, "a/b/c.txt", b"hello")
    cid = tmp_repo.commit("main", "x")
    e = tmp_repo.tree_entry(cid, "a/b/c.txt")
    assert e.is_file and e.size == 5
    assert tmp_repo.tree_entry(cid, "a").is_dir
    assert tmp_repo.tree_entry(cid, "a").size == 5  # logical bytes below
    assert tmp_repo.tree_entry(cid, "") is None
    with pytest.raises(NotFound):
        tmp_repo.tree_entry(cid, "a/nope")
    with pytest.raises(NotFound):
        tmp_repo.tree_entry(cid, "a/b/c.txt/deeper")
    paths = [p for p, _ in tmp_repo.walk(tmp_repo.get_commit(cid).tree)]
    assert paths == [b"a", b"a/b", b"a/b/c.txt"]


# ------------------------------------------------------------------ merges


def test_merge_fast_forward(tmp_repo):
    write(tmp_repo, "f", b"base")
    base = tmp_repo.commit("main", "base")
    tmp_repo.create_branch("dev")
    write(tmp_repo, "g", b"dev", "dev")
    d1 = tmp_repo.commit("dev", "dev work")
    assert tmp_repo.merge("dev", "main") == d1
    assert tmp_repo.head("main") == d1
    assert tmp_repo.get_commit(d1).parents == (base,)  # no merge commit
    assert read(tmp_repo, "g") == b"dev"
    assert tmp_repo.status("main") == []
    with pytest.raises(JiaoziError):
        tmp_repo.merge("dev", "main")  # already up to date


def test_three_way_merge_of_disjoint_paths(tmp_repo):
    write(tmp_repo, "shared/a", b"a0")
    write(tmp_repo, "shared/b", b"b0")
    write(tmp_repo, "top", b"t0")
    write(tmp_repo, "doomed", b"d")
    tmp_repo.commit("main", "base")
    tmp_repo.create_branch("dev")
    write(tmp_repo, "shared/a", b"a-main")
    write(tmp_repo, "main-only/x", b"mx")
    ours = tmp_repo.commit("main", "main work")
    write(tmp_repo, "shared/b", b"b-dev", "dev")
    write(tmp_repo, "dev-only", b"dx", "dev")
    remove(tmp_repo, "doomed", "dev")
    theirs = tmp_repo.commit("dev", "dev work")
    cid = tmp_repo.merge("dev", "main")
    c = tmp_repo.get_commit(cid)
    assert c.parents == (ours, theirs)
    assert tmp_repo.head("main") == cid
    assert tmp_repo.head("dev") == theirs
    want = {"shared/a": b"a-main", "shared/b": b"b-dev", "top": b"t0",
            "main-only/x": b"mx", "dev-only": b"dx"}
    assert files_at(tmp_repo, "main") == want
    assert read(tmp_repo, "shared/b") == b"b-dev"  # the worktree follows the merge
    assert tmp_repo.status("main") == []
    # the merged directory's logical size is the sum below it
    assert tmp_repo.tree_entry(cid, "shared").size == len(b"a-main") + len(b"b-dev")


def test_merge_conflict_lists_paths_and_leaves_head_alone(tmp_repo):
    write(tmp_repo, "dir/f", b"base")
    write(tmp_repo, "other", b"o")
    tmp_repo.commit("main", "base")
    tmp_repo.create_branch("dev")
    write(tmp_repo, "dir/f", b"main")
    ours = tmp_repo.commit("main", "main change")
    write(tmp_repo, "dir/f", b"dev", "dev")
    write(tmp_repo, "other", b"dev-other", "dev")
    tmp_repo.commit("dev", "dev change")
    with pytest.raises(Conflict) as ei:
        tmp_repo.merge("dev", "main")
    assert ei.value.paths == ["dir/f"]
    assert "dir/f" in str(ei.value)
    assert tmp_repo.head("main") == ours
    assert read(tmp_repo, "dir/f") == b"main"
    assert read(tmp_repo, "other") == b"o"
    assert tmp_repo.status("main") == []


def test_merge_refuses_a_dirty_destination(tmp_repo):
    write(tmp_repo, "f", b"1")
    tmp_repo.commit("main", "one")
    tmp_repo.create_branch("dev")
    write(tmp_repo, "g", b"dev", "dev")
    tmp_repo.commit("dev", "dev")
    write(tmp_repo, "uncommitted", b"u")
    head = tmp_repo.head("main")
    with pytest.raises(JiaoziError):
        tmp_repo.merge("dev", "main")
    assert tmp_repo.head("main") == head
    assert read(tmp_repo, "uncommitted") == b"u"


def test_revert(tmp_repo):
    write(tmp_repo, "a", b"v1")
    c1 = tmp_repo.commit("main", "one")
    write(tmp_repo, "a", b"v2")
    write(tmp_repo, "b", b"new")
    c2 = tmp_repo.commit("main", "two")
    write(tmp_repo, "c", b"later")
    c3 = tmp_repo.commit("main", "three")
    r = tmp_repo.revert(c2.hex())
    assert tmp_repo.get_commit(r).parents == (c3,)
    assert c2.hex() in tmp_repo.get_commit(r).message
    assert files_at(tmp_repo, "main") == {"a": b"v1", "c": b"later"}
    assert read(tmp_repo, "a") == b"v1"
    assert tmp_repo.status("main") == []
    assert files_at(tmp_repo, c1.hex()) == {"a": b"v1"}


def test_reset_hard_discards_worktree_changes(tmp_repo):
    write(tmp_repo, "f", b"committed")
    write(tmp_repo, "d/g", b"g")
    c1 = tmp_repo.commit("main", "one")
    write(tmp_repo, "f", b"scribble")
    write(tmp_repo, "junk/new", b"junk")
    remove(tmp_repo, "d/g")
    assert tmp_repo.status("main")
    assert tmp_repo.reset("main", hard=True) == c1
    assert tmp_repo.head("main") == c1
    assert tmp_repo.status("main") == []
    assert read(tmp_repo, "f") == b"committed"
    assert read(tmp_repo, "d/g") == b"g"
    with pytest.raises(NotFound):
        read(tmp_repo, "junk/new")


def test_reset_hard_to_an_older_commit(tmp_repo):
    write(tmp_repo, "f", b"1")
    c1 = tmp_repo.commit("main", "one")
    write(tmp_repo, "f", b"2")
    write(tmp_repo, "g", b"2")
    tmp_repo.commit("main", "two")
    tmp_repo.reset("main", "main~1", hard=True)
    assert tmp_repo.head("main") == c1
    assert read(tmp_repo, "f") == b"1"
    assert tmp_repo.status("main") == []


def test_reset_soft_keeps_changes_as_status(tmp_repo):
    write(tmp_repo, "f", b"1")
    c1 = tmp_repo.commit("main", "one")
    write(tmp_repo, "f", b"2")
    write(tmp_repo, "g", b"2")
    tmp_repo.commit("main", "two")
    tmp_repo.reset("main", c1.hex())
    assert tmp_repo.head("main") == c1
    assert read(tmp_repo, "f") == b"2"
    assert changes(tmp_repo.status("main")) == [("added", "g"), ("modified", "f")]
    c3 = tmp_repo.commit("main", "squashed")
    assert tmp_repo.get_commit(c3).parents == (c1,)
    assert files_at(tmp_repo, "main") == {"f": b"2", "g": b"2"}


# --------------------------------------------------------- costs of the model


def _wide_source(root: Path) -> Path:
    src = root / "src2000"
    for d in range(20):
        (src / f"d{d:02}").mkdir(parents=True)
        for f in range(100):
            (src / f"d{d:02}" / f"f{f:03}").write_bytes(b"%d/%d\n" % (d, f))
    return src


@pytest.fixture(scope="module")
def wide_template(tmp_path_factory) -> Path:
    """A closed repository whose main holds 2,000 files in 20 directories, committed."""
    base = tmp_path_factory.mktemp("wide")
    src = _wide_source(base)
    path = base / "repo"
    with Repository.init(path) as repo:
        repo.store.begin_batch()  # group the import's transactions (as the daemon does)
        assert repo.import_dir("main", src) == 2000
        repo.store.end_batch()
        repo.commit("main", "2000 files")
    return path


@pytest.fixture
def wide_repo(wide_template, tmp_path):
    path = tmp_path / "wide"
    shutil.copytree(wide_template, path)
    with Repository.open(path) as repo:
        yield repo


def test_branch_creation_writes_no_inodes(wide_repo):
    inodes = entries(wide_repo, "inodes")
    objects = entries(wide_repo, "objects")
    wide_repo.create_branch("cheap")
    assert entries(wide_repo, "inodes") - inodes <= 1  # its root, pointing at the tree
    assert entries(wide_repo, "objects") == objects
    assert wide_repo.head("cheap") == wide_repo.head("main")
    assert read(wide_repo, "d13/f042", "cheap") == b"13/42\n"


def test_commit_rewrites_only_changed_directories(wide_repo):
    wide_repo.create_branch("edit")
    inodes = entries(wide_repo, "inodes")
    objects = entries(wide_repo, "objects")
    write(wide_repo, "d07/f050", b"changed\n", "edit")
    cid = wide_repo.commit("edit", "one file")
    # new objects: the file's manifest, the trees of d07 and of the root, the commit
    assert entries(wide_repo, "objects") - objects == 4
    # only the root and d07 were loaded into the worktree: not the 2,000 files
    assert entries(wide_repo, "inodes") - inodes <= 20 + 100
    assert changes(wide_repo.diff("main", "edit")) == [("modified", "d07/f050")]
    old, new = (wide_repo.get_tree(wide_repo.get_commit(c).tree)
                for c in (wide_repo.head("main"), cid))
    same = [e.name for e in old.entries if new.get(e.name) == e]
    assert len(same) == 19 and b"d07" not in same


def test_commit_on_main_after_import_rewrites_only_changed_directories(wide_repo):
    objects = entries(wide_repo, "objects")
    write(wide_repo, "d00/f000", b"changed\n")
    wide_repo.commit("main", "one file")
    assert entries(wide_repo, "objects") - objects == 4


def test_dedup_append_to_a_large_file(tmp_repo, tmp_path):
    local = tmp_path / "in"
    local.mkdir()
    big = pseudo(b"dedup-20MiB", 20 * MiB)
    (local / "big.bin").write_bytes(big)
    tmp_repo.import_dir("main", local)
    tmp_repo.commit("main", "20 MiB")
    s1 = tmp_repo.stats()
    assert 20 * MiB <= s1["stored_chunk_bytes"] < 20 * MiB + 64 * KiB
    with open(local / "big.bin", "ab") as f:
        f.write(pseudo(b"dedup-1MiB", MiB))
    tmp_repo.import_dir("main", local)
    tmp_repo.commit("main", "21 MiB")
    s2 = tmp_repo.stats()
    grew = s2["stored_chunk_bytes"] - s1["stored_chunk_bytes"]
    assert MiB <= grew < 1.5 * MiB
    assert s2["logical_bytes_all_commits"] == 41 * MiB
    assert s2["refs"] == {"branch/main": 21 * MiB}
    assert files_at(tmp_repo, "main")["big.bin"] == (local / "big.bin").read_bytes()


def test_dedup_identical_copies(tmp_repo, tmp_path):
    local = tmp_path / "copies"
    local.mkdir()
    data = pseudo(b"five", 5 * MiB)
    for i in range(10):
        sub = local / f"run{i}"
        sub.mkdir()
        (sub / "weights.bin").write_bytes(data)
    tmp_repo.import_dir("main", local)
    tmp_repo.commit("main", "ten copies")
    s = tmp_repo.stats()
    assert s["refs"]["branch/main"] == 50 * MiB
    assert 5 * MiB <= s["stored_chunk_bytes"] < 5.5 * MiB
    # and across branches: a copy on another branch costs nothing more
    tmp_repo.create_branch("other")
    write(tmp_repo, "copy.bin", data, "other")
    tmp_repo.commit("other", "one more")
    assert tmp_repo.stats()["stored_chunk_bytes"] == s["stored_chunk_bytes"]


def test_export_round_trip_keeps_bytes_mode_mtime_symlinks(tmp_repo, tmp_path):
    src = tmp_path / "src"
    (src / "sub" / "deeper").mkdir(parents=True)
    files = {
        "plain.txt": (b"hello\n", 0o644),
        "script.sh": (b"#!/bin/sh\necho hi\n", 0o755),
        "secret": (b"s", 0o600),
        "empty": (b"", 0o640),
        "sub/big.bin": (pseudo(b"export", 3 * MiB + 5), 0o644),
        "sub/deeper/zeros": (bytes(200_000), 0o444),
    }
    for i, (rel, (data, mode)) in enumerate(files.items()):
        p = src / rel
        p.write_bytes(data)
        p.chmod(mode)
        os.utime(p, ns=(1_600_000_000_123_456_789 + i, 1_600_000_000_123_456_789 + i))
    os.symlink("plain.txt", src / "link")
    os.symlink("../nowhere/dangling", src / "sub" / "dangling")
    os.utime(src / "link", ns=(1_500_000_000_000_000_001, 1_500_000_000_000_000_001),
             follow_symlinks=False)
    (src / "sub" / "deeper").chmod(0o750)
    for i, d in enumerate(["sub/deeper", "sub"]):
        os.utime(src / d, ns=(1_400_000_000_000_000_007 + i, 1_400_000_000_000_000_007 + i))
    assert tmp_repo.import_dir("main", src) == 8
    cid = tmp_repo.commit("main", "import")
    dest = tmp_path / "dest"
    assert tmp_repo.export(cid.hex(), dest) == 8
    for rel, (data, mode) in files.items():
        st_src, st_dst = os.lstat(src / rel), os.lstat(dest / rel)
        assert (dest / rel).read_bytes() == data, rel
        assert stat.S_IMODE(st_dst.st_mode) == mode, rel
        assert st_dst.st_mtime_ns == st_src.st_mtime_ns, rel
    for rel in ("link", "sub/dangling"):
        assert os.path.islink(dest / rel)
        assert os.readlink(dest / rel) == os.readlink(src / rel)
    assert os.lstat(dest / "link").st_mtime_ns == 1_500_000_000_000_000_001
    for rel in ("sub", "sub/deeper"):
        assert os.stat(dest / rel).st_mtime_ns == os.stat(src / rel).st_mtime_ns, rel
        assert stat.S_IMODE(os.stat(dest / rel).st_mode) == stat.S_IMODE(
            os.stat(src / rel).st_mode), rel
    with pytest.raises(Exists):
        tmp_repo.export(cid.hex(), dest)  # not empty
    # a second round trip gives the same tree id
    with Repository.init(tmp_path / "again") as again:
        again.import_dir("main", dest)
        cid2 = again.commit("main", "again")
        assert again.get_commit(cid2).tree == tmp_repo.get_commit(cid).tree


def test_import_prefix_replaces_what_is_at_those_paths(tmp_repo, tmp_path):
    write(tmp_repo, "outside", b"keep me")
    write(tmp_repo, "data/x", b"old x")
    write(tmp_repo, "data/becomes_file/inner", b"old inner")
    write(tmp_repo, "data/becomes_dir", b"old file")
    write(tmp_repo, "data/link", b"was a file")
    tmp_repo.commit("main", "before")
    src = tmp_path / "src"
    (src / "becomes_dir").mkdir(parents=True)
    (src / "x").write_bytes(b"new x")
    (src / "becomes_file").write_bytes(b"now a file")
    (src / "becomes_dir" / "child").write_bytes(b"child")
    os.symlink("x", src / "link")
    tmp_repo.import_dir("main", src, prefix="data")
    tmp_repo.commit("main", "import")
    got = files_at(tmp_repo, "main")
    assert got["outside"] == b"keep me"
    assert got["data/x"] == b"new x"
    assert got["data/becomes_file"] == b"now a file"
    assert got["data/becomes_dir/child"] == b"child"
    assert "data/becomes_file/inner" not in got
    e = tmp_repo.tree_entry(tmp_repo.head("main"), "data/link")
    assert e.is_symlink and e.ref == b"x"
    # importing into a deeper new prefix creates it
    tmp_repo.import_dir("main", src, prefix="/a/b/")
    tmp_repo.commit("main", "deeper")
    assert files_at(tmp_repo, "main")["a/b/x"] == b"new x"


def test_reimporting_an_unchanged_directory_changes_nothing(tmp_repo, tmp_path):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(pseudo(b"re", 300_000))
    (src / "g").write_bytes(b"g")
    tmp_repo.import_dir("main", src)
    tmp_repo.commit("main", "import")
    tmp_repo.import_dir("main", src)
    assert tmp_repo.status("main") == []
    with pytest.raises(JiaoziError):
        tmp_repo.commit("main", "again")
    (src / "g").write_bytes(b"G")
    tmp_repo.import_dir("main", src)
    assert changes(tmp_repo.status("main")) == [("modified", "g")]


def test_import_of_a_missing_directory(tmp_repo, tmp_path):
    with pytest.raises(NotFound):
        tmp_repo.import_dir("main", tmp_path / "missing")


# --------------------------------------------------------------- concurrency

_OTHER_PROCESS = textwrap.dedent("""
    import stat, sys
    from jiaozifuse.repo import Repository
    with Repository.open(sys.argv[1]) as repo:
        wt = repo.worktree
        node = wt.create(repo.root_ino("main"), b"from-b", stat.S_IFREG | 0o644)
        wt.open(node.ino); wt.write(node.ino, 0, b"b"); wt.release(node.ino)
        print(repo.commit("main", "from b").hex())
""")


def test_two_processes_commit_to_one_branch(tmp_repo):
    write(tmp_repo, "from-a", b"a")
    first = tmp_repo.commit("main", "from a")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, str(tmp_repo.path)], env=env,
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()
    second = bytes.fromhex(out)
    assert tmp_repo.head("main") == second
    assert tmp_repo.get_commit(second).parents == (first,)
    write(tmp_repo, "again-a", b"a2")
    third = tmp_repo.commit("main", "a again")
    assert tmp_repo.get_commit(third).parents == (second,)
    assert files_at(tmp_repo, "main") == {"from-a": b"a", "from-b": b"b", "again-a": b"a2"}


def test_two_repository_objects_in_one_process(tmp_repo):
    other = Repository.open(tmp_repo.path)
    try:
        write(tmp_repo, "a", b"a")
        first = tmp_repo.commit("main", "from a")
        write(other, "b", b"b")
        second = other.commit("main", "from b")
        assert other.get_commit(second).parents == (first,)
        assert tmp_repo.head("main") == second
    finally:
        other.close()


def test_update_ref_with_a_stale_head_is_a_conflict(tmp_repo):
    stale = tmp_repo.head("main")
    write(tmp_repo, "f", b"1")
    moved = tmp_repo.commit("main", "moved")
    write(tmp_repo, "f", b"2")
    with pytest.raises(Conflict) as ei, tmp_repo.store.write() as w:
        tmp_repo.update_ref(w, "main", stale, stale)
    msg = str(ei.value)
    assert moved.hex()[:12] in msg and stale.hex()[:12] in msg
    assert tmp_repo.head("main") == moved
    with tmp_repo.store.write() as w:
        tmp_repo.update_ref(w, "main", moved, stale)
    assert tmp_repo.head("main") == stale


# ------------------------------------------------------------ known bugs


def test_export_of_a_sparse_file_uses_bounded_memory(tmp_repo, tmp_path):
    import tracemalloc

    wt = tmp_repo.worktree
    node = wt.create(tmp_repo.root_ino("main"), b"sparse", FILE)
    wt.setattr(node.ino, size=256 * MiB)  # truncate -s 256M: one ZERO run
    write(tmp_repo, "small", b"s")
    tmp_repo.commit("main", "sparse")
    tracemalloc.start()
    try:
        tmp_repo.export("main", tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out = tmp_path / "out" / "sparse"
    assert out.stat().st_size == 256 * MiB
    with open(out, "rb") as f:
        f.seek(200 * MiB)
        assert f.read(10) == bytes(10)
    assert peak < 64 * MiB, f"export of a 256 MiB hole peaked at {peak / MiB:.0f} MiB"


def test_directory_sizes_are_consistent_with_symlinks(tmp_repo):
    wt = tmp_repo.worktree
    root = tmp_repo.root_ino("main")
    write(tmp_repo, "d/f", b"12345")
    wt.create(wt.resolve(root, "d").ino, b"l", stat.S_IFLNK | 0o777, target=b"f")
    wt.create(root, b"top", stat.S_IFLNK | 0o777, target=b"d/f")
    tmp_repo.commit("main", "base")
    tmp_repo.create_branch("dev")
    write(tmp_repo, "d/g", b"abc", "dev")
    tmp_repo.commit("dev", "dev")
    write(tmp_repo, "d/h", b"xy")
    tmp_repo.commit("main", "main")
    merged = tmp_repo.merge("dev")
    write(tmp_repo, "d/i", b"z")
    committed = tmp_repo.commit("main", "after")
    # A directory's size is the same function of its content however the tree was made:
    # the sum of the entry sizes beneath it, as its own tree reports them.
    for cid in (merged, committed):
        e = tmp_repo.tree_entry(cid, "d")
        assert e.size == tmp_repo.get_tree(e.ref).logical_size, cid.hex()[:12]
    assert tmp_repo.stats()["refs"]["branch/main"] == tmp_repo.get_tree(
        tmp_repo.get_commit(committed).tree).logical_size


def test_commit_with_numeric_meta_never_breaks_the_branch(tmp_repo):
    write(tmp_repo, "f", b"x")
    try:
        tmp_repo.commit("main", "metrics", meta={"loss": 0.5, "epoch": 3})
    except (JiaoziError, TypeError, ValueError):
        pass  # refusing is fine; writing an unreadable commit is not
    list(tmp_repo.log("main"))
    write(tmp_repo, "g", b"y")
    tmp_repo.commit("main", "next")


def test_export_into_a_regular_file_is_a_user_error(tmp_repo, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(JiaoziError):
        tmp_repo.export("main", tmp_path / "afile")


def test_reads_fill_the_buffer_from_verified_chunks_only(tmp_path, monkeypatch) -> None:
    """A read of chunks checked before goes straight from the store into the
    reply buffer; a chunk not checked since the repository was opened goes the
    checked way, so a flipped bit on disk is an error, never served."""
    from jiaozifuse.errors import Corrupt
    from jiaozifuse.store import Store

    data = os.urandom(3 << 20)
    repo = Repository.init(tmp_path / "repo")
    try:
        write(repo, "big.bin", data)
    finally:
        repo.close()
    repo = Repository.open(tmp_path / "repo")
    try:
        assert read(repo, "big.bin") == data  # every chunk checked on this first read
        filled: list[int] = []
        real = Store.read_into

        def spy(self, spans, out):
            done = real(self, spans, out)
            filled.extend(hi - lo for (_, _, lo, hi, _), ok in zip(spans, done, strict=True) if ok)
            return done

        monkeypatch.setattr(Store, "read_into", spy)
        node = repo.worktree.resolve(repo.root_ino("main"), "big.bin")
        for off in (0, 12345, (1 << 20) - 7, len(data) - 100):
            assert repo.worktree.read(node.ino, off, 200_000) == data[off : off + 200_000]
        assert sum(filled) == sum(len(data[o : o + 200_000])
                                  for o in (0, 12345, (1 << 20) - 7, len(data) - 100))
    finally:
        repo.close()
    import lmdb

    env = lmdb.open(str(tmp_path / "repo" / "store"), max_dbs=32)
    with env.begin(write=True) as t:  # flip a bit of one stored chunk
        db = env.open_db(b"chunks", txn=t)
        key, value = next((bytes(k), bytes(v)) for k, v in t.cursor(db=db) if len(v) > 1000)
        bad = bytearray(value)
        bad[100] ^= 0x40
        t.put(key, bytes(bad), db=db)
    env.close()
    repo = Repository.open(tmp_path / "repo")
    try:
        with pytest.raises(Corrupt):
            read(repo, "big.bin")
    finally:
        repo.close()
