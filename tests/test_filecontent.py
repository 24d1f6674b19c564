"""Editable file content (jiaozifuse/filecontent.py) against a bytearray model.

Promises checked: every read equals the model whatever the history of writes,
truncates, holes and save/reload; saving hands over exactly the chunks and
objects needed to read the file back; and the manifest id of a file without
holes depends only on its bytes (canonical), with multi-segment files forced by
small SEG_AVG/SEG_MAX.
"""

from __future__ import annotations

import random

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jiaozifuse import filecontent as fcmod
from jiaozifuse.chunking import MAX_SIZE, ZERO_ID, chunk_and_hash, hash_bytes
from jiaozifuse.errors import Corrupt
from jiaozifuse.filecontent import HOLE_MIN, FileContent
from jiaozifuse.objects import EMPTY_MANIFEST_ID, decode_manifest, encode_manifest, object_id

KiB = 1024
MiB = 1024 * KiB


class Store:
    """A dict-backed chunk and object store, as the worktree provides."""

    def __init__(self) -> None:
        self.chunks: dict[bytes, bytes] = {}
        self.objects: dict[bytes, bytes] = {}

    def content(self, manifest_id: bytes = EMPTY_MANIFEST_ID) -> FileContent:
        return FileContent(self.chunks.get, self.objects.get, manifest_id,
                           read_into=self.read_into)

    def read_into(self, spans: list, out: memoryview) -> list[int]:
        """The buffer form, as the repository's: it fills what it can and
        leaves the rest (here a third of the chunks, by id) to the chunk by
        chunk path, so reads mix both."""
        left = []
        for i, (cid, n, lo, hi, dst) in enumerate(spans):
            data = self.chunks.get(cid)
            if data is None or len(data) != n or cid[0] % 3 == 0:
                left.append(i)
                continue
            out[dst : dst + hi - lo] = data[lo:hi]
        return left

    def save(self, fc: FileContent) -> bytes:
        mid, objects, chunks = fc.encode()
        for cid, data in chunks.items():
            assert hash_bytes(data) == cid, "a handed-over chunk does not match its id"
            self.chunks.setdefault(cid, bytes(data))
        for oid, data in objects.items():
            assert object_id(data) == oid
            self.objects.setdefault(oid, data)
        assert fc.manifest_id == mid
        assert not fc.pending, "encode() must hand over every pending chunk"
        return mid


def fresh(data: bytes) -> tuple[bytes, list]:
    """Manifest id and chunk list of *data* written in one go into a new file."""
    s = Store()
    fc = s.content()
    fc.write(0, data)
    return s.save(fc), fc.chunk_ids()


def pseudo(seed: int, n: int) -> bytes:
    return blake3.blake3(seed.to_bytes(8, "little")).digest(length=n)


