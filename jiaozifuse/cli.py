"""The ``jiaozifuse`` command line.

Exit codes: 0 ok, 1 a user error (one line on stderr, no traceback), 2 usage.
Every listing command takes ``--json``.  The repository comes from
``--repo``, then ``$JIAOZIFUSE_REPO``, then the mounted branch directory the
command runs in; the branch from ``--branch``, then that directory, then the
repository's default branch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from . import __version__, cli_archive, control, ops
from .errors import JiaoziError
from .repo import Repository, find_repo


class Ctx:
    def __init__(self, repo: str | None, branch: str | None) -> None:
        self.repo_arg = repo
        self.branch_arg = branch

    def locate(self) -> tuple[Path, str | None]:
        path, branch = find_repo(self.repo_arg)
        return path, self.branch_arg or branch

    def run(self, op: str, **args: Any) -> Any:
        """Run an operation in the daemon if one serves the repository, else here."""
        path, _ = self.locate()
        try:
            return control.call(path, op, args)
        except FileNotFoundError:
            pass
        with Repository.open(path) as repo:
            return ops.run(repo, op, args)


def repo_options(fn: Callable) -> Callable:
    fn = click.option("--repo", "repo_opt", envvar=None, default=None, metavar="PATH",
                      help="Repository path (default: $JIAOZIFUSE_REPO or the mount "
                           "you are in).")(fn)
    return fn


def branch_option(fn: Callable) -> Callable:
    return click.option("--branch", "-b", default=None, help="Branch to act on.")(fn)


def json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(fn)


def _ctx(obj: Ctx, repo_opt: str | None, branch: str | None = None) -> Ctx:
    return Ctx(repo_opt or obj.repo_arg, branch or obj.branch_arg)


def out(data: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        human(data)


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class Group(click.Group):
    """Turns user errors into one line and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except JiaoziError as exc:
            click.echo(f"jiaozifuse: {exc}", err=True)
            sys.exit(1)
        except BrokenPipeError:
            # `jiaozifuse show ... | head`: the reader left; that is not an error.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except OSError as exc:
            click.echo(f"jiaozifuse: {exc.strerror or exc}"
                       + (f": {exc.filename}" if exc.filename else ""), err=True)
            sys.exit(1)


@click.group(cls=Group)
@click.version_option(__version__)
@click.option("--repo", default=None, metavar="PATH", help="Repository path.")
@click.option("--branch", "-b", default=None, help="Branch to act on.")
@click.pass_context
def main(ctx: click.Context, repo: str | None, branch: str | None) -> None:
    """A versioned repository for ML data, mounted as a filesystem."""
    # Library warnings (a retried upload, a conflict also reported as the
    # command's error) stay out of the one-line error contract unless asked.
    level = os.environ.get("JIAOZIFUSE_LOG_LEVEL", "ERROR").upper()
    logging.basicConfig(level=getattr(logging, level, logging.ERROR),
                        format="jiaozifuse: %(levelname)s: %(message)s")
    ctx.obj = Ctx(repo, branch)


# ----------------------------------------------------------------------- init


