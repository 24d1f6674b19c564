"""Time `ls -l` of a large directory on a jiaozifuse mount against a local directory.

    python scripts/bench/lsl.py [--files 10000] [--runs 3] [--jz-mount-args "..."]

Each target gets a fresh directory of ``--files`` empty files (on jiaozifuse: the main
branch of a freshly initialised repository).  ``ls -l`` (output to /dev/null) runs
once to warm the caches, then ``--runs`` more times; the median is reported, nothing is
dropped in between.  For jiaozifuse the mount serves Prometheus metrics on a free local
port, and the FUSE requests that one warm ``ls -l`` sent to the daemon are counted by
operation (requests the kernel answers from its caches never reach the daemon).

Progress goes to stderr, the table to stdout.  Every mount and daemon is undone at the
end, also after a failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import common

REQUEST_RE = re.compile(r'^jiaozifuse_fuse_requests_total\{op="([^"]+)"\} ([0-9.e+]+)$', re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fuse_requests(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {op: float(n) for op, n in REQUEST_RE.findall(text)}


def ls_l(d: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["ls", "-l", str(d)], stdout=subprocess.DEVNULL, check=True,
                   env={**os.environ, "LC_ALL": "C"})
    return time.perf_counter() - t0


def fill(d: Path, n: int) -> None:
    d.mkdir()
    for i in range(n):
        with open(d / f"f{i:06d}", "wb"):
            pass


def measure(target: common.Target, root: Path, args: argparse.Namespace,
            port: int | None) -> dict:
    work = target.setup(root)
    try:
        d = work / "lsl"
        common.log(f"{target.name}: creating {args.files} files")
        fill(d, args.files)
        ls_l(d)  # warm: lookups, attributes, and whatever the kernel caches
        out: dict = {}
        if port is not None:
            before = fuse_requests(port)
            ls_l(d)
            after = fuse_requests(port)
            out["requests"] = {op: after[op] - before.get(op, 0.0) for op in after
                               if after[op] - before.get(op, 0.0) > 0}
        samples = [ls_l(d) for _ in range(args.runs)]
        common.log(f"{target.name}: " + ", ".join(f"{s * 1e3:.1f} ms" for s in samples))
        out["samples"] = samples
        out["median"] = common.median(samples)
        return out
    finally:
        target.teardown()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=3, help="warm runs whose median is taken")
    ap.add_argument("--workdir", type=Path, help="parent of the temporary work directory")
    ap.add_argument("--jiaozifuse", help="path of the jiaozifuse executable")
    ap.add_argument("--jz-mount-args", default="",
                    help="extra arguments for `jiaozifuse mount` (shell-quoted string)")
    ap.add_argument("--no-count", action="store_true",
                    help="do not serve metrics (no per-operation request counts)")
    args = ap.parse_args(argv)
    if args.files < 1 or args.runs < 1:
        ap.error("--files and --runs must be positive")
    common.install_signal_handlers()
    workdir = Path(tempfile.mkdtemp(prefix="jzlsl-", dir=args.workdir))
    results: dict[str, dict] = {}

    def body(res: common.Resources) -> None:
        port = None if args.no_count else free_port()
        mount_args = shlex.split(args.jz_mount_args)
        if port is not None:
            mount_args += ["--metrics-addr", f"127.0.0.1:{port}"]
        targets: list[tuple[common.Target, int | None]] = [
            (common.NativeTarget(res), None),
            (common.JiaozifuseTarget(res, exe=args.jiaozifuse, mount_args=mount_args), port),
        ]
        for target, p in targets:
            try:
                results[target.name] = measure(target, workdir / target.name, args, p)
            except common.TargetUnavailable as exc:
                common.log(f"{target.name} unavailable: {exc}")

    rc = common.run_in_workdir(body, workdir, "interrupted; mounts and processes cleaned up")
    native = results.get("native", {}).get("median")
    ls_version = subprocess.run(["ls", "--version"], capture_output=True,
                                text=True).stdout.splitlines()[0]
    print(f"ls -l of {args.files} empty files, median of {args.runs} warm runs "
          f"(kernel {os.uname().release}, {ls_version})")
    rows = []
    for name, r in results.items():
        ratio = common.fmt_ratio(r["median"], native) if native else "-"
        rows.append([name, f"{r['median'] * 1e3:.1f}", ratio,
                     " ".join(f"{s * 1e3:.1f}" for s in r["samples"])])
    print(common.format_table(["target", "median ms", "x native", "runs ms"], rows))
    for name, r in results.items():
        if "requests" in r:
            reqs = ", ".join(f"{op} {n:.0f}" for op, n in sorted(r["requests"].items())) or "none"
            print(f"FUSE requests of one warm ls -l on {name}: {reqs}")
    if rc == 0 and len(results) < 2:
        rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
