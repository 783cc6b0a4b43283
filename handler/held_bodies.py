"""The bound on request bodies KServe's model server holds at once (``--max_body_bytes_held``,
handler/kserve_predictor.py): in KServe's Standard mode (RawDeployment) nothing in front of it bounds its connections, and 64
clients sending two bodies of 11 MiB each held it at 1.9 GB over REST and 3.4 GB over gRPC.

REST bodies are counted as their bytes arrive and refused (503) when they would pass the bound: a REST
body shows its progress. A gRPC message does not: grpc hands it over whole, so each gRPC call reserves the
largest message it may carry (``grpc_max_receive_message_length``) before its message is read, waiting its
turn, and keeps only its message's size once read. REST and gRPC have a bound each, so that gRPC calls
waiting for their turn never refuse a REST body.

A reservation whose message never comes is held until the call's deadline (30 s): with nothing else, a client
stalling eight calls held the whole gRPC bound and every other client waited. So one client (the peer's address,
or the one a trusted proxy's X-Forwarded-For names: serving/clients.py) holds at most its share of the
reservations (``--max_client_share``, half by default): its calls past that wait, passed over by other clients'
turns. While other clients want reservations it holds no more than its fair share (an equal part among the clients
holding or waiting): two addresses at half each held them all, and a third client's call waited 29 s. A waiting
call within its fair share takes the newest reservation of a client past it (that call, its message not come, is
refused), and freed reservations go to the client holding the fewest first. The waiting places are everyone's
while there is room; when they are full, another client's call takes the place of the newest waiting call of a
client past its fair share of them, which is refused. One client alone (all calls through one proxy) keeps every
waiting place, as before.

Eight addresses stalling one call each were all within their shares and held every reservation until their
deadlines: another client's call waited 28 s. So a reservation whose message has not come within
``--grpc_message_grace_s`` of its grant passes to a waiting call of another client within its fair share (the
oldest such reservation first; its own call is refused): stalled calls hold the bound only while no one else wants
it, and a call waits about the grace behind them, not their deadlines. An honest sender of a message slower than
the grace loses its reservation only when every reservation is taken and another client waits.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter, deque

import grpc
from grpc import aio

from handler.protocols import logged_request_id
from serving.clients import (CALLER, ForwardedClient, client_key, fair_share, giving_way, grpc_peer_host,
                             newest_past_fair_share, removed)
from serving.pace import stop_now
from serving.throttled_log import ThrottledLog

# The one gRPC method that carries images: the message bound proper; every other call has a small bound of its own.
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"

logger = logging.getLogger("handler.held_bodies")


class TurnGivenUp(Exception):
    """A waiting turn given to another owner's newcomer (HeldBytes.make_room): its owner had more than its share."""


class Turn:
    """A reservation of ``size`` granted to ``owner`` at ``since`` (time.monotonic()), from its grant to
    HeldBytes.end_turn. ``stop``, set by its call while it waits for its message, ends that wait when the turn gives
    way to another owner's: ``given_way`` names the setting that made it (None: it did not), and ``handed_on`` says
    its bytes went on to that owner's turn (its call gives none back)."""

    __slots__ = ("owner", "size", "since", "stop", "given_way", "handed_on")

    def __init__(self, owner: str | None, size: int):
        self.owner, self.size, self.since = owner, size, time.monotonic()
        self.stop, self.given_way, self.handed_on = None, None, False


