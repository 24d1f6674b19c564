"""Triggers run by the mount daemon: rules committed in .jiaozi/triggers.toml, commands
that get the event as data, signed webhooks, retries, pre-commit refusal, and
at-least-once delivery across a SIGKILL of the daemon.

Most tests share one mount (module scope); each works on a branch of its own,
whose committed rules name that branch only.  The daemon is mounted with the
webhook secret in its environment, as ``jiaozifuse mount`` passes it on.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jiaozifuse.triggers import verify_signature

from .conftest import Mount, jz, teardown

SECRET_ENV = "JZ_TEST_HOOK_SECRET"
SECRET = "s3cret-" + uuid.uuid4().hex

RECORDER = """\
import json, os, sys
data = sys.stdin.buffer.read()
rec = {"tag": sys.argv[2:], "stdin": data.decode("utf-8", "surrogateescape"),
       "env": {k: v for k, v in os.environ.items() if k.startswith("JIAOZI_")},
       "cwd": os.getcwd()}
with open(sys.argv[1], "a", encoding="utf-8", errors="surrogateescape") as f:
    f.write(json.dumps(rec) + "\\n")
"""


@pytest.fixture(scope="module")
def tm(tmp_path_factory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("triggers")
    repo, mnt = base / "repo", base / "mnt"
    jz("init", str(repo))
    mnt.mkdir()
    jz("mount", str(repo), str(mnt), env={SECRET_ENV: SECRET})
    m = Mount(repo, mnt, json.loads((mnt / ".jiaozifuse-mount").read_text())["pid"])
    try:
        yield m
    finally:
        teardown(m)
    log = (repo / "run" / "daemon.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture
def rec(tmp_path: Path) -> Path:
    (tmp_path / "rec.py").write_text(RECORDER)
    return tmp_path


def recorder(tmp: Path, out: str, *tag: str) -> str:
    """A TOML argv list that appends the event it gets to tmp/out (JSON lines)."""
    return json.dumps([sys.executable, str(tmp / "rec.py"), str(tmp / out), *tag])


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        r = json.loads(line)
        r["event"] = json.loads(r["stdin"])  # stdin bytes, surrogateescape-decoded
        out.append(r)
    return out


def set_rules(m: Mount, branch: str, text: str, commit: bool = True) -> None:
    d = m.mnt / branch / ".jiaozi"
    d.mkdir(exist_ok=True)
    (d / "triggers.toml").write_text(textwrap.dedent(text))
    if commit:
        commit_on(m, branch, "rules")


def new_branch(m: Mount, name: str) -> Path:
    m.cli("branch", "create", name)
    return m.mnt / name


def commit_on(m: Mount, branch: str, msg: str) -> str:
    return json.loads(m.cli("commit", "-b", branch, "-m", msg, "--json").stdout)["id"]


def put(path: Path, data: bytes | str = b"x\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)


def status(m: Mount) -> dict:
    return json.loads(m.cli("triggers", "status", "-n", "1000", "--json").stdout)


def wait_handled(m: Mount, timeout: float = 40) -> dict:
    """Bounded poll on `triggers status --json` until every event was handled."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(m)
        if st["offset"] >= st["last_seq"]:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"triggers still pending after {timeout} s: {st}")
        time.sleep(0.2)


def runs_of(st: dict, trigger: str) -> list[dict]:
    return [r for r in st["runs"] if r["trigger"] == trigger]


# ---------------------------------------------------------------------- matching


def test_commit_trigger_runs_once_per_matching_commit(tm: Mount, rec: Path) -> None:
    m = tm
    set_rules(m, "main", f"""
        [[trigger]]
        name = "retrain"
        on = ["commit"]
        branches = ["main"]
        paths = ["data/**"]
        run = {recorder(rec, "retrain.jsonl")}
        retries = 0
        """)
    check = json.loads(m.cli("triggers", "check", "--json").stdout)
    assert [(t["name"], t["on"], t["paths"]) for t in check["triggers"]] == [
        ("retrain", ["commit"], ["data/**"])]
    put(m.main / "data" / "a.csv")
    c1 = commit_on(m, "main", "data a")
    put(m.main / "docs" / "readme.md")
    commit_on(m, "main", "docs only")
    side = new_branch(m, "trig-side")
    put(side / "data" / "b.csv")
    commit_on(m, "trig-side", "data on another branch")
    put(m.main / "data" / "deep" / "er" / "c.csv")
    put(m.main / "data.csv")  # not under data/
    c2 = commit_on(m, "main", "data c")
    st = wait_handled(m)

    got = records(rec / "retrain.jsonl")
    assert [r["env"]["JIAOZI_COMMIT"] for r in got] == [c1, c2]
    assert [sorted(r["event"]["paths"]) for r in got] == [
        ["data/a.csv"], ["data.csv", "data/deep/er/c.csv"]]
    for r in got:
        assert r["env"]["JIAOZI_EVENT_TYPE"] == "commit" and r["env"]["JIAOZI_BRANCH"] == "main"
        assert json.loads(r["env"]["JIAOZI_EVENT"]) == r["event"]
        assert r["env"]["JIAOZI_SEQ"] == str(r["event"]["seq"])
        assert r["env"]["JIAOZI_REPO"] == str(m.repo) == r["cwd"]
    runs = runs_of(st, "retrain")
    assert [(r["event_seq"], r["ok"], r["exit_code"], r["attempts"]) for r in runs] == [
        (g["event"]["seq"], True, 0, 1) for g in got]


