#!/usr/bin/env python3
"""The least one FUSE request costs through pyfuse3 + trio, next to what jiaozifuse pays.

Usage::

    .venv/bin/python scripts/bench/floor.py [--rounds 5] [--big-mib 256] [--files 2000]
        [--stats 20000] [--rand-reads 5000] [--creates 2000] [--count-ops 500]
        [--targets floor,floor-poll,jiaozifuse,jiaozifuse-nopoll] [--peers-json peers.json]
        [--json out.json]
        [--no-count] [--cpus LIST] [--quick]

Why: some per-request targets (a ``stat`` after a read, a cold random 4 KiB read, a
small file read or created) cannot be reached by *any* pyfuse3 filesystem on a given
machine, however little work it does, because the kernel round trip, libfuse, the
pyfuse3 binding and trio's scheduling already cost more. This script measures that
floor with an "empty" filesystem (``floor``) and runs the same workloads on
jiaozifuse, so that ``jz/floor`` says how much of jiaozifuse's cost is its own work,
and (with ``--peers-json``) what ratio to the best peer of scripts/bench/peers.py a
pyfuse3 filesystem could reach at best.

Targets:

``floor``
    This file run as ``floor.py --serve MOUNTPOINT``: a pyfuse3 filesystem answering
    from memory (a dict of inodes; files are byte strings), with jiaozifuse's mount
    options (``default_permissions``, no kernel writeback cache, ``max_tasks=16``),
    60 s entry/attribute timeouts as jiaozifuse's branch directories, negative lookups
    cached for 1 s as jiaozifuse's, ``keep_cache`` on open, ENODATA for every xattr.
    It starts with the read workloads' data (``big`` and ``sNNNNNN``) already in memory.
``floor-poll``
    The same server polling for the next request for 100 us after each reply, by the
    rules of jiaozifuse's ``poll.RequestPoller`` (a thread that sleeps between requests pays
    a wake-up per request; see below).
``jiaozifuse``
    ``jiaozifuse init`` (local repository, no remote) + ``jiaozifuse mount`` with its
    defaults (busy polling on); the same data is written through MNT/main in an
    untimed set-up, then the mount is remounted.
``jiaozifuse-nopoll``
    The same with ``mount --busy-poll-us 0``.

Workloads (microseconds per operation, median over interleaved rounds whose target
order alternates), in this order on one fresh mount per target and round:

``read4k``
    ``os.pread`` of 4 KiB at ``--rand-reads`` distinct random page-aligned offsets of
    the ``--big-mib`` file (POSIX_FADV_RANDOM: no readahead): one READ each.
``getattr``
    statx(2) with AT_STATX_FORCE_SYNC on that (now read) file ``--stats`` times: the
    GETATTR that a ``stat`` costs after a read (on a writable mount the kernel marks
    atime stale after any read that reached the daemon, so the next stat asks again).
``small_read``
    open / read(64 KiB) until EOF / close of each of ``--files`` 16 KiB files never
    opened in this mount: lookup, open, read, flush, release.
``small_create``
    open(O_CREAT|O_TRUNC) / write 16 KiB / close of ``--creates`` new files in a new
    directory. jiaozifuse's close() commits durably to its store; the floor's keeps
    the bytes in memory.

Where the daemon runs matters as much as what it does: on the 2-vCPU VM this was
written on, a request whose daemon thread wakes on the caller's CPU costs about half
of one that wakes on the other CPU (GETATTR ~25 us vs ~58 us for the floor). The
scheduler decides; the default run leaves it to decide (what a user gets), and
``--cpus 1`` pins this script and everything it starts (floor servers, the jiaozifuse
CLI and its daemon, which inherit the affinity) to show the other end.

"Cold" here is a remount (a restart for the floor) only: the host page cache is not
dropped, so jiaozifuse's repository may be served from memory. That is deliberate:
the figures are per-request costs, not disk costs (see the read4k ceiling below).

Requests per operation: unless ``--no-count``, an untimed counting pass (first, with
``--count-ops`` operations per workload) runs both targets with request counting on
(the floor's own counters; jiaozifuse's ``--metrics-addr`` Prometheus counters, which
cost a few microseconds per request and so are kept out of the timed rounds).

``--peers-json`` (the JSON of scripts/bench/peers.py --json) adds, for each workload
that bounds a peers.py figure, the best peer's rate and the best ratio a pyfuse3
filesystem can reach: floor rate / best peer rate. peers.py's random reads are cold
from disk, so for read4k the floor's rate is 1e6 / (floor us + native us), the native
target's cold random 4 KiB read in the same JSON standing for the disk's cost.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import math
import os
import random
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import common
from common import MiB, Stopwatch, log

SMALL_FILE = 16 * 1024
PAGE = 4096
BIG_NAME = "big"
CREATE_DIR = "created"
#: the -poll / -nopoll variants: the same server with busy polling after replies on / off
#: (jiaozifuse polls by default: ``mount --busy-poll-us``, jiaozifuse/poll.py)
ALL_TARGETS = ["floor", "floor-poll", "jiaozifuse", "jiaozifuse-nopoll"]
POLL_US = 100
PEER_NAMES = ["juicefs", "rclone", "s3fs"]  # as peers.py's PEER_NAMES

# statx(2): path relative to the cwd, bypass the attribute cache, basic stats.
AT_FDCWD = -100
AT_STATX_FORCE_SYNC = 0x2000
STATX_BASIC_STATS = 0x7FF

# As jiaozifuse/fs.py: BRANCH_TIMEOUT, NEG_TIMEOUT, BLKSIZE.
TIMEOUT = 60.0
NEG_TIMEOUT = 1.0
BLKSIZE = 128 * 1024


def small_name(i: int) -> str:
    return f"s{i:06d}"


def data_seed(seed: int, what: int) -> int:
    """Seeds of a round's data: 0 the big file, 1 the small files, 2 the created files
    (distinct, so that jiaozifuse cannot deduplicate the created files' chunks)."""
    return 4 * seed + what


# ======================================================================================
# The floor filesystem (--serve)
# ======================================================================================


class Node:
    """An inode: a file (``data``) or a directory (``children``: name -> inode)."""

    __slots__ = ("atime_ns", "children", "ctime_ns", "data", "ino", "mode", "mtime_ns",
                 "nlink")

    def __init__(self, ino: int, mode: int, data: bytes | bytearray = b"",
                 children: dict[bytes, int] | None = None) -> None:
        now = time.time_ns()
        self.ino, self.mode, self.data, self.children = ino, mode, data, children
        self.nlink = 2 if children is not None else 1
        self.atime_ns = self.mtime_ns = self.ctime_ns = now


def serve(args: argparse.Namespace) -> int:
    """Mount the floor filesystem at ``args.serve`` until unmounted or signalled."""
    import pyfuse3
    import trio
    from pyfuse3 import FUSEError

    class Floor(pyfuse3.Operations):
        """No work beyond answering from memory."""

        enable_writeback_cache = False  # as jiaozifuse's Ops

        def __init__(self) -> None:
            super().__init__()
            self.uid, self.gid = os.getuid(), os.getgid()
            self.nodes: dict[int, Node] = {}
            self.next_ino = pyfuse3.ROOT_INODE
            self.dirs: dict[int, list[tuple[bytes, int]]] = {}
            self.next_dh = 1
            self.root = self._new(stat.S_IFDIR | 0o755, children={})

        def _new(self, mode: int, data: bytes | bytearray = b"",
                 children: dict[bytes, int] | None = None) -> Node:
            node = Node(self.next_ino, mode, data, children)
            self.nodes[node.ino] = node
            self.next_ino += 1
            return node

        def add_file(self, parent: Node, name: bytes, data: bytes | bytearray,
                     mode: int = 0o644) -> Node:
            assert parent.children is not None
            node = self._new(stat.S_IFREG | mode, data)
            parent.children[name] = node.ino
            return node

        def _node(self, ino: int) -> Node:
            node = self.nodes.get(ino)
            if node is None:
                raise FUSEError(errno.ENOENT)
            return node

        def _dir(self, ino: int) -> Node:
            node = self._node(ino)
            if node.children is None:
                raise FUSEError(errno.ENOTDIR)
            return node

        def _attr(self, n: Node) -> Any:
            a = pyfuse3.EntryAttributes()
            a.st_ino = n.ino
            a.st_mode = n.mode
            a.st_nlink = n.nlink
            a.st_uid = self.uid
            a.st_gid = self.gid
            size = 4096 if n.children is not None else len(n.data)
            a.st_size = size
            a.st_blksize = BLKSIZE
            a.st_blocks = (size + 511) // 512
            a.st_atime_ns = n.atime_ns
            a.st_mtime_ns = n.mtime_ns
            a.st_ctime_ns = n.ctime_ns
            a.entry_timeout = a.attr_timeout = TIMEOUT
            return a

        async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> Any:
            ino = self._dir(parent).children.get(name)  # type: ignore[union-attr]
            if ino is None:  # a negative entry, cached by the kernel
                a = pyfuse3.EntryAttributes()
                a.st_ino = 0
                a.entry_timeout = NEG_TIMEOUT
                return a
            return self._attr(self.nodes[ino])

        async def forget(self, inode_list: list[tuple[int, int]]) -> None:
            for ino, _ in inode_list:  # evicted by the kernel: gone if unlinked
                node = self.nodes.get(ino)
                if node is not None and node.nlink == 0:
                    del self.nodes[ino]

        async def getattr(self, ino: int, ctx: Any = None) -> Any:
            return self._attr(self._node(ino))

        async def setattr(self, ino: int, attr: Any, fields: Any, fh: int | None,
                          ctx: Any) -> Any:
            n = self._node(ino)
            now = time.time_ns()
            if fields.update_size:
                if n.children is not None:
                    raise FUSEError(errno.EISDIR)
                size = attr.st_size
                data = n.data if isinstance(n.data, bytearray) else bytearray(n.data)
                if size < len(data):
                    del data[size:]
                else:
                    data.extend(bytes(size - len(data)))
                n.data = data
                n.mtime_ns = now
            if fields.update_mode:
                n.mode = stat.S_IFMT(n.mode) | (attr.st_mode & 0o7777)
            if fields.update_atime:
                n.atime_ns = attr.st_atime_ns
            if fields.update_mtime:
                n.mtime_ns = attr.st_mtime_ns
            n.ctime_ns = now
            return self._attr(n)

        async def open(self, ino: int, flags: int, ctx: Any) -> Any:
            n = self._node(ino)
            if flags & os.O_TRUNC and (flags & os.O_ACCMODE) != os.O_RDONLY:
                n.data = bytearray()
                n.mtime_ns = n.ctime_ns = time.time_ns()
            return pyfuse3.FileInfo(fh=ino, keep_cache=True)

        async def create(self, parent: int, name: bytes, mode: int, flags: int,
                         ctx: Any) -> tuple[Any, Any]:
            p = self._dir(parent)
            if name in p.children:  # type: ignore[operator]
                raise FUSEError(errno.EEXIST)
            n = self.add_file(p, name, bytearray(), mode & ~ctx.umask & 0o7777)
            p.mtime_ns = p.ctime_ns = n.ctime_ns
            return pyfuse3.FileInfo(fh=n.ino, keep_cache=True), self._attr(n)

        async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
            n = self.nodes.get(fh)
            if n is None:
                raise FUSEError(errno.EBADF)
            return n.data[off : off + size]

        async def write(self, fh: int, off: int, buf: bytes) -> int:
            n = self.nodes.get(fh)
            if n is None:
                raise FUSEError(errno.EBADF)
            data = n.data
            if not isinstance(data, bytearray):
                data = n.data = bytearray(data)
            if off > len(data):
                data.extend(bytes(off - len(data)))
            data[off : off + len(buf)] = buf
            n.mtime_ns = n.ctime_ns = time.time_ns()
            return len(buf)

        async def flush(self, fh: int) -> None:
            return None

        async def fsync(self, fh: int, datasync: bool) -> None:
            return None

        async def release(self, fh: int) -> None:
            return None

        async def getxattr(self, ino: int, name: bytes, ctx: Any) -> bytes:
            raise FUSEError(pyfuse3.ENOATTR)

        async def listxattr(self, ino: int, ctx: Any) -> list[bytes]:
            return []

        async def opendir(self, ino: int, ctx: Any) -> int:
            dh = self.next_dh
            self.next_dh += 1
            self.dirs[dh] = list(self._dir(ino).children.items())  # type: ignore[union-attr]
            return dh

        async def readdir(self, fh: int, start_id: int, token: Any) -> None:
            rows = self.dirs.get(fh, [])
            for i in range(start_id, len(rows)):
                name, ino = rows[i]
                node = self.nodes.get(ino)
                if node is None:
                    continue
                if not pyfuse3.readdir_reply(token, name, self._attr(node), i + 1):
                    return

        async def releasedir(self, fh: int) -> None:
            self.dirs.pop(fh, None)

        async def unlink(self, parent: int, name: bytes, ctx: Any) -> None:
            p = self._dir(parent)
            ino = p.children.get(name)  # type: ignore[union-attr]
            if ino is None:
                raise FUSEError(errno.ENOENT)
            n = self.nodes[ino]
            if n.children is not None:
                raise FUSEError(errno.EISDIR)
            del p.children[name]  # type: ignore[union-attr]
            n.nlink = 0  # kept until the kernel forgets it (it may still be open)
            p.mtime_ns = p.ctime_ns = n.ctime_ns = time.time_ns()

        async def mkdir(self, parent: int, name: bytes, mode: int, ctx: Any) -> Any:
            p = self._dir(parent)
            if name in p.children:  # type: ignore[operator]
                raise FUSEError(errno.EEXIST)
            n = self._new(stat.S_IFDIR | (mode & ~ctx.umask & 0o7777), children={})
            p.children[name] = n.ino  # type: ignore[index]
            p.nlink += 1
            p.mtime_ns = p.ctime_ns = n.ctime_ns
            return self._attr(n)

        async def rmdir(self, parent: int, name: bytes, ctx: Any) -> None:
            p = self._dir(parent)
            ino = p.children.get(name)  # type: ignore[union-attr]
            if ino is None:
                raise FUSEError(errno.ENOENT)
            n = self._dir(ino)
            if n.children:
                raise FUSEError(errno.ENOTEMPTY)
            del p.children[name]  # type: ignore[union-attr]
            p.nlink -= 1
            n.nlink = 0
            p.mtime_ns = p.ctime_ns = time.time_ns()

        async def statfs(self, ctx: Any) -> Any:
            s = pyfuse3.StatvfsData()
            s.f_bsize = s.f_frsize = 4096
            s.f_blocks = s.f_bfree = s.f_bavail = 1 << 24
            s.f_files = s.f_ffree = s.f_favail = 1 << 24
            s.f_namemax = 255
            return s

    # Until trio takes over the signals: SIGTERM/SIGHUP raise KeyboardInterrupt (so
    # the finally below unmounts), a SIGUSR1 that comes too early is dropped (the
    # driver sends it again).
    common.install_signal_handlers()
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    fs = Floor()
    with Stopwatch() as sw:
        big = common.make_data(args.big_mib * MiB, seed=data_seed(args.seed, 0))
        fs.add_file(fs.root, BIG_NAME.encode(), big)
        blob = common.make_data(args.files * SMALL_FILE, seed=data_seed(args.seed, 1))
        for i in range(args.files):
            fs.add_file(fs.root, small_name(i).encode(),
                        blob[i * SMALL_FILE : (i + 1) * SMALL_FILE])
        del blob
    print(f"floor: {args.big_mib} MiB + {args.files} files of 16 KiB in memory "
          f"({sw.seconds:.1f} s)", file=sys.stderr, flush=True)

    counts: dict[str, int] = {}
    if args.serve_count:
        _count_requests(fs, counts)
    poller = _poll_requests(fs, args.serve_poll_us / 1e6) if args.serve_poll_us else None
    stats_file = Path(args.stats_file) if args.stats_file else None

    async def main() -> None:
        async def signals(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            seq = 0
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                           signal.SIGUSR1) as it:
                task_status.started()
                async for signum in it:
                    if signum != signal.SIGUSR1:
                        nursery.cancel_scope.cancel()
                        return
                    if stats_file is not None:
                        seq += 1
                        tmp = stats_file.with_suffix(".tmp")
                        tmp.write_text(json.dumps({"seq": seq, "counts": counts}))
                        os.replace(tmp, stats_file)

        async with trio.open_nursery() as nursery:
            await nursery.start(signals)
            if poller is not None:
                nursery.start_soon(poller)
            await pyfuse3.main(min_tasks=1, max_tasks=16)  # as jiaozifuse's daemon
            nursery.cancel_scope.cancel()  # unmounted from outside

    options = set(pyfuse3.default_options)  # default_permissions, as jiaozifuse
    options |= {"fsname=floor", "subtype=floor"}
    pyfuse3.init(fs, args.serve, options)
    try:
        trio.run(main)
    finally:
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
    return 0


COUNTED_OPS = ["lookup", "forget", "getattr", "setattr", "open", "create", "read", "write",
               "flush", "fsync", "release", "getxattr", "listxattr", "opendir", "readdir",
               "releasedir", "unlink", "mkdir", "rmdir", "statfs"]


def _count_requests(fs: Any, counts: dict[str, int]) -> None:
    """Wrap each handler of ``fs`` (on the instance) to count its requests.

    Only with --serve-count: the extra coroutine frame is small but not nothing, so the timed
    rounds run without it.
    """
    for name in COUNTED_OPS:
        fn = getattr(fs, name)

        async def wrapper(*a: Any, _fn: Callable[..., Any] = fn, _name: str = name) -> Any:
            counts[_name] = counts.get(_name, 0) + 1
            return await _fn(*a)

        setattr(fs, name, wrapper)


def _poll_requests(fs: Any, window: float) -> Callable[[], Any]:
    """Busy polling by jiaozifuse's own rules (``jiaozifuse.poll.RequestPoller``, which
    its mount uses): wraps every handler of ``fs`` and returns the task to run."""
    from jiaozifuse.poll import RequestPoller

    poller = RequestPoller(window)
    for name in COUNTED_OPS:
        fn = getattr(fs, name)

        async def wrapper(*a: Any, _fn: Callable[..., Any] = fn) -> Any:
            poller.begin()
            try:
                return await _fn(*a)
            finally:
                poller.end()

        setattr(fs, name, wrapper)
    return poller.run


# ======================================================================================
# The driver
# ======================================================================================


@dataclass(frozen=True)
class Params:
    big_mib: int
    files: int
    stats: int
    rand_reads: int
    creates: int
    seed: int


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    peers: tuple[str, ...]  # the peers.py figures it bounds
    unit: str  # of those figures


WORKLOADS = [
    Workload("read4k", "read4k: random 4 KiB pread, never read", ("rand_read_4k_cold",),
             "ops/s"),
    Workload("getattr", "getattr: statx FORCE_SYNC", ("files_stat",), "files/s"),
    Workload("small_read", "small read: open/read/close 16 KiB", ("files_read_cold",),
             "files/s"),
    Workload("small_create", "small create: open/write/close 16 KiB",
             ("files_create", "files_create_close"), "files/s"),
]


@dataclass
class RoundData:
    big: bytes
    small: bytes
    create: bytes

    @classmethod
    def make(cls, p: Params) -> RoundData:
        return cls(common.make_data(p.big_mib * MiB, data_seed(p.seed, 0)),
                   common.make_data(p.files * SMALL_FILE, data_seed(p.seed, 1)),
                   common.make_data(p.creates * SMALL_FILE, data_seed(p.seed, 2)))


class FloorTarget(common.Target):
    """``floor.py --serve`` started by us, stopped by PID (SIGTERM: it unmounts)."""

    name = "floor"
    is_fuse = True

    def __init__(self, res: common.Resources, poll_us: int = 0) -> None:
        super().__init__(res)
        self.poll_us = poll_us
        self.name = "floor-poll" if poll_us else "floor"
        self.params: Params | None = None
        self.count = False
        self.proc: subprocess.Popen[Any] | None = None
        self.mnt = Path()
        self.stats_file = Path()
        self.seq = 0

    def setup(self, root: Path) -> Path:
        self.root = root
        self.mnt = root / "mnt"
        self.mnt.mkdir(parents=True)
        self.stats_file = root / "stats.json"
        self._start()
        return self.mnt

    def _start(self) -> None:
        assert self.root is not None and self.params is not None
        p = self.params
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve", str(self.mnt),
                "--big-mib", str(p.big_mib), "--files", str(p.files), "--seed", str(p.seed)]
        if self.count:
            argv += ["--serve-count", "--stats-file", str(self.stats_file)]
        if self.poll_us:
            argv += ["--serve-poll-us", str(self.poll_us)]
        self.seq = 0
        self.proc = self.res.spawn(argv, log_path=self.root / "floor.log")
        self.res.add_mount(self.mnt)
        try:
            common.wait_for_mount(self.mnt, timeout=120, proc=self.proc)
        except RuntimeError as exc:
            tail = (self.root / "floor.log").read_text(errors="replace").strip()
            raise RuntimeError(f"{exc}: {tail[-500:]}") from None

    def _stop(self) -> None:
        if self.proc is not None:
            self.res.stop(self.proc)  # SIGTERM: pyfuse3.close(unmount=True)
            self.proc = None
        self.res.release_mount(self.mnt)  # in case it did not

    def make_cold(self) -> None:
        """A restart: the kernel drops the mount's pages, dentries and inodes."""
        self._stop()
        self._start()

    def counts(self) -> dict[str, float]:
        """The server's request counters so far (SIGUSR1: it writes them out)."""
        assert self.proc is not None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            self.proc.send_signal(signal.SIGUSR1)
            until = time.monotonic() + 0.5
            while time.monotonic() < until:
                with contextlib.suppress(OSError, ValueError):
                    got = json.loads(self.stats_file.read_text())
                    if got["seq"] > self.seq:
                        self.seq = got["seq"]
                        return {k: float(v) for k, v in got["counts"].items()}
                time.sleep(0.01)
        raise RuntimeError("the floor server did not write its request counts")

    def teardown(self) -> None:
        if self.root is not None:
            self._stop()
        super().teardown()


