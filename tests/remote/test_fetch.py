"""Fetching chunks from S3 into the cache: the streamed GET of writeback.fetch_to_log.

A GET's body is cut into chunks piece by piece as it arrives; every chunk is
checked against its blake3 id before it reaches the chunk log.  The cutting
is checked against plain slicing (Hypothesis); the fetch itself against a
real SeaweedFS, with pieces small enough that chunks straddle them, and with
a corrupt pack (really corrupt in the bucket, and corrupt in flight once).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jiaozifuse import chunklog, writeback
from jiaozifuse.chunking import chunk_and_hash
from jiaozifuse.errors import Corrupt
from jiaozifuse.repo import Repository


@st.composite
def layouts(draw):
    """Chunks (off, n) in a range with gaps, and piece sizes that cover it."""
    n = draw(st.integers(1, 12))
    sizes = draw(st.lists(st.integers(1, 300), min_size=n, max_size=n))
    gaps = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    start = draw(st.integers(0, 1000))
    group, pos = [], start
    for i, (size, gap) in enumerate(zip(sizes, gaps, strict=True)):
        pos += gap if i else 0
        group.append((pos, size, i.to_bytes(4, "little")))
        pos += size
    piece = draw(st.integers(1, 400))
    return start, pos, group, piece


@settings(max_examples=300, deadline=None)
@given(layouts(), st.randoms(use_true_random=False))
def test_cut_matches_slicing(layout, rnd) -> None:
    start, end, group, piece = layout
    body = bytes(rnd.randrange(256) for _ in range(end - start))
    pieces = [body[i : i + piece] for i in range(0, len(body), piece)]
    got = [(cid, bytes(data)) for done in writeback._cut(group, start, pieces)
           for cid, data in done]
    assert got == [(cid, body[off - start : off - start + n]) for off, n, cid in group]


def test_cut_reports_each_chunk_with_the_piece_that_completes_it() -> None:
    # chunks [0,4) [4,10) [12,14) in pieces of 5: the first piece completes one
    # chunk, the second (bytes 5-9) the straddling one, the third the last
    group = [(0, 4, b"a"), (4, 6, b"b"), (12, 2, b"c")]
    body = bytes(range(14))
    done = list(writeback._cut(group, 0, [body[0:5], body[5:10], body[10:14]]))
    assert [[cid for cid, _ in d] for d in done] == [[b"a"], [b"b"], [b"c"]]


# --- against SeaweedFS ------------------------------------------------------------


def data(n: int, seed: int) -> bytes:
    import blake3

    return blake3.blake3(seed.to_bytes(8, "little")).digest(length=n)


@pytest.fixture
def creds(bucket, monkeypatch):
    """The server's credentials in this process's environment (boto3 reads them there)."""
    s3, name = bucket
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return s3, name


@pytest.fixture
def pushed(tmp_path, creds):
    """A repository with 6 MiB of file data synced to the bucket, and an empty clone."""
    s3, name = creds
    url = f"s3://{name}/repo"
    src = tmp_path / "src"
    src.mkdir()
    content = data(6 << 20, 5)
    (src / "f.bin").write_bytes(content)
    a = Repository.init(tmp_path / "a", remote=url, endpoint_url=s3.endpoint)
    a.import_dir("main", src)
    a.commit("main", "data")
    a.sync()
    a.close()
    b = Repository.clone(url, tmp_path / "b", endpoint_url=s3.endpoint)
    yield s3, name, b
    b.close()


def chunk_ids(repo: Repository) -> list[bytes]:
    """The ids of the chunks the clone knows only as located in a pack."""
    with repo.store.read() as r:
        return [bytes(k) for k, v in r.prefix("located", b"")
                if writeback._LOC.unpack(v)[3] == b"C" and not r.has_chunk(bytes(k))]


def record(repo: Repository, locs: dict[bytes, bytes]) -> None:
    with repo.store.write() as w:
        unused = writeback.store_fetched_locs(w, locs)
    assert unused == []
    repo.store.commit_batch()


def test_streamed_fetch_caches_every_chunk_intact(pushed, monkeypatch) -> None:
    repo = pushed[2]
    monkeypatch.setattr(writeback, "FETCH_PIECE", 100_000)  # chunks straddle pieces
    ids = chunk_ids(repo)
    assert len(ids) > 20
    before = repo.remote.requests
    sizes, locs = writeback.fetch_to_log(repo.store, repo.remote, ids)
    assert repo.remote.requests - before == 1  # one pack, one ranged GET
    assert set(sizes) == set(locs) == set(ids)
    record(repo, locs)
    import blake3

    with repo.store.read() as r:
        for cid in ids:
            chunk = r.get_chunk(cid)
            assert len(chunk) == sizes[cid] and blake3.blake3(chunk).digest() == cid
    assert writeback.fetch_to_log(repo.store, repo.remote, ids)[1] == {}  # all cached now


def test_a_chunk_corrupted_in_flight_is_fetched_again(pushed, monkeypatch) -> None:
    repo = pushed[2]
    ids = chunk_ids(repo)
    real = repo.remote.get_pieces
    calls = []

    def flaky(key, start, length, piece):
        calls.append(key)
        for i, p in enumerate(real(key, start, length, piece)):
            if len(calls) == 1 and i == 0:  # one bit of the first GET's first piece
                p = bytearray(p)
                p[len(p) // 2] ^= 1
                p = bytes(p)
            yield p

    monkeypatch.setattr(repo.remote, "get_pieces", flaky)
    locs = writeback.fetch_to_log(repo.store, repo.remote, ids)[1]
    assert len(calls) == 1 and set(locs) == set(ids)  # the bad chunk came by a plain GET
    record(repo, locs)
    import blake3

    with repo.store.read() as r:
        assert all(blake3.blake3(r.get_chunk(c)).digest() == c for c in ids)


def test_a_chunk_corrupt_in_the_bucket_is_refused(pushed) -> None:
    s3, name, repo = pushed
    ids = chunk_ids(repo)
    with repo.store.read() as r:
        pack, off, n, _ = writeback.locate(r, ids[0])
    client = s3.client()
    key = f"repo/packs/{pack.hex()}.pack"
    body = bytearray(client.get_object(Bucket=name, Key=key)["Body"].read())
    body[off + n // 2] ^= 0x10
    client.put_object(Bucket=name, Key=key, Body=bytes(body))
    with pytest.raises(Corrupt, match="blake3"):
        writeback.fetch_to_log(repo.store, repo.remote, ids)
    with repo.store.read() as r:
        assert not r.has_chunk(ids[0])  # nothing recorded for it, nothing served


def test_fetch_of_chunks_in_two_packs(tmp_path, creds) -> None:
    """Two syncs make two packs: one GET each, in parallel, all chunks intact."""
    s3, name = creds
    url = f"s3://{name}/repo"
    a = Repository.init(tmp_path / "a", remote=url, endpoint_url=s3.endpoint)
    for i in range(2):
        src = tmp_path / f"src{i}"
        src.mkdir()
        (src / f"f{i}.bin").write_bytes(data(3 << 20, 10 + i))
        a.import_dir("main", src)
        a.commit("main", f"c{i}")
        a.sync()
    a.close()
    b = Repository.clone(url, tmp_path / "b", endpoint_url=s3.endpoint)
    try:
        ids = chunk_ids(b)
        packs = set()
        with b.store.read() as r:
            for c in ids:
                packs.add(writeback.locate(r, c)[0])
        assert len(packs) == 2
        before = b.remote.requests
        locs = writeback.fetch_to_log(b.store, b.remote, ids)[1]
        assert b.remote.requests - before == 2 and set(locs) == set(ids)
        record(b, locs)
        import blake3

        with b.store.read() as r:
            assert all(blake3.blake3(r.get_chunk(c)).digest() == c for c in ids)
    finally:
        b.close()


# --- a located pack gone from the remote -------------------------------------------


def copy_pack(s3, name: str, pack: bytes) -> bytes:
    """Put a second copy of a pack (and its index) under another name, as when two
    machines upload the same chunks; return the copy's id."""
    import blake3

    client = s3.client()
    other = blake3.blake3(pack).digest()
    for ext in ("pack", "idx"):
        body = client.get_object(Bucket=name, Key=f"repo/packs/{pack.hex()}.{ext}")["Body"].read()
        client.put_object(Bucket=name, Key=f"repo/packs/{other.hex()}.{ext}", Body=body)
    return other


