#!/usr/bin/env python3
"""Benchmark the Filecoin archive: packing CARs, piece commitments, restore.

Usage::

    .venv/bin/python scripts/bench/archive.py [--size 512M] [--target-size 256M]
        [--rounds 3] [--workdir /tmp] [--json out.json]

What it prints (medians over the rounds, MiB/s of the bytes named):

* ``sha256 (hashlib)``: one ``hashlib.sha256`` over the payload bytes in memory, the
  yardstick the issue asks for: the cost of merely reading and hashing the data once.
* ``write + fsync``: the payload written to one file in the work directory and
  fsync'd: the bound the disk puts on packing (CARs are fsync'd before they count).
* ``CommP, C helper``: :func:`jiaozifuse.commp.commp_file` over the finished CARs
  (Fr32 padding plus the SHA-256 tree, one thread), and the same through the
  pure-Python path on a 16 MiB sample (what runs without a C compiler).
* ``archive (pack + CommP)``: a whole archive run of a freshly committed repository:
  walking the commit, reading and sha2-256-hashing every chunk, encoding the UnixFS
  nodes, writing the CARs (fsync'd), computing CommP on a second thread, renaming,
  recording, writing the manifest. MiB/s of CAR bytes.
* ``restore``: every CAR read, every block verified, CommP recomputed and checked,
  chunks and objects stored, fsck of the result. MiB/s of CAR bytes.

The payload is incompressible pseudo-random data (``common.make_data``) in 16 files,
imported and committed before timing (not timed).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import common
from common import MiB, Stopwatch, fmt_num, fmt_ratio, log, median, rate

sys.path.insert(0, str(common.REPO_ROOT))  # run from a checkout without installing

from jiaozifuse import archive as arc
from jiaozifuse import commp
from jiaozifuse.repo import Repository


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t[-1:] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def make_repo(base: Path, size: int, seed: int) -> tuple[Repository, bytes]:
    src = base / "src"
    src.mkdir()
    data = common.make_data(size, seed)
    per = size // 16
    for i in range(16):
        (src / f"f{i:02d}.bin").write_bytes(data[i * per : (i + 1) * per if i < 15 else size])
    repo = Repository.init(base / "repo")
    repo.import_dir("main", src)
    repo.commit("main", "bench")
    shutil.rmtree(src)
    return repo, data


def one_round(workdir: Path, size: int, target: int, seed: int) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="jz-bench-archive-", dir=workdir))
    try:
        log(f"round {seed}: {size // MiB} MiB payload in {base}")
        repo, data = make_repo(base, size, seed)
        out: dict[str, Any] = {}
        with Stopwatch() as sw:
            hashlib.sha256(data).digest()
        out["sha256"] = (size, sw.seconds)
        with Stopwatch() as sw, open(base / "disk", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        out["disk"] = (size, sw.seconds)
        (base / "disk").unlink()
        sample = data[: 16 * MiB]
        del data
        with Stopwatch() as sw:
            res = arc.archive(repo, "main", base / "cars", target_size=target)
        car_bytes = res["car_bytes"]
        out["archive"] = (car_bytes, sw.seconds)
        out["pieces"] = len(res["pieces"])
        repo.close()
        cars = sorted((base / "cars").glob("*.car"))
        with Stopwatch() as sw:
            for c in cars:
                commp.commp_file(c)
        out["commp_c"] = (car_bytes, sw.seconds)
        env = os.environ.get("JIAOZIFUSE_COMMP_NATIVE")
        os.environ["JIAOZIFUSE_COMMP_NATIVE"] = "0"
        try:
            with Stopwatch() as sw:
                commp.commp_bytes(sample)
            out["commp_py"] = (len(sample), sw.seconds)
        finally:
            if env is None:
                del os.environ["JIAOZIFUSE_COMMP_NATIVE"]
            else:
                os.environ["JIAOZIFUSE_COMMP_NATIVE"] = env
        with Stopwatch() as sw:
            arc.restore(base / "cars", base / "restored")
        out["restore"] = (car_bytes, sw.seconds)
        return out
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="512M", help="payload size (default 512M)")
    ap.add_argument("--target-size", default="256M", help="piece size (default 256M)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    size, target = parse_size(args.size), parse_size(args.target_size)
    log(f"CommP implementation: {commp.native_kind()}")
    rounds = [one_round(Path(args.workdir), size, target, seed)
              for seed in range(1, args.rounds + 1)]

    def mibs(key: str) -> float:
        return median(rate(r[key][0] / MiB, r[key][1]) for r in rounds)

    base = mibs("sha256")
    rows = []
    results: dict[str, Any] = {}
    for key, label, what in (
        ("sha256", "sha256 (hashlib, in memory)", "payload"),
        ("disk", "write + fsync (the disk's bound)", "payload"),
        ("commp_c", f"CommP, C helper ({commp.native_kind()})", "CAR bytes"),
        ("commp_py", "CommP, pure Python (16 MiB)", "payload"),
        ("archive", "archive run (pack + CommP)", "CAR bytes"),
        ("restore", "restore (verify + store + fsck)", "CAR bytes"),
    ):
        v = mibs(key)
        results[key] = v
        rows.append([label, what, fmt_num(v), fmt_ratio(v, base)])
    print(common.format_table(["operation", "of", "MiB/s", "vs sha256"], rows, left_columns=2))
    print(f"\npayload {size // MiB} MiB, pieces of {target // MiB} MiB "
          f"({rounds[0]['pieces']} per run), {len(rounds)} round(s), medians")
    if args.json:
        common.write_json(args.json, {"env": common.environment(), "size": size,
                                      "target_size": target, "mib_per_s": results,
                                      "commp": commp.native_kind(), "rounds": rounds})
    return 0


if __name__ == "__main__":
    sys.exit(main())
