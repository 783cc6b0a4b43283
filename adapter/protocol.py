"""uvicorn's HTTP/1.1 protocol (httptools) with the limits a user-facing server needs, answered in JSON.

The adapter is the process that faces users (TorchServe listens on loopback only), so the limits on
what a connection may do before the app sees a request live here, at the HTTP parser:
  * at most MAX_OPEN_CONNECTIONS connections are open at once, and MAX_CLIENT_CONNECTIONS from one
    address (proxies in TRUSTED_PROXIES exempt): one more is reset at once, before anything is read
    or buffered, so that crawling sockets cannot exhaust file descriptors while the admitted
    connections are served (uvicorn's limit_concurrency answers 503 only once a head has arrived,
    holding every socket meanwhile; its backlog only bounds connections not yet accepted);
  * a fresh connection that sends nothing is closed at HEADER_TIMEOUT_S, as a head that trickles is
    (or at KEEPALIVE_TIMEOUT_S, if shorter: never kept longer than an idle keep-alive one; uvicorn arms
    no timer before a first response): kept for the keep-alive time (65 s on KServe's predictor), a few
    addresses' silent sockets held MAX_OPEN_CONNECTIONS that long and every other client was reset. A
    connection idle between requests keeps KEEPALIVE_TIMEOUT_S. Bytes that begin no request (blank
    lines) do not reset either timer, only a request's first byte does;
  * a request's line + headers must arrive within HEADER_TIMEOUT_S, and after MIN_RATE_GRACE_S at
    MIN_UPLOAD_RATE on average (a trickled or stalled head: 408, closed);
  * the URL may hold at most MAX_HEADER_BYTES (414), line + headers together too, in at most
    MAX_HEADER_COUNT headers (431): httptools itself has no limit. httptools hands over a header only
    when the next one starts, so the raw bytes of a head still arriving are counted too: past
    MAX_HEADER_BYTES (+ HEAD_SLACK_BYTES), 431 at once, however long its unfinished line. Past the
    head, a chunked body's bytes that are not body (chunk-size lines, extensions, trailers) are held to
    the same limit between two pieces of body (counted per gap, wherever the socket reads split them):
    a trailer line that never ended cost the event loop quadratic CPU (httptools appends to its value)
    and froze every client's answers; and chunks must hold MIN_AVERAGE_CHUNK bytes on average (a parser
    callback each: 10 MB in 8-byte chunks cost ~1.2 s CPU, in 64-byte ones 0.23 s); those 431s are sent
    with a lingering close, as below;
  * a client that half-closes after its request (shutdown(SHUT_WR), `nc -N`) still gets its answer;
    the connection closes after it;
  * no protocol switch: a WebSocket upgrade, CONNECT, or an `Upgrade` on a request with a body is
    answered 501 (this server has no WebSocket routes); another `Upgrade` (curl --http2's h2c) on a
    request without a body is ignored, as HTTP allows, and the request answered in HTTP/1.1;
  * a body that cannot be read as it is sent is refused with its head (its body drained by a lingering close):
    a Transfer-Encoding other than chunked 501, a Content-Encoding other than identity 415 (nothing here
    decompresses), an HTTP/1.0 POST, PUT or PATCH without a Content-Length 411;
  * an answer the client does not read (its send buffer full, writing paused) may wait at most
    SEND_TIMEOUT_S for it to drain; then the connection is reset (a client pipelining requests and
    reading nothing would otherwise hold it, and megabytes of buffers, for ever);
  * what the parser refuses (`Content-Length: abc`, bad chunk sizes, ...) is answered as a 400 in the
    adapter's `{"error": ...}` JSON instead of uvicorn's text/plain;
  * a response sent before the request's body was read (413, 503 busy, 408) is followed by a
    lingering close: the adapter sends FIN and reads (and drops) what the client is still sending
    until that body ends, for at most BODY_TIMEOUT_S (and LINGER_MAX_S), or at once when it arrives
    slower than MIN_UPLOAD_RATE (checked every LINGER_CHECK_S: a crawler needs no time to finish), before closing. Closing at once, with unread bytes in the socket, makes the
    kernel send a reset that can destroy the answer before the client reads it (benchmarks/RESULTS.md,
    "Hostile and heavy clients").
The body's own deadline and the in-flight caps are the app's (adapter/limits.py), where the request
is known.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import socket
import struct
from collections import deque

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serving.client_text import clipped
from serving.clients import client_key, fair_share, removed
from serving.pace import paced_deadline
from serving.throttled_log import ThrottledLog

from .config import Settings
from .edge import edge_record

log = logging.getLogger("adapter.protocol")

# The longest a refused body may go on arriving (into the void) after its answer: enough for 64
# clients pushing 10 MB each through a loaded 2-core machine (2 s was not), short for a trickler.
LINGER_MAX_S = 10.0
# How often a lingering connection's drain rate is checked against MIN_UPLOAD_RATE.
LINGER_CHECK_S = 1.0
# A head's raw bytes may pass MAX_HEADER_BYTES by this much before the 431 (what the header count
# leaves out: the method, the version, line ends, spaces around values).
HEAD_SLACK_BYTES = 1024
# A chunked body's chunks must hold this many bytes on average (a client's chunks are its writes: 8 KB and more as
# clients read files), beyond the first CHUNK_ALLOWANCE.
MIN_AVERAGE_CHUNK = 48
CHUNK_ALLOWANCE = 64
# The 431 for a chunked body's framing (chunk lines, extensions, trailers) past the limit.
_FRAMING_REFUSAL = "The request's chunk lines or trailers are too large"
# Characters of an unsupported Transfer- or Content-Encoding that its refusal shows (the header is the client's).
CODINGS_SHOWN = 40
# SO_LINGER on, 0 s: close() resets the connection and frees it at once (no FIN_WAIT / TIME_WAIT).
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: close() while the request body is still
    arriving half-closes instead (FIN after the answer); the protocol closes for real when the body
    has ended, or after BODY_TIMEOUT_S / LINGER_MAX_S. Dropped bytes are not kept: no memory is held for them."""

    def __init__(self, transport, protocol: "GuardedHttpToolsProtocol"):
        self._transport = transport
        self._protocol = protocol
        self._lingering = False
        self._drained = 0  # bytes dropped while lingering, since the last rate check
        self._deadline = self._rate_check = None  # the lingering close's timers

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        # Nothing may follow the FIN; and an answer to a client that is gone (a pipelined request's,
        # whose cycle uvicorn never marks disconnected) is dropped: uvloop raises on a closed transport.
        if not self._lingering and not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        cycle = self._protocol.cycle
        body_unread = (cycle is not None and cycle.more_body and not cycle.disconnected) or getattr(
            self._protocol, "_body_refused", False)  # refused with its head (_refuse_codings): its body never read
        if self._lingering or not body_unread or not self._transport.can_write_eof() \
                or self._transport.is_closing():
            self._transport.close()
            return
        self._lingering = True
        self._transport.write_eof()
        settings = self._protocol.settings
        linger_s = min(settings.body_timeout_s, LINGER_MAX_S)
        loop = self._protocol.loop
        self._deadline = loop.call_later(linger_s, self._transport.close)
        self._rate_check = loop.call_later(LINGER_CHECK_S, self._check_drain_rate)

    def _check_drain_rate(self) -> None:
        if self._transport.is_closing():
            return
        if self._drained < self._protocol.settings.min_upload_rate * LINGER_CHECK_S:
            self._transport.close()  # a crawler: nothing to wait for
            return
        self._drained = 0
        self._rate_check = self._protocol.loop.call_later(LINGER_CHECK_S, self._check_drain_rate)

    def cancel_timers(self) -> None:
        """The connection is gone: a pending timer would keep it (protocol, transport, request) in memory
        until it fires, up to LINGER_MAX_S later (benchmarks/RESULTS.md, "Session 35")."""
        for timer in (self._deadline, self._rate_check):
            if timer is not None:
                timer.cancel()
        self._deadline = self._rate_check = None


