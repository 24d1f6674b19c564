"""CIDs and CARv1 files: the containers Filecoin pieces are made of.

What is here and why it is hand-written: unsigned varints, CIDv1 in binary and in
base32 (the ``b...`` strings every IPFS and Filecoin tool prints), and reading and
writing CARv1 (https://ipld.io/specs/transport/car/carv1/). Each is a few lines
of byte layout; a library would add a dependency and, for the CAR writer, a copy
of every block. The only hash the archive gives its blocks is sha2-256, the one
every IPFS implementation verifies.

A CARv1 file is ``varint(len) dag-cbor{"roots": [CID...], "version": 1}``
followed by blocks, each ``varint(len(cid) + len(data)) cid data``.

:class:`CarWriter` writes the header first with placeholder roots and patches
them in when the file is complete (a DAG's root is known only after its leaves
are written); every CID the archive makes is 36 bytes, so the header keeps its
length. :func:`iter_car` reads a CAR back and checks every block against its CID,
naming the file and offset of the first thing that is wrong.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cbor2

from .errors import Corrupt

# multicodec codes (https://github.com/multiformats/multicodec/blob/master/table.csv)
RAW = 0x55
DAG_PB = 0x70
DAG_CBOR = 0x71
SHA2_256 = 0x12
IDENTITY = 0x00
FIL_COMMITMENT_UNSEALED = 0xF101
SHA2_256_TRUNC254_PADDED = 0x1012
FR32_SHA256_TRUNC254_PADBINTREE = 0x1011

#: A CIDv1 with a 32-byte sha2-256 multihash: 0x01, codec (1 byte for raw,
#: dag-pb, dag-cbor), 0x12, 0x20, digest.
CID_LEN = 36


class CarError(Corrupt):
    """A CAR file that cannot be read or whose blocks do not match their CIDs."""


# ------------------------------------------------------------------- varints


def varint(n: int) -> bytes:
    """Unsigned LEB128, as multiformats and CAR use it."""
    if n < 0:
        raise ValueError("varint of a negative number")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode a varint at *pos*; return (value, position after it)."""
    n = shift = 0
    for i in range(pos, min(len(buf), pos + 10)):
        b = buf[i]
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, i + 1
        shift += 7
    raise ValueError("truncated or overlong varint")


# ---------------------------------------------------------------------- CIDs


def cid_v1(codec: int, data: bytes | memoryview) -> bytes:
    """The CIDv1 (sha2-256) of a block's bytes, in binary."""
    return cid_from_digest(codec, hashlib.sha256(data).digest())


def cid_from_digest(codec: int, digest: bytes, mh_code: int = SHA2_256) -> bytes:
    return b"\x01" + varint(codec) + varint(mh_code) + varint(len(digest)) + digest


@dataclass(frozen=True, slots=True)
class Cid:
    """A decoded CIDv1 (or CIDv0, read only)."""

    version: int
    codec: int
    mh_code: int
    digest: bytes
    raw: bytes

    def __str__(self) -> str:
        return cid_str(self.raw)


def parse_cid(raw: bytes | memoryview, pos: int = 0) -> tuple[Cid, int]:
    """Decode a binary CID at *pos*; return it and the position after it."""
    if len(raw) >= pos + 34 and raw[pos] == 0x12 and raw[pos + 1] == 0x20:  # CIDv0
        end = pos + 34
        return Cid(0, DAG_PB, SHA2_256, bytes(raw[pos + 2 : end]), bytes(raw[pos:end])), end
    version, p = read_varint(raw, pos)
    if version != 1:
        raise ValueError(f"CID version {version} is not supported")
    codec, p = read_varint(raw, p)
    mh, p = read_varint(raw, p)
    size, p = read_varint(raw, p)
    if p + size > len(raw):
        raise ValueError("truncated CID")
    return Cid(1, codec, mh, bytes(raw[p : p + size]), bytes(raw[pos : p + size])), p + size