def delete_pack(s3, name: str, pack: bytes) -> None:
    client = s3.client()
    for ext in ("pack", "idx"):
        client.delete_object(Bucket=name, Key=f"repo/packs/{pack.hex()}.{ext}")


def test_a_gone_pack_is_read_from_another_copy(tmp_path, pushed) -> None:
    """Machine B located chunks in a pack that a gc on machine A deleted as a
    duplicate: B's cache miss finds the other copy (and records it) instead of failing."""
    s3, name, b = pushed
    ids = chunk_ids(b)
    with b.store.read() as r:
        first = writeback.locate(r, ids[0])[0]
    other = copy_pack(s3, name, first)
    c = Repository.clone(f"s3://{name}/repo", tmp_path / "c", endpoint_url=s3.endpoint)
    try:
        with c.store.read() as r:
            located = writeback.locate(r, ids[0])[0]
        assert located in (first, other)
        delete_pack(s3, name, located)  # the copy c located is gone
        locs = writeback.fetch_to_log(c.store, c.remote, ids)[1]
        assert set(locs) == set(ids)
        record(c, locs)
        with c.store.write() as w:
            writeback.record_moved(w, c.store)
        c.store.commit_batch()
        survivor = other if located == first else first
        with c.store.read() as r:
            assert all(writeback.locate(r, cid)[0] == survivor for cid in ids)
            assert all(hash_ok(r.get_chunk(cid), cid) for cid in ids)
        assert c.store.moved == {}
    finally:
        c.close()


