"""Object encodings (jiaozifuse/objects.py): pinned vectors, canonical form, robust decoders.

The hex strings below are the repository format: if one changes, every object
id of every existing repository changes with it.
"""

from __future__ import annotations

import itertools
import stat

import cbor2
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jiaozifuse.chunking import ZERO_ID, hash_bytes
from jiaozifuse.errors import Corrupt, JiaoziError
from jiaozifuse.objects import (
    EMPTY_MANIFEST,
    EMPTY_MANIFEST_ID,
    EMPTY_TREE,
    EMPTY_TREE_ID,
    Commit,
    TreeEntry,
    decode_commit,
    decode_manifest,
    decode_tree,
    encode_commit,
    encode_manifest,
    encode_tree,
    object_id,
)

CHUNK = hash_bytes(b"hello jiaozifuse\n")
CHUNK_HEX = "e84598aa778d5f4cc39275bd87c2fe4315a1636be8db496ec1e79c1bb2b75a05"

MANIFEST_ENTRIES = [(CHUNK, 17), (ZERO_ID, 1 << 20)]
MANIFEST_HEX = (
    "4d010002000000"
    "e84598aa778d5f4cc39275bd87c2fe4315a1636be8db496ec1e79c1bb2b75a05" "1100000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000" "0000100000000000"
)
MANIFEST_ID = "a90356b3bbcc719ec2078612f9156270b93bcc06713a3b1bc48b96e2f86ba1b5"
MANIFEST1_HEX = (
    "4d010101000000"
    "a90356b3bbcc719ec2078612f9156270b93bcc06713a3b1bc48b96e2f86ba1b5" "1100100000000000"
)
MANIFEST1_ID = "aa48c063873ab6ff88dcca5163d078376483a9ee2833b940bccf5936aa1df774"

EMPTY_MANIFEST_HEX = "4d010000000000"
EMPTY_MANIFEST_ID_HEX = "6fd2e23918283840076ec9b40608d222aeaf3958b0d3ed681d3b5a42f07b9634"
EMPTY_TREE_HEX = "54820180"
EMPTY_TREE_ID_HEX = "9a4f30d313f998d5d88be55858c9449eadc94858a37a88993fff249e11973f60"

FILE = TreeEntry(
    b"data.bin", stat.S_IFREG | 0o644, 1000, 1000, 1_700_000_000_123_456_789,
    17 + (1 << 20), bytes.fromhex(MANIFEST_ID), ((b"user.a", b"1"), (b"user.b", b"2")),
)
DIR = TreeEntry(b"dir", stat.S_IFDIR | 0o755, 0, 0, 1_700_000_000_000_000_000, 0, EMPTY_TREE_ID)
LINK = TreeEntry(
    b"link", stat.S_IFLNK | 0o777, 0, 0, 1_600_000_000_000_000_000, 8, b"data.bin"
)
TREE_HEX = (
    "548201838848646174612e62696e1981a41903e81903e81b17979cfe3d85cd151a001000115820a90356b3"
    "bbcc719ec2078612f9156270b93bcc06713a3b1bc48b96e2f86ba1b5a246757365722e61413146757365"
    "722e62413288436469721941ed00001b17979cfe362a00000058209a4f30d313f998d5d88be55858c944"
    "9eadc94858a37a88993fff249e11973f60a088446c696e6b19a1ff00001b16345785d8a0000008486461"
    "74612e62696ea0"
)
TREE_ID = "fe635e6dcb76c0e4decaad510a00f653d2a9af856a16ce92d6c9b33bf17b8bd7"

