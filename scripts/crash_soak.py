#!/usr/bin/env python3
"""Run the crash harness (tests/mount/crash_harness.py) for many rounds.

    python scripts/crash_soak.py --rounds 200

Mounts a fresh repository in a temp dir, kills the daemon with SIGKILL at
random moments of a random workload, remounts, checks fsck and every
acknowledged write; stops at the first failure and prints it.  Unmounts and
cleans up whatever happens.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "mount"))

from crash_harness import soak  # noqa: E402


def jz(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "jiaozifuse.cli", *args], capture_output=True,
                         text=True, timeout=300)
    if check and res.returncode:
        raise SystemExit(f"jiaozifuse {' '.join(args)}: {res.stderr.strip()}")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="jz-crash-") as tmp:
        repo, mnt = Path(tmp) / "repo", Path(tmp) / "mnt"
        mnt.mkdir()
        jz("init", str(repo))
        jz("mount", str(repo), str(mnt))
        try:
            results = soak(jz, repo, mnt, a.rounds, a.seed)
        finally:
            jz("umount", str(mnt), check=False)
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
        acks = sum(r["acks"] for r in results)
        bad = [r for r in results if r["wrong"] or not r["fsck_ok"]]
        print(f"{len(results)} rounds, {acks} acknowledged writes, "
              f"{'FAILED: ' + str(bad[0]) if bad else 'nothing lost, fsck clean every time'}")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
