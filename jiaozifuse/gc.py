"""Garbage collection: reclaim what nothing reaches, never what something might.

Roots (what is kept):

* every branch, tag and ``remote/*`` ref, with their history — except that a
  branch may set a retention policy in config.json (``gc.retain``:
  ``{"main": {"max_count": 100, "max_age_days": 90}}``): commits past it are
  dropped from that branch's history (tags and other branches still keep
  theirs);
* every worktree inode (uncommitted files and directories of every branch,
  unlinked-but-open files included), and in the daemon every open file's
  in-memory chunk list;
* every worktree checkpoint this cache queued, and, for the remote, every
  checkpoint any cache wrote.

Local collection runs in one write transaction (the daemon runs it on its own
thread), so nothing can be created between marking and sweeping.

Remote collection must cope with other machines writing to the same bucket
while it runs, and with deduplication: another machine may commit a new
version that reuses a chunk in a pack that looks unreachable to us.  So a
pack is deleted in two steps, a grace period apart (``gc.grace_s``, default
24 hours):

1. a pack that no root reaches, and that is older than the grace period
   (so that packs uploaded just before their ref are never considered), is
   *condemned*: listed with the time in ``gc/condemned.json``;
2. a later ``gc`` deletes a condemned pack only if it is still unreachable
   after fetching every ref and checkpoint again, and was condemned at least
   the grace period ago.

"Reaches" is judged on a complete view, never on what this cache happens to
hold:

* every object a root reaches is read, fetched from its pack if this store
  lacks it (a local gc deleted it while nothing here reached it, and another
  machine that still had it committed it again: dedup uploads nothing, so no
  new pack brings it back); a reachable tree or manifest that no pack holds
  stops the collection (``Corrupt``) rather than let it guess;
* ``located`` names one pack per id, and the same id may live in several
  (a rescue copies it, two machines upload the same bytes, a pack is uploaded
  again under its own name; another machine's ``located`` may name another
  copy than ours).  A pack with no reachable entry in our ``located`` is read
  from its own index, and it is neither condemned nor deleted while it holds
  a reachable id that has no copy in another pack that exists and is not
  condemned.

A writer, before it pushes a ref, reads ``gc/condemned.json`` and re-uploads
into a fresh pack any chunk or object its refs and worktrees need from a
condemned pack (writeback.rescue_condemned), so a commit made on a stale view
cannot point into a pack about to be deleted — unless the writer takes longer
than the grace period between that check and its ref update, which a 24-hour
grace makes moot.  Pack names are content hashes, so a rescue of exactly a
condemned pack's entries in its order (always so for a pack of one) would get
that pack's very name and land on the pack being deleted: a rescue pack is
given a name no condemned pack has.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from .chunking import ZERO_ID
from .errors import Corrupt, JiaoziError, NotFound
from .objects import decode_commit, decode_manifest, decode_tree
from .store import Txn
from .worktree import Inode

log = logging.getLogger("jiaozifuse.gc")

DEFAULT_GRACE_S = 24 * 3600


def _retained_commits(t: Txn, head: bytes, policy: dict | None,
                      missing: dict[bytes, str] | None = None) -> list[bytes]:
    """Commits of one ref's history that its retention policy keeps."""
    max_count = (policy or {}).get("max_count")
    max_age = (policy or {}).get("max_age_days")
    horizon = time.time_ns() - int(max_age * 86400e9) if max_age else None
    out = []
    todo = [head]
    seen = set()
    while todo:
        cid = todo.pop(0)
        if cid in seen:
            continue
        seen.add(cid)
        raw = t.get_object(cid)
        if raw is None:
            if missing is not None:
                missing[cid] = "commit"
            continue  # history cut by an earlier retention, or not fetched
        c = decode_commit(raw)
        if out and ((max_count is not None and len(out) >= max_count) or (
                horizon is not None and c.time_ns < horizon)):
            continue
        out.append(cid)
        todo.extend(c.parents)
    return out


