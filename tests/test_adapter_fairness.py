"""Max-min fairness of everyone's in-flight caps (adapter/limits.py InFlight.to_give_way): when they are full, a
request of a client under its fair share takes the place of the newest request of the client holding the most past
it that is still arriving or waiting for a connection to the model server. Four addresses holding 16 slow uploads
each had every other client refused 503 "busy" for BODY_TIMEOUT_S at a time. The choice in-process; then a real adapter over real sockets, from several loopback
addresses, in front of a stand-in model server (no TorchServe needed)."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from adapter.errors import ClassifyError
from adapter.limits import _CHARGE, GAVE_WAY_MESSAGE, InFlight, waiting_for_model_server
from adapter.run import running_adapter
from test_adapter import ANSWER
from test_adapter_edge import samples
from test_client_shares import PART_HEAD, SlowTorchServe, _hold_upload, _post_now
from test_hostile import multipart_head, parse, wait_for

PNG = (Path(__file__).resolve().parents[1] / "frontend" / "examples" / "test-00042.png").read_bytes()


# --- the choice (no server) ----------------------------------------------------------------------

def _receiving(in_flight: InFlight, client: str, stopped: list, declared: int = 1):
    """A request of ``client`` admitted and receiving its body; ``stopped`` records it when it is stopped."""
    charge = in_flight.try_admit(client, declared)
    assert not isinstance(charge, str), charge
    charge.stoppable(lambda: stopped.append(charge))
    return charge


def test_the_newest_upload_still_arriving_of_the_client_holding_most_past_its_share_gives_way():
    in_flight = InFlight(max_requests=6, max_bytes=10**6)
    in_flight.share_per_client(max_requests=3, max_bytes=10**6)
    stopped: list = []
    a = [_receiving(in_flight, "a", stopped) for _ in range(3)]
    b = [_receiving(in_flight, "b", stopped) for _ in range(2)]
    _receiving(in_flight, "c", stopped)
    assert in_flight.try_admit("d", 1) == "busy"
    # d's fair share: 6 // 4 clients = 1. a holds 3 (the most), b 2: a's newest still arriving.
    assert in_flight.to_give_way("d", 1) is a[2]
    a[2].unstoppable()  # its body all arrived and sent to the model server: it never gives way
    assert in_flight.to_give_way("d", 1) is a[1]
    for charge in a[:2]:
        charge.unstoppable()
    assert in_flight.to_give_way("d", 1) is b[1]  # a has none arriving: b, past the share too
    assert in_flight.to_give_way("c", 1) is None  # c holds its share (1) already
    # One that gives way is released at once (and once: its request's own release later changes nothing).
    b[1].give_way()
    assert stopped == [b[1]] and (in_flight.requests, in_flight.clients["b"].requests) == (5, 1)
    b[1].release()
    assert (in_flight.requests, in_flight.clients["b"].requests) == (5, 1)
    assert not isinstance(in_flight.try_admit("d", 1), str)


def test_a_request_waiting_for_a_connection_to_the_model_server_gives_way_with_a_503_and_retry_after():
    """Its body arrived, nothing of it at the model server yet: the newest such request of the client most past its
    share gives way as an upload still arriving does, its wait ending in 503 + Retry-After; one cancelled for
    another reason (its deadline) stays cancelled; once past the wait, or outside a request, nothing gives way."""
    async def scenario():
        in_flight = InFlight(max_requests=3, max_bytes=10**6)
        in_flight.share_per_client(max_requests=3, max_bytes=10**6)
        in_flight.retry_after_s = 7
        never = asyncio.Event()

        async def waits(charge, entered: asyncio.Event):
            _CHARGE.set(charge)  # (as RequestLimits does for the request's task)
            async with waiting_for_model_server():
                entered.set()
                await never.wait()

        charges = [in_flight.try_admit("a", 1) for _ in range(3)]
        entered = [asyncio.Event() for _ in charges]
        tasks = [asyncio.create_task(waits(charge, event)) for charge, event in zip(charges, entered)]
        for event in entered:
            await event.wait()
        assert in_flight.try_admit("b", 1) == "busy"
        place = in_flight.to_give_way("b", 1)  # b's share: 3 // 2 = 1; a holds 3: its newest waiting
        assert place is charges[2]
        place.give_way()
        with pytest.raises(ClassifyError) as gave_way:
            await tasks[2]
        assert (gave_way.value.status_code, gave_way.value.message) == (503, GAVE_WAY_MESSAGE)
        assert gave_way.value.headers == {"Retry-After": "7"}
        assert not isinstance(in_flight.try_admit("b", 1), str)  # its place taken
        tasks[1].cancel()  # (a deadline's cancel): not a give-way
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        assert charges[1].stop is None  # its wait over: it no longer may give way (still held, until its release)
        assert in_flight.to_give_way("c", 1) is charges[0]  # (c's share 1; a holds 2: the one still waiting)
        never.set()
        await tasks[0]
        assert charges[0].stop is None and in_flight.clients["a"].stoppable == []
        async with waiting_for_model_server():  # outside a request: nothing to give way
            pass

    asyncio.run(scenario())


def test_a_wait_stopped_and_cancelled_for_another_reason_too_is_not_read_as_giving_way():
    """serving/clients.py StoppableWait: a stop that meets a cancel of another kind (a deadline's, a client's that left)
    goes on as that cancel, not as the give-way's 503."""
    from serving.clients import StoppableWait

    async def scenario():
        waits: list = []

        async def waiting() -> bool:
            waits.append(StoppableWait())
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                return waits[-1].gave_way()
            return False

        results = []
        for also_cancelled in (False, True):
            task = asyncio.create_task(waiting())
            await asyncio.sleep(0)  # (waiting now)
            waits[-1].stop()
            if also_cancelled:
                task.cancel()
            results.append(await task)
        return results

    assert asyncio.run(scenario()) == [True, False]


