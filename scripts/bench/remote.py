#!/usr/bin/env python3
"""Benchmark jiaozifuse's S3 remote against plain boto3 on the same server, same run.

Usage::

    .venv/bin/python scripts/bench/remote.py [--rounds 3] [--size 1024] [--quick]
        [--json out.json] [--profile DIR]

What is measured, each round with fresh buckets, repositories and caches:

upload
    boto3 ``upload_file`` of the local file with the default TransferConfig (multipart,
    8 MiB parts, 10 threads) against ``Repository.sync()`` of a repository that has
    just imported and committed the same file (only the sync is timed: it is what
    moves the bytes to S3). The S3 requests the sync made (``repo.remote.requests``;
    not the 3 of ``init``) give "requests per GiB written"; boto3's own count (every
    HTTP request its client sent) is shown beside it.
cold read
    boto3 ``download_file`` (multipart ranged GETs, threads) of the object boto3
    uploaded, and a single-stream ``get_object`` read of it, against a sequential read
    in 1 MiB ``read()`` calls of the file through a real FUSE mount of a fresh
    ``jiaozifuse clone`` (empty chunk cache, so every byte comes from S3). The kernel
    caches are dropped before each of the three, so the server reads from its disk
    too. The clone (metadata only) and the mount are set-up, not timed in the figure.

Why one server for everything: jiaozifuse and boto3 then share the same server, disk
and CPUs (2 here, and ``weed`` uses them too), so the ratio jz/boto3 is what the
issue's targets (0.7) are about; absolute MiB/s depend on the machine.

The server is tests/s3server.py's ``SeaweedS3`` (``weed mini`` on 127.0.0.1 with
authentication), started once per run and always stopped. Its credentials and
endpoint are put into this process's environment, so the in-process Repository and
the ``jiaozifuse`` CLI and mount daemon (which inherit it) reach it.

``--profile DIR`` runs py-spy (``record --format raw --idle --threads``) on this process
during each sync and on the mount daemon during each jiaozifuse cold read, writes the
collapsed stacks to DIR and prints the hottest frames. Sampling perturbs the timings:
profile in a separate run.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import common
from common import MiB, Stopwatch, log, rate

GiB = 1024 * MiB
IO_SIZE = MiB
KEY = "big.bin"
TARGET_RATIO = 0.7


@dataclass(frozen=True)
class Figure:
    name: str
    unit: str
    boto3_label: str
    jz_label: str
    target: float | None = None  # minimum jz/boto3 ratio
    higher_is_better: bool = True


FIGURES = [
    Figure("upload", "MiB/s", "upload_file (multipart)", "sync", TARGET_RATIO),
    Figure("cold_read", "MiB/s", "download_file (multipart)", "mount, 1 MiB reads",
           TARGET_RATIO),
    Figure("cold_read_vs_single", "MiB/s", "get_object, one stream", "mount, 1 MiB reads"),
    Figure("requests_per_gib", "req/GiB", "upload_file", "sync",
           higher_is_better=False),
]
# jiaozifuse-only figures (no boto3 counterpart), shown under the table.
JZ_EXTRA = {
    "import_commit_s": "import_dir + commit (local, before sync), s",
    "sync_packs": "packs uploaded by sync",
    "clone_s": "jiaozifuse clone (metadata only), s",
    "mount_s": "jiaozifuse mount until ready, s",
    "cold_read_fetched_ratio": "cold read: bytes fetched from S3 per byte read",
    "cold_read_cpu_daemon": "cold read: daemon CPU, s per GiB",
    "cold_read_cpu_server": "cold read: S3 server CPU, s per GiB (boto3's: see the log)",
}


# --- the S3 server ---------------------------------------------------------------------


def load_s3server() -> Any:
    """tests/s3server.py, imported by path (tests/ is not a package on sys.path)."""
    path = common.REPO_ROOT / "tests" / "s3server.py"
    spec = importlib.util.spec_from_file_location("s3server", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["s3server"] = module
    spec.loader.exec_module(module)
    return module


def count_requests(client: Any) -> collections.Counter[str]:
    """Count the HTTP requests a boto3 client sends (retries included), by operation."""
    counts: collections.Counter[str] = collections.Counter()

    def before_send(request: Any = None, **kwargs: Any) -> None:
        counts[kwargs.get("event_name", "?").rsplit(".", 1)[-1]] += 1

    client.meta.events.register("before-send.s3", before_send)
    return counts


def empty_bucket(client: Any, bucket: str) -> None:
    """Delete the objects and the bucket (best effort): frees the server's disk."""
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    with contextlib.suppress(Exception):
        client.delete_bucket(Bucket=bucket)


