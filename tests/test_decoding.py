"""Cheap decoding (handler/preprocessing.py): images are decoded no larger than the model needs,
without changing what it answers. In-process (no server); the CPU it saves is measured by
benchmarks/bench_decode.py, not here.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from benchmarks.bench_decode import full_decode, photo_like
from handler.preprocessing import DECODE_MIN_SIDE, MAX_JPEG_PIXELS, ImageRequestError, decode_image, image_to_tensor
from serving.images import MAX_IMAGE_PIXELS, open_upload
from serving_helpers import cifar_pil, encode, exif_rotated_jpeg, jpeg_declaring_size, png_declaring_size


def test_a_12_megapixel_jpeg_is_decoded_at_reduced_scale_with_the_same_input():
    data = encode(photo_like(4000, 3000), "JPEG", quality=90)
    cheap = decode_image(data)
    # libjpeg's 1/8 scale: 500 x 375, still above the smallest side kept.
    assert cheap.size == (500, 375) and min(cheap.size) >= DECODE_MIN_SIDE
    full = image_to_tensor(full_decode(data)).float()
    diff = (image_to_tensor(cheap).float() - full).abs()
    # The network's 32x32 input is the same image: on average well under one level of 255.
    assert diff.mean() < 1.0 and diff.max() < 12, (float(diff.mean()), float(diff.max()))


def test_exif_orientation_is_kept_at_reduced_scale():
    img = photo_like(1600, 1200, seed=1)
    cheap = decode_image(exif_rotated_jpeg(img, orientation=6))  # stored sideways: shown portrait
    assert cheap.size == (300, 400)  # 1/4 scale, turned upright
    full = full_decode(exif_rotated_jpeg(img, orientation=6))
    assert full.size == (1200, 1600)
    assert (image_to_tensor(cheap).float() - image_to_tensor(full).float()).abs().mean() < 1.5


def test_a_large_png_is_box_reduced_before_the_final_resize():
    data = encode(photo_like(2048, 1024, seed=2))
    cheap = decode_image(data)
    assert cheap.size == (512, 256)  # reduced by 4, keeping DECODE_MIN_SIDE
    diff = (image_to_tensor(cheap).float() - image_to_tensor(full_decode(data)).float()).abs()
    assert diff.mean() < 1.0, float(diff.mean())


def test_jpeg_pixel_limit_names_the_real_limit():
    side = int(MAX_JPEG_PIXELS ** 0.5) + 1
    assert open_upload(jpeg_declaring_size(side - 1, side - 1)).size == (side - 1, side - 1)  # 64 MP: admitted
    with pytest.raises(ImageRequestError) as info:
        decode_image(jpeg_declaring_size(side, side))
    assert info.value.status == 413
    assert f"{MAX_JPEG_PIXELS / 1e6:.0f} MP limit for JPEG images" in info.value.message


def test_a_jpeg_above_pillows_own_bomb_limit_names_the_jpeg_limit():
    """Above twice Image.MAX_IMAGE_PIXELS (~179 MP) Pillow refuses a canvas while opening it, before the JPEG
    limit is checked: such a JPEG was refused naming the 16 MP limit of the other formats."""
    width, height = 20_000, 10_000  # 200 MP, declared in the frame header of a tiny file
    assert width * height > 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageRequestError) as info:
        decode_image(jpeg_declaring_size(width, height))
    assert info.value.status == 413
    assert f"above the {MAX_JPEG_PIXELS / 1e6:.0f} MP limit for JPEG images" in info.value.message, info.value.message
    # The other formats' bombs still name theirs.
    with pytest.raises(ImageRequestError) as info:
        decode_image(png_declaring_size(width, height))
    assert info.value.status == 413
    assert f"above the {MAX_IMAGE_PIXELS / 1e6:.0f} MP limit for" in info.value.message, info.value.message


def test_top1_on_the_cifar_test_split_is_unchanged(cifar100_test_split, reference):
    """The split's own 32x32 images decode to exactly the same tensors (nothing to reduce), and the
    same images as 512x512 JPEGs (where draft mode acts) keep their top-1 answers."""
    images, labels = cifar100_test_split
    picks = range(0, 10000, 20)  # 500 images across the split
    as_png = [encode(cifar_pil(images, i)) for i in picks]
    assert all(torch.equal(image_to_tensor(decode_image(d)), image_to_tensor(full_decode(d))) for d in as_png)

    big = [encode(cifar_pil(images, i).resize((512, 512), Image.Resampling.BICUBIC), "JPEG", quality=92)
           for i in picks]
    cheap = torch.stack([image_to_tensor(decode_image(d)) for d in big])
    full = torch.stack([image_to_tensor(full_decode(d)) for d in big])
    top1_cheap = reference.probs_of_uint8(cheap).argmax(1)
    top1_full = reference.probs_of_uint8(full).argmax(1)
    agree = float((top1_cheap == top1_full).float().mean())
    truth = labels[list(picks)]
    acc_cheap = float((top1_cheap == truth).float().mean())
    acc_full = float((top1_full == truth).float().mean())
    # JPEG's own noise moves ~2% of these answers (quality 90 vs 92): the same bound here.
    assert agree >= 0.96, agree
    assert abs(acc_cheap - acc_full) <= 0.01, (acc_cheap, acc_full)


@pytest.mark.parametrize("size", [64, 1024])  # 1024: box-reduced before the 8-bit conversion
def test_a_transparent_grey_in_one_and_sixteen_bit_pngs_shows_white(size):
    """A PNG's tRNS names one transparent grey: 1-bit and 16-bit grey images showed it black (a browser
    shows the page's white); only palette, 8-bit grey and RGB images were composited."""
    import numpy as np

    one = Image.new("1", (size, size), 0)
    one.paste(1, (size // 2, 0, size, size))
    wide = np.zeros((size, size), dtype=np.uint16)
    wide[:, size // 2:] = 200 * 257
    for stored, right in ((one, 255), (Image.fromarray(wide), 200)):
        out = np.asarray(decode_image(encode(stored, transparency=0))).astype(int)
        half = out.shape[1] // 2
        assert out[:, :half - 1].min() == 255, stored.mode  # the transparent black, over white
        assert (out[:, half + 1:] == right).all(), stored.mode
    # Without tRNS, black stays black.
    plain = np.asarray(decode_image(encode(Image.fromarray(wide))))
    assert plain[:, :plain.shape[1] // 2 - 1].max() == 0


def _grey_tiff(values, sample_format: int) -> bytes:
    """An uncompressed 32-bit grey TIFF (Pillow writes none): 1 unsigned, 2 signed samples."""
    import struct

    import numpy as np

    pixels = np.asarray(values).astype("<u4" if sample_format == 1 else "<i4").tobytes()
    height, width = np.shape(values)
    entries = [(256, 4, width), (257, 4, height), (258, 3, 32), (259, 3, 1), (262, 3, 1), (273, 4, 8),
               (277, 3, 1), (278, 4, height), (279, 4, len(pixels)), (339, 3, sample_format)]
    out = b"II*\x00" + struct.pack("<I", 8 + len(pixels)) + pixels + struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        out += struct.pack("<HHI", tag, kind, 1) + struct.pack("<HH" if kind == 3 else "<I", *((value, 0) if kind == 3 else (value,)))
    return out + struct.pack("<I", 0)


@pytest.mark.parametrize("size", [64, 1024])  # 1024: box-reduced before the 8-bit conversion
def test_thirty_two_bit_grey_tiffs_keep_their_greys(size):
    """Pillow reads a 32-bit unsigned grey sample as a signed one: above 2**31 it showed black, every value above
    65,535 (16 bits' range, which the 8-bit conversion assumed) white, and 8-bit values written wide black."""
    import numpy as np

    for sample_format, value, grey in ((1, 3_000_000_000, round(3e9 / 2**32 * 255)),
                                       (1, 2**32 - 1, 255),
                                       (2, 1_000_000_000, round(1e9 / 2**31 * 255)),
                                       (2, -5, 0),
                                       (1, 200, 200),  # 8-bit values in a 32-bit file
                                       (2, 200 * 257, 200)):  # 16-bit ones
        values = np.zeros((size, size), dtype=np.int64)
        values[:, size // 2:] = value
        out = np.asarray(decode_image(_grey_tiff(values, sample_format))).astype(int)
        half = out.shape[1] // 2
        assert (out[:, :half - 1] == 0).all(), (sample_format, value)
        assert (abs(out[:, half + 1:] - grey) <= 1).all(), (sample_format, value, out[0, -1], grey)
