"""Archive to Filecoin: pack what a ref reaches into CAR pieces, and restore from them.

An archive *run* (:func:`archive`) walks every commit a ref reaches and writes
what no earlier run archived as blocks into CARv1 files of at most
``target_size * 127/128`` bytes, so each fills one power-of-two piece:

* the UnixFS DAG of every commit's tree (unixfs.py): raw leaves (one per chunk,
  sha2-256 CIDs), File, Directory and Symlink nodes. This is what IPFS and
  Filecoin retrieval tools see: ``ipfs-car unpack --root ROOT`` rebuilds a commit.
* the repository's own objects (commits, trees with uid/gid/modes/mtimes/xattrs,
  file manifests), packed into dag-cbor blocks ``{"t": "jiaozifuse/objects",
  "v": 1, "objects": [bytes...]}`` of about 1 MiB.
* one metadata block (dag-cbor ``{"t": "jiaozifuse/archive", ...}``): the run
  number, the refs archived so far, the default branch, each new commit's
  id with a link to its root directory node, links to the run's object packs,
  and a link to the previous run's metadata. It is the last block of the
  run, so it sits in the run's last CAR.

Every CAR of a run has the same two roots: the head commit's root Directory
node (the payload CID deal tools ask for) and the run's metadata block. A
restore therefore needs all CARs of all runs, and a CAR on its own still says
which run it belongs to.

Bookkeeping, in the store's ``meta`` database:

``archive/piece/<piece CID>``  JSON: CIDs (v1, v2), sizes, payload root, CAR file,
                               run, state (packed, submitted, active, failed)
``archive/serial/<u64>``       piece serial -> piece CID
``archive/block/<CID>``        a block in an archived piece -> piece serial
``archive/obj/<object id>``    a repository object in an archived piece -> serial
``archive/sha/<chunk id>``     a chunk's sha2-256 (its raw leaf CID), so later
                               runs link to archived chunks without reading them
``archive/node/<key>``         memo: a file or directory (content, mode, mtime)
                               whose whole DAG is archived -> CID + Tsize
``archive/ref/<ref>``          refs archived so far -> commit id
``archive/run/<u64>``          JSON summary of a run

A piece marked failed gives its blocks back (their ``block``/``obj`` entries
are dropped with the node memos), so the next run packs them again.

Onramps (:class:`Onramp`) take the finished pieces: ``manifest`` leaves the CARs
in a directory with ``manifest.csv`` for deal tools; ``command`` runs an argv
per piece with the piece as JSON on stdin (see docs/filecoin.md).

:func:`restore` rebuilds a repository from CAR files alone: every block is
checked against its CID and every CAR against the piece CID in its name (or in
a ``manifest.csv`` beside it), into a temporary directory renamed into place
only when everything verified.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import cbor2

from .car import (
    DAG_CBOR,
    DAG_PB,
    RAW,
    CarError,
    CarWriter,
    cid_from_digest,
    cid_from_str,
    cid_str,
    cid_v1,
    iter_car,
    read_header,
)
from .chunking import ZERO_ID, hash_bytes
from .commp import CHUNK_IN, CommP, Piece, ThreadedCommP, max_payload, parse_piece_cid
from .errors import Corrupt, Exists, JiaoziError, NotFound
from .filecontent import FileContent
from .objects import (
    EMPTY_MANIFEST,
    EMPTY_MANIFEST_ID,
    decode_commit,
    decode_manifest,
    decode_tree,
    object_id,
)
from .repo import Repository, _write_json_atomic, check_ref_name
from .store import Txn, u64
from .unixfs import directory_node, file_dag, symlink_node

log = logging.getLogger(__name__)

STATES = ("packed", "submitted", "active", "failed")
DEFAULT_TARGET = 1 << 30
PACK_TARGET = 1 << 20
ZERO_LEAF = 256 << 10
META_TYPE = "jiaozifuse/archive"
PACK_TYPE = "jiaozifuse/objects"
MANIFEST_CSV = "manifest.csv"
#: go-graphsplit's manifest.csv columns first (read by position by several deal
#: tools), then what boost's ``deal`` command needs beyond them.
CSV_COLUMNS = ("payload_cid", "filename", "piece_cid", "piece_size", "car_size",
               "piece_cid_v2", "url")

K_PIECE = b"archive/piece/"
K_SERIAL = b"archive/serial/"
K_BLOCK = b"archive/block/"
K_OBJ = b"archive/obj/"
K_SHA = b"archive/sha/"
K_NODE = b"archive/node/"
K_REF = b"archive/ref/"
K_RUN = b"archive/run/"

_U64 = struct.Struct(">Q")


class Interrupted(JiaoziError):
    """A run stopped on request (the daemon shuts down); its job stays queued."""


def _be(n: int) -> bytes:
    return _U64.pack(n)


def _now() -> int:
    return time.time_ns()


def _dag_cbor(doc: object) -> bytes:
    """dag-cbor: canonical CBOR (length-first key order), CIDs as tag 42."""
    return cbor2.dumps(doc, canonical=True)


def _link(cid: bytes) -> cbor2.CBORTag:
    return cbor2.CBORTag(42, b"\x00" + cid)


def _unlink(tag: object) -> bytes:
    if not (isinstance(tag, cbor2.CBORTag) and tag.tag == 42 and isinstance(tag.value, bytes)
            and tag.value[:1] == b"\x00"):
        raise Corrupt("archive metadata: expected a CID link")
    return tag.value[1:]


# ------------------------------------------------------------------ onramps


class Onramp:
    """Where finished pieces go. Subclasses decide each piece's state."""

    name = "base"

    def __init__(self, out_dir: str | Path, url_prefix: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.url_prefix = url_prefix

    def url(self, filename: str) -> str:
        if not self.url_prefix:
            return ""
        return self.url_prefix.rstrip("/") + "/" + filename

    def check(self) -> None:
        """Fail early (before packing) when the onramp cannot work."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JiaoziError(f"cannot create {self.out_dir}: {exc.strerror}") from None

    def submit(self, piece: dict[str, Any]) -> dict[str, Any]:
        """Hand one piece over; return ``{"state": ..., ...}`` to record."""
        return {"state": "packed"}

    def finish(self, pieces: list[dict[str, Any]]) -> None:
        """Called once with every piece of the run, after :meth:`submit`."""


class ManifestOnramp(Onramp):
    """CARs in a directory plus ``manifest.csv`` rows for deal tools to import."""

    name = "manifest"

    def finish(self, pieces: list[dict[str, Any]]) -> None:
        path = self.out_dir / MANIFEST_CSV
        new = not path.exists() or path.stat().st_size == 0
        listed: set[str] = set()
        if not new:  # a run resumed after a crash may have listed some pieces already
            with open(path, newline="") as f:
                listed = {row.get("piece_cid") or "" for row in csv.DictReader(f)}
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(CSV_COLUMNS)
            for p in pieces:
                if p["piece_cid"] in listed:
                    continue
                w.writerow([p["payload_cid"], p["car_file"], p["piece_cid"], p["piece_size"],
                            p["car_size"], p["piece_cid_v2"], p.get("url", "")])
            f.flush()
            os.fsync(f.fileno())


class CommandOnramp(Onramp):
    """Run *argv* once per piece: the piece as one JSON line on stdin.

    Exit status 0 and a JSON object on a line of stdout (the last such line
    counts) give the state: ``{"state": "submitted"|"active"|"failed"|"packed",
    ...}`` (default ``submitted``); its other fields are kept with the piece.
    A non-zero exit (or a timeout) makes the piece ``failed``.
    """

    name = "command"

    def __init__(self, argv: list[str], out_dir: str | Path, url_prefix: str | None = None,
                 timeout: float = 3600.0) -> None:
        super().__init__(out_dir, url_prefix)
        if not argv:
            raise JiaoziError("the command onramp needs a command")
        self.argv = list(argv)
        self.timeout = timeout

    def check(self) -> None:
        super().check()
        exe = self.argv[0]
        if shutil.which(exe) is None and not (os.sep in exe and os.access(exe, os.X_OK)):
            raise JiaoziError(f"onramp command not found: {exe}")

    def submit(self, piece: dict[str, Any]) -> dict[str, Any]:
        try:
            res = subprocess.run(self.argv, input=json.dumps(piece) + "\n", text=True,
                                 capture_output=True, timeout=self.timeout, cwd=self.out_dir)
        except subprocess.TimeoutExpired:
            return {"state": "failed", "error": f"onramp command timed out after "
                                                f"{self.timeout:g} s"}
        except OSError as exc:
            return {"state": "failed", "error": f"cannot run the onramp command: {exc}"}
        reply: dict[str, Any] = {}
        for line in res.stdout.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    reply = doc
        if res.returncode != 0:
            reply = {**reply, "state": "failed", "exit": res.returncode,
                     "error": (res.stderr.strip().splitlines() or [""])[-1][:500]}
            return reply
        state = reply.get("state", "submitted")
        if state not in STATES:
            return {**reply, "state": "failed",
                    "error": f"onramp command replied with unknown state {state!r}"}
        reply["state"] = state
        return reply


def make_onramp(kind: str, out_dir: str | Path, command: list[str] | None = None,
                url_prefix: str | None = None) -> Onramp:
    if kind == "manifest":
        return ManifestOnramp(out_dir, url_prefix)
    if kind == "command":
        return CommandOnramp(command or [], out_dir, url_prefix)
    raise JiaoziError(f"unknown onramp {kind!r} (manifest or command)")


# ------------------------------------------------------------------ packing


@dataclass(slots=True)
class _Car:
    tmp: Path
    writer: CarWriter
    hasher: ThreadedCommP | None
    commp: CommP | None = None
    blocks: list[bytes] = field(default_factory=list)
    objects: list[bytes] = field(default_factory=list)

    def seal(self) -> None:
        self.writer.close()
        if self.hasher is not None:
            self.commp = self.hasher.close()
            self.hasher = None


class _Splitter:
    """Blocks in, CAR files of at most *limit* bytes out."""

    def __init__(self, out_dir: Path, limit: int, run: int, nroots: int = 2,
                 stop: threading.Event | None = None) -> None:
        self.out_dir = out_dir
        self.stop = stop
        self.limit = limit
        self.run = run
        self.nroots = nroots
        self.cars: list[_Car] = []
        self.bytes = 0

    def put(self, cid: bytes, data: bytes | memoryview) -> _Car:
        if self.stop is not None and self.stop.is_set():
            raise Interrupted("archive run interrupted")
        cur = self.cars[-1] if self.cars else None
        entry = cur.writer.entry_size(cid, len(data)) if cur else 0
        if cur is None or (cur.writer.size + entry > self.limit and cur.writer.blocks):
            if cur is not None:
                cur.seal()
            cur = self._open()
            entry = cur.writer.entry_size(cid, len(data))
            if cur.writer.size + entry > self.limit:
                raise JiaoziError(
                    f"block {cid_str(cid)} of {len(data)} bytes does not fit a piece of the "
                    "target size: raise --target-size")
        cur.writer.put(cid, data)
        cur.blocks.append(cid)
        self.bytes += entry
        return cur

    def _open(self) -> _Car:
        tmp = _temp_car(self.out_dir, self.run, len(self.cars))
        hasher = ThreadedCommP()
        car = _Car(tmp, CarWriter(tmp, self.nroots, observer=hasher.write), hasher)
        self.cars.append(car)
        return car

    def abort(self) -> None:
        for car in self.cars:
            car.writer.abort()
            if car.hasher is not None:
                car.hasher.abort()
            try:
                car.tmp.unlink()
            except FileNotFoundError:
                pass


def _memo_key(kind: bytes, oid: bytes, mode: int | None, mtime_ns: int | None) -> bytes:
    return blake3.blake3(kind + oid + repr((mode, mtime_ns)).encode()).digest()


@dataclass(slots=True)
class _Frame:
    tree_id: bytes
    mode: int | None
    mtime_ns: int | None
    key: bytes
    entries: tuple
    i: int = 0
    links: list[tuple[bytes, bytes, int]] = field(default_factory=list)
    pending: bytes = b""


class _Reader:
    """The packer's reads: committed state only, each in its own short snapshot.

    Snapshots (never :meth:`Store.read`, which hands out the daemon's write
    batch on the thread that owns it) make packing safe on a worker thread
    while the mount keeps writing: what a run archives is immutable (commits,
    trees, manifests, chunks) and was committed before the run started.
    """

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.store = repo.store

    def meta(self, key: bytes) -> bytes | None:
        with self.store.snapshot() as r:
            return r.get("meta", key)

    def object(self, oid: bytes) -> bytes | None:
        with self.store.snapshot() as r:
            raw = r.get_object(oid)
        return None if raw is None else bytes(raw)

    def chunk(self, cid: bytes) -> bytes | None:
        """A chunk's bytes, checked against its id (a flipped bit is never archived).

        A chunk missing from (or corrupt in) a cache of a remote is fetched
        for this run only: storing it would need the writer lock.
        """
        with self.store.snapshot() as r:
            data = r.get_chunk(cid)
        if data is not None and hash_bytes(data) == cid:
            return bytes(data)
        if self.repo.config.get("remote"):
            from .writeback import fetch_chunks

            return fetch_chunks(self.store, self.repo.remote, [cid]).get(cid)
        if data is not None:
            raise Corrupt(f"chunk {cid.hex()[:16]} is corrupt and there is no other copy")
        return None

    def history(self, head: bytes) -> list[bytes]:
        """Commits *head* reaches, oldest first (the order of ``repo.log``, reversed)."""
        commits: dict[bytes, Any] = {}
        out: list[bytes] = []
        seen: set[bytes] = set()
        heap = [head]
        with self.store.snapshot() as r:
            def load(k: bytes) -> bool:
                if k not in commits:
                    raw = r.get_object(k)
                    if raw is None:  # history cut by gc retention
                        return False
                    commits[k] = decode_commit(bytes(raw))
                return True

            while heap:
                heap = [k for k in heap if load(k)]
                if not heap:
                    break
                heap.sort(key=lambda k: commits[k].time_ns)
                cid = heap.pop()
                if cid in seen:
                    continue
                seen.add(cid)
                out.append(cid)
                heap.extend(p for p in commits[cid].parents if p not in seen)
        out.reverse()
        return out


class _Packer:
    """Walks commits and streams every not-yet-archived block into the splitter."""

    def __init__(self, repo: Repository, splitter: _Splitter) -> None:
        self.repo = repo
        self.read = _Reader(repo)
        self.out = splitter
        self.emitted: set[bytes] = set()
        self.objects_seen: set[bytes] = set()
        self.new_nodes: dict[bytes, tuple[bytes, int]] = {}
        self.new_shas: dict[bytes, bytes] = {}
        self.zero_leaves: dict[int, tuple[bytes, bytes]] = {}
        self.pack: list[bytes] = []
        self.pack_ids: list[bytes] = []
        self.pack_bytes = 0
        self.packs: list[bytes] = []
        self.data_bytes = 0

    # lookups in the store (short read transactions: the walk may be long)
    def _meta(self, key: bytes) -> bytes | None:
        return self.read.meta(key)

    def _archived(self, cid: bytes) -> bool:
        return cid in self.emitted or self._meta(K_BLOCK + cid) is not None

    def _memo(self, key: bytes) -> tuple[bytes, int] | None:
        hit = self.new_nodes.get(key)
        if hit is not None:
            return hit
        raw = self._meta(K_NODE + key)
        if raw is None:
            return None
        return bytes(raw[:-8]), _U64.unpack(raw[-8:])[0]

    def _put(self, cid: bytes, data: bytes | memoryview) -> None:
        if self._archived(cid):
            return
        self.out.put(cid, data)
        self.emitted.add(cid)

    def _object(self, oid: bytes) -> bytes:
        raw = self.read.object(oid)
        if raw is None:
            raise Corrupt(f"object {oid.hex()} is missing from the store")
        self._add_object(oid, raw)
        return raw

    def _add_object(self, oid: bytes, raw: bytes) -> None:
        if oid in self.objects_seen or self._meta(K_OBJ + oid) is not None:
            return
        self.objects_seen.add(oid)
        self.pack.append(raw)
        self.pack_ids.append(oid)
        self.pack_bytes += len(raw) + 4
        if self.pack_bytes >= PACK_TARGET:
            self.flush_pack()

    def flush_pack(self) -> None:
        if not self.pack:
            return
        enc = _dag_cbor({"t": PACK_TYPE, "v": 1, "objects": self.pack})
        cid = cid_v1(DAG_CBOR, enc)
        car = self.out.put(cid, enc)
        self.emitted.add(cid)
        car.objects.extend(self.pack_ids)
        self.packs.append(cid)
        self.pack, self.pack_ids, self.pack_bytes = [], [], 0

    # files
    def _zero_leaf(self, n: int) -> bytes:
        hit = self.zero_leaves.get(n)
        if hit is None:
            data = bytes(n)
            hit = (cid_v1(RAW, data), data)
            self.zero_leaves[n] = hit
        self._put(*hit)
        return hit[0]

    def file(self, manifest_id: bytes, mode: int | None, mtime_ns: int | None
             ) -> tuple[bytes, int]:
        key = _memo_key(b"f", manifest_id, mode, mtime_ns)
        hit = self._memo(key)
        if hit is not None:
            return hit
        fc = FileContent(self.read.chunk, self.read.object, manifest_id)
        if manifest_id != EMPTY_MANIFEST_ID:  # the empty manifest is implicit, never stored
            level, entries = decode_manifest(self._object(manifest_id))
            if level == 1:
                for seg, _ in entries:
                    self._object(seg)
        leaves: list[tuple[bytes, int]] = []
        for cid_, n in fc.chunk_ids():
            if cid_ == ZERO_ID:
                while n:
                    part = min(n, ZERO_LEAF)
                    leaves.append((self._zero_leaf(part), part))
                    n -= part
                continue
            sha = self.new_shas.get(cid_) or self._meta(K_SHA + cid_)
            data = None
            if sha is None:
                data = fc._entry_bytes(cid_, n)
                sha = hashlib.sha256(data).digest()
                self.new_shas[cid_] = sha
            leaf = cid_from_digest(RAW, bytes(sha))
            if not self._archived(leaf):
                if data is None:
                    data = fc._entry_bytes(cid_, n)
                self.out.put(leaf, data)
                self.emitted.add(leaf)
                self.data_bytes += n
            leaves.append((leaf, n))
        blocks, root, tsize = file_dag(leaves, mode, mtime_ns)
        for cid, enc in blocks:
            self._put(cid, enc)
        self.new_nodes[key] = (root, tsize)
        return root, tsize

    def directory(self, tree_id: bytes, mode: int | None = None,
                  mtime_ns: int | None = None) -> tuple[bytes, int]:
        """The Directory node of a tree (post-order, without recursion)."""
        key = _memo_key(b"d", tree_id, mode, mtime_ns)
        hit = self._memo(key)
        if hit is not None:
            return hit
        stack = [_Frame(tree_id, mode, mtime_ns, key, decode_tree(self._object(tree_id)).entries)]
        result: tuple[bytes, int] | None = None
        while stack:
            fr = stack[-1]
            if result is not None:
                fr.links.append((fr.pending, *result))
                result = None
            descended = False
            while fr.i < len(fr.entries):
                e = fr.entries[fr.i]
                fr.i += 1
                if e.is_dir:
                    ckey = _memo_key(b"d", e.ref, e.mode, e.mtime_ns)
                    hit = self._memo(ckey)
                    if hit is not None:
                        fr.links.append((e.name, *hit))
                        continue
                    fr.pending = e.name
                    stack.append(_Frame(e.ref, e.mode, e.mtime_ns, ckey,
                                        decode_tree(self._object(e.ref)).entries))
                    descended = True
                    break
                if e.is_file:
                    fr.links.append((e.name, *self.file(e.ref, e.mode, e.mtime_ns)))
                elif e.is_symlink:
                    (cid, enc), tsize = symlink_node(e.ref, e.mode, e.mtime_ns)
                    self._put(cid, enc)
                    fr.links.append((e.name, cid, tsize))
                # FIFOs, sockets and devices have no UnixFS form (the tree keeps them)
            if descended:
                continue
            (cid, enc), tsize = directory_node(fr.links, fr.mode, fr.mtime_ns)
            self._put(cid, enc)
            self.new_nodes[fr.key] = (cid, tsize)
            stack.pop()
            result = (cid, tsize)
        assert result is not None
        return result


def _ref_key(repo: Repository, ref: str) -> str | None:
    """``branch/NAME`` or ``tag/NAME`` when *ref* names one, else None (a commit)."""
    with repo.store.read() as r:
        for kind in ("branch", "tag"):
            if r.get("refs", f"{kind}/{ref}".encode()) is not None:
                return f"{kind}/{ref}"
    return None


def resolve_ref(repo: Repository, ref: str) -> tuple[bytes, str | None]:
    """(head commit, ``branch/NAME``/``tag/NAME`` or None): on the store's owner thread."""
    return repo.resolve(ref), _ref_key(repo, ref)


def archive(repo: Repository, ref: str, out: str | Path | Onramp,
            target_size: int = DEFAULT_TARGET,
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Pack everything *ref* reaches that is not archived yet into CAR pieces.

    *out* is a directory (the manifest onramp) or an :class:`Onramp`. Returns a
    summary with one entry per piece. Raises :class:`JiaoziError` after
    recording everything if an onramp reported a piece failed.

    The phases (:func:`pack_run`, :func:`record_run`, :func:`submit_pieces`,
    :func:`apply_replies`) are separate so that the daemon can pack and submit
    on a worker thread and record on the thread that owns the store's writes
    (archive_policy.py); here they simply run one after the other.
    """
    onramp = out if isinstance(out, Onramp) else ManifestOnramp(out)
    limit = payload_limit(target_size)
    with run_lock(repo):
        head, ref_key = resolve_ref(repo, ref)
        packed = pack_run(repo, ref, head, ref_key, onramp, limit, progress)
        if packed.nothing:
            return packed.result()
        for _ in record_run(repo, packed):
            pass
        publish_run(packed)
        replies = submit_pieces(onramp, packed.pieces)
        return apply_replies(repo, packed, replies)


def payload_limit(target_size: int) -> int:
    try:
        return max_payload(target_size)
    except ValueError as exc:
        raise JiaoziError(f"target size {target_size}: {exc}") from None


@contextlib.contextmanager
def run_lock(repo: Repository) -> Iterator[None]:
    """One archive run at a time per repository (run numbers, piece records)."""
    run_dir = repo.path / "run"
    run_dir.mkdir(exist_ok=True)
    with open(run_dir / "archive.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JiaoziError("another archive run is in progress on this repository"
                              ) from None
        yield


_run_lock = run_lock  # the name it had


@dataclass
class PackedRun:
    """A run packed by :func:`pack_run`: CARs written, nothing recorded yet."""

    run: int
    ref: str
    head: bytes
    refs: dict[str, bytes]
    onramp: Onramp
    pieces: list[dict[str, Any]] = field(default_factory=list)
    #: per piece: the blocks and repository objects in it
    contents: list[tuple[list[bytes], list[bytes]]] = field(default_factory=list)
    new_shas: dict[bytes, bytes] = field(default_factory=dict)
    new_nodes: dict[bytes, tuple[bytes, int]] = field(default_factory=dict)
    root: bytes = b""
    meta_cid: bytes = b""
    blocks: int = 0
    data_bytes: int = 0
    commits: int = 0
    nothing: bool = False
    summary: dict[str, Any] = field(default_factory=dict)

    def result(self) -> dict[str, Any]:
        if self.nothing:
            return {"run": None, "ref": self.ref, "commit": self.head.hex(), "pieces": [],
                    "message": f"nothing new to archive for {self.ref}"}
        return {**self.summary, "pieces": self.pieces, "blocks": self.blocks,
                "data_bytes": self.data_bytes,
                "car_bytes": sum(p["car_size"] for p in self.pieces),
                "commits": self.commits}


def pack_run(repo: Repository, ref: str, head: bytes, ref_key: str | None, onramp: Onramp,
             limit: int, progress: Callable[[int], None] | None = None,
             stop: threading.Event | None = None) -> PackedRun:
    """Write the CARs of a run: reads committed state only, so any thread may run it.

    The caller holds :func:`run_lock` from here until :func:`record_run` is
    done (the run number is read here and claimed there). Setting *stop*
    makes it raise :class:`Interrupted` at the next block (daemon shutdown).
    """
    onramp.check()
    read = _Reader(repo)
    commits = read.history(head)
    with repo.store.snapshot() as r:
        run = r.counter("archive_run") + 1
        archived_refs = {k[len(K_REF):].decode(): bytes(v) for k, v in r.prefix("meta", K_REF)}
        prev_run = r.get("meta", K_RUN + _be(run - 1))
    for stale in onramp.out_dir.glob(f".run{run}-*.car.partial"):
        stale.unlink(missing_ok=True)  # an attempt at this run that a crash cut short
    prev_meta = json.loads(prev_run)["meta_cid"] if prev_run else None
    refs = dict(archived_refs)
    if ref_key:
        refs[ref_key] = head
    out = PackedRun(run, ref, head, refs, onramp)

    splitter = _Splitter(onramp.out_dir, limit, run, stop=stop)
    packer = _Packer(repo, splitter)
    new_commits: list[list[Any]] = []
    try:
        root = b""
        for cid in commits:
            known = packer._meta(K_OBJ + cid) is not None
            if known and cid != head:
                continue
            raw = packer._object(cid)
            dir_cid, _ = packer.directory(decode_commit(raw).tree)
            if not known:
                new_commits.append([cid, _link(dir_cid)])
            if cid == head:
                root = dir_cid
        packer.flush_pack()
        if not splitter.cars and refs == archived_refs:
            out.nothing = True
            return out
        meta_doc = {
            "t": META_TYPE, "v": 1, "run": run, "time_ns": _now(),
            "ref": ref_key or "", "head": head, "root": _link(root),
            "refs": refs, "default_branch": repo.default_branch,
            "commits": new_commits, "packs": [_link(p) for p in packer.packs],
            "previous": _link(cid_from_str(prev_meta)) if prev_meta else None,
        }
        meta_enc = _dag_cbor(meta_doc)
        meta_cid = cid_v1(DAG_CBOR, meta_enc)
        splitter.put(meta_cid, meta_enc)
        packer.emitted.add(meta_cid)
        out.pieces = _finish_cars(splitter, [root, meta_cid], onramp, run, ref, head, progress)
    except BaseException:
        splitter.abort()
        raise
    out.contents = [(car.blocks, car.objects) for car in splitter.cars]
    out.new_shas, out.new_nodes = packer.new_shas, packer.new_nodes
    out.root, out.meta_cid = root, meta_cid
    out.blocks, out.data_bytes, out.commits = (len(packer.emitted), packer.data_bytes,
                                               len(new_commits))
    return out


def record_run(repo: Repository, packed: PackedRun,
               also: Callable[[Txn], None] | None = None) -> Iterator[None]:
    """Record a packed run: one write transaction per piece (its blocks with it),
    then one for the memos, refs and the run itself (*also* writes into that
    last one: the daemon's job record). Yields after each transaction, so that
    the daemon lets FUSE requests in between.
    """
    for (blocks, objects), p in zip(packed.contents, packed.pieces, strict=True):
        with repo.store.write() as w:
            serial = w.add_counter("archive_piece", 1)
            p["serial"] = serial
            w.put("meta", K_PIECE + p["piece_cid"].encode(), json.dumps(p).encode())
            w.put("meta", K_SERIAL + _be(serial), p["piece_cid"].encode())
            for cid in blocks:
                w.put("meta", K_BLOCK + cid, _be(serial))
            for oid in objects:
                w.put("meta", K_OBJ + oid, _be(serial))
        yield
    onramp = packed.onramp
    with repo.store.write() as w:
        for cid_, sha in packed.new_shas.items():
            w.put("meta", K_SHA + cid_, sha)
        for key, (cid, tsize) in packed.new_nodes.items():
            w.put("meta", K_NODE + key, cid + _be(tsize))
        for k, v in packed.refs.items():
            w.put("meta", K_REF + k.encode(), v)
        packed.summary = {
            "run": packed.run, "ref": packed.ref, "commit": packed.head.hex(),
            "root_cid": cid_str(packed.root), "meta_cid": cid_str(packed.meta_cid),
            "pieces": [p["piece_cid"] for p in packed.pieces], "time_ns": _now(),
            "onramp": onramp.name, "out": str(onramp.out_dir)}
        w.put("meta", K_RUN + _be(packed.run), json.dumps(packed.summary).encode())
        w.set_counter("archive_run", packed.run)
        if also is not None:
            also(w)
    yield


def _temp_car(out_dir: Path, run: int, index: int) -> Path:
    return out_dir / f".run{run}-{index:05d}.car.partial"


def publish_run(packed: PackedRun) -> None:
    """Give a recorded run's CARs their names (``<piece CID>.car``): only once
    the records are durable. A run resumed after a crash finishes what is left."""
    moved = False
    for p in packed.pieces:
        final = Path(p["car_path"])
        tmp = _temp_car(final.parent, packed.run, int(p["index"]))
        if tmp.exists():
            os.replace(tmp, final)
            moved = True
    if moved and packed.pieces:
        fd = os.open(Path(packed.pieces[0]["car_path"]).parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def submit_pieces(onramp: Onramp, pieces: list[dict[str, Any]],
                  stop: threading.Event | None = None) -> list[dict[str, Any]]:
    """Hand recorded pieces to the onramp (runs its commands: any thread, no store
    access); the replies go to :func:`apply_replies`."""
    replies = []
    for p in pieces:
        if stop is not None and stop.is_set():
            raise Interrupted("archive run interrupted before every piece was submitted")
        replies.append(onramp.submit(dict(p)))
    onramp.finish(pieces)
    return replies


def apply_replies(repo: Repository, packed: PackedRun, replies: list[dict[str, Any]]
                  ) -> dict[str, Any]:
    """Record the onramp's verdicts; raise (after recording) if a piece failed."""
    failed = []
    for p, reply in zip(packed.pieces, replies, strict=True):
        reply = dict(reply)
        state = reply.pop("state", "packed")
        if reply or state != "packed":
            set_state(repo, p["piece_cid"], state, reply or None)
            p["state"] = state
            if reply:
                p["onramp_reply"] = reply
        if state == "failed":
            failed.append(p)
    if failed:
        raise JiaoziError(
            f"{len(failed)} of {len(packed.pieces)} piece(s) failed at the "
            f"{packed.onramp.name} onramp: "
            + ", ".join(f"{p['piece_cid']} ({p.get('onramp_reply', {}).get('error', '')})"
                        for p in failed[:3]))
    return packed.result()


def recorded_run(repo: Repository, run: int, onramp: Onramp) -> PackedRun:
    """A run recorded before a crash cut it short: its pieces the onramp never
    answered for (still ``packed``), ready for :func:`submit_pieces` again."""
    with repo.store.snapshot() as r:
        raw = r.get("meta", K_RUN + _be(run))
    if raw is None:
        raise NotFound(f"no archive run {run}")
    summary = json.loads(raw)
    mine = [p for p in pieces(repo) if p.get("run") == run]
    publish_run(PackedRun(run, summary["ref"], b"", {}, onramp, pieces=mine))
    return PackedRun(run, summary["ref"], bytes.fromhex(summary["commit"]), {}, onramp,
                     pieces=[p for p in mine if p["state"] == "packed"], summary=summary)


def _finish_cars(splitter: _Splitter, roots: list[bytes], onramp: Onramp, run: int, ref: str,
                 head: bytes, progress: Callable[[int], None] | None) -> list[dict[str, Any]]:
    """Patch the roots into every CAR and compute its piece.

    The CARs keep their temporary names until the run is recorded
    (:func:`publish_run`): a crash in between leaves no ``*.car`` that no
    piece record names (restore reads every ``*.car`` of a directory).
    """
    pieces = []
    for i, car in enumerate(splitter.cars):
        car.seal()
        car.writer.patch_roots(roots)
        assert car.commp is not None
        with open(car.tmp, "rb") as f:
            first = f.read(min(car.writer.size, CHUNK_IN))
        piece = car.commp.piece(first)
        name = f"{piece.cid_v1}.car"
        final = onramp.out_dir.resolve() / name
        if progress:
            progress(car.writer.size)
        pieces.append({
            **piece.as_dict(), "payload_cid": cid_str(roots[0]), "meta_cid": cid_str(roots[1]),
            "car_size": car.writer.size, "car_file": name, "car_path": str(final),
            "url": onramp.url(name), "blocks": car.writer.blocks, "run": run, "index": i,
            "ref": ref, "commit": head.hex(), "state": "packed", "onramp": onramp.name,
            "created_ns": _now(), "updated_ns": _now(),
        })
    return pieces


# ------------------------------------------------------------------- status


def pieces(repo: Repository) -> list[dict[str, Any]]:
    """Every archived piece, oldest first."""
    with repo.store.read() as r:
        out = [json.loads(v) for _, v in r.prefix("meta", K_PIECE)]
    return sorted(out, key=lambda p: p.get("serial", 0))


def status(repo: Repository) -> dict[str, Any]:
    ps = pieces(repo)
    counts = {s: 0 for s in STATES}
    for p in ps:
        counts[p["state"]] = counts.get(p["state"], 0) + 1
    with repo.store.read() as r:
        runs = [json.loads(v) for _, v in r.prefix("meta", K_RUN)]
        refs = {k[len(K_REF):].decode(): bytes(v).hex() for k, v in r.prefix("meta", K_REF)}
    return {"pieces": ps, "counts": counts, "runs": runs, "refs": refs,
            "piece_bytes": sum(p["piece_size"] for p in ps),
            "car_bytes": sum(p["car_size"] for p in ps)}


def set_state(repo: Repository, piece_cid: str, state: str,
              detail: dict[str, Any] | None = None) -> dict[str, Any]:
    """Move a piece to *state*; ``failed`` hands its blocks back to the next run."""
    if state not in STATES:
        raise JiaoziError(f"unknown piece state {state!r} (one of {', '.join(STATES)})")
    key = K_PIECE + piece_cid.encode()
    with repo.store.write() as w:
        raw = w.get("meta", key)
        if raw is None:
            raise NotFound(f"no archived piece {piece_cid}")
        p = json.loads(raw)
        p["state"] = state
        p["updated_ns"] = _now()
        if detail:
            p.setdefault("detail", {}).update(detail)
        w.put("meta", key, json.dumps(p).encode())
        if state == "failed":
            serial = _be(p["serial"])
            for prefix in (K_BLOCK, K_OBJ):
                dead = [bytes(k) for k, v in w.prefix("meta", prefix) if bytes(v) == serial]
                for k in dead:
                    w.delete("meta", k)
            for k in [bytes(k) for k, _ in w.prefix("meta", K_NODE)]:
                w.delete("meta", k)
    return p


# ------------------------------------------------------------------ restore


def _car_paths(cars: str | Path | Iterable[str | Path]) -> list[Path]:
    items = [cars] if isinstance(cars, str | Path) else list(cars)
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.suffix == ".car" and q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise NotFound(f"{p}: no such CAR file or directory")
    if not out:
        raise NotFound("no CAR files to restore from")
    return out


def _expected_pieces(paths: list[Path]) -> dict[Path, tuple[str, str]]:
    """What each CAR's piece CID should be: from manifest.csv, else from its name."""
    expected: dict[Path, tuple[str, str]] = {}
    for p in paths:
        try:
            parse_piece_cid(p.stem)
            expected[p] = (p.stem, "file name")
        except ValueError:
            pass
    for d in {p.parent for p in paths}:
        man = d / MANIFEST_CSV
        if not man.is_file():
            continue
        with open(man, newline="") as f:
            for row in csv.DictReader(f):
                name, piece = row.get("filename"), row.get("piece_cid")
                if name and piece and (d / name) in paths:
                    expected[d / name] = (piece, f"{MANIFEST_CSV} row")
    return expected


@dataclass(slots=True)
class _RestoreState:
    metas: dict[bytes, dict[str, Any]] = field(default_factory=dict)
    packs: set[bytes] = field(default_factory=set)
    meta_roots: dict[bytes, str] = field(default_factory=dict)
    headers: list[tuple[str, list[bytes]]] = field(default_factory=list)
    blocks: int = 0
    chunks: int = 0
    objects: int = 0


def restore(cars: str | Path | Iterable[str | Path], new_repo_path: str | Path,
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Rebuild a repository from CAR files alone (all CARs of all archive runs).

    Nothing is left at *new_repo_path* unless every CAR and every block
    verified and the result passed fsck.
    """
    dest = Path(new_repo_path)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise Exists(f"{dest} exists and is not an empty directory")
    paths = _car_paths(cars)
    expected = _expected_pieces(paths)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.restore-", dir=dest.parent))
    try:
        result = _restore_into(paths, expected, tmp / "repo", progress)
        if dest.exists():
            dest.rmdir()
        os.rename(tmp / "repo", dest)
        result["repo"] = str(dest)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _restore_into(paths: list[Path], expected: dict[Path, tuple[str, str]], target: Path,
                  progress: Callable[[int], None] | None) -> dict[str, Any]:
    st = _RestoreState()
    verified = []
    repo = Repository.init(target)
    try:
        for path in paths:
            verified.append(_restore_car(repo, path, expected.get(path), st, progress))
        return _restore_refs(repo, st, verified)
    finally:
        repo.close()


def _restore_car(repo: Repository, path: Path, want: tuple[str, str] | None,
                 st: _RestoreState, progress: Callable[[int], None] | None) -> dict[str, Any]:
    hasher = ThreadedCommP()
    blocks = iter_car(path, observer=hasher.write)
    pending_chunks: list[tuple[bytes, bytes]] = []
    pending_objects: list[bytes] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending_bytes
        with repo.store.write() as w:
            for cid_, data in pending_chunks:
                if w.put_chunk(cid_, data):
                    st.chunks += 1
            for raw in pending_objects:
                if w.put_object(object_id(raw), raw):
                    st.objects += 1
        pending_chunks.clear()
        pending_objects.clear()
        pending_bytes = 0

    try:
        roots = next(blocks)
        assert isinstance(roots, list)
        if len(roots) == 2:
            st.meta_roots.setdefault(roots[1], path.name)
            st.headers.append((path.name, roots))
        for blk in blocks:
            assert not isinstance(blk, list)
            st.blocks += 1
            codec = blk.cid.codec
            if codec == RAW:
                pending_chunks.append((blake3.blake3(blk.data).digest(), blk.data))
                pending_bytes += len(blk.data)
            elif codec == DAG_CBOR:
                try:
                    doc = cbor2.loads(blk.data)
                except Exception:
                    continue  # not ours: verified, otherwise ignored
                if isinstance(doc, dict) and doc.get("t") == PACK_TYPE:
                    objs = doc.get("objects")
                    if not isinstance(objs, list) or not all(isinstance(o, bytes) for o in objs):
                        raise Corrupt(f"{path}: malformed object pack {blk.cid}")
                    pending_objects.extend(objs)
                    pending_bytes += sum(len(o) for o in objs)
                    st.packs.add(blk.cid.raw)
                elif isinstance(doc, dict) and doc.get("t") == META_TYPE:
                    st.metas[blk.cid.raw] = doc
            elif codec != DAG_PB:
                log.info("%s: block %s of codec 0x%x ignored", path, blk.cid, codec)
            if pending_bytes >= 64 << 20:
                flush()
        flush()
    except BaseException:
        hasher.abort()
        raise
    c = hasher.close()
    piece = c.piece()
    if progress:
        progress(c.size)
    out = {"car": path.name, "piece_cid": piece.cid_v1, "piece_cid_v2": piece.cid_v2,
           "car_size": c.size, "checked_against": None}
    if want is not None:
        expect, source = want
        try:
            ref = parse_piece_cid(expect)
        except ValueError as exc:
            raise CarError(f"{path}: the expected piece CID in its {source} is bad: {exc}"
                           ) from None
        if not ref.matches(piece):
            raise CarError(
                f"{path}: piece commitment mismatch: the {source} says {expect}, the CAR's "
                f"bytes give {piece.cid_v1} ({piece.cid_v2})")
        out["checked_against"] = source
    return out


def _meta_fields(cid: bytes, doc: dict[str, Any]) -> dict[str, Any]:
    try:
        refs = {str(k): bytes(v) for k, v in doc["refs"].items()}
        if not all(len(v) == 32 for v in refs.values()):
            raise ValueError("bad ref")
        return {"run": int(doc["run"]), "time_ns": int(doc["time_ns"]), "refs": refs,
                "default_branch": str(doc["default_branch"]), "head": bytes(doc["head"]),
                "packs": [_unlink(p) for p in doc["packs"]]}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise Corrupt(f"archive metadata block {cid_str(cid)} is malformed") from None


def _restore_refs(repo: Repository, st: _RestoreState, verified: list[dict[str, Any]]
                  ) -> dict[str, Any]:
    for cid, car in st.meta_roots.items():
        if cid not in st.metas:
            raise CarError(
                f"the metadata block {cid_str(cid)} of the archive run that {car} belongs to "
                "is missing: that run's last CAR is not among the CARs given")
    if not st.metas:
        raise CarError("no jiaozifuse archive metadata in these CARs")
    for car, (root, meta) in st.headers:
        want = st.metas[meta].get("root")
        if not isinstance(want, cbor2.CBORTag) or _unlink(want) != root:
            raise CarError(f"{car}: its header's root {cid_str(root)} is not its archive "
                           "run's root directory (corrupt header)")
    metas = sorted((_meta_fields(c, d) for c, d in st.metas.items()),
                   key=lambda m: (m["run"], m["time_ns"]))
    for m in metas:
        missing = [p for p in m["packs"] if p not in st.packs]
        if missing:
            raise CarError(
                f"archive run {m['run']}: block {cid_str(missing[0])} (repository objects) "
                "is missing: a CAR of that run is not among the CARs given")
    refs: dict[str, bytes] = {}
    for m in metas:
        refs.update(m["refs"])
    last = metas[-1]
    default = last["default_branch"]
    if f"branch/{default}" not in refs:
        refs.setdefault(f"branch/{default}", last["head"])
    init_branch = repo.default_branch
    init_head = repo.head(init_branch)
    with repo.store.write() as w:
        # Empty files name the empty manifest, which is implicit (never archived);
        # store it so that fsck finds every manifest.
        w.put_object(EMPTY_MANIFEST_ID, EMPTY_MANIFEST)
        for key, commit in sorted(refs.items()):
            kind, _, name = key.partition("/")
            if kind not in ("branch", "tag"):
                continue
            check_ref_name(name, kind)
            raw = w.get_object(commit)
            if raw is None or bytes(raw[:1]) != b"C":
                raise CarError(f"ref {key} names commit {commit.hex()[:12]}, which is not in "
                               "the CARs given")
            tree = decode_commit(bytes(raw)).tree
            w.put("refs", key.encode(), commit)
            if kind == "branch":
                if name == init_branch:
                    repo._reset_worktree(w, name, tree)
                else:
                    root = repo.worktree.create_root(w, tree, os.getuid(), os.getgid())
                    w.put("refs", f"wt/{name}".encode(), u64(root))
    if default != init_branch:
        repo.config["default_branch"] = default
        _write_json_atomic(repo.path / "config.json", repo.config)
        if f"branch/{init_branch}" not in refs:
            repo.delete_branch(init_branch)
    if init_head not in refs.values():
        with repo.store.write() as w:
            w.delete("objects", init_head)
    _drop_unreferenced_chunks(repo)
    from .fsck import fsck

    report = fsck(repo)
    if not report["ok"]:
        p = report["problems"][0]
        raise CarError(f"restored repository is incomplete ({len(report['problems'])} "
                       f"problem(s); first: {p['kind']} {p['id'][:16]} {p['detail']}): "
                       "a CAR is missing")
    return {"refs": {k: v.hex() for k, v in sorted(refs.items())}, "default_branch": default,
            "cars": len(verified), "pieces": verified, "blocks": st.blocks,
            "chunks": report["chunks"], "objects": report["objects"],
            "commits": report["commits"], "runs": [m["run"] for m in metas]}


def _drop_unreferenced_chunks(repo: Repository) -> None:
    """Leaves that are no chunk of any manifest (zero leaves of holes) go."""
    used: set[bytes] = set()
    with repo.store.read() as r:
        for _, raw in r.prefix("objects", b""):
            if bytes(raw[:1]) == b"M":
                level, entries = decode_manifest(bytes(raw))
                if level == 0:
                    used.update(cid for cid, _ in entries)
        stored = list(r.iter_chunks())
    dead = [(k, n) for k, n in stored if k not in used]
    if dead:
        with repo.store.write() as w:
            for k, _ in dead:
                w.delete_chunk(k)
            w.add_counter("chunk_bytes", -sum(n for _, n in dead))


def car_roots(path: str | Path) -> list[str]:
    return [cid_str(r) for r in read_header(Path(path))]


# ------------------------------------------------------- control operations
# JSON in, JSON out, like ops.py: the CLI runs them here or, when a daemon
# serves the repository, inside the daemon (ops.OPS.update(archive.OPS)).


def op_archive(repo: Repository, ref: str, onramp: str = "manifest", out: str | None = None,
               target_size: int = DEFAULT_TARGET, command: list[str] | None = None,
               url_prefix: str | None = None) -> dict[str, Any]:
    out_dir = Path(out) if out else repo.path / "archive"
    repo.store.commit_batch()  # packing reads committed state only (see _Reader)
    return archive(repo, ref, make_onramp(onramp, out_dir, command, url_prefix), target_size)


def op_archive_status(repo: Repository) -> dict[str, Any]:
    return status(repo)


def op_archive_mark(repo: Repository, piece_cid: str, state: str,
                    detail: dict[str, Any] | None = None) -> dict[str, Any]:
    return set_state(repo, piece_cid, state, detail)


OPS: dict[str, Callable[..., Any]] = {
    "archive": op_archive, "archive_status": op_archive_status, "archive_mark": op_archive_mark,
}


__all__ = [
    "CSV_COLUMNS", "DEFAULT_TARGET", "OPS", "STATES", "CommandOnramp", "ManifestOnramp",
    "Onramp", "Piece", "archive", "car_roots", "make_onramp", "pieces", "restore", "set_state",
    "status",
]
