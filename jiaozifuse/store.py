"""The local store: one LMDB environment per repository.

Named databases (a key's first bytes say which record it is):

``meta``      format version, counters (stored bytes), configuration
``chunks``    chunk id -> bytes (small files' chunks, and every chunk of format 1)
``chunkloc``  chunk id -> where the chunk log holds it (large writes, fetched
              chunks: see chunklog.py); a chunk is in one of the two
``objects``   object id -> encoded object (manifests, trees, commits)
``refs``      ``b"branch/NAME"`` / ``b"tag/NAME"`` -> commit id
``inodes``    worktree inode number -> inode record (see worktree.py)
``dirents``   parent inode + name -> child inode number + listing sequence
``dirseq``    parent inode + listing sequence -> name (stable readdir offsets)
``orphans``   inode number of an unlinked inode still held open
``upload``    the S3 upload queue: sequence number -> chunk, object or ref update
``located``   chunk/object id -> where the remote holds it (pack, offset, length)
``access``    chunk id -> last read (coarse clock), for least-recently-used eviction
``events``    reserved for the event log

Concurrency and durability rules (the rest of the code relies on them):

* LMDB allows one write transaction at a time per environment, across
  processes.  A write transaction is short: callers gather their work
  (chunking, hashing, encoding) before opening it.  Never hold one across an
  ``await``.
* The environment is opened with ``sync=True, metasync=False``: a committed
  write transaction has its data pages on disk (one fdatasync), so it
  survives SIGKILL; a power loss can at worst undo the very last commit, and
  never leaves the store inconsistent.  The daemon groups its transactions
  into batches (:meth:`Store.begin_batch`) committed on close-after-write,
  fsync and a short timer, so the cost of a durable commit (0.4 to 3 ms on
  a shared disk) is paid per close, not per FUSE request.
* In the daemon the batch is begun and committed by one dedicated thread
  (:meth:`Store.use_commit_thread`): LMDB's writer mutex belongs to the
  thread that locked it, so a batch must be committed by the thread that
  began it, and that thread must not be the trio thread or every commit's
  pwrite + fdatasync (tens of ms for a 16 MiB spill) would stall all FUSE
  requests.  The trio thread does its nested transactions inside the batch
  as before.  While a commit is in flight there is no batch: the trio
  thread's next :meth:`read`/:meth:`write` waits for it (blocking), so
  code that can wait asynchronously calls :meth:`commit_async` or
  :meth:`ready_async` first.  FUSE requests that need no store access
  (buffered writes, reads of write buffers) go on during a commit.
* Read transactions see a consistent snapshot and never block writers.
* A full disk or full map surfaces as :class:`StoreFull`; LMDB aborts the
  transaction, so nothing half-written remains.
* Chunk log (chunklog.py): a transaction that puts locators is committed
  only after :meth:`ChunkLog.sync`, so a committed locator always names
  durable bytes.  Ranges of deleted chunks are punched out only after the
  deletion is committed and every read transaction older than it has ended
  (each read transaction holds a :meth:`ChunkLog.reading` guard).
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb

from .chunklog import ChunkLog, coalesce, pack_loc, unpack_loc
from .errors import Corrupt, FormatError, JiaoziError, StoreFull
from .filecontent import Span

#: 2: chunks may live in the chunk log (``chunkloc``), which format-1 readers miss
FORMAT_VERSION = 2
DBS = (
    "meta", "chunks", "objects", "refs", "inodes", "dirents", "dirseq", "orphans", "upload",
    "events", "located", "access", "chunkloc",
)
MAP_SIZE = 1 << 40  # address space only; the file grows as data arrives

log = logging.getLogger(__name__)

_U64 = struct.Struct("<Q")
#: refs shared through the remote (worktree roots, ``wt/``, stay local)
SHARED_REFS = (b"branch/", b"tag/")


def u64(n: int) -> bytes:
    return _U64.pack(n)


def from_u64(b: bytes) -> int:
    return _U64.unpack(b)[0]


def _be64(n: int) -> bytes:
    return n.to_bytes(8, "big")


#: The most one read of the chunk log takes (Txn.get_chunks, Txn.read_into).
RUN_MAX = 8 << 20


def _runs(ranges: list[tuple[int, int, int, int, int]]
          ) -> list[tuple[int, int, int, int, list[int]]]:
    """Group log ranges ``(key, seg, lo, hi, dst)`` that follow each other both
    in one segment and at their destination into runs of at most RUN_MAX
    bytes, one read each: ``(seg, lo, hi, dst, positions in ranges)``."""
    runs: list[list] = []
    for k, (_, seg, lo, hi, dst) in enumerate(ranges):
        r = runs[-1] if runs else None
        if r is not None and r[0] == seg and r[2] == lo and r[3] + (lo - r[1]) == dst \
                and hi - r[1] <= RUN_MAX:
            r[2] = hi
            r[4].append(k)
        else:
            runs.append([seg, lo, hi, dst, [k]])
    return [(seg, lo, hi, dst, members) for seg, lo, hi, dst, members in runs]


class Txn:
    """A transaction handle that knows the named databases."""

    __slots__ = ("_dbs", "_new_chunk_bytes", "freed", "log", "queue", "txn")

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, lmdb._Database],
                 queue: bool = False, log: ChunkLog | None = None) -> None:
        self.txn = txn
        self._dbs = dbs
        self._new_chunk_bytes = 0
        self.log = log
        #: locators of log chunks deleted in this transaction (freed once committed)
        self.freed: list[bytes] = []
        #: the repository has a remote: new chunks, objects and ref changes
        #: are queued for upload in the same transaction that stores them,
        #: so a crash can never lose queued work.
        self.queue = queue

    # generic access
    def get(self, db: str, key: bytes) -> bytes | None:
        return self.txn.get(key, db=self._dbs[db])

    def put(self, db: str, key: bytes, value: bytes, overwrite: bool = True) -> bool:
        done = self.txn.put(key, value, db=self._dbs[db], overwrite=overwrite)
        if db == "refs" and self.queue and done and key.startswith(SHARED_REFS):
            self.enqueue(b"R\1" + value + key)
        return done

    def delete(self, db: str, key: bytes) -> bool:
        done = self.txn.delete(key, db=self._dbs[db])
        if db == "refs" and self.queue and done and key.startswith(SHARED_REFS):
            self.enqueue(b"R\0" + bytes(32) + key)
        return done

    def enqueue(self, entry: bytes) -> None:
        seq = self.add_counter("upload_seq", 1)
        self.txn.put(_be64(seq), entry, db=self._dbs["upload"])

    def is_located(self, oid: bytes) -> bool:
        return self.txn.cursor(db=self._dbs["located"]).set_key(oid)

    def cursor(self, db: str) -> lmdb.Cursor:
        return self.txn.cursor(db=self._dbs[db])

    def prefix(self, db: str, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        cur = self.cursor(db)
        if not cur.set_range(prefix):
            return
        for k, v in cur:
            if not k.startswith(prefix):
                break
            yield k, v

    # content
    def get_chunk(self, cid: bytes) -> bytes | None:
        data = self.txn.get(cid, db=self._dbs["chunks"])
        if data is None and self.log is not None:
            loc = self.chunk_loc(cid)
            if loc is not None:
                return self.log.read(loc)
        return data

    def get_chunks(self, ids: list[bytes]) -> list[bytes | None]:
        """Several chunks at once: one lookup each, one pread per run of
        chunks that lie end to end in the log (a file written or fetched
        sequentially), instead of one per chunk."""
        out: list[bytes | None] = [None] * len(ids)
        ranges: list[tuple[int, int, int, int, int]] = []
        chunks_db = self._dbs["chunks"]
        for i, cid in enumerate(ids):
            data = self.txn.get(cid, db=chunks_db)
            if data is not None:
                out[i] = data
                continue
            loc = self.chunk_loc(cid)
            if loc is None or self.log is None:
                continue
            seg, off, n = unpack_loc(loc)
            ranges.append((i, seg, off, off + n, off))
        for seg, lo, hi, _, members in _runs(ranges):
            whole = self.log.read(pack_loc(seg, lo, hi - lo))
            if len(members) == 1:
                out[members[0]] = whole
                continue
            view = memoryview(whole)
            for i, _, off, end, _ in (ranges[k] for k in members):
                out[i] = bytes(view[off - lo : end - lo])
        return out

    def read_into(self, spans: list[Span], out: memoryview,
                  fresh: dict[bytes, bytes] | None = None) -> list[bool]:
        """Copy parts of stored chunks into *out*; which spans were filled.

        Each span ``(id, length, lo, hi, dst)`` asks for bytes ``lo:hi`` of
        the chunk *id* (of *length* bytes) at ``out[dst:]``.  Spans whose
        bytes lie end to end in the chunk log and in *out* (a file written
        or fetched sequentially, read sequentially) are read with one
        preadv straight into *out*.  A span is left unfilled when the chunk
        is not stored here (or *fresh*, locators of a commit in flight,
        does not name it) or is stored with another length: the caller
        takes its slow path, with its checks and errors, for those.
        """
        done = [False] * len(spans)
        ranges: list[tuple[int, int, int, int, int]] = []
        chunks_db = self._dbs["chunks"]
        for i, (cid, n, lo, hi, dst) in enumerate(spans):
            data = self.txn.get(cid, db=chunks_db)
            if data is not None:
                if len(data) == n:
                    out[dst : dst + hi - lo] = memoryview(data)[lo:hi]
                    done[i] = True
                continue
            loc = self.chunk_loc(cid)
            if loc is None and fresh:
                loc = fresh.get(cid)
            if loc is None or self.log is None:
                continue
            seg, off, m = unpack_loc(loc)
            if m == n:
                ranges.append((i, seg, off + lo, off + hi, dst))
        for seg, lo, hi, dst, members in _runs(ranges):
            self.log.read_into(seg, lo, out[dst : dst + hi - lo])
            for k in members:
                done[ranges[k][0]] = True
        return done

    def chunk_loc(self, cid: bytes) -> bytes | None:
        """The chunk log locator of a chunk, None if it is not in the log."""
        db = self._dbs.get("chunkloc")
        return None if db is None else self.txn.get(cid, db=db)

    def has_chunk(self, cid: bytes) -> bool:
        cur = self.txn.cursor(db=self._dbs["chunks"])
        if cur.set_key(cid):
            return True
        return self.chunk_loc(cid) is not None

    def chunk_len(self, cid: bytes) -> int | None:
        loc = self.chunk_loc(cid)
        if loc is not None:
            return unpack_loc(loc)[2]
        data = self.txn.get(cid, db=self._dbs["chunks"])
        return None if data is None else len(data)

    def put_chunk(self, cid: bytes, data: bytes | memoryview) -> bool:
        """Store a chunk unless present; return True if it was new."""
        if self.chunk_loc(cid) is not None:
            return False
        added = self.txn.put(cid, data, db=self._dbs["chunks"], overwrite=False)
        if added:
            self._new_chunk_bytes += len(data)
            if self.queue and not self.is_located(cid):
                self.enqueue(b"C" + cid)
        return added

    def put_chunk_at(self, cid: bytes, loc: bytes) -> bool:
        """Record a chunk already written to the chunk log; True if it was new.

        When it was not new, the caller gives the range back
        (:meth:`ChunkLog.discard`): nothing names it.
        """
        if self.txn.cursor(db=self._dbs["chunks"]).set_key(cid):
            return False
        added = self.txn.put(cid, loc, db=self._dbs["chunkloc"], overwrite=False)
        if added:
            self._new_chunk_bytes += unpack_loc(loc)[2]
            if self.queue and not self.is_located(cid):
                self.enqueue(b"C" + cid)
        return added

    def delete_chunk(self, cid: bytes) -> int:
        """Delete a chunk wherever it is; return its length (0 if absent).

        Does not touch the ``chunk_bytes`` counter: callers sum what they free.
        """
        data = self.txn.get(cid, db=self._dbs["chunks"])
        if data is not None:
            self.txn.delete(cid, db=self._dbs["chunks"])
            return len(data)
        loc = self.chunk_loc(cid)
        if loc is not None:
            self.txn.delete(cid, db=self._dbs["chunkloc"])
            self.freed.append(bytes(loc))
            return unpack_loc(loc)[2]
        return 0

    def iter_chunks(self) -> Iterator[tuple[bytes, int]]:
        """(id, length) of every stored chunk, inline ones first."""
        for k, v in self.txn.cursor(db=self._dbs["chunks"]):
            yield bytes(k), len(v)
        if "chunkloc" in self._dbs:
            for k, v in self.txn.cursor(db=self._dbs["chunkloc"]):
                yield bytes(k), unpack_loc(v)[2]

    def iter_chunk_data(self) -> Iterator[tuple[bytes, bytes]]:
        """(id, bytes) of every stored chunk (reads the log: for fsck)."""
        for k, v in self.txn.cursor(db=self._dbs["chunks"]):
            yield bytes(k), bytes(v)
        if self.log is not None and "chunkloc" in self._dbs:
            for k, v in self.txn.cursor(db=self._dbs["chunkloc"]):
                yield bytes(k), self.log.read(v)

    def log_ends(self) -> dict[int, int]:
        """Per chunk-log segment, the end of the last range a locator names."""
        ends: dict[int, int] = {}
        if "chunkloc" in self._dbs:
            for _, v in self.txn.cursor(db=self._dbs["chunkloc"]):
                seg, off, n = unpack_loc(v)
                if off + n > ends.get(seg, 0):
                    ends[seg] = off + n
        return ends

    def count_chunks(self) -> int:
        return sum(self.txn.stat(self._dbs[db])["entries"] for db in ("chunks", "chunkloc")
                   if db in self._dbs)

    def get_object(self, oid: bytes) -> bytes | None:
        return self.txn.get(oid, db=self._dbs["objects"])

    def put_object(self, oid: bytes, data: bytes) -> bool:
        added = self.txn.put(oid, data, db=self._dbs["objects"], overwrite=False)
        if added and self.queue and not self.is_located(oid):
            self.enqueue(b"O" + oid)
        return added

    # counters
    def counter(self, name: str) -> int:
        v = self.get("meta", b"counter/" + name.encode())
        return from_u64(v) if v else 0

    def set_counter(self, name: str, value: int) -> None:
        self.put("meta", b"counter/" + name.encode(), u64(value))

    def add_counter(self, name: str, delta: int) -> int:
        n = self.counter(name) + delta
        self.put("meta", b"counter/" + name.encode(), u64(n))
        return n


class Store:
    """An open LMDB environment with the repository's named databases."""

    def __init__(self, path: Path, env: lmdb.Environment, readonly: bool = False) -> None:
        self.path = path
        self.env = env
        self.dbs = {name: env.open_db(name.encode()) for name in DBS if name != "chunkloc"}
        try:
            self.dbs["chunkloc"] = env.open_db(b"chunkloc", create=not readonly)
        except lmdb.NotFoundError:
            # A read-only open of a format-1 store, which has no such table
            # and cannot get one: Txn treats a missing table as empty.
            pass
        self.log = ChunkLog(path / "log", readonly=readonly)
        #: locators freed by nested transactions of the current batch / of the commit in flight
        self._batch_freed: list[bytes] = []
        self._inflight_freed: list[bytes] = []
        self._batch: lmdb.Transaction | None = None
        self.batch_dirty = False
        #: called (from the writing thread) when a write makes a clean batch
        #: dirty: the daemon's group commit sleeps until then (see daemon.py)
        self.on_dirty: Callable[[], None] | None = None
        #: set when the repository has a remote (see Txn.queue)
        self.queue_uploads = False
        self.refs = 1
        _OPEN[path.resolve()] = self
        #: successful batch commits so far: a batch is identified by this number
        self.commits = 0
        #: called with the error when a batch commit fails (its work is lost)
        self.failure_hooks: list[Callable[[Exception], None]] = []
        #: the thread that begins and commits batches (daemon), see use_commit_thread
        self._committer: concurrent.futures.ThreadPoolExecutor | None = None
        #: remote copies found for chunks whose located pack is gone (any thread
        #: adds; whoever owns the store records them: writeback.record_moved)
        self.moved: dict[bytes, bytes] = {}
        #: fetched chunks stored in the current batch / in the batch being committed
        self._fresh_batch: dict[bytes, bytes] = {}
        self._fresh_inflight: dict[bytes, bytes] = {}
        #: a batch commit running in the commit thread: (new batch, error)
        self._inflight: concurrent.futures.Future[
            tuple[lmdb.Transaction | None, Exception | None]] | None = None

    @classmethod
    def create(cls, path: Path) -> Store:
        path.mkdir(parents=True, exist_ok=True)
        store = cls._open_env(path, create=True)
        with store.write() as w:
            if w.get("meta", b"format") is not None:
                raise JiaoziError(f"{path} already holds a store")
            w.put("meta", b"format", str(FORMAT_VERSION).encode())
        return store

    @classmethod
    def open(cls, path: Path, readonly: bool = False) -> Store:
        if not (path / "data.mdb").exists():
            raise JiaoziError(f"no store at {path}")
        shared = _OPEN.get(path.resolve())
        if shared is not None:
            # LMDB allows one environment per file per process: share it.
            shared.refs += 1
            return shared
        store = cls._open_env(path, create=False, readonly=readonly)
        with store.read() as r:
            raw = r.get("meta", b"format")
        try:
            version = int(raw or b"")
        except ValueError:
            store.close()
            raise FormatError(f"store at {path} has no readable format version") from None
        if version > FORMAT_VERSION:
            store.close()
            raise FormatError(
                f"store at {path} has format {version}; this jiaozifuse reads up to "
                f"{FORMAT_VERSION}: upgrade jiaozifuse"
            )
        return store

    @classmethod
    def _open_env(cls, path: Path, create: bool, readonly: bool = False) -> Store:
        try:
            env = lmdb.open(
                str(path),
                map_size=MAP_SIZE,
                max_dbs=len(DBS) + 2,
                max_readers=256,
                readonly=readonly,
                create=create,
                sync=True,
                # One fdatasync per commit instead of two: a power loss can
                # undo the last commit but never corrupts (data pages are
                # synced before the meta page that points at them is written).
                metasync=False,
                # Chunks are read sequentially far more often than randomly.
                readahead=True,
                max_spare_txns=8,
            )
        except lmdb.Error as exc:
            raise _translate(exc, path) from None
        store = cls(path, env, readonly=readonly)
        if not readonly and not create:
            with store.read() as r:
                old = r.get("meta", b"format")
            if old == b"1":  # format 1 stores only lack the chunk log: upgrade in place
                with store.write() as w:
                    w.put("meta", b"format", str(FORMAT_VERSION).encode())
        return store

    def close(self) -> None:
        self.refs -= 1
        if self.refs > 0:
            return
        _OPEN.pop(self.path.resolve(), None)
        self.end_batch()
        if self._committer is not None:
            self._committer.shutdown()
            self._committer = None
        self.log.close()
        self.env.close()

    @contextmanager
    def read(self) -> Iterator[Txn]:
        """A read transaction; inside a batch, the batch itself (it sees its own writes)."""
        self._settle()
        if self._batch is not None:
            yield Txn(self._batch, self.dbs, self.queue_uploads, self.log)
            return
        with self.log.reading(), self.env.begin(buffers=False) as txn:
            yield Txn(txn, self.dbs, self.queue_uploads, self.log)

    def get_chunk(self, cid: bytes) -> bytes | None:
        """A chunk's bytes, without waiting for a commit in flight if it can.

        Chunks are content-addressed, so the committed state cannot hold a
        stale version of one: while the commit thread writes a batch, a
        chunk found in a read transaction of the committed state is the
        right answer, and only a miss (the chunk may be in that batch) has
        to wait for the commit.  Cold reads from the remote rely on this:
        every 50 ms the group commit writes the fetched chunks, and the
        reads of chunks fetched earlier go on meanwhile.
        """
        return self.get_chunks([cid])[0]

    def get_chunks(self, ids: list[bytes]) -> list[bytes | None]:
        """:meth:`get_chunk` of several ids, in one transaction (see Txn.get_chunks)."""
        if self._inflight is None:
            with self.read() as r:
                return r.get_chunks(ids)
        # A commit in flight: the committed state and the fresh locators
        # answer without waiting for it; only the misses wait (read() settles).
        fresh = self._fresh_inflight
        with self.snapshot() as r:
            out = r.get_chunks(ids)
            for i, cid in enumerate(ids):
                if out[i] is None and cid in fresh:
                    out[i] = self.log.read(fresh[cid])
        misses = [i for i, d in enumerate(out) if d is None]
        if misses:
            with self.read() as r:
                for i, data in zip(misses, r.get_chunks([ids[i] for i in misses]), strict=True):
                    out[i] = data
        return out

    def read_into(self, spans: list[Span], out: memoryview) -> list[bool]:
        """:meth:`Txn.read_into` with :meth:`get_chunks`' rule for a commit in
        flight: the committed state and the fresh locators answer first,
        only what they miss waits for the commit."""
        if self._inflight is None:
            with self.read() as r:
                return r.read_into(spans, out)
        with self.snapshot() as r:
            done = r.read_into(spans, out, self._fresh_inflight)
        misses = [i for i, ok in enumerate(done) if not ok]
        if misses:
            with self.read() as r:
                again = r.read_into([spans[i] for i in misses], out)
            for i, ok in zip(misses, again, strict=True):
                done[i] = ok
        return done

    def note_fresh(self, locs: dict[bytes, bytes]) -> None:
        """Chunks just put in the batch that readers will want soon (fetched ones).

        Their locators are kept in memory until their batch is committed, so
        that a read of one while that commit runs needs neither the batch nor
        the commit (see :meth:`get_chunk`).  The log never reuses a range, and
        nothing deletes a chunk before the batch that stored it is committed.
        """
        if self._committer is not None:
            self._fresh_batch.update(locs)

    def has_chunks(self, ids: list[bytes]) -> list[bool]:
        """Which of *ids* are stored; like :meth:`get_chunk`, waits only on a miss."""
        if self._inflight is not None:
            with self.snapshot() as r:
                found = [r.has_chunk(c) for c in ids]
            found = [f or c in self._fresh_inflight for f, c in zip(found, ids, strict=True)]
            if all(found):
                return found
        with self.read() as r:
            return [r.has_chunk(c) for c in ids]

    def append_chunks(self, pieces: list[tuple[bytes, bytes | memoryview]],
                      durable: bool = True) -> dict[bytes, bytes]:
        """Write the chunks not yet stored to the chunk log; return id -> locator.

        Any thread (the chunking thread of a large write, a fetch thread): the
        bytes are copied once, into the page cache, off the trio thread.  The
        caller records them with :meth:`Txn.put_chunk_at` in a transaction that
        the next commit makes durable together with the log.  A chunk found in
        the committed state is skipped (dedup); one stored meanwhile by someone
        else is found by ``put_chunk_at``, whose caller discards the range.
        ``durable=False`` is for copies of remote data (see :meth:`ChunkLog.append`).
        """
        fresh: dict[bytes, bytes | memoryview] = {}
        with self.snapshot() as r:
            for cid, data in pieces:
                if cid not in fresh and not r.has_chunk(cid):
                    fresh[cid] = data
        return self.log.append(fresh.items(), durable)

    @contextmanager
    def snapshot(self, buffers: bool = False) -> Iterator[Txn]:
        """A read transaction of the committed state, usable from any thread.

        With *buffers*, values are memoryviews into the map (no copy), valid
        only inside the transaction.
        """
        with self.log.reading(), self.env.begin(buffers=buffers) as txn:
            yield Txn(txn, self.dbs, log=self.log)

    @contextmanager
    def write(self) -> Iterator[Txn]:
        """An atomic write transaction.

        Outside a batch it is committed durably on exit.  Inside a batch (see
        :meth:`begin_batch`) it is a nested transaction of the batch: atomic
        on its own (an error undoes exactly this operation), durable when the
        batch is committed.
        """
        self._settle()
        try:
            if self._batch is not None:
                txn = self.env.begin(write=True, parent=self._batch)
            else:
                txn = self.env.begin(write=True)
        except lmdb.Error as exc:
            raise _translate(exc, self.path) from None
        t = Txn(txn, self.dbs, self.queue_uploads, self.log)
        nested = self._batch is not None
        try:
            yield t
            if t._new_chunk_bytes:
                t.add_counter("chunk_bytes", t._new_chunk_bytes)
            if not nested and self.log.dirty:
                self.log.sync()  # locators committed below must name durable bytes
            txn.commit()
        except lmdb.Error as exc:
            txn.abort()
            raise _translate(exc, self.path) from None
        except BaseException:
            txn.abort()
            raise
        if nested:
            was, self.batch_dirty = self.batch_dirty, True
            if not was and self.on_dirty is not None:
                self.on_dirty()
            self._batch_freed.extend(t.freed)
        else:
            self.log.free(t.freed)

    def use_commit_thread(self) -> None:
        """Begin and commit batches in a dedicated thread from now on (the daemon).

        See the module docstring: the commit's I/O then runs beside the trio
        thread instead of on it.  Call before :meth:`begin_batch`.
        """
        assert self._batch is None and self._committer is None
        self._committer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="lmdb-commit")

    @property
    def committing(self) -> bool:
        """A batch commit is running in the commit thread (the store waits for it)."""
        return self._inflight is not None

    def in_batch(self) -> bool:
        return self._batch is not None or self._inflight is not None

    def _begin(self) -> lmdb.Transaction:
        try:
            return self.env.begin(write=True)
        except lmdb.Error as exc:
            raise _translate(exc, self.path) from None

    def begin_batch(self) -> None:
        """Group later write transactions into one, committed by :meth:`commit_batch`.

        This is the daemon's group commit: one durable LMDB commit (about a
        millisecond here) per close, fsync or timer tick, instead of one per
        FUSE request.  The batch holds LMDB's writer lock: only the thread
        that began it (or, with a commit thread, the thread that uses it)
        may use the store until :meth:`end_batch`.
        """
        self._settle()
        if self._batch is None:
            if self._committer is not None:
                self._batch = self._committer.submit(self._begin).result()
            else:
                self._batch = self._begin()
            self.batch_dirty = False

    def _commit_and_begin(self, batch: lmdb.Transaction,
                          again: bool) -> tuple[lmdb.Transaction | None, Exception | None]:
        """Commit *batch* and begin the next one, in one thread (the mutex owner)."""
        err: Exception | None = None
        try:
            self.log.sync()  # before the locators that name those bytes
        except Exception as exc:
            err = exc
        try:
            if err is None:
                batch.commit()
            else:
                batch.abort()
        except lmdb.Error as exc:
            err = _translate(exc, self.path)
        except Exception as exc:  # pragma: no cover - defensive: never lose the lock state
            err = exc
        new = None
        if again:
            try:
                new = self._begin()
            except Exception as exc:
                err = err or exc
        return new, err

    def _start_commit(self, again: bool = True) -> concurrent.futures.Future[
            tuple[lmdb.Transaction | None, Exception | None]]:
        assert self._committer is not None and self._batch is not None
        batch, self._batch = self._batch, None
        self.batch_dirty = False
        self._fresh_inflight, self._fresh_batch = self._fresh_batch, {}
        self._inflight_freed, self._batch_freed = self._batch_freed, []
        fut = self._committer.submit(self._commit_and_begin, batch, again)
        self._inflight = fut
        return fut

    def _reap(self, fut: concurrent.futures.Future[
            tuple[lmdb.Transaction | None, Exception | None]]) -> None:
        """Take the result of a finished commit; raise its error (every waiter does)."""
        new, err = fut.result()
        if self._inflight is fut:
            self._inflight = None
            self._fresh_inflight = {}
            self._batch = new
            freed, self._inflight_freed = self._inflight_freed, []
            if err is None:
                self.commits += 1
                self.log.free(freed)
            else:
                for hook in self.failure_hooks:
                    hook(err)
        if err is not None:
            raise err

    def _settle(self) -> None:
        """Wait (blocking) for a commit in flight; its error went to the hooks."""
        fut = self._inflight
        if fut is not None:
            try:
                self._reap(fut)
            except Exception as exc:
                log.error("batch commit failed: %s", exc)

    def commit_batch(self) -> None:
        """Make everything written so far durable, and start a new batch."""
        if self._committer is not None:
            fut = self._inflight
            if fut is None:
                if self._batch is None or not self.batch_dirty:
                    return
                fut = self._start_commit()
            self._reap(fut)
            return
        if self._batch is None or not self.batch_dirty:
            return
        batch, self._batch = self._batch, None
        freed, self._batch_freed = self._batch_freed, []
        try:
            try:
                self.log.sync()
            except JiaoziError:
                batch.abort()
                raise
            batch.commit()
            self.commits += 1
            self.log.free(freed)
        except (lmdb.Error, JiaoziError) as exc:
            err = _translate(exc, self.path) if isinstance(exc, lmdb.Error) else exc
            # Everything in the batch is gone: whoever holds state that was
            # only in it (open files) must know, or it would later point at
            # data the store never kept.
            for hook in self.failure_hooks:
                hook(err)
            raise err from None
        finally:
            self.begin_batch()

    async def commit_async(self) -> None:
        """:meth:`commit_batch` without blocking the trio thread during the I/O.

        Everything the calling task wrote before the call is durable when it
        returns.  Concurrent callers share one commit when they can.
        """
        if self._committer is None:
            self.commit_batch()
            return
        fut = self._inflight
        if fut is None:
            if self._batch is None or not self.batch_dirty:
                return
            fut = self._start_commit()
        await _wait_future(fut)
        self._reap(fut)

    def commit_soon(self) -> None:
        """Start committing the batch in the commit thread if it is idle; do not wait.

        Streaming writes call this after storing each spill, so the commit
        thread writes one batch while the next is being filled, instead of
        idling until the next group-commit tick.
        """
        if (self._committer is not None and self._inflight is None
                and self._batch is not None and self.batch_dirty):
            self._start_commit()

    async def ready_async(self) -> None:
        """Wait without blocking for a commit in flight (before using the store)."""
        fut = self._inflight
        if fut is not None:
            await _wait_future(fut)
            self._settle()

    async def sync_async(self) -> None:
        """:meth:`sync` without blocking the trio thread."""
        await self.commit_async()
        import trio

        try:
            await trio.to_thread.run_sync(self.env.sync, True)
        except lmdb.Error as exc:
            raise _translate(exc, self.path) from None

    def abort_batch(self) -> None:
        """Drop everything written since the last commit of the batch."""
        self._settle()
        if self._batch is not None:
            batch, self._batch = self._batch, None
            self._fresh_batch = {}
            self._batch_freed = []
            if self._committer is not None:
                self._committer.submit(batch.abort).result()
            else:
                batch.abort()
            self.batch_dirty = False

    def end_batch(self) -> None:
        self._settle()
        if self._batch is not None and self._committer is not None:
            if self.batch_dirty:
                self._reap(self._start_commit(again=False))
            else:
                self.abort_batch()
            return
        if self._batch is not None:
            self.commit_batch()
            if self._batch is not None:
                self._batch.abort()
                self._batch = None

    def sync(self) -> None:
        self.commit_batch()
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            raise _translate(exc, self.path) from None

    def release_mapped_pages(self) -> int:
        """Drop this process's page-table mappings of the LMDB file; return bytes covered.

        Every chunk read goes through LMDB's read-only shared mapping, so the
        file pages a daemon has read count in its resident set (RssFile) until
        the kernel needs the memory, and a daemon that streamed 1 GiB shows a
        resident set 1 GiB larger although that memory is only page cache.
        ``MADV_DONTNEED`` on a shared file mapping unmaps the pages from this
        process without touching their contents (the page cache keeps them),
        so a later access is a minor fault that maps the same bytes again:
        safe while other threads read the map.  Linux only; elsewhere a no-op.
        """
        start, end = _map_range(self.path / "data.mdb")
        if start is None:
            return 0
        used = self.env.info()["last_pgno"] * self.env.stat()["psize"] + (1 << 20)
        length = min(end - start, used)
        if _madvise(start, length, 4):  # MADV_DONTNEED
            return 0
        return length

    def willneed(self, ids: list[bytes]) -> int:
        """Ask the kernel to read these chunks' pages of the map in the background.

        A cold sequential read otherwise faults the map in one readahead
        window (128 KiB) at a time, each fault a synchronous disk read on the
        FUSE thread.  ``MADV_WILLNEED`` over the chunks the reader will want
        next starts that I/O now, in large requests, without waiting for it.
        Any thread (a read snapshot); returns the bytes advised.
        """
        spans: list[tuple[int, int]] = []
        locs: list[bytes] = []
        with self.snapshot(buffers=True) as r:
            db = self.dbs["chunks"]
            for cid in ids:
                view = r.txn.get(cid, db=db)
                if view is not None:
                    addr = _buffer_address(view)
                    if addr:
                        spans.append((addr, addr + len(view)))
                    view.release()
                else:
                    loc = r.chunk_loc(cid)
                    if loc is not None:
                        locs.append(bytes(loc))
            # inside the snapshot: the ranges cannot be punched meanwhile
            total = self.log.willneed(locs)
        for lo, hi in coalesce(spans):
            lo &= ~(PAGE - 1)
            if _madvise(lo, hi - lo, 3) == 0:  # MADV_WILLNEED
                total += hi - lo
        return total

    def disk_usage(self) -> int:
        """Bytes the store occupies: LMDB's pages in use and the chunk log's blocks."""
        return self.env.info()["last_pgno"] * self.env.stat()["psize"] + self.log.disk_usage()


