#!/usr/bin/env python3
"""Benchmark the event log: what recording events costs a mount, and how fast the log
takes appends and is forwarded to Redis.

Usage::

    .venv/bin/python scripts/bench/events.py [--files 3000] [--rounds 3]
        [--events 100000] [--variants off,on,rules,redis] [--quick] [--json out.json]

Three parts:

``create``
    16 KiB files created (open, one write, close) in one directory of MNT/main, on a
    fresh repository per variant and round, rounds interleaved:

    - ``off``:   config ``events.enabled: false``, nothing recorded;
    - ``on``:    the default, every create and close_write appended to the log;
    - ``rules``: as ``on`` with a committed .jiaozi/triggers.toml of 10 rules on
      close_write that match nothing here, so the daemon's runner reads and matches
      every event while files are made;
    - ``redis``: as ``on`` with ``events.redis_url`` set: the daemon forwards the log to
      a redis-server started by this script.

    Besides the create rate: the mount daemon's CPU time (user + system, from
    /proc/PID/stat) per file, which the machine's other load disturbs less than wall
    time; the durable LMDB commits per file (LMDB's ``last_txnid``: each is an
    fdatasync); and ``drain s``, the time from the last close until the trigger runner
    (and for ``redis`` the forwarder) had handled every event (counted in the CPU and
    commits too).

``append``
    In-process ``EventLog.append`` into a store batch as the daemon does it: one nested
    write transaction per event and a group commit every 1,000 events (``nested``),
    or every event of a 1,000-event block in one transaction (``block``).

``forward``
    In-process ``RedisForwarder.forward_once`` (batches of 500, one pipelined XADD
    round trip each) of N events already in the log, to a local redis-server.

Run it with the project's venv python. Every mount and process it starts is undone at
exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import common
from common import Stopwatch, log, rate

sys.path.insert(0, str(common.REPO_ROOT))

SMALL_FILE = 16 * 1024
VARIANTS = ("off", "on", "rules", "redis")
NO_MATCH_RULES = "".join(f"""
[[trigger]]
name = "r{i}"
on = ["close_write"]
branches = ["main"]
paths = ["nomatch{i}/**"]
run = ["true"]
""" for i in range(10))


# --- redis ---------------------------------------------------------------------------


class RedisServer:
    def __init__(self, res: common.Resources, workdir: Path) -> None:
        self.res = res
        self.workdir = workdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen[Any] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            raise common.TargetUnavailable("no redis-server on PATH")
        self.proc = self.res.spawn(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            log_path=self.workdir / "redis.log")
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.res.stop(self.proc)
            self.proc = None


# --- create through a mount ----------------------------------------------------------


class EventsTarget(common.JiaozifuseTarget):
    """A jiaozifuse mount whose repository is configured for one variant."""

    def __init__(self, res: common.Resources, variant: str, redis_url: str | None) -> None:
        super().__init__(res, exe=str(Path(sys.executable).parent / "jiaozifuse"))
        self.variant = variant
        self.redis_url = redis_url
        self.name = f"jiaozifuse/{variant}"

    def setup(self, root: Path) -> Path:
        if self.exe is None or not Path(self.exe).exists():
            raise common.TargetUnavailable("no jiaozifuse executable next to the python")
        self.root = root
        self.repo, self.mnt = root / "repo", root / "mnt"
        self.mnt.mkdir(parents=True)
        self._run("init", str(self.repo))
        cfg_path = self.repo / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if self.variant == "off":
            cfg["events"] = {"enabled": False}
        elif self.variant == "redis":
            cfg["events"] = {"redis_url": self.redis_url, "redis_stream": "bench:events"}
        cfg_path.write_text(json.dumps(cfg))
        self._mount()
        work = self.mnt / "main"
        if self.variant == "rules":
            (work / ".jiaozi").mkdir()
            (work / ".jiaozi" / "triggers.toml").write_text(NO_MATCH_RULES)
            self._run("--repo", str(self.repo), "commit", "-m", "rules")
        return work


def _consumer_offsets(repo: Path) -> tuple[int, int, int]:
    """(last_seq, offset of 'triggers', offset of 'redis') as the daemon has them."""
    from jiaozifuse import control

    st = control.call(repo, "triggers_status", {"limit": 1})
    from jiaozifuse.repo import Repository

    with Repository.open(repo, readonly=True) as r:
        redis_off = r.events.offset("redis")
    return st["last_seq"], st["offset"], redis_off


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def lmdb_txnid(repo: Path) -> int:
    """LMDB's last transaction id: how many write transactions were committed."""
    import lmdb

    env = lmdb.open(str(repo / "store"), readonly=True, max_dbs=32)
    try:
        return env.info()["last_txnid"]
    finally:
        env.close()


