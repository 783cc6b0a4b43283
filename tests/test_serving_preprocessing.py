"""The handler's request decoding in-process (no server): what each image kind turns into."""
from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from handler.preprocessing import (INLINE_DECODE_MAX_BYTES, INPUT_SIZE, MAX_IMAGE_PIXELS, ImageRequestError,
                                   decode_image, decodes_inline, image_bytes, image_to_tensor)
from serving.images import (BLOCK_BYTES, MAX_BLOCKS, MAX_EXIF_BYTES, MAX_JPEG_SCANS, MAX_PPM_HEADER_BYTES,
                            MAX_TIFF_CHUNKS, MAX_TIFF_TAGS, check_request_pixels, decoded_pixels, jpeg_markers,
                            open_upload)
from serving import images
from serving.avif import av1_frame_pixels
from serving_helpers import (animated_gif, avif_declaring, decompression_bomb_png, encode, exif_block, exif_rotated_jpeg,
                             grey_tiff,
                             jpeg_declaring_size, tiled_tiff,
                             jpeg_with_repeated_scans, oversized_png, padded_with_empty_blocks, png_declaring_size,
                             png_chunk, png_with_bad_crc, png_with_chunks, png_with_exif, rle8_bmp, sixteen_bit_png)


def box(kind: bytes, payload: bytes) -> bytes:
    """An ISO/IEC 14496-12 box (an AVIF's parts): its size, its type, its payload."""
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def halves(size=(40, 20), left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    """Left half one colour, right half another: rotations and flips are visible."""
    img = Image.new("RGB", size, right)
    img.paste(left, (0, 0, size[0] // 2, size[1]))
    return img


def noisy(size=(32, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), mode="RGB")


def test_exif_orientation_is_applied():
    # Orientation 6: the stored pixels must be turned 90 degrees clockwise to stand upright, so
    # the stored left half (red) ends up on top.
    img = decode_image(exif_rotated_jpeg(halves(), orientation=6))
    assert img.size == (20, 40)
    top, bottom = np.asarray(img)[5, 10], np.asarray(img)[35, 10]
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def _oriented(fmt: str, img: Image.Image, orientation: int) -> bytes:
    """img stored with an orientation the way each format carries it."""
    from PIL.PngImagePlugin import PngInfo
    exif, text = Image.Exif(), PngInfo()
    exif[0x0112] = orientation
    if fmt == "PNG raw profile":  # ImageMagick's: the EXIF as hex in a text chunk
        block = exif.tobytes()
        text.add_text("Raw profile type exif", f"\nexif\n{len(block):8}\n{block.hex()}\n")
        return encode(img, "PNG", pnginfo=text)
    if fmt == "PNG XMP":  # no EXIF: XMP's tiff:Orientation
        text.add_itxt("XML:com.adobe.xmp", f'<x:xmpmeta><rdf:Description tiff:Orientation="{orientation}"/></x:xmpmeta>')
        return encode(img, "PNG", pnginfo=text)
    options = {"TIFF": {"exif": exif}, "WEBP": {"exif": exif.tobytes(), "lossless": True}}.get(fmt, {"exif": exif.tobytes()})
    return encode(img, fmt, **options)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "AVIF", "PNG raw profile", "PNG XMP"])
def test_every_exif_orientation_is_applied_as_pillow_applies_it(fmt):
    # Only the Orientation tag is read (not Pillow's exif_transpose, which rewrote the whole EXIF block);
    # the pixels come out as exif_transpose turns them, for each of the 8 values.
    from PIL import ImageOps, features
    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("Pillow built without AVIF")
    stored = noisy((40, 24), seed=7)
    shapes = set()
    for orientation in range(1, 9):
        data = _oriented(fmt, stored, orientation)
        expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        out = decode_image(data)
        assert out.size == expected.size == ((40, 24) if orientation < 5 else (24, 40)), (orientation, out.size)
        assert np.array_equal(np.asarray(out), np.asarray(expected)), orientation
        shapes.add(np.asarray(out).tobytes())
    assert len(shapes) == 8  # each orientation turned the picture its own way


def test_an_exif_block_whose_prefix_is_repeated_is_read_for_its_orientation():
    # Some writers repeat JPEG's "Exif\0\0" before the block's TIFF header: each is dropped (images.exif_orientation),
    # else such a photo stood sideways.
    from serving.images import exif_orientation
    exif = Image.Exif()
    exif[0x0112] = 6
    block = exif.tobytes()
    assert block.startswith(b"Exif\0\0")
    assert exif_orientation(block) == exif_orientation(b"Exif\0\0" * 2 + block) == 6


def _cpu_seconds(fn, *args) -> float:
    started = time.process_time()
    try:
        fn(*args)
    except ImageRequestError:
        pass
    return time.process_time() - started


def test_an_exif_bomb_is_refused_on_its_size_and_a_large_block_costs_no_more_than_a_small_one():
    # A PNG's eXIf chunk (or WebP's EXIF) has no size cap: Pillow's exif_transpose parsed and rewrote
    # 20,000 entries in ~0.4 s of CPU (2 s on a loaded host; 720 KB: 7 s), held a worker past its
    # responseTimeout with 5 such images in one request.
    picture = halves((64, 32))
    decode_image(png_with_exif(picture, exif_block(10)))  # Pillow's plugins imported before timing
    for bomb in (png_with_exif(picture, exif_block(20_000)), encode(picture, "WEBP", exif=exif_block(20_000))):
        with pytest.raises(ImageRequestError) as info:
            decode_image(bomb)
        assert info.value.status == 413 and f"above the {MAX_EXIF_BYTES // 1024} KB limit" in info.value.message
        assert _cpu_seconds(decode_image, bomb) < 0.02
    # Just under the limit (5,000 entries, 60 KB): decoded upright, in about the time of a 10-entry block
    # (was 70 ms: the whole block parsed and rewritten).
    at_limit = png_with_exif(picture, exif_block(5_000))
    assert len(exif_block(5_000)) <= MAX_EXIF_BYTES
    out = np.asarray(decode_image(at_limit))
    assert out.shape == (64, 32, 3) and out[8, 16, 0] > 200 and out[56, 16, 2] > 200  # red on top: turned
    assert _cpu_seconds(decode_image, at_limit) < 0.02


def test_an_avif_exif_bomb_is_refused_before_pillow_opens_it():
    # Pillow's AVIF opener parses the EXIF and may rewrite it: 0.74 s of CPU for 20,000 entries.
    from PIL import features
    if not features.check("avif"):
        pytest.skip("Pillow built without AVIF")
    bomb = encode(halves((64, 32)), "AVIF", exif=exif_block(20_000))
    with pytest.raises(ImageRequestError) as info:
        open_upload(bomb)
    assert info.value.status == 413 and "EXIF metadata" in info.value.message
    assert _cpu_seconds(open_upload, bomb) < 0.02


def test_an_avif_is_counted_by_the_av1_frames_it_holds_not_the_size_it_declares(monkeypatch):
    # libavif decodes the AV1 frames whatever the ispe box (what Pillow reports) declares: 3.4 KB declaring 64x64 held
    # 16384x16384, 1.1 s and +550 MB. The frames' sequence headers are read (serving/avif.py): the pixel limits
    # count them, a colour picture and its alpha plane, an image sequence's first frame.
    from PIL import features
    if not features.check("avif"):
        pytest.skip("Pillow built without AVIF")
    assert av1_frame_pixels(encode(noisy((33, 17)), "AVIF")) == 33 * 17
    assert av1_frame_pixels(encode(Image.new("RGBA", (30, 20), (1, 2, 3, 100)), "AVIF")) == 2 * 30 * 20
    sequence = encode(Image.new("RGB", (20, 10)), "AVIF", save_all=True, append_images=[Image.new("RGB", (20, 10))])
    assert Image.open(io.BytesIO(sequence)).n_frames == 2 and av1_frame_pixels(sequence) == 20 * 10
    hiding = avif_declaring((16, 16), (1024, 1024))
    opened = open_upload(hiding)
    assert opened.size == (16, 16) and decoded_pixels(opened) == 1024 * 1024
    with pytest.raises(ImageRequestError) as info:  # 64 MP in all, not 64 x 256 pixels
        check_request_pixels([opened] * 64)
    assert info.value.status == 413
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 500_000)  # (a real 16384x16384 frame takes ~15 s to encode)
    with pytest.raises(ImageRequestError) as info:
        open_upload(hiding)
    assert info.value.status == 413 and "declares 16x16 pixels but its AV1 frames hold 1 MP" in info.value.message
    assert _cpu_seconds(open_upload, encode(noisy((600, 400)), "AVIF")) < 0.05  # (its frames within the limit)


