"""Encoded image -> the picture the network sees, and when an upload is shrunk before it travels:
one copy of these rules, Pillow only (no torch, no numpy). The handler decodes with it (packed into
the archive beside serving/settings.py); the adapter shrinks large uploads with it; the page is told
its part of the rules by the adapter (GET /settings).

Limits (each refused with a 4xx before any pixel is decoded, the server keeps serving):
  * images above their format's pixel limit are refused with 413 on their header alone, which also
    stops decompression bombs (a tiny file that declares a huge canvas): MAX_IMAGE_PIXELS for formats
    decoded at full size (PNG, GIF, WebP, ...), MAX_JPEG_PIXELS for JPEG, which is decoded at 1/2..1/8
    scale (below); so is an image of another format than JPEG with a side above MAX_IMAGE_SIDE (a thin
    one costs more per pixel). A tiled TIFF counts its whole tiles (tile_grid), also to be shrunk: libtiff decodes
    each tile whole, so a 16x16 one of one 8192x8192 tile cost 64 MB (pixels, not bytes, as for every format: Pillow
    reads 8 bytes a pixel at most; strips stop at the image's last row whatever RowsPerStrip says). 413 rather
    than 400: the request is well-formed, just too big to process, and a client should not retry it as is. (The
    upload's byte size is capped before: by the adapter, and by TorchServe's max_request_size.)
  * a v1/v2 request's images together: MAX_REQUEST_PIXELS as decoded (check_request_pixels), 413 on
    their headers too;
  * formats: only ACCEPTED_FORMATS are opened (400 for the rest);
  * a JPEG of more than MAX_JPEG_SCANS scans is refused (400), counted on its markers;
  * metadata read block by block (a JPEG's marker segments, a PNG's chunks, what precedes a GIF's first
    picture, a PPM's header) is bounded before Pillow opens the file: a file of empty blocks would cost
    by their count, not by its pixels (block_limit, MAX_PPM_HEADER_BYTES: 400); a PNG's compressed metadata,
    which Pillow would inflate, is left out unread (checked_png);
  * formats Pillow decodes in Python are bounded by their pixels, bytes or samples (MAX_BMP_RLE_PIXELS,
    MAX_BMP_RLE_BYTES, MAX_PLAIN_PNM_BYTES, MAX_SCALED_PNM_SAMPLES: 413), a TIFF by its strips or tiles
    (MAX_TIFF_CHUNKS: 413), an AVIF by its AV1 frames, whatever size it declares (serving/avif.py: 413);
  * EXIF metadata above MAX_EXIF_BYTES is refused (413), and a TIFF directory of more than
    MAX_TIFF_TAGS entries (400): of EXIF only the Orientation tag is read, by image_orientation.
Cheap decoding: the network sees 32x32, so an image is decoded no larger than it needs. A JPEG is
decoded by libjpeg at a reduced scale (Pillow's draft mode: the DCT is cut to 1/2, 1/4 or 1/8), a
large image of another format is box-reduced by an integer factor after decoding; both keep at least
DECODE_MIN_SIDE pixels on each side, so the final antialiased resize to 32x32 still averages many
source pixels (benchmarks/bench_decode.py measures the CPU and the agreement with a full decode).

Shrinking where the photo enters (the adapter, the page): an upload above SHRINK_MIN_BYTES or
SHRINK_MIN_PIXELS, of any format, is decoded by the adapter with these same rules and forwarded
as the network's own 32x32 input (a lossless PNG of a few KB; for an explanation, the same pixels
with the decoded picture's size named in the PNG, which the heatmap follows: picture_size). The
handler's decode of that PNG is the identity, so the answer, /classify/'s and /explain/'s alike, is
bit for bit the one the whole file gets (tests/test_shrink.py). The page cannot reproduce
Pillow's pixels; it sends the photo with its shorter side at DECODE_MIN_SIDE, the most the handler
would decode anyway, as a JPEG (PAGE_JPEG_QUALITY): agreement with the full path measured in
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import io
import re
import struct
import zlib

from PIL import Image, ImageMath, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from serving.avif import NotReadable, av1_frame_pixels

# 16 megapixels decoded at full size (~48 MB as RGB): above a 12 MP phone photo or a 5K screenshot
# (14.7 MP); a small PNG bomb must not cost a worker seconds and memory (benchmarks/RESULTS.md).
MAX_IMAGE_PIXELS = 16_000_000
# The longest side of an image decoded at full size (not JPEG: libjpeg's draft scale and the format's
# own 65,535 keep its cost to its pixels). A PNG pays per row as well as per pixel, and the resize to
# 32x32 widens a thin image 32 times first: a 60 KB PNG of 1x16,000,000 cost the adapter 1.2 s of CPU,
# 7x a 4000x4000 one; at most 32,768 (a 1080 px wide scrolling screenshot of 16 MP is 14,800 long),
# 488x32,768 costs 1.3x (benchmarks/RESULTS.md, session 27).
MAX_IMAGE_SIDE = 32_768
# JPEGs are decoded at up to 1/8 scale, so a 64 MP JPEG (a 48-50 MP sensor's full-resolution photo)
# costs about what a 1 MP one does at full scale.
MAX_JPEG_PIXELS = 64_000_000
# A tiled TIFF is decoded in whole tiles: tiles as writers make them (libtiff's and GDAL's 256, up to 512) pad an
# image by less than a tile, and that padding does not count against the pixel limit (4000x4000 in 256x256 tiles,
# 16 MP, decodes 4096x4096), up to a sixteenth of the limit (a thin 513x31189 would pad to twice it); larger tiles
# do count (a 16x16 TIFF of one 8192x8192 tile decodes 64 MP).
ORDINARY_TILE_SIDE = 512
# What one request's images may cost to decode in all (a v1/v2 request carries up to 64): pixels as
# decoded, a JPEG's at the scale libjpeg decodes it at (decoded_pixels). Without it, 64 images of 16 MP
# held a worker past TorchServe's responseTimeout with a second such request in the batch, which
# restarts the worker and fails the batch's other requests (benchmarks/RESULTS.md, session 25).
MAX_REQUEST_PIXELS = 64_000_000
# The smallest side an image is decoded to (draft / reduce stop before going below it): 8x the
# network's input. A 12 MP photo still decodes at 1/8 scale (3000 / 8 = 375 px); 256 keeps more
# answers equal to a full decode's than 128 does (benchmarks/RESULTS.md, "Cheap decoding").
DECODE_MIN_SIDE = 256
INPUT_SIZE = 32  # the network was trained on 32x32 CIFAR images

# --- shrinking uploads where they enter (the adapter; the page through GET /settings) -------------
# The formats the page shrinks (a browser's canvas decodes them), as Pillow names them (MPO: a JPEG with
# multi-picture data, as phones write), with the MIME types the page sees. The adapter shrinks every format.
SHRINK_FORMATS = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# Uploads larger than this, or with more pixels than SHRINK_MIN_PIXELS, are shrunk; smaller ones
# cost less to carry than to shrink (a CIFAR-size PNG is ~3 KB).
SHRINK_MIN_BYTES = 256 * 1024
SHRINK_MIN_PIXELS = 1_000_000
# The page's encoding of what it sends (JPEG: a 12 MP photo becomes ~10-40 KB; the page's
# agreement with the full path is the same as with a lossless PNG, benchmarks/RESULTS.md).
PAGE_SHRINK_TYPE = "image/jpeg"
PAGE_JPEG_QUALITY = 0.92
# The key of the text chunk in which an explanation's 32x32 PNG names the size of the picture it was made
# from (what the heatmap's aspect follows: picture_size), as "<width>x<height>".
PICTURE_SIZE_KEY = "picture-size"
PNG_FAST = 1  # zlib level of the adapter's lossless PNGs: a few KB either way, level 1 is fastest

# The formats opened at all, as Pillow's openers name them: what browsers, phones and cameras write,
# TIFF and netpbm. Not Pillow's other readers: some decode pixels while opening, before the pixel limit
# can refuse them (an ICO or ICNS holding a huge PNG, tests/test_serving_preprocessing.py); the rest
# are niche.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "PPM")
# The server's words for a file of another format (400), which the page says too before uploading one.
FORMAT_REFUSAL = ("not an image in a format the server reads ("
                  + ", ".join("WebP" if name == "WEBP" else name for name in ACCEPTED_FORMATS) + ")")
# Decoded by libjpeg (draft mode), under MAX_JPEG_PIXELS. MPO: the JPEG opener's name for a JPEG with
# multi-picture data, as many cameras and phones write.
JPEG_FORMATS = {"JPEG", "MPO"}
# Scans of one JPEG: libjpeg decodes every scan over the whole picture, whatever the draft scale, and
# a scan that changes nothing costs ~30 bytes: a 156 KB JPEG (4000x4000) of 2,000 repeated scans cost
# a decode 24 s of CPU (benchmarks/RESULTS.md, session 26). Encoders write 1-3 (baseline) or 6-18
# (progressive: grey, colour, CMYK).
MAX_JPEG_SCANS = 32
# A photo's EXIF block (a phone's or camera's metadata), of which the server reads the Orientation tag
# alone: larger blocks are refused. A JPEG's (its APP1 segment) cannot exceed 64 KB; PNG's eXIf and
# WebP's and AVIF's EXIF have no cap, and Pillow's EXIF code (ImageOps.exif_transpose, AVIF's opener)
# took ~100 us per entry: a 240 KB PNG cost a worker 2 s, 720 KB 7 s (benchmarks/RESULTS.md, session 26).
MAX_EXIF_BYTES = 64 * 1024
# Metadata blocks read one by one in Python, by Pillow's openers and the walks here: a JPEG's marker segments
# (~2 us each), a PNG's chunks (~3.5 us), a GIF's extension sub-blocks and stray bytes before its first picture
# (~0.3 us). Padded with empty ones, 256 KB cost 76-130 ms against 1.2 ms for a PNG of real pixels, and a 10 MB
# JPEG 4.5 s and +342 MB (benchmarks/RESULTS.md, session 41). A file may hold MAX_BLOCKS, or one per
# BLOCK_BYTES of its size if more: real files hold tens (a PNG's image data comes in chunks of 8 KB or more, a
# JPEG's large metadata in segments of up to 64 KB); then 10 MB of blocks cost ~45 ms at most.
MAX_BLOCKS = 1024
BLOCK_BYTES = 1024
# A PPM's header (magic, sizes, maximum value, comments) is read a byte at a time (~0.3 us each): it must end
# within this many bytes (netpbm writes ~15, GIMP ~60 with its comment).
MAX_PPM_HEADER_BYTES = 4096
# Formats Pillow decodes in Python, by their pixels and their bytes: a BMP compressed with RLE (RLE8, RLE4: 60-90 ns
# a pixel, rows padded a byte at a time after their end-of-line up to 160 ns at 1 MP: 3 KB of 16 MP cost a worker
# 2 s, 5 KB of 1 MP 0.15-0.33 s; and ~0.2 us a two-byte code, of no pixel once its row is full: 9 MB of them 2.9 s)
# and plain (text) PNM, P1-P3 (~0.25 us a number, and comments cost by the square of their count: 1 MB of them
# 12 s) (sessions 46, 59). Real ones are small (icons, teaching files, 640x480 screens): at these limits 35-65 ms.
MAX_BMP_RLE_PIXELS = 640 * 640
MAX_BMP_RLE_BYTES = 256 * 1024
MAX_PLAIN_PNM_BYTES = 64 * 1024
# ... and a binary PNM (P5, P6) whose maximum value is not 255 (but a grey one's 65535), scaled a sample at a time
# (~0.9 us each: a 9.9 MB PGM of maximum 254 cost the adapter 8.9 s, two of them held both shrinking threads;
# session 58). Such files are rare (16-bit scans): 65,536 samples (a 256x256 grey picture, 147x147 in colour) cost
# ~60 ms of CPU on an AVX2 EPYC, the decode included.
MAX_SCALED_PNM_SAMPLES = 65_536
# Strip or tile offsets a TIFF's first image may list, however its size and layout divide it: Pillow makes a Python
# tile entry of each as it opens the file (on the adapter's event loop for a small upload) and runs a decoder per
# entry (~8 us each in all): a 250 KB TIFF of 1x16,000 RGBA pixels, one row a strip and a plane a channel (64,000
# entries) cost 0.5 s, and 4 in flight took another client's answer from 14 ms to 2-2.6 s (session 60). Writers use
# 8-64 KB strips: a 10 MiB file needs at most ~1,300 (at this bound ~33 ms).
MAX_TIFF_CHUNKS = 4096
# Entries in one directory of a TIFF (its first image's, and the Exif, GPS and Interop directories that
# Pillow reads whole while loading it): real files have 10-150; Pillow's reader takes ~9 us per entry.
MAX_TIFF_TAGS = 512


class ImageRequestError(ValueError):
    """One request's image cannot be classified; ``status`` is the HTTP code its client gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def block_limit(size: int) -> int:
    """The metadata blocks a file of ``size`` bytes may hold (MAX_BLOCKS, BLOCK_BYTES)."""
    return max(MAX_BLOCKS, size // BLOCK_BYTES)


def _too_many_blocks(what: str, size: int) -> ImageRequestError:
    return ImageRequestError(400, f"{what} refused: more than {block_limit(size):,} in a file of {size:,} bytes "
                                  f"(at most {MAX_BLOCKS:,}, or one per {BLOCK_BYTES} bytes; real files hold tens)")


def checked_png(data: bytes) -> bytes:
    """A PNG's chunks checked: refused when a checksum is wrong (a corrupted upload or download), or when it has
    more chunks than block_limit; and what Pillow opens: the PNG itself, or a copy without its compressed metadata
    (zTXt, iCCP, a compressed iTXt). Another format's bytes as they are.

    Pillow checks the checksums only for some chunks (and then says "cannot identify image file"); a bad
    image-data (IDAT) chunk would otherwise decode into wrong pixels and a confident wrong answer. Pillow inflates
    each compressed metadata chunk, up to 1 MB (its MAX_TEXT_CHUNK), as it reads it, counted against its
    MAX_TEXT_MEMORY or not (an iCCP, a stream broken at 1 MB): 60 of 1 KB, a 66 KB file, cost the adapter's event loop
    0.2 s, and 8 still cost a worker 25 ms (session 59). Nothing here reads them (no colour management, no text but
    the explanation PNG's own tEXt, PICTURE_SIZE_KEY): left out unread, the pixels the same.
    """
    if not data.startswith(PNG_SIGNATURE):
        return data
    pos, chunks, limit = len(PNG_SIGNATURE), 0, block_limit(len(data))
    kept, kept_from = [], 0  # the spans kept, once a chunk is left out
    while pos + 12 <= len(data):
        chunks += 1
        if chunks > limit:
            raise _too_many_blocks("PNG of this many chunks", len(data))
        length = int.from_bytes(data[pos:pos + 4], "big")
        end = pos + 12 + length  # length, type, payload, crc
        if end > len(data):
            break  # truncated: decoding reports it
        kind = data[pos + 4:pos + 8]
        if zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise ImageRequestError(400, f"corrupt PNG: checksum mismatch in its {kind.decode('latin-1')!r} chunk")
        if kind == b"IEND":
            break
        if kind in (b"zTXt", b"iCCP") or kind == b"iTXt" and _compressed_itxt(data[pos + 8:end - 4]):
            kept.append(data[kept_from:pos])
            kept_from = end
        pos = end
    return data if not kept else b"".join(kept) + data[kept_from:]


def _compressed_itxt(payload: bytes) -> bool:
    """An iTXt chunk's compression flag: the byte after its keyword's NUL."""
    flag_at = payload.find(b"\0") + 1
    return 0 < flag_at < len(payload) and payload[flag_at] != 0


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparent areas become white (how a page shows them)."""
    keyed = "transparency" in img.info  # a palette entry, or a PNG's one transparent grey or colour (tRNS)
    if img.mode == "RGB" and not keyed:
        return img
    if img.mode in ("P", "L", "RGB", "1"):
        # A transparent colour: through RGBA, so it is composited like real alpha.
        img = img.convert("RGBA" if keyed else "RGB")
    elif img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (PNG/TIFF) grey: scale the 0..65535 range down to 8 bits (rounded) rather than
        # clipping at 255. point() on an "I" image truncates; converting to "L" clips to 0..255.
        wide = img.convert("I")
        img = wide.point(lambda v: v / 257 + 0.5).convert("L")
        if keyed:  # the transparent grey is a 16-bit value: alpha 0 where a pixel has it (Pillow's RGBA has none)
            key = wide.info["transparency"]
            alpha = ImageMath.lambda_eval(lambda args: (args["grey"] != key) * 255, grey=wide).convert("L")
            img = Image.merge("LA", (img, alpha))
    elif img.mode == "F":
        _, high = img.getextrema()
        scale = 255.0 if high <= 1.0 else 1.0  # float images are usually 0..1
        img = img.point(lambda v: v * scale + 0.5).convert("L")  # rounded, clipped to 0..255
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...


# A marker after entropy-coded data: 0xFF then neither 0x00 (a stuffed 0xFF byte) nor a restart marker
# (inside a scan). Fill bytes (0xFF runs) need no pattern of their own: the run's last 0xFF is the match, found
# in linear time (as `\xff+` the search backtracked from every start in a run: quadratic).
_NEXT_MARKER = re.compile(rb"\xff([^\x00\xff\xd0-\xd7])")
_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}
_SOS, _EOI = 0xDA, 0xD9
_JPEG_SIGNATURE = b"\xff\xd8\xff"  # SOI and the next marker's 0xFF: how Pillow's JPEG opener knows one


def jpeg_markers(data: bytes | bytearray) -> tuple[int, int]:
    """(markers, scans): how many markers and scans (SOS segments) a JPEG's first picture holds, counted
    on its markers: segments skipped by their length, scans' entropy-coded data searched for the next
    marker. Stops at the first picture's end (an MPO's other pictures, never decoded, come after it), one
    scan past MAX_JPEG_SCANS, or one marker past block_limit."""
    markers, scans, pos, limit = 0, 0, 2, block_limit(len(data))  # after SOI
    while scans <= MAX_JPEG_SCANS and markers <= limit:
        found = _NEXT_MARKER.search(data, pos)
        if found is None:
            break
        marker, pos = found.group(1)[0], found.end()
        if marker == _EOI:
            break
        markers += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker == _SOS:
            scans += 1
        pos += int.from_bytes(data[pos:pos + 2], "big")  # the segment's length counts its own 2 bytes
    return markers, scans


def _check_jpeg_markers(data: bytes | bytearray) -> None:
    markers, scans = jpeg_markers(data)
    if scans > MAX_JPEG_SCANS:
        raise ImageRequestError(
            400, f"JPEG of more than {MAX_JPEG_SCANS} scans refused (encoders write at most 18; each "
                 "scan is decoded over the whole picture)")
    if markers > block_limit(len(data)):
        raise _too_many_blocks("JPEG of this many marker segments", len(data))


_GIF_EXTENSION, _GIF_PICTURE, _GIF_TRAILER = 0x21, 0x2C, 0x3B


def _check_gif_blocks(data: bytes | bytearray) -> None:
    """Refuse a GIF with more than block_limit blocks before its first picture, as Pillow's opener reads
    them: each extension's sub-blocks, and every stray byte (which it skips one at a time)."""
    if len(data) < 13:
        return  # Pillow says what is wrong
    pos, blocks, limit = 13, 0, block_limit(len(data))
    if data[10] & 0x80:  # a global colour table of 3 * 2**(n+1) bytes
        pos += 3 << ((data[10] & 7) + 1)
    while pos < len(data) and data[pos] not in (_GIF_PICTURE, _GIF_TRAILER):
        if data[pos] == _GIF_EXTENSION:
            pos += 2  # introducer, label
            while pos < len(data) and blocks <= limit:
                size = data[pos]
                pos += 1 + size
                blocks += 1
                if size == 0:
                    break
        else:
            pos += 1
            blocks += 1
        if blocks > limit:
            raise _too_many_blocks("GIF of this many blocks before its first picture", len(data))


