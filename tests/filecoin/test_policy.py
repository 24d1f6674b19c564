"""The archive policy: the mount daemon archives by itself, in the background.

Real mounts (``jiaozifuse mount``, a daemon process) and the real CLI, as the
mount tests run them. What must hold: a commit on a branch the policy names
is archived without anyone asking, and its pieces check out (commitments
recomputed from the CAR files, a restore from them); a job interrupted by
SIGKILL completes after the next mount; the mount keeps serving writes while
an archive run is in flight; a bad policy is one clear line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mount.conftest import Mount, have_fuse, jz, start_mount, teardown

from jiaozifuse import archive as arc
from jiaozifuse.commp import commp_file
from jiaozifuse.repo import Repository

from .conftest import MiB

pytestmark = pytest.mark.skipif(not have_fuse(), reason="needs /dev/fuse and fusermount3")

#: An onramp command that blocks on its first call until ``release`` exists
#: (so a test can act while a run is in flight), then answers "submitted".
BLOCKING_ONRAMP = """\
import json, os, sys, time, pathlib
d = pathlib.Path(sys.argv[1])
p = json.loads(sys.stdin.readline())
if not (d / "started").exists():
    (d / "pid").write_text(str(os.getpid()))
    (d / "started").write_text(p["piece_cid"])
    deadline = time.time() + 60
    while not (d / "release").exists() and time.time() < deadline:
        time.sleep(0.05)
with open(d / "calls", "a") as f:
    f.write(p["piece_cid"] + "\\n")
print(json.dumps({"state": "submitted", "deal_id": "deal-" + p["piece_cid"][-6:]}))
"""


def _config(repo: Path, policy: Any, command: list[str] | None = None) -> None:
    path = repo / "config.json"
    doc = json.loads(path.read_text())
    doc["archive"] = {"policy": policy}
    if command:
        doc["archive"]["command"] = command
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _status(m: Mount) -> dict[str, Any]:
    return json.loads(m.cli("archive", "status", "--json").stdout)


def _wait(what: str, pred: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _archived(m: Mount, ref: str, head: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        st = _status(m)
        ok = st["refs"].get(ref) == head and not [j for j in st["queue"] if j["ref"] == ref
                                                   .partition("/")[2]]
        return st if ok else None

    return check


def _check_pieces(st: dict[str, Any]) -> None:
    """Every piece's CAR is where the record says, and its bytes give its piece CID."""
    assert st["pieces"]
    for p in st["pieces"]:
        car = Path(p["car_path"])
        assert car.name == f"{p['piece_cid']}.car"
        piece = commp_file(car)
        assert (piece.cid_v1, piece.cid_v2, piece.padded_size) == (
            p["piece_cid"], p["piece_cid_v2"], p["piece_size"])
        assert car.stat().st_size == p["car_size"]


def _head(m: Mount, ref: str = "main") -> str:
    return json.loads(m.cli("log", ref, "-n", "1", "--json").stdout)[0]["id"]


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[list[Mount]]:
    """Mounts a test started (it may replace one after a kill); all undone at teardown."""
    started: list[Mount] = []
    yield started
    for m in started:
        teardown(m)


def _blocking_onramp(tmp_path: Path) -> tuple[list[str], Path]:
    script = tmp_path / "onramp.py"
    script.write_text(BLOCKING_ONRAMP)
    state = tmp_path / "onramp-state"
    state.mkdir()
    return [sys.executable, str(script), str(state)], state


def _kill_orphan(state: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((state / "pid").read_text()), signal.SIGKILL)


