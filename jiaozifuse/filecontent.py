"""A file's bytes as an editable list of content-defined chunks.

This is the one place that knows how bytes become chunks and manifests.  Its
promises:

* **Canonical**: for the same bytes, the chunk list (and so the manifest id) is
  the same whatever sequence of writes and truncates produced them, as long as
  the file has no holes.  An edit re-chunks from the chunk boundary before it
  and goes on until a new boundary falls on an old one; from there on, the old
  boundaries are the ones a fresh chunking would find (a FastCDC boundary
  depends only on the bytes since the previous one).  Holes (sparse regions,
  zero-extension by truncate) are stored as :data:`ZERO_ID` runs, which are
  not canonical against written zeros; that only costs dedup, never bytes.
* **Cost grows with the change**: chunks are grouped into segments (level-0
  manifests) cut where a chunk id satisfies a hash rule, so a small edit
  rewrites one segment and the top manifest, never the whole list, and a
  segment that is never touched is never even loaded.
* **Lazy**: segments are loaded from the object store on first use.

FileContent is not thread-safe; the worktree serialises access per inode.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .chunking import ZERO_ID, chunk_and_hash, cut
from .errors import Corrupt
from .objects import (
    EMPTY_MANIFEST_ID,
    decode_manifest,
    encode_manifest,
    object_id,
)

#: Cut a segment after a chunk whose id's first two bytes are 0 mod this.
SEG_AVG = 1024
#: ... or after this many chunks.
SEG_MAX = 4096
#: Holes shorter than this are written as zeros (so they chunk canonically).
HOLE_MIN = 1 << 20

ChunkGetter = Callable[[bytes], bytes]
ObjectGetter = Callable[[bytes], bytes]

Entry = tuple[bytes, int]
#: (id, chunk length, lo, hi, offset in the buffer): bytes lo:hi of a chunk
Span = tuple[bytes, int, int, int, int]
#: fills spans of a buffer from the store; returns the indices it could not fill
ReadInto = Callable[[list[Span], memoryview], list[int]]


def _seg_cut(cid: bytes) -> bool:
    return cid != ZERO_ID and (cid[0] | (cid[1] << 8)) % SEG_AVG == 0


@dataclass(slots=True)
class WritePlan:
    """What :meth:`FileContent.prepare_write` hands to :meth:`FileContent.finish_write`."""

    s0: int
    s1: int
    entries: list[Entry]
    c0: int
    c1: int
    entries_before: list[Entry]
    entries_after: list[Entry]
    buf: bytearray


@dataclass(slots=True)
class Segment:
    length: int
    oid: bytes | None  # None: changed since load, must be encoded on save
    entries: list[Entry] | None = None  # None: not loaded yet
    offsets: list[int] = field(default_factory=list)  # start of each entry

    def index(self) -> None:
        offs = []
        pos = 0
        for _, n in self.entries or ():
            offs.append(pos)
            pos += n
        self.offsets = offs


class FileContent:
    """Bytes of one file version, as segments of chunks."""

    def __init__(
        self,
        get_chunk: ChunkGetter,
        get_object: ObjectGetter,
        manifest_id: bytes = EMPTY_MANIFEST_ID,
        get_chunks: Callable[[list[bytes]], list[bytes | None]] | None = None,
        read_into: ReadInto | None = None,
    ) -> None:
        self._get_chunk_stored = get_chunk
        #: several stored chunks at once (one transaction, coalesced reads)
        self._get_chunks_stored = get_chunks
        #: stored chunks' bytes straight into a read buffer (see read_buffer)
        self._read_into = read_into
        self._get_object = get_object
        #: Chunks made by edits and not yet saved to the store.
        self.pending: dict[bytes, bytes] = {}
        self.segs: list[Segment] = []
        self._seg_offs: list[int] = []
        self.manifest_id: bytes | None = manifest_id
        if manifest_id != EMPTY_MANIFEST_ID:
            level, entries = decode_manifest(self._object(manifest_id))
            if level == 0:
                seg = Segment(sum(n for _, n in entries), manifest_id, entries)
                seg.index()
                self.segs = [seg]
            elif level == 1:
                self.segs = [Segment(n, oid) for oid, n in entries]
            else:
                raise Corrupt(f"manifest {manifest_id.hex()} has unsupported level {level}")
        self._reindex()

    # ------------------------------------------------------------------ helpers

    def _object(self, oid: bytes) -> bytes:
        data = self._get_object(oid)
        if data is None:
            raise Corrupt(f"manifest {oid.hex()} is missing from the store")
        return data

    def chunk(self, cid: bytes) -> bytes:
        data = self.pending.get(cid)
        if data is None:
            data = self._get_chunk_stored(cid)
        return data

    def _reindex(self) -> None:
        offs = []
        pos = 0
        for s in self.segs:
            offs.append(pos)
            pos += s.length
        self._seg_offs = offs
        self.size = pos

    def _load(self, seg: Segment) -> list[Entry]:
        if seg.entries is None:
            assert seg.oid is not None
            level, entries = decode_manifest(self._object(seg.oid))
            if level != 0 or sum(n for _, n in entries) != seg.length:
                raise Corrupt(f"segment {seg.oid.hex()} does not match its parent manifest")
            seg.entries = entries
            seg.index()
        return seg.entries

    def _entry_bytes(self, cid: bytes, n: int) -> bytes:
        if cid == ZERO_ID:
            return bytes(n)
        data = self.chunk(cid)
        if data is None:
            raise Corrupt(f"chunk {cid.hex()} is missing from the store")
        if len(data) != n:
            raise Corrupt(f"chunk {cid.hex()} has {len(data)} bytes, manifest says {n}")
        return data

    # -------------------------------------------------------------------- reads

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.read_buffer(offset, size))

    def read_buffer(self, offset: int, size: int) -> bytearray:
        """The bytes at *offset*, in a fresh buffer the mount replies with.

        Each byte is copied once: holes are the buffer's zeros, unsaved
        chunks are copied in, stored chunks are read into it by
        ``read_into`` (one preadv per run of chunks lying end to end in the
        chunk log).  What that cannot fill (a chunk not verified since it
        was stored, one missing, a store without ``read_into``) goes the
        checked way, chunk by chunk, with its errors.
        """
        end = min(self.size, offset + size)
        if offset >= end:
            return bytearray()
        out = bytearray(end - offset)
        view = memoryview(out)
        stored: list[Span] = []
        si = bisect.bisect_right(self._seg_offs, offset) - 1
        pos = offset
        while pos < end and si < len(self.segs):
            seg = self.segs[si]
            base = self._seg_offs[si]
            entries = self._load(seg)
            ci = bisect.bisect_right(seg.offsets, pos - base) - 1
            while pos < end and ci < len(entries):
                cid, n = entries[ci]
                cstart = base + seg.offsets[ci]
                lo, hi = pos - cstart, min(n, end - cstart)
                if cid != ZERO_ID:  # a hole: the buffer's zeros already
                    data = self.pending.get(cid)
                    if data is not None and len(data) == n:
                        view[pos - offset : pos - offset + hi - lo] = memoryview(data)[lo:hi]
                    else:
                        stored.append((cid, n, lo, hi, pos - offset))
                pos = cstart + hi
                ci += 1
            si += 1
        if stored and self._read_into is not None:
            stored = [stored[i] for i in self._read_into(stored, view)]
        got: dict[bytes, bytes] = {}
        if len(stored) > 1 and self._get_chunks_stored is not None:
            ids = [c for c, _, _, _, _ in stored]
            got = {c: d for c, d in zip(ids, self._get_chunks_stored(ids), strict=True)
                   if d is not None}
        for cid, n, lo, hi, dst in stored:
            data = got.get(cid)
            if data is None or len(data) != n:
                data = self._entry_bytes(cid, n)  # the checks and errors, one chunk
            view[dst : dst + hi - lo] = memoryview(data)[lo:hi]
        view.release()
        return out

    def hole_bytes(self) -> int:
        """Bytes in holes, over the loaded segments (a file's edits load what they touch)."""
        return sum(n for s in self.segs if s.entries for cid, n in s.entries if cid == ZERO_ID)

    def ids_in_range(self, offset: int, size: int) -> list[bytes]:
        """Ids of the stored chunks that hold bytes [offset, offset+size)."""
        end = min(self.size, offset + size)
        out: list[bytes] = []
        if offset >= end:
            return out
        si = bisect.bisect_right(self._seg_offs, offset) - 1
        while si < len(self.segs) and self._seg_offs[si] < end:
            seg = self.segs[si]
            base = self._seg_offs[si]
            entries = self._load(seg)
            ci = max(0, bisect.bisect_right(seg.offsets, offset - base) - 1)
            while ci < len(entries) and base + seg.offsets[ci] < end:
                cid = entries[ci][0]
                if cid != ZERO_ID and cid not in self.pending:
                    out.append(cid)
                ci += 1
            si += 1
        return out

    def iter_pieces(self) -> Iterator[tuple[int, bytes | None]]:
        """(length, bytes) of each chunk in order; bytes is None for a hole.

        For streaming a whole file out (export, show) without materialising
        holes as zeros in memory.
        """
        for s in self.segs:
            for cid, n in self._load(s):
                yield n, (None if cid == ZERO_ID else self._entry_bytes(cid, n))

    def chunk_ids(self) -> list[Entry]:
        out: list[Entry] = []
        for s in self.segs:
            out.extend(self._load(s))
        return out

    # ------------------------------------------------------------------- edits

    def _flatten(self, s0: int, s1: int) -> list[Entry]:
        out: list[Entry] = []
        for s in self.segs[s0:s1]:
            out.extend(self._load(s))
        return out

    def _replace_segments(self, s0: int, s1: int, entries: list[Entry]) -> None:
        """Replace segments [s0, s1) by *entries*, cut canonically."""
        # Extend to the right until the last new segment ends on a natural cut
        # (or the file ends), so that the segments after it are unchanged.
        while s1 < len(self.segs) and entries and not _seg_cut(entries[-1][0]):
            entries = entries + self._load(self.segs[s1])
            s1 += 1
        new: list[Segment] = []
        cur: list[Entry] = []
        for e in entries:
            cur.append(e)
            if _seg_cut(e[0]) or len(cur) >= SEG_MAX:
                new.append(self._segment(cur))
                cur = []
        if cur:
            new.append(self._segment(cur))
        self.segs[s0:s1] = new
        self._reindex()
        self.manifest_id = None

    @staticmethod
    def _segment(entries: list[Entry]) -> Segment:
        seg = Segment(sum(n for _, n in entries), None, entries)
        seg.index()
        return seg

    def _locate(self, offset: int) -> tuple[int, int]:
        """Return (segment index, global start) of the segment holding *offset*."""
        si = max(0, bisect.bisect_right(self._seg_offs, offset) - 1)
        return si, self._seg_offs[si] if self.segs else 0

    def _rechunk(self, data: bytes | bytearray) -> list[Entry]:
        out = []
        for cid, piece in chunk_and_hash(data):
            if cid not in self.pending:
                self.pending[cid] = bytes(piece)
            out.append((cid, len(piece)))
        return out

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write *data* at *offset*, growing the file (with a hole) as needed."""
        plan = self.prepare_write(offset, data)
        if plan is not None:
            self.finish_write(plan, list(chunk_and_hash(plan.buf)))

    def prepare_write(self, offset: int, data: bytes | bytearray | memoryview) -> WritePlan | None:
        """First half of :meth:`write`: gather the bytes to re-chunk.

        The caller may chunk and hash ``plan.buf`` in another thread (it is
        pure computation) and then call :meth:`finish_write`; the content must
        not change in between.
        """
        if not data:
            return None
        if offset > self.size:
            gap = offset - self.size
            if gap >= HOLE_MIN:
                self._append_entries([(ZERO_ID, gap)])
            else:
                data = bytes(gap) + bytes(data)
                offset = self.size
        end = offset + len(data)
        if not self.segs:
            return WritePlan(0, 0, [], 0, 0, [], [], bytearray(data))
        # Segments touched: from the one holding `offset` (for an append, the
        # last) to the one holding end-1.
        s0, base = self._locate(min(offset, self.size - 1))
        s1, _ = self._locate(min(end, self.size) - 1 if end <= self.size else self.size - 1)
        s1 += 1
        entries = self._flatten(s0, s1)
        # Chunk window inside `entries`.
        starts = []
        pos = base
        for _, n in entries:
            starts.append(pos)
            pos += n
        seg_end = pos
        c0 = bisect.bisect_right(starts, min(offset, seg_end - 1)) - 1
        c1 = bisect.bisect_right(starts, min(end, seg_end) - 1)
        if end > seg_end:
            c1 = len(entries)
        ws = starts[c0]
        we = starts[c1 - 1] + entries[c1 - 1][1]
        head_id, head_n = entries[c0]
        tail_id, tail_n = entries[c1 - 1]
        buf = bytearray()
        entries_before: list[Entry] = []
        if head_id == ZERO_ID:
            if offset > ws:  # keep the hole before the edit a hole
                entries_before = [(ZERO_ID, offset - ws)]
        else:
            buf += self._entry_bytes(head_id, head_n)[: offset - ws]
        buf += data
        entries_after: list[Entry] = []
        if we > end:
            if tail_id == ZERO_ID:
                entries_after = [(ZERO_ID, we - end)]
            else:
                buf += self._entry_bytes(tail_id, tail_n)[end - starts[c1 - 1] :]
        return WritePlan(s0, s1, entries, c0, c1, entries_before, entries_after, buf)

    def finish_write(self, plan: WritePlan, pieces: list[tuple[bytes, memoryview]]) -> None:
        """Second half of :meth:`write`: splice the new chunks in and resync."""
        new: list[Entry] = []
        for cid, piece in pieces:
            if cid not in self.pending:
                self.pending[cid] = bytes(piece)
            new.append((cid, len(piece)))
        s0, s1, entries, c1 = plan.s0, plan.s1, plan.entries, plan.c1
        rest = entries[c1:]
        # Re-chunk past the edit until a new boundary meets an old one; from
        # there on the old chunks are what a fresh chunking would give.
        while new and not plan.entries_after:
            if not rest:
                if s1 < len(self.segs):
                    rest = list(self._load(self.segs[s1]))
                    s1 += 1
                    continue
                break
            nid, nn = rest[0]
            if nid == ZERO_ID:
                break
            tid, tn = new[-1]
            joined = self._entry_bytes(tid, tn) + self._entry_bytes(nid, nn)
            if cut(joined)[0][1] == tn:
                break
            new = new[:-1] + self._rechunk(joined)
            rest = rest[1:]
        self._replace_segments(
            s0, s1,
            entries[: plan.c0] + plan.entries_before + new + plan.entries_after + rest,
        )

    def _append_entries(self, entries: list[Entry]) -> None:
        if not self.segs:
            self._replace_segments(0, 0, entries)
            return
        last = len(self.segs) - 1
        self._replace_segments(last, last + 1, self._flatten(last, last + 1) + entries)

    def truncate(self, size: int) -> None:
        if size == self.size:
            return
        if size > self.size:
            gap = size - self.size
            if gap >= HOLE_MIN:
                self._append_entries([(ZERO_ID, gap)])
            else:
                self.write(self.size, bytes(gap))
            return
        if size == 0:
            self.segs = []
            self._reindex()
            self.manifest_id = None
            return
        si, base = self._locate(size - 1)
        entries = self._flatten(si, si + 1)
        pos = base
        keep: list[Entry] = []
        for cid, n in entries:
            if pos + n <= size:
                keep.append((cid, n))
            else:
                part = size - pos
                if part == 0:
                    break
                if cid == ZERO_ID:
                    keep.append((ZERO_ID, part))
                else:
                    keep.extend(self._rechunk(self._entry_bytes(cid, n)[:part]))
                break
            pos += n
        del self.segs[si + 1 :]
        self._replace_segments(si, si + 1, keep)

    # -------------------------------------------------------------------- save

    def encode(self) -> tuple[bytes, dict[bytes, bytes], dict[bytes, bytes]]:
        """Return (manifest id, new objects, new chunks) to store.

        Afterwards the content is clean: its pending chunks are handed over.
        """
        objects: dict[bytes, bytes] = {}
        for seg in self.segs:
            if seg.oid is None:
                enc = encode_manifest(0, seg.entries or [])
                seg.oid = object_id(enc)
                objects[seg.oid] = enc
        if not self.segs:
            top = EMPTY_MANIFEST_ID
        elif len(self.segs) == 1:
            top = self.segs[0].oid
        else:
            enc = encode_manifest(1, [(s.oid, s.length) for s in self.segs])
            top = object_id(enc)
            objects[top] = enc
        assert top is not None
        chunks, self.pending = self.pending, {}
        # Keep only chunks that the final content still references (edits may
        # have made and replaced some).
        if chunks:
            live = {cid for s in self.segs for cid, _ in (s.entries or ())}
            chunks = {k: v for k, v in chunks.items() if k in live}
        self.manifest_id = top
        return top, objects, chunks
