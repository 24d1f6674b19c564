"""Fixtures that run a real SeaweedFS S3 server (``weed mini``, auth on) on 127.0.0.1.

- ``s3``: one server for the whole session (a ``tests.s3server.SeaweedS3``), closed at the end of
  the session whatever happens. Do not stop or restart it: use ``s3_fresh`` for that.
- ``bucket``: ``(s3, name)`` with a fresh, empty bucket on the session server, emptied and deleted
  afterwards (best effort).
- ``s3_fresh``: a server of the test's own (fresh ports, fresh data dir), free to stop, kill and
  restart; closed at teardown.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys

import pytest
from botocore.config import Config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from s3server import SeaweedS3

_bucket_counter = itertools.count(1)


@pytest.fixture(scope="session")
def s3():
    server = SeaweedS3()
    with server:
        yield server


@pytest.fixture
def s3_fresh():
    server = SeaweedS3()
    with server:
        yield server


def _bucket_name(nodeid: str) -> str:
    test = re.sub(r"[^a-z0-9-]+", "-", nodeid.rsplit("::", 1)[-1].lower()).strip("-")
    name = f"jz{next(_bucket_counter):04d}-{os.getpid() % 100000}-{test}"
    return name[:63].rstrip("-")


def _empty_and_delete(client, name: str) -> None:
    with contextlib.suppress(Exception):
        uploads = client.list_multipart_uploads(Bucket=name).get("Uploads", [])
        for u in uploads:
            client.abort_multipart_upload(Bucket=name, Key=u["Key"], UploadId=u["UploadId"])
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    with contextlib.suppress(Exception):
        client.delete_bucket(Bucket=name)


@pytest.fixture
def bucket(s3, request):
    name = s3.make_bucket(_bucket_name(request.node.nodeid))
    try:
        yield s3, name
    finally:
        if s3.running:
            client = s3.client(
                Config(connect_timeout=2, read_timeout=30, retries={"max_attempts": 1})
            )
            _empty_and_delete(client, name)
