"""The server's memory budget and its bounded pool of decode workers.

Every image decode (and the model run after it) runs in a `ThreadPoolExecutor` of a fixed size, never
on the event loop, so a slow decode cannot stall `/health` or code queries. Before a job is queued it
reserves its worst-case bytes (`vdsh.app.server.decoding.decode_bytes`) from a `MemoryBudget`; a request
that does not fit waits up to `wait_s` for others to finish, then gets 503 with Retry-After. The
sum of reservations never exceeds the limit, so concurrent decodes x their worst-case bytes stays
within it. A job that runs past the per-request time limit answers 503; its thread cannot be
interrupted, so its reservation is kept until it really ends (a job still queued is skipped).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class ServerBusy(Exception):
    """Over the memory budget, or over the time limit: try again later (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class MemoryBudget:
    """Bytes reserved by the jobs in flight, never above `limit_bytes`. Used on the event loop only."""

    def __init__(self, limit_bytes: int, wait_s: float) -> None:
        self.limit_bytes, self.wait_s = int(limit_bytes), wait_s
        self.reserved = 0
        self.peak = 0
        self._waiters: list[asyncio.Future] = []

    async def reserve(self, nbytes: int) -> None:
        """Wait up to `wait_s` for `nbytes` to fit; ServerBusy when they do not."""
        if nbytes > self.limit_bytes:
            raise ServerBusy(f"this request needs {nbytes:,} bytes, more than the server's whole decode budget "
                             f"of {self.limit_bytes:,}", retry_after_s=60)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while self.reserved + nbytes > self.limit_bytes:
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise ServerBusy(f"the server is at its memory budget ({self.limit_bytes:,} bytes of decodes in "
                                 "flight); retry shortly") from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        self.reserved += nbytes
        self.peak = max(self.peak, self.reserved)

    def release(self, nbytes: int) -> None:
        self.reserved -= nbytes
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


class DecodePool:
    """A fixed number of worker threads, a memory budget and a time limit for each job."""

    def __init__(self, workers: int, budget: MemoryBudget, timeout_s: float) -> None:
        self.workers, self.budget, self.timeout_s = workers, budget, timeout_s
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vdsh-decode")

    async def run(self, nbytes: int, job: Callable[[], T]) -> T:
        """Run `job` in the pool holding `nbytes` of the budget; ServerBusy if it cannot start or finish in time."""
        await self.budget.reserve(nbytes)
        abandoned = threading.Event()

        def guarded() -> T | None:
            return None if abandoned.is_set() else job()

        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, guarded)
        except BaseException:
            self.budget.release(nbytes)
            raise
        future.add_done_callback(lambda _: self.budget.release(nbytes))  # when the thread is done, not before
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except TimeoutError:
            abandoned.set()
            raise ServerBusy(f"the image took more than {self.timeout_s:g} s to decode and encode (the server is "
                             "busy or the image is too costly); retry shortly or send a smaller image") from None
        except asyncio.CancelledError:  # the client went away
            abandoned.set()
            raise

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
