"""The control channel between the CLI and a running daemon.

A daemon serving a repository listens on ``REPO/run/control.sock`` (mode
0600).  A request is one JSON line ``{"op": NAME, "args": {...}}``; the reply
is one JSON line ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
MESSAGE, "errno": N}``.  Only the daemon's own user (or root) may connect:
the server checks the peer's credentials (SO_PEERCRED) on every connection,
on top of the socket's file mode.

While a daemon serves a repository, every command goes through it, so the
daemon's open files are flushed before a commit and its kernel caches are
invalidated after a reset; the CLI never writes the store behind its back.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from pathlib import Path
from typing import Any

from .errors import JiaoziError

MAX_REQUEST = 1 << 20


def socket_path(repo: Path) -> Path:
    return repo / "run" / "control.sock"


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def call(repo: Path, op: str, args: dict[str, Any], timeout: float | None = None) -> Any:
    """Run *op* in the daemon serving *repo*.

    Raises FileNotFoundError when no daemon serves it (the caller then works
    on the store itself), JiaoziError for the operation's own errors.
    """
    path = socket_path(repo)
    if not path.exists():
        raise FileNotFoundError(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            raise FileNotFoundError(path) from None
        s.settimeout(timeout)
        s.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            data = s.recv(1 << 16)
            if not data:
                raise JiaoziError("the daemon closed the control connection", errno.EIO)
            buf += data
    finally:
        s.close()
    reply = json.loads(buf)
    if reply.get("ok"):
        return reply.get("result")
    raise JiaoziError(reply.get("error", "daemon error"), reply.get("errno") or errno.EIO)


def daemon_running(repo: Path) -> bool:
    try:
        call(repo, "ping", {}, timeout=5)
        return True
    except (FileNotFoundError, OSError, JiaoziError):
        return False


def encode_reply(result: Any = None, error: BaseException | None = None) -> bytes:
    if error is None:
        return json.dumps({"ok": True, "result": result}).encode() + b"\n"
    code = getattr(error, "errno", None) or errno.EIO
    return json.dumps({"ok": False, "error": str(error), "errno": code}).encode() + b"\n"


def allowed(uid: int) -> bool:
    return uid == 0 or uid == os.getuid()
