"""The mount layout and the errors a user meets first."""

from __future__ import annotations

import errno
import json
import os

import pytest

from .conftest import Mount, is_mounted, jz


def test_layout_and_commit_snapshot(mnt: Mount) -> None:
    assert sorted(os.listdir(mnt.mnt)) == [".commits", ".jiaozifuse-mount", ".tags", "main"]
    (mnt.main / "data").mkdir()
    (mnt.main / "data" / "a.csv").write_text("x,y\n1,2\n")
    out = jz("commit", "-m", "first", "--json", cwd=mnt.main / "data")
    import json

    cid = json.loads(out.stdout)["id"]
    snap = mnt.mnt / ".commits" / cid
    assert (snap / "data" / "a.csv").read_text() == "x,y\n1,2\n"
    assert (mnt.mnt / ".commits" / cid[:7] / "data" / "a.csv").exists()
    assert cid in os.listdir(mnt.mnt / ".commits")
    # the snapshot does not change when the branch does
    (mnt.main / "data" / "a.csv").write_text("changed\n")
    assert (snap / "data" / "a.csv").read_text() == "x,y\n1,2\n"
    assert os.getxattr(snap / "data" / "a.csv", "user.jiaozi.commit").decode() == cid


def test_snapshot_is_read_only(mnt: Mount) -> None:
    (mnt.main / "f").write_text("v1")
    mnt.cli("commit", "-m", "c")
    cid = mnt.cli("log", "-n", "1", "--json").stdout
    import json

    snap = mnt.mnt / ".commits" / json.loads(cid)[0]["id"]
    for action in (
        lambda: (snap / "f").write_text("x"),
        lambda: (snap / "new").write_text("x"),
        lambda: os.mkdir(snap / "d"),
        lambda: os.unlink(snap / "f"),
        lambda: os.rename(snap / "f", snap / "g"),
        lambda: os.truncate(snap / "f", 0),
        lambda: os.chmod(snap / "f", 0o777),
        lambda: os.setxattr(snap / "f", "user.x", b"1"),
        lambda: os.link(snap / "f", snap / "h"),
    ):
        with pytest.raises(OSError) as ei:
            action()
        assert ei.value.errno == errno.EROFS
    # the mount keeps serving
    assert (snap / "f").read_text() == "v1"


def test_mkdir_creates_branch_and_bad_names(mnt: Mount) -> None:
    (mnt.main / "x").write_text("1")
    mnt.cli("commit", "-m", "c")
    os.mkdir(mnt.mnt / "exp-1")
    assert (mnt.mnt / "exp-1" / "x").read_text() == "1"
    (mnt.mnt / "exp-1" / "x").write_text("2")
    assert (mnt.main / "x").read_text() == "1"
    for bad in ("bad name", "-x", ".hidden2", "a:b"):
        with pytest.raises(OSError) as ei:
            os.mkdir(mnt.mnt / bad)
        assert ei.value.errno in (errno.EINVAL, errno.EPERM)
    with pytest.raises(OSError) as ei:
        os.mkdir(mnt.mnt / "main")
    assert ei.value.errno == errno.EEXIST
    with pytest.raises(OSError) as ei:
        (mnt.mnt / ("y" * 256)).mkdir()
    assert ei.value.errno in (errno.ENAMETOOLONG, errno.EINVAL)
    with pytest.raises(OSError) as ei:
        (mnt.main / ("y" * 256)).write_text("1")
    assert ei.value.errno == errno.ENAMETOOLONG
    assert sorted(p for p in os.listdir(mnt.mnt) if not p.startswith(".")) == ["exp-1", "main"]


def test_reset_through_cli_is_seen_at_once(mnt: Mount) -> None:
    (mnt.main / "a").write_text("committed")
    mnt.cli("commit", "-m", "c")
    (mnt.main / "a").write_text("scratch")
    (mnt.main / "b").write_text("new")
    assert (mnt.main / "a").read_text() == "scratch"
    mnt.cli("reset", "--hard")
    assert (mnt.main / "a").read_text() == "committed"
    assert not (mnt.main / "b").exists()
    assert mnt.cli("status", "--json").stdout.count('"path"') == 0


