"""The repository: refs, commits, merges, diffs, import and export.

A repository directory holds::

    REPO/config.json    settings (default branch, remote, ...)
    REPO/store/         the LMDB environment (see store.py)
    REPO/run/           the daemon's control socket, pid file and log

This module works without FUSE: the CLI, the Python API and the tests call it
directly, and the FUSE layer (fs.py) translates kernel requests onto the
worktree it exposes.
"""

from __future__ import annotations

import errno
import getpass
import json
import logging
import os
import re
import socket
import stat
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import writeback
from .chunking import hash_bytes
from .errors import BadName, Conflict, Corrupt, Exists, JiaoziError, NotFound
from .events import DEFAULT_MAX_AGE_S, DEFAULT_MAX_EVENTS, EventLog
from .filecontent import FileContent, Span
from .objects import (
    EMPTY_TREE,
    EMPTY_TREE_ID,
    Commit,
    Tree,
    TreeEntry,
    decode_commit,
    decode_tree,
    encode_commit,
    encode_tree,
    object_id,
)
from .remote import Remote
from .store import Store, Txn, from_u64, u64
from .worktree import Inode, Worktree, now_ns
from .writeback import AccessLog

log = logging.getLogger("jiaozifuse.repo")

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
HEX_RE = re.compile(r"[0-9a-f]{4,64}\Z")
CONFIG = "config.json"
#: Chunk ids remembered as verified (about 4 GiB of 64 KiB chunks).
VERIFIED_MAX = 65536
#: A commit event lists at most this many changed paths (then says it was cut).
MAX_EVENT_PATHS = 10_000


def check_ref_name(name: str, kind: str = "branch") -> str:
    if not NAME_RE.match(name) or len(name.encode()) > 255 or name.endswith(".lock"):
        raise BadName(
            f"invalid {kind} name {name!r}: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 255 bytes"
        )
    return name


def default_author() -> str:
    env = os.environ.get("JIAOZIFUSE_AUTHOR")
    if env:
        return env
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class PreparedCommit:
    branch: str
    head: bytes
    tree: bytes
    changed: list[str]


@dataclass(frozen=True)
class Change:
    """One path that differs between two trees."""

    kind: str  # "added" | "deleted" | "modified"
    path: str
    size: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"change": self.kind, "path": self.path, "size": self.size}


def _entry_key(e: TreeEntry) -> tuple[int, bytes]:
    """What makes two entries "the same" for diff and merge: type, mode, content."""
    return e.mode, e.ref


