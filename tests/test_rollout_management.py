"""`make rollout`'s conversation with TorchServe's management API (serving/rollout.py), against a
stand-in API (a real HTTP server on a free loopback port, no Java): fast, so each rule has a test.

The stand-in keeps TorchServe 0.12's key rules: a missing, expired or wrong key is answered 400
InvalidKeyException; ``PUT /token?type=<kind>`` with the API key issues a new key of that kind and
rewrites key_file.json. A real TorchServe whose key expired answers the same (tests/test_rollout.py
checks the renewal on one with a spoiled key: waiting for a real expiry takes a minute at least).
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web

from model.shipped import SHIPPED_WEIGHTS
from serving.archive import inputs_digest, weights_version
from serving.rollout import HTTP_TIMEOUT_S, Rollout, RolloutError
from serving.torchserve import TorchServeInstance
from test_adapter_oip import stand_in_server

NEW = weights_version(SHIPPED_WEIGHTS)
OLD = "w3-deadbeef"
INVALID_KEY = {"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed. Token either"
                                                                      " incorrect, expired, or not provided correctly"}


class StandInManagement:
    """TorchServe's management API for ``cifar100`` with ``registered`` versions (the first the default)."""

    def __init__(self, workdir: Path, registered: list[str], expired: set[str] = frozenset(),
                 renewable: bool = True, token_delay_s: float = 0, workers: int = 1):
        self.workdir, self.registered, self.renewable = workdir, list(registered), renewable
        self.workers = workers  # each version's, all READY
        self.token_delay_s = token_delay_s  # PUT /token answered after that long (a loaded host)
        self.keys = {"management": "m0", "inference": "i0", "API": "a0"}
        self.issued = 0
        self.calls: list[tuple[str, str]] = []  # (method, path) of every call whose key was accepted
        self.refused: list[tuple[str, str]] = []
        self.write_key_file()
        for kind in expired:  # TorchServe's file still holds the key, but it is no longer valid
            self.keys[kind] = "expired-" + kind

    def write_key_file(self) -> None:
        (self.workdir / "key_file.json").write_text(json.dumps(
            {kind: {"key": key, "expiration time": "2024-02-16T21:12:24.801167Z"} for kind, key in self.keys.items()}))

    def key_of(self, request: web.Request) -> str:
        return request.headers.get("Authorization", "").removeprefix("Bearer ")

    async def __call__(self, request: web.Request) -> web.Response:
        path = request.path
        if path == "/token":
            await asyncio.sleep(self.token_delay_s)
            if self.key_of(request) != self.keys["API"] or not self.renewable:
                return web.json_response(INVALID_KEY, status=400)
            self.issued += 1
            self.keys[request.query["type"]] = f"{request.query['type'][0]}{self.issued}"
            self.write_key_file()
            return web.json_response({"status": "renewed"})
        if self.key_of(request) != self.keys["inference" if path.startswith("/predictions/") else "management"]:
            self.refused.append((request.method, path))
            return web.json_response(INVALID_KEY, status=400)
        if path.startswith("/predictions/"):  # the warm-up's route: an answer of the version asked
            self.calls.append((request.method, path))
            return web.json_response({"prediction": "Apple"}, headers={"X-Model-Version": path.rsplit("/", 1)[1]})
        self.calls.append((request.method, path))
        if request.method == "GET" and path == "/models/cifar100":
            return web.json_response([{"modelVersion": self.registered[0]}])
        if request.method == "GET" and path == "/models/cifar100/all":
            return web.json_response([{"modelVersion": v, "modelUrl": "cifar100.mar" if v == OLD else f"cifar100-{v}.mar"}
                                      for v in self.registered])
        version = path.rsplit("/", 1)[1]
        if version not in self.registered:
            return web.json_response({"code": 404, "message": f"Model version {version} does not exist"}, status=404)
        if request.method == "DELETE":
            self.registered.remove(version)
            return web.json_response({"status": f"Model cifar100 version {version} unregistered"})
        return web.json_response([{"modelVersion": version, "workers": [{"status": "READY"}] * self.workers,
                                   "jobQueueStatus": {"pendingRequests": 0}}])


def stand_in_rollout(workdir: Path, url: str, **options) -> Rollout:
    """A Rollout whose TorchServe's every API is the stand-in at ``url``, its folders ``workdir``."""
    port = int(url.rsplit(":", 1)[1])
    ts = TorchServeInstance(workdir, {"inference": port, "management": port, "metrics": port,
                                      "grpc_inference": 1, "grpc_management": 2}, model_store=workdir)
    return Rollout(ts, **options)