_PPM_MAGIC = re.compile(rb"P[0-6fy]")  # Pillow's PPM opener's first bytes (its _accept)


def _check_bmp_rle(data: bytes | bytearray) -> None:
    """Refuse a BMP compressed with RLE (its info header's compression 1 or 2) of more than MAX_BMP_RLE_PIXELS or
    MAX_BMP_RLE_BYTES."""
    if len(data) < 34 or int.from_bytes(data[14:18], "little") < 40:
        return  # an OS/2 header has no compression field; Pillow says what is wrong
    width, height, _, _, compression = struct.unpack_from("<iiHHI", data, 18)
    if compression not in (1, 2):
        return
    if abs(width) * abs(height) > MAX_BMP_RLE_PIXELS:
        raise ImageRequestError(
            413, f"BMP compressed with RLE of {abs(width)}x{abs(height)} pixels refused: above the "
                 f"{MAX_BMP_RLE_PIXELS:,}-pixel limit for RLE, decoded slowly: save it as PNG")
    if len(data) > MAX_BMP_RLE_BYTES:
        raise ImageRequestError(
            413, f"BMP compressed with RLE of {len(data) / 1024:.0f} KB refused: above the {MAX_BMP_RLE_BYTES // 1024} "
                 "KB limit for RLE, decoded slowly: save it as PNG")