def test_a_client_past_its_fair_share_of_the_bytes_gives_way_to_one_under_it():
    """Three addresses each holding slow full-size uploads (promised their declared size) held everyone's bytes with
    few requests, and a phone photo was refused "busy". The fair share counts bytes too: a newcomer whose held and
    declared bytes are within an equal part of them takes the place of the newest upload still arriving of the
    client most past its share (here in bytes); none when its own bytes would pass its part."""
    in_flight = InFlight(max_requests=64, max_bytes=1000)
    in_flight.share_per_client(max_requests=16, max_bytes=450)
    stopped: list = []
    a = [_receiving(in_flight, "a", stopped, 200) for _ in range(2)]
    b = _receiving(in_flight, "b", stopped, 400)
    for charge in (*a, b):
        assert charge.cover(1, healthy=True)  # arriving at a healthy rate: promised its declared size
    assert in_flight.bytes == 800 and in_flight.try_admit("c", 300) == "busy"
    # c's part: 1000 // 3 clients = 333 bytes. a holds 400 (1.2 parts, in 2 requests), b 400 in 1: a's newest first
    # (equal bytes; ties go to the first held), then b once a is done receiving.
    assert in_flight.to_give_way("c", 300) is a[1]
    for charge in a:
        charge.unstoppable()
    assert in_flight.to_give_way("c", 300) is b
    assert in_flight.to_give_way("c", 334) is None  # past its own part
    # A request that gave way is charged nothing more (a chunk that came with its stop would never be given back).
    held = in_flight.bytes
    b.give_way()
    assert in_flight.bytes == held - 400 and not b.cover(500, healthy=True) and in_flight.bytes == held - 400


def test_a_request_that_gave_way_is_charged_nothing_more_even_for_a_chunk_that_would_fit():
    """Released when it gave way, it keeps no bytes and no place: a chunk that came with its stop is refused (charged,
    nothing would ever give it back), however much room is left."""
    in_flight = InFlight(max_requests=4, max_bytes=1000)
    in_flight.share_per_client(max_requests=4, max_bytes=1000)
    stopped: list = []
    held = _receiving(in_flight, "a", stopped, 400)
    assert held.cover(100, healthy=False)
    held.give_way()
    assert stopped == [held]
    assert not held.cover(200, healthy=False) and not held.cover(400, healthy=True)
    held.release()  # its request's own release, later
    assert (in_flight.requests, in_flight.bytes, in_flight.clients) == (0, 0, {})


