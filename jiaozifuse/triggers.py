"""Triggers: rules, versioned with the data, that turn events into work.

Rules live in ``.jiaozi/triggers.toml`` on a branch; the version committed on
the branch's head when an event happens is the one in force for it (an
uncommitted edit does nothing until it is committed, so a rule change is
itself reviewed and versioned; each event records that head)::

    [[trigger]]
    name = "retrain"
    on = ["commit"]              # event types; "pre_commit" runs before a commit
    branches = ["main"]          # globs on the branch name (default: every branch)
    paths = ["data/**"]          # globs on the event's path(s) (default: any)
    run = ["python3", "train.py", "--fast"]   # an argv list, never a shell string
    timeout = 600                # seconds (default 300)
    retries = 3                  # extra attempts, with exponential backoff

    [[trigger]]
    name = "notify"
    on = ["commit", "tag_create"]
    webhook = "http://127.0.0.1:8080/hook"
    secret_env = "JIAOZIFUSE_WEBHOOK_SECRET"  # where the HMAC key comes from

A command gets the event as JSON on stdin and in ``JIAOZI_EVENT``, plus
``JIAOZI_EVENT_TYPE``, ``JIAOZI_BRANCH``, ``JIAOZI_PATH``, ``JIAOZI_OLD_PATH``,
``JIAOZI_COMMIT``, ``JIAOZI_SEQ`` and ``JIAOZI_REPO``: paths reach it only as
data, never through a shell.  A webhook gets the event as a JSON POST with
``X-Jiaozi-Signature: t=UNIX,v1=HEX``, HEX being HMAC-SHA256 of ``"UNIX." +
body`` under the secret; receivers check it with :func:`verify_signature`.

Delivery is at-least-once: the runner is the event log's consumer
``triggers``; an event is acknowledged only after every matching trigger ran
(successfully, or failed after its retries, which is recorded), so a daemon
killed with a trigger pending runs it after restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import subprocess
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from .errors import Corrupt, JiaoziError, NotFound
from .events import FS_TYPES, REPO_TYPES, EventLog, encode

log = logging.getLogger("jiaozifuse.triggers")

RULES_PATH = ".jiaozi/triggers.toml"
KNOWN_TYPES = (*FS_TYPES, *REPO_TYPES, "pre_commit")
#: The longest wait between two attempts of a failing trigger.
MAX_BACKOFF_S = 60.0
CONSUMER = "triggers"
OUTPUT_TAIL = 4096
SIGNATURE_HEADER = "X-Jiaozi-Signature"


@dataclass
class Rule:
    name: str
    on: tuple[str, ...]
    branches: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    run: tuple[str, ...] = ()
    webhook: str = ""
    secret_env: str = "JIAOZIFUSE_WEBHOOK_SECRET"
    timeout: float = 300.0
    retries: int = 2
    _branch_re: list[re.Pattern] = field(default_factory=list, repr=False)
    _path_re: list[re.Pattern] = field(default_factory=list, repr=False)

    def matches(self, event: dict[str, Any]) -> bool:
        if event.get("type") not in self.on:
            return False
        branch = event.get("branch") or ""
        if self._branch_re and not any(r.fullmatch(branch) for r in self._branch_re):
            return False
        if self._path_re:
            paths = list(event.get("paths") or [])
            for k in ("path", "old_path"):
                if event.get(k):
                    paths.append(event[k])
            if not any(r.fullmatch(p) for r in self._path_re for p in paths):
                return False
        return True


def glob_to_regex(glob: str) -> re.Pattern:
    """``**`` crosses directories, ``*`` and ``?`` do not; ``dir/**`` matches below dir."""
    out = []
    i = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        out.append("[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def parse_rules(text: str, source: str = RULES_PATH) -> list[Rule]:
    """Parse a rules file; any mistake is a clear JiaoziError naming the trigger."""
    try:
        doc = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise JiaoziError(f"{source}: not valid TOML: {exc}") from None
    items = doc.get("trigger", [])
    if not isinstance(items, list):
        raise JiaoziError(f"{source}: 'trigger' must be an array of tables ([[trigger]])")
    rules = []
    seen = set()
    for i, item in enumerate(items):
        where = f"{source}: trigger #{i + 1}"
        if not isinstance(item, dict):
            raise JiaoziError(f"{where}: not a table")
        name = item.get("name", f"trigger-{i + 1}")
        if not isinstance(name, str) or not name or name in seen:
            raise JiaoziError(f"{where}: 'name' must be a unique, non-empty string")
        seen.add(name)
        where = f"{source}: trigger {name!r}"
        unknown = set(item) - {"name", "on", "branches", "paths", "run", "webhook",
                               "secret_env", "timeout", "retries"}
        if unknown:
            raise JiaoziError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")

        def strings(key: str, item: dict = item, where: str = where) -> tuple[str, ...]:
            v = item.get(key, [])
            if isinstance(v, str):
                v = [v]
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise JiaoziError(f"{where}: {key!r} must be a string or a list of strings")
            return tuple(v)

        on = strings("on")
        if not on:
            raise JiaoziError(f"{where}: 'on' lists no event types")
        unknown_types = [t for t in on if t not in KNOWN_TYPES]
        if unknown_types:
            raise JiaoziError(f"{where}: unknown event type(s) {', '.join(unknown_types)}; "
                              f"known: {', '.join(KNOWN_TYPES)}")
        if any(g.startswith("/") for g in strings("paths")):
            raise JiaoziError(f"{where}: 'paths' globs are relative to the branch root "
                              "(no leading '/')")
        run = strings("run")
        webhook = item.get("webhook", "")
        if bool(run) == bool(webhook):
            raise JiaoziError(f"{where}: give exactly one of 'run' (an argv list) or 'webhook'")
        if "run" in item and isinstance(item["run"], str):
            raise JiaoziError(f"{where}: 'run' must be an argv list, not a shell string")
        if webhook and not (isinstance(webhook, str) and webhook.startswith(("http://",
                                                                             "https://"))):
            raise JiaoziError(f"{where}: 'webhook' must be an http(s) URL")
        timeout = item.get("timeout", 300)
        retries = item.get("retries", 2)
        if not isinstance(timeout, int | float) or timeout <= 0:
            raise JiaoziError(f"{where}: 'timeout' must be a positive number of seconds")
        if not isinstance(retries, int) or not 0 <= retries <= 20:
            raise JiaoziError(f"{where}: 'retries' must be an integer from 0 to 20")
        secret_env = item.get("secret_env", "JIAOZIFUSE_WEBHOOK_SECRET")
        if not isinstance(secret_env, str):
            raise JiaoziError(f"{where}: 'secret_env' must be a string")
        rule = Rule(name, on, strings("branches"), strings("paths"), run, webhook or "",
                    secret_env, float(timeout), retries)
        rule._branch_re = [glob_to_regex(g) for g in rule.branches]
        rule._path_re = [glob_to_regex(g) for g in rule.paths]
        rules.append(rule)
    return rules


def rules_at(repo: Any, commit: bytes) -> list[Rule]:
    """The rules committed in *commit* (none if it has no rules file)."""
    try:
        entry = repo.tree_entry(commit, RULES_PATH)
    except NotFound:
        return []
    if entry is None or not entry.is_file:
        return []
    data = repo.file_content(entry.ref).read(0, 1 << 20)
    return parse_rules(data.decode("utf-8", "replace"), f"{RULES_PATH} at {commit.hex()[:12]}")


# ----------------------------------------------------------------- execution


@dataclass
class Result:
    ok: bool
    attempts: int
    exit_code: int | None = None
    output: str = ""
    duration_s: float = 0.0
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "attempts": self.attempts, "exit_code": self.exit_code,
                "output_tail": self.output[-OUTPUT_TAIL:], "duration_s": self.duration_s,
                "error": self.error}


def event_env(event: dict[str, Any], repo_path: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "JIAOZI_EVENT": encode(event).decode("utf-8", "surrogateescape"),
        "JIAOZI_EVENT_TYPE": str(event.get("type", "")),
        "JIAOZI_BRANCH": str(event.get("branch") or ""),
        "JIAOZI_PATH": str(event.get("path") or ""),
        "JIAOZI_OLD_PATH": str(event.get("old_path") or ""),
        "JIAOZI_COMMIT": str(event.get("commit") or ""),
        "JIAOZI_SEQ": str(event.get("seq") or ""),
        "JIAOZI_REPO": repo_path,
    })
    return env


def sign(secret: bytes, body: bytes, timestamp: int | None = None) -> str:
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


def verify_signature(secret: bytes, body: bytes, header: str, tolerance_s: float = 300) -> bool:
    """Check a webhook's signature header (constant time; rejects stale timestamps)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        ts = int(parts["t"])
        want = parts["v1"]
    except (ValueError, KeyError):
        return False
    if abs(time.time() - ts) > tolerance_s:
        return False
    mac = hmac.new(secret, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(mac, want)


def execute_once(rule: Rule, event: dict[str, Any], repo_path: str) -> Result:
    start = time.monotonic()
    body = encode(event)
    if rule.run:
        try:
            proc = subprocess.run(
                list(rule.run), input=body, capture_output=True, timeout=rule.timeout,
                env=event_env(event, repo_path), cwd=repo_path, check=False,
            )
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"") + (exc.stderr or b"")
            return Result(False, 1, None, out.decode(errors="replace"),
                          time.monotonic() - start, f"timed out after {rule.timeout:g} s")
        except OSError as exc:
            return Result(False, 1, None, "", time.monotonic() - start,
                          f"cannot run {rule.run[0]!r}: {exc.strerror}")
        out = (proc.stdout + proc.stderr).decode(errors="replace")
        return Result(proc.returncode == 0, 1, proc.returncode, out,
                      time.monotonic() - start,
                      "" if proc.returncode == 0 else f"exit status {proc.returncode}")
    secret = os.environ.get(rule.secret_env)
    if not secret:
        return Result(False, 1, None, "", 0.0,
                      f"no webhook secret in ${rule.secret_env}: refusing to send unsigned")
    req = urllib.request.Request(rule.webhook, data=body, method="POST", headers={
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(secret.encode(), body),
        "User-Agent": "jiaozifuse-trigger",
    })
    try:
        with urllib.request.urlopen(req, timeout=rule.timeout) as resp:
            text = resp.read(OUTPUT_TAIL).decode(errors="replace")
            return Result(200 <= resp.status < 300, 1, resp.status, text,
                          time.monotonic() - start)
    except urllib.error.HTTPError as exc:
        return Result(False, 1, exc.code, "", time.monotonic() - start, f"HTTP {exc.code}")
    except (urllib.error.URLError, OSError) as exc:
        return Result(False, 1, None, "", time.monotonic() - start, f"unreachable: {exc}")


def execute(rule: Rule, event: dict[str, Any], repo_path: str,
            sleep: Any = time.sleep, base_delay: float = 1.0) -> Result:
    """Run with retries and exponential backoff (1 s, 2 s, 4 s ...)."""
    result = Result(False, 0)
    for attempt in range(rule.retries + 1):
        result = execute_once(rule, event, repo_path)
        result.attempts = attempt + 1
        if result.ok:
            return result
        if attempt < rule.retries:
            sleep(min(MAX_BACKOFF_S, base_delay * (2 ** attempt)))
    return result


# -------------------------------------------------------------------- runner


def record(repo: Any, event: dict[str, Any], rule: Rule, result: Result) -> None:
    doc = {"event_seq": event["seq"], "event_type": event["type"],
           "branch": event.get("branch"), "trigger": rule.name,
           "time_ns": time.time_ns(), **result.as_dict()}
    key = f"trigger_run/{event['seq']:016d}/{rule.name}".encode()
    with repo.store.write() as w:
        w.put("meta", key, json.dumps(doc).encode())


def history(repo: Any, limit: int = 50) -> list[dict[str, Any]]:
    with repo.store.read() as r:
        rows = [json.loads(bytes(v)) for _, v in r.prefix("meta", b"trigger_run/")]
    return rows[-limit:]


class Runner:
    """Matches events against the rules of their branch and runs the triggers."""

    def __init__(self, repo: Any) -> None:
        self.repo = repo
        self.log: EventLog = repo.events
        self._rules: dict[bytes, list[Rule]] = {}

    def rules_for(self, branch: str | None, head: bytes | None = None) -> list[Rule]:
        """The rules in force on *branch* when an event happened: those committed
        in *head*, the branch's head then (recorded with the event), not its head
        when the runner gets to it.  While a slow trigger keeps the runner busy,
        a write made before a rules commit must not run the rule that commit
        adds.  Without a recorded head (or if it has been collected since), the
        branch's head now."""
        if not branch:
            return []
        if head is not None and head not in self._rules and not self._exists(head):
            head = None
        if head is None:
            try:
                head = self.repo.head(branch)
            except NotFound:
                return []
        rules = self._rules.get(head)
        if rules is None:
            if len(self._rules) >= 256:  # one entry per head seen: keep it bounded
                self._rules.clear()
            try:
                rules = rules_at(self.repo, head)
            except (JiaoziError, Corrupt) as exc:
                log.error("branch %s: %s", branch, exc)
                rules = []
            self._rules[head] = rules
        return rules

    def _exists(self, commit: bytes) -> bool:
        try:
            self.repo.get_commit(commit)
            return True
        except (NotFound, Corrupt):
            return False

    def pending(self, limit: int = 100) -> list[tuple[dict[str, Any], list[Rule]]]:
        out = []
        for ev in self.log.read(self.log.offset(CONSUMER), limit):
            if ev.get("branch"):
                head = ev.get("head")
                rules = self.rules_for(ev["branch"], bytes.fromhex(head) if head else None)
            else:  # events of no branch (tags): the default branch's rules now
                rules = self.rules_for(self.repo.default_branch)
            out.append((ev, [r for r in rules if r.matches(ev)]))
        return out

    def run_once(self, limit: int = 100) -> int:
        """Run what is pending, in this thread; returns events handled."""
        n = 0
        for ev, rules in self.pending(limit):
            for rule in rules:
                result = execute(rule, ev, str(self.repo.path))
                record(self.repo, ev, rule, result)
                if not result.ok:
                    log.warning("trigger %s failed for event %d: %s", rule.name, ev["seq"],
                                result.error)
            self.log.ack(CONSUMER, ev["seq"])
            n += 1
        return n


def pre_commit_jobs(repo: Any, branch: str, paths: list[str]
                    ) -> list[tuple[Rule, dict[str, Any]]]:
    """The branch's pre_commit triggers that match this change (store reads only)."""
    event = {"seq": 0, "time_ns": time.time_ns(), "type": "pre_commit", "branch": branch,
             "paths": paths}
    return [(rule, event) for rule in Runner(repo).rules_for(branch) if rule.matches(event)]


def check_pre_commit(rule: Rule, event: dict[str, Any], repo_path: str) -> None:
    """Run one pre_commit trigger (blocking, any thread); a failure refuses the commit."""
    result = execute_once(rule, event, repo_path)  # a verdict, not retried
    if not result.ok:
        tail = result.output.strip().splitlines()[-1:] or [""]
        why = f": {tail[0][:300]}" if tail[0] else ""
        raise JiaoziError(f"pre-commit trigger {rule.name!r} refused the commit "
                          f"({result.error}){why}")


def run_pre_commit(repo: Any, branch: str, paths: list[str]) -> None:
    """Run the branch's pre_commit triggers here; a failure refuses the commit."""
    for rule, event in pre_commit_jobs(repo, branch, paths):
        check_pre_commit(rule, event, str(repo.path))