def cid_str(raw: bytes) -> str:
    """Multibase base32 (lower case, no padding): the ``b...`` form."""
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def cid_from_str(text: str) -> bytes:
    """Binary CID from its base32 (``b...``) or base16 (``f...``) string."""
    if text.startswith("b"):
        body = text[1:].upper()
        try:
            raw = base64.b32decode(body + "=" * (-len(body) % 8))
        except ValueError:
            raise ValueError(f"{text!r} is not a base32 CID") from None
    elif text.startswith("f"):
        try:
            raw = bytes.fromhex(text[1:])
        except ValueError:
            raise ValueError(f"{text!r} is not a base16 CID") from None
    else:
        raise ValueError(f"{text!r}: only base32 (b...) and base16 (f...) CIDs are supported")
    cid, end = parse_cid(raw)
    if end != len(raw):
        raise ValueError(f"{text!r} has bytes after its CID")
    return cid.raw


def verify_block(cid: Cid, data: bytes | memoryview) -> bool:
    """True if *data* hashes to *cid* (sha2-256 and identity are supported)."""
    if cid.mh_code == SHA2_256:
        return hashlib.sha256(data).digest() == cid.digest
    if cid.mh_code == IDENTITY:
        return bytes(data) == cid.digest
    raise ValueError(f"multihash 0x{cid.mh_code:x} is not supported")


# -------------------------------------------------------------- CAR header


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | extra]) + n.to_bytes(size, "big")
    raise ValueError("too large for CBOR")


def cbor_link(cid: bytes) -> bytes:
    """A CID as dag-cbor encodes it: tag 42 over a byte string 0x00 + CID."""
    return b"\xd8\x2a" + _cbor_head(2, len(cid) + 1) + b"\x00" + cid


def encode_header(roots: list[bytes]) -> bytes:
    """The CARv1 header: varint length, then dag-cbor ``{roots, version: 1}``."""
    body = b"\xa2" + b"\x65roots" + _cbor_head(4, len(roots))
    body += b"".join(cbor_link(r) for r in roots)
    body += b"\x67version\x01"
    return varint(len(body)) + body