def mark(t: Txn, retain: dict[str, dict] | None = None,
         extra_roots: list[bytes] = (), extra_chunks: set[bytes] | None = None,
         missing: dict[bytes, str] | None = None) -> tuple[set[bytes], set[bytes]]:
    """Return (reachable object ids, reachable chunk ids).

    An object that a root reaches but that this store lacks is passed over,
    and what it reaches with it; *missing* (if given) receives its id and
    kind ("commit", "tree" or "manifest"), for a caller that must not guess.
    """
    objects: set[bytes] = set()
    chunks: set[bytes] = set(extra_chunks or ())
    trees: list[bytes] = list(extra_roots)
    manifests: list[bytes] = []
    for k, v in t.prefix("refs", b""):
        key = bytes(k)
        if key.startswith(b"wt/"):
            continue
        policy = None
        if key.startswith(b"branch/"):
            policy = (retain or {}).get(key[7:].decode())
        for cid in _retained_commits(t, bytes(v), policy, missing):
            objects.add(cid)
            trees.append(decode_commit(t.get_object(cid)).tree)
    for k, v in t.prefix("inodes", b""):
        node = Inode.decode(int.from_bytes(k, "big"), v)
        if node.ref is None:
            continue
        if node.is_dir:
            trees.append(node.ref)
        elif node.is_file:
            manifests.append(node.ref)
    for _, v in t.prefix("meta", b"ckpt/"):
        trees.append(bytes(v[:32]))
    while trees or manifests:
        if trees:
            tid = trees.pop()
            if tid in objects:
                continue
            raw = t.get_object(tid)
            if raw is None:
                if missing is not None:
                    missing[tid] = "tree"
                continue
            objects.add(tid)
            for e in decode_tree(raw).entries:
                if e.is_dir:
                    trees.append(e.ref)
                elif e.is_file:
                    manifests.append(e.ref)
        else:
            mid = manifests.pop()
            if mid in objects:
                continue
            raw = t.get_object(mid)
            if raw is None:
                if missing is not None:
                    missing[mid] = "manifest"
                continue
            objects.add(mid)
            level, entries = decode_manifest(raw)
            for eid, _ in entries:
                if level == 0:
                    if eid != ZERO_ID:
                        chunks.add(eid)
                else:
                    manifests.append(eid)
    return objects, chunks


def collect_local(repo: Any, dry_run: bool = False) -> dict[str, Any]:
    """Delete unreachable local objects and chunks (one write transaction)."""
    retain = (repo.config.get("gc") or {}).get("retain")
    open_chunks: set[bytes] = set()
    for of in repo.worktree.open_files.values():
        for seg in of.content.segs:
            if seg.entries is not None:
                open_chunks.update(cid for cid, _ in seg.entries)
            elif seg.oid is not None:
                open_chunks.add(seg.oid)  # a manifest: kept with what it names below
    repo.worktree.flush_all()
    report = {"objects_deleted": 0, "chunks_deleted": 0, "bytes_freed": 0, "dry_run": dry_run}
    with repo.store.write() as w:
        manifest_roots = [c for c in open_chunks if w.get_object(c) is not None]
        objects, chunks = mark(w, retain, extra_chunks=open_chunks)
        # manifests of open files (unchanged segments) and what they name
        for mid in manifest_roots:
            raw = w.get_object(mid)
            objects.add(mid)
            for eid, _ in decode_manifest(raw)[1]:
                chunks.add(eid)
        dead_objects = [bytes(k) for k, _ in w.prefix("objects", b"") if bytes(k) not in objects]
        # inline chunks and those in the chunk log alike (lengths only: no data read)
        dead_sizes = [(cid, n) for cid, n in w.iter_chunks() if cid not in chunks]
        dead_chunks = [cid for cid, _ in dead_sizes]
        report["objects_deleted"] = len(dead_objects)
        report["chunks_deleted"] = len(dead_chunks)
        freed = sum(n for _, n in dead_sizes)
        report["bytes_freed"] = freed
        if dry_run:
            return report  # nothing was written: the transaction commits empty
        # The chunk log's ends as this process sees them (its batch included),
        # taken before the deletions below: if the batch holding them failed to
        # commit, the chunks they delete would be named again.
        ends = w.log_ends()
        dead = set(dead_objects) | set(dead_chunks)
        for oid in dead_objects:
            w.txn.delete(oid, db=w._dbs["objects"])
        for cid in dead_chunks:
            w.delete_chunk(cid)  # a log chunk's range is punched once this commits
            w.delete("access", cid)
        w.add_counter("chunk_bytes", -freed)
        # what is dead needs no upload
        for k, v in list(w.prefix("upload", b"")):
            if v[:1] in (b"C", b"O") and bytes(v[1:33]) in dead:
                w.txn.delete(bytes(k), db=w._dbs["upload"])
    # bytes a writer appended to the log and died before naming (a crash)
    report["log_bytes_trimmed"] = repo.store.log.trim(ends)
    return report