# --- profiling -------------------------------------------------------------------------


class Profiler:
    """``py-spy record`` on one PID for the length of a ``with`` block (or nothing)."""

    def __init__(self, res: common.Resources, out_dir: Path | None, name: str,
                 pid: int) -> None:
        self.res, self.name, self.pid = res, name, pid
        self.path = out_dir / f"{name}.txt" if out_dir is not None else None
        self.proc: subprocess.Popen[Any] | None = None

    def __enter__(self) -> Profiler:
        if self.path is None:
            return self
        exe = common.find_executable("py-spy")
        if exe is None:
            log("py-spy not found (pip install py-spy into the venv): not profiling")
            self.path = None
            return self
        self.proc = self.res.spawn(
            [exe, "record", "--pid", str(self.pid), "--format", "raw", "--idle",
             "--threads", "--rate", "200", "--output", str(self.path)],
            log_path=self.path.with_suffix(".log"))
        time.sleep(1.0)  # attach before the timed block starts
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        # py-spy writes its output on SIGINT (SIGTERM would lose it).
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            log(f"py-spy for {self.name} did not stop on SIGINT")
        self.res.stop(self.proc)
        if self.path is not None and self.path.exists():
            print(f"\nprofile {self.name} ({self.path}):\n{summarize_profile(self.path)}",
                  flush=True)


def summarize_profile(path: Path, top: int = 12) -> str:
    """The hottest frames of a py-spy raw (collapsed) profile: by self and total samples,
    per thread. A line of the raw format is ``frame;frame;...;leaf COUNT``."""
    by_thread: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        samples += n
        by_thread[frames[0]] += n
        leaf[frames[-1]] += n
        for frame in set(frames[1:]):
            total[frame] += n
    if not samples:
        return "  (no samples)"

    def pct(n: int) -> str:
        return f"{100 * n / samples:5.1f}%"

    out = [f"  {samples} samples (all threads, idle included)", "  threads:"]
    out += [f"    {pct(n)}  {t}" for t, n in by_thread.most_common(top)]
    out.append("  self (leaf frames):")
    out += [f"    {pct(n)}  {f}" for f, n in leaf.most_common(top)]
    out.append("  total (frame anywhere on the stack):")
    out += [f"    {pct(n)}  {f}" for f, n in total.most_common(2 * top)]
    return "\n".join(out)


# --- the jiaozifuse side ---------------------------------------------------------------