def make_data(kind: str, seed: int, n: int) -> bytes:
    if kind == "random":
        return pseudo(seed, n)
    if kind == "zeros":
        return bytes(n)
    # low-entropy: a short pattern repeated (chunks at MAX_SIZE, repeated ids)
    pat = pseudo(seed, 1 + seed % 7)
    return (pat * (n // len(pat) + 1))[:n]


def split_write(fc: FileContent, off: int, data: bytes) -> None:
    """write() as the fs layer does it: prepare, chunk elsewhere, finish."""
    plan = fc.prepare_write(off, data)
    if plan is not None:
        pieces = list(chunk_and_hash(plan.buf))
        fc.finish_write(plan, pieces)


def check_full(fc: FileContent, model: bytearray) -> None:
    assert fc.size == len(model)
    assert fc.read(0, len(model) + 10) == bytes(model)
    entries = fc.chunk_ids()
    assert sum(n for _, n in entries) == len(model)
    # ZERO runs of length 0 are tolerated here: see test_truncate_at_hole_start_*
    assert all(n > 0 for cid, n in entries if cid != ZERO_ID)
    assert all(n <= MAX_SIZE for cid, n in entries if cid != ZERO_ID)


# ------------------------------------------------------------- simple facts


def test_empty_file():
    s = Store()
    fc = s.content()
    assert fc.size == 0
    assert fc.read(0, 100) == b""
    assert fc.chunk_ids() == []
    mid, objects, chunks = fc.encode()
    assert mid == EMPTY_MANIFEST_ID
    assert objects == {} and chunks == {}


def test_small_file_single_chunk_manifest():
    s = Store()
    fc = s.content()
    fc.write(0, b"hello jiaozifuse\n")
    mid = s.save(fc)
    cid = hash_bytes(b"hello jiaozifuse\n")
    assert fc.chunk_ids() == [(cid, 17)]
    assert mid == object_id(encode_manifest(0, [(cid, 17)]))
    assert s.chunks == {cid: b"hello jiaozifuse\n"}
    again = s.content(mid)
    assert again.size == 17
    assert again.read(6, 100) == b"jiaozifuse\n"
    assert again.read(17, 5) == b""
    assert again.read(100, 5) == b""


def test_write_far_beyond_eof_makes_a_zero_run():
    s = Store()
    fc = s.content()
    fc.write(5 * MiB, b"tail")
    assert fc.size == 5 * MiB + 4
    assert fc.chunk_ids() == [(ZERO_ID, 5 * MiB), (hash_bytes(b"tail"), 4)]
    mid = s.save(fc)
    assert s.chunks == {hash_bytes(b"tail"): b"tail"}, "a hole stores no data"
    again = s.content(mid)
    assert again.read(5 * MiB - 3, 10) == b"\0\0\0tail"
    assert again.read(MiB, 16) == bytes(16)


def test_small_gap_is_written_as_zeros():
    s = Store()
    fc = s.content()
    fc.write(0, b"a")
    fc.write(HOLE_MIN - 10, b"b")
    assert ZERO_ID not in {cid for cid, _ in fc.chunk_ids()}
    assert fc.read(0, HOLE_MIN) == b"a" + bytes(HOLE_MIN - 10 - 1) + b"b"
    assert fresh(fc.read(0, fc.size))[0] == s.save(fc)


def test_truncate_grow_and_shrink():
    s = Store()
    fc = s.content()
    fc.truncate(3 * MiB)
    assert fc.chunk_ids() == [(ZERO_ID, 3 * MiB)]
    assert fc.read(3 * MiB - 2, 10) == b"\0\0"
    fc.write(MiB, b"x" * 10)
    fc.truncate(MiB + 5)
    assert fc.read(MiB - 1, 100) == b"\0xxxxx"
    fc.truncate(0)
    assert fc.size == 0 and fc.chunk_ids() == []
    assert s.save(fc) == EMPTY_MANIFEST_ID


def test_truncate_at_hole_start_leaves_no_empty_entry():
    s = Store()
    fc = s.content()
    fc.truncate(300 * KiB)  # written as zeros (below HOLE_MIN)
    fc.truncate(300 * KiB + HOLE_MIN)  # a ZERO run
    fc.truncate(300 * KiB)  # back to the boundary between the two
    assert fc.read(0, fc.size) == bytes(300 * KiB)
    assert all(n > 0 for _, n in fc.chunk_ids()), fc.chunk_ids()[-2:]


def test_missing_chunk_is_corrupt():
    s = Store()
    fc = s.content()
    fc.write(0, pseudo(1, 100_000))
    mid = s.save(fc)
    s.chunks.clear()
    with pytest.raises(Corrupt):
        s.content(mid).read(0, 10)


def test_missing_manifest_is_corrupt():
    with pytest.raises(Corrupt):
        Store().content(hash_bytes(b"no such manifest"))


def test_one_byte_edit_rewrites_one_segment(monkeypatch):
    """Cost grows with the change: a small edit re-encodes one segment and the top."""
    monkeypatch.setattr(fcmod, "SEG_AVG", 4)
    monkeypatch.setattr(fcmod, "SEG_MAX", 8)
    s = Store()
    fc = s.content()
    data = pseudo(7, 6 * MiB)
    fc.write(0, data)
    s.save(fc)
    assert len(fc.segs) >= 4
    fc2 = s.content(fc.manifest_id)
    fc2.write(3 * MiB, b"!")
    _, objects, chunks = fc2.encode()
    assert len(objects) <= 3  # at most two segments (a cut may move) plus the top
    assert len(chunks) <= 3
    unloaded = [seg for seg in fc2.segs if seg.entries is None]
    assert unloaded, "segments far from the edit are never loaded"
    assert decode_manifest(objects[fc2.manifest_id])[0] == 1


# ------------------------------------------------------------ model testing
#
# Hypothesis draws small integers far more often than large ones, so sizes are
# drawn as (size class, seed) and the exact number comes from random.Random(seed).

_LENGTHS = {"tiny": (1, 100), "chunk": (100, 80 * KiB), "big": (200 * KiB, 600 * KiB)}
_GAPS = {"gap": (1, 200 * KiB), "hole": (HOLE_MIN, HOLE_MIN + MiB)}


def _pick(rng: tuple[int, int], seed: int) -> int:
    return random.Random(seed).randint(*rng)


_seed = st.integers(0, 2**32)
_offset = st.tuples(st.sampled_from(["at", "at", "eof", "gap", "hole"]), _seed)
_length = st.tuples(st.sampled_from(list(_LENGTHS)), _seed)
_kind = st.sampled_from(["random", "random", "zeros", "pattern"])
_write = st.tuples(st.just("write"), _offset, _length, _kind, _seed)
_truncate = st.tuples(
    st.just("truncate"), st.tuples(st.sampled_from(["at", "at", "grow", "hole", "zero"]), _seed)
)
_ops = st.lists(
    st.one_of(_write, _write, _write, _truncate, st.just(("save",)), st.just(("reload",))),
    min_size=2, max_size=10,
)
_segs = st.sampled_from([(4, 3), (2, 5), (8, 64), (1024, 4096)])


def _offset_of(spec, size: int) -> int:
    kind, seed = spec
    if kind == "at":
        return random.Random(seed).randint(0, size)
    if kind == "eof":
        return size
    return size + _pick(_GAPS[kind], seed)


def _truncate_to(spec, size: int) -> int:
    kind, seed = spec
    if kind == "at":
        return random.Random(seed).randint(0, size)
    if kind == "zero":
        return 0
    if kind == "grow":
        return size + _pick((1, 300 * KiB), seed)
    return size + _pick((HOLE_MIN, HOLE_MIN + 512 * KiB), seed)


def run_model(ops, seg) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fcmod, "SEG_AVG", seg[0])
        mp.setattr(fcmod, "SEG_MAX", seg[1])
        s = Store()
        fc = s.content()
        model = bytearray()
        had_hole = False  # a ZERO run was made since the file was last emptied
        rnd = random.Random(len(ops))
        for op in ops:
            if op[0] == "write":
                _, spec, nspec, kind, seed = op
                off = _offset_of(spec, len(model))
                n = nspec[1] if nspec[0] == "exact" else _pick(_LENGTHS[nspec[0]], nspec[1])
                data = make_data(kind, seed, n)
                if off - len(model) >= HOLE_MIN:
                    had_hole = True
                if seed % 2:
                    split_write(fc, off, data)
                else:
                    fc.write(off, data)
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off : off + n] = data
            elif op[0] == "truncate":
                size = _truncate_to(op[1], len(model))
                if size - len(model) >= HOLE_MIN:
                    had_hole = True
                fc.truncate(size)
                if size <= len(model):
                    del model[size:]
                else:
                    model.extend(bytes(size - len(model)))
                if size == 0:
                    had_hole = False
            elif op[0] == "save":
                mid = s.save(fc)
                if not had_hole:
                    assert mid == fresh(bytes(model))[0], "manifest id is not canonical"
            else:  # reload from what was saved so far
                mid = s.save(fc)
                fc = s.content(mid)
            # reads of the whole file and of a few random ranges
            check_full(fc, model)
            for _ in range(3):
                a = rnd.randrange(len(model) + 2)
                n = rnd.choice([1, 100, 70_000, 1 << 20])
                assert fc.read(a, n) == bytes(model[a : a + n])
            if not had_hole:
                expected = [(cid, len(p)) for cid, p in chunk_and_hash(bytes(model))]
                assert fc.chunk_ids() == expected, "chunk list is not canonical"
        mid = s.save(fc)
        reloaded = s.content(mid)
        check_full(reloaded, model)
        if not had_hole:
            assert mid == fresh(bytes(model))[0], "manifest id is not canonical"


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ops=_ops, seg=_segs)
def test_model(ops, seg):
    run_model(ops, seg)


