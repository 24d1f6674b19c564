"""Prometheus metrics of a mount daemon (``jiaozifuse mount --metrics-addr HOST:PORT``).

Off by default.  Counters and histograms are updated on the FUSE thread
(a few microseconds per request); gauges that describe the store (cache size,
upload queue, event log) are computed when Prometheus scrapes, from a read
snapshot in the HTTP server's thread, so they cost nothing in between.

Exposed (all prefixed ``jiaozifuse_``):

``fuse_requests_total{op}``, ``fuse_request_seconds{op}`` (histogram),
``fuse_errors_total{op,errno}``, ``cache_bytes``, ``cache_limit_bytes``,
``cache_hits_total``, ``cache_misses_total``, ``read_bytes_total{source}``
(source = cache | remote), ``upload_queue_entries``, ``upload_queue_oldest_seconds``,
``upload_bytes_total``, ``upload_errors_total``, ``event_log_last_seq``,
``event_log_lag{consumer}``, ``trigger_runs_total{result}``.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BUCKETS = (50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 0.1, 0.5, 2.0)


class Metrics:
    def __init__(self, repo: Any) -> None:
        self.repo = repo
        r = self.registry = CollectorRegistry()
        self.requests = Counter("jiaozifuse_fuse_requests", "FUSE requests served",
                                ["op"], registry=r)
        self.seconds = Histogram("jiaozifuse_fuse_request_seconds", "FUSE request latency",
                                 ["op"], buckets=BUCKETS, registry=r)
        self.errors = Counter("jiaozifuse_fuse_errors", "FUSE requests answered with an error",
                              ["op", "errno"], registry=r)
        self.cache_hits = Counter("jiaozifuse_cache_hits", "Chunk reads served locally",
                                  registry=r)
        self.cache_misses = Counter("jiaozifuse_cache_misses",
                                    "Chunk reads that went to the remote", registry=r)
        self.read_bytes = Counter("jiaozifuse_read_bytes", "Bytes read by source", ["source"],
                                  registry=r)
        self.upload_bytes = Counter("jiaozifuse_upload_bytes", "Bytes uploaded to the remote",
                                    registry=r)
        self.upload_errors = Counter("jiaozifuse_upload_errors", "Failed upload attempts",
                                     registry=r)
        self.trigger_runs = Counter("jiaozifuse_trigger_runs", "Trigger runs by result",
                                    ["result"], registry=r)
        Gauge("jiaozifuse_cache_bytes", "Chunk bytes in the local cache",
              registry=r).set_function(lambda: self._store_counter("chunk_bytes"))
        Gauge("jiaozifuse_cache_limit_bytes", "Configured cache bound (0: none)",
              registry=r).set_function(lambda: repo.config.get("cache_size") or 0)
        Gauge("jiaozifuse_upload_queue_entries", "Chunks, objects and refs queued for upload",
              registry=r).set_function(lambda: self._entries("upload"))
        Gauge("jiaozifuse_upload_queue_oldest_seconds",
              "Age of the oldest queued upload (0: empty)",
              registry=r).set_function(self._queue_age)
        Gauge("jiaozifuse_event_log_last_seq", "Sequence number of the newest event",
              registry=r).set_function(lambda: self._store_counter("event_seq"))
        self.lag = Gauge("jiaozifuse_event_log_lag", "Events not yet acknowledged",
                         ["consumer"], registry=r)
        self._queue_seen: dict[int, float] = {}

    # scrape-time helpers (HTTP thread: committed snapshot only)
    def _store_counter(self, name: str) -> float:
        with self.repo.store.snapshot() as t:
            return float(t.counter(name))

    def _entries(self, db: str) -> float:
        with self.repo.store.snapshot() as t:
            return float(t.txn.stat(t._dbs[db])["entries"])

    def _queue_age(self) -> float:
        with self.repo.store.snapshot() as t:
            cur = t.cursor("upload")
            if not cur.first():
                self._queue_seen.clear()
                return 0.0
            seq = int.from_bytes(cur.key(), "big")
        now = time.monotonic()
        first = self._queue_seen.setdefault(seq, now)
        if len(self._queue_seen) > 1000:
            self._queue_seen = {seq: first}
        return now - first

    def refresh_lag(self) -> None:
        with self.repo.store.snapshot() as t:
            last = t.counter("event_seq")
            for k, v in t.prefix("meta", b"consumer/"):
                self.lag.labels(bytes(k[9:]).decode()).set(last - int(v))

    def serve(self, addr: str) -> None:
        host, _, port = addr.rpartition(":")
        start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)

    def observe(self, op: str, seconds: float, err: int | None = None) -> None:
        self.requests.labels(op).inc()
        self.seconds.labels(op).observe(seconds)
        if err is not None:
            self.errors.labels(op, str(err)).inc()
