"""The predictor's public gRPC port: a TCP relay in the server's event loop in front of KServe's gRPC server, which
listens on 127.0.0.1 only (a free port). Its one job: accept a connection, count it by the REST port's rules
(adapter/protocol.py OpenConnections: --max_open_connections, --max_client_connections per client, trusted proxies
exempt, at the cap a quiet or unread connection of the address most past its fair share giving way (_ClientSide); a
count of its own), reset it at once when refused, else copy its bytes to a connection of its own to grpc
and back, with flow control, each side's close or half-close passed on to the other; and reset it when its client
opens streams faster than --max_client_streams a second, or past its fair share while all clients together open
more than --max_streams a second (FairShare), sends frames faster than --max_client_frames a second (PerSecond), or a
header block of more than MAX_HEADER_FIELDS fields or MAX_HEADER_BLOCK_BYTES bytes (hpack_fields): the client's frame
heads are read for that, and its header blocks' representations, no string decoded.

grpc core counts connections only in all (grpc.max_allowed_incoming_connections) and grpcio has no hook at accept:
one address that opened 512 connections and sent the HTTP/2 preface held every gRPC connection until grpc's idle
close (--header_timeout_s), and again at each reconnect, every other client's call failing meanwhile.

A call's ``context.peer()`` is now the relay's connection to grpc ("ipv4:127.0.0.1:PORT"): ``peer_host`` maps it back
to the client's address (a table from that connection's local port, kept while it is open), for the per-client
shares of handler/held_bodies.py, trusted proxies' X-Forwarded-For included."""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time

from adapter.protocol import OpenConnections, reset_connection
from serving.clients import grpc_peer_host, unmapped_host
from serving.throttled_log import ThrottledLog

logger = logging.getLogger("handler.grpc_relay")