class CloneTarget(common.JiaozifuseTarget):
    """``jiaozifuse clone`` (a new, empty cache) + ``jiaozifuse mount``.

    Only set-up differs from JiaozifuseTarget (which inits a local repository): the
    mount, the search for the daemon's PID and the clean unmount are its own. The CLI
    and the daemon get the server's credentials from this process's environment.
    """

    name = "jiaozifuse-clone"

    def __init__(self, res: common.Resources, url: str, endpoint: str,
                 exe: str | None = None) -> None:
        with socket.socket() as sock:  # a free port for the daemon's metrics
            sock.bind(("127.0.0.1", 0))
            self.metrics_addr = f"127.0.0.1:{sock.getsockname()[1]}"
        super().__init__(res, exe=exe, mount_args=["--metrics-addr", self.metrics_addr])
        self.url, self.endpoint = url, endpoint
        self.clone_s = self.mount_s = float("nan")

    def fetched(self) -> dict[str, float]:
        """The daemon's counters of what it fetched from S3 (its metrics endpoint)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        out = {"remote_bytes": float("nan"), "cache_misses": float("nan")}
        try:
            with urllib.request.urlopen(f"http://{self.metrics_addr}/metrics",
                                        timeout=5) as resp:
                text = resp.read().decode()
        except OSError:
            return out
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "jiaozifuse_read_bytes_total" and s.labels.get("source") == "remote":
                    out["remote_bytes"] = s.value
                elif s.name == "jiaozifuse_cache_misses_total":
                    out["cache_misses"] = s.value
        return out

    def setup(self, root: Path) -> Path:
        if self.exe is None:
            raise common.TargetUnavailable("no `jiaozifuse` executable next to "
                                           f"{sys.executable} or on PATH")
        self.root = root
        self.repo, self.mnt = root / "cache", root / "mnt"
        self.mnt.mkdir(parents=True)
        with Stopwatch() as sw:
            self._run("clone", self.url, str(self.repo), "--endpoint-url", self.endpoint)
        self.clone_s = sw.seconds
        with Stopwatch() as sw:
            self._mount()
        self.mount_s = sw.seconds
        workdir = self.mnt / self.branch
        if not workdir.is_dir():
            raise common.TargetUnavailable(f"{workdir} does not exist after mounting")
        return workdir

    def _mount(self) -> None:
        super()._mount()
        # The daemon's argv names the mountpoint only inside its JSON --options, which
        # common.pids_with_arg (exact arguments) does not see; it writes its PID into
        # REPO/run/daemon.lock. Needed to profile it, and to stop it if unmount does not.
        with contextlib.suppress(OSError, ValueError):
            pid = int((self.repo / "run" / "daemon.lock").read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"jiaozifuse.daemon" in cmdline and pid not in self.pids:
                self.pids.append(pid)
                self.res.add_daemon(pid)


def cpu_seconds(pid: int) -> tuple[float, float, float]:
    """(user, system) CPU seconds a process has used (all its threads), and the
    MiB of its memory it faulted in (minor faults: fresh pages), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return math.nan, math.nan, math.nan
    tick = os.sysconf("SC_CLK_TCK")
    faults = int(fields[7]) * os.sysconf("SC_PAGE_SIZE") / MiB
    return int(fields[11]) / tick, int(fields[12]) / tick, faults


class CPU:
    """CPU seconds used by some processes during a ``with`` block: where a cold read's
    two cores go (client, S3 server), the budget both sides share on this machine."""

    def __init__(self, **pids: int) -> None:
        self.pids, self.used = pids, dict.fromkeys(pids, math.nan)
        self.system = dict.fromkeys(pids, math.nan)  # the kernel's part of used
        self.faulted = dict.fromkeys(pids, math.nan)  # MiB of fresh pages

    def __enter__(self) -> CPU:
        self.start = {k: cpu_seconds(p) for k, p in self.pids.items()}
        return self

    def __exit__(self, *exc: object) -> None:
        for k, p in self.pids.items():
            (u1, s1, f1), (u0, s0, f0) = cpu_seconds(p), self.start[k]
            self.used[k], self.system[k] = u1 - u0 + s1 - s0, s1 - s0
            self.faulted[k] = f1 - f0

    def describe(self, size: int) -> str:
        gib = size / GiB
        return ", ".join(f"{k} {v / gib:.2f} (sys {self.system[k] / gib:.2f}, "
                         f"faulted {self.faulted[k] / gib:.0f} MiB)"
                         for k, v in self.used.items())


def read_sequential(path: Path, expect: int) -> float:
    """Read ``path`` start to end in 1 MiB read() calls; check the length; seconds."""
    total = 0
    buf = bytearray(IO_SIZE)
    with Stopwatch() as sw:
        fd = os.open(path, os.O_RDONLY)
        try:
            while n := os.readv(fd, [buf]):
                total += n
        finally:
            os.close(fd)
    if total != expect:
        raise RuntimeError(f"read {total} bytes of {path}, expected {expect}")
    return sw.seconds


def file_digest(path: Path) -> str:
    """blake3 of a file (untimed verification of what a timed step produced)."""
    import blake3

    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    buf = bytearray(8 * MiB)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def data_digest(data: bytes) -> str:
    import blake3

    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()


# --- one round -------------------------------------------------------------------------


