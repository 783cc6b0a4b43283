"""What one request may hold: its body's deadline, and the adapter's cap on bodies in flight.

An ASGI middleware around the whole app, for every request that has a body:
  * admission: at most MAX_REQUESTS_IN_FLIGHT such requests, declaring at most MAX_BYTES_IN_FLIGHT
    together (a chunked body counts as a full-size upload), are held at once, from the first body
    byte until their answer is sent. Beyond that: 503 with Retry-After at once, before the body is
    read, so the adapter's memory stays bounded however many clients push uploads at it;
  * deadline: the whole body must arrive within BODY_TIMEOUT_S of the request's start; a client
    that trickles or stalls gets 408 and its connection is closed;
  * a response sent before the body was read in full (413, 408, 503, 404 on a POST) closes the
    connection: the unread rest must not be parsed as the next request, nor keep the socket alive.
"""
from __future__ import annotations

import asyncio
import json
import logging

from .config import Settings
from .errors import ClassifyError
from .upload import FORM_OVERHEAD_BYTES

log = logging.getLogger("adapter.limits")


class InFlight:
    """Requests with a body held right now, and the bytes they declared."""

    def __init__(self, max_requests: int, max_bytes: int):
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0

    def try_admit(self, size: int) -> bool:
        if self.requests >= self.max_requests or self.bytes + size > self.max_bytes:
            return False
        self.requests += 1
        self.bytes += size
        return True

    def release(self, size: int) -> None:
        self.requests -= 1
        self.bytes -= size


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
        self.full_upload = settings.max_upload_bytes + FORM_OVERHEAD_BYTES

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = _declared_size(scope, self.full_upload)
        if size is None:
            return await self.app(scope, receive, send)
        if not self.in_flight.try_admit(size):
            log.warning("busy: refused %s %s (%d requests, %d bytes in flight)", scope["method"],
                        scope["path"], self.in_flight.requests, self.in_flight.bytes)
            return await _send_json(send, 503, "The server is busy with other uploads; try again shortly.",
                                    [(b"retry-after", str(self.settings.retry_after_s).encode()),
                                     (b"connection", b"close")])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.body_timeout_s
        body_done = False

        async def timed_receive():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                log.warning("408: the body of %s %s did not arrive within %g s", scope["method"],
                            scope["path"], self.settings.body_timeout_s)
                raise ClassifyError(408, f"The upload did not arrive within {self.settings.body_timeout_s:g} s.") \
                    from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def closing_send(message):
            if message["type"] == "http.response.start" and not body_done:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, timed_receive, closing_send)
        finally:
            self.in_flight.release(size)


async def _send_json(send, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