def with_stand_in(api: StandInManagement, action, http_timeout_s: float = HTTP_TIMEOUT_S):
    """Run ``action(rollout)`` in a thread, its TorchServe's every API on ``api``."""
    async def route(request):
        return await api(request)
    return with_stand_in_route(api, route, action, http_timeout_s)


def with_stand_in_route(api: StandInManagement, route, action, http_timeout_s: float = HTTP_TIMEOUT_S):
    """with_stand_in, the stand-in answering with ``route`` (which may hand calls on to ``api``)."""
    async def go():
        async with stand_in_server(route) as url:
            return await asyncio.to_thread(action, stand_in_rollout(api.workdir, url, ready_timeout_s=5, drain_s=0,
                                                                    say=said.append, http_timeout_s=http_timeout_s))
    said: list[str] = []
    return asyncio.run(go()), said

def test_an_expired_management_key_is_renewed_and_the_call_sent_again(tmp_path):
    """TorchServe's management key expires after token_expiration_min (60): the rollout asks for a new
    one with the API key, as the adapter does, instead of reporting that cifar100 is not served."""
    api = StandInManagement(tmp_path, [NEW], expired={"management"})
    version, said = with_stand_in(api, lambda rollout: rollout.run(SHIPPED_WEIGHTS))
    assert version == NEW and "nothing to do" in said[-1]
    assert api.refused == [("GET", "/models/cifar100")] and api.issued == 1
    assert json.loads((tmp_path / "key_file.json").read_text())["management"]["key"] == "m1"


def test_an_expired_inference_key_is_renewed_for_the_warm_up_too(tmp_path):
    """The warm-up predictions go to the inference API with its own key (README: both keys are renewed): an
    expired one is renewed with the API key and the prediction sent again, within the ready deadline."""
    from serving.rollout import ReadyDeadline

    api = StandInManagement(tmp_path, [NEW], expired={"inference"})
    path = f"/predictions/cifar100/{NEW}"
    answer, _ = with_stand_in(api, lambda rollout: rollout._warm_up(path, b"PNG", ReadyDeadline(NEW, 5)))
    assert answer.status_code == 200 and api.refused == [("POST", path)] and api.calls == [("POST", path)]
    assert api.issued == 1 and json.loads((tmp_path / "key_file.json").read_text())["inference"]["key"] == "i1"


def test_a_key_renewed_elsewhere_is_read_again_not_renewed(tmp_path):
    """The file already holds a newer key than the one refused (renewed by the adapter meanwhile):
    that key is used, and no other is asked for."""
    api = StandInManagement(tmp_path, [NEW])

    def go(rollout):
        rollout.keys.load()  # the old key, read
        api.keys["management"] = "m-elsewhere"
        api.write_key_file()
        return rollout.default_version()
    assert with_stand_in(api, go)[0] == NEW
    assert api.issued == 0 and api.calls == [("GET", "/models/cifar100")]


def test_a_key_that_cannot_be_renewed_is_reported_as_such(tmp_path):
    api = StandInManagement(tmp_path, [NEW], expired={"management"}, renewable=False)
    with pytest.raises(RolloutError) as err:
        with_stand_in(api, lambda rollout: rollout.run(SHIPPED_WEIGHTS))
    message = str(err.value)
    assert "refused the management key" in message and "renewing it with the API key failed" in message
    assert "does not serve" not in message


def test_a_key_renewal_that_times_out_names_the_call_and_its_setting(tmp_path):
    """A PUT /token (renewing a refused key) past --http-timeout was reported as a key it could not renew, asking
    "is that the running TorchServe's key file?": the wrong lead. It is said as every other timeout is: the API,
    the call, its timeout and the option that holds it."""
    api = StandInManagement(tmp_path, [NEW], expired={"management"}, token_delay_s=2)

    def go(rollout):
        with pytest.raises(RolloutError) as err:
            rollout.default_version()
        return str(err.value), rollout.ts.management_url
    (message, url), _ = with_stand_in(api, go, http_timeout_s=0.5)
    assert message == (f"TorchServe's management API did not answer PUT {url}/token?type=management within 0.5 s "
                       "(ReadTimeout); a loaded host may need more: --http-timeout (ROLLOUT_ARGS)"), message


