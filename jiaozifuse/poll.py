"""Busy polling for the next FUSE request, instead of sleeping between them.

A thread that sleeps between requests pays a wake-up for the next one: an
interrupt to another CPU and, on a virtual machine whose idle CPUs halt, an
exit to the hypervisor.  On this project's test VM that is a third of a
request's cost (a GETATTR through the mount: 68 us sleeping, 49 us polling;
scripts/bench/floor.py).  A reader that issues requests back to back (stat of
many files, small files, random reads) finds the loop polling instead.

Rules (the handlers call :meth:`RequestPoller.begin` / :meth:`~RequestPoller.end`
around every request; :meth:`~RequestPoller.run` is a task of the daemon):

* poll (a trio checkpoint, so the loop's epoll runs with a zero timeout) only
  while no request is being handled: one that waits for a commit or a fetch
  leaves the CPU and the GIL to the threads doing that work;
* for at most ``window`` seconds after the last reply; otherwise park on an
  event until a request ends;
* not after a request that waited for a durable commit (a close after
  writing, fsync: :meth:`~RequestPoller.quiet`): polling then made small-file
  creates 8 to 14 % slower (floor.py, interleaved runs), where without it they
  are unchanged; the commit thread, which still needs the GIL after it
  completed the commit, is the likely cause (CPython gives the GIL to a
  waiting thread only when the holder blocks, or after 5 ms).

The cost is at most ``window`` of one CPU per request, and nothing once
requests stop.  The daemon runs it only with two CPUs or more: on one it would
hold the CPU the next request's sender needs.  All of it runs on the trio
thread, so the counters need no lock.
"""

from __future__ import annotations

import time

import trio


class RequestPoller:
    def __init__(self, window: float = 0.0) -> None:
        #: seconds to poll after a reply (0: :meth:`run` is not started)
        self.window = window
        #: requests being handled now
        self.inflight = 0
        self._last_reply = 0.0
        self._quiet = False
        self._wake: trio.Event | None = None

    def begin(self) -> None:
        self.inflight += 1

    def end(self) -> float:
        """A request was answered; returns the time (``time.perf_counter``)."""
        self.inflight -= 1
        now = self._last_reply = time.perf_counter()
        wake = self._wake
        if wake is not None and not self.inflight and not self._quiet:
            self._wake = None
            wake.set()
        self._quiet = False
        return now

    def quiet(self) -> None:
        """The request being answered waited for a durable commit: no polling
        after it (call with no await before the request's :meth:`end`)."""
        self._quiet = True

    async def run(self) -> None:
        window = self.window
        while True:
            wake = trio.Event()
            self._wake = wake
            await wake.wait()
            while not self.inflight and time.perf_counter() - self._last_reply < window:
                await trio.sleep(0)
