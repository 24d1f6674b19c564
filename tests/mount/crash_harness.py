"""Crash harness: random workload through a mount, SIGKILL of the daemon, check.

Used by tests/mount/test_crash.py (a few rounds) and scripts/crash_soak.py
(as many as you like).  Each round:

1. a workload process writes, overwrites, appends to and deletes files in the
   branch; before each operation it prints ``TRY`` with the content's digest,
   and after the operation and its fsync ``ACK``;
2. the daemon is killed with SIGKILL at a random moment;
3. the stale mount is cleaned, the repository remounted (no manual step), and
   ``fsck`` must be clean;
4. every file must hold what its last ``ACK`` says, or what a later ``TRY``
   (an operation that may or may not have landed) says — never anything else:
   no torn file, no lost acknowledged write.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

WORKLOAD = r'''
import hashlib, os, random, sys
root, seed = sys.argv[1], int(sys.argv[2])
rng = random.Random(seed)
def say(*a):
    sys.stdout.write(" ".join(a) + "\n"); sys.stdout.flush()
i = 0
while True:
    i += 1
    name = f"f{rng.randrange(12)}"
    path = os.path.join(root, name)
    op = rng.random()
    try:
        if op < 0.15 and os.path.exists(path):
            say("TRY", name, "DELETED")
            os.unlink(path)
            fd = os.open(root, os.O_RDONLY); os.fsync(fd); os.close(fd)
            say("ACK", name, "DELETED")
            continue
        if op < 0.35 and os.path.exists(path):
            with open(path, "rb") as f:
                old = f.read()
            extra = rng.randbytes(rng.choice([10, 5000, 200_000]))
            new = old + extra
            say("TRY", name, hashlib.sha256(new).hexdigest())
            with open(path, "ab") as f:
                f.write(extra); f.flush(); os.fsync(f.fileno())
        else:
            new = rng.randbytes(rng.choice([0, 100, 70_000, 1_000_000, 3_000_000]))
            say("TRY", name, hashlib.sha256(new).hexdigest())
            with open(path, "wb") as f:
                for k in range(0, len(new), 1 << 20):
                    f.write(new[k:k + (1 << 20)])
                f.flush(); os.fsync(f.fileno())
        say("ACK", name, hashlib.sha256(new).hexdigest())
    except OSError:
        sys.exit(0)   # the mount went away under us
'''


def digest_of(path: Path) -> str:
    if not path.exists():
        return "DELETED"
    return hashlib.sha256(path.read_bytes()).hexdigest()


def allowed_states(lines: list[str], initial: dict[str, str]) -> dict[str, set[str]]:
    """Per file: the digests it may legitimately hold after the crash."""
    state: dict[str, set[str]] = {k: {v} for k, v in initial.items()}
    for line in lines:
        parts = line.split()
        if len(parts) != 3:
            continue  # a line cut by the kill
        kind, name, dig = parts
        if kind == "ACK":
            state[name] = {dig}
        elif kind == "TRY":
            # in flight: old state, the new content, or (a new file) created empty
            prev = state.get(name, {"DELETED"})
            extra = {dig}
            if "DELETED" in prev:
                extra.add(hashlib.sha256(b"").hexdigest())
            state[name] = prev | extra
    return state


def run_round(jz, repo: Path, mnt: Path, seed: int, kill_after: float,
              python: str = sys.executable) -> dict:
    """One round on an already mounted repo; returns the new mount info and findings."""
    info = json.loads((mnt / ".jiaozifuse-mount").read_text())
    initial = {f"f{i}": digest_of(mnt / "main" / f"f{i}") for i in range(12)}
    work = subprocess.Popen([python, "-c", WORKLOAD, str(mnt / "main"), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(kill_after)
    os.kill(info["pid"], signal.SIGKILL)
    try:
        out, _ = work.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        work.kill()
        out, _ = work.communicate()
    lines = out.splitlines()
    # the next mount cleans the stale mount point by itself
    jz("mount", str(repo), str(mnt))
    fsck = json.loads(jz("fsck", "--json", "--repo", str(repo), check=False).stdout or "{}")
    wrong = {}
    for name, states in allowed_states(lines, initial).items():
        got = digest_of(mnt / "main" / name)
        if got not in states:
            wrong[name] = {"got": got, "allowed": sorted(states)}
    acks = sum(1 for ln in lines if ln.startswith("ACK"))
    return {"acks": acks, "fsck_ok": fsck.get("ok", False), "fsck": fsck, "wrong": wrong}


def soak(jz, repo: Path, mnt: Path, rounds: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    results = []
    for r in range(rounds):
        res = run_round(jz, repo, mnt, seed * 1000 + r, rng.uniform(0.3, 2.5))
        results.append(res)
        if res["wrong"] or not res["fsck_ok"]:
            break
    return results
