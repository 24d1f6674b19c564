"""``sync`` and ``remote status`` on a terminal (a real pty) and piped.

On a terminal ``sync`` draws a progress bar of the queued bytes on stderr;
piped, the output is the plain lines and ``--json`` is unchanged.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest
from mount.conftest import JZ, have_fuse, jz, teardown

from .test_remote import blob, init_remote, start_mount_env

pytestmark = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")


def run_in_pty(args: list[str], env: dict, timeout: float = 120) -> tuple[int, str]:
    """Run the CLI with stdin, stdout and stderr on a pty; returns (status, output)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    e = {**os.environ, **env, "TERM": "xterm"}
    e.pop("COLUMNS", None)
    e.pop("JIAOZIFUSE_REPO", None)
    proc = subprocess.Popen([*JZ, *args], stdin=slave, stdout=slave, stderr=slave, env=e,
                            close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: the child closed its end
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    return proc.returncode, out.decode(errors="replace")


def queue_some(tmp_path: Path, s3, name: str, size: int = 12 << 20) -> Path:
    repo = init_remote(tmp_path, s3, name)
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(blob(size, 31))
    jz("import", str(src), "--repo", str(repo), env=s3.env())
    jz("commit", "-m", "data", "--repo", str(repo), env=s3.env())
    return repo


def test_sync_draws_a_bar_on_a_terminal_without_a_daemon(tmp_path, bucket) -> None:
    s3, name = bucket
    repo = queue_some(tmp_path, s3, name)
    code, out = run_in_pty(["sync", "--wait", "--repo", str(repo)], s3.env())
    assert code == 0, out
    assert "uploading: 100%" in out and "|" in out and "\r" in out, out
    assert "uploaded 3 pack(s), 12.0 MiB" in out, out  # 2 of chunks, 1 of objects
    st = json.loads(jz("remote", "status", "--json", "--repo", str(repo), env=s3.env()).stdout)
    assert st["queued"] == {"chunks": 0, "objects": 0, "refs": 0}


def test_sync_piped_is_plain_and_json_unchanged(tmp_path, bucket) -> None:
    s3, name = bucket
    repo = queue_some(tmp_path, s3, name)
    res = jz("sync", "--wait", "--json", "--repo", str(repo), env=s3.env())
    doc = json.loads(res.stdout)  # the whole of stdout is the JSON document
    assert set(doc) == {"sent", "status"} and doc["sent"]["packs"] == 3
    assert "\r" not in res.stderr and "%|" not in res.stderr and "uploading" not in res.stderr
    res = jz("remote", "status", "--repo", str(repo), env=s3.env())
    assert "queued:   0 chunks" in res.stdout and "%|" not in res.stdout


def test_sync_bar_with_a_daemon_and_status_on_a_terminal(tmp_path, s3_fresh) -> None:
    import threading

    s3 = s3_fresh
    name = s3.make_bucket("progress")
    env = s3.env()
    repo = init_remote(tmp_path, s3, name, "a", "--cache-size", "1G")
    m = start_mount_env(repo, tmp_path / "mnt", s3)
    try:
        # S3 frozen: the daemon's write-back cannot empty the queue before
        # the bar starts, so the bar has something to show
        s3.pause()
        try:
            (m.main / "big.bin").write_bytes(blob(16 << 20, 32))
        finally:
            threading.Timer(2.0, s3.resume).start()
        code, out = run_in_pty(["sync", "--wait", "--repo", str(repo)], env)
        assert code == 0, out
        assert "uploading:   0%" in out and "uploading: 100%" in out and "\r" in out, out
        assert "16.0M/16.0M" in out, out
        st = json.loads(jz("remote", "status", "--json", "--repo", str(repo), env=env).stdout)
        assert st["queued"]["chunks"] == 0 and st["writeback_running"], st
        code, out = run_in_pty(["remote", "status", "--repo", str(repo)], env)
        assert code == 0, out
        assert "cache: " in out and "|" in out and "/1.00G" in out, out
        assert "uploading: 0 B in flight" in out, out
    finally:
        s3.resume()
        teardown(m)
