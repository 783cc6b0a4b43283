"""The predictor's public gRPC port: a TCP relay in the server's event loop in front of KServe's gRPC server, which
listens on 127.0.0.1 only (a free port). Its one job: accept a connection, count it by the REST port's rules
(adapter/protocol.py OpenConnections: --max_open_connections, --max_client_connections per client, trusted proxies
exempt, at the cap a quiet or unread connection of the address most past its fair share giving way (_ClientSide); a
count of its own), reset it at once when refused, else copy its bytes to a connection of its own to grpc
and back, with flow control, each side's close or half-close passed on to the other; and reset it when its client
opens streams faster than --max_client_streams a second (NewStreams: the client's frame heads are read for that).

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
_HEADERS = 0x1

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


class NewStreams:
    """The streams (calls) each client address opens (HTTP/2 HEADERS frames of a new stream), counted over all its
    connections a second at a time: past ``per_s`` in one second, the connection that opened the one too many is
    reset, its bytes not relayed. One connection opening ModelInfer calls and resetting each at once ("rapid reset",
    10,000 a second), or ending each at once with an empty message (51,000 a second), had every other client's calls
    answered CANCELLED; grpc core pushes back on neither. Counting resets alone missed the second, and reset an honest
    client whose calls ran out a 50 ms deadline (225 a second). The default is about twice the one-image calls this
    server answers a second on 2 cores."""

    def __init__(self, per_s: int):
        self.per_s = per_s
        self._counts: dict[str, tuple[float, int]] = {}  # client key -> (its second's start, streams opened in it)

    def too_many(self, key: str, streams: int) -> bool:
        now = time.monotonic()
        start, count = self._counts.get(key, (now, 0))
        if now - start >= 1.0:
            start, count = now, 0
            if len(self._counts) > 4096:  # (seconds past: forgotten)
                self._counts = {k: v for k, v in self._counts.items() if now - v[0] < 1.0}
        self._counts[key] = (start, count + streams)
        return count + streams > self.per_s


class _ClientSide(_Side):
    """A client's connection to the public port: counted, then relayed."""

    # OpenConnections._make_room's hooks, so that at the cap a newcomer under its fair share takes the place of a
    # connection of the address most past it: four addresses' 128 preface-only connections each had held all 512
    # until grpc's idle close, and again at each reconnect. The relay does not follow calls inside HTTP/2 (it would
    # have to parse every frame both ways; it counts only the streams a client opens): a connection with no bytes
    # either way for --min_rate_grace_s is taken as idle
    # (between calls; an answer that long in coming is lost with it), one whose client has left grpc's bytes unread
    # that long (its writing paused) as unread. Marked idle by a check every half grace (not on every read), so that
    # a refusal at the cap walks only the connections quiet at their last check, not every busy one.

    def __init__(self, relay: "GrpcRelay"):
        self.relay, self.key, self.host, self.connecting = relay, None, None, None
        self.read_at = time.monotonic()
        # Where its bytes are in HTTP/2's framing (_new_streams): the preface left, the frame payload left to pass
        # over, a frame head split between two reads, and the highest stream opened.
        self._preface_left, self._payload_left, self._head, self._last_stream = _PREFACE, 0, b"", 0
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
        if self.key and self._new_streams(data):  # (a trusted proxy's connections carry many clients' calls)
            self.relay.streams_refused(self.host)
            self.reset()
            return
        super().data_received(data)

    def _new_streams(self, data: bytes) -> bool:
        """Whether the streams ``data`` opens put its client past --max_client_streams this second: frame heads read,
        payloads passed over by their length."""
        at, end, opened = 0, len(data), 0
        if self._preface_left:
            at = min(self._preface_left, end)
            self._preface_left -= at
        while at < end:
            if self._payload_left:
                step = min(self._payload_left, end - at)
                self._payload_left -= step
                at += step
                continue
            head = self._head + data[at:at + _FRAME_HEAD - len(self._head)]
            at += len(head) - len(self._head)
            if len(head) < _FRAME_HEAD:
                self._head = head
                break
            self._head = b""
            self._payload_left = int.from_bytes(head[:3], "big")
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            if head[3] == _HEADERS and stream > self._last_stream:  # (not a stream's trailers: a new one)
                self._last_stream = stream
                opened += 1
        return bool(opened) and self.relay.new_streams.too_many(self.key, opened)

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

    def __init__(self, connections: OpenConnections, new_streams: NewStreams, on_streams_refused=lambda: None):
        self.connections = connections
        self.connections.refusals = ThrottledLog(logger)  # its resets logged as the gRPC port's
        self.failures = ThrottledLog(logger)
        self.new_streams, self._on_streams_refused = new_streams, on_streams_refused
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

    def streams_refused(self, host: str | None) -> None:
        self._on_streams_refused()
        self.failures.warning("reset a gRPC connection from %s: its client opened more than %d streams in a second "
                              "(--max_client_streams)", host, self.new_streams.per_s)

    def peer_host(self, peer: str) -> str:
        """The host of a call's ``context.peer()``: for the relay's connection to grpc, its client's."""
        if peer.startswith(_INTERNAL_PEER):
            try:
                return self.clients.get(int(peer[len(_INTERNAL_PEER):]), INTERNAL_HOST)
            except ValueError:
                pass
        return grpc_peer_host(peer)
