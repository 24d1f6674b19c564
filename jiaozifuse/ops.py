"""Repository operations as JSON-in, JSON-out functions.

The CLI and the daemon's control socket share this table, so a command does
the same thing whether it runs in the CLI's own process (no daemon serves the
repository) or inside the daemon (one does: then the daemon's open files are
flushed first and the mount's kernel caches are invalidated after).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .errors import Conflict, JiaoziError, NotFound
from .objects import Commit
from .repo import Repository

Op = Callable[..., Any]
OPS: dict[str, Op] = {}


def op(fn: Op) -> Op:
    OPS[fn.__name__.removeprefix("op_")] = fn
    return fn


def commit_dict(cid: bytes, c: Commit) -> dict[str, Any]:
    return {
        "id": cid.hex(),
        "tree": c.tree.hex(),
        "parents": [p.hex() for p in c.parents],
        "author": c.author,
        "time_ns": c.time_ns,
        "message": c.message,
        "meta": dict(c.meta),
    }


def _branch(repo: Repository, branch: str | None) -> str:
    b = branch or repo.default_branch
    repo.head(b)  # raises NotFound for an unknown branch
    return b


@op
def op_commit(repo: Repository, branch: str | None, message: str,
              meta: dict[str, str] | None = None, allow_empty: bool = False,
              wait: bool = False) -> dict:
    b = _branch(repo, branch)
    cid = repo.commit(b, message, meta or {}, allow_empty=allow_empty)
    out = {"branch": b, **commit_dict(cid, repo.get_commit(cid))}
    if wait:
        repo.store.commit_batch()
        repo.sync()
        for c in repo.remote_status()["conflicts"]:
            if c["ref"] == f"branch/{b}":
                raise Conflict(
                    f"branch {b}: the remote moved to {c['remote'][:12]} while this cache "
                    f"committed {c['local'][:12]}; run 'jiaozifuse fetch' and merge "
                    f"remote/{b}")
        out["remote_durable"] = True
    return out


@op
def op_log(repo: Repository, ref: str | None, limit: int | None = None) -> list[dict]:
    return [commit_dict(cid, c) for cid, c in repo.log(ref or repo.default_branch, limit)]


@op
def op_show(repo: Repository, ref: str, path: str | None = None) -> dict:
    cid = repo.resolve(ref)
    c = repo.get_commit(cid)
    if path is None or path == "":
        return {"type": "commit", **commit_dict(cid, c)}
    entry = repo.tree_entry(cid, path)
    if entry is None:  # the root directory ("REF:/")
        from .objects import TreeEntry

        entry = TreeEntry(b"", 0o40755, 0, 0, c.time_ns,
                          repo.get_tree(c.tree).logical_size, c.tree)
    info: dict[str, Any] = {
        "commit": cid.hex(), "path": path, "mode": entry.mode, "size": entry.size,
        "mtime_ns": entry.mtime_ns,
    }
    if entry.is_dir:
        info["type"] = "tree"
        info["id"] = entry.ref.hex()
        info["entries"] = [
            {"name": os.fsdecode(e.name), "mode": e.mode, "size": e.size,
             "type": "tree" if e.is_dir else "symlink" if e.is_symlink else "file"}
            for e in repo.get_tree(entry.ref).entries
        ]
    elif entry.is_symlink:
        info["type"] = "symlink"
        info["target"] = os.fsdecode(entry.ref)
    else:
        info["type"] = "file"
        info["id"] = entry.ref.hex()
    return info


@op
def op_status(repo: Repository, branch: str | None) -> dict:
    b = _branch(repo, branch)
    return {
        "branch": b,
        "head": repo.head(b).hex(),
        "changes": [ch.as_dict() for ch in repo.status(b)],
    }


@op
def op_diff(repo: Repository, a: str, b: str) -> list[dict]:
    return [ch.as_dict() for ch in repo.diff(a, b)]


@op
def op_branch_create(repo: Repository, name: str, from_ref: str | None = None) -> dict:
    cid = repo.create_branch(name, from_ref)
    return {"branch": name, "head": cid.hex()}


@op
def op_branch_list(repo: Repository) -> list[dict]:
    return [
        {"name": n, "head": cid.hex(), "default": n == repo.default_branch}
        for n, cid in sorted(repo.branches().items())
    ]


@op
def op_branch_delete(repo: Repository, name: str) -> dict:
    repo.delete_branch(name)
    return {"deleted": name}


@op
def op_tag_create(repo: Repository, name: str, ref: str | None = None) -> dict:
    cid = repo.create_tag(name, ref)
    return {"tag": name, "commit": cid.hex()}


@op
def op_tag_list(repo: Repository) -> list[dict]:
    return [{"name": n, "commit": cid.hex()} for n, cid in sorted(repo.tags().items())]


@op
def op_tag_delete(repo: Repository, name: str) -> dict:
    repo.delete_tag(name)
    return {"deleted": name}


@op
def op_merge(repo: Repository, src: str, into: str | None = None,
             message: str | None = None) -> dict:
    into = _branch(repo, into)
    cid = repo.merge(src, into, message)
    c = repo.get_commit(cid)
    return {"branch": into, "fast_forward": cid == repo.resolve(src), **commit_dict(cid, c)}


@op
def op_revert(repo: Repository, commit: str, branch: str | None = None) -> dict:
    b = _branch(repo, branch)
    cid = repo.revert(commit, b)
    return {"branch": b, **commit_dict(cid, repo.get_commit(cid))}


@op
def op_reset(repo: Repository, branch: str | None, ref: str | None = None,
             hard: bool = False) -> dict:
    b = _branch(repo, branch)
    cid = repo.reset(b, ref, hard)
    return {"branch": b, "head": cid.hex(), "hard": hard}


@op
def op_import(repo: Repository, branch: str | None, src: str, prefix: str = "") -> dict:
    b = _branch(repo, branch)
    n = repo.import_dir(b, src, prefix)
    return {"branch": b, "files": n, "prefix": prefix}


@op
def op_export(repo: Repository, ref: str, dest: str) -> dict:
    n = repo.export(ref, dest)
    return {"ref": ref, "files": n, "dest": dest}


@op
def op_stats(repo: Repository) -> dict:
    return repo.stats()


@op
def op_fsck(repo: Repository, repair: bool = False, remote: bool = False) -> dict:
    from .fsck import fsck

    return fsck(repo, repair=repair, check_remote=remote)


@op
def op_gc(repo: Repository, dry_run: bool = False, remote: bool = False) -> dict:
    from . import gc

    out = {"local": gc.collect_local(repo, dry_run)}
    if remote:
        out["remote"] = gc.collect_remote(repo, dry_run)
    return out


@op
def op_sync(repo: Repository) -> dict:
    return repo.sync()


@op
def op_fetch(repo: Repository) -> dict:
    return repo.fetch()


@op
def op_remote_status(repo: Repository) -> dict:
    return repo.remote_status()


@op
def op_events(repo: Repository, since: int = 0, limit: int = 1000) -> dict:
    events = list(repo.events.read(since, limit))
    return {"events": events, "last_seq": repo.events.last_seq()}


@op
def op_events_ack(repo: Repository, consumer: str, seq: int) -> dict:
    repo.events.ack(consumer, seq)
    return {"consumer": consumer, "offset": repo.events.offset(consumer)}


@op
def op_triggers_status(repo: Repository, limit: int = 50) -> dict:
    from . import triggers

    return {"runs": triggers.history(repo, limit),
            "offset": repo.events.offset(triggers.CONSUMER),
            "last_seq": repo.events.last_seq()}


@op
def op_triggers_check(repo: Repository, ref: str | None = None) -> dict:
    from . import triggers

    cid = repo.resolve(ref or repo.default_branch)
    rules = triggers.rules_at(repo, cid)
    return {"commit": cid.hex(), "triggers": [
        {"name": r.name, "on": list(r.on), "branches": list(r.branches),
         "paths": list(r.paths), "run": list(r.run), "webhook": r.webhook}
        for r in rules]}


@op
def op_triggers_run(repo: Repository, limit: int = 1000) -> dict:
    from . import triggers

    return {"handled": triggers.Runner(repo).run_once(limit)}


@op
def op_ping(repo: Repository) -> dict:
    return {"repo": str(repo.path), "pid": os.getpid()}


def run(repo: Repository, name: str, args: dict[str, Any]) -> Any:
    fn = OPS.get(name)
    if fn is None:
        raise NotFound(f"unknown operation {name!r}")
    try:
        return fn(repo, **args)
    except TypeError as exc:
        raise JiaoziError(f"bad arguments for {name}: {exc}") from None


from .archive import OPS as ARCHIVE_OPS  # noqa: E402 (the archive ops use the table above)
from .archive_policy import OPS as ARCHIVE_QUEUE_OPS  # noqa: E402

OPS.update(ARCHIVE_OPS)
OPS.update(ARCHIVE_QUEUE_OPS)  # archive_status with the queue and policy, archive_submit...
