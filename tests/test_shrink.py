"""Large photos shrunk where they enter (serving/images.py, adapter/shrink.py): the network gets the
same pixels as from the whole file, EXIF-rotated photos stand upright, bombs are refused before any
pixel is decoded, and decoding never holds up the adapter's event loop. In-process first, then
through a real adapter in front of the session's real TorchServe. The page's part: tests/test_page.py.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from PIL.PngImagePlugin import PngInfo

from adapter.config import Settings
from adapter.errors import ClassifyError
from adapter.run import running_adapter
from adapter.shrink import UploadShrinker
from benchmarks.bench_decode import photo_like
from serving.images import (
    MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, MAX_JPEG_PIXELS, MAX_TIFF_TAGS, PICTURE_SIZE_KEY, SHRINK_MIN_BYTES,
    ImageRequestError, decode_image, network_input, open_upload, page_image_rules, page_shrink_rules, picture_size,
    shrunk_png, worth_shrinking)
from serving.process import free_port
from serving_helpers import avif_declaring, encode, exif_rotated_jpeg, jpeg_declaring_size, rle8_bmp, tiled_tiff

REPO = Path(__file__).resolve().parents[1]
PHOTO_SIZE = (4032, 3024)  # a 12 MP phone photo
JPEG_PHOTOS, PNG_PHOTOS = 200, 12  # a 12 MP PNG costs ~5x a JPEG to make and decode


def _full_and_shrunk(job: tuple[np.ndarray, str]) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """One CIFAR test image as a 12 MP photo: (the network's input from the whole file, the same
    from the adapter's shrunk body, that body's size, whether the adapter shrinks it)."""
    pixels, fmt = job
    # Smooth at 1/7 scale, then each pixel 7x7 (a third of the CPU of a smooth 12 MP upscale; the
    # 7-pixel steps straddle JPEG's 8x8 blocks, so they carry detail).
    photo = Image.fromarray(pixels).resize((PHOTO_SIZE[0] // 7, PHOTO_SIZE[1] // 7), Image.Resampling.BICUBIC)
    photo = photo.resize(PHOTO_SIZE, Image.Resampling.NEAREST)
    data = encode(photo, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    full = np.asarray(network_input(decode_image(data)))
    opened = open_upload(data)
    body = shrunk_png(opened)
    return full, np.asarray(network_input(decode_image(body))), len(body), worth_shrinking(opened, len(data))


@pytest.fixture(scope="module")
def large_photos(cifar100_test_split):
    """200 test images as 12 MP JPEGs and 12 as 12 MP PNGs, made and decoded on 2 processes."""
    images, _ = cifar100_test_split
    picks = [(i, "JPEG") for i in range(0, 10000, 10000 // JPEG_PHOTOS)]
    picks += [(i + 7, "PNG") for i in range(0, 10000 - 7, 10000 // PNG_PHOTOS)]
    jobs = [(images[i].permute(1, 2, 0).numpy(), fmt) for i, fmt in picks]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_full_and_shrunk, jobs, chunksize=4))


def test_large_photos_travel_as_the_networks_own_input(large_photos):
    assert len(large_photos) >= 200
    assert all(worth for _, _, _, worth in large_photos)
    # A few KB instead of megabytes, and bit for bit the pixels the whole file gives the network.
    assert max(size for _, _, size, _ in large_photos) < 4096
    same = [np.array_equal(full, shrunk) for full, shrunk, _, _ in large_photos]
    assert all(same), f"{same.count(False)} of {len(same)} differ"


def test_answers_through_the_shrinking_path_equal_the_full_path(large_photos, reference):
    def top1(arrays):
        return reference.probs_of_uint8(torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays])).argmax(1)

    full = top1([f for f, _, _, _ in large_photos])
    shrunk = top1([s for _, s, _, _ in large_photos])
    agreement = float((full == shrunk).float().mean())
    assert agreement >= 0.99, agreement


def halves(size, top=(255, 0, 0), bottom=(0, 0, 255)) -> Image.Image:
    """Top half one colour, bottom half another: an upright picture whose turns are visible."""
    img = Image.new("RGB", size, bottom)
    img.paste(top, (0, 0, size[0], size[1] // 2))
    return img


def sideways_photo(upright: Image.Image) -> bytes:
    """How a phone stores a portrait photo: the pixels turned a quarter left, EXIF orientation 6."""
    return exif_rotated_jpeg(upright.transpose(Image.Transpose.ROTATE_90), orientation=6)


def assert_upright(img: Image.Image) -> None:
    pixels = np.asarray(img, dtype=int)
    top, bottom = pixels[pixels.shape[0] // 8].mean(0), pixels[-pixels.shape[0] // 8].mean(0)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60, (top, bottom)


def test_an_exif_rotated_photo_comes_out_upright():
    upright = halves((2400, 3200))  # portrait, 7.7 MP
    data = sideways_photo(upright)
    assert Image.open(io.BytesIO(data)).size == (3200, 2400)  # stored sideways
    opened = open_upload(data)
    assert worth_shrinking(opened, len(data))
    assert picture_size(decode_image(shrunk_png(opened, explain=True))) == (300, 400)  # 1/8 scale, portrait
    assert_upright(decode_image(data))
    assert_upright(decode_image(shrunk_png(open_upload(data))))  # the 32x32 input


def prepare(data: bytes, explain: bool = False, **settings) -> bytes:
    async def run():
        shrinker = UploadShrinker(Settings(**settings))
        try:
            return await shrinker.prepare(data, explain)
        finally:
            shrinker.close()
    return asyncio.run(run())


def test_the_adapter_forwards_the_input_and_the_pictures_size_for_an_explanation():
    data = encode(photo_like(4032, 3024), "JPEG", quality=90)
    assert len(data) > 1_000_000
    classified, explained = prepare(data), prepare(data, explain=True)
    assert decode_image(classified).size == (32, 32) and len(classified) < 4096
    assert np.array_equal(np.asarray(decode_image(explained)), np.asarray(decode_image(classified)))
    assert len(explained) < 4096
    assert picture_size(decode_image(explained)) == decode_image(data).size == (504, 378)  # the heatmap's size
    assert picture_size(decode_image(classified)) == (32, 32)


@pytest.mark.parametrize("size, fmt", [((4_000, 400), "PNG"), ((3_000, 450), "JPEG"), ((40_000, 300), "JPEG")])
def test_an_explanation_of_a_long_thin_picture_gets_the_network_input_classify_gets(size, fmt):
    # A panorama over 1 MP as decoded went on as a copy reduced by one factor on both sides, which the handler
    # resized to other 32x32 pixels than /classify/'s (p 0.729 vs 0.713 for a 12000x2000 JPEG), and was
    # not "1 MP at most" where a side could not shrink (16,000,000x1 went as 4,000,000x1).
    data = encode(photo_like(*size), fmt, **({"quality": 85} if fmt == "JPEG" else {"compress_level": 1}))
    explained = decode_image(prepare(data, explain=True))
    assert explained.size == (32, 32)
    assert np.array_equal(np.asarray(network_input(explained)), np.asarray(network_input(decode_image(data))))
    assert picture_size(explained) == decode_image(data).size


def test_only_a_32x32_input_names_its_pictures_size():
    def png_naming(size: tuple[int, int], named: str) -> bytes:
        info = PngInfo()
        info.add_text(PICTURE_SIZE_KEY, named)
        return encode(Image.new("RGB", size), pnginfo=info)

    assert picture_size(decode_image(png_naming((32, 32), "640x480"))) == (640, 480)
    assert picture_size(decode_image(png_naming((64, 48), "640x480"))) == (64, 48)  # a picture of its own
    for junk in ("0x480", "640x", "1e9x1", "6400000x1", " 640x480", "640x480\n", "-1x5"):
        assert picture_size(decode_image(png_naming((32, 32), junk))) == (32, 32), junk


def test_small_files_and_the_switch_keep_todays_path():
    small = encode(photo_like(64, 48))
    assert prepare(small) == small
    photo = encode(photo_like(2000, 1500), "JPEG")
    assert prepare(photo, shrink_uploads=False) == photo
    # Few bytes but many pixels (a screenshot of flat colours): shrunk.
    flat = encode(Image.new("RGB", (2000, 1500), (20, 90, 160)))
    assert len(flat) < SHRINK_MIN_BYTES and decode_image(prepare(flat)).size == (32, 32)
    # Not an image, small or large: refused here with the handler's own words, not forwarded (a small
    # JSON "image" would reach the handler as a v1/v2 request of up to 64 images).
    with pytest.raises(ClassifyError) as small:
        prepare(json.dumps({"instances": ["aGVsbG8="] * 3}).encode())
    assert (small.value.status_code, small.value.message[:24]) == (400, "not an image in a format")
    with pytest.raises(ClassifyError) as info:
        prepare(b"\x89PNG not really" * 40_000)
    with pytest.raises(ImageRequestError) as handler:
        decode_image(b"\x89PNG not really" * 40_000)
    assert (info.value.status_code, info.value.message) == (handler.value.status, handler.value.message) == (
        400, "not an image in a format the server reads (JPEG, PNG, GIF, WebP, AVIF, BMP, TIFF, PPM)")
    # The same with SHRINK_UPLOADS=0: nothing is shrunk, but every upload's header is read (a JSON "image" went on,
    # ran as up to 64 images, and came back as a 502 "no prediction").
    for not_an_image in (json.dumps({"instances": ["aGVsbG8="] * 3}).encode(), b"{" + b" " * 2 * SHRINK_MIN_BYTES + b"}"):
        with pytest.raises(ClassifyError) as off:
            prepare(not_an_image, shrink_uploads=False)
        assert (off.value.status_code, off.value.message) == (handler.value.status, handler.value.message)


def test_an_upload_of_exactly_shrink_min_pixels_goes_as_it_is_and_one_row_more_is_shrunk():
    # README: "An upload over SHRINK_MIN_BYTES (or over 1 MP)": a flat picture of few bytes, by its pixels alone.
    from serving.images import SHRINK_MIN_PIXELS
    assert SHRINK_MIN_PIXELS == 1000 * 1000
    at_limit, over = (encode(Image.new("RGB", (1000, height), (20, 90, 160))) for height in (1000, 1001))
    assert len(over) < SHRINK_MIN_BYTES and prepare(at_limit) == at_limit
    assert decode_image(prepare(over)).size == (32, 32)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "PPM", "AVIF"])
def test_every_format_over_the_limits_is_shrunk_to_the_input_the_handler_would_make(fmt):
    """GIF, BMP, TIFF, PPM and AVIF went on whole: a worker decoded them (a 14 KB GIF of 16 MP: 0.29 s), and
    TorchServe's queue has no per-client share. Shrunk here now, in the pool's per-client turns, bit for bit."""
    from PIL import features
    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("Pillow built without AVIF")
    picture = photo_like(1200, 900)  # 1.08 MP: over SHRINK_MIN_PIXELS
    data = encode(picture.convert("P") if fmt == "GIF" else picture, fmt)
    shrunk = prepare(data)
    assert len(shrunk) < 4096 and open_upload(shrunk).format == "PNG"
    assert np.array_equal(np.asarray(decode_image(shrunk)), np.asarray(network_input(decode_image(data))))


def test_a_small_tiff_of_large_tiles_is_shrunk_as_an_image_of_their_size_is():
    # A few KB of TIFF declaring 16x16 in one 2048x2048 tile went on whole: each worker decoding it inflated the whole
    # tile (16 such requests at once starved other clients). Its tiles are its pixels: shrunk here, in the pool.
    data = tiled_tiff(16, 16, 2048, 2048)
    assert len(data) < SHRINK_MIN_BYTES and worth_shrinking(open_upload(data), len(data))
    shrunk = prepare(data)
    assert shrunk != data and open_upload(shrunk).format == "PNG"
    assert np.array_equal(np.asarray(decode_image(shrunk)), np.asarray(network_input(decode_image(data))))
    small = tiled_tiff(16, 16, 256, 256)  # tiles as writers make them: on as it is
    assert prepare(small) == small


def test_a_small_file_pillow_decodes_in_python_is_shrunk_here():
    # An RLE BMP's rows padded a byte at a time, a plain PNM's numbers read one by one: up to ~60 ms under their
    # limits, and TorchServe's workers take requests first come, first served (one address's 16 RLE BMPs of 1 MP took
    # another's answer from 13 to 700 ms). Decoded in the pool here, in turns by client, whatever their size.
    for slow in (rle8_bmp(300, 200), b"P2\n3 2\n255\n" + b"9 " * 18):
        assert len(slow) < SHRINK_MIN_BYTES and worth_shrinking(open_upload(slow), len(slow))
        shrunk = prepare(slow)
        assert shrunk != slow and open_upload(shrunk).format == "PNG"
        assert np.array_equal(np.asarray(decode_image(shrunk)), np.asarray(network_input(decode_image(slow))))
    fast = b"P5\n3 2\n255\n" + bytes(6)  # (binary, of maximum 255: read in C)
    assert prepare(fast) == fast


def test_a_small_avif_is_shrunk_here_whatever_size_it_declares():
    # Pillow reports an AVIF's ispe box, and libavif decodes the AV1 frame whatever its size: a 3.4 KB file declaring
    # 64x64 held 16384x16384 (1.1 s, +550 MB), and 4 in flight from one address took another's answer from 14 to
    # 1,150 ms in TorchServe's workers. Decoded in the pool here, in turns by client, whatever it declares.
    from PIL import features
    if not features.check("avif"):
        pytest.skip("Pillow built without AVIF")
    data = avif_declaring((16, 16), (1024, 1024))
    opened = open_upload(data)
    assert len(data) < SHRINK_MIN_BYTES and opened.size == (16, 16) and worth_shrinking(opened, len(data))
    shrunk = prepare(data)
    assert shrunk != data and open_upload(shrunk).format == "PNG"
    assert np.array_equal(np.asarray(decode_image(shrunk)), np.asarray(network_input(decode_image(data))))


def test_a_phones_multi_picture_jpeg_is_shrunk_as_a_jpeg_is():
    # MPO: a JPEG with multi-picture data (a second picture or a depth map after the first), as phones and
    # cameras write; it went on whole (megabytes to TorchServe) while the same photo as a JPEG was shrunk.
    photo = photo_like(3000, 2000)
    out = io.BytesIO()
    photo.save(out, "MPO", save_all=True, append_images=[photo.resize((300, 200))], quality=90)
    mpo = out.getvalue()
    assert open_upload(mpo).format == "MPO" and len(mpo) > SHRINK_MIN_BYTES
    shrunk = prepare(mpo)
    assert len(shrunk) < 4096
    assert np.array_equal(np.asarray(decode_image(shrunk)), np.asarray(network_input(decode_image(mpo))))
    assert page_shrink_rules()["types"] == ["image/jpeg", "image/png", "image/webp"]  # the page's: by MIME type


def test_shrink_min_bytes_is_the_setting_not_the_default():
    photo = encode(photo_like(640, 480), "JPEG", quality=95)  # under 1 MP and under 256 KB
    assert 20_000 < len(photo) < SHRINK_MIN_BYTES
    assert prepare(photo) == photo
    assert decode_image(prepare(photo, shrink_min_bytes=20_000)).size == (32, 32)
    # "Over" the setting: an upload of exactly shrink_min_bytes goes as it is, one byte more is shrunk.
    assert prepare(photo, shrink_min_bytes=len(photo)) == photo
    assert decode_image(prepare(photo, shrink_min_bytes=len(photo) - 1)).size == (32, 32)


def test_settings_tell_the_page_what_the_operator_chose(tmp_path):
    """GET /settings follows SHRINK_MIN_BYTES, and SHRINK_UPLOADS=0 tells the page to shrink nothing
    (README: "0: every file goes as it is, and the page shrinks nothing"). No model server needed."""
    dead = f"http://127.0.0.1:{free_port()}"
    env = {"TS_INFERENCE_URL": dead, "TS_MANAGEMENT_URL": dead, "SHRINK_MIN_BYTES": "123456"}
    with running_adapter(env, tmp_path / "on.log") as a:
        assert httpx.get(f"{a.base_url}/settings", timeout=30).json()["shrink"] == page_shrink_rules(123456)
    with running_adapter({**env, "SHRINK_UPLOADS": "0"}, tmp_path / "off.log") as a:
        assert httpx.get(f"{a.base_url}/settings", timeout=30).json()["shrink"] is None


def test_a_thin_png_is_413_on_its_header(monkeypatch):
    # A 60 KB PNG of 1x16,000,000 (16 MP, under MAX_IMAGE_PIXELS) cost the adapter's shrinking thread 1.2 s of
    # CPU (a 4000x4000 one: 0.17 s): a PNG pays per row, and the resize widens a thin picture 32 times first.
    from serving.images import MAX_IMAGE_SIDE

    thin = encode(Image.new("RGB", (1, 16_000_000), (10, 200, 30)))
    assert len(thin) < 100_000
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real_load(self))
    for size in [(1, 16_000_000), (MAX_IMAGE_SIDE + 1, 2)]:
        data = thin if size[1] == 16_000_000 else encode(Image.new("RGB", size))
        with pytest.raises(ImageRequestError) as handler:
            decode_image(data)
        with pytest.raises(ClassifyError) as info:
            prepare(data, explain=True)
        assert info.value.status_code == handler.value.status == 413
        assert info.value.message == handler.value.message
        assert f"{size[0]}x{size[1]} pixels, a side above the 32,768-pixel limit" in handler.value.message
    assert decoded == []
    # At the limit: decoded; a JPEG (draft-scaled, 65,535 a side at most) has no such limit.
    assert decode_image(encode(Image.new("RGB", (1, MAX_IMAGE_SIDE)))).size == (1, MAX_IMAGE_SIDE)
    assert decode_image(encode(Image.new("RGB", (40_000, 8)), "JPEG")).size == (40_000, 8)


def test_the_page_is_told_the_servers_pixel_and_side_limits():
    """GET /settings "images": the page refuses what the server would, from these constants alone."""
    rules = page_image_rules()
    assert (rules["max_pixels"], rules["max_jpeg_pixels"], rules["max_side"], rules["max_tiff_tags"]) == (
        MAX_IMAGE_PIXELS, MAX_JPEG_PIXELS, MAX_IMAGE_SIDE, MAX_TIFF_TAGS)
    page = (REPO / "frontend" / "app.js").read_text()
    assert str(MAX_IMAGE_SIDE) not in page and f"{MAX_IMAGE_SIDE:,}" not in page  # no copy of its own
    assert str(MAX_TIFF_TAGS) not in page


@pytest.mark.parametrize("padding", [0, 2 * SHRINK_MIN_BYTES], ids=["small", "large"])
def test_a_jpeg_bomb_is_413_before_any_pixel_is_decoded(monkeypatch, padding):
    bomb = jpeg_declaring_size(10_000, 8_000) + b"\0" * padding  # 80 MP declared
    with pytest.raises(ImageRequestError) as handler:
        decode_image(bomb)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real_load(self))
    with pytest.raises(ClassifyError) as info:
        prepare(bomb)
    assert info.value.status_code == handler.value.status == 413
    assert info.value.message == handler.value.message and "64 MP limit for JPEG" in info.value.message
    assert decoded == []


def test_the_event_loop_keeps_answering_while_a_photo_is_decoded():
    data = encode(photo_like(3000, 2000, seed=3))  # a 6 MP PNG: ~0.2 s or more to decode
    lags: list[float] = []

    async def run():
        shrinker = UploadShrinker(Settings(shrink_workers=2))
        try:
            jobs = asyncio.gather(*(shrinker.prepare(data) for _ in range(4)))
            names = set()
            while not jobs.done():
                started = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - started - 0.005)
                names |= {t.name for t in threading.enumerate() if t.name.startswith("shrink")}
            return await jobs, names
        finally:
            shrinker.close()

    started = time.perf_counter()
    bodies, threads = asyncio.run(run())
    took = time.perf_counter() - started
    assert all(decode_image(b).size == (32, 32) for b in bodies)
    assert 1 <= len(threads) <= 2  # the pool is bounded
    # Decoding off the loop: it kept turning every few ms (a loaded 2-core machine: up to 0.25 s
    # late once) instead of stalling for each decode.
    assert len(lags) >= 10 and max(lags) < min(0.25, took / 2), (len(lags), max(lags), took)


def test_another_clients_upload_takes_the_next_free_shrinking_thread_ahead_of_one_clients_queue():
    """Four slow uploads of one client, then one of another: the pool's two threads went to the first client's
    first two, its next two waited ahead of the other's (first come, first served), which started last. Now a free
    thread goes to the waiting client with the fewest there (serving/fair_pool.py): the other's starts on the first
    thread freed; a lone client still has both threads."""
    started, lock = [], threading.Lock()

    def work(client: str) -> str:
        with lock:
            started.append(client)
        time.sleep(0.2)
        return client

    async def run():
        shrinker = UploadShrinker(Settings(shrink_workers=2, shrink_wait_s=10))
        try:
            async def upload(client: str, after_s: float):
                await asyncio.sleep(after_s)
                return await shrinker._in_pool(client, work, client)
            t0 = time.perf_counter()
            await asyncio.gather(*(upload("203.0.113.7", 0) for _ in range(2)))
            alone_s = time.perf_counter() - t0
            await asyncio.gather(*(upload("203.0.113.7", 0) for _ in range(4)), upload("198.51.100.2", 0.05))
            return alone_s, shrinker._pool.clients
        finally:
            shrinker.close()

    alone_s, left = asyncio.run(run())
    assert alone_s < 0.35, alone_s  # a lone client's two uploads at once, not one after the other
    assert started[2:5] == ["203.0.113.7"] * 2 + ["198.51.100.2"], started
    assert left == 0  # nothing kept for clients with nothing in the pool


def test_the_page_carries_no_copy_of_the_shrink_rules():
    text = (REPO / "frontend" / "app.js").read_text()
    rules = page_shrink_rules()
    for value in (rules["min_bytes"], rules["min_pixels"], rules["quality"], '"image/webp"'):
        assert str(value) not in text, value


# --- through a real adapter and TorchServe ---------------------------------------------------------

@pytest.fixture(scope="module")
def adapter(torchserve, tmp_path_factory):
    env = torchserve.adapter_env()
    with running_adapter(env, tmp_path_factory.mktemp("shrink-adapter") / "adapter.log") as proc:
        yield proc


def post(url: str, data: bytes, content_type: str = "image/jpeg") -> httpx.Response:
    return httpx.post(url, files={"image": ("photo.jpg", data, content_type)}, timeout=60)


def direct(ts, data: bytes, route: str = "predictions") -> httpx.Response:
    return httpx.post(f"{ts.inference_url}/{route}/{ts.model_name}", content=data,
                      headers=ts.key_file.header("inference"), timeout=60)


def requests_served(ts) -> float:
    """TorchServe's own count of inference requests (Prometheus metrics)."""
    text = httpx.get(f"{ts.metrics_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ts_inference_requests_total"))