def _check_plain_pnm(data: bytes | bytearray) -> None:
    """Refuse a plain (text) PNM, P1-P3, of more than MAX_PLAIN_PNM_BYTES."""
    if data[:2] in (b"P1", b"P2", b"P3") and len(data) > MAX_PLAIN_PNM_BYTES:
        raise ImageRequestError(
            413, f"plain (text) PNM of {len(data) / 1024:.0f} KB refused: above the {MAX_PLAIN_PNM_BYTES // 1024} KB "
                 "limit for P1-P3, read a number at a time: save it as binary PNM (P4-P6) or PNG")


def _check_scaled_pnm(img: Image.Image) -> None:
    """Refuse a binary PNM that Pillow scales to 8 bits in Python (its "ppm" decoder) of more than
    MAX_SCALED_PNM_SAMPLES samples, on its header."""
    if img.format != "PPM" or not img.tile or img.tile[0][0] != "ppm":
        return
    width, height = img.size
    samples = width * height * len(img.getbands())
    if samples > MAX_SCALED_PNM_SAMPLES:
        maxval = img.tile[0][3][1]  # (the decoder's args: raw mode, maximum value)
        raise ImageRequestError(
            413, f"binary PNM of {width}x{height} pixels with maximum value {maxval} refused: above the "
                 f"{MAX_SCALED_PNM_SAMPLES:,}-sample limit for a maximum value other than 255, scaled a sample at "
                 "a time: save it as PNG")


