"""Forwarding the event log to a message broker (Redis Streams).

Consumers on other machines read events from a broker rather than from this
cache's LMDB.  The forwarder is the log's consumer ``redis``: it ``XADD``s each
event to the stream and acknowledges it in the log only afterwards, so a
crash between the two sends the event again (at-least-once, as in the log).
Each stream entry carries the event's ``seq`` so that a reader can drop
duplicates.

Configured in the repository's config.json::

    "events": {"redis_url": "redis://127.0.0.1:6379/0", "redis_stream": "jiaozi:events",
               "redis_maxlen": 1000000}
"""

from __future__ import annotations

import logging
from typing import Any

from .events import EventLog, encode

log = logging.getLogger("jiaozifuse.forward")

CONSUMER = "redis"


class RedisForwarder:
    def __init__(self, log_: EventLog, url: str, stream: str = "jiaozi:events",
                 maxlen: int | None = 1_000_000) -> None:
        import redis

        self.log = log_
        self.stream = stream
        self.maxlen = maxlen
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)

    @classmethod
    def from_config(cls, log_: EventLog, config: dict[str, Any]) -> RedisForwarder | None:
        ev = config.get("events") or {}
        url = ev.get("redis_url")
        if not url:
            return None
        return cls(log_, url, ev.get("redis_stream", "jiaozi:events"),
                   ev.get("redis_maxlen", 1_000_000))

    def pending(self, limit: int = 500) -> list[dict[str, Any]]:
        return list(self.log.read(self.log.offset(CONSUMER), limit))

    def send(self, events: list[dict[str, Any]]) -> None:
        """XADD a batch in one round trip (blocking; run it in a worker thread)."""
        pipe = self.client.pipeline(transaction=False)
        for ev in events:
            pipe.xadd(self.stream, {"seq": ev["seq"], "type": ev["type"],
                                    "event": encode(ev)},
                      maxlen=self.maxlen, approximate=True)
        pipe.execute()

    def forward_once(self, limit: int = 500) -> int:
        """Forward what is pending, from this thread; returns events sent."""
        events = self.pending(limit)
        if events:
            self.send(events)
            self.log.ack(CONSUMER, events[-1]["seq"])
        return len(events)