def test_remount_keeps_data_and_umount_is_clean(mount_factory) -> None:
    m = mount_factory()
    (m.main / "big").write_bytes(os.urandom(3 << 20))
    data = (m.main / "big").read_bytes()
    m2 = m.remount()
    assert (m2.main / "big").read_bytes() == data
    m2.unmount()
    assert not is_mounted(m2.mnt)


def test_mount_errors(tmp_path) -> None:
    jz("init", str(tmp_path / "r"))
    res = jz("mount", str(tmp_path / "r"), str(tmp_path / "missing"), check=False)
    assert res.returncode == 1 and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr
    res = jz("mount", str(tmp_path / "nope"), str(tmp_path), check=False)
    assert res.returncode == 1 and "not a jiaozifuse repository" in res.stderr


def test_single_branch_and_single_commit_mounts(mount_factory, tmp_path) -> None:
    m = mount_factory()
    (m.main / "train.csv").write_text("a,b\n")
    cid = json.loads(m.cli("commit", "-m", "v1", "--json").stdout)["id"]
    (m.main / "train.csv").write_text("changed\n")
    m.cli("branch", "create", "exp")
    m.unmount()

    b = tmp_path / "only-branch"
    b.mkdir()
    jz("mount", str(m.repo), str(b), "--branch", "exp")
    try:
        assert sorted(os.listdir(b)) == ["train.csv"]
        assert (b / "train.csv").read_text() == "a,b\n"
        (b / "new.txt").write_text("x")
        # a command run inside finds the repository and the branch by itself
        st = json.loads(jz("status", "--json", cwd=b).stdout)
        assert st["branch"] == "exp" and [c["path"] for c in st["changes"]] == ["new.txt"]
    finally:
        jz("umount", str(b))

    c = tmp_path / "only-commit"
    c.mkdir()
    jz("mount", str(m.repo), str(c), "--commit", cid[:10])
    try:
        assert (c / "train.csv").read_text() == "a,b\n"
        with pytest.raises(OSError) as ei:
            (c / "x").write_text("no")
        assert ei.value.errno == errno.EROFS
        assert os.getxattr(c / "train.csv", "user.jiaozi.commit").decode() == cid
    finally:
        jz("umount", str(c))
    res = jz("mount", str(m.repo), str(c), "--branch", "nope", check=False)
    assert res.returncode == 1 and "nope" in res.stderr and not is_mounted(c)


