"""The event log: every change and repository operation, durable and ordered.

Events are appended to the store's ``events`` database (key: sequence number,
big-endian; value: compact JSON) in the same transaction as the change they
describe, so an event exists exactly when its change does.  Consumers have
named offsets (``meta`` key ``consumer/NAME``): a consumer reads after its
offset and acknowledges what it has handled, so delivery is at-least-once —
an event is delivered again until acknowledged, even across crashes.

Retention: the oldest events are dropped once the log holds more than
``max_events`` or they are older than ``max_age`` seconds (config
``events.max_events`` / ``events.max_age_s``), whether or not every consumer
has seen them; a consumer that falls that far behind is told by
:meth:`EventLog.read` (its first event is later than it asked for).

Event fields: ``seq``, ``time_ns``, ``type``, ``branch``, ``head`` (the
branch's head commit when the event happened, after a commit that commit),
``path``, ``old_path`` (moves), ``size``, ``commit``, ``paths`` (commits), and
type-specific extras.  Paths are text; bytes that are not UTF-8 are kept
with the ``surrogateescape`` convention of ``os.fsdecode``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from .store import Store, Txn

#: Event types from the mount (inotify-like) and from repository operations.
FS_TYPES = ("create", "close_write", "delete", "move", "mkdir", "rmdir", "attrib")
REPO_TYPES = (
    "commit", "branch_create", "branch_delete", "tag_create", "tag_delete", "merge",
    "revert", "reset", "import",
)
DEFAULT_MAX_EVENTS = 1_000_000
DEFAULT_MAX_AGE_S = 30 * 24 * 3600


def _be(n: int) -> bytes:
    return n.to_bytes(8, "big")


def encode(event: dict[str, Any]) -> bytes:
    # ASCII JSON: a path's non-UTF-8 bytes (surrogateescape) become \udcXX escapes,
    # so every consumer gets valid JSON and os.fsencode() gives the bytes back.
    return json.dumps(event, separators=(",", ":"), ensure_ascii=True,
                      default=str).encode("ascii")


def decode(raw: bytes) -> dict[str, Any]:
    return json.loads(bytes(raw).decode("utf-8", "surrogateescape"))


class EventLog:
    """Append, read and acknowledge events in a store."""

    def __init__(self, store: Store, max_events: int = DEFAULT_MAX_EVENTS,
                 max_age_s: float = DEFAULT_MAX_AGE_S) -> None:
        self.store = store
        self.max_events = max_events
        self.max_age_s = max_age_s
        self.enabled = True
        self._appended = 0
        self._trimmed_ns = 0

    # ------------------------------------------------------------------ write

    def append(self, type: str, t: Txn | None = None, **fields: Any) -> int:
        """Append one event (inside *t* if given, else its own transaction)."""
        if t is None:
            with self.store.write() as w:
                return self.append(type, w, **fields)
        seq = t.add_counter("event_seq", 1)
        event = {"seq": seq, "time_ns": time.time_ns(), "type": type}
        event.update({k: v for k, v in fields.items() if v is not None})
        branch = fields.get("branch")
        if isinstance(branch, str) and "head" not in event:
            # The branch's head now: the trigger rules in force for this event,
            # whenever the runner gets to it (a rules commit may come between).
            head = t.get("refs", b"branch/" + branch.encode())
            if head is not None:
                event["head"] = bytes(head).hex()
        t.txn.put(_be(seq), encode(event), db=t._dbs["events"])
        self._appended += 1
        now = event["time_ns"]
        # Retention runs on the first append of a process, then every 1,024
        # appends or once the oldest event may have aged out (a trim with
        # nothing to drop is one cursor step), so a quiet daemon keeps no
        # event much longer than max_age_s.
        if (self._appended % 1024 == 1
                or now - self._trimmed_ns > min(self.max_age_s / 2, 1.0) * 1e9):
            self._trimmed_ns = now
            self.trim(t)
        return seq

    def trim(self, t: Txn) -> int:
        """Apply retention; returns how many events were dropped."""
        db = t._dbs["events"]
        total = t.txn.stat(db)["entries"]
        horizon = time.time_ns() - int(self.max_age_s * 1e9)
        dropped = 0
        cur = t.txn.cursor(db=db)
        while cur.first():
            if total - dropped <= self.max_events:
                if decode(cur.value()).get("time_ns", 0) >= horizon:
                    break
            cur.delete()
            dropped += 1
        return dropped

    # ------------------------------------------------------------------- read

    def last_seq(self) -> int:
        with self.store.read() as r:
            return r.counter("event_seq")

    def read(self, since: int = 0, limit: int | None = None,
             committed: bool = False) -> Iterator[dict[str, Any]]:
        """Events with ``seq > since``, oldest first."""
        n = 0
        ctx = self.store.snapshot() if committed else self.store.read()
        with ctx as r:
            cur = r.cursor("events")
            if not cur.set_range(_be(since + 1)):
                return
            for _, v in cur:
                yield decode(v)
                n += 1
                if limit is not None and n >= limit:
                    return

    # -------------------------------------------------------------- consumers

    def offset(self, consumer: str) -> int:
        with self.store.read() as r:
            raw = r.get("meta", b"consumer/" + consumer.encode())
        return int(raw) if raw else 0

    def ack(self, consumer: str, seq: int) -> None:
        """Mark everything up to *seq* handled by *consumer*."""
        with self.store.write() as w:
            key = b"consumer/" + consumer.encode()
            cur = w.get("meta", key)
            if cur is None or int(cur) < seq:
                w.put("meta", key, str(seq).encode())

    def consumers(self) -> dict[str, int]:
        with self.store.read() as r:
            return {bytes(k[9:]).decode(): int(v) for k, v in r.prefix("meta", b"consumer/")}


class Consumer:
    """A named reader of the log with at-least-once delivery.

    ``for ev in consumer.poll(): handle(ev); consumer.ack(ev)`` — an event not
    acknowledged is returned again by the next poll (in this process or after
    a restart).
    """

    def __init__(self, log: EventLog, name: str) -> None:
        self.log = log
        self.name = name
        self._pos = log.offset(name)

    def poll(self, limit: int = 1000) -> list[dict[str, Any]]:
        events = list(self.log.read(self._pos, limit))
        return events

    def ack(self, event: dict[str, Any] | int) -> None:
        seq = event if isinstance(event, int) else int(event["seq"])
        self.log.ack(self.name, seq)
        self._pos = max(self._pos, seq)

    def rewind(self) -> None:
        """Forget unacknowledged progress (re-read from the stored offset)."""
        self._pos = self.log.offset(self.name)