def _parse_size(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in units and not t[-1:].isdigit() else ""
    try:
        value = float(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 512M, 20G)") from None
    if value <= 0:
        raise click.BadParameter("the size must be positive")
    return int(value)


@main.command()
@click.argument("path", type=click.Path())
@click.option("--default-branch", default="main", show_default=True)
@click.option("--remote", default=None, metavar="s3://BUCKET/PREFIX",
              help="Keep the repository in S3 (the local store becomes a cache).")
@click.option("--endpoint-url", default=None, help="S3 endpoint (for non-AWS stores).")
@click.option("--cache-size", default=None, help="Bound on cached chunk bytes (e.g. 20G).")
def init(path: str, default_branch: str, remote: str | None, endpoint_url: str | None,
         cache_size: str | None) -> None:
    """Create a repository at PATH."""
    Repository.init(path, default_branch, remote=remote, endpoint_url=endpoint_url,
                    cache_size=_parse_size(cache_size)).close()
    where = f", remote {remote}" if remote else ""
    click.echo(f"Initialised an empty repository at {Path(path).resolve()} "
               f"(default branch {default_branch}{where})")


@main.command()
@click.argument("url", metavar="s3://BUCKET/PREFIX")
@click.argument("path", type=click.Path())
@click.option("--endpoint-url", default=None, help="S3 endpoint (for non-AWS stores).")
@click.option("--cache-size", default=None, help="Bound on cached chunk bytes (e.g. 20G).")
@click.option("--recover", default=None, metavar="CACHE-ID",
              help="Also adopt the uncommitted worktrees that cache checkpointed "
                   "(see 'remote status' on it, or 'remote worktrees').")
def clone(url: str, path: str, endpoint_url: str | None, cache_size: str | None,
          recover: str | None) -> None:
    """Make a new local cache at PATH over the repository at URL."""
    repo = Repository.clone(url, path, endpoint_url, cache_size=_parse_size(cache_size),
                            recover=recover)
    n = len(repo.branches())
    repo.close()
    click.echo(f"Cloned {url} into {Path(path).resolve()} ({n} branches)")


@main.command()
@repo_options
@json_option
@click.pass_obj
def fetch(obj: Ctx, repo_opt: str | None, as_json: bool) -> None:
    """Bring other machines' commits and branch heads from the remote."""
    r = _ctx(obj, repo_opt).run("fetch")

    def human(r: dict) -> None:
        click.echo(f"fetched {r['packs']} pack(s); updated: {', '.join(r['updated']) or '-'}")
        for d in r["diverged"]:
            name = d["ref"].partition("/")[2]
            click.echo(f"  {d['ref']}: diverged (local {d['local'][:12]}, remote "
                       f"{d['remote'][:12]}): merge remote/{name}")

    out(r, as_json, human)


def _progress_wanted() -> bool:
    """A bar only for a person watching: stderr is a terminal (scripts, pipes
    and CI logs get the plain lines, and --json output is never touched)."""
    return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"


def _bar(total: int) -> Any:
    import shutil

    from tqdm import tqdm

    # a terminal that reports no size (a fresh pty) would get an empty bar
    cols = shutil.get_terminal_size((80, 24)).columns or 80
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="uploading",
                file=sys.stderr, ncols=min(cols, 100), leave=True, mininterval=0.2)


def _sync_with_progress(c: Ctx) -> tuple[dict, dict]:
    """Run ``sync`` with a progress bar of the queued bytes on stderr.

    With a daemon, the sync runs on one control connection (in a thread)
    while this thread polls ``remote_status`` on another: the daemon's
    write-back does the work, the bar only watches its queue shrink.
    Without one, the upload runs here and reports each pack as it lands.
    """
    import threading

    path, _ = c.locate()
    try:
        st = control.call(path, "remote_status", {})
    except FileNotFoundError:
        with Repository.open(path) as repo:
            total = repo.remote_status()["queued_bytes"]
            with _bar(total) as bar:
                def step(n: int) -> None:
                    if bar.n + n > bar.total:
                        bar.total = bar.n + n
                    bar.update(n)

                sent = repo.sync(progress=step)
                bar.total = bar.n  # some queued chunks were deduplicated or collected
                bar.refresh()
            return sent, repo.remote_status()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["sent"] = control.call(path, "sync", {})
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    total = st["queued_bytes"]
    with _bar(total) as bar:
        while t.is_alive():
            t.join(0.5)
            with contextlib.suppress(Exception):
                q = control.call(path, "remote_status", {})["queued_bytes"]
                bar.total = max(bar.total, bar.n + q)  # writers may add more meanwhile
                done = bar.total - q
                if done > bar.n:
                    bar.update(done - bar.n)
        if "error" not in box:
            bar.update(bar.total - bar.n)
    if "error" in box:
        raise box["error"]
    return box["sent"], control.call(path, "remote_status", {})


