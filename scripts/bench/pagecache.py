#!/usr/bin/env python3
"""What writing into new page-cache pages costs on this machine, and what recycling saves.

Why it exists: a cold read through the mount writes every byte fetched from S3 into
the chunk log, through the page cache. On a VM whose balloon driver reports freed
memory to the host (``/sys/module/page_reporting``), every page the guest takes from
its free memory is faulted in again on the host, so new page-cache pages cost far more
than a memcpy. This script writes SIZE MiB to a file in 4 MiB ``pwrite`` calls three
ways, round after round (the kernel's caches dropped before each), and prints the
medians of wall time and of the kernel CPU time the writer used:

- ``plain``: buffered writes, every page new (what the chunk log did before
  ``mount --drop-behind-mib``);
- ``recycle``: buffered writes, and every 16 MiB the range 64 MiB behind is written
  out and dropped (``sync_file_range`` + ``POSIX_FADV_DONTNEED``), so the pages come
  back to the writer (what ``chunklog.DropBehind`` does for fetched chunks);
- ``direct``: ``O_DIRECT`` writes from one reused buffer (no page cache at all).

    .venv/bin/python scripts/bench/pagecache.py --rounds 5

The file goes in ``--dir`` (default: the current directory's filesystem, in a temp dir).
"""

from __future__ import annotations

import argparse
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

import common
from common import MiB, log, median

from jiaozifuse.chunklog import sync_range

PIECE = 4 * MiB
WINDOW = 64 * MiB
STEP = 16 * MiB
MODES = ("plain", "recycle", "direct")


def write_once(path: Path, mode: str, size: int, data: mmap.mmap) -> tuple[float, float]:
    """Write *size* bytes to a new *path* the *mode* way; (wall s, kernel CPU s)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if mode == "direct" else 0)
    fd = os.open(path, flags, 0o600)
    try:
        t0, c0 = time.perf_counter(), os.times()
        for off in range(0, size, PIECE):
            os.pwrite(fd, data, off)
            if mode == "recycle" and off >= WINDOW and off % STEP == 0:
                lo = off - WINDOW
                sync_range(fd, lo, STEP)
                os.posix_fadvise(fd, lo, STEP, os.POSIX_FADV_DONTNEED)
        t1, c1 = time.perf_counter(), os.times()
    finally:
        os.close(fd)
        path.unlink()
    return t1 - t0, c1.system - c0.system


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of all three (default 5)")
    ap.add_argument("--size", type=int, default=1024, help="MiB per write (default 1024)")
    ap.add_argument("--dir", type=Path, default=Path.cwd(), help="where the file goes")
    args = ap.parse_args()
    size = args.size * MiB
    data = mmap.mmap(-1, PIECE)  # page-aligned, as O_DIRECT wants
    data.write(os.urandom(PIECE))
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="jzbench-pagecache-") as tmp:
        for rnd in range(args.rounds):
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            for mode in order:
                common.drop_caches()
                time.sleep(1)
                wall, system = write_once(Path(tmp) / "f", mode, size, data)
                results[mode].append((wall, system))
                log(f"round {rnd + 1} {mode}: {wall:.2f} s, kernel {system:.2f} s")
    base = median(s for _, s in results["plain"])
    print(f"writing {args.size} MiB, medians of {args.rounds} rounds:")
    print(f"{'mode':8}  {'wall s':>7}  {'kernel s':>8}  {'kernel vs plain':>15}")
    for mode in MODES:
        wall = median(w for w, _ in results[mode])
        system = median(s for _, s in results[mode])
        print(f"{mode:8}  {wall:7.2f}  {system:8.2f}  {system / base:14.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
