"""training/device_data.py: CIFAR-100's files carried to a GPU machine as WebP mosaics and rebuilt there byte for
byte (on small files of the same layout: the official ones take minutes to pack)."""
from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest

from training.device_data import main, unpack


def cifar_like_file(path, images: int, seed: int) -> bytes:
    """A pickle laid out like the official files (labels and names around one uint8 [N, 3072] array)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, 3072).astype(np.uint8)  # smooth pixels: quick to encode
    data = (ramp[None, :] + rng.integers(0, 64, (images, 1), dtype=np.uint8)).astype(np.uint8)
    data[:, ::97] = rng.integers(0, 256, (images, len(range(0, 3072, 97))), dtype=np.uint8)
    raw = pickle.dumps({b"filenames": [f"img_{i}.png".encode() for i in range(images)],
                        b"fine_labels": rng.integers(0, 100, images).tolist(), b"data": data}, protocol=4)
    path.write_bytes(raw)
    return raw


def test_the_files_are_rebuilt_byte_for_byte_from_chunks_spread_over_two_carries(tmp_path, monkeypatch):
    source = tmp_path / "cifar-100-python"
    source.mkdir()
    files = {"train": cifar_like_file(source / "train", 2000, 0), "test": cifar_like_file(source / "test", 1000, 1),
             "meta": b"meta"}
    (source / "meta").write_bytes(files["meta"])
    md5 = {name: hashlib.md5(raw).hexdigest() for name, raw in files.items()}
    chunks = tmp_path / "chunks"
    monkeypatch.setenv("CIFAR100_DATA", str(tmp_path))  # the data folder's rule, as make's and the training tools'
    main(["pack", str(chunks)])
    assert sorted(p.name for p in chunks.glob("*.webp")) == ["test.000.webp", "train.000.webp", "train.001.webp"]
    # Two calls' carries: the second training chunk in another folder.
    second = tmp_path / "b"
    second.mkdir()
    (chunks / "train.001.webp").rename(second / "train.001.webp")
    rebuilt = unpack([chunks, second], tmp_path / "data", md5=md5)
    for name, raw in files.items():
        assert (rebuilt / name).read_bytes() == raw, name
    # A chunk left behind: the rebuilt file is shorter, and its md5 says so.
    (second / "train.001.webp").unlink()
    with pytest.raises(RuntimeError, match="md5"):
        unpack([chunks, second], tmp_path / "again", md5=md5)
    # The test split alone (a machine that only evaluates), and a missing piece named.
    assert (unpack([chunks], tmp_path / "test-only", splits=("test",), md5=md5) / "test").read_bytes() == files["test"]
    (chunks / "train.prefix").unlink()
    with pytest.raises(RuntimeError, match="train.prefix"):
        unpack([chunks], tmp_path / "broken", md5=md5)
