"""What one request, and one client, may hold: body deadlines and rates, and the shares of what is in flight.

An ASGI middleware around the whole app, for every request that has a body:
  * admission, at the head: at most MAX_REQUESTS_IN_FLIGHT such requests are held at once, and at
    most MAX_CLIENT_REQUESTS_IN_FLIGHT from one client address; and its declared size (Content-Length,
    a chunked body counts as a full-size upload) must fit in what is left of MAX_BYTES_IN_FLIGHT and
    of the client's MAX_CLIENT_BYTES_IN_FLIGHT. Otherwise 503 with Retry-After at once, before the
    body is read, for that request alone;
  * max-min fairness, when everyone's caps refuse a request whose body has begun (its first bytes within
    MIN_RATE_GRACE_S: a head alone claims nothing): if its client holds less than its fair share
    (an equal part of MAX_REQUESTS_IN_FLIGHT and of MAX_BYTES_IN_FLIGHT among the clients holding requests,
    itself counted; at most its MAX_CLIENT_* share), it takes the place of the newest request of the client most
    past its share that is still receiving its body, or waiting for a connection to the model server (nothing of
    it sent there yet: waiting_for_model_server) (InFlight.to_give_way), which gets 503 with Retry-After at
    once (its connection closed if its body was arriving). Without it four addresses' 16 slow uploads each held all
    64 places, or three addresses' slow full-size uploads all the bytes, every other client refused for
    BODY_TIMEOUT_S at a time; and four addresses' 16 uploads each, arrived and waiting for a connection, half the
    requests of another;
  * bytes held, not declared: a request is charged the body bytes it has received, plus, once its
    body is arriving at a healthy rate (at least MIN_UPLOAD_RATE since its start, a second's worth
    at least), a promise of the rest of its declared size, so that it is never refused half-way.
    A crawling upload that has sent 5 bytes holds 5 bytes. A chunk that does not fit in the budgets
    is refused (503); the charges never pass them, so memory stays bounded however many clients push;
  * deadline: the body must arrive within BODY_TIMEOUT_S, and, after MIN_RATE_GRACE_S, at
    MIN_UPLOAD_RATE on average (Apache mod_reqtimeout's MinRate: each byte received extends the
    deadline by 1/MIN_UPLOAD_RATE s). Slower: 408 and the connection closed;
  * a response sent before the body was read in full (413, 408, 503, 404 on a POST) closes the
    connection: the unread rest must not be parsed as the next request, nor keep the socket alive.
Explanations (POST /explain/) cost several classifications' worth of the model server's CPU each
(Grad-CAM's backward pass: benchmarks/RESULTS.md), so they have caps of their own (`Explanations`):
at most MAX_CLIENT_EXPLANATIONS_IN_FLIGHT from one client (more -> 503 with Retry-After at once,
before the body is read), and at most MAX_EXPLANATIONS_IN_FLIGHT at the model server from everyone;
an explanation past that waits its turn (first come, first served) up to EXPLANATION_WAIT_S, then
503 with Retry-After. Classifications never wait behind more than that many explanations.
Given up, not finished: a request the adapter answered 504 (the model server too slow), or whose task
was cancelled, may still be queued or running at TorchServe, which cancels nothing. It keeps, for the model
server's responseTimeout more (Settings.model_server_hold_s), the bytes it forwarded and its place among
the requests in flight (`held_by_model_server`), and an explanation its turn: otherwise the caps would
let in more while TorchServe still holds them (Java's heap filled with bodies of 504'd uploads; 7
explanations ran at once under a cap of 4, 25-39 with TS_PREDICT_TIMEOUT_S=1). In front of a model server that
stops a request whose client left (this project's KServe predictor), MODEL_SERVER_HOLD_S=0 holds nothing after it.
A client that leaves cancels nothing: uvicorn lets its request run to TorchServe's answer, which frees what it held.
The client address is scope["client"]: the socket's peer, or, behind a proxy listed in
TRUSTED_PROXIES, what its X-Forwarded-For says (uvicorn's ProxyHeadersMiddleware, adapter/run.py);
an IPv6 client is counted by its /64 (serving/clients.py client_key).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from contextvars import ContextVar

from serving.clients import StoppableWait, client_key, fair_share, giving_way
from serving.pace import paced_deadline, stop_now
from serving.throttled_log import ThrottledLog

from .config import Settings
from .errors import ClassifyError
from .request_context import note_busy
from .upload import upload_body_limit

log = logging.getLogger("adapter.limits")

BUSY_MESSAGE = "The server is busy with other uploads; try again shortly."
CLIENT_BUSY_MESSAGE = "The server is busy with uploads from your address; try again shortly."
GAVE_WAY_MESSAGE = ("Your address held more than its share of the uploads in flight while other clients waited: "
                    "this one was stopped to make room for theirs; try again shortly.")
CLIENT_EXPLANATIONS_MESSAGE = "Too many explanations asked from your address at once; try again shortly."
EXPLANATIONS_BUSY_MESSAGE = "The server is busy explaining other answers; try again shortly."


class _ClientShare:
    __slots__ = ("requests", "bytes", "stoppable")

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        # Its requests that may still give way (Charge.stoppable): receiving their body, or waiting for a connection
        # to the model server; oldest first.
        self.stoppable: list[Charge] = []


# Where RequestLimits leaves a request's Charge in its ASGI scope, for held_by_model_server; and for the code under it
# (waiting_for_model_server).
CHARGE_KEY = "adapter.charge"
_CHARGE: ContextVar["Charge | None"] = ContextVar("adapter_charge", default=None)
_WAITING_REFUSALS = ThrottledLog(log)


def given_up(err: BaseException) -> bool:
    """Whether the model server may still be working on a request that ended with ``err``: the adapter
    stopped waiting for its answer (504), or its task was cancelled (a client that leaves cancels nothing:
    uvicorn lets its request run on)."""
    return isinstance(err, asyncio.CancelledError) or (isinstance(err, ClassifyError) and err.status_code == 504)


class InFlight:
    """Requests with a body held right now and the bytes charged to them, in all and per client."""

    def __init__(self, max_requests: int, max_bytes: int):
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.hold_s = 0.0  # how long a request given up on keeps what the model server holds (Charge.keep)
        self.retry_after_s = 1  # what a request that gave way is told (waiting_for_model_server)
        # Per client address; no shares (the global caps) until share_per_client() says otherwise.
        self.max_client_requests = max_requests
        self.max_client_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self.clients: dict[str, _ClientShare] = {}

    def share_per_client(self, max_requests: int, max_bytes: int) -> None:
        self.max_client_requests = min(max_requests, self.max_requests)
        self.max_client_bytes = min(max_bytes, self.max_bytes)

    def try_admit(self, client: str, declared: int) -> "Charge | str":
        """A Charge (nothing charged yet), or why not: "busy" (everyone's caps) / "client" (its share)."""
        share = self.clients.get(client)
        if share is None:
            share = self.clients[client] = _ClientShare()
        if share.requests >= self.max_client_requests or share.bytes + declared > self.max_client_bytes:
            reason = "client"
        elif self.requests >= self.max_requests or self.bytes + declared > self.max_bytes:
            reason = "busy"
        else:
            self.requests += 1
            share.requests += 1
            return Charge(self, client, share, declared)
        if share.requests == 0:
            del self.clients[client]
        return reason

    def to_give_way(self, client: str, declared: int) -> "Charge | None":
        """For a request of ``client`` refused "busy": the request that gives way to it (max-min fairness), or None.
        ``client``'s fair share is an equal part of the requests and of the bytes among the clients holding requests,
        itself counted (serving/clients.py fair_share); if it holds less of what is short, with this one's ``declared``
        bytes, the
        newest request that may still give way (still receiving its body, or waiting for a connection to the model
        server: nothing of it there yet) of the client most past its own share of what is short, whose going
        makes room for the newcomer, gives way. Three addresses' three slow full-size uploads each (32 MiB) held the
        bytes, and every phone photo of 4 MB was refused; four addresses' 16 uploads each, all arrived, held every
        place while 40 of them waited for a connection, and another client was refused half its requests."""
        share = self.clients.get(client)
        requests, held = (share.requests, share.bytes) if share is not None else (0, 0)
        clients = len(self.clients) + (share is None)
        fair_requests = fair_share(self.max_requests, clients, self.max_client_requests)
        fair_bytes = fair_share(self.max_bytes, clients, self.max_client_bytes)
        # Judged on what is short, the places or the bytes (or both): 32 addresses' two small uploads each held every
        # place with a quarter of the bytes, and a 6.7 MB photo, past an equal part of the bytes (3 MiB), was refused,
        # or its upload under way stopped for a newcomer, its bytes ranking it most past its share.
        places_short = self.requests >= self.max_requests
        bytes_short = self.bytes + declared > self.max_bytes
        if (places_short and requests >= fair_requests) or (bytes_short and held + declared > fair_bytes):
            return None

        def past(other: str) -> float:  # times its fair share it holds, of what is short
            theirs = self.clients[other]
            return max(theirs.requests / fair_requests if places_short else 0.0,
                       theirs.bytes / fair_bytes if bytes_short else 0.0)
        stoppable = {other: theirs.stoppable for other, theirs in self.clients.items()}
        # The first whose bytes make room (else it would be stopped for nothing).
        return next((charge for charge in giving_way(stoppable, past)
                     if self.bytes - charge.charged + declared <= self.max_bytes), None)

    def _take(self, share: _ClientShare, n: int) -> bool:
        if self.bytes + n > self.max_bytes or share.bytes + n > self.max_client_bytes:
            return False
        self.bytes += n
        share.bytes += n
        return True


class Charge:
    """What one admitted request holds: `charged` covers the body bytes received, and its promise."""

    __slots__ = ("in_flight", "client", "share", "declared", "charged", "promised", "kept", "stop", "released")

    def __init__(self, in_flight: InFlight, client: str, share: _ClientShare, declared: int):
        self.in_flight = in_flight
        self.client = client
        self.share = share
        self.declared = declared
        self.charged = 0
        self.promised = False
        self.kept: int | None = None  # bytes the model server still holds after the answer (keep)
        self.stop = None  # while it may give way: what stops it (stoppable)
        self.released = False

    def stoppable(self, stop) -> None:
        """It may give way to another client's request (its body arriving, or it waits for a connection to the
        model server): ``stop()`` ends it at once (503)."""
        self.stop = stop
        self.share.stoppable.append(self)

    def unstoppable(self) -> None:
        """It no longer may (its body all arrived, sent to the model server, answered)."""
        if self.stop is not None:
            self.stop = None
            self.share.stoppable.remove(self)

    def give_way(self) -> None:
        """Released now, for another client's request to take its place, and its body stopped."""
        stop = self.stop
        self.release()
        stop()

    def cover(self, received: int, healthy: bool) -> bool:
        """Charge for `received` body bytes (and promise the rest while `healthy`); False: no room, or released (it
        gave way: nothing more is charged to it, nothing would give it back)."""
        if self.released:
            return False
        if healthy and not self.promised and self.declared > self.charged:
            # The whole declared size at once, if it fits: then this upload is never refused half-way.
            if self.in_flight._take(self.share, self.declared - self.charged):
                self.charged = self.declared
                self.promised = True
        elif self.promised and not healthy:
            # Fell below the healthy rate: keep only what it holds.
            self._give_back(self.charged - received)
            self.promised = False
        if received <= self.charged:
            return True
        if not self.in_flight._take(self.share, received - self.charged):
            return False
        self.charged = received
        return True

    def _give_back(self, n: int) -> None:
        if n > 0:
            self.charged -= n
            self.in_flight.bytes -= n
            self.share.bytes -= n

    def keep(self, forwarded: int) -> None:
        """At its release, this request keeps ``forwarded`` bytes (what the model server holds of it) and its
        place among the requests in flight, in all and in its client's share, for in_flight.hold_s more."""
        self.kept = min(forwarded, self.charged)

    def release(self) -> None:
        if self.released:  # (it gave way: its request's own release comes later)
            return
        self.unstoppable()
        in_flight = self.in_flight
        if self.kept is not None:
            self._give_back(self.charged - self.kept)
            self.kept = None
            asyncio.get_running_loop().call_later(in_flight.hold_s, self.release)
            return
        self.released = True
        self._give_back(self.charged)
        in_flight.requests -= 1
        self.share.requests -= 1
        if self.share.requests == 0:
            in_flight.clients.pop(self.client, None)


class Explanations:
    """The caps on explanations in flight: one client's share, and everyone's turns at the model server."""

    def __init__(self, settings: Settings):
        # What each client holds (reading, waiting or at the server), counted as uploads are: no bytes
        # (RequestLimits charges those), and no cap for all together (the turns are that).
        self.held = InFlight(settings.max_requests_in_flight, 0)
        self.held.share_per_client(min(settings.max_client_explanations_in_flight,
                                       settings.max_explanations_in_flight), 0)
        self.wait_s = settings.explanation_wait_s
        self.hold_s = settings.model_server_hold_s()  # a turn given up on (504, client gone) ends this late
        self.held.hold_s = self.hold_s  # ... and so does its client's share of explanations (Charge.keep)
        self.retry_after = {"Retry-After": str(settings.retry_after_s)}
        self._turns = asyncio.Semaphore(settings.max_explanations_in_flight)  # FIFO for its waiters
        self.waiting = self.at_server = 0  # read by adapter/metrics.py's gauges
        self.refusals = ThrottledLog(log)

    @contextlib.asynccontextmanager
    async def share(self, client: str):
        """One explanation of ``client`` held while the body is yielded; 503 at once beyond its share."""
        charge = self.held.try_admit(client, 0)
        if not isinstance(charge, Charge):
            self.refusals.warning("503 (client's explanations): refused POST /explain/ from %s (%d held)",
                                  client, self.held.max_client_requests)
            note_busy("client_explanations")
            raise ClassifyError(503, CLIENT_EXPLANATIONS_MESSAGE, self.retry_after)
        try:
            yield charge
        finally:
            charge.release()

    @contextlib.asynccontextmanager
    async def turn(self, share: "Charge | None" = None):
        """A turn at the model server; 503 when none came within ``wait_s``. Given up on while the model server
        may still run it, the turn and ``share`` (its client's, from share()) end when it would have: else one
        client could hold every turn through 504s while its share read empty."""
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait_s):
                await self._turns.acquire()
        except TimeoutError:
            self.refusals.warning("503 (explanations busy): no turn at the model server within %g s", self.wait_s)
            note_busy("explanation_wait")
            raise ClassifyError(503, EXPLANATIONS_BUSY_MESSAGE, self.retry_after) from None
        finally:
            self.waiting -= 1
        self.at_server += 1
        held = False
        try:
            yield
        except BaseException as err:
            held = given_up(err)
            raise
        finally:
            if held:  # TorchServe may still run it: the turn ends when it would have
                asyncio.get_running_loop().call_later(self.hold_s, self._end_turn)
                if share is not None:
                    share.keep(0)
            else:
                self._end_turn()

    def _end_turn(self) -> None:
        self.at_server -= 1
        self._turns.release()