PARENT = bytes(range(32))
COMMIT = Commit(
    bytes.fromhex(TREE_ID), (PARENT,), "alice@example", 1_700_000_000_000_000_001, "first\n",
    (("run", "42"), ("loss", "0.5")),
)
COMMIT_HEX = (
    "43a7617601646d657461a26372756e623432646c6f737363302e3564747265655820fe635e6dcb76c0e4"
    "decaad510a00f653d2a9af856a16ce92d6c9b33bf17b8bd766617574686f726d616c696365406578616d"
    "706c65676d6573736167656666697273740a67706172656e7473815820000102030405060708090a0b0c"
    "0d0e0f101112131415161718191a1b1c1d1e1f6774696d655f6e731b17979cfe362a0001"
)
COMMIT_ID = "e7c25df8c421c4792113073944c9c95e8e65949beec1a47e4aea2e4b48ac1a35"


# ------------------------------------------------------------------ vectors


def test_chunk_id_vector():
    assert CHUNK.hex() == CHUNK_HEX


def test_object_id_is_blake3_of_the_whole_encoding():
    enc = encode_manifest(0, MANIFEST_ENTRIES)
    assert object_id(enc) == hash_bytes(enc)
    # the type byte is hashed too: an object never shares an id with a chunk of its payload
    assert object_id(enc) != hash_bytes(enc[1:])


def test_manifest_vector():
    for _ in range(2):
        enc = encode_manifest(0, list(MANIFEST_ENTRIES))
        assert enc.hex() == MANIFEST_HEX
        assert object_id(enc).hex() == MANIFEST_ID
    assert decode_manifest(enc) == (0, MANIFEST_ENTRIES)
    enc1 = encode_manifest(1, [(bytes.fromhex(MANIFEST_ID), 17 + (1 << 20))])
    assert enc1.hex() == MANIFEST1_HEX
    assert object_id(enc1).hex() == MANIFEST1_ID
    assert decode_manifest(enc1) == (1, [(bytes.fromhex(MANIFEST_ID), 17 + (1 << 20))])


def test_empty_objects_vectors():
    assert EMPTY_MANIFEST.hex() == EMPTY_MANIFEST_HEX
    assert EMPTY_MANIFEST_ID.hex() == EMPTY_MANIFEST_ID_HEX
    assert EMPTY_TREE.hex() == EMPTY_TREE_HEX
    assert EMPTY_TREE_ID.hex() == EMPTY_TREE_ID_HEX
    assert encode_tree([]) == EMPTY_TREE
    assert decode_manifest(EMPTY_MANIFEST) == (0, [])
    assert decode_tree(EMPTY_TREE).entries == ()


@pytest.mark.parametrize("order", list(itertools.permutations([FILE, DIR, LINK])))
def test_tree_vector_independent_of_entry_order(order):
    enc = encode_tree(list(order))
    assert enc.hex() == TREE_HEX
    assert object_id(enc).hex() == TREE_ID
    assert encode_tree(tuple(order)) == enc


def test_tree_vector_independent_of_xattr_order():
    swapped = TreeEntry(
        FILE.name, FILE.mode, FILE.uid, FILE.gid, FILE.mtime_ns, FILE.size, FILE.ref,
        tuple(reversed(FILE.xattrs)),
    )
    assert encode_tree([LINK, swapped, DIR]).hex() == TREE_HEX


def test_tree_round_trip():
    tree = decode_tree(bytes.fromhex(TREE_HEX))
    assert [e.name for e in tree.entries] == [b"data.bin", b"dir", b"link"]
    assert tree.entries == (FILE, DIR, LINK)
    assert tree.get(b"dir") == DIR
    assert tree.get(b"nope") is None
    f, d, s = tree.entries
    assert f.is_file and not f.is_dir and not f.is_symlink
    assert d.is_dir and s.is_symlink
    assert s.ref == b"data.bin"
    assert tree.logical_size == FILE.size + 0 + 8
    assert encode_tree(tree.entries).hex() == TREE_HEX


