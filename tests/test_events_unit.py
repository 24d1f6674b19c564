"""The event log, its consumers and the trigger rules, without a mount.

EventLog (append, read, retention), Consumer (at-least-once across a restart),
the rules parser (every mistake a clear JiaoziError), glob semantics, webhook
signatures, retries with backoff, and the trigger runner as ``jiaozifuse
triggers run`` drives it when no daemon serves the repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jiaozifuse import triggers
from jiaozifuse.errors import JiaoziError
from jiaozifuse.events import Consumer, EventLog, decode, encode
from jiaozifuse.repo import Repository
from jiaozifuse.triggers import Rule, glob_to_regex, parse_rules, sign, verify_signature

JZ = [sys.executable, "-m", "jiaozifuse.cli"]


def jz(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("JIAOZIFUSE_REPO", None)
    res = subprocess.run([*JZ, *args], capture_output=True, text=True, env=env, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"jiaozifuse {' '.join(args)} failed:\n{res.stdout}{res.stderr}")
    return res


# ---------------------------------------------------------------------- EventLog


def test_append_read_order_and_fields(tmp_repo: Repository) -> None:
    log = tmp_repo.events
    first = log.last_seq()
    seqs = [log.append("create", branch="main", path=f"f{i}", size=i) for i in range(5)]
    with tmp_repo.store.write() as w:  # inside a caller's transaction
        seqs.append(log.append("delete", w, branch="main", path="f0", old_path=None))
    assert seqs == list(range(first + 1, first + 7))
    assert log.last_seq() == seqs[-1]
    evs = list(log.read(first))
    assert [e["seq"] for e in evs] == seqs
    assert [e["type"] for e in evs] == ["create"] * 5 + ["delete"]
    assert [e.get("path") for e in evs] == ["f0", "f1", "f2", "f3", "f4", "f0"]
    assert evs[2]["size"] == 2 and evs[2]["branch"] == "main"
    assert "old_path" not in evs[5]  # None fields are left out
    times = [e["time_ns"] for e in evs]
    assert times == sorted(times) and abs(times[0] - time.time_ns()) < 60e9
    # since / limit
    assert [e["seq"] for e in log.read(seqs[2])] == seqs[3:]
    assert [e["seq"] for e in log.read(first, limit=2)] == seqs[:2]
    assert list(log.read(seqs[-1])) == []


def test_events_record_the_branch_head_they_happened_at(tmp_repo: Repository,
                                                        tmp_path: Path) -> None:
    """The trigger runner matches an event against the rules at this head, not at
    the branch's head when it gets to the event (a rules commit may come between)."""
    repo, log = tmp_repo, tmp_repo.events
    first = log.last_seq()
    before = repo.head("main")
    log.append("create", branch="main", path="a")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x").write_text("x")
    repo.import_dir("main", tmp_path / "src")
    after = repo.commit("main", "new head")
    log.append("create", branch="main", path="b")
    log.append("tag_create", tag="t1", commit=after.hex())
    evs = [e for e in log.read(first) if e.get("path") in ("a", "b") or e["type"] == "tag_create"]
    assert [e.get("head") for e in evs] == [before.hex(), after.hex(), None]


def test_aborted_transaction_leaves_no_event(tmp_repo: Repository) -> None:
    log = tmp_repo.events
    before = log.last_seq()
    with pytest.raises(RuntimeError), tmp_repo.store.write() as w:
        log.append("create", w, branch="main", path="x")
        raise RuntimeError("the change failed")
    assert log.last_seq() == before
    assert list(log.read(before)) == []


def test_non_utf8_path_round_trips(tmp_repo: Repository) -> None:
    raw = b"caf\xe9 \xff.csv"
    seq = tmp_repo.events.append("create", branch="main", path=os.fsdecode(raw))
    (ev,) = tmp_repo.events.read(seq - 1)
    assert os.fsencode(ev["path"]) == raw


