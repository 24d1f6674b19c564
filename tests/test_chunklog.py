"""The chunk log beside LMDB: durability order, dedup, freeing, crashes, formats."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from jiaozifuse import chunklog
from jiaozifuse.chunking import hash_bytes
from jiaozifuse.errors import StoreFull
from jiaozifuse.store import DBS, Store


def chunk(i: int, size: int = 65536) -> tuple[bytes, bytes]:
    data = i.to_bytes(4, "little") * (size // 4)
    return hash_bytes(data), data


@pytest.fixture
def store(tmp_path: Path):
    s = Store.create(tmp_path / "store")
    yield s
    s.close()


def put_logged(store: Store, pieces: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    locs = store.append_chunks(pieces)
    with store.write() as w:
        for cid, loc in locs.items():
            assert w.put_chunk_at(cid, loc)
    return locs


def test_logged_chunks_read_back_after_reopen(tmp_path: Path, store: Store) -> None:
    pieces = [chunk(i) for i in range(40)]
    put_logged(store, pieces)
    with store.read() as r:
        assert r.count_chunks() == 40
        assert r.counter("chunk_bytes") == 40 * 65536
        assert dict(r.iter_chunks()) == {cid: 65536 for cid, _ in pieces}
    store.close()
    again = Store.open(tmp_path / "store")
    try:
        with again.snapshot() as r:
            for cid, data in pieces:
                assert r.has_chunk(cid)
                assert r.get_chunk(cid) == data
            assert {c: d for c, d in r.iter_chunk_data()} == dict(pieces)
    finally:
        again.close()


def test_segments_roll_over(monkeypatch: pytest.MonkeyPatch, store: Store) -> None:
    monkeypatch.setattr(chunklog, "SEGMENT_BYTES", 5 * 65536)
    pieces = [chunk(i) for i in range(12)]
    for i in range(0, 12, 2):
        put_logged(store, pieces[i : i + 2])
    segs = sorted((store.path / "log").glob("*.seg"))
    assert len(segs) >= 3
    assert all(p.stat().st_size <= 5 * 65536 for p in segs)
    with store.snapshot() as r:
        assert all(r.get_chunk(c) == d for c, d in pieces)


def test_stored_chunks_are_not_written_again(store: Store) -> None:
    cid, data = chunk(1)
    with store.write() as w:
        w.put_chunk(cid, data)  # inline
    assert store.append_chunks([(cid, data)]) == {}
    other, odata = chunk(2)
    locs = store.append_chunks([(other, odata), (other, odata)])
    assert list(locs) == [other]
    with store.write() as w:
        assert w.put_chunk_at(other, locs[other])
        assert not w.put_chunk(other, odata)  # in the log: not stored inline too
        assert not w.put_chunk_at(cid, locs[other])  # inline already


def test_a_deleted_chunk_is_punched_only_after_older_readers_end(store: Store) -> None:
    pieces = [chunk(i, 1 << 20) for i in range(4)]
    put_logged(store, pieces)
    store.log.sync()
    usage = store.log.disk_usage()
    victim, vdata = pieces[1]
    reader = store.snapshot()
    r = reader.__enter__()
    try:
        with store.write() as w:
            assert w.delete_chunk(victim) == 1 << 20
        # the reader's snapshot still names the chunk: its bytes must stay
        assert r.get_chunk(victim) == vdata
        assert store.log.disk_usage() == usage
    finally:
        reader.__exit__(None, None, None)
    assert store.log.disk_usage() <= usage - (1 << 20)
    with store.snapshot() as r2:
        assert r2.get_chunk(victim) is None
        assert all(r2.get_chunk(c) == d for c, d in pieces if c != victim)


def test_a_failed_log_sync_commits_nothing(monkeypatch: pytest.MonkeyPatch,
                                           store: Store) -> None:
    store.use_commit_thread()
    store.begin_batch()
    lost: list[Exception] = []
    store.failure_hooks.append(lost.append)
    cid, data = chunk(7)
    locs = store.append_chunks([(cid, data)])
    with store.write() as w:
        w.put_chunk_at(cid, locs[cid])

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", full)
    with pytest.raises(StoreFull):
        store.commit_batch()
    monkeypatch.undo()
    assert len(lost) == 1 and isinstance(lost[0], StoreFull)
    with store.snapshot() as r:
        assert not r.has_chunk(cid)
    # the store goes on: the same chunk stored again is durable
    locs = store.append_chunks([(cid, data)])
    with store.write() as w:
        assert w.put_chunk_at(cid, locs[cid])
    store.commit_batch()
    with store.snapshot() as r:
        assert r.get_chunk(cid) == data
    store.end_batch()


CRASHER = """
import os, sys
from jiaozifuse.store import DBS, Store
from jiaozifuse.chunking import hash_bytes
s = Store.open(__import__("pathlib").Path(sys.argv[1]))
def chunk(i):
    d = i.to_bytes(4, "little") * 16384
    return hash_bytes(d), d