class JzTarget(common.JiaozifuseTarget):
    """common.JiaozifuseTarget made cold by a remount only (no drop_caches), with
    ``--metrics-addr`` on a free port when counting, and the daemon's PID taken from
    the mount's marker file (its command line names the mountpoint only in JSON)."""

    def __init__(self, res: common.Resources, exe: str | None, poll: bool = True) -> None:
        super().__init__(res, exe=exe)
        self.count = False
        self.metrics_addr = ""
        self.poll = poll
        self.name = "jiaozifuse" if poll else "jiaozifuse-nopoll"

    def _mount(self) -> None:
        self.mount_args = [] if self.poll else ["--busy-poll-us", "0"]
        if self.count:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.metrics_addr = f"127.0.0.1:{s.getsockname()[1]}"
            self.mount_args += ["--metrics-addr", self.metrics_addr]
        super()._mount()
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            info = json.loads((self.mnt / ".jiaozifuse-mount").read_text())
            pid = int(info["pid"])
            if pid not in self.pids and common.pid_alive(pid):
                self.pids.append(pid)
                self.res.add_daemon(pid)

    def make_cold(self) -> None:
        self._unmount()
        self._mount()

    def counts(self) -> dict[str, float]:
        prefix = "jiaozifuse_fuse_requests_total{"
        with urllib.request.urlopen(f"http://{self.metrics_addr}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(prefix) and 'op="' in line:
                op = line.split('op="', 1)[1].split('"', 1)[0]
                out[op] = out.get(op, 0.0) + float(line.rsplit(None, 1)[1])
        return out


# --- workloads -------------------------------------------------------------------------
# Each returns microseconds per operation; data checks happen after the clock stops.


def w_read4k(path: Path, p: Params, big: bytes) -> float:
    pages = len(big) // PAGE
    rng = random.Random(p.seed)
    offsets = [i * PAGE for i in rng.sample(range(pages), min(p.rand_reads, pages))]
    got: list[bytes] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        pread, append = os.pread, got.append
        with Stopwatch() as sw:
            for off in offsets:
                append(pread(fd, PAGE, off))
    finally:
        os.close(fd)
    for off, data in zip(offsets, got, strict=True):
        if data != big[off : off + PAGE]:
            raise RuntimeError(f"read4k: wrong data at offset {off} of {path}")
    return sw.seconds * 1e6 / len(offsets)


def w_getattr(path: Path, n: int) -> float:
    libc = ctypes.CDLL(None, use_errno=True)
    statx = libc.statx
    statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint,
                      ctypes.c_void_p]
    statx.restype = ctypes.c_int
    buf = ctypes.create_string_buffer(256)  # struct statx
    bpath = os.fsencode(path)
    flags, mask = AT_STATX_FORCE_SYNC, STATX_BASIC_STATS
    with Stopwatch() as sw:
        for _ in range(n):
            if statx(AT_FDCWD, bpath, flags, mask, buf):
                err = ctypes.get_errno()
                raise OSError(err, f"statx {path}: {os.strerror(err)}")
    return sw.seconds * 1e6 / n