def test_the_default_already_serving_still_unregisters_the_versions_left_beside_it(tmp_path):
    """A rollout interrupted after its switch leaves the old version registered (its workers' memory
    for good): the same command again drains and unregisters it, and says so."""
    api = StandInManagement(tmp_path, [NEW, OLD])
    version, said = with_stand_in(api, lambda rollout: rollout.run(SHIPPED_WEIGHTS))
    assert version == NEW and api.registered == [NEW]
    assert ("DELETE", f"/models/cifar100/{OLD}") in api.calls
    assert not any(method == "DELETE" and path.endswith(NEW) for method, path in api.calls)
    assert any(f"unregistering the versions left registered beside it: {OLD}" in line for line in said), said
    assert f"drained and unregistered {OLD}" in said


def test_a_second_rollout_while_one_runs_is_refused_at_once_naming_the_first(tmp_path):
    """Two rollouts at once (two operators, a CI job retried) had no lock: each registered its version, made it
    the default and unregistered the other's. The second is now refused at once, before any call to TorchServe,
    naming the first (its pid, start, weights); once the first ends, whether it succeeded or not, the next one
    runs. Here the first is held in its first step (a thread of this process: a lock of another open file)."""
    import os
    import threading

    api = StandInManagement(tmp_path, [NEW, OLD])
    first_started, first_may_go = threading.Event(), threading.Event()

    def held_first(line: str) -> None:
        first_started.set()
        first_may_go.wait(30)

    def go(rollout):
        first = Rollout(rollout.ts, ready_timeout_s=5, drain_s=0, say=held_first)
        thread = threading.Thread(target=first.run, args=(SHIPPED_WEIGHTS,))
        thread.start()
        try:
            assert first_started.wait(30)
            calls_before = len(api.calls)
            started = time.monotonic()
            with pytest.raises(RolloutError) as err:
                rollout.run(SHIPPED_WEIGHTS)
            assert time.monotonic() - started < 1 and len(api.calls) == calls_before  # at once, nothing asked
        finally:
            first_may_go.set()
            thread.join(30)
        message = str(err.value)
        assert message.startswith(f"another rollout is under way on this TorchServe (pid {os.getpid()}, since ")
        assert f"--weights {SHIPPED_WEIGHTS}; lock {rollout.ts.log_dir / 'rollout.lock'})" in message, message
        # README quotes it whole (it had a relative lock path and stopped before the advice): the same words.
        readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
        quoted = re.search(r"`error: (another rollout is under way on this TorchServe \(pid [^`]*)`", readme)[1]

        def shape(text: str) -> str:
            text = re.sub(r"pid \d+, since [^,]+, --weights \S+; lock \S+rollout\.lock\)", "pid P, since S, --weights W; lock L)", text)
            return " ".join(text.split())
        assert shape(quoted) == shape(message), (quoted, message)
        assert api.registered == [NEW]  # the first one finished its work
        return rollout.run(SHIPPED_WEIGHTS)  # the lock is free again
    version, said = with_stand_in(api, go)
    assert version == NEW and "nothing to do" in said[-1]


def warm_up_against(tmp_path, slow_path: str, slow_calls: int, http_timeout_s: float = 0.5,
                    ready_timeout_s: float = 5, slow_s: float = 2, fast_calls: int = 0, worker_log: bool = False,
                    workers: int = 1, failing_calls: tuple[int, ...] = ()):
    """Run ``wait_ready_and_warm(NEW)`` on a stand-in TorchServe whose ``slow_calls`` calls to ``slow_path`` after
    its first ``fast_calls`` answer after ``slow_s`` (past ``http_timeout_s``: a loaded host), the others at once as
    the new version's
    handler does; with ``worker_log``, a model_log.log where no worker logs its explanation model ready (each
    round finds them cold); the calls to ``slow_path`` numbered in ``failing_calls`` (from 1) answer 500 at once, as a
    worker whose handler fails. Returns (the RolloutError's message or None, what the rollout said, the stand-in's
    URL, the calls, the seconds wait_ready_and_warm took)."""
    api = StandInManagement(tmp_path, [OLD, NEW], workers=workers)
    calls: list[str] = []

    async def route(request):
        if not request.path.startswith(("/predictions/", "/explanations/")):
            return await api(request)
        calls.append(request.path)
        if request.path.startswith(slow_path) and calls.count(request.path) in failing_calls:
            return web.json_response({"code": 500, "message": "the worker failed"}, status=500)
        if request.path.startswith(slow_path) and fast_calls < calls.count(request.path) <= fast_calls + slow_calls:
            await asyncio.sleep(slow_s)
        answer = {"label": "ray", "probability": 0.5, "model_version": NEW}
        if request.path.startswith("/explanations/"):
            answer["heatmap"] = "data:image/png;base64,iVBORw0KGgo="
        return web.json_response(answer)

    said: list[str] = []

    async def go():
        async with stand_in_server(route) as url:
            rollout = stand_in_rollout(tmp_path, url, ready_timeout_s=ready_timeout_s, drain_s=0, say=said.append,
                                       http_timeout_s=http_timeout_s)
            if worker_log:
                rollout.ts.log_dir.mkdir(parents=True, exist_ok=True)
                (rollout.ts.log_dir / "model_log.log").write_text("")
            started = time.monotonic()
            try:
                await asyncio.to_thread(rollout.wait_ready_and_warm, NEW)
            except RolloutError as err:
                return str(err), url, time.monotonic() - started
            return None, url, time.monotonic() - started
    message, url, took_s = asyncio.run(go())
    return message, said, url, calls, took_s