def test_special_entries_round_trip():
    specials = [
        TreeEntry(b"fifo", stat.S_IFIFO | 0o600, 0, 0, 5, 0, b""),
        TreeEntry(b"sock", stat.S_IFSOCK | 0o600, 0, 0, 5, 0, b""),
        TreeEntry(b"chr", stat.S_IFCHR | 0o666, 0, 0, 5, 0, (259).to_bytes(8, "big")),
        TreeEntry(b"blk", stat.S_IFBLK | 0o660, 0, 0, 5, 0, (2049).to_bytes(8, "big")),
    ]
    enc = encode_tree(specials)
    assert decode_tree(enc).entries == tuple(sorted(specials, key=lambda e: e.name))


def test_tree_rejects_duplicate_names_on_encode():
    with pytest.raises(ValueError):
        encode_tree([FILE, FILE])


def test_commit_vector_independent_of_meta_order():
    for meta in (COMMIT.meta, tuple(reversed(COMMIT.meta))):
        c = Commit(COMMIT.tree, COMMIT.parents, COMMIT.author, COMMIT.time_ns, COMMIT.message,
                   meta)
        enc = encode_commit(c)
        assert enc.hex() == COMMIT_HEX
        assert object_id(enc).hex() == COMMIT_ID


def test_commit_round_trip():
    c = decode_commit(bytes.fromhex(COMMIT_HEX))
    assert c.tree.hex() == TREE_ID
    assert c.parents == (PARENT,)
    assert c.author == "alice@example"
    assert c.time_ns == 1_700_000_000_000_000_001
    assert c.message == "first\n"
    assert c.meta_dict == {"run": "42", "loss": "0.5"}
    assert c.meta == (("loss", "0.5"), ("run", "42"))  # decoded meta is sorted
    # a merge commit and a root commit
    for parents in ((), (PARENT, bytes(32))):
        m = Commit(c.tree, parents, "", 0, "", ())
        assert decode_commit(encode_commit(m)) == m


# ------------------------------------------------------------ bad input: Corrupt


def _cbor_tree(rows) -> bytes:
    return b"T" + cbor2.dumps([1, rows])


GOOD_ROW = [b"f", stat.S_IFREG | 0o644, 0, 0, 0, 0, bytes(32), {}]


def _row(**changes):
    names = ["name", "mode", "uid", "gid", "mtime_ns", "size", "ref", "xattrs"]
    return [changes.get(n, v) for n, v in zip(names, GOOD_ROW, strict=True)]


BAD_MANIFESTS = [
    b"",
    b"M",
    b"T" + bytes.fromhex(MANIFEST_HEX)[1:],
    bytes.fromhex(MANIFEST_HEX)[:-1],
    bytes.fromhex(MANIFEST_HEX) + b"\0",
    bytes.fromhex("4d020000000000"),  # version 2
    bytes.fromhex("4d010900000000"),  # level 9
    bytes.fromhex("4d0100ffffffff"),  # count larger than the body
]


@pytest.mark.parametrize("data", BAD_MANIFESTS)
def test_bad_manifests_are_corrupt(data):
    with pytest.raises(Corrupt):
        decode_manifest(data)