class HeldBytes:
    """Bytes held at once by the requests under way in one event loop, against ``limit``: ``take`` what has
    arrived or is declared (False, nothing taken, when it would pass the limit), ``reserve`` waiting for a
    turn, ``give`` back. A reservation may name its owner (a client): an owner holds at most ``turns_per_owner``
    turns at once (from its grant to ``end_turn``), and fewer while other owners want theirs: its fair share
    (serving/clients.py fair_share). Waiting turns go to the owner holding the fewest first, the turns of an owner
    at its share are passed over, not waited behind, and a newcomer within its fair share takes the newest turn of
    an owner past it, so that no client's stalled calls, nor two clients' at half each, hold everyone's. With
    ``grace_s``, a turn held that long passes to such a newcomer, even within its owner's share: many clients'
    stalled calls, one each, hold them no longer than that while others wait."""

    def __init__(self, limit: int, turns_per_owner: int | None = None, grace_s: float | None = None):
        self.limit, self.held, self.turns_per_owner, self.grace_s = limit, 0, turns_per_owner, grace_s
        self._turns: deque[tuple[int, str | None, asyncio.Future]] = deque()
        self._owned: dict[str, dict[Turn, None]] = {}  # turns held, by owner, oldest first
        self._recheck: asyncio.TimerHandle | None = None  # when the next held turn passes its grace

    @property
    def waiting(self) -> int:
        return len(self._turns)

    def waiting_of(self, owner: str) -> int:
        return sum(1 for _, waiter, _ in self._turns if waiter == owner)  # a few dozen at most: --max_waiting_requests

    def turns_of(self, owner: str | None) -> int:
        return len(self._owned.get(owner, ()))

    def fits(self, size: int) -> bool:
        return self.held + size <= self.limit

    def take(self, size: int) -> bool:
        if not self.fits(size):
            return False
        self.held += size
        return True

    def take_turn(self, size: int, owner: str | None = None) -> Turn | None:
        """``size`` taken at once, a turn of ``owner``'s, if no turn that may go waits, the owner is under its share
        and it fits (None: nothing taken)."""
        if (self._turns and any(self._may_go(waiter) for _, waiter, _ in self._turns)) or not self._may_go(owner) \
                or not self.take(size):
            return None
        return self._own(owner, size)

    async def reserve(self, size: int, owner: str | None = None) -> Turn:
        """``size`` taken when the bytes held, the other turns and ``owner``'s share allow it; a caller that stops
        waiting (cancelled, timed out) leaves nothing taken."""
        if (turn := self.take_turn(size, owner)) is not None:
            return turn
        granted = asyncio.get_running_loop().create_future()
        self._turns.append(entry := (size, owner, granted))
        self._make_way(entry)
        try:
            return await granted
        except BaseException:
            if granted.done() and not granted.cancelled() and granted.exception() is None:  # granted as it stopped
                self.end_turn(granted.result())
                self.give(size)
            elif (size, owner, granted) in self._turns:
                self._turns.remove((size, owner, granted))
                self._grant()  # the turns behind it may fit now
            raise

    def make_room(self, owner: str, places: int, most: int) -> bool:
        """Frees one of the ``places`` to wait for ``owner``'s newcomer: the newest waiting turn of the owner that
        waits in the most, past its fair share (at most ``most``), stops waiting with TurnGivenUp (True), if
        ``owner`` is under that share; else nothing changes (False)."""
        place = newest_past_fair_share([(entry, entry[1]) for entry in self._turns if not entry[2].done()], owner,
                                       places, most)
        if place is None:
            return False
        entry = place[0]
        self._turns.remove(entry)
        entry[2].set_exception(TurnGivenUp(entry[1]))
        return True

    def end_turn(self, turn: Turn) -> None:
        """``turn`` is over (its bytes stay held until ``give``): its owner's next reservation may go. Again: nothing."""
        if removed(self._owned, turn.owner, turn) and self._turns:
            self._grant()

    def give(self, size: int) -> None:
        self.held -= size
        self._grant()

    def keep(self, charged: int, size: int) -> bool:
        """Holds ``size`` instead of ``charged`` (a reservation's bytes once its message has come: ``size``); False,
        ``charged`` still held, if the more would pass the limit."""
        if size > charged:
            return self.take(size - charged)
        self.give(charged - size)
        return True

    def _may_go(self, owner: str | None) -> bool:
        return owner is None or self.turns_per_owner is None or self.turns_of(owner) < self.turns_per_owner

    def _own(self, owner: str | None, size: int) -> Turn:
        turn = Turn(owner, size)
        if owner is not None:
            self._owned.setdefault(owner, {})[turn] = None
        return turn

    def _make_way(self, entry: tuple[int, str | None, asyncio.Future]) -> None:
        """A turn of ``owner``'s waits (``entry``) for bytes held by others: if the turns it holds and wants are within
        its fair share of the turns that fit in the limit (among the owners holding or waiting), the newest turn of
        the owner holding the most, past that share, gives way: its call stops waiting for its message and gives its
        bytes back. Else, with ``grace_s``, the oldest turn of another owner's held past it is handed on to this one
        (none past it yet: this is asked again when one will be). A stalled sender held its turns until its deadline
        (30 s), two clients at half each all of them, and eight at one each too."""
        size, owner, granted = entry
        if owner is None or self.turns_per_owner is None or self.fits(size) or not self._owned or granted.done():
            return
        waiting = Counter(waiter for _, waiter, granted in self._turns if waiter is not None and not granted.done())
        share = fair_share(self.limit // size, len(self._owned.keys() | waiting.keys()), self.turns_per_owner)
        if self.turns_of(owner) + waiting[owner] > share:
            return
        if (turn := next(giving_way(self._owned, lambda crowding: self.turns_of(crowding) / share), None)) is not None:
            self._stop(turn, "max_client_share")
        elif (turn := self._past_grace(size)) is not None:
            self._stop(turn, "grpc_message_grace_s")
            turn.handed_on = True  # its bytes are this waiter's now: nothing to wait for, nobody else's to take
            self._turns.remove(entry)
            granted.set_result(self._own(owner, size))

    def _past_grace(self, size: int) -> Turn | None:
        """The oldest turn of ``size`` held past ``grace_s``; if there is one not yet past it, the waiting
        turns are looked at again when it will be. (Every turn is another owner's: nobody is past their fair share here
        and all turns are taken, so there are more owners than turns, each holding one, and ``owner`` none.)"""
        turns = [turn for turns in self._owned.values() for turn in turns if turn.size == size]
        if self.grace_s is None or not turns:
            return None
        oldest = min(turns, key=lambda turn: turn.since)
        if (wait := oldest.since + self.grace_s - time.monotonic()) <= 0:
            return oldest
        loop = asyncio.get_running_loop()
        if self._recheck is None or self._recheck.when() > loop.time() + wait:
            if self._recheck is not None:
                self._recheck.cancel()
            self._recheck = loop.call_later(wait, self._past_grace_recheck)
        return None

    def _past_grace_recheck(self) -> None:
        self._recheck = None
        for entry in list(self._turns):  # in order of arrival; each takes one turn at most
            self._make_way(entry)

    def _stop(self, turn: Turn, setting: str) -> None:
        """``turn`` gives way (``setting``: the rule that made it): its owner's count drops, its call stops waiting."""
        self.end_turn(turn)
        turn.given_way = setting
        if turn.stop is not None:
            turn.stop()

    def _grant(self) -> None:
        """Waiting turns, the owner's holding the fewest first, then in order of arrival, passing over owners at
        their share; the first that does not fit stops the rest (a small one behind a large one waits too: no call
        passes the others for ever)."""
        for entry in [entry for entry in self._turns if entry[2].done()]:  # a cancelled turn is left to its owner
            self._turns.remove(entry)
        while ready := [entry for entry in self._turns if self._may_go(entry[1])]:
            entry = min(ready, key=lambda entry: self.turns_of(entry[1]))  # the first of the fewest
            if not self.take(entry[0]):
                return
            self._turns.remove(entry)
            entry[2].set_result(self._own(entry[1], entry[0]))


class Body:
    """A REST request's body, from its client's key to its answer's end: the bytes charged to it, and, while it
    waits for more of them, ``stop`` (ends that wait should it give way: ``given_way``)."""

    __slots__ = ("owner", "charged", "stop", "given_way")

    def __init__(self, owner: str):
        self.owner, self.charged, self.stop, self.given_way = owner, 0, None, False


class RestBodies:
    """REST bodies held against ``held`` (a HeldBytes: --max_body_bytes_held's REST part), by client. A body that
    would pass the bound, of a client within its fair share of it (an equal part among the clients holding bodies,
    itself counted), takes the bytes of the newest bodies still arriving of the client most past its own part: they
    are stopped (503) and give their bytes back at once. One client's bodies stalled near their end held the whole
    bound for --body_timeout_s, and every other client's REST request was refused (503) meanwhile."""

    def __init__(self, held: HeldBytes):
        self.held = held
        self._bodies: dict[str, dict[Body, None]] = {}  # by client: its bodies under way, oldest first

    def open(self, owner: str) -> Body:
        body = Body(owner)
        self._bodies.setdefault(owner, {})[body] = None
        return body

    def fits(self, body: Body, size: int, stop: bool = True) -> bool:
        """Whether ``size`` more bytes of ``body`` fit, once the bodies past their fair share have made way (``stop``
        False: would fit, nothing stopped: a declared length claims nothing before its bytes come)."""
        return self.held.fits(size) or self._make_way(body.owner, size, stop)

    def take(self, body: Body, size: int) -> bool:
        """``size`` more bytes of ``body`` held (False: no room, or it gave way: nothing more is charged to it)."""
        if body.given_way or not self.fits(body, size) or not self.held.take(size):
            return False
        body.charged += size
        return True

    def close(self, body: Body) -> None:
        """``body``'s request has ended (or it gave way): its bytes given back. Again: nothing."""
        if removed(self._bodies, body.owner, body):
            self.held.give(body.charged)

    def _make_way(self, owner: str, size: int, stop: bool = True) -> bool:
        """Stops the newest bodies still arriving, bytes charged, of the clients most past their fair share, if
        ``owner``'s, ``size`` counted, are within its own and their bytes make room for ``size``: True once it fits
        (nothing is stopped when they would not make room)."""
        need = self.held.held + size - self.held.limit
        if need <= 0:
            return True
        held = {client: sum(body.charged for body in bodies) for client, bodies in self._bodies.items()}
        # (requests without a body yet, a probe's GET, hold nothing and are nobody's claim)
        share = fair_share(self.held.limit, len({client for client, taken in held.items() if taken} | {owner}),
                           self.held.limit)
        if held.get(owner, 0) + size > share:
            return False
        arriving = {client: [body for body in bodies if body.stop is not None and body.charged]
                    for client, bodies in self._bodies.items()}
        givers = giving_way(arriving, lambda client: held[client] / share)  # (held: what is left once they go)
        chosen = []
        while need > 0:
            if (body := next(givers, None)) is None:
                return False
            chosen.append(body)
            need -= body.charged
            held[body.owner] -= body.charged
        for body in chosen if stop else ():
            self.close(body)
            body.given_way = True
            body.stop()
        return True


class GrpcMessageBound(aio.ServerInterceptor):
    """gRPC's share of the bound, first among the server's interceptors: every ModelInfer call reserves
    ``max_message`` bytes of ``held`` before its message is read, then keeps the message's size until its
    answer is sent; every other unary call (health, metadata) does the same in ``others``, a bound of its own, so
    that a probe never waits behind inference calls, stalled or under way, and they never wait behind probes. A call finds UNAVAILABLE (busy) when ``max_waiting`` calls already wait for their turn, or
    when its turn has not come within ``deadline_s``; DEADLINE_EXCEEDED when its message has not arrived
    within ``deadline_s`` of the call's start (a slow sender holds a reservation no longer; gRPC shows no
    progress within a message, so there is no rate to require as over REST). The call is read as
    client-streaming to get its context before its message: a unary client sends the same frames. With ``clients``,
    a call counts in its client's share: at most ``held.turns_per_owner`` turns held at once (its other calls wait,
    passed over by other clients' turns), and when all ``max_waiting`` places are taken, a call of a client under
    ``client_waiting`` of them takes the place of the newest call of the client that waits in the most, past its
    share (that call: UNAVAILABLE at once)."""

    def __init__(self, held: HeldBytes, max_message: int, max_waiting: int, deadline_s: float,
                 refused=lambda bound: None, clients: ForwardedClient | None = None, client_waiting: int | None = None,
                 others: HeldBytes | None = None, peer_host=grpc_peer_host):
        self.held, self.max_message, self.max_waiting, self.deadline_s = held, max_message, max_waiting, deadline_s
        self.others = others if others is not None else HeldBytes(held.limit, held.turns_per_owner)
        self.refused = refused  # called with the bound's setting (max_body_bytes_held, ...) per refusal
        self.refusals = ThrottledLog(logger)  # a flood: one line a second
        # Per-client shares (None: none): who a call's client is, and how many waiting places it keeps when the
        # places are full and another client's call comes; the turns one client may hold are held.turns_per_owner.
        self.clients, self.client_waiting = clients, client_waiting
        # The host of a call's context.peer(): behind the predictor's relay (handler/grpc_relay.py) its client's
        self.peer_host = peer_host

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        answer, parse, method = handler.unary_unary, handler.request_deserializer, handler_call_details.method
        bound, setting = (self.held, "max_body_bytes_held") if method == MODEL_INFER else (
            self.others, "max_grpc_health_calls")

        async def bounded(_requests, context):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.deadline_s
            client = await self._client(context)
            if client is not None:
                CALLER.set(client)  # (this call's own task)
            turn = bound.take_turn(self.max_message, client)  # its turn now, without a timer; else it waits
            if turn is None:
                if bound.waiting >= self.max_waiting and not (  # full: a place of a client past its share?
                        client is not None and bound.make_room(client, self.max_waiting, self.client_waiting)):
                    await self._refuse(context, method, setting, grpc.StatusCode.UNAVAILABLE,
                                       self._busy(bound, f"{bound.waiting} calls wait"))
                try:
                    async with asyncio.timeout_at(deadline):
                        turn = await bound.reserve(self.max_message, client)
                except TimeoutError:
                    await self._refuse(context, method, setting, grpc.StatusCode.UNAVAILABLE,
                                       self._busy(bound, f"no turn came in {self.deadline_s:g} s"))
                except TurnGivenUp:
                    await self._refuse(context, method, "max_client_share", grpc.StatusCode.UNAVAILABLE,
                                       self._client_busy(bound, client))
            charged = self.max_message
            try:
                try:
                    async with asyncio.timeout_at(deadline) as timer:
                        turn.stop = functools.partial(stop_now, timer)
                        if turn.given_way:  # given way before this call ran again
                            turn.stop()
                        message = await context.read()  # its bytes: parsed below, where a bad one is named
                except TimeoutError:
                    if turn.given_way:
                        await self._refuse(context, method, turn.given_way, grpc.StatusCode.UNAVAILABLE,
                                           self._gave_way(bound, client, turn.given_way))
                    await self._refuse(context, method, "body_timeout_s", grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"the request message did not arrive within {self.deadline_s:g} s")
                finally:
                    turn.stop = None
                    if turn.handed_on:  # its reservation went on to another call (its message may have come since)
                        charged = 0
                bound.end_turn(turn)
                if message is aio.EOF:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request message")
                if not bound.keep(charged, len(message)):  # (only a message that came as its turn was handed on)
                    await self._refuse(context, method, turn.given_way, grpc.StatusCode.UNAVAILABLE,
                                       self._gave_way(bound, client, turn.given_way))
                charged = len(message)
                try:
                    request, refusal = (parse(message) if parse is not None else message), None
                except Exception as err:  # noqa: BLE001 - the client's bytes (grpc answered UNKNOWN "Unexpected ...")
                    request, refusal = None, f"the request message is not a {method.rsplit('/', 1)[-1]} request ({err})"
                message = None  # the parsed request holds what is needed; nothing keeps the bytes past an abort
                if refusal is not None:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal)
                try:
                    return await answer(request, context)
                except aio.AbortError as err:
                    # grpc keeps an aborted call's AbortError in the call's state, and its traceback and the
                    # exceptions it was raised from reach back to the request (through finished frames and their
                    # closures): a reference cycle that kept every refused request until the collector's next full
                    # pass (2.4 GB under a flood). Cut below this frame; grpc only needs the AbortError itself.
                    request = None
                    err.__context__ = err.__cause__ = None
                    raise err.with_traceback(None)
            finally:
                bound.end_turn(turn)
                bound.give(charged)

        return grpc.stream_unary_rpc_method_handler(bounded, response_serializer=handler.response_serializer)

    async def _refuse(self, context, method: str, bound: str, code: grpc.StatusCode, message: str) -> None:
        self.refused(bound)
        self.refusals.warning("%s to %s (%s): %s", code.name, method,
                              logged_request_id(dict(context.invocation_metadata() or ())), message)
        await context.abort(code, message)

    async def _client(self, context) -> str | None:
        if self.clients is None:
            return None
        host = self.peer_host(context.peer())
        if not self.clients.reads_headers:  # the common case, every call: no metadata to walk
            return client_key(host)
        forwarded = [value for name, value in context.invocation_metadata() or () if name == "x-forwarded-for"]
        return await self.clients.key(host, forwarded)

    def _client_busy(self, bound: HeldBytes, client: str) -> str:
        return (f"The model is busy with gRPC calls from your address ({client}): {bound.turns_of(client)} are "
                f"sending their messages and {bound.waiting_of(client)} more wait for their turn, past its share "
                "(--max_client_share) while other clients wait; try again shortly.")

    def _gave_way(self, bound: HeldBytes, client: str, setting: str) -> str:
        if setting == "grpc_message_grace_s":
            why = (f"had not come within {bound.grace_s:g} s (--grpc_message_grace_s) and its reservation went to "
                   "another client's waiting call")
        else:
            why = ("had not come and its reservation went to another client's call, past your fair share of them "
                   "(--max_client_share, shared equally among the clients waiting)")
        return (f"The model is busy with gRPC calls from your address ({client}): this call's message {why}; try "
                "again shortly.")

    def _busy(self, bound: HeldBytes, why: str) -> str:
        setting = "--max_body_bytes_held" if bound is self.held else "--max_grpc_health_calls"
        return (f"The model is busy: gRPC messages of up to {self.max_message} bytes each are held or reserved "
                f"({bound.held} of {bound.limit} bytes, {setting}) and {why}; try again shortly.")


def client_share(places: int, share: float) -> int:
    """A client's share of ``places`` (reservations, waiting places): ``share`` of them, one at least."""
    return max(1, int(places * share))
