"""Request payload -> normalized image tensor: the handler's input side, testable without TorchServe.

Where the image sits in a request (raw body, multipart field, base64 in JSON) is read here; how it
is decoded (pixel limits, cheap decoding, EXIF, RGB, the 32x32 resize) lives in serving/images.py,
one copy shared with the adapter, which shrinks large uploads with the same rules before they travel.
The upload size is capped by TorchServe itself (``max_request_size`` in config.properties: 413 with
an empty body, before the handler sees it).
"""
from __future__ import annotations

import base64
import binascii

import numpy as np
import torch
from PIL import Image

from model.normalization import normalize  # noqa: F401 - the handler normalizes through here
from serving.client_text import clipped
# The decoding rules, re-exported for the handler, the tests and the benchmarks.
from serving.images import (  # noqa: F401
    DECODE_MIN_SIDE, INPUT_SIZE, MAX_IMAGE_PIXELS, MAX_JPEG_PIXELS, ImageRequestError, checked_png,
    check_request_pixels, decode_image, decode_opened, decoded_slowly, network_input, open_upload, picture_size,
    tile_grid)

# Where an image may sit in a request: multipart field names, keys of a JSON object, and "body"
# (TorchServe's name for a raw request body, or the parsed object of an application/json body).
IMAGE_FIELDS = ("image", "data", "file", "body")


def _decode_base64(text: str) -> bytes:
    """base64 text, optionally as a data: URL ("data:image/png;base64,....")."""
    text = text.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise ImageRequestError(400, "data: URL must be base64 encoded (data:image/...;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageRequestError(
            400, "request text is not base64 image data; send the image bytes as the body, as "
                 "multipart field 'image', or as JSON {\"image\": \"<base64>\"}") from err


# The refusal names a few of the fields found, each cut short: a JSON body sent as a form (curl -d without
# Content-Type: application/json) reaches the handler as one field named by the whole body (megabytes).
ERROR_FIELDS_SHOWN, ERROR_FIELD_CHARS = 3, 40


def _field_names(row: dict) -> str:
    names = sorted(map(str, row))
    shown = [clipped(name, ERROR_FIELD_CHARS) for name in names[:ERROR_FIELDS_SHOWN]]
    more = len(names) - len(shown)
    return ", ".join(shown + ([f"{more} more"] if more else [])) or "none"


def image_bytes(row: dict) -> bytes:
    """The encoded image of one request (TorchServe gives one dict per request)."""
    for field in IMAGE_FIELDS:
        if field in row and row[field] is not None:
            value = row[field]
            break
    else:
        raise ImageRequestError(400, f"no image in the request (fields: {_field_names(row)}); send the image as "
                                     "the request body or as multipart field 'image'; a JSON body needs "
                                     "Content-Type: application/json")
    if isinstance(value, dict):  # an application/json body, parsed by TorchServe
        for key in ("image", "data", "file"):
            if isinstance(value.get(key), str):
                return _decode_base64(value[key])
        raise ImageRequestError(400, "JSON body must look like {\"image\": \"<base64 image>\"}")
    if isinstance(value, str):  # a text/* body or a JSON string: only base64 can be an image
        data = _decode_base64(value) if value.strip() else b""
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        raise ImageRequestError(400, f"unsupported request payload ({type(value).__name__}); send image bytes")
    if not data:
        raise ImageRequestError(400, "empty request: no image data received")
    return data


def located(request, n: int, step, image):
    """``step(image)`` for a request's ``n``-th image; its refusal names where the image sits in a v1/v2
    request (``request``: handler/protocols.py's ParsedRequest; None for a plain one-image request)."""
    try:
        return step(image)
    except ImageRequestError as err:
        if request is None:
            raise
        raise ImageRequestError(err.status, f"{request.where[n]}: {err.message}") from err


def opened_images(request, payloads: list) -> list[Image.Image]:
    """A request's encoded images opened: every header read and checked, the per-image and then the
    per-request pixel limits (MAX_REQUEST_PIXELS) applied, before any pixel is decoded. Refusals:
    ImageRequestError, located in the request."""
    opened = [located(request, n, open_upload, payload) for n, payload in enumerate(payloads)]
    check_request_pixels(opened)
    return opened


def decoded_tensors(request, opened: list) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Opened images -> their [3, 32, 32] uint8 tensors and their pictures' (width, height) (picture_size),
    one image decoded at a time, each let go before the next (``opened`` is emptied): a request of many
    large images holds one image's pixels at a time, not all of them."""
    tensors, sizes = [], []
    for n in range(len(opened)):
        image, opened[n] = located(request, n, decode_opened, opened[n]), None
        tensors.append(image_to_tensor(image))
        sizes.append(picture_size(image))  # the adapter's 32x32 explanation input names its picture's
    return tensors, sizes


# A server with an event loop (KServe's predictor) decodes a request on the loop when its body is at most
# INLINE_DECODE_MAX_BYTES and its images hold at most INLINE_DECODE_MAX_PIXELS in all (64 CIFAR images or one
# 256x256: under a millisecond), else in a thread: the hand-off cost more than such a decode (30% of the
# images/s at concurrency 16, benchmarks/RESULTS.md session 22), and a small file can hold many pixels.
INLINE_DECODE_MAX_BYTES = 64 * 1024
INLINE_DECODE_MAX_PIXELS = 256 * 256


def decodes_inline(body_bytes: int | None, opened: list[Image.Image] | None = None) -> bool:
    """Whether a request of ``body_bytes`` (None: unknown, e.g. chunked) is decoded where it is read;
    with its images ``opened`` (serving.images.open_upload: headers only), whether they are too."""
    if body_bytes is None or body_bytes > INLINE_DECODE_MAX_BYTES:
        return False
    # A tiled TIFF by its whole tiles, which libtiff decodes whole; an RLE BMP, a plain PNM or an AVIF as costly.
    return opened is None or (sum(w * h for w, h in map(tile_grid, opened)) <= INLINE_DECODE_MAX_PIXELS
                              and not any(map(decoded_slowly, opened)))


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, 32, 32] (the resize: serving.images.network_input)."""
    return torch.from_numpy(np.array(network_input(img), dtype=np.uint8)).permute(2, 0, 1)