def _disk_full(path: Path, slack: int = 1 << 20) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < slack


def _map_range(path: Path) -> tuple[int | None, int]:
    """Address range of this process's mapping of *path* (from /proc/self/maps)."""
    target = str(path.resolve())
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if line.rstrip().endswith(target):
                    lo, hi = line.split(None, 1)[0].split("-")
                    return int(lo, 16), int(hi, 16)
    except OSError:
        pass
    return None, 0


def _madvise(addr: int, length: int, advice: int) -> int:
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return int(_LIBC.madvise(addr, length, advice))


_LIBC = None
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _buffer_address(view: memoryview) -> int:
    """Address of a (read-only) buffer's first byte; 0 if it cannot be had."""
    import ctypes

    global _GET_BUFFER
    if _GET_BUFFER is None:
        class PyBuffer(ctypes.Structure):
            _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                        ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                        ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                        ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                        ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                        ("internal", ctypes.c_void_p)]

        get = ctypes.pythonapi.PyObject_GetBuffer
        get.argtypes = (ctypes.py_object, ctypes.POINTER(PyBuffer), ctypes.c_int)
        get.restype = ctypes.c_int
        release = ctypes.pythonapi.PyBuffer_Release
        release.argtypes = (ctypes.POINTER(PyBuffer),)
        release.restype = None
        _GET_BUFFER = (PyBuffer, get, release)
    cls, get, release = _GET_BUFFER
    buf = cls()
    if get(view, ctypes.byref(buf), 0) != 0:  # PyBUF_SIMPLE
        return 0
    try:
        return int(buf.buf or 0)
    finally:
        release(ctypes.byref(buf))


