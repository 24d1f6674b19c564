"""The FUSE layer: a thin translation of kernel requests onto the repository.

Layout of the mount (a contract)::

    MNT/<branch>/...            writable: the branch's worktree
    MNT/.commits/<id>/...       read-only snapshot of a commit (7+ hex prefix ok)
    MNT/.tags/<tag>/...         read-only snapshot of a tag
    MNT/.jiaozifuse-mount       JSON naming the repository (how the CLI finds it)

Inode numbers: 1 is the mount root, 2 ``.commits``, 3 ``.tags``, 4 the
marker file.  Worktree inodes (>= 1024) are the store's own, stable across
mounts.  Snapshot inodes are handed out from :data:`SNAP_BASE` on lookup and
forgotten when the kernel forgets them; lookup counts are kept exactly for
them (a worktree inode lives in the store and needs none).

Kernel caching, which is where metadata speed comes from:

* snapshots never change: entries, attributes and pages are cached for an
  hour (``keep_cache`` on open);
* branches change only through this mount, whose writes the kernel sees, or
  through the CLI, which goes through the daemon; so branch entries and
  attributes are cached too, and :meth:`Ops.apply_invalidations` drops them
  when a reset, merge or revert replaces a worktree;
* failed lookups are cached as negative entries.

Concurrency: every handler runs on the one trio thread pyfuse3 uses (up to 16
requests in flight), and the worktree and the store's batch are only touched
from it, so handlers need no locks.  A handler may await — for a file's
background chunking (:meth:`Ops.settle`) or for chunks fetched from the remote —
but never between reading and writing worktree state, and a file's content
changes only when no background chunking of it is in flight.

Errors: a handler never lets an exception other than ``FUSEError`` escape
(pyfuse3 would end the whole mount).  A JiaoziError becomes its errno;
anything else is logged with a traceback and becomes EIO.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import functools
import itertools
import json
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyfuse3
import trio

from .chunking import chunk_and_hash
from .dirahead import DirReadahead
from .errors import JiaoziError, NotFound
from .filecontent import FileContent
from .objects import Tree, TreeEntry
from .poll import RequestPoller
from .repo import Repository, check_ref_name
from .worktree import Inode

log = logging.getLogger("jiaozifuse.fs")

ROOT = pyfuse3.ROOT_INODE
COMMITS = 2
TAGS = 3
MARKER = 4
SNAP_BASE = 1 << 48
MARKER_NAME = b".jiaozifuse-mount"
#: Decoded snapshot trees kept in memory, counted in entries (Ops._tree).
TREE_CACHE_ENTRIES = 100_000

XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.")

SNAP_TIMEOUT = 3600.0
BRANCH_TIMEOUT = 60.0
ROOT_TIMEOUT = 1.0
NEG_TIMEOUT = 1.0
#: A write into a cache full of data not yet uploaded waits for the uploads
#: while they make progress; it fails with ENOSPC once S3 fails, or once no
#: upload freed anything for this long (see Ops._wait_for_room).
ROOM_WAIT = 30.0
BLKSIZE = 128 * 1024
#: A file's write buffer is chunked in the background once it holds this much.
SPILL_BYTES = 16 << 20
#: chunked bytes of one file kept in memory while a batch commit runs (see _spill)
PENDING_MAX = 16 << 20
#: How far ahead a sequential reader's chunks are fetched from the remote, in
#: steps of READAHEAD_STEP: whenever the reader passes the start of the last
#: step, the next step's chunks are fetched (one ranged GET, see
#: writeback.FETCH_PART), so one or two GETs are in flight.  Measured cold
#: reads of 1 GiB from SeaweedFS on 2 cores (scripts/bench/remote.py): 8 MiB
#: steps of two 4 MiB GETs gave 250-285 MiB/s and 3.4-3.7 CPU seconds of the
#: daemon per GiB; 32 MiB steps of one GET 365-450 MiB/s and 1.8-2.4 s.  Each
#: GET and each fetch has a fixed cost in Python (threads, GIL hand-offs,
#: per-fetch bookkeeping on the FUSE thread) and in the server; larger,
#: fewer of them leave the cores to the copies that remain.
READAHEAD = 64 << 20
READAHEAD_STEP = 32 << 20
#: How far ahead a sequential reader's cached chunks are read from disk (MADV_WILLNEED).
LOCAL_AHEAD = 16 << 20


def _chunk_all(buf: bytearray) -> list[tuple[bytes, memoryview]]:
    return list(chunk_and_hash(buf))


def _chunk_and_log(buf: bytearray, store: Any) -> tuple[list[tuple[bytes, memoryview]],
                                                         dict[bytes, bytes]]:
    """Cut and hash a spilled buffer, and write its chunks to the chunk log.

    All in the calling (worker) thread, so that the trio thread only records
    16-byte locators.  The buffer's last chunk is left out: if the buffer
    ends where the file does, the next spill cuts it again.  A failed log
    write (a full disk) is not an error here: the chunks are then stored
    inline, where the failure is reported with its context.
    """
    pieces = _chunk_all(buf)
    try:
        locs = store.append_chunks(pieces[:-1])
    except JiaoziError as exc:
        log.warning("chunk log write failed, storing inline: %s", exc)
        locs = {}
    return pieces, locs


def _sequential(h: Handle, off: int, size: int) -> bool:
    """Whether this read continues the handle's last one; a seek resets the
    readahead marks, so readahead starts afresh from the next sequential read."""
    sequential = off == h.next_off
    h.next_off = off + size
    if not sequential:
        h.ahead = h.fetched_to = 0
    return sequential


#: Which positional arguments of each handler are inode numbers (for the
#: root alias of single-branch and single-commit mounts).
INODE_ARGS = {
    "lookup": (0,), "getattr": (0,), "readlink": (0,), "opendir": (0,), "readdir": (0,),
    "mkdir": (0,), "mknod": (0,), "symlink": (0,), "unlink": (0,), "rmdir": (0,),
    "rename": (0, 2), "link": (0, 1), "setattr": (0,), "open": (0,), "create": (0,),
    "setxattr": (0,), "removexattr": (0,), "getxattr": (0,), "listxattr": (0,),
}


def _file_info(fh: int, flags: int, keep_cache: bool = True) -> pyfuse3.FileInfo:
    """The open reply for a branch file: pages kept between opens; an O_APPEND
    handle bypasses the page cache (direct_io).

    Through the page cache, the kernel cuts a write() into two FUSE writes
    where it crosses from a page it does not hold whole (the partly written
    tail page of a growing file, always) into the next, and a commit or a
    reader can fall between the two: an appended line half in a snapshot.
    With direct_io the kernel sends each write() as one request (up to
    max_write), and the daemon applies a request whole.  Not keeping the
    cache on such an open also drops pages other handles may hold of the
    tail the appends change.
    """
    append = bool(flags & os.O_APPEND)
    return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache and not append, direct_io=append)


def handler(fn: Callable) -> Callable:
    """Turn every error into an errno; an unexpected one is logged, never fatal."""
    positions = INODE_ARGS.get(fn.__name__, ())

    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Ops, *args: Any) -> Any:
        if self.root_alias and positions:
            args = tuple(
                self.root_alias if i in positions and a == ROOT else a
                for i, a in enumerate(args)
            )
        t0 = time.perf_counter() if self.metrics is not None else 0.0
        self.poller.begin()
        err: int | None = None
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError as exc:
            err = exc.errno
            raise
        except JiaoziError as exc:
            err = exc.errno
            if exc.errno == errno.EIO:
                log.error("%s%r: %s", name, args[:2], exc)
            elif exc.errno not in (errno.ENOENT, errno.ENODATA):
                log.debug("%s%r: %s", name, args[:2], exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except OSError as exc:
            err = exc.errno or errno.EIO
            log.warning("%s%r: %s", name, args[:2], exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            err = errno.EIO
            log.exception("unexpected error in %s%r", name, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            t1 = self.poller.end()
            if self.metrics is not None:
                self.metrics.observe(name, t1 - t0, err)

    return wrapper


def _erofs() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.EROFS)


@dataclass(slots=True)
class SnapNode:
    """A node of a read-only snapshot."""

    ino: int
    commit: bytes
    entry: TreeEntry  # for a snapshot root: a synthetic directory entry
    parent: int
    lookups: int = 0
    content: FileContent | None = None
    opens: int = 0
    subdirs: int = -1  # directories: counted on first use


@dataclass(slots=True)
class Handle:
    ino: int
    writable: bool
    append: bool
    snapshot: bool
    wrote: bool = False  # for the close_write event
    next_off: int = 0  # where a sequential read would continue
    ahead: int = 0  # readahead has been started up to here
    fetched_to: int = 0  # remote readahead has asked for everything up to here


class Ops(pyfuse3.Operations):
    """pyfuse3 operations over a :class:`~jiaozifuse.repo.Repository`."""

    enable_writeback_cache = False

    def __init__(self, repo: Repository, read_only: bool = False, info: dict | None = None,
                 lazy_close: bool = False, branch: str | None = None,
                 commit: str | None = None):
        super().__init__()
        #: the inode shown as the mount root (0: the full layout)
        self.root_alias = 0
        #: a metrics.Metrics when --metrics-addr is given
        self.metrics: Any = None
        #: when set, close() leaves the commit to the group-commit timer
        self.lazy_close = lazy_close
        #: busy polling between requests (poll.py; the daemon sets its window)
        self.poller = RequestPoller()
        self.repo = repo
        self.wt = repo.worktree
        self.read_only = read_only
        self.marker = (json.dumps(info or {"repo": str(repo.path)}) + "\n").encode()
        self.snaps: dict[int, SnapNode] = {}
        self.snap_index: dict[tuple[int, bytes], int] = {}
        #: tree id -> decoded tree, least recently used first (see _tree)
        self._trees: OrderedDict[bytes, Tree] = OrderedDict()
        self._tree_entries = 0
        self.next_snap = SNAP_BASE
        self.handles: dict[int, Handle] = {}
        self.next_fh = 1
        self.mount_time_ns = time.time_ns()
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.statfs_path = str(repo.path)
        repo.reset_hooks.append(self._on_reset)
        self.pending_inval: list[tuple[int, list[bytes]]] = []
        #: branch name -> root inode, refreshed on every root lookup/readdir
        self.branch_roots: dict[str, int] = {}
        self.stats = {"ops": 0}
        #: inode -> event set when its background chunking has finished
        self.busy: dict[int, trio.Event] = {}
        #: set by the daemon: where background chunking tasks run
        self.nursery: trio.Nursery | None = None
        self.cpu = trio.CapacityLimiter(1)
        #: set by the daemon when the repository has a remote:
        #: ``await fetcher(chunk_ids)`` brings them into the cache
        self.fetcher: Callable[[list[bytes]], Any] | None = None
        #: set by the daemon when the repository has a remote: asks the
        #: uploader to send what is queued now (a write waits for room)
        self.make_room: Callable[[], None] | None = None
        #: cross-file readahead for readers walking a directory (with a remote)
        self.dir_ahead: DirReadahead[TreeEntry | Inode] | None = DirReadahead(READAHEAD_STEP)
        if branch is not None:
            # MNT is the branch itself: the training-container layout.
            self.root_alias = repo.root_ino(branch)
        elif commit is not None:
            node = self._snap_root(ROOT, b"", repo.resolve(commit))
            node.lookups = 1 << 60  # never forgotten
            self.root_alias = node.ino
            self.read_only = True

    # ------------------------------------------------------------ attributes

    def _virtual_dir(self, ino: int, nlink: int = 2) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = stat.S_IFDIR | (0o555 if ino != ROOT else 0o755)
        a.st_nlink = nlink
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mount_time_ns
        a.st_blksize = BLKSIZE
        a.entry_timeout = a.attr_timeout = ROOT_TIMEOUT
        return a

    def _wt_attr(self, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = node.mode
        if self.read_only:
            a.st_mode &= ~0o222
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        if node.is_dir:
            a.st_size = 4096
        elif node.is_symlink:
            a.st_size = len(node.target)
        elif node.is_special:
            a.st_size = 0
            a.st_rdev = node.rdev
        else:
            of = self.wt.open_files.get(node.ino)
            a.st_size = of.size if of is not None else node.size
        a.st_blksize = BLKSIZE
        stored = a.st_size
        if node.is_file and node.alloc is not None and (
                node.ino not in self.wt.open_files or not self.wt.open_files[node.ino].dirty):
            stored = node.alloc  # holes take no space (du, cp --sparse, tar -S rely on it)
        a.st_blocks = (stored + 511) // 512
        a.st_atime_ns = node.atime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        a.entry_timeout = a.attr_timeout = BRANCH_TIMEOUT
        if node.ino == self.root_alias:
            a.st_ino = ROOT
        return a

    def _tree(self, tid: bytes) -> Tree:
        """A snapshot directory's tree, decoded once while it is in use.

        Each lookup in a snapshot directory needs its tree's index by name,
        and each readdir reply its entries; decoding the tree for every one
        made reading the files of a 10,000-entry directory quadratic.  Trees
        are immutable (named by their content), so nothing invalidates them;
        the cache is bounded by TREE_CACHE_ENTRIES entries.
        """
        tree = self._trees.get(tid)
        if tree is not None:
            self._trees.move_to_end(tid)
            return tree
        tree = self.repo.get_tree(tid)
        self._trees[tid] = tree
        self._tree_entries += len(tree.entries)
        while self._tree_entries > TREE_CACHE_ENTRIES and len(self._trees) > 1:
            _, old = self._trees.popitem(last=False)
            self._tree_entries -= len(old.entries)
        return tree

    def _snap_attr(self, n: SnapNode) -> pyfuse3.EntryAttributes:
        e = n.entry
        a = pyfuse3.EntryAttributes()
        a.st_ino = n.ino
        a.st_mode = e.mode & ~0o222
        if e.is_dir:
            if n.subdirs < 0:
                n.subdirs = sum(1 for c in self._tree(e.ref).entries if c.is_dir)
            a.st_nlink = 2 + n.subdirs
        else:
            a.st_nlink = 1
        a.st_uid, a.st_gid = e.uid, e.gid
        a.st_size = 4096 if e.is_dir else len(e.ref) if e.is_symlink else e.size
        if stat.S_IFMT(e.mode) in (stat.S_IFCHR, stat.S_IFBLK):
            a.st_rdev = int.from_bytes(e.ref, "big")
        a.st_blksize = BLKSIZE
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = e.mtime_ns
        a.entry_timeout = a.attr_timeout = SNAP_TIMEOUT
        if n.ino == self.root_alias:
            a.st_ino = ROOT
        return a

    def _marker_attr(self) -> pyfuse3.EntryAttributes:
        a = self._virtual_dir(MARKER)
        a.st_mode = stat.S_IFREG | 0o444
        a.st_nlink = 1
        a.st_size = len(self.marker)
        return a

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        if ino == ROOT:
            return self._virtual_dir(ROOT, 4 + len(self.repo.branches()))
        if ino in (COMMITS, TAGS):
            return self._virtual_dir(ino)
        if ino == MARKER:
            return self._marker_attr()
        if ino >= SNAP_BASE:
            n = self.snaps.get(ino)
            if n is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._snap_attr(n)
        return self._wt_attr(self.wt.getattr(ino))

    def _negative(self) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = NEG_TIMEOUT
        return a

    # ------------------------------------------------------------- snapshots

    def _snap_child(self, parent: int, name: bytes, commit: bytes, entry: TreeEntry) -> SnapNode:
        key = (parent, name)
        ino = self.snap_index.get(key)
        if ino is not None:
            return self.snaps[ino]
        ino = self.next_snap
        self.next_snap += 1
        node = SnapNode(ino, commit, entry, parent)
        self.snaps[ino] = node
        self.snap_index[key] = ino
        return node

    def _snap_root(self, parent: int, name: bytes, commit: bytes) -> SnapNode:
        c = self.repo.get_commit(commit)
        entry = TreeEntry(name, stat.S_IFDIR | 0o555, self.uid, self.gid, c.time_ns, 0, c.tree)
        return self._snap_child(parent, name, commit, entry)

    def _is_snap(self, ino: int) -> bool:
        return ino >= SNAP_BASE or ino in (COMMITS, TAGS)

    def _branch_root(self, name: bytes) -> int | None:
        try:
            return self.repo.root_ino(name.decode())
        except (NotFound, UnicodeDecodeError):
            return None

    def _is_branch_root(self, ino: int) -> bool:
        return ino in self.branch_roots.values()

    # ---------------------------------------------------------------- events

    def _event(self, type: str, parent: int | None = None, name: bytes | None = None,
               ino: int | None = None, **extra: Any) -> None:
        """Record an inotify-like event for a worktree change (never fails the op)."""
        if not self.repo.events.enabled:
            return
        try:
            if parent is not None and name is not None:
                branch, ppath = self.repo.path_of(parent)
                path = f"{ppath}/{os.fsdecode(name)}" if ppath else os.fsdecode(name)
            else:
                assert ino is not None
                branch, path = self.repo.path_of(ino)
            self.repo.events.append(type, branch=branch, path=path, **extra)
        except Exception:
            log.exception("could not record a %s event", type)

    # --------------------------------------------------------------- lookups

    def _remember(self, a: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        n = self.snaps.get(a.st_ino)
        if n is not None:
            n.lookups += 1
        return a

    @handler
    async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self.stats["ops"] += 1
        if len(name) > 255:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        if name == b".":
            return self._remember(self._attr(parent))
        if name == MARKER_NAME and parent == self.root_alias:
            return self._attr(MARKER)
        if parent == ROOT:
            if name == b".commits":
                return self._attr(COMMITS)
            if name == b".tags":
                return self._attr(TAGS)
            if name == MARKER_NAME:
                return self._attr(MARKER)
            ino = self._branch_root(name)
            if ino is None:
                return self._negative_root()
            self.branch_roots[name.decode()] = ino
            return self._attr(ino)
        if parent == COMMITS:
            try:
                text = name.decode("ascii")
                if len(text) < 7:
                    raise NotFound("prefix too short")
                from .repo import HEX_RE

                if not HEX_RE.match(text):
                    raise NotFound("not a commit id")
                cid = self.repo.resolve(text)
            except (NotFound, UnicodeDecodeError):
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            return self._remember(self._snap_attr(self._snap_root(COMMITS, name, cid)))
        if parent == TAGS:
            cid = self.repo.tags().get(name.decode(errors="replace"))
            if cid is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._remember(self._snap_attr(self._snap_root(TAGS, name, cid)))
        if parent >= SNAP_BASE:
            p = self.snaps.get(parent)
            if p is None or not p.entry.is_dir:
                raise pyfuse3.FUSEError(errno.ENOENT)
            child = self._tree(p.entry.ref).get(name)
            if child is None:
                a = self._negative()
                a.entry_timeout = SNAP_TIMEOUT
                return a
            return self._remember(self._snap_attr(self._snap_child(parent, name, p.commit, child)))
        try:
            node = self.wt.lookup(parent, name)
        except NotFound:
            return self._negative()
        return self._wt_attr(node)

    def _negative_root(self) -> pyfuse3.EntryAttributes:
        # Branch names appear through mkdir here or through the CLI (which
        # goes through this daemon), so a short negative timeout is enough.
        return self._negative()

    @handler
    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            node = self.snaps.get(ino)
            if node is None:
                continue
            node.lookups -= n
            if node.lookups <= 0 and node.opens <= 0:
                del self.snaps[ino]
                self.snap_index.pop((node.parent, node.entry.name), None)

    @handler
    async def getattr(self, ino: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self.stats["ops"] += 1
        return self._attr(ino)

    @handler
    async def readlink(self, ino: int, ctx: Any) -> bytes:
        if ino >= SNAP_BASE:
            n = self.snaps[ino]
            if not n.entry.is_symlink:
                raise pyfuse3.FUSEError(errno.EINVAL)
            return n.entry.ref
        node = self.wt.getattr(ino)
        if not node.is_symlink:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return node.target

    # -------------------------------------------------------------- listings

    @handler
    async def opendir(self, ino: int, ctx: Any) -> int:
        return ino

    @handler
    async def readdir(self, ino: int, start_id: int, token: Any) -> None:
        self.stats["ops"] += 1
        if ino == ROOT:
            rows: list[tuple[bytes, pyfuse3.EntryAttributes]] = [
                (b".commits", self._attr(COMMITS)), (b".tags", self._attr(TAGS)),
                (MARKER_NAME, self._attr(MARKER)),
            ]
            for name in sorted(self.repo.branches()):
                root = self.repo.root_ino(name)
                self.branch_roots[name] = root
                rows.append((name.encode(), self._attr(root)))
            self._reply_indexed(rows, start_id, token)
        elif ino == COMMITS:
            rows = []
            for cid in self.repo.commit_ids():
                name = cid.hex().encode()
                rows.append((name, None))  # type: ignore[arg-type]
            for i in range(start_id, len(rows)):
                name = rows[i][0]
                n = self._snap_root(COMMITS, name, bytes.fromhex(name.decode()))
                if not pyfuse3.readdir_reply(token, name, self._snap_attr(n), i + 1):
                    return
                n.lookups += 1
        elif ino == TAGS:
            tags = sorted(self.repo.tags().items())
            for i in range(start_id, len(tags)):
                name = tags[i][0].encode()
                n = self._snap_root(TAGS, name, tags[i][1])
                if not pyfuse3.readdir_reply(token, name, self._snap_attr(n), i + 1):
                    return
                n.lookups += 1
        elif ino >= SNAP_BASE:
            p = self.snaps[ino]
            entries = self._tree(p.entry.ref).entries
            for i in range(start_id, len(entries)):
                e = entries[i]
                n = self._snap_child(ino, e.name, p.commit, e)
                if not pyfuse3.readdir_reply(token, e.name, self._snap_attr(n), i + 1):
                    return
                n.lookups += 1
        else:
            for name, node, seq in self.wt.readdir(ino, start_id):
                if not pyfuse3.readdir_reply(token, name, self._wt_attr(node), seq):
                    return

    def _reply_indexed(self, rows: list, start_id: int, token: Any) -> None:
        for i in range(start_id, len(rows)):
            name, attr = rows[i]
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                return
            self._remember(attr)

    @handler
    async def releasedir(self, fh: int) -> None:
        return None

    @handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.settle_all()
        await self.repo.store.ready_async()
        self.wt.flush_all()
        await self.repo.store.sync_async()

    # ------------------------------------------------------------ namespace

    def _check_writable(self, parent: int) -> None:
        if self.read_only or self._is_snap(parent) or parent == MARKER:
            raise _erofs()
        if parent == ROOT:
            raise pyfuse3.FUSEError(errno.EPERM)

    def _owner(self, parent: Inode, ctx: Any, mode: int) -> tuple[int, int, int]:
        gid = ctx.gid
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
        return ctx.uid, gid, mode

    @handler
    async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        if parent == ROOT and not self.read_only:
            try:
                bname = check_ref_name(name.decode())
            except (JiaoziError, UnicodeDecodeError):
                raise pyfuse3.FUSEError(errno.EINVAL) from None
            if self._branch_root(name) is not None:
                raise pyfuse3.FUSEError(errno.EEXIST)
            self.repo.create_branch(bname)
            ino = self.repo.root_ino(bname)
            self.branch_roots[bname] = ino
            return self._attr(ino)
        self._check_writable(parent)
        p = self.wt.getattr(parent)
        uid, gid, mode = self._owner(p, ctx, stat.S_IFDIR | (mode & ~ctx.umask & 0o7777))
        node = self.wt.create(parent, name, mode, uid, gid)
        self._event("mkdir", parent, name)
        return self._wt_attr(node)

    @handler
    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> pyfuse3.EntryAttributes:
        self._check_writable(parent)
        kind = stat.S_IFMT(mode)
        p = self.wt.getattr(parent)
        uid, gid, mode = self._owner(p, ctx, kind | (mode & ~ctx.umask & 0o7777))
        target = rdev.to_bytes(8, "big") if kind in (stat.S_IFCHR, stat.S_IFBLK) else b""
        node = self.wt.create(parent, name, mode, uid, gid, target=target)
        self._event("create", parent, name, size=0)
        return self._wt_attr(node)

    @handler
    async def symlink(self, parent: int, name: bytes, target: bytes,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        self._check_writable(parent)
        p = self.wt.getattr(parent)
        uid, gid, _ = self._owner(p, ctx, stat.S_IFLNK)
        node = self.wt.create(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)
        self._event("create", parent, name, target=os.fsdecode(target))
        return self._wt_attr(node)

    @handler
    async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
        self._check_writable(parent)
        self.wt.unlink(parent, name)
        self._event("delete", parent, name)

    @handler
    async def rmdir(self, parent: int, name: bytes, ctx: Any) -> None:
        self._check_writable(parent)
        self.wt.unlink(parent, name, rmdir=True)
        self._event("rmdir", parent, name)

    @handler
    async def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int,
                     ctx: Any) -> None:
        if self.read_only or self._is_snap(p1) or self._is_snap(p2):
            raise _erofs()
        if p1 == ROOT or p2 == ROOT:
            raise pyfuse3.FUSEError(errno.EPERM)
        if self._branch_of(p1) != self._branch_of(p2):
            raise pyfuse3.FUSEError(errno.EXDEV)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old = self.repo.path_of(p1)[1] if self.repo.events.enabled else ""
        self.wt.rename(p1, n1, p2, n2, noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE))
        old_path = f"{old}/{os.fsdecode(n1)}" if old else os.fsdecode(n1)
        self._event("move", p2, n2, old_path=old_path)

    def _branch_of(self, ino: int) -> int:
        """The root inode of the worktree holding directory *ino*."""
        node = self.wt.getattr(ino)
        seen = 0
        while node.links and seen < 4096:
            node = self.wt.getattr(node.links[0][0])
            seen += 1
        return node.ino

    @handler
    async def link(self, ino: int, parent: int, name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        self._check_writable(parent)
        if self._is_snap(ino) or ino < 1024:
            raise pyfuse3.FUSEError(errno.EXDEV)
        if self._branch_of(parent) != self._branch_of(self.wt.getattr(ino).links[0][0]
                                                      if self.wt.getattr(ino).links else ino):
            raise pyfuse3.FUSEError(errno.EXDEV)
        node = self.wt.link(ino, parent, name)
        self._event("create", parent, name, size=node.size, link=True)
        return self._wt_attr(node)

    @handler
    async def setattr(self, ino: int, attr: pyfuse3.EntryAttributes, fields: Any, fh: int | None,
                      ctx: Any) -> pyfuse3.EntryAttributes:
        if ino < 1024 or ino >= SNAP_BASE or self.read_only:
            raise _erofs()
        if fields.update_size:
            await self.settle(ino)
        node = self.wt.setattr(
            ino,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        if fields.update_size:
            writer = next((h for h in self.handles.values() if h.ino == ino and h.writable),
                          None)
            if writer is not None:
                writer.wrote = True  # its close reports the change
            else:
                self._event("close_write", ino=ino, size=node.size)
        elif fields.update_mode or fields.update_uid or fields.update_gid or (
                fields.update_mtime or fields.update_atime):
            self._event("attrib", ino=ino)
        return self._wt_attr(node)

    # ----------------------------------------------------------------- files

    def _new_fh(self, h: Handle) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = h
        return fh

    @handler
    async def open(self, ino: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if ino == MARKER:
            if writable:
                raise _erofs()
            return pyfuse3.FileInfo(fh=self._new_fh(Handle(ino, False, False, True)))
        if ino >= SNAP_BASE:
            if writable or flags & os.O_TRUNC:
                raise _erofs()
            n = self.snaps[ino]
            if n.content is None:
                n.content = self.repo.file_content(n.entry.ref)
            n.opens += 1
            return pyfuse3.FileInfo(fh=self._new_fh(Handle(ino, False, False, True)),
                                    keep_cache=True)
        if writable and self.read_only:
            raise _erofs()
        of = self.wt.open(ino)
        truncated = False
        if flags & os.O_TRUNC and writable:
            await self.settle(ino)
            self.wt.truncate(ino, 0)
            truncated = True
        # A read that finds the pages cached never reaches us, so the atime a
        # read should move (relatime) moves at the open for reading, and the
        # open drops the cached pages: the read comes here, after which the
        # kernel asks for the attributes again.  Only the first open after a
        # change (or in a day) pays for it.
        moved = (not truncated and (flags & os.O_ACCMODE) != os.O_WRONLY
                 and not self.read_only and self.wt.relatime(of))
        fh = self._new_fh(Handle(ino, writable, bool(flags & os.O_APPEND), False,
                                 wrote=truncated))
        return _file_info(fh, flags, keep_cache=not moved)

    @handler
    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._check_writable(parent)
        p = self.wt.getattr(parent)
        uid, gid, mode = self._owner(p, ctx, stat.S_IFREG | (mode & ~ctx.umask & 0o7777))
        node = self.wt.create(parent, name, mode, uid, gid)
        self.wt.open(node.ino)
        self._event("create", parent, name, size=0)
        fh = self._new_fh(Handle(node.ino, True, bool(flags & os.O_APPEND), False, wrote=True))
        return _file_info(fh, flags), self._wt_attr(node)

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
        h = self.handles[fh]
        if h.ino == MARKER:
            return self.marker[off : off + size]
        if h.snapshot:
            content = self.snaps[h.ino].content
            assert content is not None
            if self.fetcher is not None:
                await self._prefetch(h, content, off, size)
            else:
                self._advise(h, content, off, size)
            return content.read_buffer(off, size)
        if h.ino in self.busy:
            await self.settle(h.ino)
        of = self.wt.open_files.get(h.ino)
        if of is not None:
            if self.fetcher is not None:
                await self._prefetch(h, of.content, off, size)
            else:
                self._advise(h, of.content, off, size)
        data = self.wt.read(h.ino, off, size)
        if self.metrics is not None:
            self.metrics.read_bytes.labels("cache").inc(len(data))
        return data

    async def _prefetch(self, h: Handle, content: FileContent, off: int, size: int) -> None:
        """Bring missing chunks from the remote without blocking other requests.

        The chunks of this read are awaited; on a sequential read the next
        READAHEAD bytes are fetched in the background as well.
        """
        assert self.fetcher is not None
        sequential = _sequential(h, off, size)
        want = content.ids_in_range(off, size)
        missing = self._not_cached(want)
        if self.metrics is not None:
            self.metrics.cache_hits.inc(len(want) - len(missing))
        if off == 0:
            self._walk_ahead(h, bool(missing))
        if missing:
            await self.fetcher(missing)
        if sequential and self.nursery is not None and off + size >= h.ahead:
            # only the part of the window not asked for by an earlier step: the
            # presence checks of the whole 64 MiB window (1,000 ids, 2 lookups
            # each) every 8 MiB cost the FUSE thread 5 % of a cold read
            start = max(off + size, h.fetched_to)
            end = off + size + READAHEAD
            ahead = content.ids_in_range(start, end - start) if start < end else []
            h.ahead = off + size + READAHEAD_STEP
            h.fetched_to = end
            later = [c for c, ok in zip(ahead, self.repo.store.has_chunks(ahead), strict=True)
                     if not ok]
            # a window wider than a step (the first one) goes as one fetch per
            # step: the reader then waits for the first step's GET, not all
            steps = max(1, round((end - start) / READAHEAD_STEP))
            per = -(-len(later) // steps)
            for i in range(0, len(later), per or 1):
                self.nursery.start_soon(self._fetch_quietly, later[i : i + per])
            if len(later) < len(ahead):
                cached = set(ahead).difference(later)
                self.nursery.start_soon(self._willneed, [c for c in ahead if c in cached])

    def _walk_ahead(self, h: Handle, missed: bool) -> None:
        """Cross-file readahead (see dirahead.py): the file of *h* is read
        from its start; if its directory is being walked, fetch the chunks
        of the files that come next in the listing, in the background."""
        ahead = self.dir_ahead
        if self.nursery is None or ahead is None:
            return
        try:
            where = self._listing_of(h, missed, ahead)
            if where is None:
                return
            key, pos, after = where
            items = ahead.first_read(key, pos, missed, after)
        except Exception as exc:  # readahead only: never fail the read for it
            log.debug("directory readahead failed: %s", exc)
            return
        if items:  # the files' manifests are read in the task: not this read's delay
            self.nursery.start_soon(self._fetch_heads, items)

    async def _fetch_heads(self, items: list[TreeEntry | Inode]) -> None:
        try:
            ids = self._head_ids(items)
        except Exception as exc:
            log.debug("directory readahead failed: %s", exc)
            return
        if ids:
            await self._fetch_quietly(ids)

    def _listing_of(self, h: Handle, missed: bool, ahead: DirReadahead
                    ) -> tuple[Any, int, Any] | None:
        """(directory key, position in its listing, ``after``) of the file of
        *h*, for :class:`DirReadahead`; None when there is nothing to follow
        (no miss, in a directory not being followed: the warm-cache case)."""
        if h.snapshot:
            n = self.snaps.get(h.ino)
            p = self.snaps.get(n.parent) if n is not None else None
            if n is None or p is None:
                return None
            key: Any = ("snap", p.ino)
            if not missed and not ahead.watching(key):
                return None
            entries = self._tree(p.entry.ref).entries
            pos = bisect.bisect_left(entries, n.entry.name, key=lambda e: e.name)

            def after_entry(q: int, k: int) -> list[tuple[int, TreeEntry | None, int]]:
                return [(i, e if e.is_file else None, e.size)
                        for i, e in enumerate(entries[q + 1 : q + 1 + k], q + 1)]

            return key, pos, after_entry
        of = self.wt.open_files.get(h.ino)
        if of is None or not of.inode.links:
            return None
        parent, name = of.inode.links[0]
        key = ("branch", parent)
        if not missed and not ahead.watching(key):
            return None
        seq = self.wt.dirent_seq(parent, name)
        if seq is None:
            return None

        def after_dirent(q: int, k: int) -> list[tuple[int, Inode | None, int]]:
            rows = itertools.islice(self.wt.readdir(parent, q, batch=k), k)
            return [(s, node if node.is_file else None, node.size) for _, node, s in rows]

        return key, seq, after_dirent

    def _head_ids(self, items: list[TreeEntry | Inode]) -> list[bytes]:
        """The chunks not cached of the first READAHEAD_STEP bytes of *items*' files."""
        budget = READAHEAD_STEP
        want: list[bytes] = []
        for item in items:
            if isinstance(item, TreeEntry):
                content = self.repo.file_content(item.ref)
            else:
                of = self.wt.open_files.get(item.ino)
                if of is not None:
                    content = of.content
                elif item.ref:
                    content = self.repo.file_content(item.ref)
                else:
                    continue
            take = min(content.size, budget)
            want += content.ids_in_range(0, take)
            budget -= take
            if budget <= 0:
                break
        return self._not_cached(list(dict.fromkeys(want)))

    def _not_cached(self, ids: list[bytes]) -> list[bytes]:
        """The chunks of *ids* the cache lacks (those verified since start-up
        are known to be there: no lookup)."""
        verified = self.repo.verified
        unknown = [c for c in ids if c not in verified]
        return [c for c, ok in zip(unknown, self.repo.store.has_chunks(unknown), strict=True)
                if not ok]

    def _advise(self, h: Handle, content: FileContent, off: int, size: int) -> None:
        """Local readahead: on a sequential read, have the kernel read the map
        pages of the next LOCAL_AHEAD bytes' chunks in the background."""
        sequential = _sequential(h, off, size)
        if sequential and self.nursery is not None and off + size >= h.ahead:
            ids = content.ids_in_range(off + size, LOCAL_AHEAD)
            h.ahead = off + size + LOCAL_AHEAD // 2
            if ids:
                self.nursery.start_soon(self._willneed, ids)

    async def _willneed(self, ids: list[bytes]) -> None:
        try:
            await trio.to_thread.run_sync(self.repo.store.willneed, ids)
        except Exception as exc:  # advice only: the read itself faults the pages in
            log.debug("readahead advice failed: %s", exc)

    async def _fetch_quietly(self, ids: list[bytes]) -> None:
        assert self.fetcher is not None
        try:
            await self.fetcher(ids)
        except Exception as exc:  # readahead only: the read itself will retry
            log.debug("readahead failed: %s", exc)

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        h = self.handles[fh]
        if not h.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        if not self.repo.cache_room(len(buf)):  # cache full of data S3 lacks
            await self._wait_for_room(len(buf))
        of = self.wt.open_files[h.ino]
        h.wrote = True
        self.stats["writes"] = self.stats.get("writes", 0) + 1
        self.stats["write_bytes"] = self.stats.get("write_bytes", 0) + len(buf)
        if h.append:
            off = of.size
        if of.inflight_end and off != of.append_end:
            await self.settle(h.ino)
        n = self.wt.write(h.ino, off, buf, auto_spill=self.nursery is None)
        if len(of.buf) >= SPILL_BYTES and self.nursery is not None:
            await self._start_spill(h.ino)
        return n

    async def _wait_for_room(self, n: int) -> None:
        """Backpressure for a writer that outruns the uploads.

        The cache may hold only ``cache_size`` bytes that S3 lacks (they cannot
        be evicted).  While S3 answers, a write that finds it full waits for
        uploads to make room, as a writer waits for the page cache's writeback,
        so that a copy larger than the cache slows to the upload's speed instead
        of failing half-way.  It fails with ENOSPC (the clear error the outage
        case needs) as soon as the uploader reports an error, and when nothing
        was uploaded for :data:`ROOM_WAIT` (room that only this writer's own
        unflushed buffers could make, for one).  Other requests go on meanwhile.
        """
        st = self.repo.upload_state()
        seen = st.not_durable()
        deadline = trio.current_time() + ROOM_WAIT
        while not st.last_error and trio.current_time() < deadline:
            if self.make_room is not None:
                self.make_room()
            await trio.sleep(0.05)
            if self.repo.cache_room(n):
                return
            if st.not_durable() < seen:  # uploads are going through: keep waiting
                seen = st.not_durable()
                deadline = trio.current_time() + ROOM_WAIT
        st.refuse()
        raise pyfuse3.FUSEError(errno.ENOSPC)

    async def _start_spill(self, ino: int) -> None:
        """Chunk and hash a full write buffer in a worker thread.

        The write that filled the buffer returns at once, so the writer's
        next 16 MiB arrive while this one is chunked: copying (this thread)
        and chunking (a worker) overlap on two cores.  Until the task ends,
        any operation on the file's content other than appending waits in
        :meth:`settle`; at most one buffer per file is in flight.
        """
        if ino in self.busy:
            await self.settle(ino)
        of = self.wt.open_files[ino]
        data_off, data = of.buf_off, of.buf
        of.buf = bytearray()
        of.buf_off = data_off + len(data)
        plan = of.content.prepare_write(data_off, data)
        if plan is None:
            return
        of.inflight_end = data_off + len(data)
        done = trio.Event()
        self.busy[ino] = done
        assert self.nursery is not None
        self.nursery.start_soon(self._spill, ino, of, plan, done)

    async def _spill(self, ino: int, of: Any, plan: Any, done: trio.Event) -> None:
        content = of.content  # if a failed batch replaces it meanwhile, the plan is void
        pieces = None
        locs: dict[bytes, bytes] = {}
        try:
            pieces, locs = await trio.to_thread.run_sync(
                _chunk_and_log, plan.buf, self.repo.store, limiter=self.cpu)
        except Exception:
            log.exception("background chunking of inode %d failed; retrying inline", ino)
        finally:
            # Runs on cancellation too (unmount): the buffer was detached from
            # the file, so it must be spliced in here or it would be lost.
            try:
                if of.content is content:
                    if pieces is None:
                        pieces = _chunk_all(plan.buf)
                    of.content.finish_write(plan, pieces)
                    of.locs.update(locs)
                    locs = {}
                    store = self.repo.store
                    held = sum(map(len, of.content.pending.values()))
                    if store.committing and held < PENDING_MAX:
                        # A commit is writing the previous batch: keep these
                        # chunks in memory (reads find them there) and let the
                        # next spill or the close store them, so chunking and
                        # the commit's disk I/O overlap instead of alternating.
                        pass
                    else:
                        with contextlib.suppress(trio.Cancelled):
                            await store.ready_async()
                        self.wt.store_pending(of)
                        store.commit_soon()
            except Exception as exc:
                log.error("background write of inode %d failed: %s", ino, exc)
                of.error = exc
            finally:
                if locs:  # the plan was void: nothing will name these
                    self.repo.store.log.discard(locs.values())
                of.inflight_end = 0
                self.busy.pop(ino, None)
                done.set()

    async def settle(self, ino: int) -> None:
        """Wait for background work on *ino*; re-raise its error once."""
        while (ev := self.busy.get(ino)) is not None:
            await ev.wait()
        of = self.wt.open_files.get(ino)
        if of is not None and of.error is not None:
            err, of.error = of.error, None
            raise err

    async def settle_all(self) -> None:
        for ino in list(self.busy):
            with contextlib.suppress(Exception):
                await self.settle(ino)

    @handler
    async def flush(self, fh: int) -> None:
        # close(): the file's data and everything before it is committed to
        # the store (it survives SIGKILL of this daemon).
        h = self.handles.get(fh)
        if h is not None and not h.snapshot and h.writable:
            await self.settle(h.ino)
            await self.repo.store.ready_async()
            self.wt.flush(h.ino)
            if not self.lazy_close and h.wrote:
                await self.repo.store.commit_async()
                self.poller.quiet()

    @handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        # fsync(): on disk, meta page included (it survives a power loss).
        h = self.handles.get(fh)
        if h is not None and not h.snapshot:
            await self.settle(h.ino)
            await self.repo.store.ready_async()
            self.wt.flush(h.ino)
        await self.repo.store.sync_async()
        self.poller.quiet()

    @handler
    async def release(self, fh: int) -> None:
        h = self.handles.pop(fh, None)
        if h is None:
            return
        if h.snapshot:
            n = self.snaps.get(h.ino)
            if n is not None:
                n.opens -= 1
                if n.opens <= 0:
                    n.content = None
                    if n.lookups <= 0:
                        del self.snaps[h.ino]
                        self.snap_index.pop((n.parent, n.entry.name), None)
            return
        with contextlib.suppress(Exception):
            await self.settle(h.ino)
        of = self.wt.release(h.ino)
        if h.wrote and of is not None and of.inode.nlink > 0:
            self._event("close_write", ino=h.ino, size=of.size)

    # ---------------------------------------------------------------- xattrs

    @handler
    async def setxattr(self, ino: int, name: bytes, value: bytes, ctx: Any) -> None:
        if ino < 1024 or ino >= SNAP_BASE or self.read_only:
            raise _erofs()
        if name.startswith(b"user.jiaozi."):
            raise pyfuse3.FUSEError(errno.EPERM)
        if not name.startswith(XATTR_NAMESPACES):
            # system.* (POSIX ACLs among them) and unknown namespaces: tools
            # such as cp -a fall back to chmod when ACLs are refused.
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        self.wt.setxattr(ino, name, value)
        self._event("attrib", ino=ino, xattr=os.fsdecode(name))

    @handler
    async def removexattr(self, ino: int, name: bytes, ctx: Any) -> None:
        if ino < 1024 or ino >= SNAP_BASE or self.read_only:
            raise _erofs()
        if not name.startswith(XATTR_NAMESPACES) and name not in self._xattrs(ino):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)  # as getxattr below
        self.wt.setxattr(ino, name, None)
        self._event("attrib", ino=ino, xattr=os.fsdecode(name))

    def _xattrs(self, ino: int) -> dict[bytes, bytes]:
        if ino >= SNAP_BASE:
            n = self.snaps[ino]
            out = dict(n.entry.xattrs)
            out[b"user.jiaozi.commit"] = n.commit.hex().encode()
            return out
        if ino < 1024:
            return {}
        node = self.wt.getattr(ino)  # an open file's is in memory: no store access
        out = dict(node.xattrs)
        # Only a directory can be a branch root.  The kernel asks for
        # security.capability before every write() to a file; looking up the
        # roots for it read the store, which blocked the FUSE thread whenever
        # a commit was in flight (0.7 s of a 1 GiB streaming write).
        branch = self.repo.branch_of_root(ino) if node.is_dir else None
        if branch is not None:  # the branch root: which branch, and its head right now
            out[b"user.jiaozi.branch"] = branch.encode()
            out[b"user.jiaozi.head"] = self.repo.head(branch).hex().encode()
        return out

    @handler
    async def getxattr(self, ino: int, name: bytes, ctx: Any) -> bytes:
        value = self._xattrs(ino).get(name)
        if value is None:
            if not name.startswith(XATTR_NAMESPACES):
                # system.* (POSIX ACLs) and unknown namespaces are refused by
                # setxattr: say "not supported" here too, as a local filesystem
                # without ACLs does. ls -l asks for system.posix_acl_access of every
                # entry; after this answer it stops asking for the whole mount
                # (coreutils remembers the device), where ENODATA cost one FUSE
                # round trip per entry. The kernel cannot cache it for us: without
                # FUSE_POSIX_ACL every inode is ACL_DONT_CACHE, and with it each
                # READDIRPLUS forgets the cached ACLs of the entries it returns.
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
            if name == b"security.selinux":
                # The mount has no SELinux labels of its own (a label set by
                # hand is still kept and returned).  ls -l asks for this one of
                # every entry too, and stops asking for the device after
                # "not supported", as for the ACLs above.
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @handler
    async def listxattr(self, ino: int, ctx: Any) -> list[bytes]:
        return list(self._xattrs(ino))

    # ----------------------------------------------------------------- statfs

    @handler
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.statfs_path)
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.f_bsize
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        s.f_bfree = st.f_bfree
        s.f_bavail = st.f_bavail
        s.f_files = st.f_files
        s.f_ffree = st.f_ffree
        s.f_favail = st.f_favail
        s.f_namemax = 255
        return s

    # ------------------------------------------------------------ invalidation

    def _on_reset(self, branch: str, root_ino: int, names: list[bytes]) -> None:
        """A worktree was replaced behind the kernel's back: remember what to drop."""
        self.pending_inval.append((root_ino, names))

    async def apply_invalidations(self) -> None:
        """Drop the kernel's cached entries and attributes of replaced worktrees.

        Called by the daemon after a control operation, never from inside a
        FUSE request (the kernel could wait on this very thread).
        """
        import trio

        while self.pending_inval:
            root_ino, names = self.pending_inval.pop()
            for name in names:
                try:
                    pyfuse3.invalidate_entry_async(root_ino, name, ignore_enoent=True)
                except (OSError, RuntimeError) as exc:
                    log.debug("invalidate_entry %s/%r: %s", root_ino, name, exc)
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, root_ino)
            except (OSError, RuntimeError) as exc:
                log.debug("invalidate_inode %s: %s", root_ino, exc)