def test_only_what_is_short_decides_who_is_under_and_who_is_past_its_share():
    """Places short, bytes plenty: 32 addresses' two small uploads each held every place with a quarter of the bytes,
    and a 6.7 MB photo (past an equal part of the bytes, 3 MiB) was refused "busy", or an honest client's upload under
    way, holding one place, was stopped for a newcomer, its bytes ranking it the most past its share. Now the places
    alone decide while the bytes fit; the bytes alone while the places are free."""
    in_flight = InFlight(max_requests=5, max_bytes=10_000)
    in_flight.share_per_client(max_requests=5, max_bytes=10_000)
    stopped: list = []
    a = [_receiving(in_flight, "a", stopped, 10) for _ in range(2)]
    b = [_receiving(in_flight, "b", stopped, 10) for _ in range(2)]
    honest = _receiving(in_flight, "h", stopped, 6000)
    for charge in (*a, *b, honest):
        assert charge.cover(1, healthy=True)  # promised their declared sizes: 6,040 bytes held of 10,000
    assert in_flight.try_admit("n", 3000) == "busy"  # every place held; the bytes would fit
    # n's part: 5 places // 4 clients = 1 (2,500 bytes: under its 3,000, but the bytes are not short). h holds 1
    # place (its 6,000 bytes 2.4 parts); a and b 2 places each: a's newest gives way, not h's upload.
    assert in_flight.to_give_way("n", 3000) is a[1]
    assert in_flight.to_give_way("h", 10) is None  # h holds its part of the places already
    # The bytes short, the places not: its part of the bytes is what counts, and who is past theirs.
    roomy = InFlight(max_requests=10, max_bytes=10_000)
    roomy.share_per_client(max_requests=10, max_bytes=10_000)
    large = _receiving(roomy, "a", stopped, 7000)
    small = [_receiving(roomy, "b", stopped, 10) for _ in range(4)]  # 4 places of 10 // 3 clients = 3: past
    for charge in (large, *small):
        assert charge.cover(1, healthy=True)
    assert roomy.try_admit("n", 3000) == "busy"  # 7,040 + 3,000 bytes: past the 10,000
    assert roomy.to_give_way("n", 3000) is large  # a's 7,000 bytes (2.1 parts of 3,333), not b's places
    assert roomy.to_give_way("n", 3500) is None  # past its own part of the bytes
    assert stopped == []


def test_a_newcomer_already_holding_a_request_counts_once_among_the_clients_that_share():
    """Its fair share is an equal part among the clients holding requests, itself counted once: one that holds 1 of
    4 places beside a client holding 3 is under its share (4 // 2 clients = 2), and a's newest gives way to it
    (counted twice, its share read 4 // 3 = 1, and it was refused "busy")."""
    in_flight = InFlight(max_requests=4, max_bytes=10**6)
    in_flight.share_per_client(max_requests=4, max_bytes=10**6)
    stopped: list = []
    a = [_receiving(in_flight, "a", stopped) for _ in range(3)]
    _receiving(in_flight, "n", stopped)
    assert in_flight.try_admit("n", 1) == "busy"
    assert in_flight.to_give_way("n", 1) is a[2]


def test_while_only_the_bytes_are_short_a_clients_many_small_uploads_do_not_rank_it_past_its_share():
    """The mirror of the case above: bytes short, places free. b's 5 uploads are past an equal part of the places
    (10 // 3 = 3) but the places are not what is short; a's one upload, 1.5 parts of the bytes, is the most past."""
    in_flight = InFlight(max_requests=10, max_bytes=10_000)
    in_flight.share_per_client(max_requests=10, max_bytes=10_000)
    stopped: list = []
    a = _receiving(in_flight, "a", stopped, 5000)
    b = [_receiving(in_flight, "b", stopped, 700) for _ in range(5)]
    for charge in (a, *b):
        assert charge.cover(1, healthy=True)  # promised: 8,500 bytes held, 6 places of 10
    assert in_flight.try_admit("n", 2000) == "busy"
    # n's part: 10,000 // 3 = 3,333 bytes. a holds 5,000 (1.5 parts), b 3,500 (1.05): a gives way, not b's newest.
    assert in_flight.to_give_way("n", 2000) is a


