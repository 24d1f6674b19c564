"""Write-back to the remote, read-through from it, and the bounded chunk cache.

Upload
    Every new chunk, object and ref change is queued in the store's ``upload``
    database in the same transaction that stores it (store.py), so a crash
    never loses queued work and an outage only delays it.  :func:`drain`
    takes the queue in order: runs of chunks become packs of about
    :data:`PACK_TARGET` bytes (several uploaded at once), runs of objects one
    object pack, and a ref change is sent only once everything queued before
    it is in S3, so a ref in S3 never names anything that is not all there.
    A ref whose compare-and-swap fails (another machine moved it) is set
    aside as a conflict naming both commits; ``fetch`` then shows the remote
    head as ``remote/BRANCH`` to merge.

Fetch
    A chunk missing from the cache is read from its pack with a ranged GET
    (neighbouring chunks of the same pack in one request), checked against
    its blake3 id, and stored.  A chunk that fails the check is never served.

Cache
    ``cache_size`` bounds the bytes of chunks kept locally.  Only chunks the
    remote holds (``located``) are evicted, least recently read first; chunks
    still queued for upload are never evicted.  So when S3 is unreachable (or
    uploads fall behind the writers) the cache fills with chunks that cannot
    go: once those reach ``cache_size``, writes through the mount fail with
    ENOSPC (:class:`UploadState`) until uploads drain, instead of growing
    the cache without bound.

Concurrency: the planning and network parts are blocking and run in worker
threads; every store write (completing an upload, storing fetched chunks)
runs on the caller's thread (the daemon's trio thread, inside its batch).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import struct
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .chunking import hash_bytes
from .errors import Conflict, Corrupt, NotFound
from .objects import object_id
from .remote import Remote, decode_index, encode_index
from .store import Store, Txn

log = logging.getLogger("jiaozifuse.writeback")

#: Packs are cut once they hold this much.  Kept above 32 MiB with a chunk
#: added, on purpose: glibc maps buffers over 32 MiB afresh and unmaps them
#: when freed, where it keeps smaller ones in the freeing thread's arena.
#: Packs of 31 MiB cut the daemon's page faults during uploads by half, but
#: each worker thread's arena then kept a 31 MiB buffer: 90 MiB more resident
#: after a few syncs (219 -> 309 MiB RssAnon), growing with the threads.
PACK_TARGET = 32 << 20
#: Bytes of packs held in memory at once, being planned or uploaded: the
#: upload path's share of the daemon's memory (its target is 500 MiB RSS).
#: 2 packs of 32 MiB; planning the next overlaps sending the other.
MAX_INFLIGHT = 64 << 20
#: Packs uploaded at once (boto3's own transfers use 10 threads).
PARALLEL = max(1, MAX_INFLIGHT // PACK_TARGET)
#: Seconds between checkpoints of uncommitted worktrees to the remote: the
#: most a lost machine can lose of what was closed (plus the upload time).
CHECKPOINT_INTERVAL = 5.0
#: Seconds between the background uploader's rounds: what is closed waits at
#: most this long (plus the upload) before it starts for S3.
TICK = 0.5
_LOC = struct.Struct("<32sQIc")  # pack id, offset, length, kind


def _be64(n: int) -> bytes:
    return n.to_bytes(8, "big")


@dataclass
class Batch:
    seqs: list[int] = field(default_factory=list)
    kind: str = "pack"  # "pack" (chunks) | "opack" (objects) | "ref" | "skip"
    entries: list[tuple[bytes, bytes, int, int]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    ref: str = ""
    commit: bytes | None = None
    pack_id: bytes = b""
    #: why planning stopped after this data batch: "full" (a pack reached
    #: PACK_TARGET), "barrier" (a ref change or checkpoint comes next) or
    #: "end" (nothing more was queued)
    cut: str = "end"
    #: a pack's pieces, until :meth:`seal` joins them into ``data``
    parts: list[bytes | memoryview] = field(default_factory=list, repr=False)

    @property
    def size(self) -> int:
        """Bytes added to the pack so far: where the next entry starts."""
        if not self.entries:
            return 0
        _, _, off, n = self.entries[-1]
        return off + n

    def add(self, kind: bytes, oid: bytes, data: bytes | memoryview) -> None:
        """Add a chunk (kind ``C``) or an object to the pack."""
        self.entries.append((kind, oid, self.size, len(data)))
        self.parts.append(data)

    def seal(self) -> None:
        """Join the pieces into ``data`` in one allocation of the exact size (no
        growing and copying), and name the pack.  Call it inside the
        transaction the pieces were read in: they may be views of LMDB's map."""
        self.data = bytearray().join(self.parts)
        self.parts = []
        self.pack_id = pack_name(self.entries)


def plan(store: Store, after: int) -> list[Batch]:
    """Read the next batches of the queue after seq *after* (committed state;
    any thread).

    Building a pack reads tens of MiB through LMDB's map; those pages are
    unmapped from the process again right after (they stay in the page
    cache), or the daemon's resident set would grow by every pack it sends.
    """
    out = _plan(store, after)
    if any(b.kind == "pack" for b in out):
        store.release_mapped_pages()
    return out


