"""`make rollout` (serving/rollout.py) on a real TorchServe with the real adapter in front, under load:
no failed request, one switch of version, the old version gone afterwards; a rollback that answers
the backlog of the version it retires before unregistering it; a version that never becomes ready,
or whose warm-up is not answered by it, leaves the old one serving. Its own TorchServe (the
session's must keep its version for the other tests)."""
from __future__ import annotations

import asyncio
import copy
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from aiohttp import web

from adapter.run import running_adapter
from serving.archive import sha256_of, weights_version
from serving.rollout import Rollout, RolloutError
from serving.settings import CALIBRATION_FILE, EXPLAINER_READY_LOG_LINE, read_model_config
from ctrl_c import sigint_as_in_a_terminal, stopped_by
from test_adapter_oip import stand_in_server
from torchserve_fixture import start_test_torchserve, stop_meanwhile, weights_under_test

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
def served(tmp_path_factory, pytestconfig):
    root = tmp_path_factory.mktemp("rollout")
    ts = start_test_torchserve(root / "torchserve")
    try:
        with running_adapter(ts.adapter_env(), root / "adapter.log") as adapter:
            yield ts, adapter, root
    finally:
        stop_meanwhile(ts, pytestconfig)


def one_worker_config(folder: Path) -> Path:
    """model-config.yaml with one worker: the model config (--model-config) of a new version whose workers only need
    to be READY for what a test checks (two starting side by side share the cores and take as long)."""
    import yaml

    config = read_model_config()
    config.update(minWorkers=1, maxWorkers=1)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model-config.yaml").write_text(yaml.safe_dump(config))
    return folder / "model-config.yaml"


def classify_loop(base: str, stop: threading.Event, results: list) -> None:
    """Posts one image after another until ``stop``: (sent, answered, status, version, text) each; a request
    that got no HTTP answer (reset, timeout) or an answer that is no JSON is recorded as status 0, and the loop
    goes on: a thread that died would leave its failures out of ``results``."""
    with httpx.Client(timeout=60) as client:
        while not stop.is_set():
            started = time.monotonic()
            try:
                r = client.post(f"{base}/classify/", files={"image": ("p.png", IMAGE, "image/png")})
                version = r.json().get("model_version") if r.status_code == 200 else None
            except (httpx.HTTPError, ValueError) as err:
                results.append((started, time.monotonic(), 0, None, repr(err)))
                time.sleep(0.05)  # (a server gone would otherwise be asked again at once, in a tight loop)
                continue
            results.append((started, time.monotonic(), r.status_code, version, r.text[:200]))


def registered(ts) -> list[str]:
    r = httpx.get(f"{ts.management_url}/models/{ts.model_name}/all", headers=ts.key_file.header("management"))
    return [v["modelVersion"] for v in r.json()]


