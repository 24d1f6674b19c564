"""Fixtures that mount a real jiaozifuse filesystem.

Every mount is started with the real CLI (``jiaozifuse mount``, which
daemonises) and is torn down in a finalizer even when the test fails: first
``jiaozifuse umount``, then ``fusermount3 -uz``, then SIGKILL of the daemon by
the PID it wrote into the mount's marker file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

JZ = [sys.executable, "-m", "jiaozifuse.cli"]


def have_fuse() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


pytestmark = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")


def jz(*args: str, check: bool = True, cwd: str | Path | None = None,
       env: dict | None = None, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run the CLI; returns the completed process (text output)."""
    e = dict(os.environ)
    e.pop("JIAOZIFUSE_REPO", None)
    if env:
        e.update(env)
    res = subprocess.run([*JZ, *args], capture_output=True, text=True, cwd=cwd, env=e,
                         timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"jiaozifuse {' '.join(args)} failed ({res.returncode}):\n"
                             f"{res.stdout}\n{res.stderr}")
    return res


def is_mounted(mnt: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(mnt) for line in f if len(line.split()) > 1)


@dataclass
class Mount:
    repo: Path
    mnt: Path
    pid: int

    @property
    def main(self) -> Path:
        return self.mnt / "main"

    def cli(self, *args: str, check: bool = True, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
        if cwd is None:
            return jz("--repo", str(self.repo), *args, check=check)
        return jz(*args, check=check, cwd=cwd)

    def unmount(self) -> None:
        teardown(self)

    def remount(self, *extra: str) -> Mount:
        teardown(self)
        return start_mount(self.repo, self.mnt, *extra)


def start_mount(repo: Path, mnt: Path, *extra: str) -> Mount:
    mnt.mkdir(parents=True, exist_ok=True)
    jz("mount", str(repo), str(mnt), *extra)
    info = json.loads((mnt / ".jiaozifuse-mount").read_text())
    return Mount(repo, mnt, info["pid"])


def teardown(m: Mount) -> None:
    if is_mounted(m.mnt):
        with contextlib.suppress(Exception):
            jz("umount", str(m.mnt), check=False)
    if is_mounted(m.mnt):
        subprocess.run(["fusermount3", "-uz", str(m.mnt)], capture_output=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(m.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(m.pid, signal.SIGKILL)


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator:
    """Make repositories and mount them; every mount is undone at teardown."""
    mounts: list[Mount] = []

    def make(name: str = "r", *extra: str, init: bool = True) -> Mount:
        repo = tmp_path / f"{name}-repo"
        if init:
            jz("init", str(repo))
        m = start_mount(repo, tmp_path / f"{name}-mnt", *extra)
        mounts.append(m)
        return m

    yield make
    for m in mounts:
        teardown(m)


@pytest.fixture
def mnt(mount_factory) -> Mount:
    """A fresh repository mounted; ``mnt.main`` is the writable main branch."""
    return mount_factory()
