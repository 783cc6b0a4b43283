"""`make rollout` (serving/rollout.py) on a real TorchServe with the real adapter in front, under load:
no failed request, one switch of version, the old version gone afterwards; a rollback; a version
that never becomes ready leaves the old one serving. Its own TorchServe (the session's must keep
its version for the other tests)."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from adapter.run import running_adapter
from serving.archive import sha256_of, weights_version
from serving.rollout import Rollout, RolloutError
from serving.settings import CALIBRATION_FILE
from torchserve_fixture import start_test_torchserve, weights_under_test

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
IMAGE = (REPO / "frontend" / "examples" / "test-00013.png").read_bytes()
CONCURRENCY = 8


def other_weights(path: Path, shift: float) -> Path:
    """The shipped weights with one bias moved by ``shift``: another version of the same network."""
    state = torch.load(weights_under_test(), map_location="cpu", weights_only=True)
    name = next(k for k in state if k.endswith("bias"))
    state[name] = state[name] + shift
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    ts = start_test_torchserve(root / "torchserve")
    try:
        with running_adapter(ts.adapter_env(), root / "adapter.log") as adapter:
            yield ts, adapter, root
    finally:
        ts.stop()


def classify_loop(base: str, stop: threading.Event, results: list) -> None:
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            started = time.monotonic()
            r = client.post(f"{base}/classify/", files={"image": ("p.png", IMAGE, "image/png")})
            version = r.json().get("model_version") if r.status_code == 200 else None
            results.append((started, time.monotonic(), r.status_code, version, r.text[:200]))


def registered(ts) -> list[str]:
    r = httpx.get(f"{ts.management_url}/models/{ts.model_name}/all", headers=ts.key_file.header("management"))
    return [v["modelVersion"] for v in r.json()]


def test_rollout_under_load_fails_no_request_and_switches_once(served, tmp_path):
    ts, adapter, _ = served
    old = weights_version(weights_under_test())
    new_weights = other_weights(tmp_path / "new" / "CIFAR100_model.pth", 1e-3)
    new = weights_version(new_weights)
    said: list[str] = []
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=classify_loop, args=(adapter.base_url, stop, results)) for _ in range(CONCURRENCY)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        assert Rollout(ts, ready_timeout_s=240, say=said.append).run(new_weights) == new
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [r for r in results if r[2] != 200]
    assert not failed, failed[:5]
    versions = {r[3] for r in results}
    assert versions == {old, new}, versions
    # One switch: once a client has seen the new version, every request sent after it gets the new one.
    first_new_seen = min(end for _, end, _, v, _ in results if v == new)
    assert all(v == new for start, _, _, v, _ in results if start > first_new_seen)
    assert sorted(results)[-1][3] == new and len(results) > 50
    # Afterwards: only the new version is registered; /health names it; the overlap was measured.
    assert registered(ts) == [new]
    health = httpx.get(f"{adapter.base_url}/health", timeout=30).json()
    assert health["archive_version"] == new
    overlap = next(line for line in said if "during the overlap" in line)
    assert "workers 2 -> 4" in overlap, said

    # Rolling back is the same move with the previous weights.
    Rollout(ts, ready_timeout_s=240, say=said.append).run(weights_under_test())
    assert registered(ts) == [old]
    r = httpx.post(f"{adapter.base_url}/classify/", files={"image": ("p.png", IMAGE, "image/png")}, timeout=60)
    assert r.status_code == 200 and r.json()["model_version"] == old
    # Same weights again: nothing to do.
    Rollout(ts, say=said.append).run(weights_under_test())
    assert "nothing to do" in said[-1]


def test_a_version_that_never_gets_ready_leaves_the_old_one_serving(served, tmp_path):
    ts, adapter, _ = served
    old = httpx.get(f"{adapter.base_url}/health", timeout=30).json()["archive_version"]
    # Weights with a calibration record the handler refuses (temperature -1): its workers die at start.
    broken = other_weights(tmp_path / "broken" / "CIFAR100_model.pth", 2e-3)
    (broken.parent / CALIBRATION_FILE).write_text(json.dumps(
        {"weights_sha256": sha256_of(broken), "temperature": -1.0, "unsure": {"threshold": 0.5}}))
    with pytest.raises(RolloutError) as err:
        Rollout(ts, ready_timeout_s=25, say=lambda line: None).run(broken)
    assert "was not READY within 25 s" in str(err.value) and f"{old} still serves" in str(err.value)
    assert registered(ts) == [old]
    assert not (ts.model_store / f"cifar100-{weights_version(broken)}.mar").exists()  # its archive is gone too
    r = httpx.post(f"{adapter.base_url}/classify/", files={"image": ("p.png", IMAGE, "image/png")}, timeout=60)
    assert r.status_code == 200 and r.json()["model_version"] == old


def test_archives_come_from_the_model_store_only(served):
    ts, _, _ = served
    r = httpx.post(f"{ts.management_url}/models", params={"url": "http://example.com/other.mar"},
                   headers=ts.key_file.header("management"), timeout=30)
    assert r.status_code == 404 and "does not match any allowed URL" in r.text
    r = httpx.post(f"{ts.management_url}/models", params={"url": "cifar100.mar"}, timeout=30)  # no key
    assert r.status_code in (400, 401) and "InvalidKeyException" in r.text, r.text
