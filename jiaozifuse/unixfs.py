"""UnixFS over dag-pb: how a commit's files look to IPFS and Filecoin tools.

Encodings (https://specs.ipfs.tech/unixfs/, https://ipld.io/specs/codecs/dag-pb/):

``PBNode``  ``Links`` (field 2, repeated) *before* ``Data`` (field 1): the
            canonical dag-pb order, which every implementation checks.
``PBLink``  ``Hash`` (1, the child's binary CID), ``Name`` (2), ``Tsize`` (3: the
            child's block plus everything below it).
``Data``    the UnixFS message inside ``PBNode.Data``: ``Type`` (1), ``Data`` (2),
            ``filesize`` (3), ``blocksizes`` (4, one varint field each, as go and
            js write them), ``mode`` (7) and ``mtime`` (8, ``{Seconds: int64,
            FractionalNanoseconds: fixed32}``) from UnixFS 1.5.

The protobuf is written by hand: three messages of a few fields, where a
protobuf runtime would cost a dependency and a schema compile.

Layout choices:

* A file's leaves are ``raw`` blocks (CIDv1, sha2-256), one per repository
  chunk, so a chunk's bytes are stored once in a CAR whatever files share it.
  Holes are leaves of zeros (one block reused). The leaves hang under a
  balanced tree of File nodes of at most 174 links each, as go-ipfs builds.
  The root always is a File node (even for one chunk), carrying mode and
  mtime.
* A directory is one Directory node, links sorted by name bytes. Very large
  directories are not HAMT-sharded (a limitation: a node over 1 MiB is legal in
  a CAR, but IPFS bitswap will not move it).
* Symlinks are Symlink nodes. FIFOs, sockets and devices have no UnixFS form
  and are left out of the UnixFS DAG (the repository's own trees, archived
  alongside, keep them).
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .car import DAG_PB, RAW, cid_v1, parse_cid, read_varint, varint

MAX_LINKS = 174

RAW_TYPE, DIRECTORY, FILE, METADATA, SYMLINK, HAMT_SHARD = range(6)

Block = tuple[bytes, bytes]  # (binary CID, data)


# ------------------------------------------------------------------ protobuf


def _key(field_no: int, wire: int) -> bytes:
    return varint(field_no << 3 | wire)


def _bytes_field(field_no: int, value: bytes) -> bytes:
    return _key(field_no, 2) + varint(len(value)) + value


def _int64(n: int) -> bytes:
    """A protobuf int64 varint (negative numbers as 10-byte two's complement)."""
    return varint(n & ((1 << 64) - 1))


@dataclass(frozen=True, slots=True)
class Link:
    cid: bytes
    name: bytes | None
    tsize: int


def encode_node(links: Iterable[Link], data: bytes | None) -> bytes:
    """A dag-pb PBNode: links first, then data."""
    out = bytearray()
    for lk in links:
        body = _bytes_field(1, lk.cid)
        if lk.name is not None:
            body += _bytes_field(2, lk.name)
        body += _key(3, 0) + varint(lk.tsize)
        out += _bytes_field(2, body)
    if data is not None:
        out += _bytes_field(1, data)
    return bytes(out)


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Decode protobuf fields as (number, wire type, value)."""
    pos = 0
    while pos < len(buf):
        key, pos = read_varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = read_varint(buf, pos)
            yield num, wire, val
        elif wire == 2:
            n, pos = read_varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated protobuf field")
            yield num, wire, buf[pos : pos + n]
            pos += n
        elif wire == 5:
            yield num, wire, int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        elif wire == 1:
            yield num, wire, int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def decode_node(buf: bytes) -> tuple[list[Link], bytes | None]:
    """Links and data of a dag-pb node."""
    links: list[Link] = []
    data = None
    for num, wire, val in _fields(buf):
        if num == 2 and wire == 2:
            assert isinstance(val, bytes)
            cid = name = None
            tsize = 0
            for n2, _w2, v2 in _fields(val):
                if n2 == 1:
                    cid = v2
                elif n2 == 2:
                    name = v2
                elif n2 == 3:
                    assert isinstance(v2, int)
                    tsize = v2
            if not isinstance(cid, bytes):
                raise ValueError("dag-pb link without a hash")
            links.append(Link(cid, name if isinstance(name, bytes) else None, tsize))
        elif num == 1 and wire == 2:
            assert isinstance(val, bytes)
            data = val
        else:
            raise ValueError(f"unexpected dag-pb field {num}")
    return links, data


@dataclass(slots=True)
class UnixFSData:
    type: int
    data: bytes | None = None
    filesize: int | None = None
    blocksizes: list[int] = field(default_factory=list)
    mode: int | None = None
    mtime_ns: int | None = None

    def encode(self) -> bytes:
        out = bytearray(_key(1, 0) + varint(self.type))
        if self.data is not None:
            out += _bytes_field(2, self.data)
        if self.filesize is not None:
            out += _key(3, 0) + varint(self.filesize)
        for b in self.blocksizes:
            out += _key(4, 0) + varint(b)
        if self.mode is not None:
            out += _key(7, 0) + varint(self.mode)
        if self.mtime_ns is not None:
            secs, frac = divmod(self.mtime_ns, 1_000_000_000)
            t = _key(1, 0) + _int64(secs)
            if frac:
                t += _key(2, 5) + frac.to_bytes(4, "little")
            out += _bytes_field(8, t)
        return bytes(out)

    @classmethod
    def decode(cls, buf: bytes) -> UnixFSData:
        d = cls(-1)
        for num, _wire, val in _fields(buf):
            if num == 1:
                assert isinstance(val, int)
                d.type = val
            elif num == 2:
                assert isinstance(val, bytes)
                d.data = val
            elif num == 3:
                assert isinstance(val, int)
                d.filesize = val
            elif num == 4:
                if isinstance(val, bytes):  # packed form
                    pos = 0
                    while pos < len(val):
                        v, pos = read_varint(val, pos)
                        d.blocksizes.append(v)
                else:
                    d.blocksizes.append(val)
            elif num == 7:
                assert isinstance(val, int)
                d.mode = val
            elif num == 8:
                assert isinstance(val, bytes)
                secs = frac = 0
                for n2, _w2, v2 in _fields(val):
                    assert isinstance(v2, int)
                    if n2 == 1:
                        secs = v2 - (1 << 64) if v2 >= 1 << 63 else v2
                    elif n2 == 2:
                        frac = v2
                d.mtime_ns = secs * 1_000_000_000 + frac
        if d.type < 0:
            raise ValueError("UnixFS data without a type")
        return d


# ------------------------------------------------------------------ builders


def _perm(mode: int | None) -> int | None:
    return None if mode is None else stat.S_IMODE(mode)


def raw_leaf(data: bytes | memoryview) -> bytes:
    """The CID of a raw leaf block."""
    return cid_v1(RAW, data)


def pb_block(links: list[Link], ufs: UnixFSData) -> tuple[Block, int]:
    """Encode a dag-pb node; return ((cid, bytes), tsize)."""
    enc = encode_node(links, ufs.encode())
    return (cid_v1(DAG_PB, enc), enc), len(enc) + sum(lk.tsize for lk in links)


def file_dag(leaves: list[tuple[bytes, int]], mode: int | None = None,
             mtime_ns: int | None = None) -> tuple[list[Block], bytes, int]:
    """A balanced tree of File nodes over raw *leaves* ``(cid, size)``.

    Returns the new dag-pb blocks (children before parents), the root CID and
    its Tsize. The root carries *mode* and *mtime_ns*.
    """
    blocks: list[Block] = []
    # level entries: (cid, tsize, filesize)
    level = [(cid, n, n) for cid, n in leaves]
    while True:
        last = len(level) <= MAX_LINKS
        nxt = []
        for i in range(0, max(len(level), 1), MAX_LINKS):
            group = level[i : i + MAX_LINKS]
            ufs = UnixFSData(FILE, filesize=sum(g[2] for g in group),
                             blocksizes=[g[2] for g in group])
            if last:
                ufs.mode, ufs.mtime_ns = _perm(mode), mtime_ns
            block, tsize = pb_block([Link(g[0], b"", g[1]) for g in group], ufs)
            blocks.append(block)
            nxt.append((block[0], tsize, ufs.filesize or 0))
        if last:
            root = nxt[0]
            return blocks, root[0], root[1]
        level = nxt


def directory_node(entries: list[tuple[bytes, bytes, int]], mode: int | None = None,
                   mtime_ns: int | None = None) -> tuple[Block, int]:
    """A Directory node over ``(name, cid, tsize)`` entries (sorted here by name)."""
    links = [Link(cid, name, tsize) for name, cid, tsize in sorted(entries)]
    return pb_block(links, UnixFSData(DIRECTORY, mode=_perm(mode), mtime_ns=mtime_ns))


def symlink_node(target: bytes, mode: int | None = None,
                 mtime_ns: int | None = None) -> tuple[Block, int]:
    return pb_block([], UnixFSData(SYMLINK, data=target, mode=_perm(mode), mtime_ns=mtime_ns))


def link_codec(cid: bytes) -> int:
    return parse_cid(cid)[0].codec


__all__ = [
    "DAG_PB", "DIRECTORY", "FILE", "MAX_LINKS", "RAW", "SYMLINK", "Block", "Link", "UnixFSData",
    "decode_node", "directory_node", "encode_node", "file_dag", "raw_leaf", "symlink_node",
]
