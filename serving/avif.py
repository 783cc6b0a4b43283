"""The size of the AV1 frames an AVIF holds, read from the file without decoding it.

An AVIF declares its size in an ispe box (what Pillow reports, and what serving/images.py's pixel limits would
check), but libavif decodes the AV1 frames its items or its image sequence hold, whatever their size: a 3.4 KB file
declaring 64x64 held a 16384x16384 frame, 1.1 s and +550 MB to decode (session 60). A frame's size is bounded by
its sequence header (AV1 5.5.1: max_frame_width_minus_1, max_frame_height_minus_1), the first OBU of an AV1 item's
data (AVIF 2.1) and of a sequence's sync sample (AV1-ISOBMFF 2.4): read here where libavif takes its frames from
(ISO/IEC 14496-12 boxes: the meta box's av01 items, iinf and iloc, in the file or its idat; each track's first
sample, stsd, stsz and stco/co64: Pillow decodes the first frame only). Only the boxes' fields and the first bytes of
each item or sample are read: a file's cost here is bounded by its box bytes, not by what its tables point at."""
from __future__ import annotations

from itertools import islice

# Items in iloc (a grid's tiles and their alpha planes, metadata: a 16 MP grid of 256x256 tiles has 512) and
# extents an item (libavif writes one): ~20 ms here at most, 1024 x 16 cost 40 ms (on the adapter's event loop).
_MAX_ITEMS = 512
_MAX_EXTENTS = 4
_MAX_LEADING_OBUS = 4  # OBUs read before an item's or sample's sequence header (a temporal delimiter, metadata)
_WINDOW = 4096  # bytes of an item or sample read: its sequence header is ~10-360 bytes (32 operating points at most)
_SEQUENCE_HEADER = 1  # OBU type (AV1 6.2.2)


class NotReadable(ValueError):
    """An AVIF whose AV1 frames cannot be sized here: an item or sample that does not begin with its sequence
    header, or more items or extents than the bounds above."""


def _boxes(data, start: int, end: int):
    """(type, payload start, payload end) of each box in ``data[start:end]``; a box cut short ends the walk."""
    at = start
    while at + 8 <= end:
        size, kind, head = int.from_bytes(data[at:at + 4], "big"), bytes(data[at + 4:at + 8]), 8
        if size == 1:
            size, head = int.from_bytes(data[at + 8:at + 16], "big"), 16
        elif size == 0:
            size = end - at
        if size < head or at + size > end:
            return
        yield kind, at + head, at + size
        at += size


def _child(data, span: tuple[int, int], kind: bytes) -> tuple[int, int] | None:
    return next(((s, e) for k, s, e in _boxes(data, *span) if k == kind), None)


def _path(data, span: tuple[int, int] | None, *kinds: bytes) -> tuple[int, int] | None:
    """The payload of the box reached through ``kinds`` from ``span``, the first of each kind."""
    for kind in kinds:
        if span is None:
            return None
        span = _child(data, span, kind)
    return span


class _Reader:
    """Big-endian fields of ``data[at:end]``: past the end they read 0 and ``short`` is set."""

    def __init__(self, data, span: tuple[int, int]):
        self.data, (self.at, self.end), self.short = data, span, False

    def uint(self, size: int) -> int:
        if self.at + size > self.end:
            self.short = True
        value = int.from_bytes(self.data[self.at:min(self.at + size, self.end)], "big")
        self.at += size
        return value


def _av1_item_ids(data, meta: tuple[int, int]) -> set[int]:
    """The ids of the meta box's items of type av01 (iinf's infe entries, versions 2 and 3)."""
    iinf = _child(data, meta, b"iinf")
    if iinf is None:
        return set()
    head = _Reader(data, iinf)
    count = head.uint(2 if head.uint(4) >> 24 == 0 else 4)  # (after its version and flags)
    if count > _MAX_ITEMS:
        raise NotReadable(f"{count} items")
    ids = set()
    for kind, start, end in islice(_boxes(data, head.at, iinf[1]), count):
        fields = _Reader(data, (start, end))
        version = fields.uint(4) >> 24
        if kind == b"infe" and version >= 2:
            item_id = fields.uint(2 if version == 2 else 4)
            fields.uint(2)  # item_protection_index
            if fields.uint(4) == int.from_bytes(b"av01", "big") and not fields.short:
                ids.add(item_id)
    return ids


def _av1_item_starts(data, meta: tuple[int, int]) -> list[bytes]:
    """The first bytes of each av01 item's data, by iloc (construction method 0: in the file; 1: in the idat)."""
    iloc, idat, av1 = _child(data, meta, b"iloc"), _child(data, meta, b"idat"), _av1_item_ids(data, meta)
    if iloc is None or not av1:
        return []
    read = _Reader(data, iloc)
    version = read.uint(4) >> 24
    sizes = read.uint(1)
    offset_size, length_size = sizes >> 4, sizes & 15
    sizes = read.uint(1)
    base_size, index_size = sizes >> 4, (sizes & 15 if version in (1, 2) else 0)
    id_size = 2 if version < 2 else 4
    count = read.uint(id_size)
    if count > _MAX_ITEMS:
        raise NotReadable(f"{count} items")
    starts = []
    for _ in range(count):
        item_id = read.uint(id_size)
        method = read.uint(2) & 15 if version in (1, 2) else 0
        read.uint(2)  # data_reference_index
        base, extents = read.uint(base_size), read.uint(2)
        if extents > _MAX_EXTENTS:
            raise NotReadable(f"an item of {extents} extents")
        first = [(read.uint(index_size), read.uint(offset_size), read.uint(length_size))[1:] for _ in range(extents)]
        if read.short:
            break
        if item_id not in av1 or not first or method not in (0, 1):  # (2: by reference to another item, refused
            continue                                                  # by libavif)
        (offset, length), (origin, end) = first[0], ((0, len(data)) if method == 0 else idat or (0, 0))
        start = origin + base + offset
        starts.append(bytes(data[start:min(start + length if length else end, end, start + _WINDOW)]))
    return starts