def w_small_read(d: Path, p: Params, small: bytes) -> float:
    names = [str(d / small_name(i)) for i in range(p.files)]
    total = 0
    first = b""
    with Stopwatch() as sw:
        for name in names:
            fd = os.open(name, os.O_RDONLY)
            try:
                while n := len(chunk := os.read(fd, 65536)):
                    total += n
                    if not first:
                        first = chunk
            finally:
                os.close(fd)
    if total != len(small) or first != small[:SMALL_FILE]:
        raise RuntimeError(f"small read: {total} bytes, expected {len(small)} "
                           f"(first file {'ok' if first == small[:SMALL_FILE] else 'wrong'})")
    return sw.seconds * 1e6 / len(names)


def w_small_create(d: Path, p: Params, blob: bytes) -> float:
    top = d / CREATE_DIR
    top.mkdir()
    names = [str(top / f"c{i:06d}") for i in range(p.creates)]
    view = memoryview(blob)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    with Stopwatch() as sw:
        for i, name in enumerate(names):
            fd = os.open(name, flags, 0o644)
            try:
                if os.write(fd, view[i * SMALL_FILE : (i + 1) * SMALL_FILE]) != SMALL_FILE:
                    raise RuntimeError(f"short write to {name}")
            finally:
                os.close(fd)
    return sw.seconds * 1e6 / len(names)