def test_uncommitted_rules_have_no_effect_until_committed(tm: Mount, rec: Path) -> None:
    m = tm
    b = new_branch(m, "trig-unc")
    rule = """
        [[trigger]]
        name = "on-write"
        on = ["close_write"]
        branches = ["trig-unc"]
        paths = ["data/**"]
        run = {run}
        retries = 0
        """
    set_rules(m, "trig-unc", rule.format(run=recorder(rec, "w.jsonl", "v1")))
    put(b / "data" / "a.csv")
    wait_handled(m)
    # edit the rules without committing: version 1 stays in force
    set_rules(m, "trig-unc", rule.format(run=recorder(rec, "w.jsonl", "v2")), commit=False)
    assert "on-write" in (b / ".jiaozi" / "triggers.toml").read_text()
    wait_handled(m)
    put(b / "data" / "b.csv")
    wait_handled(m)
    commit_on(m, "trig-unc", "rules v2")
    put(b / "data" / "c.csv")
    wait_handled(m)
    got = [(r["tag"], r["env"]["JIAOZI_PATH"]) for r in records(rec / "w.jsonl")]
    assert got == [(["v1"], "data/a.csv"), (["v1"], "data/b.csv"), (["v2"], "data/c.csv")]


def test_rules_in_force_are_those_committed_when_the_event_happened(tm: Mount, rec: Path
                                                                      ) -> None:
    m = tm
    b = new_branch(m, "trig-race")
    started = rec / "slow-started"
    slow = json.dumps([sys.executable, "-c", "import sys, time; open(sys.argv[1], 'w'); "
                       "time.sleep(5)", str(started)])
    rule = """
        [[trigger]]
        name = "slow"
        on = ["close_write"]
        branches = ["trig-race"]
        paths = ["slow/**"]
        run = {slow}
        retries = 0
        """
    set_rules(m, "trig-race", rule.format(slow=slow))
    wait_handled(m)
    put(b / "slow" / "s")  # keeps the runner busy for 5 s
    deadline = time.monotonic() + 20
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    put(b / "data" / "before-the-rule.csv")  # written while the new rule is uncommitted
    set_rules(m, "trig-race", rule.format(slow=slow) + f"""
        [[trigger]]
        name = "new"
        on = ["close_write"]
        branches = ["trig-race"]
        paths = ["data/**"]
        run = {recorder(rec, "race.jsonl")}
        retries = 0
        """)
    put(b / "data" / "after-the-rule.csv")
    wait_handled(m)
    got = [r["env"]["JIAOZI_PATH"] for r in records(rec / "race.jsonl")]
    assert got == ["data/after-the-rule.csv"]


# ---------------------------------------------------------------------- webhooks