BAD_TREES = [
    b"",
    b"T",
    b"T\xff\xff",
    b"M" + bytes.fromhex(TREE_HEX)[1:],
    b"T" + cbor2.dumps({"a": 1}),
    b"T" + cbor2.dumps([2, []]),
    b"T" + cbor2.dumps([1, {}]),
    _cbor_tree([[b"f"]]),
    _cbor_tree(["row"]),
    _cbor_tree([_row(name="f")]),
    _cbor_tree([_row(name=b"")]),
    _cbor_tree([_row(name=b"a/b")]),
    _cbor_tree([_row(name=b"..")]),
    _cbor_tree([_row(name=b".")]),
    _cbor_tree([_row(name=b"a\0")]),
    _cbor_tree([_row(name=b"x" * 256)]),
    _cbor_tree([_row(name=b"b"), _row(name=b"a")]),
    _cbor_tree([_row(name=b"a"), _row(name=b"a")]),
    _cbor_tree([_row(mode="644")]),
    _cbor_tree([_row(size=1.5)]),
    _cbor_tree([_row(ref="abc")]),
    _cbor_tree([_row(ref=b"short")]),
    _cbor_tree([_row(mode=stat.S_IFDIR | 0o755, ref=b"short")]),
    _cbor_tree([_row(mode=stat.S_IFCHR | 0o644)]),  # a device number is 8 bytes
    _cbor_tree([_row(mode=stat.S_IFBLK | 0o644, ref=b"1234")]),
    _cbor_tree([_row(mode=stat.S_IFIFO | 0o644, ref=b"data")]),
    _cbor_tree([_row(mode=stat.S_IFSOCK | 0o644, ref=b"x")]),
    _cbor_tree([_row(mode=0o644)]),  # no type bits
    _cbor_tree([_row(mode=0o170000 | 0o644)]),
    _cbor_tree([_row(xattrs=[])]),
    _cbor_tree([_row(xattrs={b"user.a": "text"})]),
    _cbor_tree([_row(xattrs={"user.a": b"v"})]),
    _cbor_tree([_row(uid=None)]),
]


@pytest.mark.parametrize("data", BAD_TREES)
def test_bad_trees_are_corrupt(data):
    with pytest.raises(Corrupt):
        decode_tree(data)


@pytest.mark.parametrize("mode", [-1, 1 << 32, 1 << 70])
def test_tree_with_out_of_range_mode_is_corrupt(mode):
    with pytest.raises(Corrupt):
        decode_tree(_cbor_tree([_row(mode=mode)]))


def test_tree_with_mixed_xattr_key_types_is_corrupt():
    with pytest.raises(Corrupt):
        decode_tree(_cbor_tree([_row(xattrs={b"user.a": b"1", 7: b"2"})]))


def _commit_doc(**changes):
    doc = {"v": 1, "tree": bytes(32), "parents": [], "author": "a", "time_ns": 0,
           "message": "m", "meta": {}}
    doc.update(changes)
    return b"C" + cbor2.dumps(doc)


BAD_COMMITS = [
    b"",
    b"C",
    b"C\xff",
    b"T" + bytes.fromhex(COMMIT_HEX)[1:],
    bytes.fromhex(COMMIT_HEX)[:-3],
    b"C" + cbor2.dumps([1, 2, 3]),
    b"C" + cbor2.dumps("string"),
    b"C" + cbor2.dumps(7),
    _commit_doc(v=2),
    _commit_doc(tree=b"short"),
    _commit_doc(tree="x" * 32),
    _commit_doc(parents=[b"short"]),
    _commit_doc(parents=b"x" * 32),
    _commit_doc(author=3),
    _commit_doc(time_ns="now"),
    _commit_doc(message=None),
    _commit_doc(meta=[]),
    _commit_doc(meta={"k": 1}),
    _commit_doc(meta={1: "v"}),
    b"C" + cbor2.dumps({"v": 1}),
]


@pytest.mark.parametrize("data", BAD_COMMITS)
def test_bad_commits_are_corrupt(data):
    with pytest.raises(Corrupt):
        decode_commit(data)


def test_corrupt_is_a_user_facing_error():
    assert issubclass(Corrupt, JiaoziError)


# ------------------------------------------------------------------ fuzzing

_DECODERS = {b"M": decode_manifest, b"T": decode_tree, b"C": decode_commit}

_cbor_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(0, (1 << 64) - 1), st.floats(allow_nan=False),
    st.binary(max_size=40), st.text(max_size=10),
)
_cbor_value = st.recursive(
    _cbor_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=5), st.binary(max_size=5)), inner,
                        max_size=3),
    ),
    max_leaves=12,
)


def _decode_or_corrupt(data: bytes) -> None:
    for fn in _DECODERS.values():
        try:
            fn(data)
        except Corrupt:
            pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from([b"M", b"T", b"C", b"", b"X"]), body=st.binary(max_size=200))
