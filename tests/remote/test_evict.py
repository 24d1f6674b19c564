"""Cache eviction (writeback.evict) against a real SeaweedFS: only chunks S3 holds go.

The mount-level cache bound is tested in test_remote.py; here the rule itself,
with the uploads stopped at a known point: a chunk not yet uploaded is never
dropped, however far over its bound the cache is, and the chunks that are
dropped come back from S3 intact.
"""

from __future__ import annotations

import blake3
import pytest

from jiaozifuse import writeback
from jiaozifuse.chunking import chunk_and_hash
from jiaozifuse.repo import Repository


def data(n: int, seed: int) -> bytes:
    return blake3.blake3(seed.to_bytes(8, "little")).digest(length=n)


@pytest.fixture
def repo(tmp_path, bucket, monkeypatch):
    s3, name = bucket
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    r = Repository.init(tmp_path / "a", remote=f"s3://{name}/repo", endpoint_url=s3.endpoint)
    try:
        yield r
    finally:
        r.close()


def test_eviction_drops_only_what_s3_holds_and_it_reads_back(tmp_path, repo) -> None:
    synced, local = data(6 << 20, 1), data(6 << 20, 2)
    src = tmp_path / "src"
    src.mkdir()
    (src / "synced.bin").write_bytes(synced)
    repo.import_dir("main", src)
    repo.commit("main", "in S3")
    repo.sync()
    (src / "local.bin").write_bytes(local)
    repo.import_dir("main", src)
    repo.commit("main", "not yet uploaded")  # queued, never sent: no sync, no daemon
    s_ids = [cid for cid, _ in chunk_and_hash(synced)]
    l_ids = [cid for cid, _ in chunk_and_hash(local)]

    freed = writeback.evict(repo.store, 1 << 20, repo.access)

    with repo.store.read() as r:
        assert all(r.has_chunk(c) for c in l_ids)  # over the bound, all kept
        gone = [c for c in s_ids if not r.has_chunk(c)]
    assert gone and freed >= 4 << 20  # the uploaded ones went, down toward the bound
    out = tmp_path / "out"
    repo.export("main", out)  # reads through the cache: fetched back, verified
    assert (out / "synced.bin").read_bytes() == synced
    assert (out / "local.bin").read_bytes() == local