def test_event_json_is_valid_utf8_even_for_non_utf8_paths() -> None:
    raw = b"caf\xe9.csv"
    body = encode({"seq": 1, "type": "create", "path": os.fsdecode(raw)})
    ev = json.loads(body)  # what any webhook receiver or trigger script does
    assert os.fsencode(ev["path"]) == raw


def test_retention_max_events(tmp_repo: Repository) -> None:
    log = EventLog(tmp_repo.store, max_events=100)
    with tmp_repo.store.write() as w:
        for i in range(1030):
            log.append("create", w, branch="main", path=f"f{i}")
    # retention is amortised (first append of a process, then every 1,024): at most
    # 1,024 events beyond the bound remain until the next trim
    evs = list(log.read(0))
    assert evs[-1]["seq"] == 1030
    assert 100 <= len(evs) <= 100 + 1024
    with tmp_repo.store.write() as w:
        log.trim(w)
    assert [e["seq"] for e in log.read(0)] == list(range(931, 1031))
    # a consumer that fell behind sees the gap: its first event is later than asked
    c = Consumer(log, "slow")
    assert c.poll(1)[0]["seq"] == 931


def test_retention_max_age(tmp_repo: Repository) -> None:
    log = EventLog(tmp_repo.store, max_age_s=0.3)
    for i in range(3):
        log.append("create", branch="main", path=f"old{i}")
    time.sleep(0.4)
    new = log.append("create", branch="main", path="new")
    assert [e["seq"] for e in log.read(0)] == [new]  # the append dropped the old ones
    with tmp_repo.store.write() as w:
        assert log.trim(w) == 0


def test_retention_applies_across_short_lived_processes(tmp_repo: Repository) -> None:
    for i in range(300):  # like 300 `jiaozifuse commit` runs: a new EventLog each time
        EventLog(tmp_repo.store, max_events=50).append("commit", branch="main", path=f"{i}")
    assert len(list(tmp_repo.events.read(0))) <= 100


def test_retention_max_age_without_heavy_traffic(tmp_repo: Repository) -> None:
    log = EventLog(tmp_repo.store, max_age_s=0.2)
    for i in range(3):
        log.append("create", branch="main", path=f"old{i}")
    time.sleep(0.3)
    new = log.append("create", branch="main", path="new")
    assert [e["seq"] for e in log.read(0)] == [new]


def test_retention_from_config(tmp_path: Path) -> None:
    Repository.init(tmp_path / "r").close()
    cfg = tmp_path / "r" / "config.json"
    doc = json.loads(cfg.read_text())
    doc["events"] = {"max_events": 7, "max_age_s": 60}
    cfg.write_text(json.dumps(doc))
    with Repository.open(tmp_path / "r") as repo:
        assert (repo.events.max_events, repo.events.max_age_s) == (7, 60.0)
        assert repo.events.enabled


# ---------------------------------------------------------------------- Consumer


