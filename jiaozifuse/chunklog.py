"""The chunk log: chunk bytes of large writes in append-only segment files.

Why not LMDB: every byte put into LMDB is first copied into a dirty page
that LMDB allocates (64 KiB chunks are overflow runs of 16 pages), then
written with pwrite, and the B-tree's free-page bookkeeping grows with the
data.  Streaming a 1 GiB file cost the commit thread 2 to 3 s of kernel
time per GiB that way, twice what writing the same bytes to a file costs.
Here a chunk costs one pwritev into the page cache, done by the thread that
cut and hashed it, and LMDB keeps only a 16-byte locator per chunk (the
``chunkloc`` database, see store.py).

Layout: ``<store>/log/NNNNNNNN.seg``, each up to :data:`SEGMENT_BYTES`.  A
locator is (segment, offset, length).  Space is only ever appended; a chunk
that is deleted (eviction, gc) has its range punched out of the file
(``FALLOC_FL_PUNCH_HOLE``), which frees the disk blocks without moving
anything, so a locator never comes to mean other bytes.

Durability (the store relies on this order): a chunk's locator is put in
an LMDB transaction only after its bytes were written here, and the store
calls :meth:`ChunkLog.sync` (fdatasync of every segment written since the
last sync) before it commits a transaction holding new locators.  A crash
can therefore leave bytes nobody indexes at the end of a segment (wasted
space, which local gc gives back with :meth:`ChunkLog.trim`), never an
index entry without its bytes.

Several processes may open one store (LMDB allows it).  Each appends only
to a segment it has claimed with an exclusive ``flock``, held while the log
is open (full ones included), so two writers never share a segment; a
segment whose writer is gone is claimed again by the next writer, which
appends after its end.

Concurrency: :meth:`append` and :meth:`read` may be called from any thread
at once (a lock guards only the reservation of a range; the I/O runs
outside it).  A punched range must not be read by someone who looked up
its locator before the deletion was committed: readers hold a
:meth:`reading` guard from the lookup to the end of the read, and
:meth:`free` punches a range only once every guard older than the
deletion has been released.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import struct
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import Corrupt, JiaoziError, StoreFull

#: A segment is closed and a new one begun once it would grow past this.
SEGMENT_BYTES = 1 << 30
#: pwritev takes at most this many buffers at once (IOV_MAX)
_IOV_MAX = 1024
_LOC = struct.Struct("<IQI")
LOC_LEN = _LOC.size

#: The largest folio the page cache keeps file data in (a PMD: 2 MiB on x86-64)
FOLIO_ALIGN = 2 << 20

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def pack_loc(seg: int, off: int, length: int) -> bytes:
    return _LOC.pack(seg, off, length)


def unpack_loc(loc: bytes | memoryview) -> tuple[int, int, int]:
    return _LOC.unpack(loc)


class ChunkLog:
    """Append-only segment files holding chunk bytes (see the module docstring)."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}
        self._dirty: set[int] = set()
        #: the segment this process appends to (claimed on first append) and its end
        self._seg = 0
        self._pos = 0
        # reader guards and the ranges waiting for them (see reading / free)
        self._epoch = 0
        self._readers: Counter[int] = Counter()
        self._freed: list[tuple[int, bytes]] = []

    # -------------------------------------------------------------- files

    def _file(self, seg: int) -> Path:
        return self.path / f"{seg:08d}.seg"

    def _fd(self, seg: int) -> int:
        fd = self._fds.get(seg)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(seg)
            if fd is None:
                flags = os.O_RDONLY if self.readonly else os.O_RDWR
                try:
                    fd = os.open(self._file(seg), flags | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise Corrupt(f"chunk log segment {self._file(seg)} is missing") from None
                self._fds[seg] = fd
        return fd

    def _claim_locked(self, need: int) -> None:
        """Take a segment to append to: the newest one nobody holds, if it has
        room, else a new one.  Called with the lock held."""
        # A full segment stays locked while this log is open: the current
        # batch may still name ranges in it that trim() must not cut.
        self.path.mkdir(parents=True, exist_ok=True)
        segs = sorted(int(p.stem) for p in self.path.glob("*.seg"))
        if segs and segs[-1] != self._seg:
            seg = segs[-1]
            fd = self._fds.get(seg)
            if fd is None:
                fd = os.open(self._file(seg), os.O_RDWR | os.O_CLOEXEC)
                self._fds[seg] = fd
            size = os.fstat(fd).st_size
            if size + need <= SEGMENT_BYTES or size == 0:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self._seg, self._pos = seg, os.fstat(fd).st_size
                    return
                except BlockingIOError:
                    pass  # another process appends to it
        seg = max(segs[-1] if segs else 0, self._seg) + 1
        while True:
            try:
                fd = os.open(self._file(seg), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600)
                break
            except FileExistsError:
                seg += 1
        fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else can hold it
        self._fds[seg] = fd
        self._seg, self._pos = seg, 0

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    # -------------------------------------------------------------- writing

    def _reserve(self, n: int, durable: bool = True) -> tuple[int, int]:
        with self._lock:
            if not self._seg or (self._pos and self._pos + n > SEGMENT_BYTES):
                self._claim_locked(n)
            seg, off = self._seg, self._pos
            self._pos += n
            if durable:
                self._dirty.add(seg)
            return seg, off

    def append(self, chunks: Iterable[tuple[bytes, bytes | memoryview]],
               durable: bool = True) -> dict[bytes, bytes]:
        """Write *chunks* (id, bytes) one after another; return id -> locator.

        Any thread.  The bytes are in the page cache when this returns, and
        durable after the next :meth:`sync`.  With ``durable=False`` (chunks
        fetched from the remote: a cache) the next sync need not flush them:
        after a power loss such a chunk may read back wrong, which the first
        read of every chunk after a restart detects (its blake3 id is checked)
        and answers by fetching it again.
        """
        items = [(cid, data) for cid, data in chunks if len(data)]
        if not items:
            return {}
        total = sum(len(d) for _, d in items)
        if self.readonly:
            raise JiaoziError(f"the chunk log at {self.path} is open read-only", errno.EROFS)
        seg, off = self._reserve(total, durable)
        fd = self._fd(seg)
        locs: dict[bytes, bytes] = {}
        pos = off
        try:
            for i in range(0, len(items), _IOV_MAX):
                group = items[i : i + _IOV_MAX]
                bufs = [d for _, d in group]
                want = sum(len(b) for b in bufs)
                done = os.pwritev(fd, bufs, pos)
                if done != want:  # only a full disk writes short to a regular file
                    raise OSError(errno.ENOSPC, "short write")
                for cid, d in group:
                    locs[cid] = pack_loc(seg, pos, len(d))
                    pos += len(d)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left for the chunk log at {self.path}") from None
            raise JiaoziError(f"writing the chunk log at {self.path}: {exc}", errno.EIO) from None
        return locs

    def sync(self) -> None:
        """fdatasync every segment written since the last sync."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        try:
            for seg in sorted(dirty):
                os.fdatasync(self._fd(seg))
        except OSError as exc:
            with self._lock:
                self._dirty |= dirty
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"no space left for the chunk log at {self.path}") from None
            raise JiaoziError(f"syncing the chunk log at {self.path}: {exc}", errno.EIO) from None

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    # -------------------------------------------------------------- reading

    def read(self, loc: bytes | memoryview) -> bytes:
        seg, off, length = unpack_loc(loc)
        try:
            data = os.pread(self._fd(seg), length, off)
        except OSError as exc:
            raise JiaoziError(f"reading the chunk log at {self.path}: {exc}", errno.EIO) from None
        if len(data) != length:
            raise Corrupt(f"chunk log segment {seg} is shorter than its index says "
                          f"({off}+{length})")
        return data

    def read_into(self, seg: int, off: int, view: memoryview) -> None:
        """Fill *view* with the log's bytes at *off* of segment *seg*.

        The read path's form of :meth:`read`: the bytes go straight into the
        caller's reply buffer, with no intermediate bytes object to copy
        from (a cold or warm read through the mount copies each byte once
        here, once more into /dev/fuse, and nowhere else).
        """
        try:
            got = os.preadv(self._fd(seg), [view], off)
        except OSError as exc:
            raise JiaoziError(f"reading the chunk log at {self.path}: {exc}", errno.EIO) from None
        if got != len(view):
            raise Corrupt(f"chunk log segment {seg} is shorter than its index says "
                          f"({off}+{len(view)})")

    def willneed(self, locs: Iterable[bytes]) -> int:
        """Start reading these ranges into the page cache (posix_fadvise WILLNEED)."""
        total = 0
        for fd, lo, hi in self._spans(locs):
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)
            total += hi - lo
        return total

    def _spans(self, locs: Iterable[bytes], gap: int = 1 << 16) -> Iterator[tuple[int, int, int]]:
        """(fd, start, end) of the ranges *locs* name, merged per segment when
        less than *gap* apart (see :func:`coalesce`); missing segments skipped."""
        spans: dict[int, list[tuple[int, int]]] = {}
        for loc in locs:
            seg, off, length = unpack_loc(loc)
            spans.setdefault(seg, []).append((off, off + length))
        for seg, ranges in spans.items():
            try:
                fd = self._fd(seg)
            except JiaoziError:
                continue
            for lo, hi in coalesce(ranges, gap):
                yield fd, lo, hi

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold while a locator looked up in a transaction may still be read."""
        with self._lock:
            epoch = self._epoch
            self._readers[epoch] += 1
        try:
            yield
        finally:
            with self._lock:
                self._readers[epoch] -= 1
                if not self._readers[epoch]:
                    del self._readers[epoch]
                ready = self._ready_locked() if self._freed else []
            self._punch(ready)

    # -------------------------------------------------------------- page cache

    def drop_cached(self, locs: Iterable[bytes]) -> int:
        """Write these ranges to disk and drop them from the page cache; bytes dropped.

        Any thread; for the ranges :class:`DropBehind` picks.  The range is
        written out first (``sync_file_range``), because the kernel drops
        only clean pages; nothing is lost either way, the bytes stay in the
        file.  Each range is widened down to a :data:`FOLIO_ALIGN` boundary:
        the page cache keeps file data in folios of up to 2 MiB, and
        ``POSIX_FADV_DONTNEED`` leaves alone a folio that reaches past the
        range (a test that dropped 1 MiB fetches found whole ones still
        cached).  The folio a range ends in is dropped with the next one.
        """
        total = 0
        for fd, lo, hi in self._spans(locs):
            lo -= lo % FOLIO_ALIGN
            try:
                sync_range(fd, lo, hi - lo)
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            except OSError:
                continue  # advice only: the pages stay cached
            total += hi - lo
        return total

    # -------------------------------------------------------------- freeing

    def free(self, locs: Iterable[bytes]) -> None:
        """Give back ranges whose locators were deleted in a committed transaction."""
        locs = list(locs)
        if not locs:
            return
        with self._lock:
            for loc in locs:
                self._freed.append((self._epoch, loc))
            self._epoch += 1
            ready = self._ready_locked()
        self._punch(ready)

    def discard(self, locs: Iterable[bytes]) -> None:
        """Punch ranges no transaction ever named (a chunk stored twice by a race)."""
        self._punch(list(locs))

    def _ready_locked(self) -> list[bytes]:
        oldest = min(self._readers) if self._readers else self._epoch
        ready = [loc for e, loc in self._freed if e < oldest]
        if ready:
            self._freed = [(e, loc) for e, loc in self._freed if e >= oldest]
        return ready

    def _punch(self, locs: list[bytes]) -> None:
        # Ranges that touch are punched as one: a hole frees only the blocks
        # it covers whole, so chunk by chunk would keep every block two
        # chunks share (about one block per chunk).  Ranges with anything
        # between them stay apart: the bytes between may be named.
        spans: dict[int, list[tuple[int, int]]] = {}
        for loc in locs:
            seg, off, length = unpack_loc(loc)
            spans.setdefault(seg, []).append((off, off + length))
        for seg, ranges in spans.items():
            for lo, hi in coalesce(ranges, gap=0):
                try:
                    _punch_hole(self._fd(seg), lo, hi - lo)
                except (OSError, JiaoziError):
                    pass  # only space is lost; the range is named by nothing

    def trim(self, ends: dict[int, int]) -> int:
        """Cut unnamed tails off segments nobody appends to; return bytes cut.

        *ends* maps a segment to the end of the last range any committed
        locator names in it (segments absent: nothing named).  What lies
        beyond was appended by a writer that died before committing (or
        discarded): no locator can name it.  A segment some process holds
        (its writer, this process's included) is left alone, and the lock
        taken here keeps a new writer out while it is cut.
        """
        if self.readonly or not self.path.is_dir():
            return 0
        cut = 0
        for p in sorted(self.path.glob("*.seg")):
            seg = int(p.stem)
            with self._lock:
                if seg == self._seg:
                    continue  # ours
            try:
                fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer's
                size = os.fstat(fd).st_size
                end = ends.get(seg, 0)
                if size > end:
                    os.ftruncate(fd, end)
                    cut += size - end
            finally:
                os.close(fd)  # releases the lock
        return cut

    def disk_usage(self) -> int:
        """Bytes of disk the segments occupy (holes excluded)."""
        total = 0
        for p in self.path.glob("*.seg") if self.path.is_dir() else []:
            total += p.stat().st_blocks * 512
        return total


class DropBehind:
    """Which ranges of fetched chunks to drop from the page cache: all but the
    last *keep* bytes fetched.

    Why: a cold read through the mount writes every fetched byte to the log
    and reads it back once, while the kernel keeps its own copy in the
    mount's page cache (the one a second read is served from).  Keeping the
    log's copy as well means new page-cache pages for every byte fetched,
    and new pages are what costs: on the machine these figures come from (a
    VM whose balloon driver hands freed memory back to the host at once),
    writing 1 GiB into a file's new page-cache pages took 2.2 s of kernel
    time, and 0.27 s when each 16 MiB was written out and dropped 64 MiB
    behind, so that the same pages came back (scripts/bench/pagecache.py;
    docs/performance.md, "Remote").  Dropping the log's copy once the
    reader is past it (*keep* is twice the readahead window) turns the
    fetch into that second case.  A later read of a dropped chunk reads it
    from the disk, as after any restart.

    Thread: the trio thread only.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._held: deque[tuple[bytes, int]] = deque()
        self._bytes = 0

    def add(self, locs: Iterable[bytes]) -> list[bytes]:
        """Note ranges just fetched; return the oldest ones now beyond *keep*."""
        for loc in locs:
            n = unpack_loc(loc)[2]
            self._held.append((loc, n))
            self._bytes += n
        out: list[bytes] = []
        while self._bytes > self.keep and self._held:
            loc, n = self._held.popleft()
            self._bytes -= n
            out.append(loc)
        return out


@functools.cache
def _libc(name: str, *argtypes: type) -> Any:
    """A libc function Python's os module lacks, returning 0 or -1 with errno."""
    fn = getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), name)
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


def _check(ret: int) -> None:
    if ret != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def sync_range(fd: int, off: int, length: int) -> None:
    """sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER): the range is on disk
    (not its metadata: this is no durability barrier, only a way to get clean
    pages the kernel may drop)."""
    fn = _libc("sync_file_range", ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong,
               ctypes.c_uint)
    _check(fn(fd, off, length, 1 | 2 | 4))


def _punch_hole(fd: int, off: int, length: int) -> None:
    fn = _libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong)
    _check(fn(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length))


def coalesce(spans: list[tuple[int, int]], gap: int = 1 << 16) -> list[tuple[int, int]]:
    """Merge (start, end) spans less than *gap* apart (for readahead advice)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if out and lo - out[-1][1] <= gap:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out
