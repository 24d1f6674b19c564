"""CLI for the Filecoin archive: ``archive [run] REF``, ``archive status``,
``archive mark``, and ``restore --from-car DIR NEW_REPO``.

``archive`` is a group whose default subcommand is ``run``: ``jiaozifuse archive
main`` packs branch main, ``jiaozifuse archive status`` lists pieces (a ref called
``status`` or ``mark`` needs ``archive run status``). Like every other command it
runs inside the daemon when one serves the repository (the daemon holds the
store's writer lock), otherwise in this process. ``archive run`` against a
daemon is queued as a job of the daemon's archive queue (archive_policy.py), so
that packing runs in a worker thread and never blocks the mount; the CLI waits
for the job's outcome. ``archive run-queue`` runs the policy's queue without a
daemon; ``archive policy`` shows (and checks) the policy. cli.py calls
:func:`register`.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

import click

from . import archive as arc
from . import archive_policy as policy
from . import control
from .errors import JiaoziError
from .repo import Repository, find_repo


def _parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in units and not t[-1:].isdigit() else ""
    try:
        value = int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 512M, 32G)") from None
    if value < 128:
        raise click.BadParameter("a piece is at least 128 bytes")
    return value


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _repo_path(ctx: click.Context, repo_opt: str | None) -> Path:
    root = ctx.find_root().obj
    explicit = repo_opt or getattr(root, "repo_arg", None)
    path, _ = find_repo(explicit)
    return path


def _run(path: Path, op: str, args: dict[str, Any]) -> Any:
    """In the daemon serving *path* if there is one, else here."""
    try:
        return control.call(path, op, args)
    except FileNotFoundError:
        pass
    with Repository.open(path) as repo:
        return {**arc.OPS, **policy.OPS}[op](repo, **args)


def _run_archive(path: Path, args: dict[str, Any]) -> dict[str, Any]:
    """``archive REF``: as a job of the daemon's queue if one serves *path*, else here."""
    try:
        job = control.call(path, "archive_submit", args)
    except FileNotFoundError:
        with Repository.open(path) as repo:
            return arc.op_archive(repo, **args)
    delay = 0.05
    while True:
        try:
            job = control.call(path, "archive_job", {"id": job["id"], "forget": True})
        except (FileNotFoundError, OSError):
            raise JiaoziError(f"the mount daemon stopped during the archive run; job "
                              f"{job['id']} stays queued and runs when the repository is "
                              "mounted again") from None
        if job["state"] == "done":
            return job["result"]
        if job["state"] == "failed":
            raise JiaoziError(job.get("error") or "archive run failed")
        time.sleep(delay)
        delay = min(0.5, delay * 2)


def _emit(data: Any, as_json: bool, human: Any) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        human(data)


class _DefaultRun(click.Group):
    """A group whose first argument, when not a subcommand, is ``run``'s."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


repo_option = click.option("--repo", "repo_opt", default=None, metavar="PATH",
                           help="Repository path (default: $JIAOZIFUSE_REPO or the mount "
                                "you are in).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group("archive", cls=_DefaultRun)
def archive_group() -> None:
    """Archive commits to Filecoin as CAR pieces (default subcommand: run)."""


@archive_group.command("run")
@click.argument("ref")
@click.option("--onramp", type=click.Choice(["manifest", "command"]), default="manifest",
              show_default=True, help="Where the pieces go.")
@click.option("--out", default=None, metavar="DIR",
              help="Directory for the CAR files (default: REPO/archive).")
@click.option("--target-size", default="1GiB", show_default=True,
              help="Padded piece size to fill (a power of two; rounded down).")
@click.option("--command", "command", default=None, metavar="ARGV",
              help="For --onramp command: the program and its arguments (split like a "
                   "shell would, never run by one). Default: the repository config's "
                   "archive.command.")
@click.option("--url-prefix", default=None, metavar="URL",
              help="Where the CARs will be served; fills the manifest's url column.")
@repo_option
@json_option
@click.pass_context
def run_cmd(ctx: click.Context, ref: str, onramp: str, out: str | None, target_size: str,
            command: str | None, url_prefix: str | None, repo_opt: str | None,
            as_json: bool) -> None:
    """Pack what REF reaches and is not archived yet into CAR pieces."""
    path = _repo_path(ctx, repo_opt)
    argv = shlex.split(command) if command else None
    if onramp == "command" and argv is None:
        try:
            cfg = json.loads((path / "config.json").read_text()).get("archive", {})
        except (OSError, ValueError):
            cfg = {}
        argv = cfg.get("command")
        if not argv:
            raise JiaoziError("--onramp command needs --command ARGV (or archive.command in "
                              "the repository's config.json)")
    args = {"ref": ref, "onramp": onramp, "target_size": _parse_size(target_size),
            "out": os.path.abspath(out) if out else None, "command": argv,
            "url_prefix": url_prefix}
    r = _run_archive(path, args)

    def human(r: dict) -> None:
        if not r["pieces"]:
            click.echo(r.get("message", "nothing to archive"))
            return
        for p in r["pieces"]:
            click.echo(f"{p['piece_cid']}  {_human(p['piece_size']):>10} piece  "
                       f"{_human(p['car_size']):>10} CAR  {p['state']:<9} {p['car_path']}")
        click.echo(f"run {r['run']}: {len(r['pieces'])} piece(s), {r['commits']} new "
                   f"commit(s), root {r['root_cid']}")
        if r["onramp"] == "manifest":
            click.echo(f"deal manifest: {Path(r['out']) / arc.MANIFEST_CSV}")

    _emit(r, as_json, human)


@archive_group.command("status")
@repo_option
@json_option
@click.pass_context
def status_cmd(ctx: click.Context, repo_opt: str | None, as_json: bool) -> None:
    """List archived pieces and their states."""
    s = _run(_repo_path(ctx, repo_opt), "archive_status", {})

    def human(s: dict) -> None:
        for p in s["pieces"]:
            click.echo(f"{p['piece_cid']}  {p['state']:<9} {_human(p['piece_size']):>10}  "
                       f"run {p['run']:<4} {p['ref']}")
        counts = ", ".join(f"{n} {k}" for k, n in s["counts"].items() if n)
        click.echo(f"{len(s['pieces'])} piece(s){': ' + counts if counts else ''}; "
                   f"{_human(s['piece_bytes'])} of pieces")
        for j in s.get("queue", []):
            extra = f", {j['attempts']} failed attempt(s): {j['error']}" if j["error"] else ""
            click.echo(f"queued: job {j['id']} {j['kind']} {j['ref']} ({j['state']}{extra})")
        if s.get("policy_error"):
            click.echo(f"archive policy disabled: {s['policy_error']}")

    _emit(s, as_json, human)


@archive_group.command("run-queue")
@repo_option
@json_option
@click.pass_context
def run_queue_cmd(ctx: click.Context, repo_opt: str | None, as_json: bool) -> None:
    """Run the archive policy's queue now (what the mount daemon does by itself)."""
    path = _repo_path(ctx, repo_opt)
    try:
        r = control.call(path, "archive_run_queue", {})
    except FileNotFoundError:
        import trio

        with Repository.open(path) as repo:
            done = trio.run(policy.drain, repo)
            r = {"jobs": done, "queue": policy.jobs(repo)}

    def human(r: dict) -> None:
        if r.get("note"):
            click.echo(r["note"])
        for j in r["jobs"]:
            res = j.get("result") or {}
            what = (res.get("message") or f"run {res.get('run')}, "
                    f"{len(res.get('pieces', []))} piece(s)") if j["state"] == "done" \
                else f"failed: {j['error']}"
            click.echo(f"job {j['id']} {j['ref']}: {what}")
        if not r["jobs"] and not r.get("note"):
            click.echo("nothing queued")

    _emit(r, as_json, human)
    failed = [j for j in r["jobs"] if j["state"] not in ("done", "dropped")]
    if failed:
        raise JiaoziError(f"{len(failed)} archive job(s) failed (they stay queued): "
                          f"{failed[0]['error']}")


