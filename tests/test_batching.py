"""handler/batching.py: concurrent requests' images share forward passes, each gets its own rows back."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from handler.batching import Batcher, BatcherFull


class RecordingForward:
    """Returns each row's first pixel as its 'logit' (so every caller can check its rows came back),
    records the batch sizes, and can be made slow or failing."""

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None):
        self.sizes, self.threads, self.delay_s, self.fail_on = [], set(), delay_s, fail_on
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            self.sizes.append(len(images))
            self.threads.add(threading.get_ident())
            time.sleep(self.delay_s)
            if self.fail_on is not None and len(self.sizes) == self.fail_on:
                raise RuntimeError("forward failed")
            return images[:, :1, 0, 0].clone()
        finally:
            with self._lock:
                self.running -= 1


def images(tag: float, n: int = 1) -> torch.Tensor:
    return torch.full((n, 3, 32, 32), tag)


def gated_batcher(max_waiting: int, client_waiting: int) -> tuple[Batcher, threading.Event]:
    """A Batcher of one image a batch whose forward pass (each row's first pixel) waits for the gate returned with
    it: its callers wait meanwhile."""
    gate = threading.Event()

    def gated(batch):
        gate.wait(30)
        return batch[:, :1, 0, 0].clone()
    return Batcher(gated, max_images=1, max_delay_s=0.0, max_waiting=max_waiting, client_waiting=client_waiting), gate


def test_concurrent_requests_share_batches_up_to_the_bound_and_get_their_own_rows():
    forward = RecordingForward(delay_s=0.02)
    batcher = Batcher(forward, max_images=6, max_delay_s=0.005)

    async def main():
        return await asyncio.gather(*(batcher(images(i, 1 + i % 2)) for i in range(20)))

    results = asyncio.run(main())
    for i, rows in enumerate(results):
        assert rows.shape == (1 + i % 2, 1) and torch.all(rows == i), (i, rows)
    assert sum(forward.sizes) == sum(1 + i % 2 for i in range(20))
    assert max(forward.sizes) <= 6 and max(forward.sizes) > 1, forward.sizes
    assert forward.most_at_once == 1 and len(forward.threads) == 1  # one forward pass at a time, one thread
    assert (batcher.batches, batcher.images) == (len(forward.sizes), sum(forward.sizes))


def test_a_lone_request_waits_at_most_the_delay_and_a_large_one_goes_alone_in_order():
    forward = RecordingForward()
    batcher = Batcher(forward, max_images=6, max_delay_s=0.05)

    async def main():
        started = time.perf_counter()
        await batcher(images(1))
        lone = time.perf_counter() - started
        # 4 images, then 5 (does not fit: waits for the next batch, ahead of the later ones), then 1 + 1.
        answers = await asyncio.gather(batcher(images(2, 4)), batcher(images(3, 5)), batcher(images(4)),
                                       batcher(images(5)))
        return lone, answers

    lone, answers = asyncio.run(main())
    assert 0.04 <= lone < 1.0, lone  # waited for company that never came, then ran
    assert [a.flatten().tolist() for a in answers] == [[2] * 4, [3] * 5, [4], [5]]
    assert forward.sizes == [1, 4, 5 + 1, 1], forward.sizes


def test_a_failing_forward_fails_its_batch_only_and_the_batcher_goes_on():
    forward = RecordingForward(delay_s=0.01, fail_on=1)
    batcher = Batcher(forward, max_images=2, max_delay_s=0.0)

    async def main():
        first = await asyncio.gather(batcher(images(1)), batcher(images(2)), return_exceptions=True)
        return first, await batcher(images(3))

    first, later = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) for r in first), first
    assert later.flatten().tolist() == [3]


def test_a_caller_that_left_is_skipped_and_the_others_are_answered():
    forward = RecordingForward(delay_s=0.05)
    batcher = Batcher(forward, max_images=1, max_delay_s=0.0)

    async def main():
        busy = asyncio.ensure_future(batcher(images(1)))  # occupies the forward pass
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher(images(2)))
        kept = asyncio.ensure_future(batcher(images(3)))
        await asyncio.sleep(0.01)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await busy, await kept

    busy, kept = asyncio.run(main())
    assert (busy.item(), kept.item()) == (1, 3)
    assert forward.sizes == [1, 1]  # the cancelled request never reached the forward pass


def test_a_forward_that_answers_with_a_list_gives_each_request_its_own_items():
    """The predictor's forward returns one answer (a dict) per image: each request gets its own, in order,
    also when a caller in the middle of a batch left."""
    sizes = []

    def answers(batch: torch.Tensor) -> list[dict]:
        sizes.append(len(batch))
        time.sleep(0.02)
        return [{"tag": float(image[0, 0, 0])} for image in batch]

    batcher = Batcher(answers, max_images=8, max_delay_s=0.01)

    async def main():
        calls = [asyncio.ensure_future(batcher(images(i, 1 + i % 3))) for i in range(6)]
        await asyncio.sleep(0)
        calls[2].cancel()
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[2], asyncio.CancelledError)
    for i, rows in enumerate(results):
        if i != 2:
            assert rows == [{"tag": float(i)}] * (1 + i % 3), (i, rows)
    assert sum(sizes) == sum(1 + i % 3 for i in range(6) if i != 2)


def test_requests_beyond_the_waiting_bound_are_refused_at_once_and_the_waiting_ones_answered():
    forward = RecordingForward(delay_s=0.05)
    batcher = Batcher(forward, max_images=1, max_delay_s=0.0, max_waiting=3)

    async def main():
        first = asyncio.ensure_future(batcher(images(0)))
        await asyncio.sleep(0.01)  # in its forward pass: no longer waiting
        calls = [first] + [asyncio.ensure_future(batcher(images(i))) for i in range(1, 8)]
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    refused = [i for i, r in enumerate(results) if isinstance(r, BatcherFull)]
    # The first runs, 3 wait, the other 4 are refused at once.
    assert refused == [4, 5, 6, 7] and all(results[i].max_waiting == 3 for i in refused), results
    assert [results[i].item() for i in range(4)] == [0, 1, 2, 3]


def test_a_client_under_its_share_takes_the_newest_place_of_the_client_past_its_share():
    """A flood from one client took every waiting place: another client's request was refused (503) as long as it
    lasted (the hostile probe of make serve-kserve: 49 of 53 REST and 43 of 44 gRPC requests). With
    client_waiting, a client keeps that many places when all are taken; past it, its newest gives way."""
    forward, gate = RecordingForward(), threading.Event()  # the first forward pass lasts until the test says

    def gated(batch):
        gate.wait(30)
        return forward(batch)
    batcher = Batcher(gated, max_images=1, max_delay_s=0.0, max_waiting=4, client_waiting=2)

    async def main():
        running = asyncio.ensure_future(batcher(images(0), "flood"))
        await asyncio.sleep(0.02)  # in its forward pass: no longer waiting
        flood = [asyncio.ensure_future(batcher(images(i), "flood")) for i in range(1, 5)]  # every place
        await asyncio.sleep(0)
        assert batcher.full("flood") and batcher.full(None) and not batcher.full("other")
        other = [asyncio.ensure_future(batcher(images(10 + i), "other")) for i in range(3)]
        unknown = asyncio.ensure_future(batcher(images(20)))  # no client: no share to claim
        await asyncio.sleep(0.02)
        gate.set()
        return await asyncio.gather(running, *flood, *other, unknown, return_exceptions=True)

    results = asyncio.run(main())
    running, flood, other, unknown = results[0], results[1:5], results[5:8], results[8]
    assert running.item() == 0 and [r.item() for r in flood[:2]] == [1, 2], results
    # The flood's two newest gave their places to the other client's first two; its third found the flood at its
    # share (2 each) and was refused, as was the request of no client.
    assert all(isinstance(r, BatcherFull) and r.gave_way for r in flood[2:]), results
    assert "more than 2 of them are this client's" in str(flood[2])
    assert [r.item() for r in other[:2]] == [10, 11], results
    assert isinstance(other[2], BatcherFull) and not other[2].gave_way, results
    assert isinstance(unknown, BatcherFull) and not unknown.gave_way, results
    assert forward.sizes == [1] * 5  # the answered ones only: a place given up was never computed


def test_two_clients_at_half_the_places_each_leave_a_third_its_fair_share():
    """Two clients flooding at their share (half the places each) held them all, and a third client's every
    request was refused as long as they lasted. A client's share when all are taken is its fair part among the
    clients waiting (here a third each, one at least), at most client_waiting: the third client's first request
    takes the newest place of a client past that part; its second, at its part, is refused."""
    batcher, gate = gated_batcher(max_waiting=4, client_waiting=2)

    async def main():
        running = asyncio.ensure_future(batcher(images(0), "a"))
        await asyncio.sleep(0.02)  # in its forward pass: no longer waiting
        floods = [asyncio.ensure_future(batcher(images(i), client)) for i, client in
                  ((1, "a"), (2, "b"), (3, "a"), (4, "b"))]  # two each: every place, each at client_waiting
        await asyncio.sleep(0)
        assert batcher.full("a") and batcher.full("b") and not batcher.full("c")
        third = [asyncio.ensure_future(batcher(images(10 + i), "c")) for i in range(2)]
        await asyncio.sleep(0.02)
        gate.set()
        return await asyncio.gather(running, *floods, *third, return_exceptions=True)

    results = asyncio.run(main())
    floods, third = results[1:5], results[5:]
    # a, the first of the most waiting, gave its newest (3) to c's first; c's second found c at its part (4 // 3).
    assert [r.item() for r in (floods[0], floods[1], floods[3])] == [1, 2, 4], results
    assert isinstance(floods[2], BatcherFull) and floods[2].gave_way, results
    assert "more than 1 of them are this client's" in str(floods[2]), results
    assert third[0].item() == 10 and isinstance(third[1], BatcherFull) and not third[1].gave_way, results


def test_waiting_requests_are_taken_a_client_at_a_time_so_a_lone_one_waits_behind_one_of_each_other():
    """Requests went to the forward pass in order of arrival: a lone image waited behind every request of two
    clients' floods (3.5-8 s behind 23 requests of 64 images). Now each client has its line and the lines are taken
    in turns (the client served least recently first): c's one request goes third, after one of a's and one of b's;
    a client's own requests keep their order."""
    order, gate = [], threading.Event()

    def gated(batch):
        gate.wait(30)
        order.append(int(batch[0, 0, 0, 0]))
        return batch[:, :1, 0, 0].clone()
    batcher = Batcher(gated, max_images=1, max_delay_s=0.0)

    async def main():
        running = asyncio.ensure_future(batcher(images(0), "a"))
        await asyncio.sleep(0.02)  # in its forward pass
        waiting = [asyncio.ensure_future(batcher(images(tag), client)) for tag, client in
                   ((1, "a"), (2, "a"), (3, "a"), (11, "b"), (12, "b"), (21, "c"))]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(running, *waiting)

    answers = asyncio.run(main())
    assert [answer.item() for answer in answers] == [0, 1, 2, 3, 11, 12, 21]  # each its own rows
    assert order == [0, 1, 11, 21, 2, 12, 3], order


def test_a_caller_that_left_holds_no_place_and_is_never_the_one_to_give_way():
    """A cancelled caller's future is cancelled at once, its task leaves the waiting places only when it runs next:
    in between it was counted, and a newcomer could pick it to give way (set_exception on a cancelled future:
    InvalidStateError, a 500 for an innocent request)."""
    batcher, gate = gated_batcher(max_waiting=3, client_waiting=1)

    async def main():
        running = asyncio.ensure_future(batcher(images(0), "flood"))
        await asyncio.sleep(0.02)  # in its forward pass
        flood = [asyncio.ensure_future(batcher(images(i), "flood")) for i in range(1, 4)]
        await asyncio.sleep(0)
        assert batcher.full(None)
        flood[2].cancel()  # its client gone: its future cancelled now, its task not yet run
        assert not batcher.full(None)  # it holds no place
        flood[1].cancel()
        newcomer = asyncio.ensure_future(batcher(images(10), "other"))  # takes a free place, gives nothing way
        await asyncio.sleep(0.02)
        gate.set()
        return await asyncio.gather(running, *flood, newcomer, return_exceptions=True)

    running, first, second, third, newcomer = asyncio.run(main())
    assert running.item() == 0 and first.item() == 1 and newcomer.item() == 10, (first, newcomer)
    assert isinstance(second, asyncio.CancelledError) and isinstance(third, asyncio.CancelledError)


def test_the_delay_counts_from_the_first_request_and_a_full_batch_goes_at_once():
    """maxBatchDelay bounds the first request's wait (later arrivals do not extend it), and a batch that is
    full runs without waiting out the delay. (Margins of tenths of a second: behaviour, not speed.)"""
    trickled = RecordingForward()
    batcher = Batcher(trickled, max_images=64, max_delay_s=0.3)

    async def trickle():  # six requests 0.1 s apart: a delay restarted by each would hold them all
        async def later(i):
            await asyncio.sleep(0.1 * i)
            return await batcher(images(i))
        return await asyncio.gather(*(later(i) for i in range(6)))

    asyncio.run(trickle())
    assert len(trickled.sizes) >= 2 and trickled.sizes[0] <= 4, trickled.sizes

    full = RecordingForward()
    batcher = Batcher(full, max_images=2, max_delay_s=5.0)

    async def pair():
        started = time.perf_counter()
        await asyncio.gather(batcher(images(1)), batcher(images(2)))
        return time.perf_counter() - started

    assert asyncio.run(pair()) < 2.5 and full.sizes == [2]


def test_callers_that_left_neither_hold_waiting_slots_nor_room_in_a_batch():
    """Cancelled calls (a client gone, a gRPC deadline passed) stay in the queue until the batcher reaches
    them: they must not count toward ``max_waiting`` (a live request refused while nobody waits) nor take
    a batch's images (the live requests behind them squeezed out of it)."""
    forward = RecordingForward(delay_s=0.3)
    batcher = Batcher(forward, max_images=6, max_delay_s=0.0, max_waiting=3)

    async def main():
        busy = asyncio.ensure_future(batcher(images(0)))
        await asyncio.sleep(0.05)  # in its forward pass
        gone = [asyncio.ensure_future(batcher(images(9, 2))) for _ in range(3)]
        await asyncio.sleep(0.01)
        for call in gone:
            call.cancel()
        await asyncio.sleep(0)
        assert not batcher.full()
        # Three live ones fit beside the three gone (6 images): one batch of their 6 images, not 3 + 3.
        live = [asyncio.ensure_future(batcher(images(i, 2))) for i in (1, 2, 3)]
        await asyncio.sleep(0.01)
        assert batcher.full()
        return await busy, await asyncio.gather(*live)

    busy, live = asyncio.run(main())
    assert busy.item() == 0 and [rows.flatten().tolist() for rows in live] == [[1, 1], [2, 2], [3, 3]]
    assert forward.sizes == [1, 6], forward.sizes


def test_a_caller_that_leaves_during_the_forward_pass_leaves_every_other_answer_where_it_belongs():
    """The rows of a batch are handed out by each request's images in turn: a caller gone while its batch's forward
    pass ran (a client gone, a gRPC deadline) still took its rows' place, or every request after it in the batch
    would get its neighbour's answer (another client's image's label)."""
    entered, gate = threading.Event(), threading.Event()

    def gated(batch):
        entered.set()
        gate.wait(30)
        return batch[:, :1, 0, 0].clone()
    batcher = Batcher(gated, max_images=8, max_delay_s=0.05)

    async def main():
        calls = [asyncio.ensure_future(batcher(images(i, 1 + i % 2))) for i in range(4)]  # 6 images: one batch
        while not entered.is_set():
            await asyncio.sleep(0.01)
        calls[1].cancel()  # during the forward pass
        gate.set()
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[1], asyncio.CancelledError), results
    assert [results[i].flatten().tolist() for i in (0, 2, 3)] == [[0], [2], [3, 3]], results
