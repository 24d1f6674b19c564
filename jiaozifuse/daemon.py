"""The mount daemon: process lifecycle, signals, and the control socket.

``jiaozifuse mount`` starts ``python -m jiaozifuse.daemon`` in a new session
and waits on a pipe until the child says the mount is ready (or why it is
not): it returns only once the mount serves requests, and a failed mount
leaves nothing mounted.  The daemon:

1. takes ``REPO/run/daemon.lock`` (flock): one daemon per repository;
2. cleans a stale mount left at the mount point by a killed daemon
   (``fusermount3 -uz``), and orphaned inodes from the previous run;
3. mounts, serves the control socket, and on SIGTERM/SIGINT or
   ``jiaozifuse umount`` flushes every open file and unmounts.

Logs go to ``REPO/run/daemon.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import JiaoziError

log = logging.getLogger("jiaozifuse.daemon")

#: Seconds between group commits of metadata changes.
COMMIT_INTERVAL = 0.05
#: The longest an idle daemon's group commit, trigger runner and event
#: forwarder sleep (they are woken by writes; this is only a bound).
IDLE_WAKE = 1.0


@dataclass
class MountOptions:
    repo: Path
    mountpoint: Path
    foreground: bool = False
    allow_other: bool = False
    read_only: bool = False
    branch: str | None = None
    debug: bool = False
    lazy_close: bool = False
    commit: str | None = None
    metrics_addr: str | None = None
    #: poll for the next FUSE request this long after each reply (0: off)
    busy_poll_us: int = 100
    #: chunks fetched from the remote leave the page cache once this many MiB
    #: more were fetched (0: never; see chunklog.DropBehind); twice fs.READAHEAD
    drop_behind_mib: int = 128
    #: fetch the next files of a directory walked on a cold cache (dirahead.py)
    dir_readahead: bool = True


def _mounted(mnt: Path) -> bool:
    target = str(mnt)
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 1 and parts[1].replace("\\040", " ") == target:
                return True
    return False


def _check_mountpoint(mnt: Path) -> None:
    try:
        st = mnt.stat()
    except FileNotFoundError:
        raise JiaoziError(f"mount point {mnt} does not exist", errno.ENOENT) from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:  # a stale FUSE mount: the daemon died
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
            return _check_mountpoint(mnt)
        raise
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode):
        raise JiaoziError(f"mount point {mnt} is not a directory", errno.ENOTDIR)
    if _mounted(mnt):
        # A killed daemon leaves its mount behind; the kernel may still answer
        # stat() from its caches, but statfs always asks the daemon.
        try:
            os.statvfs(mnt)
        except OSError as exc:
            if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
                if not _mounted(mnt):
                    return
        raise JiaoziError(f"{mnt} is already a mount point", errno.EBUSY)


def start(opts: MountOptions) -> None:
    """Mount, in the background unless *opts.foreground*; return once ready."""
    from .repo import Repository

    _check_mountpoint(opts.mountpoint)
    Repository.open(opts.repo).close()  # a clear error now rather than in the child
    if not os.path.exists("/dev/fuse"):
        raise JiaoziError("/dev/fuse is missing: load the fuse module or, in a container, "
                          "pass --device /dev/fuse", errno.ENODEV)
    if opts.foreground:
        serve(opts, ready_fd=None)
        return
    rfd, wfd = os.pipe()
    run_dir = opts.repo / "run"
    run_dir.mkdir(exist_ok=True)
    logf = open(run_dir / "daemon.log", "ab")
    args = [sys.executable, "-m", "jiaozifuse.daemon", "--ready-fd", str(wfd),
            "--options", json.dumps({k: str(v) if isinstance(v, Path) else v
                                     for k, v in asdict(opts).items()})]
    proc = subprocess.Popen(args, pass_fds=(wfd,), stdin=subprocess.DEVNULL, stdout=logf,
                            stderr=logf, start_new_session=True, close_fds=True)
    os.close(wfd)
    logf.close()
    with os.fdopen(rfd, "rb") as r:
        line = r.readline().decode(errors="replace").strip()
    if line == "ready":
        return
    proc.wait(timeout=30)
    raise JiaoziError(line.removeprefix("error: ") if line else
                      f"the mount daemon exited with status {proc.returncode}; see "
                      f"{run_dir / 'daemon.log'}")


def stop(mnt: Path, lazy: bool = False, timeout: float = 60.0) -> None:
    """Flush and unmount the jiaozifuse mount at *mnt*."""
    from . import control

    if not _mounted(mnt):
        raise JiaoziError(f"{mnt} is not mounted", errno.EINVAL)
    info: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((mnt / ".jiaozifuse-mount").read_text())
    pid = info.get("pid")
    repo = info.get("repo")
    deadline = time.monotonic() + timeout
    asked = False
    if repo:
        with contextlib.suppress(FileNotFoundError, OSError, JiaoziError):
            control.call(Path(repo), "shutdown", {}, timeout=timeout)
            asked = True
    # Wait for the daemon only if it was reached; a dead one leaves a stale mount.
    while asked and _mounted(mnt) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _mounted(mnt):
        cmd = ["fusermount3", "-uz" if lazy else "-u", str(mnt)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise JiaoziError(f"cannot unmount {mnt}: {res.stderr.strip() or 'busy'}",
                              errno.EBUSY)
    if pid:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


# ------------------------------------------------------------------ daemon side


class _Lock:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise JiaoziError(f"another jiaozifuse daemon serves {path.parent.parent}",
                              errno.EBUSY) from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())


def serve(opts: MountOptions, ready_fd: int | None) -> None:
    """Run the mount in this process until unmounted or signalled."""
    import pyfuse3
    import trio

    from .fs import Ops
    from .repo import Repository

    def tell(msg: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, (msg + "\n").encode())
                os.close(ready_fd)
            ready_fd = None

    logging.basicConfig(
        level=logging.DEBUG if opts.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        run_dir = opts.repo / "run"
        run_dir.mkdir(exist_ok=True)
        lock = _Lock(run_dir / "daemon.lock")
        _check_mountpoint(opts.mountpoint)
        repo = Repository.open(opts.repo)
        repo.store.use_commit_thread()
        repo.store.begin_batch()
        orphans = repo.worktree.clean_orphans()
        if orphans:
            log.info("removed %d orphaned inodes left by the previous run", orphans)
        info = {"repo": str(opts.repo), "pid": os.getpid(), "mountpoint": str(opts.mountpoint),
                "branch": opts.branch, "commit": opts.commit}
        ops = Ops(repo, read_only=opts.read_only or bool(opts.commit), info=info,
                  lazy_close=opts.lazy_close, branch=opts.branch, commit=opts.commit)
        if opts.metrics_addr:
            from .metrics import Metrics

            ops.metrics = Metrics(repo)
            try:
                ops.metrics.serve(opts.metrics_addr)
            except (OSError, ValueError) as exc:
                raise JiaoziError(f"cannot serve metrics on {opts.metrics_addr}: {exc}") from None
        options = set(pyfuse3.default_options)
        options |= {"fsname=jiaozifuse", "subtype=jiaozifuse"}
        if opts.allow_other:
            options.add("allow_other")
        if opts.read_only or opts.commit:
            options.add("ro")
        pyfuse3.init(ops, str(opts.mountpoint), options)
    except JiaoziError as exc:
        tell(f"error: {exc}")
        raise SystemExit(1) from None
    except Exception as exc:  # report why, then fail
        log.exception("mount failed")
        tell(f"error: mount failed: {exc}")
        raise SystemExit(1) from None

    sock_path = run_dir / "control.sock"
    try:
        if not opts.dir_readahead:
            ops.dir_ahead = None
        if len(os.sched_getaffinity(0)) >= 2:  # see poll.py
            ops.poller.window = opts.busy_poll_us / 1e6
        trio.run(_main, ops, sock_path, tell, str(opts.mountpoint), opts.drop_behind_mib << 20)
    except BaseException:
        log.exception("daemon failed")
        raise
    finally:
        with contextlib.suppress(Exception):
            repo.worktree.flush_all()
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        with contextlib.suppress(Exception):
            repo.close()
        del lock
        remote = repo._remote  # None unless the repository has a remote
        log.info("unmounted %s; request counts: %s; S3 requests: %s", opts.mountpoint,
                 ops.stats, getattr(remote, "requests", 0))


async def _main(ops: Any, sock_path: Path, tell: Any, mountpoint: str,
                drop_behind: int) -> None:
    import pyfuse3
    import trio

    from . import chunklog, control, writeback
    from . import ops as opsmod

    repo = ops.repo
    token = trio.lowlevel.current_trio_token()
    dirty = [trio.Event()]  # set when the batch becomes dirty (see group_commit)
    committed = trio.lowlevel.ParkingLot()  # woken after each group commit

    def on_dirty() -> None:  # any thread: Store.write
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(lambda: dirty[0].set())

    repo.store.on_dirty = on_dirty
    wb: writeback.Writeback | None = None
    if repo.config.get("remote"):
        wb = writeback.Writeback(
            repo.store, lambda: repo.remote, repo.is_ancestor_committed,
            repo.config.get("cache_size"), repo.access,
        )
        wb.metrics = ops.metrics
        fetch_limit = trio.CapacityLimiter(8)
        inflight: dict[bytes, trio.Event] = {}
        behind = chunklog.DropBehind(drop_behind) if drop_behind else None

        async def drop_cached(locs: list[bytes]) -> None:
            try:
                await trio.to_thread.run_sync(repo.store.log.drop_cached, locs)
            except Exception as exc:  # advice only
                log.debug("dropping fetched chunks from the page cache: %s", exc)

        async def fetcher(ids: list[bytes]) -> None:
            """Fetch chunks; a chunk already being fetched is waited for, not fetched twice."""
            mine = [c for c in dict.fromkeys(ids) if c not in inflight]
            waits = [inflight[c] for c in dict.fromkeys(ids) if c in inflight]
            done = trio.Event()
            for c in mine:
                inflight[c] = done
            got: dict[bytes, int] = {}  # id -> length
            try:
                if mine:
                    remote = repo.remote  # built at start-up, in a thread
                    # fetched, verified and written to the chunk log in a worker
                    # thread; the trio thread records only the locators
                    got, locs = await trio.to_thread.run_sync(
                        writeback.fetch_to_log, repo.store, remote, mine, limiter=fetch_limit)
                    await repo.store.ready_async()  # a commit in flight: wait, not block
                    with repo.store.write() as w:
                        unused = writeback.store_fetched_locs(w, locs)
                        writeback.record_moved(w, repo.store)  # copies found for a gone pack
                    repo.store.log.discard(unused)
                    gone = set(unused)
                    kept = {c: v for c, v in locs.items() if v not in gone}
                    repo.store.note_fresh(kept)
                    old = behind.add(kept.values()) if behind else None
                    if old and ops.nursery is not None:
                        ops.nursery.start_soon(drop_cached, old)
                    repo.mark_verified(got)  # fetch_chunks checked every id
            finally:
                # waiters wake only once the chunks are stored (or the fetch failed)
                for c in mine:
                    inflight.pop(c, None)
                done.set()
            for ev in waits:
                await ev.wait()
            for cid in got:
                repo.access.touch(cid)
            if ops.metrics is not None:
                ops.metrics.cache_misses.inc(len(got))
                ops.metrics.read_bytes.labels("remote").inc(sum(got.values()))

        ops.fetcher = fetcher
        ops.make_room = wb.poke

        async def checkpoint() -> None:
            await ops.settle_all()  # no background chunking may run under a flush
            repo.checkpoint()

        wb.checkpoint = checkpoint

    async def trigger_loop() -> None:
        """Run triggers for new events; the event is acknowledged after its triggers."""
        from . import triggers

        runner = triggers.Runner(repo)
        limiter = trio.CapacityLimiter(2)
        while True:
            try:
                items = runner.pending(50)
            except Exception:
                log.exception("cannot read pending events")
                items = []
            if not items:
                with trio.move_on_after(IDLE_WAKE):
                    await committed.park()  # new events come with a group commit
                continue
            # An acknowledgement covers every event up to its seq, so a run of
            # events no rule matched (nearly all of them) takes one write.
            unacked = 0
            for ev, rules in items:
                if not rules:
                    unacked = ev["seq"]
                    continue
                for rule in rules:
                    result = await trio.to_thread.run_sync(
                        triggers.execute, rule, ev, str(repo.path), limiter=limiter)
                    triggers.record(repo, ev, rule, result)
                    if ops.metrics is not None:
                        ops.metrics.trigger_runs.labels("ok" if result.ok else "failed").inc()
                    if not result.ok:
                        log.warning("trigger %s failed for event %d: %s", rule.name,
                                    ev["seq"], result.error)
                repo.events.ack(triggers.CONSUMER, ev["seq"])
                unacked = 0
                # a trigger ran: make its record and the acknowledgement durable
                # now; events no rule matched ride on the group commit.
                await repo.store.commit_async()
            if unacked:
                repo.events.ack(triggers.CONSUMER, unacked)

    async def forward_loop(fwd: Any) -> None:
        """Send events to the broker; acknowledged in the log only once sent."""
        backoff = 1.0
        while True:
            events = fwd.pending(500)
            if not events:
                with trio.move_on_after(IDLE_WAKE):
                    await committed.park()
                continue
            try:
                await trio.to_thread.run_sync(fwd.send, events)
            except Exception as exc:  # broker down: keep the events, retry later
                log.warning("event forwarding failed (retrying in %.0f s): %s", backoff, exc)
                await trio.sleep(backoff)
                backoff = min(60.0, backoff * 2)
                continue
            backoff = 1.0
            repo.events.ack("redis", events[-1]["seq"])  # durable with the group commit

    async def run_op(name: str, args: dict) -> Any:
        """Operations that wait on the remote run here, without blocking FUSE."""
        if name == "sync":
            if wb is None:
                raise JiaoziError("this repository has no remote")
            # Uncommitted work too: the checkpoint (set above whenever there
            # is a remote) flushes open files and names the worktree's tree,
            # so that what sync made durable can be recovered by a clone.
            if wb.checkpoint is not None:
                await wb.checkpoint()
            before = wb.sent_bytes
            await wb.drain()
            return {"packs": 0, "bytes": wb.sent_bytes - before, "refs": 0}
        if name == "triggers_run":
            return {"handled": 0, "note": "the mount daemon runs triggers by itself"}
        if name == "commit":
            # The pre-commit triggers run in a worker thread, so that the mount
            # keeps serving (a hook may read the very files being committed).
            from . import triggers

            branch = args.get("branch") or repo.default_branch
            prep = repo.prepare_commit(branch, bool(args.get("allow_empty")))
            for rule, event in triggers.pre_commit_jobs(repo, branch, prep.changed):
                await trio.to_thread.run_sync(
                    triggers.check_pre_commit, rule, event, str(repo.path))
            cid = repo.finish_commit(prep, args["message"], args.get("meta") or {})
            result = {"branch": branch, **opsmod.commit_dict(cid, repo.get_commit(cid))}
            if not args.get("wait"):
                return result
            await repo.store.commit_async()
            if wb is None:
                raise JiaoziError("this repository has no remote")
            await wb.drain()
            for c in repo.remote_status()["conflicts"]:
                if c["ref"] == f"branch/{result['branch']}":
                    raise JiaoziError(
                        f"branch {result['branch']}: the remote moved to {c['remote'][:12]} "
                        f"while this cache committed {c['local'][:12]}; run 'jiaozifuse "
                        f"fetch' and merge remote/{result['branch']}", errno.EBUSY)
            result["remote_durable"] = True
            return result
        result = opsmod.run(repo, name, args)
        if wb is not None:
            wb.poke()
        return result

    async def handle(conn: trio.SocketStream) -> None:
        # A client that goes away before its reply (killed, timed out) must
        # never take the daemon down: the op itself is done either way.
        try:
            await _handle(conn)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("control client went away before its reply: %s", exc)

    async def _handle(conn: trio.SocketStream) -> None:
        async with conn:
            try:
                uid = control.peer_uid(conn.socket)  # type: ignore[arg-type]
            except OSError:
                return
            if not control.allowed(uid):
                await conn.send_all(control.encode_reply(
                    error=JiaoziError("permission denied", errno.EACCES)))
                return
            buf = bytearray()
            while not buf.endswith(b"\n"):
                data = await conn.receive_some(1 << 16)
                if not data:
                    return
                buf += data
                if len(buf) > control.MAX_REQUEST:
                    return
            try:
                req = json.loads(buf)
                name, args = req["op"], req.get("args", {})
                if name == "shutdown":
                    await conn.send_all(control.encode_reply({"stopping": True}))
                    nursery.cancel_scope.cancel()
                    return
                await ops.settle_all()
                result = await run_op(name, args)
                await ops.repo.store.commit_async()
                reply = control.encode_reply(result)
            except JiaoziError as exc:
                reply = control.encode_reply(error=exc)
            except Exception as exc:
                logging.getLogger("jiaozifuse.control").exception("control op failed")
                reply = control.encode_reply(error=JiaoziError(f"internal error: {exc}",
                                                               errno.EIO))
            await ops.apply_invalidations()
            await conn.send_all(reply)

    async def serve_control(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(str(sock_path))
        finally:
            os.umask(old)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(handle, [listener])

    async def signals(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as it:
            task_status.started()
            async for _ in it:
                log.info("signal received: flushing and unmounting")
                nursery.cancel_scope.cancel()
                return

    async def group_commit() -> None:
        # Metadata changes (mkdir, rename, chmod...) become durable within
        # COMMIT_INTERVAL even when no close or fsync comes.  An idle daemon
        # does not tick: the loop sleeps until a write makes the batch dirty
        # (Store.on_dirty), then commits COMMIT_INTERVAL later.  Every write
        # either makes a clean batch dirty or lands in a dirty one whose
        # commit is already coming, so a cycle follows every write; the
        # trigger runner and the forwarder wait for the cycles (`committed`)
        # instead of polling the event log.  IDLE_WAKE bounds the sleep all
        # the same.  With metrics on, the loop ticks (it refreshes their lag
        # gauges).
        ticks = 0
        store = ops.repo.store
        seen = store.commits
        while True:
            if ops.metrics is None and not store.batch_dirty:
                dirty[0] = trio.Event()
                with trio.move_on_after(IDLE_WAKE):
                    await dirty[0].wait()
            await trio.sleep(COMMIT_INTERVAL)
            try:
                await store.commit_async()
            except JiaoziError as exc:
                log.error("group commit failed: %s", exc)
            if store.commits != seen:  # this cycle's commit, or a close's meanwhile
                seen = store.commits
                committed.unpark_all()
            ticks += 1
            if ops.metrics is not None and ticks % 20 == 0:
                ops.metrics.refresh_lag()

    async def unmap_read_pages() -> None:
        # Chunk reads (FUSE reads, upload packing) leave LMDB's file pages
        # mapped in this process: page cache, but counted in its RSS (see
        # Store.release_mapped_pages).  Its own task: a group commit can
        # take a while under heavy writes, and so can the upload planning
        # that touches most pages.  The limit counts from the file pages
        # mapped at start-up (Python's and the libraries' own code, about
        # 70 MiB), or it would unmap, and parse /proc/self/maps, every tick.
        base = _rss_file()
        while True:
            await trio.sleep(UNMAP_INTERVAL)
            if _rss_file() > base + RSS_FILE_LIMIT:
                ops.repo.store.release_mapped_pages()

    async def fuse_main() -> None:
        await pyfuse3.main(min_tasks=1, max_tasks=16)
        # returns when the filesystem was unmounted from outside
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        await nursery.start(signals)
        await nursery.start(serve_control)
        ops.nursery = nursery
        nursery.start_soon(fuse_main)
        nursery.start_soon(group_commit)
        if ops.poller.window > 0:
            nursery.start_soon(ops.poller.run)
        nursery.start_soon(unmap_read_pages)
        nursery.start_soon(trio.to_thread.run_sync, _raise_read_ahead, mountpoint)
        nursery.start_soon(trigger_loop)
        from .archive_policy import archive_loop  # archive policy: Filecoin write-back

        nursery.start_soon(archive_loop, repo)
        if wb is not None:
            # Build the S3 client off the FUSE thread before the first cache miss needs it.
            nursery.start_soon(trio.to_thread.run_sync, lambda: repo.remote)
        from .forward import RedisForwarder

        fwd = RedisForwarder.from_config(repo.events, repo.config)
        if fwd is not None:
            nursery.start_soon(forward_loop, fwd)
        if wb is not None:
            nursery.start_soon(wb.run)
        tell("ready")


#: how often the daemon checks its mapped LMDB pages: the bulk of the data
#: (large files' chunks, fetched chunks) is read with pread from the chunk
#: log, so the map grows slowly, and reading /proc/self/status costs a few ms
UNMAP_INTERVAL = 0.5
#: LMDB file pages mapped in the daemon (beyond those mapped at start-up)
#: above which it unmaps them (they stay cached)
RSS_FILE_LIMIT = 64 << 20
#: the kernel's readahead window for the mount (its backing device's read_ahead_kb)
READ_AHEAD_KB = 4096


def _raise_read_ahead(mountpoint: str) -> None:
    """Let the kernel read ahead 4 MiB, in requests of up to 1 MiB, on this mount.

    A FUSE mount's backing device starts with a 128 KiB readahead window, so
    a sequential reader costs one round trip per 128 KiB however large its
    reads: about 8,000 requests per GiB, each a trip through pyfuse3 and
    trio.  Writes already arrive in 1 MiB requests (libfuse negotiates 256
    pages), and with a larger window reads do too.  Needs root (sysfs);
    otherwise the default stays and nothing else changes.

    Runs in a worker thread once the FUSE loop runs: the kernel sets the
    window from the INIT exchange (never above 128 KiB), so it can only be
    raised after that, and the stat() below returns only once INIT is done
    (it is answered by this daemon's own loop, hence not on the trio thread).
    """
    try:
        st = os.stat(mountpoint)
        dev = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        (Path("/sys/class/bdi") / dev / "read_ahead_kb").write_text(str(READ_AHEAD_KB))
        log.info("readahead of the mount set to %d KiB", READ_AHEAD_KB)
    except OSError as exc:
        log.info("readahead of the mount left at the kernel's default: %s", exc)


def _rss_file() -> int:
    """Bytes of file-backed pages mapped in this process (RssFile), 0 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="jiaozifuse-daemon")
    p.add_argument("--ready-fd", type=int, default=None)
    p.add_argument("--options", required=True)
    a = p.parse_args(argv)
    raw = json.loads(a.options)
    raw["repo"] = Path(raw["repo"])
    raw["mountpoint"] = Path(raw["mountpoint"])
    serve(MountOptions(**raw), a.ready_fd)


if __name__ == "__main__":
    main()