def check_created(d: Path, p: Params, blob: bytes) -> None:
    """Read back the first and last created file (after the counts were taken)."""
    for i in {0, p.creates - 1}:
        got = (d / CREATE_DIR / f"c{i:06d}").read_bytes()
        if got != blob[i * SMALL_FILE : (i + 1) * SMALL_FILE]:
            raise RuntimeError(f"small create: c{i:06d} reads back wrong")


def populate(d: Path, data: RoundData) -> None:
    """jiaozifuse's untimed set-up: the floor's data, written through the mount."""
    view = memoryview(data.big)
    fd = os.open(d / BIG_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, len(view), MiB):
            chunk = view[off : off + MiB]
            done = 0
            while done < len(chunk):
                done += os.write(fd, chunk[done:])
    finally:
        os.close(fd)
    view = memoryview(data.small)
    for i in range(len(view) // SMALL_FILE):
        fd = os.open(d / small_name(i), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, view[i * SMALL_FILE : (i + 1) * SMALL_FILE])
        finally:
            os.close(fd)


def ops_of(key: str, p: Params) -> int:
    return {"read4k": min(p.rand_reads, p.big_mib * MiB // PAGE), "getattr": p.stats,
            "small_read": p.files, "small_create": p.creates}[key]


def run_target(t: FloorTarget | JzTarget, root: Path, p: Params, data: RoundData,
               count: bool) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Set up ``t``, make it cold, run every workload; us/op and requests/op."""
    t.count = count
    if isinstance(t, FloorTarget):
        t.params = p
    with Stopwatch() as sw:
        d = t.setup(root)
        if isinstance(t, JzTarget):
            populate(d, data)
        t.make_cold()
    log(f"  {t.name}: set up and {'restarted' if t.name == 'floor' else 'remounted'} "
        f"in {sw.seconds:.1f} s")
    fns: dict[str, Callable[[], float]] = {
        "read4k": lambda: w_read4k(d / BIG_NAME, p, data.big),
        "getattr": lambda: w_getattr(d / BIG_NAME, p.stats),
        "small_read": lambda: w_small_read(d, p, data.small),
        "small_create": lambda: w_small_create(d, p, data.create),
    }
    counter = t.counts if count else None
    us: dict[str, float] = {}
    per_op: dict[str, dict[str, float]] = {}
    for w in WORKLOADS:
        before = counter() if counter else {}
        us[w.key] = fns[w.key]()
        if counter:
            after = counter()
            n = ops_of(w.key, p)
            per_op[w.key] = {op: (v - before.get(op, 0.0)) / n for op, v in after.items()
                             if v != before.get(op, 0.0)}
        if w.key == "small_create":
            check_created(d, p, data.create)
        log(f"  {t.name} {w.key}: {us[w.key]:.1f} us/op"
            + (f"  requests/op {fmt_counts(per_op[w.key])}" if counter else ""))
    return us, per_op


def fmt_counts(c: dict[str, float]) -> str:
    return " ".join(f"{op}={v:.2f}" for op, v in sorted(c.items(), key=lambda kv: -kv[1]))


def make_targets(args: argparse.Namespace,
                 res: common.Resources) -> list[FloorTarget | JzTarget]:
    out: list[FloorTarget | JzTarget] = []
    for name in args.targets:
        if name.startswith("floor"):
            out.append(FloorTarget(res, POLL_US if name == "floor-poll" else 0))
        else:
            out.append(JzTarget(res, args.jiaozifuse, poll=name == "jiaozifuse"))
    return out


def run(args: argparse.Namespace, res: common.Resources, workdir: Path,
        results: dict[str, Any]) -> None:
    targets = make_targets(args, res)
    samples: dict[str, dict[str, list[float]]] = results["samples"]
    for t in targets:
        samples[t.name] = {w.key: [] for w in WORKLOADS}
    base = Params(args.big_mib, args.files, args.stats, args.rand_reads, args.creates,
                  args.seed)
    passes: list[tuple[str, Params, bool]] = []
    if args.count:
        c = args.count_ops
        passes.append(("count", replace(base, files=min(base.files, c),
                                        stats=min(base.stats, c),
                                        rand_reads=min(base.rand_reads, c),
                                        creates=min(base.creates, c), seed=args.seed + 1000),
                       True))
    passes += [(f"round {r + 1}/{args.rounds}", replace(base, seed=args.seed + r), False)
               for r in range(args.rounds)]

    for i, (label, p, count) in enumerate(passes):
        log(f"{label}{' (counting requests, untimed)' if count else ''}: generating data "
            f"(load {os.getloadavg()[0]:.2f})")
        data = RoundData.make(p)
        order = targets if i % 2 == 0 else targets[::-1]
        for t in order:
            if t.name in results["skipped"]:
                continue
            root = workdir / f"p{i}-{t.name}"
            root.mkdir()
            log(f"{label}: {t.name}")
            try:
                us, per_op = run_target(t, root, p, data, count)
                if count:
                    results["counts"][t.name] = per_op
                    results["count_pass_us"][t.name] = us
                else:
                    for key, value in us.items():
                        samples[t.name][key].append(value)
            except common.TargetUnavailable as exc:
                results["skipped"][t.name] = str(exc)
                print(f"SKIPPED {t.name}: {exc}", flush=True)
            except Exception as exc:  # one failing target must not lose the other's figures
                msg = f"{type(exc).__name__}: {exc}"
                results["errors"].append({"pass": label, "target": t.name, "error": msg,
                                          "traceback": traceback.format_exc()})
                print(f"ERROR {t.name} {label}: {msg}", flush=True)
            finally:
                try:
                    t.teardown()
                except Exception as exc:
                    log(f"teardown of {t.name} failed: {exc}")
        del data


# --- output ----------------------------------------------------------------------------


def main_table(results: dict[str, Any], args: argparse.Namespace) -> str:
    samples = results["samples"]
    present = [t for t in args.targets if any(samples.get(t, {}).values())]
    medians = {t: {w.key: common.median(samples[t][w.key]) for w in WORKLOADS}
               for t in present}
    results["medians"] = medians
    if not present:
        return "(no results)"
    p = Params(args.big_mib, args.files, args.stats, args.rand_reads, args.creates, 0)
    headers = ["workload", "ops", *(f"{t} us/op" for t in present)]
    # each jiaozifuse variant against the floor that polls (or not) as it does
    pairs = [(a, b) for a, b in (("jiaozifuse", "floor-poll"), ("jiaozifuse-nopoll", "floor"))
             if a in present and b in present]
    headers += [f"{a}/{b}" for a, b in pairs]
    spread = any(len(samples[t][w.key]) > 1 for t in present for w in WORKLOADS)
    if spread:  # the scheduler's placement of the daemon makes rounds differ a lot
        headers += [f"{t} min-max" for t in present]
    rows = []
    for w in WORKLOADS:
        row = [w.label, f"{ops_of(w.key, p):,}",
               *(common.fmt_num(medians[t][w.key]) for t in present)]
        for a, b in pairs:
            row.append(common.fmt_ratio(medians[a][w.key], medians[b][w.key]))
        for t in present if spread else []:
            vals = [v for v in samples[t][w.key] if math.isfinite(v)]
            row.append(f"{common.fmt_num(min(vals))}-{common.fmt_num(max(vals))}"
                       if vals else "-")
        rows.append(row)
    return common.format_table(headers, rows)


def counts_table(results: dict[str, Any], args: argparse.Namespace) -> str:
    counts = results["counts"]
    present = [t for t in args.targets if t in counts]
    if not present:
        return ""
    rows = []
    for w in WORKLOADS:
        ops = sorted({op for t in present for op in counts[t].get(w.key, {})},
                     key=lambda op: -max(counts[t].get(w.key, {}).get(op, 0.0)
                                         for t in present))
        for op in ops:
            rows.append([w.key, op, *(f"{counts[t].get(w.key, {}).get(op, 0.0):.2f}"
                                      for t in present)])
        rows.append([w.key, "(total)", *(f"{sum(counts[t].get(w.key, {}).values()):.2f}"
                                         for t in present)])
    return common.format_table(["workload", "request", *present], rows, left_columns=2)


def peers_compare(peers: dict[str, Any], floor_us: dict[str, float]) -> list[dict[str, Any]]:
    """For each peers.py figure a workload bounds: the floor's rate, the best peer's,
    and their ratio (the best jz/best a pyfuse3 filesystem can reach)."""
    med = peers.get("medians", {})
    out = []
    for w in WORKLOADS:
        us = floor_us.get(w.key, math.nan)
        for fig in w.peers:
            rates = {t: med.get(t, {}).get(fig) for t in PEER_NAMES}
            finite = [(v, t) for t, v in rates.items()
                      if isinstance(v, int | float) and math.isfinite(v)]
            best_rate, best = max(finite) if finite else (math.nan, "-")
            disk_us = math.nan
            floor_rate = 1e6 / us if us > 0 else math.nan
            if w.key == "read4k":
                native = med.get("native", {}).get(fig)
                disk_us = 1e6 / native if native else math.nan
                floor_rate = 1e6 / (us + disk_us) if math.isfinite(disk_us) else math.nan
            jz = med.get("jiaozifuse", {}).get(fig)
            jz = jz if isinstance(jz, int | float) else math.nan
            out.append({"workload": w.key, "figure": fig, "unit": w.unit, "floor_us": us,
                        "disk_us": disk_us, "floor_rate": floor_rate, "best_peer": best,
                        "best_rate": best_rate,
                        "ceiling": floor_rate / best_rate if best_rate else math.nan,
                        "peers_jz_rate": jz,
                        "peers_jz_ratio": jz / best_rate if best_rate else math.nan})
    return out


def peers_table(rows: list[dict[str, Any]]) -> str:
    headers = ["workload", "peers figure", "unit", "floor rate", "best peer", "its rate",
               "ceiling", "jz/best (peers run)"]
    out = []
    for r in rows:
        rate = common.fmt_num(r["floor_rate"])
        if r["workload"] == "read4k":
            rate += "*"
        ceiling = r["ceiling"]
        out.append([r["workload"], r["figure"], r["unit"], rate, r["best_peer"],
                    common.fmt_num(r["best_rate"]),
                    f"{ceiling:.2f}x" if math.isfinite(ceiling) else "-",
                    common.fmt_ratio(r["peers_jz_rate"], r["best_rate"])])
    return common.format_table(headers, out, left_columns=3)


def git_state() -> str:
    """HEAD, and whether jiaozifuse/ (installed editable: what runs) differs from it."""
    try:
        head = subprocess.run(["git", "-C", str(common.REPO_ROOT), "rev-parse", "--short",
                               "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(common.REPO_ROOT), "status", "--porcelain",
                                "--", "jiaozifuse"], capture_output=True, text=True,
                               check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = len(dirty.stdout.splitlines())
    return head.stdout.strip() + (f" (+ {changed} uncommitted file(s) under jiaozifuse/)"
                                  if changed else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--targets", default=",".join(ALL_TARGETS),
                    help=f"comma-separated, of: {', '.join(ALL_TARGETS)}")
    ap.add_argument("--rounds", type=int, help="interleaved timed rounds (default 5)")
    ap.add_argument("--big-mib", type=int, help="size of the big file (default 256)")
    ap.add_argument("--files", type=int, help="16 KiB files to read (default 2000)")
    ap.add_argument("--stats", type=int, help="statx calls (default 20000)")
    ap.add_argument("--rand-reads", type=int, help="random 4 KiB reads (default 5000)")
    ap.add_argument("--creates", type=int, help="16 KiB files to create (default 2000)")
    ap.add_argument("--count-ops", type=int,
                    help="operations per workload in the counting pass (default 500)")
    ap.add_argument("--no-count", dest="count", action="store_false",
                    help="skip the (untimed) pass that counts FUSE requests per operation")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round, 64 MiB, 500 files, 5000 statx, 1000 reads, "
                         "500 creates, 200 counted (unless given explicitly)")
    ap.add_argument("--peers-json", type=Path,
                    help="JSON of scripts/bench/peers.py --json: add the ceiling table")
    ap.add_argument("--json", type=Path, help="write samples, medians, counts here")
    ap.add_argument("--workdir", type=Path,
                    help="where targets keep their data (default: a new temp dir, removed)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jiaozifuse", help="path of the jiaozifuse executable")
    ap.add_argument("--cpus", help="pin this script and all it starts to these CPUs "
                                   "(comma-separated numbers; default: no pinning)")
    ap.add_argument("--serve", metavar="MOUNTPOINT",
                    help="internal: run the floor filesystem at MOUNTPOINT")
    ap.add_argument("--serve-poll-us", type=int, default=0,
                    help="internal (--serve): busy polling window after each reply")
    ap.add_argument("--serve-count", action="store_true",
                    help="internal (--serve): count requests")
    ap.add_argument("--stats-file", help="internal (--serve): where SIGUSR1 writes counts")
    args = ap.parse_args(argv)
    quick = {"rounds": 1, "big_mib": 64, "files": 500, "stats": 5000, "rand_reads": 1000,
             "creates": 500, "count_ops": 200}
    full = {"rounds": 5, "big_mib": 256, "files": 2000, "stats": 20000, "rand_reads": 5000,
            "creates": 2000, "count_ops": 500}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.serve:
        return args
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in args.targets:
        if t not in ALL_TARGETS:
            ap.error(f"unknown target {t!r}")
    if min(args.rounds, args.big_mib, args.files, args.stats, args.rand_reads,
           args.creates, args.count_ops) < 1:
        ap.error("counts and sizes must be positive")
    if args.peers_json is not None and not args.peers_json.is_file():
        ap.error(f"no such file: {args.peers_json}")
    if args.cpus:
        try:
            args.cpus = sorted({int(c) for c in args.cpus.split(",") if c.strip()})
        except ValueError:
            ap.error(f"--cpus: not a list of CPU numbers: {args.cpus!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve(args)
    common.install_signal_handlers()
    if args.cpus:
        os.sched_setaffinity(0, args.cpus)  # inherited by every process started below
    affinity = sorted(os.sched_getaffinity(0))
    cmd = ".venv/bin/python scripts/bench/floor.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    commit = git_state()
    parent = args.workdir
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="jzbench-floor-", dir=parent))
    results: dict[str, Any] = {
        "command": cmd, "commit": commit,
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": common.environment(), "samples": {}, "counts": {},
        "count_pass_us": {}, "errors": [], "skipped": {}, "affinity": affinity,
        "workloads": [asdict(w) for w in WORKLOADS],
    }
    log(f"workdir {workdir}")
    with Stopwatch() as total:
        rc = common.run_in_workdir(lambda res: run(args, res, workdir, results), workdir,
                                   "interrupted; mounts and processes cleaned up")
    results["seconds"] = total.seconds
    table = main_table(results, args)
    notes = [
        f"big file {args.big_mib} MiB, {args.files} files to read, {args.creates} to "
        f"create, {args.rounds} round(s) (median), {total.seconds / 60:.1f} min, "
        f"load {os.getloadavg()[0]:.2f}, "
        + (f"pinned to CPU(s) {','.join(map(str, affinity))}" if args.cpus else
           f"not pinned ({len(affinity)} CPUs: the scheduler places caller and daemon)"),
        "cold = remount (floor: restart) only; the host page cache is not dropped, so "
        "jiaozifuse's repository may be read from memory: per-request costs, not disk",
        "small create: jiaozifuse's close() commits durably to its store; the floor's "
        "keeps the bytes in memory",
    ]
    print()
    print(f"command: {cmd}")
    print(f"commit:  {commit}")
    print(table)
    print("\n".join(notes))
    if results["counts"]:
        print("\nFUSE requests per operation (untimed counting pass, "
              f"{args.count_ops} ops per workload; async RELEASE/FORGET may lag):")
        print(counts_table(results, args))
    # the ceilings take the faster floor, polling or not, workload by workload
    floors = [results.get("medians", {}).get(t, {}) for t in ("floor", "floor-poll")]
    floor_us = {k: min(f[k] for f in floors if k in f and math.isfinite(f[k]))
                for k in set().union(*floors)
                if any(k in f and math.isfinite(f[k]) for f in floors)}
    if args.peers_json is not None and floor_us:
        peers = json.loads(args.peers_json.read_text())
        rows = peers_compare(peers, floor_us)
        results["peers"] = {"file": str(args.peers_json), "rows": rows,
                            "commit": peers.get("environment", {}).get("git_commit")}
        print(f"\nBest ratio to the best peer a pyfuse3 filesystem can reach ({args.peers_json}"
              f", peers run at {str(results['peers']['commit'])[:7]}):")
        print(peers_table(rows))
        print("ceiling = floor rate / best peer rate (rates in the peers figure's unit).\n"
              "* read4k: peers' random reads are cold from disk, so the floor's rate is "
              "1e6/(floor us + native us), native us = 1e6/native rand_read_4k_cold "
              f"({common.fmt_num(rows[0]['disk_us'])} us) in the same JSON.\n"
              "The other floor rates are from memory: upper bounds, the disk left out.")
    for name, why in results["skipped"].items():
        print(f"skipped {name}: {why}")
    for e in results["errors"]:
        print(f"error {e['target']} {e['pass']}: {e['error']}")
    return common.finish(results, args.json, rc)


if __name__ == "__main__":
    sys.exit(main())
