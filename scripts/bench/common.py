"""Helpers shared by the benchmark scripts (mount.py now; remote.py, peers.py later).

Why a module of its own: every benchmark here has the same chores (time a block, take
medians over interleaved rounds, drop the page cache for cold figures, start a FUSE
process and wait until the kernel shows the mount, and above all never leave a stale
mount or a stray process behind when a run fails or is interrupted). Getting those right
once keeps each benchmark script down to its workloads.

Import it from a script in this directory with a plain ``import common``: Python puts
the script's own directory first on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent.parent
MiB = 1024 * 1024


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout carries only the result table."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --- timing and statistics -------------------------------------------------------------


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``; perf_counter based.

    A class rather than a bare function so the elapsed time is available after the
    block even when the block is long and has several exits.
    """

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = math.nan

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def median(values: Iterable[float]) -> float:
    """Median of the finite values; NaN when there are none (failed or skipped runs)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def rate(amount: float, seconds: float) -> float:
    """amount / seconds, guarding against a zero-length timing on tiny quick runs."""
    return amount / seconds if seconds > 0 else math.inf


def make_data(size: int, seed: int) -> bytes:
    """Return ``size`` pseudo-random, incompressible bytes that depend on ``seed``.

    Why not one repeated block: jiaozifuse deduplicates content-defined chunks, so
    repeated data would measure dedup rather than I/O. Why not os.urandom: about
    180 MB/s here, too slow to generate 1 GiB per round. BLAKE3 in XOF mode (a project
    dependency) gives well over 1 GB/s; random.randbytes is the fallback.
    """
    try:
        import blake3
    except ImportError:
        import random

        rng = random.Random(seed)
        return b"".join(rng.randbytes(min(MiB, size - off)) for off in range(0, size, MiB))
    return blake3.blake3(seed.to_bytes(8, "little")).digest(length=size)


# --- page cache ------------------------------------------------------------------------

_drop_caches_ok: bool | None = None


def drop_caches() -> bool:
    """Flush dirty data and drop the page, dentry and inode caches (root only).

    Returns False, silently, when not permitted (not root, or in a container whose
    /proc/sys is read-only): the "cold" figures are then only as cold as a remount
    makes them, which the JSON output records.
    """
    global _drop_caches_ok
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        _drop_caches_ok = True
    except OSError:
        _drop_caches_ok = False
    return _drop_caches_ok


def drop_caches_worked() -> bool | None:
    """Whether the last drop_caches() call succeeded (None if never called)."""
    return _drop_caches_ok


# --- mounts ----------------------------------------------------------------------------


def _unescape_mount_field(text: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 4].isdigit() and i + 3 < len(text):
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def mounts() -> list[tuple[str, str, str]]:
    """(device, mountpoint, fstype) for every line of /proc/mounts."""
    result = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                result.append((_unescape_mount_field(parts[0]),
                               _unescape_mount_field(parts[1]), parts[2]))
    return result


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a mountpoint according to /proc/mounts (the kernel's view).

    os.path.ismount() would stat the path, which hangs on a FUSE mount whose
    process is stuck; reading /proc/mounts never touches the filesystem.
    """
    target = os.path.realpath(path)
    return any(mp == target for _, mp, _ in mounts())


