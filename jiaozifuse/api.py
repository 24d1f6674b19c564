"""A Python API for programs and notebooks: a repository without a mount.

::

    import jiaozifuse.api as jz

    with jz.open("/data/repo") as repo:
        repo.branches()                                  # {"main": "3f2a...", ...}
        df_bytes = repo.read("main", "data/train.csv")   # the branch as it is now
        with repo.open("v1.0", "images/0001.png") as f:  # a tag: a read-only snapshot
            header = f.read(16)
        repo.write("main", "notes/run-42.txt", b"loss 0.31\\n")
        c = repo.commit("main", "run 42 notes", meta={"run": "42"})
        repo.read(c.id, "notes/run-42.txt")              # that commit, forever

**What a ref means.**  The file-reading calls (:meth:`Repo.read`,
:meth:`Repo.open`, :meth:`Repo.listdir`, :meth:`Repo.scandir`,
:meth:`Repo.stat`, :meth:`Repo.walk`) take a *ref* as the mount does: a branch
name is the branch's current state, uncommitted changes included (what
``MNT/<branch>/`` shows); anything else (a tag, a commit id or a unique
prefix of 4+ hex digits, ``main~2``, ``remote/main``) is a read-only snapshot
of one commit.  The history calls (:meth:`Repo.log`, :meth:`Repo.diff`,
:meth:`Repo.resolve`, :meth:`Repo.get_commit`) work on commits, so there a
branch name means its head commit.  To pin a training run to data that cannot
change under it, read through a commit id: ``repo.resolve("main")``.

**A daemon may serve the repository.**  While ``jiaozifuse mount`` runs, its
daemon owns the store's writer lock, so this API opens the store read-only
(reads are served from the store's last durable state: the daemon makes
every change durable within 50 ms) and sends operations that change the
repository (commit, branch and tag creation, status) to the daemon over its
control socket, exactly as the CLI does.  :meth:`Repo.write` then writes
through the mount (``MNT/<branch>/path``), which must be visible to this
process.  A chunk missing from the cache of a repository with a remote is
fetched into memory, not into the read-only store.  Without a daemon
everything runs in this process.  The check is made on every call, so a
notebook may keep a :class:`Repo` open while a mount comes and goes; but a
repository opened while a daemon served it stays read-only for local writes:
open it again once the daemon is gone.

Nothing here reimplements the repository: refs, commits, diffs and the event
log are :class:`~jiaozifuse.repo.Repository`'s (and :mod:`jiaozifuse.ops`'s,
the operation table the CLI and the daemon share); this module adds a
path-level view of trees and worktrees that never writes while it reads.

Errors are :class:`~jiaozifuse.errors.JiaoziError` subclasses with an errno;
a missing path raises :class:`PathNotFound`, which is also a
:class:`FileNotFoundError`, so ``except FileNotFoundError`` works.

Threads: reads may run in several threads at once (LMDB readers are
per-transaction); calls that change the repository are serialised by a lock.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import posixpath
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from . import control, ops, writeback
from .chunking import hash_bytes
from .errors import JiaoziError, NotFound, ReadOnly
from .filecontent import FileContent
from .objects import EMPTY_MANIFEST_ID, Commit, TreeEntry
from .repo import Change, Repository
from .worktree import Inode

__all__ = [
    "CommitInfo",
    "Entry",
    "EventConsumer",
    "PathNotFound",
    "Repo",
    "SnapshotFile",
    "find_mount",
    "mounts",
    "open",
]

#: How many symbolic links a path may cross before the lookup gives up (as Linux's ELOOP).
MAX_SYMLINKS = 40
#: Bytes read from a source per worktree write (the worktree chunks them in the background).
WRITE_BLOCK = 16 << 20
#: Chunks fetched from the remote kept in memory by a read-only Repo (about 16 MiB).
FETCHED_CHUNKS = 256
#: Default buffer of :meth:`Repo.open`: one read of the store per 256 KiB, like the kernel's.
DEFAULT_BUFFER = 256 << 10


class PathNotFound(NotFound, FileNotFoundError):
    """A path that is not in the tree; both a JiaoziError and a FileNotFoundError."""

    def __init__(self, message: str) -> None:
        NotFound.__init__(self, message)
        self.errno = errno.ENOENT
        self.strerror = message


def open(path: str | os.PathLike[str], readonly: bool = False) -> Repo:
    """Open the repository at *path* (a directory made by ``jiaozifuse init`` or ``clone``).

    Named after the builtin on purpose: ``jiaozifuse.api.open(path)`` reads like
    the file-opening it resembles.  With *readonly*, nothing is ever written
    (the store is opened read-only even without a daemon).
    """
    return Repo(Path(path), readonly=readonly)


# --------------------------------------------------------------------- records


@dataclass(frozen=True)
class CommitInfo:
    """One commit, as ``jiaozifuse log --json`` prints it."""

    id: str
    tree: str
    parents: tuple[str, ...]
    author: str
    time_ns: int
    message: str
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def time(self) -> datetime:
        """The commit time, timezone-aware (UTC)."""
        return datetime.fromtimestamp(self.time_ns / 1e9, UTC)

    @classmethod
    def from_commit(cls, cid: bytes, c: Commit) -> CommitInfo:
        return cls.from_dict(ops.commit_dict(cid, c))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CommitInfo:
        """From the JSON form shared with the CLI and the control socket."""
        return cls(d["id"], d["tree"], tuple(d["parents"]), d["author"], d["time_ns"],
                   d["message"], dict(d.get("meta") or {}))


@dataclass(frozen=True)
class Entry:
    """One name in a tree or a branch, as :meth:`Repo.stat` and :meth:`Repo.scandir` give it.

    *id* is the content's id (a file's manifest, a directory's tree) when
    known: equal ids mean equal content, which makes it a cache key; it is
    None for a directory with uncommitted changes below it.  *commit* is the
    commit the entry was read from, None when it was read from a branch's
    worktree (which can still change).
    """

    name: str
    path: str
    type: str  # "file" | "dir" | "symlink" | "other"
    size: int
    mode: int
    mtime_ns: int
    uid: int
    gid: int
    id: str | None
    commit: str | None
    target: str | None = None  # symlinks only

    @property
    def is_file(self) -> bool:
        return self.type == "file"

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"


# --------------------------------------------------------------------- nodes


@dataclass(frozen=True)
class _Node:
    """A tree entry or a worktree inode, seen the same way (read-only).

    A worktree directory whose children are materialised as inodes has *ino*;
    one that is not (it was never looked into) still is its tree, *ref*.
    """

    name: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    ref: bytes | None  # manifest (file), tree (dir), target (symlink), device (special)
    ino: int | None = None

    @property
    def kind(self) -> str:
        m = self.mode
        if stat.S_ISREG(m):
            return "file"
        if stat.S_ISDIR(m):
            return "dir"
        if stat.S_ISLNK(m):
            return "symlink"
        return "other"

    @classmethod
    def from_entry(cls, e: TreeEntry) -> _Node:
        return cls(e.name, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.ref)

    @classmethod
    def from_inode(cls, name: bytes, n: Inode) -> _Node:
        if n.is_dir:
            ref, ino = (None, n.ino) if n.loaded else (n.ref, None)
        elif n.is_file:
            ref, ino = n.ref or EMPTY_MANIFEST_ID, None
        else:
            ref, ino = n.target, None
        size = len(n.target) if n.is_symlink else n.size
        return cls(name, n.mode, n.uid, n.gid, n.mtime_ns, size, ref, ino)


@dataclass(frozen=True)
class _Where:
    """A resolved ref: a commit (immutable) or a branch's worktree root."""

    ref: str
    commit: bytes | None = None
    branch: str | None = None
    root: int | None = None