def test_an_older_upload_gives_way_when_the_newest_past_the_share_holds_too_few_bytes():
    """When bytes are what is short, the newest upload of the client past its share may hold too few to make room:
    its older one that does gives way (it was the next client or nothing)."""
    in_flight = InFlight(max_requests=64, max_bytes=1000)
    in_flight.share_per_client(max_requests=16, max_bytes=1000)
    stopped: list = []
    large = _receiving(in_flight, "a", stopped, 700)
    assert large.cover(1, healthy=True)  # promised its 700
    small = _receiving(in_flight, "a", stopped, 100)
    assert small.cover(10, healthy=False)  # crawling: holds its 10
    assert in_flight.bytes == 710 and in_flight.try_admit("b", 400) == "busy"
    assert in_flight.to_give_way("b", 400) is large  # the newest's 10 bytes would not make room


def test_no_request_gives_way_when_all_hold_their_fair_share_or_less_or_it_would_not_make_room():
    in_flight = InFlight(max_requests=4, max_bytes=10**6)
    in_flight.share_per_client(max_requests=4, max_bytes=10**6)
    stopped: list = []
    for client in "abcd":
        _receiving(in_flight, client, stopped)
    assert in_flight.try_admit("e", 1) == "busy"
    assert in_flight.to_give_way("e", 1) is None  # 4 // 5 clients: a share of 1 (one at least); none holds past it
    # A lone client at everyone's cap (its share): nothing of its own gives way to it.
    lone = InFlight(max_requests=4, max_bytes=10**6)
    lone.share_per_client(max_requests=4, max_bytes=10**6)
    for _ in range(4):
        _receiving(lone, "a", stopped)
    assert lone.try_admit("a", 1) == "client" and lone.to_give_way("a", 1) is None
    # Two at 2 of 4: a third's share is 1, so one of them gives way, but not when its bytes would not make room.
    full = InFlight(max_requests=4, max_bytes=1000)
    full.share_per_client(max_requests=4, max_bytes=1000)
    held = [_receiving(full, client, stopped, 250) for client in "aabb"]
    for charge in held:
        assert charge.cover(10, healthy=False)  # each holds 10 bytes of 250
    assert full.to_give_way("c", 100) in held
    assert full.to_give_way("c", 1000 - 40 + 11) is None  # 10 bytes freed: 971 would still not fit
    assert stopped == []


def test_a_request_kept_for_the_model_server_or_answered_never_gives_way():
    """Answered 504 while TorchServe still holds it (Charge.keep), it keeps its place but cannot give way; nor can
    one answered before its body ended (a 404 or 413 to a POST: released, its place free)."""
    async def scenario():
        in_flight = InFlight(max_requests=4, max_bytes=10**6)
        in_flight.share_per_client(max_requests=4, max_bytes=10**6)
        in_flight.hold_s = 30
        stopped: list = []
        kept = [_receiving(in_flight, "a", stopped) for _ in range(3)]
        for charge in kept:
            charge.unstoppable()
            charge.keep(0)
            charge.release()
        _receiving(in_flight, "a", stopped).release()  # answered mid-body
        _receiving(in_flight, "b", stopped)
        assert in_flight.requests == 4 and in_flight.try_admit("c", 1) == "busy"
        # c's share: 4 // 3 = 1. a holds 3, all kept; b holds its 1.
        return in_flight.to_give_way("c", 1), stopped

    assert asyncio.run(scenario()) == (None, [])


# --- over HTTP ------------------------------------------------------------------------------------

def _adapter_before_a_stand_in(log_dir, **settings):
    """An adapter with 4 uploads in flight in all, 2 per address (and ``settings``), in front of a stand-in model
    server that answers at once (its work_s to change that): the adapter process, with .port and .model_server."""
    server = SlowTorchServe(work_s=0.0)
    env = {"TS_INFERENCE_URL": server.url, "TS_MANAGEMENT_URL": server.url, "MAX_REQUESTS_IN_FLIGHT": "4",
           "MAX_CLIENT_REQUESTS_IN_FLIGHT": "2", "RETRY_AFTER_S": "3", **settings}
    try:
        with running_adapter(env, log_dir / "adapter.log") as proc:
            proc.port = int(proc.base_url.rsplit(":", 1)[1])
            proc.model_server = server
            yield proc
    finally:
        server.close()