def _plan(store: Store, after: int) -> list[Batch]:
    """:func:`plan` without the unmapping.

    Returns either the data queued after *after* up to the next ref change
    or worktree checkpoint (at most one chunk pack and one object pack,
    together covering every seq from *after* to the last one they hold),
    or, when that ref change or checkpoint comes first, it alone: the caller
    completes the data before the ref goes out.

    Chunks and objects go into separate packs however they interleave in the
    queue: closing a small file queues its chunk and then its objects, and a
    pack per run made three PUTs per file (a 16 KiB file at a time while
    files were being created).  Their order among themselves does not
    matter; only refs and checkpoints name them, and those wait.  Chunks are
    copied once, from LMDB's map straight into the pack buffer.
    """
    packs = {b"C": Batch(kind="pack"), b"O": Batch(kind="opack")}
    cut = "end"
    with store.snapshot(buffers=True) as r:
        cur = r.cursor("upload")
        if not cur.set_range(_be64(after + 1)):
            return []
        for k, v in cur:
            seq = int.from_bytes(k, "big")
            tag = bytes(v[:1])
            if tag in (b"R", b"W"):
                if any(b.seqs for b in packs.values()):
                    cut = "barrier"
                    break
                if tag == b"R":
                    commit = bytes(v[2:34]) if v[1:2] == b"\1" else None
                    return [Batch([seq], "ref", ref=bytes(v[34:]).decode(), commit=commit)]
                # a worktree checkpoint: after everything before it
                return [Batch([seq], "wt", ref=bytes(v[65:]).decode(),
                              commit=bytes(v[1:33]), pack_id=bytes(v[33:65]))]
            b = packs[b"C" if tag == b"C" else b"O"]
            oid = bytes(v[1:33])
            data = r.get_chunk(oid) if tag == b"C" else r.get_object(oid)
            b.seqs.append(seq)
            if data is None:  # collected meanwhile: nothing to send
                continue
            b.add(tag, oid, data)
            if b.size >= PACK_TARGET:
                cut = "full"
                break
        out = [b for b in packs.values() if b.seqs]
        for b in out:
            b.seal()
            b.cut = cut
    return out


def pack_name(entries: list[tuple[bytes, bytes, int, int]]) -> bytes:
    """A pack's id: the blake3 of its index.  Each entry names its bytes by
    their blake3 id, so the index determines the pack's content as surely as
    a hash of the content would, at the cost of hashing 45 bytes per chunk
    instead of the whole pack again (0.15 CPU s per GiB uploaded).  The same
    entries in the same order give the same name: a batch sent again after a
    crash lands on the same keys."""
    return hash_bytes(encode_index(entries))


def send(remote: Remote, b: Batch, etags: dict[str, str | None]) -> str | None:
    """Upload one batch (blocking).  For a ref, returns its new ETag."""
    if b.kind == "pack":
        if b.entries:
            name = f"packs/{b.pack_id.hex()}"
            remote.put(name + ".pack", b.data)  # botocore sends a bytearray as it is
            remote.put(name + ".idx", encode_index(b.entries))
    elif b.kind == "opack":
        if b.entries:
            idx = encode_index(b.entries)
            body = bytearray(struct.pack("<I", len(idx)))
            body += idx
            body += b.data
            remote.put(f"packs/{b.pack_id.hex()}.opack", body)
    elif b.kind == "ref":
        return remote.cas_ref(b.ref, b.commit, etags.get(b.ref))
    elif b.kind == "wt":
        cache_id, _, branch = b.ref.partition("/")
        assert b.commit is not None
        if b.commit == bytes(32):  # the branch was deleted
            remote.delete(f"worktrees/{cache_id}/{branch}")
            return None
        remote.put(f"worktrees/{cache_id}/{branch}", json.dumps({
            "tree": b.commit.hex(), "head": b.pack_id.hex(), "time_ns": time.time_ns(),
        }).encode())
    return None


def complete(t: Txn, b: Batch, etag: str | None = None) -> None:
    """Record a sent batch (on the store-owning thread)."""
    if b.kind in ("pack", "opack"):
        for kind, oid, off, n in b.entries:
            t.put("located", oid, _LOC.pack(b.pack_id, off, n, kind))
        t.put("meta", b"pack/" + b.pack_id, b"1")
    elif b.kind == "ref":
        t.delete("meta", b"conflict/" + b.ref.encode())
        key = b"remote_etag/" + b.ref.encode()
        if b.commit is None:
            t.delete("meta", key)
        else:
            t.put("meta", key, (etag or "").encode() + b"\0" + b.commit)
    for seq in b.seqs:
        t.delete("upload", _be64(seq))


def remote_etags(t: Txn) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for k, v in t.prefix("meta", b"remote_etag/"):
        etag, _, _ = bytes(v).partition(b"\0")
        out[bytes(k[12:]).decode()] = etag.decode()
    return out


def record_conflict(t: Txn, b: Batch, remote_commit: bytes | None) -> None:
    doc = f"{b.ref}\0{(b.commit or b'').hex()}\0{(remote_commit or b'').hex()}"
    t.put("meta", b"conflict/" + b.ref.encode(), doc.encode())
    for seq in b.seqs:
        t.delete("upload", _be64(seq))


def conflicts(t: Txn) -> list[dict[str, str]]:
    out = []
    for _, v in t.prefix("meta", b"conflict/"):
        ref, local, rem = bytes(v).decode().split("\0")
        out.append({"ref": ref, "local": local, "remote": rem})
    return out