@main.command()
@click.option("--wait", is_flag=True, help="Return once everything is durable in S3.")
@repo_options
@json_option
@click.pass_obj
def sync(obj: Ctx, wait: bool, repo_opt: str | None, as_json: bool) -> None:
    """Upload what is queued; with --wait, until it is all in S3.

    Every branch's uncommitted worktree is checkpointed first, so that what
    this makes durable can be recovered from the remote alone (clone
    --recover).  On a terminal a progress bar of the queued bytes runs on stderr; piped
    or with --json the output is plain.
    """
    c = _ctx(obj, repo_opt)
    if _progress_wanted():
        r, st = _sync_with_progress(c)
    else:
        r = c.run("sync")
        st = c.run("remote_status")
    res = {"sent": r, "status": st}

    def human(res: dict) -> None:
        sent = res["sent"]
        click.echo(f"uploaded {sent['packs']} pack(s), {_size(sent['bytes'])}, "
                   f"{sent['refs']} ref(s)")
        for cf in res["status"]["conflicts"]:
            click.echo(f"  conflict on {cf['ref']}: local {cf['local'][:12]}, remote "
                       f"{cf['remote'][:12]}")

    out(res, as_json, human)
    if st["conflicts"]:
        sys.exit(1)


@main.group()
def remote() -> None:
    """The repository's remote (S3)."""


def _meter(label: str, n: int, total: int) -> str:
    """A one-line bar (tqdm's own rendering) for a terminal."""
    from tqdm import tqdm

    return tqdm.format_meter(n, total, 0, ncols=72, prefix=label, unit="B", unit_scale=True,
                             unit_divisor=1024, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}")


@remote.command("status")
@repo_options
@json_option
@click.pass_obj
def remote_status(obj: Ctx, repo_opt: str | None, as_json: bool) -> None:
    """What is queued for upload, uploading, uploaded, failed, and in conflict.

    On a terminal the cache's fill shows as a bar.
    """
    st = _ctx(obj, repo_opt).run("remote_status")

    def human(st: dict) -> None:
        q = st["queued"]
        click.echo(f"remote:   {st['remote'] or '(none)'}")
        click.echo(f"queued:   {q['chunks']} chunks ({_size(st['queued_bytes'])}), "
                   f"{q['objects']} objects, {q['refs']} ref updates")
        if st.get("writeback_running"):
            click.echo(f"uploading: {_size(st['uploading_bytes'])} in flight")
        click.echo(f"uploaded: {st['uploaded_objects']} chunks and objects in "
                   f"{st['packs']} packs")
        if st.get("last_error"):
            click.echo(f"failed:   {st['last_error']} (retrying with backoff)")
        click.echo(f"cache:    {_size(st['cached_chunk_bytes'])}"
                   + (f" of {_size(st['cache_size'])}" if st["cache_size"] else ""))
        if st["cache_size"] and sys.stdout.isatty():
            click.echo(_meter("cache", min(st["cached_chunk_bytes"], st["cache_size"]),
                              st["cache_size"]))
        if st.get("refusing_writes"):
            click.echo("writes:   refused (ENOSPC): the cache is full of data not yet "
                       "uploaded")
        elif st.get("cache_full"):
            click.echo("writes:   waiting for uploads: the cache is full of data not yet "
                       "uploaded")
        for cf in st["conflicts"]:
            click.echo(f"conflict: {cf['ref']} local {cf['local'][:12]} remote "
                       f"{cf['remote'][:12]}")

    out(st, as_json, human)


# ---------------------------------------------------------------------- mount


@main.command()
@click.argument("repo", type=click.Path())
@click.argument("mountpoint", type=click.Path())
@click.option("--foreground", "-f", is_flag=True, help="Stay in the foreground.")
@click.option("--allow-other", is_flag=True, help="Let other users use the mount.")
@click.option("--read-only", is_flag=True, help="Mount everything read-only.")
@click.option("--branch", "-b", "only_branch", default=None,
              help="Mount only this branch, as MOUNTPOINT itself.")
@click.option("--commit", "only_commit", default=None, metavar="REF",
              help="Mount only this commit or tag, read-only, as MOUNTPOINT itself.")
@click.option("--lazy-close", is_flag=True,
              help="close() does not wait for a durable commit; the group commit makes it "
                   "durable within 50 ms (fsync() always waits).")
