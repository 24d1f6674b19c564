"""Errors that reach users.

Every error a user can cause (a bad name, an unknown ref, a conflict) is a
:class:`JiaoziError`.  It carries an errno so that the FUSE layer can answer
with the right code and the CLI can print one line and exit 1 without a
traceback.  Anything else that escapes is a bug and is treated as such.
"""

from __future__ import annotations

import errno as _errno


class JiaoziError(Exception):
    """A user-facing error: one line of message, plus the errno a filesystem would give."""

    errno: int = _errno.EINVAL

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class NotFound(JiaoziError):
    errno = _errno.ENOENT


class Exists(JiaoziError):
    errno = _errno.EEXIST


class BadName(JiaoziError):
    errno = _errno.EINVAL


class Conflict(JiaoziError):
    """A compare-and-swap lost, or a merge found conflicting changes."""

    errno = _errno.EBUSY

    def __init__(self, message: str, paths: list[str] | None = None) -> None:
        super().__init__(message)
        self.paths = paths or []


class ReadOnly(JiaoziError):
    errno = _errno.EROFS


class Corrupt(JiaoziError):
    """Stored data failed verification (hash mismatch, undecodable object)."""

    errno = _errno.EIO


class StoreFull(JiaoziError):
    errno = _errno.ENOSPC


class FormatError(JiaoziError):
    """The store was written by an unknown (newer) version of jiaozifuse."""

    errno = _errno.EINVAL
