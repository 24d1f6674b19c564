"""Object encodings: manifests, trees and commits.

Every object is encoded canonically (the same content gives the same bytes on
every machine) and named by the blake3 hash of ``type byte + payload``:

``M`` manifest
    ``u8 version=1, u8 level, u32 count`` then ``count`` fixed-width entries
    of ``32-byte id, u64 length``.  At level 0 the ids are chunks (or
    :data:`~jiaozifuse.chunking.ZERO_ID` for a run of zeros); at level 1 they
    are level-0 manifests ("segments").  Fixed-width records keep encoding and
    decoding at memory speed for files of millions of chunks.
``T`` tree
    canonical CBOR ``[1, [entry, ...]]`` with entries sorted by name bytes;
    entry = ``[name, mode, uid, gid, mtime_ns, size, ref, xattrs]`` where
    *ref* is the manifest id (file), the tree id (directory), the target
    bytes (symlink), the device number as 8 big-endian bytes (character and
    block devices) or empty (FIFOs, sockets); *size* is the file size, or
    for a directory the logical bytes beneath it (so ``stats`` is O(1) per
    commit).
``C`` commit
    canonical CBOR map with ``tree, parents, author, time_ns, message, meta``.

Decoders validate shape and types and raise :class:`~jiaozifuse.errors.Corrupt`
for anything else: objects come back from disk and from remotes, which are
outside input.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, field

import cbor2

from .chunking import ID_LEN, hash_bytes
from .errors import Corrupt

_TYPES = (
    stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR,
    stat.S_IFBLK,
)

MANIFEST = b"M"
TREE = b"T"
COMMIT = b"C"

_MHEAD = struct.Struct("<BBI")
_MENTRY = struct.Struct(f"<{ID_LEN}sQ")

#: Chunks per level-0 manifest before a file's manifest gets a second level.
SEGMENT_MAX = 2048


def object_id(encoded: bytes) -> bytes:
    return hash_bytes(encoded)


def hexid(oid: bytes) -> str:
    return oid.hex()


# --------------------------------------------------------------------- manifests


def encode_manifest(level: int, entries: list[tuple[bytes, int]]) -> bytes:
    buf = bytearray(MANIFEST)
    buf += _MHEAD.pack(1, level, len(entries))
    pack = _MENTRY.pack
    for oid, length in entries:
        buf += pack(oid, length)
    return bytes(buf)


def decode_manifest(data: bytes) -> tuple[int, list[tuple[bytes, int]]]:
    if data[:1] != MANIFEST or len(data) < 1 + _MHEAD.size:
        raise Corrupt("not a manifest object")
    version, level, count = _MHEAD.unpack_from(data, 1)
    if version != 1 or level > 4:
        raise Corrupt(f"manifest of unknown version {version} or level {level}")
    body = memoryview(data)[1 + _MHEAD.size :]
    if len(body) != count * _MENTRY.size:
        raise Corrupt("manifest length does not match its entry count")
    return level, [(bytes(oid), n) for oid, n in _MENTRY.iter_unpack(body)]


# ------------------------------------------------------------------------- trees


class FileKind:
    """``is_dir``/``is_file``/``is_symlink`` from a ``mode`` attribute (tree entries, inodes)."""

    __slots__ = ()
    mode: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


@dataclass(frozen=True, slots=True)
class TreeEntry(FileKind):
    """One name in a tree.  *ref*: manifest id, tree id, or symlink target."""

    name: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    ref: bytes
    xattrs: tuple[tuple[bytes, bytes], ...] = ()



@dataclass(frozen=True, slots=True)
class Tree:
    entries: tuple[TreeEntry, ...] = ()
    _index: dict[bytes, TreeEntry] = field(default_factory=dict, compare=False, repr=False)

    def get(self, name: bytes) -> TreeEntry | None:
        if not self._index and self.entries:
            for e in self.entries:
                self._index[e.name] = e
        return self._index.get(name)

    @property
    def logical_size(self) -> int:
        return sum(e.size for e in self.entries)


def encode_tree(entries: list[TreeEntry] | tuple[TreeEntry, ...]) -> bytes:
    ordered = sorted(entries, key=lambda e: e.name)
    rows = []
    prev = None
    for e in ordered:
        if e.name == prev:
            raise ValueError(f"duplicate name in tree: {e.name!r}")
        prev = e.name
        rows.append(
            [e.name, e.mode, e.uid, e.gid, e.mtime_ns, e.size, e.ref, dict(e.xattrs)]
        )
    return TREE + cbor2.dumps([1, rows], canonical=True)


def _check_name(name: object) -> bytes:
    if (
        not isinstance(name, bytes)
        or not name
        or b"/" in name
        or b"\0" in name
        or name in (b".", b"..")
        or len(name) > 255
    ):
        raise Corrupt(f"tree entry with an invalid name: {name!r}")
    return name


def decode_tree(data: bytes) -> Tree:
    if data[:1] != TREE:
        raise Corrupt("not a tree object")
    try:
        doc = cbor2.loads(data[1:])
    except Exception as exc:  # cbor2 raises several types on garbage
        raise Corrupt(f"undecodable tree: {exc}") from None
    if not (isinstance(doc, list) and len(doc) == 2 and doc[0] == 1 and isinstance(doc[1], list)):
        raise Corrupt("tree of unknown shape or version")
    out = []
    prev = b""
    for row in doc[1]:
        if not (isinstance(row, list) and len(row) == 8):
            raise Corrupt("tree entry of unknown shape")
        name, mode, uid, gid, mtime_ns, size, ref, xattrs = row
        _check_name(name)
        if name <= prev and out:
            raise Corrupt("tree entries out of order")
        prev = name
        if not all(isinstance(v, int) for v in (mode, uid, gid, mtime_ns, size)):
            raise Corrupt("tree entry with non-integer attributes")
        if not (0 <= mode < 1 << 32 and 0 <= uid < 1 << 32 and 0 <= gid < 1 << 32
                and 0 <= size < 1 << 64 and -(1 << 63) <= mtime_ns < 1 << 63):
            raise Corrupt("tree entry with attributes out of range")
        if not isinstance(ref, bytes) or not isinstance(xattrs, dict):
            raise Corrupt("tree entry with bad reference or xattrs")
        kind = stat.S_IFMT(mode)
        if kind in (stat.S_IFREG, stat.S_IFDIR) and len(ref) != ID_LEN:
            raise Corrupt("tree entry with a bad object id")
        if kind in (stat.S_IFCHR, stat.S_IFBLK) and len(ref) != 8:
            raise Corrupt("device entry without an 8-byte device number")
        if kind in (stat.S_IFIFO, stat.S_IFSOCK) and ref:
            raise Corrupt("FIFO or socket entry with data")
        if kind not in _TYPES:
            raise Corrupt(f"tree entry of unsupported type {kind:o}")
        if not all(isinstance(k, bytes) and isinstance(v, bytes) for k, v in xattrs.items()):
            raise Corrupt("tree entry with bad xattrs")
        xs = tuple(sorted(xattrs.items()))
        out.append(TreeEntry(name, mode, uid, gid, mtime_ns, size, ref, xs))
    return Tree(tuple(out))


# ----------------------------------------------------------------------- commits


@dataclass(frozen=True, slots=True)
class Commit:
    tree: bytes
    parents: tuple[bytes, ...]
    author: str
    time_ns: int
    message: str
    meta: tuple[tuple[str, str], ...] = ()

    @property
    def meta_dict(self) -> dict[str, str]:
        return dict(self.meta)


def encode_commit(c: Commit) -> bytes:
    doc = {
        "v": 1,
        "tree": c.tree,
        "parents": list(c.parents),
        "author": c.author,
        "time_ns": c.time_ns,
        "message": c.message,
        "meta": dict(c.meta),
    }
    return COMMIT + cbor2.dumps(doc, canonical=True)


def decode_commit(data: bytes) -> Commit:
    if data[:1] != COMMIT:
        raise Corrupt("not a commit object")
    try:
        doc = cbor2.loads(data[1:])
    except Exception as exc:
        raise Corrupt(f"undecodable commit: {exc}") from None
    try:
        if doc["v"] != 1:
            raise Corrupt(f"commit of unknown version {doc['v']}")
        tree, parents = doc["tree"], doc["parents"]
        meta = doc["meta"]
        ok = (
            isinstance(tree, bytes)
            and len(tree) == ID_LEN
            and isinstance(parents, list)
            and all(isinstance(p, bytes) and len(p) == ID_LEN for p in parents)
            and isinstance(doc["author"], str)
            and isinstance(doc["time_ns"], int)
            and isinstance(doc["message"], str)
            and isinstance(meta, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
        )
    except (KeyError, TypeError):
        raise Corrupt("commit of unknown shape") from None
    if not ok:
        raise Corrupt("commit with fields of the wrong type")
    return Commit(
        tree, tuple(parents), doc["author"], doc["time_ns"], doc["message"],
        tuple(sorted(meta.items())),
    )


EMPTY_TREE = encode_tree([])
EMPTY_TREE_ID = object_id(EMPTY_TREE)
EMPTY_MANIFEST = encode_manifest(0, [])
EMPTY_MANIFEST_ID = object_id(EMPTY_MANIFEST)
