"""The predictor's gRPC port relay (handler/grpc_relay.py) in-process, in front of a plain TCP server standing in
for grpc: connections counted per client and reset past the cap, bytes copied both ways with flow control, each
side's close passed on, and the client's address found from the relay's connection as grpc's peer string."""
from __future__ import annotations

import asyncio
import contextlib

from adapter.config import Settings
from adapter.protocol import OpenConnections
from grpc_raw import DATA, HEADERS, frame, reset_calls
from handler.grpc_relay import (MAX_HEADER_BLOCK_BYTES, MAX_HEADER_FIELDS, REPEAT_WEIGHT, FairShare, GrpcRelay,
                                PerSecond, hpack_fields)


@contextlib.asynccontextmanager
async def _relayed(max_open: int, max_client: int, trusted: list[str] | None = None, grace_s: float = 2.0,
                   host: str = "127.0.0.1", streams_per_s: int = 1000, frames_per_s: int = 10_000,
                   all_streams_per_s: int = 4000, on_refused=lambda reason: None):
    """The relay on a free port of ``host`` in front of a stand-in for grpc: (relay, its port, the stand-in's accepted
    connections as (reader, writer) in a queue); both closed at the end. ``on_refused``: called with each reset's
    reason."""
    accepted: asyncio.Queue = asyncio.Queue()

    async def grpc_side(reader, writer):
        await accepted.put((reader, writer))

    internal = await asyncio.start_server(grpc_side, "127.0.0.1", 0)
    relay = GrpcRelay(OpenConnections(Settings(max_open_connections=max_open, max_client_connections=max_client,
                                               trusted_proxies=trusted or [], min_rate_grace_s=grace_s)),
                      PerSecond(streams_per_s), PerSecond(frames_per_s), FairShare(all_streams_per_s), on_refused)
    relay.internal_port = internal.sockets[0].getsockname()[1]
    try:
        await relay.start(host, 0)
        yield relay, relay.servers[0].sockets[0].getsockname()[1], accepted
    finally:
        relay.close()
        internal.close()


async def _closed_or_reset(reader: asyncio.StreamReader, wait_s: float = 5) -> bool:
    """Whether the connection ends (closed or reset) within ``wait_s``; False: still open (nothing read)."""
    try:
        return await asyncio.wait_for(reader.read(1), wait_s) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_the_relay_caps_one_clients_connections_and_relays_the_rest_as_its_own():
    async def scenario():
        async with _relayed(max_open=4, max_client=2) as (relay, port, accepted):
            clients = [await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
                       for _ in range(3)]
            upstream = [await asyncio.wait_for(accepted.get(), 5) for _ in range(2)]
            assert await _closed_or_reset(clients[2][0])  # past its cap: reset at once, never relayed
            assert accepted.empty()
            other = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.3", 0))
            other_up = await asyncio.wait_for(accepted.get(), 5)
            # grpc's peer for each relayed connection names the relay's side: mapped back to the client
            peers = [f"ipv4:127.0.0.1:{writer.get_extra_info('peername')[1]}" for _, writer in (*upstream, other_up)]
            assert [relay.peer_host(peer) for peer in peers] == ["127.0.0.2", "127.0.0.2", "127.0.0.3"]
            assert relay.peer_host("ipv4:10.0.0.7:5000") == "10.0.0.7"  # not the relay's: as grpc_peer_host
            # bytes both ways
            clients[0][1].write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            assert await asyncio.wait_for(upstream[0][0].readexactly(24), 5) == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            upstream[0][1].write(b"settings")
            assert await asyncio.wait_for(clients[0][0].readexactly(8), 5) == b"settings"
            # grpc closes (GOAWAY after idle, a stop): the client's connection closes, its place and entry freed
            upstream[0][1].close()
            assert await _closed_or_reset(clients[0][0])
            # the client closes: grpc's side sees its end (and closes, as grpc does)
            clients[1][1].close()
            assert await asyncio.wait_for(upstream[1][0].read(), 5) == b""
            upstream[1][1].close()
            await asyncio.sleep(0.1)
            assert relay.connections.per_client == {"127.0.0.3": {next(iter(relay.open)): None}}
            assert list(relay.clients.values()) == ["127.0.0.3"]
            again = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            await asyncio.wait_for(accepted.get(), 5)  # its places free again
            for _, writer in (other, again):
                writer.close()

    asyncio.run(scenario())


