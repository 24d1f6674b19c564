"""Content-defined chunking and content ids.

Chunk boundaries come from FastCDC (pyfastcdc, compiled with Cython: about
2 GB/s here, where a pure-Python FastCDC manages 15 MB/s).  Sizes follow Xet:
16 KiB minimum, 64 KiB average, 256 KiB maximum.  The parameters and the
library version are part of the repository format: a different chunker gives
different boundaries, which is harmless for correctness but defeats dedup
against existing data, so they are pinned.

Ids are blake3-256 digests.  A chunk's id is the hash of its bytes alone; an
object's id is the hash of its encoding including the type byte (see
objects.py), so a chunk and an object can never share an id by accident of
content.
"""

from __future__ import annotations

from collections.abc import Iterator

import blake3
from pyfastcdc.cy import FastCDC

MIN_SIZE = 16 * 1024
AVG_SIZE = 64 * 1024
MAX_SIZE = 256 * 1024
ID_LEN = 32

#: The id standing for "this many zero bytes": holes in sparse files and
#: zero-extension by truncate are stored as no data at all.
ZERO_ID = b"\0" * ID_LEN

_cdc = FastCDC(avg_size=AVG_SIZE, min_size=MIN_SIZE, max_size=MAX_SIZE)


def hash_bytes(data: bytes | memoryview) -> bytes:
    """blake3-256 of *data*."""
    return blake3.blake3(data).digest()


def cut(data: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    """Return (offset, length) of each chunk of *data*.

    Every boundary but the last is content-defined; the last chunk ends where
    *data* ends.  Callers that stream keep the last chunk back and cut again
    once more data has arrived, which gives the same boundaries as cutting the
    whole stream at once (a boundary depends only on the bytes since the
    previous one).
    """
    if not data:
        return []
    return [(c.offset, c.length) for c in _cdc.cut_buf(data)]


def chunk_and_hash(data: bytes | bytearray | memoryview) -> Iterator[tuple[bytes, memoryview]]:
    """Yield (id, bytes) for each chunk of *data*."""
    view = memoryview(data)
    for off, length in cut(view):
        piece = view[off : off + length]
        yield hash_bytes(piece), piece