def queue_status(store: Store) -> dict[str, Any]:
    """What is queued, uploaded and in conflict (the committed state).

    Reads the queue through LMDB memoryviews: a queued chunk's size costs a
    lookup, not a copy of its bytes (``remote status`` may be polled every
    half second by ``sync``'s progress bar while a GiB waits).
    """
    store.commit_batch()  # in the daemon: what was written so far is counted
    with store.snapshot(buffers=True) as r:
        n = {"chunks": 0, "objects": 0, "refs": 0}
        nbytes = 0
        oldest = None
        for k, v in r.cursor("upload"):
            tag = bytes(v[:1])
            if oldest is None:
                oldest = int.from_bytes(k, "big")
            if tag == b"W":
                continue
            if tag == b"C":
                n["chunks"] += 1
                nbytes += r.chunk_len(bytes(v[1:33])) or 0
            elif tag == b"O":
                n["objects"] += 1
            else:
                n["refs"] += 1
    with store.snapshot() as r:
        return {
            "queued": n,
            "queued_bytes": nbytes,
            "uploaded_objects": r.txn.stat(r._dbs["located"])["entries"],
            "packs": sum(1 for _ in r.prefix("meta", b"pack/")),
            "conflicts": conflicts(r),
            "cached_chunk_bytes": r.counter("chunk_bytes"),
        }


def rescue_condemned(store: Store, remote: Remote) -> list[Batch]:
    """Re-upload what local refs reach inside packs a remote gc has condemned.

    Called before a ref is pushed (see gc.py): a commit made on a view older
    than the gc's must not point into a pack that will be deleted.  A rescue
    pack never takes a condemned pack's name.  Blocking
    (any thread); returns the batches sent, for the caller to :func:`complete`
    on the store-owning thread.
    """
    from .errors import NotFound
    from .gc import mark

    try:
        raw, _ = remote.get("gc/condemned.json")
        condemned = {bytes.fromhex(h) for h in json.loads(raw)}
    except (NotFound, ValueError):
        return []
    if not condemned:
        return []
    with store.snapshot() as r:
        objects, chunks = mark(r)
        rescue = []
        for oid, loc in r.prefix("located", b""):
            if bytes(loc[:32]) in condemned and bytes(oid) in (objects | chunks):
                rescue.append((bytes(oid), bytes(loc[44:45])))
    if not rescue:
        return []
    sent = []
    missing = [oid for oid, kind in rescue if kind == b"C"]
    with store.snapshot() as r:
        missing = [c for c in missing if r.get_chunk(c) is None]
    fetched = fetch_chunks(store, remote, missing) if missing else {}
    for kind in (b"C", b"O"):
        b = Batch(kind="pack" if kind == b"C" else "opack")
        with store.snapshot() as r:
            for oid, k in rescue:
                if k != kind:
                    continue
                data = fetched.get(oid) or (r.get_chunk(oid) if kind == b"C"
                                            else r.get_object(oid))
                if data is not None:
                    b.add(kind, oid, data)
            b.seal()
        if b.entries:
            # the same entries in the same order as a condemned pack (always so
            # for a pack of one) hash to its very name: the upload would land
            # on the pack about to be deleted, so it gets a name of its own
            while b.pack_id in condemned:
                b.pack_id = hash_bytes(b.pack_id + b"rescue")
            send(remote, b, {})
            sent.append(b)
    return sent


class RefConflict(Conflict):
    def __init__(self, ref: str, local: bytes | None, remote: bytes | None) -> None:
        super().__init__(
            f"{ref}: the remote moved to {(remote or b'').hex()[:12] or '(deleted)'} while "
            f"this cache has {(local or b'').hex()[:12] or '(deleted)'}; run 'jiaozifuse "
            f"fetch' and merge remote/{ref.partition('/')[2]}")
        self.ref, self.local, self.remote_commit = ref, local, remote


def push_ref(remote: Remote, b: Batch, etags: dict[str, str | None],
             is_ancestor: Callable[[bytes, bytes], bool]) -> str | None:
    """Send a ref change by compare-and-swap (blocking).

    A stale ETag is not yet a conflict: if the remote head is already ours,
    or an ancestor of ours (a fast-forward), the swap is retried against it.
    """
    try:
        return send(remote, b, etags)
    except Conflict:
        cur = remote.get_ref(b.ref)
        if cur is not None and cur[0] == b.commit:
            return cur[1]
        if cur is None or (b.commit is not None and is_ancestor(cur[0], b.commit)):
            return send(remote, b, {b.ref: cur[1] if cur else None})
        raise RefConflict(b.ref, b.commit, cur[0]) from None