@dataclass
class Round:
    """Everything one round uses; its figures go to ``rec`` ({side: {figure: value}})."""

    n: int
    args: argparse.Namespace
    s3: Any
    res: common.Resources
    root: Path
    client: Any
    counts: collections.Counter[str]
    b_bucket: str
    j_bucket: str
    rec: dict[str, Any]
    digest: str = ""
    repo: Any = None

    @property
    def size(self) -> int:
        return self.args.size * MiB

    @property
    def url(self) -> str:
        return f"s3://{self.j_bucket}/repo"

    def put(self, side: str, figure: str, value: float) -> None:
        self.rec[side][figure] = value


def prepare(r: Round) -> None:
    """Untimed: the data file, and a repository that has imported and committed it."""
    from jiaozifuse.repo import Repository

    log(f"round {r.n + 1}/{r.args.rounds}: generating {r.args.size} MiB, import + commit")
    src = r.root / "src"
    src.mkdir(parents=True)
    data = common.make_data(r.size, seed=r.args.seed + r.n)
    r.digest = data_digest(data)
    (src / KEY).write_bytes(data)
    del data
    with Stopwatch() as sw:
        r.repo = Repository.init(r.root / "repo", remote=r.url, endpoint_url=r.s3.endpoint)
        r.repo.import_dir("main", src)
        r.repo.commit("main", "benchmark data")
    r.put("jiaozifuse", "import_commit_s", sw.seconds)


def upload_boto3(r: Round) -> None:
    from boto3.s3.transfer import TransferConfig

    os.sync()  # no writeback of earlier steps' dirty pages during the timing
    r.counts.clear()
    with Stopwatch() as sw:
        r.client.upload_file(str(r.root / "src" / KEY), r.b_bucket, KEY,
                             Config=TransferConfig())
    n = sum(r.counts.values())
    r.put("boto3", "upload", rate(r.size / MiB, sw.seconds))
    r.put("boto3", "requests_per_gib", n / (r.size / GiB))
    log(f"  upload boto3 upload_file: {rate(r.size / MiB, sw.seconds):.1f} MiB/s, "
        f"{n} requests ({dict(r.counts)})")


def upload_jz(r: Round) -> None:
    os.sync()
    repo = r.repo
    try:
        before = repo.remote.requests
        with Profiler(r.res, r.args.profile, f"sync-r{r.n}", os.getpid()), \
                Stopwatch() as sw:
            sent = repo.sync()
        reqs = repo.remote.requests - before
    finally:
        repo.close()
        r.repo = None
    shutil.rmtree(r.root / "repo", ignore_errors=True)  # reads below use fresh clones
    r.put("jiaozifuse", "upload", rate(r.size / MiB, sw.seconds))
    r.put("jiaozifuse", "requests_per_gib", reqs / (r.size / GiB))
    r.put("jiaozifuse", "sync_packs", sent.get("packs", 0))
    log(f"  upload jiaozifuse sync: {rate(r.size / MiB, sw.seconds):.1f} MiB/s, "
        f"{reqs} requests, {sent}")


def read_boto3(r: Round) -> None:
    from boto3.s3.transfer import TransferConfig

    dst = r.root / "download.bin"
    common.drop_caches()
    with CPU(client=os.getpid(), server=r.s3.proc.pid) as cpu, Stopwatch() as sw:
        r.client.download_file(r.b_bucket, KEY, str(dst), Config=TransferConfig())
    r.put("boto3", "cold_read", rate(r.size / MiB, sw.seconds))
    log(f"  cold read boto3 download_file: {rate(r.size / MiB, sw.seconds):.1f} MiB/s "
        f"(CPU s/GiB: {cpu.describe(r.size)})")
    if file_digest(dst) != r.digest:
        raise RuntimeError("boto3 download_file returned other bytes")
    dst.unlink()

    common.drop_caches()
    total = 0
    with Stopwatch() as sw:
        body = r.client.get_object(Bucket=r.b_bucket, Key=KEY)["Body"]
        while chunk := body.read(IO_SIZE):
            total += len(chunk)
    if total != r.size:
        raise RuntimeError(f"get_object returned {total} bytes, expected {r.size}")
    r.put("boto3", "cold_read_vs_single", rate(r.size / MiB, sw.seconds))
    log(f"  cold read boto3 get_object: {rate(r.size / MiB, sw.seconds):.1f} MiB/s")


