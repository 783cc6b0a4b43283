"""serving/fair_pool.py: the thread pool clients share (the adapter's shrinking threads, KServe's model server's
decoding threads), with real threads and a real event loop."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from serving.fair_pool import FairPool, NoThreadInTime


def recorder():
    """work(client, seconds) that sleeps and records the order the work started in, and how much ran at once."""
    started, running, most, lock = [], [0], [0], threading.Lock()

    def work(client: str, seconds: float = 0.2) -> str:
        with lock:
            started.append(client)
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(seconds)
        with lock:
            running[0] -= 1
        return client
    return work, started, most


def with_pool(threads: int, scenario):
    """asyncio.run(scenario(pool)) with a FairPool of ``threads``, closed after."""
    async def run():
        pool = FairPool(threads, "t")
        try:
            return await scenario(pool)
        finally:
            pool.close()
    return asyncio.run(run())


def test_a_free_thread_goes_to_the_waiting_client_with_the_fewest_there():
    """Two threads; client a sends 5, b 2 (50 ms later), c 1 (60 ms later): a's first two start at once (a lone
    client has every thread), then the freed threads go to b and c before a's third, then a and b alternate."""
    work, started, most = recorder()

    async def scenario(pool):
        async def send(client, after_s):
            await asyncio.sleep(after_s)
            return await pool.run(client, work, client)
        answers = await asyncio.gather(*(send("a", 0) for _ in range(5)), *(send("b", 0.05) for _ in range(2)),
                                       send("c", 0.06))
        return answers, pool.clients

    answers, left = with_pool(2, scenario)
    assert answers == ["a"] * 5 + ["b"] * 2 + ["c"] and left == 0
    assert most[0] == 2
    assert started[:2] == ["a", "a"] and sorted(started[2:4]) == ["b", "c"], started
    assert started[4:6] == ["a", "b"] and started[6:] == ["a", "a"], started


def test_a_free_thread_goes_to_the_client_running_fewest_even_if_it_was_given_one_more_recently():
    """Three threads: a holds two with long work, b the third with short work; then a and b each queue one more
    (a first). When b's work ends, the freed thread is b's: it runs none, a runs two. The order of the last grant
    (a was given its threads before b) decides only among clients running as many."""
    work, started, most = recorder()

    async def scenario(pool):
        async def send(client, after_s, seconds):
            await asyncio.sleep(after_s)
            return await pool.run(client, work, client, seconds)
        return await asyncio.gather(send("a", 0, 1.0), send("a", 0, 1.0), send("b", 0.05, 0.3),
                                    send("a", 0.1, 0.0), send("b", 0.15, 0.0))

    assert with_pool(3, scenario) == ["a", "a", "b", "a", "b"]
    assert started == ["a", "a", "b", "b", "a"], started
    assert most[0] == 3


def test_a_turn_not_given_in_time_is_refused_and_leaves_nothing_behind():
    work, started, _ = recorder()

    async def scenario(pool):
        busy = asyncio.ensure_future(pool.run("a", work, "a", 0.3))
        await asyncio.sleep(0.02)
        with pytest.raises(NoThreadInTime):
            await pool.run("b", work, "b", wait_s=0.05)
        await busy
        return await pool.run("b", work, "b", 0.0), pool.clients

    assert with_pool(1, scenario) == ("b", 0)
    assert started == ["a", "b"]  # the refused one never ran


def test_a_caller_that_stops_waiting_keeps_its_thread_taken_until_the_work_ends():
    """A client gone (its task cancelled) while its work runs: Python cannot stop the thread, so nobody else's
    work is started beside it on a thread the pool would count as free."""
    work, started, most = recorder()

    async def scenario(pool):
        gone = asyncio.ensure_future(pool.run("a", work, "a", 0.3))
        await asyncio.sleep(0.05)
        gone.cancel()
        t0 = time.perf_counter()
        await pool.run("b", work, "b", 0.0)
        return time.perf_counter() - t0, pool.clients

    waited_s, left = with_pool(1, scenario)
    assert most[0] == 1 and started == ["a", "b"] and left == 0
    assert waited_s > 0.2, waited_s  # b waited for a's work to end


def test_a_waiter_cancelled_before_its_turn_gives_its_place_up():
    work, started, _ = recorder()

    async def scenario(pool):
        busy = asyncio.ensure_future(pool.run("a", work, "a", 0.2))
        await asyncio.sleep(0.02)
        leaving = asyncio.ensure_future(pool.run("b", work, "b"))
        staying = asyncio.ensure_future(pool.run("c", work, "c", 0.0))
        await asyncio.sleep(0.02)
        leaving.cancel()
        await asyncio.gather(busy, staying)
        return pool.clients

    assert with_pool(1, scenario) == 0
    assert started == ["a", "c"]
