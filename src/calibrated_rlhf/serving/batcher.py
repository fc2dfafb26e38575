"""Merging concurrent requests into length-sorted batches under a token budget (no model math here).

Each request hands :meth:`Batcher.submit` its rows as token ids and awaits their scores. One worker task takes
the queued requests in arrival order into merges of at most ``max_batch_tokens``; it sorts a merge's rows by
length and cuts them into batches whose padded size (rows x longest row) stays within the budget, so short
rows never pad to a long one's width. The batches run one after another on a single inference thread (the
model is not shared between threads).

A merge is handed to the inference thread (to start the moment the running one ends, if one runs) when it
fills the budget, when its oldest request has waited ``max_wait_s``, or when the thread is idle and no other
request is on its way (:meth:`arriving`: being read or rendered), whichever comes first; at most one merge
waits behind the running one. So a lone request is scored as soon as it arrives, whatever ``max_wait_s``,
while under load requests wait (boundedly) for the ones already being read, and batches fill.

The queue is bounded in rows: :meth:`submit` raises :class:`QueueFull` instead of queuing past
``max_queue_rows``, and the server answers 503 with ``Retry-After``. A request whose client went away (its
awaiting task cancelled) is dropped before scoring if it is still queued, and its result discarded otherwise.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

# (raw, ensemble_std or None) of a list of token-id sequences, in their order.
ScoreIds = Callable[[list[list[int]]], tuple[np.ndarray, np.ndarray | None]]


class QueueFull(RuntimeError):
    """The queue holds ``max_queue_rows`` rows already; the client should retry after a moment."""


@dataclass
class _Job:
    ids: list[list[int]]
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


def length_batches(lengths: list[int], max_batch_tokens: int) -> list[np.ndarray]:
    """Indices of ``lengths`` sorted by length and cut into batches of padded size <= ``max_batch_tokens``
    (a row longer than the budget on its own is a batch of one)."""
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    for end in range(1, len(order)):
        # sorted ascending: adding row ``end`` makes it the batch's longest
        if (end + 1 - start) * lengths[order[end]] > max_batch_tokens:
            batches.append(order[start:end])
            start = end
    if len(order):
        batches.append(order[start:])
    return batches


class Batcher:
    """See the module docstring. ``score`` runs on one thread; call :meth:`start` inside the event loop."""

    def __init__(self, score: ScoreIds, max_batch_tokens: int, max_wait_s: float, max_queue_rows: int) -> None:
        if max_batch_tokens < 1 or max_queue_rows < 1 or max_wait_s < 0:
            raise ValueError("max_batch_tokens and max_queue_rows must be >= 1 and max_wait_s >= 0")
        self.score, self.max_batch_tokens = score, max_batch_tokens
        self.max_wait_s, self.max_queue_rows = max_wait_s, max_queue_rows
        self._jobs: deque[_Job] = deque()
        self._queued_rows = self._queued_tokens = 0
        self._merges = 0  # merges handed to the inference thread and not done: the running one and the next
        self._arriving = 0
        self._running: set[asyncio.Task] = set()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-inference")
        self.batches_run = self.rows_scored = 0

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Marks a request on its way to :meth:`submit` (its body being read, its rows rendered): a merge waits
        for it, at most ``max_wait_s``, rather than leave the inference thread idle for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            self._wake.set()

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in self._jobs:
            job.future.cancel()
        self._jobs.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, ids: list[list[int]]) -> asyncio.Future:
        """Queues the rows: a future of their (raw, ensemble_std or None), in their order (cancel it to drop
        them); :class:`QueueFull` at once when the queue is full."""
        if not ids:
            done = asyncio.get_running_loop().create_future()
            done.set_result((np.empty(0), None))
            return done
        if self._queued_rows + len(ids) > self.max_queue_rows:
            raise QueueFull(f"{self._queued_rows} rows queued; this request's {len(ids)} would pass the bound of "
                            f"{self.max_queue_rows}")
        job = _Job(ids, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._queued_rows += len(ids)
        self._queued_tokens += sum(len(x) for x in ids)
        self._wake.set()
        return job.future

    def _take(self) -> list[_Job]:
        """Queued jobs in arrival order up to the token budget (at least one), cancelled ones dropped."""
        taken, tokens = [], 0
        while self._jobs:
            job = self._jobs[0]
            cost = sum(len(x) for x in job.ids)
            if taken and tokens + cost > self.max_batch_tokens:
                break
            self._jobs.popleft()
            self._queued_rows -= len(job.ids)
            self._queued_tokens -= cost
            if not job.future.done():
                taken.append(job)
                tokens += cost
        return taken

    async def _work(self) -> None:
        while True:
            if not self._jobs or self._merges >= 2:
                await self._wake.wait()
                self._wake.clear()
                continue
            left = self._jobs[0].arrived + self.max_wait_s - time.monotonic()
            if (self._merges == 0 and not self._arriving) or self._queued_tokens >= self.max_batch_tokens or left <= 0:
                self._hand_over(self._take())
                continue
            # let others join the oldest request: those on their way, or those arriving while the thread is busy
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def _hand_over(self, jobs: list[_Job]) -> None:
        if jobs:
            self._merges += 1
            task = asyncio.get_running_loop().create_task(self._run(jobs))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, jobs: list[_Job]) -> None:
        ids = [x for job in jobs for x in job.ids]
        try:
            raw, std = await asyncio.get_running_loop().run_in_executor(self._executor, self._score_batches, ids)
        except Exception as exc:  # a scoring failure fails these requests, never the worker
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self._merges -= 1
            self._wake.set()
        start = 0
        for job in jobs:
            end = start + len(job.ids)
            if not job.future.done():
                job.future.set_result((raw[start:end], None if std is None else std[start:end]))
            start = end

    def _score_batches(self, ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray | None]:
        raw, std = np.empty(len(ids)), None
        for idx in length_batches([len(x) for x in ids], self.max_batch_tokens):
            r, s = self.score([ids[i] for i in idx])
            raw[idx] = r
            if s is not None:
                std = np.empty(len(ids)) if std is None else std
                std[idx] = s
            self.batches_run += 1
            self.rows_scored += len(idx)
        return raw, std