def test_the_relay_copies_many_megabytes_to_a_slow_reader_intact_holding_little():
    async def scenario():
        async with _relayed(max_open=4, max_client=4) as (relay, port, accepted):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            up_reader, up_writer = await asyncio.wait_for(accepted.get(), 5)
            payload = bytes(range(256)) * (128 * 1024)  # 32 MiB: past what the sockets' buffers take
            up_writer.write(payload)
            sending = asyncio.ensure_future(up_writer.drain())
            await asyncio.sleep(0.5)  # the client reads nothing yet: the relay pauses its reading from grpc
            (connection,) = relay.open
            assert connection.transport.get_write_buffer_size() < 1 << 20
            got = bytearray()
            while len(got) < len(payload):
                got += await asyncio.wait_for(reader.read(1 << 16), 5)
            assert bytes(got) == payload
            await asyncio.wait_for(sending, 5)
            writer.write(payload)  # and the other way
            assert await asyncio.wait_for(up_reader.readexactly(len(payload)), 20) == payload
            writer.close()
            up_writer.close()

    asyncio.run(scenario())


def test_a_trusted_proxys_connections_count_in_no_clients_share():
    async def scenario():
        async with _relayed(max_open=4, max_client=1, trusted=["127.0.0.1"]) as (relay, port, accepted):
            proxied = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            for _ in proxied:
                await asyncio.wait_for(accepted.get(), 5)
            assert relay.connections.proxied == 3 and not relay.connections.per_client
            for _, writer in proxied:
                writer.close()

    asyncio.run(scenario())


def test_all_interfaces_is_one_port_for_ipv4_and_ipv6_and_an_ipv4_client_counts_as_its_address():
    """--host 0.0.0.0 (or ::): one dual-stack socket, as grpc's "[::]" listened (port 0 too); an IPv4 client arrives
    as ::ffff:a.b.c.d and is counted, and named to the shares, as its IPv4 address (trusted proxies match it)."""
    async def scenario():
        async with _relayed(max_open=4, max_client=4, host="0.0.0.0") as (relay, port, accepted):
            assert len([sock for server in relay.servers for sock in server.sockets]) == 1
            _, ipv4 = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.9", 0))
            _, up = await asyncio.wait_for(accepted.get(), 5)
            assert relay.peer_host(f"ipv4:127.0.0.1:{up.get_extra_info('peername')[1]}") == "127.0.0.9"
            assert list(relay.connections.per_client) == ["127.0.0.9"]
            try:
                _, ipv6 = await asyncio.open_connection("::1", port)
            except OSError:  # no IPv6 loopback here
                return
            await asyncio.wait_for(accepted.get(), 5)
            assert list(relay.connections.per_client) == ["127.0.0.9", "::/64"]
            for writer in (ipv4, ipv6):
                writer.close()

    asyncio.run(scenario())


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


async def _open(port: int, source: str, accepted: asyncio.Queue | None = None):
    """A client connection from ``source``: (reader, writer), and its relayed end at the stand-in when ``accepted``."""
    client = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    if accepted is None:
        return client
    return client, await asyncio.wait_for(accepted.get(), 5)