def wait_for_mount(path: str | os.PathLike[str], timeout: float = 30.0,
                   proc: subprocess.Popen[Any] | None = None) -> None:
    """Block until ``path`` shows in /proc/mounts; fail early if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} "
                               f"before {path} was mounted")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not mounted after {timeout:.0f}s")
        time.sleep(0.05)


def wait_for_unmount(path: str | os.PathLike[str], timeout: float = 10.0) -> bool:
    """Wait until ``path`` has left /proc/mounts; False on timeout."""
    deadline = time.monotonic() + timeout
    while is_mounted(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def unmount(path: str | os.PathLike[str], lazy_after: float = 5.0) -> None:
    """Unmount a FUSE mount: ``fusermount3 -u``, retried, then lazily with ``-uz``.

    A plain unmount fails with EBUSY while something still has a file open there
    (for example a workload interrupted by Ctrl-C); the lazy unmount always detaches
    it so that a later run does not trip over a dead mountpoint.
    """
    if not is_mounted(path):
        return
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    path = str(path)
    deadline = time.monotonic() + lazy_after
    while True:
        cmd = [tool, "-u", path] if tool else ["umount", path]
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if wait_for_unmount(path, timeout=1.0):
            return
        if time.monotonic() > deadline:
            break
    cmd = [tool, "-uz", path] if tool else ["umount", "-l", path]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    if not wait_for_unmount(path, timeout=5.0):
        log(f"WARNING: {path} is still mounted")


# --- processes ---------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[Any] | int, timeout: float = 10.0) -> None:
    """End one process by PID: SIGTERM, wait, then SIGKILL. Never by name."""
    if isinstance(proc, subprocess.Popen):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        return
    pid = proc
    if not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def pids_with_arg(arg: str, also: str | None = None) -> list[int]:
    """PIDs whose command line has ``arg`` as one exact argument (and ``also`` anywhere).

    Used to find a daemon that forked away from us (``jiaozifuse mount`` daemonizes),
    so that it can be stopped by PID if unmounting does not end it.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if arg in argv and (also is None or any(also in a for a in argv)):
            found.append(int(entry))
    return found


@dataclass
class Resources:
    """Every process and mount a benchmark makes, so that all of them are undone.

    Use as a context manager around the whole run: on normal exit, on an exception
    and on Ctrl-C (or SIGTERM, see install_signal_handlers) it unmounts every mount
    still registered, then stops every process still registered, by PID.
    """

    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    daemon_pids: list[int] = field(default_factory=list)
    mountpoints: list[str] = field(default_factory=list)

    def spawn(self, argv: Sequence[str], log_path: Path | None = None,
              **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process in its own session (so a terminal Ctrl-C reaches only us,
        and we decide the order of shutdown), with output to ``log_path``."""
        out: Any = subprocess.DEVNULL
        if log_path is not None:
            out = open(log_path, "ab")  # closed below; the child keeps its copy
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    **kwargs)
        finally:
            if log_path is not None:
                out.close()
        self.procs.append(proc)
        return proc

    def add_mount(self, path: str | os.PathLike[str]) -> None:
        self.mountpoints.append(os.path.realpath(path))

    def add_daemon(self, pid: int) -> None:
        if pid not in self.daemon_pids:
            self.daemon_pids.append(pid)

    def release_mount(self, path: str | os.PathLike[str]) -> None:
        """Unmount now and forget it."""
        real = os.path.realpath(path)
        unmount(real)
        with contextlib.suppress(ValueError):
            self.mountpoints.remove(real)

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
        stop_process(proc, timeout)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def stop_daemon(self, pid: int, grace: float = 10.0) -> None:
        """Give a daemon ``grace`` seconds to exit by itself (after its unmount), then
        stop it."""
        deadline = time.monotonic() + grace
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop_process(pid)
        with contextlib.suppress(ValueError):
            self.daemon_pids.remove(pid)

    def close(self) -> None:
        # Shielded from a second Ctrl-C as far as Python allows: a half-done cleanup is
        # exactly what leaves a dead mount behind.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for mp in reversed(self.mountpoints):
                try:
                    unmount(mp)
                except Exception as exc:
                    log(f"unmount {mp} failed: {exc}")
            self.mountpoints.clear()
            for proc in reversed(self.procs):
                stop_process(proc, timeout=5.0)
            self.procs.clear()
            for pid in reversed(self.daemon_pids):
                stop_process(pid, timeout=5.0)
            self.daemon_pids.clear()
        finally:
            signal.signal(signal.SIGINT, old)

    def __enter__(self) -> Resources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt so ``finally`` blocks run.

    SIGINT is set back to Python's handler too: a process started in the background
    by a non-interactive shell inherits SIGINT as *ignored*, and Python then leaves it
    ignored, so `kill -INT` would do nothing.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def find_executable(name: str) -> str | None:
    """The console script ``name`` installed next to this interpreter, else on PATH.

    Next to sys.executable first: the benchmark is normally run with the project's
    venv python, whose bin/ may not be on PATH.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


# --- output ----------------------------------------------------------------------------


def fmt_num(value: float | None) -> str:
    """Short human format: thousands separators for big numbers, 3 decimals for small."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_ratio(num: float, den: float) -> str:
    if any(v is None or not math.isfinite(v) for v in (num, den)) or den == 0:
        return "-"
    return f"{num / den:.2f}x"


def summarize_rounds(results: dict[str, Any], labels: dict[str, str], unit: str,
                     pairs: Sequence[tuple[str, str]]) -> str:
    """The table of a benchmark whose rounds are dicts of figure -> value: each
    figure of *labels* with its median and per-round values, then each ratio
    a/b of *pairs* (of medians, and per round).  Stores ``results["medians"]``
    and ``results["ratios"]``."""
    rounds = results["rounds"]
    med = {k: median(r[k] for r in rounds if k in r) for k in labels}
    results["medians"] = med
    rows = [[label, fmt_num(med[k]), " ".join(f"{r[k]:.0f}" for r in rounds if k in r)]
            for k, label in labels.items()]
    lines = [format_table(["figure", f"{unit} (median)", "per round"], rows), ""]
    results["ratios"] = {}
    for a, b in pairs:
        per = [r[a] / r[b] for r in rounds if r.get(a) and r.get(b)]
        ratio = med[a] / med[b] if med[b] and math.isfinite(med[b]) else math.nan
        results["ratios"][f"{a}/{b}"] = ratio
        lines.append(f"{labels[a]} / {labels[b]}: {ratio:.2f}x "
                     f"(per round {' '.join(f'{x:.2f}' for x in per)})")
    return "\n".join(lines)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 left_columns: int = 1) -> str:
    """A plain-text table: the first ``left_columns`` columns left-aligned, the rest
    right-aligned (numbers)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left_columns else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in rows)
    return "\n".join(out)


