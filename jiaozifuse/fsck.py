"""Check a repository's store: every hash, every reference.

The first version checks what the local store holds; checks against the
remote and repairs come with the S3 write-back.
"""

from __future__ import annotations

from typing import Any

from .chunking import ZERO_ID, hash_bytes
from .errors import Corrupt
from .objects import decode_commit, decode_manifest, decode_tree, object_id
from .repo import Repository


def fsck(repo: Repository, progress: Any = None) -> dict[str, Any]:
    """Return a report: counts checked and a list of problems (empty when clean)."""
    problems: list[dict[str, str]] = []
    objects: dict[bytes, bytes] = {}
    chunks: set[bytes] = set()
    with repo.store.read() as r:
        for cid, data in r.prefix("chunks", b""):
            if hash_bytes(data) != cid:
                problems.append({"kind": "bad-chunk", "id": cid.hex(),
                                 "detail": "content does not match its blake3 id"})
            chunks.add(bytes(cid))
            if progress:
                progress(len(data))
        for oid, data in r.prefix("objects", b""):
            if object_id(data) != oid:
                problems.append({"kind": "bad-object", "id": oid.hex(),
                                 "detail": "encoding does not match its id"})
            objects[bytes(oid)] = bytes(data)
        refs = {k.decode(): v for k, v in r.prefix("refs", b"branch/")}
        refs.update({k.decode(): v for k, v in r.prefix("refs", b"tag/")})

    seen: set[bytes] = set()

    def need(oid: bytes, what: str, kind: bytes) -> bytes | None:
        data = objects.get(oid)
        if data is None or data[:1] != kind:
            problems.append({"kind": "missing-object", "id": oid.hex(), "detail": what})
            return None
        return data

    def check_manifest(mid: bytes, what: str) -> None:
        if mid in seen:
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
            if level == 0:
                if eid != ZERO_ID and eid not in chunks:
                    problems.append({"kind": "missing-chunk", "id": eid.hex(), "detail": what})
            else:
                check_manifest(eid, what)

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
            check_tree(c.tree, f"{cid.hex()[:12]}:")
            todo.extend(c.parents)
    return {
        "chunks": len(chunks),
        "objects": len(objects),
        "commits": ncommits,
        "refs": len(refs),
        "problems": problems,
        "ok": not problems,
    }
