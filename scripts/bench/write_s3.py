"""Where a sequential write until durable in S3 spends its time, on a jiaozifuse mount.

    python scripts/bench/write_s3.py [--size 512] [--rounds 3]

Each round: a fresh bucket on one SeaweedFS server (tests/s3server.py, 127.0.0.1),
``jiaozifuse init --remote``, ``jiaozifuse mount``, ``--size`` MiB written to
``MNT/main/big`` in 1 MiB writes + fsync + close (timed: "write"), then
``jiaozifuse sync --wait`` (timed: "sync after close").  The queue's state right after
close says how much the write-back had sent while the file was written.  Prints one
line per round and the medians; peers.py's "seq write, until durable in S3" is the sum
of the two times.  Every mount and the server are stopped at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

MiB = 1 << 20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="MiB written (default 512)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(common.REPO_ROOT / "tests"))
    import s3server

    exe = common.find_executable("jiaozifuse")
    if exe is None:
        raise SystemExit("no jiaozifuse executable next to this Python or on PATH")
    s3 = s3server.SeaweedS3().start()
    env = {**os.environ, **s3.env()}
    root = Path(tempfile.mkdtemp(prefix="jzbench-write-s3-"))
    mounted: list[Path] = []

    def jz(*a: str) -> str:
        return subprocess.run([exe, *a], env=env, check=True, capture_output=True,
                              text=True).stdout

    writes, syncs = [], []
    try:
        for rnd in range(args.rounds):
            bucket = s3.make_bucket(f"jzb-write-{rnd}")
            repo, mnt = root / f"repo{rnd}", root / f"mnt{rnd}"
            mnt.mkdir()
            jz("init", str(repo), "--remote", f"s3://{bucket}/repo", "--endpoint-url",
               s3.endpoint)
            jz("mount", str(repo), str(mnt))
            mounted.append(mnt)
            data = memoryview(common.make_data(args.size * MiB, seed=rnd))
            t0 = time.perf_counter()
            fd = os.open(mnt / "main" / "big", os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for i in range(0, len(data), MiB):
                    os.write(fd, data[i : i + MiB])
                os.fsync(fd)
            finally:
                os.close(fd)
            t1 = time.perf_counter()
            st = json.loads(jz("remote", "status", "--json", "--repo", str(repo)))
            jz("sync", "--wait", "--repo", str(repo))
            t2 = time.perf_counter()
            writes.append(t1 - t0)
            syncs.append(t2 - t1)
            print(f"round {rnd + 1}: write {args.size / (t1 - t0):.0f} MiB/s ({t1 - t0:.2f} s), "
                  f"sync after close {t2 - t1:.2f} s, until durable "
                  f"{args.size / (t2 - t0):.0f} MiB/s; at close {st['queued_bytes'] / MiB:.0f} "
                  f"MiB queued, {st['uploading_bytes'] / MiB:.0f} MiB uploading", flush=True)
            jz("umount", str(mnt))
            mounted.remove(mnt)
    finally:
        for mnt in mounted:
            common.unmount(mnt)
        s3.close()
        shutil.rmtree(root, ignore_errors=True)
    w, s = common.median(writes), common.median(syncs)
    print(f"medians of {len(writes)}: write {w:.2f} s, sync after close {s:.2f} s, "
          f"until durable {args.size / (w + s):.0f} MiB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
