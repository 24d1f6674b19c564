#!/usr/bin/env python3
"""Writing more than the cache holds, with an S3 remote: backpressure, measured.

Usage::

    .venv/bin/python scripts/bench/remote_fill.py [--rounds 3] [--size 512] [--cache 64]

With ``--cache-size``, the cache may hold only so much data that S3 lacks; a
writer faster than the uploads then waits for them (``fs.Ops._wait_for_room``)
instead of failing with ENOSPC.  Each round, on one SeaweedFS server:

boto3
    ``upload_file`` of the file (multipart, 10 threads): the time to get the bytes
    into S3 at all, the baseline.
jiaozifuse, no bound
    a fresh ``init --remote`` repository, mounted; the file written through the
    mount in 1 MiB writes (timed: "write"), then ``jiaozifuse sync --wait``
    (timed with it: "in S3").
jiaozifuse, --cache-size CACHE
    the same with the bound far below the file: the writes wait for the uploads.
    The round fails if any write fails.

Figures are MiB/s of the write alone and of write + sync ("in S3"); the ratios
set each against boto3 and the bounded run against the unbounded one.  The
order rotates from round to round; the kernel caches are dropped before each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import blake3
import common
from common import MiB, Stopwatch, log
from remote import empty_bucket, file_digest, load_s3server

WAYS = ["boto3", "jz", "jz_bounded"]


class RemoteTarget(common.JiaozifuseTarget):
    """``jiaozifuse init --remote`` (with extra init options) + ``jiaozifuse mount``."""

    def __init__(self, res: common.Resources, url: str, endpoint: str,
                 init_args: list[str], exe: str | None = None) -> None:
        super().__init__(res, exe=exe)
        self.url, self.endpoint, self.init_args = url, endpoint, init_args

    def setup(self, root: Path) -> Path:
        self.root = root
        self.repo, self.mnt = root / "repo", root / "mnt"
        self.mnt.mkdir(parents=True)
        self._run("init", str(self.repo), "--remote", self.url, "--endpoint-url",
                  self.endpoint, *self.init_args)
        self._mount()
        return self.mnt / self.branch


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        for off in range(0, len(data), MiB):
            f.write(data[off : off + MiB])


def run(args: argparse.Namespace, res: common.Resources, workdir: Path,
        results: dict) -> None:
    s3 = load_s3server().SeaweedS3()
    try:
        s3.start()
        os.environ.update(s3.env())
        client = s3.client()
        size = args.size * MiB
        data = os.urandom(size)
        src = workdir / "src.bin"
        src.write_bytes(data)
        exe = args.jiaozifuse or common.find_executable("jiaozifuse")
        for rnd in range(args.rounds):
            rec: dict[str, float] = {}
            results["rounds"].append(rec)
            order = WAYS[rnd % len(WAYS):] + WAYS[: rnd % len(WAYS)]
            for way in order:
                bucket = s3.make_bucket(f"jzfill-r{rnd}-{way.replace('_', '-')}")
                root = workdir / f"r{rnd}-{way}"
                try:
                    common.drop_caches()
                    if way == "boto3":
                        with Stopwatch() as sw:
                            client.upload_file(str(src), bucket, "src.bin")
                        rec["boto3_in_s3"] = args.size / sw.seconds
                        log(f"round {rnd + 1} boto3 upload_file: {rec['boto3_in_s3']:.0f} MiB/s")
                        continue
                    extra = ["--cache-size", f"{args.cache}M"] if way == "jz_bounded" else []
                    target = RemoteTarget(res, f"s3://{bucket}/repo", s3.endpoint, extra, exe)
                    try:
                        d = target.setup(root)
                        with Stopwatch() as sw:
                            write_file(d / "big.bin", data)
                        with Stopwatch() as sw_sync:
                            subprocess.run([exe, "sync", "--wait", "--repo", str(target.repo)],
                                           check=True, capture_output=True)
                        rec[f"{way}_write"] = args.size / sw.seconds
                        rec[f"{way}_in_s3"] = args.size / (sw.seconds + sw_sync.seconds)
                        if file_digest(d / "big.bin") != blake3.blake3(data).hexdigest():
                            raise RuntimeError("the mount returned other bytes")
                        log(f"round {rnd + 1} {way}: write {rec[f'{way}_write']:.0f} MiB/s, "
                            f"write + sync {rec[f'{way}_in_s3']:.0f} MiB/s "
                            f"(sync {sw_sync.seconds:.2f} s)")
                    finally:
                        target.teardown()
                except Exception as exc:
                    results["errors"].append({"round": rnd, "way": way, "error": str(exc)})
                    log(f"round {rnd + 1} {way} FAILED: {exc}")
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                    empty_bucket(client, bucket)
    finally:
        res.close()
        s3.close()


FIGURES = [
    ("boto3_in_s3", "boto3 upload_file: in S3"),
    ("jz_write", "jiaozifuse, no bound: write"),
    ("jz_in_s3", "jiaozifuse, no bound: write + sync"),
    ("jz_bounded_write", "jiaozifuse, --cache-size: write"),
    ("jz_bounded_in_s3", "jiaozifuse, --cache-size: write + sync"),
]
RATIOS = [("jz_in_s3", "boto3_in_s3"), ("jz_bounded_in_s3", "boto3_in_s3"),
          ("jz_bounded_in_s3", "jz_in_s3"), ("jz_bounded_write", "jz_write")]


def summarize(results: dict) -> str:
    return common.summarize_rounds(results, dict(FIGURES), "MiB/s", RATIOS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=512, help="file size, MiB")
    ap.add_argument("--cache", type=int, default=64, help="--cache-size of the bounded run, MiB")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--jiaozifuse", help="path of the jiaozifuse executable")
    args = ap.parse_args(argv)
    if min(args.rounds, args.size, args.cache) < 1:
        ap.error("--rounds, --size and --cache must be positive")
    common.install_signal_handlers()
    workdir = Path(tempfile.mkdtemp(prefix="jzbench-fill-"))
    results: dict[str, Any] = {
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": common.environment(), "rounds": [], "errors": []}
    log(f"workdir {workdir}")
    rc = common.run_in_workdir(lambda res: run(args, res, workdir, results), workdir,
                               "interrupted; mounts, processes and the server cleaned up")
    print()
    print(f"{args.size} MiB file, --cache-size {args.cache} MiB, rounds={args.rounds}")
    print(summarize(results))
    return common.finish(results, args.json, rc)


if __name__ == "__main__":
    sys.exit(main())
