"""Branch worktrees: the uncommitted, writable state of every branch.

A worktree is a small inode filesystem kept in LMDB, layered over the
branch's head tree:

* Every branch has a root inode (``refs`` key ``wt/NAME``).  Creating a
  branch makes one inode that points at the head tree: no data is copied.
* A directory inode is *unloaded* while its children are only in its tree
  object.  The first lookup inside it loads it: one inode record and one
  dirent per child, in one transaction, cost proportional to that directory
  alone.  Reads therefore write a little, once per directory.
* ``ref`` is the tree id of a directory whose content is exactly that tree
  (clean), or ``None`` once anything below it changed (dirty).  Every change
  dirties the parents of the changed inode up to the root, through the
  ``links`` each inode keeps (parent inode, name): a hard-linked file has
  several.
* Committing writes trees for dirty directories only, so its cost grows with
  the change, not with the size of the branch.

Inode numbers are global to the repository and stable across mounts, so the
FUSE layer uses them directly.  Open files are shared per inode
(:class:`OpenFile`), so every reader of a branch sees writes at once.

Concurrency: a Worktree object is used from one thread at a time (the FUSE
layer's trio thread, or a worker it hands a whole operation to, holding the
inode's lock).  Between processes, LMDB's single writer serialises changes;
while a daemon serves a repository, the CLI sends it changes over the control
socket instead of writing itself.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cbor2

from .errors import Corrupt, Exists, JiaoziError, NotFound
from .filecontent import FileContent, ReadInto, Span
from .objects import (
    EMPTY_MANIFEST_ID,
    EMPTY_TREE_ID,
    FileKind,
    TreeEntry,
    decode_tree,
    encode_tree,
    object_id,
)
from .store import Store, Txn, from_u64, u64

log = logging.getLogger("jiaozifuse.worktree")

FIRST_INO = 1024
SUPPORTED_TYPES = (
    stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR,
    stat.S_IFBLK,
)
NAME_MAX = 255
#: Directory entries looked up per read transaction while listing (Worktree.readdir).
READDIR_BATCH = 256

#: Write buffers larger than this are chunked and stored before close.
FLUSH_BYTES = 16 << 20


def _be(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _dkey(parent: int, name: bytes) -> bytes:
    return _be(parent) + name


#: relatime: a read moves an atime older than this even if nothing changed since
RELATIME_NS = 24 * 3600 * 10**9


def now_ns() -> int:
    return time.time_ns()


@dataclass(slots=True)
class Inode(FileKind):
    ino: int
    mode: int
    uid: int = 0
    gid: int = 0
    nlink: int = 1
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    #: file: manifest id; dir: tree id while clean, None when dirty
    ref: bytes | None = None
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    links: list[tuple[int, bytes]] = field(default_factory=list)
    loaded: bool = True  # dirs: children materialised as dirents
    #: files: bytes actually stored (size minus holes), None when unknown
    alloc: int | None = None

    def encode(self) -> bytes:
        return cbor2.dumps(
            [
                self.mode, self.uid, self.gid, self.nlink, self.size, self.atime_ns,
                self.mtime_ns, self.ctime_ns, self.ref, self.target, self.xattrs,
                [list(x) for x in self.links], self.loaded, self.alloc,
            ]
        )

    @classmethod
    def decode(cls, ino: int, data: bytes) -> Inode:
        try:
            v = cbor2.loads(data)
            return cls(
                ino, v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10],
                [(p, n) for p, n in v[11]], v[12], v[13] if len(v) > 13 else None,
            )
        except Exception as exc:
            raise Corrupt(f"inode {ino} record is corrupt: {exc}") from None

    @classmethod
    def from_entry(cls, ino: int, e: TreeEntry, parent: int) -> Inode:
        is_dir = e.is_dir
        special = not (is_dir or e.is_file)
        # A directory's link count is known once it is loaded (2 + subdirs);
        # until then it is 1, which tools such as find read as "unknown".
        return cls(
            ino, e.mode, e.uid, e.gid, 1, e.size, e.mtime_ns, e.mtime_ns,
            e.mtime_ns,
            ref=None if special else e.ref,
            target=e.ref if special else b"",
            xattrs=dict(e.xattrs),
            links=[(parent, e.name)],
            loaded=not is_dir,
        )

    @property
    def is_special(self) -> bool:
        """Symlinks, FIFOs, sockets and devices: no content, ``target`` says it all
        (the link target, or the device number as 8 big-endian bytes)."""
        return not (self.is_dir or self.is_file)

    @property
    def rdev(self) -> int:
        kind = stat.S_IFMT(self.mode)
        if kind in (stat.S_IFCHR, stat.S_IFBLK) and len(self.target) == 8:
            return int.from_bytes(self.target, "big")
        return 0

    def entry(self, name: bytes) -> TreeEntry:
        ref = self.target if self.is_special else self.ref
        assert ref is not None, "entry() of a dirty directory"
        size = len(self.target) if self.is_symlink else 0 if self.is_special else self.size
        return TreeEntry(
            name, self.mode, self.uid, self.gid, self.mtime_ns, size, ref,
            tuple(sorted(self.xattrs.items())),
        )


class OpenFile:
    """The shared in-memory state of one inode opened by one or more handles.

    Sequential writes collect in ``buf`` (starting at ``buf_off``) and are
    chunked in batches: a FUSE write() only appends to a bytearray.  Other
    writes, reads and truncates first apply the buffer to ``content``.
    """

    __slots__ = (
        "batch", "buf", "buf_off", "content", "dirty", "error", "inflight_end", "inode",
        "locs", "opens", "written",
    )

    def __init__(self, inode: Inode, content: FileContent) -> None:
        self.inode = inode
        self.content = content
        self.opens = 0
        self.buf = bytearray()
        self.buf_off = 0
        self.dirty = False  # content or attributes differ from the stored record
        self.written = False  # written since open (for close_write events)
        #: end offset of a buffer being chunked in the background (fs.py), or 0
        self.inflight_end = 0
        #: an error from background work, reported by the next flush/fsync
        self.error: BaseException | None = None
        #: the store batch (Store.commits) that last received this file's data
        self.batch = -1
        #: chunks of this file already written to the chunk log by background
        #: chunking (fs.py) and not yet recorded: id -> locator
        self.locs: dict[bytes, bytes] = {}

    @property
    def size(self) -> int:
        return max(
            self.content.size,
            self.buf_off + len(self.buf) if self.buf else 0,
            self.inflight_end,
        )

    @property
    def append_end(self) -> int | None:
        """Where a write must start to be a sequential append to pending data."""
        if self.buf:
            return self.buf_off + len(self.buf)
        return self.inflight_end or None

    def apply_buffer(self) -> None:
        if self.buf:
            self.content.write(self.buf_off, self.buf)
            self.buf = bytearray()


class Worktree:
    """Inode-level access to every branch's uncommitted state."""

    def __init__(self, store: Store, read_chunk: Callable[[bytes], bytes | None] | None = None,
                 read_chunks: Callable[[list[bytes]], list[bytes | None]] | None = None,
                 read_into: ReadInto | None = None):
        self.store = store
        self.open_files: dict[int, OpenFile] = {}
        self._read_chunk_fn = read_chunk
        #: the batch and buffer forms of read_chunk; whoever replaces
        #: _read_chunk_fn replaces or clears these too (api.py)
        self._read_chunks_fn = read_chunks
        self._read_into_fn = read_into
        store.failure_hooks.append(self._batch_lost)
        #: called with (kind, ino, links) after each change; the repository
        #: turns them into events and kernel-cache invalidations.
        self.listeners: list[Callable[..., None]] = []

    def _batch_lost(self, err: Exception) -> None:
        """A batch commit failed (a full disk): open files that wrote into it
        go back to what the store holds, and their next flush, fsync or close
        reports the error, so no close ever acknowledges lost data."""
        lost = self.store.commits
        for ino, of in list(self.open_files.items()):
            if of.batch != lost:
                continue
            of.error = err
            with self.store.read() as r:
                raw = r.get("inodes", _be(ino))
            if raw is not None:
                of.inode = Inode.decode(ino, raw)
            of.content = FileContent(self.read_chunk, self.read_object,
                                     of.inode.ref or EMPTY_MANIFEST_ID, self.read_chunks,
                                     self.read_into)
            of.buf = bytearray()
            of.dirty = False

    # ------------------------------------------------------------ primitives

    def read_chunk(self, cid: bytes) -> bytes | None:
        if self._read_chunk_fn is not None:
            return self._read_chunk_fn(cid)
        return self.store.get_chunk(cid)

    def read_chunks(self, ids: list[bytes]) -> list[bytes | None]:
        if self._read_chunks_fn is not None:
            return self._read_chunks_fn(ids)
        return [self.read_chunk(c) for c in ids]

    def read_into(self, spans: list[Span], out: memoryview) -> list[int]:
        """Fill spans of a read buffer from the store (FileContent.read_buffer);
        the indices of those left for read_chunks."""
        if self._read_into_fn is not None:
            return self._read_into_fn(spans, out)
        return list(range(len(spans)))

    def read_object(self, oid: bytes) -> bytes | None:
        with self.store.read() as r:
            return r.get_object(oid)

    def _get(self, t: Txn, ino: int) -> Inode:
        of = self.open_files.get(ino)
        if of is not None:
            return of.inode
        raw = t.get("inodes", _be(ino))
        if raw is None:
            raise NotFound(f"inode {ino} does not exist")
        return Inode.decode(ino, raw)

    def _put(self, t: Txn, ino: Inode) -> None:
        t.put("inodes", _be(ino.ino), ino.encode())

    def _alloc(self, t: Txn) -> int:
        n = t.counter("next_ino") or FIRST_INO
        t.set_counter("next_ino", n + 1)
        return n

    def _seq(self, t: Txn) -> int:
        return t.add_counter("next_seq", 1)

    def _link(self, t: Txn, parent: int, name: bytes, child: int) -> None:
        seq = self._seq(t)
        t.put("dirents", _dkey(parent, name), u64(child) + u64(seq))
        t.put("dirseq", _be(parent) + _be(seq), name)

    def _unlink_entry(self, t: Txn, parent: int, name: bytes) -> None:
        raw = t.get("dirents", _dkey(parent, name))
        if raw is None:
            return
        seq = from_u64(raw[8:16])
        t.delete("dirents", _dkey(parent, name))
        t.delete("dirseq", _be(parent) + _be(seq))

    def dirent_seq(self, parent: int, name: bytes) -> int | None:
        """The listing position of *name* in *parent* (see :meth:`readdir`)."""
        with self.store.read() as r:
            raw = r.get("dirents", _dkey(parent, name))
        return from_u64(raw[8:16]) if raw is not None else None

    def _child(self, t: Txn, parent: int, name: bytes) -> int | None:
        raw = t.get("dirents", _dkey(parent, name))
        return from_u64(raw[:8]) if raw is not None else None

    def _ensure_loaded(self, t: Txn, d: Inode) -> Inode:
        """Materialise an unloaded directory's children from its tree."""
        if d.loaded:
            return d
        if not d.is_dir:
            raise JiaoziError("not a directory", errno.ENOTDIR)
        assert d.ref is not None
        raw = t.get_object(d.ref)
        if raw is None:
            raise Corrupt(f"tree {d.ref.hex()} is missing from the store")
        tree = decode_tree(raw)
        subdirs = 0
        for e in tree.entries:
            ino = self._alloc(t)
            self._put(t, Inode.from_entry(ino, e, d.ino))
            self._link(t, d.ino, e.name, ino)
            subdirs += e.is_dir
        d.loaded = True
        d.nlink = 2 + subdirs
        self._put(t, d)
        return d

    def _dirty(self, t: Txn, ino: Inode, seen: set[int] | None = None) -> None:
        """Mark the directories holding *ino* (and their ancestors) dirty."""
        seen = seen if seen is not None else set()
        for parent, _ in ino.links:
            if parent in seen:
                continue
            seen.add(parent)
            p = self._get(t, parent)
            was_dirty = p.ref is None
            p.ref = None
            self._put(t, p)
            if not was_dirty:
                self._dirty(t, p, seen)

    def _notify(self, kind: str, **info: object) -> None:
        for fn in self.listeners:
            fn(kind, **info)

    # --------------------------------------------------------------- branches

    def create_root(self, t: Txn, tree_id: bytes, uid: int = 0, gid: int = 0) -> int:
        ino = self._alloc(t)
        ts = now_ns()
        self._put(
            t,
            Inode(
                ino, stat.S_IFDIR | 0o755, uid, gid, 2, 0, ts, ts, ts, ref=tree_id, loaded=False
            ),
        )
        return ino

    def drop_tree(self, t: Txn, root: int) -> None:
        """Delete a branch's inodes (open files become orphans until closed)."""
        stack = [root]
        while stack:
            ino = stack.pop()
            raw = t.get("inodes", _be(ino))
            if raw is None:
                continue
            node = Inode.decode(ino, raw)
            if node.is_dir and node.loaded:
                for name, child in list(self._iter_dirents(t, ino)):
                    self._unlink_entry(t, ino, name)
                    c = self._get(t, child)
                    c.links = [lk for lk in c.links if lk[0] != ino]
                    c.nlink -= 1 if not c.is_dir else c.nlink
                    if c.is_dir or c.nlink <= 0:
                        stack.append(child)
                    else:
                        self._put(t, c)
            if ino in self.open_files:
                node.nlink = 0
                node.links = []
                self.open_files[ino].inode.nlink = 0
                self.open_files[ino].inode.links = []
                self._put(t, node)
                t.put("orphans", _be(ino), b"")
            else:
                t.delete("inodes", _be(ino))

    def _iter_dirents(self, t: Txn, parent: int) -> Iterator[tuple[bytes, int]]:
        prefix = _be(parent)
        for k, v in t.prefix("dirents", prefix):
            yield k[8:], from_u64(v[:8])

    # ----------------------------------------------------------------- lookup

    def getattr(self, ino: int) -> Inode:
        of = self.open_files.get(ino)
        if of is not None:
            node = of.inode
            node.size = of.size
            return node
        with self.store.read() as r:
            return self._get(r, ino)

    def lookup(self, parent: int, name: bytes) -> Inode:
        """Return the child inode; loads the directory if needed."""
        with self.store.read() as r:
            p = self._get(r, parent)
            if not p.is_dir:
                raise JiaoziError("not a directory", errno.ENOTDIR)
            if p.loaded:
                child = self._child(r, parent, name)
                if child is None:
                    raise NotFound(f"no such file: {name.decode(errors='replace')}")
                return self.getattr(child) if child in self.open_files else self._get(r, child)
        with self.store.write() as w:
            p = self._ensure_loaded(w, self._get(w, parent))
            child = self._child(w, parent, name)
            if child is None:
                raise NotFound(f"no such file: {name.decode(errors='replace')}")
            return self._get(w, child)

    def readdir(self, ino: int, after_seq: int = 0,
                batch: int = READDIR_BATCH) -> Iterator[tuple[bytes, Inode, int]]:
        """Yield (name, inode, seq) after listing position *after_seq*.

        Entries are looked up *batch* at a time, each batch in its own read
        transaction: a FUSE readdir takes only what fits in its reply buffer
        (about 800 entries in 128 KiB) and asks again from there, so looking
        up every remaining entry on each call made listing a directory of
        10,000 entries quadratic (0.4 s for ``ls -l``).
        """
        d = self.getattr(ino)
        if not d.is_dir:
            raise JiaoziError("not a directory", errno.ENOTDIR)
        if not d.loaded:
            with self.store.write() as w:
                self._ensure_loaded(w, self._get(w, ino))
        prefix = _be(ino)
        while True:
            out = []
            with self.store.read() as r:
                cur = r.cursor("dirseq")
                if not cur.set_range(prefix + _be(after_seq + 1)):
                    return
                rows: list[tuple[int, bytes]] = []
                for k, name in cur:
                    if not k.startswith(prefix) or len(rows) >= batch:
                        break
                    rows.append((int.from_bytes(k[8:], "big"), bytes(name)))
                for seq, name in rows:
                    child = self._child(r, ino, name)
                    if child is not None:
                        out.append((name, self._get(r, child), seq))
            yield from out
            if len(rows) < batch:
                return
            after_seq = rows[-1][0]

    # ------------------------------------------------------------- namespace

    @staticmethod
    def check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise JiaoziError("file name too long", errno.ENAMETOOLONG)
        if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
            raise JiaoziError(f"invalid file name {name!r}", errno.EINVAL)

    def create(
        self,
        parent: int,
        name: bytes,
        mode: int,
        uid: int = 0,
        gid: int = 0,
        target: bytes = b"",
        rdev: int = 0,
        exclusive: bool = True,
    ) -> Inode:
        """Create a file, directory or symlink named *name* in *parent*."""
        self.check_name(name)
        kind = stat.S_IFMT(mode)
        if kind not in SUPPORTED_TYPES:
            raise JiaoziError(f"unsupported file type {kind:o}", errno.EPERM)
        with self.store.write() as w:
            p = self._ensure_loaded(w, self._get(w, parent))
            if not p.is_dir:
                raise JiaoziError("not a directory", errno.ENOTDIR)
            if p.nlink == 0:
                raise NotFound("directory was removed")
            if self._child(w, parent, name) is not None:
                raise Exists(f"{name.decode(errors='replace')} exists")
            ts = now_ns()
            if kind in (stat.S_IFCHR, stat.S_IFBLK) and not target:
                target = rdev.to_bytes(8, "big")
            ino = Inode(
                self._alloc(w), mode, uid, gid, 2 if kind == stat.S_IFDIR else 1,
                len(target) if kind == stat.S_IFLNK else 0, ts, ts, ts,
                ref=EMPTY_TREE_ID if kind == stat.S_IFDIR else (
                    EMPTY_MANIFEST_ID if kind == stat.S_IFREG else None),
                target=target, links=[(parent, name)], loaded=True,
            )
            self._put(w, ino)
            self._link(w, parent, name, ino.ino)
            if kind == stat.S_IFDIR:
                p.nlink += 1
            p.mtime_ns = p.ctime_ns = ts
            p.ref = None
            self._put(w, p)
            self._dirty(w, p)
        self._sync_open(p)
        return ino

    def _sync_open(self, node: Inode) -> None:
        of = self.open_files.get(node.ino)
        if of is not None and of.inode is not node:
            of.inode = node

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        self.check_name(name)
        with self.store.write() as w:
            node = self._get(w, ino)
            if node.is_dir:
                raise JiaoziError("hard links to directories are not allowed", errno.EPERM)
            p = self._ensure_loaded(w, self._get(w, parent))
            if self._child(w, parent, name) is not None:
                raise Exists(f"{name.decode(errors='replace')} exists")
            self._link(w, parent, name, ino)
            node.nlink += 1
            node.links.append((parent, name))
            node.ctime_ns = now_ns()
            self._put(w, node)
            w.delete("orphans", _be(ino))
            p.mtime_ns = p.ctime_ns = node.ctime_ns
            p.ref = None
            self._put(w, p)
            self._dirty(w, p)
        return node

    def unlink(self, parent: int, name: bytes, rmdir: bool = False) -> Inode:
        with self.store.write() as w:
            p = self._ensure_loaded(w, self._get(w, parent))
            child = self._child(w, parent, name)
            if child is None:
                raise NotFound(f"no such file: {name.decode(errors='replace')}")
            node = self._get(w, child)
            if rmdir:
                if not node.is_dir:
                    raise JiaoziError("not a directory", errno.ENOTDIR)
                node = self._ensure_loaded(w, node)
                if any(True for _ in self._iter_dirents(w, child)):
                    raise JiaoziError("directory not empty", errno.ENOTEMPTY)
            elif node.is_dir:
                raise JiaoziError("is a directory", errno.EISDIR)
            self._remove_link(w, p, name, node)
        return node

    def _remove_link(self, w: Txn, p: Inode, name: bytes, node: Inode) -> None:
        ts = now_ns()
        self._unlink_entry(w, p.ino, name)
        if node.is_dir:
            node.nlink = 0
            p.nlink -= 1
        else:
            node.nlink -= 1
        try:
            node.links.remove((p.ino, name))
        except ValueError:
            pass
        node.ctime_ns = ts
        p.mtime_ns = p.ctime_ns = ts
        p.ref = None
        self._put(w, p)
        self._dirty(w, p)
        if node.nlink <= 0:
            if node.ino in self.open_files:
                self._put(w, node)
                w.put("orphans", _be(node.ino), b"")
            else:
                w.delete("inodes", _be(node.ino))
        else:
            self._put(w, node)
            self._dirty(w, node)

    def rename(
        self, p1: int, n1: bytes, p2: int, n2: bytes, noreplace: bool = False,
        exchange: bool = False,
    ) -> tuple[Inode, Inode | None]:
        """Rename; returns (moved inode, replaced inode or None)."""
        self.check_name(n2)
        with self.store.write() as w:
            src_p = self._ensure_loaded(w, self._get(w, p1))
            dst_p = src_p if p2 == p1 else self._ensure_loaded(w, self._get(w, p2))
            src = self._child(w, p1, n1)
            if src is None:
                raise NotFound(f"no such file: {n1.decode(errors='replace')}")
            node = self._get(w, src)
            if node.is_dir:
                # Refuse to move a directory into itself or its descendants.
                cur = dst_p
                while True:
                    if cur.ino == node.ino:
                        raise JiaoziError(
                            "cannot move a directory into itself", errno.EINVAL)
                    if not cur.links:
                        break
                    cur = self._get(w, cur.links[0][0])
            dst = self._child(w, p2, n2)
            replaced: Inode | None = None
            if dst is not None:
                if dst == src:
                    return node, None
                if noreplace:
                    raise Exists(f"{n2.decode(errors='replace')} exists")
                replaced = self._get(w, dst)
                if exchange:
                    raise JiaoziError("RENAME_EXCHANGE is not supported", errno.EINVAL)
                if replaced.is_dir:
                    if not node.is_dir:
                        raise JiaoziError("is a directory", errno.EISDIR)
                    replaced = self._ensure_loaded(w, replaced)
                    if any(True for _ in self._iter_dirents(w, dst)):
                        raise JiaoziError("directory not empty", errno.ENOTEMPTY)
                elif node.is_dir:
                    raise JiaoziError("not a directory", errno.ENOTDIR)
                self._remove_link(w, dst_p, n2, replaced)
                dst_p = self._get(w, p2)
                if p1 == p2:
                    src_p = dst_p
            elif exchange:
                raise NotFound(f"no such file: {n2.decode(errors='replace')}")
            ts = now_ns()
            self._unlink_entry(w, p1, n1)
            self._link(w, p2, n2, src)
            node.links = [lk for lk in node.links if lk != (p1, n1)] + [(p2, n2)]
            node.ctime_ns = ts
            self._put(w, node)
            for p in {src_p.ino: src_p, dst_p.ino: dst_p}.values():
                p.mtime_ns = p.ctime_ns = ts
                p.ref = None
            if node.is_dir and p1 != p2:
                src_p.nlink -= 1
                dst_p.nlink += 1
            self._put(w, src_p)
            if dst_p is not src_p:
                self._put(w, dst_p)
            self._dirty(w, src_p)
            self._dirty(w, dst_p)
        return node, replaced

    # -------------------------------------------------------------- attributes

    def setattr(
        self,
        ino: int,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Inode:
        if size is not None:
            self.truncate(ino, size)
        with self.store.write() as w:
            node = self._get(w, ino)
            ts = now_ns()
            if mode is not None:
                node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
            if uid is not None:
                node.uid = uid
            if gid is not None:
                node.gid = gid
            if atime_ns is not None:
                node.atime_ns = atime_ns
            if mtime_ns is not None:
                node.mtime_ns = mtime_ns
            node.ctime_ns = ts
            self._put(w, node)
            self._dirty(w, node)
        return self.getattr(ino)

    def setxattr(self, ino: int, name: bytes, value: bytes | None) -> None:
        with self.store.write() as w:
            node = self._get(w, ino)
            if value is None:
                if name not in node.xattrs:
                    raise JiaoziError("no such attribute", errno.ENODATA)
                del node.xattrs[name]
            else:
                node.xattrs[name] = value
            node.ctime_ns = now_ns()
            self._put(w, node)
            self._dirty(w, node)

    # ------------------------------------------------------------------ files

    def open(self, ino: int) -> OpenFile:
        of = self.open_files.get(ino)
        if of is None:
            with self.store.read() as r:
                node = self._get(r, ino)
            if not node.is_file:
                raise JiaoziError("not a regular file", errno.EISDIR)
            content = FileContent(
                self.read_chunk, self.read_object, node.ref or EMPTY_MANIFEST_ID,
                self.read_chunks, self.read_into,
            )
            of = OpenFile(node, content)
            self.open_files[ino] = of
        of.opens += 1
        return of

    def relatime(self, of: OpenFile) -> bool:
        """Move an open file's atime to now if a read should, by the rule of
        ``relatime`` (Linux's default, and what the mount reports): the atime
        is not later than the mtime or the ctime, or is a day old.  Mail
        readers, tmpreaper and ``find -atime`` rely on it.  Not a change: the
        ctime stays, no tree is marked dirty, no event.  True if it moved."""
        node, now = of.inode, now_ns()
        if (node.atime_ns > node.mtime_ns and node.atime_ns > node.ctime_ns
                and now - node.atime_ns < RELATIME_NS):
            return False
        try:
            with self.store.write() as w:
                stored = self._get(w, node.ino)
                stored.atime_ns = now
                self._put(w, stored)
        except Exception as exc:  # a full disk must not stop reads: atime waits
            log.debug("atime of inode %d not recorded: %s", node.ino, exc)
            return False
        node.atime_ns = now
        return True

    def release(self, ino: int) -> OpenFile | None:
        """Drop one open of *ino*; flush, and forget it after the last one."""
        of = self.open_files.get(ino)
        if of is None:
            return None
        self.flush(ino)
        of.opens -= 1
        if of.opens <= 0:
            del self.open_files[ino]
            if of.locs:  # written to the log, then overwritten before being stored
                self.store.log.discard(of.locs.values())
                of.locs = {}
            if of.inode.nlink <= 0:
                with self.store.write() as w:
                    w.delete("inodes", _be(ino))
                    w.delete("orphans", _be(ino))
        return of

    def read(self, ino: int, offset: int, size: int) -> bytes | bytearray:
        of = self.open_files.get(ino)
        if of is None:
            of = self.open(ino)
            try:
                return of.content.read_buffer(offset, size)
            finally:
                of.opens -= 1
                if of.opens <= 0:
                    self.open_files.pop(ino, None)
        if of.buf:
            bstart = of.buf_off
            if offset >= bstart and offset + size <= bstart + len(of.buf) and (
                bstart >= of.content.size
            ):
                return bytes(of.buf[offset - bstart : offset - bstart + size])
            of.apply_buffer()
        return of.content.read_buffer(offset, size)

    def write(self, ino: int, offset: int, data: bytes, auto_spill: bool = True) -> int:
        """Buffer a write; returns the number of bytes taken.

        With *auto_spill* false the caller (fs.py) chunks full buffers itself,
        in the background.
        """
        of = self.open_files[ino]
        if of.buf and offset == of.buf_off + len(of.buf):
            of.buf += data
        else:
            of.apply_buffer()
            if offset >= of.content.size:
                of.buf_off = offset
                of.buf = bytearray(data)
            else:
                of.content.write(offset, data)
        ts = now_ns()
        of.inode.mtime_ns = of.inode.ctime_ns = ts
        of.dirty = of.written = True
        if auto_spill and len(of.buf) >= FLUSH_BYTES:
            self.spill(ino)
        return len(data)

    def spill(self, ino: int) -> None:
        """Chunk buffered data and store the chunks (not yet the manifest)."""
        of = self.open_files.get(ino)
        if of is None:
            return
        of.apply_buffer()
        self.store_pending(of)

    def store_pending(self, of: OpenFile) -> None:
        """Store an open file's new chunks, all but the last (see below)."""
        pending = of.content.pending
        # The last chunk may still be cut differently once more data arrives:
        # keep it back so that streaming leaves no garbage chunks behind.
        segs = of.content.segs
        last = segs[-1].entries[-1][0] if segs and segs[-1].entries else None
        out = {k: v for k, v in pending.items() if k != last}
        if out:
            with self.store.write() as w:
                unused = _put_chunks(w, of, out)
            self._stored_locs(of, out, unused)
            of.batch = self.store.commits
            # Only once they are stored: a failed write (full disk) keeps them
            # pending, so the content never names a chunk the store lacks.
            for cid in out:
                pending.pop(cid, None)

    def truncate(self, ino: int, size: int) -> None:
        of = self.open_files.get(ino)
        temp = of is None
        if temp:
            of = self.open(ino)
        try:
            of.apply_buffer()
            of.content.truncate(size)
            ts = now_ns()
            of.inode.mtime_ns = of.inode.ctime_ns = ts
            of.dirty = of.written = True
        finally:
            if temp:
                self.release(ino)

    def flush(self, ino: int) -> bool:
        """Make an open file's content durable; return True if it changed."""
        of = self.open_files.get(ino)
        if of is not None and of.error is not None:
            err, of.error = of.error, None
            raise err
        if of is None or not of.dirty:
            return False
        of.apply_buffer()
        manifest, objects, chunks = of.content.encode()
        unused: list[bytes] = []
        with self.store.write() as w:
            unused = _put_chunks(w, of, chunks)
            for oid, data in objects.items():
                w.put_object(oid, data)
            node = of.inode
            node.ref = manifest
            node.size = of.content.size
            node.alloc = of.content.size - of.content.hole_bytes()
            raw = w.get("inodes", _be(ino))
            if raw is not None:
                # attributes may have changed through setattr meanwhile
                stored = Inode.decode(ino, raw)
                node.links = stored.links
                node.nlink = stored.nlink
            self._put(w, node)
            if node.nlink > 0:
                self._dirty(w, node)
        self._stored_locs(of, chunks, unused)
        of.dirty = False
        of.batch = self.store.commits
        return True

    def _stored_locs(self, of: OpenFile, stored: dict[bytes, Any], unused: list[bytes]) -> None:
        """After a successful store: forget the recorded locators, give back the unused."""
        if of.locs:
            for cid in stored:
                of.locs.pop(cid, None)
        if unused:
            self.store.log.discard(unused)

    def flush_all(self) -> None:
        for ino in list(self.open_files):
            self.flush(ino)

    def clean_orphans(self) -> int:
        """Delete inodes left unlinked-but-open by a previous run."""
        with self.store.write() as w:
            inos = [int.from_bytes(k, "big") for k, _ in w.prefix("orphans", b"")]
            for ino in inos:
                if ino not in self.open_files:
                    w.delete("inodes", _be(ino))
                    w.delete("orphans", _be(ino))
        return len(inos)

    # ----------------------------------------------------------------- commit

    def write_tree(self, t: Txn, ino: int) -> tuple[bytes, int]:
        """Write trees for dirty directories below *ino*; return (tree id, size)."""
        d = self._get(t, ino)
        if d.ref is not None:
            return d.ref, d.size
        entries = []
        total = 0
        for name, child in self._iter_dirents(t, ino):
            c = self._get(t, child)
            if c.is_dir:
                self.write_tree(t, child)
                c = self._get(t, child)
            elif c.is_file and c.ref is None:
                raise Corrupt(f"file inode {child} has no manifest")
            e = c.entry(name)
            entries.append(e)
            total += e.size
        enc = encode_tree(entries)
        tid = object_id(enc)
        t.put_object(tid, enc)
        d.ref = tid
        d.size = total
        self._put(t, d)
        return tid, total

    # --------------------------------------------------------------- by path

    def resolve(self, root: int, path: str | bytes, follow: bool = False) -> Inode:
        parts = _split(path)
        node = self.getattr(root)
        for part in parts:
            node = self.lookup(node.ino, part)
        return node

    def resolve_parent(self, root: int, path: str | bytes) -> tuple[Inode, bytes]:
        parts = _split(path)
        if not parts:
            raise JiaoziError("the branch root has no parent", errno.EINVAL)
        parent = self.resolve(root, b"/".join(parts[:-1]))
        return parent, parts[-1]

    def makedirs(self, root: int, path: str | bytes, mode: int = 0o755,
                 uid: int | None = None, gid: int | None = None) -> Inode:
        node = self.getattr(root)
        for part in _split(path):
            try:
                node = self.lookup(node.ino, part)
                if not node.is_dir:
                    raise JiaoziError(f"{part.decode(errors='replace')} is not a directory",
                                      errno.ENOTDIR)
            except NotFound:
                node = self.create(node.ino, part, stat.S_IFDIR | mode,
                                   os.getuid() if uid is None else uid,
                                   os.getgid() if gid is None else gid)
        return node


def _split(path: str | bytes) -> list[bytes]:
    if isinstance(path, str):
        path = os.fsencode(path)
    parts = [p for p in path.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise JiaoziError("paths may not contain '..'", errno.EINVAL)
    return parts


def _put_chunks(w: Txn, of: OpenFile, chunks: dict[bytes, Any]) -> list[bytes]:
    """Store an open file's chunks: by locator when background chunking wrote
    them to the chunk log already, else inline.  Returns the locators of log
    copies that turned out not to be needed (the chunk was stored already):
    the caller discards them once the transaction is committed.
    """
    unused: list[bytes] = []
    for cid, data in chunks.items():
        loc = of.locs.get(cid)
        if loc is not None:
            if not w.put_chunk_at(cid, loc):
                unused.append(loc)
        else:
            w.put_chunk(cid, data)
    return unused