def test_a_warm_up_call_that_times_out_names_the_inference_api_and_its_setting(tmp_path):
    """A warm-up prediction past the rollout's HTTP timeout (a loaded host) withdrew the version saying TorchServe's
    *management* API at its management URL did not answer "is TorchServe running?": the operator looked at the
    wrong port. The error names the API called, the call, its timeout (twice: sent once more) and the option."""
    message, said, url, calls, _ = warm_up_against(tmp_path, "/predictions/", slow_calls=99)
    assert message is not None
    assert message.startswith(f"TorchServe's inference API did not answer POST {url}/predictions/cifar100/{NEW} "
                              "within 0.5 s, twice (ReadTimeout)"), message
    assert "--http-timeout" in message and "management" not in message, message


def test_a_warm_up_explanation_that_times_out_once_is_sent_again_not_the_version_withdrawn(tmp_path):
    """A loaded host's first explanation on a new worker (Captum's import, the explanation model's build) can pass
    --http-timeout once; that withdrew a good version. The abandoned call still warms the worker: the warm-up
    sends it once more, says so, and the version is kept."""
    message, said, url, calls, _ = warm_up_against(tmp_path, "/explanations/", slow_calls=1)
    assert message is None, message
    assert calls.count(f"/explanations/cifar100/{NEW}") == 2, calls
    warning = (f"warning: TorchServe's inference API did not answer POST {url}/explanations/cifar100/{NEW} "
               "within 0.5 s (ReadTimeout); a loaded host may need more: --http-timeout (ROLLOUT_ARGS); "
               "sending it once more")
    assert warning in said, said


def test_the_warm_up_ends_within_what_is_left_of_the_ready_timeout(tmp_path):
    """--ready-timeout promises the version READY and warm within it, but each warm-up call had a whole
    --http-timeout, sent twice: on a slow host the rollout ran minutes past it. Each call now waits at most what is
    left of --ready-timeout; the single retry is still sent while time is left, and when the time is out the
    version is withdrawn naming --ready-timeout and how long it waited. (Here: the explanation never answers in
    time; 1 s, then the 0.5 s left, not 2 x 1 s.)"""
    message, said, url, calls, took_s = warm_up_against(tmp_path, "/explanations/", slow_calls=99,
                                                        http_timeout_s=1, ready_timeout_s=1.5, slow_s=2.5)
    assert message is not None and took_s < 1.9, (took_s, message)
    assert calls.count(f"/explanations/cifar100/{NEW}") == 2, calls  # the retry, within the time left
    assert any(line.endswith("sending it once more") for line in said), said
    assert re.fullmatch(rf"version {NEW} was not READY and warm within 1.5 s: waited \d+\.\d s, TorchServe's inference "
                        rf"API had not answered POST {url}/explanations/cifar100/{NEW} \(ReadTimeout\); a loaded "
                        r"host may need more: --ready-timeout \(ROLLOUT_ARGS\)", message), message


def test_a_ready_timeout_passed_after_the_first_explanations_only_leaves_a_worker_cold(tmp_path):
    """The first explanation round answered (the version explains); a later round, for a worker its log shows
    cold, ran out of --ready-timeout: that withdrew the version, where the same worker still cold after the last
    round is only a warning. Now it is that warning too, saying --ready-timeout passed. (The stand-in's one worker
    never logs its explanation model ready: the first round's cold look waits 2 s, the second round has 0.5 s.)"""
    message, said, url, calls, took_s = warm_up_against(tmp_path, "/explanations/", slow_calls=99, fast_calls=1,
                                                        http_timeout_s=1, ready_timeout_s=2.5, slow_s=2.5,
                                                        worker_log=True)
    assert message is None, message
    assert calls.count(f"/explanations/cifar100/{NEW}") == 2 and took_s < 3.2, (calls, took_s)
    assert said[-1].startswith("warning: worker(s) None of") and "(--ready-timeout passed)" in said[-1], said