def environment() -> dict[str, Any]:
    """What the numbers depend on, recorded next to them in the JSON output."""
    info: dict[str, Any] = {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "hostname": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with contextlib.suppress(Exception):
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
            text=True, check=True).stdout.strip()
    with contextlib.suppress(Exception):
        import pyfuse3

        info["pyfuse3"] = getattr(pyfuse3, "__version__", "?")
    return info


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write ``data`` as JSON; NaN (failed or skipped) becomes null."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, float) and not math.isfinite(obj):
            return None
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [clean(v) for v in obj]
        return obj

    with open(path, "w") as f:
        json.dump(clean(data), f, indent=2, sort_keys=True)
        f.write("\n")


def finish(results: dict[str, Any], json_path: str | os.PathLike[str] | None, rc: int) -> int:
    """The end of a benchmark's main(): write the JSON if asked for, and turn
    recorded errors into a failing exit code; returns the exit code."""
    if json_path:
        write_json(json_path, results)
        log(f"wrote {json_path}")
    return 1 if results["errors"] and rc == 0 else rc


# --- targets ---------------------------------------------------------------------------


class TargetUnavailable(Exception):
    """The target cannot run here (e.g. jiaozifuse not installed or failing to mount):
    the benchmark reports it and goes on with the other targets."""