a = [chunk(i) for i in range(100, 110)]
locs = s.append_chunks(a)
with s.write() as w:
    for c, l in locs.items():
        w.put_chunk_at(c, l)
b = [chunk(i) for i in range(200, 210)]
s.use_commit_thread(); s.begin_batch()
locs = s.append_chunks(b)
with s.write() as w:
    for c, l in locs.items():
        w.put_chunk_at(c, l)
os.kill(os.getpid(), 9)  # before the batch holding b is committed
"""


def test_sigkill_keeps_committed_chunks_and_gc_trims_the_unnamed_tail(
        tmp_path: Path, store: Store) -> None:
    store.close()
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(tmp_path / "store")],
                          capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    again = Store.open(tmp_path / "store")
    try:
        with again.snapshot() as r:
            for i in range(100, 110):
                cid, data = chunk(i)
                assert r.get_chunk(cid) == data
            for i in range(200, 210):
                assert not r.has_chunk(chunk(i)[0])
            ends = r.log_ends()
        # the dead writer's unnamed tail (its uncommitted batch) is cut, and only it
        assert again.log.trim(ends) == 10 * 65536
        assert again.log.trim(ends) == 0
        with again.snapshot() as r:
            assert all(r.get_chunk(chunk(i)[0]) == chunk(i)[1] for i in range(100, 110))
        # the next writer appends after the dead writer's end, never over it
        put_logged(again, [chunk(300)])
        with again.snapshot() as r:
            assert r.get_chunk(chunk(300)[0]) == chunk(300)[1]
            assert r.get_chunk(chunk(105)[0]) == chunk(105)[1]
    finally:
        again.close()


def test_two_processes_never_share_a_segment(tmp_path: Path, store: Store) -> None:
    put_logged(store, [chunk(1)])  # this process holds a segment now
    code = """
import sys, pathlib
from jiaozifuse.store import DBS, Store
from jiaozifuse.chunking import hash_bytes
s = Store.open(pathlib.Path(sys.argv[1]))
d = b"other" * 20000
locs = s.append_chunks([(hash_bytes(d), d)])
with s.write() as w:
    for c, l in locs.items():
        w.put_chunk_at(c, l)