def test_a_12_mp_photo_through_the_adapter_answers_as_the_whole_file(adapter, torchserve_ready):
    data = encode(photo_like(4032, 3024, seed=5), "JPEG", quality=95)  # ~4 MB, like a phone's
    shrunk = post(f"{adapter.base_url}/classify/", data)
    whole = direct(torchserve_ready, data)
    assert shrunk.status_code == 200 and whole.status_code == 200, (shrunk.text, whole.text)
    a, b = shrunk.json(), whole.json()
    assert a["prediction"] == b["prediction"]
    assert [g["label"] for g in a["top5"]] == [g["label"] for g in b["topk"]]
    for mine, theirs in zip(a["top5"], b["topk"]):
        assert abs(mine["probability"] - theirs["probability"]) < 1e-4
    # The explanation's heatmap has the size the whole file's has (the picture's, at most 224 px).
    explained = post(f"{adapter.base_url}/explain/", data).json()
    whole_explained = direct(torchserve_ready, data, "explanations").json()

    def heatmap_size(answer):
        return Image.open(io.BytesIO(base64.b64decode(answer["heatmap"].split(",", 1)[1]))).size
    assert heatmap_size(explained) == heatmap_size(whole_explained) == (224, 168)


def test_an_exif_rotated_photo_through_the_adapter_is_explained_upright(adapter, torchserve_ready):
    explained = post(f"{adapter.base_url}/explain/", sideways_photo(halves((2400, 3200))))
    assert explained.status_code == 200, explained.text
    heatmap = Image.open(io.BytesIO(base64.b64decode(explained.json()["heatmap"].split(",", 1)[1])))
    assert heatmap.size == (168, 224)  # portrait, as the photo is shown


@pytest.mark.parametrize("route", ["/classify/", "/explain/"])
def test_a_jpeg_bomb_is_refused_by_the_adapter_as_the_handler_would(adapter, torchserve_ready, route):
    bomb = jpeg_declaring_size(10_000, 8_000)
    handler = direct(torchserve_ready, bomb)
    before = requests_served(torchserve_ready)
    refused = post(f"{adapter.base_url}{route}", bomb)
    assert refused.status_code == handler.status_code == 413
    assert refused.json() == {"error": handler.json()["error"]}
    assert requests_served(torchserve_ready) == before  # TorchServe never saw it


def test_settings_tell_the_page_the_shrink_rules(adapter):
    settings = httpx.get(f"{adapter.base_url}/settings", timeout=10).json()
    assert settings["shrink"] == page_shrink_rules()
    assert settings["shrink"]["types"] == ["image/jpeg", "image/png", "image/webp"]
