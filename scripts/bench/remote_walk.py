#!/usr/bin/env python3
"""Copying a directory of small files out of a fresh clone, against boto3, same server.

Usage::

    .venv/bin/python scripts/bench/remote_walk.py [--rounds 3] [--files 2000]
        [--kib 64] [--json out.json]

The workload a user runs on a new machine: ``cp -r`` of a dataset directory out of
the mount of a fresh ``jiaozifuse clone`` (an empty chunk cache: every byte comes
from S3). Beside it, in the same run and on the same SeaweedFS server, the same
files fetched with plain boto3 as separate objects:

boto3, one at a time
    ``get_object`` of each key in turn, written to a file: a loop in a script, or
    ``aws s3 cp`` of one key after another. What ``cp -r`` through a mount can be
    compared with, since ``cp`` also reads one file after another.
boto3, 10 threads
    ``get_object`` of each key from a pool of 10 threads (``aws s3 cp --recursive``
    also runs 10): the best a client that knows the whole list can do.
    (``download_file`` per key was slower here than one at a time: it sets up a
    transfer manager and a HEAD request for every file.)
mount, cp -r
    ``cp -r MNT/main/data OUT`` with the mount's defaults (cross-file readahead on:
    jiaozifuse/dirahead.py), and the same with ``--no-dir-readahead``.  After the
    first, the same ``cp -r`` again with the kernel's caches dropped: every chunk
    is then in the local cache, so this is the ceiling a cold copy can approach.

Each round clones afresh and drops the kernel's caches before each of the four;
which goes first rotates from round to round. Figures are files per second; the
table gives medians and each round's ratio. Every copy is checked byte for byte.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from common import MiB, Stopwatch, log
from remote import CloneTarget, empty_bucket, load_s3server

WAYS = ["boto3_serial", "boto3_threads", "jz_cp", "jz_cp_noahead"]
#: measured with jz_cp, on its mount (not a way of its own in the rotation)
WARM = "jz_cp_warm"
LABELS = {
    "boto3_serial": "boto3 get_object, one at a time",
    "boto3_threads": "boto3 get_object, 10 threads",
    "jz_cp": "cp -r out of the mount",
    "jz_cp_noahead": "cp -r, --no-dir-readahead",
    WARM: "cp -r again, chunks cached",
}
# (numerator, denominator) ratios shown under the table
RATIOS = [("jz_cp", "boto3_serial"), ("jz_cp", "boto3_threads"), ("jz_cp", "jz_cp_noahead"),
          ("jz_cp_noahead", "boto3_serial"), ("jz_cp", WARM)]


def make_files(src: Path, n: int, size: int, seed: int) -> dict[str, str]:
    """n files of size bytes, distinct, under src; returns name -> sha256."""
    src.mkdir(parents=True)
    digests = {}
    for i in range(n):
        name = f"img{i:06d}.bin"
        data = hashlib.shake_256(f"{seed}/{i}".encode()).digest(size)
        (src / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


def check(out: Path, digests: dict[str, str]) -> None:
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}
    if got != digests:
        bad = sorted(k for k in digests if got.get(k) != digests[k])[:3]
        raise RuntimeError(f"{out}: {len(bad)}+ files differ or are missing: {bad}")


def fetch_one(client: Any, bucket: str, name: str, out: Path) -> None:
    body = client.get_object(Bucket=bucket, Key=f"data/{name}")["Body"]
    (out / name).write_bytes(body.read())


def boto3_serial(client: Any, bucket: str, names: list[str], out: Path) -> None:
    out.mkdir()
    for name in names:
        fetch_one(client, bucket, name, out)


def boto3_threads(client: Any, bucket: str, names: list[str], out: Path) -> None:
    out.mkdir()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda n: fetch_one(client, bucket, n, out), names))


def jz_cp(res: common.Resources, url: str, endpoint: str, root: Path, out: Path,
          extra: list[str], exe: str | None, digests: dict[str, str]
          ) -> tuple[float, float | None]:
    """Seconds of a cold ``cp -r`` out of a fresh clone's mount, and (without
    *extra*) of a second one once every chunk is cached."""
    target = CloneTarget(res, url, endpoint, exe=exe)
    target.mount_args += extra
    try:
        d = target.setup(root)
        common.drop_caches()
        with Stopwatch() as sw:
            subprocess.run(["cp", "-r", str(d / "data"), str(out)], check=True)
        check(out, digests)
        warm = None
        if not extra:
            again = out.with_name("again")
            time.sleep(1)  # the fetched chunks' locators: committed by the group commit
            common.drop_caches()
            with Stopwatch() as sw2:
                subprocess.run(["cp", "-r", str(d / "data"), str(again)], check=True)
            check(again, digests)
            warm = sw2.seconds
        return sw.seconds, warm
    finally:
        target.teardown()


def run(args: argparse.Namespace, res: common.Resources, workdir: Path,
        results: dict) -> None:
    from jiaozifuse.repo import Repository

    s3server = load_s3server()
    s3 = s3server.SeaweedS3()
    try:
        s3.start()
        os.environ.update(s3.env())
        client = s3.client()
        size = args.kib << 10
        src = workdir / "src" / "data"
        digests = make_files(src, args.files, size, args.seed)
        names = sorted(digests)
        bucket = s3.make_bucket("jzwalk-boto3")
        jbucket = s3.make_bucket("jzwalk-jz")
        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            list(pool.map(lambda n: client.upload_file(str(src / n), bucket, f"data/{n}"),
                          names))
        url = f"s3://{jbucket}/repo"
        repo = Repository.init(workdir / "writer", remote=url, endpoint_url=s3.endpoint)
        try:
            repo.import_dir("main", src.parent)
            repo.commit("main", "dataset")
            repo.sync()
        finally:
            repo.close()
        log(f"{args.files} files of {args.kib} KiB in both buckets")
        for rnd in range(args.rounds):
            rec: dict[str, float] = {}
            results["rounds"].append(rec)
            order = WAYS[rnd % len(WAYS):] + WAYS[: rnd % len(WAYS)]
            for way in order:
                root = workdir / f"r{rnd}-{way}"
                out = root / "out"
                root.mkdir()
                try:
                    if way.startswith("boto3"):
                        common.drop_caches()
                        fn = boto3_serial if way == "boto3_serial" else boto3_threads
                        with Stopwatch() as sw:
                            fn(client, bucket, names, out)
                        seconds = sw.seconds
                        check(out, digests)
                    else:
                        extra = ["--no-dir-readahead"] if way == "jz_cp_noahead" else []
                        seconds, warm = jz_cp(res, url, s3.endpoint, root / "jz", out, extra,
                                              args.jiaozifuse, digests)
                        if warm:
                            rec[WARM] = args.files / warm
                            log(f"round {rnd + 1} {LABELS[WARM]}: {warm:.2f} s, "
                                f"{rec[WARM]:.0f} files/s")
                    rec[way] = args.files / seconds
                    log(f"round {rnd + 1} {LABELS[way]}: {seconds:.2f} s, "
                        f"{rec[way]:.0f} files/s, "
                        f"{args.files * size / MiB / seconds:.1f} MiB/s")
                except Exception as exc:
                    results["errors"].append({"round": rnd, "way": way, "error": str(exc)})
                    log(f"round {rnd + 1} {way} FAILED: {exc}")
                finally:
                    shutil.rmtree(root, ignore_errors=True)
        empty_bucket(client, bucket)
        empty_bucket(client, jbucket)
    finally:
        res.close()
        s3.close()


def summarize(results: dict) -> str:
    return common.summarize_rounds(results, {w: LABELS[w] for w in [*WAYS, WARM]}, "files/s",
                                   RATIOS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--kib", type=int, default=64, help="size of each file")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--jiaozifuse", help="path of the jiaozifuse executable")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.files < 1 or args.kib < 1:
        ap.error("--rounds, --files and --kib must be positive")
    common.install_signal_handlers()
    workdir = Path(tempfile.mkdtemp(prefix="jzbench-walk-"))
    results: dict = {"params": {k: (str(v) if isinstance(v, Path) else v)
                                for k, v in vars(args).items()},
                     "environment": common.environment(), "rounds": [], "errors": []}
    log(f"workdir {workdir}")
    rc = common.run_in_workdir(lambda res: run(args, res, workdir, results), workdir,
                               "interrupted; mounts, processes and the server cleaned up")
    print()
    print(f"{args.files} files of {args.kib} KiB, rounds={args.rounds}, drop_caches="
          f"{'yes' if common.drop_caches_worked() else 'no'}")
    print(summarize(results))
    return common.finish(results, args.json, rc)


if __name__ == "__main__":
    sys.exit(main())