print(sorted(p.name for p in (pathlib.Path(sys.argv[1]) / "log").glob("*.seg")))
s.close()
"""
    out = subprocess.run([sys.executable, "-c", code, str(store.path)], capture_output=True,
                         text=True, check=True).stdout
    assert out.count(".seg") == 2, out
    put_logged(store, [chunk(2)])
    with store.snapshot() as r:
        assert r.get_chunk(chunk(1)[0]) == chunk(1)[1]
        assert r.get_chunk(chunk(2)[0]) == chunk(2)[1]
        d = b"other" * 20000
        assert r.get_chunk(hash_bytes(d)) == d


def test_a_format_1_store_opens_and_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old"
    path.mkdir()
    env = lmdb.open(str(path), max_dbs=20)
    cid, data = chunk(5)
    with env.begin(write=True) as txn:
        for name in DBS:  # the tables of format 1: all but the chunk log's
            if name != "chunkloc":
                env.open_db(name.encode(), txn=txn)
        txn.put(b"format", b"1", db=env.open_db(b"meta", txn=txn))
        txn.put(cid, data, db=env.open_db(b"chunks", txn=txn))
    env.close()
    ro = Store.open(path, readonly=True)
    try:
        with ro.snapshot() as r:
            assert r.get_chunk(cid) == data and r.count_chunks() == 1
            assert r.chunk_loc(cid) is None
    finally:
        ro.close()
    rw = Store.open(path)
    try:
        with rw.read() as r:
            assert r.get("meta", b"format") == b"2"
            assert r.get_chunk(cid) == data
    finally:
        rw.close()


def test_copies_of_remote_chunks_need_no_flush(store: Store) -> None:
    """Fetched chunks are a cache (their ids are checked on the first read
    after a restart): writing them leaves nothing for the next commit to sync."""
    cid, data = chunk(11)
    locs = store.append_chunks([(cid, data)], durable=False)
    assert not store.log.dirty
    with store.write() as w:
        assert w.put_chunk_at(cid, locs[cid])
    with store.snapshot() as r:
        assert r.get_chunk(cid) == data
    other, odata = chunk(12)
    store.append_chunks([(other, odata)])
    assert store.log.dirty


def test_get_chunks_reads_runs_of_the_log_at_once(monkeypatch: pytest.MonkeyPatch,
                                                   store: Store) -> None:
    logged = [chunk(i) for i in range(20, 30)]
    put_logged(store, logged)
    inline_id, inline = chunk(40)
    with store.write() as w:
        w.put_chunk(inline_id, inline)
    missing = hash_bytes(b"not stored")
    preads: list[int] = []
    real = os.pread

    def counting(fd: int, n: int, off: int) -> bytes:
        preads.append(n)
        return real(fd, n, off)

    monkeypatch.setattr(os, "pread", counting)
    ids = [c for c, _ in logged[:5]] + [inline_id, missing] + [c for c, _ in logged[5:]]
    with store.snapshot() as r:
        got = r.get_chunks(ids)
    want = [d for _, d in logged[:5]] + [inline, None] + [d for _, d in logged[5:]]
    assert got == want
    assert preads == [10 * 65536]  # end to end in the log: one read, not ten


def test_trim_leaves_a_live_writers_segment_alone(tmp_path: Path, store: Store) -> None:
    put_logged(store, [chunk(1)])
    store.append_chunks([chunk(2)])  # appended, not yet named by any locator
    code = """
import sys, pathlib
from jiaozifuse.store import Store
s = Store.open(pathlib.Path(sys.argv[1]))
with s.snapshot() as r:
    print(s.log.trim(r.log_ends()))