def test_a_read_through_the_repository_records_the_other_copy(tmp_path, pushed) -> None:
    s3, name, b = pushed
    ids = chunk_ids(b)
    with b.store.read() as r:
        first = writeback.locate(r, ids[0])[0]
    other = copy_pack(s3, name, first)
    writeback.download_metadata(b.store, b.remote)  # b learns the copy too
    with b.store.read() as r:
        located = writeback.locate(r, ids[0])[0]
    delete_pack(s3, name, located)
    assert hash_ok(b._read_chunk(ids[0]), ids[0])
    with b.store.read() as r:
        assert writeback.locate(r, ids[0])[0] == (other if located == first else first)


def test_a_chunk_whose_every_copy_is_gone_is_a_clear_error(pushed) -> None:
    s3, name, b = pushed
    ids = chunk_ids(b)
    with b.store.read() as r:
        first = writeback.locate(r, ids[0])[0]
    delete_pack(s3, name, first)
    with pytest.raises(Corrupt, match="gone from the remote with no other copy"):
        writeback.fetch_to_log(b.store, b.remote, ids)


def hash_ok(data: bytes | None, cid: bytes) -> bool:
    import blake3

    return data is not None and blake3.blake3(data).digest() == cid


def test_a_mount_reads_through_a_gone_pack(tmp_path, pushed) -> None:
    """The same through a mount: the daemon's fetcher finds the other copy, the
    file reads back whole, and the copy is recorded for the next cold read."""
    import json

    from mount.conftest import Mount, jz, teardown

    s3, name, b = pushed
    ids = chunk_ids(b)
    with b.store.read() as r:
        first = writeback.locate(r, ids[0])[0]
    other = copy_pack(s3, name, first)
    repo = tmp_path / "c"
    jz("clone", f"s3://{name}/repo", str(repo), env=s3.env())
    c = Repository.open(repo)
    with c.store.read() as r:
        located = writeback.locate(r, ids[0])[0]
    c.close()
    delete_pack(s3, name, located)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    jz("mount", str(repo), str(mnt), env=s3.env())
    m = Mount(repo, mnt, json.loads((mnt / ".jiaozifuse-mount").read_text())["pid"])
    try:
        assert (m.main / "f.bin").read_bytes() == data(6 << 20, 5)
    finally:
        teardown(m)
    c = Repository.open(repo)
    try:
        survivor = other if located == first else first
        with c.store.read() as r:
            assert {writeback.locate(r, cid)[0] for cid in ids} == {survivor}
    finally:
        c.close()