class Receiver:
    """A webhook receiver on 127.0.0.1 that checks signatures as a user's would."""

    def __init__(self) -> None:
        self.got: list[tuple[dict, bytes, bool]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = verify_signature(SECRET.encode(), body,
                                      self.headers.get("X-Jiaozi-Signature", ""))
                outer.got.append((dict(self.headers), body, ok))
                self.send_response(200 if ok else 401)
                self.end_headers()
                self.wfile.write(b"received" if ok else b"bad signature")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def test_webhook_is_signed_with_the_secret_from_the_environment(
        tm: Mount, receiver: Receiver) -> None:
    m = tm
    b = new_branch(m, "trig-hook")
    set_rules(m, "trig-hook", f"""
        [[trigger]]
        name = "notify"
        on = ["commit"]
        branches = ["trig-hook"]
        webhook = "{receiver.url}"
        secret_env = "{SECRET_ENV}"
        retries = 0

        [[trigger]]
        name = "unsigned"
        on = ["commit"]
        branches = ["trig-hook"]
        webhook = "{receiver.url}"
        secret_env = "JZ_TEST_NOT_SET_ANYWHERE"
        retries = 0
        """)
    put(b / "models" / "m.bin", b"\x00\x01")
    cid = commit_on(m, "trig-hook", "model")
    st = wait_handled(m)

    # the rules commit and the model commit, each signed; nothing sent without a secret
    assert [ok for _, _, ok in receiver.got] == [True, True]
    headers, body, _ = receiver.got[-1]
    ev = json.loads(body)
    assert (ev["type"], ev["branch"], ev["commit"], ev["paths"]) == (
        "commit", "trig-hook", cid, ["models/m.bin"])
    assert headers["Content-Type"] == "application/json"
    sig = headers["X-Jiaozi-Signature"]
    assert verify_signature(SECRET.encode(), body, sig)
    assert not verify_signature(SECRET.encode(), body.replace(b"models", b"modelz"), sig)
    assert not verify_signature(SECRET.encode(), body + b"\n", sig)
    assert not verify_signature(b"wrong-secret", body, sig)
    notify = runs_of(st, "notify")[-1]
    assert (notify["ok"], notify["exit_code"], notify["event_seq"]) == (True, 200, ev["seq"])
    assert "received" in notify["output_tail"]
    unsigned = runs_of(st, "unsigned")[-1]
    assert not unsigned["ok"] and "JZ_TEST_NOT_SET_ANYWHERE" in unsigned["error"]


# ---------------------------------------------------------------------- failures


FAIL = """\
import sys, time
with open(sys.argv[1], "a") as f:
    f.write(f"{time.monotonic()}\\n")
print("boom: the input had 3 bad rows")
print("exiting with 7", file=sys.stderr)
sys.exit(7)
"""


def test_failing_trigger_is_retried_with_backoff_and_recorded(tm: Mount, tmp_path: Path
                                                              ) -> None:
    m = tm
    (tmp_path / "fail.py").write_text(FAIL)
    attempts = tmp_path / "attempts"
    b = new_branch(m, "trig-fail")
    set_rules(m, "trig-fail", f"""
        [[trigger]]
        name = "flaky"
        on = ["commit"]
        branches = ["trig-fail"]
        paths = ["data/**"]
        run = {json.dumps([sys.executable, str(tmp_path / "fail.py"), str(attempts)])}
        retries = 2
        """)
    put(b / "data" / "x.csv")
    commit_on(m, "trig-fail", "data")
    st = wait_handled(m)
    (run,) = runs_of(st, "flaky")
    assert (run["ok"], run["attempts"], run["exit_code"]) == (False, 3, 7)
    assert run["error"] == "exit status 7" and run["branch"] == "trig-fail"
    assert "boom: the input had 3 bad rows" in run["output_tail"]
    assert "exiting with 7" in run["output_tail"]
    times = [float(x) for x in attempts.read_text().split()]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) == 3 and gaps[0] >= 0.9 and gaps[1] >= 1.9  # 1 s, then 2 s
    human = m.cli("triggers", "status", "-n", "1000").stdout
    line = next(x for x in human.splitlines() if "flaky" in x)
    assert "FAILED (exit status 7)" in line and "3 attempt(s)" in line
    assert "| boom: the input had 3 bad rows" in human


PRE = """\
import json, sys
ev = json.load(sys.stdin)
print("checked", ev["paths"])
print("schema check failed: data/bad.csv has no header row")
sys.exit(1)
"""


def test_failing_pre_commit_trigger_refuses_the_commit(tm: Mount, tmp_path: Path) -> None:
    m = tm
    (tmp_path / "pre.py").write_text(PRE)
    b = new_branch(m, "trig-pre")
    set_rules(m, "trig-pre", f"""
        [[trigger]]
        name = "schema"
        on = ["pre_commit"]
        branches = ["trig-pre"]
        paths = ["data/**"]
        run = {json.dumps([sys.executable, str(tmp_path / "pre.py")])}
        """)
    put(b / "notes.txt")
    commit_on(m, "trig-pre", "notes only: the check does not apply")
    put(b / "data" / "bad.csv", "1,2\n")

    def state() -> tuple:
        return (json.loads(m.cli("log", "-b", "trig-pre", "-n", "1", "--json").stdout)[0]["id"],
                json.loads(m.cli("status", "-b", "trig-pre", "--json").stdout))

    before = state()
    res = m.cli("commit", "-b", "trig-pre", "-m", "bad data", check=False)
    assert res.returncode == 1
    err = res.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("jiaozifuse: ") and "'schema'" in err
    assert "schema check failed: data/bad.csv has no header row" in err
    assert state() == before
    assert (b / "data" / "bad.csv").read_text() == "1,2\n"


