"""CIDs, dag-pb/UnixFS encodings and CARv1 files: known vectors, round trips, errors,
and @ipld/car + @ipld/dag-pb as independent readers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from jiaozifuse.car import (
    DAG_PB,
    RAW,
    CarError,
    CarWriter,
    cid_from_str,
    cid_str,
    cid_v1,
    iter_car,
    parse_cid,
    read_header,
    varint,
)
from jiaozifuse.unixfs import (
    FILE,
    MAX_LINKS,
    UnixFSData,
    decode_node,
    directory_node,
    file_dag,
    raw_leaf,
    symlink_node,
)


def test_known_cids() -> None:
    # the empty raw block and the empty UnixFS directory, as every IPFS tool names them
    assert cid_str(raw_leaf(b"")) == "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
    (cid, enc), tsize = directory_node([])
    assert cid_str(cid) == "bafybeiczsscdsbs7ffqz55asqdf3smv6klcw3gofszvwlyarci47bgf354"
    assert enc == bytes.fromhex("0a020801") and tsize == 4
    # CIDv0 parses too (read only)
    v0 = bytes.fromhex("1220") + hashlib.sha256(b"x").digest()
    c, end = parse_cid(v0)
    assert (c.version, c.codec, end) == (0, DAG_PB, 34)


def test_varint_and_cid_strings() -> None:
    assert varint(0) == b"\x00" and varint(127) == b"\x7f" and varint(300) == b"\xac\x02"
    cid = cid_v1(RAW, b"hello")
    assert cid_from_str(cid_str(cid)) == cid
    assert cid_from_str("f" + cid.hex()) == cid
    with pytest.raises(ValueError):
        cid_from_str("Qmxyz")


def test_unixfs_data_round_trip() -> None:
    for mtime in (None, 0, 1_700_000_000_123_456_789, -1_500_000_000, 5_000_000_000):
        d = UnixFSData(FILE, filesize=10, blocksizes=[4, 6], mode=0o644, mtime_ns=mtime)
        assert UnixFSData.decode(d.encode()) == d


def test_file_dag_shape() -> None:
    n = MAX_LINKS * MAX_LINKS + 3  # three levels
    leaves = [(raw_leaf(i.to_bytes(4, "big")), 4) for i in range(n)]
    blocks, root, tsize = file_dag(leaves, 0o100640, 1_000_000_000)
    assert blocks[-1][0] == root
    links, data = decode_node(blocks[-1][1])
    top = UnixFSData.decode(data or b"")
    assert top.filesize == 4 * n and top.mode == 0o640 and top.mtime_ns == 1_000_000_000
    assert len(links) == 2 and sum(top.blocksizes) == 4 * n
    assert all(len(decode_node(b)[0]) <= MAX_LINKS for _, b in blocks)
    assert tsize == sum(len(b) for _, b in blocks) + 4 * n
    # an empty file is a File node with no links; one chunk still gets a File node
    (_, enc), = file_dag([])[0]
    assert UnixFSData.decode(decode_node(enc)[1] or b"").filesize == 0


def _write_car(path: Path, blocks: list[tuple[bytes, bytes]]) -> list[bytes]:
    w = CarWriter(path, 1)
    for cid, data in blocks:
        w.put(cid, data)
    w.close()
    root = blocks[-1][0]
    w.patch_roots([root])
    return [root]


def _sample_blocks() -> list[tuple[bytes, bytes]]:
    leaves = [(b"x" * 1000), (b"y" * 70000)]
    blocks = [(raw_leaf(d), d) for d in leaves]
    fblocks, froot, ftsize = file_dag([(c, len(d)) for c, d in blocks], 0o100644, 7)
    (scid, senc), stsize = symlink_node(b"target", 0o120777, 8)
    (dcid, denc), _ = directory_node([(b"f", froot, ftsize), (b"l", scid, stsize)], 0o40755, 9)
    return [*blocks, *fblocks, (scid, senc), (dcid, denc)]


def test_car_round_trip(tmp_path: Path) -> None:
    blocks = _sample_blocks()
    roots = _write_car(tmp_path / "a.car", blocks)
    assert read_header(tmp_path / "a.car") == roots
    it = iter_car(tmp_path / "a.car")
    assert next(it) == roots
    got = [(b.cid.raw, b.data) for b in it]
    assert got == blocks


def test_car_against_ipld_car(node, tmp_path: Path) -> None:
    blocks = _sample_blocks()
    roots = _write_car(tmp_path / "a.car", blocks)
    doc = node("car", tmp_path / "a.car")
    assert doc["version"] == 1
    assert doc["roots"] == [cid_str(r) for r in roots]
    assert [b["cid"] for b in doc["blocks"]] == [cid_str(c) for c, _ in blocks]
    listing = node("unixfs", cid_str(roots[0]), tmp_path / "a.car")
    by_path = {e["path"]: e for e in listing}
    assert by_path["f"]["size"] == 71000 and by_path["f"]["mode"] == 0o644
    assert by_path["f"]["mtime"] == [0, 7]
    assert by_path["l"] == {"path": "l", "type": "symlink", "mode": 0o777, "mtime": [0, 8],
                            "target": "target"}
    assert by_path[""]["mode"] == 0o755


def test_truncated_car(tmp_path: Path) -> None:
    blocks = _sample_blocks()
    _write_car(tmp_path / "a.car", blocks)
    raw = (tmp_path / "a.car").read_bytes()
    (tmp_path / "t.car").write_bytes(raw[:-10])
    with pytest.raises(CarError, match=r"t\.car is truncated"):
        list(iter_car(tmp_path / "t.car"))
    (tmp_path / "h.car").write_bytes(raw[:20])
    with pytest.raises(CarError, match=r"h\.car"):
        list(iter_car(tmp_path / "h.car"))
    (tmp_path / "e.car").write_bytes(b"")
    with pytest.raises(CarError, match="empty"):
        list(iter_car(tmp_path / "e.car"))


def test_flipped_byte(tmp_path: Path) -> None:
    blocks = _sample_blocks()
    _write_car(tmp_path / "a.car", blocks)
    raw = bytearray((tmp_path / "a.car").read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside the 70 kB leaf
    (tmp_path / "f.car").write_bytes(bytes(raw))
    with pytest.raises(CarError, match=r"f\.car is corrupt: block bafkrei\w+ at offset \d+ "
                                       "does not match its hash"):
        list(iter_car(tmp_path / "f.car"))
