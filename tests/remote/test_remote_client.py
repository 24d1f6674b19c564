"""What jiaozifuse's S3 client puts on the wire (jiaozifuse.remote.Remote).

Bodies are sent without a SHA-256 in the signature (UNSIGNED-PAYLOAD), so the
CRC32 checksum botocore sends with each body is what covers it in transit.
"""

from __future__ import annotations

import base64
import os
import zlib
from unittest import mock

from jiaozifuse.remote import Remote


def test_puts_carry_a_crc32_of_their_body_and_no_payload_hash(bucket) -> None:
    s3, name = bucket
    with mock.patch.dict(os.environ, s3.env()):
        remote = Remote(f"s3://{name}/repo")
    sent: list[dict[str, bytes]] = []

    def record(request, **_kw) -> None:
        sent.append({k.lower(): v for k, v in request.headers.items()})

    remote.s3.meta.events.register("before-send.s3.PutObject", record)
    body = os.urandom(3 << 20)
    remote.put("packs/x.pack", body)
    (h,) = sent
    assert h["x-amz-content-sha256"] == b"UNSIGNED-PAYLOAD"
    crc = base64.b64encode(zlib.crc32(body).to_bytes(4, "big"))
    assert h["x-amz-checksum-crc32"] == crc
    assert remote.get("packs/x.pack")[0] == body
