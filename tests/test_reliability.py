"""Nothing lost: gc keeps what is reachable, fsck finds damage, parsers refuse garbage."""

from __future__ import annotations

import json
import stat

import hypothesis.strategies as st
import lmdb
import pytest
from hypothesis import HealthCheck, given, settings

from jiaozifuse import gc
from jiaozifuse.errors import Corrupt, JiaoziError
from jiaozifuse.fsck import fsck
from jiaozifuse.repo import Repository
from jiaozifuse.triggers import parse_rules

FILE = stat.S_IFREG | 0o644


def write(repo: Repository, branch: str, path: str, data: bytes) -> None:
    wt = repo.worktree
    root = repo.root_ino(branch)
    head, _, last = path.rpartition("/")
    parent = wt.makedirs(root, head) if head else wt.getattr(root)
    name = last.encode()
    try:
        node = wt.lookup(parent.ino, name)
    except JiaoziError:
        node = wt.create(parent.ino, name, FILE)
    wt.open(node.ino)
    wt.truncate(node.ino, 0)
    wt.write(node.ino, 0, data)
    wt.release(node.ino)


def read(repo: Repository, ref: str, path: str) -> bytes:
    e = repo.tree_entry(repo.resolve(ref), path)
    return repo.file_content(e.ref).read(0, e.size)


def blob(n: int, seed: int) -> bytes:
    import blake3

    return blake3.blake3(seed.to_bytes(4, "little")).digest(length=n)


def test_gc_deletes_only_the_unreachable(tmp_repo: Repository) -> None:
    write(tmp_repo, "main", "keep.bin", blob(1 << 20, 1))
    tmp_repo.commit("main", "keep")
    tmp_repo.create_branch("scratch")
    write(tmp_repo, "scratch", "junk.bin", blob(2 << 20, 2))
    tmp_repo.commit("scratch", "junk")
    write(tmp_repo, "main", "draft.bin", blob(1 << 20, 3))  # uncommitted: a root too
    tmp_repo.delete_branch("scratch")
    before = tmp_repo.stats()["stored_chunk_bytes"]
    dry = gc.collect_local(tmp_repo, dry_run=True)
    assert dry["bytes_freed"] >= 2 << 20
    assert tmp_repo.stats()["stored_chunk_bytes"] == before  # a dry run deletes nothing
    rep = gc.collect_local(tmp_repo)
    assert rep["bytes_freed"] >= 2 << 20 and rep["chunks_deleted"] > 0
    assert tmp_repo.stats()["stored_chunk_bytes"] <= before - (2 << 20)
    assert read(tmp_repo, "main", "keep.bin") == blob(1 << 20, 1)
    tmp_repo.commit("main", "draft")
    assert read(tmp_repo, "main", "draft.bin") == blob(1 << 20, 3)
    assert fsck(tmp_repo)["ok"]


def test_gc_keeps_an_open_files_unflushed_chunks(tmp_repo: Repository) -> None:
    wt = tmp_repo.worktree
    root = tmp_repo.root_ino("main")
    node = wt.create(root, b"big", FILE)
    wt.open(node.ino)
    data = blob(40 << 20, 5)
    wt.write(node.ino, 0, data)  # spills 16 MiB buffers: chunks stored, no manifest yet
    gc.collect_local(tmp_repo)
    wt.release(node.ino)
    tmp_repo.commit("main", "big")
    assert read(tmp_repo, "main", "big") == data
    assert fsck(tmp_repo)["ok"]


def test_retention_drops_old_history_only(tmp_repo: Repository) -> None:
    for i in range(5):
        write(tmp_repo, "main", "v.bin", blob(256 << 10, 10 + i))
        tmp_repo.commit("main", f"v{i}")
    tmp_repo.create_tag("first", "main~4")
    tmp_repo.config["gc"] = {"retain": {"main": {"max_count": 2}}}
    gc.collect_local(tmp_repo)
    assert [c.message for _, c in tmp_repo.log("main")] == ["v4", "v3"]
    assert read(tmp_repo, "first", "v.bin") == blob(256 << 10, 10)  # the tag keeps its own
    assert read(tmp_repo, "main", "v.bin") == blob(256 << 10, 14)
    assert fsck(tmp_repo)["ok"]


def _flip_a_chunk_byte(repo_path, size_at_least: int = 1000) -> bytes:
    env = lmdb.open(str(repo_path / "store"), max_dbs=32)
    db = env.open_db(b"chunks")
    with env.begin(write=True) as t:
        for k, v in t.cursor(db=db):
            if len(v) >= size_at_least:
                bad = bytearray(v)
                bad[len(bad) // 2] ^= 0x01
                t.put(k, bytes(bad), db=db)
                key = bytes(k)
                break
    env.close()
    return key


def test_a_flipped_bit_is_never_served(tmp_path) -> None:
    repo = Repository.init(tmp_path / "r")
    write(repo, "main", "f.bin", blob(300_000, 7))
    repo.commit("main", "c")
    repo.close()
    _flip_a_chunk_byte(tmp_path / "r")
    repo = Repository.open(tmp_path / "r")
    with pytest.raises(Corrupt):
        read(repo, "main", "f.bin")
    report = fsck(repo)
    assert not report["ok"]
    kinds = {p["kind"] for p in report["problems"]}
    assert "bad-chunk" in kinds or "missing-chunk" in kinds
    repo.close()


def test_fsck_finds_a_missing_object(tmp_path) -> None:
    repo = Repository.init(tmp_path / "r")
    write(repo, "main", "a/b.txt", b"x")
    cid = repo.commit("main", "c")
    tree = repo.get_commit(cid).tree
    repo.close()
    env = lmdb.open(str(tmp_path / "r" / "store"), max_dbs=32)
    objects = env.open_db(b"objects")  # not inside the write txn: it would wait on itself
    with env.begin(write=True) as t:
        t.delete(tree, db=objects)
    env.close()
    repo = Repository.open(tmp_path / "r")
    report = fsck(repo)
    assert any(p["kind"] == "missing-object" and p["id"] == tree.hex()
               for p in report["problems"])
    repo.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=400))
def test_trigger_rules_parser_never_crashes(text: str) -> None:
    try:
        parse_rules(text)
    except JiaoziError:
        pass


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(
    st.binary(max_size=200),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c,
                                                                     max_size=4),
                 max_leaves=10).map(lambda v: json.dumps(v).encode()),
))
def test_a_corrupt_config_is_a_clear_error(tmp_path_factory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg")
    Repository.init(path / "r").close()
    (path / "r" / "config.json").write_bytes(raw)
    try:
        Repository.open(path / "r").close()
    except JiaoziError:
        pass