def test_a_failed_explanation_in_a_round_cut_short_by_the_ready_timeout_still_withdraws_the_version(tmp_path):
    """A later explanation round stopped at the first call that ran out of --ready-timeout and only warned, so a
    worker whose explanation answered 500 in that round went into service unseen. Every answer of a round is
    looked at first. (Two workers, both cold by their log: round 1's first explanation answers 500, its second
    never in time.)"""
    message, said, url, calls, took_s = warm_up_against(tmp_path, "/explanations/", slow_calls=99, fast_calls=2,
                                                        http_timeout_s=1, ready_timeout_s=3, slow_s=3,
                                                        worker_log=True, workers=2, failing_calls=(3,))
    assert calls.count(f"/explanations/cifar100/{NEW}") == 4, calls
    assert message is not None and message.startswith(f"version {NEW} is READY but its warm-up explanations "
                                                       "failed: 500 "), (message, said)


def test_a_key_renewal_during_an_unregister_waits_the_http_timeout_not_the_ready_timeout(tmp_path):
    """An unregister may wait --ready-timeout (the workers stop first), but the PUT /token that renews a refused
    key is one answer: it waited --ready-timeout too, and its timeout then named --http-timeout with the other's
    seconds."""
    api = StandInManagement(tmp_path, [OLD, NEW], expired={"management"}, token_delay_s=3)

    def go(rollout):
        started = time.monotonic()
        return rollout.unregister_quietly(NEW), rollout.ts.management_url, time.monotonic() - started
    (left, url, took_s), _ = with_stand_in(api, go, http_timeout_s=0.5)  # --ready-timeout 5 s
    assert took_s < 2, took_s
    assert left == (f"TorchServe's management API did not answer PUT {url}/token?type=management within 0.5 s "
                    "(ReadTimeout); a loaded host may need more: --http-timeout (ROLLOUT_ARGS)"), left


def test_a_key_renewal_while_the_version_gets_ready_stays_within_the_ready_timeout(tmp_path):
    """A refused key while waiting for READY: the renewal and the call sent again each had the whole time that was
    left, so the step ran up to one more --http-timeout past --ready-timeout. Each waits what is left now."""
    api = StandInManagement(tmp_path, [OLD, NEW], expired={"management"}, token_delay_s=1.2)

    async def route(request):
        if request.path.startswith("/models/") and api.issued:  # after the renewal: a slow host
            await asyncio.sleep(1.2)
        return await api(request)

    async def go():
        async with stand_in_server(route) as url:
            rollout = stand_in_rollout(tmp_path, url, ready_timeout_s=1.5, drain_s=0, say=print, http_timeout_s=30)
            started = time.monotonic()
            with pytest.raises(RolloutError) as err:
                await asyncio.to_thread(rollout.wait_ready_and_warm, NEW)
            return str(err.value), time.monotonic() - started
    message, took_s = asyncio.run(go())
    assert took_s < 1.9, (took_s, message)
    assert message.startswith(f"version {NEW} was not READY within 1.5 s"), message


def test_an_unregister_that_times_out_names_the_ready_timeout_that_holds_it(tmp_path):
    """Unregistering waits for the version's workers to stop, up to --ready-timeout, not --http-timeout: its
    timeout named --http-timeout, an option that would not have helped."""
    api = StandInManagement(tmp_path, [OLD, NEW])

    async def route(request):
        if request.method == "DELETE":
            await asyncio.sleep(2)
        return await api(request)

    async def go():
        async with stand_in_server(route) as url:
            rollout = stand_in_rollout(tmp_path, url, ready_timeout_s=0.5, drain_s=0, say=print, http_timeout_s=30)
            return await asyncio.to_thread(rollout.unregister_quietly, NEW), url
    left, url = asyncio.run(go())
    assert left == (f"TorchServe's management API did not answer DELETE {url}/models/cifar100/{NEW} within 0.5 s "
                    "(ReadTimeout); a loaded host may need more: --ready-timeout (ROLLOUT_ARGS)"), left