_GET_BUFFER = None


async def _wait_future(fut: concurrent.futures.Future[object]) -> None:
    """Wait in trio for a future completed by another thread."""
    if fut.done():
        return
    import trio

    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: object) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    fut.add_done_callback(wake)
    await done.wait()


#: Stores open in this process, by path (LMDB: one environment per file per process).
_OPEN: dict[Path, Store] = {}


def _translate(exc: lmdb.Error, path: Path) -> JiaoziError:
    if isinstance(exc, lmdb.MapFullError):
        return StoreFull(f"store at {path} is full (map size reached)")
    text = str(exc)
    code = getattr(exc, "errno", None)
    if code is None:
        for num in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            if os.strerror(num) in text:
                code = num
                break
    if code in (errno.ENOSPC, errno.EDQUOT) or _disk_full(path):
        # LMDB reports a failed write-back of a full disk as EIO: look at the disk.
        return StoreFull(f"no space left for the store at {path}")
    if code == errno.EROFS:
        return JiaoziError(f"store at {path} is on a read-only filesystem", errno.EROFS)
    if code == errno.EACCES:
        return JiaoziError(f"permission denied opening the store at {path}", errno.EACCES)
    if isinstance(exc, lmdb.CorruptedError | lmdb.InvalidError):
        return Corrupt(f"store at {path} is corrupt: {text}")
    return JiaoziError(f"store error at {path}: {text}", errno.EIO)
