#!/usr/bin/env python3
"""Benchmark a jiaozifuse mount against the local disk and a plain pyfuse3 passthrough.

Usage::

    python scripts/bench/mount.py [--targets native,passthrough,jiaozifuse]
        [--rounds 3] [--size 1024] [--files 10000] [--quick] [--json out.json]

Why three targets: ``native`` is the ceiling, ``passthrough`` (scripts/bench/passthrough.py)
is what any pyfuse3 filesystem pays for FUSE + Python + trio, so ``jz/passthrough`` is
the figure jiaozifuse's own design is judged by, and ``jz/native`` is what a user feels.

Why interleaved rounds: a round sets up every target afresh and runs all workloads on
each in turn, so slow drifts of the machine (other load, SSD garbage collection, page
cache pressure) spread over all targets instead of biasing the one run last. The table
shows the median over rounds.

Run it with the project's venv python (``.venv/bin/python``) so that ``jiaozifuse`` is
found next to the interpreter. Root is needed for the cold figures (drop_caches).
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import common
from common import MiB, Stopwatch, log, rate

SMALL_FILE = 16 * 1024
IO_SIZE = MiB
RAND_IO = 4096


@dataclass(frozen=True)
class Figure:
    name: str
    unit: str
    higher_is_better: bool = True


FIGURES = [
    Figure("seq_write", "MiB/s"),
    Figure("seq_read_cold", "MiB/s"),
    Figure("seq_read_warm", "MiB/s"),
    Figure("rand_read_4k_cold", "ops/s"),
    Figure("files_create", "files/s"),
    Figure("files_read_cold", "files/s"),
    Figure("files_stat", "files/s"),
    Figure("ls_l_first", "s", higher_is_better=False),
    Figure("ls_l_repeat", "s", higher_is_better=False),
    Figure("files_delete", "files/s"),
]


@dataclass(frozen=True)
class Params:
    size_mib: int
    files: int
    rand_reads: int
    seed: int


MakeCold = Callable[[], None]


# --- workloads -----------------------------------------------------------------------
# Each takes the target directory, the parameters, a function that makes the target cold
# (remount + drop caches) and the round's data, and returns {figure name: value}.


def seq_and_random(d: Path, p: Params, make_cold: MakeCold, data: bytes) -> dict[str, float]:
    """Sequential write, cold and warm sequential read, then cold random 4 KiB reads.

    The write is timed until close() returns after fsync(), so data is on the target's
    storage, not just in some cache. The file data is generated before the clock starts
    (unique per round: no dedup across rounds).
    """
    path = d / "big.bin"
    size = len(data)
    view = memoryview(data)
    out: dict[str, float] = {}

    with Stopwatch() as sw:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for off in range(0, size, IO_SIZE):
                chunk = view[off : off + IO_SIZE]
                written = 0
                while written < len(chunk):
                    written += os.write(fd, chunk[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
    out["seq_write"] = rate(size / MiB, sw.seconds)

    make_cold()
    out["seq_read_cold"] = rate(size / MiB, _read_all(path, size))
    out["seq_read_warm"] = rate(size / MiB, _read_all(path, size))

    make_cold()
    rng = random.Random(p.seed)
    blocks = max(1, size // RAND_IO)
    offsets = [rng.randrange(blocks) * RAND_IO for _ in range(p.rand_reads)]
    fd = os.open(path, os.O_RDONLY)
    try:
        with Stopwatch() as sw:
            for off in offsets:
                if len(os.pread(fd, RAND_IO, off)) != RAND_IO:
                    raise RuntimeError(f"short random read at {off}")
    finally:
        os.close(fd)
    out["rand_read_4k_cold"] = rate(len(offsets), sw.seconds)
    return out


def _read_all(path: Path, expect: int) -> float:
    """Read ``path`` start to end in 1 MiB reads, check the length, return seconds."""
    total = 0
    with Stopwatch() as sw:
        fd = os.open(path, os.O_RDONLY)
        try:
            while n := len(os.read(fd, IO_SIZE)):
                total += n
        finally:
            os.close(fd)
    if total != expect:
        raise RuntimeError(f"read {total} bytes of {path}, expected {expect}")
    return sw.seconds


def small_files(d: Path, p: Params, make_cold: MakeCold, data: bytes) -> dict[str, float]:
    """Many 16 KiB files in one directory: create, cold read, stat, ``ls -l`` twice,
    delete. This is the metadata-heavy side (ML datasets of many small samples)."""
    top = d / "files"
    top.mkdir()
    names = [str(top / f"f{i:06d}") for i in range(p.files)]
    view = memoryview(data)
    out: dict[str, float] = {}

    with Stopwatch() as sw:
        for i, name in enumerate(names):
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, view[i * SMALL_FILE : (i + 1) * SMALL_FILE])
            finally:
                os.close(fd)
    out["files_create"] = rate(len(names), sw.seconds)

    make_cold()
    total = 0
    with Stopwatch() as sw:
        for name in names:
            fd = os.open(name, os.O_RDONLY)
            try:
                while n := len(os.read(fd, 65536)):
                    total += n
            finally:
                os.close(fd)
    if total != len(names) * SMALL_FILE:
        raise RuntimeError(f"read {total} bytes from the small files, "
                           f"expected {len(names) * SMALL_FILE}")
    out["files_read_cold"] = rate(len(names), sw.seconds)

    with Stopwatch() as sw:
        for name in names:
            os.stat(name)
    out["files_stat"] = rate(len(names), sw.seconds)

    make_cold()
    for key in ("ls_l_first", "ls_l_repeat"):
        with Stopwatch() as sw:
            subprocess.run(["ls", "-l", str(top)], stdout=subprocess.DEVNULL, check=True,
                           env={**os.environ, "LC_ALL": "C"})
        out[key] = sw.seconds

    with Stopwatch() as sw:
        for name in names:
            os.unlink(name)
    out["files_delete"] = rate(len(names), sw.seconds)
    os.rmdir(top)
    return out


WORKLOADS = {"seq": seq_and_random, "files": small_files}


# --- driver --------------------------------------------------------------------------


def make_target(name: str, res: common.Resources, args: argparse.Namespace) -> common.Target:
    if name == "native":
        return common.NativeTarget(res)
    if name == "passthrough":
        return common.PassthroughTarget(res)
    if name == "jiaozifuse":
        return common.JiaozifuseTarget(res, exe=args.jiaozifuse,
                                       mount_args=shlex.split(args.jz_mount_args))
    raise SystemExit(f"unknown target {name!r}")


def run(args: argparse.Namespace, res: common.Resources, workdir: Path,
        results: dict) -> None:
    targets = [make_target(n, res, args) for n in args.targets]
    skipped: dict[str, str] = {}
    samples: dict[str, dict[str, list[float]]] = results["samples"]
    for t in targets:
        samples[t.name] = {f.name: [] for f in FIGURES}

    for rnd in range(args.rounds):
        params = Params(args.size, args.files, args.rand_reads, seed=args.seed + rnd)
        log(f"round {rnd + 1}/{args.rounds}: generating data")
        big = common.make_data(args.size * MiB, seed=2 * params.seed)
        small = common.make_data(args.files * SMALL_FILE, seed=2 * params.seed + 1)
        data = {"seq": big, "files": small}
        # Rotate the order each round: on this VM a write into page-cache pages
        # that were just freed (by the previous target's deleted files) costs
        # a third of one into cold memory, so a fixed order favours one target.
        k = rnd % len(targets)
        for t in targets[k:] + targets[:k]:
            if t.name in skipped:
                continue
            root = workdir / f"r{rnd}-{t.name}"
            root.mkdir()
            log(f"round {rnd + 1}/{args.rounds}: {t.name}")
            try:
                d = t.setup(root)
                for wname in args.workloads:
                    figures = WORKLOADS[wname](d, params, t.make_cold, data[wname])
                    for key, value in figures.items():
                        samples[t.name][key].append(value)
                    log(f"  {wname}: " + ", ".join(f"{k}={common.fmt_num(v)}"
                                                   for k, v in figures.items()))
            except common.TargetUnavailable as exc:
                skipped[t.name] = str(exc)
                print(f"SKIPPED {t.name}: {exc}", flush=True)
            except Exception as exc:
                # A failing target must not lose the others' numbers; keep going.
                msg = f"{type(exc).__name__}: {exc}"
                results["errors"].append({"round": rnd, "target": t.name, "error": msg,
                                          "traceback": traceback.format_exc()})
                print(f"ERROR {t.name} round {rnd + 1}: {msg}", flush=True)
            finally:
                t.teardown()
    results["skipped"] = skipped


def summarize(results: dict, target_names: list[str]) -> str:
    samples = results["samples"]
    present = [t for t in target_names
               if any(samples.get(t, {}).get(f.name) for f in FIGURES)]
    medians = {t: {f.name: common.median(samples[t][f.name]) for f in FIGURES}
               for t in present}
    results["medians"] = medians
    if not present:
        return "(no results)"
    headers = ["figure", "unit", *present]
    ratios = [(b, f"jz/{b}") for b in ("passthrough", "native")
              if "jiaozifuse" in present and b in present]
    headers += [label for _, label in ratios]
    rows = []
    for f in FIGURES:
        if not any(samples[t][f.name] for t in present):
            continue
        unit = f.unit if f.higher_is_better else f"{f.unit} (lower=better)"
        row = [f.name, unit, *(common.fmt_num(medians[t][f.name]) for t in present)]
        row += [common.fmt_ratio(medians["jiaozifuse"][f.name], medians[b][f.name])
                for b, _ in ratios]
        rows.append(row)
    return common.format_table(headers, rows, left_columns=2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="native,passthrough,jiaozifuse",
                    help="comma-separated: native, passthrough, jiaozifuse")
    ap.add_argument("--workloads", default="seq,files", help="comma-separated: seq, files")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    ap.add_argument("--size", type=int, help="big file size in MiB (default 1024)")
    ap.add_argument("--files", type=int, help="number of 16 KiB files (default 10000)")
    ap.add_argument("--rand-reads", type=int, default=20000,
                    help="random 4 KiB reads (default 20000)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 64 MiB, 1000 files, 1 round (unless given explicitly)")
    ap.add_argument("--workdir", type=Path,
                    help="where targets keep their data (default: a new temp dir, removed)")
    ap.add_argument("--json", type=Path, help="write raw samples and medians here")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jiaozifuse", help="path of the jiaozifuse executable")
    ap.add_argument("--jz-mount-args", default="",
                    help="extra arguments for `jiaozifuse mount` (shell-quoted string)")
    args = ap.parse_args(argv)
    quick = {"rounds": 1, "size": 64, "files": 1000}
    full = {"rounds": 3, "size": 1024, "files": 10000}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workloads:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w!r}")
    if args.rounds < 1 or args.size < 1 or args.files < 1:
        ap.error("--rounds, --size and --files must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.install_signal_handlers()
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="jzbench-", dir=args.workdir))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="jzbench-"))
    results: dict = {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": common.environment(),
        "samples": {}, "errors": [], "figures": [asdict(f) for f in FIGURES],
    }
    log(f"workdir {workdir}")
    rc = common.run_in_workdir(lambda res: run(args, res, workdir, results), workdir,
                               "interrupted; mounts and processes cleaned up")
    results["drop_caches_worked"] = common.drop_caches_worked()
    print()
    print(f"size={args.size} MiB, files={args.files}, rounds={args.rounds}, "
          f"rand_reads={args.rand_reads}, drop_caches="
          f"{'yes' if common.drop_caches_worked() else 'no (cold = remount only)'}")
    print(summarize(results, args.targets))
    for name, why in results.get("skipped", {}).items():
        print(f"skipped {name}: {why}")
    return common.finish(results, args.json, rc)


if __name__ == "__main__":
    sys.exit(main())