def test_the_rollouts_http_timeout_is_an_option(monkeypatch, capsys):
    import serving.rollout as rollout_module

    with pytest.raises(SystemExit) as raised:
        rollout_module.main(["--http-timeout", "0"])  # refused by its type, as every positive setting
    assert raised.value.code == 2
    assert "argument --http-timeout: needs a number above 0, not 0" in capsys.readouterr().err
    # A value given reaches the rollout; none given, the default.
    given = []

    class Running:
        def is_running(self):
            return True
    monkeypatch.setattr(rollout_module, "default_instance", Running)
    monkeypatch.setattr(rollout_module, "roll_out", lambda ts, weights, ready, drain, http_timeout, config:
                        given.append(http_timeout) or 0)
    assert rollout_module.main(["--http-timeout", "7.5"]) == 0 and rollout_module.main([]) == 0
    assert given == [7.5, HTTP_TIMEOUT_S]


def test_the_rollout_passes_on_make_archives_warnings(tmp_path):
    """The rollout built its archive quietly, so weights with no calibration.json beside them went into service
    uncalibrated (nothing ever "unsure") without the warning `make archive` prints for them."""
    weights = tmp_path / "weights" / SHIPPED_WEIGHTS.name
    weights.parent.mkdir()
    shutil.copyfile(SHIPPED_WEIGHTS, weights)
    said: list[str] = []
    ts = TorchServeInstance(tmp_path, model_store=tmp_path / "store")
    ts.model_store.mkdir()
    mar = Rollout(ts, say=said.append).archive(weights, NEW)
    assert mar.is_file()
    assert any(line.startswith(f"warning: {weights.parent / 'calibration.json'} is missing: serving uncalibrated "
                               "probabilities") for line in said), said


def test_a_bad_port_setting_is_an_error_line_not_a_traceback():
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "serving.rollout"], cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "TS_MANAGEMENT_PORT": "abc"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert "TS_MANAGEMENT_PORT" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_same_weights_built_from_a_changed_handler_are_not_nothing_to_do(tmp_path):
    """The version names the weights only: with a changed handler or model-config.yaml the rollout said "already
    serves cifar100; nothing to do" and the change was never served. The served archive's inputs digest (beside
    it) differs from the one these weights would be packed with now: said, with what serves the change."""
    api = StandInManagement(tmp_path, [NEW])
    (tmp_path / f"cifar100-{NEW}.mar.inputs").write_text("0" * 64 + "\n")  # built from another handler
    with pytest.raises(RolloutError) as err:
        with_stand_in(api, lambda rollout: rollout.run(SHIPPED_WEIGHTS))
    assert f"version {NEW} already serves cifar100, but" in str(err.value) and "other inputs" in str(err.value)
    assert f"make stop && make serve WEIGHTS={SHIPPED_WEIGHTS}" in str(err.value)
    assert not any(method in ("POST", "PUT", "DELETE") for method, _ in api.calls)  # nothing registered or changed
    (tmp_path / f"cifar100-{NEW}.mar.inputs").write_text(inputs_digest(SHIPPED_WEIGHTS, NEW) + "\n")  # the same
    version, said = with_stand_in(api, lambda rollout: rollout.run(SHIPPED_WEIGHTS))
    assert version == NEW and "nothing to do" in said[-1]


def warm_version_route(api: StandInManagement, explanation_s: float = 0, set_default=None):
    """The stand-in's routes, its predictions answered by NEW, its explanations after ``explanation_s``; ``set_default(version)``
    (async, a web.Response) answers PUT .../set-default."""
    explanations: list[float] = []

    async def route(request):
        if request.path.startswith("/predictions/"):
            return web.json_response({"label": "ray", "probability": 0.5, "model_version": NEW})
        if request.path.startswith("/explanations/"):
            explanations.append(time.monotonic())
            await asyncio.sleep(explanation_s)
            return web.json_response({"label": "ray", "probability": 0.5, "model_version": NEW,
                                      "heatmap": "data:image/png;base64,iVBORw0KGgo="})
        if request.path.endswith("/set-default") and set_default is not None:
            api.calls.append((request.method, request.path))
            return await set_default(request.path.split("/")[3])
        return await api(request)
    return route, explanations


def test_a_switch_refused_withdraws_the_new_version_and_says_the_old_one_serves(tmp_path):
    """PUT set-default answered 500: the new version stayed registered beside the old, its workers running, and the
    error did not say so. Now it is unregistered (the old one never stopped serving) and the error says that."""
    api = StandInManagement(tmp_path, [OLD, NEW])

    async def refuse(version):
        return web.json_response({"code": 500, "message": "no"}, status=500)
    route, _ = warm_version_route(api, set_default=refuse)

    def run(rollout):
        with pytest.raises(RolloutError) as info:
            rollout.run(SHIPPED_WEIGHTS)
        return str(info.value)
    message, _ = with_stand_in_route(api, route, run)
    assert message.startswith(f"could not make {NEW} the default: 500"), message
    assert f"{OLD} still serves; {NEW} was unregistered" in message, message
    assert ("DELETE", f"/models/cifar100/{NEW}") in api.calls and api.registered == [OLD]