@click.option("--metrics-addr", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics there (off by default).")
@click.option("--busy-poll-us", default=100, show_default=True, metavar="US",
              type=click.IntRange(0, 100_000),
              help="Poll for the next request this many microseconds after each reply "
                   "instead of sleeping (0: never; only with two CPUs or more).")
@click.option("--drop-behind-mib", default=128, show_default=True, metavar="MIB",
              type=click.IntRange(0, None),
              help="Chunks fetched from the remote leave the local page cache once this "
                   "many MiB more were fetched (the mount keeps its own copy; 0: never).")
@click.option("--dir-readahead/--no-dir-readahead", default=True, show_default=True,
              help="When a reader takes a directory's files in listing order on a cold "
                   "cache (cp -r, tar, rsync), fetch the next files before they are opened.")
@click.option("--debug", is_flag=True, help="Log every FUSE request.")
def mount(repo: str, mountpoint: str, foreground: bool, allow_other: bool, read_only: bool,
          only_branch: str | None, only_commit: str | None, lazy_close: bool,
          metrics_addr: str | None, busy_poll_us: int, drop_behind_mib: int,
          dir_readahead: bool, debug: bool) -> None:
    """Mount REPO at MOUNTPOINT (returns once the mount is ready)."""
    from .daemon import MountOptions, start

    start(MountOptions(
        repo=Path(repo).resolve(), mountpoint=Path(mountpoint).resolve(),
        foreground=foreground, allow_other=allow_other, read_only=read_only,
        branch=only_branch, debug=debug, lazy_close=lazy_close, commit=only_commit,
        metrics_addr=metrics_addr, busy_poll_us=busy_poll_us, drop_behind_mib=drop_behind_mib,
        dir_readahead=dir_readahead,
    ))


@main.command()
@click.argument("mountpoint", type=click.Path())
@click.option("--lazy", "-z", is_flag=True, help="Detach even if busy.")
def umount(mountpoint: str, lazy: bool) -> None:
    """Flush and unmount MOUNTPOINT."""
    from .daemon import stop

    stop(Path(mountpoint).resolve(), lazy)


# --------------------------------------------------------------------- commit


def _parse_meta(values: tuple[str, ...]) -> dict[str, str]:
    meta = {}
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"{v!r} is not KEY=VALUE", param_hint="--meta")
        k, val = v.split("=", 1)
        meta[k] = val
    return meta


@main.command()
@click.option("--message", "-m", required=True)
@click.option("--meta", multiple=True, metavar="KEY=VALUE", help="Free-form metadata.")
@click.option("--allow-empty", is_flag=True)
@click.option("--wait", is_flag=True, help="Return once the commit is durable in S3.")
@repo_options
@branch_option
@json_option
@click.pass_obj
def commit(obj: Ctx, message: str, meta: tuple[str, ...], allow_empty: bool, wait: bool,
           repo_opt: str | None, branch: str | None, as_json: bool) -> None:
    """Commit the branch's uncommitted changes."""
    c = _ctx(obj, repo_opt, branch)
    _, b = c.locate()
    r = c.run("commit", branch=b, message=message, meta=_parse_meta(meta),
              allow_empty=allow_empty, wait=wait)
    out(r, as_json, lambda r: click.echo(f"[{r['branch']} {r['id'][:12]}] {r['message']}"))


@main.command()
@click.argument("ref", required=False)
@click.option("-n", "--max-count", "limit", type=int, default=None)
@repo_options
@branch_option
@json_option
@click.pass_obj
def log(obj: Ctx, ref: str | None, limit: int | None, repo_opt: str | None,
        branch: str | None, as_json: bool) -> None:
    """Show commits reachable from REF (default: the branch)."""
    c = _ctx(obj, repo_opt, branch)
    _, b = c.locate()
    rows = c.run("log", ref=ref or b, limit=limit)

    def human(rows: list[dict]) -> None:
        for r in rows:
            click.echo(f"commit {r['id']}")
            if len(r["parents"]) > 1:
                click.echo("Merge:  " + " ".join(p[:12] for p in r["parents"]))
            click.echo(f"Author: {r['author']}")
            click.echo(f"Date:   {_when(r['time_ns'])}")
            for k, v in sorted(r["meta"].items()):
                click.echo(f"Meta:   {k}={v}")
            click.echo("")
            for line in r["message"].splitlines() or [""]:
                click.echo(f"    {line}")
            click.echo("")

    out(rows, as_json, human)


