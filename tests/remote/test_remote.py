"""A repository in S3: write-back, clone, conflicts, outages, the cache bound.

Everything runs against a real SeaweedFS server (tests/s3server.py) and real
FUSE mounts (tests/mount/conftest.py helpers).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mount.conftest import have_fuse, is_mounted, jz, start_mount, teardown

pytestmark = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")


def blob(n: int, seed: int) -> bytes:
    import blake3

    return blake3.blake3(seed.to_bytes(8, "little")).digest(length=n)


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            p = Path(dirpath) / f
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "->" + os.readlink(p)
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def mounts():
    made = []
    yield made
    for m in made:
        teardown(m)


def init_remote(tmp_path: Path, s3, bucket: str, name: str = "a", *extra: str) -> Path:
    repo = tmp_path / f"{name}-repo"
    jz("init", str(repo), "--remote", f"s3://{bucket}/repo", "--endpoint-url", s3.endpoint,
       *extra, env=s3.env())
    return repo


def test_write_sync_clone_read_back(tmp_path, bucket, mounts) -> None:
    s3, name = bucket
    repo = init_remote(tmp_path, s3, name)
    m = start_mount_env(repo, tmp_path / "a-mnt", s3)
    mounts.append(m)
    data = blob(24 << 20, 1)
    (m.main / "data").mkdir()
    (m.main / "data" / "big.bin").write_bytes(data)
    (m.main / "data" / "small.txt").write_text("hello\n")
    os.symlink("small.txt", m.main / "data" / "link")
    jz("commit", "-m", "first", cwd=m.main, env=s3.env())
    (m.main / "uncommitted.txt").write_text("not committed yet\n")
    res = jz("sync", "--wait", "--json", cwd=m.main, env=s3.env())
    status = json.loads(res.stdout)["status"]
    assert status["queued"] == {"chunks": 0, "objects": 0, "refs": 0}
    want = tree_digest(m.main / "data")

    clone = tmp_path / "b-repo"
    jz("clone", f"s3://{name}/repo", str(clone), env=s3.env())
    assert not any(True for _ in iter_chunks(clone)), "a clone starts with an empty cache"
    m2 = start_mount_env(clone, tmp_path / "b-mnt", s3)
    mounts.append(m2)
    assert tree_digest(m2.main / "data") == want
    assert (m2.main / "data" / "big.bin").read_bytes() == data
    log = json.loads(jz("log", "--json", cwd=m2.main, env=s3.env()).stdout)
    assert [c["message"] for c in log][:1] == ["first"]
    # the commit shows as a snapshot on the other machine too
    assert (m2.mnt / ".commits" / log[0]["id"] / "data" / "small.txt").read_text() == "hello\n"


def iter_chunks(repo: Path):
    import lmdb

    env = lmdb.open(str(repo / "store"), max_dbs=32, readonly=True, lock=False)
    try:
        for name in (b"chunks", b"chunkloc"):  # inline, and in the chunk log
            db = env.open_db(name, create=False)
            with env.begin() as t:
                yield from (k for k, _ in t.cursor(db=db))
    finally:
        env.close()


def start_mount_env(repo: Path, mnt: Path, s3, *extra: str):
    mnt.mkdir(parents=True, exist_ok=True)
    jz("mount", str(repo), str(mnt), *extra, env=s3.env())
    info = json.loads((mnt / ".jiaozifuse-mount").read_text())
    from mount.conftest import Mount

    return Mount(repo, mnt, info["pid"])


def test_two_caches_commit_one_branch_lose_nothing(tmp_path, bucket) -> None:
    s3, name = bucket
    env = s3.env()
    a = init_remote(tmp_path, s3, name)
    jz("sync", "--repo", str(a), env=env)
    b = tmp_path / "b-repo"
    jz("clone", f"s3://{name}/repo", str(b), env=env)
    for repo, fname in ((a, "from-a.txt"), (b, "from-b.txt")):
        src = tmp_path / f"src-{fname}"
        src.mkdir()
        (src / fname).write_text(fname)
        jz("import", str(src), "--repo", str(repo), env=env)
    jz("commit", "-m", "a", "--wait", "--repo", str(a), env=env)
    res = jz("commit", "-m", "b", "--wait", "--repo", str(b), env=env, check=False)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    head_a = json.loads(jz("log", "-n", "1", "--json", "--repo", str(a), env=env).stdout)[0]
    head_b = json.loads(jz("log", "-n", "1", "--json", "--repo", str(b), env=env).stdout)[0]
    assert head_a["id"][:12] in res.stderr and head_b["id"][:12] in res.stderr
    # retry after fetching: merge the remote head, push
    fetched = json.loads(jz("fetch", "--json", "--repo", str(b), env=env).stdout)
    assert fetched["diverged"]
    jz("merge", "remote/main", "--repo", str(b), env=env)
    res = jz("sync", "--wait", "--repo", str(b), env=env)
    jz("fetch", "--repo", str(a), env=env)
    out = tmp_path / "out"
    jz("export", "main", str(out), "--repo", str(a), env=env)
    assert sorted(os.listdir(out)) == ["from-a.txt", "from-b.txt"]


def test_cache_stays_under_its_bound(tmp_path, bucket, mounts) -> None:
    s3, name = bucket
    env = s3.env()
    repo = init_remote(tmp_path, s3, name, "a", "--cache-size", "8M")
    src = tmp_path / "src"
    src.mkdir()
    files = {f"f{i}.bin": blob(6 << 20, 100 + i) for i in range(6)}
    for fname, data in files.items():
        (src / fname).write_bytes(data)
    jz("import", str(src), "--repo", str(repo), env=env)
    jz("commit", "-m", "36 MiB", "--repo", str(repo), env=env)
    jz("sync", "--wait", "--repo", str(repo), env=env)
    st = json.loads(jz("remote", "status", "--json", "--repo", str(repo), env=env).stdout)
    assert st["cached_chunk_bytes"] <= 8 << 20
    # reading everything back through a mount works, and the cache stays bounded
    m = start_mount_env(repo, tmp_path / "mnt", s3)
    mounts.append(m)
    for fname, data in files.items():
        assert (m.main / fname).read_bytes() == data
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = json.loads(jz("remote", "status", "--json", "--repo", str(repo), env=env).stdout)
        if st["cached_chunk_bytes"] <= 8 << 20:
            break
        time.sleep(0.5)
    assert st["cached_chunk_bytes"] <= 8 << 20
    # and on disk: evicted chunks' ranges of the chunk log are given back
    log_disk = sum(p.stat().st_blocks * 512 for p in (repo / "store" / "log").glob("*.seg"))
    assert 0 < log_disk <= (8 << 20) + (4 << 20), log_disk


def test_sigkill_while_uploading_resumes(tmp_path, bucket, mounts) -> None:
    s3, name = bucket
    env = s3.env()
    repo = init_remote(tmp_path, s3, name)
    m = start_mount_env(repo, tmp_path / "mnt", s3)
    datas = {f"f{i}.bin": blob(16 << 20, 200 + i) for i in range(4)}
    for fname, data in datas.items():
        with open(m.main / fname, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    os.kill(m.pid, signal.SIGKILL)  # the write-back is under way or about to be
    time.sleep(0.5)
    subprocess.run(["fusermount3", "-uz", str(m.mnt)], capture_output=True)
    m = start_mount_env(repo, tmp_path / "mnt", s3)
    mounts.append(m)
    for fname, data in datas.items():
        assert (m.main / fname).read_bytes() == data
    jz("commit", "-m", "after the crash", cwd=m.main, env=env)
    jz("sync", "--wait", cwd=m.main, env=env)
    clone = tmp_path / "clone"
    jz("clone", f"s3://{name}/repo", str(clone), env=env)
    out = tmp_path / "out"
    jz("export", "main", str(out), "--repo", str(clone), env=env)
    for fname, data in datas.items():
        assert (out / fname).read_bytes() == data


def test_outage_then_recovery(tmp_path, s3_fresh, mounts) -> None:
    s3 = s3_fresh
    name = s3.make_bucket("outage")
    env = s3.env()
    repo = init_remote(tmp_path, s3, name)
    m = start_mount_env(repo, tmp_path / "mnt", s3)
    mounts.append(m)
    s3.stop()
    data = blob(5 << 20, 7)
    (m.main / "during-outage.bin").write_bytes(data)  # writes never wait for S3
    jz("commit", "-m", "offline", cwd=m.main, env=env)
    assert (m.main / "during-outage.bin").read_bytes() == data
    st = json.loads(jz("remote", "status", "--json", cwd=m.main, env=env).stdout)
    assert st["queued"]["chunks"] > 0
    s3.start()
    jz("sync", "--wait", cwd=m.main, env=env)
    clone = tmp_path / "clone"
    jz("clone", f"s3://{name}/repo", str(clone), env=env)
    out = tmp_path / "out"
    jz("export", "main", str(out), "--repo", str(clone), env=env)
    assert (out / "during-outage.bin").read_bytes() == data


def test_wrong_credentials_clear_error_nothing_lost(tmp_path, bucket) -> None:
    s3, name = bucket
    bad = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret-xyz"}
    res = jz("init", str(tmp_path / "r"), "--remote", f"s3://{name}/repo", "--endpoint-url",
             s3.endpoint, env=bad, check=False)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert "not-the-secret-xyz" not in res.stderr + res.stdout
    # a working repository whose credentials go bad keeps its data locally
    repo = init_remote(tmp_path, s3, name, "ok")
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep.txt").write_text("precious\n")
    jz("import", str(src), "--repo", str(repo), env=bad)
    jz("commit", "-m", "c", "--repo", str(repo), env=bad)
    res = jz("sync", "--wait", "--repo", str(repo), env=bad, check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "not-the-secret-xyz" not in res.stderr + res.stdout
    out = tmp_path / "out"
    jz("export", "main", str(out), "--repo", str(repo), env=bad)
    assert (out / "keep.txt").read_text() == "precious\n"
    jz("sync", "--wait", "--repo", str(repo), env=s3.env())


def test_unmount_leaves_nothing(tmp_path, bucket) -> None:
    s3, name = bucket
    repo = init_remote(tmp_path, s3, name)
    m = start_mount_env(repo, tmp_path / "mnt", s3)
    teardown(m)
    assert not is_mounted(m.mnt)


_ = start_mount


def test_lost_machine_recovers_checkpointed_worktree(tmp_path, bucket, mounts) -> None:
    """Uncommitted work reaches the remote within seconds; a new clone adopts it."""
    s3, name = bucket
    env = s3.env()
    repo = init_remote(tmp_path, s3, name)
    m = start_mount_env(repo, tmp_path / "mnt", s3)
    data = blob(3 << 20, 9)
    (m.main / "draft.bin").write_bytes(data)
    closed = time.monotonic()
    cache_id = json.loads(jz("remote", "status", "--json", cwd=m.main, env=env).stdout)[
        "cache_id"]
    client = s3.client()
    key = f"repo/worktrees/{cache_id}/main"
    while time.monotonic() - closed < 30:
        try:
            client.head_object(Bucket=name, Key=key)
            break
        except Exception:
            time.sleep(0.2)
    lag = time.monotonic() - closed
    print(f"checkpoint visible in S3 {lag:.1f} s after close")
    assert lag < 15
    time.sleep(1.0)  # the checkpoint entry goes after the data it names
    os.kill(m.pid, signal.SIGKILL)  # the machine is lost
    subprocess.run(["fusermount3", "-uz", str(m.mnt)], capture_output=True)
    clone = tmp_path / "clone"
    jz("clone", f"s3://{name}/repo", str(clone), "--recover", cache_id, env=env)
    st = json.loads(jz("status", "--json", "--repo", str(clone), env=env).stdout)
    assert [c["path"] for c in st["changes"]] == ["draft.bin"]
    out = tmp_path / "out"
    jz("commit", "-m", "recovered", "--repo", str(clone), env=env)
    jz("export", "main", str(out), "--repo", str(clone), env=env)
    assert (out / "draft.bin").read_bytes() == data


def test_small_files_closed_one_by_one_go_out_in_few_packs(tmp_path, bucket, mounts) -> None:
    """Files closed while uploads run are gathered into packs, not sent one by one.

    The background uploader used to chase the writers: each file closed while
    the previous pack was in flight went out as a pack of its own (three PUTs
    per small file), which made creating files through a mount with a remote
    five times slower than without one.
    """
    s3, name = bucket
    env = s3.env()
    repo = init_remote(tmp_path, s3, name)
    m = start_mount_env(repo, tmp_path / "mnt", s3)
    mounts.append(m)
    (m.main / "samples").mkdir()
    n = 400
    start = time.monotonic()
    for i in range(n):  # spread over a few of the uploader's rounds
        (m.main / "samples" / f"s{i:04d}").write_bytes(blob(4096, 1000 + i))
        time.sleep(max(0.0, start + 2.0 * (i + 1) / n - time.monotonic()))
    res = jz("sync", "--wait", "--json", cwd=m.main, env=env)
    assert json.loads(res.stdout)["status"]["queued"] == {"chunks": 0, "objects": 0, "refs": 0}
    keys = [o["Key"] for page in s3.client().get_paginator("list_objects_v2").paginate(
        Bucket=name, Prefix="repo/packs/") for o in page.get("Contents", [])]
    packs = [k for k in keys if k.endswith(".pack")]
    opacks = [k for k in keys if k.endswith(".opack")]
    print(f"{n} files closed over {time.monotonic() - start:.1f} s: "
          f"{len(packs)} packs, {len(opacks)} object packs")
    assert len(packs) <= n // 10 and len(opacks) <= n // 10


@pytest.mark.parametrize("mounted", [True, False], ids=["daemon", "no-daemon"])
def test_sync_wait_makes_uncommitted_work_recoverable_at_once(tmp_path, bucket, mounts,
                                                              mounted) -> None:
    """sync --wait covers what was written and not committed: a clone can adopt it
    right after, without waiting for the periodic checkpoint."""
    s3, name = bucket
    env = s3.env()
    repo = init_remote(tmp_path, s3, name)
    data = {f"d/f{i}": blob(5000 + i, 50 + i) for i in range(20)}
    if mounted:
        m = start_mount_env(repo, tmp_path / "mnt", s3)
        mounts.append(m)
        (m.main / "d").mkdir()
        for rel, b in data.items():
            (m.main / rel).write_bytes(b)
    else:
        src = tmp_path / "src"
        (src / "d").mkdir(parents=True)
        for rel, b in data.items():
            (src / rel).write_bytes(b)
        jz("import", str(src), "--repo", str(repo), env=env)
    jz("sync", "--wait", "--repo", str(repo), env=env)
    cache_id = json.loads(jz("remote", "status", "--json", "--repo", str(repo),
                             env=env).stdout)["cache_id"]
    if mounted:  # the machine is lost right after sync returned
        os.kill(m.pid, signal.SIGKILL)
        subprocess.run(["fusermount3", "-uz", str(m.mnt)], capture_output=True)
    clone = tmp_path / "clone"
    jz("clone", f"s3://{name}/repo", str(clone), "--recover", cache_id, env=env)
    jz("commit", "-m", "recovered", "--repo", str(clone), env=env)
    out = tmp_path / "out"
    jz("export", "main", str(out), "--repo", str(clone), env=env)
    for rel, b in data.items():
        assert (out / rel).read_bytes() == b


def test_a_flipped_bit_in_the_cache_is_refetched(tmp_path, bucket) -> None:
    """A corrupt cached chunk is never served: it is fetched again from S3."""
    import lmdb

    s3, name = bucket
    env = s3.env()
    repo = init_remote(tmp_path, s3, name)
    src = tmp_path / "src"
    src.mkdir()
    data = blob(2 << 20, 77)
    (src / "f.bin").write_bytes(data)
    jz("import", str(src), "--repo", str(repo), env=env)
    jz("commit", "-m", "c", "--repo", str(repo), env=env)
    jz("sync", "--wait", "--repo", str(repo), env=env)
    lenv = lmdb.open(str(repo / "store"), max_dbs=32)
    db = lenv.open_db(b"chunks")
    with lenv.begin(write=True) as t:
        key, value = next((bytes(k), bytes(v)) for k, v in t.cursor(db=db) if len(v) > 1000)
        bad = bytearray(value)
        bad[100] ^= 0x40
        t.put(key, bytes(bad), db=db)
    lenv.close()
    report = json.loads(jz("fsck", "--json", "--repo", str(repo), env=env,
                           check=False).stdout)
    assert not report["ok"] and any(p["kind"] == "bad-chunk" for p in report["problems"])
    out = tmp_path / "out"
    jz("export", "main", str(out), "--repo", str(repo), env=env)
    assert (out / "f.bin").read_bytes() == data  # served from S3, verified
    report = json.loads(jz("fsck", "--json", "--repo", str(repo), env=env).stdout)
    assert report["ok"]


def test_outage_fills_the_cache_then_enospc_until_uploads_drain(tmp_path, s3_fresh,
                                                                 mounts) -> None:
    """S3 down: writes go on into the cache up to --cache-size, then ENOSPC
    (never a cache that grows without bound, never a lost acknowledged byte);
    once S3 is back and the queue drained, writes work again."""
    import errno

    s3 = s3_fresh
    name = s3.make_bucket("enospc")
    env = s3.env()
    limit = 24 << 20
    repo = init_remote(tmp_path, s3, name, "a", "--cache-size", str(limit))
    m = start_mount_env(repo, tmp_path / "mnt", s3)
    mounts.append(m)
    s3.stop()
    data = blob(200 << 20, 11)
    acked = 0
    err = None
    fd = os.open(m.main / "filling.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while acked < len(data):
            try:
                acked += os.write(fd, data[acked : acked + (1 << 20)])
            except OSError as exc:
                err = exc
                break
    finally:
        os.close(fd)
    assert err is not None and err.errno == errno.ENOSPC, f"no ENOSPC after {acked} bytes"
    # the cache took about its bound (plus at most a write buffer), not more
    assert limit // 2 <= acked <= limit + (17 << 20), acked
    assert (m.main / "filling.bin").read_bytes() == data[:acked]
    st = json.loads(jz("remote", "status", "--json", cwd=m.main, env=env).stdout)
    assert st["refusing_writes"] and st["last_error"], st
    assert st["queued_bytes"] >= limit // 2
    log = (repo / "run" / "daemon.log").read_text()
    assert "cache full of data not yet uploaded" in log and "S3 is unreachable" in log
    with pytest.raises(OSError) as exc_info:
        (m.main / "another.bin").write_bytes(b"x" * (1 << 20))
    assert exc_info.value.errno == errno.ENOSPC

    s3.start()
    jz("sync", "--wait", cwd=m.main, env=env)
    st = json.loads(jz("remote", "status", "--json", cwd=m.main, env=env).stdout)
    assert st["queued"]["chunks"] == 0 and not st["refusing_writes"], st
    more = blob(8 << 20, 12)
    (m.main / "after.bin").write_bytes(more)  # writes are accepted again
    assert (m.main / "after.bin").read_bytes() == more
    assert (m.main / "filling.bin").read_bytes() == data[:acked]
    jz("commit", "-m", "after the outage", cwd=m.main, env=env)
    jz("sync", "--wait", cwd=m.main, env=env)
    clone = tmp_path / "clone"
    jz("clone", f"s3://{name}/repo", str(clone), env=env)
    out = tmp_path / "out"
    jz("export", "main", str(out), "--repo", str(clone), env=env)
    assert (out / "filling.bin").read_bytes() == data[:acked]
    assert (out / "after.bin").read_bytes() == more


def test_a_copy_larger_than_the_cache_waits_for_uploads_instead_of_failing(
        tmp_path, bucket, mounts) -> None:
    """S3 up, a writer faster than the uploads, a file 8 times --cache-size:
    the writes wait for uploads to make room (backpressure), none fails with
    ENOSPC, the cache ends under its bound, and every byte reads back."""
    s3, name = bucket
    env = s3.env()
    limit = 16 << 20
    repo = init_remote(tmp_path, s3, name, "a", "--cache-size", str(limit))
    m = start_mount_env(repo, tmp_path / "mnt", s3)
    mounts.append(m)
    data = blob(128 << 20, 21)
    with open(m.main / "big.bin", "wb") as f:  # an OSError here fails the test
        for off in range(0, len(data), 1 << 20):
            f.write(data[off : off + (1 << 20)])
    jz("sync", "--wait", cwd=m.main, env=env)
    deadline = time.monotonic() + 30
    while True:  # evicted by the uploader's loop once durable
        st = json.loads(jz("remote", "status", "--json", cwd=m.main, env=env).stdout)
        if st["cached_chunk_bytes"] <= limit or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert st["cached_chunk_bytes"] <= limit, st
    assert not st["refusing_writes"], st
    assert (m.main / "big.bin").read_bytes() == data
    log = (repo / "run" / "daemon.log").read_text()
    assert "writes fail with ENOSPC" not in log, log[-3000:]


def test_uncached_read_during_an_outage_is_eio_within_a_bound(tmp_path, s3_fresh,
                                                                mounts) -> None:
    """S3 down and a chunk not in the cache: the read fails with EIO after a
    bounded wait (never hangs), is logged, and the mount goes on serving what
    is cached and taking writes; once S3 is back the same read works."""
    import errno

    s3 = s3_fresh
    name = s3.make_bucket("eio")
    env = s3.env()
    repo = init_remote(tmp_path, s3, name)
    data = blob(3 << 20, 21)
    small = blob(1000, 22)
    a = start_mount_env(repo, tmp_path / "mnt-a", s3)
    mounts.append(a)
    (a.main / "big.bin").write_bytes(data)
    (a.main / "small.bin").write_bytes(small)
    jz("commit", "-m", "data", cwd=a.main, env=env)
    jz("sync", "--wait", cwd=a.main, env=env)
    teardown(a)

    clone = tmp_path / "clone"
    jz("clone", f"s3://{name}/repo", str(clone), env=env)
    b = start_mount_env(clone, tmp_path / "mnt-b", s3)
    mounts.append(b)
    assert (b.main / "small.bin").read_bytes() == small  # now cached
    s3.stop()
    t0 = time.monotonic()
    with pytest.raises(OSError) as exc_info:
        (b.main / "big.bin").read_bytes()
    waited = time.monotonic() - t0
    assert exc_info.value.errno == errno.EIO
    assert waited < 120, f"the read hung for {waited:.0f} s"
    # the mount keeps serving: cached data, listings, writes
    assert (b.main / "small.bin").read_bytes() == small
    assert {"big.bin", "small.bin"} <= set(os.listdir(b.main))
    (b.main / "new.bin").write_bytes(b"written during the outage")
    log = (clone / "run" / "daemon.log").read_text()
    assert f"failed on s3://{name}/repo" in log, log[-2000:]
    s3.start()
    assert (b.main / "big.bin").read_bytes() == data
    assert (b.main / "new.bin").read_bytes() == b"written during the outage"