def daemon_pid(t: EventsTarget) -> int:
    return int(json.loads((t.mnt / ".jiaozifuse-mount").read_text())["pid"])


def create_files(work: Path, n: int, data: bytes) -> float:
    top = work / "files"
    top.mkdir()
    view = memoryview(data)
    with Stopwatch() as sw:
        for i in range(n):
            fd = os.open(top / f"f{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, view[i * SMALL_FILE:(i + 1) * SMALL_FILE])
            finally:
                os.close(fd)
    return rate(n, sw.seconds)


def wait_drained(t: EventsTarget, timeout: float = 300) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        last, trig, red = _consumer_offsets(t.repo)
        done = trig >= last and (red >= last or t.variant != "redis")
        if done:
            return time.perf_counter() - start
        time.sleep(0.05)
    return float("nan")


def bench_create(args: argparse.Namespace, res: common.Resources, workdir: Path,
                 results: dict) -> None:
    srv = None
    if "redis" in args.variants:
        srv = RedisServer(res, workdir)
        try:
            srv.start()
        except Exception as exc:
            log(f"redis variant skipped: {exc}")
            args.variants = [v for v in args.variants if v != "redis"]
            srv = None
    data = common.make_data(args.files * SMALL_FILE, seed=7)
    for rnd in range(args.rounds):
        order = args.variants if rnd % 2 == 0 else list(reversed(args.variants))
        for variant in order:
            t = EventsTarget(res, variant, srv.url if srv else None)
            root = workdir / f"create-{variant}-{rnd}"
            try:
                work = t.setup(root)
                log(f"round {rnd + 1}: {variant}: creating {args.files} files")
                pid = daemon_pid(t)
                cpu0, txn0 = cpu_seconds(pid), lmdb_txnid(t.repo)
                files_s = create_files(work, args.files, data)
                drain = wait_drained(t) if variant != "off" else float("nan")
                time.sleep(0.2)  # the last group commit
                cpu_us = (cpu_seconds(pid) - cpu0) / args.files * 1e6
                commits = (lmdb_txnid(t.repo) - txn0) / args.files
                last, _, _ = _consumer_offsets(t.repo)
                row = {"files_s": files_s, "drain_s": drain, "events": last,
                       "daemon_cpu_us_per_file": cpu_us, "commits_per_file": commits}
                if variant == "redis" and srv is not None:
                    row["stream_len"] = srv.client().xlen("bench:events")
                    srv.client().delete("bench:events")
                results.setdefault("create", {}).setdefault(variant, []).append(row)
                log(f"  {files_s:,.0f} files/s, daemon CPU {cpu_us:,.0f} us/file, "
                    f"{commits:.2f} commits/file, "
                    f"{last} events, drain {drain:.2f} s")
            finally:
                t.teardown()
    if srv is not None:
        srv.stop()


# --- in-process ------------------------------------------------------------------------


def bench_append(args: argparse.Namespace, workdir: Path, results: dict) -> None:
    from jiaozifuse.repo import Repository

    for rnd in range(args.rounds):
        for mode in ("nested", "block"):
            path = workdir / f"append-{mode}-{rnd}"
            repo = Repository.init(path)
            log_ = repo.events
            store = repo.store
            store.begin_batch()
            n = args.events
            try:
                with Stopwatch() as sw:
                    for start in range(0, n, 1000):
                        if mode == "nested":
                            for i in range(start, min(n, start + 1000)):
                                with store.write() as w:
                                    log_.append("close_write", w, branch="main",
                                                path=f"data/part-{i:06d}.csv", size=16384)
                        else:
                            with store.write() as w:
                                for i in range(start, min(n, start + 1000)):
                                    log_.append("close_write", w, branch="main",
                                                path=f"data/part-{i:06d}.csv", size=16384)
                        store.commit_batch()
            finally:
                store.end_batch()
            assert log_.last_seq() == n
            with Stopwatch() as rd:
                got = sum(1 for _ in log_.read(0))
            repo.close()
            shutil.rmtree(path, ignore_errors=True)
            results.setdefault("append", {}).setdefault(mode, []).append(
                {"events_s": rate(n, sw.seconds), "read_events_s": rate(got, rd.seconds)})
            log(f"round {rnd + 1}: append/{mode}: {rate(n, sw.seconds):,.0f} events/s")


def bench_forward(args: argparse.Namespace, res: common.Resources, workdir: Path,
                  results: dict) -> None:
    from jiaozifuse.forward import RedisForwarder
    from jiaozifuse.repo import Repository

    srv = RedisServer(res, workdir)
    try:
        srv.start()
    except Exception as exc:
        log(f"forward skipped: {exc}")
        return
    try:
        for rnd in range(args.rounds):
            path = workdir / f"forward-{rnd}"
            repo = Repository.init(path)
            with repo.store.write() as w:
                for i in range(args.events):
                    repo.events.append("close_write", w, branch="main",
                                       path=f"data/part-{i:06d}.csv", size=16384)
            fwd = RedisForwarder(repo.events, srv.url, stream=f"bench:fwd:{rnd}")
            sent = 0
            with Stopwatch() as sw:
                while n := fwd.forward_once(500):
                    sent += n
            length = srv.client().xlen(f"bench:fwd:{rnd}")
            srv.client().delete(f"bench:fwd:{rnd}")
            repo.close()
            shutil.rmtree(path, ignore_errors=True)
            if sent != args.events or length != args.events:
                raise RuntimeError(f"forwarded {sent}, stream holds {length}, "
                                   f"expected {args.events}")
            results.setdefault("forward", []).append({"events_s": rate(sent, sw.seconds)})
            log(f"round {rnd + 1}: forward: {rate(sent, sw.seconds):,.0f} events/s")
    finally:
        srv.stop()


# --- output ----------------------------------------------------------------------------


def summarize(results: dict, args: argparse.Namespace) -> str:
    med = common.median
    out = []
    create = results.get("create", {})
    if create:
        base = med(r["files_s"] for r in create.get("off", []))
        base_cpu = med(r["daemon_cpu_us_per_file"] for r in create.get("off", []))
        rows = []
        for v in args.variants:
            rs = create.get(v, [])
            if not rs:
                continue
            fs = med(r["files_s"] for r in rs)
            cpu = med(r["daemon_cpu_us_per_file"] for r in rs)
            rows.append([v, common.fmt_num(fs), common.fmt_ratio(fs, base),
                         common.fmt_num(cpu), common.fmt_ratio(cpu, base_cpu),
                         f"{med(r['commits_per_file'] for r in rs):.2f}",
                         str(int(med(r["events"] for r in rs))),
                         common.fmt_num(med(r["drain_s"] for r in rs))])
        out.append(f"create {args.files} x 16 KiB files through the mount "
                   f"(median of {args.rounds})")
        out.append(common.format_table(
            ["variant", "files/s", "vs off", "daemon CPU us/file", "vs off",
             "commits/file", "events", "drain s"], rows))
    if results.get("append"):
        rows = [[mode, common.fmt_num(med(r["events_s"] for r in rs)),
                 common.fmt_num(med(r["read_events_s"] for r in rs))]
                for mode, rs in results["append"].items()]
        out.append(f"\nEventLog.append, {args.events} events, in-process "
                   f"(median of {args.rounds})")
        out.append(common.format_table(["mode", "append events/s", "read events/s"], rows))
    if results.get("forward"):
        out.append(f"\nRedisForwarder.forward_once(500), {args.events} events "
                   f"(median of {args.rounds})")
        out.append(common.format_table(
            ["", "events/s"],
            [["redis", common.fmt_num(med(r["events_s"] for r in results["forward"]))]]))
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=3000, help="small files per create run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--events", type=int, default=100_000,
                    help="events for the in-process append and forward figures")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--parts", default="create,append,forward")
    ap.add_argument("--quick", action="store_true", help="300 files, 10k events, 1 round")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--workdir", help="where to put repositories (default: a temp dir)")
    a = ap.parse_args(argv)
    if a.quick:
        a.files, a.events, a.rounds = 300, 10_000, 1
    a.variants = [v for v in a.variants.split(",") if v]
    for v in a.variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}")
    a.parts = [p for p in a.parts.split(",") if p]
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.install_signal_handlers()
    results: dict[str, Any] = {"env": common.environment(),
                               "params": {k: v for k, v in vars(args).items()
                                          if k not in ("json",)}}
    base = Path(args.workdir) if args.workdir else None
    with common.Resources() as res, tempfile.TemporaryDirectory(
            prefix="jz-bench-events-", dir=base) as tmp:
        work = Path(tmp)
        try:
            if "create" in args.parts:
                bench_create(args, res, work, results)
            if "append" in args.parts:
                bench_append(args, work, results)
            if "forward" in args.parts:
                bench_forward(args, res, work, results)
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        except Exception:
            traceback.print_exc()
            return 1
        finally:
            with contextlib.suppress(Exception):
                print(summarize(results, args))
    if args.json:
        common.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