def iloc_of(items: int, extents: int, data_at: int, av1: bool = True) -> bytes:
    """An AVIF's boxes after its ftyp: a meta box of ``items`` av01 items (iinf, or of another type), each of
    ``extents`` extents of 16 bytes at ``data_at`` (iloc version 1), then those 16 bytes: a temporal delimiter OBU."""
    entries = b"".join(box(b"infe", b"\x02\0\0\0" + struct.pack(">HH", i + 1, 0) + (b"av01" if av1 else b"Exif") + b"\0")
                       for i in range(items))
    locations = b"".join(struct.pack(">HHHH", i + 1, 0, 0, extents) + struct.pack(">II", data_at, 16) * extents
                         for i in range(items))
    meta = box(b"meta", b"\0" * 4 + box(b"iinf", b"\0" * 4 + struct.pack(">H", items) + entries)
               + box(b"iloc", b"\x01\0\0\0\x44\0" + struct.pack(">H", items) + locations))
    return meta + b"\x12\x00" + bytes(14)


def test_an_avif_whose_frames_cannot_be_sized_is_refused_and_its_boxes_are_read_within_bounds():
    # Sized by the sequence header that begins each av01 item's data (serving/avif.py): an item that begins otherwise
    # is refused (libavif's decoder would find the header further on); iloc tables are read up to their bounds
    # (1024 items of 16 extents, 160 KB, cost 40 ms), pointed-at bytes a window at a time (256 items of 64 extents
    # of "the rest of the file" copied gigabytes).
    from serving import avif
    ftyp = b"\0\0\0\x18ftypavif\0\0\0\0avifmif1"

    def sized(items, extents, av1=True):
        head = ftyp + iloc_of(items, extents, 0, av1)
        return avif.av1_frame_pixels(ftyp + iloc_of(items, extents, len(head) - 16, av1))
    with pytest.raises(avif.NotReadable, match="does not begin with its sequence header"):
        sized(1, 1)
    assert sized(3, 1, av1=False) == 0  # (metadata items: no frame)
    with pytest.raises(avif.NotReadable, match=f"{avif._MAX_ITEMS + 1} items"):
        sized(avif._MAX_ITEMS + 1, 1, av1=False)
    with pytest.raises(avif.NotReadable, match=f"an item of {avif._MAX_EXTENTS + 1} extents"):
        sized(2, avif._MAX_EXTENTS + 1)


def test_an_avif_with_alpha_at_the_pixel_limit_is_read_and_a_frame_pixel_more_is_413(monkeypatch):
    # Its colour frame and its alpha plane are both counted: a picture at the pixel limit with alpha holds twice the
    # limit in frames, and is read (README: "more than twice the 16 MP, a picture and its alpha plane").
    from PIL import features
    if not features.check("avif"):
        pytest.skip("Pillow built without AVIF")
    rgba = encode(Image.new("RGBA", (30, 20), (1, 2, 3, 100)), "AVIF")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 30 * 20)  # (as 4000x4000 with alpha at the real limit)
    opened = open_upload(rgba)
    assert opened.size == (30, 20) and decoded_pixels(opened) == 2 * 30 * 20
    assert decode_image(rgba).size == (30, 20)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 30 * 20 - 1)
    with pytest.raises(ImageRequestError) as info:
        open_upload(rgba)
    assert info.value.status == 413 and "but its AV1 frames hold" in info.value.message, info.value.message


def test_an_avif_whose_frames_cannot_be_sized_is_400_and_its_bounds_admit_what_they_name():
    # README: "an AVIF whose frames cannot be sized so, an AV1 item not beginning with its sequence header or more
    # than 512 items, is 400" (the request is malformed, not too big); 512 items (a 16 MP grid of 256x256 tiles with
    # their alpha planes) and 4 extents an item are read.
    from serving import avif
    ftyp = b"\0\0\0\x18ftypavif\0\0\0\0avifmif1"

    def avif_of(items, extents, av1=True):
        head = ftyp + iloc_of(items, extents, 0, av1)
        return ftyp + iloc_of(items, extents, len(head) - 16, av1)
    for data, words in ((avif_of(1, 1), "an AV1 item or sample that does not begin with its sequence header"),
                        (avif_of(avif._MAX_ITEMS + 1, 1, av1=False), f"{avif._MAX_ITEMS + 1} items")):
        with pytest.raises(ImageRequestError) as info:
            open_upload(data)
        assert (info.value.status, info.value.message) == (400, f"AVIF refused: {words}")
    for items, extents in ((avif._MAX_ITEMS, 1), (2, avif._MAX_EXTENTS)):  # read: their first bytes are no header
        with pytest.raises(avif.NotReadable, match="does not begin with its sequence header"):
            avif.av1_frame_pixels(avif_of(items, extents))


def test_an_avifs_frames_are_counted_wherever_its_boxes_keep_them(monkeypatch):
    # libavif reads an item's data from the meta box's idat (iloc's construction method 1) as from the file (0), and
    # an image sequence (brand avis) from its track, whatever size the track's header declares (what Pillow reports).
    from PIL import features
    if not features.check("avif"):
        pytest.skip("Pillow built without AVIF")

    still = encode(noisy((33, 17)), "AVIF")
    item = still[still.index(b"mdat") + 4:]  # its one av01 item's data, the file's last box
    ftyp = b"\0\0\0\x18ftypavif\0\0\0\0avifmif1"
    infe = box(b"infe", b"\x02\0\0\0" + struct.pack(">HH", 1, 0) + b"av01\0")  # item 1, of type av01
    iinf = box(b"iinf", b"\0" * 4 + struct.pack(">H", 1) + infe)

    def iloc(method: int, offset: int) -> bytes:
        # version 1, 4-byte offsets and lengths; one item (1) of one extent
        return box(b"iloc", b"\x01\0\0\0\x44\0" + struct.pack(">HHHHHII", 1, 1, method, 0, 1, offset, len(item)))
    in_idat = ftyp + box(b"meta", b"\0" * 4 + iinf + iloc(1, 0) + box(b"idat", item))
    item_at = len(ftyp + box(b"meta", b"\0" * 4 + iinf + iloc(0, 0)))
    in_file = ftyp + box(b"meta", b"\0" * 4 + iinf + iloc(0, item_at)) + item
    assert av1_frame_pixels(in_idat) == av1_frame_pixels(in_file) == av1_frame_pixels(still) == 33 * 17
    out = io.BytesIO()
    frame = Image.new("RGB", (256, 256), (90, 120, 200))
    frame.save(out, "AVIF", save_all=True, append_images=[frame], quality=50, speed=10)
    sequence = bytearray(out.getvalue())
    assert sequence[8:12] == b"avis"
    tkhd = sequence.index(b"tkhd") - 4
    tkhd_end = tkhd + int.from_bytes(sequence[tkhd:tkhd + 4], "big")
    sequence[tkhd_end - 8:tkhd_end] = struct.pack(">II", 16 << 16, 16 << 16)  # its track header's width, height
    opened = open_upload(bytes(sequence))
    assert opened.size == (16, 16) and decoded_pixels(opened) == 256 * 256
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 30_000)
    with pytest.raises(ImageRequestError) as info:
        open_upload(bytes(sequence))
    assert info.value.status == 413 and "declares 16x16 pixels but its AV1 frames hold" in info.value.message