def test_at_the_cap_a_quiet_connection_of_the_address_past_its_share_gives_way_to_a_newcomer():
    """Four connections of one address fill the cap (4). A newcomer is reset while they have just spoken. Once they
    have all been quiet both ways past the grace (0.5 s here) and three of them then speak, a newcomer's connection
    takes the place of the quiet one (closed), and the next is reset; once the others are quiet again, one more takes
    one of theirs, and at its fair share (2 of 4 between two addresses) the newcomer is refused again. (Before, the
    relay never took a gRPC connection as idle: four addresses at 128 connections each shut every other client out
    of the 512.)"""
    async def scenario():
        async with _relayed(max_open=4, max_client=4, grace_s=0.5) as (relay, port, accepted):
            crowd = [await _open(port, "127.0.0.2", accepted) for _ in range(3)]
            await asyncio.sleep(0.1)
            crowd.append(await _open(port, "127.0.0.2", accepted))  # the last marked idle
            for (_, writer), _ in crowd:
                writer.write(PREFACE)
            early = await _open(port, "127.0.0.3")
            assert await _closed_or_reset(early[0])  # none quiet yet
            await asyncio.sleep(1.1)  # all quiet past the grace at a check (every half grace): marked idle
            for (_, writer), (up_reader, _) in crowd[:3]:
                writer.write(b"ping")  # they speak: marked, but not idle now
                assert await asyncio.wait_for(up_reader.readexactly(28), 5)
            newcomer = await _open(port, "127.0.0.3", accepted)
            refused = await _open(port, "127.0.0.3")
            assert await _closed_or_reset(refused[0])  # the rest have just spoken
            closed = [i for i in range(4) if await _closed_or_reset(crowd[i][0][0], 0.3)]
            assert closed == [3], closed  # the quiet one
            assert await asyncio.wait_for(crowd[3][1][0].read(), 5) == PREFACE  # and then its end at grpc
            await asyncio.sleep(0.6)
            second = await _open(port, "127.0.0.3", accepted)
            closed += [i for i in range(3) if await _closed_or_reset(crowd[i][0][0], 0.3)]
            assert len(closed) == 2, closed
            third = await _open(port, "127.0.0.3")  # at its share (2), the crowd's 2 left to it
            assert await _closed_or_reset(third[0])
            assert {key: len(connections) for key, connections in relay.connections.per_client.items()} == {
                "127.0.0.2": 2, "127.0.0.3": 2}
            kept = next(i for i in range(3) if i not in closed)
            crowd[kept][1][1].write(b"settings")  # one left is still relayed both ways
            assert await asyncio.wait_for(crowd[kept][0][0].readexactly(8), 5) == b"settings"
            for (_, writer), _ in (newcomer, second, *crowd):
                writer.close()

    asyncio.run(scenario())


def test_at_the_cap_a_connection_whose_client_reads_nothing_gives_way_after_the_grace():
    """Two connections of one address fill the cap (2), grpc writing to them 32 MiB their client does not read (the
    relay's writing paused, so they are not quiet-idle: reading from grpc is paused too). A newcomer is reset before
    the grace (0.5 s); after it, one of them is reset for it."""
    async def scenario():
        async with _relayed(max_open=2, max_client=2, grace_s=0.5) as (relay, port, accepted):
            crowd = [await _open(port, "127.0.0.2", accepted) for _ in range(2)]
            payload = bytes(32 << 20)
            for _, (_, up_writer) in crowd:
                up_writer.write(payload)
            for _ in range(100):  # the client reads nothing: the relay's writing to it pauses
                if all(connection.unread_since is not None for connection in relay.open):
                    break
                await asyncio.sleep(0.05)
            assert all(connection.unread_since is not None and not connection.idle for connection in relay.open)
            early = await _open(port, "127.0.0.3")
            assert await _closed_or_reset(early[0])
            await asyncio.sleep(0.8)  # (a pause may start again after a short resume)
            newcomer = await _open(port, "127.0.0.3", accepted)
            await asyncio.sleep(0.1)
            assert {key: len(connections) for key, connections in relay.connections.per_client.items()} == {
                "127.0.0.2": 1, "127.0.0.3": 1}
            for (_, writer), (_, up_writer) in (newcomer, *crowd):
                writer.close()
                up_writer.close()

    asyncio.run(scenario())