s.close()
"""
    out = subprocess.run([sys.executable, "-c", code, str(store.path)], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "0"  # this process holds its segment: nothing cut


def test_ranges_that_touch_are_punched_whole(store: Store) -> None:
    """Discarded chunks lying end to end give back every block they cover, also
    those two of them share; a chunk between discarded ones stays intact."""
    pieces = [chunk(1000 + i, 10_000) for i in range(41)]  # not block-aligned
    locs = store.append_chunks(pieces)
    seg = chunklog.unpack_loc(next(iter(locs.values())))[0]
    path = store.log._file(seg)
    keep_id, keep = pieces[20]
    store.log.discard([loc for cid, loc in locs.items() if cid != keep_id])
    # 40 chunks of 10,000 bytes: about 98 blocks of 4 KiB (800 of 512 bytes;
    # chunk by chunk, 344 stayed); what may stay: the blocks the kept chunk
    # touches (3 or 4 of 4 KiB) and the partial last block of the file
    assert os.stat(path).st_blocks <= 6 * 8
    seg, off, n = chunklog.unpack_loc(locs[keep_id])
    with open(path, "rb") as f:
        f.seek(off)
        assert f.read(n) == keep


def test_read_into_fills_spans_straight_from_the_log(monkeypatch: pytest.MonkeyPatch,
                                                     store: Store) -> None:
    """Parts of chunks lying end to end in the log land in the buffer with one
    preadv; an inline chunk is copied in; a chunk not stored, or stored with
    another length than asked, is left for the caller's checked path."""
    logged = [chunk(i) for i in range(50, 56)]
    put_logged(store, logged)
    inline_id, inline = chunk(60, 1000)
    with store.write() as w:
        w.put_chunk(inline_id, inline)
    fresh_id, fresh_data = chunk(61, 4096)
    fresh = store.append_chunks([(fresh_id, fresh_data)])  # appended, no locator stored yet
    missing = hash_bytes(b"not stored")
    # (id, length, lo, hi): the first logged chunk from 1000, the last to 500
    parts = [(logged[0][0], 65536, 1000, 65536)]
    parts += [(c, 65536, 0, 65536) for c, _ in logged[1:5]]
    parts += [(logged[5][0], 65536, 0, 500), (inline_id, 1000, 10, 990),
              (missing, 300, 0, 300), (logged[2][0], 4096, 0, 4096),
              (fresh_id, 4096, 96, 4000)]
    spans, dst = [], 0
    for cid, n, lo, hi in parts:
        spans.append((cid, n, lo, hi, dst))
        dst += hi - lo
    buf = bytearray(b"\xee" * dst)
    calls: list[int] = []
    real = os.preadv

    def counting(fd: int, views: list, off: int) -> int:
        calls.append(sum(len(v) for v in views))
        return real(fd, views, off)

    monkeypatch.setattr(os, "preadv", counting)
    with store.snapshot() as r:
        done = r.read_into(spans, memoryview(buf))
    assert done == [True] * 7 + [False, False, False]
    data = dict(logged) | {inline_id: inline}
    for (cid, _, lo, hi, at), ok in zip(spans, done, strict=True):
        want = data[cid][lo:hi] if ok else b"\xee" * (hi - lo)  # unfilled: untouched
        assert buf[at : at + hi - lo] == want
    assert calls == [64536 + 4 * 65536 + 500]  # end to end in the log and the buffer: one read
    with store.snapshot() as r:  # a commit in flight: its fresh locators answer too
        done = r.read_into(spans[-1:], memoryview(buf), fresh)
    assert done == [True]
    assert buf[spans[-1][4]:] == fresh_data[96:4000]


# --- page cache ---------------------------------------------------------------------


def resident_bytes(path: Path, lo: int = 0, hi: int | None = None) -> int:
    """Bytes of *path* (of its range lo:hi) in the page cache (mincore of a mapping)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    if not size:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    page = mmap.PAGESIZE
    vec = ctypes.create_string_buffer((size + page - 1) // page)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    end = len(vec.raw) if hi is None else (hi + page - 1) // page
    return sum(b & 1 for b in vec.raw[lo // page : end]) * page


def test_drop_cached_takes_ranges_out_of_the_page_cache_and_keeps_their_bytes(
        store: Store) -> None:
    pieces = [chunk(i) for i in range(64)]  # 4 MiB
    locs = store.log.append(pieces, durable=False)
    seg = next(Path(store.log.path).glob("*.seg"))
    assert resident_bytes(seg) >= 4 << 20
    half = [locs[cid] for cid, _ in pieces[:32]]
    assert store.log.drop_cached(half) == 2 << 20
    assert resident_bytes(seg) <= (2 << 20) + 8192  # the other half, and edges
    for cid, data in pieces:
        assert store.log.read(locs[cid]) == data  # from the disk, as written


def test_drop_behind_keeps_the_last_bytes_fetched_and_returns_the_oldest() -> None:
    behind = chunklog.DropBehind(3 << 20)
    locs = [chunklog.pack_loc(1, i << 20, 1 << 20) for i in range(6)]
    assert behind.add(locs[:3]) == []  # exactly keep: nothing to drop yet
    assert behind.add(locs[3:5]) == locs[:2]
    assert behind.add(locs[5:]) == locs[2:3]
    assert behind.add([]) == []