def drain_sync(store: Store, remote: Remote, is_ancestor: Callable[[bytes, bytes], bool],
               progress: Callable[[int], None] | None = None,
               parallel: int = PARALLEL) -> dict[str, int]:
    """Upload everything queued, from this thread (CLI ``sync`` without a daemon).

    A pipeline: the next pack is planned while up to *parallel* are sent,
    so at most about ``parallel * PACK_TARGET`` bytes are held at once, and
    packs are completed in queue order.
    """
    sent = {"packs": 0, "bytes": 0, "refs": 0, "conflicts": 0}
    inflight: collections.deque[tuple[Batch, concurrent.futures.Future]] = collections.deque()

    def retire() -> None:
        b, f = inflight.popleft()
        f.result()
        with store.write() as w:
            complete(w, b)
        sent["packs"] += 1 if b.entries else 0
        sent["bytes"] += len(b.data)
        if progress:
            progress(len(b.data))

    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        after = 0
        try:
            while True:
                while inflight and (len(inflight) >= parallel or inflight[0][1].done()):
                    retire()
                store.commit_batch()
                batches = plan(store, after)
                if batches and batches[0].kind in ("pack", "opack"):
                    for b in batches:
                        inflight.append((b, pool.submit(send, remote, b, {})))
                    after = max(b.seqs[-1] for b in batches)
                    continue
                if inflight:  # a ref or the end: everything before it first
                    while inflight:
                        retire()
                    continue
                if not batches:
                    return sent
                b = batches[0]
                if b.kind == "wt":
                    send(remote, b, {})
                    with store.write() as w:
                        complete(w, b)
                    continue
                for rb in rescue_condemned(store, remote):
                    with store.write() as w:
                        complete(w, rb)
                with store.read() as r:
                    etags = remote_etags(r)
                try:
                    etag = push_ref(remote, b, etags, is_ancestor)
                except RefConflict as exc:
                    with store.write() as w:
                        record_conflict(w, b, exc.remote_commit)
                    sent["conflicts"] += 1
                    log.warning("%s", exc)
                    continue
                with store.write() as w:
                    complete(w, b, etag)
                sent["refs"] += 1
        finally:
            for _, f in inflight:
                f.cancel()


def pending_chunk_bytes(store: Store) -> int:
    """Bytes of the chunks queued for upload: those that may not be evicted.

    Committed state, any thread; lengths come from LMDB memoryviews, nothing
    is copied.  Costs one lookup per queued chunk (about 16k per GiB).
    """
    total = 0
    with store.snapshot(buffers=True) as r:
        for _, v in r.cursor("upload"):
            if v[:1] == b"C":
                total += r.chunk_len(bytes(v[1:33])) or 0
    return total


class UploadState:
    """What the daemon's write-back knows, shared with the write path and
    ``remote status`` (one per open store: :func:`state_of`).

    The write path asks :meth:`room` before every write: plain arithmetic,
    never an LMDB scan.  The estimate of bytes not yet durable remotely is
    the count :meth:`Writeback.recount` last took (:func:`pending_chunk_bytes`)
    minus what was uploaded since, plus every byte written through the mount
    since (an overestimate: dedup and overwrites store less; the next count,
    about once a second, corrects it).  Bytes still in open files' write
    buffers when the count was taken (up to 16 MiB per file) are in neither
    figure: that is the margin by which the cache can exceed its bound.
    Lives on the trio thread, like everything that calls it.
    """

    def __init__(self) -> None:
        self.limit: int | None = None
        #: a daemon's Writeback keeps this state current (else room() says yes)
        self.active = False
        self.counted = False
        self.pending = 0
        self.written = 0
        self.uploading = 0
        self.sent_bytes = 0
        self.last_error: str | None = None
        self.refusing = False

    def not_durable(self) -> int:
        return self.pending + self.written

    def room(self, n: int) -> bool:
        """May *n* more bytes be written now?  False: the caller waits for
        uploads (see ``fs.Ops._wait_for_room``) or calls :meth:`refuse`."""
        if not self.limit or not self.active or not self.counted:
            return True
        if self.not_durable() + n > self.limit:
            return False
        if self.refusing:
            log.warning("uploads drained (%d MiB not yet uploaded): writes accepted again",
                        self.not_durable() >> 20)
            self.refusing = False
        self.written += n
        return True

    def refuse(self) -> None:
        """A write is answered ENOSPC: say why, once per episode."""
        if self.refusing or not self.limit:
            return
        why = (f"S3 is unreachable ({self.last_error})" if self.last_error
               else "uploads did not make room in time")
        log.error("cache full of data not yet uploaded (%d MiB, cache-size %d MiB) "
                  "and %s: writes fail with ENOSPC until uploads drain",
                  self.not_durable() >> 20, self.limit >> 20, why)
        self.refusing = True

    def uploaded(self, n: int) -> None:
        """*n* bytes of chunks became durable remotely (counted or just written)."""
        left = n - self.pending
        self.pending = max(0, self.pending - n)
        if left > 0:
            self.written = max(0, self.written - left)

    def as_dict(self) -> dict[str, Any]:
        return {
            "writeback_running": self.active,
            "not_durable_bytes": self.not_durable() if self.counted else None,
            "uploading_bytes": self.uploading,
            "last_error": self.last_error,
            # now, not as the last write found it: full, writes wait for the
            # uploads while they go through (fs.Ops._wait_for_room); refused
            # (ENOSPC) while they fail, or since they stopped making room
            "cache_full": self.full(),
            "refusing_writes": self.full() and bool(self.last_error or self.refusing),
        }

    def full(self) -> bool:
        return bool(self.limit and self.active and self.counted
                    and self.not_durable() >= self.limit)


_STATES: weakref.WeakKeyDictionary[Store, UploadState] = weakref.WeakKeyDictionary()


def state_of(store: Store) -> UploadState:
    """The one :class:`UploadState` of an open store (the daemon's Writeback
    and Repository.cache_room reach it from either side without knowing
    each other)."""
    st = _STATES.get(store)
    if st is None:
        st = _STATES[store] = UploadState()
    return st


