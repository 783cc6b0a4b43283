"""Request payload -> normalized image tensor: the handler's input side, testable without TorchServe.

Limits (each refused per image with a 4xx, the server keeps serving):
  * the upload size is capped by TorchServe itself (``max_request_size`` in config.properties:
    413 with an empty body, before the handler sees it);
  * images above their format's pixel limit are refused with 413 *before* their pixels are decoded,
    which also stops decompression bombs (a tiny file that declares a huge canvas): MAX_IMAGE_PIXELS
    for formats decoded at full size (PNG, GIF, WebP, ...), MAX_JPEG_PIXELS for JPEG, which is
    decoded at 1/2..1/8 scale (below). 413 rather than 400: the request is well-formed, just too big
    to process, and a client should not retry it as is.
Cheap decoding: the network sees 32x32, so an image is decoded no larger than it needs. A JPEG is
decoded by libjpeg at a reduced scale (Pillow's draft mode: the DCT is cut to 1/2, 1/4 or 1/8), a
large image of another format is box-reduced by an integer factor after decoding; both keep at least
DECODE_MIN_SIDE pixels on each side, so the final antialiased resize to 32x32 still averages many
source pixels (benchmarks/bench_decode.py measures the CPU and the agreement with a full decode).
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings
import zlib

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from model.normalization import normalize  # noqa: F401 - the handler normalizes through here

# 16 megapixels decoded at full size (~48 MB as RGB): above a 12 MP phone photo or a 5K screenshot
# (14.7 MP); a small PNG bomb must not cost a worker seconds and memory (benchmarks/RESULTS.md).
MAX_IMAGE_PIXELS = 16_000_000
# JPEGs are decoded at up to 1/8 scale, so a 64 MP JPEG (a 48-50 MP sensor's full-resolution photo)
# costs about what a 1 MP one does at full scale.
MAX_JPEG_PIXELS = 64_000_000
# The smallest side an image is decoded to (draft / reduce stop before going below it): 8x the
# network's input. A 12 MP photo still decodes at 1/8 scale (3000 / 8 = 375 px); 256 keeps more
# answers equal to a full decode's than 128 does (benchmarks/RESULTS.md, "Cheap decoding").
DECODE_MIN_SIDE = 256
INPUT_SIZE = 32  # the network was trained on 32x32 CIFAR images
# Where an image may sit in a request: multipart field names, keys of a JSON object, and "body"
# (TorchServe's name for a raw request body, or the parsed object of an application/json body).
IMAGE_FIELDS = ("image", "data", "file", "body")


class ImageRequestError(ValueError):
    """One request's image cannot be classified; ``status`` is the HTTP code its client gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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


def image_bytes(row: dict) -> bytes:
    """The encoded image of one request (TorchServe gives one dict per request)."""
    for field in IMAGE_FIELDS:
        if field in row and row[field] is not None:
            value = row[field]
            break
    else:
        fields = ", ".join(sorted(map(str, row))) or "none"
        raise ImageRequestError(400, f"no image in the request (fields: {fields}); send the image as the "
                                     "request body or as multipart field 'image'")
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


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparent areas become white (how a page shows them)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        # Palette with a transparent entry: go through RGBA so it is composited like real alpha.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (PNG/TIFF) grey: scale the 0..65535 range down to 8 bits rather than clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / 257.0, 0, 255).round().astype(np.uint8), mode="L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0  # float images are usually 0..1
        img = Image.fromarray(np.clip(np.nan_to_num(arr) * scale, 0, 255).round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png_checksums(data: bytes) -> None:
    """Refuse a PNG whose chunk checksums are wrong (a corrupted upload or download).

    Pillow checks them only for some chunks (and then says "cannot identify image file"); a bad
    image-data (IDAT) chunk would otherwise decode into wrong pixels and a confident wrong answer.
    """
    if not data.startswith(PNG_SIGNATURE):
        return
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 12 + length  # length, type, payload, crc
        if end > len(data):
            return  # truncated: decoding reports it
        kind = data[pos + 4:pos + 8]
        if zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise ImageRequestError(400, f"corrupt PNG: checksum mismatch in its {kind.decode('latin-1')!r} chunk")
        if kind == b"IEND":
            return
        pos = end


def _check_pixel_limit(img: Image.Image) -> None:
    """413 naming the limit that applies to this image's format, on its header alone."""
    width, height = img.size
    jpeg = img.format == "JPEG"
    limit = MAX_JPEG_PIXELS if jpeg else MAX_IMAGE_PIXELS
    if width * height > limit:
        kind = "JPEG images" if jpeg else f"{img.format or 'these'} images (JPEG: {MAX_JPEG_PIXELS / 1e6:.0f} MP)"
        raise ImageRequestError(
            413, f"image is {width}x{height} pixels ({width * height / 1e6:.1f} MP), above the "
                 f"{limit / 1e6:.0f} MP limit for {kind}")


def _reduced(img: Image.Image) -> Image.Image:
    """A decoded image box-reduced by the largest integer factor that keeps DECODE_MIN_SIDE."""
    factor = min(img.size) // DECODE_MIN_SIDE
    if factor < 2 or img.mode not in ("RGB", "RGBA", "L", "LA", "RGBa", "La", "I", "F", "I;16"):
        return img
    return img.reduce(factor)


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> upright 8-bit RGB PIL image (first frame of an animation), decoded no larger
    than the 32x32 input needs (see the module's docstring).

    Animated GIF/WebP/APNG: the first frame is classified, as browsers show it as the still.
    """
    check_png_checksums(data)
    try:
        with warnings.catch_warnings():
            # Pillow only *warns* between 1x and 2x its pixel limit; make that a refusal too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_pixel_limit(img)  # on the header, before decoding pixels
            if img.format == "JPEG":
                # libjpeg decodes at 1/2..1/8 scale; the aspect ratio and the EXIF tag are kept.
                img.draft(None, (DECODE_MIN_SIDE, DECODE_MIN_SIDE))
            img = ImageOps.exif_transpose(img)  # phones store portrait photos sideways + EXIF tag
            img.load()
            img = _reduced(img)
    except ImageRequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRequestError(413, f"image refused (possible decompression bomb), above the "
                                     f"{MAX_IMAGE_PIXELS / 1e6:.0f} MP limit: {err}") from err
    except UnidentifiedImageError as err:
        raise ImageRequestError(400, "not an image (or a format Pillow cannot read)") from err
    except MemoryError as err:
        raise ImageRequestError(413, "image too large to decode") from err
    except Exception as err:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, ...) for bad files
        raise ImageRequestError(400, f"corrupt or truncated image: {err}") from err
    return _to_rgb(img)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, 32, 32].

    Like the seed, the whole image is resized to 32x32 (no crop, aspect ratio not kept) with
    Pillow's bilinear filter, which is antialiased when shrinking (its support widens with the
    scale) -- the same call torchvision's ``Resize((32, 32))`` makes on a PIL image. A 32x32 image
    (a CIFAR test image) passes unchanged.
    """
    if img.size != (INPUT_SIZE, INPUT_SIZE):
        img = img.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