def _first_av1_samples(data, moov: tuple[int, int]) -> list[bytes]:
    """The first bytes of the first sample of each track whose sample entry is av01."""
    starts = []
    for kind, start, end in _boxes(data, *moov):
        table = _path(data, (start, end), b"mdia", b"minf", b"stbl") if kind == b"trak" else None
        stsd = _child(data, table, b"stsd") if table else None
        if stsd is None or next((k for k, _, _ in _boxes(data, stsd[0] + 8, stsd[1])), None) != b"av01":
            continue
        stsz, chunks, wide = _child(data, table, b"stsz"), _child(data, table, b"stco"), False
        if chunks is None:
            chunks, wide = _child(data, table, b"co64"), True
        if stsz is None or chunks is None:
            continue
        sizes = _Reader(data, (stsz[0] + 4, stsz[1]))
        size = sizes.uint(4)
        if not size and sizes.uint(4):  # (one size for all samples, else a table after their count)
            size = sizes.uint(4)
        offsets = _Reader(data, (chunks[0] + 4, chunks[1]))
        offset = offsets.uint(8 if wide else 4) if offsets.uint(4) else None
        if offset is not None and not (sizes.short or offsets.short):
            starts.append(bytes(data[offset:offset + min(size, _WINDOW)]))
    return starts


def _leb128(data: bytes, at: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        if at >= len(data):
            break
        byte, at = data[at], at + 1
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, at
    return len(data), len(data)


def _sequence_header_pixels(payload: bytes) -> int:
    """max_frame_width x max_frame_height of a sequence header OBU's payload (AV1 5.5.1); 0 when cut short."""
    total = 8 * len(payload)
    bits, at = int.from_bytes(payload, "big"), 0

    def f(n: int) -> int:
        nonlocal at
        at += n
        return (bits >> (total - at)) & ((1 << n) - 1) if at <= total else 0

    f(3)  # seq_profile
    f(1)  # still_picture
    if f(1):  # reduced_still_picture_header
        f(5)
    else:
        buffer_delay_bits, decoder_model = 0, False
        if f(1):  # timing_info_present_flag
            f(32), f(32)
            if f(1):  # equal_picture_interval: num_ticks_per_picture_minus_1, uvlc()
                zeros = 0
                while not f(1) and zeros < 32 and at <= total:
                    zeros += 1
                f(zeros)
            decoder_model = bool(f(1))
            if decoder_model:
                buffer_delay_bits = f(5) + 1
                f(32), f(5), f(5)
        display_delay = f(1)
        for _ in range(f(5) + 1):  # operating points
            f(12)
            if f(5) > 7:  # seq_level_idx
                f(1)
            if decoder_model and f(1):
                f(buffer_delay_bits), f(buffer_delay_bits), f(1)
            if display_delay and f(1):
                f(4)
    width_bits, height_bits = f(4) + 1, f(4) + 1
    width, height = f(width_bits) + 1, f(height_bits) + 1
    return width * height if at <= total else 0


def _frame_pixels(start: bytes) -> int:
    """The largest frame the sequence header at the start of an item's or sample's OBUs allows."""
    at = 0
    for _ in range(_MAX_LEADING_OBUS + 1):
        if at >= len(start):
            break
        header = start[at]
        at += 2 if header & 0x4 else 1  # (an extension byte)
        size, at = _leb128(start, at) if header & 0x2 else (len(start) - at, at)
        if (header >> 3) & 0xF == _SEQUENCE_HEADER and (pixels := _sequence_header_pixels(start[at:at + size])):
            return pixels
        at += size
    raise NotReadable("an AV1 item or sample that does not begin with its sequence header")


def av1_frame_pixels(data) -> int:
    """The pixels of the AV1 frames libavif decodes for an AVIF's first picture, by their sequence headers: every
    av01 item's (a grid's tiles, an alpha plane, a thumbnail) in all, or, for an image sequence, the first sample's
    of each av01 track (its colour and its alpha), whichever is more. Raises NotReadable."""
    whole = (0, len(data))
    moov, meta = _child(data, whole, b"moov"), _child(data, whole, b"meta")
    items = _av1_item_starts(data, (meta[0] + 4, meta[1])) if meta else []  # (a full box: version, flags first)
    samples = _first_av1_samples(data, moov) if moov else []
    return max(sum(map(_frame_pixels, items)), sum(map(_frame_pixels, samples)))
