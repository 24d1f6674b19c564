#!/usr/bin/env python3
"""A plain pyfuse3 passthrough filesystem: the baseline jiaozifuse is measured against.

Usage: ``python scripts/bench/passthrough.py SOURCE_DIR MOUNTPOINT [--foreground]``

Why it exists: a benchmark of jiaozifuse against the local disk alone mixes two costs,
the price of going through FUSE + pyfuse3 + trio at all, and the price of jiaozifuse's
own work (chunking, hashing, metadata). This filesystem pays only the first: every
request is forwarded to the same call on SOURCE_DIR with plain ``os`` functions. It
follows the design of the passthrough example shipped with pyfuse3 (inode <-> path
table, inode numbers taken from the source filesystem, kernel writeback cache on,
entry and attribute timeouts of 0), with three deliberate differences that keep
the baseline from being slower than "the simplest reasonable pyfuse3 FS" should be:

* each ``open`` gets its own descriptor (the example shares one per inode, which
  breaks a write after a read-only open);
* a directory is listed once per ``opendir`` and served from that snapshot with
  index offsets (the example re-lists and re-stats the directory on every
  ``readdir`` call, which is quadratic on a 10k-entry directory);
* ``os.pread``/``os.pwrite`` instead of ``lseek`` + ``read``/``write``.

It always runs in the foreground (``--foreground`` is accepted for symmetry with
other mount commands); SIGTERM/SIGINT end the main loop and unmount cleanly.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import stat as stat_m
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import pyfuse3
import trio
from pyfuse3 import FUSEError

log = logging.getLogger("passthrough")


@dataclass
class _DirHandle:
    """A directory listing taken at opendir time, so readdir offsets stay stable."""

    path: str
    names: list[str] = field(default_factory=list)


def _errno_of(exc: OSError) -> FUSEError:
    return FUSEError(exc.errno or errno.EIO)


class Passthrough(pyfuse3.Operations):
    """Forward every request to the same path under ``source``."""

    # As in pyfuse3's example: lets the kernel merge small writes into pages.
    enable_writeback_cache = True

    def __init__(self, source: str) -> None:
        super().__init__()
        self._root = os.path.abspath(source)
        # inode -> set of paths (more than one with hard links)
        self._paths: dict[int, set[str]] = {pyfuse3.ROOT_INODE: {self._root}}
        self._lookups: defaultdict[int, int] = defaultdict(int)
        self._fd_inode: dict[int, int] = {}
        self._inode_fds: defaultdict[int, set[int]] = defaultdict(set)
        self._dirs: dict[int, _DirHandle] = {}
        self._next_dh = 1

    # --- inode table -----------------------------------------------------------------

    def _path(self, inode: int) -> str:
        try:
            return next(iter(self._paths[inode]))
        except (KeyError, StopIteration):
            raise FUSEError(errno.ENOENT) from None

    def _remember(self, inode: int, path: str) -> None:
        """Record one kernel lookup reference for ``inode`` reached via ``path``."""
        self._lookups[inode] += 1
        self._paths.setdefault(inode, set()).add(path)

    def _drop_path(self, path: str, inode: int) -> None:
        paths = self._paths.get(inode)
        if paths is not None and inode != pyfuse3.ROOT_INODE:
            paths.discard(path)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            left = self._lookups.get(inode, 0) - nlookup
            if left > 0:
                self._lookups[inode] = left
                continue
            self._lookups.pop(inode, None)
            if inode != pyfuse3.ROOT_INODE and not self._inode_fds.get(inode):
                self._paths.pop(inode, None)

    # --- attributes --------------------------------------------------------------------

    def _attr(self, path: str | None = None, fd: int | None = None) -> pyfuse3.EntryAttributes:
        try:
            st = os.fstat(fd) if fd is not None else os.lstat(path)  # type: ignore[arg-type]
        except OSError as exc:
            raise _errno_of(exc) from None
        return self._entry(st)

    def _entry(self, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = st.st_ino
        entry.generation = 0
        entry.entry_timeout = 0
        entry.attr_timeout = 0
        entry.st_mode = st.st_mode
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = st.st_blksize
        entry.st_blocks = st.st_blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    def _root_fix(self, entry: pyfuse3.EntryAttributes, inode: int) -> pyfuse3.EntryAttributes:
        # The kernel knows the root as inode 1 whatever the source directory's number is.
        if inode == pyfuse3.ROOT_INODE:
            entry.st_ino = pyfuse3.ROOT_INODE
        return entry

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None):
        fds = self._inode_fds.get(inode)
        if fds:
            entry = self._attr(fd=next(iter(fds)))
        else:
            entry = self._attr(path=self._path(inode))
        return self._root_fix(entry, inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx=None):
        sname = os.fsdecode(name)
        path = os.path.join(self._path(parent_inode), sname)
        entry = self._attr(path=path)
        if sname not in (".", ".."):
            self._remember(entry.st_ino, path)
        return entry

    async def setattr(self, inode: int, attr, fields, fh: int | None, ctx):
        target: int | str = fh if fh is not None else self._path(inode)
        follow = fh is not None
        try:
            if fields.update_size:
                os.truncate(target, attr.st_size)
            if fields.update_mode:
                os.chmod(target, stat_m.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                if fh is not None:
                    os.chown(target, uid, gid)
                else:
                    os.chown(target, uid, gid, follow_symlinks=False)
            if fields.update_atime or fields.update_mtime:
                old = os.stat(target) if follow else os.lstat(target)
                atime = attr.st_atime_ns if fields.update_atime else old.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else old.st_mtime_ns
                if fh is not None:
                    os.utime(target, ns=(atime, mtime))
                else:
                    os.utime(target, ns=(atime, mtime), follow_symlinks=False)
        except OSError as exc:
            raise _errno_of(exc) from None
        return await self.getattr(inode, ctx)

    async def statfs(self, ctx):
        try:
            sv = os.statvfs(self._root)
        except OSError as exc:
            raise _errno_of(exc) from None
        out = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                     "f_files", "f_ffree", "f_favail"):
            setattr(out, name, getattr(sv, name))
        out.f_namemax = sv.f_namemax
        return out

    # --- directories -------------------------------------------------------------------

    async def opendir(self, inode: int, ctx):
        path = self._path(inode)
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise _errno_of(exc) from None
        dh = self._next_dh
        self._next_dh += 1
        self._dirs[dh] = _DirHandle(path, names)
        return dh

    async def readdir(self, fh: int, start_id: int, token) -> None:
        handle = self._dirs[fh]
        for index in range(start_id, len(handle.names)):
            name = handle.names[index]
            path = os.path.join(handle.path, name)
            try:
                entry = self._entry(os.lstat(path))
            except FileNotFoundError:
                continue  # removed since opendir
            except OSError as exc:
                raise _errno_of(exc) from None
            if not pyfuse3.readdir_reply(token, os.fsencode(name), entry, index + 1):
                return
            # readdirplus: the kernel now holds a lookup reference on this entry.
            self._remember(entry.st_ino, path)

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx):
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        try:
            os.mkdir(path, mode & ~ctx.umask)
            if os.geteuid() == 0:
                os.chown(path, ctx.uid, ctx.gid)
        except OSError as exc:
            raise _errno_of(exc) from None
        entry = self._attr(path=path)
        self._remember(entry.st_ino, path)
        return entry

    async def rmdir(self, parent_inode: int, name: bytes, ctx) -> None:
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        try:
            ino = os.lstat(path).st_ino
            os.rmdir(path)
        except OSError as exc:
            raise _errno_of(exc) from None
        self._drop_path(path, ino)

    async def unlink(self, parent_inode: int, name: bytes, ctx) -> None:
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        try:
            ino = os.lstat(path).st_ino
            os.unlink(path)
        except OSError as exc:
            raise _errno_of(exc) from None
        self._drop_path(path, ino)

    async def rename(self, parent_old: int, name_old: bytes, parent_new: int,
                     name_new: bytes, flags: int, ctx) -> None:
        if flags != 0:
            raise FUSEError(errno.EINVAL)
        old = os.path.join(self._path(parent_old), os.fsdecode(name_old))
        new = os.path.join(self._path(parent_new), os.fsdecode(name_new))
        try:
            ino = os.lstat(old).st_ino
            try:
                replaced: int | None = os.lstat(new).st_ino
            except FileNotFoundError:
                replaced = None
            os.rename(old, new)
        except OSError as exc:
            raise _errno_of(exc) from None
        if replaced is not None and replaced != ino:
            self._drop_path(new, replaced)
        paths = self._paths.get(ino)
        if paths is not None:
            paths.discard(old)
            paths.add(new)
            if os.path.isdir(new):
                self._rebase_children(old, new)

    def _rebase_children(self, old: str, new: str) -> None:
        """After renaming a directory, fix the paths of everything known below it."""
        prefix = old + os.sep
        for paths in self._paths.values():
            moved = {p for p in paths if p.startswith(prefix)}
            if moved:
                paths -= moved
                paths |= {new + p[len(old):] for p in moved}

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx):
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        try:
            os.symlink(os.fsdecode(target), path)
            if os.geteuid() == 0:
                os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)
        except OSError as exc:
            raise _errno_of(exc) from None
        entry = self._attr(path=path)
        self._remember(entry.st_ino, path)
        return entry

    async def readlink(self, inode: int, ctx) -> bytes:
        try:
            return os.fsencode(os.readlink(self._path(inode)))
        except OSError as exc:
            raise _errno_of(exc) from None

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx):
        path = os.path.join(self._path(new_parent_inode), os.fsdecode(new_name))
        try:
            os.link(self._path(inode), path, follow_symlinks=False)
        except OSError as exc:
            raise _errno_of(exc) from None
        self._remember(inode, path)
        return await self.getattr(inode, ctx)

    # --- files -------------------------------------------------------------------------

    @staticmethod
    def _open_flags(flags: int) -> int:
        # With the writeback cache the kernel may read from a file opened write-only
        # (to fill partial pages) and handles O_APPEND itself.
        if flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags & ~os.O_APPEND

    def _track(self, fd: int, inode: int) -> None:
        self._fd_inode[fd] = inode
        self._inode_fds[inode].add(fd)

    async def open(self, inode: int, flags: int, ctx):
        try:
            fd = os.open(self._path(inode), self._open_flags(flags) & ~os.O_CREAT)
        except OSError as exc:
            raise _errno_of(exc) from None
        self._track(fd, inode)
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int, ctx):
        path = os.path.join(self._path(parent_inode), os.fsdecode(name))
        try:
            fd = os.open(path, self._open_flags(flags) | os.O_CREAT, mode & ~ctx.umask)
        except OSError as exc:
            raise _errno_of(exc) from None
        try:
            if os.geteuid() == 0:
                os.fchown(fd, ctx.uid, ctx.gid)
            entry = self._attr(fd=fd)
        except BaseException:
            os.close(fd)
            raise
        self._remember(entry.st_ino, path)
        self._track(fd, entry.st_ino)
        return pyfuse3.FileInfo(fh=fd), entry

    async def read(self, fh: int, off: int, size: int) -> bytes:
        try:
            return os.pread(fh, size, off)
        except OSError as exc:
            raise _errno_of(exc) from None

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            return os.pwrite(fh, buf, off)
        except OSError as exc:
            raise _errno_of(exc) from None

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        try:
            if datasync:
                os.fdatasync(fh)
            else:
                os.fsync(fh)
        except OSError as exc:
            raise _errno_of(exc) from None

    async def release(self, fh: int) -> None:
        inode = self._fd_inode.pop(fh, None)
        if inode is not None:
            fds = self._inode_fds.get(inode)
            if fds is not None:
                fds.discard(fh)
                if not fds:
                    del self._inode_fds[inode]
            if inode not in self._lookups and inode != pyfuse3.ROOT_INODE:
                self._paths.pop(inode, None)
        try:
            os.close(fh)
        except OSError as exc:
            raise _errno_of(exc) from None


async def _serve() -> None:
    """Run pyfuse3's loop until unmounted from outside or told to stop by a signal."""

    async def stop_on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: leaving the main loop", signum)
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="directory tree to mirror")
    parser.add_argument("mountpoint", help="where to mount it")
    parser.add_argument("--foreground", action="store_true",
                        help="accepted for symmetry; this program never daemonizes")
    parser.add_argument("--debug-fuse", action="store_true", help="libfuse debug output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="passthrough: %(message)s")

    if not os.path.isdir(args.source):
        parser.error(f"not a directory: {args.source}")
    options = set(pyfuse3.default_options)  # contains default_permissions
    options.add("fsname=passthrough")
    if args.debug_fuse:
        options.add("debug")

    pyfuse3.init(Passthrough(args.source), args.mountpoint, options)
    try:
        trio.run(_serve)
    except BaseException:
        pyfuse3.close(unmount=True)
        raise
    pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
