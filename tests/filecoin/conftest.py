"""Fixtures for the Filecoin archive tests.

``node``: runs ``tests/filecoin/node/check.mjs`` (JavaScript implementations the
IPFS and Filecoin ecosystems use: @ipld/car, @ipld/dag-pb, @ipld/dag-cbor,
ipfs-unixfs-exporter, @web3-storage/data-segment) and parses its JSON. The npm
packages are installed on first use with ``npm ci`` from the committed lock file
(under a file lock: several test runs may share the work tree); the tests that
need them are skipped only when node or npm is missing.

``sample_repo``: a repository whose history covers what an archive must carry:
nested directories, a multi-chunk file, an empty file, a symlink, odd modes, an
xattr, a sparse file with a hole, two commits on main, a second branch and a tag.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from jiaozifuse.repo import Repository

NODE_DIR = Path(__file__).parent / "node"
MiB = 1 << 20


def _npm_install() -> None:
    lock = NODE_DIR / "package-lock.json"
    want = hashlib.sha256(lock.read_bytes() + (NODE_DIR / "package.json").read_bytes()
                          ).hexdigest()
    stamp = NODE_DIR / "node_modules" / ".jiaozifuse-stamp"
    with open(NODE_DIR / ".npm.lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if stamp.exists() and stamp.read_text() == want:
            return
        res = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                             cwd=NODE_DIR, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            pytest.fail(f"npm ci in {NODE_DIR} failed:\n{res.stderr[-3000:]}")
        stamp.write_text(want)


@pytest.fixture(scope="session")
def node() -> Callable[..., Any]:
    """``node("car", path)`` -> the JSON that check.mjs prints."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm are not installed: the JavaScript cross-checks need them")
    _npm_install()

    def run(*args: str | Path) -> Any:
        res = subprocess.run(["node", "check.mjs", *map(str, args)], cwd=NODE_DIR,
                             capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise AssertionError(f"node check.mjs {' '.join(map(str, args))} failed:\n"
                                 f"{res.stderr[-3000:]}")
        return json.loads(res.stdout)

    return run


@pytest.fixture(scope="session")
def ipfs_car(node: Callable[..., Any]) -> Callable[..., subprocess.CompletedProcess]:
    """Run the ipfs-car CLI from the installed npm packages."""
    binary = NODE_DIR / "node_modules" / ".bin" / "ipfs-car"

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    return run


@dataclass
class Sample:
    repo: Repository
    path: Path
    first: bytes  # main's first commit with content
    head: bytes  # main's head
    dev: bytes  # branch dev's head
    tag: str


def _write_tree(src: Path, rnd: random.Random) -> None:
    (src / "docs" / "deep" / "deeper").mkdir(parents=True)
    (src / "data").mkdir()
    (src / "README.md").write_text("# sample\n" * 50)
    (src / "docs" / "a.txt").write_text("alpha\n")
    (src / "docs" / "deep" / "deeper" / "z.txt").write_text("zulu\n" * 1000)
    (src / "data" / "big.bin").write_bytes(rnd.randbytes(5 * MiB + 12345))
    (src / "data" / "same.bin").write_bytes((src / "data" / "big.bin").read_bytes()[: 2 * MiB])
    (src / "empty").write_bytes(b"")
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(src / "run.sh", 0o755)
    os.chmod(src / "docs" / "a.txt", 0o600)
    os.symlink("docs/a.txt", src / "link")
    os.symlink("/nonexistent/target", src / "docs" / "dangling")
    os.chmod(src / "docs" / "deep", 0o750)


def make_sample(tmp: Path, seed: int = 6) -> Sample:
    rnd = random.Random(seed)
    src = tmp / "src"
    src.mkdir()
    _write_tree(src, rnd)
    repo = Repository.init(tmp / "repo")
    repo.import_dir("main", src)
    wt = repo.worktree
    root = repo.root_ino("main")
    # a sparse file: 3 MiB hole, then a few bytes (the hole is stored as no data)
    node = wt.create(root, b"sparse", stat.S_IFREG | 0o644, os.getuid(), os.getgid())
    wt.open(node.ino)
    wt.write(node.ino, 3 * MiB, b"after the hole")
    wt.release(node.ino)
    wt.setxattr(wt.resolve(root, b"README.md").ino, b"user.origin", b"jiaozifuse-test")
    first = repo.commit("main", "first", meta={"run": "1"})
    repo.create_branch("dev")
    (src / "docs" / "a.txt").write_text("alpha, edited on dev\n")
    repo.import_dir("dev", src)
    dev = repo.commit("dev", "dev edit")
    (src / "data" / "new.bin").write_bytes(rnd.randbytes(MiB))
    (src / "docs" / "a.txt").write_text("alpha\n")
    repo.import_dir("main", src)
    head = repo.commit("main", "second")
    repo.create_tag("v1", "main")
    return Sample(repo, tmp / "repo", first, head, dev, "v1")


@pytest.fixture
def sample(tmp_path: Path) -> Iterator[Sample]:
    s = make_sample(tmp_path)
    try:
        yield s
    finally:
        s.repo.close()


def tree_listing(root: Path) -> dict[str, tuple]:
    """Everything export wrote: type, mode, mtime, bytes (as sha256), target, xattrs."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p), st.st_mtime_ns)
                continue
            xattrs = tuple(sorted((k, os.getxattr(p, k)) for k in os.listxattr(p)))
            body = (hashlib.sha256(p.read_bytes()).hexdigest()
                    if stat.S_ISREG(st.st_mode) else None)
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_mtime_ns,
                        st.st_size if body else None, body, xattrs)
    return out
