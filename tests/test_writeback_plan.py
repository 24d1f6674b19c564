"""How the upload queue is cut into packs (writeback.plan), without S3.

Closing a small file queues its chunk and then its objects, so the queue
alternates between the two; the packs must not follow that alternation.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jiaozifuse import writeback
from jiaozifuse.chunking import hash_bytes
from jiaozifuse.store import Store


@pytest.fixture
def store(tmp_path: Path):
    s = Store.create(tmp_path / "store")
    s.queue_uploads = True
    yield s
    s.close()


def small_files(store: Store, n: int, start: int = 0) -> tuple[set[bytes], set[bytes]]:
    """Store *n* files' worth of one chunk then one object each, as a close does."""
    chunks, objects = set(), set()
    for i in range(start, start + n):
        data = os.urandom(4000) + i.to_bytes(8, "big")
        obj = b"manifest of " + i.to_bytes(8, "big")
        with store.write() as w:
            cid = hash_bytes(data)
            w.put_chunk(cid, data)
            oid = hash_bytes(obj)
            w.put_object(oid, obj)
        chunks.add(cid)
        objects.add(oid)
    return chunks, objects


def queued(store: Store) -> list[int]:
    with store.read() as r:
        return [int.from_bytes(k, "big") for k, _ in r.prefix("upload", b"")]


def oids(b: writeback.Batch) -> set[bytes]:
    return {oid for _, oid, _, _ in b.entries}


def test_interleaved_chunks_and_objects_make_one_pack_each(store: Store) -> None:
    chunks, objects = small_files(store, 50)
    batches = writeback.plan(store, 0)
    assert [b.kind for b in batches] == ["pack", "opack"]
    pack, opack = batches
    assert oids(pack) == chunks and oids(opack) == objects
    assert sorted(pack.seqs + opack.seqs) == queued(store)
    assert pack.cut == opack.cut == "end"
    # every entry's bytes are where the index says
    with store.read() as r:
        for _, oid, off, n in pack.entries:
            assert bytes(pack.data[off:off + n]) == r.get_chunk(oid)
        for _, oid, off, n in opack.entries:
            assert bytes(opack.data[off:off + n]) == r.get_object(oid)
    assert writeback.plan(store, max(opack.seqs)) == []


def test_a_ref_change_cuts_the_data_and_goes_alone(store: Store) -> None:
    first = small_files(store, 20)
    with store.write() as w:
        w.put("refs", b"branch/main", b"\1" * 32)
    second = small_files(store, 30, start=20)

    data = writeback.plan(store, 0)
    assert {b.cut for b in data} == {"barrier"}
    assert set().union(*map(oids, data)) == first[0] | first[1]
    after = max(max(b.seqs) for b in data)
    ref = writeback.plan(store, after)
    assert [(b.kind, b.ref) for b in ref] == [("ref", "branch/main")]
    rest = writeback.plan(store, ref[0].seqs[0])
    assert set().union(*map(oids, rest)) == second[0] | second[1]
    assert {b.cut for b in rest} == {"end"}


def test_full_packs_cover_the_queue_without_gaps(store: Store, monkeypatch) -> None:
    monkeypatch.setattr(writeback, "PACK_TARGET", 40_000)
    chunks, objects = small_files(store, 60)
    after, seen, seqs, cuts = 0, set(), [], []
    while batches := writeback.plan(store, after):
        assert all(len(b.data) < 40_000 + 4100 for b in batches)
        for b in batches:
            seen |= oids(b)
            seqs += b.seqs
        cuts.append(batches[0].cut)
        after = max(max(b.seqs) for b in batches)
    assert seen == chunks | objects
    assert sorted(seqs) == queued(store)  # each queued entry in exactly one batch
    assert cuts[-1] == "end" and set(cuts[:-1]) == {"full"}
