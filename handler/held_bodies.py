"""The bound on request bodies KServe's model server holds at once (``--max_body_bytes_held``,
handler/kserve_predictor.py): in RawDeployment nothing in front of it bounds its connections, and 64
clients sending two bodies of 11 MiB each held it at 1.9 GB over REST and 3.4 GB over gRPC.

REST bodies are counted as their bytes arrive and refused (503) when they would pass the bound: a REST
body shows its progress. A gRPC message does not: grpc hands it over whole, so each gRPC call reserves the
largest message it may carry (``grpc_max_receive_message_length``) before its message is read, waiting its
turn, and keeps only its message's size once read. REST and gRPC have a bound each, so that gRPC calls
waiting for their turn never refuse a REST body.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque

import grpc
from grpc import aio

from handler.protocols import logged_request_id
from serving.throttled_log import ThrottledLog

logger = logging.getLogger("handler.held_bodies")


class HeldBytes:
    """Bytes held at once by the requests under way in one event loop, against ``limit``: ``take`` what has
    arrived or is declared (False, nothing taken, when it would pass the limit), ``reserve`` waiting for a
    turn in order of arrival, ``give`` back."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._turns: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._turns)

    def fits(self, size: int) -> bool:
        return self.held + size <= self.limit

    def take(self, size: int) -> bool:
        if not self.fits(size):
            return False
        self.held += size
        return True

    def take_turn(self, size: int) -> bool:
        """``size`` taken at once if no turn waits before it and it fits (False: nothing taken)."""
        return not self._turns and self.take(size)

    async def reserve(self, size: int) -> None:
        """``size`` taken when the bytes held and the turns before this one allow it; a caller that stops waiting
        (cancelled, timed out) leaves nothing taken."""
        if self.take_turn(size):
            return
        turn = asyncio.get_running_loop().create_future()
        self._turns.append((size, turn))
        try:
            await turn
        except BaseException:
            if turn.done() and not turn.cancelled():  # granted just as it stopped waiting
                self.give(size)
            elif (size, turn) in self._turns:
                self._turns.remove((size, turn))
                self._grant()  # the turns behind it may fit now
            raise

    def give(self, size: int) -> None:
        self.held -= size
        self._grant()

    def _grant(self) -> None:
        while self._turns and (self._turns[0][1].done() or self.fits(self._turns[0][0])):
            size, turn = self._turns.popleft()
            if not turn.done():  # a cancelled turn is left to its owner
                self.held += size
                turn.set_result(None)


class GrpcMessageBound(aio.ServerInterceptor):
    """gRPC's share of the bound, first among the server's interceptors: every unary call reserves
    ``max_message`` bytes of ``held`` before its message is read, then keeps the message's size until its
    answer is sent. A call finds UNAVAILABLE (busy) when ``max_waiting`` calls already wait for their turn, or
    when its turn has not come within ``deadline_s``; DEADLINE_EXCEEDED when its message has not arrived
    within ``deadline_s`` of the call's start (a slow sender holds a reservation no longer; gRPC shows no
    progress within a message, so there is no rate to require as over REST). The call is read as
    client-streaming to get its context before its message: a unary client sends the same frames."""

    def __init__(self, held: HeldBytes, max_message: int, max_waiting: int, deadline_s: float,
                 refused=lambda bound: None):
        self.held, self.max_message, self.max_waiting, self.deadline_s = held, max_message, max_waiting, deadline_s
        self.refused = refused  # called with the bound's setting (max_body_bytes_held, body_timeout_s) per refusal
        self.refusals = ThrottledLog(logger)  # a flood: one line a second

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        answer, parse, method = handler.unary_unary, handler.request_deserializer, handler_call_details.method

        async def bounded(_requests, context):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.deadline_s
            if self.held.waiting >= self.max_waiting:
                await self._refuse(context, method, "max_body_bytes_held", grpc.StatusCode.UNAVAILABLE,
                                   self._busy(f"{self.held.waiting} calls wait"))
            try:
                if not self.held.take_turn(self.max_message):  # its turn now, without a timer; else it waits
                    async with asyncio.timeout_at(deadline):
                        await self.held.reserve(self.max_message)
            except TimeoutError:
                await self._refuse(context, method, "max_body_bytes_held", grpc.StatusCode.UNAVAILABLE,
                                   self._busy(f"no turn came in {self.deadline_s:g} s"))
            charged = self.max_message
            try:
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await context.read()  # its bytes: parsed below, where a bad one is named
                except TimeoutError:
                    await self._refuse(context, method, "body_timeout_s", grpc.StatusCode.DEADLINE_EXCEEDED,
                                       f"the request message did not arrive within {self.deadline_s:g} s")
                if message is aio.EOF:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request message")
                self.held.give(charged - len(message))
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
                self.held.give(charged)

        return grpc.stream_unary_rpc_method_handler(bounded, response_serializer=handler.response_serializer)

    async def _refuse(self, context, method: str, bound: str, code: grpc.StatusCode, message: str) -> None:
        self.refused(bound)
        self.refusals.warning("%s to %s (%s): %s", code.name, method,
                              logged_request_id(dict(context.invocation_metadata() or ())), message)
        await context.abort(code, message)

    def _busy(self, why: str) -> str:
        return (f"The model is busy: gRPC messages of up to {self.max_message} bytes each are held or reserved "
                f"({self.held.held} of {self.held.limit} bytes, --max_body_bytes_held) and {why}; try again shortly.")