def test_an_image_sequences_first_sample_is_found_by_either_size_table_and_either_offset_table():
    # A track's sample sizes are one size for all or a table (stsz), its chunk offsets 4 or 8 bytes (stco, co64, a
    # file over 4 GB: libavif reads both); Pillow writes one kind, so these tracks are built here around a still's
    # AV1 data, put after the moov box.
    from PIL import features
    if not features.check("avif"):
        pytest.skip("Pillow built without AVIF")

    still = encode(noisy((33, 17)), "AVIF")
    sample = still[still.index(b"mdat") + 4:]  # its one av01 item's data: a sequence header, then the frame
    ftyp = b"\0\0\0\x18ftypavis\0\0\0\0avismsf1"
    stsd = box(b"stsd", b"\0" * 4 + struct.pack(">I", 1) + box(b"av01", b"\0" * 78))

    def sequence(one_size: bool, wide: bool, offset: int = 0) -> bytes:
        sizes = struct.pack(">II", len(sample), 2) if one_size else struct.pack(">IIII", 0, 2, len(sample), 9)
        offsets = struct.pack(">IQ", 1, offset) if wide else struct.pack(">II", 1, offset)
        stbl = box(b"stbl", stsd + box(b"stsz", b"\0" * 4 + sizes) + box(b"co64" if wide else b"stco",
                                                                       b"\0" * 4 + offsets))
        moov = box(b"moov", box(b"trak", box(b"mdia", box(b"minf", stbl))))
        return ftyp + moov + sample if offset else sequence(one_size, wide, len(ftyp + moov))
    for one_size in (True, False):
        for wide in (True, False):
            assert av1_frame_pixels(sequence(one_size, wide)) == 33 * 17, (one_size, wide)


def test_tiff_directories_pillow_reads_whole_are_bounded():
    # A TIFF's directories are parsed by Pillow entry by entry (~9 us each), its Exif and GPS directories
    # decoded value by value while loading: 500,000 fractions in a 4 MB TIFF cost 1.7 s of CPU (7 s on a
    # loaded host; 2 directories pointing at them, twice that).
    junk = [(tag, 1, 1, b"A") for tag in range(0x1000, 0x1000 + MAX_TIFF_TAGS)]
    with pytest.raises(ImageRequestError) as info:
        decode_image(grey_tiff(64, 32, extra=junk))
    assert info.value.status == 400 and f"at most {MAX_TIFF_TAGS}" in info.value.message
    fractions = struct.pack("<II", 1, 3) * 500_000
    for pointers in ({0x8769: [(0x829A, 5, 500_000, fractions)]},  # Exif: ExposureTime
                     {0x8825: [(0x0002, 5, 500_000, fractions)]}):  # GPS: GPSLatitude
        bomb = grey_tiff(64, 32, directories=pointers)
        with pytest.raises(ImageRequestError) as info:
            decode_image(bomb)
        assert info.value.status == 413 and "TIFF metadata" in info.value.message
        assert _cpu_seconds(decode_image, bomb) < 0.05
    # A camera's worth of tags, and a large byte string (an ICC profile, a thumbnail) beside the pixels: decoded.
    camera = grey_tiff(64, 32, extra=junk[:100] + [(0x8773, 7, 200_000, bytes(200_000))],
                       directories={0x8769: [(0x829A, 5, 1, struct.pack("<II", 1, 250))]})
    assert decode_image(camera).size == (64, 32)


def strips_to_the_same_bytes(count: int) -> bytes:
    """A 1x2 grey TIFF of one row per strip whose StripOffsets lists ``count`` offsets, all to its two pixels."""
    tags = [(256, 1), (257, 2), (258, 8), (259, 1), (262, 1), (277, 1), (278, 1)]
    ifd = struct.pack("<H", len(tags) + 1) + b"".join(struct.pack("<HHIHH", t, 3, 1, v, 0) for t, v in tags[:5])
    ifd += struct.pack("<HHII", 273, 3, count, 16 + 2 + 12 * 8 + 4)
    ifd += b"".join(struct.pack("<HHIHH", t, 3, 1, v, 0) for t, v in tags[5:]) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 16) + b"\x80\x80" + b"\0" * 6 + ifd + struct.pack("<H", 8) * count