class _HeadRefused(Exception):
    """Raised from a parser callback: httptools stops parsing and data_received answers it."""


def json_error_bytes(status: int, message: str, default_headers=()) -> bytes:
    """A whole HTTP response: {"error": message}, JSON, and the connection closed after it."""
    body = json.dumps({"error": message}).encode()
    content = [STATUS_LINE[status]]
    for name, value in default_headers:
        content.extend([name, b": ", value, b"\r\n"])
    content.extend([b"content-type: application/json\r\n",
                    b"content-length: " + str(len(body)).encode() + b"\r\n",
                    b"connection: close\r\n", b"\r\n", body])
    return b"".join(content)


class OpenConnections:
    """Client connections open now, in all and per peer address (one instance per server). When all
    ``max_open`` are taken, a new connection of a client under its fair share of them (an equal part among the
    clients connected, at most ``max_per_client``) takes the place of an idle one (between requests, or that has
    sent nothing yet) of the client holding the most, past that share: four addresses' silent or idle connections
    at 128 each filled the predictor's 512 and every other client was reset. Else of one whose answers have waited
    unread for ``min_rate_grace_s`` (its writing paused; reset): eight addresses' 64 connections each pipelining
    requests and reading nothing held the 512 until SEND_TIMEOUT_S (30 s), and took them again."""

    def __init__(self, settings: Settings, on_reset=None):
        self.on_reset = on_reset  # called with the cap's setting (max_open_connections, ...) per reset
        self.max_open = settings.max_open_connections
        self.max_per_client = settings.max_client_connections
        self.trusted = [ipaddress.ip_network(network) for network in settings.trusted_networks()]
        self.total = 0
        self.proxied = 0  # of those, trusted proxies' (no client's share)
        self.per_client: dict[str, dict] = {}  # client -> its connections (protocols), oldest first
        # client -> its connections between requests (their keep-alive timer set), oldest first: what _make_room
        # looks at, so that a refusal at the cap costs no walk over every connection
        self.idle: dict[str, dict] = {}
        # client -> its connections whose answers wait unread (writing paused), oldest first; reset for a newcomer
        # once they have waited unread_grace_s
        self.unread: dict[str, dict] = {}
        self.unread_grace_s = settings.min_rate_grace_s
        self.refusals = ThrottledLog(log)

    def _is_trusted_proxy(self, host: str) -> bool:
        if not self.trusted:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)

    def try_open(self, host: str | None, connection) -> str | None:
        """The key ``connection`` is counted under ("" for a trusted proxy), or None: refuse it."""
        key = "" if host is None or self._is_trusted_proxy(host) else client_key(host)
        if self.total >= self.max_open and not self._make_room(key):
            self.refusals.warning("reset a connection from %s: %d connections open (MAX_OPEN_CONNECTIONS)",
                                  host, self.total)
            return self._reset("max_open_connections")
        if key:
            connections = self.per_client.setdefault(key, {})
            if len(connections) >= self.max_per_client:
                self.refusals.warning("reset a connection from %s: it has %d open (MAX_CLIENT_CONNECTIONS)",
                                      host, len(connections))
                return self._reset("max_client_connections")
            connections[connection] = None
        else:
            self.proxied += 1
        self.total += 1
        return key

    def _make_room(self, key: str) -> bool:
        """Closes an idle connection of the client holding the most past its fair share (of the places trusted
        proxies leave), for a new one of ``key`` (a client under it; a trusted proxy's are neither counted so nor
        closed), else resets one of its connections whose answers have waited unread for ``unread_grace_s``: True
        if one was. At the cap every new connection asks: the common refusals return early."""
        if not key:
            return False
        places = self.max_open - self.proxied
        share = fair_share(places, len(self.per_client) + (key not in self.per_client), self.max_per_client)
        if len(self.per_client.get(key, ())) >= share:
            return False
        for crowding in sorted((client for client in dict.fromkeys([*self.idle, *self.unread])
                                if len(self.per_client[client]) > share),
                               key=lambda client: -len(self.per_client[client])):
            idle = next((connection for connection in self.idle.get(crowding, ()) if connection.idle), None)
            if idle is not None:
                self.refusals.warning("closed an idle connection of %s (%d open, past its fair share of %d) for a "
                                      "new one of %s (MAX_OPEN_CONNECTIONS)", crowding,
                                      len(self.per_client[crowding]), share, key)
                self.closed(crowding, idle)
                idle.timeout_keep_alive_handler()  # as its keep-alive time would (uvicorn's)
                return True
            unread = next((connection for connection in self.unread.get(crowding, ())
                           if connection.unread_s >= self.unread_grace_s), None)
            if unread is not None:
                self.refusals.warning("reset a connection of %s that read none of its answers for %.1f s (%d open, "
                                      "past its fair share of %d) for a new one of %s (MAX_OPEN_CONNECTIONS)", crowding,
                                      unread.unread_s, len(self.per_client[crowding]), share, key)
                self.closed(crowding, unread)
                unread.reset()
                return True
        return False

    def _reset(self, cap: str) -> None:
        if self.on_reset is not None:
            self.on_reset(cap)

    def set_idle(self, key: str, connection, idle: bool) -> None:
        """``connection`` of ``key`` is between requests (True) or in one; a trusted proxy's are not kept."""
        self._mark(self.idle, key, connection, idle)

    def set_unread(self, key: str, connection, unread: bool) -> None:
        """``connection`` of ``key`` has answers its client is not reading (True: its writing paused) or not."""
        self._mark(self.unread, key, connection, unread)

    def _mark(self, marked: dict[str, dict], key: str, connection, on: bool) -> None:
        if not key or connection not in self.per_client.get(key, ()):
            return
        if on:
            marked.setdefault(key, {})[connection] = None
        else:
            removed(marked, key, connection)

    def closed(self, key: str, connection) -> None:
        """``connection`` (counted under ``key``) is closed; again: nothing."""
        removed(self.idle, key, connection)
        removed(self.unread, key, connection)
        connections = self.per_client.get(key)
        if key and (connections is None or connections.pop(connection, False) is False):
            return
        self.total -= 1
        if not key:
            self.proxied -= 1
        elif not connections:
            del self.per_client[key]


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    settings: Settings = Settings()  # replaced by protocol_class()
    open_connections: OpenConnections = OpenConnections(Settings())  # one per protocol_class()
    # adapter/edge.py refused_before_app(status, headers, scope, peer=): counts and logs a refusal; returns the extra
    # headers of its answer (X-Request-ID)
    on_refusal = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self._connection_key = self.open_connections.try_open(peer[0] if isinstance(peer, tuple) else None, self)
        if self._connection_key is None:
            reset_connection(transport)
            return
        super().connection_made(transport)
        self.transport = _LingeringTransport(transport, self)  # type: ignore[assignment]
        self._head_timer = None
        self._head_received = 0
        self._in_head = False  # a request's line + headers are arriving
        self._in_message = False  # a request is arriving (its head or its body)
        self._head_done = False  # ... and the app has it
        self._messages_begun = 0
        self._head_raw = 0  # raw bytes of the head in progress (those httptools still holds included)
        self._framing_raw = 0  # raw bytes past the head that were not body, since the last piece of body
        self._chunks = self._body_total = 0  # a chunked body's chunks begun, and the body's bytes, in this message
        self._parser_failed = False  # the parser refused the stream: what still arrives is not parsed
        # Where the parser is in the bytes being fed (for the framing between two pieces of body): the buffer, the
        # end of its last piece of body (as found in it), and whether the framing before the next piece is all
        # counted (False while a head may be in it: a message began in this feed and no body followed yet).
        self._feed_buf = b""
        self._feed_cursor = 0
        self._framing_exact = False
        self._peer_done = False  # the client half-closed: close once its answers are sent
        self._deferred_refusal: bytes | None = None  # sent once the earlier answers are (send_error)
        self._send_timer = None
        self._refusal: tuple[int, str, bool] | None = None  # (status, message, answered with a lingering close)
        # Request cycles whose answers may not have begun (pipelined: several), oldest first; they end in order.
        self._unanswered: deque = deque()
        # A connection that never sends a byte would otherwise stay open for ever; one that has sent nothing is
        # given no longer than a request's head (nor than an idle keep-alive connection).
        self.timeout_keep_alive_task = self.loop.call_later(silent_timeout_s(self.settings, self.timeout_keep_alive),
                                                            self.timeout_keep_alive_handler)

    @property
    def timeout_keep_alive_task(self):
        """uvicorn's keep-alive timer (and the silent connection's): set, the connection is between requests."""
        return self.__dict__.get("_keep_alive_task")

    @timeout_keep_alive_task.setter
    def timeout_keep_alive_task(self, task) -> None:
        self.__dict__["_keep_alive_task"] = task
        if self.__dict__.get("_connection_key") is not None:  # (uvicorn sets it before the connection is made)
            self.open_connections.set_idle(self._connection_key, self, task is not None)

    @property
    def idle(self) -> bool:
        """Between requests, or nothing sent yet (uvicorn's keep-alive timer, or the silent one, runs), with its
        answers all sent: closed, its socket goes at once. Not one lingering after a refusal (its answer could be
        lost in a reset), nor one whose client is not reading (it would stay open, no longer counted)."""
        transport = self.transport
        return (self.timeout_keep_alive_task is not None and not transport.is_closing()
                and not getattr(transport, "_lingering", False) and transport.get_write_buffer_size() == 0)

    def connection_lost(self, exc) -> None:
        if self._connection_key is None:  # refused in connection_made: uvicorn never knew it
            return
        self.open_connections.closed(self._connection_key, self)
        self._connection_key = None
        self._cancel_head_timer()
        self._cancel_send_timer()
        self.transport.cancel_timers()
        for cycle in self._unanswered:  # their answers, if any come, go to nobody (499)
            if not cycle.response_started:
                edge_record(cycle.scope, self.settings.request_id_max_length)["client_gone"] = True
        super().connection_lost(exc)
        # uvicorn stops the keep-alive timer only on a clean close: after a reset it would keep the
        # connection for KEEPALIVE_TIMEOUT_S.
        self._unset_keepalive_if_required()

    def _cancel_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def send_error(self, status: int, message: str, linger: bool = False) -> None:
        """``linger``: the request's body is still arriving and its answer must survive it (a lingering close,
        the parser's verdict notwithstanding); otherwise the connection is closed at once."""
        if getattr(self.transport, "_lingering", False):
            return  # already answered; what follows is dropped
        # No lingering unless asked: the parser stopped, so the body's end cannot be seen.
        transport = self.transport if linger else getattr(self.transport, "_transport", self.transport)
        if transport.is_closing():
            return
        if self._deferred_refusal is not None:
            return  # a refusal is already waiting to be sent; what follows is dropped
        pending = self._earlier_answer_pending()  # (before _refused_request drops a queued request)
        extra = (self.on_refusal(status, *self._refused_request(), peer=self.client[0] if self.client else None)
                 if self.on_refusal else [])
        response = json_error_bytes(status, message, [*self.server_state.default_headers, *extra])
        if pending:
            # A later request was refused while an earlier one on this connection is still being answered:
            # written now, the refusal and its close would destroy that answer. Sent after it instead.
            self._deferred_refusal = response
            transport.pause_reading()
            return
        transport.write(response)
        transport.close()

    def _earlier_answer_pending(self) -> bool:
        """An earlier, complete request on this connection still being answered (or queued behind one)."""
        cycle = self.cycle
        if cycle is None or (cycle.more_body and not self._queued(cycle)):  # none, or the running request's body
            return False
        return not cycle.response_complete or bool(self.pipeline)

    def _queued(self, cycle) -> bool:
        """Whether ``cycle`` waits in uvicorn's pipeline (its app not started: an earlier request is answered)."""
        return any(queued is cycle for queued, _ in self.pipeline)

    def _drop_queued(self, cycle) -> None:
        """A queued request refused at the parser (its body broke): never run; its refusal is sent in its turn."""
        for entry in list(self.pipeline):
            if entry[0] is cycle:
                self.pipeline.remove(entry)
        cycle.response_complete = True  # nothing else will be sent for it: on_response_complete sends the refusal

    def _refused_request(self) -> tuple[list, dict | None]:
        """For on_refusal: the refused request's headers as far as parsed (its X-Request-ID), and its scope when
        the app has it and has not begun an answer (its body broke mid-stream): the edge records it then."""
        if not self._in_message:  # bytes that begin no request: nothing of one is known
            return [], None
        cycle = self.cycle
        if cycle is not None and self._head_done and self._queued(cycle):  # its app never ran: recorded here
            self._drop_queued(cycle)
            return self.headers, None
        in_app = self._head_done and cycle is not None and not cycle.response_started
        return self.headers, cycle.scope if in_app else None

    def send_400_response(self, msg: str) -> None:  # uvicorn's own refusals (text/plain otherwise)
        self.send_error(400, "The request is not valid HTTP.")

    def data_received(self, data: bytes) -> None:
        # The keep-alive timer is not reset here: bytes that begin no request (blank lines) must not
        # keep a connection open; on_message_begin stops it.
        transport = self.transport
        if transport._lingering:
            transport._drained += len(data)
            self._unset_keepalive_if_required()  # the lingering close has deadlines of its own
            if self._parser_failed:
                return  # a refused body still arriving: dropped unparsed
        received = len(data)
        begun, idle = self._messages_begun, not self._in_message
        self._framing_exact = self._in_message and not self._in_head
        rest = data
        try:
            while True:
                self._feed_buf, self._feed_cursor = rest, 0
                try:
                    self.parser.feed_data(rest)
                    break
                except httptools.HttpParserUpgrade as upgrade:
                    # An Upgrade this server ignores (on_headers_complete refused the others): what
                    # follows is the next request, in HTTP/1.1.
                    offset = upgrade.args[0] if upgrade.args else len(rest)
                    rest = rest[offset:]
                    if not rest:
                        break
        except httptools.HttpParserError as err:
            self._cancel_head_timer()
            self._in_head = False
            self._parser_failed = True
            self._feed_buf = b""
            status, message, linger = self._refusal or (400, f"The request is not valid HTTP: {_parser_reason(err)}.",
                                                        False)
            log.warning("refused a request at the HTTP parser (%d): %s", status, message)
            self.send_error(status, message, linger=linger)
            if linger:
                self._in_message = False
            return
        buf, cursor = self._feed_buf, self._feed_cursor
        self._feed_buf = b""  # not held between reads
        if self._in_message and not self._in_head and self._framing_exact:
            # The bytes after the last piece of body (or all of them, none came) are framing: chunk lines, trailers.
            self._count_framing(len(buf) - cursor)
        if not self._in_head:
            return
        if self._head_timer is not None:  # the head is still arriving: count it for its rate
            self._head_received += received
        # Its raw size: the whole chunk when the head began before it, or began it on an idle
        # connection; a head that began behind another request in the chunk counts from the next one.
        if self._messages_begun == begun:
            self._head_raw += received
        elif self._messages_begun == begun + 1 and idle:
            self._head_raw = received
        limit = self.settings.max_header_bytes
        if self._head_raw > limit + HEAD_SLACK_BYTES:
            self._cancel_head_timer()
            self._in_head = False
            message = f"The request headers are too large: the limit is {limit} bytes."
            log.warning("refused a request at the HTTP parser (431): %s (%d bytes and counting)",
                        message, self._head_raw)
            self.send_error(431, message)

    def _count_framing(self, framing: int, in_parser: bool = False) -> None:
        """A chunked body's bytes that are not body, since its last piece of body: past the head's limit, 431.
        ``in_parser``: called from a parser callback, which stops the parser to refuse."""
        self._framing_raw += framing
        limit = self.settings.max_header_bytes
        if self._framing_raw > limit + HEAD_SLACK_BYTES:
            self._refuse_framing(f"{_FRAMING_REFUSAL}: the limit is {limit} bytes between two pieces of body.",
                                 in_parser)

    def _refuse_framing(self, message: str, in_parser: bool) -> None:
        """431 for a chunked body's framing, answered with a lingering close (the body is still arriving)."""
        if self.transport._lingering:  # already answered: what it still sends is not worth parsing
            self._in_message = False
            self.transport._transport.close()
            return
        if in_parser:
            self._refuse(431, message, linger=True)  # data_received answers it
        log.warning("refused a request at the HTTP parser (431): %s", message)
        self._parser_failed = True  # what still arrives is dropped, not parsed
        # While still in its message: the refusal is the request's (route, id).
        self.send_error(431, message, linger=True)
        self._in_message = False

    def eof_received(self) -> bool | None:
        """The client half-closed (sent FIN). Its answers still go out (True keeps the transport open),
        then the connection closes; with no request complete to answer, it closes now."""
        cycle = self.cycle
        answering = cycle is not None and not cycle.response_complete and not cycle.more_body
        if (answering or self.pipeline) and not self.transport._lingering:
            self._peer_done = True
            return True
        return None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.pipeline or not self.cycle.response_complete:
            return  # the next pipelined request is being answered
        transport = getattr(self.transport, "_transport", self.transport)
        if self._deferred_refusal is not None and not transport.is_closing():
            transport.write(self._deferred_refusal)
            transport.close()
        elif self._peer_done and not transport.is_closing():
            self.transport.close()

    # ---- parser callbacks ------------------------------------------------------------------
    def on_chunk_header(self) -> None:
        # A chunk costs the event loop a parser callback (~1 us) whatever its size: 10 MB in 8-byte chunks cost ~1.2 s
        # of CPU, in 64-byte ones 0.23 s, in 64 KB ones 0.05 s. Counted here, not from the bytes around the body.
        self._chunks += 1
        if self._chunks > self._body_total // MIN_AVERAGE_CHUNK + CHUNK_ALLOWANCE:
            self._refuse_framing(f"{_FRAMING_REFUSAL}: chunks must hold {MIN_AVERAGE_CHUNK} bytes on average "
                                 "(use larger chunks).", True)

    def on_body(self, body: bytes) -> None:
        # The framing before this piece of body, since the last one: found by where the piece lies in the bytes fed
        # (its first occurrence past the last piece: framing holding the same bytes is counted at the read's end
        # instead, or not at all in the read that ends the message, one read at most; a trailer that never ends
        # ends no message, and the chunks' count is on_chunk_header's). Per gap, not per read: tiny chunks are tiny
        # framing each, however the kernel batches them.
        buf, cursor = self._feed_buf, self._feed_cursor
        if buf:
            at = buf.find(body, cursor)
            if at < 0:  # cannot be: the piece is a slice of these bytes
                at = cursor
            if self._framing_exact:
                self._count_framing(at - cursor, in_parser=True)
            self._feed_cursor = at + len(body)
        self._framing_exact = True
        self._framing_raw = 0
        self._body_total += len(body)
        super().on_body(body)

    def on_message_begin(self) -> None:
        if len(self.pipeline) >= self.settings.max_pipelined_requests:
            # Each queued request holds its cycle and scope (~2.4 KB) until answered, and an answer lets the next
            # 256 KB in: without a bound one connection's pipelined GETs took the adapter from 71 to 431 MB.
            self._refuse(429, f"Too many pipelined requests: at most {self.settings.max_pipelined_requests} may wait "
                              "behind the one being answered; send the rest after their answers.")
        super().on_message_begin()
        self._unset_keepalive_if_required()  # a request has begun: its head's deadline applies now
        self._in_head = self._in_message = True
        self._head_done = False  # True once the app has the request (on_headers_complete)
        self._messages_begun += 1
        self._head_raw = self._framing_raw = self._chunks = self._body_total = 0
        self._body_refused = False
        self._framing_exact = False  # the head is in the bytes before this message's first piece of body
        self._head_bytes = 0
        self._head_received = 0
        self._head_started = self.loop.time()
        settings = self.settings
        # Checked at the end of the grace, then when the bytes received so far run out (mod_reqtimeout).
        first_check = min(settings.min_rate_grace_s, settings.header_timeout_s)
        self._head_timer = self.loop.call_later(first_check, self._check_head_pace)

    def _check_head_pace(self) -> None:
        settings = self.settings
        now = self.loop.time()
        last = self._head_started + settings.header_timeout_s
        allowed = paced_deadline(self._head_started, self._head_received, settings.header_timeout_s,
                                 settings.min_rate_grace_s, settings.min_upload_rate)
        if now < allowed:
            self._head_timer = self.loop.call_at(allowed, self._check_head_pace)
            return
        self._head_timer = None
        self.open_connections.refusals.warning("408: closed a connection from %s whose request head was too slow",
                                               self.client[0] if self.client else None)
        if allowed < last:
            self.send_error(408, f"The request's headers arrived too slowly (under "
                                 f"{settings.min_upload_rate // 1024} KB/s).")
        else:
            self.send_error(408, f"The request's headers did not arrive within {settings.header_timeout_s:g} s.")

    def _refuse(self, status: int, message: str, linger: bool = False) -> None:
        """Stop the parser: data_received answers `status` (with a lingering close when `linger`: the body is still
        arriving, and a plain close would reset the answer away)."""
        self._refusal = (status, message, linger)
        raise _HeadRefused(message)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_bytes += len(url)
        if len(self.url) > self.settings.max_header_bytes:
            self._refuse(414, f"The URL is too long: the limit is {self.settings.max_header_bytes} bytes.")

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._head_bytes += len(name) + len(value) + 4
        if len(self.headers) > self.settings.max_header_count:
            self._refuse(431, f"Too many request headers: the limit is {self.settings.max_header_count}.")
        if self._head_bytes > self.settings.max_header_bytes:
            self._refuse(431, f"The request headers are too large: the limit is "
                              f"{self.settings.max_header_bytes} bytes.")

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._in_head = False
        if self.parser.should_upgrade():
            self._refuse_upgrade()
        self._refuse_codings()
        super().on_headers_complete()
        self._head_done = True
        # self.cycle is the newest request only: an earlier pipelined one may still be answered. (Constant work a
        # request: rebuilding the list and a membership test made a pipelining client's requests cost the loop
        # quadratic time, benchmarks/RESULTS.md "Session 36".)
        while self._unanswered and self._unanswered[0].response_complete:
            self._unanswered.popleft()
        if self.cycle is not None:
            self._unanswered.append(self.cycle)

    def _should_upgrade(self) -> bool:  # uvicorn's: hand the connection to a WebSocket protocol
        return False  # never: no WebSocket routes here (on_headers_complete answers those requests)

    def _refuse_upgrade(self) -> None:
        """501 for a protocol switch this server cannot make; returns for an Upgrade it may ignore."""
        if self.parser.get_method() == b"CONNECT":
            self._refuse(501, "CONNECT is not supported: this server is not a proxy.")
        upgrade = (self._get_upgrade() or b"").decode("latin-1")
        if "websocket" in upgrade.lower():
            self._refuse(501, "WebSocket is not supported: this server answers plain HTTP requests only.")
        # httptools skips the body of an upgrade request (it would be the new protocol's bytes): it
        # cannot be read, so the request cannot be answered.
        if self._declares_body():
            self._refuse(501, f"Protocol upgrades (Upgrade: {upgrade[:40]}) are not supported: "
                              "send the request without the Upgrade header.")

    def _declares_body(self) -> bool:
        """Whether the head says a body follows: a Content-Length above 0 (0: none to drain), or a Transfer-Encoding."""
        return any((name == b"content-length" and value.strip() not in (b"", b"0"))
                   or (name == b"transfer-encoding" and value.strip()) for name, value in self.headers)

    def _refuse_codings(self) -> None:
        """A body that cannot be read as it is sent, refused before the app sees it (the body still arriving is
        drained: a lingering close): a Transfer-Encoding other than chunked (501: httptools undoes the chunking alone,
        and the app got the body still coded), a Content-Encoding other than identity (415: nothing here decompresses;
        the adapter classified a body labelled gzip as plain, the predictor answered FastAPI's 400), and an HTTP/1.0
        POST, PUT or PATCH without a Content-Length (411: its body is not read, and the app saw none)."""
        codings: dict[bytes, list[str]] = {b"transfer-encoding": [], b"content-encoding": []}
        for name, value in self.headers:
            if name in codings:
                codings[name].extend(part.strip().lower() for part in value.decode("latin-1").split(",") if part.strip())
        transfer = [coding for coding in codings[b"transfer-encoding"] if coding != "chunked"]
        content = [coding for coding in codings[b"content-encoding"] if coding != "identity"]
        body = self._declares_body()
        if transfer:
            refusal = (501, f"Transfer-Encoding {clipped(', '.join(transfer), CODINGS_SHOWN)} is not supported: send "
                            "the body as it is (with a Content-Length, or chunked).")
        elif content and body:  # (a request without a body has nothing coded to misread)
            refusal = (415, f"Content-Encoding {clipped(', '.join(content), CODINGS_SHOWN)} is not supported: send "
                            "the body as it is (not compressed).")
        elif (not body and not any(name == b"content-length" for name, _ in self.headers)
              and self.parser.get_http_version() == "1.0"
              and self.parser.get_method() in (b"POST", b"PUT", b"PATCH")):
            refusal, body = (411, "An HTTP/1.0 request with a body needs a Content-Length."), True
        else:
            return
        self._body_refused = body  # its body may still be arriving: the answer waits out a lingering close
        self._refuse(*refusal, linger=body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if getattr(self.transport, "_lingering", False):  # the refused body has ended: close now
            self.transport._transport.close()
            return
        super().on_message_complete()


    # ---- flow control ------------------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if getattr(self, "_send_timer", False) is None:
            self._send_timer = self.loop.call_later(self.settings.send_timeout_s, self._send_stalled)
            self._unread_since = self.loop.time()
            self.open_connections.set_unread(self._connection_key, self, True)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_send_timer()

    def _cancel_send_timer(self) -> None:
        if getattr(self, "_send_timer", None) is not None:
            self._send_timer.cancel()
            self._send_timer = None
            self.open_connections.set_unread(self._connection_key, self, False)

    @property
    def unread_s(self) -> float:
        """How long its answers have waited for its client to read them (its writing paused); 0: not waiting."""
        return 0.0 if getattr(self, "_send_timer", None) is None else self.loop.time() - self._unread_since

    def reset(self) -> None:
        reset_connection(getattr(self.transport, "_transport", self.transport))

    def _send_stalled(self) -> None:
        self.open_connections.refusals.warning(
            "reset a connection from %s: it read none of its answers for %g s (SEND_TIMEOUT_S)",
            self.client[0] if self.client else None, self.settings.send_timeout_s)
        self._cancel_send_timer()
        self.reset()


def silent_timeout_s(settings: Settings, keepalive_s: float) -> float:
    """How long a connection that has sent no request's byte since it opened is kept: HEADER_TIMEOUT_S, as a head
    that trickles, or the keep-alive time if shorter. KServe's predictor closes a gRPC connection with no call at
    the same time (handler/kserve_predictor.py)."""
    return min(settings.header_timeout_s, keepalive_s)


def _parser_reason(err: Exception) -> str:
    # llhttp's reasons ("Invalid header value char", ...) name the fault in the request, nothing internal.
    text = str(err).strip().rstrip(".")
    return text[:120] if text else "malformed request"


def reset_connection(transport) -> None:
    """Refuse a connection as cheaply as can be: a reset, its descriptor freed at once."""
    sock = transport.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    except OSError:
        pass
    transport.abort()


def protocol_class(settings: Settings, on_refusal=None, on_reset=None) -> type[GuardedHttpToolsProtocol]:
    """The protocol uvicorn builds per connection, bound to these settings, one connection count and
    the hooks: ``on_refusal`` for a request refused at the parser, ``on_reset`` for a connection reset by a cap."""
    return type("AdapterHttpProtocol", (GuardedHttpToolsProtocol,),
                {"settings": settings, "open_connections": OpenConnections(settings, on_reset),
                 "on_refusal": staticmethod(on_refusal) if on_refusal else None})