@main.command()
@click.argument("spec")
@repo_options
@json_option
@click.pass_obj
def show(obj: Ctx, spec: str, repo_opt: str | None, as_json: bool) -> None:
    """Show a commit (REF), or a file or directory in it (REF:PATH)."""
    ref, _, path = spec.partition(":")
    c = _ctx(obj, repo_opt)
    info = c.run("show", ref=ref, path=path or None)
    if info["type"] == "file" and not as_json:
        path_, _ = c.locate()
        with Repository.open(path_, readonly=True) as repo:
            fc = repo.file_content(bytes.fromhex(info["id"]))
            stream = click.get_binary_stream("stdout")
            for n, data in fc.iter_pieces():
                while data is None and n > 0:  # a hole: zeros, a MiB at a time
                    stream.write(bytes(min(n, 1 << 20)))
                    n -= 1 << 20
                if data is not None:
                    stream.write(data)
        return

    def human(i: dict) -> None:
        if i["type"] == "commit":
            click.echo(f"commit {i['id']}\nTree:   {i['tree']}\nAuthor: {i['author']}\n"
                       f"Date:   {_when(i['time_ns'])}")
            for k, v in sorted(i["meta"].items()):
                click.echo(f"Meta:   {k}={v}")
            click.echo("\n    " + "\n    ".join(i["message"].splitlines() or [""]))
        elif i["type"] == "tree":
            for e in i["entries"]:
                suffix = "/" if e["type"] == "tree" else ""
                click.echo(f"{e['mode']:06o} {e['size']:>12} {e['name']}{suffix}")
        else:
            click.echo(i["target"])

    out(info, as_json, human)


@main.command()
@repo_options
@branch_option
@json_option
@click.pass_obj
def status(obj: Ctx, repo_opt: str | None, branch: str | None, as_json: bool) -> None:
    """List what is uncommitted on the branch."""
    c = _ctx(obj, repo_opt, branch)
    _, b = c.locate()
    st = c.run("status", branch=b)

    def human(st: dict) -> None:
        click.echo(f"On branch {st['branch']} (head {st['head'][:12]})")
        if not st["changes"]:
            click.echo("nothing to commit")
        for ch in st["changes"]:
            click.echo(f"  {ch['change']:>9}: {ch['path']}")

    out(st, as_json, human)


@main.command()
@click.argument("ref_a")
@click.argument("ref_b")
@repo_options
@json_option
@click.pass_obj
def diff(obj: Ctx, ref_a: str, ref_b: str, repo_opt: str | None, as_json: bool) -> None:
    """List paths added, deleted or modified between two refs."""
    rows = _ctx(obj, repo_opt).run("diff", a=ref_a, b=ref_b)
    sign = {"added": "A", "deleted": "D", "modified": "M"}
    out(rows, as_json, lambda rows: [click.echo(f"{sign[r['change']]}\t{r['path']}")
                                     for r in rows])


# ------------------------------------------------------------- branches, tags


@main.group()
def branch() -> None:
    """Create, list and delete branches."""


@branch.command("create")
@click.argument("name")
@click.option("--from", "from_ref", default=None, help="Start point (default: default branch).")
@repo_options
@json_option
@click.pass_obj
def branch_create(obj: Ctx, name: str, from_ref: str | None, repo_opt: str | None,
                  as_json: bool) -> None:
    """Create branch NAME (constant time: no data is copied)."""
    r = _ctx(obj, repo_opt).run("branch_create", name=name, from_ref=from_ref)
    out(r, as_json, lambda r: click.echo(f"Created branch {name} at {r['head'][:12]}"))


@branch.command("list")
@repo_options
@json_option
@click.pass_obj
def branch_list(obj: Ctx, repo_opt: str | None, as_json: bool) -> None:
    """List branches and their heads (* marks the default branch)."""
    rows = _ctx(obj, repo_opt).run("branch_list")
    out(rows, as_json, lambda rows: [
        click.echo(f"{'*' if r['default'] else ' '} {r['name']:<30} {r['head'][:12]}")
        for r in rows])


