"""Check a repository: every hash, every reference, the upload queue, the remote.

Problems are reported with what they affect (the ref or path through which
the broken object is reached).  ``repair`` fixes what can be fixed without
guessing: a corrupt cached chunk is dropped and fetched again from the remote;
a missing object or chunk the remote holds is fetched; a reachable chunk or
object that is neither uploaded nor queued is queued; a queue entry whose
data is gone is dropped.  What cannot be repaired (a corrupt chunk with no
other copy) stays in the report, and ``fsck`` exits 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .chunking import ZERO_ID, hash_bytes
from .errors import Corrupt, JiaoziError
from .objects import (
    EMPTY_MANIFEST_ID,
    decode_commit,
    decode_manifest,
    decode_tree,
    object_id,
)
from .repo import Repository
from .worktree import Inode


def fsck(repo: Repository, repair: bool = False, check_remote: bool = False,
         progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    problems: list[dict[str, str]] = []
    repaired: list[dict[str, str]] = []
    has_remote = bool(repo.config.get("remote"))
    objects: dict[bytes, bytes] = {}
    chunks: set[bytes] = set()
    bad_chunks: list[bytes] = []
    with repo.store.read() as r:
        for cid, data in r.iter_chunk_data():
            if hash_bytes(data) != cid:
                bad_chunks.append(bytes(cid))
            chunks.add(bytes(cid))
            if progress:
                progress(len(data))
        for oid, data in r.prefix("objects", b""):
            if object_id(data) != oid:
                problems.append({"kind": "bad-object", "id": bytes(oid).hex(),
                                 "detail": "encoding does not match its id"})
            objects[bytes(oid)] = bytes(data)
        located = {bytes(k) for k, _ in r.prefix("located", b"")}
        queued = {bytes(v[1:33]) for _, v in r.prefix("upload", b"") if v[:1] in (b"C", b"O")}
        refs = {bytes(k).decode(): bytes(v) for k, v in r.prefix("refs", b"")
                if not bytes(k).startswith(b"wt/")}
        inodes = [Inode.decode(int.from_bytes(k, "big"), v) for k, v in r.prefix("inodes", b"")]

    for cid in bad_chunks:
        chunks.discard(cid)
        fixed = False
        if repair:
            with repo.store.write() as w:
                n = w.delete_chunk(cid)
                if n:
                    w.add_counter("chunk_bytes", -n)
            if cid in located:
                try:
                    repo._read_chunk(cid)
                    chunks.add(cid)
                    fixed = True
                except JiaoziError:
                    pass
        entry = {"kind": "bad-chunk", "id": cid.hex(),
                 "detail": "content does not match its blake3 id"}
        (repaired if fixed else problems).append(entry)

    seen: set[bytes] = set()
    needed: set[bytes] = set()

    def need(oid: bytes, what: str, kind: bytes) -> bytes | None:
        data = objects.get(oid)
        if data is None or data[:1] != kind:
            problems.append({"kind": "missing-object", "id": oid.hex(), "detail": what})
            return None
        needed.add(oid)
        return data

    def check_manifest(mid: bytes, what: str) -> None:
        if mid in seen or mid == EMPTY_MANIFEST_ID:  # the empty file needs no object
            return
        seen.add(mid)
        data = need(mid, what, b"M")
        if data is None:
            return
        try:
            level, entries = decode_manifest(data)
        except Corrupt as exc:
            problems.append({"kind": "bad-object", "id": mid.hex(), "detail": str(exc)})
            return
        for eid, _ in entries:
            if level > 0:
                check_manifest(eid, what)
            elif eid != ZERO_ID:
                needed.add(eid)
                if eid not in chunks and eid not in located:
                    problems.append({"kind": "missing-chunk", "id": eid.hex(),
                                     "detail": what})

    def check_tree(tid: bytes, what: str) -> None:
        if tid in seen:
            return
        seen.add(tid)
        data = need(tid, what, b"T")
        if data is None:
            return
        try:
            tree = decode_tree(data)
        except Corrupt as exc:
            problems.append({"kind": "bad-object", "id": tid.hex(), "detail": str(exc)})
            return
        for e in tree.entries:
            sub = f"{what}/{e.name.decode(errors='replace')}"
            if e.is_dir:
                check_tree(e.ref, sub)
            elif e.is_file:
                check_manifest(e.ref, sub)

    ncommits = 0
    for name, head in refs.items():
        todo = [head]
        while todo:
            cid = todo.pop()
            if cid in seen:
                continue
            seen.add(cid)
            data = need(cid, f"commit reached from {name}", b"C")
            if data is None:
                continue
            try:
                c = decode_commit(data)
            except Corrupt as exc:
                problems.append({"kind": "bad-object", "id": cid.hex(), "detail": str(exc)})
                continue
            ncommits += 1
            check_tree(c.tree, f"{name}@{cid.hex()[:12]}:")
            todo.extend(p for p in c.parents if p in objects)  # retention may cut history

    for node in inodes:  # the worktrees: uncommitted state
        if node.ref is None:
            continue
        what = f"worktree inode {node.ino}"
        if node.is_dir:
            check_tree(node.ref, what)
        elif node.is_file:
            check_manifest(node.ref, what)

    if has_remote:
        lost = sorted(i for i in needed if i not in located and i not in queued)
        for oid in lost:
            entry = {"kind": "not-uploaded", "id": oid.hex(),
                     "detail": "reachable but neither in the remote nor queued for upload"}
            if repair:
                with repo.store.write() as w:
                    w.enqueue((b"C" if oid in chunks else b"O") + oid)
                repaired.append(entry)
            else:
                problems.append(entry)
        if check_remote:
            problems += _check_remote(repo)

    return {
        "chunks": len(chunks), "objects": len(objects), "commits": ncommits,
        "refs": len(refs), "inodes": len(inodes), "problems": problems,
        "repaired": repaired, "ok": not problems,
    }


def _check_remote(repo: Repository) -> list[dict[str, str]]:
    """Every pack the store says the remote holds is there, with its index."""
    problems = []
    keys = set(repo.remote.list("packs/"))
    with repo.store.read() as r:
        packs = {bytes(k[5:]) for k, _ in r.prefix("meta", b"pack/")}
    for pid in packs:
        h = pid.hex()
        if f"packs/{h}.opack" in keys:
            continue
        for ext in ("pack", "idx"):
            if f"packs/{h}.{ext}" not in keys:
                problems.append({"kind": "remote-missing", "id": h,
                                 "detail": f"packs/{h}.{ext} is not in {repo.remote.url}"})
    return problems
