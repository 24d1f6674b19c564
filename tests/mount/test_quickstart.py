"""``scripts/quickstart`` for real, and the CLI finding its repository from a mount.

The quickstart runs as a user would run it (``scripts/quickstart MNT``), with
``JIAOZIFUSE_DEMO_REPO`` pointing into the test's temporary directory; every
mount it makes is undone at the end, even when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import Mount, is_mounted, jz

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "scripts" / "quickstart"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the quickstart runs as root")


def quickstart(*args: str, demo: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("JIAOZIFUSE_REPO", None)
    env["JIAOZIFUSE_DEMO_REPO"] = str(demo)
    return subprocess.run([str(QUICKSTART), *args], capture_output=True, text=True,
                          env=env, cwd="/", stdin=subprocess.DEVNULL, timeout=1200)


def _daemon_pid(mnt: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return int(json.loads((mnt / ".jiaozifuse-mount").read_text())["pid"])
    return None


def _unmount(mnts: list[Path], pids: set[int]) -> None:
    """Unmount every path in *mnts*, then wait for (or kill) the daemons in *pids*."""
    for mnt in mnts:
        if is_mounted(mnt):
            with contextlib.suppress(Exception):
                jz("umount", str(mnt), check=False)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    deadline = time.monotonic() + 20
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _mount_count(mnt: Path) -> int:
    with open("/proc/self/mounts") as f:
        return sum(1 for line in f if len(line.split()) > 1 and line.split()[1] == str(mnt))


def _check_demo(mnt: Path, demo: Path, out: str) -> tuple[str, str]:
    """Check the printed hints, the mount and the demo's history; return both commit ids."""
    for hint in (f"ls {mnt}/main", f"ls {mnt}/.commits", f"cat {mnt}/.tags/v1/",
                 f"cd {mnt}/main && jiaozifuse status", "jiaozifuse log",
                 f"jiaozifuse umount {mnt}"):
        assert hint in out, f"hint {hint!r} missing from:\n{out}"
    assert is_mounted(mnt)
    assert _mount_count(mnt) == 1
    assert sorted(p for p in os.listdir(mnt) if not p.startswith(".")) == ["main"]
    assert (mnt / "main" / "data").is_dir()
    csvs = sorted(p.name for p in (mnt / "main" / "data").iterdir())
    assert len([c for c in csvs if c.endswith(".csv")]) >= 2, csvs
    model = [p for p in (mnt / "main").rglob("*") if p.is_file() and not p.suffix == ".csv"]
    assert any(p.stat().st_size >= 1024 for p in model), model

    log = json.loads(jz("--repo", str(demo), "log", "--json").stdout)
    assert len(log) == 3, [c["message"] for c in log]  # two demo commits + the initial one
    second, first = log[0], log[1]
    assert second["parents"] == [first["id"]]
    assert second["meta"], "the second commit carries --meta"
    changes = json.loads(jz("--repo", str(demo), "diff", first["id"], second["id"],
                            "--json").stdout)
    kinds = {c["change"] for c in changes}
    assert {"modified", "added"} <= kinds, changes
    tags = json.loads(jz("--repo", str(demo), "tag", "list", "--json").stdout)
    assert {"name": "v1", "commit": first["id"]} in tags
    # the snapshots in the mount: .commits has both, .tags/v1 is the first
    commits = os.listdir(mnt / ".commits")
    assert first["id"] in commits and second["id"] in commits
    modified = next(c["path"] for c in changes if c["change"] == "modified")
    added = next(c["path"] for c in changes if c["change"] == "added")
    old = (mnt / ".tags" / "v1" / modified).read_bytes()
    assert old == (mnt / ".commits" / first["id"] / modified).read_bytes()
    assert old != (mnt / "main" / modified).read_bytes()
    assert not (mnt / ".tags" / "v1" / added).exists()
    assert (mnt / "main" / added).exists()
    # the demo's branch is clean
    st = json.loads(jz("status", "--json", cwd=mnt / "main").stdout)
    assert st["branch"] == "main" and st["changes"] == []
    return first["id"], second["id"]