@branch.command("delete")
@click.argument("name")
@repo_options
@click.pass_obj
def branch_delete(obj: Ctx, name: str, repo_opt: str | None) -> None:
    """Delete branch NAME and its uncommitted changes (not the default branch)."""
    _ctx(obj, repo_opt).run("branch_delete", name=name)
    click.echo(f"Deleted branch {name}")


@main.group()
def tag() -> None:
    """Create, list and delete tags."""


@tag.command("create")
@click.argument("name")
@click.argument("ref", required=False)
@repo_options
@json_option
@click.pass_obj
def tag_create(obj: Ctx, name: str, ref: str | None, repo_opt: str | None,
               as_json: bool) -> None:
    """Tag REF (default: the default branch's head) as NAME."""
    r = _ctx(obj, repo_opt).run("tag_create", name=name, ref=ref)
    out(r, as_json, lambda r: click.echo(f"Tagged {r['commit'][:12]} as {name}"))


@tag.command("list")
@repo_options
@json_option
@click.pass_obj
def tag_list(obj: Ctx, repo_opt: str | None, as_json: bool) -> None:
    """List tags and the commits they name."""
    rows = _ctx(obj, repo_opt).run("tag_list")
    out(rows, as_json, lambda rows: [click.echo(f"{r['name']:<30} {r['commit'][:12]}")
                                     for r in rows])


@tag.command("delete")
@click.argument("name")
@repo_options
@click.pass_obj
def tag_delete(obj: Ctx, name: str, repo_opt: str | None) -> None:
    """Delete tag NAME (the commit stays while something else reaches it)."""
    _ctx(obj, repo_opt).run("tag_delete", name=name)
    click.echo(f"Deleted tag {name}")


# ----------------------------------------------------------- merge and friends


@main.command()
@click.argument("src")
@click.option("--into", default=None, help="Destination branch (default: current).")
@click.option("--message", "-m", default=None)
@repo_options
@json_option
@click.pass_obj
def merge(obj: Ctx, src: str, into: str | None, message: str | None, repo_opt: str | None,
          as_json: bool) -> None:
    """Merge SRC into a branch (fast-forward when possible)."""
    c = _ctx(obj, repo_opt)
    _, b = c.locate()
    r = c.run("merge", src=src, into=into or b, message=message)
    how = "fast-forward" if r["fast_forward"] else "merge commit"
    out(r, as_json, lambda r: click.echo(f"[{r['branch']} {r['id'][:12]}] {how}"))


@main.command()
@click.argument("commit_ref", metavar="COMMIT")
@repo_options
@branch_option
@json_option
@click.pass_obj
def revert(obj: Ctx, commit_ref: str, repo_opt: str | None, branch: str | None,
           as_json: bool) -> None:
    """Commit the inverse of COMMIT on the branch."""
    c = _ctx(obj, repo_opt, branch)
    _, b = c.locate()
    r = c.run("revert", commit=commit_ref, branch=b)
    out(r, as_json, lambda r: click.echo(f"[{r['branch']} {r['id'][:12]}] reverted"))


@main.command()
@click.argument("ref", required=False)
@click.option("--hard", is_flag=True, help="Also discard uncommitted changes.")
@repo_options
@branch_option
@json_option
@click.pass_obj
def reset(obj: Ctx, ref: str | None, hard: bool, repo_opt: str | None, branch: str | None,
          as_json: bool) -> None:
    """Move the branch to REF (default: its head); --hard discards changes."""
    c = _ctx(obj, repo_opt, branch)
    _, b = c.locate()
    r = c.run("reset", branch=b, ref=ref, hard=hard)
    out(r, as_json, lambda r: click.echo(f"{r['branch']} is now at {r['head'][:12]}"))


# ------------------------------------------------------------ import, export