def describe(ts, version: str) -> dict:
    r = httpx.get(f"{ts.management_url}/models/{ts.model_name}/{version}",
                  headers=ts.key_file.header("management"), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()[0]


class BacklogAtSwitch:
    """A ``say`` for Rollout that leaves the retiring version a backlog when the default switches.

    At "READY and warm" (the next step makes the new version the default) the retiring version's
    workers are paused (SIGSTOP), ``count`` predictions are queued on it through the default route
    (/predictions/cifar100, the adapter's), and its workers resume ``resume_s`` after the switch: a
    backlog that outlasts --drain-s however fast this machine is. A rollout that unregisters the
    version without waiting for its queue leaves those requests unanswered (TorchServe drops a
    removed version's queue: its clients wait until they time out) or failed ("Worker died.")."""

    # count stays under config.properties' job_queue_size (24): past it TorchServe answers 503 at once
    # (the paused workers' batches may hold only one request each). resume_s: twice the rollback's --drain-s (1 s).
    def __init__(self, ts, retiring: str, say, count: int = 20, resume_s: float = 2.0):
        self.ts, self.retiring, self.say, self.count, self.resume_s = ts, retiring, say, count, resume_s
        self.results: list[tuple[int | None, str | None, str]] = []
        self.threads: list[threading.Thread] = []
        self.workers: list[psutil.Process] = []
        self.timer: threading.Timer | None = None

    def __call__(self, line: str) -> None:
        self.say(line)
        if "is READY and warm" in line and not self.workers:
            self.start()

    def _predict(self) -> None:
        try:
            r = httpx.post(self.ts.predictions_url, content=IMAGE, headers=self.ts.key_file.header("inference"),
                           timeout=20)
            version = r.json().get("model_version") if r.status_code == 200 else None
            self.results.append((r.status_code, version, r.text[:120]))
        except httpx.HTTPError as err:
            self.results.append((None, None, f"{type(err).__name__}: {err}"))

    def start(self) -> None:
        self.workers = [psutil.Process(w["pid"]) for w in describe(self.ts, self.retiring)["workers"]]
        assert self.workers
        for p in self.workers:
            p.suspend()
        self.threads = [threading.Thread(target=self._predict) for _ in range(self.count)]
        for t in self.threads:
            t.start()
        # Queued on the retiring version (the paused workers' threads hold a batch each, at most 6).
        deadline = time.monotonic() + 30
        while (describe(self.ts, self.retiring).get("jobQueueStatus") or {}).get("pendingRequests", 0) \
                < self.count - 2 * 6:
            assert time.monotonic() < deadline, "the backlog never queued on the retiring version"
            time.sleep(0.05)
        time.sleep(0.3)  # the last of them too
        self.timer = threading.Timer(self.resume_s, self.resume)
        self.timer.start()

    def resume(self) -> None:
        for p in self.workers:
            try:
                p.resume()
            except psutil.Error:  # killed by an unregistration
                pass

    def finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.resume()
        for t in self.threads:
            t.join(60)


def every_client_answered(each: list[list], since: float, answers: int = 3, timeout: float = 60) -> None:
    """Wait until every client (``each``: its results, classify_loop's) has the results of ``answers`` requests it
    sent after ``since`` (monotonic): every request it sent before then has its result (one at a time)."""
    deadline = time.monotonic() + timeout
    while not all(sum(started > since for started, *_ in list(mine)) >= answers for mine in each):
        assert time.monotonic() < deadline, [len(mine) for mine in each]
        time.sleep(0.05)


def test_rollout_under_load_fails_no_request_and_switches_once(served, tmp_path):
    ts, adapter, _ = served
    old = weights_version(weights_under_test())
    new_weights = other_weights(tmp_path / "new" / "CIFAR100_model.pth", 1e-3)
    new = weights_version(new_weights)
    said: list[str] = []
    stop, each = threading.Event(), [[] for _ in range(CONCURRENCY)]  # each client's results
    threads = [threading.Thread(target=classify_loop, args=(adapter.base_url, stop, mine)) for mine in each]
    for t in threads:
        t.start()
    try:
        every_client_answered(each, since=0.0)  # the load is on before the rollout starts
        # --drain-s 1 (the rollback's below): a batch takes milliseconds, and no request may fail across the switch
        assert Rollout(ts, ready_timeout_s=240, drain_s=1, say=said.append).run(new_weights) == new
        every_client_answered(each, since=time.monotonic())  # and still on after the old version is gone
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not any(t.is_alive() for t in threads)
    results = [r for mine in each for r in mine]
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
    # The warm-up sent predictions only: the first explanation on each new worker (the adapter's /explain/)
    # imported Captum and built the explanation model (~1 s; 9.6 s of its 10 s on a loaded host). Now each
    # new worker has explained once before the switch, and says so in its log.
    ready = explainer_ready(ts, new)
    assert len(ready) == 2 and all(ready.values()), ready

    # Rolling back is the same move with the previous weights; here the version it retires still has a
    # backlog when the default switches: every queued request is answered before that version is
    # unregistered (--drain-s only covers the batches its workers hold, not a queue).
    backlog = BacklogAtSwitch(ts, new, said.append)
    try:
        Rollout(ts, ready_timeout_s=240, drain_s=1, say=backlog).run(weights_under_test())
    finally:
        backlog.finish()
    assert len(backlog.results) == backlog.count, said
    lost = [r for r in backlog.results if r[0] != 200]
    assert not lost, (f"{len(lost)} of {backlog.count} requests queued on {new} at the switch got no answer", lost[:3])
    assert sum(v == new for _, v, _ in backlog.results) >= backlog.count - 2 * 6, backlog.results
    assert registered(ts) == [old]
    r = httpx.post(f"{adapter.base_url}/classify/", files={"image": ("p.png", IMAGE, "image/png")}, timeout=60)
    assert r.status_code == 200 and r.json()["model_version"] == old
    # Same weights again: nothing to do.
    Rollout(ts, say=said.append).run(weights_under_test())
    assert "nothing to do" in said[-1]


def explainer_ready(ts, version: str, timeout: float = 15) -> dict[str, bool]:
    """Whether each worker of ``version`` logged that it can explain (model_log.log names the worker and version)."""
    said = EXPLAINER_READY_LOG_LINE.split("%")[0]
    ids = [w["id"] for w in describe(ts, version)["workers"]]
    deadline = time.monotonic() + timeout  # the frontend writes a worker's lines from its own thread
    while True:
        log = (ts.log_dir / "model_log.log").read_text(errors="replace")
        ready = {i: f"W-{i}-{ts.model_name}_{version}-stdout MODEL_LOG - {said}" in log for i in ids}
        if all(ready.values()) or time.monotonic() > deadline:
            return ready
        time.sleep(0.2)


def test_a_version_that_never_gets_ready_leaves_the_old_one_serving(served, tmp_path, monkeypatch):
    ts, adapter, _ = served
    monkeypatch.setattr(ts, "load_failures_to_give_up", 1)  # (TS_START_LOAD_FAILURES; 3 took two more worker deaths)
    old = httpx.get(f"{adapter.base_url}/health", timeout=30).json()["archive_version"]
    # Weights with a calibration record the handler refuses (temperature -1): its workers die at start.
    broken = other_weights(tmp_path / "broken" / "CIFAR100_model.pth", 2e-3)
    (broken.parent / CALIBRATION_FILE).write_text(json.dumps(
        {"weights_sha256": sha256_of(broken), "temperature": -1.0, "unsure": {"threshold": 0.5}}))
    started = time.monotonic()
    with pytest.raises(RolloutError) as err:
        Rollout(ts, ready_timeout_s=90, say=lambda line: None).run(broken)
    # Its workers crash-loop: it fails on their repeated load failures, not after the whole --ready-timeout.
    assert time.monotonic() - started < 60
    assert "will not get READY" in str(err.value) and "Load model failed" in str(err.value), str(err.value)[:600]
    assert f"{old} still serves" in str(err.value)
    assert registered(ts) == [old]
    assert not (ts.model_store / f"cifar100-{weights_version(broken)}.mar").exists()  # its archive is gone too
    r = httpx.post(f"{adapter.base_url}/classify/", files={"image": ("p.png", IMAGE, "image/png")}, timeout=60)
    assert r.status_code == 200 and r.json()["model_version"] == old


@pytest.mark.parametrize("fc_weight, refused", [
    (lambda w: torch.full_like(w, float("nan")), "NaN or infinite values in 'fc.weight'"),
    (lambda w: w * 1e38, "give NaN or infinite logits for a blank image although every value is finite")],
    ids=["nan", "overflowing"])
def test_weights_that_diverged_to_nan_or_overflow_are_refused_before_anything_is_registered(served, tmp_path,
                                                                                          fc_weight, refused):
    """The review's weights: the shipped ones with fc.weight NaN, as a diverged training run leaves them. They
    passed the rollout (the warm-up only wanted a 200 from the version: TorchServe answered NaN literals),
    then every adapter answer was a 500. Now the archive refuses them: nothing registered, the old version
    serves. So are finite weights that overflow (fc.weight x 1e38: every logit infinite; the warm-up refused
    them only after registering them and starting their workers)."""
    ts, adapter, _ = served
    old = httpx.get(f"{adapter.base_url}/health", timeout=30).json()["archive_version"]
    state = torch.load(weights_under_test(), map_location="cpu", weights_only=True)
    state["fc.weight"] = fc_weight(state["fc.weight"])
    diverged = tmp_path / "broken" / "CIFAR100_model.pth"
    diverged.parent.mkdir()
    torch.save(state, diverged)
    said: list[str] = []
    with pytest.raises(RolloutError, match=refused):
        Rollout(ts, ready_timeout_s=25, say=said.append).run(diverged)
    assert not any("registered" in line for line in said), said
    assert registered(ts) == [old]
    r = httpx.post(f"{adapter.base_url}/classify/", files={"image": ("p.png", IMAGE, "image/png")}, timeout=60)
    assert r.status_code == 200 and r.json()["model_version"] == old


INTERRUPTED_ROLLOUT = """
import json, sys
from pathlib import Path
from serving.rollout import roll_out
from serving.torchserve import TorchServeInstance
spec = json.loads(sys.argv[1])
ts = TorchServeInstance(Path(spec["workdir"]), spec["ports"], model_store=Path(spec["model_store"]),
                        log_dir=Path(spec["log_dir"]))
sys.exit(roll_out(ts, Path(spec["weights"]), ready_timeout_s=240, drain_s=1))
"""


class Lines:
    """A child's output read as it comes (a thread per stream): wait for a line, then all of it."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(stream.readline, "")), daemon=True)
        self.thread.start()

    def wait_for(self, words: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(words in line for line in self.lines):
            assert time.monotonic() < deadline, (words, self.lines)
            time.sleep(0.05)

    def text(self) -> str:
        self.thread.join(30)
        return "".join(self.lines)


def worker_pids(ts) -> set[int]:
    """TorchServe's worker processes now (Python children of its Java)."""
    return {p.pid for p in psutil.Process(ts.java_pid()).children(recursive=True) if "python" in p.name().lower()}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_rollout_unregisters_its_version_and_the_old_one_serves(served, tmp_path, signum):
    """Ctrl-C (or SIGTERM: a CI job cancelled, systemd) while `make rollout` waited for the new version's readiness
    left it registered, its workers running beside the old version's for good (and its archive in the store).
    Now the command unregisters it and exits 130 / 143; the old version never stopped serving. Meanwhile a second
    rollout is refused at once, naming this one. The command runs as make runs it, in a child whose SIGINT has its
    default disposition (CI starts the tests in the background, where SIGINT is inherited ignored)."""
    ts, adapter, _ = served
    old = httpx.get(f"{adapter.base_url}/health", timeout=30).json()["archive_version"]
    candidate = other_weights(tmp_path / "interrupted" / "CIFAR100_model.pth", 5e-3 + int(signum) * 1e-4)
    version = weights_version(candidate)
    # By pid, not by count: a worker of an earlier test's withdrawn version may still be stopping now.
    workers_before = worker_pids(ts)
    spec = {"workdir": str(ts.workdir), "ports": ts.ports, "model_store": str(ts.model_store),
            "log_dir": str(ts.log_dir), "weights": str(candidate)}
    child = subprocess.Popen([sys.executable, "-u", "-c", INTERRUPTED_ROLLOUT, json.dumps(spec)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=sigint_as_in_a_terminal)
    out, err = Lines(child.stdout), Lines(child.stderr)
    try:
        out.wait_for(f"registered {version} beside {old}; waiting for its workers", 120)
        with pytest.raises(RolloutError, match=rf"^another rollout is under way on this TorchServe \(pid {child.pid}, "):
            Rollout(ts, say=lambda line: None).run(weights_under_test())
        assert set(registered(ts)) == {old, version}
        child.send_signal(signum)
        child.wait(120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    said, errors = out.text(), err.text()
    assert child.returncode in stopped_by(signum), (child.returncode, said, errors)
    assert f"interrupted: unregistering {version} ({old} still serves)" in said, said
    assert f"{version} was unregistered; {old} still serves" in said, said
    assert errors.strip().endswith(f"error: rollout interrupted ({signal.Signals(signum).name})"), errors
    assert registered(ts) == [old]
    assert not (ts.model_store / f"cifar100-{version}.mar").exists()
    deadline = time.monotonic() + 60  # its workers stopped
    while not worker_pids(ts) <= workers_before:
        assert time.monotonic() < deadline, (worker_pids(ts), workers_before)
        time.sleep(0.5)
    r = httpx.post(f"{adapter.base_url}/classify/", files={"image": ("p.png", IMAGE, "image/png")}, timeout=60)
    assert r.status_code == 200 and r.json()["model_version"] == old
    # The lock went with the command: the next rollout runs.
    assert Rollout(ts, say=lambda line: None).run(weights_under_test()) == old


async def misrouted_to_default(ts, request: web.Request) -> web.Response:
    """A front on the inference address that sends every prediction to the model's default version,
    whatever version its path names (TorchServe itself answers /predictions/cifar100/<v> from <v>)."""
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(ts.predictions_url, content=await request.read(),
                              headers={"Authorization": request.headers.get("Authorization", "")})
    return web.Response(status=r.status_code, body=r.content,
                        headers={"Content-Type": r.headers.get("content-type", "application/octet-stream")})


def through_front(ts, route, action):
    """Run ``action(ts')`` in a thread, where ts' is ``ts`` with its inference address on a real HTTP
    server answering with ``route`` (its management API is still ``ts``'s own)."""
    async def go():
        async with stand_in_server(route) as url:
            front = copy.copy(ts)
            front.ports = {**ts.ports, "inference": int(url.rsplit(":", 1)[1])}
            return await asyncio.to_thread(action, front)
    return asyncio.run(go())


def test_a_warm_up_not_answered_by_the_new_version_leaves_the_old_one_serving(served, tmp_path):
    """"Warm" must mean the new version answered: the warm-up is the one check that it serves before
    the adapter's requests reach it. Here its workers are READY but the warm-up is answered by the
    old version (a front that misroutes): the rollout stops, the old version keeps serving."""
    ts, adapter, _ = served
    old = httpx.get(f"{adapter.base_url}/health", timeout=30).json()["archive_version"]
    candidate = other_weights(tmp_path / "misrouted" / "CIFAR100_model.pth", 4e-3)
    version = weights_version(candidate)

    async def misrouted(request):
        return await misrouted_to_default(ts, request)
    with pytest.raises(RolloutError) as err:
        through_front(ts, misrouted,
                      lambda front: Rollout(front, ready_timeout_s=240, say=lambda line: None,
                                            model_config=one_worker_config(tmp_path / "config")).run(candidate))
    message = str(err.value)
    assert f"{version} is READY but its warm-up predictions failed: 200 from version {old}:" in message, message
    assert f"{old} still serves; {version} was unregistered" in message
    assert registered(ts) == [old]
    assert not (ts.model_store / f"cifar100-{version}.mar").exists()
    r = httpx.post(f"{adapter.base_url}/classify/", files={"image": ("p.png", IMAGE, "image/png")}, timeout=60)
    assert r.status_code == 200 and r.json()["model_version"] == old


@pytest.mark.parametrize("body", ["<html>ok</html>", '{"model_version": null}', "[]",
                                  # the new version's own answers, but NaN (weights that overflow) or no number
                                  '{"model_version": "VERSION", "probability": NaN}',
                                  '{"model_version": "VERSION", "probability": 1e999}',
                                  '{"model_version": "VERSION", "probability": null}',
                                  # numbers, but no class named: every /classify/ of that version a 502
                                  '{"model_version": "VERSION", "probability": 0.5}'])
def test_a_warm_up_answer_that_is_not_the_handlers_is_a_failed_warm_up(served, body):
    """A 200 whose body is no answer of the handler (a front's page, another JSON, probabilities that are
    not numbers) fails the warm-up with the rollout's own error (which unregisters the new version), not a
    traceback. NaN passed: every adapter answer of that version was then a 500."""
    ts, _, _ = served
    version = registered(ts)[0]  # READY: the warm-up is what is checked
    body = body.replace("VERSION", version)

    async def page(request):
        return web.Response(status=200, text=body)
    with pytest.raises(RolloutError) as err:
        through_front(ts, page, lambda front: Rollout(front, say=lambda line: None).wait_ready_and_warm(version))
    assert f"warm-up predictions failed: 200 {body}" in str(err.value)


def test_a_warm_up_explanation_without_its_heatmap_is_a_failed_warm_up(served):
    """The warm-up's explanations are answered by the version, with the heatmap that makes them explanations: here
    a front answers /explanations/ with the version's own prediction (no heatmap), and the warm-up fails."""
    ts, _, _ = served
    version = registered(ts)[0]

    async def predictions_only(request):
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.post(f"{ts.inference_url}/predictions/{ts.model_name}/{version}", content=await request.read(),
                                  headers={"Authorization": request.headers["Authorization"]})
        return web.Response(status=r.status_code, body=r.content, content_type="application/json")
    with pytest.raises(RolloutError) as err:
        through_front(ts, predictions_only,
                      lambda front: Rollout(front, say=lambda line: None).wait_ready_and_warm(version))
    assert f"warm-up explanations failed: 200 from version {version}:" in str(err.value), str(err.value)


def test_archives_come_from_the_model_store_only(served):
    ts, _, _ = served
    r = httpx.post(f"{ts.management_url}/models", params={"url": "http://example.com/other.mar"},
                   headers=ts.key_file.header("management"), timeout=30)
    assert r.status_code == 404 and "does not match any allowed URL" in r.text
    r = httpx.post(f"{ts.management_url}/models", params={"url": "cifar100.mar"}, timeout=30)  # no key
    assert r.status_code in (400, 401) and "InvalidKeyException" in r.text, r.text


def test_a_refused_management_key_is_renewed_with_the_api_key(served):
    """TorchServe's keys expire (token_expiration_min, 60): a rollout an hour after make serve has its
    management key refused (400 InvalidKeyException). Here the key file's management key is spoiled
    instead, which this TorchServe refuses the same way without waiting for an expiry: the rollout
    renews the key with the API key (TorchServe rewrites key_file.json) and goes on."""
    ts, _, _ = served
    keys = json.loads(ts.key_file.path.read_text())
    keys["management"]["key"] = "spoiled"
    ts.key_file.path.write_text(json.dumps(keys))
    said: list[str] = []
    assert Rollout(ts, say=said.append).run(weights_under_test()) == weights_version(weights_under_test())
    assert "nothing to do" in said[-1]
    renewed = json.loads(ts.key_file.path.read_text())["management"]["key"]
    assert renewed != "spoiled"
    assert httpx.get(f"{ts.management_url}/models/cifar100", headers={"Authorization": f"Bearer {renewed}"},
                     timeout=30).status_code == 200