_hole_free_write = st.tuples(
    st.just("write"), st.tuples(st.sampled_from(["at", "at", "eof", "gap"]), _seed),
    _length, st.sampled_from(["random", "random", "pattern", "zeros"]), _seed,
)
_hole_free_truncate = st.tuples(st.just("truncate"),
                                st.tuples(st.sampled_from(["at", "grow"]), _seed))


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    first=_seed,
    edits=st.lists(st.one_of(_hole_free_write, _hole_free_write, _hole_free_truncate,
                             st.just(("reload",))), min_size=1, max_size=6),
    seg=_segs,
)
def test_canonical_after_edits(first, edits, seg):
    """Hole-free files: the manifest id depends only on the bytes."""
    n = _pick((1, 3 * MiB), first)
    run_model([("write", ("eof", 0), ("exact", n), "random", first), *edits], seg)


@pytest.mark.parametrize("seg", [(4, 3), (2, 5)])
def test_canonical_many_small_appends(seg, monkeypatch):
    """Appending in 1 MiB pieces (as the kernel writes) gives the one-shot manifest."""
    monkeypatch.setattr(fcmod, "SEG_AVG", seg[0])
    monkeypatch.setattr(fcmod, "SEG_MAX", seg[1])
    data = pseudo(99, 5 * MiB + 333)
    s = Store()
    fc = s.content()
    for off in range(0, len(data), MiB):
        fc.write(off, data[off : off + MiB])
        if off == 2 * MiB:
            fc = s.content(s.save(fc))
    assert s.save(fc) == fresh(data)[0]
    assert len(fc.segs) > 3


@pytest.mark.parametrize("seg", [(4, 3), (1024, 4096)])
def test_canonical_insert_then_undo(seg, monkeypatch):
    """Overwrite a range and put the original bytes back: same id as before."""
    monkeypatch.setattr(fcmod, "SEG_AVG", seg[0])
    monkeypatch.setattr(fcmod, "SEG_MAX", seg[1])
    data = pseudo(5, 4 * MiB)
    s = Store()
    fc = s.content()
    fc.write(0, data)
    before = s.save(fc)
    fc.write(MiB + 10, b"X" * 300_000)
    assert s.save(fc) != before
    fc.write(MiB + 10, data[MiB + 10 : MiB + 10 + 300_000])
    assert s.save(fc) == before
    fc.truncate(3 * MiB)
    fc.write(3 * MiB, data[3 * MiB :])
    assert s.save(fc) == before