def log_blocks(repo: Repository) -> int:
    """Disk blocks the chunk log's segments hold (holes punched do not count)."""
    return sum(p.stat().st_blocks for p in Path(repo.store.log.path).glob("*.seg"))


def test_a_get_failing_mid_body_leaves_no_bytes_in_the_log(pushed, monkeypatch) -> None:
    """An outage in the middle of a GET: the error reaches the caller, and the
    pieces already written to the chunk log are given back (nothing will name them)."""
    from jiaozifuse.remote import RemoteError

    repo = pushed[2]
    monkeypatch.setattr(writeback, "FETCH_PIECE", 1 << 20)
    ids = chunk_ids(repo)
    real = repo.remote.get_pieces

    def cut_off(key, start, length, piece):
        for i, p in enumerate(real(key, start, length, piece)):
            if i == 3:
                raise RemoteError("GET: connection reset (injected)")
            yield p

    monkeypatch.setattr(repo.remote, "get_pieces", cut_off)
    before = log_blocks(repo)
    with pytest.raises(RemoteError, match="injected"):
        writeback.fetch_to_log(repo.store, repo.remote, ids)
    assert log_blocks(repo) - before < 64  # 3 MiB were written: 6,144 blocks
    with repo.store.read() as r:
        assert not any(r.has_chunk(c) for c in ids)



@pytest.mark.parametrize("drop_mib", [0, 4])
def test_a_cold_read_leaves_fetched_chunks_in_the_page_cache_only_behind_the_window(
        tmp_path, creds, drop_mib) -> None:
    """``mount --drop-behind-mib``: chunks fetched for a cold read leave the
    chunk log's page cache once that much more was fetched after them (the
    mount keeps its own copy; the log's would be a second one), and the files
    still read back whole.  a.bin (4 MiB) is read, then b.bin (5 MiB): with
    4, a.bin's chunks are out of the page cache afterwards; with 0 (never)
    they are all still there."""
    import json
    import time

    from mount.conftest import Mount, jz, teardown
    from test_chunklog import resident_bytes

    s3, name = creds
    url = f"s3://{name}/repo"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(data(4 << 20, 7))
    (src / "b.bin").write_bytes(data(5 << 20, 8))
    a = Repository.init(tmp_path / "a", remote=url, endpoint_url=s3.endpoint)
    a.import_dir("main", src)
    a.commit("main", "data")
    a.sync()
    a.close()
    repo = tmp_path / "b"
    jz("clone", url, str(repo), env=s3.env())
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    jz("mount", str(repo), str(mnt), "--drop-behind-mib", str(drop_mib), env=s3.env())
    m = Mount(repo, mnt, json.loads((mnt / ".jiaozifuse-mount").read_text())["pid"])
    try:
        assert (m.main / "a.bin").read_bytes() == data(4 << 20, 7)
        assert (m.main / "b.bin").read_bytes() == data(5 << 20, 8)
        ids = [cid for cid, _ in chunk_and_hash(data(4 << 20, 7))]
        deadline = time.monotonic() + 10
        while True:  # fetched chunks are committed, and dropped, in the background
            c = Repository.open(repo, readonly=True)
            try:
                with c.store.read() as r:  # where a.bin's chunks are in the log
                    locs = [r.chunk_loc(cid) for cid in ids]
            finally:
                c.close()
            cached = sum(resident_bytes(repo / "store" / "log" / f"{seg:08d}.seg", off, off + n)
                         for seg, off, n in map(chunklog.unpack_loc, filter(None, locs)))
            if None not in locs and (not drop_mib or cached <= 64 << 10):
                break
            assert time.monotonic() < deadline, (locs.count(None), cached)
            time.sleep(0.1)
    finally:
        teardown(m)
    if drop_mib:  # at most a page a.bin's last chunk shares with b.bin's first
        assert cached <= 64 << 10, cached
    else:
        assert cached >= 4 << 20, cached