class Writeback:
    """The daemon's background uploader (a trio task; boto3 in worker threads).

    It retries with exponential backoff (1 s to 60 s) while the remote is
    unreachable; writes through the mount never wait for it.
    """

    def __init__(self, store: Store, remote: Callable[[], Remote],
                 is_ancestor: Callable[[bytes, bytes], bool], cache_size: int | None = None,
                 access: AccessLog | None = None) -> None:
        self.store = store
        self._remote_factory = remote
        self._remote: Remote | None = None
        self.is_ancestor = is_ancestor
        self.cache_size = cache_size
        self.access = access
        self.last_error: str | None = None
        self.sent_bytes = 0
        self.last_checkpoint_ns = 0
        self.metrics: Any = None
        #: awaited every CHECKPOINT_INTERVAL: queues worktree checkpoints
        self.checkpoint: Callable[[], Any] | None = None
        self._lock: Any = None
        self._wake: Any = None
        self.state = state_of(store)
        self.state.limit = cache_size
        self.state.active = True

    async def recount(self) -> None:
        """Count the bytes not yet uploaded afresh (a worker thread scans the
        queue), keeping the writes made meanwhile.  Only with a cache bound:
        without one nothing asks."""
        import trio

        st = self.state
        st.last_error = self.last_error
        if not self.cache_size:
            return
        await self.store.commit_async()  # the count sees every chunk stored so far
        before = st.written
        pending = await trio.to_thread.run_sync(pending_chunk_bytes, self.store)
        st.pending = pending
        st.written = max(0, st.written - before)
        st.counted = True

    @property
    def remote(self) -> Remote:
        if self._remote is None:
            self._remote = self._remote_factory()
        return self._remote

    def poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def step(self, urgent: bool = True) -> bool:
        """Send what is queued up to the next ref change; False when the
        queue was empty (or, unless *urgent*, once it reached the end of what
        was queued: see :meth:`run`).

        Packs go through a pipeline: the next one is planned (a worker
        thread) while up to :data:`PARALLEL` are uploaded, and a pack's
        memory counts against :data:`MAX_INFLIGHT` from planning until it is
        sent.  A ref or worktree checkpoint at the head of the queue goes out
        alone, once everything before it is complete.
        """
        import trio

        await self.store.commit_async()  # queued entries become visible to plan()
        errors: list[BaseException] = []
        slots = trio.Semaphore(PARALLEL)
        remote: Remote | None = None
        sent_data = False

        async def one(b: Batch) -> None:
            n = len(b.data)
            self.state.uploading += n
            try:
                await trio.to_thread.run_sync(send, remote, b, {})
            except Exception as exc:
                errors.append(exc)
                return
            finally:
                self.state.uploading -= n
                b.data = bytearray()  # the pack's memory goes now, not with the batch
                slots.release()
            with self.store.write() as w:
                complete(w, b)
            self.sent_bytes += n
            self.state.sent_bytes += n
            if b.kind == "pack":
                self.state.uploaded(n)
            if self.metrics is not None:
                self.metrics.upload_bytes.inc(n)

        after = 0
        rest = True
        async with trio.open_nursery() as nursery:
            while not errors:
                await slots.acquire()
                batches = await trio.to_thread.run_sync(plan, self.store, after)
                if not batches or batches[0].kind not in ("pack", "opack"):
                    slots.release()
                    break
                if remote is None:
                    remote = await trio.to_thread.run_sync(lambda: self.remote)
                after = max(b.seqs[-1] for b in batches)
                sent_data = True
                for i, b in enumerate(batches):
                    if i:
                        await slots.acquire()
                    nursery.start_soon(one, b)
                if not urgent and batches[0].cut == "end":
                    rest = False  # the rest waits for the next round
                    break
        await self.store.commit_async()
        if errors:
            raise errors[0]
        if sent_data:
            return rest
        batches = await trio.to_thread.run_sync(plan, self.store, 0)
        if not batches:
            return False
        remote = await trio.to_thread.run_sync(lambda: self.remote)
        if batches[0].kind == "wt":
            await trio.to_thread.run_sync(send, remote, batches[0], {})
            with self.store.write() as w:
                complete(w, batches[0])
            await self.store.commit_async()
            self.last_checkpoint_ns = time.time_ns()
            return True
        b = batches[0]
        for rb in await trio.to_thread.run_sync(rescue_condemned, self.store, remote):
            with self.store.write() as w:
                complete(w, rb)
        with self.store.read() as r:
            etags = remote_etags(r)
        try:
            etag = await trio.to_thread.run_sync(
                push_ref, remote, b, etags, self.is_ancestor)
        except RefConflict as exc:
            log.warning("%s", exc)
            with self.store.write() as w:
                record_conflict(w, b, exc.remote_commit)
        else:
            with self.store.write() as w:
                complete(w, b, etag)
        await self.store.commit_async()
        return True

    async def drain(self, urgent: bool = True) -> None:
        """Upload until the queue is empty (unless *urgent*: until the end of
        what was queued); errors reach the caller."""
        import trio

        if self._lock is None:
            self._lock = trio.Lock()
        async with self._lock:
            while await self.step(urgent):
                pass
            self.last_error = None
            await self.recount()

    async def run(self) -> None:
        """Forever: drain, evict, wait :data:`TICK` or until poked.

        These drains are not urgent: each sends what was queued when it
        reached the end of the queue and then waits for the next tick, instead
        of chasing the writers.  Chasing them sent each small file closed
        while the previous pack was in flight as a pack of its own (three PUTs
        per 16 KiB file, and creating files ran at a fifth of the speed it
        has without a remote).  Full packs and ref changes still go out as
        soon as they are queued; ``sync`` and ``commit --wait`` drain
        urgently.
        """
        import trio

        self._lock = self._lock or trio.Lock()
        self._wake = trio.Event()
        backoff = 1.0
        next_ckpt = time.monotonic() + CHECKPOINT_INTERVAL
        await self.recount()
        while True:
            try:
                if self.checkpoint is not None and time.monotonic() >= next_ckpt:
                    next_ckpt = time.monotonic() + CHECKPOINT_INTERVAL
                    await self.checkpoint()
                await self.drain(urgent=False)
                backoff = 1.0
                if self.cache_size:
                    await self.store.commit_async()
                    evict(self.store, self.cache_size, self.access)
            except Exception as exc:  # an outage: keep everything queued, retry later
                self.last_error = str(exc)
                if self.metrics is not None:
                    self.metrics.upload_errors.inc()
                log.warning("upload failed (retrying in %.0f s): %s", backoff, exc)
                try:
                    await self.recount()
                except Exception:
                    log.exception("cannot count the bytes not yet uploaded")
                await trio.sleep(backoff)
                backoff = min(60.0, backoff * 2)
                continue
            with trio.move_on_after(TICK):
                await self._wake.wait()
            self._wake = trio.Event()


