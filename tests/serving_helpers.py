"""Image builders and an in-process reference model shared by the serving tests (no server here)."""
from __future__ import annotations

import base64
import gzip
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from handler.engine import serving_model
from handler.protocols import OUTPUTS
from handler.preprocessing import decode_image, image_to_tensor, normalize
from serving.settings import read_model_config
from training.engines import in_process_engine


def torchserve_log(log_dir: Path, name: str) -> str:
    """All of one of TorchServe's logs (name: "model_log", "access_log", ...), the files serving/log4j2.xml
    rolled over (each midnight, or at 100 MB) first: an offset or a count taken before midnight still holds
    after it."""
    rolled = sorted(log_dir.glob(f"{name}.*.log.gz"), key=lambda f: f.stat().st_mtime)
    current = log_dir / f"{name}.log"
    parts = [gzip.decompress(f.read_bytes()) for f in rolled] + ([current.read_bytes()] if current.exists() else [])
    return b"".join(parts).decode(errors="replace")


def encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def cifar_pil(images: torch.Tensor, i: int) -> Image.Image:
    """Test-split image i (uint8 [N, 3, 32, 32]) as an RGB PIL image."""
    return Image.fromarray(images[i].permute(1, 2, 0).numpy(), mode="RGB")


def png_with_bad_crc(img: Image.Image, chunk: bytes = b"IDAT") -> bytes:
    """A PNG one of whose chunks (IDAT: the pixels, IHDR: the header) fails its checksum."""
    data = bytearray(encode(img))
    at = data.find(chunk) - 4  # the chunk's length field
    length = int.from_bytes(data[at:at + 4], "big")
    crc_at = at + 8 + length
    data[crc_at:crc_at + 4] = bytes(b ^ 0xFF for b in data[crc_at:crc_at + 4])
    return bytes(data)