class Target:
    """A place to run workloads in: set up fresh for each round, then torn down.

    Fresh per round so that rounds are independent (no dedup or caches carried from
    one round to the next) and the disk does not fill up with old data.
    """

    name = "?"
    is_fuse = False

    def __init__(self, res: Resources) -> None:
        self.res = res
        self.root: Path | None = None

    def setup(self, root: Path) -> Path:
        """Prepare under ``root`` (an empty directory); return the workload directory."""
        raise NotImplementedError

    def make_cold(self) -> None:
        """Make the next reads come from the disk: remount (FUSE) and drop caches."""
        drop_caches()

    def teardown(self) -> None:
        """Unmount, stop processes, delete the data. Must be safe after a failed setup."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


class NativeTarget(Target):
    """A plain directory on the local disk: the upper bound."""

    name = "native"

    def setup(self, root: Path) -> Path:
        self.root = root
        data = root / "data"
        data.mkdir(parents=True)
        return data


class PassthroughTarget(Target):
    """scripts/bench/passthrough.py over a local directory: the cost of FUSE itself."""

    name = "passthrough"
    is_fuse = True

    def __init__(self, res: Resources, python: str = sys.executable) -> None:
        super().__init__(res)
        self.python = python
        self.proc: subprocess.Popen[Any] | None = None
        self.src = self.mnt = Path()

    def setup(self, root: Path) -> Path:
        self.root = root
        self.src, self.mnt = root / "src", root / "mnt"
        self.src.mkdir(parents=True)
        self.mnt.mkdir()
        self._mount()
        return self.mnt

    def _mount(self) -> None:
        assert self.root is not None
        self.proc = self.res.spawn(
            [self.python, str(BENCH_DIR / "passthrough.py"), str(self.src), str(self.mnt),
             "--foreground"],
            log_path=self.root / "passthrough.log")
        self.res.add_mount(self.mnt)
        wait_for_mount(self.mnt, timeout=30, proc=self.proc)

    def _unmount(self) -> None:
        self.res.release_mount(self.mnt)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)  # exits by itself once unmounted
            self.res.stop(self.proc)
            self.proc = None

    def make_cold(self) -> None:
        self._unmount()
        drop_caches()
        self._mount()

    def teardown(self) -> None:
        if self.root is not None:
            self._unmount()
        super().teardown()


class JiaozifuseTarget(Target):
    """``jiaozifuse init`` + ``jiaozifuse mount`` (which daemonizes); workloads run in
    MNT/main, the checked-out main branch."""

    name = "jiaozifuse"
    is_fuse = True

    def __init__(self, res: Resources, exe: str | None = None,
                 mount_args: Sequence[str] = (), branch: str = "main") -> None:
        super().__init__(res)
        self.exe = exe or find_executable("jiaozifuse")
        self.mount_args = list(mount_args)
        self.branch = branch
        self.repo = self.mnt = Path()
        self.pids: list[int] = []

    def _run(self, *args: str, timeout: float = 300) -> None:
        assert self.exe is not None
        try:
            proc = subprocess.run([self.exe, *args], capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TargetUnavailable(f"`jiaozifuse {' '.join(args)}` timed out") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise TargetUnavailable(f"`jiaozifuse {' '.join(args)}` exited "
                                    f"{proc.returncode}: {' | '.join(tail)}")

    def setup(self, root: Path) -> Path:
        if self.exe is None:
            raise TargetUnavailable("no `jiaozifuse` executable next to "
                                    f"{sys.executable} or on PATH")
        self.root = root
        self.repo, self.mnt = root / "repo", root / "mnt"
        self.mnt.mkdir(parents=True)
        self._run("init", str(self.repo))
        self._mount()
        workdir = self.mnt / self.branch
        if not workdir.is_dir():
            raise TargetUnavailable(f"{workdir} does not exist after mounting")
        return workdir

    def _mount(self) -> None:
        self.res.add_mount(self.mnt)
        self._run("mount", str(self.repo), str(self.mnt), *self.mount_args)
        try:
            wait_for_mount(self.mnt, timeout=30)
        except TimeoutError as exc:
            raise TargetUnavailable(str(exc)) from exc
        for path in {str(self.mnt), os.path.realpath(self.mnt)}:
            for pid in pids_with_arg(path, also="jiaozifuse"):
                if pid not in self.pids:
                    self.pids.append(pid)
                    self.res.add_daemon(pid)

    def _unmount(self) -> None:
        if is_mounted(self.mnt):
            try:
                self._run("umount", str(self.mnt))
            except TargetUnavailable as exc:
                log(f"jiaozifuse umount failed ({exc}); using fusermount3")
        self.res.release_mount(self.mnt)
        for pid in self.pids:
            self.res.stop_daemon(pid, grace=30)
        self.pids.clear()

    def make_cold(self) -> None:
        self._unmount()
        drop_caches()
        self._mount()

    def teardown(self) -> None:
        if self.root is not None:
            self._unmount()
        super().teardown()


def run_in_workdir(body: Any, workdir: Path, on_interrupt: str) -> int:
    """Run ``body(resources)`` with every mount and process undone afterwards.

    The work directory is removed unless something is still mounted below it
    (then it is kept and named).  Returns 130 after Ctrl-C, else 0.
    """
    rc = 0
    try:
        with Resources() as res:
            body(res)
    except KeyboardInterrupt:
        log(on_interrupt)
        rc = 130
    finally:
        left = [mp for _, mp, _ in mounts() if mp.startswith(f"{workdir}/")]
        if left:
            log(f"NOT removing {workdir}: still mounted: {', '.join(left)}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return rc