def _check_ppm_header(data: bytes | bytearray) -> None:
    """Refuse a PPM whose header does not end within MAX_PPM_HEADER_BYTES: Pillow's own header reader run on
    that many bytes must find it there."""
    if len(data) <= MAX_PPM_HEADER_BYTES:
        return  # its cost is bounded; Pillow says what is wrong
    try:
        Image.open(io.BytesIO(bytes(data[:MAX_PPM_HEADER_BYTES])), formats=("PPM",))
    except Exception:  # noqa: BLE001 - Pillow's many error types: a header that does not end here
        raise ImageRequestError(400, f"PPM header refused: it does not end within its first {MAX_PPM_HEADER_BYTES:,} "
                                     "bytes (or is corrupt)") from None


def _pixel_limit(image_format: str | None, progressive: bool = False) -> tuple[int, str]:
    """The pixel limit for an image of this format (None: unknown, not JPEG), and the words naming it. A progressive
    JPEG has the limit of other formats: libjpeg holds its whole picture's coefficients, whatever the draft scale,
    to decode each scan (64 MP: 370 MB and 0.5-1.3 s against 43 ms baseline; session 46)."""
    if image_format in JPEG_FORMATS and progressive:
        return MAX_IMAGE_PIXELS, f"progressive JPEG images (baseline JPEG: {MAX_JPEG_PIXELS / 1e6:.0f} MP)"
    if image_format in JPEG_FORMATS:
        return MAX_JPEG_PIXELS, "JPEG images"
    return MAX_IMAGE_PIXELS, f"{image_format or 'these'} images (JPEG: {MAX_JPEG_PIXELS / 1e6:.0f} MP)"