def test_policy_archives_in_background(tmp_path: Path, mounts: list[Mount]) -> None:
    repo = tmp_path / "repo"
    jz("init", str(repo))
    _config(repo, {"branches": ["main"], "tags": True, "target_size": "1MiB"})
    m = start_mount(repo, tmp_path / "mnt")
    mounts.append(m)
    (m.main / "data").mkdir()
    payload = os.urandom(3 * MiB + 5)
    (m.main / "data" / "a.bin").write_bytes(payload)
    (m.main / "notes.txt").write_text("first\n")
    m.cli("commit", "-m", "first")
    st = _wait("main archived", _archived(m, "branch/main", _head(m)))
    _check_pieces(st)
    assert len(st["pieces"]) >= 3  # 1 MiB pieces for 3 MiB of data
    runs = len(st["runs"])

    # the next commit: an incremental run, by itself again; then a tag
    (m.main / "notes.txt").write_text("second\n")
    m.cli("commit", "-m", "second")
    head = _head(m)
    st = _wait("the second commit archived", _archived(m, "branch/main", head))
    assert len(st["runs"]) == runs + 1
    m.cli("tag", "create", "v1")
    st = _wait("tag v1 archived", _archived(m, "tag/v1", head))
    _check_pieces(st)
    assert {p["state"] for p in st["pieces"]} == {"packed"}
    assert st["policy"]["branches"] == ["main"] and st["queue"] == []

    # the CARs alone give the repository back
    out = Path(st["pieces"][0]["car_path"]).parent
    r = arc.restore(out, tmp_path / "restored")
    assert r["refs"]["branch/main"] == head and r["refs"]["tag/v1"] == head
    with Repository.open(tmp_path / "restored") as back:
        back.export("main", tmp_path / "export")
    assert (tmp_path / "export" / "data" / "a.bin").read_bytes() == payload
    assert (tmp_path / "export" / "notes.txt").read_text() == "second\n"


def test_job_survives_sigkill(tmp_path: Path, mounts: list[Mount]) -> None:
    repo = tmp_path / "repo"
    jz("init", str(repo))
    command, state = _blocking_onramp(tmp_path)
    m = start_mount(repo, tmp_path / "mnt")
    mounts.append(m)
    (m.main / "a.bin").write_bytes(os.urandom(2 * MiB))
    m.cli("commit", "-m", "first")
    head = _head(m)
    # a policy given to a running daemon (it reads config.json when it changes)
    _config(repo, {"branches": ["main"], "onramp": "command", "target_size": "1MiB"},
            command)
    try:
        # The run is packed and recorded, and its first piece is with the onramp:
        # the job is queued and not finished. Kill the daemon there.
        _wait("the onramp to be called", lambda: (state / "started").exists())
        queued = _status(m)["queue"]
        assert [(j["ref"], j["state"]) for j in queued] == [("main", "queued")]
        assert queued[0]["run"] is not None
        os.kill(m.pid, signal.SIGKILL)
        _wait("the daemon to die", lambda: not Path(f"/proc/{m.pid}").exists(), 10)
    finally:
        _kill_orphan(state)
    teardown(m)  # the stale mount the kill left
    m2 = start_mount(repo, m.mnt)
    mounts.append(m2)
    st = _wait("the job to complete after the restart", _archived(m2, "branch/main", head))
    _check_pieces(st)
    assert {p["state"] for p in st["pieces"]} == {"submitted"}
    assert all(p["detail"]["deal_id"].startswith("deal-") for p in st["pieces"])
    assert len(st["runs"]) == 1  # resumed, not packed again
    assert (m2.main / "a.bin").stat().st_size == 2 * MiB


def test_mount_serves_while_archive_runs(tmp_path: Path, mounts: list[Mount]) -> None:
    """``jiaozifuse archive`` against a mount runs in the daemon's worker thread."""
    repo = tmp_path / "repo"
    jz("init", str(repo))
    command, state = _blocking_onramp(tmp_path)
    m = start_mount(repo, tmp_path / "mnt")
    mounts.append(m)
    big = os.urandom(24 * MiB)
    (m.main / "big.bin").write_bytes(big)
    m.cli("commit", "-m", "big")
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-m", "jiaozifuse.cli", "--repo", str(repo), "archive", "main",
         "--onramp", "command", "--command", " ".join(command), "--target-size", "8MiB",
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait("the archive run to reach the onramp", lambda: (state / "started").exists())
        # in flight: the onramp holds the run; the mount must still serve writes
        body = os.urandom(3 * MiB)
        with open(m.main / "during.bin", "wb") as f:
            f.write(body)
        assert (m.main / "during.bin").read_bytes() == body
        assert (m.main / "big.bin").stat().st_size == len(big)
        m.cli("commit", "-m", "during the archive run")
        assert proc.poll() is None  # the run is still in flight
        (state / "release").touch()
        out, err = proc.communicate(timeout=60)
    finally:
        _kill_orphan(state)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["pieces"] and {p["state"] for p in doc["pieces"]} == {"submitted"}
    st = _status(m)
    _check_pieces(st)
    assert st["queue"] == []  # the CLI collected its job


