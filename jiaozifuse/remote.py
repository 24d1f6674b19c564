"""The remote: a repository's home in S3 (any S3-compatible store).

Layout under ``s3://BUCKET/PREFIX/``::

    config.json                     format, chunker parameters
    packs/<id>.pack                 chunks, concatenated (tens of MiB each)
    packs/<id>.idx                  index of a chunk pack: kind, id, offset, length
    packs/<id>.opack                objects (manifests, trees, commits) with their index
    refs/branch/<name>              {"commit": HEX}, updated by compare-and-swap
    refs/tag/<name>
    worktrees/<cache-id>/<branch>   checkpoint of a cache's uncommitted worktree

Pack ids are the blake3 of the pack's index (which names every chunk or
object in it by its own blake3 id), so re-uploading after a crash writes the
same keys again (idempotent).  A pack's index is written after
the pack, and a ref after every pack its commit needs, so a reader never finds
a name whose content is missing.

Refs change with S3 conditional writes (``If-Match`` on the ETag seen last,
``If-None-Match: *`` to create): two machines committing to one branch cannot
overwrite each other silently.

This module only speaks S3; what to upload and when is writeback.py's job.
Every call is blocking (boto3): callers run it in a worker thread.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from .errors import Conflict, JiaoziError, NotFound

IDX_MAGIC = b"JZIDX1\0\0"
_IDX_ENTRY = struct.Struct("<c32sQI")


class RemoteError(JiaoziError):
    """The remote could not be reached or refused a request."""

    errno = 5  # EIO


@dataclass(frozen=True)
class RemoteURL:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, url: str) -> RemoteURL:
        u = urlparse(url)
        if u.scheme != "s3" or not u.netloc:
            raise JiaoziError(f"not an S3 URL: {url!r} (expected s3://BUCKET/PREFIX)")
        return cls(u.netloc, u.path.strip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, *parts: str) -> str:
        return "/".join([p for p in (self.prefix, *parts) if p])


def encode_index(entries: list[tuple[bytes, bytes, int, int]]) -> bytes:
    """entries: (kind byte, id, offset, length)."""
    out = bytearray(IDX_MAGIC)
    out += struct.pack("<I", len(entries))
    for kind, oid, off, n in entries:
        out += _IDX_ENTRY.pack(kind, oid, off, n)
    return bytes(out)


def decode_index(data: bytes) -> list[tuple[bytes, bytes, int, int]]:
    if data[:8] != IDX_MAGIC or len(data) < 12:
        raise JiaoziError("corrupt pack index (bad magic)")
    (count,) = struct.unpack_from("<I", data, 8)
    body = memoryview(data)[12:]
    if len(body) != count * _IDX_ENTRY.size:
        raise JiaoziError("corrupt pack index (length)")
    return [(k, bytes(i), o, n) for k, i, o, n in _IDX_ENTRY.iter_unpack(body)]


def _is_status(exc: Exception, *codes: int) -> bool:
    resp = getattr(exc, "response", None) or {}
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status in codes


def _describe(exc: Exception) -> str:
    resp = getattr(exc, "response", None)
    if resp:
        err = resp.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip(": ")
    return f"{type(exc).__name__}: {exc}"


class Remote:
    """Blocking access to one repository's prefix in an S3 bucket."""

    def __init__(self, url: str | RemoteURL, endpoint_url: str | None = None,
                 connect_timeout: float = 5, read_timeout: float = 60,
                 attempts: int = 3) -> None:
        import boto3
        from botocore.config import Config

        self.url = RemoteURL.parse(url) if isinstance(url, str) else url
        self.endpoint_url = endpoint_url or os.environ.get("JIAOZIFUSE_S3_ENDPOINT") or None
        # No SHA-256 of each body for the signature (UNSIGNED-PAYLOAD): over
        # https botocore already leaves it out, but over plain http (a store
        # on the local network) it hashed every pack, about half the upload
        # path's CPU (1.08 -> 0.47 CPU s/GiB, 160 -> 183 MiB/s for 32 MiB
        # PUTs to SeaweedFS here).  The body is still covered by the CRC32
        # checksum botocore sends with it, and every chunk and object is
        # checked against its blake3 id whenever it is read back.
        cfg = Config(
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            retries={"max_attempts": attempts, "mode": "standard"},
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            max_pool_connections=16,
        )
        session = boto3.session.Session()
        self.s3 = session.client("s3", endpoint_url=self.endpoint_url, config=cfg,
                                 region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        self.requests = 0

    def __repr__(self) -> str:  # never show credentials
        return f"Remote({self.url}, endpoint={self.endpoint_url})"

    # ------------------------------------------------------------ primitives

    def _call(self, what: str, fn: Any, **kw: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        self.requests += 1
        try:
            return fn(**kw)
        except ClientError as exc:
            if _is_status(exc, 404):
                raise NotFound(f"{what}: not found in {self.url}") from None
            if _is_status(exc, 412, 409):
                raise Conflict(f"{what}: changed on the remote meanwhile") from None
            raise RemoteError(f"{what} failed on {self.url}: {_describe(exc)}") from None
        except BotoCoreError as exc:
            raise RemoteError(f"{what} failed on {self.url}: {_describe(exc)}") from None

    def put(self, key: str, data: bytes, **kw: Any) -> str:
        r = self._call(f"PUT {key}", self.s3.put_object, Bucket=self.url.bucket,
                       Key=self.url.key(key), Body=data, **kw)
        return r.get("ETag", "")

    def _get_object(self, key: str, start: int | None, length: int | None) -> Any:
        kw: dict[str, Any] = {}
        if start is not None and length is not None:
            kw["Range"] = f"bytes={start}-{start + length - 1}"
        return self._call(f"GET {key}", self.s3.get_object, Bucket=self.url.bucket,
                          Key=self.url.key(key), **kw)

    def get(self, key: str, start: int | None = None, length: int | None = None
            ) -> tuple[bytes, str]:
        r = self._get_object(key, start, length)
        return r["Body"].read(), r.get("ETag", "")

    def get_pieces(self, key: str, start: int, length: int, piece: int
                   ) -> Iterator[bytes]:
        """A ranged GET whose body is handed over in pieces of *piece* bytes.

        For consumers that work on the body as it arrives (hashing and caching
        fetched chunks while the rest is still on the wire), and that keep no
        more of it in memory than they need.  Errors reading the body raise
        :class:`RemoteError` like those of the request.
        """
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        body = self._get_object(key, start, length)["Body"]
        try:
            while data := body.read(piece):
                yield data
        except (BotoCoreError, HTTPError, OSError) as exc:
            raise RemoteError(f"GET {key} failed on {self.url}: {_describe(exc)}") from None
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        try:
            self._call(f"HEAD {key}", self.s3.head_object, Bucket=self.url.bucket,
                       Key=self.url.key(key))
            return True
        except NotFound:
            return False

    def list(self, prefix: str) -> list[str]:
        """Keys under *prefix* (relative to the repository prefix)."""
        full = self.url.key(prefix)
        out = []
        token = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.url.bucket, "Prefix": full}
            if token:
                kw["ContinuationToken"] = token
            r = self._call(f"LIST {prefix}", self.s3.list_objects_v2, **kw)
            strip = len(self.url.key("")) + 1 if self.url.prefix else 0
            out += [o["Key"][strip:] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return out
            token = r.get("NextContinuationToken")

    def delete(self, key: str) -> None:
        self._call(f"DELETE {key}", self.s3.delete_object, Bucket=self.url.bucket,
                   Key=self.url.key(key))

    def check(self) -> None:
        """Fail early with a clear message if the bucket cannot be used."""
        self._call("HEAD bucket", self.s3.head_bucket, Bucket=self.url.bucket)

    # ------------------------------------------------------------------ refs

    def get_ref(self, name: str) -> tuple[bytes, str] | None:
        """(commit id, etag) of a ref (``branch/x`` or ``tag/x``), None if absent."""
        try:
            data, etag = self.get(f"refs/{name}")
        except NotFound:
            return None
        try:
            return bytes.fromhex(json.loads(data)["commit"]), etag
        except (ValueError, KeyError, TypeError):
            raise JiaoziError(f"remote ref {name} is corrupt") from None

    def cas_ref(self, name: str, commit: bytes | None, expected_etag: str | None) -> str:
        """Set (or delete, *commit* None) a ref if it still has *expected_etag*.

        *expected_etag* None means "the ref must not exist".  Raises Conflict
        when another writer got there first.
        """
        key = f"refs/{name}"
        if commit is None:
            cur = self.get_ref(name)
            if cur is not None and expected_etag is not None and cur[1] != expected_etag:
                raise Conflict(f"ref {name} changed on the remote meanwhile")
            if cur is not None:
                self.delete(key)
            return ""
        # The nonce makes every write's ETag new: S3 ETags are MD5s of the body,
        # so without it a ref going A -> B -> A would hand its old ETag back
        # and a writer holding that stale ETag would win the swap.
        body = json.dumps({"commit": commit.hex(), "nonce": os.urandom(8).hex()}).encode()
        try:
            if expected_etag is None:
                return self.put(key, body, IfNoneMatch="*")
            return self.put(key, body, IfMatch=expected_etag)
        except NotFound:  # AWS answers If-Match on a missing key with 404
            raise Conflict(f"ref {name} changed on the remote meanwhile") from None

    def list_refs(self) -> dict[str, bytes]:
        out = {}
        for key in self.list("refs/"):
            name = key.removeprefix("refs/")
            ref = self.get_ref(name)
            if ref is not None:
                out[name] = ref[0]
        return out
