"""The cross-file readahead policy (dirahead.DirReadahead), without FUSE or S3.

A directory is a list of names; positions are indexes (as in a snapshot) or
sparse numbers (as a branch directory's dirent sequence numbers are).  The
mount-level behaviour is in tests/remote/test_dirahead_mount.py.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from jiaozifuse.dirahead import MAX_FILES, START_FILES, DirReadahead


def listing(n: int, step: int = 1, dirs: frozenset[int] = frozenset(), size: int = 1000):
    """An ``after`` over *n* entries at positions 0, step, 2*step..., files of
    *size* bytes; the entries at indexes in *dirs* are not regular files."""
    rows = [(i * step, None if i in dirs else f"f{i}", size) for i in range(n)]

    def after(pos: int, k: int) -> list[tuple[int, str | None, int]]:
        return [e for e in rows if e[0] > pos][:k]

    return [(pos, name) for pos, name, _ in rows], after


def walk(ra: DirReadahead, entries, after, miss=lambda name: True) -> list[list[str]]:
    """Read every file in listing order; return what each read asked to fetch."""
    return [ra.first_read("d", pos, miss(name), after)
            for pos, name in entries if name is not None]


def test_a_walk_fetches_ahead_in_growing_windows_and_everything_once() -> None:
    entries, after = listing(2000, step=7)
    asked = walk(DirReadahead(), entries, after)
    windows = [a for a in asked if a]
    assert asked[0] == []  # the first file alone is not a walk
    assert [len(w) for w in windows[:6]] == [START_FILES * 2 ** i for i in range(6)]
    assert max(len(w) for w in windows) == MAX_FILES
    flat = [name for w in windows for name in w]
    assert len(flat) == len(set(flat))  # nothing asked for twice
    assert set(flat) == {name for _, name in entries[2:]}  # all but the two that began it


def test_the_next_window_starts_halfway_through_the_last() -> None:
    entries, after = listing(100)
    asked = walk(DirReadahead(), entries, after)
    starts = [i for i, a in enumerate(asked) if a]
    # the first window (files 2..9) starts at file 1, the second (10..25) at
    # file 6, the middle of the first, the third at file 18, the middle of the second
    assert starts[:3] == [1, 2 + START_FILES // 2, 2 + START_FILES + START_FILES]


def test_a_shuffled_reader_is_not_followed() -> None:
    entries, after = listing(10_000)
    order = list(range(10_000))
    random.Random(5).shuffle(order)
    ra: DirReadahead = DirReadahead()
    asked = [ra.first_read("d", entries[i][0], True, after) for i in order[:2000]]
    # only a read of the file right after the last one starts anything; by chance
    # that is rare, and each start is a first window
    started = [a for a in asked if a]
    assert len(started) <= 5
    assert all(len(a) == START_FILES for a in started)


def test_entries_that_are_not_files_do_not_break_a_walk() -> None:
    entries, after = listing(60, dirs=frozenset(range(3, 60, 4)))
    asked = walk(DirReadahead(), entries, after)
    flat = [name for a in asked for name in a]
    assert set(flat) == {name for _, name in entries[2:] if name is not None}


def test_a_warm_directory_costs_nothing_and_is_not_followed() -> None:
    entries, _ = listing(50)

    def after_never(pos: int, k: int):
        raise AssertionError("listed a directory that had no miss")

    ra: DirReadahead = DirReadahead()
    assert walk(ra, entries, after_never, miss=lambda name: False) == [[]] * 50
    assert not ra.watching("d")


def test_a_walk_over_a_cached_stretch_starts_again_at_the_next_miss() -> None:
    entries, after = listing(40)
    cached = {f"f{i}" for i in range(0, 20)}
    ra: DirReadahead = DirReadahead()
    ra.first_read("d", 0, True, after)  # a miss: the directory is followed
    asked = [ra.first_read("d", pos, name not in cached, after) for pos, name in entries[1:]]
    assert not any(asked[:19])  # cached files: nothing started
    assert asked[19] and asked[19][0] == "f21"  # f20 missed: fetch from f21 on


def test_a_seek_back_starts_over() -> None:
    entries, after = listing(100)
    ra: DirReadahead = DirReadahead()
    for pos, _ in entries[:10]:
        ra.first_read("d", pos, True, after)
    assert ra.first_read("d", 3, True, after) == []  # back: not a walk
    assert ra.first_read("d", 4, True, after)[:1] == ["f5"]  # a walk again, from here


def test_the_end_of_the_listing_ends_the_walk() -> None:
    entries, after = listing(5)
    asked = walk(DirReadahead(), entries, after)
    assert [n for a in asked for n in a] == ["f2", "f3", "f4"]


def test_directories_are_followed_apart_and_the_oldest_forgotten() -> None:
    ra: DirReadahead = DirReadahead(max_dirs=2)
    _, after = listing(100)
    ra.first_read("a", 0, True, after)
    ra.first_read("b", 0, True, after)
    assert ra.first_read("a", 1, True, after)  # a's walk is its own
    ra.first_read("c", 0, True, after)  # b was read least recently
    assert ra.watching("a") and ra.watching("c") and not ra.watching("b")


def test_a_window_ends_where_its_files_fill_a_step() -> None:
    entries, after = listing(300, size=1 << 20)  # 1 MiB files, 4 MiB steps
    asked = walk(DirReadahead(step_bytes=4 << 20), entries, after)
    windows = [a for a in asked if a]
    assert max(len(w) for w in windows) == 4
    flat = [name for w in windows for name in w]
    # every file after the first two exactly once: no window skips over a stretch
    assert flat == [name for _, name in entries[2:]]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 4), st.booleans()), max_size=200),
       st.integers(1, 5), st.integers(1, 64))
def test_what_is_asked_for_lies_ahead_of_the_reader_and_is_not_asked_twice(
        steps, spacing, size_kib) -> None:
    """Random readers: mostly forward by one or two, sometimes back or further;
    files hit or miss.  Whatever they do, each window lists files after the one
    being read, in listing order, and none that an earlier window of the same
    walk (no seek since) already listed."""
    entries, after = listing(500, step=spacing, size=size_kib << 10)
    ra: DirReadahead = DirReadahead(step_bytes=256 << 10)
    i = 0
    asked_in_walk: set[str] = set()
    last = None
    for delta, missed in steps:
        i = min(max(i + delta, 0), len(entries) - 1)
        pos, _ = entries[i]
        got = ra.first_read("d", pos, missed, after)
        if last is None or not (0 < i - last <= 2):
            asked_in_walk = set()  # a seek: a new walk
        last = i
        idx = [int(n[1:]) for n in got]
        assert idx == sorted(idx) and all(j > i for j in idx)
        assert not asked_in_walk & set(got)
        asked_in_walk |= set(got)
