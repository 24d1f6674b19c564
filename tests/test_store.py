"""The store's commit thread, content-addressed reads during a commit, and map advice."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from pathlib import Path

import pytest
import trio

from jiaozifuse.chunking import hash_bytes
from jiaozifuse.store import Store


def chunk(i: int, size: int = 65536) -> tuple[bytes, bytes]:
    data = os.urandom(size - 8) + i.to_bytes(8, "big")
    return hash_bytes(data), data


@pytest.fixture
def store(tmp_path: Path):
    s = Store.create(tmp_path / "store")
    yield s
    s.close()


def hold_committer(store: Store) -> threading.Event:
    """Keep the commit thread busy until the returned event is set."""
    gate = threading.Event()
    assert store._committer is not None
    store._committer.submit(gate.wait)
    return gate


def in_thread(fn, timeout: float = 5.0):
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result(timeout=timeout)


def test_commit_thread_makes_writes_durable_and_visible(tmp_path: Path, store: Store) -> None:
    store.use_commit_thread()
    store.begin_batch()
    cid, data = chunk(1)
    with store.write() as w:
        w.put_chunk(cid, data)
    with store.snapshot() as r:  # other threads see committed state only
        assert r.get_chunk(cid) is None
    trio.run(store.commit_async)
    with store.snapshot() as r:
        assert r.get_chunk(cid) == data
    store.close()
    again = Store.open(tmp_path / "store")
    try:
        with again.read() as r:
            assert r.get_chunk(cid) == data
    finally:
        again.close()


def test_reads_of_committed_chunks_do_not_wait_for_a_commit(store: Store) -> None:
    store.use_commit_thread()
    store.begin_batch()
    old_id, old = chunk(1)
    with store.write() as w:
        w.put_chunk(old_id, old)
    store.commit_batch()
    fresh_id, fresh = chunk(2)
    new_id, new = chunk(3)
    locs = store.append_chunks([(fresh_id, fresh)])  # fetched chunks go to the log
    with store.write() as w:
        assert w.put_chunk_at(fresh_id, locs[fresh_id])
        w.put_chunk(new_id, new)
    store.note_fresh(locs)
    gate = hold_committer(store)
    try:
        store.commit_soon()
        assert store.committing
        # committed before, or noted as fresh: answered while the commit waits
        assert in_thread(lambda: store.get_chunk(old_id), timeout=2) == old
        assert in_thread(lambda: store.get_chunk(fresh_id), timeout=2) == fresh
        assert in_thread(lambda: store.has_chunks([old_id, fresh_id]), timeout=2) == [True, True]
        # only in the batch being committed: that read has to wait for the commit
        waiting = concurrent.futures.ThreadPoolExecutor(1)
        pending = waiting.submit(store.get_chunk, new_id)
        with pytest.raises(concurrent.futures.TimeoutError):
            pending.result(timeout=0.3)
    finally:
        gate.set()
    assert pending.result(timeout=5) == new
    waiting.shutdown()
    assert not store.committing
    with store.snapshot() as r:
        assert r.get_chunk(new_id) == new and r.get_chunk(fresh_id) == fresh


def test_a_failed_commit_reaches_every_waiter_and_the_hooks(store: Store) -> None:
    store.use_commit_thread()
    store.begin_batch()
    lost: list[Exception] = []
    store.failure_hooks.append(lost.append)
    with store.write() as w:
        w.put("meta", b"k", b"v")
    boom = RuntimeError("disk on fire")
    store._commit_and_begin = lambda batch, again: (  # type: ignore[method-assign]
        batch.abort(), (store._begin() if again else None, boom))[1]
    with pytest.raises(RuntimeError, match="disk on fire"):
        trio.run(store.commit_async)
    assert lost == [boom]
    del store._commit_and_begin  # the store goes on with a fresh batch
    with store.write() as w:
        assert w.get("meta", b"k") is None  # the failed batch is gone, not half there
        w.put("meta", b"k2", b"v2")
    store.commit_batch()
    with store.snapshot() as r:
        assert r.get("meta", b"k2") == b"v2"


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile")


def test_release_mapped_pages_shrinks_the_resident_set_and_keeps_the_bytes(store: Store) -> None:
    chunks = dict(chunk(i) for i in range(1024))  # 64 MiB
    with store.write() as w:
        for cid, data in chunks.items():
            w.put_chunk(cid, data)
    with store.snapshot(buffers=True) as r:
        for cid in chunks:  # touch every page through the map
            hash_bytes(r.get_chunk(cid))
    before = _rss_file_kib()
    assert store.release_mapped_pages() >= 64 << 20
    after = _rss_file_kib()
    assert before - after >= 48 * 1024, (before, after)
    with store.snapshot() as r:
        assert all(r.get_chunk(cid) == data for cid, data in chunks.items())


def test_willneed_advises_the_chunks_and_changes_nothing(store: Store) -> None:
    chunks = dict(chunk(i) for i in range(64))
    with store.write() as w:
        for cid, data in chunks.items():
            w.put_chunk(cid, data)
    advised = store.willneed([*chunks, hash_bytes(b"not stored")])
    assert advised >= 64 * 65536
    with store.snapshot() as r:
        assert all(r.get_chunk(cid) == data for cid, data in chunks.items())
