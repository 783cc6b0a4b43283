"""Places that clients share fairly: the adapter's connections to the model server (adapter/model_server.py), and
through FairPool the adapter's shrinking threads (adapter/shrink.py) and KServe's model server's decoding threads
(handler/kserve_predictor.py).

A request waits for a place in its client's line. A freed place goes to the waiting client with the fewest places
already (among equals, the one given a place least recently), so a lone client may use every place, and another's
request never waits behind more than what already holds one: first come, first served let one client's dozens of
16 MP images hold every thread while everyone else's photos waited out their time, and four addresses' 40 uploads
waiting for a connection put another client's photo behind all of them.
"""
from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor


class NoThreadInTime(Exception):
    """The work's turn did not come within the wait it was given (nothing of it ran)."""


class FairPlaces:
    """``places`` places (threads, connections) shared among clients: take() waits for one, give_back() frees it."""

    def __init__(self, places: int):
        self._free = places
        self._holding: dict[str, int] = {}  # client -> the places it holds now
        self._waiting: dict[str, deque[asyncio.Future]] = {}  # client -> its turns, oldest first
        self._given = 0  # places given so far
        self._last_given: dict[str, int] = {}  # client -> when it was last given one (while it holds or waits)

    @property
    def clients(self) -> int:
        """Clients holding or waiting (what is kept track of)."""
        return len(self._holding.keys() | self._waiting.keys() | self._last_given.keys())

    async def take(self, client: str) -> None:
        """A place for ``client``, once it is its turn (the caller bounds the wait: asyncio.timeout)."""
        if self._free and not self._waiting:
            self._take(client)
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(client, deque()).append(turn)
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():  # given a place, but gone before it used it
                self.give_back(client)
            else:
                self._forget(client, turn)
            raise

    def give_back(self, client: str) -> None:
        self._free += 1
        self._holding[client] -= 1
        if not self._holding[client]:
            del self._holding[client]
            self._drop_if_idle(client)
        self._grant()

    def _take(self, client: str) -> None:
        self._free -= 1
        self._holding[client] = self._holding.get(client, 0) + 1
        self._given += 1
        self._last_given[client] = self._given

    def _forget(self, client: str, turn: asyncio.Future) -> None:
        line = self._waiting.get(client)
        if line is not None and turn in line:
            line.remove(turn)
            if not line:
                del self._waiting[client]
        self._drop_if_idle(client)

    def _drop_if_idle(self, client: str) -> None:
        if client not in self._holding and client not in self._waiting:
            self._last_given.pop(client, None)

    def _grant(self) -> None:
        while self._free and self._waiting:
            client = min(self._waiting, key=lambda c: (self._holding.get(c, 0), self._last_given.get(c, 0)))
            line = self._waiting[client]
            turn = line.popleft()
            if not line:
                del self._waiting[client]
            if not turn.done():
                turn.set_result(None)
                self._take(client)
            else:  # (its caller gone: _forget found it taken off already)
                self._drop_if_idle(client)


class FairPool:
    """A thread pool whose threads are FairPlaces. A thread counts as taken until its work ends, even when the caller
    stopped waiting for it (its client left, a deadline): Python cannot stop it."""

    def __init__(self, threads: int, name: str):
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._places = FairPlaces(threads)

    @property
    def clients(self) -> int:
        """Clients with work running or waiting (what the pool keeps track of)."""
        return self._places.clients

    async def run(self, client: str, work, *args, wait_s: float | None = None):
        """work(*args) on a thread, once it is ``client``'s turn; NoThreadInTime when that took over ``wait_s``."""
        try:
            async with asyncio.timeout(wait_s):
                await self._places.take(client)
        except TimeoutError:
            raise NoThreadInTime() from None
        done = asyncio.get_running_loop().run_in_executor(self._pool, work, *args)
        done.add_done_callback(lambda _: self._ended(client, done))
        return await asyncio.shield(done)  # a caller that stops waiting leaves the thread taken until work ends

    def _ended(self, client: str, done: asyncio.Future) -> None:
        if not done.cancelled():
            done.exception()  # read: a caller gone leaves nobody to, and asyncio would log it as never retrieved
        self._places.give_back(client)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