@main.command("import")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("--prefix", default="", help="Directory in the branch to import into.")
@repo_options
@branch_option
@json_option
@click.pass_obj
def import_(obj: Ctx, src: str, prefix: str, repo_opt: str | None, branch: str | None,
            as_json: bool) -> None:
    """Copy directory SRC into the branch's worktree (uncommitted)."""
    c = _ctx(obj, repo_opt, branch)
    _, b = c.locate()
    r = c.run("import", branch=b, src=os.path.abspath(src), prefix=prefix)
    out(r, as_json, lambda r: click.echo(f"Imported {r['files']} files into {r['branch']}"))


@main.command()
@click.argument("ref")
@click.argument("dest", type=click.Path())
@repo_options
@json_option
@click.pass_obj
def export(obj: Ctx, ref: str, dest: str, repo_opt: str | None, as_json: bool) -> None:
    """Write the tree of REF into directory DEST."""
    r = _ctx(obj, repo_opt).run("export", ref=ref, dest=os.path.abspath(dest))
    out(r, as_json, lambda r: click.echo(f"Exported {r['files']} files to {dest}"))


@main.command()
@repo_options
@json_option
@click.pass_obj
def stats(obj: Ctx, repo_opt: str | None, as_json: bool) -> None:
    """Logical bytes against bytes stored (dedup)."""
    s = _ctx(obj, repo_opt).run("stats")

    def human(s: dict) -> None:
        for ref, n in sorted(s["refs"].items()):
            click.echo(f"{ref:<40} {_size(n):>12}")
        logical = s["logical_bytes_all_commits"]
        stored = s["stored_bytes"]
        click.echo(f"{'logical, all commits':<40} {_size(logical):>12}")
        click.echo(f"{'stored (chunks + objects)':<40} {_size(stored):>12}")
        if stored:
            click.echo(f"{'dedup ratio':<40} {logical / stored:>11.2f}x")

    out(s, as_json, human)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@main.command()
@click.option("--repair", is_flag=True,
              help="Fix what can be fixed: refetch from the remote, re-queue uploads.")
@click.option("--remote", "with_remote", is_flag=True,
              help="Also check that the remote holds what the store says it does.")
@repo_options
@json_option
@click.pass_obj
def fsck(obj: Ctx, repair: bool, with_remote: bool, repo_opt: str | None,
         as_json: bool) -> None:
    """Verify every hash and reference in the store."""
    r = _ctx(obj, repo_opt).run("fsck", repair=repair, remote=with_remote)

    def human(r: dict) -> None:
        click.echo(f"checked {r['chunks']} chunks, {r['objects']} objects, "
                   f"{r['commits']} commits, {r['refs']} refs, {r['inodes']} inodes")
        for p in r["repaired"]:
            click.echo(f"  repaired {p['kind']}: {p['id'][:16]} ({p['detail']})")
        for p in r["problems"]:
            click.echo(f"  {p['kind']}: {p['id'][:16]} ({p['detail']})")
        click.echo("ok" if r["ok"] else f"{len(r['problems'])} problem(s)")

    out(r, as_json, human)
    if not r["ok"]:
        sys.exit(1)


@main.group()
def events() -> None:
    """The event log: every change through the mount and every repository operation."""


@events.command("tail")
@click.option("--since", type=int, default=None, help="Events after this sequence number.")
@click.option("-n", "count", type=click.IntRange(min=0), default=20, show_default=True,
              help="Without --since: the last N events.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events.")
@repo_options
@json_option
@click.pass_obj
def events_tail(obj: Ctx, since: int | None, count: int, follow: bool, repo_opt: str | None,
                as_json: bool) -> None:
    """Print events (one JSON object per line with --json)."""
    import time as _time

    c = _ctx(obj, repo_opt)
    if since is None:
        last = c.run("events", since=0, limit=0)["last_seq"]
        since = max(0, last - count)
    while True:
        r = c.run("events", since=since, limit=1000)
        for ev in r["events"]:
            since = ev["seq"]
            if as_json:
                click.echo(json.dumps(ev, ensure_ascii=False))
            else:
                when = datetime.fromtimestamp(ev["time_ns"] / 1e9, UTC).strftime("%H:%M:%S")
                where = ev.get("path") or ev.get("commit", "")[:12] or ev.get("tag", "")
                if ev.get("old_path"):
                    where = f"{ev['old_path']} -> {where}"
                click.echo(f"{ev['seq']:>8} {when} {ev['type']:<13} "
                           f"{ev.get('branch') or '-':<16} {where}")
        if not r["events"]:
            if not follow:
                return
            _time.sleep(0.5)


