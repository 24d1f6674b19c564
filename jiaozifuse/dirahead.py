"""Readahead across files, for a reader walking a directory on a cold cache.

Why: ``cp -r``, ``tar``, ``rsync``, ``du``-like scans that read, and data
loaders that do not shuffle read a directory's files one after another, each
from its start, in listing order.  With an empty chunk cache each small file
is then a GET of its own, and the reader waits for every one: a 64 KiB file
costs a round trip to S3, as much as a GET of megabytes.  Once a reader is
seen taking a directory's files in listing order, the chunks of the files
that come next are fetched before they are opened.  They were uploaded side
by side (a writer's files go into packs in the order they were stored), so
the fetcher's coalescing (``writeback._requests``) turns a window of files
into a few ranged GETs.

What counts as walking: a first read (offset 0) of a file that is one of the
next two entries after the file last first-read in that directory.  One more
than the next, because a listing interleaves subdirectories and symlinks the
walker does not read; "the next two" still keeps a shuffled reader out: in
a directory of n files it hits them by chance about 2/n of the time, and a
window is only started once it did so on a miss.  The window starts at
:data:`START_FILES` files and doubles at each step up to :data:`MAX_FILES`;
the next step starts when the reader reaches the middle of the last one, as
the kernel's own readahead does within a file.  A window also ends once its
files hold *step_bytes* (``fs.READAHEAD_STEP``: one or two GETs), so that the
next one starts where the last really ended.

This module knows nothing of FUSE or of the store: positions are whatever
orders the directory's listing (a snapshot tree's entry index, a branch
directory's dirent sequence number), and the caller passes a function that
lists the entries after a position.

Concurrency: called on the trio thread only (no locks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

#: files in the first window, and the most in one
START_FILES = 8
MAX_FILES = 256
#: directories whose walks are remembered (least recently read ones forgotten)
MAX_DIRS = 64

T = TypeVar("T")


@dataclass(slots=True)
class _Walk:
    last: int  # the position of the file first-read last
    ahead_to: int = -1  # the last position a window covered (-1: none started)
    trigger: int = -1  # reaching this position starts the next window
    window: int = START_FILES


class DirReadahead(Generic[T]):
    """Decides which following files to fetch when a directory is walked."""

    def __init__(self, step_bytes: int = 32 << 20, max_dirs: int = MAX_DIRS) -> None:
        self._walks: OrderedDict[Hashable, _Walk] = OrderedDict()
        self._step_bytes = step_bytes
        self._max_dirs = max_dirs

    def watching(self, key: Hashable) -> bool:
        """Whether reads in directory *key* are being followed (cheap: a dict)."""
        return key in self._walks

    def first_read(self, key: Hashable, pos: int, missed: bool,
                   after: Callable[[int, int], list[tuple[int, T | None, int]]]
                   ) -> list[T]:
        """A file at *pos* of directory *key* is read from its start.

        *missed*: some of its chunks were not cached.  ``after(p, n)`` lists
        up to *n* (position, item, size) of the entries after position *p*,
        in listing order, item None for an entry that is not a regular file;
        it should be cheap (no file contents loaded).  Returns the items of
        the files to fetch ahead now (often none).  A directory is only
        followed from its first miss on, so a warm cache costs nothing here.
        """
        walk = self._walks.get(key)
        if walk is None:
            if missed:
                self._walks[key] = _Walk(pos)
                while len(self._walks) > self._max_dirs:
                    self._walks.popitem(last=False)
            return []
        self._walks.move_to_end(key)
        nearby = [row[0] for row in after(walk.last, 2)] if pos > walk.last else []
        walk.last = pos
        if pos not in nearby:  # a seek in the listing: start over
            walk.ahead_to = walk.trigger = -1
            walk.window = START_FILES
            return []
        if walk.ahead_to >= 0 and pos < walk.trigger:
            return []  # inside a window already asked for
        if walk.ahead_to < 0 and not missed:
            return []  # walking a cached stretch: nothing to start
        rows = []
        total = 0
        for row in after(max(pos, walk.ahead_to), walk.window):
            rows.append(row)
            total += row[2] if row[1] is not None else 0
            if total >= self._step_bytes:
                break
        if not rows:
            walk.ahead_to = walk.trigger = 1 << 62  # the end of the listing
            return []
        walk.ahead_to = rows[-1][0]
        walk.trigger = rows[len(rows) // 2][0]
        walk.window = min(MAX_FILES, walk.window * 2)
        return [item for _, item, _ in rows if item is not None]
