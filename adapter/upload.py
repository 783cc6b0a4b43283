"""Reading the `image` field of a multipart upload while it streams in, with a size limit.

FastAPI's `UploadFile` parameters only reach the endpoint after the whole body has been received
(and spooled to disk), so a 2 GB upload would be read in full before it could be refused. Here the
body is fed chunk by chunk to python-multipart's streaming parser and counted as it arrives:
  * a Content-Length larger than the limit is refused before a single body byte is read;
  * a body without Content-Length (chunked) is refused as soon as the count passes the limit;
  * the `image` part itself may hold at most `max_upload_bytes`; the rest of the form (part
    headers, boundaries, small extra fields) may add FORM_OVERHEAD_BYTES;
  * the form may hold at most MAX_FORM_PARTS parts (400 at the next one): the parser runs on the
    event loop, and each part costs it far more than its bytes (10 MB of tiny parts took seconds of
    CPU, every other client waiting). python-multipart bounds each part's headers itself (8 headers
    of 4 KB). The delimiters are counted too, at C speed, before the parser sees a chunk: near-matches
    of the boundary (`\r\n--aX` repeated, boundary `a`) start no part but cost the parser 0.8 s of
    CPU per MB; in a valid form each delimiter starts or ends a part;
  * the boundary has 1-70 characters (RFC 2046): python-multipart fails on one over 256.
Only the `image` part is kept (in memory: at most `max_upload_bytes`); other parts are skipped. A second
`image` part is refused (400): the seed answered for the last one silently, the caller meant one of them.
"""
from __future__ import annotations

from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from .errors import ClassifyError

IMAGE_FIELD = "image"
MAX_BOUNDARY_LENGTH = 70  # RFC 2046
# Room for multipart boundaries, part headers and a few small extra fields beside the image.
FORM_OVERHEAD_BYTES = 64 * 1024


def upload_body_limit(max_upload_bytes: int) -> int:
    """The largest body an upload of a `max_upload_bytes` image may have (what a chunked one counts as)."""
    return max_upload_bytes + FORM_OVERHEAD_BYTES


@dataclass
class ImageUpload:
    data: bytes | bytearray


def binary_size(n: int) -> str:
    """10485760 -> "10 MiB", 20000 -> "19.5 KiB": the units MAX_UPLOAD_BYTES is documented in, to a tenth rounded
    half up in whole numbers (the page's formatBytes in frontend/app.js says sizes the same way, digit for digit)."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        tenths = (n * 10 + scale // 2) // scale
        if tenths >= 10:  # (the unit chosen on the rounded value: 1048552 is "1 MiB", not "1024 KiB")
            return f"{tenths // 10}" + (f".{tenths % 10}" if tenths % 10 else "") + f" {unit}"
    return f"{n} bytes"


def too_large(max_bytes: int) -> ClassifyError:
    return ClassifyError(413, f"The image is too large: the limit is {binary_size(max_bytes)}.")


def too_many_parts(max_parts: int) -> ClassifyError:
    return ClassifyError(400, f"The form has too many parts: the limit is {max_parts}. "
                              "Send the image in one field named 'image'.")


class _DelimiterCount:
    """The form's delimiters (CRLF, "--", the boundary) seen so far, counted chunk by chunk, also across
    chunk borders: bytes.count runs at C speed, the multipart parser at Python's."""

    def __init__(self, boundary: bytes):
        self.delimiter = b"\r\n--" + boundary
        self._tail = b""  # the last len(delimiter) - 1 bytes: a delimiter may begin there
        self.count = 0

    def add(self, chunk: bytes) -> int:
        keep = len(self.delimiter) - 1
        self.count += (self._tail + chunk[:keep]).count(self.delimiter) + chunk.count(self.delimiter)
        self._tail = bytes(chunk[-keep:]) if len(chunk) >= keep else (self._tail + chunk)[-keep:]
        return self.count


class _ImageCollector:
    """python-multipart callbacks that keep the `image` part, count its bytes and the parts."""

    def __init__(self, max_bytes: int, max_parts: int):
        self.max_bytes = max_bytes
        self.max_parts = max_parts
        self.parts = 0
        self.image: ImageUpload | None = None
        self._buffer: bytearray | None = None
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise too_many_parts(self.max_parts)
        self._headers = {}
        self._buffer = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if options.get(b"name") == IMAGE_FIELD.encode():
            if self.image is not None:
                raise ClassifyError(400, f"The form has more than one field named '{IMAGE_FIELD}': "
                                         "send one image per request.")
            self._buffer = bytearray()

    @property
    def image_started(self) -> bool:
        """An `image` part began but its closing boundary never came (a cut-off body)."""
        return self._buffer is not None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._buffer is None:
            return
        self._buffer += data[start:end]
        if len(self._buffer) > self.max_bytes:
            raise too_large(self.max_bytes)

    def on_part_end(self) -> None:
        if self._buffer is None:
            return
        # The bytearray itself: a copy would double what an upload holds.
        self.image = ImageUpload(data=self._buffer)
        self._buffer = None


async def read_image_upload(request: Request, max_bytes: int, max_parts: int) -> ImageUpload:
    """The `image` field of a multipart/form-data request, or a ClassifyError (400 / 413)."""
    mime, params = parse_options_header(request.headers.get("content-type", ""))
    if mime != b"multipart/form-data" or not params.get(b"boundary"):
        raise ClassifyError(400, "Send the image as multipart/form-data in a field named 'image'.")
    boundary = params[b"boundary"]
    if len(boundary) > MAX_BOUNDARY_LENGTH:
        raise ClassifyError(400, f"The multipart boundary is {len(boundary)} characters long: "
                                 f"at most {MAX_BOUNDARY_LENGTH} are allowed.")

    body_limit = upload_body_limit(max_bytes)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise ClassifyError(400, "The Content-Length header is not a number.") from None
        if declared_bytes > body_limit:
            # Refused before reading the body: the client is told at once, not after uploading it.
            raise too_large(max_bytes)

    collector = _ImageCollector(max_bytes, max_parts)
    parser = MultipartParser(boundary, collector.callbacks())
    delimiters = _DelimiterCount(boundary)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > body_limit:
                raise too_large(max_bytes)
            # A form of n parts has n + 1 delimiters, n counted here when the first opens the body.
            if delimiters.add(chunk) > max_parts + 1:
                raise too_many_parts(max_parts)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as err:
        raise ClassifyError(400, f"The multipart form could not be read: {err}") from None
    # (A client gone mid-upload raises ClientDisconnect: no answer, adapter/edge.py records it as 499.)

    if collector.image is None and collector.image_started:
        raise ClassifyError(400, "The upload ended before the image was complete.")
    if collector.image is None:
        raise ClassifyError(400, "No image uploaded: send the file in a form field named 'image'.")
    if not collector.image.data:
        raise ClassifyError(400, "The uploaded file is empty.")
    return collector.image