class Repository:
    """An open repository."""

    def __init__(self, path: Path, store: Store, config: dict) -> None:
        self.path = path
        self.store = store
        self.config = config
        self.worktree = Worktree(store, read_chunk=self._read_chunk,
                                 read_chunks=self._read_chunks, read_into=self._read_into)
        self._remote: Remote | None = None
        self._batched_bytes = 0
        self._fetched_bytes = 0
        self.access = AccessLog()
        self.verified: OrderedDict[bytes, None] = OrderedDict()
        store.queue_uploads = bool(config.get("remote"))
        ev = config.get("events", {})
        self.events = EventLog(store, int(ev.get("max_events", DEFAULT_MAX_EVENTS)),
                               float(ev.get("max_age_s", DEFAULT_MAX_AGE_S)))
        #: config ``events.enabled: false`` turns recording off (benchmarks)
        self.events.enabled = bool(ev.get("enabled", True))
        self._roots: dict[int, str] = {}
        #: receivers of repository events: fn(type: str, **fields)
        self.listeners: list[Callable[..., None]] = []
        #: called as fn(branch, root_ino, names) when a branch's worktree is replaced
        #: (reset --hard, merge, revert): the mount drops its kernel caches.
        self.reset_hooks: list[Callable[[str, int, list[bytes]], None]] = []

    # ----------------------------------------------------------- lifecycle

    @classmethod
    def init(cls, path: str | Path, default_branch: str = "main", remote: str | None = None,
             endpoint_url: str | None = None, cache_size: int | None = None) -> Repository:
        path = Path(path)
        check_ref_name(default_branch)
        for parent in path.resolve().parents:
            if (parent / CONFIG).exists() and (parent / "store").is_dir():
                raise Exists(f"{path} is inside the repository {parent}")
        rem = None
        if remote:
            rem = Remote(remote, endpoint_url)
            rem.check()
            if rem.exists("config.json"):
                raise Exists(f"{rem.url} already holds a repository: use 'jiaozifuse clone'")
        if (path / CONFIG).exists() or (path / "store" / "data.mdb").exists():
            raise Exists(f"{path} is already a jiaozifuse repository")
        if path.exists() and not path.is_dir():
            raise JiaoziError(f"{path} exists and is not a directory", errno.ENOTDIR)
        try:
            path.mkdir(parents=True, exist_ok=True)
            store = Store.create(path / "store")
        except OSError as exc:
            raise JiaoziError(f"cannot create a repository at {path}: {exc.strerror}",
                              exc.errno) from None
        config: dict = {"format": 1, "default_branch": default_branch,
                        "cache_id": os.urandom(8).hex()}
        if rem is not None:
            config["remote"] = {"url": str(rem.url), "endpoint_url": rem.endpoint_url}
            rem.put("config.json", json.dumps(
                {"format": 1, "default_branch": default_branch}).encode(), IfNoneMatch="*")
        if cache_size:
            config["cache_size"] = cache_size
        repo = cls(path, store, config)
        repo._remote = rem
        with store.write() as w:
            w.put_object(EMPTY_TREE_ID, EMPTY_TREE)
            c = Commit(EMPTY_TREE_ID, (), default_author(), now_ns(), "Repository created")
            enc = encode_commit(c)
            cid = object_id(enc)
            w.put_object(cid, enc)
            w.put("refs", b"branch/" + default_branch.encode(), cid)
            root = repo.worktree.create_root(w, EMPTY_TREE_ID, os.getuid(), os.getgid())
            w.put("refs", b"wt/" + default_branch.encode(), u64(root))
        try:
            _write_json_atomic(path / CONFIG, config)
        except OSError as exc:
            raise JiaoziError(f"cannot write {path / CONFIG}: {exc.strerror}", exc.errno) from None
        return repo

    @classmethod
    def open(cls, path: str | Path, readonly: bool = False) -> Repository:
        path = Path(path)
        cfg_path = path / CONFIG
        if not cfg_path.exists():
            raise NotFound(f"{path} is not a jiaozifuse repository (no {CONFIG})")
        try:
            config = json.loads(cfg_path.read_text())
            if not isinstance(config, dict) or not isinstance(
                config.get("default_branch"), str
            ):
                raise ValueError("missing default_branch")
        except (ValueError, UnicodeDecodeError) as exc:
            raise JiaoziError(f"{cfg_path} is corrupt: {exc}") from None
        store = Store.open(path / "store", readonly=readonly)
        return cls(path, store, config)

    @classmethod
    def clone(cls, url: str, path: str | Path, endpoint_url: str | None = None,
              cache_size: int | None = None, recover: str | None = None) -> Repository:
        """A new local cache over an existing remote repository."""
        path = Path(path)
        if (path / CONFIG).exists():
            raise Exists(f"{path} is already a jiaozifuse repository")
        rem = Remote(url, endpoint_url)
        try:
            raw, _ = rem.get("config.json")
        except NotFound:
            raise NotFound(f"no jiaozifuse repository at {rem.url}") from None
        try:
            rconf = json.loads(raw)
            default_branch = check_ref_name(rconf["default_branch"])
        except (ValueError, KeyError, TypeError):
            raise JiaoziError(f"{rem.url}/config.json is corrupt") from None
        try:
            path.mkdir(parents=True, exist_ok=True)
            store = Store.create(path / "store")
        except OSError as exc:
            raise JiaoziError(f"cannot create a repository at {path}: {exc.strerror}",
                              exc.errno) from None
        config: dict = {
            "format": 1, "default_branch": default_branch, "cache_id": os.urandom(8).hex(),
            "remote": {"url": str(rem.url), "endpoint_url": rem.endpoint_url},
        }
        if cache_size:
            config["cache_size"] = cache_size
        repo = cls(path, store, config)
        repo._remote = rem
        repo.fetch()
        if recover:
            repo.recover_worktrees(recover)
        _write_json_atomic(path / CONFIG, config)
        return repo

    @property
    def remote(self) -> Remote:
        if self._remote is None:
            rem = writeback.remote_from_config(self.config)
            if rem is None:
                raise JiaoziError("this repository has no remote (init --remote or clone)")
            self._remote = rem
        return self._remote

    def _read_chunk(self, cid: bytes) -> bytes | None:
        """A chunk's bytes, verified against its id; fetched from the remote if missing.

        A cached chunk whose bytes do not match its blake3 id (a flipped bit
        on disk) is never served: it is dropped and fetched again from the
        remote, or, without one, the read fails with Corrupt (EIO).
        """
        return self._checked_chunk(cid, self.store.get_chunk(cid))

    def _checked_chunk(self, cid: bytes, data: bytes | None) -> bytes | None:
        """:meth:`_read_chunk` given what the store holds for *cid* (None: nothing)."""
        if data is not None and cid in self.verified:
            self.verified.move_to_end(cid)
            if self.config.get("remote"):
                self.access.touch(cid)
            return data
        if data is not None and hash_bytes(data) != cid:
            log.error("chunk %s in the local cache is corrupt; dropping it", cid.hex())
            with self.store.write() as w:
                if w.delete_chunk(cid):
                    w.add_counter("chunk_bytes", -len(data))
            data = None
            if not self.config.get("remote"):
                raise Corrupt(f"chunk {cid.hex()[:16]} is corrupt and there is no other copy")
        if data is None and self.config.get("remote"):
            got = writeback.fetch_chunks(self.store, self.remote, [cid])
            with self.store.write() as w:
                writeback.store_fetched(w, got)
                writeback.record_moved(w, self.store)  # copies found for a gone pack
            data = got.get(cid)
            self._fetched_bytes += len(data or b"")
            if self._fetched_bytes > (64 << 20) and self.config.get("cache_size"):
                self._fetched_bytes = 0
                self.evict()
        if data is not None:
            self.mark_verified([cid])
        if data is not None and self.config.get("remote"):
            self.access.touch(cid)
        return data

    def _read_chunks(self, ids: list[bytes]) -> list[bytes | None]:
        """:meth:`_read_chunk` of several ids; chunks verified before come from
        the store in one batch (a sequential reader's usual case)."""
        datas = self.store.get_chunks(ids)
        return [self._checked_chunk(cid, data) for cid, data in zip(ids, datas, strict=True)]

    def _read_into(self, spans: list[Span], out: memoryview) -> list[int]:
        """Fill spans of a read buffer with chunks verified before (the
        common case of a read through the mount: fetched chunks are checked
        on arrival, cached ones at their first read); the others, left
        unfilled, go through :meth:`_read_chunks` and are checked there."""
        verified = self.verified
        known = [i for i, s in enumerate(spans) if s[0] in verified]
        if not known:
            return list(range(len(spans)))
        done = self.store.read_into([spans[i] for i in known], out)
        filled: set[int] = set()
        touch = self.access.touch if self.config.get("remote") else None
        for i, ok in zip(known, done, strict=True):
            if ok:
                cid = spans[i][0]
                filled.add(i)
                verified.move_to_end(cid)
                if touch is not None:
                    touch(cid)
        return [i for i in range(len(spans)) if i not in filled]

    def mark_verified(self, ids: Iterable[bytes]) -> None:
        """Remember chunks just checked against their ids, so that reading them
        again soon (a sequential reader crossing a chunk in several requests)
        does not hash them again.  Bounded: the oldest are forgotten."""
        v = self.verified
        for cid in ids:
            v[cid] = None
            v.move_to_end(cid)
        while len(v) > VERIFIED_MAX:
            v.popitem(last=False)

    def sync(self, progress: Callable[[int], None] | None = None) -> dict:
        """Upload everything queued (blocking, this process), with a
        checkpoint of every branch's uncommitted worktree (a clone can
        recover what this made durable; it flushes open files first)."""
        self.checkpoint()
        sent = writeback.drain_sync(self.store, self.remote, self.is_ancestor, progress)
        self.evict()
        return sent

    def evict(self) -> int:
        """Bring the chunk cache under ``cache_size`` (uploaded chunks only)."""
        limit = self.config.get("cache_size")
        if not limit or not self.config.get("remote"):
            return 0
        return writeback.evict(self.store, limit, self.access)

    def cache_room(self, n: int) -> bool:
        """May *n* more bytes be written into the cache?

        False once the chunks not yet uploaded fill ``cache_size`` (they can
        never be evicted): the mount answers ENOSPC rather than grow the
        cache without bound while S3 is unreachable.  Cheap (no LMDB access):
        the daemon's write-back keeps the figures (writeback.UploadState).
        """
        return self.upload_state().room(n)

    def upload_state(self) -> writeback.UploadState:
        """What the daemon's uploader last said: bytes not yet durable, its last error."""
        return writeback.state_of(self.store)

    def fetch(self) -> dict[str, Any]:
        """Bring the remote's objects and refs; fast-forward what can be."""
        rem = self.remote
        got = writeback.download_metadata(self.store, rem)
        updated, diverged = [], []
        remote_refs = {}
        for key in rem.list("refs/"):
            name = key.removeprefix("refs/")
            ref = rem.get_ref(name)
            if ref is not None:
                remote_refs[name] = ref
        for name, (commit, etag) in sorted(remote_refs.items()):
            kind, _, short = name.partition("/")
            key = name.encode()
            with self.store.read() as r:
                local = r.get("refs", key)
                known = r.get_object(commit) is not None
            if not known:
                log.warning("remote ref %s names %s, not in the remote's packs", name,
                            commit.hex()[:12])
                continue
            with self.store.write() as w:
                queue, w.queue = w.queue, False
                try:
                    w.put("meta", b"remote_etag/" + key, etag.encode() + b"\0" + commit)
                    w.put("refs", b"remote/" + key, commit)
                    if local is None:
                        w.put("refs", key, commit)
                        if kind == "branch":
                            tree = self.get_commit(commit, w).tree
                            root = self.worktree.create_root(w, tree, os.getuid(), os.getgid())
                            w.put("refs", b"wt/" + short.encode(), u64(root))
                        updated.append(name)
                        continue
                finally:
                    w.queue = queue
            if local == commit or self.is_ancestor(commit, local):
                continue  # up to date, or ours is ahead (the push is queued)
            if kind == "branch" and self.is_ancestor(local, commit) and self.is_clean(short):
                with self.store.write() as w:
                    queue, w.queue = w.queue, False
                    try:
                        w.put("refs", key, commit)
                        self._reset_worktree(w, short, self.get_commit(commit, w).tree)
                    finally:
                        w.queue = queue
                updated.append(name)
            else:
                diverged.append({"ref": name, "local": local.hex(), "remote": commit.hex()})
        return {**got, "updated": updated, "diverged": diverged}

    def checkpoint(self) -> list[str]:
        """Queue a checkpoint of every branch's uncommitted worktree for upload.

        Open files are flushed first; a branch whose worktree has not changed
        since its last checkpoint is skipped.  Returns the branches queued.
        """
        if not self.config.get("remote"):
            return []
        self.worktree.flush_all()
        done = []
        cache = self.config.get("cache_id", "cache")
        for branch in self.branches():
            with self.store.write() as w:
                tree, _ = self.worktree.write_tree(w, self.root_ino(branch, w))
                head = self.head(branch, w)
                key = b"ckpt/" + branch.encode()
                if w.get("meta", key) == tree + head:
                    continue
                w.put("meta", key, tree + head)
                w.enqueue(b"W" + tree + head + f"{cache}/{branch}".encode())
                done.append(branch)
        return done

    def recover_worktrees(self, cache_id: str) -> list[str]:
        """Adopt the worktrees another cache checkpointed (after losing it)."""
        out = []
        for key in self.remote.list(f"worktrees/{cache_id}/"):
            branch = key.rsplit("/", 1)[-1]
            data, _ = self.remote.get(key)
            doc = json.loads(data)
            tree = bytes.fromhex(doc["tree"])
            with self.store.write() as w:
                if w.get_object(tree) is None:
                    log.warning("checkpoint of %s names a tree not in the remote", branch)
                    continue
                if w.get("refs", b"branch/" + branch.encode()) is None:
                    continue
                self._reset_worktree(w, branch, tree)
            out.append(branch)
        return out

    def remote_status(self) -> dict[str, Any]:
        st = writeback.queue_status(self.store)
        st["remote"] = self.config.get("remote", {}).get("url")
        st["cache_id"] = self.config.get("cache_id")
        st["cache_size"] = self.config.get("cache_size")
        st.update(writeback.state_of(self.store).as_dict())
        return st

    def close(self) -> None:
        self.worktree.flush_all()
        self.store.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def emit(self, type: str, **fields: object) -> None:
        """Record an event (durably, in the event log) and tell in-process listeners."""
        if self.events.enabled:
            self.events.append(type, **fields)
        for fn in self.listeners:
            fn(type, **fields)

    def branch_of_root(self, root_ino: int) -> str | None:
        name = self._roots.get(root_ino)
        if name is None:
            with self.store.read() as r:
                self._roots = {from_u64(v): bytes(k[3:]).decode()
                               for k, v in r.prefix("refs", b"wt/")}
            name = self._roots.get(root_ino)
        return name

    def path_of(self, ino: int) -> tuple[str | None, str]:
        """(branch, path) of a worktree inode, following its first link upwards."""
        parts: list[bytes] = []
        node = self.worktree.getattr(ino)
        for _ in range(4096):
            if not node.links:
                break
            parent, name = node.links[0]
            parts.append(name)
            node = self.worktree.getattr(parent)
        return self.branch_of_root(node.ino), os.fsdecode(b"/".join(reversed(parts)))

    @property
    def default_branch(self) -> str:
        return self.config["default_branch"]

    # ---------------------------------------------------------------- objects

    def _object(self, t: Txn, oid: bytes) -> bytes:
        raw = t.get_object(oid)
        if raw is None:
            raise Corrupt(f"object {oid.hex()} is missing from the store")
        return raw

    def get_commit(self, cid: bytes, t: Txn | None = None) -> Commit:
        if t is None:
            with self.store.read() as r:
                return decode_commit(self._object(r, cid))
        return decode_commit(self._object(t, cid))

    def get_tree(self, tid: bytes, t: Txn | None = None) -> Tree:
        if t is None:
            with self.store.read() as r:
                return decode_tree(self._object(r, tid))
        return decode_tree(self._object(t, tid))

    def file_content(self, manifest_id: bytes) -> FileContent:
        return FileContent(self.worktree.read_chunk, self.worktree.read_object, manifest_id,
                           self.worktree.read_chunks, self.worktree.read_into)

    # ------------------------------------------------------------------- refs

    def branches(self) -> dict[str, bytes]:
        with self.store.read() as r:
            return {k[7:].decode(): v for k, v in r.prefix("refs", b"branch/")}

    def tags(self) -> dict[str, bytes]:
        with self.store.read() as r:
            return {k[4:].decode(): v for k, v in r.prefix("refs", b"tag/")}

    def head(self, branch: str, t: Txn | None = None) -> bytes:
        key = b"branch/" + branch.encode()
        raw = t.get("refs", key) if t else self._read_ref(key)
        if raw is None:
            raise NotFound(f"no such branch: {branch}")
        return raw

    def _read_ref(self, key: bytes) -> bytes | None:
        with self.store.read() as r:
            return r.get("refs", key)

    def root_ino(self, branch: str, t: Txn | None = None) -> int:
        key = b"wt/" + branch.encode()
        raw = t.get("refs", key) if t else self._read_ref(key)
        if raw is None:
            raise NotFound(f"no such branch: {branch}")
        return from_u64(raw)

    def resolve(self, ref: str) -> bytes:
        """Resolve a branch, tag, commit id or unique id prefix, with ~N and ^."""
        base, steps = ref, 0
        m = re.match(r"(.*?)((?:~\d*|\^)+)\Z", ref)
        if m and m.group(1):
            base = m.group(1)
            for part in re.findall(r"~\d*|\^", m.group(2)):
                steps += int(part[1:] or 1) if part.startswith("~") else 1
        cid = self._resolve_base(base)
        for _ in range(steps):
            parents = self.get_commit(cid).parents
            if not parents:
                raise NotFound(f"{ref}: commit {cid.hex()[:12]} has no parent")
            cid = parents[0]
        return cid

    def _resolve_base(self, ref: str) -> bytes:
        with self.store.read() as r:
            keys = [b"branch/" + ref.encode(), b"tag/" + ref.encode()]
            if ref.startswith("remote/"):  # remote/NAME: the remote's head of branch NAME
                keys = [b"remote/branch/" + ref[7:].encode(), b"remote/tag/" + ref[7:].encode()]
            for key in keys:
                v = r.get("refs", key)
                if v is not None:
                    return v
            low = ref.lower()
            if HEX_RE.match(low):
                if len(low) == 64:
                    raw = r.get_object(bytes.fromhex(low))
                    if raw is not None and raw[:1] == b"C":
                        return bytes.fromhex(low)
                else:
                    found = self._by_prefix(r, low)
                    if len(found) == 1:
                        return found[0]
                    if len(found) > 1:
                        raise JiaoziError(f"ambiguous commit id prefix {ref!r}")
        raise NotFound(f"unknown ref {ref!r}: not a branch, tag or commit")

    def _by_prefix(self, r: Txn, hexprefix: str) -> list[bytes]:
        lo = bytes.fromhex(hexprefix[: len(hexprefix) // 2 * 2])
        out = []
        for k, v in r.prefix("objects", lo):
            if k.hex().startswith(hexprefix) and v[:1] == b"C":
                out.append(bytes(k))
            if len(out) > 1:
                break
        return out

    def commit_ids(self) -> list[bytes]:
        """Every commit reachable from a branch or tag, newest first."""
        seen: dict[bytes, Commit] = {}
        todo = deque(list(self.branches().values()) + list(self.tags().values()))
        with self.store.read() as r:
            while todo:
                cid = todo.popleft()
                if cid in seen:
                    continue
                raw = r.get_object(cid)
                if raw is None:  # history cut by gc retention
                    continue
                c = decode_commit(raw)
                seen[cid] = c
                todo.extend(c.parents)
        return sorted(seen, key=lambda k: seen[k].time_ns, reverse=True)

    # --------------------------------------------------------------- branches

    def create_branch(self, name: str, from_ref: str | None = None) -> bytes:
        check_ref_name(name)
        cid = self.resolve(from_ref or self.default_branch)
        with self.store.write() as w:
            if w.get("refs", b"branch/" + name.encode()) is not None:
                raise Exists(f"branch {name} already exists")
            tree = self.get_commit(cid, w).tree
            w.put("refs", b"branch/" + name.encode(), cid)
            root = self.worktree.create_root(w, tree, os.getuid(), os.getgid())
            w.put("refs", b"wt/" + name.encode(), u64(root))
        self.emit("branch_create", branch=name, commit=cid.hex())
        return cid

    def delete_branch(self, name: str) -> None:
        if name == self.default_branch:
            raise JiaoziError(f"cannot delete the default branch {name}")
        with self.store.write() as w:
            cid = self.head(name, w)
            root = self.root_ino(name, w)
            w.delete("refs", b"branch/" + name.encode())
            w.delete("refs", b"wt/" + name.encode())
            self.worktree.drop_tree(w, root)
            if w.delete("meta", b"ckpt/" + name.encode()):
                # its checkpoint in the remote goes too (a zero tree means
                # delete), or it would keep the branch's data from remote gc
                cache = self.config.get("cache_id", "cache")
                w.enqueue(b"W" + bytes(64) + f"{cache}/{name}".encode())
        self.emit("branch_delete", branch=name, commit=cid.hex())

    def create_tag(self, name: str, ref: str | None = None) -> bytes:
        check_ref_name(name, "tag")
        cid = self.resolve(ref or self.default_branch)
        with self.store.write() as w:
            if w.get("refs", b"tag/" + name.encode()) is not None:
                raise Exists(f"tag {name} already exists")
            w.put("refs", b"tag/" + name.encode(), cid)
        self.emit("tag_create", tag=name, commit=cid.hex())
        return cid

    def delete_tag(self, name: str) -> None:
        with self.store.write() as w:
            cid = w.get("refs", b"tag/" + name.encode())
            if cid is None:
                raise NotFound(f"no such tag: {name}")
            w.delete("refs", b"tag/" + name.encode())
        self.emit("tag_delete", tag=name, commit=cid.hex())

    def update_ref(self, t: Txn, branch: str, expected: bytes, new: bytes) -> None:
        """Compare-and-swap a branch head inside write transaction *t*."""
        cur = self.head(branch, t)
        if cur != expected:
            raise Conflict(
                f"branch {branch} moved to {cur.hex()[:12]} while this operation "
                f"expected {expected.hex()[:12]}; retry"
            )
        t.put("refs", b"branch/" + branch.encode(), new)

    # --------------------------------------------------------------- commits

    def _make_commit(
        self, t: Txn, tree: bytes, parents: list[bytes], message: str,
        meta: dict[str, str] | None = None, author: str | None = None,
    ) -> bytes:
        c = Commit(
            tree, tuple(parents), author or default_author(), now_ns(), message,
            tuple(sorted((meta or {}).items())),
        )
        enc = encode_commit(c)
        cid = object_id(enc)
        t.put_object(cid, enc)
        return cid

    def commit(
        self, branch: str, message: str, meta: dict[str, str] | None = None,
        author: str | None = None, allow_empty: bool = False,
    ) -> bytes:
        """Commit the branch's worktree.  Cost grows with the change only.

        Metadata values are stored as text (``loss=0.5`` becomes ``"0.5"``).
        Pre-commit triggers run in between (see :meth:`prepare_commit`).
        """
        from .triggers import check_pre_commit, pre_commit_jobs

        prep = self.prepare_commit(branch, allow_empty)
        for rule, event in pre_commit_jobs(self, branch, prep.changed):
            check_pre_commit(rule, event, str(self.path))
        return self.finish_commit(prep, message, meta, author)

    def prepare_commit(self, branch: str, allow_empty: bool = False) -> PreparedCommit:
        """Write the worktree's trees; what :meth:`finish_commit` will commit.

        The daemon runs pre-commit triggers between the two in a worker thread,
        so a hook may read the mount while it decides.
        """
        self.worktree.flush_all()
        with self.store.write() as w:
            head = self.head(branch, w)
            parent_tree = self.get_commit(head, w).tree
            tree, _ = self.worktree.write_tree(w, self.root_ino(branch, w))
            changed = [c.path for c in self._diff_trees(w, parent_tree, tree)]
        # The same test as status: a rewrite with identical bytes (a new
        # mtime only) is nothing to commit.
        if not changed and not allow_empty:
            raise JiaoziError(f"nothing to commit on {branch}")
        return PreparedCommit(branch, head, tree, changed)

    def finish_commit(self, prep: PreparedCommit, message: str,
                      meta: dict[str, str] | None = None, author: str | None = None) -> bytes:
        if not isinstance(message, str):
            raise JiaoziError("the commit message must be text")
        meta = {str(k): str(v) for k, v in (meta or {}).items()}
        with self.store.write() as w:
            cid = self._make_commit(w, prep.tree, [prep.head], message, meta, author)
            self.update_ref(w, prep.branch, prep.head, cid)
        changed = prep.changed
        more = len(changed) > MAX_EVENT_PATHS
        self.emit("commit", branch=prep.branch, commit=cid.hex(),
                  paths=changed[:MAX_EVENT_PATHS], paths_truncated=more or None)
        return cid

    def log(self, ref: str, limit: int | None = None) -> Iterator[tuple[bytes, Commit]]:
        """Commits reachable from *ref*, newest first (by time, then graph order)."""
        start = self.resolve(ref)
        if limit is not None and limit <= 0:
            return
        seen = set()
        heap = [start]
        n = 0
        with self.store.read() as r:
            commits: dict[bytes, Commit] = {}

            def load(k: bytes) -> Commit | None:
                if k not in commits:
                    raw = r.get_object(k)
                    if raw is None:  # history cut by gc retention (a shallow boundary)
                        return None
                    commits[k] = decode_commit(raw)
                return commits[k]

            while heap:
                heap = [k for k in heap if load(k) is not None]
                if not heap:
                    break
                heap.sort(key=lambda k: commits[k].time_ns)
                cid = heap.pop()
                if cid in seen:
                    continue
                seen.add(cid)
                c = commits[cid]
                yield cid, c
                n += 1
                if limit is not None and n >= limit:
                    return
                heap.extend(p for p in c.parents if p not in seen)

    def is_ancestor(self, anc: bytes, desc: bytes) -> bool:
        return anc in self._ancestors(desc)

    def is_ancestor_committed(self, anc: bytes, desc: bytes) -> bool:
        """is_ancestor over the committed state: safe from a worker thread."""
        return anc in self._ancestors(desc, committed=True)

    def _ancestors(self, cid: bytes, committed: bool = False) -> set[bytes]:
        seen = set()
        todo = [cid]
        with self.store.snapshot() if committed else self.store.read() as r:
            while todo:
                c = todo.pop()
                if c in seen:
                    continue
                seen.add(c)
                raw = r.get_object(c)
                if raw is not None:  # else: history cut by retention
                    todo.extend(decode_commit(raw).parents)
        return seen

    def merge_base(self, a: bytes, b: bytes) -> bytes | None:
        anc = self._ancestors(a)
        todo = deque([b])
        seen = set()
        with self.store.read() as r:
            while todo:
                c = todo.popleft()
                if c in anc:
                    return c
                if c in seen:
                    continue
                seen.add(c)
                raw = r.get_object(c)
                if raw is not None:
                    todo.extend(decode_commit(raw).parents)
        return None

    # ------------------------------------------------------------------ trees

    def tree_entry(self, cid: bytes, path: str) -> TreeEntry | None:
        """The entry at *path* in commit *cid* (None for the root)."""
        tree = self.get_tree(self.get_commit(cid).tree)
        parts = [p for p in os.fsencode(path).split(b"/") if p]
        entry = None
        for i, part in enumerate(parts):
            entry = tree.get(part)
            if entry is None:
                raise NotFound(f"{path}: no such path in {cid.hex()[:12]}")
            if i < len(parts) - 1:
                if not entry.is_dir:
                    raise NotFound(f"{path}: not a directory in {cid.hex()[:12]}")
                tree = self.get_tree(entry.ref)
        return entry

    def walk(self, tree_id: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, TreeEntry]]:
        """Every entry below a tree, depth first, with its path."""
        for e in self.get_tree(tree_id).entries:
            path = prefix + e.name
            yield path, e
            if e.is_dir:
                yield from self.walk(e.ref, path + b"/")

    def _diff_trees(self, t: Txn, a: bytes | None, b: bytes | None,
                    prefix: bytes = b"") -> list[Change]:
        """Paths that differ by content or mode (an mtime alone is no change).

        Files are listed by path; a directory is listed (with a trailing
        ``/``) only where nothing below it says the change: it was added or
        deleted empty, or its mode changed.
        """
        if a == b:
            return []
        ta = decode_tree(self._object(t, a)) if a else Tree()
        tb = decode_tree(self._object(t, b)) if b else Tree()
        out: list[Change] = []
        names = sorted({e.name for e in ta.entries} | {e.name for e in tb.entries})
        for name in names:
            ea, eb = ta.get(name), tb.get(name)
            path = prefix + name
            if ea is not None and eb is not None and _entry_key(ea) == _entry_key(eb):
                continue
            if ea is not None and eb is not None and ea.is_dir and eb.is_dir:
                if ea.mode != eb.mode:
                    out.append(Change("modified", os.fsdecode(path + b"/")))
                out += self._diff_trees(t, ea.ref, eb.ref, path + b"/")
                continue
            for e, kind in ((ea, "deleted"), (eb, "added")):
                if e is None or (ea is not None and eb is not None and not (
                        ea.is_dir or eb.is_dir)):
                    continue
                if e.is_dir:
                    sub = (self._diff_trees(t, e.ref, None, path + b"/") if kind == "deleted"
                           else self._diff_trees(t, None, e.ref, path + b"/"))
                    out += sub or [Change(kind, os.fsdecode(path + b"/"))]
                else:
                    out.append(Change(kind, os.fsdecode(path), e.size))
            if ea is not None and eb is not None and not (ea.is_dir or eb.is_dir):
                out.append(Change("modified", os.fsdecode(path), eb.size))
        return out

    def diff(self, ref_a: str, ref_b: str) -> list[Change]:
        a, b = self.resolve(ref_a), self.resolve(ref_b)
        with self.store.read() as r:
            return self._diff_trees(r, self.get_commit(a, r).tree, self.get_commit(b, r).tree)

    def status(self, branch: str) -> list[Change]:
        """What is uncommitted on *branch*."""
        self.worktree.flush_all()
        with self.store.write() as w:
            head_tree = self.get_commit(self.head(branch, w), w).tree
            tree, _ = self.worktree.write_tree(w, self.root_ino(branch, w))
            return self._diff_trees(w, head_tree, tree)

    def is_clean(self, branch: str) -> bool:
        return not self.status(branch)

    # ------------------------------------------------------------------ merge

    def _merge_trees(
        self, t: Txn, base: bytes | None, ours: bytes | None, theirs: bytes | None,
        prefix: bytes, conflicts: list[str],
    ) -> bytes:
        tb = decode_tree(self._object(t, base)) if base else Tree()
        to = decode_tree(self._object(t, ours)) if ours else Tree()
        tt = decode_tree(self._object(t, theirs)) if theirs else Tree()
        out: list[TreeEntry] = []
        names = sorted({e.name for e in tb.entries + to.entries + tt.entries})
        for name in names:
            b, o, th = tb.get(name), to.get(name), tt.get(name)
            kb = _entry_key(b) if b else None
            ko = _entry_key(o) if o else None
            kt = _entry_key(th) if th else None
            if ko == kt:
                pick = o
            elif kb == ko:
                pick = th
            elif kb == kt:
                pick = o
            elif (o is None or o.is_dir) and (th is None or th.is_dir) and (
                    b is None or b.is_dir) and (o or th):
                sub = self._merge_trees(
                    t, b.ref if b else None, o.ref if o else None, th.ref if th else None,
                    prefix + name + b"/", conflicts,
                )
                tmpl = o or th
                assert tmpl is not None
                size = decode_tree(self._object(t, sub)).logical_size
                pick = TreeEntry(name, tmpl.mode, tmpl.uid, tmpl.gid, tmpl.mtime_ns, size,
                                 sub, tmpl.xattrs)
            else:
                conflicts.append(os.fsdecode(prefix + name))
                pick = o
            if pick is not None:
                out.append(pick)
        enc = encode_tree(out)
        tid = object_id(enc)
        t.put_object(tid, enc)
        return tid

    def merge(self, src: str, into: str | None = None, message: str | None = None) -> bytes:
        """Merge *src* into branch *into*: fast-forward, or three-way at path level."""
        into = into or self.default_branch
        theirs = self.resolve(src)
        ours = self.head(into)
        if not self.is_clean(into):
            raise JiaoziError(
                f"branch {into} has uncommitted changes: commit or reset them before merging")
        if theirs == ours or self.is_ancestor(theirs, ours):
            raise JiaoziError(f"{into} is already up to date with {src}")
        if self.is_ancestor(ours, theirs):
            with self.store.write() as w:
                self.update_ref(w, into, ours, theirs)
                new_tree = self.get_commit(theirs, w).tree
                self._reset_worktree(w, into, new_tree)
                paths = [c.path for c in self._diff_trees(
                    w, self.get_commit(ours, w).tree, new_tree)]
            self.emit("merge", branch=into, source=src, commit=theirs.hex(), fast_forward=True,
                      paths=paths[:MAX_EVENT_PATHS])
            return theirs
        base = self.merge_base(ours, theirs)
        with self.store.write() as w:
            conflicts: list[str] = []
            tree = self._merge_trees(
                w, self.get_commit(base, w).tree if base else None,
                self.get_commit(ours, w).tree, self.get_commit(theirs, w).tree, b"", conflicts,
            )
            if conflicts:
                raise Conflict(
                    f"merge of {src} into {into} conflicts in {len(conflicts)} path(s): "
                    + ", ".join(conflicts[:10]) + (" ..." if len(conflicts) > 10 else ""),
                    conflicts,
                )
            cid = self._make_commit(w, tree, [ours, theirs],
                                    message or f"Merge {src} into {into}")
            self.update_ref(w, into, ours, cid)
            self._reset_worktree(w, into, tree)
            paths = [c.path for c in self._diff_trees(w, self.get_commit(ours, w).tree, tree)]
        self.emit("merge", branch=into, source=src, commit=cid.hex(), fast_forward=False,
                  paths=paths[:MAX_EVENT_PATHS])
        return cid

    def revert(self, commit: str, branch: str | None = None) -> bytes:
        branch = branch or self.default_branch
        target = self.resolve(commit)
        c = self.get_commit(target)
        if len(c.parents) != 1:
            raise JiaoziError("only commits with exactly one parent can be reverted")
        if not self.is_clean(branch):
            raise JiaoziError(
                f"branch {branch} has uncommitted changes: commit or reset them first")
        head = self.head(branch)
        with self.store.write() as w:
            conflicts: list[str] = []
            tree = self._merge_trees(
                w, c.tree, self.get_commit(head, w).tree,
                self.get_commit(c.parents[0], w).tree, b"", conflicts,
            )
            if conflicts:
                raise Conflict(
                    f"revert of {target.hex()[:12]} conflicts in: " + ", ".join(conflicts[:10]),
                    conflicts,
                )
            cid = self._make_commit(w, tree, [head],
                                    f'Revert "{c.message}"\n\nThis reverts {target.hex()}.')
            self.update_ref(w, branch, head, cid)
            self._reset_worktree(w, branch, tree)
            paths = [c.path for c in self._diff_trees(w, self.get_commit(head, w).tree, tree)]
        self.emit("revert", branch=branch, commit=cid.hex(), reverted=target.hex(),
                  paths=paths[:MAX_EVENT_PATHS])
        return cid

    def reset(self, branch: str, ref: str | None = None, hard: bool = False) -> bytes:
        """Move *branch* to *ref*; with *hard*, also discard the worktree's changes."""
        self.worktree.flush_all()
        target = self.resolve(ref) if ref else self.head(branch)
        with self.store.write() as w:
            old = self.head(branch, w)
            w.put("refs", b"branch/" + branch.encode(), target)
            if hard:
                self._reset_worktree(w, branch, self.get_commit(target, w).tree)
        self.emit("reset", branch=branch, commit=target.hex(), previous=old.hex(), hard=hard)
        return target

    def _reset_worktree(self, w: Txn, branch: str, tree: bytes) -> None:
        """Point the branch root at *tree*, keeping the root's inode number."""
        root_ino = self.root_ino(branch, w)
        root = self.worktree._get(w, root_ino)
        names = [e.name for e in decode_tree(self._object(w, tree)).entries]
        if root.loaded:
            for name, child in list(self.worktree._iter_dirents(w, root_ino)):
                names.append(name)
                self.worktree._unlink_entry(w, root_ino, name)
                c = self.worktree._get(w, child)
                c.links = [lk for lk in c.links if lk[0] != root_ino]
                if c.is_dir or c.nlink <= 1:
                    self.worktree.drop_tree(w, child)
                else:
                    c.nlink -= 1
                    self.worktree._put(w, c)
        root.ref = tree
        root.loaded = False
        root.nlink = 2
        root.size = decode_tree(self._object(w, tree)).logical_size
        root.mtime_ns = root.ctime_ns = now_ns()
        self.worktree._put(w, root)
        for hook in self.reset_hooks:
            hook(branch, root_ino, sorted(set(names)))

    # ------------------------------------------------------ import and export

    def import_dir(self, branch: str, src: str | Path, prefix: str = "") -> int:
        """Copy a local directory into the branch's worktree; returns files written."""
        src = Path(src)
        if not src.is_dir():
            raise NotFound(f"{src} is not a directory")
        wt = self.worktree
        root = self.root_ino(branch)
        base = wt.makedirs(root, prefix) if prefix.strip("/") else wt.getattr(root)
        count = 0

        def copy_dir(local: Path, parent: Inode) -> None:
            nonlocal count
            with os.scandir(local) as it:
                items = sorted(it, key=lambda e: e.name)
            for de in items:
                name = os.fsencode(de.name)
                st = de.stat(follow_symlinks=False)
                try:
                    existing: Inode | None = wt.lookup(parent.ino, name)
                except NotFound:
                    existing = None
                kind = stat.S_IFMT(st.st_mode)
                if existing is not None and stat.S_IFMT(existing.mode) != kind:
                    self._remove_tree(parent.ino, name, existing)
                    existing = None
                if stat.S_ISDIR(st.st_mode):
                    node = existing or wt.create(parent.ino, name, st.st_mode, st.st_uid,
                                                 st.st_gid)
                    copy_dir(Path(de.path), node)
                    wt.setattr(node.ino, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                               mtime_ns=st.st_mtime_ns, atime_ns=st.st_atime_ns)
                elif stat.S_ISLNK(st.st_mode):
                    if existing is not None:
                        wt.unlink(parent.ino, name)
                    node = wt.create(parent.ino, name, stat.S_IFLNK | 0o777, st.st_uid,
                                     st.st_gid, target=os.fsencode(os.readlink(de.path)))
                    wt.setattr(node.ino, mtime_ns=st.st_mtime_ns)
                    count += 1
                elif stat.S_ISREG(st.st_mode):
                    node = existing or wt.create(parent.ino, name, st.st_mode, st.st_uid,
                                                 st.st_gid)
                    self._copy_in(node.ino, de.path)
                    wt.setattr(node.ino, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                               mtime_ns=st.st_mtime_ns, atime_ns=st.st_atime_ns)
                    count += 1
                # other types (sockets, devices, fifos) are skipped

        own_batch = not self.store.in_batch()
        if own_batch:
            # One durable commit per 64 MiB instead of several per file.
            self.store.begin_batch()
        try:
            copy_dir(src, base)
        except BaseException:
            if own_batch:
                # Nothing of a failed import stays (beyond whole 64 MiB steps).
                self.worktree.open_files.clear()
                self.store.abort_batch()
            raise
        if own_batch:
            self.store.end_batch()
        self.emit("import", branch=branch, path=prefix, files=count)
        return count

    def _copy_in(self, ino: int, local: str) -> None:
        wt = self.worktree
        of = wt.open(ino)
        try:
            of.content.truncate(0)
            of.dirty = True
            with open(local, "rb", buffering=0) as f:
                off = 0
                while True:
                    block = f.read(16 << 20)
                    if not block:
                        break
                    wt.write(ino, off, block)
                    off += len(block)
                    self._batched_bytes += len(block)
                    if self._batched_bytes >= 64 << 20:
                        self._batched_bytes = 0
                        wt.spill(ino)
                        self.store.commit_batch()
        finally:
            wt.release(ino)

    def _remove_tree(self, parent: int, name: bytes, node: Inode) -> None:
        wt = self.worktree
        if node.is_dir:
            for child_name, child, _ in list(wt.readdir(node.ino)):
                self._remove_tree(node.ino, child_name, child)
            wt.unlink(parent, name, rmdir=True)
        else:
            wt.unlink(parent, name)

    def export(self, ref: str, dest: str | Path) -> int:
        """Write the tree of *ref* into *dest* (which must be empty or absent)."""
        dest = Path(dest)
        cid = self.resolve(ref)
        if dest.exists() and not dest.is_dir():
            raise JiaoziError(f"{dest} exists and is not a directory", errno.ENOTDIR)
        if dest.exists() and any(dest.iterdir()):
            raise Exists(f"{dest} is not empty")
        dest.mkdir(parents=True, exist_ok=True)
        tree = self.get_commit(cid).tree
        count = 0
        dirs: list[tuple[bytes, TreeEntry]] = []
        for path, e in self.walk(tree):
            target = os.path.join(os.fsencode(dest), path)
            if e.is_dir:
                os.mkdir(target, 0o700)
                dirs.append((target, e))
            elif e.is_symlink:
                os.symlink(e.ref, target)
                os.utime(target, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
                count += 1
            elif not e.is_file:
                kind = stat.S_IFMT(e.mode)
                if kind == stat.S_IFSOCK:
                    continue  # a socket is only meaningful to the process that bound it
                rdev = int.from_bytes(e.ref, "big") if e.ref else 0
                os.mknod(target, kind | stat.S_IMODE(e.mode), rdev)
                _apply_meta(target, e)
                count += 1
            else:
                fc = self.file_content(e.ref)
                with open(target, "wb") as f:
                    for n, data in fc.iter_pieces():
                        if data is None:
                            f.seek(n, os.SEEK_CUR)  # a hole stays a hole
                        else:
                            f.write(data)
                    f.truncate()
                _apply_meta(target, e)
                count += 1
        for target, e in reversed(dirs):
            _apply_meta(target, e)
        return count

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, object]:
        """Logical bytes (per ref and over all commits) against bytes stored."""
        with self.store.read() as r:
            stored_chunks = r.counter("chunk_bytes")
            objects_bytes = sum(len(v) for _, v in r.prefix("objects", b""))
            nchunks = r.count_chunks()
        refs = {}
        for kind, table in (("branch", self.branches()), ("tag", self.tags())):
            for name, cid in table.items():
                refs[f"{kind}/{name}"] = self.get_tree(self.get_commit(cid).tree).logical_size
        all_commits = sum(
            self.get_tree(self.get_commit(c).tree).logical_size for c in self.commit_ids())
        return {
            "refs": refs,
            "logical_bytes_all_commits": all_commits,
            "stored_chunk_bytes": stored_chunks,
            "stored_object_bytes": objects_bytes,
            "stored_bytes": stored_chunks + objects_bytes,
            "chunks": nchunks,
            "store_file_bytes": self.store.disk_usage(),
        }


def _apply_meta(target: bytes, e: TreeEntry) -> None:
    if os.geteuid() == 0:
        try:
            os.chown(target, e.uid, e.gid, follow_symlinks=False)
        except OSError:
            pass
    os.chmod(target, stat.S_IMODE(e.mode))
    for k, v in e.xattrs:
        try:
            os.setxattr(target, k, v)
        except OSError:
            pass
    os.utime(target, ns=(e.mtime_ns, e.mtime_ns))


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def find_repo(explicit: str | None, cwd: str | None = None) -> tuple[Path, str | None]:
    """Find the repository (and branch) for a command, as git finds its work tree.

    Order: *explicit* (``--repo``), ``$JIAOZIFUSE_REPO``, then the mount the
    current directory is inside (``MNT/<branch>/...``), recognised by the
    ``.jiaozifuse-mount`` file at the mount root.
    """
    if explicit:
        return Path(explicit), None
    env = os.environ.get("JIAOZIFUSE_REPO")
    if env:
        return Path(env), None
    here = Path(cwd or os.getcwd())
    for d in [here, *here.parents]:
        marker = d / ".jiaozifuse-mount"
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if info.get("branch"):  # a single-branch mount: MNT is the branch
            return Path(info["repo"]), info["branch"]
        rel = here.relative_to(d).parts
        branch = rel[0] if rel and not rel[0].startswith(".") else None
        return Path(info["repo"]), branch
    raise JiaoziError(
        "no repository: pass --repo PATH, set JIAOZIFUSE_REPO, or run inside a mounted branch")


__all__ = ["Change", "Repository", "check_ref_name", "find_repo"]