@example(kind=b"T", body=b"\x9f")
@example(kind=b"C", body=b"\xbf")
def test_random_bytes_only_raise_corrupt(kind, body):
    _decode_or_corrupt(kind + body)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_cbor_value)
def test_random_cbor_only_raises_corrupt(doc):
    for kind in (b"T", b"C"):
        _decode_or_corrupt(kind + cbor2.dumps(doc))


_FIELDS = ["name", "mode", "uid", "gid", "mtime_ns", "size", "ref", "xattrs"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(_FIELDS), value=_cbor_value, nrows=st.integers(1, 3))
def test_mutated_tree_rows_only_raise_corrupt(field, value, nrows):
    """One field of a valid row replaced by any CBOR value (modes below 2**32, xattr keys
    never mixed bytes/other: those two are the xfail bugs above)."""
    if field == "mode" and isinstance(value, int) and not 0 <= value < 1 << 32:
        value = 0o100644
    if field == "xattrs" and isinstance(value, dict) and any(
            isinstance(k, bytes) for k in value) and not all(
            isinstance(k, bytes) for k in value):
        value = {k: v for k, v in value.items() if isinstance(k, bytes)}
    rows = [_row(name=b"a%d" % i) for i in range(nrows)]
    rows[-1][_FIELDS.index(field)] = value
    _decode_or_corrupt(_cbor_tree(rows))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(["v", "tree", "parents", "author", "time_ns", "message", "meta"]),
       value=_cbor_value, drop=st.booleans())
def test_mutated_commits_only_raise_corrupt(field, value, drop):
    doc = {"v": 1, "tree": bytes(32), "parents": [bytes(32)], "author": "a", "time_ns": 0,
           "message": "m", "meta": {"k": "v"}}
    if drop:
        del doc[field]
    else:
        doc[field] = value
    _decode_or_corrupt(b"C" + cbor2.dumps(doc))


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.tuples(st.binary(min_size=32, max_size=32),
                                  st.integers(0, (1 << 64) - 1)), max_size=20),
       level=st.integers(0, 1))
def test_manifest_round_trip(entries, level):
    enc = encode_manifest(level, entries)
    assert decode_manifest(enc) == (level, entries)
    assert len(enc) == 7 + 40 * len(entries)


_names = st.binary(min_size=1, max_size=20).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))


@settings(max_examples=200, deadline=None)
@given(
    rows=st.dictionaries(
        _names,
        st.tuples(
            st.sampled_from([stat.S_IFREG | 0o644, stat.S_IFDIR | 0o700, stat.S_IFLNK | 0o777]),
            st.integers(0, 2**32 - 1), st.integers(0, 2**63 - 1),
            st.binary(min_size=32, max_size=32),
            st.dictionaries(st.binary(min_size=1, max_size=8), st.binary(max_size=8),
                            max_size=3),
        ),
        max_size=8,
    ),
    rnd=st.randoms(use_true_random=False),
)
def test_tree_round_trip_and_order_independence(rows, rnd):
    entries = [
        TreeEntry(name, mode, uid, uid, mtime, 0, ref, tuple(xattrs.items()))
        for name, (mode, uid, mtime, ref, xattrs) in rows.items()
    ]
    enc = encode_tree(entries)
    shuffled = list(entries)
    rnd.shuffle(shuffled)
    assert encode_tree(shuffled) == enc
    tree = decode_tree(enc)
    assert [e.name for e in tree.entries] == sorted(rows)
    assert encode_tree(tree.entries) == enc
    for e in entries:
        got = tree.get(e.name)
        assert got is not None
        assert got.xattrs == tuple(sorted(e.xattrs))
        assert (got.mode, got.uid, got.gid, got.mtime_ns, got.ref) == (
            e.mode, e.uid, e.gid, e.mtime_ns, e.ref)