def tiled_grey_tiff(width: int, height: int, tile: int, listed: int | None = None) -> bytes:
    """An uncompressed grey TIFF in square tiles; ``listed``: the TileOffsets and TileByteCounts it lists (the
    extra ones point at its last tile)."""
    across, down = -(-width // tile), -(-height // tile)
    count, size = across * down if listed is None else listed, tile * tile
    entries = [(256, width), (257, height), (258, 8), (259, 1), (262, 1), (277, 1), (322, tile), (323, tile)]
    offsets_at = 8 + 2 + 12 * (len(entries) + 2) + 4
    pixels_at = offsets_at + 8 * count
    head = struct.pack("<H", len(entries) + 2) + b"".join(struct.pack("<HHIHH", t, 3, 1, v, 0) for t, v in entries)
    head += struct.pack("<HHII", 324, 4, count, offsets_at) + struct.pack("<HHII", 325, 4, count, offsets_at + 4 * count)
    offsets = b"".join(struct.pack("<I", pixels_at + min(i, across * down - 1) * size) for i in range(count))
    return (b"II*\x00" + struct.pack("<I", 8) + head + b"\0\0\0\0" + offsets + struct.pack("<I", size) * count
            + bytes(i % 251 for i in range(size * across * down)))


def test_a_tiff_listing_more_strips_or_tiles_than_its_size_needs_is_refused_before_pillow_opens_it():
    # Pillow reads every strip or tile offset into a Python list while opening (~1.6 us each), before the pixel
    # limit: 125,000 offsets of a 1x2 picture (250 KB) cost 190 ms on the adapter's event loop, 2 MB 1.6 s.
    for bomb in (strips_to_the_same_bytes(125_000), tiled_grey_tiff(40, 20, 16, listed=100_000)):
        with pytest.raises(ImageRequestError) as info:
            open_upload(bomb)
        assert info.value.status == 400 and "strip or tile offsets where its size and layout need" in info.value.message
        assert _cpu_seconds(open_upload, bomb) < 0.01
    with pytest.raises(ImageRequestError) as info:
        open_upload(strips_to_the_same_bytes(3))  # one more than its two rows need
    assert "lists 3 strip or tile offsets where its size and layout need 2" in info.value.message
    with pytest.raises(ImageRequestError) as info:
        open_upload(tiled_grey_tiff(40, 20, 16, listed=7))  # 3 x 2 tiles
    assert "lists 7 strip or tile offsets where its size and layout need 6" in info.value.message
    # Past MAX_TIFF_CHUNKS, however its size needs them (each a decoder run: 250 KB of 1x16,000 RGBA pixels, a strip
    # per row and plane, cost 0.5 s): refused on its directory, and as many as that read.
    thin = Image.new("L", (1, MAX_TIFF_CHUNKS + 1))
    with pytest.raises(ImageRequestError) as info:
        open_upload(encode(thin, "TIFF", tiffinfo={278: 1}))
    assert info.value.status == 413 and f"lists {MAX_TIFF_CHUNKS + 1:,} strips or tiles" in info.value.message
    assert decode_image(encode(thin.crop((0, 0, 1, MAX_TIFF_CHUNKS)), "TIFF", tiffinfo={278: 1})).size == (1, MAX_TIFF_CHUNKS)
    # What they need is read: two strips of one row, six tiles, a strip per row, a strip per plane of each band.
    assert decode_image(strips_to_the_same_bytes(2)).size == (1, 2)
    assert decode_image(tiled_grey_tiff(40, 20, 16)).size == (40, 20)
    picture = noisy((57, 31))
    for info in ({278: 1}, {278: 7}):
        assert decode_image(encode(picture, "TIFF", tiffinfo=info)).size == (57, 31)
    planar = encode(picture, "TIFF", compression="tiff_adobe_deflate", tiffinfo={284: 2, 278: 8})  # 3 planes x 4 strips
    assert len(Image.open(io.BytesIO(planar)).tag_v2[273]) == 12 and open_upload(planar).size == (57, 31)


def test_a_tiled_tiff_counts_its_whole_tiles_against_the_pixel_limit():
    # libtiff decodes each tile whole: a 16x16 TIFF of one 8192x8192 deflated tile of zeros (64 KB) cost 64 MB and
    # 0.24 s, one of 16384x16384 (255 KB) 256 MB and 0.7 s, while its declared 16x16 passed every limit.
    from serving.images import MAX_REQUEST_PIXELS, check_request_pixels, decoded_pixels
    for tile, compression, samples, bits in ((8192, 8, 1, 8), (8192, 34925, 3, 8), (16384, 8, 1, 8), (16384, 8, 4, 16)):
        bomb = tiled_tiff(16, 16, tile, tile - 16 * (bits == 16), compression, samples, bits, tile_data=bytes(64))
        with pytest.raises(ImageRequestError) as info:
            decode_image(bomb)
        assert info.value.status == 413 and f"image is 16x16 pixels in tiles of {tile}x" in info.value.message
        assert "MP), above the 16 MP limit for TIFF images" in info.value.message
        assert _cpu_seconds(decode_image, bomb) < 0.05  # (0.22-0.74 s when its tile was decoded)
    # Within the limit, its tiles are what it costs: a request's images are counted by them.
    large_tile = open_upload(tiled_tiff(16, 16, 2048, 2048, tile_data=bytes(64)))
    assert decoded_pixels(large_tile) == 2048 * 2048
    with pytest.raises(ImageRequestError) as info:
        check_request_pixels([large_tile] * (MAX_REQUEST_PIXELS // 2048 ** 2 + 1))
    assert info.value.status == 413
    # Tiles as writers make them: as large as the image or larger (16x16 in 16x16 or 256x256), a photo in 256x256.
    for tile in (16, 256):
        assert decode_image(tiled_tiff(16, 16, tile, tile)).size == (16, 16)
    photo = tiled_tiff(3000, 2000, 256, 256)
    assert decoded_pixels(open_upload(photo)) == 3072 * 2048 and decode_image(photo).size == (429, 286)
    # Their padding is not held against the limit (it refused a 16 MP image in 256x256 tiles: 16.8 MP decoded)
    # while the same tiles' pixels from one tile far larger than its image are.
    at_the_limit = tiled_tiff(4000, 4000, 256, 256)
    assert decoded_pixels(open_upload(at_the_limit)) == 4096 * 4096
    assert min(decode_image(at_the_limit).size) >= 256  # (reduced as it decodes, as any image)
    with pytest.raises(ImageRequestError) as info:
        decode_image(tiled_tiff(16, 16, 4096, 4096, tile_data=bytes(64)))
    assert info.value.status == 413 and "4096x4096 decoded (16.8 MP)" in info.value.message, info.value.message
    # Nor is more than a sixteenth of the limit: a thin image padded to twice its size in 512x512 tiles.
    with pytest.raises(ImageRequestError) as info:
        decode_image(tiled_tiff(513, 31189, 512, 512, tile_data=bytes(64)))
    assert info.value.status == 413 and "1024x31232 decoded (32.0 MP)" in info.value.message, info.value.message
    # Strips cost their image's rows only, whatever RowsPerStrip says (libtiff stops at the image's last row).
    strips = encode(noisy((57, 31)), "TIFF", compression="tiff_adobe_deflate", tiffinfo={278: 65536})
    assert decoded_pixels(open_upload(strips)) == 57 * 31 and decode_image(strips).size == (57, 31)


def test_formats_pillow_decodes_in_python_are_bounded_by_their_pixels_or_bytes():
    # A 3 KB RLE8 BMP of 16 MP cost a worker 2 s of CPU, 10 MB of a plain PGM 1.5 s (pure-Python decoders).
    from serving.images import MAX_BMP_RLE_BYTES, MAX_BMP_RLE_PIXELS, MAX_PLAIN_PNM_BYTES
    side = int(MAX_BMP_RLE_PIXELS ** 0.5)
    assert side * side == MAX_BMP_RLE_PIXELS
    assert open_upload(rle8_bmp(side, side)).size == (side, side) and decode_image(rle8_bmp(side, side)).mode == "RGB"
    for bomb in (rle8_bmp(side + 1, side), rle8_bmp(32768, 488)):
        with pytest.raises(ImageRequestError) as info:
            open_upload(bomb)
        assert info.value.status == 413 and "pixel limit for RLE" in info.value.message, info.value.message
        assert _cpu_seconds(open_upload, bomb) < 0.01
    # 1x2 pixels, then two-byte codes that add none once the row is full (9 MB of them cost 2.9 s): by its bytes.
    def codes(count: int) -> bytes:  # row 0's pixel, ``count`` codes of 255 more (none fit), row 1's
        return rle8_bmp(1, 2, b"\x01\x80" + b"\xff\x07" * count + b"\x00\x00\x01\x80\x00\x01")

    most = (MAX_BMP_RLE_BYTES - len(codes(0))) // 2
    assert len(codes(most)) <= MAX_BMP_RLE_BYTES
    assert open_upload(codes(most)).size == (1, 2) and decode_image(codes(most)).mode == "RGB"
    over = codes(most + 1)
    with pytest.raises(ImageRequestError) as info:
        open_upload(over)
    assert info.value.status == 413 and f"{MAX_BMP_RLE_BYTES // 1024} KB limit for RLE" in info.value.message
    assert _cpu_seconds(open_upload, over) < 0.01
    # Comments in a plain PNM cost by the square of their count (1 MB of them: 12 s): bounded by the bytes too.
    comments = b"P3 1 1 255\n" + b"#\n" * ((MAX_PLAIN_PNM_BYTES - 16) // 2) + b"7 7 7"
    assert len(comments) <= MAX_PLAIN_PNM_BYTES and decode_image(comments).size == (1, 1)
    assert _cpu_seconds(decode_image, comments) < 0.5  # (~60 ms here; at 1 MB, 12 s)
    with pytest.raises(ImageRequestError, match="limit for P1-P3"):
        open_upload(b"P3 1 1 255\n#" + comments[11:] + b" ")
    head = b"P2\n1000 %d\n255\n"
    rows = (MAX_PLAIN_PNM_BYTES - len(head % 9999)) // 2000
    at_limit = (head % rows) + b"7 " * 1000 * rows
    assert len(at_limit) <= MAX_PLAIN_PNM_BYTES
    assert open_upload(at_limit).size == (1000, rows) and decode_image(at_limit).mode == "RGB"
    over = at_limit + b" " * (MAX_PLAIN_PNM_BYTES + 1 - len(at_limit))
    with pytest.raises(ImageRequestError) as info:
        open_upload(over)
    assert info.value.status == 413 and "limit for P1-P3" in info.value.message, info.value.message
    assert _cpu_seconds(open_upload, over) < 0.01
    binary = b"P5\n2000 1000\n255\n" + bytes(2_000_000)  # the same limit does not apply to binary PNM
    assert decode_image(binary).mode == "RGB"
    # Binary PNM of another maximum value than 255 is scaled in Python (a 9.9 MB PGM of maximum 254: 8.9 s), but
    # not a grey one of 65535 (read as 16-bit, in C): bounded by its samples, a sample per channel.
    from serving.images import MAX_SCALED_PNM_SAMPLES as most
    grey_side, colour = int(most ** 0.5), b"P6\n%d %d\n1000\n"
    assert grey_side ** 2 == most
    at_limit = [b"P5\n%d %d\n254\n" % (grey_side, grey_side) + bytes(most),
                colour % (most // 3 // 100, 100) + bytes(most // 3 // 100 * 100 * 6)]
    for image in at_limit:
        assert decode_image(image).mode == "RGB"
    for bomb, maxval in ((b"P5\n%d %d\n254\n" % (grey_side, grey_side + 1) + bytes(most + grey_side), 254),
                         (colour % (most // 3 // 100 + 1, 100) + bytes((most // 3 // 100 + 1) * 600), 1000),
                         (b"P5\n3000 3300\n254\n" + bytes(3000 * 3300), 254)):
        with pytest.raises(ImageRequestError) as info:
            open_upload(bomb)
        assert info.value.status == 413 and f"maximum value {maxval} refused" in info.value.message, info.value.message
        assert _cpu_seconds(open_upload, bomb) < 0.01
    assert decode_image(b"P5\n2000 1000\n65535\n" + bytes(4_000_000)).mode == "RGB"
    # Those are all of Pillow's Python decoders (a Pillow that adds one for an accepted format needs its bound too).
    from PIL import Image
    from serving.images import ACCEPTED_FORMATS
    Image.init()
    plugins = {Image.OPEN[image_format][0].__module__ for image_format in ACCEPTED_FORMATS}
    assert len(plugins) == len(ACCEPTED_FORMATS), plugins
    in_python = {name for name, decoder in Image.DECODERS.items() if decoder.__module__ in plugins}
    assert in_python == {"bmp_rle", "ppm", "ppm_plain"}, in_python


def rle_bmp(width: int, height: int, rle4: bool = False, top_down: bool = False) -> bytes:
    """A grey BMP compressed with RLE8, or RLE4, stored bottom-up, or top-down (a negative height): one pixel, then
    end of line, on every row."""
    bits, colours = (4, 16) if rle4 else (8, 256)
    palette = b"".join(bytes((i, i, i, 0)) for i in range(0, 256, 256 // colours))
    body = b"\x01\x05\x00\x00" * height + b"\x00\x01"
    info = struct.pack("<IiiHHIIiiII", 40, width, -height if top_down else height, 1, bits, 2 if rle4 else 1,
                       len(body), 2835, 2835, colours, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body


@pytest.mark.parametrize("kind", [{"rle4": True}, {"top_down": True}], ids=["RLE4", "top-down"])
def test_an_rle4_or_top_down_rle_bmp_is_bounded_as_an_rle8_one_is(kind):
    # Pillow decodes both in Python as it does RLE8 (bmp_rle): README's "a BMP compressed with RLE of over 409,600
    # pixels" is every RLE BMP, whichever its bits or the order of its rows.
    from serving.images import MAX_BMP_RLE_PIXELS
    side = int(MAX_BMP_RLE_PIXELS ** 0.5)
    at_limit = rle_bmp(side, side, **kind)
    assert open_upload(at_limit).size == (side, side) and open_upload(at_limit).tile[0][0] == "bmp_rle"
    assert decode_image(at_limit).mode == "RGB"
    for bomb in (rle_bmp(side + 1, side, **kind), rle_bmp(4000, 4000, **kind)):
        with pytest.raises(ImageRequestError) as info:
            open_upload(bomb)
        assert info.value.status == 413 and "pixel limit for RLE" in info.value.message, info.value.message
        assert _cpu_seconds(open_upload, bomb) < 0.01


@pytest.mark.parametrize("magic", [b"P1", b"P2", b"P3"])
def test_every_plain_pnm_is_bounded_by_its_bytes(magic):
    # P1 (bits written as text) is read a number at a time by the same decoder as P2 and P3, its comments as costly:
    # README's "a plain (text) PNM, P1-P3, over 64 KB" is 413.
    from serving.images import MAX_PLAIN_PNM_BYTES
    head, pixel = {b"P1": (b"P1 1 1\n", b"1"), b"P2": (b"P2 1 1 255\n", b"7"),
                   b"P3": (b"P3 1 1 255\n", b"7 7 7")}[magic]
    comments = b"#\n" * ((MAX_PLAIN_PNM_BYTES - len(head) - len(pixel)) // 2)
    at_limit = head + comments + pixel
    assert len(at_limit) <= MAX_PLAIN_PNM_BYTES and decode_image(at_limit).size == (1, 1)
    over = head + comments + b"#\n" + pixel
    assert len(over) > MAX_PLAIN_PNM_BYTES
    with pytest.raises(ImageRequestError) as info:
        open_upload(over)
    assert info.value.status == 413 and "limit for P1-P3" in info.value.message, info.value.message


def test_an_exif_block_of_exactly_the_limit_is_read_and_one_byte_more_is_413():
    picture = halves((64, 32))
    block = exif_block(5_000)
    # Pillow's PNG reader puts JPEG's "Exif\0\0" before the chunk: the block as read is MAX_EXIF_BYTES.
    prefix = len(Image.open(io.BytesIO(png_with_exif(picture, block))).info["exif"]) - len(block)
    exact = block + bytes(MAX_EXIF_BYTES - prefix - len(block))  # padding after the block's directory
    out = np.asarray(decode_image(png_with_exif(picture, exact)))
    assert out.shape == (64, 32, 3) and out[8, 16, 0] > 200  # its Orientation applied: read, not refused
    with pytest.raises(ImageRequestError) as info:
        decode_image(png_with_exif(picture, exact + b"\0"))
    assert info.value.status == 413 and f"above the {MAX_EXIF_BYTES // 1024} KB limit" in info.value.message


def test_a_tiff_directory_of_exactly_the_tag_limit_is_read_and_one_more_is_400():
    own = len(Image.open(io.BytesIO(grey_tiff(64, 32))).tag_v2)  # grey_tiff's own entries
    junk = [(tag, 1, 1, b"A") for tag in range(0x1000, 0x1000 + MAX_TIFF_TAGS - own + 1)]
    assert decode_image(grey_tiff(64, 32, extra=junk[:-1])).size == (64, 32)
    with pytest.raises(ImageRequestError) as info:
        decode_image(grey_tiff(64, 32, extra=junk))
    assert info.value.status == 400 and f"TIFF directory of {MAX_TIFF_TAGS + 1} entries" in info.value.message


def test_a_request_of_exactly_the_pixel_limit_passes_and_one_pixel_more_is_413():
    from serving.images import MAX_REQUEST_PIXELS, check_request_pixels
    side = 4000  # 16 MP each: headers only, nothing decoded
    count = MAX_REQUEST_PIXELS // (side * side)
    assert count * side * side == MAX_REQUEST_PIXELS
    opened = [open_upload(png_declaring_size(side, side)) for _ in range(count)]
    check_request_pixels(opened)
    with pytest.raises(ImageRequestError) as info:
        check_request_pixels(opened + [open_upload(png_declaring_size(1, 1))])
    assert info.value.status == 413 and "limit per request" in info.value.message


@pytest.mark.parametrize("size", [(4000, 3000), (2000, 1500), (1000, 700), (600, 257), (300, 200)])
def test_a_jpeg_is_counted_at_the_pixels_pillow_decodes_it_to(size):
    # check_request_pixels counts a JPEG at its draft scale on its header alone: a wrong scale lets
    # through JPEGs the 64 MP rule was meant to stop, or refuses valid ones.
    from serving.images import DECODE_MIN_SIDE, decoded_pixels
    data = encode(Image.new("RGB", size, (200, 30, 40)), "JPEG")
    counted = decoded_pixels(open_upload(data))
    img = Image.open(io.BytesIO(data))
    img.draft(None, (DECODE_MIN_SIDE, DECODE_MIN_SIDE))
    img.load()
    assert counted == img.width * img.height


def test_a_progressive_jpeg_has_the_pixel_limit_of_other_formats():
    # libjpeg holds a progressive JPEG's whole coefficients to decode its scans, whatever the draft scale: 64 MP
    # of one cost the adapter 0.5 s (1.3 s with 32 scans) and 370 MB, a baseline one 43 ms.
    from serving.images import MAX_IMAGE_PIXELS, MAX_JPEG_PIXELS, check_request_pixels, decoded_pixels
    side = int(MAX_IMAGE_PIXELS ** 0.5)  # 4000: headers only below, nothing decoded
    at_limit, over = (jpeg_declaring_size(width, side, progressive=True) for width in (side, side + 1))
    assert open_upload(at_limit).size == (side, side) and decoded_pixels(open_upload(at_limit)) == side * side
    with pytest.raises(ImageRequestError) as info:
        open_upload(over)
    assert info.value.status == 413 and "limit for progressive JPEG images" in info.value.message, info.value.message
    assert f"baseline JPEG: {MAX_JPEG_PIXELS / 1e6:.0f} MP" in info.value.message
    assert open_upload(jpeg_declaring_size(8000, 8000)).size == (8000, 8000)  # baseline: its own limit
    with pytest.raises(ImageRequestError):  # 16 MP each, counted whole in a request's pixels
        check_request_pixels([open_upload(at_limit)] * 5)


def test_animated_gif_gives_its_first_frame():
    img = decode_image(animated_gif([Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))]))
    assert np.asarray(img)[16, 16].tolist() == [255, 0, 0]


def test_transparency_is_composited_on_white():
    clear = Image.new("RGBA", (8, 8), (10, 200, 30, 0))  # colour under alpha 0 must not show
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert np.asarray(decode_image(encode(clear))).min() == 255
    assert abs(int(np.asarray(decode_image(encode(half)))[0, 0, 0]) - 127) <= 1
    la = Image.new("LA", (8, 8), (0, 0))
    assert np.asarray(decode_image(encode(la))).min() == 255
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert np.asarray(decode_image(encode(palette, transparency=0))).min() == 255
    # A PNG's single transparent grey or colour (tRNS), as a browser shows it: white here, the rest kept.
    for mode, key, other in (("L", 77, 20), ("RGB", (10, 200, 30), (0, 0, 250))):
        keyed = Image.new(mode, (8, 8), key)
        keyed.paste(other, (0, 0, 4, 8))
        got = np.asarray(decode_image(encode(keyed, transparency=key)))
        assert got[:, 4:].min() == 255 and got[:, :4].max() < 251, (mode, got[0])


def test_sixteen_bit_grey_reads_like_its_eight_bit_version():
    data, grey = sixteen_bit_png(noisy())
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    got = np.asarray(decode_image(data), dtype=int)
    assert np.abs(got - np.asarray(grey.convert("RGB"), dtype=int)).max() <= 1


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "P", "YCbCr", "F", "I"])
def test_every_mode_becomes_8_bit_rgb(mode):
    src = noisy()
    img = src.convert(mode) if mode not in ("F", "I") else Image.fromarray(
        np.asarray(src.convert("L"), dtype=np.float32 if mode == "F" else np.int32) * (1 / 255 if mode == "F" else 257))
    fmt = "TIFF" if mode in ("F", "I", "YCbCr") else ("JPEG" if mode == "CMYK" else "PNG")
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (32, 32)
    if mode in ("L", "F", "I"):  # grey levels survive the trip
        assert np.abs(np.asarray(out, dtype=int)[..., 0] - np.asarray(src.convert("L"), dtype=int)).max() <= 1


def test_a_float_image_already_in_0_to_255_keeps_its_grey_levels():
    # Float (mode F) pixels are usually 0..1 (scaled up, above); ones already in 0..255 are not scaled again.
    grey = noisy().convert("L")
    img = Image.fromarray(np.asarray(grey, dtype=np.float32))
    out = decode_image(encode(img, "TIFF"))
    assert np.abs(np.asarray(out, dtype=int)[..., 0] - np.asarray(grey, dtype=int)).max() <= 1


def test_resize_is_the_whole_image_and_identity_at_32():
    src = noisy()
    assert torch.equal(image_to_tensor(src), torch.from_numpy(np.array(src)).permute(2, 0, 1))
    wide = image_to_tensor(halves((400, 100)))  # not cropped: both halves survive, squeezed
    assert wide.shape == (3, INPUT_SIZE, INPUT_SIZE)
    assert wide[0, :, 2].min() > 200 and wide[2, :, -3].min() > 200
    # Antialiased, as the seed's torchvision Resize((32, 32)) on a PIL image: a one-pixel checkerboard shrunk
    # tenfold is an even grey, not a sample of its black and white pixels.
    from torchvision import transforms

    def seed_input(img):
        return torch.from_numpy(np.array(transforms.Resize((32, 32))(img))).permute(2, 0, 1)

    board = Image.fromarray((np.indices((320, 320)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB")
    shrunk = image_to_tensor(board)
    assert torch.equal(shrunk, seed_input(board))
    assert shrunk.min() >= 120 and shrunk.max() <= 135, (int(shrunk.min()), int(shrunk.max()))
    big = noisy((320, 240), seed=3)
    assert torch.equal(image_to_tensor(big), seed_input(big))


@pytest.mark.parametrize("build,status", [
    (lambda: b"", 400),
    (lambda: b"just some text", 400),
    (lambda: encode(noisy((256, 256)), "JPEG")[:1500], 400),
    (lambda: png_with_bad_crc(noisy(), b"IDAT"), 400),
    (lambda: png_with_bad_crc(noisy(), b"IHDR"), 400),
    (decompression_bomb_png, 413),
    (lambda: png_declaring_size(100_000, 100_000), 413),
    (oversized_png, 413),
], ids=["empty", "text", "truncated", "bad-crc-pixels", "bad-crc-header", "bomb", "bomb-header", "over-limit"])
def test_bad_images_raise_with_their_status(build, status):
    with pytest.raises(ImageRequestError) as info:
        decode_image(image_bytes({"body": bytearray(build())}))
    assert info.value.status == status


def test_bytes_after_a_pngs_end_are_not_read_as_chunks():
    # Some tools append data after IEND; Pillow ignores it, and the checksum check stops at IEND too.
    src = noisy()
    img = decode_image(encode(src) + b"\0" * 16 + b"trailing data")
    assert np.array_equal(np.asarray(img), np.asarray(src))


def test_pixel_limit_is_checked_before_decoding():
    # Exactly at the limit decodes; one row more is refused from the header alone.
    assert MAX_IMAGE_PIXELS == 16_000_000
    assert open_upload(png_declaring_size(4000, 4000)).size == (4000, 4000)  # the header alone: admitted
    with pytest.raises(ImageRequestError, match="16 MP limit for PNG images"):
        decode_image(png_declaring_size(4000, 4001))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "PPM"])
def test_the_accepted_formats_decode(fmt):
    out = decode_image(encode(halves((64, 32)), fmt))
    assert out.size == (64, 32) and out.mode == "RGB"
    assert np.asarray(out)[16, 8, 0] > 180 and np.asarray(out)[16, 56, 2] > 180  # red left, blue right


def icon_holding(png: bytes) -> bytes:
    """An ICO file whose one entry is ``png`` (an icon may hold a PNG of any size; its header says 256)."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16) + png


@pytest.mark.filterwarnings("ignore:Image was not the expected size")  # Pillow opening the small icon itself
def test_formats_pillow_decodes_while_opening_are_refused_unread():
    # Pillow's ICO reader decodes the PNG inside while opening it, before the pixel limit could refuse
    # it: a 100 KB icon made a worker hold ~570 MB for 2 s. Only ACCEPTED_FORMATS are opened at all.
    big = encode(Image.new("L", (8000, 8000)), optimize=True)
    started = time.perf_counter()
    with pytest.raises(ImageRequestError) as info:
        decode_image(icon_holding(big))
    assert info.value.status == 400 and "not an image in a format the server reads (JPEG, PNG" in info.value.message
    assert time.perf_counter() - started < 0.5
    assert Image.open(io.BytesIO(icon_holding(encode(noisy())))).format == "ICO"  # a real icon, refused all the same
    with pytest.raises(ImageRequestError, match="format the server reads"):
        decode_image(icon_holding(encode(noisy())))


def test_a_jpeg_of_too_many_scans_is_refused_before_decoding():
    # libjpeg decodes every scan over the whole picture, at any draft scale: a 156 KB JPEG of 2,000 repeated
    # scans cost a decode 24 s of CPU. Refused on its markers, in milliseconds.
    hostile = jpeg_with_repeated_scans(Image.new("RGB", (4000, 4000), (120, 130, 140)), 2000)
    assert len(hostile) < 200_000
    started = time.perf_counter()
    with pytest.raises(ImageRequestError) as info:
        decode_image(hostile)
    assert info.value.status == 400 and f"more than {MAX_JPEG_SCANS} scans" in info.value.message
    assert time.perf_counter() - started < 0.5
    # At the limit it decodes (libjpeg warns of the repeated scans, the picture is right).
    at_limit = jpeg_with_repeated_scans(halves((64, 32)), MAX_JPEG_SCANS - 10)
    assert jpeg_markers(at_limit)[1] == MAX_JPEG_SCANS
    out = np.asarray(decode_image(at_limit))
    assert out[16, 8, 0] > 180 and out[16, 56, 2] > 180


def test_a_long_run_of_fill_bytes_in_a_jpeg_costs_the_scan_count_no_more_than_its_length():
    # 0xFF fill bytes may precede a marker. The marker search matched them as a run and backtracked from every
    # start in it: 64 KB of them cost ~18 s of CPU (a worker past responseTimeout, KServe's loop held).
    data = encode(halves((64, 32)), "JPEG")
    sos = data.index(b"\xff\xda")
    after_header = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    hostile = data[:after_header] + b"\xff" * 65536 + b"\x00" + data[after_header:]  # \xff\x00: a stuffed 0xFF
    started = time.perf_counter()
    assert jpeg_markers(hostile)[1] == jpeg_markers(data)[1] == 1
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_a_file_of_empty_metadata_blocks_is_refused_before_pillow_reads_them(fmt):
    # Pillow's openers read metadata block by block in Python: 256 KB of empty ones cost 76-130 ms, a 10 MB JPEG
    # of them 4.5 s and +342 MB, on the adapter's loop or in a worker. At most MAX_BLOCKS (or one per BLOCK_BYTES).
    own = {"PNG": 3, "JPEG": 9, "GIF": 0}[fmt]  # the image's own blocks: IHDR IDAT IEND; APP0 DQT x2 SOF DHT x4 SOS
    picture = halves((64, 32))
    hostile = padded_with_empty_blocks(picture, fmt, {"PNG": 200_000, "JPEG": 400_000, "GIF": 800_000}[fmt])
    assert len(hostile) // BLOCK_BYTES > MAX_BLOCKS  # over 1 MB: its own size's allowance is the limit
    with pytest.raises(ImageRequestError) as info:
        decode_image(hostile)
    assert info.value.status == 400 and "refused: more than" in info.value.message, info.value.message
    assert f"more than {len(hostile) // BLOCK_BYTES:,} in a file of {len(hostile):,} bytes" in info.value.message
    too_many = padded_with_empty_blocks(picture, fmt, MAX_BLOCKS - own + 1)
    assert len(too_many) // BLOCK_BYTES < MAX_BLOCKS
    with pytest.raises(ImageRequestError, match=f"more than {MAX_BLOCKS:,} in a file"):
        open_upload(too_many)
    at_limit = decode_image(padded_with_empty_blocks(picture, fmt, MAX_BLOCKS - own))
    assert np.array_equal(np.asarray(at_limit), np.asarray(decode_image(encode(picture, fmt))))
    if fmt == "JPEG":
        assert jpeg_markers(padded_with_empty_blocks(picture, fmt, 10)) == (10 + own, 1)


@pytest.mark.parametrize("before_pixels", [True, False], ids=["read-as-opened", "read-as-loaded"])
def test_a_pngs_compressed_metadata_is_left_out_unread(before_pixels):
    # Pillow inflates each zTXt, iCCP and compressed iTXt, up to 1 MB, as it reads it (before the pixels: as it
    # opens the file, on the adapter's event loop for a small upload): 60 of 1 KB, a 66 KB file, cost 0.2 s. Nothing
    # reads them here: the file is opened without them, the same pixels, whatever they hold (a profile over
    # Pillow's 1 MB limit too: it refused the file); the plain text chunks stay.
    megabyte = zlib.compress(bytes(2**20 - 1), 9)  # ~1 KB inflating to just under Pillow's MAX_TEXT_CHUNK
    compressed = [png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(bytes(3 * 2**20)))] + [
        png_chunk(b"zTXt", b"k%d\0\0" % i + megabyte) if i % 2 else png_chunk(b"iTXt", b"k%d\0\1\0\0\0" % i + megabyte)
        for i in range(1, 60)]
    plain = [png_chunk(b"tEXt", b"Comment\0hello"), png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0<x/>")]
    picture = halves((64, 32))
    hostile = png_with_chunks(picture, plain + compressed, before_pixels)
    assert len(hostile) < 70_000
    opened = open_upload(hostile)
    if before_pixels:
        assert opened.info["Comment"] == "hello" and opened.info["XML:com.adobe.xmp"] == "<x/>"
    assert np.array_equal(np.asarray(decode_image(hostile)), np.asarray(decode_image(encode(picture))))
    assert _cpu_seconds(decode_image, hostile) < 0.02  # (inflated: 0.2 s)


def test_a_large_png_may_hold_one_chunk_per_block_bytes(monkeypatch):
    # Past MAX_BLOCKS, a file may hold a block per BLOCK_BYTES: a PNG's pixels in libpng's 8 KB chunks.
    monkeypatch.setattr(ImageFile, "MAXBLOCK", 8192)
    data = encode(noisy((1000, 3000)), compress_level=0)
    chunks = data.count(b"IDAT")
    assert MAX_BLOCKS < chunks < len(data) // BLOCK_BYTES, (chunks, len(data))
    assert open_upload(data).size == (1000, 3000) and decode_image(data).size == (334, 1000)  # box-reduced by 3


def test_a_ppm_header_must_end_within_its_first_bytes():
    # Pillow reads a PPM's header a byte at a time: 256 KB of blanks in it cost 80 ms (10 MB: ~3 s).
    pixels = b"\x10\x20\x30" * 4
    for filler in (b" ", b"\n# a comment\n"):
        long_header = b"P6" + filler * (2 * MAX_PPM_HEADER_BYTES // len(filler)) + b" 2 2 255\n" + pixels
        with pytest.raises(ImageRequestError) as info:
            decode_image(long_header + b"\x00" * MAX_PPM_HEADER_BYTES)
        assert info.value.status == 400 and "PPM header refused" in info.value.message
    # GIMP's header, and a short file whose long header costs little: decoded.
    gimp = b"P6\n# Created by GIMP version 2.10.38 PNM plug-in\n2 2\n255\n" + pixels
    assert decode_image(gimp + b"\x00" * MAX_PPM_HEADER_BYTES).getpixel((0, 0)) == (16, 32, 48)
    short = b"P6" + b" " * (MAX_PPM_HEADER_BYTES - 30) + b" 2 2 255\n" + pixels
    assert len(short) <= MAX_PPM_HEADER_BYTES and decode_image(short).getpixel((1, 1)) == (16, 32, 48)


@pytest.mark.parametrize("mode,scans", [("RGB", 10), ("L", 6), ("CMYK", 18)])
def test_progressive_jpegs_as_encoders_write_them_decode(mode, scans):
    data = encode(halves((64, 32)).convert(mode), "JPEG", progressive=True)
    assert jpeg_markers(data)[1] == scans
    assert decode_image(data).size == (64, 32)
    # Scans are counted on the markers: a scan marker's bytes inside a segment (an EXIF thumbnail, a
    # comment) are skipped with it; a baseline JPEG is one scan.
    exif = Image.Exif()
    exif[0x010E] = b"\xff\xda" * 100  # ImageDescription
    assert jpeg_markers(encode(halves((64, 32)), "JPEG", exif=exif.tobytes()))[1] == 1


def test_a_large_sixteen_bit_grey_image_is_reduced_not_refused():
    # Pillow's reduce() has no 16-bit modes: a 16-bit PNG over 512 px a side was refused as corrupt.
    data, grey = sixteen_bit_png(noisy((600, 520), seed=4))
    out = decode_image(data)
    assert out.size == (300, 260) and out.mode == "RGB"
    expected = np.asarray(grey.reduce(2), dtype=int)
    assert np.abs(np.asarray(out, dtype=int)[..., 0] - expected).max() <= 1


def test_a_jpeg_with_multi_picture_data_is_decoded_as_a_jpeg():
    # Pillow names a JPEG with MPF data (many cameras and phones) "MPO": it gets the JPEG pixel limit and
    # the reduced-scale decode, not the 16 MP limit of full-size formats.
    photo = Image.new("RGB", (5000, 4000), (200, 30, 40))
    data = encode(photo, "MPO", save_all=True, append_images=[photo.resize((160, 128))])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = decode_image(data)
    assert out.size == (625, 500)  # libjpeg's 1/8 scale (draft); a full decode box-reduces to 333x266
    assert abs(int(np.asarray(out)[250, 300, 0]) - 200) <= 3


def test_where_the_image_may_be_in_a_request():
    png = encode(noisy())
    b64 = base64.b64encode(png).decode()
    assert image_bytes({"body": bytearray(png)}) == png
    for field in ("image", "data", "file"):
        assert image_bytes({field: bytearray(png)}) == png
        assert image_bytes({"body": {field: b64}}) == png
    assert image_bytes({"body": {"image": "data:image/png;base64," + b64}}) == png
    assert image_bytes({"body": b64}) == png  # text/plain body holding base64
    with pytest.raises(ImageRequestError, match="fields: photo"):
        image_bytes({"photo": bytearray(png)})
    with pytest.raises(ImageRequestError, match="JSON body"):
        image_bytes({"body": {"picture": b64}})


def test_a_json_body_sent_as_a_form_is_refused_in_a_short_line_that_names_the_content_type():
    """curl -d '{"instances": ...}' without Content-Type: TorchServe hands the whole body over as a form
    field's name, and the refusal echoed it (a 2.6 MB body, a 2 MB error)."""
    body = '{"instances": [{"image": {"b64": "' + "A" * 100_000 + '"}}]}'
    for row in ({body: bytearray()}, {body: bytearray(), **{f"field{n}": bytearray() for n in range(10)}}):
        with pytest.raises(ImageRequestError) as refused:
            image_bytes(row)
        message = refused.value.message
        assert len(message) < 1024 and "Content-Type: application/json" in message, message[:2000]
        assert ('{"instances": [{"image"' in message) == (len(row) == 1)  # recognisable; a few names of many
    with pytest.raises(ImageRequestError, match="not base64"):
        image_bytes({"body": {"image": "%%% not base64 %%%"}})
    # A field's name is the client's bytes: control characters shown escaped, as in every refusal (no line forged).
    with pytest.raises(ImageRequestError) as refused:
        image_bytes({"photo\r\nERROR forged line\x1b[2J": bytearray()})
    assert "fields: photo\\r\\nERROR forged line\\x1b[2J)" in refused.value.message, refused.value.message


def test_only_small_requests_of_few_pixels_are_decoded_where_they_are_read():
    """KServe's predictor decodes these on its event loop; a small file that declares many pixels (a flat
    PNG: tens of KB, ~0.1-0.3 s to decode) must go to a thread, or it would hold up every other request."""
    cifar = open_upload(encode(noisy()))
    flat = encode(Image.new("RGB", (3000, 3000), (10, 200, 30)))
    assert len(base64.b64encode(flat)) < INLINE_DECODE_MAX_BYTES  # small on the wire, even as base64
    assert decodes_inline(4000) and decodes_inline(4000, [cifar] * 64)
    assert not decodes_inline(4000, [cifar] * 65)
    assert not decodes_inline(len(flat), [open_upload(flat)])
    tiled = tiled_tiff(16, 16, 2048, 2048)  # 16x16 declared, one 2048x2048 tile decoded whole
    assert len(tiled) < INLINE_DECODE_MAX_BYTES and not decodes_inline(len(tiled), [open_upload(tiled)])
    # Decoded in Python (~60 ms at their bounds): a small RLE BMP, a plain PNM, a binary one scaled; an AVIF whose
    # AV1 frame may be larger than the size it declares.
    for slow in (rle8_bmp(64, 64), b"P2\n2 2\n255\n1 2 3 4", b"P5\n2 2\n254\n" + bytes(4),
                 avif_declaring((8, 8), (256, 256))):
        assert not decodes_inline(len(slow), [cifar, open_upload(slow)]), slow[:2]
    assert decodes_inline(100, [open_upload(b"P5\n2 2\n255\n" + bytes(4))])  # (read as it is, in C)
    assert not decodes_inline(INLINE_DECODE_MAX_BYTES + 1) and not decodes_inline(None)  # too long, or unknown
    assert decodes_inline(INLINE_DECODE_MAX_BYTES)  # the limit itself is inline