# ------------------------------------------------------------------ fetching


def locate(t: Txn, oid: bytes) -> tuple[bytes, int, int, bytes] | None:
    raw = t.get("located", oid)
    if raw is None:
        return None
    pack, off, n, kind = _LOC.unpack(raw)
    return pack, off, n, kind


#: Largest byte range asked of S3 in one GET when fetching chunks.  A sequential
#: reader's readahead step (fs.READAHEAD_STEP) wants 32 MiB that lie side by
#: side in one pack: one GET, whose fixed costs (a thread, the request, the
#: server's lookup) are paid once.  4 MiB parts fetched in parallel cost the
#: daemon half as much CPU again per GiB and were slower on 2 cores.
FETCH_PART = 32 << 20


#: A streamed fetch (:func:`fetch_to_log`) hashes and caches each piece of this
#: size as it arrives, while the rest of the GET is still on the wire.
FETCH_PIECE = 4 << 20

_Request = tuple[bytes, int, int, list[tuple[int, int, bytes]]]  # pack, start, end, chunks


def _requests(store: Store, ids: Iterable[bytes], gap: int = 1 << 20) -> list[_Request]:
    """Group chunks into ranged GETs: chunks close together in a pack (less
    than *gap* apart) share one GET of at most :data:`FETCH_PART` bytes."""
    wanted: dict[bytes, list[tuple[int, int, bytes]]] = {}
    moved = store.moved
    with store.snapshot() as r:
        for cid in set(ids):
            raw = moved.get(cid)
            loc = _LOC.unpack(raw) if raw is not None else locate(r, cid)
            if loc is None:
                raise Corrupt(f"chunk {cid.hex()} is neither cached nor in the remote")
            pack, off, n, _ = loc
            wanted.setdefault(pack, []).append((off, n, cid))
    requests = []
    for pack, items in wanted.items():
        items.sort()
        start, end, group = items[0][0], items[0][0] + items[0][1], [items[0]]
        for off, n, cid in items[1:]:
            if off - end <= gap and off + n - start <= FETCH_PART:
                end = max(end, off + n)
                group.append((off, n, cid))
            else:
                requests.append((pack, start, end, group))
                start, end, group = off, off + n, [(off, n, cid)]
        requests.append((pack, start, end, group))
    return requests


def _pack_key(pack: bytes) -> str:
    return f"packs/{pack.hex()}.pack"


def _find_moved(store: Store, remote: Remote, gone: bytes, ids: list[bytes]) -> None:
    """Find other copies of chunks whose located pack *gone* is no longer on
    the remote; note them in ``store.moved``.  Raises :class:`Corrupt` naming
    a chunk that no pack holds.

    How it happens: two machines wrote the same chunk, so two packs hold it,
    and a remote gc on one machine deleted the copy another machine had
    located.  Reads only (any thread): the remote's pack indexes are read
    until every id is found; the owner of the store records the result with
    :func:`record_moved`, so the search runs once per gone pack.
    """
    want = set(ids) - store.moved.keys()
    log.warning("pack %s is gone from the remote: looking for other copies of %d chunk(s)",
                gone.hex()[:12], len(want))
    for key in remote.list("packs/"):
        stem, _, ext = key.removeprefix("packs/").partition(".")
        if not want or ext != "idx" or stem == gone.hex():
            continue
        try:
            pid = bytes.fromhex(stem)
            entries = decode_index(remote.get(key)[0])
        except (ValueError, NotFound):
            continue
        for kind, oid, off, n in entries:
            if oid in want and kind == b"C":
                store.moved[oid] = _LOC.pack(pid, off, n, kind)
                want.discard(oid)
    if want:
        raise Corrupt(f"chunk {min(want).hex()} is not cached, and its pack {gone.hex()[:12]} "
                      "is gone from the remote with no other copy")


