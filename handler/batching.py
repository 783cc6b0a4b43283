"""Concurrent requests' images through shared forward passes, for a server that has no batching of
its own (KServe's Python model server: handler/kserve_predictor.py; TorchServe batches in Java).

Requests queue their images, in a line per client taken in turns (ClientLines); one task takes the next
waiting request, then any others that come within ``max_delay_s`` (model-config.yaml ``maxBatchDelay``), up
to ``max_images`` images (``batchSize``), and runs them as one batch on a single thread: the forward pass never runs twice
at once (each has every core), and while it runs the next batch gathers. A request larger than
``max_images`` (a v1/v2 request may hold up to 64 images) goes alone; the engine splits it into
chunks it was built for. ``forward`` may answer with anything indexed by image (a tensor of logits,
a list of answers): each request gets its own slice. At most ``max_waiting`` requests wait for a
batch (None: no bound); one more is refused at once (BatcherFull), as TorchServe refuses a request
beyond its ``job_queue_size``, rather than queueing without end behind a flood. With ``client_waiting``,
a caller's client (its key) keeps its fair share of the places when all are taken (an equal part among the
clients waiting, at most ``client_waiting``): a request of a client under it takes the place of the newest
request of the client that waits in the most, past it (that one: BatcherFull at once), so that one client's
flood, or two clients' at half each, leave places to everyone else. A caller that left (its call
cancelled: a client gone) neither counts as waiting nor takes room in a batch.
"""
from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

from serving.clients import newest_past_fair_share


class BatcherFull(Exception):
    """``max_waiting`` requests already wait for a forward pass."""

    def __init__(self, max_waiting: int, gave_way_at: int | None = None):
        super().__init__(f"{max_waiting} requests already wait for the model" if gave_way_at is None else
                         f"{max_waiting} requests wait for the model and more than {gave_way_at} of them are this "
                         f"client's (its share): its newest gave its place to another client's")
        self.max_waiting, self.gave_way = max_waiting, gave_way_at is not None


class ClientLines:
    """The requests waiting for a batch, in a line per client, taken in turns: the next from the line of the client
    served least recently (a new one first), each line in order. One queue in order of arrival made a lone image
    wait behind every request of two clients' floods (23 requests of 64 images: 3.5-8 s); now it waits behind at
    most one request of each other client. Requests of no client (None) share one line."""

    def __init__(self):
        self._lines: dict[str | None, deque] = {}  # client -> its waiting requests, oldest first
        self._taken: dict[str | None, int] = {}  # client -> when its line was last taken from (while it has one)
        self._takes = 0
        self._arrived = asyncio.Event()

    def put_nowait(self, client: str | None, item) -> None:
        self._lines.setdefault(client, deque()).append(item)
        self._arrived.set()

    def get_nowait(self):
        if not self._lines:
            raise asyncio.QueueEmpty
        client = min(self._lines, key=lambda key: self._taken.get(key, -1))
        line = self._lines[client]
        item = line.popleft()
        if line:
            self._takes += 1
            self._taken[client] = self._takes
        else:
            del self._lines[client]
            self._taken.pop(client, None)
        return item

    async def get(self):
        while True:
            try:
                return self.get_nowait()
            except asyncio.QueueEmpty:
                self._arrived.clear()
                await self._arrived.wait()


class Batcher:
    def __init__(self, forward: Callable[[torch.Tensor], Sequence], max_images: int, max_delay_s: float,
                 max_waiting: int | None = None, client_waiting: int | None = None):
        self.forward, self.max_images, self.max_delay_s = forward, max(1, max_images), max(0.0, max_delay_s)
        self.max_waiting, self.client_waiting = max_waiting, client_waiting
        self._queue: ClientLines | None = None
        self._task: asyncio.Task | None = None
        # The futures of requests in the queue whose callers still wait, oldest first, with their clients' keys
        # (the queue also holds those that left).
        self._waiting: dict[asyncio.Future, str | None] = {}
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="forward")
        self.batches = self.images = 0  # run so far (tests/test_batching.py reads them)

    async def __call__(self, images: torch.Tensor, client: str | None = None) -> Sequence:
        """``forward``'s rows for ``images`` ([n, 3, 32, 32] normalized), computed in a batch with others';
        ``client``: whose request it is (its share of the waiting places)."""
        if self._task is None or self._task.done():  # the first call, on the server's event loop
            self._queue, self._waiting = ClientLines(), {}
            self._task = asyncio.get_running_loop().create_task(self._run())
        if self._all_taken(waiting := self._still_waiting()):
            if (place := self._place_to_take(client, waiting)) is None:
                raise BatcherFull(self.max_waiting)
            crowding, share = place
            del self._waiting[crowding]  # (its entry is skipped when taken)
            crowding.set_exception(BatcherFull(self.max_waiting, share))
            crowding.exception()  # retrieved: its caller may be cancelled before it reads it (no "never retrieved")
        done = asyncio.get_running_loop().create_future()
        self._waiting[done] = client
        self._queue.put_nowait(client, (images, done))
        try:
            return await done
        finally:
            self._waiting.pop(done, None)  # a caller that left no longer waits (its entry is skipped when taken)

    def full(self, client: str | None = None) -> bool:
        """Whether a call of ``client`` now would be refused (BatcherFull): all ``max_waiting`` places are taken
        and none is another client's past its share that this one may take."""
        waiting = self._still_waiting()
        return self._all_taken(waiting) and self._place_to_take(client, waiting) is None

    def _still_waiting(self) -> dict[asyncio.Future, str | None]:
        """The waiting requests whose callers are still there: a caller cancelled (its client gone) has its future
        cancelled at once, and leaves ``_waiting`` only when its task runs next."""
        return {done: client for done, client in self._waiting.items() if not done.done()}

    def _all_taken(self, waiting: dict) -> bool:
        return self.max_waiting is not None and len(waiting) >= self.max_waiting

    def _place_to_take(self, client: str | None, waiting: dict) -> tuple[asyncio.Future, int] | None:
        """Of ``waiting`` (_still_waiting), the request whose place ``client``'s takes, and the share it was past
        (serving/clients.py newest_past_fair_share); None: none."""
        if client is None or self.client_waiting is None:
            return None
        return newest_past_fair_share(list(waiting.items()), client, self.max_waiting, self.client_waiting)

    def _taken(self, item: tuple) -> bool:
        """Marks a queue entry taken for a batch (no longer waiting); False when its caller left meanwhile."""
        self._waiting.pop(item[1], None)
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