def read_jz(r: Round) -> None:
    target = CloneTarget(r.res, r.url, r.s3.endpoint, exe=r.args.jiaozifuse)
    try:
        d = target.setup(r.root / "jz")
        r.put("jiaozifuse", "clone_s", target.clone_s)
        r.put("jiaozifuse", "mount_s", target.mount_s)
        path = d / KEY
        common.drop_caches()
        daemon = target.pids[0] if target.pids else None
        if r.args.profile and daemon is None:
            log("  the daemon's PID was not found: not profiling it")
        with Profiler(r.res, r.args.profile if daemon else None, f"read-r{r.n}",
                      daemon or 0), \
                CPU(daemon=daemon or 0, reader=os.getpid(), server=r.s3.proc.pid) as cpu:
            seconds = read_sequential(path, r.size)
        r.put("jiaozifuse", "cold_read_cpu_daemon", cpu.used["daemon"] / (r.size / GiB))
        r.put("jiaozifuse", "cold_read_cpu_server", cpu.used["server"] / (r.size / GiB))
        r.put("jiaozifuse", "cold_read", rate(r.size / MiB, seconds))
        r.put("jiaozifuse", "cold_read_vs_single", rate(r.size / MiB, seconds))
        got = target.fetched()
        r.put("jiaozifuse", "cold_read_fetched_ratio", got["remote_bytes"] / r.size)
        log(f"  cold read jiaozifuse mount: {rate(r.size / MiB, seconds):.1f} MiB/s "
            f"(clone {target.clone_s:.2f} s, mount {target.mount_s:.2f} s; "
            f"CPU s/GiB: {cpu.describe(r.size)}; fetched from S3: "
            f"{got['remote_bytes'] / MiB:.0f} MiB in {got['cache_misses']:.0f} chunks)")
        if file_digest(path) != r.digest:
            raise RuntimeError("the jiaozifuse mount returned other bytes")
    finally:
        target.teardown()


def one_round(n: int, args: argparse.Namespace, s3: Any, res: common.Resources,
              workdir: Path, rec: dict[str, Any]) -> None:
    """Upload both ways, then cold-read both ways. Which side goes first alternates
    from round to round, so a drift of the machine or the server does not favour one."""
    client = s3.client()
    r = Round(n, args, s3, res, workdir / f"r{n}", client, count_requests(client),
              s3.make_bucket(f"jzb-r{n}-boto3"), s3.make_bucket(f"jzb-r{n}-jz"), rec)
    rec["loadavg_1m"] = {"before": os.getloadavg()[0]}  # others' load skews the figures
    try:
        prepare(r)
        uploads, reads = [upload_boto3, upload_jz], [read_boto3, read_jz]
        if n % 2:
            uploads.reverse()
            reads.reverse()
        for step in (*uploads, *reads):
            step(r)
    finally:
        rec["loadavg_1m"]["after"] = os.getloadavg()[0]
        if r.repo is not None:
            r.repo.close()
        empty_bucket(client, r.b_bucket)
        empty_bucket(client, r.j_bucket)
        shutil.rmtree(r.root, ignore_errors=True)


# --- driver ----------------------------------------------------------------------------


def run(args: argparse.Namespace, res: common.Resources, workdir: Path,
        results: dict) -> None:
    s3server = load_s3server()
    s3 = s3server.SeaweedS3()  # started from the main thread: dies with us (PDEATHSIG)
    try:
        with Stopwatch() as sw:
            s3.start()
        log(f"SeaweedFS S3 at {s3.endpoint} (started in {sw.seconds:.1f} s)")
        with contextlib.suppress(Exception):
            results["environment"]["weed"] = subprocess.run(
                [s3.weed, "version"], capture_output=True, text=True,
                timeout=10).stdout.strip()
        # The in-process Repository (boto3) and the CLI/daemon (inherited) use these.
        os.environ.update(s3.env())
        for rnd in range(args.rounds):
            rec: dict[str, Any] = {"boto3": {}, "jiaozifuse": {}}
            results["rounds"].append(rec)  # partial figures of a failed round stay
            try:
                one_round(rnd, args, s3, res, workdir, rec)
            except common.TargetUnavailable as exc:
                print(f"SKIPPED jiaozifuse: {exc}", flush=True)
                results["errors"].append({"round": rnd, "error": str(exc)})
                break
            except Exception as exc:
                msg = f"{type(exc).__name__}: {exc}"
                results["errors"].append({"round": rnd, "error": msg,
                                          "traceback": traceback.format_exc()})
                print(f"ERROR round {rnd + 1}: {msg}", flush=True)
                traceback.print_exc()
    finally:
        res.close()  # unmount before the server goes away
        s3.close()