@needs_root
def test_quickstart_twice(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt" / "repo"  # the script creates it
    demo = tmp_path / "demo"
    pids: set[int] = set()
    try:
        r = quickstart(str(mnt), demo=demo)
        if (pid := _daemon_pid(mnt)) is not None:
            pids.add(pid)
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
        assert "Traceback" not in r.stderr
        ids = _check_demo(mnt, demo, r.stdout)

        # the mount works as a user would use it right away
        (mnt / "main" / "data" / "mine.csv").write_text("id,x\n1,2\n")
        res = jz("commit", "-m", "my change", "--json", cwd=mnt / "main" / "data")
        mine = json.loads(res.stdout)["id"]
        jz("reset", "--hard", ids[1], cwd=mnt / "main")
        assert not (mnt / "main" / "data" / "mine.csv").exists()
        assert mine in os.listdir(mnt / ".commits") or (mnt / ".commits" / mine).is_dir()

        # a second run: unmounts, reuses (or recreates) the demo, mounts again
        r2 = quickstart(str(mnt), demo=demo)
        if (pid := _daemon_pid(mnt)) is not None:
            pids.add(pid)
        assert r2.returncode == 0, f"{r2.stdout}\n{r2.stderr}"
        assert "Traceback" not in r2.stderr
        _check_demo(mnt, demo, r2.stdout)
    finally:
        _unmount([mnt], pids)
    assert not is_mounted(mnt)


@needs_root
def test_quickstart_moves_the_demo_to_another_mountpoint(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    a, b = tmp_path / "a", tmp_path / "b"
    pids: set[int] = set()
    try:
        r = quickstart(str(a), demo=demo)
        if (pid := _daemon_pid(a)) is not None:
            pids.add(pid)
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
        # one daemon serves a repository: mounting it elsewhere moves the mount
        r = quickstart(str(b), demo=demo)
        if (pid := _daemon_pid(b)) is not None:
            pids.add(pid)
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
        assert not is_mounted(a)
        _check_demo(b, demo, r.stdout)
    finally:
        _unmount([a, b], pids)


@needs_root
def test_quickstart_refuses_what_it_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    mnt = tmp_path / "mnt"
    r = quickstart(str(mnt), demo=precious)
    assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    assert str(precious) in r.stderr.splitlines()[-1]
    assert (precious / "keep.txt").read_text() == "mine"
    assert not is_mounted(mnt)
    # something else mounted at the mount point: left alone, and a clear error
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        r = quickstart(str(mnt), demo=tmp_path / "demo")
        assert r.returncode == 1, f"{r.stdout}\n{r.stderr}"
        assert str(mnt) in r.stderr.splitlines()[-1]
        assert _mount_count(mnt) == 1
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    assert not (tmp_path / "demo").exists()


# ------------------------------------------------- the CLI inside a mount


def test_cli_finds_repo_and_branch_inside_the_mount(mnt: Mount) -> None:
    (mnt.main / "base.txt").write_text("base")
    base = json.loads(jz("commit", "-m", "base", "--json", cwd=mnt.main).stdout)
    assert base["branch"] == "main"
    os.mkdir(mnt.mnt / "dev")  # a branch
    work = mnt.mnt / "dev" / "sub" / "dir"
    work.mkdir(parents=True)
    (work / "f.txt").write_text("on dev")

    st = json.loads(jz("status", "--json", cwd=work).stdout)
    assert st["branch"] == "dev"
    assert [(c["change"], c["path"]) for c in st["changes"]] == [("added", "sub/dir/f.txt")]
    # main is untouched and clean
    st = json.loads(jz("status", "--json", cwd=mnt.main).stdout)
    assert st["branch"] == "main" and st["changes"] == []

    c = json.loads(jz("commit", "-m", "x", "--json", cwd=work).stdout)
    assert c["branch"] == "dev"
    assert json.loads(mnt.cli("log", "dev", "-n", "1", "--json").stdout)[0]["id"] == c["id"]
    assert json.loads(mnt.cli("log", "main", "-n", "1", "--json").stdout)[0]["id"] == base["id"]
    # log, show and reset act on the branch the command runs in
    assert json.loads(jz("log", "-n", "1", "--json", cwd=work.parent).stdout)[0]["id"] == c["id"]
    assert jz("show", "dev:sub/dir/f.txt", cwd=work).stdout == "on dev"
    (work / "scratch").write_text("s")
    jz("reset", "--hard", cwd=mnt.mnt / "dev")
    assert not (work / "scratch").exists()
    # merge into the branch the command runs in
    m = json.loads(jz("merge", "dev", "--json", cwd=mnt.main).stdout)
    assert m["branch"] == "main" and m["fast_forward"] is True
    assert (mnt.main / "sub" / "dir" / "f.txt").read_text() == "on dev"
    # at the mount's top and in a snapshot: the repository, its default branch
    assert json.loads(jz("status", "--json", cwd=mnt.mnt).stdout)["branch"] == "main"
    snap = mnt.mnt / ".commits" / c["id"]
    assert json.loads(jz("log", "-n", "1", "--json", cwd=snap).stdout)[0]["id"] == c["id"]
    # errors from inside the mount keep the contract
    res = jz("branch", "create", "bad name", cwd=work, check=False)
    assert res.returncode == 1 and len(res.stderr.splitlines()) == 1
    assert "Traceback" not in res.stderr


def test_repo_option_beats_the_mount_you_are_in(mnt: Mount, tmp_path: Path) -> None:
    other = tmp_path / "other-repo"
    jz("init", str(other))
    (mnt.main / "f").write_text("1")
    res = jz("--repo", str(other), "status", "--json", cwd=mnt.main)
    st = json.loads(res.stdout)
    assert st["changes"] == []
    res = jz("status", "--json", cwd=mnt.main, env={"JIAOZIFUSE_REPO": str(other)})
    assert json.loads(res.stdout)["changes"] == []
    st = json.loads(jz("status", "--json", cwd=mnt.main).stdout)
    assert [c["path"] for c in st["changes"]] == ["f"]
