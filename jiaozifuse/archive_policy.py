"""Archive policy: the daemon archives to Filecoin in the background, like the S3 write-back.

The repository's ``config.json`` may say which refs are archived by themselves::

    "archive": {
      "command": ["deal-client", "--flag"],          # for the command onramp
      "policy": {
        "branches": ["main", "release-*"],           # every commit on these (globs)
        "tags": true,                                # every tag (or a list of globs)
        "min_bytes": "1GiB",                         # wait until this much changed
        "onramp": "manifest",                        # or "command"
        "out": "archive",                            # CAR directory (relative: to REPO)
        "target_size": "1GiB",
        "url_prefix": "https://cars.example/",
        "retry_max_s": 600
      }
    }

**The queue.** A *job* archives one ref: ``archive/job/<u64>`` in the store's
``meta`` database, JSON (ref, ref key, onramp arguments, attempts, next try,
last error, and the run it recorded but has not yet handed to the onramp).
The daemon's :func:`archive_loop` keeps the queue in step with the policy:
a matching branch or tag whose head is not the commit the archive last
recorded for it (``archive/ref/<ref>``, written by every run) gets a job,
unless it has one. Refs are durable, archived refs are durable, so a job
lost to a crash before it was written is derived again after the restart;
a job written is run again after the restart (packing starts over; a run
already recorded only has its pieces handed to the onramp again).

**Threads.** The trio thread owns the store's writes (the daemon's group
commit batch). A job's heavy parts run in a worker thread: packing CARs and
computing commitments (:func:`archive.pack_run`, reads from committed
snapshots only) and the onramp (:func:`archive.submit_pieces`, subprocesses).
Their results are recorded back on the trio thread in short transactions,
one per piece (:func:`archive.record_run`), with a checkpoint between them,
so FUSE requests keep being served for the whole run.

**Failures.** A policy job whose run fails (an onramp refuses a piece, the
output directory is unwritable, ...) stays queued and is tried again after
5 s, 10 s, 20 s, ... up to ``retry_max_s``. A job started by ``jiaozifuse
archive REF`` against a mounted repository runs here too (so that it never
blocks the mount), once: its outcome waits in its record for the CLI.

Without a daemon, ``jiaozifuse archive run-queue`` does the same work once,
in the CLI's process (:func:`drain`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import shlex
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

from . import archive as arc
from .errors import JiaoziError, NotFound
from .repo import Repository

log = logging.getLogger(__name__)

K_JOB = b"archive/job/"
_U64 = struct.Struct(">Q")
#: seconds before the first retry of a failed policy job; doubled per attempt
RETRY_MIN_S = 5.0
DEFAULT_RETRY_MAX_S = 600.0
#: finished jobs of ``archive REF`` nobody collected are dropped after this
FORGET_DONE_S = 24 * 3600
#: repository events after which the queue is looked at at once
WAKE_EVENTS = frozenset({"commit", "merge", "revert", "reset", "import", "tag_create",
                         "branch_create"})

T = TypeVar("T")


class PolicyError(JiaoziError):
    """``archive.policy`` in config.json is not usable; the message says where."""


# ------------------------------------------------------------------- policy


def parse_size(value: object, where: str) -> int:
    """``1073741824``, ``"512M"``, ``"1GiB"`` -> bytes."""
    if isinstance(value, bool):
        raise PolicyError(f"{where}: expected a size like 1073741824 or \"1GiB\"")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
        t = value.strip().lower().removesuffix("ib").removesuffix("b")
        unit = t[-1:] if t[-1:] in units and not t[-1:].isdigit() else ""
        try:
            n = int(float(t[: len(t) - len(unit)]) * units[unit])
        except ValueError:
            raise PolicyError(f"{where}: {value!r} is not a size (e.g. 512M, 32GiB)") from None
    else:
        raise PolicyError(f"{where}: expected a size like 1073741824 or \"1GiB\"")
    if n < 0:
        raise PolicyError(f"{where}: a size cannot be negative")
    return n


def _globs(value: object, where: str, allow_bool: bool) -> tuple[str, ...]:
    if allow_bool and isinstance(value, bool):
        return ("*",) if value else ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        kind = "true, false or a list" if allow_bool else "a list"
        raise PolicyError(f"{where}: expected {kind} of names or globs, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Policy:
    """Which refs the daemon archives, and how (see the module docstring)."""

    branches: tuple[str, ...]
    tags: tuple[str, ...]
    min_bytes: int
    onramp: str
    out: str
    target_size: int
    command: tuple[str, ...] | None
    url_prefix: str | None
    retry_max_s: float

    def matches(self, ref_key: str) -> bool:
        kind, _, name = ref_key.partition("/")
        globs = self.branches if kind == "branch" else self.tags if kind == "tag" else ()
        return any(fnmatch.fnmatchcase(name, g) for g in globs)

    def job_args(self) -> dict[str, Any]:
        """The onramp arguments a job keeps (a job runs as it was queued)."""
        return {"onramp": self.onramp, "out": self.out, "target_size": self.target_size,
                "command": list(self.command) if self.command else None,
                "url_prefix": self.url_prefix}

    def as_dict(self) -> dict[str, Any]:
        return {"branches": list(self.branches), "tags": list(self.tags),
                "min_bytes": self.min_bytes, **self.job_args(),
                "retry_max_s": self.retry_max_s}


_KEYS = {"branches", "tags", "min_bytes", "onramp", "out", "target_size", "url_prefix",
         "retry_max_s"}


def parse_policy(config: dict[str, Any], repo_path: Path) -> Policy | None:
    """The policy in a repository config (None when there is none)."""
    section = config.get("archive")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise PolicyError("config.json: archive must be an object")
    raw = section.get("policy")
    if raw is None:
        return None
    where = "config.json: archive.policy"
    if not isinstance(raw, dict):
        raise PolicyError(f"{where} must be an object, got {raw!r}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r} (known: "
                          f"{', '.join(sorted(_KEYS))})")
    branches = _globs(raw.get("branches", []), f"{where}.branches", allow_bool=False)
    tags = _globs(raw.get("tags", False), f"{where}.tags", allow_bool=True)
    if not branches and not tags:
        raise PolicyError(f"{where} archives nothing: give branches or tags")
    onramp = raw.get("onramp", "manifest")
    if onramp not in ("manifest", "command"):
        raise PolicyError(f"{where}.onramp: {onramp!r} is not an onramp (manifest or command)")
    command: tuple[str, ...] | None = None
    if onramp == "command":
        cmd = section.get("command")
        if isinstance(cmd, str):
            cmd = shlex.split(cmd)
        if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
            raise PolicyError("config.json: the command onramp needs archive.command "
                              "(the program and its arguments, a list)")
        command = tuple(cmd)
    out = raw.get("out", "archive")
    if not isinstance(out, str) or not out:
        raise PolicyError(f"{where}.out: expected a directory, got {out!r}")
    target = parse_size(raw.get("target_size", arc.DEFAULT_TARGET), f"{where}.target_size")
    try:
        arc.max_payload(target)
    except ValueError as exc:
        raise PolicyError(f"{where}.target_size: {exc}") from None
    url = raw.get("url_prefix")
    if url is not None and not isinstance(url, str):
        raise PolicyError(f"{where}.url_prefix: expected a URL, got {url!r}")
    retry = raw.get("retry_max_s", DEFAULT_RETRY_MAX_S)
    if isinstance(retry, bool) or not isinstance(retry, int | float) or retry < 1:
        raise PolicyError(f"{where}.retry_max_s: expected seconds (at least 1), got {retry!r}")
    return Policy(branches, tags, parse_size(raw.get("min_bytes", 0), f"{where}.min_bytes"),
                  onramp, os.path.abspath(repo_path / out), target, command, url or None,
                  float(retry))


def _read_config(repo_path: Path) -> dict[str, Any]:
    try:
        doc = json.loads((repo_path / "config.json").read_text())
    except OSError as exc:
        raise PolicyError(f"cannot read {repo_path / 'config.json'}: {exc.strerror}") from None
    except ValueError as exc:
        raise PolicyError(f"config.json is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PolicyError("config.json must hold an object")
    return doc


def load_policy(repo_path: Path) -> Policy | None:
    """The policy as config.json says now (the daemon's copy is from its start)."""
    return parse_policy(_read_config(repo_path), repo_path)


class PolicyWatcher:
    """Re-reads config.json when it changes; a bad policy is logged once per change."""

    def __init__(self, repo_path: Path) -> None:
        self.path = repo_path
        self._stamp: tuple[int, int] | None = None
        self.policy: Policy | None = None
        self.error: str | None = None

    def current(self) -> Policy | None:
        try:
            st = os.stat(self.path / "config.json")
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = (0, 0)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self.policy, self.error = load_policy(self.path), None
            except PolicyError as exc:
                self.policy, self.error = None, str(exc)
                log.error("archive policy disabled: %s", exc)
        return self.policy


# --------------------------------------------------------------------- jobs


def _job_key(job_id: int) -> bytes:
    return K_JOB + _U64.pack(job_id)


def jobs(repo: Repository) -> list[dict[str, Any]]:
    """Every job, oldest first (reads on the store's owner thread)."""
    with repo.store.read() as r:
        return [json.loads(v) for _, v in r.prefix("meta", K_JOB)]


def save_job(repo: Repository, job: dict[str, Any]) -> None:
    with repo.store.write() as w:
        w.put("meta", _job_key(job["id"]), json.dumps(job).encode())


def drop_job(repo: Repository, job_id: int) -> None:
    with repo.store.write() as w:
        w.delete("meta", _job_key(job_id))


def enqueue(repo: Repository, ref: str, ref_key: str | None, args: dict[str, Any],
            kind: str = "policy", commit: bytes | None = None) -> dict[str, Any]:
    """Queue a job (durable with the transaction, or the daemon's next group commit)."""
    with repo.store.write() as w:
        job_id = w.add_counter("archive_job", 1)
        job = {"id": job_id, "kind": kind, "ref": ref, "ref_key": ref_key,
               "commit": commit.hex() if commit else None, "args": args, "state": "queued",
               "queued_ns": time.time_ns(), "attempts": 0, "next_ns": 0, "error": None,
               "run": None}
        w.put("meta", _job_key(job_id), json.dumps(job).encode())
    return job


def candidates(repo: Repository, policy: Policy) -> list[tuple[str, bytes, bytes | None]]:
    """Refs the policy wants archived whose head is not archived and that have no job:
    ``(ref key, head, commit last archived for it)``."""
    queued = {j["ref_key"] for j in jobs(repo) if j["kind"] == "policy"}
    out = []
    with repo.store.read() as r:
        for prefix in (b"branch/", b"tag/"):
            for k, head in r.prefix("refs", prefix):
                key = bytes(k).decode()
                if key in queued or not policy.matches(key):
                    continue
                done = r.get("meta", arc.K_REF + bytes(k))
                if done is None or bytes(done) != bytes(head):
                    out.append((key, bytes(head), bytes(done) if done else None))
    return out


def changed_bytes(repo: Repository, archived: bytes | None, head: bytes) -> int:
    """Bytes of the files added or changed between the commit last archived for a
    ref and its head (all of them if it never was): what ``min_bytes`` weighs.
    Committed snapshots only, so a worker thread may compute it."""
    with repo.store.snapshot() as t:
        new_tree = repo.get_commit(head, t).tree
        old_tree = repo.get_commit(archived, t).tree if archived else None
        if old_tree is not None and t.get_object(old_tree) is None:
            old_tree = None
        return sum(c.size for c in repo._diff_trees(t, old_tree, new_tree)
                   if c.kind != "deleted")


def _backoff(attempts: int, cap: float) -> float:
    return min(cap, RETRY_MIN_S * 2 ** max(0, attempts - 1))


# ---------------------------------------------------------------- running


async def durable(repo: Repository) -> None:
    """Make the store's batch durable and visible to snapshot readers (worker threads)."""
    commit_async = getattr(repo.store, "commit_async", None)
    if commit_async is not None:
        await commit_async()
    else:
        repo.store.commit_batch()


async def ready(repo: Repository) -> None:
    """Wait, without blocking the trio thread, for a group commit in flight (a store
    with a commit thread makes the next read wait for it otherwise)."""
    ready_async = getattr(repo.store, "ready_async", None)
    if ready_async is not None:
        await ready_async()


async def _offload(fn: Callable[[], T], stop: threading.Event) -> T:
    """Run *fn* in a worker thread. Cancelled (the daemon stops), it asks *fn* to
    stop and waits for the thread to end, so the store is never closed under it."""
    exited = threading.Event()

    def work() -> T:
        try:
            return fn()
        finally:
            exited.set()

    try:
        return await trio.to_thread.run_sync(work, abandon_on_cancel=True)
    except trio.Cancelled:
        stop.set()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(exited.wait, 60.0)
        raise


class _Gone(NotFound):
    """The ref of a policy job was deleted: nothing left to archive."""


def _head_of(repo: Repository, job: dict[str, Any]) -> tuple[bytes, str | None]:
    key = job.get("ref_key")
    if key and job["kind"] == "policy":
        with repo.store.read() as r:
            head = r.get("refs", key.encode())
        if head is None:
            raise _Gone(f"{key} no longer exists")
        return bytes(head), key
    return arc.resolve_ref(repo, job["ref"])


async def run_job(repo: Repository, job: dict[str, Any],
                  retry_max_s: float = DEFAULT_RETRY_MAX_S) -> dict[str, Any]:
    """Run one job to its end; record the outcome in its record; return the record.

    Store writes happen here, on the calling (trio) thread; packing and the
    onramp run in a worker thread.
    """
    a = job["args"]
    stop = threading.Event()
    try:
        onramp = arc.make_onramp(a["onramp"], a["out"], a.get("command"), a.get("url_prefix"))
        limit = arc.payload_limit(int(a["target_size"]))
        with arc.run_lock(repo):
            if job.get("run"):
                packed = arc.recorded_run(repo, int(job["run"]), onramp)
            else:
                await ready(repo)
                head, ref_key = _head_of(repo, job)
                await durable(repo)  # the worker reads what is committed
                packed = await _offload(
                    lambda: arc.pack_run(repo, job["ref"], head, ref_key, onramp, limit,
                                         stop=stop), stop)
                await ready(repo)
                if not packed.nothing:
                    def mark(w: Any) -> None:
                        job["run"] = packed.run
                        w.put("meta", _job_key(job["id"]), json.dumps(job).encode())

                    for _ in arc.record_run(repo, packed, also=mark):
                        await trio.lowlevel.checkpoint()  # FUSE requests in between
                        await ready(repo)
                    await durable(repo)
            if packed.nothing:
                result = packed.result()
            else:
                def hand_over() -> list[dict[str, Any]]:
                    arc.publish_run(packed)
                    return arc.submit_pieces(onramp, packed.pieces, stop)

                replies = await _offload(hand_over, stop)
                await ready(repo)
                job["run"] = None
                result = arc.apply_replies(repo, packed, replies)
    except _Gone as exc:
        log.info("archive job %d dropped: %s", job["id"], exc)
        drop_job(repo, job["id"])
        return {**job, "state": "dropped", "error": str(exc)}
    except JiaoziError as exc:
        return _failed(repo, job, str(exc), retry_max_s)
    except Exception as exc:
        log.exception("archive job %d (%s) failed", job["id"], job["ref"])
        return _failed(repo, job, f"internal error: {exc}", retry_max_s)
    job.update(state="done", result=result, done_ns=time.time_ns(), run=None, error=None)
    if job["kind"] == "policy":  # the run's record is its history
        drop_job(repo, job["id"])
        log.info("archived %s: %s", job["ref"], result.get("message") or
                 f"run {result['run']}, {len(result['pieces'])} piece(s)")
    else:  # waits for the CLI that asked
        save_job(repo, job)
    await durable(repo)
    return job


def _failed(repo: Repository, job: dict[str, Any], error: str,
            retry_max_s: float) -> dict[str, Any]:
    job["attempts"] = int(job.get("attempts", 0)) + 1
    job["error"] = error
    # job["run"] stays set when the run was recorded but not handed over: the
    # next attempt publishes and submits it rather than packing anew.
    if job["kind"] == "policy":
        delay = _backoff(job["attempts"], retry_max_s)
        job["next_ns"] = time.time_ns() + int(delay * 1e9)
        log.warning("archive of %s failed (attempt %d, retrying in %.0f s): %s",
                    job["ref"], job["attempts"], delay, error)
    else:
        job.update(state="failed", done_ns=time.time_ns())
    save_job(repo, job)
    return job


def due(repo: Repository, ignore_backoff: bool = False) -> dict[str, Any] | None:
    now = time.time_ns()
    for j in jobs(repo):
        if j["state"] == "queued" and (ignore_backoff or j["next_ns"] <= now):
            return j
    return None


async def refill(repo: Repository, policy: Policy | None,
                 sizes: dict[str, tuple[bytes, int]] | None = None) -> list[dict[str, Any]]:
    """Queue a job for every ref the policy wants archived (see :func:`candidates`)."""
    if policy is None:
        return []
    sizes = {} if sizes is None else sizes
    new = []
    for key, head, archived in candidates(repo, policy):
        if policy.min_bytes and key.startswith("branch/"):
            hit = sizes.get(key)
            if hit is None or hit[0] != head:
                n = await trio.to_thread.run_sync(changed_bytes, repo, archived, head)
                sizes[key] = hit = (head, n)
            if hit[1] < policy.min_bytes:
                continue
        new.append(enqueue(repo, key.partition("/")[2], key, policy.job_args(), "policy",
                           head))
    if new:
        await durable(repo)
    return new


def _forget_old(repo: Repository) -> None:
    horizon = time.time_ns() - int(FORGET_DONE_S * 1e9)
    for j in jobs(repo):
        if j["state"] in ("done", "failed") and j.get("done_ns", 0) < horizon:
            drop_job(repo, j["id"])


_WAKERS: weakref.WeakKeyDictionary[Repository, Callable[[], None]] = (
    weakref.WeakKeyDictionary())


def wake(repo: Repository) -> None:
    """Tell the daemon's archive loop to look at the queue now (any thread)."""
    fn = _WAKERS.get(repo)
    if fn is not None:
        fn()


async def archive_loop(repo: Repository, interval: float = 1.0,
                       task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """The daemon's archive write-back: keep the queue filled per the policy and
    run its jobs one at a time, for as long as the daemon runs."""
    token = trio.lowlevel.current_trio_token()
    watcher = PolicyWatcher(repo.path)
    sizes: dict[str, tuple[bytes, int]] = {}
    woken = trio.Event()

    def poke() -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(lambda: woken.set())

    def on_event(type: str, **_fields: object) -> None:
        if type in WAKE_EVENTS:
            poke()

    _WAKERS[repo] = poke
    repo.listeners.append(on_event)
    task_status.started()
    try:
        n = 0
        while True:
            try:
                await ready(repo)
                policy = watcher.current()
                await refill(repo, policy, sizes)
                job = due(repo)
                if job is not None:
                    cap = policy.retry_max_s if policy else DEFAULT_RETRY_MAX_S
                    await run_job(repo, job, cap)
                    continue
                n += 1
                if n % 600 == 1:
                    _forget_old(repo)
            except trio.Cancelled:
                raise
            except Exception:
                log.exception("archive queue")
            woken = trio.Event()
            with trio.move_on_after(interval):
                await woken.wait()
    finally:
        with contextlib.suppress(ValueError):
            repo.listeners.remove(on_event)
        _WAKERS.pop(repo, None)


async def drain(repo: Repository) -> list[dict[str, Any]]:
    """Without a daemon: queue what the policy wants and run every queued job once
    (failed ones too, whatever their backoff): ``jiaozifuse archive run-queue``."""
    policy = load_policy(repo.path)
    await refill(repo, policy)
    done: list[dict[str, Any]] = []
    tried: set[int] = set()
    while True:
        job = next((j for j in jobs(repo) if j["state"] == "queued" and j["id"] not in tried),
                   None)
        if job is None:
            return done
        tried.add(job["id"])
        cap = policy.retry_max_s if policy else DEFAULT_RETRY_MAX_S
        done.append(await run_job(repo, job, cap))


# -------------------------------------------------------- control operations


def _queue_view(repo: Repository) -> list[dict[str, Any]]:
    out = []
    for j in jobs(repo):
        j = dict(j)
        j.pop("result", None)
        out.append(j)
    return out


def op_archive_submit(repo: Repository, ref: str, onramp: str = "manifest",
                      out: str | None = None, target_size: int = arc.DEFAULT_TARGET,
                      command: list[str] | None = None, url_prefix: str | None = None
                      ) -> dict[str, Any]:
    """``archive REF`` against a daemon: queue it (the CLI then polls the job)."""
    head, ref_key = arc.resolve_ref(repo, ref)  # an unknown ref fails now, not later
    arc.make_onramp(onramp, out or repo.path / "archive", command, url_prefix)
    arc.payload_limit(target_size)
    args = {"onramp": onramp, "out": out or str(repo.path / "archive"),
            "target_size": target_size, "command": command, "url_prefix": url_prefix}
    job = enqueue(repo, ref, ref_key, args, "manual", head)
    wake(repo)
    return job


def op_archive_job(repo: Repository, id: int, forget: bool = False) -> dict[str, Any]:
    """A job's record; *forget* drops a finished one (the CLI has its result)."""
    with repo.store.read() as r:
        raw = r.get("meta", _job_key(int(id)))
    if raw is None:
        raise NotFound(f"no archive job {id}")
    job = json.loads(raw)
    if forget and job["state"] in ("done", "failed"):
        drop_job(repo, int(id))
    return job


def op_archive_status(repo: Repository) -> dict[str, Any]:
    st = arc.status(repo)
    st["queue"] = _queue_view(repo)
    try:
        pol = load_policy(repo.path)
        st["policy"] = pol.as_dict() if pol else None
    except PolicyError as exc:
        st["policy"], st["policy_error"] = None, str(exc)
    return st


def op_archive_run_queue(repo: Repository) -> dict[str, Any]:
    """Only reached inside a daemon (the CLI drains the queue itself without one)."""
    wake(repo)
    return {"note": "the mount daemon runs the archive queue by itself",
            "queue": _queue_view(repo), "jobs": []}


OPS: dict[str, Callable[..., Any]] = {
    "archive_submit": op_archive_submit, "archive_job": op_archive_job,
    "archive_status": op_archive_status, "archive_run_queue": op_archive_run_queue,
}

__all__ = [
    "K_JOB", "OPS", "Policy", "PolicyError", "PolicyWatcher", "archive_loop", "drain",
    "enqueue", "jobs", "load_policy", "parse_policy", "run_job",
]