_PREFACE = len(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")  # what a client sends before its first frame
_FRAME_HEAD = 9  # an HTTP/2 frame's length (3 bytes), type, flags and stream
_HEADERS, _CONTINUATION = 0x1, 0x9
_END_HEADERS, _PADDED, _PRIORITY = 0x4, 0x8, 0x20  # HEADERS' flags (CONTINUATION's: END_HEADERS)

# A call's header block: at most this many fields, a field naming an entry of the connection's HPACK table that the
# block already named counting REPEAT_WEIGHT (hpack_fields). One byte may name a 4 KB entry: 8,000 such in an 8 KB
# block, a call that never sent its message, took the predictor from 0.8 to 3.4-4.3 GB in 8 s (grpc core expands them,
# and dispatched calls of 90 such), every gRPC call failing (session 59); a grpc client names each of its headers
# once (~10 and its metadata: 95 entries were reset by a plain count of 100; grpc refuses past 16 KiB, ~500 fields).
MAX_HEADER_FIELDS = 512
REPEAT_WEIGHT = 32  # (a table entry's 4 KB at most over 128 bytes: 16 repeats at most)
# ... and of at most this many bytes as sent, its CONTINUATION frames included: a block that never ended was read
# for as long as its client sent (2.4 GB in 8 s). grpc refuses more than 16 KiB of headers as decoded.
MAX_HEADER_BLOCK_BYTES = 64 * 1024
_STATIC_ENTRIES = 61  # HPACK's static table (RFC 7541 A): an index past it names the connection's own table
# why a connection is reset (_ClientSide._refusal): a metric's labels
RESET_REASONS = ("streams", "all_streams", "frames", "headers")

INTERNAL_HOST = "127.0.0.1"  # where grpc listens (a free port), reached from the relay only
_INTERNAL_PEER = f"ipv4:{INTERNAL_HOST}:"  # grpc's peer string for the relay's connections, less the port


def _client_host(peername) -> str | None:
    """A peer address's host as grpc_peer_host wrote grpc's peer: an IPv4-mapped IPv6 address as IPv4."""
    return unmapped_host(peername[0]) if isinstance(peername, tuple) else None


class _Side(asyncio.Protocol):
    """One of a relayed pair of connections: what it reads is written to the other; while the other's writing is
    paused (its reader slow), this one's reading is paused."""

    transport: asyncio.Transport | None = None
    other: "_Side | None" = None
    lost = False
    read_at = 0.0  # time.monotonic() of its last bytes read (_ClientSide.idle)

    def data_received(self, data: bytes) -> None:
        self.read_at = time.monotonic()
        other = self.other
        if other is not None and other.transport is not None and not other.transport.is_closing():
            other.transport.write(data)

    def pause_writing(self) -> None:  # its write buffer is full: stop reading what fills it
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def eof_received(self) -> bool:
        """Its peer half-closed (FIN): the other is half-closed too, after what it still has to write, and this
        one kept open for the other's bytes: grpc, its client's FIN passed on, closes the connection (then the
        client's is closed), and grpc's FIN closes both (_GrpcSide)."""
        other = self.other
        if other is None or other.transport is None or other.transport.is_closing():
            return False
        if other.transport.can_write_eof():
            other.transport.write_eof()
        return True

    def close(self) -> None:
        """Closed once its buffered bytes are written."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self.other is not None:
            self.other.close()  # (after what it still has to write to its peer)


class _GrpcSide(_Side):
    def __init__(self, relay: "GrpcRelay", client: "_ClientSide"):
        self.relay, self.other, self.port = relay, client, None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.other.other = self
        self.port = transport.get_extra_info("sockname")[1]
        self.relay.clients[self.port] = self.other.host or INTERNAL_HOST  # before any client's bytes reach grpc

    def eof_received(self) -> bool:
        # grpc never half-closes a connection it goes on with (HTTP/2 ends it with GOAWAY): once its FIN comes, it
        # reads no more either; a half-open pair would be read by nobody, and its client counted for ever.
        self.other.close()
        return False  # closed

    def connection_lost(self, exc) -> None:
        if self.port is not None:  # (its port still taken: its socket is closed after this)
            self.relay.clients.pop(self.port, None)
        super().connection_lost(exc)


class PerSecond:
    """What each client address does over all its connections (streams opened, frames sent), counted a second at a
    time: past ``per_s`` in one second, the connection that did one too many is reset, its bytes not relayed.

    Streams (--max_client_streams): one connection opening ModelInfer calls and resetting each at once ("rapid
    reset", 10,000 a second), or ending each at once with an empty message (51,000 a second), had every other
    client's calls answered CANCELLED; grpc core pushes back on neither. Counting resets alone missed the second, and
    reset an honest client whose calls ran out a 50 ms deadline (225 a second). Frames (--max_client_frames): 4
    connections sending 9-byte frames of an unknown type, WINDOW_UPDATE or PRIORITY, 1 million a second, held the
    event loop in this relay's reading of their heads, every REST and gRPC answer taking 1-9 s."""

    def __init__(self, per_s: int):
        self.per_s = per_s
        self._counts: dict[str, tuple[float, int]] = {}  # client key -> (its second's start, its count in it)

    def too_many(self, key: str, count: int) -> bool:
        now = time.monotonic()
        start, counted = self._counts.get(key, (now, 0))
        if now - start >= 1.0:
            start, counted = now, 0
            if len(self._counts) > 4096:  # (seconds past: forgotten)
                self._counts = {k: v for k, v in self._counts.items() if now - v[0] < 1.0}
        self._counts[key] = (start, counted + count)
        return counted + count > self.per_s


class FairShare:
    """Streams opened by all client addresses together (--max_streams) over the last second: while they are past
    ``per_s``, the connection of an address that has opened more than its fair share of them (``per_s`` over the
    addresses that opened streams in it) is reset; an address within its share never is by this bound.

    4 addresses each opening ~900 calls a second, each under --max_client_streams, took another client's ModelInfer
    calls from ~10 ms to 247-724 ms p50, some CANCELLED (session 59): nothing bounded them together. Counted a second
    at a time, the last second's counts weighing by the part of it still within a second of now: counted from 0 at
    each second's start, 4 such addresses opened 1000 streams in its first 0.3 s, every second (honest p90 ~200 ms)."""

    def __init__(self, per_s: int):
        self.per_s = per_s
        self._start = time.monotonic()
        self._total, self._counts = 0, {}  # this second's streams: in all, per client key
        self._last_total, self._last_counts = 0, {}  # the second's before it

    def too_many(self, key: str, count: int) -> bool:
        now = time.monotonic()
        if now - self._start >= 1.0:
            recent = now - self._start < 2.0
            self._last_total, self._last_counts = (self._total, self._counts) if recent else (0, {})
            self._start, self._total, self._counts = now, 0, {}
        weight = 1.0 - (now - self._start)
        self._total += count
        self._counts[key] = counted = self._counts.get(key, 0) + count
        if self._total + weight * self._last_total <= self.per_s:
            return False
        addresses = len(self._counts.keys() | self._last_counts.keys())
        return counted + weight * self._last_counts.get(key, 0) > self.per_s / addresses


def _hpack_integer(block, at: int, prefix_bits: int) -> tuple[int, int]:
    """An HPACK integer (RFC 7541 5.1) whose prefix is the low ``prefix_bits`` of ``block[at]``: (value, where the
    next representation starts); a value past the block's length for one cut short or absurdly long."""
    most = (1 << prefix_bits) - 1
    value, at = block[at] & most, at + 1
    if value < most:
        return value, at
    for shift in range(0, 28, 7):  # (4 bytes of continuation: past any length a block can hold)
        if at >= len(block):
            break
        byte, at = block[at], at + 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
    return len(block) + 1, len(block) + 1


def hpack_fields(block, most: int) -> int:
    """The header fields (and table size updates) an HPACK header block holds, a field that names a table entry (or
    its name) the block named before counting REPEAT_WEIGHT, counted up to past ``most``: each representation's
    first byte, integers and string lengths read (RFC 7541 6), no string decoded (hpack's Decoder would decode Huffman
    strings in Python, ~1 us a byte). A block cut short counts as read so far (grpc refuses it)."""
    at, fields, named = 0, 0, set()
    while at < len(block) and fields <= most:
        first = block[at]
        if first & 0x80:  # an indexed field
            index, at = _hpack_integer(block, at, 7)
        elif first & 0x20 and not first & 0x40:  # a dynamic table size update
            _, at = _hpack_integer(block, at, 5)
            index = 0
        else:  # a literal field (with incremental indexing, without, never indexed): its name's index, or a name
            index, at = _hpack_integer(block, at, 6 if first & 0x40 else 4)
            for _ in range(1 if index else 2):  # the name (when not indexed), the value
                if at < len(block):
                    length, at = _hpack_integer(block, at, 7)
                    at += length
        fields += REPEAT_WEIGHT if index > _STATIC_ENTRIES and index in named else 1
        named.add(index)
    return fields


class _ClientSide(_Side):
    """A client's connection to the public port: counted, then relayed."""

    # OpenConnections._make_room's hooks, so that at the cap a newcomer under its fair share takes the place of a
    # connection of the address most past it: four addresses' 128 preface-only connections each had held all 512
    # until grpc's idle close, and again at each reconnect. The relay does not follow calls inside HTTP/2 (it would
    # have to parse every frame both ways; it reads only the frames a client sends, and their header blocks, for
    # _refusal's counts): a connection with no bytes
    # either way for --min_rate_grace_s is taken as idle
    # (between calls; an answer that long in coming is lost with it), one whose client has left grpc's bytes unread
    # that long (its writing paused) as unread. Marked idle by a check every half grace (not on every read), so that
    # a refusal at the cap walks only the connections quiet at their last check, not every busy one.

    def __init__(self, relay: "GrpcRelay"):
        self.relay, self.key, self.host, self.connecting = relay, None, None, None
        self.read_at = time.monotonic()
        # Where its bytes are in HTTP/2's framing (_refusal): the preface left, the frame payload left to pass over,
        # a frame head split between two reads, and the highest stream opened; a header block's frame payload read
        # so far (HEADERS, CONTINUATION), its frame's type and flags, and the block's fragments before it.
        self._preface_left, self._payload_left, self._head, self._last_stream = _PREFACE, 0, b"", 0
        self._fragment: bytearray | None = None
        self._fragment_of = (0, 0)
        self._block = bytearray()
        self.unread_since: float | None = None
        self.marked_idle = False
        self.idle_check: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> bool:
        other = self.other
        return (other is not None and self.unread_since is None and time.monotonic() - max(self.read_at, other.read_at)
                >= self.relay.connections.unread_grace_s)

    @property
    def unread_s(self) -> float:
        return 0.0 if self.unread_since is None else time.monotonic() - self.unread_since

    def timeout_keep_alive_handler(self) -> None:  # (an idle one: nothing left to write)
        self.close()

    def _check_idle_later(self) -> None:
        self.idle_check = asyncio.get_running_loop().call_later(self.relay.connections.unread_grace_s / 2,
                                                                self._check_idle)

    def _check_idle(self) -> None:
        idle = self.idle
        if idle != self.marked_idle:
            self.marked_idle = idle
            self.relay.connections.set_idle(self.key, self, idle)
        self._check_idle_later()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.unread_since = time.monotonic()
        self.relay.connections.set_unread(self.key, self, True)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.unread_since = None
        self.relay.connections.set_unread(self.key, self, False)

    def reset(self) -> None:
        if self.transport is not None:
            reset_connection(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.key and (reason := self._refusal(data)):  # (a trusted proxy's connections carry many clients' calls)
            self.relay.refused(self.host, reason)
            self.reset()
            return
        super().data_received(data)

    def _refusal(self, data: bytes) -> str | None:
        """Why ``data`` gets its connection reset: its client past --max_client_streams, past its share of
        --max_streams or past --max_client_frames this second ("streams", "all_streams", "frames"), or a header
        block past MAX_HEADER_FIELDS or MAX_HEADER_BLOCK_BYTES ("headers"); None: relayed. Frame heads read,
        payloads passed over by their length but header blocks'."""
        at, end, opened, frames = 0, len(data), 0, 0
        if self._preface_left:
            at = min(self._preface_left, end)
            self._preface_left -= at
        while at < end:
            if self._payload_left:
                step = min(self._payload_left, end - at)
                if self._fragment is not None:
                    self._fragment += data[at:at + step]
                self._payload_left -= step
                at += step
                if not self._payload_left and self._fragment is not None and not self._header_fragment_read():
                    return "headers"
                continue
            head = self._head + data[at:at + _FRAME_HEAD - len(self._head)]
            at += len(head) - len(self._head)
            if len(head) < _FRAME_HEAD:
                self._head = head
                break
            self._head = b""
            frames += 1
            self._payload_left = int.from_bytes(head[:3], "big")
            kind, stream = head[3], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            if kind == _HEADERS and stream > self._last_stream:  # (not a stream's trailers: a new one)
                self._last_stream = stream
                opened += 1
            if kind in (_HEADERS, _CONTINUATION):
                if len(self._block) + self._payload_left > MAX_HEADER_BLOCK_BYTES:
                    return "headers"
                self._fragment, self._fragment_of = bytearray(), (kind, head[4])
                if not self._payload_left and not self._header_fragment_read():
                    return "headers"
        if opened and self.relay.new_streams.too_many(self.key, opened):
            return "streams"
        if opened and self.relay.all_streams.too_many(self.key, opened):
            return "all_streams"
        if frames and self.relay.frames.too_many(self.key, frames):
            return "frames"
        return None

    def _header_fragment_read(self) -> bool:
        """A HEADERS or CONTINUATION frame's payload read whole: its fragment added to the header block (a HEADERS
        begins one: its padding and priority left out); at the block's end, whether it holds at most
        MAX_HEADER_FIELDS fields."""
        fragment, (kind, flags) = self._fragment, self._fragment_of
        self._fragment = None
        if kind == _HEADERS:
            start = (1 if flags & _PADDED else 0) + (5 if flags & _PRIORITY else 0)
            padding = fragment[0] if flags & _PADDED and fragment else 0
            self._block = fragment[start:len(fragment) - padding]
        else:
            self._block += fragment
        if not flags & _END_HEADERS:
            return True
        block, self._block = self._block, bytearray()
        return hpack_fields(block, MAX_HEADER_FIELDS) <= MAX_HEADER_FIELDS

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.host = _client_host(transport.get_extra_info("peername"))
        self.key = self.relay.connections.try_open(self.host, self)
        if self.key is None:
            reset_connection(transport)
            return
        self.relay.open.add(self)
        if self.key:  # (a trusted proxy's never gives way)
            self._check_idle_later()
        transport.pause_reading()  # until its connection to grpc is made
        self.connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: _GrpcSide(self.relay, self), INTERNAL_HOST, self.relay.internal_port)
        except OSError as err:  # grpc stopped, or out of descriptors
            self.relay.failures.warning("could not relay a connection from %s to grpc: %s", self.host, err)
            self.reset()
            return
        finally:
            self.connecting = None
        if self.lost:
            self.other.close()
        else:
            self.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        if self.key is None:
            return
        self.relay.connections.closed(self.key, self)
        self.relay.open.discard(self)
        if self.connecting is not None:
            self.connecting.cancel()
        if self.idle_check is not None:
            self.idle_check.cancel()
        super().connection_lost(exc)


def _dual_stack(port: int) -> socket.socket:
    """A socket bound to ``port`` on every interface: IPv6 taking IPv4 too (as grpc's "[::]"), else IPv4 only
    where this host has no IPv6."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        sock = None
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", port))
            return sock
        except OSError as err:
            sock.close()
            if err.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
    except OSError:
        sock.close()
        raise
    return sock


class GrpcRelay:
    """The public gRPC port in front of grpc's internal one (``internal_port``, set once grpc listens): ``start``
    listens on ``host``:``port``, ``stop_listening`` and ``close`` end it; ``peer_host`` reads a call's client."""

    def __init__(self, connections: OpenConnections, new_streams: PerSecond, frames: PerSecond,
                 all_streams: FairShare, on_refused=lambda reason: None):
        self.connections = connections
        self.connections.refusals = ThrottledLog(logger)  # its resets logged as the gRPC port's
        self.failures = ThrottledLog(logger)
        self.resets = {reason: ThrottledLog(logger) for reason in RESET_REASONS}  # (each kind's count its own)
        self.new_streams, self.frames, self.all_streams = new_streams, frames, all_streams
        self._on_refused = on_refused
        self.clients: dict[int, str] = {}  # the local port of a connection to grpc -> its client's host
        self.open: set[_ClientSide] = set()
        self.internal_port: int | None = None
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        if host in ("0.0.0.0", "::"):  # all interfaces, IPv4 too, on one port (port 0 too), as grpc's "[::]"
            server = await loop.create_server(lambda: _ClientSide(self), sock=_dual_stack(port),
                                              backlog=socket.SOMAXCONN)
        else:
            server = await loop.create_server(lambda: _ClientSide(self), host, port, backlog=socket.SOMAXCONN)
        self.servers.append(server)

    def stop_listening(self) -> None:
        for server in self.servers:
            server.close()

    def close(self) -> None:
        """No more connections, and those still open reset (grpc has stopped)."""
        self.stop_listening()
        for connection in list(self.open):
            connection.reset()

    def refused(self, host: str | None, reason: str) -> None:
        """A connection of ``host`` reset for ``reason`` (_ClientSide._refusal's)."""
        self._on_refused(reason)
        why = {"streams": f"its client opened more than {self.new_streams.per_s} streams in a second "
                          "(--max_client_streams)",
               "all_streams": f"its client opened more than its fair share of the {self.all_streams.per_s} "
                              "streams all clients may open in a second (--max_streams)",
               "frames": f"its client sent more than {self.frames.per_s} frames in a second (--max_client_frames)",
               "headers": f"a header block of more than {MAX_HEADER_FIELDS} fields (a repeated one counting "
                          f"{REPEAT_WEIGHT}) or {MAX_HEADER_BLOCK_BYTES} bytes"}
        self.resets[reason].warning("reset a gRPC connection from %s: %s", host, why[reason])

    def peer_host(self, peer: str) -> str:
        """The host of a call's ``context.peer()``: for the relay's connection to grpc, its client's."""
        if peer.startswith(_INTERNAL_PEER):
            try:
                return self.clients.get(int(peer[len(_INTERNAL_PEER):]), INTERNAL_HOST)
            except ValueError:
                pass
        return grpc_peer_host(peer)
