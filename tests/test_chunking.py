"""Content-defined chunking and chunk ids (jiaozifuse/chunking.py).

The chunker parameters and the hash are part of the repository format: the
vectors below are pinned so that a change of library, parameters or hash shows
up as a failing test instead of silently breaking dedup against old data.
"""

from __future__ import annotations

import blake3
import pytest

from jiaozifuse.chunking import (
    AVG_SIZE,
    ID_LEN,
    MAX_SIZE,
    MIN_SIZE,
    ZERO_ID,
    chunk_and_hash,
    cut,
    hash_bytes,
)

KiB = 1024
MiB = 1024 * KiB


def pseudo_random(seed: bytes, n: int) -> bytes:
    """Deterministic incompressible bytes (blake3 XOF), independent of Python's random."""
    return blake3.blake3(seed).digest(length=n)


def check_bounds(data: bytes, chunks: list[tuple[int, int]]) -> None:
    pos = 0
    for i, (off, n) in enumerate(chunks):
        assert off == pos, "chunks must be contiguous"
        assert 0 < n <= MAX_SIZE
        if i < len(chunks) - 1:
            assert n >= MIN_SIZE, f"chunk {i} of {n} bytes is below the minimum"
        pos += n
    assert pos == len(data), "chunk lengths must sum to the input length"


# ------------------------------------------------------------------ vectors


def test_sizes_are_the_pinned_format():
    assert (MIN_SIZE, AVG_SIZE, MAX_SIZE) == (16 * KiB, 64 * KiB, 256 * KiB)
    assert ID_LEN == 32
    assert ZERO_ID == bytes(32)


def test_hash_vectors():
    # The official blake3 test vector for the empty input.
    assert hash_bytes(b"").hex() == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )
    assert hash_bytes(b"hello jiaozifuse\n").hex() == (
        "e84598aa778d5f4cc39275bd87c2fe4315a1636be8db496ec1e79c1bb2b75a05"
    )
    # bytes, bytearray and memoryview hash alike
    data = b"hello jiaozifuse\n"
    assert hash_bytes(bytearray(data)) == hash_bytes(memoryview(data)) == hash_bytes(data)
    assert len(hash_bytes(data)) == ID_LEN


# The boundaries and the first ids of 1 MiB of pinned pseudo-random bytes.
VECTOR_CUTS = [
    (0, 95705), (95705, 79932), (175637, 116169), (291806, 80560), (372366, 70505),
    (442871, 50575), (493446, 45131), (538577, 97602), (636179, 68124), (704303, 93687),
    (797990, 57326), (855316, 93981), (949297, 65757), (1015054, 33522),
]
VECTOR_IDS = [
    "f53158ea2146b2146bd780cbef7870d2477fc99a7082d68788501dd8639a306e",
    "dc5369f3addf91326430575cc7a49bc85504403f8c955cba2198a57dcae0efe5",
]


def test_chunk_vector_is_stable():
    data = pseudo_random(b"jiaozifuse-chunking-vector", MiB)
    assert cut(data) == VECTOR_CUTS
    ids = [cid.hex() for cid, _ in chunk_and_hash(data)]
    assert ids[:2] == VECTOR_IDS
    # twice in a row, and from every buffer type
    assert cut(data) == VECTOR_CUTS
    assert cut(bytearray(data)) == VECTOR_CUTS
    assert cut(memoryview(data)) == VECTOR_CUTS


# ---------------------------------------------------------------- properties


def test_empty_and_small_inputs():
    assert cut(b"") == []
    assert list(chunk_and_hash(b"")) == []
    assert cut(b"x") == [(0, 1)]
    assert cut(b"x" * (MIN_SIZE - 1)) == [(0, MIN_SIZE - 1)]
    [(cid, piece)] = list(chunk_and_hash(b"abc"))
    assert bytes(piece) == b"abc"
    assert cid == hash_bytes(b"abc")


def test_zeros_cut_at_max_size():
    data = bytes(MiB + 5)
    chunks = cut(data)
    check_bounds(data, chunks)
    assert [n for _, n in chunks] == [MAX_SIZE] * 4 + [5]


@pytest.mark.parametrize("n", [MIN_SIZE, AVG_SIZE, MAX_SIZE, MAX_SIZE + 1, 3 * MiB + 17])
def test_bounds_and_sum(n):
    data = pseudo_random(b"bounds-%d" % n, n)
    chunks = cut(data)
    check_bounds(data, chunks)
    pieces = list(chunk_and_hash(data))
    assert b"".join(bytes(p) for _, p in pieces) == data
    for (cid, piece), (off, length) in zip(pieces, chunks, strict=True):
        assert len(piece) == length
        assert cid == hash_bytes(data[off : off + length])


def test_average_chunk_size_is_near_64k():
    data = pseudo_random(b"average", 8 * MiB)
    chunks = cut(data)
    check_bounds(data, chunks)
    avg = len(data) / len(chunks)
    assert 40 * KiB < avg < 110 * KiB


def test_boundaries_are_content_defined():
    """Inserting bytes near the start of 4 MiB leaves most chunk ids unchanged."""
    data = pseudo_random(b"content-defined", 4 * MiB)
    before = [cid for cid, _ in chunk_and_hash(data)]
    edited = data[:1000] + b"inserted!" * 11 + data[1000:]
    after = [cid for cid, _ in chunk_and_hash(edited)]
    common = set(before) & set(after)
    assert len(common) >= len(before) - 3, (len(common), len(before))
    # and the same when deleting bytes in the middle
    cut_out = data[: 2 * MiB] + data[2 * MiB + 777 :]
    after2 = [cid for cid, _ in chunk_and_hash(cut_out)]
    assert len(set(before) & set(after2)) >= len(before) - 3


def test_a_boundary_depends_only_on_the_bytes_since_the_previous_one():
    """Cutting from any boundary on gives the same later boundaries (streaming)."""
    data = pseudo_random(b"streaming", 2 * MiB)
    whole = cut(data)
    for k in (1, 5, len(whole) - 2):
        start = whole[k][0]
        tail = [(off + start, n) for off, n in cut(data[start:])]
        assert tail == whole[k:]
    # Streaming: cut a prefix, keep the last chunk back, cut again with more data.
    prefix = data[: MiB + 12345]
    first = cut(prefix)[:-1]
    resume = first[-1][0] + first[-1][1]
    rest = [(off + resume, n) for off, n in cut(data[resume:])]
    assert first + rest == whole