@archive_group.command("policy")
@repo_option
@json_option
@click.pass_context
def policy_cmd(ctx: click.Context, repo_opt: str | None, as_json: bool) -> None:
    """Show the archive policy of the repository's config.json (an error if it is bad)."""
    pol = policy.load_policy(_repo_path(ctx, repo_opt))
    doc = pol.as_dict() if pol else None

    def human(d: dict | None) -> None:
        if d is None:
            click.echo("no archive policy (archive.policy in config.json)")
            return
        for k, v in d.items():
            click.echo(f"{k:<12} {v}")

    _emit(doc, as_json, human)


@archive_group.command("mark")
@click.argument("piece_cid")
@click.argument("state", type=click.Choice(list(arc.STATES)))
@click.option("--deal-id", default=None, help="Deal id to keep with the piece.")
@click.option("--provider", default=None, help="Storage provider to keep with the piece.")
@repo_option
@json_option
@click.pass_context
def mark_cmd(ctx: click.Context, piece_cid: str, state: str, deal_id: str | None,
             provider: str | None, repo_opt: str | None, as_json: bool) -> None:
    """Set a piece's state (failed: its blocks are packed again by the next run)."""
    detail = {k: v for k, v in (("deal_id", deal_id), ("provider", provider)) if v}
    p = _run(_repo_path(ctx, repo_opt), "archive_mark",
             {"piece_cid": piece_cid, "state": state, "detail": detail or None})
    _emit(p, as_json, lambda p: click.echo(f"{p['piece_cid']}: {p['state']}"))


@click.command("restore")
@click.option("--from-car", "from_car", multiple=True, required=True, metavar="DIR|FILE",
              help="A directory of CAR files (all pieces of all archive runs), or one CAR; "
                   "repeatable.")
@click.argument("new_repo", type=click.Path())
@json_option
def restore_cmd(from_car: tuple[str, ...], new_repo: str, as_json: bool) -> None:
    """Rebuild a repository from CAR pieces alone, every block verified."""
    r = arc.restore(list(from_car), new_repo)

    def human(r: dict) -> None:
        unchecked = [p["car"] for p in r["pieces"] if not p["checked_against"]]
        click.echo(f"Restored {r['commits']} commit(s), {r['chunks']} chunk(s) from "
                   f"{r['cars']} CAR(s) into {r['repo']}")
        for k, v in r["refs"].items():
            click.echo(f"  {k:<30} {v[:12]}")
        if unchecked:
            click.echo(f"note: no piece CID to check {len(unchecked)} CAR(s) against "
                       f"(name them PIECE_CID.car): {', '.join(unchecked[:3])}")

    _emit(r, as_json, human)


def register(main: click.Group) -> None:
    """Add ``archive`` and ``restore`` to the main command group."""
    main.add_command(archive_group)
    main.add_command(restore_cmd)


__all__ = ["archive_group", "register", "restore_cmd"]