@contextlib.contextmanager
def held_by_model_server(scope, forwarded: int):
    """Around a request's call to the model server with ``forwarded`` bytes: given up on (504, its client
    gone), the request keeps those bytes and its place in the caps for the model server's responseTimeout
    (Charge.keep), as TorchServe still holds them."""
    try:
        yield
    except BaseException as err:
        charge = scope.get(CHARGE_KEY)
        if charge is not None and given_up(err):
            charge.keep(forwarded)
        raise


@contextlib.asynccontextmanager
async def waiting_for_model_server():
    """Around the request's wait for a connection to the model server (adapter/model_server.py Pool): nothing of it
    is there yet, so it may give way to another client's (InFlight.to_give_way), as an upload still arriving may;
    then ClassifyError 503 (GAVE_WAY_MESSAGE, Retry-After). Yields the client whose line it waits in ("" outside a
    request held by RequestLimits, which gives way to nobody)."""
    charge = _CHARGE.get()
    if charge is None or charge.released:
        yield ""
        return
    wait = StoppableWait()
    charge.stoppable(wait.stop)
    try:
        yield charge.client
    except asyncio.CancelledError:
        if not wait.gave_way():
            raise
        _WAITING_REFUSALS.warning("503 (gave way): stopped a request of %s waiting for a connection to the model "
                                  "server, past its share of requests in flight while another client waited",
                                  charge.client)
        note_busy("gave_way")
        raise ClassifyError(503, GAVE_WAY_MESSAGE, {"Retry-After": str(charge.in_flight.retry_after_s)}) from None
    finally:
        charge.unstoppable()