@pytest.fixture(scope="module")
def fair_adapter(tmp_path_factory):
    """A long grace: stalled uploads stay held."""
    yield from _adapter_before_a_stand_in(tmp_path_factory.mktemp("fairness"), MIN_RATE_GRACE_S="30",
                                          BODY_TIMEOUT_S="30")


def _metrics(adapter) -> dict:
    return samples(httpx.get(f"{adapter.base_url}/metrics", timeout=10).text)


def _in_flight(adapter) -> float:
    return _metrics(adapter)[("adapter_requests_in_flight", ())]


async def _held(adapter, count: int) -> None:
    """Until the caps hold ``count`` requests (the /metrics that asks has no body); the loop runs meanwhile (an
    aborted connection closes in its next step)."""
    for _ in range(50):
        if _in_flight(adapter) == count:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not {count} uploads held within 10 s: {_in_flight(adapter)}")


def _refusals(adapter, reason: str) -> float:
    return _metrics(adapter)[("adapter_refusals_total", (("reason", reason),))]


async def _post_png(port: int, source: str) -> httpx.Response:
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(transport=transport, timeout=30) as client:
        return await client.post(f"http://127.0.0.1:{port}/classify/",
                                 files={"image": ("test-00042.png", PNG, "image/png")})


def test_a_client_under_its_share_is_served_and_the_newest_slow_upload_past_a_share_gives_way(fair_adapter):
    """Two addresses hold 2 slow uploads each (all 4 places); a third address's upload is answered 200, and the newest
    upload of one of the two got 503 + Retry-After {"error"} at once, its connection closed; the other three go on."""
    adapter, port = fair_adapter, fair_adapter.port
    gave_way_before, busy_before = _refusals(adapter, "gave_way"), _refusals(adapter, "busy")

    async def scenario():
        held = []
        for source in ("127.0.0.2", "127.0.0.3"):
            held += [await _hold_upload(port, source), await _hold_upload(port, source)]
        await _held(adapter, 4)
        served = await _post_png(port, "127.0.0.4")
        reads = [asyncio.create_task(reader.read()) for reader, _ in held]
        await asyncio.wait(reads, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(1.0)  # (any other would have ended by now)
        ended = [i for i, read in enumerate(reads) if read.done()]
        still_held = _in_flight(adapter)
        for _, writer in held:
            writer.transport.abort()
        for read in reads:
            read.cancel()
        return served, ended, [reads[i].result() for i in ended], still_held

    served, ended, answers, still_held = asyncio.run(scenario())
    assert served.status_code == 200 and served.json()["prediction"] == ANSWER["prediction"], served.text
    assert len(ended) == 1 and ended[0] in (1, 3), ended  # the newest of its address, and only it
    status, headers, body = parse(answers[0])  # read to its end: the connection closed
    assert status == 503 and headers.get("retry-after") == "3" and headers.get("connection") == "close", answers
    assert "more than its share" in json.loads(body)["error"], body
    assert still_held == 3  # the three others, charged once each (the stopped one's release changed nothing)
    assert (_refusals(adapter, "gave_way") - gave_way_before, _refusals(adapter, "busy") - busy_before) == (1, 0)
    wait_for(lambda: _in_flight(adapter) == 0, 10, "no upload held")


def test_a_head_whose_body_has_not_begun_stops_nobody_until_it_begins(fair_adapter):
    """A head alone claimed a place: an address sending heads that declare a body and never send it (cut only at the
    grace) stopped an honest client's uploads for nothing, half of them under a claim every 0.1 s. Now the claim
    counts once its body begins: while it sends nothing, the four uploads held go on; its first bytes make the
    newest of one address past its share give way, and it is admitted (the stand-in's answer, not 503)."""
    adapter, port = fair_adapter, fair_adapter.port
    gave_way_before = _refusals(adapter, "gave_way")

    async def scenario():
        held = []
        for source in ("127.0.0.2", "127.0.0.3"):
            held += [await _hold_upload(port, source), await _hold_upload(port, source)]
        await _held(adapter, 4)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.4", 0))
        writer.write(multipart_head(port, 1000)[:-2] + b"Connection: close\r\n\r\n")  # (its answer read to the end)
        await writer.drain()
        await asyncio.sleep(1.0)
        quiet = (_in_flight(adapter), _refusals(adapter, "gave_way") - gave_way_before)
        writer.write(PART_HEAD + b"\0" * (1000 - len(PART_HEAD)))
        answer = parse(await asyncio.wait_for(reader.read(), timeout=30))
        writer.transport.abort()
        for _, held_writer in held:
            held_writer.transport.abort()
        return quiet, answer

    quiet, (status, _, body) = asyncio.run(scenario())
    assert quiet == (4, 0), quiet  # its head alone: nothing stopped, nothing admitted
    assert status != 503, (status, body)  # admitted once its body began
    assert _refusals(adapter, "gave_way") - gave_way_before == 1
    wait_for(lambda: _in_flight(adapter) == 0, 10, "no upload held")


def test_a_client_at_its_share_and_clients_all_at_their_fair_share_are_refused_as_before(fair_adapter):
    """No change where nobody holds past a newcomer's fair share: a holder's own fifth request gets its client's 503;
    four addresses holding one each leave a fifth address the busy 503 (its share, 4 // 5, is 1, one at least: each holds just that); nothing is stopped."""
    adapter, port = fair_adapter, fair_adapter.port
    gave_way_before = _refusals(adapter, "gave_way")

    async def scenario():
        held = [await _hold_upload(port, source) for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3")]
        await _held(adapter, 4)
        own = await _post_now(port, "127.0.0.3")
        for _, writer in held[1::2]:
            writer.transport.abort()
        await _held(adapter, 2)
        held += [await _hold_upload(port, source) for source in ("127.0.0.4", "127.0.0.5")]
        await _held(adapter, 4)
        everyone = await _post_now(port, "127.0.0.6")
        still_held = _in_flight(adapter)
        for _, writer in held:
            writer.transport.abort()
        return own, everyone, still_held

    own, everyone, still_held = asyncio.run(scenario())
    for (status, headers, body, _), words in ((own, "from your address"), (everyone, "with other uploads")):
        assert status == 503 and headers.get("retry-after") == "3", (status, headers, body)
        assert words in json.loads(body)["error"], body
    assert still_held == 4 and _refusals(adapter, "gave_way") == gave_way_before
    wait_for(lambda: _in_flight(adapter) == 0, 10, "no upload held")


@pytest.fixture(scope="module")
def one_connection_adapter(tmp_path_factory):
    """One connection to the model server: requests whose body arrived wait for it."""
    yield from _adapter_before_a_stand_in(tmp_path_factory.mktemp("one-connection"), TS_MAX_CONNECTIONS="1")


def test_a_request_waiting_for_a_connection_past_its_clients_share_gives_way(one_connection_adapter):
    """Two addresses' 2 uploads each, arrived: one at the model server, three waiting for the only connection, all
    4 places held. A third address's upload is served (200), and one of those waiting, of an address past its share
    (4 // 3 = 1), got 503 + Retry-After {"error"} at once; the other three are answered 200. Before, it got the busy
    503: four addresses' 16 arrived uploads each held all 64 places, and another client was refused half its tries."""
    adapter, port, server = one_connection_adapter, one_connection_adapter.port, one_connection_adapter.model_server
    gave_way_before, busy_before = _refusals(adapter, "gave_way"), _refusals(adapter, "busy")

    async def scenario():
        runs = len(server.runs)
        server.work_s = 3.0  # the first holds the connection meanwhile
        try:
            flood = [asyncio.create_task(_post_png(port, source)) for source in ("127.0.0.2",) * 2 + ("127.0.0.3",) * 2]
            await _held(adapter, 4)
            assert len(server.runs) == runs + 1, server.runs[runs:]  # one at the model server, three waiting
            newcomer = asyncio.create_task(_post_png(port, "127.0.0.4"))
            # Within the first's 3 s: only the one that gave way is answered.
            done, _ = await asyncio.wait(flood, timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
            gave_way = [task.result() for task in done]
            server.work_s = 0.0
            return gave_way, await newcomer, await asyncio.gather(*flood)
        finally:
            server.work_s = 0.0

    gave_way, newcomer, answers = asyncio.run(scenario())
    assert len(gave_way) == 1 and gave_way[0].status_code == 503, [answer.text for answer in gave_way]
    assert gave_way[0].headers.get("retry-after") == "3" and "more than its share" in gave_way[0].json()["error"]
    assert newcomer.status_code == 200 and newcomer.json()["prediction"] == ANSWER["prediction"], newcomer.text
    assert sorted(answer.status_code for answer in answers) == [200, 200, 200, 503], [a.text for a in answers]
    assert (_refusals(adapter, "gave_way") - gave_way_before, _refusals(adapter, "busy") - busy_before) == (1, 0)
    wait_for(lambda: _in_flight(adapter) == 0, 10, "no upload held")


def test_a_free_connection_to_the_model_server_goes_to_the_waiting_client_holding_the_fewest(one_connection_adapter):
    """One connection: a's first request holds it, then a's second, b's first and b's second wait for it, in that
    order. It goes to b's first next (b holds none, a held one most recently), then a's, then b's: first come, first
    served answered a's two first (four addresses' 40 uploads waiting put another client's photo behind all)."""
    adapter, port, server = one_connection_adapter, one_connection_adapter.port, one_connection_adapter.model_server

    async def scenario():
        async def post(name: str, source: str):
            answer = await _post_png(port, source)
            return name, answer.status_code, time.monotonic()

        runs = len(server.runs)
        server.work_s = 2.0  # (a1's: the others queue meanwhile)
        try:
            tasks = [asyncio.create_task(post("a1", "127.0.0.2"))]
            for _ in range(50):
                if len(server.runs) > runs:
                    break
                await asyncio.sleep(0.05)
            for held, (name, source) in enumerate((("a2", "127.0.0.2"), ("b1", "127.0.0.3"), ("b2", "127.0.0.3")), 2):
                tasks.append(asyncio.create_task(post(name, source)))
                await _held(adapter, held)
            server.work_s = 0.3
            return await asyncio.gather(*tasks)
        finally:
            server.work_s = 0.0

    answers = asyncio.run(scenario())
    assert all(status == 200 for _, status, _ in answers), answers
    assert [name for name, _, _ in sorted(answers, key=lambda answer: answer[2])] == ["a1", "b1", "a2", "b2"], answers
    wait_for(lambda: _in_flight(adapter) == 0, 10, "no upload held")


def test_uploads_at_the_model_server_never_give_way(fair_adapter):
    """An address whose 2 uploads have all arrived and are at the model server holds past a newcomer's fair share
    (4 // 4 clients = 1), but neither is stopped: the newcomer gets the busy 503, and both are answered 200."""
    adapter, port, server = fair_adapter, fair_adapter.port, fair_adapter.model_server
    gave_way_before = _refusals(adapter, "gave_way")

    async def scenario():
        runs = len(server.runs)
        server.work_s = 3.0
        try:
            waiting = [asyncio.create_task(_post_png(port, "127.0.0.2")) for _ in range(2)]
            for _ in range(50):  # until the model server has both (their bodies read in full)
                if len(server.runs) == runs + 2:
                    break
                await asyncio.sleep(0.1)
            held = [await _hold_upload(port, source) for source in ("127.0.0.3", "127.0.0.5")]
            await _held(adapter, 4)
            newcomer = await _post_now(port, "127.0.0.4")
            answers = await asyncio.gather(*waiting)
        finally:
            server.work_s = 0.0
        for _, writer in held:
            writer.transport.abort()
        return newcomer, answers

    (status, headers, body, _), answers = asyncio.run(scenario())
    assert status == 503 and "with other uploads" in json.loads(body)["error"], (status, headers, body)
    assert [answer.status_code for answer in answers] == [200, 200], [answer.text for answer in answers]
    assert _refusals(adapter, "gave_way") == gave_way_before
    wait_for(lambda: _in_flight(adapter) == 0, 10, "no upload held")
