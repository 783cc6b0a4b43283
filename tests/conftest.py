"""Shared fixtures.

``torchserve`` (session scope): one real TorchServe (Java + a Python worker) serving this
checkout's handler and the shipped default weights, on free loopback ports, with its own
directory (key_file.json, logs, TMPDIR/TEMP). See tests/torchserve_fixture.py for what the
returned object offers. A test that stops or restarts it must leave it READY again
(``ts.start(); ts.wait_ready()`` in a ``finally``); the fixture ``torchserve_ready`` checks that
before each test that asks for it, restarting the server if an earlier test left it down.
"""
from __future__ import annotations

import pytest

from torchserve_fixture import READY_TIMEOUT_S, start_test_torchserve


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory):
    ts = start_test_torchserve(tmp_path_factory.mktemp("torchserve"))
    yield ts
    ts.stop()


@pytest.fixture
def torchserve_ready(torchserve):
    """The session's TorchServe, brought back up first if an earlier test left it stopped."""
    if not torchserve.is_running():
        torchserve.start()
    torchserve.wait_ready(READY_TIMEOUT_S)
    return torchserve


@pytest.fixture(scope="session")
def cifar100_test_split():
    """(uint8 images [10000, 3, 32, 32], labels [10000]) of the CIFAR-100 *test* split (never trained on)."""
    import os
    from pathlib import Path

    from training.data import DATA_ENV, load_split

    # Like the Makefile: $CIFAR100_DATA, else the shared copy beside the checkout, else ./data.
    root = os.environ.get(DATA_ENV) or next(
        (d for d in ("../shared/data", "data") if Path(d, "cifar-100-python").is_dir()), "data")
    return load_split(root, train=False)
