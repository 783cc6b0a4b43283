"""Concurrent requests' images through shared forward passes, for a server that has no batching of
its own (KServe's Python model server: handler/kserve_predictor.py; TorchServe batches in Java).

Requests queue their images; one task takes the first waiting request, then any others that come
within ``max_delay_s`` (model-config.yaml ``maxBatchDelay``), up to ``max_images`` images
(``batchSize``), and runs them as one batch on a single thread: the forward pass never runs twice
at once (each has every core), and while it runs the next batch gathers. A request larger than
``max_images`` (a v1/v2 request may hold up to 64 images) goes alone; the engine splits it into
chunks it was built for. ``forward`` may answer with anything indexed by image (a tensor of logits,
a list of answers): each request gets its own slice. At most ``max_waiting`` requests wait for a
batch (None: no bound); one more is refused at once (BatcherFull), as TorchServe refuses a request
beyond its ``job_queue_size``, rather than queueing without end behind a flood. A caller that left
(its call cancelled: a client gone) neither counts as waiting nor takes room in a batch.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch


class BatcherFull(Exception):
    """``max_waiting`` requests already wait for a forward pass."""

    def __init__(self, max_waiting: int):
        super().__init__(f"{max_waiting} requests already wait for the model")
        self.max_waiting = max_waiting


class Batcher:
    def __init__(self, forward: Callable[[torch.Tensor], Sequence], max_images: int, max_delay_s: float,
                 max_waiting: int | None = None):
        self.forward, self.max_images, self.max_delay_s = forward, max(1, max_images), max(0.0, max_delay_s)
        self.max_waiting = max_waiting
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        # The futures of requests in the queue whose callers still wait (the queue also holds those that left).
        self._waiting: set[asyncio.Future] = set()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.batches = self.images = 0  # run so far (tests/test_batching.py reads them)

    async def __call__(self, images: torch.Tensor) -> Sequence:
        """``forward``'s rows for ``images`` ([n, 3, 32, 32] normalized), computed in a batch with others'."""
        if self._task is None or self._task.done():  # the first call, on the server's event loop
            self._queue, self._waiting = asyncio.Queue(), set()
            self._task = asyncio.get_running_loop().create_task(self._run())
        if self.full():
            raise BatcherFull(self.max_waiting)
        done = asyncio.get_running_loop().create_future()
        self._waiting.add(done)
        self._queue.put_nowait((images, done))
        try:
            return await done
        finally:
            self._waiting.discard(done)  # a caller that left no longer waits (its entry is skipped when taken)

    def full(self) -> bool:
        """Whether ``max_waiting`` requests wait already: a call now would be refused (BatcherFull)."""
        return self.max_waiting is not None and len(self._waiting) >= self.max_waiting

    def _taken(self, item: tuple) -> bool:
        """Marks a queue entry taken for a batch (no longer waiting); False when its caller left meanwhile."""
        self._waiting.discard(item[1])
        return not item[1].done()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        held = None  # the request that did not fit in the last batch: first in the next one
        while True:
            first, held = (held if held is not None else await self._queue.get()), None
            if not self._taken(first):
                continue
            batch, count = [first], len(first[0])
            deadline = loop.time() + self.max_delay_s
            while count < self.max_images:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    if (left := deadline - loop.time()) <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), left)
                    except TimeoutError:
                        break
                if not self._taken(item):  # a caller gone while it waited: no room kept for it
                    continue
                if count + len(item[0]) > self.max_images:
                    held = item
                    break
                batch.append(item)
                count += len(item[0])
            batch = [item for item in batch if not item[1].done()]  # a caller gone during the delay: skipped
            if not batch:
                continue
            try:
                rows = await loop.run_in_executor(self._thread, self.forward, torch.cat([b[0] for b in batch]))
            except Exception as err:  # noqa: BLE001 - every request of the batch hears of it
                for _, done in batch:
                    if not done.done():
                        done.set_exception(err)
                continue
            self.batches += 1
            self.images += len(rows)
            start = 0
            for images, done in batch:
                if not done.done():
                    done.set_result(rows[start:start + len(images)])
                start += len(images)