def client_host(scope) -> str:
    """The request's client: the socket's peer, or what a trusted proxy says (module docstring); the
    access line names it."""
    return scope["client"][0] if scope.get("client") else "unknown"


def client_address(scope) -> str:
    """Whose share a request counts in: its client_host, as client_key groups it."""
    return client_key(client_host(scope))


def _declared_size(scope, fallback: int) -> int | None:
    """Bytes the request's body will hold: Content-Length, `fallback` for chunked, None: no body."""
    length = chunked = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        return fallback
    if length is None:
        return None
    try:
        size = int(length)
    except ValueError:
        return fallback
    # Larger declarations are refused (413) before their body is read: they hold no more than this.
    return min(size, fallback) if size > 0 else None


class RequestLimits:
    def __init__(self, app, settings: Settings, in_flight: InFlight):
        self.app = app
        self.settings = settings
        self.in_flight = in_flight
        in_flight.share_per_client(settings.max_client_requests_in_flight, settings.max_client_bytes_in_flight)
        in_flight.hold_s = settings.model_server_hold_s()
        in_flight.retry_after_s = settings.retry_after_s
        self.full_upload = upload_body_limit(settings.max_upload_bytes)
        self.retry_after = str(settings.retry_after_s).encode()
        self.refusals = ThrottledLog(log)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = _declared_size(scope, self.full_upload)
        if size is None:
            return await self.app(scope, receive, send)
        client = client_address(scope)
        charge = self.in_flight.try_admit(client, size)
        if charge == "busy" and self.in_flight.to_give_way(client, size) is not None:
            # Max-min fairness: one past its share gives way (released now; its own stop() below ends its body,
            # 503), once this one's body has begun: a head that sends nothing would stop an upload for nothing.
            first = await _first_body(receive, self.settings.min_rate_grace_s)
            if first is not None:
                receive = _replaying(first, receive)
                charge = self.in_flight.try_admit(client, size)
                if charge == "busy" and (place := self.in_flight.to_give_way(client, size)) is not None:
                    place.give_way()
                    charge = self.in_flight.try_admit(client, size)
        if not isinstance(charge, Charge):
            self.refusals.warning("503 (%s): refused %s %s from %s (%d requests, %d bytes in flight)",
                                  "client's share" if charge == "client" else "busy", scope["method"],
                                  scope["path"], client, self.in_flight.requests, self.in_flight.bytes)
            note_busy("client_in_flight" if charge == "client" else "in_flight")
            return await _send_json(send, 503, CLIENT_BUSY_MESSAGE if charge == "client" else BUSY_MESSAGE,
                                    [(b"retry-after", self.retry_after), (b"connection", b"close")])
        scope[CHARGE_KEY] = charge  # (held_by_model_server: what a request given up on keeps)
        _CHARGE.set(charge)  # (this task's context: the request's own)
        settings = self.settings
        loop = asyncio.get_running_loop()
        started = loop.time()
        last_deadline = started + settings.body_timeout_s
        rate = settings.min_upload_rate
        received = 0
        body_done = False
        refused_busy = False
        released = False
        stopped = False  # it gave way (InFlight.to_give_way): its charge is released, its body not read on
        waiting = None  # the timeout of the receive under way, if any: stop() ends it at once

        def stop():
            nonlocal stopped
            stopped = True
            if waiting is not None:
                stop_now(waiting)

        charge.stoppable(stop)

        def gave_way() -> ClassifyError:
            nonlocal refused_busy
            refused_busy = True
            self.refusals.warning("503 (gave way): stopped the body of %s %s from %s, past its share of requests "
                                  "in flight while another client waited", scope["method"], scope["path"], client)
            note_busy("gave_way")
            return ClassifyError(503, GAVE_WAY_MESSAGE)

        async def timed_receive():
            nonlocal body_done, received, refused_busy, waiting
            if body_done or released:  # (answered: nothing more is charged)
                return await receive()
            if stopped:
                raise gave_way()
            # mod_reqtimeout's MinRate: each byte received buys 1/rate s more, never past the deadline.
            deadline = paced_deadline(started, received, settings.body_timeout_s, settings.min_rate_grace_s, rate)
            try:
                async with asyncio.timeout_at(deadline) as waiting:
                    message = await receive()
            except TimeoutError:
                if stopped:
                    raise gave_way() from None
                if deadline < last_deadline:
                    self.refusals.warning("408: the body of %s %s from %s arrived slower than %d bytes/s",
                                          scope["method"], scope["path"], client, rate)
                    raise ClassifyError(408, f"The upload arrived too slowly (under {rate // 1024} KB/s).") \
                        from None
                self.refusals.warning("408: the body of %s %s from %s did not arrive within %g s",
                                      scope["method"], scope["path"], client, settings.body_timeout_s)
                raise ClassifyError(408, f"The upload did not arrive within {settings.body_timeout_s:g} s.") \
                    from None
            finally:
                waiting = None
            if stopped:  # (stopped as this message arrived: it is not charged)
                raise gave_way()
            if message["type"] != "http.request":
                body_done = True
                charge.unstoppable()
                return message
            if not message.get("more_body", False):
                body_done = True
                charge.unstoppable()
            chunk = len(message.get("body", b""))
            if chunk:
                received += chunk
                # Healthy: on pace for the minimum rate since the start, and a second's worth of it.
                healthy = received >= rate * max(loop.time() - started, 1.0)
                if not charge.cover(received, healthy):
                    refused_busy = True
                    self.refusals.warning("503: no room for the body of %s %s from %s (%d bytes in flight)",
                                          scope["method"], scope["path"], client, self.in_flight.bytes)
                    own_share = charge.share.bytes + chunk > self.in_flight.max_client_bytes
                    note_busy("client_in_flight" if own_share else "in_flight")
                    raise ClassifyError(503, CLIENT_BUSY_MESSAGE if own_share else BUSY_MESSAGE)
            return message

        def release():
            nonlocal released
            if not released:
                released = True
                charge.release()

        async def closing_send(message):
            if message["type"] == "http.response.start" and (refused_busy or not body_done):
                # A body refused on its last piece is read whole: the connection may stay, the 503 is busy still.
                extra = [] if body_done else [(b"connection", b"close")]
                if refused_busy:
                    extra.append((b"retry-after", self.retry_after))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                # Before the answer's last bytes leave: a keep-alive client's next request must not
                # find this one still counted in its share.
                release()
            await send(message)

        try:
            await self.app(scope, timed_receive, closing_send)
        finally:
            release()


async def _first_body(receive, wait_s: float) -> dict | None:
    """The body's first message if it brings bytes (or ends the body) within ``wait_s``; else None."""
    try:
        async with asyncio.timeout(wait_s):
            message = await receive()
    except TimeoutError:
        return None
    began = message["type"] == "http.request" and (message.get("body") or not message.get("more_body", False))
    return message if began else None


def _replaying(first: dict, receive):
    """``receive`` whose first message is ``first`` (already read)."""
    pending = [first]

    async def replayed():
        return pending.pop() if pending else await receive()
    return replayed


async def _send_json(send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