def decode_header(body: bytes) -> list[bytes]:
    """Roots of a CARv1 header body (the dag-cbor map, without its length)."""
    try:
        doc = cbor2.loads(body)
    except Exception as exc:
        raise ValueError(f"undecodable header: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != 1:
        version = doc.get("version") if isinstance(doc, dict) else None
        raise ValueError(f"not a CARv1 header (version {version!r})")
    roots = doc.get("roots")
    if not isinstance(roots, list):
        raise ValueError("CAR header without roots")
    out = []
    for r in roots:
        if not (isinstance(r, cbor2.CBORTag) and r.tag == 42 and isinstance(r.value, bytes)
                and r.value[:1] == b"\x00"):
            raise ValueError("CAR header root is not a CID")
        out.append(r.value[1:])
    return out


# ------------------------------------------------------------------ writing


class CarWriter:
    """Write one CARv1 file, block by block, with buffered I/O.

    *nroots* fixes the header size: the roots themselves are given to
    :meth:`finish` (36-byte CIDs). Every byte written is also handed to
    *observer* (the piece commitment is computed as the file is written).
    """

    BUF = 4 << 20

    def __init__(self, path: Path, nroots: int,
                 observer: Callable[[bytes], None] | None = None) -> None:
        self.path = path
        self.nroots = nroots
        self.header = encode_header([bytes(CID_LEN)] * nroots)
        self._f: BinaryIO | None = open(path, "wb")
        self._buf = bytearray(self.header)
        self._observer = observer
        self.size = len(self.header)
        self.blocks = 0

    def entry_size(self, cid: bytes, n: int) -> int:
        """Bytes a block of *n* bytes takes in the file."""
        return len(varint(len(cid) + n)) + len(cid) + n

    def put(self, cid: bytes, data: bytes | memoryview) -> None:
        self._buf += varint(len(cid) + len(data))
        self._buf += cid
        if len(data) >= self.BUF:
            self._flush()
            self._write(bytes(data))
        else:
            self._buf += data
            if len(self._buf) >= self.BUF:
                self._flush()
        self.size += self.entry_size(cid, len(data))
        self.blocks += 1

    def _write(self, data: bytes) -> None:
        assert self._f is not None
        self._f.write(data)
        if self._observer is not None:
            self._observer(data)

    def _flush(self) -> None:
        if self._buf:
            self._write(bytes(self._buf))
            self._buf = bytearray()

    def close(self) -> None:
        """Write what is buffered and close the file (the header is patched later)."""
        if self._f is not None:
            self._flush()
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def patch_roots(self, roots: list[bytes]) -> bytes:
        """Write the real roots over the placeholder header; return the new header."""
        if len(roots) != self.nroots or any(len(r) != CID_LEN for r in roots):
            raise ValueError("roots do not fit the reserved header")
        header = encode_header(roots)
        assert len(header) == len(self.header)
        with open(self.path, "r+b") as f:
            f.write(header)
            f.flush()
            os.fsync(f.fileno())
        self.header = header
        return header


# ------------------------------------------------------------------ reading


@dataclass(slots=True)
class CarBlock:
    cid: Cid
    data: bytes
    offset: int


def read_header(path: Path) -> list[bytes]:
    """Roots of the CAR at *path*."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    try:
        n, p = read_varint(head, 0)
        if p + n > len(head):
            raise ValueError("header longer than the file")
        return decode_header(head[p : p + n])
    except ValueError as exc:
        raise CarError(f"{path}: {exc}") from None


def iter_car(path: Path, observer: Callable[[bytes | memoryview], None] | None = None,
             verify: bool = True) -> Iterator[CarBlock | list[bytes]]:
    """Yield the header's roots, then every block of the CAR at *path*.

    Every block is checked against its CID (unless *verify* is false); a block
    that does not match, an unsupported hash, or a file that ends inside a
    block raises :class:`CarError` naming the file and the offset. Every byte
    read is handed to *observer* in order (for the piece commitment), so the
    file is read once.
    """
    name = str(path)
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise CarError(f"cannot read {name}: {exc.strerror}") from None
    with f:
        buf = bytearray()
        base = 0  # file offset of buf[0]
        eof = False

        def fill(need: int) -> bool:
            nonlocal eof
            while len(buf) < need and not eof:
                data = f.read(max(CarWriter.BUF, need - len(buf)))
                if not data:
                    eof = True
                    break
                if observer is not None:
                    observer(data)
                buf.extend(data)
            return len(buf) >= need

        fill(16)
        if not buf:
            raise CarError(f"{name} is empty, not a CAR file")
        try:
            hlen, p = read_varint(buf, 0)
        except ValueError:
            raise CarError(f"{name}: not a CAR file (bad header length)") from None
        if hlen > 1 << 20 or not fill(p + hlen):
            raise CarError(f"{name}: not a CAR file or truncated in its header")
        try:
            roots = decode_header(bytes(buf[p : p + hlen]))
        except ValueError as exc:
            raise CarError(f"{name}: {exc}") from None
        yield roots
        pos = p + hlen
        while True:
            # compact the buffer now and then so it does not grow without bound
            if pos > CarWriter.BUF:
                del buf[:pos]
                base += pos
                pos = 0
            if not fill(pos + 1):
                return
            fill(pos + 10)
            try:
                n, q = read_varint(buf, pos)
            except ValueError:
                raise CarError(f"{name} is truncated or corrupt at offset {base + pos} "
                               "(bad block length)") from None
            if n == 0 or n > 1 << 31:
                raise CarError(f"{name} is corrupt at offset {base + pos}: "
                               f"block length {n}")
            if not fill(q + n):
                raise CarError(
                    f"{name} is truncated: the block at offset {base + pos} needs "
                    f"{q + n - pos} bytes, the file ends {len(buf) - pos} bytes after it")
            block = bytes(buf[q : q + n])
            try:
                cid, end = parse_cid(block)
            except ValueError as exc:
                raise CarError(f"{name} is corrupt at offset {base + pos}: {exc}") from None
            data = block[end:]
            if verify:
                try:
                    ok = verify_block(cid, data)
                except ValueError as exc:
                    raise CarError(f"{name}: block {cid} at offset {base + pos}: {exc}") from None
                if not ok:
                    raise CarError(
                        f"{name} is corrupt: block {cid} at offset {base + pos} does not "
                        "match its hash")
            yield CarBlock(cid, data, base + pos)
            pos = q + n


__all__ = [
    "CID_LEN", "DAG_CBOR", "DAG_PB", "RAW", "SHA2_256", "CarBlock", "CarError", "CarWriter",
    "Cid", "cbor_link", "cid_from_str", "cid_str", "cid_v1", "encode_header", "iter_car",
    "parse_cid", "read_header", "varint",
]