def record_moved(t: Txn, store: Store) -> None:
    """Record the copies :func:`_find_moved` found (by the owner of the store)."""
    for oid, loc in list(store.moved.items()):
        t.put("located", oid, loc)
        del store.moved[oid]


def _relocating(store: Store, remote: Remote, fn: Callable[[_Request], dict]
                ) -> Callable[[_Request], dict]:
    """*fn* for one request, retried from other copies if its pack is gone."""
    def run(req: _Request) -> dict:
        try:
            return fn(req)
        except NotFound:
            pack, _, _, group = req
            ids = [cid for _, _, cid in group]
            _find_moved(store, remote, pack, ids)
            out: dict = {}
            for again in _requests(store, ids):
                out.update(fn(again))  # a second NotFound: the copy went too
            return out
    return run


def _in_parallel(fn: Callable[[_Request], dict], requests: list[_Request]) -> dict:
    result: dict = {}
    if len(requests) == 1:
        result.update(fn(requests[0]))
    else:
        with concurrent.futures.ThreadPoolExecutor(min(8, len(requests))) as pool:
            for part in pool.map(fn, requests):
                result.update(part)
    return result


def fetch_chunks(store: Store, remote: Remote, ids: Iterable[bytes],
                 gap: int = 1 << 20) -> dict[bytes, bytes]:
    """Fetch chunks from their packs (blocking; any thread).  Verifies every id.

    The GETs (see :func:`_requests`) run in parallel.
    """
    def get(req: _Request) -> dict[bytes, bytes]:
        pack, start, end, group = req
        for attempt in range(2):
            data, _ = remote.get(_pack_key(pack), start, end - start)
            out = {}
            bad = []
            for off, n, cid in group:
                piece = data[off - start : off - start + n]
                if len(piece) != n or hash_bytes(piece) != cid:
                    bad.append(cid)
                else:
                    out[cid] = piece
            if not bad:
                return out
            log.warning("pack %s: %d chunk(s) failed verification (attempt %d)",
                        pack.hex()[:12], len(bad), attempt + 1)
        raise Corrupt(f"chunk {bad[0].hex()} from pack {pack.hex()[:12]} fails its blake3 "
                      "check; not served")

    return _in_parallel(_relocating(store, remote, get), _requests(store, ids, gap))


def _cut(group: list[tuple[int, int, bytes]], start: int, pieces: Iterable[bytes]
         ) -> Iterable[list[tuple[bytes, bytes | memoryview]]]:
    """Cut a GET's body, arriving in *pieces* from offset *start*, into the
    chunks of *group* (sorted by offset): one list per piece, of the chunks
    that piece completed.  A chunk inside one piece is a view of it (no
    copy); only a chunk that straddles pieces is copied together."""
    todo = iter(group)
    cur = next(todo, None)
    carry: bytearray | None = None  # the part of `cur` received in earlier pieces
    base = start
    for piece in pieces:
        view, end = memoryview(piece), base + len(piece)
        done: list[tuple[bytes, bytes | memoryview]] = []
        while cur is not None:
            off, n, cid = cur
            if off + n <= end:
                if carry is not None:
                    carry += view[: off + n - base]
                    done.append((cid, carry))
                    carry = None
                else:
                    done.append((cid, view[off - base : off + n - base]))
                cur = next(todo, None)
                continue
            if off < end:  # begins here or earlier, ends in a later piece
                if carry is None:
                    carry = bytearray(view[off - base :])
                else:
                    carry += view
            break
        yield done
        base = end


def fetch_to_log(store: Store, remote: Remote, ids: list[bytes]
                 ) -> tuple[dict[bytes, int], dict[bytes, bytes]]:
    """Fetch chunks and write them to the chunk log (a worker thread).

    Returns (id -> length, id -> locator); record the locators with
    :func:`store_fetched_locs`.  Each GET is consumed as it arrives, in
    pieces of :data:`FETCH_PIECE`: the chunks a piece completes are verified
    and written to the log (one pwritev) while the rest is on the wire, and
    no more than a piece of the body is held in memory.  A chunk that fails
    its blake3 check is fetched once more on its own, then refused
    (:class:`Corrupt`).  The copy into the page cache happens here, off the
    trio thread.  If any GET fails (an outage mid-body), every range this
    call wrote to the log is given back before the error is raised: no
    locator will ever name them.
    """
    written: list[bytes] = []  # every locator of this call (list.extend: atomic)

    def append(chunks: list[tuple[bytes, bytes | memoryview]]) -> dict[bytes, bytes]:
        # a cache of remote bytes: no commit has to flush them to disk;
        # chunks stored meanwhile by someone else get no locator (dedup)
        new = store.append_chunks(chunks, durable=False)
        written.extend(new.values())
        return new

    def get(req: _Request) -> dict[bytes, bytes]:
        pack, start, end, group = req
        locs: dict[bytes, bytes] = {}
        seen: set[bytes] = set()
        pieces = remote.get_pieces(_pack_key(pack), start, end - start, FETCH_PIECE)
        for done in _cut(group, start, pieces):
            good = [(cid, data) for cid, data in done if hash_bytes(data) == cid]
            seen.update(cid for cid, _ in good)
            locs.update(append(good))
        again = [cid for _, _, cid in group if cid not in seen]
        if again:  # failed its blake3 check, or the body was cut short
            log.warning("pack %s: %d chunk(s) failed verification or were cut short; "
                        "fetching them again", pack.hex()[:12], len(again))
            got = fetch_chunks(store, remote, again)  # raises Corrupt if still bad
            locs.update(append(list(got.items())))
        return locs

    requests = _requests(store, ids)
    sizes = {cid: n for _, _, _, group in requests for _, n, cid in group}
    try:
        return sizes, _in_parallel(_relocating(store, remote, get), requests)
    except BaseException:
        store.log.discard(written)
        raise


