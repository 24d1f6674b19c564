"""Piece commitments: the published vectors, the native helper against pure Python,
and @web3-storage/data-segment (an independent implementation) on random payloads."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from jiaozifuse import commp
from jiaozifuse.commp import (
    CHUNK_IN,
    CommP,
    Piece,
    ThreadedCommP,
    commp_bytes,
    commp_file,
    max_payload,
    padded_piece_size,
    parse_piece_cid,
    zero_comm,
)

QUADS = b"".join(bytes([i]) * 127 for i in range(4))

# FRC-0069 "Test Cases" (payload -> v1, v2)
VECTORS = [
    (QUADS, "baga6ea4seaqes3nobte6ezpp4wqan2age2s5yxcatzotcvobhgcmv5wi2xh5mbi",
     "bafkzcibcaaces3nobte6ezpp4wqan2age2s5yxcatzotcvobhgcmv5wi2xh5mbi"),
    (b"", None, "bafkzcibcp4bdomn3tgwgrh3g532zopskstnbrd2n3sxfqbze7rxt7vqn7veigmy"),
    (bytes(127), "baga6ea4seaqdomn3tgwgrh3g532zopskstnbrd2n3sxfqbze7rxt7vqn7veigmy",
     "bafkzcibcaabdomn3tgwgrh3g532zopskstnbrd2n3sxfqbze7rxt7vqn7veigmy"),
    (bytes(128), None, "bafkzcibcpybwiktap34inmaex4wbs6cghlq5i2j2yd2bb2zndn5ep7ralzphkdy"),
    (QUADS + bytes(127 * 4), "baga6ea4seaqn42av3szurbbscwuu3zjssvfwbpsvbjf6y3tukvlgl2nf5rha6pa",
     "bafkzcibcaac542av3szurbbscwuu3zjssvfwbpsvbjf6y3tukvlgl2nf5rha6pa"),
    (QUADS + bytes(4), "baga6ea4seaqn42av3szurbbscwuu3zjssvfwbpsvbjf6y3tukvlgl2nf5rha6pa",
     "bafkzcibd7abqlxticxolgseegik2stpfgkkuwyf6kufex3doorkvmzpjuxwe4dz4"),
    (QUADS + bytes(5), "baga6ea4seaqn42av3szurbbscwuu3zjssvfwbpsvbjf6y3tukvlgl2nf5rha6pa",
     "bafkzcibd64bqlxticxolgseegik2stpfgkkuwyf6kufex3doorkvmzpjuxwe4dz4"),
]


@pytest.fixture(params=["native", "python"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setenv("JIAOZIFUSE_COMMP_NATIVE", "0")
    elif commp.native_kind() == "python":
        pytest.skip("no C compiler here: only the pure-Python CommP runs")
    return request.param


@pytest.mark.parametrize(("payload", "v1", "v2"), VECTORS)
def test_frc0069_vectors(impl: str, payload: bytes, v1: str | None, v2: str) -> None:
    p = commp_bytes(payload)
    if v1:
        assert p.cid_v1 == v1
    assert p.cid_v2 == v2
    ref = parse_piece_cid(v2)
    assert ref.matches(p)
    assert (ref.padded_size, ref.payload_size) == (p.padded_size, len(payload))


def test_zero_piece_127_bytes() -> None:
    """The 127-byte zero piece: no padding, height 2 (a 128-byte piece)."""
    p = commp_bytes(bytes(127))
    assert (p.padded_size, p.height, p.padding) == (128, 2, 0)
    assert p.root == zero_comm(2)


@pytest.mark.parametrize(("size_gib", "v1", "v2"), [
    (32, "baga6ea4seaqao7s73y24kcutaosvacpdjgfe5pw76ooefnyqw4ynr3d2y6x2mpq",
     "bafkzcibcaapao7s73y24kcutaosvacpdjgfe5pw76ooefnyqw4ynr3d2y6x2mpq"),
    (64, "baga6ea4seaqomqafu276g53zko4k23xzh4h4uecjwicbmvhsuqi7o4bhthhm4aq",
     "bafkzcibcaap6mqafu276g53zko4k23xzh4h4uecjwicbmvhsuqi7o4bhthhm4aq"),
])
def test_empty_sector_pieces(size_gib: int, v1: str, v2: str) -> None:
    """Zero subtrees are never hashed: their roots per level must be the published ones."""
    padded = size_gib << 30
    p = Piece(zero_comm(padded.bit_length() - 1 - 5), padded // 128 * 127, padded)
    assert (p.cid_v1, p.cid_v2) == (v1, v2)
    assert parse_piece_cid(v1).root == p.root


def test_sizes() -> None:
    assert padded_piece_size(0) == 128
    assert padded_piece_size(127) == 128
    assert padded_piece_size(128) == 256
    assert padded_piece_size(254) == 256
    assert padded_piece_size(255) == 512
    assert padded_piece_size((1 << 30) // 128 * 127) == 1 << 30
    assert padded_piece_size((1 << 30) // 128 * 127 + 1) == 2 << 30
    assert max_payload(1 << 30) == (1 << 30) // 128 * 127
    assert max_payload(1000 << 20) == (512 << 20) // 128 * 127  # rounded down to 2**n
    with pytest.raises(ValueError):
        max_payload(100)
    with pytest.raises(ValueError):
        parse_piece_cid("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku")


def test_native_matches_python(monkeypatch: pytest.MonkeyPatch) -> None:
    if commp.native_kind() == "python":
        pytest.skip("no C compiler here")
    rnd = random.Random(1)
    sizes = [1, 126, 127, 128, 4000, CHUNK_IN - 1, CHUNK_IN, CHUNK_IN + 1, CHUNK_IN + 127 * 3]
    payloads = [rnd.randbytes(n) for n in sizes]
    native = [commp_bytes(p) for p in payloads]
    monkeypatch.setenv("JIAOZIFUSE_COMMP_NATIVE", "0")
    assert [commp_bytes(p) for p in payloads] == native


def test_portable_c_path(tmp_path: Path) -> None:
    """The C helper without SHA extensions (what non-x86 machines run) agrees too."""
    if commp.native_kind() == "python":
        pytest.skip("no C compiler here")
    script = (
        "import random, sys\n"
        "from jiaozifuse import commp\n"
        "assert commp.native_kind() == 'c', commp.native_kind()\n"
        "d = random.Random(2).randbytes(commp.CHUNK_IN + 999)\n"
        "print(commp.commp_bytes(d).cid_v1)\n"
    )
    env = {**os.environ, "JIAOZIFUSE_COMMP_SHANI": "0"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = random.Random(2).randbytes(CHUNK_IN + 999)
    assert out.stdout.strip() == commp_bytes(d).cid_v1


@pytest.mark.parametrize("size", [100, CHUNK_IN - 5, 2 * CHUNK_IN + 4097])
def test_replace_first_bytes(size: int) -> None:
    """A CAR's header is patched after the fact: piece(first=...) must equal a fresh hash."""
    data = bytearray(random.Random(size).randbytes(size))
    t = ThreadedCommP()
    for i in range(0, size, 1 << 20):
        t.write(bytes(data[i : i + (1 << 20)]))
    c = t.close()
    data[:60] = b"R" * 60
    assert c.piece(bytes(data[: min(size, CHUNK_IN)])) == commp_bytes(bytes(data))