def test_consumer_at_least_once_across_restart(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r")
    base = repo.events.last_seq()
    for i in range(5):
        repo.events.append("create", branch="main", path=f"f{i}")
    c = Consumer(repo.events, "worker")
    got = c.poll()
    assert [e["path"] for e in got] == [f"f{i}" for i in range(5)]
    assert [e["seq"] for e in c.poll()] == [e["seq"] for e in got]  # not acked: again
    c.ack(got[0])
    c.ack(got[1]["seq"])
    assert [e["path"] for e in c.poll()] == ["f2", "f3", "f4"]
    repo.close()  # "crash" with f2..f4 handled but not acknowledged

    repo = Repository.open(tmp_path / "r")
    c2 = Consumer(repo.events, "worker")
    assert [e["path"] for e in c2.poll()] == ["f2", "f3", "f4"]
    assert repo.events.offset("worker") == base + 2
    # acknowledging an older event does not move the offset back
    c2.ack(got[4])
    repo.events.ack("worker", got[0]["seq"])
    assert repo.events.offset("worker") == got[4]["seq"]
    assert c2.poll() == []
    # consumers are independent; an unknown one starts at the beginning
    other = Consumer(repo.events, "other")
    assert len(other.poll()) == len(list(repo.events.read(0)))
    assert repo.events.consumers() == {"worker": got[4]["seq"]}
    repo.close()


# ---------------------------------------------------------------------- rules


def rules(text: str) -> list[Rule]:
    return parse_rules(textwrap.dedent(text))


def test_rules_parse() -> None:
    rs = rules("""
        [[trigger]]
        name = "retrain"
        on = ["commit"]
        branches = ["main"]
        paths = ["data/**"]
        run = ["python3", "train.py", "--fast"]
        timeout = 600
        retries = 3

        [[trigger]]
        name = "notify"
        on = "tag_create"
        webhook = "http://127.0.0.1:8080/hook"
        secret_env = "MY_SECRET"
        """)
    assert [r.name for r in rs] == ["retrain", "notify"]
    assert rs[0].run == ("python3", "train.py", "--fast") and rs[0].timeout == 600
    assert rs[0].retries == 3 and rs[0].branches == ("main",)
    assert rs[1].on == ("tag_create",) and rs[1].webhook.endswith("/hook")
    assert rs[1].secret_env == "MY_SECRET" and rs[1].run == ()
    assert rules("") == []


@pytest.mark.parametrize(("text", "message"), [
    ("[[trigger]\nname = 'x'", "not valid TOML"),
    ("[trigger]\nname = 'x'", "must be an array of tables"),
    ("[[trigger]]\nname='a'\non=['commit']\nrun='make all'", "not a shell string"),
    ("[[trigger]]\nname='a'\non=['commit']\nrun=['true']\nwebhook='http://h/'",
     "exactly one of 'run'"),
    ("[[trigger]]\nname='a'\non=['commit']", "exactly one of 'run'"),
    ("[[trigger]]\nname='a'\non=['commit']\nrun=['true']\ncommand='x'",
     "unknown key(s) command"),
    ("[[trigger]]\nname='a'\nrun=['true']", "'on' lists no event types"),
    ("[[trigger]]\nname='a'\non=['commit']\nrun=['true']\npaths=[1]",
     "'paths' must be a string or a list of strings"),
    ("[[trigger]]\nname='a'\non=['commit']\nrun=['true']\nbranches={x=1}",
     "'branches' must be a string or a list of strings"),
    ("[[trigger]]\nname='a'\non=['commit']\nwebhook='ftp://h/'", "http(s) URL"),
    ("[[trigger]]\nname='a'\non=['commit']\nrun=['true']\ntimeout=0", "'timeout'"),
    ("[[trigger]]\nname='a'\non=['commit']\nrun=['true']\nretries=-1", "'retries'"),
    ("[[trigger]]\nname='a'\non=['commit']\nrun=['true']\n"
     "[[trigger]]\nname='a'\non=['commit']\nrun=['true']", "unique"),
])
def test_rules_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(JiaoziError) as ei:
        parse_rules(text)
    msg = str(ei.value)
    assert message in msg
    assert msg.startswith(".jiaozi/triggers.toml")
    assert "\n" not in msg
    if "name='a'" in text and message != "unique":
        assert "'a'" in msg  # names the trigger


def test_rules_unknown_event_type_is_an_error() -> None:
    with pytest.raises(JiaoziError, match="comit"):
        parse_rules("[[trigger]]\nname='a'\non=['comit']\nrun=['true']")


def test_rules_absolute_glob_is_an_error_or_matches() -> None:
    try:
        (r,) = parse_rules("[[trigger]]\nname='a'\non=['commit']\nrun=['true']\n"
                           "paths=['/data/**']")
    except JiaoziError:
        return
    assert r.matches({"type": "commit", "branch": "main", "paths": ["data/x.csv"]})


@pytest.mark.parametrize(("glob", "path", "hit"), [
    ("data/**", "data/a/b.csv", True),
    ("data/**", "data/x", True),
    ("data/**", "database/x", False),
    ("data/**", "other/data/x", False),
    ("*.csv", "a.csv", True),
    ("*.csv", "a/b.csv", False),
    ("**/*.csv", "b.csv", True),
    ("**/*.csv", "a/b/c.csv", True),
    ("**/*.csv", "a/b/c.tsv", False),
    ("data/*.csv", "data/a.csv", True),
    ("data/*.csv", "data/sub/a.csv", False),
    ("data/?.csv", "data/a.csv", True),
    ("data/?.csv", "data/ab.csv", False),
    ("data/?", "data//", False),
    ("a.b", "aXb", False),  # regex characters are literal
    ("x[1]", "x[1]", True),
    ("data/**", "data/line\nbreak", True),
])
def test_glob_semantics(glob: str, path: str, hit: bool) -> None:
    assert bool(glob_to_regex(glob).fullmatch(path)) is hit


def test_rule_matching() -> None:
    (r,) = rules("""
        [[trigger]]
        name = "t"
        on = ["commit", "move"]
        branches = ["main", "release-*"]
        paths = ["data/**"]
        run = ["true"]
        """)
    assert r.matches({"type": "commit", "branch": "main", "paths": ["x", "data/a/b.csv"]})
    assert r.matches({"type": "commit", "branch": "release-2", "paths": ["data/a"]})
    assert not r.matches({"type": "commit", "branch": "main", "paths": ["other/a"]})
    assert not r.matches({"type": "commit", "branch": "exp", "paths": ["data/a"]})
    assert not r.matches({"type": "close_write", "branch": "main", "path": "data/a"})
    # a move out of data/ is a change to data/
    assert r.matches({"type": "move", "branch": "main", "path": "x", "old_path": "data/a"})
    (anyr,) = rules("[[trigger]]\nname='t'\non=['tag_create']\nrun=['true']")
    assert anyr.matches({"type": "tag_create", "tag": "v1"})


# ---------------------------------------------------------------------- signatures


def test_signatures() -> None:
    body = b'{"seq":1,"type":"commit"}'
    header = sign(b"s3cret", body)
    assert verify_signature(b"s3cret", body, header)
    assert not verify_signature(b"s3cret", body + b" ", header)
    assert not verify_signature(b"s3cret", body.replace(b"1", b"2"), header)
    assert not verify_signature(b"wrong", body, header)
    stale = sign(b"s3cret", body, timestamp=int(time.time()) - 3600)
    assert not verify_signature(b"s3cret", body, stale)
    assert verify_signature(b"s3cret", body, stale, tolerance_s=7200)
    ts = header.split(",")[0]
    for bad in ("", "garbage", ts, "t=x,v1=00", header.replace("v1=", "v1=0")):
        assert not verify_signature(b"s3cret", body, bad)


# ---------------------------------------------------------------------- execution


def test_execute_retries_with_backoff(tmp_path: Path) -> None:
    script = "import sys; print('out-line'); print('err-line', file=sys.stderr); sys.exit(3)"
    rule = Rule("bad", ("commit",), run=(sys.executable, "-c", script), retries=3)
    delays: list[float] = []
    res = triggers.execute(rule, {"seq": 1, "type": "commit"}, str(tmp_path),
                           sleep=delays.append, base_delay=0.5)
    assert not res.ok and res.attempts == 4 and res.exit_code == 3
    assert delays == [0.5, 1.0, 2.0]
    assert "out-line" in res.output and "err-line" in res.output
    assert res.error == "exit status 3"
    ok = Rule("ok", ("commit",), run=(sys.executable, "-c", "pass"), retries=3)
    delays.clear()
    res = triggers.execute(ok, {"seq": 1}, str(tmp_path), sleep=delays.append)
    assert res.ok and res.attempts == 1 and delays == []


def test_retry_backoff_is_capped(tmp_path: Path) -> None:
    rule = parse_rules("[[trigger]]\nname='w'\non=['commit']\nrun=['false']\nretries=20")[0]
    delays: list[float] = []
    triggers.execute(rule, {"seq": 1}, str(tmp_path), sleep=delays.append)
    assert len(delays) == 20
    assert max(delays) <= 600 and sum(delays) <= 3 * 3600


def test_execute_timeout_and_missing_program(tmp_path: Path) -> None:
    slow = Rule("slow", ("commit",), run=("sleep", "5"), timeout=0.3, retries=0)
    t0 = time.monotonic()
    res = triggers.execute(slow, {"seq": 1}, str(tmp_path))
    assert not res.ok and "timed out" in res.error and time.monotonic() - t0 < 3
    missing = Rule("m", ("commit",), run=("/nonexistent/prog",), retries=0)
    res = triggers.execute(missing, {"seq": 1}, str(tmp_path))
    assert not res.ok and "/nonexistent/prog" in res.error


def test_webhook_without_secret_is_not_sent(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("NO_SUCH_SECRET_X", raising=False)
    rule = Rule("w", ("commit",), webhook="http://127.0.0.1:9/", secret_env="NO_SUCH_SECRET_X",
                retries=0)
    res = triggers.execute(rule, {"seq": 1}, str(tmp_path))
    assert not res.ok and "NO_SUCH_SECRET_X" in res.error


# ---------------------------------------------------------------------- runner (no mount)


RECORDER = """\
import json, os, sys
data = sys.stdin.buffer.read()
rec = {"stdin": data.decode("utf-8", "surrogateescape"),
       "env": {k: v for k, v in os.environ.items() if k.startswith("JIAOZI_")}}
with open(sys.argv[1], "a", encoding="utf-8", errors="surrogateescape") as f:
    f.write(json.dumps(rec) + "\\n")
"""


def _setup_runner_repo(tmp_path: Path, rules_text: str) -> tuple[Path, Path]:
    """A repository whose main branch commits *rules_text*; returns (repo, records file)."""
    (tmp_path / "rec.py").write_text(RECORDER)
    out = tmp_path / "runs.jsonl"
    text = rules_text.replace("@REC@", json.dumps([sys.executable, str(tmp_path / "rec.py"),
                                                   str(out)]))
    src = tmp_path / "src"
    (src / ".jiaozi").mkdir(parents=True)
    (src / ".jiaozi" / "triggers.toml").write_text(textwrap.dedent(text))
    repo = Repository.init(tmp_path / "r")
    repo.import_dir("main", src)
    repo.commit("main", "rules")
    repo.close()
    return tmp_path / "r", out


def _runs(out: Path) -> list[dict]:
    if not out.exists():
        return []
    recs = [json.loads(line) for line in out.read_text(errors="surrogateescape").splitlines()]
    for r in recs:
        r["event"] = json.loads(r["stdin"].encode("utf-8", "surrogateescape"))
    return recs


def _import(repo: Repository, branch: str, files: dict[str, bytes], tmp: Path) -> None:
    src = tmp / f"imp-{time.monotonic_ns()}"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    repo.import_dir(branch, src)


def test_triggers_run_without_daemon(tmp_path: Path) -> None:
    rpath, out = _setup_runner_repo(tmp_path, """
        [[trigger]]
        name = "rec"
        on = ["commit"]
        branches = ["main"]
        paths = ["data/**"]
        run = @REC@
        """)
    with Repository.open(rpath) as repo:
        _import(repo, "main", {"data/a.csv": b"1"}, tmp_path)
        c1 = repo.commit("main", "data").hex()
        _import(repo, "main", {"other/b": b"2"}, tmp_path)
        repo.commit("main", "other")
        repo.create_branch("exp")
        _import(repo, "exp", {"data/c.csv": b"3"}, tmp_path)
        repo.commit("exp", "exp data")
    r = jz("--repo", str(rpath), "triggers", "run", "--json")
    assert json.loads(r.stdout)["handled"] >= 5
    runs = _runs(out)
    assert [x["env"]["JIAOZI_COMMIT"] for x in runs] == [c1]
    assert runs[0]["event"]["paths"] == ["data/a.csv"]
    assert runs[0]["env"]["JIAOZI_REPO"] == str(rpath)
    # handled events are not run again
    jz("--repo", str(rpath), "triggers", "run")
    assert len(_runs(out)) == 1
    st = json.loads(jz("--repo", str(rpath), "triggers", "status", "--json").stdout)
    assert st["offset"] == st["last_seq"]
    assert [(x["trigger"], x["ok"], x["exit_code"]) for x in st["runs"]] == [("rec", True, 0)]


def test_trigger_on_tag_create_runs(tmp_path: Path) -> None:
    rpath, out = _setup_runner_repo(tmp_path, """
        [[trigger]]
        name = "release"
        on = ["tag_create"]
        run = @REC@
        """)
    jz("--repo", str(rpath), "tag", "create", "v1")
    jz("--repo", str(rpath), "triggers", "run")
    assert [x["event"]["type"] for x in _runs(out)] == ["tag_create"]


def test_path_filtered_trigger_sees_merges(tmp_path: Path) -> None:
    rpath, out = _setup_runner_repo(tmp_path, """
        [[trigger]]
        name = "retrain"
        on = ["commit", "merge"]
        branches = ["main"]
        paths = ["data/**"]
        run = @REC@
        """)
    with Repository.open(rpath) as repo:
        repo.create_branch("exp")
        _import(repo, "exp", {"data/new.csv": b"1"}, tmp_path)
        repo.commit("exp", "exp data")
        repo.merge("exp", "main")
    jz("--repo", str(rpath), "triggers", "run")
    assert [x["event"]["type"] for x in _runs(out)] == ["merge"]


def test_broken_rules_file_is_reported_by_check(tmp_path: Path) -> None:
    rpath, _ = _setup_runner_repo(tmp_path, "[[trigger]]\nname='x'\non=['commit']\n"
                                  "run='echo hi'\n")
    r = jz("--repo", str(rpath), "triggers", "check", check=False)
    assert r.returncode == 1
    err = r.stderr.strip()
    assert "\n" not in err and "not a shell string" in err and "triggers.toml" in err


def test_decode_encode_round_trip() -> None:
    ev = {"seq": 3, "type": "move", "path": "ü/ä b", "old_path": 'q"\n`$(x)`'}
    assert decode(encode(ev)) == ev


def _many_events(tmp_path: Path, n: int) -> Path:
    repo = Repository.init(tmp_path / "r")
    with repo.store.write() as w:
        for i in range(n):
            repo.events.append("create", w, branch="main", path=f"f{i}", size=i)
    repo.close()
    return tmp_path / "r"


def test_events_tail_cli_small(tmp_path: Path) -> None:
    rpath = _many_events(tmp_path, 30)
    lines = jz("--repo", str(rpath), "events", "tail", "-n", "5", "--json").stdout.splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [26, 27, 28, 29, 30]
    lines = jz("--repo", str(rpath), "events", "tail", "--since", "27", "--json"
               ).stdout.splitlines()
    assert [json.loads(x)["path"] for x in lines] == ["f27", "f28", "f29"]
    human = jz("--repo", str(rpath), "events", "tail", "-n", "1").stdout
    assert "create" in human and "main" in human and "f29" in human and "30" in human
    assert jz("--repo", str(rpath), "events", "tail", "-n", "0").stdout == ""


def test_events_tail_cli_more_than_1000(tmp_path: Path) -> None:
    rpath = _many_events(tmp_path, 1500)
    n = jz("--repo", str(rpath), "events", "tail", "-n", "1500", "--json").stdout
    since = jz("--repo", str(rpath), "events", "tail", "--since", "0", "--json").stdout
    assert (len(n.splitlines()), len(since.splitlines())) == (1500, 1500)