def test_pre_commit_trigger_can_read_the_mount(tm: Mount) -> None:
    m = tm
    b = new_branch(m, "trig-pre2")
    target = b / "data" / "x.csv"
    set_rules(m, "trig-pre2", f"""
        [[trigger]]
        name = "validate"
        on = ["pre_commit"]
        branches = ["trig-pre2"]
        run = ["/bin/cat", "{target}"]
        timeout = 3
        retries = 0
        """)
    put(target, "a,b\n1,2\n")
    res = m.cli("commit", "-b", "trig-pre2", "-m", "validated data", check=False)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------- paths as data


def test_hostile_paths_reach_commands_as_data(tm: Mount, rec: Path) -> None:
    m = tm
    tok = uuid.uuid4().hex[:10]
    b = new_branch(m, "trig-inj")
    set_rules(m, "trig-inj", f"""
        [[trigger]]
        name = "record"
        on = ["close_write", "commit"]
        branches = ["trig-inj"]
        paths = ["inj/**"]
        run = {recorder(rec, "inj.jsonl")}
        retries = 0
        """)
    names = [
        b"inj/with space.csv",
        b"inj/quote'single\"double.csv",
        b"inj/$(touch PWNED-" + tok.encode() + b")",
        b"inj/$(touch /tmp/PWNED-" + tok.encode() + b")",  # dirs "$(touch ", "tmp"
        b"inj/`touch PWNED2-" + tok.encode() + b"`",
        b"inj/new\nline.csv",
        b"inj/semi;colon|pipe&amp>redir.csv",
        b"inj/caf\xe9-\xff.csv",
        b"inj/-rf --help",
    ]
    root = os.fsencode(b)
    for n in names:
        p = os.path.join(root, n)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(n)
    cid = commit_on(m, "trig-inj", "hostile names")
    wait_handled(m)

    got = records(rec / "inj.jsonl")
    writes = [r for r in got if r["event"]["type"] == "close_write"]
    want = sorted(n.decode("utf-8", "surrogateescape") for n in names)
    assert sorted(r["env"]["JIAOZI_PATH"] for r in writes) == want
    for r in writes:
        assert r["event"]["path"] == r["env"]["JIAOZI_PATH"]
        assert json.loads(r["env"]["JIAOZI_EVENT"]) == r["event"]
    (commit,) = [r for r in got if r["event"]["type"] == "commit"]
    assert commit["env"]["JIAOZI_COMMIT"] == cid
    assert sorted(commit["event"]["paths"]) == want
    assert [os.fsencode(p) for p in sorted(commit["event"]["paths"])] == sorted(names)
    for where in (Path("/tmp"), m.repo, rec, Path.cwd(), m.mnt / "trig-inj"):
        assert not list(where.glob(f"PWNED*{tok}*")), where


# ---------------------------------------------------------------------- crash


SLOW = """\
import os, sys, time
log, done = sys.argv[1], sys.argv[2]
with open(log, "a") as f:
    f.write(f"start {os.getpid()} {os.environ['JIAOZI_SEQ']}\\n")
time.sleep(3)
with open(done, "w") as f:
    f.write(os.environ["JIAOZI_SEQ"])
"""


def test_trigger_pending_at_sigkill_runs_after_remount(mount_factory, tmp_path: Path) -> None:
    m = mount_factory("crash")
    (tmp_path / "slow.py").write_text(SLOW)
    log, done = tmp_path / "starts.log", tmp_path / "done"
    set_rules(m, "main", f"""
        [[trigger]]
        name = "slow"
        on = ["commit"]
        branches = ["main"]
        paths = ["data/**"]
        run = {json.dumps([sys.executable, str(tmp_path / "slow.py"), str(log), str(done)])}
        """)
    put(m.main / "data" / "a.csv")
    commit_on(m, "main", "data")
    seq = status(m)["last_seq"]
    deadline = time.monotonic() + 20
    while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.read_text().startswith("start ")
    # the daemon dies with everything it started (as in a crash or an OOM kill of its group)
    os.killpg(m.pid, signal.SIGKILL)
    time.sleep(0.5)
    assert not done.exists()
    # mount again over the stale mount point (`jiaozifuse mount` cleans it up)
    jz("mount", str(m.repo), str(m.mnt))
    m2 = Mount(m.repo, m.mnt, json.loads((m.mnt / ".jiaozifuse-mount").read_text())["pid"])
    try:
        deadline = time.monotonic() + 30
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert done.exists(), "the pending trigger did not run after the restart"
        st = wait_handled(m2)
        starts = log.read_text().splitlines()
        assert len(starts) == 2 and all(s.endswith(f" {seq}") for s in starts)
        assert done.read_text() == str(seq)
        (run,) = runs_of(st, "slow")
        assert (run["event_seq"], run["ok"], run["exit_code"]) == (seq, True, 0)
    finally:
        teardown(m2)