def test_a_client_opening_more_streams_a_second_than_its_bound_has_its_connection_reset():
    """HTTP/2 calls opened and reset at once ("rapid reset", 10,000 a second) or ended at once with an empty message
    (51,000 a second) from one connection had every other client's calls answered CANCELLED. The relay reads the
    frames' heads (payloads passed over by their length, a head split between reads joined): the streams an address
    opens (HEADERS of a new stream; not a stream's second HEADERS) over all its connections, past the bound in a
    second, reset the connection that opened the one too many; until then every byte is relayed as sent. Another
    address, and a trusted proxy (many clients' calls), are not counted with it."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    # A DATA frame whose payload holds what would read as new streams' HEADERS: passed over, not counted.
    decoy = frame(DATA, 0, 1, b"".join(frame(HEADERS, 4, stream, b"\x83") for stream in range(101, 201, 2)))
    calls = [reset_calls(b"\x83", [stream]) for stream in range(3, 23, 2)]  # 10 calls, each reset
    calls[4] += frame(HEADERS, 5, 11, b"\x83")  # a second HEADERS on stream 11 (as trailers): no new stream

    async def scenario():
        async with _relayed(max_open=8, max_client=4, trusted=["127.0.0.5"], streams_per_s=10) as (
                relay, port, accepted):
            connections = {}  # (all open first: what follows the first reset must fit in its second)
            for name, source in (("first", "127.0.0.2"), ("second", "127.0.0.2"), ("other", "127.0.0.3"),
                                 ("proxy", "127.0.0.5")):
                connections[name] = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
                connections[name][1].write(preface)
                await connections[name][1].drain()
                upstream = await asyncio.wait_for(accepted.get(), 5)  # (kept: dropped, it would close)
                assert await asyncio.wait_for(upstream[0].readexactly(len(preface)), 5) == preface
                connections[name] += upstream
            reader, writer, up_reader, _ = connections["first"]
            sent = decoy + b"".join(calls)
            for at in range(0, len(sent), 7):  # in pieces of 7 bytes: heads split between reads
                writer.write(sent[at:at + 7])
                await writer.drain()
            assert await asyncio.wait_for(up_reader.readexactly(len(sent)), 5) == sent  # 10 streams: relayed
            writer.write(frame(HEADERS, 4, 23, b"\x83"))  # the 11th this second: reset
            connections["second"][1].write(calls[0])  # its other connection: reset at its next one this second
            connections["other"][1].write(b"".join(calls))  # its own 10: not counted with 127.0.0.2's
            connections["proxy"][1].write(b"".join(calls) * 3)  # 30: a trusted proxy's are not counted
            ended = [await _closed_or_reset(connections[name][0], 0.5 if name in ("other", "proxy") else 5)
                     for name in ("first", "second", "other", "proxy")]
            for *_, held in connections.values():
                held.close()
            return ended

    assert asyncio.run(scenario()) == [True, True, False, False]


CONTINUATION, WINDOW_UPDATE = 0x9, 0x8
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def test_hpack_fields_counts_every_kind_of_representation_without_decoding_a_string():
    """RFC 7541's representations: an indexed field (one byte, or more past index 126), a literal with incremental
    indexing / without / never indexed, its name indexed or a string, Huffman-coded or not, a table size update;
    integers of several bytes (a string of 300 bytes). A field naming an entry of the connection's table (past the
    61 static ones) that the block named before counts REPEAT_WEIGHT (one byte may name a 4 KB entry); a static one,
    or another entry, 1. Counted until past the bound; a block cut short counts what was read."""
    long = b"\xff" + bytes([(300 - 127) & 0x7F | 0x80, (300 - 127) >> 7]) + b"v" * 300  # Huffman, 300 bytes
    representations = {
        "indexed": b"\x82", "indexed past 126": b"\xff\x10",
        "incremental, name indexed": b"\x44\x03abc", "incremental, new name": b"\x40\x01k\x81\x07",
        "without indexing, new name": b"\x00\x02kk" + long, "never indexed, name indexed": b"\x11\x00",
        "without indexing, name index 20": b"\x0f\x05\x01v", "table size update": b"\x3f\xe1\x1f",
    }
    block = b"".join(representations.values())
    assert hpack_fields(block, 100) == len(representations)
    assert hpack_fields(block * 2, 100) == 2 * len(representations) - 1 + REPEAT_WEIGHT  # entry 143 named again
    assert hpack_fields(block * 20, 100) > 100  # (stops once past the bound)
    assert hpack_fields(block[:-1], 100) == len(representations)  # cut short in its last
    assert hpack_fields(b"\x82" * 500, 1000) == 500  # a static entry again and again: 1 each
    assert hpack_fields(bytes(range(0xbe, 0xff)), 1000) == 65  # table entries 62-126, each once
    assert hpack_fields(b"\xbe" * 3, 1000) == 1 + 2 * REPEAT_WEIGHT  # entry 62, then twice more
    assert hpack_fields(b"\x40\x01k\x00" + b"\x7f\x00\x00" * 2, 1000) == 1 + 1 + REPEAT_WEIGHT  # a name, as such
    assert hpack_fields(b"\x00\x7f", 100) == 1  # a string length past the block: one field, cut short


def test_a_header_block_of_too_many_fields_or_bytes_or_a_flood_of_frames_has_its_connection_reset():
    """HPACK lets one byte name a 4 KB entry of the connection's table: 8,000 such in a call's 8 KB header block took
    the predictor past 3 GB; a block that never ended (CONTINUATION after CONTINUATION) was read for as long as its
    client sent; 9-byte frames by the million held the event loop. The relay reads the blocks' representations (a
    block split among HEADERS and CONTINUATION frames and among reads; a HEADERS' padding and priority left out)
    and the frames an address sends a second: a block of MAX_HEADER_FIELDS fields is relayed, one more resets the
    connection; so does a block past MAX_HEADER_BLOCK_BYTES, and the frame past the bound in a second."""
    fields = b"\x82" * (MAX_HEADER_FIELDS - 1)
    padded = frame(HEADERS, 0x8 | 0x20, 1, bytes([40]) + b"\x80\0\0\0\x10" + fields[:30] + b"\x82" * 40)
    unended = padded + frame(CONTINUATION, 0, 1, fields[30:])  # the bound less one (not the padding's, priority's)
    whole = unended + frame(CONTINUATION, 4, 1, b"\x82")

    async def reset_after(head: bytes, tail: bytes, frames_per_s: int = 10_000) -> tuple[bool, bool]:
        """(``head`` relayed, the connection reset once ``tail`` follows)."""
        async with _relayed(max_open=8, max_client=4, frames_per_s=frames_per_s) as (relay, port, accepted):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            writer.write(PREFACE)
            up_reader, up_writer = await asyncio.wait_for(accepted.get(), 5)
            for at in range(0, len(head), 7):  # in pieces of 7 bytes: frames and blocks split between reads
                writer.write(head[at:at + 7])
                await writer.drain()
            relayed = await asyncio.wait_for(up_reader.readexactly(len(PREFACE) + len(head)), 5) == PREFACE + head
            writer.write(tail)
            ended = await _closed_or_reset(reader, 1)
            writer.close()
            up_writer.close()
            return relayed, ended

    async def scenario():
        update = frame(WINDOW_UPDATE, 0, 0, b"\0\0\0\1")
        return [await reset_after(whole, frame(HEADERS, 5, 3, b"\x82")),  # (then a call's HEADERS: relayed)
                await reset_after(unended, frame(CONTINUATION, 4, 1, b"\x82\x82")),  # one past the bound
                await reset_after(frame(HEADERS, 0, 1, b"\x82") + frame(CONTINUATION, 0, 1, bytes(16384)) * 3,
                                  frame(CONTINUATION, 0, 1, bytes(16384))),  # a block never ended: past 64 KiB
                await reset_after(frame(HEADERS, 0, 1, b"\x82") + frame(CONTINUATION, 0, 1, bytes(16384)) * 3
                                  + frame(CONTINUATION, 0, 1, bytes(16383)),  # 64 KiB exactly: relayed
                                  frame(CONTINUATION, 0, 1, b"\0")),  # one byte more
                await reset_after(update * 50, update, frames_per_s=50)]

    assert MAX_HEADER_BLOCK_BYTES == 4 * 16384
    assert asyncio.run(scenario()) == [(True, False), (True, True), (True, True), (True, True), (True, True)]


def test_per_second_counts_each_address_a_second_at_a_time_up_to_its_bound_and_forgets_past_seconds(monkeypatch):
    """--max_client_streams, --max_client_frames: an address's count within its bound (exactly the bound too) is
    let through, one more is past it; another address counts on its own; a second after its count began, an address
    may open its bound again (counted for ever, an honest client's 1001st call in its life would reset it). Past 4096
    addresses the seconds gone are forgotten, the ones under way kept."""
    import handler.grpc_relay as relay_module

    now = [100.0]
    monkeypatch.setattr(relay_module.time, "monotonic", lambda: now[0])
    counts = PerSecond(10)
    assert not counts.too_many("a", 10)  # the bound: let through
    assert counts.too_many("a", 1)
    assert not counts.too_many("b", 10)  # its own count
    now[0] = 100.99
    assert counts.too_many("a", 1)  # still a's second
    now[0] = 101.0
    assert not counts.too_many("a", 10)  # a second on: its bound again
    assert counts.too_many("a", 1)
    for n in range(4097):  # addresses of seconds that will be gone
        counts.too_many(f"old {n}", 1)
    now[0] = 101.5
    assert not counts.too_many("c", 10)  # c's second begins
    now[0] = 102.1
    assert not counts.too_many("old 0", 1)  # a new second for it: the gone ones forgotten
    assert counts.too_many("c", 1), "c's second, 0.6 s old, was forgotten with them"
    assert len(counts._counts) == 2


def test_fair_share_counts_all_addresses_streams_and_marks_only_those_past_their_share(monkeypatch):
    """--max_streams: within the total, no address is past it; past it, an address whose streams are more than the
    total over the addresses that opened streams is, one within its share never. The last second's counts weigh by
    the part of it still within a second (all of them at a second's start, half half a second on); two seconds on,
    nothing."""
    import handler.grpc_relay as relay_module

    now = [100.0]
    monkeypatch.setattr(relay_module.time, "monotonic", lambda: now[0])
    streams = FairShare(100)
    assert not any(streams.too_many(key, 30) for key in ("a", "b", "c"))  # 90: within the total
    assert not streams.too_many("d", 5)  # 95
    assert not streams.too_many("d", 10)  # 105, past the total, but d's 15 within its share (25)
    assert streams.too_many("a", 1)  # a's 31: past it
    assert not streams.too_many("d", 1)  # d's 16 still within
    assert not streams.too_many("e", 10)  # a newcomer's 10 (share 20 of 5)
    assert streams.too_many("b", 1)
    now[0] += 1.0  # the next second: the last one's 118 (a 31, b 31) weigh in full
    assert streams.too_many("a", 1)  # still past the total and its share
    assert not streams.too_many("g", 10)  # a newcomer's 10: within its share (100 / 6)
    now[0] += 0.5  # half of it within a second now: 59 of the last second's 118, 11 of this one's
    assert not streams.too_many("a", 20)  # 70 + 20: within the total
    assert streams.too_many("a", 11)  # 101: past it, a's 32 + 15.5 past its share (100 / 6)
    now[0] += 2.0  # two seconds on: nothing counted
    assert not streams.too_many("a", 100)  # alone, its share is the total
    assert streams.too_many("a", 1)
    assert not streams.too_many("f", 50)  # share 50 of 2
    assert streams.too_many("f", 1)  # its 51: past it
    exact = FairShare(100)
    assert not exact.too_many("a", 60) and not exact.too_many("b", 30)
    assert not exact.too_many("a", 10)  # 100 in all, the bound exactly: a's 70, past its share, not reset yet
    assert exact.too_many("a", 1)


def test_each_reset_is_counted_under_its_own_reason_and_relays_none_of_the_bytes_that_caused_it():
    """GrpcConnectionsReset_total{Reason=...} is the operator's one view of which bound resets connections: each
    refusal reaches the metric's hook once, under its own reason, and the bytes that made it (a stream too many, an
    HPACK bomb's header block, a frame too many) never reach grpc (the bomb's fields would be expanded there). An
    address past its share of --max_streams is reset as it opens another stream, not for a frame of a call under way
    (the README's contract); its next stream resets it. A trusted proxy's streams count in no bound."""
    call = frame(HEADERS, 4, 1, b"\x82")
    data = frame(DATA, 0, 1, b"\0\0\0\0\0")
    bomb = frame(HEADERS, 4, 3, b"\x82" * (MAX_HEADER_FIELDS + 1))

    async def reset_when(sends: list[tuple[str, bytes]], **bounds) -> tuple[list[str], list[bool], list[bool], bytes]:
        """``sends`` from their sources in turn, each connection opened first: (the reasons reset, whether each send
        but the last was relayed whole, whether each connection ended, the bytes that reached grpc from the last
        send's connection past what was relayed before it)."""
        reasons = []
        async with _relayed(max_open=8, max_client=4, on_refused=reasons.append, **bounds) as (relay, port, accepted):
            connections = {}
            for source, _ in sends:
                if source not in connections:
                    connections[source] = await _open(port, source, accepted)
                    connections[source][0][1].write(PREFACE)
                    assert await asyncio.wait_for(connections[source][1][0].readexactly(len(PREFACE)), 5) == PREFACE
            relayed = []
            for source, sent in sends:
                (_, writer), (up_reader, _) = connections[source]
                writer.write(sent)
                with contextlib.suppress(ConnectionResetError):  # (reset before)
                    await writer.drain()
                if len(relayed) < len(sends) - 1:  # relayed whole before the next is sent
                    try:
                        relayed.append(await asyncio.wait_for(up_reader.readexactly(len(sent)), 5) == sent)
                    except asyncio.IncompleteReadError:  # (reset: its connection to grpc closed)
                        relayed.append(False)
            ended = [await _closed_or_reset(reader, 1) for (reader, _), _ in connections.values()]
            (_, writer), (up_reader, up_writer) = connections[sends[-1][0]]
            writer.close()
            reached = await asyncio.wait_for(up_reader.read(), 5)  # to its end: what the relay wrote after the preface
            for (_, writer), (_, up_writer) in connections.values():
                writer.close()
                up_writer.close()
            return reasons, relayed, ended, reached

    async def scenario():
        streams = [frame(HEADERS, 4, stream, b"\x82") for stream in (1, 3, 5)]
        return {
            # a trusted proxy's 3 (many clients' calls) are not counted; 127.0.0.2's third is one too many
            "streams": await reset_when([("127.0.0.5", b"".join(streams)), ("127.0.0.2", streams[0] + streams[1]),
                                         ("127.0.0.2", streams[2])], streams_per_s=2, trusted=["127.0.0.5"]),
            # a opens 8 alone, b 3 (11 of 10 in all, b within its 5): a's DATA is relayed, its next stream is not
            "all_streams": await reset_when(
                [("127.0.0.2", b"".join(frame(HEADERS, 4, stream, b"\x82") for stream in range(1, 17, 2))),
                 ("127.0.0.3", b"".join(frame(HEADERS, 4, stream, b"\x82") for stream in range(1, 7, 2))),
                 ("127.0.0.2", data), ("127.0.0.2", frame(HEADERS, 4, 17, b"\x82"))], all_streams_per_s=10),
            "frames": await reset_when([("127.0.0.2", data * 3), ("127.0.0.2", data)], frames_per_s=3),
            "headers": await reset_when([("127.0.0.2", call), ("127.0.0.2", bomb)]),  # (bomb: stream 3)
        }

    out = asyncio.run(scenario())
    assert out["streams"] == (["streams"], [True, True], [False, True], b""), out["streams"]
    assert out["all_streams"] == (["all_streams"], [True, True, True], [True, False], b""), out["all_streams"]
    assert out["frames"] == (["frames"], [True], [True], b""), out["frames"]
    reasons, relayed, ended, reached = out["headers"]
    assert (reasons, relayed, ended) == (["headers"], [True], [True]), out["headers"]
    assert len(reached) < len(bomb), reached  # (the part of its frame read before the block's end, at most)
