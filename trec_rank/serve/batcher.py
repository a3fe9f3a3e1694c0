"""Micro-batching: requests of concurrent clients scored together, one model call at a time.

One asyncio queue and one worker task. The worker takes the oldest request and every request already
waiting behind it, up to `max_rows` rows; if the batch is not full and the oldest request arrived less than
`max_wait_s` ago, it sleeps until then and takes what came meanwhile. A request that would overflow the
batch opens the next one. The model runs on one dedicated thread (`run_in_executor`), so the event loop keeps
accepting connections and parsing bodies while it computes; requests that arrive during a model call make up
the next batch, so under load batches grow by themselves and `max_wait_s` only delays a lone request.

Waiting is `asyncio.sleep` plus `get_nowait`, never a timeout around `Queue.get`: a timeout that fires just as
`get` takes an item can lose it (Python < 3.12's `wait_for`), and a lost request is a client waiting forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

Result = Any  # what `score` returns for one table: its scores, or the Exception it failed with
Score = Callable[[list[pa.Table]], list[Result]]  # tables -> one result per table, same order


@dataclass
class _Job:
    table: pa.Table
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


@dataclass
class Counters:
    """What /health reports: requests answered, model calls made, rows scored."""

    requests: int = 0
    batches: int = 0
    rows: int = 0


class MicroBatcher:
    """`await submit(table)` returns the table's result; `run()` is the one worker (see the module docstring)."""

    def __init__(self, score: Score, max_rows: int, max_wait_s: float) -> None:
        assert max_rows >= 1 and max_wait_s >= 0
        self.score, self.max_rows, self.max_wait_s = score, max_rows, max_wait_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="trec-rank-model")
        self.held: _Job | None = None  # took the queue's head but overflowed the last batch
        self.counters = Counters()

    async def submit(self, table: pa.Table) -> Result:
        """The result of scoring `table` (a table of at most max_rows rows); raises what scoring raised."""
        assert 0 < table.num_rows <= self.max_rows
        job = _Job(table, asyncio.get_running_loop().create_future())
        self.queue.put_nowait(job)
        return await job.future

    def _take(self, jobs: list[_Job], rows: int) -> int:
        """Move waiting requests into `jobs` while they fit; returns the batch's rows."""
        while rows < self.max_rows:
            try:
                job = self.held or self.queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            self.held = None
            if jobs and rows + job.table.num_rows > self.max_rows:
                self.held = job
                break
            jobs.append(job)
            rows += job.table.num_rows
        return rows

    async def _collect(self) -> list[_Job]:
        if self.held is None:
            self.held = await self.queue.get()
        jobs: list[_Job] = []
        rows = self._take(jobs, 0)
        wait = jobs[0].arrived + self.max_wait_s - time.monotonic()
        if rows < self.max_rows and self.held is None and wait > 0:
            await asyncio.sleep(wait)
            self._take(jobs, rows)
        return [j for j in jobs if not j.future.done()]  # a client that went away cancelled its future

    async def run(self) -> None:
        """The worker: forever collect a batch, score it off the event loop, answer each request."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            if not jobs:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.score, [j.table for j in jobs])
                assert len(results) == len(jobs), f"score returned {len(results)} results for {len(jobs)} tables"
            except Exception as err:  # a bug in scoring fails this batch's requests, never the worker
                results = [err] * len(jobs)
            self.counters.batches += 1
            for job, result in zip(jobs, results, strict=True):
                self.counters.requests += 1
                self.counters.rows += job.table.num_rows
                if job.future.done():
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
