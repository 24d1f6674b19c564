"""An fsspec filesystem over a repository: ``jiaozi://REF/path/in/tree``.

So that pandas, PyArrow, Dask, Hugging Face ``datasets`` and anything else
that speaks fsspec can read a version of a dataset without a mount::

    import pandas as pd
    opts = {"repo": "/data/repo"}
    df = pd.read_csv("jiaozi://3f2a9c1/data/train.csv", storage_options=opts)
    table = pq.read_table("v1.0/data/part-0.parquet",
                          filesystem=fsspec.filesystem("jiaozi", repo="/data/repo"))

**URL form (a contract).**  ``jiaozi://REF/PATH``: the first component is a
ref, as ``jiaozifuse show REF:PATH`` takes it (a branch, a tag, a commit id
or a unique prefix of it, ``main~1``; ``remote/NAME`` takes two
components), the rest is the path inside that tree.  The repository is not
in the URL: it is the ``repo`` storage option, or ``$JIAOZIFUSE_REPO``
(as for the CLI).  Why not put it in the URL: a local path inside a URL
needs an escape for the ref boundary (``@`` and ``::`` are legal in file
names), fsspec caches one filesystem instance per set of options (so one
per repository, which owns one open store), and the short URLs stay the
same when the repository moves or is cloned elsewhere.  ``jiaozi://``
lists the branches and tags.

**Versions.**  A commit or a tag is read-only (writes fail with EROFS), and
every read of it gives the same bytes forever: ``ukey`` is the content id,
so fsspec's caches (``filecache::jiaozi://...``) never go stale.  A branch
is its current state, uncommitted changes included, as in the mount; a file
opened on a branch keeps reading the version it opened.  Writing
(``df.to_csv("jiaozi://main/out.csv", storage_options=opts)``) is allowed on
branches only and leaves an uncommitted change; commit it with
``jiaozifuse commit`` or :meth:`jiaozifuse.api.Repo.commit`.

Registration: the package declares the ``fsspec.specs`` entry point
``jiaozi``; importing this module also registers it, for installs without
the entry point.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import fsspec
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from . import api
from .errors import JiaoziError, NotFound

__all__ = ["JiaoziFile", "JiaoziFileSystem"]

#: fsspec's read block: large enough that a sequential reader makes few store
#: reads, small enough that a Parquet footer read does not pull a whole file.
BLOCK_SIZE = 2 << 20
#: Written data stays in memory up to this size before spilling to a temp file.
SPOOL_BYTES = 64 << 20

_TYPES = {"file": "file", "dir": "directory"}


@contextlib.contextmanager
def _oserrors(path: str) -> Iterator[None]:
    """Turn JiaoziErrors into the OSError subclasses fsspec callers catch."""
    try:
        yield
    except FileNotFoundError:
        raise
    except NotFound as exc:
        raise FileNotFoundError(errno.ENOENT, str(exc), path) from None
    except JiaoziError as exc:
        raise OSError(exc.errno, str(exc), path) from None


class JiaoziFileSystem(AbstractFileSystem):
    """fsspec access to one repository; see the module docstring for the URL form."""

    protocol = "jiaozi"
    root_marker = ""

    def __init__(self, repo: str | os.PathLike[str] | None = None, readonly: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(repo=repo, readonly=readonly, **kwargs)
        path = repo or os.environ.get("JIAOZIFUSE_REPO")
        if not path:
            raise ValueError("jiaozi:// needs the repository: pass storage_options="
                             "{'repo': PATH} or set JIAOZIFUSE_REPO")
        self.repo = api.open(path, readonly=readonly)

    # ---------------------------------------------------------------- paths

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        return super()._strip_protocol(path).lstrip("/")

    @staticmethod
    def split_ref(path: str) -> tuple[str, str]:
        """``(ref, path in tree)`` of a stripped path (``remote/NAME`` is one ref)."""
        parts = [p for p in path.split("/") if p]
        if not parts:
            return "", ""
        n = 2 if parts[0] == "remote" and len(parts) > 1 else 1
        return "/".join(parts[:n]), "/".join(parts[n:])

    def _info(self, name: str, e: api.Entry) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": name, "size": e.size if e.type == "file" else 0,
            "type": _TYPES.get(e.type, "other"), "mode": e.mode, "mtime": e.mtime_ns / 1e9,
            "id": e.id, "commit": e.commit,
        }
        return out

    # ---------------------------------------------------------------- listing

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        ref, sub = self.split_ref(path)
        if not ref:
            names = sorted(set(self.repo.branches()) | set(self.repo.tags()))
            rows = [{"name": n, "size": 0, "type": "directory"} for n in names]
            return rows if detail else names
        with _oserrors(path):
            st = self.repo.stat(ref, sub)
            if st.type != "dir":
                rows = [self._info(path, st)]
            else:
                rows = []
                for e in self.repo.scandir(ref, sub):
                    name = f"{ref}/{e.path}"
                    if e.type == "symlink":
                        rows.append(self._link_info(name, ref, e))
                    else:
                        rows.append(self._info(name, e))
        return rows if detail else [r["name"] for r in rows]

    def _link_info(self, name: str, ref: str, e: api.Entry) -> dict[str, Any]:
        """A symbolic link as what it points to (as fsspec's local filesystem does)."""
        try:
            out = self._info(name, self.repo.stat(ref, e.path))
        except (JiaoziError, OSError):
            out = self._info(name, e)
        out.update(islink=True, destination=e.target)
        return out

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        ref, sub = self.split_ref(path)
        if not ref:
            return {"name": "", "size": 0, "type": "directory"}
        with _oserrors(path):
            return self._info(path, self.repo.stat(ref, sub))

    def ukey(self, path: str) -> str:
        """The content id: equal for equal bytes, and fixed for a commit's file."""
        info = self.info(path)
        return info.get("id") or super().ukey(path)

    def created(self, path: str) -> datetime:
        return self.modified(path)

    def modified(self, path: str) -> datetime:
        return datetime.fromtimestamp(self.info(path)["mtime"], UTC)

    # ---------------------------------------------------------------- reading

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None,
              autocommit: bool = True, cache_options: dict | None = None,
              **kwargs: Any) -> JiaoziFile:
        path = self._strip_protocol(path)
        ref, sub = self.split_ref(path)
        if "r" in mode:
            with _oserrors(path):
                raw = self.repo.open(ref, sub, buffering=0)
            return JiaoziFile(self, path, mode, raw=raw, block_size=block_size or BLOCK_SIZE,
                              autocommit=autocommit, cache_options=cache_options, **kwargs)
        if mode not in ("wb", "xb"):
            raise ValueError(f"jiaozi:// files open as 'rb', 'wb' or 'xb', not {mode!r}")
        self._check_branch(path, ref, sub)
        if mode == "xb" and self.exists(path):
            raise FileExistsError(errno.EEXIST, "file exists", path)
        return JiaoziFile(self, path, "wb", block_size=block_size or BLOCK_SIZE,
                          autocommit=autocommit, cache_options=cache_options, **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> bytes:
        path = self._strip_protocol(path)
        ref, sub = self.split_ref(path)
        with _oserrors(path):
            size = self.repo.stat(ref, sub).size
            lo = 0 if start is None else (start if start >= 0 else max(0, size + start))
            hi = size if end is None else (end if end >= 0 else size + end)
            if hi <= lo:
                return b""
            return self.repo.read(ref, sub, lo, hi - lo)

    # ---------------------------------------------------------------- writing

    def _check_branch(self, path: str, ref: str, sub: str) -> None:
        if ref not in self.repo.branches():
            raise OSError(errno.EROFS, f"{ref!r} is not a branch: commits and tags are "
                          "read-only snapshots", path)
        if not sub:
            raise IsADirectoryError(errno.EISDIR, "a branch root is a directory", path)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite",
                  **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        ref, sub = self.split_ref(path)
        self._check_branch(path, ref, sub)
        if mode == "create" and self.exists(path):
            raise FileExistsError(errno.EEXIST, "file exists", path)
        with _oserrors(path):
            self.repo.write(ref, sub, value)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """Directories exist through their files (as in object stores): nothing to do."""

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """See :meth:`mkdir`."""

    def rm_file(self, path: str) -> None:
        raise NotImplementedError("jiaozi:// does not delete files yet: use the mount")


class JiaoziFile(AbstractBufferedFile):
    """An open file: reads are ranges of one fixed version; writes land at close."""

    def __init__(self, fs: JiaoziFileSystem, path: str, mode: str = "rb",
                 raw: api.SnapshotFile | None = None, **kwargs: Any) -> None:
        self._raw = raw
        self._spool: Any = None
        size = raw.size if raw is not None else None
        super().__init__(fs, path, mode, size=size, **kwargs)

    def _fetch_range(self, start: int, end: int) -> bytes:
        assert self._raw is not None
        return self._raw.pread(start, end - start)

    def _initiate_upload(self) -> None:
        self._spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)

    def _upload_chunk(self, final: bool = False) -> bool:
        self.buffer.seek(0)
        shutil.copyfileobj(self.buffer, self._spool)
        if final and self.autocommit:
            self.commit()
        return True

    def commit(self) -> None:
        """Hand the written bytes to the branch (fsspec's name; not a repository commit)."""
        if self._spool is None:
            return
        ref, sub = JiaoziFileSystem.split_ref(self.path)
        self._spool.seek(0)
        try:
            with _oserrors(self.path):
                self.fs.repo.write(ref, sub, self._spool)
        finally:
            self._spool.close()
            self._spool = None

    def discard(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def close(self) -> None:
        super().close()
        if self._raw is not None:
            self._raw.close()


fsspec.register_implementation("jiaozi", JiaoziFileSystem, clobber=True)
