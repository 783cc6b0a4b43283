"""A gRPC call made by hand over HTTP/2, for what grpc's own client will not do: send part of a message and
stall (a slow sender). Plain frames on a socket: the connection preface, an empty SETTINGS, the call's
HEADERS (HPACK literals, no Huffman) and one DATA frame holding the start of a length-prefixed message."""
from __future__ import annotations

import socket
import struct
import time

HEADERS, DATA, RST_STREAM, SETTINGS = 0x1, 0x0, 0x3, 0x4
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


# What a client sends first on a connection: the HTTP/2 preface and an empty SETTINGS.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(SETTINGS, 0, 0, b"")


def reset_calls(head: bytes, streams) -> bytes:
    """A call opened (HEADERS ``head``) and reset at once (RST_STREAM CANCEL) on each of ``streams``: HTTP/2's
    "rapid reset"."""
    return b"".join(frame(HEADERS, END_HEADERS, stream, head) + frame(RST_STREAM, 0, stream, (8).to_bytes(4, "big"))
                    for stream in streams)


def literal(name: str, value: str) -> bytes:
    """An HPACK header field without indexing, its name and value as plain strings (under 127 bytes each)."""
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def stalled_call(host: str, port: int, method: str, message_bytes: int, sent_bytes: int, source: str | None = None,
                 metadata: tuple[tuple[str, str], ...] = ()) -> socket.socket:
    """A unary call to ``method`` (``/package.Service/Method``) whose message says it has ``message_bytes`` bytes,
    of which ``sent_bytes`` are sent; the rest never comes. From the address ``source`` (a loopback one: another
    client), with ``metadata`` as headers. The open socket (stream 1)."""
    sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0) if source else None)
    fields = ((":method", "POST"), (":scheme", "http"), (":path", method), (":authority", f"{host}:{port}"),
              ("content-type", "application/grpc"), ("te", "trailers"), *metadata)
    message_start = b"\x00" + struct.pack(">I", message_bytes) + b"\x00" * sent_bytes
    sock.sendall(PREFACE + frame(HEADERS, END_HEADERS, 1, b"".join(literal(n, v) for n, v in fields))
                 + frame(DATA, 0, 1, message_start))
    return sock


def send_rest(sock: socket.socket, rest: bytes) -> None:
    """The rest of stalled_call's message (what its length prefix said, less what was sent), ending the call's
    side of the stream; under 16 KiB (one frame, within the stream's first flow-control window)."""
    sock.sendall(frame(DATA, END_STREAM, 1, rest))


def seconds_until_stream_ends(sock: socket.socket, timeout: float, stream: int = 1) -> float | None:
    """Reads the server's frames until ``stream`` ends (trailers with END_STREAM, or RST_STREAM): the seconds
    that took, or None if it did not within ``timeout`` (or the connection closed first)."""
    started, pending = time.monotonic(), b""
    while (left := started + timeout - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return None
        if not data:
            return None
        pending += data
        while len(pending) >= 9 and len(pending) >= 9 + int.from_bytes(pending[:3], "big"):
            size, kind, flags = int.from_bytes(pending[:3], "big"), pending[3], pending[4]
            on = int.from_bytes(pending[5:9], "big") & 0x7FFFFFFF
            if on == stream and (kind == RST_STREAM or (kind == HEADERS and flags & END_STREAM)):
                return time.monotonic() - started
            if kind == SETTINGS and not flags & ACK:
                sock.sendall(frame(SETTINGS, ACK, 0, b""))
            pending = pending[9 + size:]
    return None