def _parts(path: str | bytes) -> list[bytes]:
    raw = os.fsencode(path)
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise JiaoziError("paths in a repository may not contain '..'", errno.EINVAL)
    return parts


# --------------------------------------------------------------------- files


class SnapshotFile(io.RawIOBase):
    """A read-only, seekable view of one version of one file.

    The version is fixed when the file is opened: a branch that changes
    afterwards does not change what this object reads (versions are
    content-addressed), so a reader never sees a torn file.
    """

    def __init__(self, content: FileContent, name: str) -> None:
        super().__init__()
        self._content = content
        self._pos = 0
        self.name = name
        self.mode = "rb"

    @property
    def size(self) -> int:
        return self._content.size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._content.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = pos
        return pos

    def read(self, size: int | None = -1) -> bytes:
        self._checkClosed()
        if size is None or size < 0:
            size = max(0, self._content.size - self._pos)
        data = self._content.read(self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def write(self, b: Any) -> int:
        raise io.UnsupportedOperation("a snapshot file is read-only")

    def pread(self, offset: int, size: int) -> bytes:
        """Read *size* bytes at *offset* without moving the position (thread-safe)."""
        self._checkClosed()
        return self._content.read(offset, size)


# --------------------------------------------------------------------- events


class EventConsumer:
    """A named reader of the event log with at-least-once delivery.

    ``poll()`` returns the events after the consumer's last acknowledgement;
    ``ack(event)`` records progress durably (in the store, or through the
    daemon when one serves the repository), so an event not acknowledged is
    delivered again, even after a restart.  The same offsets are what
    ``jiaozifuse`` itself uses for its trigger runner and forwarders, so pick
    a name of your own.
    """

    def __init__(self, repo: Repo, name: str) -> None:
        self.repo = repo
        self.name = name
        self._pos = repo._repo.events.offset(name)

    @property
    def offset(self) -> int:
        """The last sequence number acknowledged (durably) by this consumer."""
        return self.repo._repo.events.offset(self.name)

    def poll(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Events not yet handled in this session, oldest first."""
        return self.repo.events(self._pos, limit)

    def ack(self, event: dict[str, Any] | int) -> None:
        """Mark everything up to this event (or sequence number) handled."""
        seq = event if isinstance(event, int) else int(event["seq"])
        self.repo._ack(self.name, seq)
        self._pos = max(self._pos, seq)

    def rewind(self) -> None:
        """Go back to the durable offset: unacknowledged events come again."""
        self._pos = self.offset


# --------------------------------------------------------------------- the repo


class Repo:
    """An open repository; see the module docstring.  Use as a context manager."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path.resolve()
        self._lock = threading.RLock()
        #: opened read-only because a daemon served the repository (or asked)
        self.readonly = readonly or self._daemon()
        self._asked_readonly = readonly
        self._repo = Repository.open(self.path, readonly=self.readonly)
        self._fetched: OrderedDict[bytes, bytes] = OrderedDict()
        if self.readonly and self._repo.config.get("remote"):
            # The repository's own cache-miss path stores what it fetches,
            # which a read-only store refuses: fetch into memory instead.
            self._repo.worktree._read_chunk_fn = self._read_chunk_readonly
            self._repo.worktree._read_chunks_fn = None  # one by one, through the above
            self._repo.worktree._read_into_fn = None

    def _read_chunk_readonly(self, cid: bytes) -> bytes | None:
        """A chunk from the local cache, else from the remote, never written to the store.

        The last :data:`FETCHED_CHUNKS` fetched chunks are kept in memory, so
        that a reader going through a file does not fetch a chunk per read.
        """
        with self._repo.store.read() as r:
            data = r.get_chunk(cid)
        if data is not None and hash_bytes(data) == cid:
            return data
        with self._lock:
            data = self._fetched.get(cid)
            if data is not None:
                self._fetched.move_to_end(cid)
                return data
        got = writeback.fetch_chunks(self._repo.store, self._repo.remote, [cid])
        data = got.get(cid)
        if data is not None:
            with self._lock:
                self._fetched[cid] = data
                while len(self._fetched) > FETCHED_CHUNKS:
                    self._fetched.popitem(last=False)
        return data

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the store (files opened from it stop working)."""
        with self._lock:
            if self._repo is not None:
                self._repo.close()
                self._repo = None  # type: ignore[assignment]

    def __enter__(self) -> Repo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<jiaozifuse.api.Repo {str(self.path)!r}>"

    @property
    def repository(self) -> Repository:
        """The underlying :class:`~jiaozifuse.repo.Repository`, for what this API lacks."""
        return self._repo

    @property
    def default_branch(self) -> str:
        return self._repo.default_branch

    # ------------------------------------------------------------ daemon

    def _daemon(self) -> bool:
        """True when a daemon serves the repository (its control socket answers).

        A daemon that exists but is slow to answer counts as present: writing
        to the store behind its back would wait on its writer lock forever.
        """
        try:
            control.call(self.path, "ping", {}, timeout=10)
        except FileNotFoundError:
            return False
        except (OSError, JiaoziError):
            return True
        return True

    def _run(self, op: str, **args: Any) -> Any:
        """An operation of the shared table: in the daemon if one serves, else here."""
        if self._daemon():
            return control.call(self.path, op, args)
        self._check_writable()
        with self._lock:
            return ops.run(self._repo, op, args)

    def _check_writable(self) -> None:
        if self._asked_readonly:
            raise ReadOnly(f"{self.path} was opened read-only")
        if self.readonly:
            raise ReadOnly(
                f"{self.path} was opened while a daemon served it, so read-only; the daemon "
                "has gone since: open the repository again to change it here")

    # ------------------------------------------------------------ refs and history

    def branches(self) -> dict[str, str]:
        """Branch name -> head commit id (hex)."""
        return {k: v.hex() for k, v in sorted(self._repo.branches().items())}

    def tags(self) -> dict[str, str]:
        """Tag name -> commit id (hex)."""
        return {k: v.hex() for k, v in sorted(self._repo.tags().items())}

    def resolve(self, ref: str) -> str:
        """The full commit id of *ref* (a branch gives its head commit).

        Log this, not a branch name, where a result must be reproducible.
        """
        return self._repo.resolve(ref).hex()

    def get_commit(self, ref: str) -> CommitInfo:
        cid = self._repo.resolve(ref)
        return CommitInfo.from_commit(cid, self._repo.get_commit(cid))

    def log(self, ref: str | None = None, limit: int | None = None) -> list[CommitInfo]:
        """Commits reachable from *ref* (default: the default branch), newest first."""
        return [CommitInfo.from_commit(cid, c)
                for cid, c in self._repo.log(ref or self.default_branch, limit)]

    def diff(self, a: str, b: str) -> list[Change]:
        """Paths added, deleted or modified from commit *a* to commit *b*."""
        return self._repo.diff(a, b)

    def status(self, branch: str | None = None) -> list[Change]:
        """What is uncommitted on *branch*."""
        r = self._run("status", branch=branch or self.default_branch)
        return [Change(c["change"], c["path"], c.get("size", 0)) for c in r["changes"]]

    def create_branch(self, name: str, from_ref: str | None = None) -> str:
        """Create branch *name* at *from_ref* (default: the default branch); returns its head."""
        return self._run("branch_create", name=name, from_ref=from_ref)["head"]

    def create_tag(self, name: str, ref: str | None = None) -> str:
        """Tag the commit *ref* (default: the default branch's head); returns the commit id."""
        return self._run("tag_create", name=name, ref=ref)["commit"]

    def commit(self, branch: str | None = None, message: str = "",
               meta: dict[str, Any] | None = None, allow_empty: bool = False) -> CommitInfo:
        """Commit *branch*'s uncommitted changes.

        *meta* is free-form (a run id, a metric); values are stored as text.
        """
        if not message:
            raise JiaoziError("a commit needs a message")
        r = self._run("commit", branch=branch or self.default_branch, message=message,
                      meta={str(k): str(v) for k, v in (meta or {}).items()},
                      allow_empty=allow_empty, wait=False)
        return CommitInfo.from_dict(r)

    # ------------------------------------------------------------ path view

    def _where(self, ref: str) -> _Where:
        if ref in self._repo.branches():
            return _Where(ref, branch=ref, root=self._repo.root_ino(ref))
        return _Where(ref, commit=self._repo.resolve(ref))

    def _root(self, w: _Where) -> _Node:
        if w.commit is not None:
            c = self._repo.get_commit(w.commit)
            size = self._repo.get_tree(c.tree).logical_size
            return _Node(b"", stat.S_IFDIR | 0o755, 0, 0, c.time_ns, size, c.tree)
        assert w.root is not None
        with self._repo.store.read() as r:
            return _Node.from_inode(b"", self._repo.worktree._get(r, w.root))

    def _child(self, d: _Node, name: bytes) -> _Node | None:
        if d.ino is not None:
            wt = self._repo.worktree
            with self._repo.store.read() as r:
                ino = wt._child(r, d.ino, name)
                return None if ino is None else _Node.from_inode(name, wt._get(r, ino))
        assert d.ref is not None
        e = self._repo.get_tree(d.ref).get(name)
        return None if e is None else _Node.from_entry(e)

    def _children(self, d: _Node) -> list[_Node]:
        if d.kind != "dir":
            raise JiaoziError("not a directory", errno.ENOTDIR)
        if d.ino is not None:
            wt = self._repo.worktree
            with self._repo.store.read() as r:
                return [_Node.from_inode(bytes(name), wt._get(r, ino))
                        for name, ino in wt._iter_dirents(r, d.ino)]
        assert d.ref is not None
        return [_Node.from_entry(e) for e in self._repo.get_tree(d.ref).entries]

    def _lookup(self, w: _Where, path: str, follow: bool = True) -> _Node:
        """The node at *path*; symlinks inside the tree are followed (relative ones only)."""
        parts = _parts(path)
        hops = 0
        while True:
            node = self._root(w)
            for i, part in enumerate(parts):
                if node.kind != "dir":
                    raise JiaoziError(f"{path}: not a directory in {w.ref}", errno.ENOTDIR)
                child = self._child(node, part)
                if child is None:
                    raise PathNotFound(f"{path}: no such file or directory in {w.ref}")
                last = i == len(parts) - 1
                if child.kind == "symlink" and (follow or not last):
                    hops += 1
                    if hops > MAX_SYMLINKS:
                        raise JiaoziError(f"{path}: too many levels of symbolic links",
                                          errno.ELOOP)
                    target = child.ref or b""
                    if target.startswith(b"/"):
                        raise JiaoziError(f"{path}: an absolute symbolic link leaves the "
                                          "repository", errno.EXDEV)
                    joined = posixpath.normpath(posixpath.join(
                        b"/".join(parts[:i]), target, *parts[i + 1:]))
                    if joined == b".." or joined.startswith(b"../"):
                        raise JiaoziError(f"{path}: a symbolic link leaves the repository",
                                          errno.EXDEV)
                    parts = [p for p in joined.split(b"/") if p and p != b"."]
                    break
                node = child
            else:
                return node

    def _entry(self, w: _Where, path: str, node: _Node) -> Entry:
        kind = node.kind
        ident = node.ref.hex() if node.ref is not None and kind in ("file", "dir") else None
        target = os.fsdecode(node.ref) if kind == "symlink" and node.ref is not None else None
        p = "/".join(os.fsdecode(x) for x in _parts(path))
        return Entry(os.fsdecode(node.name) or posixpath.basename(p), p, kind, node.size,
                     node.mode, node.mtime_ns, node.uid, node.gid, ident,
                     w.commit.hex() if w.commit is not None else None, target)

    def stat(self, ref: str, path: str = "", follow_symlinks: bool = True) -> Entry:
        """What is at *path* in *ref*."""
        w = self._where(ref)
        return self._entry(w, path, self._lookup(w, path, follow_symlinks))

    def exists(self, ref: str, path: str) -> bool:
        try:
            self.stat(ref, path)
        except NotFound:
            return False
        return True

    def scandir(self, ref: str, path: str = "") -> list[Entry]:
        """The entries of the directory *path* in *ref*, sorted by name."""
        w = self._where(ref)
        d = self._lookup(w, path)
        base = "/".join(os.fsdecode(x) for x in _parts(path))
        return [self._entry(w, f"{base}/{os.fsdecode(n.name)}" if base else os.fsdecode(n.name),
                            n) for n in self._children(d)]

    def listdir(self, ref: str, path: str = "") -> list[str]:
        """The names in the directory *path* in *ref*, sorted (as os.listdir, but sorted)."""
        w = self._where(ref)
        return [os.fsdecode(n.name) for n in self._children(self._lookup(w, path))]

    def walk(self, ref: str, path: str = "") -> Iterator[tuple[str, list[str], list[str]]]:
        """``(dirpath, dirnames, filenames)`` top-down, as :func:`os.walk`.

        Paths are relative to the tree's root (``""`` is the root).  Symbolic
        links are listed with the files and not followed.  The ref is
        resolved once, so a walk of a branch is not torn by a commit
        happening meanwhile; uncommitted edits can still show through.
        """
        w = self._where(ref)
        top = self._lookup(w, path)
        base = "/".join(os.fsdecode(x) for x in _parts(path))
        stack: list[tuple[str, _Node]] = [(base, top)]
        while stack:
            dirpath, node = stack.pop()
            dirs: list[_Node] = []
            files: list[str] = []
            for child in self._children(node):
                if child.kind == "dir":
                    dirs.append(child)
                else:
                    files.append(os.fsdecode(child.name))
            by_name = {os.fsdecode(d.name): d for d in dirs}
            dirnames = list(by_name)
            yield dirpath, dirnames, files
            # As with os.walk, the caller may prune dirnames in place.
            for name in reversed(dirnames):
                if name in by_name:
                    stack.append((f"{dirpath}/{name}" if dirpath else name, by_name[name]))

    def _content(self, ref: str, path: str) -> tuple[_Where, FileContent]:
        w = self._where(ref)
        node = self._lookup(w, path)
        if node.kind == "dir":
            raise JiaoziError(f"{path}: is a directory", errno.EISDIR)
        if node.kind != "file":
            raise JiaoziError(f"{path}: not a regular file", errno.EINVAL)
        return w, self._repo.file_content(node.ref or EMPTY_MANIFEST_ID)

    def read(self, ref: str, path: str, offset: int = 0, size: int | None = None) -> bytes:
        """The bytes of file *path* in *ref* (all of them, or *size* from *offset*)."""
        _, fc = self._content(ref, path)
        return fc.read(offset, fc.size - offset if size is None else size)

    def open(self, ref: str, path: str, buffering: int = -1) -> IO[bytes]:
        """*path* in *ref*, open for reading: seekable, read-only, binary.

        ``buffering=0`` gives the raw :class:`SnapshotFile` (every read goes
        to the store); otherwise reads are buffered (256 KiB by default).
        """
        _, fc = self._content(ref, path)
        raw = SnapshotFile(fc, f"{ref}:{path}")
        if buffering == 0:
            return raw
        return io.BufferedReader(raw, DEFAULT_BUFFER if buffering < 0 else buffering)

    # ------------------------------------------------------------ writing

    def write(self, branch: str, path: str, data: bytes | bytearray | memoryview | BinaryIO
              ) -> int:
        """Replace (or create) file *path* on *branch* with *data*; returns its size.

        *data* may be bytes or a binary file object (read in 16 MiB blocks).
        Missing parent directories are created.  The change is uncommitted,
        as a write through the mount is, and durable when this returns;
        :meth:`commit` makes it a version.
        """
        parts = _parts(path)
        if not parts:
            raise JiaoziError("write needs a file path, not the branch root", errno.EISDIR)
        if branch not in self._repo.branches():
            raise NotFound(f"no such branch: {branch}")
        if self._daemon():
            return self._write_through_mount(branch, parts, data)
        self._check_writable()
        with self._lock:
            return self._write_local(branch, parts, data)

    def _write_through_mount(self, branch: str, parts: list[bytes], data: Any) -> int:
        mnt = find_mount(self.path, branch)
        if mnt is None:
            raise JiaoziError(
                f"a daemon serves {self.path} but no mount of branch {branch} is visible "
                "here: write through the mount, or unmount first", errno.EBUSY)
        target = os.path.join(os.fsencode(mnt), *parts)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with builtins.open(target, "wb") as f:
            n = _copy(data, f.write)
        return n

    def _write_local(self, branch: str, parts: list[bytes], data: Any) -> int:
        repo = self._repo
        wt = repo.worktree
        root = repo.root_ino(branch)
        rel = os.fsdecode(b"/".join(parts))
        parent = wt.makedirs(root, b"/".join(parts[:-1])) if len(parts) > 1 else wt.getattr(root)
        name = parts[-1]
        created = False
        try:
            node = wt.lookup(parent.ino, name)
        except NotFound:
            umask = os.umask(0)
            os.umask(umask)
            node = wt.create(parent.ino, name, stat.S_IFREG | (0o666 & ~umask), os.getuid(),
                             os.getgid())
            created = True
        if not node.is_file:
            raise JiaoziError(f"{rel}: not a regular file", errno.EISDIR)
        # No store batch here (unlike import): a batch is one LMDB write
        # transaction that store.read() hands to every caller, and reads may
        # run in other threads.  The worktree stores a chunk batch every 16 MiB.
        wt.open(node.ino)
        pos = 0
        try:
            wt.truncate(node.ino, 0)

            def put(block: bytes) -> None:
                nonlocal pos
                wt.write(node.ino, pos, bytes(block))
                pos += len(block)

            _copy(data, put)
        finally:
            wt.release(node.ino)  # flushes: what was written is durable (or the error shows)
        if created:
            repo.emit("create", branch=branch, path=rel)
        repo.emit("close_write", branch=branch, path=rel, size=pos)
        return pos

    # ------------------------------------------------------------ events

    def last_event(self) -> int:
        """The sequence number of the newest event (0 when there is none)."""
        return self._repo.events.last_seq()

    def events(self, since: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Events with a sequence number above *since*, oldest first (see events.py)."""
        return list(self._repo.events.read(since, limit))

    def watch(self, since: int | None = None, interval: float = 0.5,
              timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield events as they come (``events tail -f``), from *since* (default: now).

        Stops after *timeout* seconds without a new event, if given.
        """
        pos = self.last_event() if since is None else since
        idle_since = time.monotonic()
        while True:
            batch = self.events(pos, 1000)
            for ev in batch:
                pos = ev["seq"]
                yield ev
            if batch:
                idle_since = time.monotonic()
                continue
            if timeout is not None and time.monotonic() - idle_since >= timeout:
                return
            time.sleep(interval)

    def consumer(self, name: str) -> EventConsumer:
        """A durable, named consumer of the event log (at-least-once delivery)."""
        return EventConsumer(self, name)

    def _ack(self, name: str, seq: int) -> None:
        if self._daemon():
            try:
                control.call(self.path, "events_ack", {"consumer": name, "seq": seq})
            except JiaoziError as exc:
                if "unknown operation" in str(exc):
                    raise JiaoziError(
                        "this daemon cannot record consumer offsets (no 'events_ack' "
                        "operation): acknowledge while the repository is not mounted") from None
                raise
            return
        self._check_writable()
        with self._lock:
            self._repo.events.ack(name, seq)


def _copy(data: Any, sink: Any) -> int:
    """Feed *data* (bytes-like or a binary file object) to *sink* in blocks; count bytes."""
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data).cast("B")
        for off in range(0, len(view), WRITE_BLOCK):
            sink(view[off:off + WRITE_BLOCK])
        return len(view)
    if not hasattr(data, "read"):
        raise TypeError(f"write() takes bytes or a binary file, not {type(data).__name__}")
    n = 0
    while True:
        block = data.read(WRITE_BLOCK)
        if not block:
            return n
        if isinstance(block, str):
            raise TypeError("write() takes a binary file: open it with 'rb'")
        sink(block)
        n += len(block)


def _unescape(field_: str) -> str:
    """A /proc/mounts field: spaces, tabs, newlines and backslashes come octal-escaped."""
    out, i = [], 0
    while i < len(field_):
        if field_[i] == "\\" and field_[i + 1:i + 4].isdigit() and i + 3 < len(field_):
            out.append(chr(int(field_[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field_[i])
            i += 1
    return "".join(out)


def mounts(repo: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The jiaozifuse mounts visible to this process (of *repo*, if given).

    Each is the mount's marker (``MNT/.jiaozifuse-mount``: repo, pid,
    mountpoint, branch, commit); a mount whose daemon died (ENOTCONN) is left
    out.
    """
    want = Path(repo).resolve() if repo is not None else None
    out = []
    try:
        with builtins.open("/proc/self/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if len(fields) < 3 or not fields[2].startswith("fuse.jiaozifuse"):
            continue
        mnt = Path(_unescape(fields[1]))
        try:
            info = json.loads((mnt / ".jiaozifuse-mount").read_text())
        except (OSError, ValueError):
            continue
        if want is not None and Path(info.get("repo", "")).resolve() != want:
            continue
        info["mountpoint"] = str(mnt)
        out.append(info)
    return out


def find_mount(repo: str | os.PathLike[str], branch: str) -> Path | None:
    """Where *branch* of *repo* is mounted writable here: ``MNT/<branch>`` or a branch mount."""
    for info in mounts(repo):
        if info.get("commit"):
            continue
        mnt = Path(info["mountpoint"])
        if info.get("branch"):
            if info["branch"] == branch:
                return mnt
            continue
        return mnt / branch
    return None