@main.group()
def triggers() -> None:
    """Triggers: commands and webhooks run on events (.jiaozi/triggers.toml)."""


@triggers.command("status")
@click.option("-n", "limit", type=click.IntRange(min=1), default=20, show_default=True)
@repo_options
@json_option
@click.pass_obj
def triggers_status(obj: Ctx, limit: int, repo_opt: str | None, as_json: bool) -> None:
    """What ran, when, with what exit status and output."""
    r = _ctx(obj, repo_opt).run("triggers_status", limit=limit)

    def human(r: dict) -> None:
        click.echo(f"events handled up to {r['offset']} of {r['last_seq']}")
        for run in r["runs"]:
            when = datetime.fromtimestamp(run["time_ns"] / 1e9, UTC).strftime(
                "%Y-%m-%d %H:%M:%S")
            state = "ok" if run["ok"] else f"FAILED ({run['error']})"
            click.echo(f"{when} {run['trigger']:<20} event {run['event_seq']} "
                       f"({run['event_type']}) {state}, {run['attempts']} attempt(s)")
            tail = run["output_tail"].strip().splitlines()[-3:]
            for line in tail:
                click.echo(f"    | {line}")

    out(r, as_json, human)


@triggers.command("check")
@click.argument("ref", required=False)
@repo_options
@json_option
@click.pass_obj
def triggers_check(obj: Ctx, ref: str | None, repo_opt: str | None, as_json: bool) -> None:
    """Parse the rules committed at REF (default: the default branch) and list them."""
    r = _ctx(obj, repo_opt).run("triggers_check", ref=ref)
    out(r, as_json, lambda r: [click.echo(
        f"{t['name']:<20} on {','.join(t['on'])} -> "
        + (" ".join(t["run"]) if t["run"] else t["webhook"])) for t in r["triggers"]]
        or click.echo("no triggers"))


@triggers.command("run")
@repo_options
@json_option
@click.pass_obj
def triggers_run(obj: Ctx, repo_opt: str | None, as_json: bool) -> None:
    """Run pending triggers now (a mounted daemon runs them by itself)."""
    r = _ctx(obj, repo_opt).run("triggers_run")
    out(r, as_json, lambda r: click.echo(f"handled {r['handled']} event(s)"))


def _not_yet(name: str, issue: int) -> None:
    @main.command(name, context_settings={"ignore_unknown_options": True,
                                          "allow_extra_args": True},
                  help=f"Not available yet (tracked in issue {issue}).")
    def _cmd() -> None:
        raise JiaoziError(f"'{name}' is not available in this version yet")


@main.command()
@click.option("--dry-run", is_flag=True, help="Report what would be deleted.")
@click.option("--remote", "with_remote", is_flag=True,
              help="Also collect the remote (two-step, with a grace period).")
@repo_options
@json_option
@click.pass_obj
def gc(obj: Ctx, dry_run: bool, with_remote: bool, repo_opt: str | None, as_json: bool) -> None:
    """Delete what no ref, tag, worktree, open file or retained commit reaches."""
    r = _ctx(obj, repo_opt).run("gc", dry_run=dry_run, remote=with_remote)

    def human(r: dict) -> None:
        loc = r["local"]
        verb = "would delete" if dry_run else "deleted"
        click.echo(f"local: {verb} {loc['objects_deleted']} objects and "
                   f"{loc['chunks_deleted']} chunks ({_size(loc['bytes_freed'])})")
        if "remote" in r:
            rem = r["remote"]
            click.echo(f"remote: {len(rem['condemned'])} pack(s) condemned, "
                       f"{len(rem['deleted'])} deleted (grace {rem['grace_s']:.0f} s)")

    out(r, as_json, human)


cli_archive.register(main)

if __name__ == "__main__":
    main()
