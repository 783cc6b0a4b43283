"""The size of the AV1 frames an AVIF holds, read from the file without decoding it.

An AVIF declares its size in an ispe box (what Pillow reports, and what serving/images.py's pixel limits would
check), but libavif decodes the AV1 frames its items or its image sequence hold, whatever their size: a 3.4 KB file
declaring 64x64 held a 16384x16384 frame, 1.1 s and +550 MB to decode (session 60). A frame's size is bounded by
its sequence header (AV1 5.5.1: max_frame_width_minus_1, max_frame_height_minus_1), which the AV1 decoder reads from
the item's (or sample's) own OBUs: those are read here, in the places libavif takes its frames from (ISO/IEC 14496-12
boxes: the meta box's item locations, iloc, with their idat; a sequence's tracks' first sample, by stco/co64 and
stsz: Pillow decodes the first frame only)."""
from __future__ import annotations

_MAX_ITEMS = 256  # items (a grid's tiles, an alpha plane, metadata) and extents read; libavif takes 16,384 tiles
_MAX_EXTENTS = 64  # per item
_SEQUENCE_HEADER = 1  # OBU type (AV1 6.2.2)
_SEQUENCE_HEADER_BYTES = 512  # a sequence header's fields fit in ~360 bytes (32 operating points at most)


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


def _child(data, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    return next(((s, e) for k, s, e in _boxes(data, start, end) if k == kind), None)


def _path(data, start: int, end: int, *kinds: bytes) -> tuple[int, int] | None:
    """The payload of the box reached through ``kinds``, the first of each kind."""
    for kind in kinds:
        found = _child(data, start, end, kind)
        if found is None:
            return None
        start, end = found
    return start, end


class _Reader:
    """Big-endian fields of ``data`` from ``at``: past the end they read 0 and ``short`` is set."""

    def __init__(self, data, at: int, end: int):
        self.data, self.at, self.end, self.short = data, at, end, False

    def uint(self, size: int) -> int:
        if self.at + size > self.end:
            self.short = True
        value = int.from_bytes(self.data[self.at:min(self.at + size, self.end)], "big")
        self.at += size
        return value


def _item_payloads(data, meta: tuple[int, int]) -> list[bytes]:
    """Each item's bytes by the meta box's iloc (construction method 0: in the file; 1: in its idat)."""
    start, end = meta[0] + 4, meta[1]  # (a full box: its version and flags first)
    iloc, idat = _child(data, start, end, b"iloc"), _child(data, start, end, b"idat")
    if iloc is None:
        return []
    version = data[iloc[0]]
    read = _Reader(data, iloc[0] + 4, iloc[1])
    sizes = read.uint(1)
    offset_size, length_size = sizes >> 4, sizes & 15
    sizes = read.uint(1)
    base_size, index_size = sizes >> 4, (sizes & 15 if version in (1, 2) else 0)
    id_size = 2 if version < 2 else 4
    payloads = []
    for _ in range(min(read.uint(id_size), _MAX_ITEMS)):
        read.uint(id_size)
        method = read.uint(2) & 15 if version in (1, 2) else 0
        read.uint(2)  # data_reference_index
        base = read.uint(base_size)
        extents = [(read.uint(index_size), read.uint(offset_size), read.uint(length_size))[1:]
                   for _ in range(min(read.uint(2), _MAX_EXTENTS))]
        if read.short:
            break
        if method == 0:
            origin, limit = 0, len(data)
        elif method == 1 and idat is not None:
            origin, limit = idat
        else:
            continue  # by reference to another item: libavif refuses those
        payloads.append(b"".join(bytes(data[origin + base + offset:
                                            (origin + base + offset + length) if length else limit][:limit - origin])
                                 for offset, length in extents))
    return payloads


def _first_samples(data, moov: tuple[int, int]) -> list[bytes]:
    """Each track's first sample: at its first chunk's offset, of its first size."""
    samples = []
    for kind, start, end in _boxes(data, *moov):
        if kind != b"trak":
            continue
        table = _path(data, start, end, b"mdia", b"minf", b"stbl")
        if table is None:
            continue
        stsz = _child(data, *table, b"stsz")
        chunks, wide = _child(data, *table, b"stco"), False
        if chunks is None:
            chunks, wide = _child(data, *table, b"co64"), True
        if stsz is None or chunks is None:
            continue
        sizes = _Reader(data, stsz[0] + 4, stsz[1])
        size = sizes.uint(4)
        if not size and sizes.uint(4):  # (one size for all, else a table after the count)
            size = sizes.uint(4)
        offsets = _Reader(data, chunks[0] + 4, chunks[1])
        offset = offsets.uint(8 if wide else 4) if offsets.uint(4) else None
        if offset is not None and not (sizes.short or offsets.short):
            samples.append(bytes(data[offset:offset + size]))
    return samples


def _leb128(data, at: int) -> tuple[int, int]:
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

    def uvlc() -> None:
        zeros = 0
        while not f(1) and zeros < 32 and at <= total:
            zeros += 1
        f(zeros)

    f(3)  # seq_profile
    f(1)  # still_picture
    if f(1):  # reduced_still_picture_header
        f(5)
    else:
        buffer_delay_bits = 0
        decoder_model = False
        if f(1):  # timing_info_present_flag
            f(32), f(32)
            if f(1):  # equal_picture_interval
                uvlc()
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


def _obus_frame_pixels(obus: bytes) -> int:
    """The largest frame the sequence headers among these OBUs allow (0: none)."""
    at, most = 0, 0
    while at < len(obus):
        header = obus[at]
        at += 2 if header & 0x4 else 1  # (an extension byte)
        if header & 0x2:
            size, at = _leb128(obus, at)
        else:
            size = len(obus) - at
        if (header >> 3) & 0xF == _SEQUENCE_HEADER:
            most = max(most, _sequence_header_pixels(obus[at:at + min(size, _SEQUENCE_HEADER_BYTES)]))
        at += size
    return most


def av1_frame_pixels(data) -> int:
    """The pixels of the AV1 frames libavif decodes for an AVIF's first picture, by their sequence headers: every
    item's (a grid's tiles, an alpha plane, a thumbnail) in all, or, for an image sequence, each track's first
    sample's (its colour and its alpha). 0 when none is found (libavif's decoder has then no frame to decode either)."""
    moov, meta = _child(data, 0, len(data), b"moov"), _child(data, 0, len(data), b"meta")
    # (libavif takes the sequence or the items by the file's brands: the larger of the two counts)
    return max(sum(map(_obus_frame_pixels, _first_samples(data, moov))) if moov is not None else 0,
               sum(map(_obus_frame_pixels, _item_payloads(data, meta))) if meta is not None else 0)