@pytest.mark.parametrize("answer", ["refused", "late"])
def test_a_failed_registration_leaves_nothing_of_the_new_version(tmp_path, answer):
    """POST /models refused: the new version's archive stayed in the model store. Not answered within
    --http-timeout, though TorchServe registered it: the new version's workers ran beside the old after the
    rollout had failed. Now the archive goes, and a version registered all the same is unregistered."""
    api = StandInManagement(tmp_path, [OLD])

    async def route(request):
        if request.method == "POST" and request.path == "/models":
            api.calls.append(("POST", "/models"))
            if answer == "refused":
                return web.json_response({"code": 500, "message": "no room"}, status=500)
            api.registered.append(NEW)  # registered, but its answer comes after the rollout stopped waiting
            await asyncio.sleep(2)
            return web.json_response({"status": "registered"}, status=202)
        return await api(request)

    def run(rollout):
        with pytest.raises(RolloutError) as info:
            rollout.run(SHIPPED_WEIGHTS)
        return str(info.value)
    message, _ = with_stand_in_route(api, route, run, http_timeout_s=0.5)
    assert ("POST", "/models") in api.calls and api.registered == [OLD], (api.calls, api.registered)
    assert not list(tmp_path.glob(f"cifar100-{NEW}.mar*")), list(tmp_path.iterdir())
    if answer == "refused":
        assert message == f"TorchServe refused to register cifar100-{NEW}.mar: 500 " + \
            '{"code": 500, "message": "no room"}' + f"\n{OLD} still serves", message
    else:
        assert message.startswith("TorchServe's management API did not answer POST") and "--http-timeout" in message
        assert message.endswith(f"{OLD} still serves; {NEW} was unregistered"), message
        assert ("DELETE", f"/models/cifar100/{NEW}") in api.calls, api.calls


def test_an_old_version_whose_queue_never_empties_is_unregistered_with_a_warning(tmp_path):
    """The drain waited up to --ready-timeout for the old version's queue, then unregistered it without a word,
    though TorchServe never answers the requests still queued there. Now the operator is told how many."""
    api = StandInManagement(tmp_path, [NEW, OLD])

    async def route(request):
        if request.method == "GET" and request.path == f"/models/cifar100/{OLD}":
            return web.json_response([{"modelVersion": OLD, "jobQueueStatus": {"pendingRequests": 3}}])
        return await api(request)

    def drain(rollout):
        rollout.ready_timeout_s = 0.3
        rollout.drain_and_unregister(OLD, "cifar100.mar")
    _, said = with_stand_in_route(api, route, drain)
    assert said[0] == (f"warning: {OLD} still has 3 request(s) queued after --ready-timeout (0.3 s): unregistered "
                       "all the same, TorchServe never answers them"), said
    assert said[1] == f"drained and unregistered {OLD}" and api.registered == [NEW]


# The rollout SIGTERM'd runs in a child process: a signal sent to the test process itself (the rollout in-process) once
# crashed pytest. The child's SIGTERM and SIGINT get their default dispositions back (CI starts the tests in the
# background, where SIGINT is inherited ignored); the stand-in serves from this process.
ROLLOUT_IN_A_CHILD = """
import sys
from pathlib import Path
from model.shipped import SHIPPED_WEIGHTS
from serving.rollout import roll_out
from serving.torchserve import TorchServeInstance
workdir, port, http_timeout_s = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
ts = TorchServeInstance(workdir, {"inference": port, "management": port, "metrics": port, "grpc_inference": 1,
                                  "grpc_management": 2}, model_store=workdir)
sys.exit(roll_out(ts, SHIPPED_WEIGHTS, ready_timeout_s=60, drain_s=0, http_timeout_s=http_timeout_s))
"""