def store_fetched_locs(t: Txn, locs: dict[bytes, bytes]) -> list[bytes]:
    """Record fetched chunks written to the log; return the locators not needed."""
    unused: list[bytes] = []
    queue, t.queue = t.queue, False  # already in the remote: not queued again
    try:
        for cid, loc in locs.items():
            if not t.put_chunk_at(cid, loc):
                unused.append(loc)
    finally:
        t.queue = queue
    return unused


def store_fetched(t: Txn, chunks: dict[bytes, bytes]) -> None:
    queue, t.queue = t.queue, False  # already in the remote: not queued again
    try:
        for cid, data in chunks.items():
            t.put_chunk(cid, data)
    finally:
        t.queue = queue


# -------------------------------------------------------------- clone, fetch


def download_metadata(store: Store, remote: Remote) -> dict[str, int]:
    """Bring every object and chunk location the remote has that we lack."""
    with store.read() as r:
        have = {bytes(k[5:]) for k, _ in r.prefix("meta", b"pack/")}
    keys = remote.list("packs/")
    new_packs = 0
    objects = 0
    for key in keys:
        name = key.removeprefix("packs/")
        stem, _, ext = name.partition(".")
        try:
            pid = bytes.fromhex(stem)
        except ValueError:
            continue
        if pid in have or ext not in ("idx", "opack"):
            continue
        data, _ = remote.get(key)
        if ext == "opack":
            (n,) = struct.unpack_from("<I", data, 0)
            entries = decode_index(data[4 : 4 + n])
            body = memoryview(data)[4 + n :]
            with store.write() as w:
                queue, w.queue = w.queue, False
                try:
                    for kind, oid, off, ln in entries:
                        obj = bytes(body[off : off + ln])
                        if object_id(obj) != oid:
                            raise Corrupt(f"object {oid.hex()} in pack {stem[:12]} is corrupt")
                        w.put_object(oid, obj)
                        w.put("located", oid, _LOC.pack(pid, off, ln, kind))
                        objects += 1
                finally:
                    w.queue = queue
                w.put("meta", b"pack/" + pid, b"1")
        else:
            entries = decode_index(data)
            with store.write() as w:
                for kind, oid, off, ln in entries:
                    w.put("located", oid, _LOC.pack(pid, off, ln, kind))
                w.put("meta", b"pack/" + pid, b"1")
        new_packs += 1
    return {"packs": new_packs, "objects": objects}


# ------------------------------------------------------------------- cache


class AccessLog:
    """Remembers when chunks were last read, cheaply (in memory, coarse clock)."""

    def __init__(self) -> None:
        self.recent: dict[bytes, int] = {}

    def touch(self, cid: bytes) -> None:
        self.recent[cid] = int(time.time())

    def flush(self, t: Txn) -> None:
        for cid, ts in self.recent.items():
            t.put("access", cid, ts.to_bytes(8, "big"))
        self.recent.clear()


def evict(store: Store, limit: int, access: AccessLog | None = None,
          low_water: float = 0.9) -> int:
    """Drop located chunks, least recently read first, until under *limit*.

    Never drops a chunk the remote does not hold.  Returns bytes freed.
    """
    with store.read() as r:
        used = r.counter("chunk_bytes")
    if used <= limit:
        return 0
    if access is not None:
        with store.write() as w:
            access.flush(w)
        store.commit_batch()
    target = int(limit * low_water)
    cands: list[tuple[int, bytes, int]] = []
    with store.snapshot(buffers=True) as r:
        located = r._dbs["located"]
        for cid, n in r.iter_chunks():
            if r.txn.get(cid, db=located) is None:
                continue
            ts = r.get("access", cid)
            cands.append((int.from_bytes(ts, "big") if ts else 0, cid, n))
    cands.sort()
    freed = 0
    with store.write() as w:
        for _, cid, n in cands:
            if used - freed <= target:
                break
            if w.delete_chunk(cid):
                w.delete("access", cid)
                freed += n
        w.add_counter("chunk_bytes", -freed)
    if used - freed > limit:
        log.warning("cache over its limit (%d > %d bytes): the rest is not yet uploaded",
                    used - freed, limit)
    return freed


def remote_from_config(config: dict) -> Remote | None:
    rc = config.get("remote")
    if not rc:
        return None
    return Remote(rc["url"], endpoint_url=rc.get("endpoint_url"))


__all__ = [
    "AccessLog", "Batch", "RefConflict", "UploadState", "Writeback", "complete",
    "download_metadata", "drain_sync", "evict", "fetch_chunks", "fetch_to_log",
    "pending_chunk_bytes", "plan", "push_ref", "queue_status", "record_moved",
    "remote_from_config", "send",
    "state_of", "store_fetched", "store_fetched_locs",
]