def png_declaring_size(width: int, height: int) -> bytes:
    """A tiny, structurally valid PNG header that declares a huge canvas (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + png_chunk(b"IEND", b""))


def jpeg_declaring_size(width: int, height: int, progressive: bool = False) -> bytes:
    """A small real JPEG (baseline or progressive) whose frame header (SOF0, SOF2) is rewritten to declare
    width x height (a JPEG decompression bomb's header)."""
    data = bytearray(encode(Image.new("RGB", (64, 64), (90, 120, 200)), "JPEG", progressive=progressive))
    sof = data.find(b"\xff\xc2" if progressive else b"\xff\xc0")
    data[sof + 5:sof + 7] = height.to_bytes(2, "big")
    data[sof + 7:sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def jpeg_with_repeated_scans(img: Image.Image, repeats: int, **kwargs) -> bytes:
    """A progressive JPEG of img whose last scan is repeated ``repeats`` times more (libjpeg warns and
    decodes each over the whole picture: ~30 bytes a scan that cost a decoder milliseconds each)."""
    data = encode(img, "JPEG", progressive=True, **kwargs)
    last_scan, end = data.rfind(b"\xff\xda"), data.rfind(b"\xff\xd9")  # 0xFF 0xDA never occurs inside scans
    return data[:end] + data[last_scan:end] * repeats + data[end:]


def padded_with_empty_blocks(img: Image.Image, fmt: str, blocks: int) -> bytes:
    """img as a PNG, JPEG or GIF with ``blocks`` empty metadata blocks before its pixels, each read one by one
    by Pillow's opener: unknown PNG chunks, JPEG comment segments, or a GIF comment of 1-byte sub-blocks."""
    data = encode(img, fmt)
    if fmt == "PNG":
        at = data.index(b"IDAT") - 4
        empty = struct.pack(">I", 0) + b"abCd" + struct.pack(">I", zlib.crc32(b"abCd"))
        return data[:at] + empty * blocks + data[at:]
    if fmt == "JPEG":
        return data[:2] + b"\xff\xfe\x00\x02" * blocks + data[2:]
    at = 13 + ((3 << ((data[10] & 7) + 1)) if data[10] & 0x80 else 0)  # after the global colour table
    return data[:at] + b"\x21\xfe" + b"\x01-" * (blocks - 1) + b"\x00" + data[at:]


def rle8_bmp(width: int, height: int, body: bytes | None = None) -> bytes:
    """A grey BMP compressed with RLE8: ``body``'s codes, or one pixel, then end of line, on every row (Pillow fills
    the rest of each row a byte at a time, in Python)."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    body = b"\x01\x05\x00\x00" * height + b"\x00\x01" if body is None else body
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(body), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(body), 0, 0, offset) + info + palette + body


def avif_declaring(declared: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A flat AVIF whose AV1 frame is ``frame`` while its ispe box (the size Pillow reports) says ``declared``."""
    out = io.BytesIO()
    Image.new("RGB", frame, (90, 120, 200)).save(out, "AVIF", quality=50, speed=10)
    data = bytearray(out.getvalue())
    at = data.find(b"ispe") + 8  # (after the box's type: its version and flags, then width and height)
    data[at:at + 8] = struct.pack(">II", *declared)
    return bytes(data)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with_chunks(img: Image.Image, chunks: list[bytes], before_pixels: bool = True) -> bytes:
    """img as a PNG with ``chunks`` (png_chunk) after its header, read as Pillow opens it, or before its end, read
    as it loads its pixels."""
    data = encode(img)
    at = data.index(b"IDAT") - 4 if before_pixels else data.rindex(b"IEND") - 4
    return data[:at] + b"".join(chunks) + data[at:]


def decompression_bomb_png() -> bytes:
    """A real bomb: a ~40 KB PNG that decodes to 256 megapixels (16000 x 16000, one bit each)."""
    return encode(Image.new("1", (16000, 16000)), optimize=False)


def oversized_png() -> bytes:
    """A valid 42-megapixel image (7000 x 6000 grey), above the handler's 16 MP PNG limit, a few KB as PNG."""
    return encode(Image.new("L", (7000, 6000), 128))


def animated_gif(frames: list[Image.Image]) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def sixteen_bit_png(img: Image.Image) -> tuple[bytes, Image.Image]:
    """(16-bit greyscale PNG of img, the 8-bit grey image it should read as)."""
    grey = img.convert("L")
    wide = np.asarray(grey, dtype=np.uint16) * 257  # 0..255 -> 0..65535
    return encode(Image.fromarray(wide.astype(np.uint16))), grey


def exif_rotated_jpeg(img: Image.Image, orientation: int = 6) -> bytes:
    """A JPEG of img's pixels stored as they are, with an EXIF Orientation tag for viewers to apply."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def exif_block(entries: int, orientation: int = 6) -> bytes:
    """An EXIF block (little-endian TIFF) of ``entries`` one-byte entries, Orientation among them: an
    EXIF bomb when large (Pillow's EXIF code took ~100 us per entry)."""
    tags = [tag for tag in range(0x1000, 0x10000) if tag != 0x0112][:entries - 1]
    table = sorted([struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0)]
                   + [struct.pack("<HHII", tag, 1, 1, 0x41) for tag in tags])
    return b"II*\x00" + struct.pack("<IH", 8, len(table)) + b"".join(table) + b"\0\0\0\0"


def png_with_exif(img: Image.Image, exif: bytes) -> bytes:
    """A PNG of img with an eXIf chunk (no size cap in the format), before its pixels."""
    png = encode(img)
    chunk = struct.pack(">I", len(exif)) + b"eXIf" + exif + struct.pack(">I", zlib.crc32(b"eXIf" + exif))
    at = png.find(b"IDAT") - 4
    return png[:at] + chunk + png[at:]


def grey_tiff(width: int, height: int, extra: list[tuple[int, int, int, bytes]] = (),
              directories: dict[int, list[tuple[int, int, int, bytes]]] | None = None) -> bytes:
    """An 8-bit grey little-endian TIFF with ``extra`` entries (tag, type, count, value bytes) in its
    directory, and ``directories``: tag -> the entries of a directory that tag points at (Exif, GPS)."""
    pixels = bytes(range(256)) * (width * height // 256) + bytes(width * height % 256)
    directories = directories or {}
    layout = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
              (273, 4, 1, "pixels"), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, width * height)]
    layout += [(tag, 4, 1, ("directory", tag)) for tag in directories]
    out = bytearray()  # what follows the first directory: the other directories, values, pixels

    def table(entries, start):
        """A directory at ``start`` (values too long for an entry after it), its bytes."""
        head, values = bytearray(struct.pack("<H", len(entries))), bytearray()
        after = start + 2 + 12 * len(entries) + 4
        for tag, kind, count, value in sorted(entries, key=lambda e: e[0]):
            if isinstance(value, bytes) and len(value) > 4:
                head += struct.pack("<HHII", tag, kind, count, after + len(values))
                values += value
            else:
                head += struct.pack("<HHI", tag, kind, count) + (value if isinstance(value, bytes) else struct.pack("<I", value)).ljust(4, b"\0")
        return head + b"\0\0\0\0" + values

    first_size = 2 + 12 * (len(layout) + len(extra)) + 4 + sum(len(v) for *_, v in extra if isinstance(v, bytes) and len(v) > 4)
    offsets, at = {}, 8 + first_size
    for tag, entries in directories.items():
        offsets[("directory", tag)] = at
        block = table(entries, at)
        out += block
        at += len(block)
    offsets["pixels"] = at
    first = [(tag, kind, count, offsets.get(value, value)) for tag, kind, count, value in layout] + list(extra)
    return b"II*\x00" + struct.pack("<I", 8) + bytes(table(first, 8)) + bytes(out) + pixels


def tiled_tiff(width: int, height: int, tile_width: int, tile_length: int, compression: int = 8,
               samples: int = 1, bits: int = 8, tile_data: bytes | None = None) -> bytes:
    """A little-endian TIFF of ``width`` x ``height`` in tiles of ``tile_width`` x ``tile_length`` (as many as its
    size needs), every tile the same ``tile_data`` (default: one tile of a grey ramp, deflated for compression 8,
    raw for 1): a tile bomb when the tile is far larger than the image (libtiff decodes each tile whole)."""
    if tile_data is None:
        raw = bytes(range(256)) * (tile_width * tile_length * samples * bits // 8 // 256 + 1)
        raw = raw[:tile_width * tile_length * samples * bits // 8]
        tile_data = zlib.compress(raw) if compression == 8 else raw
    tiles = -(-width // tile_width) * -(-height // tile_length)
    entries = [(256, 4, [width]), (257, 4, [height]), (258, 3, [bits] * samples), (259, 3, [compression]),
               (262, 3, [2 if samples >= 3 else 1]), (277, 3, [samples]), (322, 4, [tile_width]),
               (323, 4, [tile_length]), (324, 4, ["data"] * tiles), (325, 4, [len(tile_data)] * tiles)]
    entries += [(338, 3, [2])] if samples in (2, 4) else []  # the extra sample is alpha
    after = 8 + 2 + 12 * len(entries) + 4  # values too long for an entry, then the tile's bytes
    sizes = [len(value) * (2 if kind == 3 else 4) for _, kind, value in entries]
    data_at = after + sum(size for size in sizes if size > 4)
    head, values = bytearray(struct.pack("<H", len(entries))), bytearray()
    for tag, kind, value in sorted(entries):
        value = [data_at if v == "data" else v for v in value]
        packed = struct.pack(f"<{len(value)}{'H' if kind == 3 else 'I'}", *value)
        if len(packed) > 4:
            head += struct.pack("<HHII", tag, kind, len(value), after + len(values))
            values += packed
        else:
            head += struct.pack("<HHI", tag, kind, len(value)) + packed.ljust(4, b"\0")
    return b"II*\x00" + struct.pack("<I", 8) + bytes(head) + b"\0\0\0\0" + bytes(values) + tile_data


def engine_record(weights: Path) -> dict | None:
    """engines.json as the archive packs it for these weights (None when it measured others)."""
    from serving.archive import engine_record_for

    path = engine_record_for(weights)
    return json.loads(path.read_text()) if path else None


class ReferenceModel:
    """The served network, called in-process with the same weights, the handler's preprocessing and
    the same engine (handler/engine.py; ``auto``: the one TorchServe picks on this machine, loaded
    from the engine cache the tests' TorchServe fills, so the compiled code is the served one)."""

    def __init__(self, weights: Path, engine: str = "auto", flip_tta: bool | None = None, config: dict | None = None):
        from handler import engine as engines
        from handler.calibration import load_calibration
        from serving.archive import calibration_for

        self.model = serving_model(torch.load(weights, map_location="cpu", weights_only=True))
        # As served: the model-config's handler.flip_tta (``config``, else model-config.yaml's) unless the test
        # says otherwise.
        config = config or read_model_config()
        self.flip_tta = engines.flip_tta(config) if flip_tta is None else flip_tta
        self.engine = in_process_engine(Path(weights), engine, self.model, self.flip_tta, config)
        # The temperature the archive ships with these weights (none: 1, the plain softmax), or the
        # one refit for the engine when it moved (training/engines.py; of plain logits only, as in
        # the handler).
        calibration = calibration_for(Path(weights))
        self.temperature = load_calibration(str(calibration.parent), self.flip_tta).temperature if calibration else 1.0
        refit = (engine_record(Path(weights)) or {}).get("engines", {}).get(self.engine.name, {}).get("calibration", {})
        if calibration and refit.get("moved") and not self.flip_tta:
            self.temperature = refit["temperature"]

    @torch.inference_mode()
    def probs_of_uint8(self, batch: torch.Tensor) -> torch.Tensor:
        images = normalize(batch)
        logits = self.engine.answer(images, self.flip_tta)[0]  # as the handler computes them
        return torch.softmax(logits / self.temperature, dim=1)

    def probs_of_bytes(self, data: bytes) -> torch.Tensor:
        return self.probs_of_uint8(image_to_tensor(decode_image(data))[None])[0]


def assert_same_answer(body: dict, expected: torch.Tensor, tol: float = 2e-4) -> None:
    """The server's answer agrees with the in-process probabilities ``expected`` [num_classes].

    Top-1 must match unless the reference's two best classes are closer than ``tol`` (then the
    batch size's different float summation order may legitimately swap them); the reported
    probabilities must match the reference's for the same classes.
    """
    best2 = torch.topk(expected, 2)
    if body["index"] != int(best2.indices[0]):
        assert float(best2.values[0] - best2.values[1]) < tol, (body["index"], int(best2.indices[0]))
    for item in body["topk"]:
        assert abs(item["probability"] - float(expected[item["index"]])) < tol, item


# ---- KServe v1 / Open Inference Protocol v2 bodies (tests/test_kserve.py, tests/test_kserve_predictor.py) ----
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v2_body(images: list[bytes], request_id: str | None = None) -> dict:
    body = {"inputs": [{"name": "image", "shape": [len(images)], "datatype": "BYTES", "data": [b64(i) for i in images]}]}
    return {"id": request_id, **body} if request_id is not None else body


def v1_body(images: list[bytes]) -> dict:
    return {"instances": [{"data": b64(i)} for i in images]}


def v2_answers(body: dict) -> list[dict]:
    """An OIP answer back into the handler's per-image shape (index, topk), checking its tensors."""
    outputs = {o["name"]: o for o in body["outputs"]}
    assert set(outputs) == set(OUTPUTS)
    n = outputs["label"]["shape"][0]
    for name, out in outputs.items():
        assert out["datatype"] == OUTPUTS[name]
        k = out["shape"][1] if name.startswith("topk_") else 1
        assert len(out["data"]) == n * k, name
    k = outputs["topk_index"]["shape"][1]
    answers = []
    for i in range(n):
        topk = [{"index": outputs["topk_index"]["data"][i * k + j], "label": outputs["topk_label"]["data"][i * k + j],
                 "name": outputs["topk_name"]["data"][i * k + j],
                 "probability": outputs["topk_probability"]["data"][i * k + j]} for j in range(k)]
        answer = {"index": outputs["index"]["data"][i], "label": outputs["label"]["data"][i],
                  "prediction": outputs["name"]["data"][i], "probability": outputs["probability"]["data"][i],
                  "topk": topk}
        assert (answer["index"], answer["label"], answer["prediction"]) == (topk[0]["index"], topk[0]["label"],
                                                                             topk[0]["name"])
        answers.append(answer)
    return answers
