"""The model test again, on a branch whose bytes mostly live in S3.

tests/mount/test_model.py's state machine (random operations on the mounted
branch and on a local directory, the same outcome required, the trees
compared after every step), run on a repository with a SeaweedFS remote and
a chunk cache of 256 KiB, below what the examples store together.  The rules
that keep files open across steps are left out: their unflushed buffers
cannot be uploaded, so with a bound this small a write could wait for room
that never comes and fail with ENOSPC, by design (tests/remote/test_remote.py
covers that).  Two more rules: ``sync`` waits
until everything written is in S3 (after which the uploader evicts it from
the cache), and ``forget_pages`` drops the kernel's page cache of every file
of the mount, so that the next comparison reads through the daemon, which
has to fetch the evicted chunks back and verify them.  At the end the bound
is shrunk to a page and the mount restarted, so that the last tree is read
back from S3 whole.  Any byte lost or mixed up between writing, uploading,
evicting and fetching shows as a difference from the model.

(Evicting a chunk before it is uploaded, a mutant tried by hand, went
unnoticed here: uploads keep up in this setup, so nothing is evicted before
it is in S3 either way.  tests/remote/test_evict.py guards that rule.)
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import rule, run_state_machine_as_test
from mount.conftest import Mount, jz, teardown
from mount.test_model import FsModel, diff, walk

CACHE = 256 << 10


class CachedRemoteModel(FsModel):
    # no rule: plain methods in place of the parent's open-across-steps rules
    def open_fd(self) -> None:  # type: ignore[override]
        raise AssertionError("not a rule here")

    def open_unlink_use_close(self) -> None:  # type: ignore[override]
        raise AssertionError("not a rule here")

    @rule()
    def sync(self) -> None:
        res = self.mount.cli("sync", "--wait", "--json", check=False)
        assert res.returncode == 0, res.stderr

    @rule()
    def forget_pages(self) -> None:
        forget_pages(self.R)


def forget_pages(root: Path) -> None:
    """Drop the kernel's cached pages of every regular file under *root*."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def counter(addr: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.timeout(900)
def test_a_branch_read_back_through_a_tiny_cache_behaves_like_a_local_directory(
        tmp_path: Path, bucket, monkeypatch) -> None:
    s3, name = bucket
    for k, v in s3.env().items():  # the CLI (sync) and the daemon reach S3 with these
        monkeypatch.setenv(k, v)
    repo, mnt, local = tmp_path / "repo", tmp_path / "mnt", tmp_path / "model"
    jz("init", str(repo), "--remote", f"s3://{name}/repo", "--endpoint-url", s3.endpoint,
       "--cache-size", str(CACHE))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{sock.getsockname()[1]}"
    mnt.mkdir()
    local.mkdir()
    jz("mount", str(repo), str(mnt), "--metrics-addr", addr)
    m = Mount(repo, mnt, json.loads((mnt / ".jiaozifuse-mount").read_text())["pid"])
    try:
        CachedRemoteModel.mount = m
        CachedRemoteModel.local = local
        run_state_machine_as_test(CachedRemoteModel, settings=settings(
            max_examples=int(os.environ.get("JZ_MODEL_EXAMPLES", "12")),
            stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)))
        # then everything, dropped from the cache, read back from S3: the bound
        # shrunk to a page (config.json, read at mount) evicts every durable chunk
        m.cli("sync", "--wait")
        teardown(m)
        cfg = json.loads((repo / "config.json").read_text())
        cfg["cache_size"] = 4096
        (repo / "config.json").write_text(json.dumps(cfg))
        jz("mount", str(repo), str(mnt), "--metrics-addr", addr)
        m = Mount(repo, mnt, json.loads((mnt / ".jiaozifuse-mount").read_text())["pid"])
        deadline = time.monotonic() + 20
        while True:
            st = json.loads(m.cli("remote", "status", "--json").stdout)
            if st["cached_chunk_bytes"] <= 4096 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert st["cached_chunk_bytes"] <= 4096, st
        want = walk(local)
        got = walk(m.main)
        assert got == want, f"read back from S3:\n{diff(want, got)}"
        if any(row[0] == "file" and row[2] for row in want.values()):
            assert counter(addr, "jiaozifuse_cache_misses_total") > 0  # it did fetch
        log = (repo / "run" / "daemon.log").read_text(errors="replace")
        assert "Traceback" not in log, log[-5000:]
    finally:
        teardown(m)
