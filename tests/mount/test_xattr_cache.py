"""ls -l and the xattrs it asks for.

GNU ls -l reads two attributes of every entry: security.selinux (lgetxattr) and
system.posix_acl_access (getxattr, for the '+' after the mode). On a FUSE mount
each is a round trip to the daemon, unless the kernel or ls can skip it. The
kernel cannot here (without FUSE_POSIX_ACL every inode is ACL_DONT_CACHE; with
it, each READDIRPLUS forgets the cached ACLs of the entries it lists), but ls
can: after an "operation not supported" for one entry it stops asking for the
whole device. jiaozifuse keeps no POSIX ACLs (setting one is refused), so
reading one answers EOPNOTSUPP too, like a local filesystem without ACLs; and
it has no SELinux labels of its own, so an absent security.selinux answers
EOPNOTSUPP as well (a label set by hand is kept and returned).

What a user would notice: user.* attributes work as before, ls -l shows the
same modes (no '+') as on a local directory, cp -a copies out silently, and one
ls -l of N entries sends a handful of getxattr requests to the daemon, not 2N.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .conftest import Mount

REQUESTS_RE = re.compile(r'^jiaozifuse_fuse_requests_total\{op="([^"]+)"\} ([0-9.e+]+)$', re.M)


def errname(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


NOTSUP = errno.errorcode[errno.EOPNOTSUPP]  # "ENOTSUP": the same number on Linux


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fuse_requests(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return {op: float(n) for op, n in REQUESTS_RE.findall(r.read().decode())}


def ls_l(d: Path) -> list[tuple[str, str]]:
    """(mode string, name) of each entry of ``ls -l d``."""
    out = subprocess.run(["ls", "-l", str(d)], capture_output=True, text=True, check=True,
                         env={**os.environ, "LC_ALL": "C"})
    assert out.stderr == ""
    return [(line.split()[0], line.split()[-1]) for line in out.stdout.splitlines()[1:]]


def test_user_xattrs_still_work(mount_factory: Callable[..., Mount]) -> None:
    m = mount_factory()
    f = m.main / "f"
    f.write_text("x")
    os.setxattr(f, "user.a", b"1")
    os.setxattr(f, "user.bin", bytes(range(256)))
    os.setxattr(m.main, "user.dir", b"d")
    assert sorted(os.listxattr(f)) == ["user.a", "user.bin"]
    assert os.getxattr(f, "user.a") == b"1"
    assert os.getxattr(f, "user.bin") == bytes(range(256))
    assert errname(lambda: os.getxattr(f, "user.missing")) == "ENODATA"
    assert errname(lambda: os.setxattr(f, "user.a", b"2", os.XATTR_CREATE)) == "EEXIST"
    os.removexattr(f, "user.a")
    assert errname(lambda: os.removexattr(f, "user.a")) == "ENODATA"
    assert os.listxattr(f) == ["user.bin"]
    assert os.getxattr(m.main, "user.dir") == b"d"
    # the daemon's own attributes of a branch root are still there
    assert os.getxattr(m.main, "user.jiaozi.branch") == b"main"


def test_acls_read_as_not_supported(mount_factory: Callable[..., Mount]) -> None:
    """Reading an ACL gives the same answer as setting one: not supported."""
    m = mount_factory()
    f, d = m.main / "f", m.main / "d"
    f.write_text("x")
    d.mkdir()
    for p in (f, d, m.main, m.mnt):
        assert errname(lambda p=p: os.getxattr(p, "system.posix_acl_access")) == NOTSUP
    assert errname(lambda: os.getxattr(d, "system.posix_acl_default")) == NOTSUP
    assert errname(lambda: os.removexattr(f, "system.posix_acl_access")) == NOTSUP
    assert errname(lambda: os.getxattr(f, "bogus.name")) == NOTSUP
    assert "system.posix_acl_access" not in os.listxattr(f)
    # security.* and trusted.* are stored: absent ones are ENODATA as before,
    # but for the SELinux label, which the mount does not have
    assert errname(lambda: os.getxattr(f, "security.selinux")) == NOTSUP
    assert errname(lambda: os.getxattr(f, "security.other")) == "ENODATA"
    assert errname(lambda: os.getxattr(f, "trusted.x")) == "ENODATA"


def test_ls_l_and_cp_a_as_on_a_local_directory(mount_factory: Callable[..., Mount],
                                               tmp_path: Path) -> None:
    m = mount_factory()
    local = tmp_path / "local"
    local.mkdir()
    for base in (local, m.main / "t"):
        base.mkdir(exist_ok=True)
        (base / "a").write_text("a")
        os.chmod(base / "a", 0o640)
        (base / "x").write_text("x")
        os.chmod(base / "x", 0o755)
        (base / "sub").mkdir()
        os.chmod(base / "sub", 0o750)
        os.symlink("a", base / "l")
    assert ls_l(m.main / "t") == ls_l(local)
    assert all("+" not in mode for mode, _ in ls_l(m.main / "t"))

    os.setxattr(m.main / "t" / "a", "user.tag", b"v")
    out = subprocess.run(["cp", "-a", str(m.main / "t"), str(tmp_path / "copy")],
                         capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (0, "")
    assert ls_l(tmp_path / "copy") == ls_l(local)
    assert os.getxattr(tmp_path / "copy" / "a", "user.tag") == b"v"


def test_ls_l_asks_for_acls_once(mount_factory: Callable[..., Mount]) -> None:
    """One ls -l of N entries: a handful of getxattr requests, not 2N."""
    port = free_port()
    m = mount_factory("r", "--metrics-addr", f"127.0.0.1:{port}")
    d = m.main / "many"
    d.mkdir()
    n = 300
    for i in range(n):
        (d / f"f{i:04d}").touch()
    assert len(ls_l(d)) == n  # warm: lookups and attributes
    before = fuse_requests(port).get("getxattr", 0.0)
    assert len(ls_l(d)) == n
    asked = fuse_requests(port).get("getxattr", 0.0) - before
    assert asked <= 5, asked