def test_bad_policy_is_one_clear_line(tmp_path: Path, mounts: list[Mount]) -> None:
    repo = tmp_path / "repo"
    jz("init", str(repo))
    _config(repo, {"branches": "main", "tags": "yes please", "min_bytes": "lots"})
    res = jz("--repo", str(repo), "archive", "policy", check=False)
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert "config.json: archive.policy.min_bytes" in lines[0] and "'lots'" in lines[0]
    _config(repo, {"branches": 5})
    res = jz("--repo", str(repo), "archive", "policy", check=False)
    assert res.returncode == 1
    assert "archive.policy.branches: expected a list" in res.stderr
    # a daemon keeps serving, says why it archives nothing, and picks up the fix
    m = start_mount(repo, tmp_path / "mnt")
    mounts.append(m)
    (m.main / "f").write_text("x")
    m.cli("commit", "-m", "c")
    st = _status(m)
    assert "archive.policy.branches" in st["policy_error"] and st["queue"] == []
    assert "archive policy disabled" in (repo / "run" / "daemon.log").read_text()
    human = m.cli("archive", "status").stdout
    assert "archive policy disabled: config.json: archive.policy.branches" in human
    time.sleep(0.02)  # a new mtime for the fixed file
    _config(repo, {"branches": ["main"], "target_size": "1MiB"})
    _wait("main archived once the policy is fixed", _archived(m, "branch/main", _head(m)))


def test_run_queue_without_daemon_retries(tmp_path: Path) -> None:
    """No daemon: ``archive run-queue`` does its work; a failed job stays queued."""
    repo = tmp_path / "repo"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(MiB))
    jz("init", str(repo))
    jz("--repo", str(repo), "import", str(src))
    jz("--repo", str(repo), "commit", "-m", "c")
    flag = tmp_path / "refuse"
    flag.touch()
    script = tmp_path / "ramp.py"
    script.write_text("import json, os, sys\np = json.loads(sys.stdin.readline())\n"
                      f"if os.path.exists({str(flag)!r}):\n"
                      "    print('no deal today', file=sys.stderr); sys.exit(3)\n"
                      "print(json.dumps({'state': 'active'}))\n")
    _config(repo, {"branches": ["m*"], "onramp": "command", "min_bytes": "512KiB"},
            [sys.executable, str(script)])
    res = jz("--repo", str(repo), "archive", "run-queue", check=False)
    assert res.returncode == 1 and "no deal today" in res.stderr
    st = json.loads(jz("--repo", str(repo), "archive", "status", "--json").stdout)
    (job,) = st["queue"]
    assert job["attempts"] == 1 and "no deal today" in job["error"]
    assert {p["state"] for p in st["pieces"]} == {"failed"}
    flag.unlink()
    done = json.loads(jz("--repo", str(repo), "archive", "run-queue", "--json").stdout)
    assert [j["state"] for j in done["jobs"]] == ["done"] and done["queue"] == []
    st = json.loads(jz("--repo", str(repo), "archive", "status", "--json").stdout)
    assert st["counts"]["active"] >= 1 and st["queue"] == []
    # below min_bytes: a small change is not archived yet
    (src / "small.txt").write_text("tiny")
    jz("--repo", str(repo), "import", str(src))
    jz("--repo", str(repo), "commit", "-m", "small")
    done = json.loads(jz("--repo", str(repo), "archive", "run-queue", "--json").stdout)
    assert done["jobs"] == []