def test_sigterm_flushes_and_unmounts(mount_factory) -> None:
    import signal
    import time

    m = mount_factory()
    data = os.urandom(5 << 20)
    (m.main / "f.bin").write_bytes(data)
    os.kill(m.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while is_mounted(m.mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_mounted(m.mnt)
    m2 = m.remount()
    assert (m2.main / "f.bin").read_bytes() == data


def test_mount_twice_is_a_clear_error(mnt) -> None:
    res = jz("mount", str(mnt.repo), str(mnt.mnt), check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert (mnt.main).exists()


def test_metrics_endpoint_counts_requests(mount_factory, tmp_path) -> None:
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jz("init", str(tmp_path / "m-repo"))
    (tmp_path / "m-mnt").mkdir()
    jz("mount", str(tmp_path / "m-repo"), str(tmp_path / "m-mnt"), "--metrics-addr",
       f"127.0.0.1:{port}")
    mnt = tmp_path / "m-mnt"
    try:
        def scrape() -> dict[str, float]:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            out = {}
            for line in text.decode().splitlines():
                if line and not line.startswith("#"):
                    k, _, v = line.rpartition(" ")
                    out[k] = float(v)
            return out

        before = scrape()
        (mnt / "main" / "f").write_bytes(b"x" * 100_000)
        assert (mnt / "main" / "f").read_bytes() == b"x" * 100_000
        import time

        time.sleep(1.2)
        after = scrape()
        key = 'jiaozifuse_fuse_requests_total{op="write"}'
        assert after.get(key, 0) > before.get(key, 0)
        assert after['jiaozifuse_cache_bytes'] >= 100_000
        assert 'jiaozifuse_upload_queue_entries' in after
        assert any(k.startswith("jiaozifuse_fuse_request_seconds_bucket") for k in after)
    finally:
        jz("umount", str(mnt))


def test_control_socket_refuses_other_users(mnt) -> None:
    """Only the mount's owner (or root) may drive the daemon."""
    import socket

    sock = str(mnt.repo / "run" / "control.sock")
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    # let the other user reach the socket file, so that the daemon's own uid check is
    # what refuses it (pytest's temp dirs are 0700)
    from pathlib import Path

    opened = []
    for d in Path(sock).parents:
        if str(d) in ("/", "/tmp"):
            break
        opened.append((d, os.stat(d).st_mode & 0o7777))
        os.chmod(d, (os.stat(d).st_mode & 0o7777) | 0o001)
    pid = os.fork()
    if pid == 0:  # child: become nobody, try to connect
        code = 3
        try:
            os.chmod(sock, 0o666)  # as root, open the file mode: the uid check remains
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            s.connect(sock)
            # the daemon answers a foreign uid at once, before any request
            reply = s.recv(4096)
            code = 0 if b"permission denied" in reply else 1
        except OSError:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    os.chmod(sock, 0o600)
    for d, mode in opened:
        os.chmod(d, mode)
    assert os.WEXITSTATUS(status) == 0, "a foreign uid was not refused"


def test_a_control_client_that_goes_away_does_not_stop_the_daemon(mnt: Mount) -> None:
    """A CLI killed while the daemon works on its request (``events tail -f``
    interrupted, a timeout): the reply meets a closed socket, and the mount
    must go on serving."""
    import socket

    from jiaozifuse import control

    (mnt.main / "before.txt").write_text("x")
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(control.socket_path(mnt.repo)))
        s.sendall(json.dumps({"op": "commit", "args": {
            "branch": "main", "message": "client gone", "allow_empty": True}}).encode() + b"\n")
        s.close()  # before the daemon can answer
    assert control.call(mnt.repo, "ping", {}, timeout=10) is not None
    assert is_mounted(mnt.mnt)
    (mnt.main / "after.txt").write_text("y")
    assert (mnt.main / "after.txt").read_text() == "y"
    log = (mnt.repo / "run" / "daemon.log").read_text()
    assert "Traceback" not in log, log[-2000:]


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a mount's readahead needs root (sysfs)")
def test_sequential_reads_arrive_in_large_requests(mount_factory) -> None:
    """The mount's readahead window is raised from 128 KiB, so a sequential
    reader costs one request per MiB, not per 128 KiB (as writes already do)."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def mount(init: bool) -> Mount:
        m = mount_factory("r", "--metrics-addr", f"127.0.0.1:{port}", init=init)
        st = os.stat(m.mnt)
        ra = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb"
        deadline = time.monotonic() + 10
        while open(ra).read().strip() != "4096" and time.monotonic() < deadline:
            time.sleep(0.05)  # raised by the daemon once the mount is up
        assert open(ra).read().strip() == "4096"
        return m

    def reads() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        return sum(float(line.rsplit(None, 1)[1]) for line in text.splitlines()
                   if line.startswith('jiaozifuse_fuse_requests_total{op="read"}'))

    m = mount(init=True)
    data = os.urandom(32 << 20)
    (m.main / "big").write_bytes(data)
    jz("umount", str(m.mnt))  # a new mount: nothing of the file in the kernel's cache
    m = mount(init=False)
    before = reads()
    with open(m.main / "big", "rb") as f:
        assert f.read() == data
    assert reads() - before <= 32 + 8  # 1 MiB requests (128 KiB ones would be 256)


def test_gc_through_the_mount_gives_back_chunk_log_space(mnt: Mount) -> None:
    """A large file's chunks go to the chunk log; once nothing names them, gc
    frees their disk space (holes punched), and everything else reads back."""
    keep = os.urandom(8 << 20)
    (mnt.main / "keep.bin").write_bytes(keep)
    jz("commit", "-m", "keep", cwd=mnt.main)
    os.mkdir(mnt.mnt / "scratch")
    junk = os.urandom(48 << 20)
    (mnt.mnt / "scratch" / "junk.bin").write_bytes(junk)
    jz("commit", "-m", "junk", cwd=mnt.mnt / "scratch")

    def log_disk() -> int:
        return sum(p.stat().st_blocks * 512 for p in (mnt.repo / "store" / "log").glob("*.seg"))

    before = log_disk()
    assert before >= 40 << 20  # the big writes went to the log
    jz("branch", "delete", "scratch", "--repo", str(mnt.repo))
    report = json.loads(jz("gc", "--json", "--repo", str(mnt.repo)).stdout)
    assert report["local"]["bytes_freed"] >= 40 << 20
    assert log_disk() <= before - (40 << 20)
    assert (mnt.main / "keep.bin").read_bytes() == keep
    fsck = json.loads(jz("fsck", "--json", "--repo", str(mnt.repo)).stdout)
    assert fsck["ok"], fsck


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _requests(paths: list, seconds: float, gap: float) -> int:
    """FUSE requests (a getxattr the kernel never caches) for *seconds*, *gap* apart."""
    import time

    n = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for p in paths:
            with pytest.raises(OSError) as e:
                os.getxattr(p, "user.absent")
            assert e.value.errno == errno.ENODATA
            n += 1
            if gap:
                time.sleep(gap)
    return n


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="busy polling needs 2 CPUs")
def test_busy_polling_runs_between_requests_and_stops_when_they_do(mount_factory) -> None:
    """--busy-poll-us keeps the daemon polling after each reply (poll.RequestPoller); once
    requests stop it must park, or an idle mount would burn a CPU for ever."""
    import time

    polling = mount_factory("poll", "--busy-poll-us", "20000")
    sleeping = mount_factory("sleep", "--busy-poll-us", "0")
    used = {}
    for name, m in (("polling", polling), ("sleeping", sleeping)):
        paths = [m.main / f"f{i}" for i in range(20)]
        for p in paths:
            p.write_bytes(b"x")
        c0 = _cpu_seconds(m.pid)
        assert _requests(paths, 1.0, 0.002) > 50
        used[name] = _cpu_seconds(m.pid) - c0
        time.sleep(0.5)  # a window has long passed
        c0 = _cpu_seconds(m.pid)
        time.sleep(2.0)
        idle = _cpu_seconds(m.pid) - c0
        assert idle < 0.3, f"an idle daemon used {idle:.2f} CPU s in 2 s"
    # requests 2 ms apart inside a 20 ms window: the daemon never sleeps in between
    assert used["polling"] > 0.5, used
    assert used["sleeping"] < 0.3, used


def _wakeups(pid: int) -> int:
    """Times the daemon's main (trio) thread has gone to sleep and been woken so far."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/PID/status")


def test_an_idle_daemon_sleeps_and_a_write_after_is_still_durable_within_the_interval(
        mount_factory) -> None:
    """The group commit, the trigger runner and the event forwarder sleep while
    nothing is written (they used to tick 25 times a second: about 1 % of a CPU
    per idle mount); a write after the idle spell still becomes durable within
    COMMIT_INTERVAL (50 ms): the daemon is SIGKILLed 300 ms after a mkdir and a
    chmod, which no close or fsync followed, and both are there after a remount."""
    import signal
    import time

    m = mount_factory("idle")
    (m.main / "warm").write_bytes(b"x")  # events, a commit: everything once
    time.sleep(1.0)
    w0 = _wakeups(m.pid)
    time.sleep(3.0)
    woke = _wakeups(m.pid) - w0
    assert woke < 40, f"an idle daemon's trio thread woke {woke} times in 3 s"
    (m.main / "d").mkdir()
    os.chmod(m.main / "warm", 0o600)
    time.sleep(0.3)
    os.kill(m.pid, signal.SIGKILL)
    m = m.remount()
    try:
        assert (m.main / "d").is_dir()
        assert (m.main / "warm").stat().st_mode & 0o777 == 0o600
    finally:
        m.unmount()
