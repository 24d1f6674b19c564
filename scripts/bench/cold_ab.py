#!/usr/bin/env python3
"""Cold read from S3 through the mount: two source trees of jiaozifuse, interleaved.

For an A/B of a change to the read path: the same 1 GiB file, uploaded once, read
through a fresh ``jiaozifuse clone`` (empty chunk cache) and mount, round after round,
alternately with the daemon imported from tree A and from tree B (``PYTHONPATH``; the
CLI of this venv, the code of the tree). The machine is shared and noisy, so what counts
is B against A within each pair of neighbouring reads, and the median of those ratios.

    .venv/bin/python scripts/bench/cold_ab.py --a /path/to/checkout-A --b . --rounds 6

Per read: MiB/s, and the daemon's CPU seconds per GiB (user + system, /proc). The
kernel's caches are dropped before each read (the server reads from disk too). Every
read is checked against the data's BLAKE3. remote.py is where the cold read is measured
against boto3; this script only compares two versions of jiaozifuse.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import common
from common import MiB, log, median, rate
from remote import (
    CloneTarget,
    cpu_seconds,
    data_digest,
    file_digest,
    load_s3server,
    read_sequential,
)

GiB = 1024 * MiB


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="source tree A (a checkout of jiaozifuse)")
    ap.add_argument("--b", required=True, help="source tree B")
    ap.add_argument("--rounds", type=int, default=6, help="reads per tree (default 6)")
    ap.add_argument("--size", type=int, default=1024, help="file size in MiB (default 1024)")
    args = ap.parse_args()
    trees = {"A": str(Path(args.a).resolve()), "B": str(Path(args.b).resolve())}
    for name, tree in trees.items():
        if not (Path(tree) / "jiaozifuse" / "__init__.py").is_file():
            ap.error(f"--{name.lower()} {tree} has no jiaozifuse/ package")
    common.install_signal_handlers()
    root = Path(tempfile.mkdtemp(prefix="jzbench-coldab-"))
    s3 = load_s3server().SeaweedS3()
    figures: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    try:
        with common.Resources() as res:
            s3.start()
            os.environ.update(s3.env())
            s3.make_bucket("bench-coldab")
            url = "s3://bench-coldab/repo"
            size = args.size * MiB
            data = common.make_data(size, 1)
            digest = data_digest(data)
            src = root / "src"
            src.mkdir()
            (src / "big.bin").write_bytes(data)
            del data
            jz = common.find_executable("jiaozifuse")
            if jz is None:
                raise SystemExit("no jiaozifuse executable next to this Python")
            env = {**os.environ, "PYTHONPATH": trees["A"]}
            origin = root / "origin"
            for cmd in (["init", str(origin), "--remote", url, "--endpoint-url", s3.endpoint],
                        ["import", str(src), "--repo", str(origin)],
                        ["commit", "-m", "data", "--repo", str(origin)],
                        ["sync", "--wait", "--repo", str(origin)]):
                subprocess.run([jz, *cmd], env=env, check=True, capture_output=True)
            shutil.rmtree(src)
            log(f"{args.size} MiB uploaded to {url}")
            for rnd in range(args.rounds):
                order = "AB" if rnd % 2 == 0 else "BA"
                for name in order:
                    os.environ["PYTHONPATH"] = trees[name]  # the CLI and its daemon
                    target = CloneTarget(res, url, s3.endpoint, exe=jz)
                    work = root / f"r{rnd}{name}"
                    path = target.setup(work) / "big.bin"
                    common.drop_caches()
                    pid = target.pids[0] if target.pids else -1
                    c0 = sum(cpu_seconds(pid)[:2])
                    seconds = read_sequential(path, size)
                    cpu = (sum(cpu_seconds(pid)[:2]) - c0) / (size / GiB)
                    if file_digest(path) != digest:  # untimed, from the page cache
                        raise SystemExit(f"round {rnd + 1} {name}: the file read "
                                         "through the mount differs")
                    target.teardown()
                    shutil.rmtree(work, ignore_errors=True)
                    mibs = rate(size / MiB, seconds)
                    figures[name].append((mibs, cpu))
                    log(f"round {rnd + 1} {name}: {mibs:.0f} MiB/s, daemon {cpu:.2f} CPU s/GiB")
                os.environ.pop("PYTHONPATH", None)
    finally:
        s3.close()
        shutil.rmtree(root, ignore_errors=True)
    ratios = [b[0] / a[0] for a, b in zip(figures["A"], figures["B"], strict=True)]
    print(f"\ncold read of {args.size} MiB, {args.rounds} rounds "
          f"(A = {trees['A']}, B = {trees['B']})")
    for name in "AB":
        print(f"  {name}: median {median(f[0] for f in figures[name]):.0f} MiB/s "
              f"({' '.join(f'{f[0]:.0f}' for f in figures[name])}), daemon "
              f"{median(f[1] for f in figures[name]):.2f} CPU s/GiB")
    print(f"  B/A per round: {' '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {median(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