def collect_remote(repo: Any, dry_run: bool = False, now: float | None = None) -> dict[str, Any]:
    """Condemn unreachable old packs, delete packs condemned a grace period ago."""
    now = time.time() if now is None else now
    grace = float((repo.config.get("gc") or {}).get("grace_s", DEFAULT_GRACE_S))
    remote = repo.remote
    repo.fetch()
    roots = []
    for key in remote.list("worktrees/"):
        try:
            data, _ = remote.get(key)
            roots.append(bytes.fromhex(json.loads(data)["tree"]))
        except (NotFound, ValueError, KeyError):
            continue
    objects, chunks = _mark_remote(repo, roots)
    reachable = objects | chunks
    with repo.store.read() as r:
        # every pack we know of; a pack whose entries all moved elsewhere
        # (rescued by a writer) has no located entry left and is dead too,
        # once its own index shows every reachable id safe elsewhere
        packs: dict[bytes, bool] = {bytes(k[5:]): False for k, _ in r.prefix("meta", b"pack/")}
        for oid, raw in r.prefix("located", b""):
            pid = bytes(raw[:32])
            packs[pid] = packs.get(pid, False) or bytes(oid) in reachable
    ages: dict[str, float] = {}
    for item in _list_with_times(remote, "packs/"):
        ages[item[0]] = item[1]
    try:
        raw, etag = remote.get("gc/condemned.json")
        condemned: dict[str, float] = json.loads(raw)
    except NotFound:
        condemned, etag = {}, None
    except ValueError:
        raise Corrupt("gc/condemned.json in the remote is corrupt") from None
    was_condemned = set(condemned)
    existing = {k.removeprefix("packs/").partition(".")[0] for k in ages}
    deleted, newly = [], []
    for pid, live in packs.items():
        hexid = pid.hex()
        keys = [k for k in (f"packs/{hexid}.pack", f"packs/{hexid}.idx",
                            f"packs/{hexid}.opack") if k in ages]
        if live or not keys:
            condemned.pop(hexid, None)
            continue
        if min(ages[k] for k in keys) > now - grace:
            continue  # too young: its ref may not be written yet
        if _holds_only_copy(repo, pid, keys, reachable, existing, was_condemned, dry_run):
            condemned.pop(hexid, None)
            continue
        if hexid in condemned:
            if condemned[hexid] <= now - grace:
                deleted.append((hexid, keys))
        else:
            condemned[hexid] = now
            newly.append(hexid)
    report = {"condemned": newly, "deleted": [h for h, _ in deleted], "dry_run": dry_run,
              "grace_s": grace}
    if dry_run:
        return report
    for hexid, keys in deleted:
        for k in keys:
            remote.delete(k)
        condemned.pop(hexid, None)
        with repo.store.write() as w:
            pid = bytes.fromhex(hexid)
            for oid, raw in list(w.prefix("located", b"")):
                if bytes(raw[:32]) == pid:
                    w.delete("located", bytes(oid))
            w.delete("meta", b"pack/" + pid)
    body = json.dumps(condemned).encode()
    if etag is None:
        remote.put("gc/condemned.json", body)
    else:
        remote.put("gc/condemned.json", body, IfMatch=etag)
    return report


def _mark_remote(repo: Any, roots: list[bytes]) -> tuple[set[bytes], set[bytes]]:
    """:func:`mark` over a complete view of the remote's graph.

    A root may reach objects this store lacks: a local gc deleted them while
    nothing here reached them, and another machine, which still had them,
    committed them again (dedup uploads nothing, the remote's copy serves).
    What such an object reaches is unknown until it is read, so every one is
    fetched from its pack and the marking starts again.  A tree or manifest
    that no pack holds makes the view incomplete: nothing is collected
    (Corrupt).  A commit that no pack holds is history already cut.
    """
    from .writeback import download_metadata

    refreshed = False
    while True:
        missing: dict[bytes, str] = {}
        with repo.store.read() as r:
            objects, chunks = mark(r, None, extra_roots=roots, missing=missing)
        if not missing:
            return objects, chunks
        got, lost = _fetch_objects(repo, list(missing))
        lost = [oid for oid in lost if missing[oid] != "commit"]
        if lost and not refreshed:
            # a ref or checkpoint newer than the packs we listed: list again
            download_metadata(repo.store, repo.remote)
            refreshed = True
            continue
        if lost:
            raise Corrupt(
                f"{missing[lost[0]]} {lost[0].hex()} is reachable but in no pack of the "
                f"remote ({len(lost)} such object(s)); the remote gc collects nothing "
                "without a complete view (see 'jiaozifuse fsck --remote')")
        if not got:
            return objects, chunks  # only commits of a cut history are missing