def _check_pixel_limit(img: Image.Image) -> None:
    """413 naming the limit that applies to this image's format, on its header alone."""
    width, height = img.size
    jpeg = img.format in JPEG_FORMATS
    if not jpeg and max(width, height) > MAX_IMAGE_SIDE:
        raise ImageRequestError(
            413, f"image is {width}x{height} pixels, a side above the {MAX_IMAGE_SIDE:,}-pixel limit for "
                 f"{img.format or 'these'} images: crop or shrink it")
    limit, kind = _pixel_limit(img.format, bool(img.info.get("progressive")))
    if width * height > limit:
        raise ImageRequestError(
            413, f"image is {width}x{height} pixels ({width * height / 1e6:.1f} MP), above the "
                 f"{limit / 1e6:.0f} MP limit for {kind}")
    grid_width, grid_height = tile_grid(img)
    padded = in_whole_tiles(width, ORDINARY_TILE_SIDE) * in_whole_tiles(height, ORDINARY_TILE_SIDE)
    if grid_width * grid_height > max(limit, min(padded, limit + limit // 16)):  # tiles decoded whole, beyond its size
        tile_width, tile_height = _tiff_tile(img)
        raise ImageRequestError(
            413, f"image is {width}x{height} pixels in tiles of {tile_width}x{tile_height}: {grid_width}x{grid_height} "
                 f"decoded ({grid_width * grid_height / 1e6:.1f} MP), above the {limit / 1e6:.0f} MP limit for {kind}")


def _tiff_tile(img: Image.Image) -> tuple[int, int] | None:
    """A tiled TIFF's tile size (TileWidth, TileLength, as libtiff reads them: either makes it tiled; one missing
    counts as the image's side), else None."""
    tags = getattr(img, "tag_v2", None) if img.format == "TIFF" else None
    if tags is None or (_TILE_WIDTH not in tags and _TILE_LENGTH not in tags):
        return None
    sides = []
    for tag, side in ((_TILE_WIDTH, img.width), (_TILE_LENGTH, img.height)):
        value = tags.get(tag)
        value = value[0] if isinstance(value, tuple) and value else value
        sides.append(value if isinstance(value, int) and value > 0 else side)
    return sides[0], sides[1]


def tile_grid(img: Image.Image) -> tuple[int, int]:
    """The size an opened image is decoded at in full: its own, or a tiled TIFF's whole tiles (libtiff decodes
    each tile whole into a buffer of its size: a 16x16 TIFF of one 8192x8192 tile cost 64 MB and 0.24 s)."""
    tile = _tiff_tile(img)
    if tile is None:
        return img.size
    (width, height), (tile_width, tile_height) = img.size, tile
    return in_whole_tiles(width, tile_width), in_whole_tiles(height, tile_height)


def in_whole_tiles(side: int, tile: int) -> int:
    """A side rounded up to whole tiles of ``tile`` pixels."""
    return -(-side // tile) * tile


def decoded_pixels(img: Image.Image) -> int:
    """The pixels decode_opened decodes for an opened upload: a baseline JPEG's at its draft scale (as Pillow's
    draft picks it: the largest of 8, 4, 2 that keeps DECODE_MIN_SIDE), any other image's all (a progressive
    JPEG's coefficients are held whole, a tiled TIFF's whole tiles: tile_grid, an AVIF's AV1 frames)."""
    width, height = img.size
    if img.format == "AVIF":  # its AV1 frames, whatever it declares (open_upload counts them)
        return max(width * height, img.info.get(AV1_FRAME_PIXELS_KEY, 0))
    if img.format in JPEG_FORMATS and not img.info.get("progressive"):
        fits = min(width // DECODE_MIN_SIDE, height // DECODE_MIN_SIDE)
        scale = next(m for m in (8, 4, 2, 1) if fits >= m or m == 1)
        return -(-width // scale) * -(-height // scale)
    grid_width, grid_height = tile_grid(img)
    return grid_width * grid_height


def check_request_pixels(opened: list[Image.Image]) -> None:
    """413 when one request's opened images would decode more than MAX_REQUEST_PIXELS in all."""
    total = sum(decoded_pixels(img) for img in opened)
    if total > MAX_REQUEST_PIXELS:
        raise ImageRequestError(
            413, f"the request's {len(opened)} images hold {total / 1e6:.0f} MP to decode in all, above the "
                 f"{MAX_REQUEST_PIXELS / 1e6:.0f} MP limit per request (a baseline JPEG counts at the 1/2-1/8 "
                 "scale it is decoded at, a progressive one in full): send fewer or smaller images in one request")


_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLE_FORMAT, _TIFF_SIGNED = 258, 339, 2


def _thirty_two_bit_grey_to_sixteen(img: Image.Image) -> Image.Image:
    """A 32-bit integer grey TIFF ("I", as Pillow reads it) -> the 16-bit range every other "I" image has.

    Pillow reads an unsigned 32-bit sample into a signed one: above 2**31 it wraps negative and showed
    black, and every value above 65,535 white (clipped). Such files hold values of several ranges (the
    full 32 bits, or 16 or 8 bits' values written wide, e.g. by numpy): as with float images, the range is
    told by the largest value: up to 255 an 8-bit grey, up to 65,535 a 16-bit one, else the full range
    (the top 16 bits kept). Negative signed values are below black.
    """
    tags = getattr(img, "tag_v2", None)
    if img.mode != "I" or tags is None or tags.get(_TIFF_BITS_PER_SAMPLE) not in (32, (32,)):
        return img
    signed = tags.get(_TIFF_SAMPLE_FORMAT) in (_TIFF_SIGNED, (_TIFF_SIGNED,))
    low, high = img.getextrema()
    if not signed and low < 0:  # wrapped: values above 2**31, so the full range
        return ImageMath.lambda_eval(lambda args: (args["grey"] >> 16) & 0xFFFF, grey=img)  # >> keeps the sign: masked
    if signed and low < 0:
        img = ImageMath.lambda_eval(lambda args: args["max"](args["grey"], 0), grey=img)
    if high <= 255:
        return img.point(lambda v: v * 257)
    if high <= 65535:
        return img
    return ImageMath.lambda_eval(lambda args: args["grey"] >> (15 if signed else 16), grey=img)


def _reduced(img: Image.Image) -> Image.Image:
    """A decoded image box-reduced by the largest integer factor that keeps DECODE_MIN_SIDE."""
    factor = min(img.size) // DECODE_MIN_SIDE
    if factor < 2:
        return img
    if img.mode.startswith("I;16"):
        img = img.convert("I")  # reduce() has no 16-bit modes; 32-bit "I" keeps every grey level
    if img.mode not in ("RGB", "RGBA", "L", "LA", "RGBa", "La", "I", "F"):
        return img
    return img.reduce(factor)


def _refusal(err: Exception, image_format: str | None = None) -> ImageRequestError:
    """What a Pillow failure while opening or decoding an image of ``image_format`` tells the client."""
    if isinstance(err, ImageRequestError):
        return err
    if isinstance(err, Image.DecompressionBombError):  # Pillow's own check, above ~179 MP: before ours
        limit, kind = _pixel_limit(image_format)
        return ImageRequestError(413, f"image refused (possible decompression bomb), above the "
                                      f"{limit / 1e6:.0f} MP limit for {kind}: {err}")
    if isinstance(err, UnidentifiedImageError):
        return ImageRequestError(400, FORMAT_REFUSAL)
    if isinstance(err, MemoryError):
        return ImageRequestError(413, "image too large to decode")
    # Pillow raises many types (OSError, SyntaxError, ...) for bad files.
    return ImageRequestError(400, f"corrupt or truncated image: {err}")


# --- EXIF: the Orientation tag and nothing else ------------------------------------------------------

ORIENTATION_TAG = 0x0112
# Orientation 2..8 -> how the stored pixels are turned upright (as ImageOps.exif_transpose does).
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
# A TIFF directory entry's integer types (BYTE, SHORT, LONG, SBYTE, SSHORT, SLONG) as struct formats.
_TIFF_INTEGERS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i"}
# Tags whose values are the TIFF's EXIF directories (Exif, GPS; Interop inside Exif's).
_EXIF_IFD, _GPS_IFD, _INTEROP_IFD = 0x8769, 0x8825, 0xA005
# Bytes per value of each TIFF type (1 BYTE .. 18 IFD8); an unknown type is skipped by Pillow.
_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
# Values Pillow keeps as one byte string (BYTE, ASCII, UNDEFINED), and the pixel data's layout (strip and
# tile offsets and sizes): cheap to read, or as large as the pixels require.
_TIFF_BYTE_STRINGS = {1, 2, 7}
_TIFF_PIXEL_LAYOUT = {273, 279, 324, 325}
_XMP_ORIENTATION = r'tiff:Orientation(="|>)([0-9])'  # Pillow's fallback when EXIF has no Orientation


# TIFF headers as Pillow accepts them: byte order, 42 (or 43: BigTIFF), also with the bytes of 42 swapped.
TIFF_PREFIXES = (b"MM\x00*", b"II*\x00", b"MM*\x00", b"II\x00*", b"MM\x00+", b"II+\x00")
# An opened AVIF's info key: the pixels of its AV1 frames (decoded_pixels counts them, not the size it declares).
AV1_FRAME_PIXELS_KEY = "av1_frame_pixels"
# An AVIF (ISO base media file): its "ftyp" box first, with one of the major brands Pillow's opener takes.
AVIF_BRANDS = (b"avif", b"avis", b"mif1", b"msf1")


class _TiffLayout:
    """A TIFF header's byte order and offset size: classic TIFF or BigTIFF."""

    def __init__(self, data: bytes | bytearray):
        self.data = data
        self.endian = "<" if data[:2] == b"II" else ">"
        self.big = data[2:3] == b"+"  # as Pillow reads it (so "MM\0+" is not BigTIFF to Pillow either)
        self.valid = bytes(data[:4]) in TIFF_PREFIXES and len(data) >= (16 if self.big else 8)
        # entry: tag, type, count, value-or-offset
        self.entry = struct.Struct(self.endian + ("HHQ8s" if self.big else "HHI4s"))

    def first_directory(self) -> int:
        return struct.unpack_from(self.endian + ("Q" if self.big else "I"), self.data, 8 if self.big else 4)[0]

    def entries(self, offset: int, limit: int | None = None) -> list[tuple]:
        """The entries of the directory at ``offset`` (those inside the data); 400 when it holds more
        than ``limit``."""
        count_size = 8 if self.big else 2
        if offset + count_size > len(self.data):
            return []
        count = int.from_bytes(self.data[offset:offset + count_size], "little" if self.endian == "<" else "big")
        if limit is not None and count > limit:
            raise ImageRequestError(400, f"TIFF directory of {count} entries refused (at most {limit}; "
                                         "cameras and scanners write under 200)")
        start = offset + count_size
        table = self.data[start:start + self.entry.size * count]
        return list(self.entry.iter_unpack(table[:len(table) - len(table) % self.entry.size]))

    def integer(self, entry: tuple) -> int | None:
        """A one-value integer entry's value (Orientation, a directory's offset), else None."""
        _, kind, count, value = entry
        if count != 1 or kind not in (*_TIFF_INTEGERS, 13, 16):  # 13 IFD, 16 LONG8: offsets
            return None
        return struct.unpack_from(self.endian + _TIFF_INTEGERS.get(kind, "Q" if kind == 16 else "I"), value)[0]


def exif_orientation(exif: bytes) -> int | None:
    """An EXIF block's Orientation tag, or None when it has none: found among its first directory's
    entries, with no other value decoded (Pillow's Exif parses every entry: ~10 us each)."""
    while exif[:6] == b"Exif\x00\x00":  # the JPEG segment's prefix (some writers repeat it)
        exif = exif[6:]
    tiff = _TiffLayout(exif)
    if not tiff.valid:
        return None
    entry = next((e for e in tiff.entries(tiff.first_directory()) if e[0] == ORIENTATION_TAG), None)
    return tiff.integer(entry) if entry else None


def _exif_block(img: Image.Image) -> bytes | None:
    """An opened image's EXIF block as its format stores it (ImageMagick's PNGs: as hex text)."""
    exif = img.info.get("exif")
    if exif is None and "Raw profile type exif" in img.info:
        exif = bytes.fromhex("".join(img.info["Raw profile type exif"].split("\n")[3:]))
    return exif.encode("latin-1") if isinstance(exif, str) else exif


def _check_exif_size(size: int, what: str = "EXIF metadata") -> None:
    if size > MAX_EXIF_BYTES:
        raise ImageRequestError(
            413, f"{what} of {size // 1024} KB refused, above the {MAX_EXIF_BYTES // 1024} KB limit (a JPEG's "
                 "EXIF cannot be larger): remove the image's metadata")


def image_orientation(img: Image.Image) -> int:
    """A loaded image's orientation (1..8: EXIF's Orientation tag, else XMP's, as Pillow reads them);
    413 for an EXIF block above MAX_EXIF_BYTES. A TIFF is turned upright by Pillow while loading."""
    if img.format == "TIFF":
        return 1
    exif = _exif_block(img)
    _check_exif_size(len(exif or b""))
    orientation = exif_orientation(exif) if exif else None
    if orientation is None:
        xmp = img.info.get("XML:com.adobe.xmp") or img.info.get("xmp")
        found = re.search(_XMP_ORIENTATION if isinstance(xmp, str) else _XMP_ORIENTATION.encode(), xmp) if xmp else None
        orientation = int(found[2]) if found else 1
    return orientation


def _check_tiff_metadata(data: bytes | bytearray) -> None:
    """Refuse a TIFF whose directories would cost Pillow seconds (checked before Pillow opens it): more
    than MAX_TIFF_TAGS entries in its first image's directory or in the Exif, GPS and Interop directories
    Pillow reads whole while loading, or more than MAX_EXIF_BYTES of numbers in them (decoded one by one;
    not counted: byte strings such as an ICC profile, and the offsets and sizes of the pixel data)."""
    tiff = _TiffLayout(data)
    if not tiff.valid:
        return  # Pillow says what is wrong

    def directory(entries: list[tuple], tag: int) -> list[tuple]:
        offset = next((tiff.integer(e) for e in entries if e[0] == tag), None)
        return tiff.entries(offset, MAX_TIFF_TAGS) if offset is not None else []

    first = tiff.entries(tiff.first_directory(), MAX_TIFF_TAGS)
    _check_tiff_chunks(tiff, first)
    exif = directory(first, _EXIF_IFD)
    directories = (first, exif, directory(first, _GPS_IFD), directory(exif, _INTEROP_IFD))
    numbers = sum(count * _TIFF_TYPE_SIZES.get(kind, 0) for entries in directories
                  for tag, kind, count, _ in entries if kind not in _TIFF_BYTE_STRINGS and tag not in _TIFF_PIXEL_LAYOUT)
    _check_exif_size(numbers, "TIFF metadata")


_WIDTH, _LENGTH, _SAMPLES, _ROWS_PER_STRIP, _PLANAR, _TILE_WIDTH, _TILE_LENGTH = 256, 257, 277, 278, 284, 322, 323


def _check_tiff_chunks(tiff: _TiffLayout, entries: list[tuple]) -> None:
    """Refuse a first image listing more than MAX_TIFF_CHUNKS strip or tile offsets (413), or more (or byte counts)
    than its size and layout need (400):
    Pillow reads each into a Python list while opening it (~1.6 us each), before the pixel limit is checked; a
    1x2 picture with 125,000 offsets to the same two bytes (250 KB) cost 190 ms, 2 MB 1.6 s (session 46). Its
    sides are counted up to MAX_IMAGE_SIDE (beyond, it is refused once opened), a tile as 16 px at least (the
    TIFF standard's smallest)."""
    layout = {tag: tiff.integer(e) or 0 for e in entries if (tag := e[0]) in
              (_WIDTH, _LENGTH, _SAMPLES, _ROWS_PER_STRIP, _PLANAR, _TILE_WIDTH, _TILE_LENGTH)}
    width, length = (min(max(layout.get(tag, 0), 1), MAX_IMAGE_SIDE) for tag in (_WIDTH, _LENGTH))
    planes = min(max(layout.get(_SAMPLES, 1), 1), 8) if layout.get(_PLANAR) == 2 else 1
    if _TILE_WIDTH in layout or _TILE_LENGTH in layout:
        tile_width, tile_length = (max(layout.get(tag, 0), 16) for tag in (_TILE_WIDTH, _TILE_LENGTH))
        needed = -(-width // tile_width) * -(-length // tile_length)
    else:
        needed = -(-length // max(layout.get(_ROWS_PER_STRIP, length), 1))
    listed = max((count for tag, _, count, _ in entries if tag in _TIFF_PIXEL_LAYOUT), default=0)
    if listed > planes * needed:
        raise ImageRequestError(400, f"TIFF refused: it lists {listed:,} strip or tile offsets where its size and "
                                     f"layout need {planes * needed:,}")
    if listed > MAX_TIFF_CHUNKS:
        raise ImageRequestError(413, f"TIFF refused: it lists {listed:,} strips or tiles, above the {MAX_TIFF_CHUNKS:,} "
                                     "it may have (each costs a decoder run): save it as PNG")


def _checked_avif(data: bytes | bytearray) -> int:
    """An AVIF's container, checked before Pillow opens it; the pixels of its AV1 frames. Its frames (serving/avif.py:
    what libavif decodes, whatever its ispe box, which Pillow reports, declares) are refused (413) above twice
    MAX_IMAGE_PIXELS, a picture at the limit and its alpha plane; 400 when they cannot be sized (NotReadable). Its
    EXIF is refused above MAX_EXIF_BYTES (Pillow's opener parses it, and rewrites it all when the container's rotation
    differs from the tag's): read, with the declared size, by Pillow's own libavif binding, which decodes no pixel."""
    try:
        frames = av1_frame_pixels(data)
    except NotReadable as err:
        raise ImageRequestError(400, f"AVIF refused: {err}") from None
    try:
        from PIL import _avif  # Pillow's AVIF support (requirements.txt pins Pillow)
    except ImportError:
        return frames  # Pillow cannot open it either
    info = _avif.AvifDecoder(bytes(data), "auto", 1).get_info()
    (width, height), exif = info[0], info[4]
    if frames > 2 * MAX_IMAGE_PIXELS:
        raise ImageRequestError(
            413, f"AVIF refused: it declares {width}x{height} pixels but its AV1 frames hold {frames / 1e6:.0f} MP, "
                 f"above the {2 * MAX_IMAGE_PIXELS / 1e6:.0f} MP a picture at the {MAX_IMAGE_PIXELS / 1e6:.0f} MP limit "
                 "and its alpha plane hold")
    _check_exif_size(len(exif or b""))
    return frames


def open_upload(data: bytes) -> Image.Image:
    """An upload's header, parsed and checked (its metadata blocks, PNG checksums, then the pixel limits); no pixel
    decoded yet. Refuses with the status and message the handler answers.

    (No warnings filter: Pillow only warns between 89 and 179 MP, far above these limits, which
    refuse such an image right after; a process-wide filter would not be thread-safe in the adapter.)
    """
    data = checked_png(data)
    av1_frames = 0  # an AVIF's, counted before Pillow opens it (its opener accepts AVIF_BRANDS alone)
    try:
        # What Pillow's openers would read block by block, or parse at length, bounded before they do.
        if data[:3] == _JPEG_SIGNATURE:
            _check_jpeg_markers(data)
        elif data[:3] == b"GIF":
            _check_gif_blocks(data)
        elif _PPM_MAGIC.match(data):
            _check_plain_pnm(data)
            _check_ppm_header(data)
        elif data[:2] == b"BM":
            _check_bmp_rle(data)
        elif data[:4] in TIFF_PREFIXES:
            _check_tiff_metadata(data)
        elif data[4:8] == b"ftyp" and data[8:12] in AVIF_BRANDS:
            av1_frames = _checked_avif(data)
        img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        if img.format == "AVIF":
            img.info[AV1_FRAME_PIXELS_KEY] = av1_frames
        _check_pixel_limit(img)  # on the header, before decoding pixels
        _check_scaled_pnm(img)
    except Exception as err:  # noqa: BLE001 - every failure becomes the client's 4xx
        # Pillow refuses a canvas above ~179 MP while opening it, with no image to name the format by.
        raise _refusal(err, "JPEG" if data[:3] == _JPEG_SIGNATURE else None) from err
    return img


def decode_opened(img: Image.Image) -> Image.Image:
    """An opened upload (open_upload) -> upright 8-bit RGB, decoded no larger than needed."""
    try:
        if img.format in JPEG_FORMATS:
            # libjpeg decodes at 1/2..1/8 scale; the aspect ratio and the EXIF tag are kept.
            img.draft(None, (DECODE_MIN_SIDE, DECODE_MIN_SIDE))
        img.load()
        # Phones store portrait photos sideways + an EXIF tag. In place, as ImageOps.exif_transpose
        # does: a copy would hold the decoded pixels twice (2x the memory of a large PNG). Not with
        # exif_transpose itself: it rewrites the whole EXIF block in Python, for nothing here.
        turn = UPRIGHT.get(image_orientation(img))
        if turn is not None:
            img.im = img.im.transpose(turn)
            img._size = img.im.size
        img = _reduced(_thirty_two_bit_grey_to_sixteen(img))
    except Exception as err:  # noqa: BLE001 - every failure becomes the client's 4xx
        raise _refusal(err, img.format) from err
    return _to_rgb(img)


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> upright 8-bit RGB PIL image (first frame of an animation), decoded no larger
    than the 32x32 input needs (see the module's docstring).

    Animated GIF/WebP/APNG: the first frame is classified, as browsers show it as the still.
    """
    return decode_opened(open_upload(data))


def network_input(img: Image.Image) -> Image.Image:
    """RGB image -> the network's 32x32 input image.

    Like the seed, the whole image is resized to 32x32 (no crop, aspect ratio not kept) with
    Pillow's bilinear filter, which is antialiased when shrinking (its support widens with the
    scale) -- the same call torchvision's ``Resize((32, 32))`` makes on a PIL image. A 32x32 image
    (a CIFAR test image) passes unchanged.
    """
    if img.size != (INPUT_SIZE, INPUT_SIZE):
        img = img.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
    return img


# --- shrinking ------------------------------------------------------------------------------------

def decoded_slowly(img: Image.Image) -> bool:
    """Whether this opened image may cost far more to decode than its header's pixels say: Pillow decodes it in
    Python (its decoder one of Image.DECODERS: an RLE BMP, a plain or scaled PNM: up to ~60 ms under their bounds
    where as many pixels cost ~1 ms in C), or it is an AVIF, whose declared size (its ispe box, what Pillow reports)
    need not be the AV1 frame's that libavif decodes (a 3.4 KB file declaring 64x64 held a 16384x16384 frame: 1.1 s
    and +550 MB, session 60). Such a file is decoded where clients take turns (the adapter's shrinking threads, the
    predictor's decoding threads), not in TorchServe's workers, first come first served (one address's 16 RLE BMPs
    of 1 MP took another's answer from 13 to 700 ms; 4 such AVIFs from 14 to 1,150 ms), nor on an event loop."""
    return img.format == "AVIF" or any(tile.codec_name in Image.DECODERS for tile in img.tile)


def worth_shrinking(img: Image.Image, size_bytes: int, min_bytes: int = SHRINK_MIN_BYTES) -> bool:
    """Whether an upload (its opened header and byte size) is shrunk before it travels on: any format (a 14 KB
    GIF of 16 MP cost a worker 0.29 s, unshrunk, and the workers have no per-client share; the adapter's pool has),
    and any decoded slowly (decoded_slowly)."""
    width, height = tile_grid(img)  # a tiled TIFF by its whole tiles
    return size_bytes > min_bytes or width * height > SHRINK_MIN_PIXELS or decoded_slowly(img)


def shrunk_png(img: Image.Image, explain: bool = False) -> bytes:
    """An opened upload (open_upload) decoded with the handler's rules, as a lossless PNG of the
    network's 32x32 input, whose decode by the handler is the identity; for an explanation (``explain``)
    the same pixels, with the decoded picture's size named in it (PICTURE_SIZE_KEY), which the heatmap
    follows. Raises ImageRequestError with the handler's own status and message for an image it would refuse."""
    decoded = decode_opened(img)
    named = None
    if explain:
        # Not the picture itself: the handler would resize that (or a reduced copy) to other 32x32 pixels
        # than /classify/'s (p 0.729 vs 0.713 for a 12000x2000 JPEG); the heatmap needs only its size.
        named = PngInfo()
        named.add_text(PICTURE_SIZE_KEY, f"{decoded.width}x{decoded.height}")
    out = io.BytesIO()
    network_input(decoded).save(out, format="PNG", compress_level=PNG_FAST, pnginfo=named)
    return out.getvalue()


_PICTURE_SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")


def picture_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the picture a decoded upload shows, which its heatmap follows: its own size, or
    for a 32x32 input that names the picture it was made from (shrunk_png, explain), that picture's."""
    if img.size == (INPUT_SIZE, INPUT_SIZE):
        named = _PICTURE_SIZE.fullmatch(str(img.info.get(PICTURE_SIZE_KEY, "")))
        if named:
            return int(named[1]), int(named[2])
    return img.size


def page_image_rules() -> dict:
    """What the page checks before it shows or uploads a file (GET /settings "images"): the formats
    read here, as the MIME types the page names a file's first bytes by (Pillow's names), and the
    server's words for the rest; the pixel limits and the side limit (not for JPEG), which also keep
    the browser from decoding a huge image (a few hundred KB of PNG can declare 20000x20000 pixels:
    1.6 GB decoded) and a thin one from being uploaded only to be refused."""
    Image.init()  # Pillow's MIME names, registered as its format plugins load
    return {"types": sorted({Image.MIME[name] for name in ACCEPTED_FORMATS if name in Image.MIME}),
            "refusal": FORMAT_REFUSAL, "max_pixels": MAX_IMAGE_PIXELS, "max_jpeg_pixels": MAX_JPEG_PIXELS,
            "max_side": MAX_IMAGE_SIDE, "max_tiff_tags": MAX_TIFF_TAGS}


def page_shrink_rules(min_bytes: int = SHRINK_MIN_BYTES) -> dict:
    """The page's part of the rules (GET /settings): which files it shrinks, to what, sent how."""
    return {"types": sorted(set(SHRINK_FORMATS.values())), "min_bytes": min_bytes, "min_pixels": SHRINK_MIN_PIXELS,
            "min_side": DECODE_MIN_SIDE, "type": PAGE_SHRINK_TYPE, "quality": PAGE_JPEG_QUALITY}