def test_commp_file(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(CHUNK_IN + 5)
    (tmp_path / "x").write_bytes(data)
    c = CommP()
    c.write(data[:10])
    c.write(data[10:])
    assert commp_file(tmp_path / "x") == c.piece()


def test_against_data_segment(node, tmp_path: Path) -> None:
    """@web3-storage/data-segment computes the same v1 and v2 piece CIDs."""
    rnd = random.Random(4)
    sizes = [65, 127, 128, 1000, 65536, 1 << 20, CHUNK_IN + 1]
    files = []
    for n in sizes:
        f = tmp_path / f"p{n}"
        f.write_bytes(rnd.randbytes(n))
        files.append(f)
    theirs = node("commp", *files)
    for f, t in zip(files, theirs, strict=True):
        ours = commp_file(f)
        assert (ours.cid_v1, ours.cid_v2) == (t["v1"], t["v2"]), f
        assert (ours.padded_size, ours.padding, ours.height) == (
            t["size"], t["padding"], t["height"])


def test_many_subtrees_against_data_segment(node, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Streaming over many subtrees (odd counts, a tail, zero siblings at each level),
    with the subtree size shrunk to 32 quads so that data-segment stays quick."""
    monkeypatch.setattr(commp, "CHUNK_QUADS", 32)
    monkeypatch.setattr(commp, "CHUNK_IN", 32 * 127)
    monkeypatch.setattr(commp, "CHUNK_LEVEL", 7)
    chunk = 32 * 127
    rnd = random.Random(5)
    sizes = [chunk * k + extra for k in (1, 2, 3, 5, 6, 7, 9, 13) for extra in (0, 1, 700)]
    files = []
    for n in sizes:
        f = tmp_path / f"p{n}"
        f.write_bytes(rnd.randbytes(n))
        files.append(f)
    theirs = node("commp", *files)
    for f, t in zip(files, theirs, strict=True):
        data = f.read_bytes()
        c = CommP()
        for i in range(0, len(data), 1000):
            c.write(data[i : i + 1000])
        ours = c.piece()
        assert (ours.cid_v1, ours.cid_v2) == (t["v1"], t["v2"]), f
