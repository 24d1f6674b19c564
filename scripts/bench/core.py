#!/usr/bin/env python3
"""Benchmark the repository core through the Python API: import, commit, branch, dedup.

Usage::

    .venv/bin/python scripts/bench/core.py [--rounds 3] [--max-files 100000]
        [--sections import,commit,dedup] [--quick] [--workdir /tmp] [--json out.json]

What it prints (no FUSE involved; everything goes through ``Repository`` and its
``Worktree`` in temp directories under ``--workdir``):

* **import**: ``import_dir`` throughput for one big file of incompressible data and
  for many 64 KiB files, beside ``chunking.chunk_and_hash`` over the same bytes in
  memory (the ceiling for the CPU part) and ``cp -r`` of the same directory to the
  same disk, with and without a ``sync -f`` (jiaozifuse's import is durable, plain cp
  is not). Methods run interleaved in each round, in rotating order.
* **commit**: branches of 1k, 10k and 100k small files in directories of 1,000; after a
  first full commit, change one file and time ``commit`` (several samples), both on the
  branch as built (worktree fully materialised) and on a fresh branch made from it
  (worktree unloaded). Commit cost must grow with the change only, so the ratio
  largest/smallest should stay near 1. Also ``create_branch`` (must be constant).
* **dedup**: a 100 MiB text file imported and committed, then 1 MiB of new lines
  appended and imported + committed again: stored bytes may grow by about the
  appended amount only (limit: appended + 0.5 MiB). And ten copies of one file under
  different names: stored against logical bytes.

Why the fixture branches are built with fsync off: building goes through the public
worktree API (create, open, write, release), but every one of those is a durable LMDB
transaction, and 100k files x 2 fsyncs would take many minutes while measuring
nothing of interest. The builder opens the repository with LMDB ``sync=False``,
syncs and closes it; everything timed afterwards uses a normally opened (durable)
repository.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import common
from common import MiB, Stopwatch, fmt_num, fmt_ratio, log, median, rate

sys.path.insert(0, str(common.REPO_ROOT))  # run from a checkout without installing

import lmdb

from jiaozifuse import store as jz_store
from jiaozifuse.chunking import chunk_and_hash
from jiaozifuse.repo import Repository

KiB = 1024
DIR_ENTRIES = 1000  # files per directory in the commit-latency branches
COMMIT_SAMPLES = 5
BRANCH_SAMPLES = 20
BRANCH_SIZES = (1_000, 10_000, 100_000)
SECTIONS = ("import", "commit", "dedup")


# --- helpers -------------------------------------------------------------------------


@contextlib.contextmanager
def unsynced_repo(path: Path) -> Iterator[Repository]:
    """Open the repository at ``path`` with LMDB fsync off, for building fixtures only.

    Patches ``lmdb.open`` while the store opens (the store module calls it with
    sync=True); on exit flushes open files, syncs once and closes, so that a normal
    ``Repository.open`` afterwards sees everything.
    """
    real_open = lmdb.open

    def open_nosync(*args: Any, **kwargs: Any) -> lmdb.Environment:
        kwargs["sync"] = False
        kwargs["metasync"] = False
        return real_open(*args, **kwargs)

    with mock.patch.object(jz_store.lmdb, "open", open_nosync):
        repo = Repository.open(path)
    try:
        yield repo
    finally:
        repo.worktree.flush_all()
        repo.store.sync()
        repo.close()


def write_file(repo: Repository, root: int, path: str, data: bytes) -> None:
    """Overwrite an existing file of a branch through the worktree API."""
    wt = repo.worktree
    ino = wt.resolve(root, path).ino
    wt.open(ino)
    try:
        wt.truncate(ino, 0)
        wt.write(ino, 0, data)
    finally:
        wt.release(ino)


def settle() -> None:
    """Flush other dirty pages before a timed durable step, so that it does not pay
    for the writeback of an earlier one."""
    os.sync()


def make_text(size: int, seed: int, first_row: int = 0) -> tuple[bytes, int]:
    """Whole CSV lines of varying numbers, at least ``size`` bytes; returns (text, rows)."""
    rng = random.Random(seed)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
             "india", "juliett", "kilo", "lima", "mike", "november", "oscar", "papa"]
    parts: list[bytes] = []
    total = 0
    row = first_row
    while total < size:
        block = "".join(
            f"{r},{rng.randrange(10**9)},{rng.random() * 1000:.4f},{rng.choice(words)},"
            f"{rng.randrange(1 << 32):08x},{rng.randrange(-500, 500)}\n"
            for r in range(row, row + 2000)
        ).encode()
        row += 2000
        parts.append(block)
        total += len(block)
    text = b"".join(parts)
    # trim to whole lines just past ``size``
    cut = text.find(b"\n", size - 1)
    text = text[: cut + 1] if cut >= 0 else text
    return text, text.count(b"\n")


def chunk_hash_seconds(blobs: list[bytes]) -> float:
    with Stopwatch() as sw:
        for blob in blobs:
            for _ in chunk_and_hash(blob):
                pass
    return sw.seconds


def rm(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- import ----------------------------------------------------------------------------


def write_dataset(src: Path, files: list[tuple[str, bytes]]) -> None:
    src.mkdir(parents=True)
    for name, data in files:
        (src / name).write_bytes(data)


def import_round(src: Path, blobs: list[bytes], scratch: Path, rnd: int) -> dict[str, float]:
    """One round of every method over dataset ``src``; returns seconds per method."""
    out: dict[str, float] = {}

    def m_chunk() -> None:
        out["chunk_hash"] = chunk_hash_seconds(blobs)

    def m_cp() -> None:
        dst = scratch / "cp"
        settle()
        with Stopwatch() as sw:
            subprocess.run(["cp", "-r", "--", str(src), str(dst)], check=True)
        out["cp"] = sw.seconds
        rm(dst)
        settle()
        with Stopwatch() as sw:
            subprocess.run(["cp", "-r", "--", str(src), str(dst)], check=True)
            subprocess.run(["sync", "-f", str(dst)], check=True)
        out["cp_sync"] = sw.seconds
        rm(dst)

    def m_import() -> None:
        path = scratch / "repo"
        repo = Repository.init(path)
        try:
            settle()
            with Stopwatch() as sw:
                repo.import_dir("main", src)
            out["import"] = sw.seconds
            with Stopwatch() as sw:
                repo.commit("main", "import")
            out["commit"] = sw.seconds
        finally:
            repo.close()
            rm(path)

    methods: list[Callable[[], None]] = [m_chunk, m_cp, m_import]
    k = rnd % len(methods)
    for m in methods[k:] + methods[:k]:
        m()
    return out


def bench_import(args: argparse.Namespace, workdir: Path, results: dict) -> str:
    datasets = []
    big = common.make_data(args.big_mib * MiB, args.seed)
    datasets.append((f"1 x {args.big_mib} MiB", [("big.bin", big)]))
    small_all = common.make_data(args.small_files * args.small_kib * KiB, args.seed + 1)
    step = args.small_kib * KiB
    small = [(f"f{i:05d}.bin", small_all[i * step:(i + 1) * step])
             for i in range(args.small_files)]
    del small_all
    datasets.append((f"{args.small_files} x {args.small_kib} KiB", small))

    rows = []
    res: dict[str, Any] = {}
    for label, files in datasets:
        src = workdir / "import-src"
        scratch = workdir / "import-scratch"
        write_dataset(src, files)
        scratch.mkdir()
        blobs = [data for _, data in files]
        nbytes = sum(len(b) for b in blobs)
        samples: dict[str, list[float]] = {}
        try:
            for rnd in range(args.rounds):
                log(f"import {label}: round {rnd + 1}/{args.rounds}")
                for key, secs in import_round(src, blobs, scratch, rnd).items():
                    samples.setdefault(key, []).append(secs)
        finally:
            rm(src)
            rm(scratch)
        sec = {k: median(v) for k, v in samples.items()}
        mibs = {k: rate(nbytes / MiB, v) for k, v in sec.items() if k != "commit"}
        res[label] = {"bytes": nbytes, "files": len(files), "samples_s": samples,
                      "median_s": sec, "mib_s": mibs,
                      "import_files_s": rate(len(files), sec["import"])}
        rows.append([label, fmt_num(mibs["chunk_hash"]), fmt_num(mibs["import"]),
                     fmt_num(mibs["cp"]), fmt_num(mibs["cp_sync"]),
                     fmt_ratio(mibs["import"], mibs["chunk_hash"]),
                     fmt_ratio(mibs["import"], mibs["cp"]),
                     fmt_ratio(mibs["import"], mibs["cp_sync"]),
                     fmt_num(sec["commit"] * 1000)])
    results["import"] = res
    return common.format_table(
        ["dataset", "chunk+hash MiB/s", "import MiB/s", "cp MiB/s", "cp+sync MiB/s",
         "import/chunk+hash", "import/cp", "import/cp+sync", "commit ms"], rows)


# --- commit latency and branch creation ------------------------------------------------


def content(d: int, i: int, version: int) -> bytes:
    return f"{d:03d}/{i:04d} v{version:04d}\n".encode()


def build_branch(path: Path, nfiles: int) -> float:
    """A repository whose main branch holds ``nfiles`` files in dirs of DIR_ENTRIES."""
    Repository.init(path).close()
    uid, gid = os.getuid(), os.getgid()
    with Stopwatch() as sw, unsynced_repo(path) as repo:
        wt = repo.worktree
        root = repo.root_ino("main")
        done = 0
        for d in range((nfiles + DIR_ENTRIES - 1) // DIR_ENTRIES):
            dnode = wt.create(root, f"d{d:03d}".encode(), stat.S_IFDIR | 0o755, uid, gid)
            for i in range(min(DIR_ENTRIES, nfiles - done)):
                node = wt.create(dnode.ino, f"f{i:04d}".encode(), stat.S_IFREG | 0o644,
                                 uid, gid)
                wt.open(node.ino)
                wt.write(node.ino, 0, content(d, i, 0))
                wt.release(node.ino)
                done += 1
            if done % 10_000 == 0 and done < nfiles:
                log(f"  built {done:,}/{nfiles:,} files in "
                    f"{time.perf_counter() - sw.start:.0f} s")
    return sw.seconds


def change_and_commit(repo: Repository, branch: str, nfiles: int, k: int,
                      version: int) -> tuple[float, float]:
    """Change one file of ``branch`` (chosen by ``k``), commit; (change s, commit s)."""
    ndirs = (nfiles + DIR_ENTRIES - 1) // DIR_ENTRIES
    d = (k * 37) % ndirs
    i = (k * 131) % min(DIR_ENTRIES, nfiles - d * DIR_ENTRIES)
    root = repo.root_ino(branch)
    settle()
    with Stopwatch() as change:
        write_file(repo, root, f"d{d:03d}/f{i:04d}", content(d, i, version))
    with Stopwatch() as commit:
        repo.commit(branch, f"change d{d:03d}/f{i:04d}")
    return change.seconds, commit.seconds


def bench_commit(args: argparse.Namespace, workdir: Path, results: dict) -> str:
    """Build every branch first, then take the samples interleaved across sizes (sample
    k of every size, then sample k+1, ...), so that the disk's bad moments spread over
    all sizes instead of landing on whichever was measured at the time."""
    sizes = [n for n in BRANCH_SIZES if n <= args.max_files] or [args.max_files]
    res: dict[int, dict[str, Any]] = {}
    repos: dict[int, Repository] = {}
    try:
        for n in sizes:
            log(f"commit: building a branch of {n:,} files")
            path = workdir / f"commit-{n}"
            res[n] = {"build_s": build_branch(path, n)}
            repos[n] = Repository.open(path)
        for n, repo in repos.items():
            settle()
            with Stopwatch() as sw:
                repo.commit("main", f"{n} files")
            res[n]["first_commit_s"] = sw.seconds
            res[n].update(change_s=[], commit_s=[], fresh_change_s=[], fresh_commit_s=[],
                          create_branch_s=[])
        log(f"commit: {COMMIT_SAMPLES} one-file commits per branch")
        for k in range(COMMIT_SAMPLES):
            for n, repo in repos.items():
                change, commit = change_and_commit(repo, "main", n, k, k + 1)
                res[n]["change_s"].append(change)
                res[n]["commit_s"].append(commit)
        for repo in repos.values():
            repo.create_branch("fresh")
        for k in range(COMMIT_SAMPLES):
            for n, repo in repos.items():
                change, commit = change_and_commit(repo, "fresh", n, k + 100, k + 101)
                res[n]["fresh_change_s"].append(change)
                res[n]["fresh_commit_s"].append(commit)
        log(f"commit: {BRANCH_SAMPLES} create_branch per repository")
        for k in range(BRANCH_SAMPLES):
            for n, repo in repos.items():
                settle()
                with Stopwatch() as sw:
                    repo.create_branch(f"b{k:02d}")
                res[n]["create_branch_s"].append(sw.seconds)
        for n, repo in repos.items():
            res[n]["store_file_bytes"] = repo.stats()["store_file_bytes"]
    finally:
        for n, repo in repos.items():
            repo.close()
            rm(workdir / f"commit-{n}")

    rows = []
    for n in sizes:
        r = res[n]
        r["median_ms"] = {k[:-2]: median(v) * 1000 for k, v in r.items()
                          if k.endswith("_s") and isinstance(v, list)}
        r["min_ms"] = {k[:-2]: min(v) * 1000 for k, v in r.items()
                       if k.endswith("_s") and isinstance(v, list)}
        m = r["median_ms"]
        rows.append([f"{n:,}", fmt_num(r["build_s"]), fmt_num(r["first_commit_s"] * 1000),
                     fmt_num(m["change"]), fmt_num(m["commit"]),
                     fmt_num(r["min_ms"]["commit"]), fmt_num(m["fresh_change"]),
                     fmt_num(m["fresh_commit"]), fmt_num(m["create_branch"])])
    lo, hi = sizes[0], sizes[-1]
    ratios = {key: res[hi]["median_ms"][key] / res[lo]["median_ms"][key]
              for key in ("commit", "fresh_commit", "create_branch")}
    ratios["commit_min"] = res[hi]["min_ms"]["commit"] / res[lo]["min_ms"]["commit"]
    results["commit"] = {"by_files": {str(n): r for n, r in res.items()},
                         f"ratio_{hi}_{lo}": ratios}
    table = common.format_table(
        ["files", "build s", "1st commit ms", "change ms", "commit ms", "(min)",
         "fresh: change ms", "fresh: commit ms", "create_branch ms"], rows)
    return (table + f"\nratio {hi:,}/{lo:,} files: commit {ratios['commit']:.2f}x "
            f"(min {ratios['commit_min']:.2f}x), fresh-branch commit "
            f"{ratios['fresh_commit']:.2f}x, create_branch {ratios['create_branch']:.2f}x")


# --- dedup -----------------------------------------------------------------------------


def bench_dedup(args: argparse.Namespace, workdir: Path, results: dict) -> str:
    res: dict[str, Any] = {}
    lines = []

    # append to a text file
    log(f"dedup: generating {args.text_mib} MiB of CSV text")
    text, nrows = make_text(args.text_mib * MiB, args.seed)
    extra, _ = make_text(args.append_mib * MiB, args.seed + 7, first_row=nrows)
    src = workdir / "dedup-src"
    src.mkdir()
    data_file = src / "data.csv"
    data_file.write_bytes(text)
    path = workdir / "dedup-repo"
    try:
        with Repository.init(path) as repo:
            settle()
            with Stopwatch() as sw1:
                repo.import_dir("main", src)
                repo.commit("main", "text")
            before = repo.stats()
            with open(data_file, "ab") as f:
                f.write(extra)
            settle()
            with Stopwatch() as sw2:
                repo.import_dir("main", src)
                repo.commit("main", "append")
            after = repo.stats()
    finally:
        rm(path)
        rm(src)
    grow_chunks = (after["stored_chunk_bytes"] - before["stored_chunk_bytes"]) / MiB
    grow_all = (after["stored_bytes"] - before["stored_bytes"]) / MiB
    limit = len(extra) / MiB + 0.5
    ok = grow_all <= limit
    res["append"] = {"text_bytes": len(text), "appended_bytes": len(extra),
                     "stats_before": before, "stats_after": after,
                     "import_commit_s": [sw1.seconds, sw2.seconds],
                     "growth_chunk_mib": grow_chunks, "growth_stored_mib": grow_all,
                     "limit_mib": limit, "pass": ok}
    lines.append(common.format_table(
        ["case", "logical MiB", "chunk growth MiB", "stored growth MiB", "limit MiB",
         "result", "import+commit s (1st, 2nd)"],
        [[f"{len(text) / MiB:.0f} MiB text + {len(extra) / MiB:.2f} MiB appended",
          fmt_num(after["refs"]["branch/main"] / MiB), f"{grow_chunks:.3f}",
          f"{grow_all:.3f}", f"{limit:.2f}", "PASS" if ok else "FAIL",
          f"{sw1.seconds:.2f}, {sw2.seconds:.2f}"]]))
    del text, extra

    # identical copies under different names
    blob = common.make_data(args.copy_mib * MiB, args.seed + 11)
    src = workdir / "copies-src"
    write_dataset(src, [(f"copy{k}.bin", blob) for k in range(args.copies)])
    path = workdir / "copies-repo"
    try:
        with Repository.init(path) as repo:
            repo.import_dir("main", src)
            repo.commit("main", "copies")
            st = repo.stats()
    finally:
        rm(path)
        rm(src)
    logical = st["refs"]["branch/main"]
    ok = st["stored_chunk_bytes"] <= len(blob) * 1.01
    res["copies"] = {"copies": args.copies, "file_bytes": len(blob), "stats": st,
                     "dedup_factor": logical / st["stored_bytes"], "pass": ok}
    lines.append(common.format_table(
        ["case", "logical MiB", "stored chunk MiB", "stored MiB", "logical/stored",
         "result"],
        [[f"{args.copies} copies of one {args.copy_mib} MiB file", fmt_num(logical / MiB),
          f"{st['stored_chunk_bytes'] / MiB:.3f}", f"{st['stored_bytes'] / MiB:.3f}",
          fmt_ratio(logical, st["stored_bytes"]), "PASS" if ok else "FAIL"]]))
    results["dedup"] = res
    return "\n\n".join(lines)


# --- main ------------------------------------------------------------------------------

BENCHES: dict[str, Callable[[argparse.Namespace, Path, dict], str]] = {
    "import": bench_import, "commit": bench_commit, "dedup": bench_dedup,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="comma-separated: import, commit, dedup")
    ap.add_argument("--rounds", type=int, help="import rounds, medians (default 3)")
    ap.add_argument("--big-mib", type=int, help="size of the one big file (default 256)")
    ap.add_argument("--small-files", type=int, help="number of small files (default 1000)")
    ap.add_argument("--small-kib", type=int, default=64, help="small file size (default 64)")
    ap.add_argument("--max-files", type=int,
                    help="largest commit-latency branch (default 100000)")
    ap.add_argument("--text-mib", type=int, help="dedup text file size (default 100)")
    ap.add_argument("--append-mib", type=int, default=1, help="appended text (default 1)")
    ap.add_argument("--copy-mib", type=int, help="size of the copied file (default 10)")
    ap.add_argument("--copies", type=int, default=10, help="number of copies (default 10)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round, 16 MiB, 100 files, branches up to 10k, "
                         "8 MiB text, 1 MiB copies (unless given explicitly)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                    help="parent of the temp directory holding all data (default /tmp)")
    ap.add_argument("--json", type=Path, help="write samples and medians here")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    quick = {"rounds": 1, "big_mib": 16, "small_files": 100, "max_files": 10_000,
             "text_mib": 8, "copy_mib": 1}
    full = {"rounds": 3, "big_mib": 256, "small_files": 1000, "max_files": 100_000,
            "text_mib": 100, "copy_mib": 10}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in args.sections:
        if s not in BENCHES:
            ap.error(f"unknown section {s!r}")
    for key in ("rounds", "big_mib", "small_files", "small_kib", "max_files", "text_mib",
                "append_mib", "copy_mib", "copies"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.install_signal_handlers()
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="jzcore-", dir=args.workdir))
    results: dict[str, Any] = {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": common.environment(),
        "errors": [],
    }
    log(f"workdir {workdir}")
    out: list[str] = []
    rc = 0
    try:
        for name in args.sections:
            with Stopwatch() as sw:
                try:
                    text = BENCHES[name](args, workdir, results)
                except KeyboardInterrupt:
                    raise
                except Exception as exc:
                    log(f"{name} failed: {exc!r}")
                    results["errors"].append(f"{name}: {exc!r}")
                    text = f"ERROR: {exc!r}"
                    rc = 1
            log(f"{name} done in {sw.seconds:.0f} s")
            out.append(f"== {name} ==\n{text}")
            print(out[-1] + "\n", flush=True)
    except KeyboardInterrupt:
        log("interrupted")
        rc = 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"rounds={args.rounds} (import medians), commit medians of {COMMIT_SAMPLES}, "
          f"create_branch medians of {BRANCH_SAMPLES}, "
          f"cpus={os.cpu_count()}, workdir={args.workdir}")
    if args.json:
        common.write_json(args.json, results)
        log(f"wrote {args.json}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