def _fetch_objects(repo: Any, ids: list[bytes]) -> tuple[int, list[bytes]]:
    """Fetch objects from their object packs into the store (not queued: the
    remote has them).  Returns (how many were stored, ids no pack holds)."""
    from .objects import object_id
    from .writeback import locate

    wanted: dict[bytes, list[tuple[int, int, bytes]]] = {}
    lost = []
    with repo.store.read() as r:
        for oid in ids:
            loc = locate(r, oid)
            if loc is None or loc[3] != b"O":
                lost.append(oid)
            else:
                wanted.setdefault(loc[0], []).append((loc[1], loc[2], oid))
    stored = 0
    for pid, items in wanted.items():
        key = f"packs/{pid.hex()}.opack"
        try:
            head, _ = repo.remote.get(key, 0, 4)
            base = 4 + int.from_bytes(head, "little")
            start = min(off for off, _, _ in items)
            end = max(off + n for off, n, _ in items)
            data, _ = repo.remote.get(key, base + start, end - start)
        except NotFound:
            lost += [oid for _, _, oid in items]
            continue
        with repo.store.write() as w:
            queue, w.queue = w.queue, False
            try:
                for off, n, oid in items:
                    obj = bytes(data[off - start : off - start + n])
                    if object_id(obj) != oid:
                        raise Corrupt(f"object {oid.hex()} in pack {pid.hex()[:12]} is corrupt")
                    w.put_object(oid, obj)
                    stored += 1
            finally:
                w.queue = queue
    return stored, lost


def _holds_only_copy(repo: Any, pid: bytes, keys: list[str], reachable: set[bytes],
                     existing: set[str], condemned: set[str], dry_run: bool = False) -> bool:
    """Does pack *pid* hold a reachable id whose only safe copy it is?

    The store's ``located`` names one pack per id, the one this cache last
    learnt of; the same id can be in several packs (a writer's rescue copies
    it, two machines upload the same bytes, a pack is uploaded again under
    its own name), and another machine's ``located`` may name another copy
    than ours.  So a pack with no reachable entry in our ``located`` is read
    from its own index: it may go only if each reachable id in it has a copy
    in another pack that exists and is not condemned (a condemned copy may
    be deleted by any gc).  A copy our ``located`` names that the remote no
    longer has is replaced by this one (not in a dry run).  An unreadable
    index keeps the pack.
    """
    from .remote import decode_index
    from .writeback import _LOC, locate

    hexid = pid.hex()
    try:
        if f"packs/{hexid}.opack" in keys:
            head, _ = repo.remote.get(f"packs/{hexid}.opack", 0, 4)
            raw, _ = repo.remote.get(f"packs/{hexid}.opack", 4, int.from_bytes(head, "little"))
        else:
            raw, _ = repo.remote.get(f"packs/{hexid}.idx")
        entries = decode_index(raw)
    except JiaoziError as exc:
        log.warning("pack %s: index unreadable (%s); kept", hexid[:12], exc)
        return True
    only = False
    repoint = []
    with repo.store.read() as r:
        for kind, oid, off, n in entries:
            if oid not in reachable:
                continue
            loc = locate(r, oid)
            other = loc[0].hex() if loc is not None else None
            if other is not None and other != hexid and other in existing \
                    and other not in condemned:
                continue
            only = True
            if other is None or other not in existing:
                repoint.append((oid, _LOC.pack(pid, off, n, kind)))
    if repoint and not dry_run:
        with repo.store.write() as w:
            for oid, loc in repoint:
                w.put("located", oid, loc)
    return only


def _list_with_times(remote: Any, prefix: str) -> list[tuple[str, float]]:
    """(key, last-modified unix time) under *prefix*."""
    full = remote.url.key(prefix)
    strip = len(remote.url.key("")) + 1 if remote.url.prefix else 0
    out = []
    token = None
    while True:
        kw: dict[str, Any] = {"Bucket": remote.url.bucket, "Prefix": full}
        if token:
            kw["ContinuationToken"] = token
        r = remote._call(f"LIST {prefix}", remote.s3.list_objects_v2, **kw)
        out += [(o["Key"][strip:], o["LastModified"].timestamp()) for o in r.get("Contents", [])]
        if not r.get("IsTruncated"):
            return out
        token = r.get("NextContinuationToken")