def summarize(results: dict) -> str:
    samples: dict[str, dict[str, list[float]]] = {"boto3": {}, "jiaozifuse": {}}
    paired: dict[str, list[float]] = {}  # jz/boto3 within each round
    for rec in results["rounds"]:
        for side in ("boto3", "jiaozifuse"):
            figs = rec[side]
            for key, value in figs.items():
                samples[side].setdefault(key, []).append(value)
        for key, j in rec["jiaozifuse"].items():
            b = rec["boto3"].get(key)
            if b:
                paired.setdefault(key, []).append(j / b)
    results["samples"], results["paired_ratios"] = samples, paired
    medians = {side: {k: common.median(v) for k, v in figs.items()}
               for side, figs in samples.items()}
    results["medians"] = medians
    headers = ["figure", "unit", "boto3 does", "jiaozifuse does", "boto3", "jiaozifuse",
               "jz/boto3", "per round", "target", "result"]
    rows = []
    ratios: dict[str, float] = {}
    for f in FIGURES:
        b = medians["boto3"].get(f.name, math.nan)
        j = medians["jiaozifuse"].get(f.name, math.nan)
        ratio = j / b if math.isfinite(b) and math.isfinite(j) and b else math.nan
        ratios[f.name] = ratio
        result = "-"
        if f.target is not None and math.isfinite(ratio):
            result = "PASS" if ratio >= f.target else "FAIL"
        rows.append([f.name, f.unit if f.higher_is_better else f"{f.unit} (lower=better)",
                     f.boto3_label, f.jz_label, common.fmt_num(b), common.fmt_num(j),
                     common.fmt_ratio(j, b),
                     " ".join(f"{v:.2f}" for v in paired.get(f.name, [])) or "-",
                     f">= {f.target}" if f.target else "-", result])
    results["ratios"] = ratios
    extra = [f"  {label}: {common.fmt_num(medians['jiaozifuse'].get(key, math.nan))}"
             for key, label in JZ_EXTRA.items()]
    return "\n".join([common.format_table(headers, rows, left_columns=4), "",
                      "jiaozifuse, medians:", *extra])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, help="rounds, fresh buckets each (default 3)")
    ap.add_argument("--size", type=int, help="file size in MiB (default 1024)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 64 MiB, 1 round (unless given explicitly)")
    ap.add_argument("--workdir", type=Path,
                    help="where local files and caches go (default: a new temp dir, removed)")
    ap.add_argument("--json", type=Path, help="write per-round figures and medians here")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="py-spy the sync (this process) and the mount daemon during the "
                         "cold read; collapsed stacks go to DIR (perturbs the timings)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jiaozifuse", help="path of the jiaozifuse executable")
    args = ap.parse_args(argv)
    defaults = {"rounds": 1, "size": 64} if args.quick else {"rounds": 3, "size": 1024}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rounds < 1 or args.size < 1:
        ap.error("--rounds and --size must be positive")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profile = args.profile.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.install_signal_handlers()
    parent = args.workdir
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="jzbench-remote-", dir=parent))
    results: dict = {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": common.environment(),
        "rounds": [], "errors": [],
        "figures": [asdict(f) for f in FIGURES], "jz_extra": JZ_EXTRA,
    }
    log(f"workdir {workdir}")
    rc = common.run_in_workdir(lambda res: run(args, res, workdir, results), workdir,
                               "interrupted; mounts, processes and the server cleaned up")
    results["drop_caches_worked"] = common.drop_caches_worked()
    print()
    print(f"size={args.size} MiB, rounds={args.rounds}, drop_caches="
          f"{'yes' if common.drop_caches_worked() else 'no'}"
          f"{', PROFILED (timings perturbed)' if args.profile else ''}")
    print(summarize(results))
    return common.finish(results, args.json, rc)


if __name__ == "__main__":
    sys.exit(main())