def default_signals():
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def roll_out_sigtermed(api: StandInManagement, route, when: threading.Event, http_timeout_s: float = 5,
                       box: dict | None = None):
    """roll_out NEW in a child process on the stand-in answering with ``route``, SIGTERM'd as soon as ``when`` is set
    (by the route, at the call it waits for): (exit status, its output, monotonic time of the signal); the time its
    process ended is box["exited"] when ``box`` is given."""
    box = {} if box is None else box

    def child(url: str):
        port = url.rsplit(":", 1)[1]
        proc = subprocess.Popen([sys.executable, "-c", ROLLOUT_IN_A_CHILD, str(api.workdir), port, str(http_timeout_s)],
                                cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, preexec_fn=default_signals)
        try:
            assert when.wait(120), "the rollout never reached the call to interrupt"
            box["signalled"] = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
            box["exited"] = time.monotonic()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return proc.returncode, out

    async def go():
        async with stand_in_server(route) as url:
            return await asyncio.to_thread(child, url)
    rc, out = asyncio.run(go())
    return rc, out, box["signalled"]


def test_a_new_version_serving_beside_an_old_one_it_could_not_unregister_exits_3(tmp_path):
    """The switch done, the old version's unregistering refused: the command exited 1, as for a rollout that left
    the old version serving, so a CI job could not tell whether the new weights serve. Now 3, saying so."""
    api = StandInManagement(tmp_path, [OLD, NEW])

    async def switch(version):
        api.registered.sort(key=lambda v: v != version)  # the default comes first
        return web.json_response({"status": "Default version succsesfully updated"})
    warm, _ = warm_version_route(api, set_default=switch)

    async def route(request):
        if request.method == "DELETE" and request.path == f"/models/cifar100/{OLD}":
            return web.json_response({"code": 500, "message": "no"}, status=500)
        return await warm(request)

    async def go():
        async with stand_in_server(route) as url:
            return await asyncio.to_thread(
                subprocess.run, [sys.executable, "-c", ROLLOUT_IN_A_CHILD, str(tmp_path), url.rsplit(":", 1)[1], "5"],
                cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    done = asyncio.run(go())
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"error: the new version serves, but unregistering {OLD} failed: 500" in done.stderr, done.stderr
    assert api.registered == [NEW, OLD] and f"{NEW} is the default" in done.stdout, done.stdout


def test_sigterm_during_the_warm_up_withdraws_the_version_at_once_and_sends_nothing_again(tmp_path):
    """SIGTERM (a CI cancel, a pod's stop) while a warm-up explanation hangs: the withdraw waited for the warm-up's
    threads, which sent the call once more after --http-timeout, so it began ~2 x --http-timeout later (the kill that
    follows SIGTERM could come first, leaving the new version's workers beside the old). Now it begins at once, and
    the process ends with it: it lived on until the abandoned call timed out (its pool's threads joined at exit)."""
    api = StandInManagement(tmp_path, [OLD, NEW])
    route, explanations = warm_version_route(api, explanation_s=6)  # past --http-timeout
    hanging, withdrawn = threading.Event(), []

    async def watched(request):
        if request.path.startswith("/explanations/"):
            hanging.set()
        if request.method == "DELETE":
            withdrawn.append(time.monotonic())
        return await route(request)
    ended = {}
    rc, out, signalled = roll_out_sigtermed(api, watched, hanging, http_timeout_s=5, box=ended)
    assert rc == 128 + signal.SIGTERM, out
    assert ("DELETE", f"/models/cifar100/{NEW}") in api.calls and api.registered == [OLD], out
    assert withdrawn[0] - signalled < 2.5, f"the withdraw came {withdrawn[0] - signalled:.1f} s after SIGTERM"
    assert ended["exited"] - signalled < 3.5, f"the process ended {ended['exited'] - signalled:.1f} s after SIGTERM"
    time.sleep(max(0.0, explanations[0] + 5.5 - time.monotonic()))  # past the abandoned call's timeout
    assert len(explanations) == 1, "the interrupted warm-up sent its explanation again"
    assert f"interrupted: unregistering {NEW}" in out, out


def test_sigterm_during_a_switch_that_happened_keeps_the_new_version_and_says_so(tmp_path):
    """SIGTERM while TorchServe answers the switch late (it has switched): the version is asked, not guessed, and
    the new one, now serving, is not withdrawn."""
    api = StandInManagement(tmp_path, [OLD, NEW])
    switching = threading.Event()

    async def slow_switch(version):
        api.registered.remove(version)
        api.registered.insert(0, version)  # the stand-in's default is its first version
        switching.set()
        await asyncio.sleep(3)
        return web.json_response({"status": "Default version succesfully updated"})
    route, _ = warm_version_route(api, set_default=slow_switch)
    rc, out, _ = roll_out_sigtermed(api, route, switching)
    assert rc == 128 + signal.SIGTERM, out
    assert ("DELETE", f"/models/cifar100/{NEW}") not in api.calls and api.registered[0] == NEW, out
    assert f"interrupted after the switch: {NEW} serves" in out, out
